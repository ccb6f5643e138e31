//! A slow reference resolver: answers "what is at this address" by walking
//! the tree top-down for one address, independently of the renderer. Used by
//! property tests as the model and by `cargo xtask mtree --mark`.

use super::render::Arena;
use super::system::MemorySystem;
use super::{MemoryError, RegionId, RegionKind};
use alloc::vec::Vec;

/// Result of [`MemorySystem::resolve_slow`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SlowHit {
    /// Terminal region.
    pub region: RegionId,
    /// Offset of the address in `region`.
    pub offset: u64,
    /// Read-only through any region on the path.
    pub readonly: bool,
    /// Aliases traversed, outermost first.
    pub aliases: Vec<RegionId>,
}

impl MemorySystem {
    /// Resolves `addr` in the address space whose root is `root`, walking the
    /// tree: the first enabled subregion (in priority order) that resolves the
    /// address wins; a terminating region answers for addresses none of its
    /// subregions resolve. Like QEMU, the walk starts at the flat-view root
    /// ([`MemorySystem::flatview_root`]).
    pub fn resolve_slow(&self, root: RegionId, addr: u64) -> Result<Option<SlowHit>, MemoryError> {
        let Some(start) = self.flatview_root(root)? else {
            return Ok(None);
        };
        let mut path = Vec::new();
        self.walk(start, 0, addr as i128, false, &mut path)
    }

    fn walk(
        &self,
        id: RegionId,
        base: i128,
        addr: i128,
        readonly: bool,
        path: &mut Vec<RegionId>,
    ) -> Result<Option<SlowHit>, MemoryError> {
        let r = self.get(id)?;
        if !r.enabled {
            return Ok(None);
        }
        let start = base + r.addr as i128;
        if addr < start || addr >= start + r.size as i128 {
            return Ok(None);
        }
        let readonly = readonly || r.readonly;
        if let RegionKind::Alias { target, offset } = r.kind {
            let t = self.get(target)?;
            path.push(id);
            let hit = self.walk(
                target,
                start - t.addr as i128 - offset as i128,
                addr,
                readonly,
                path,
            )?;
            path.pop();
            return Ok(hit);
        }
        for &sub in r.subregions.iter().rev() {
            if let Some(hit) = self.walk(sub, start, addr, readonly, path)? {
                return Ok(Some(hit));
            }
        }
        if r.kind.terminates() {
            return Ok(Some(SlowHit {
                region: id,
                offset: (addr - start) as u64,
                readonly,
                aliases: path.clone(),
            }));
        }
        Ok(None)
    }
}
