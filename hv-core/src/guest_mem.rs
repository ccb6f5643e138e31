//! Guest memory, read and written only through bounds-checked copies. No
//! reference into guest memory ever escapes: the guest may change it at any
//! time.
//!
//! - [`GuestMemory`] is the accessor everything that runs with a VM uses
//!   (devices, the instruction emulator, the page walk): it resolves each
//!   address in the address space's **current** flat view (inside a
//!   memory transaction too, where the view is rendered on demand) and
//!   reaches the VM's RAM blocks through [`PhysAccess`]. Typed reads and
//!   writes of guest structures go through `zerocopy`.
//!   A [`RamSpan`] ([`GuestMemory::resolve`]) is a range resolved once to
//!   one contiguous piece of one RAM block, then read and written
//!   ([`GuestMemory::read_span`], [`GuestMemory::write_span`]) without
//!   flat-view lookups: virtqueue ring caches (QEMU's `MemoryRegionCache`).
//!   A span is only meaningful for the view it was resolved in; its user
//!   compares [`GuestMemory::view`] and resolves again when the view changed.
//! - [`GuestRam`] is the loader's list of RAM chunks, built before the VM
//!   first runs.

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::dirty::DirtyBitmap;
use crate::ept_listener::RamBlock;
use crate::memory::{FlatView, RangeTarget};
use crate::phys::PhysAccess;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::Cell;
use core::cell::RefCell;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Why a guest-memory access failed. Nothing was read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemError {
    /// Some byte of the range is not RAM or ROM (MMIO, a hole, past 2^64).
    NotMemory { gpa: u64, len: u64 },
    /// A write to ROM or read-only RAM.
    ReadOnly { gpa: u64, len: u64 },
}

impl core::fmt::Display for GuestMemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotMemory { gpa, len } => {
                write!(f, "guest range {gpa:#x}+{len:#x} is not memory")
            }
            Self::ReadOnly { gpa, len } => write!(f, "guest range {gpa:#x}+{len:#x} is read-only"),
        }
    }
}

/// A range of guest memory resolved to one contiguous piece of one RAM
/// block: `len` bytes at `offset` in block `block`, which the flat view
/// showed at guest address `gpa`. Accesses through it are bounds-checked
/// against `len` and the block, never against a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamSpan {
    pub block: u32,
    pub offset: u64,
    pub len: u64,
    /// Every byte was writable RAM when resolved (not ROM, ROMD, read-only).
    pub writable: bool,
    /// Guest address of the first byte when resolved (for error messages).
    pub gpa: u64,
}

/// One piece of an access: `len` bytes at `offset` of RAM block `block`.
#[derive(Clone, Copy)]
struct Piece {
    block: u32,
    offset: u64,
    len: u64,
    readonly: bool,
}

/// One VM's guest memory as seen through one flat view.
pub struct GuestMemory<'a> {
    view: Rc<FlatView>,
    blocks: &'a [RamBlock],
    phys: &'a mut dyn PhysAccess,
    lookups: Cell<u64>,
    /// Where writes are logged while RAM is being migrated (writes Tern
    /// makes for the guest do not set the EPT's dirty flags).
    dirty: Option<&'a RefCell<DirtyBitmap>>,
}

impl<'a> GuestMemory<'a> {
    /// An accessor over `view` (take it from `MemorySystem::flat_view`, which
    /// answers for the tree as it is now) and the VM's host RAM blocks.
    pub fn new(view: Rc<FlatView>, blocks: &'a [RamBlock], phys: &'a mut dyn PhysAccess) -> Self {
        Self {
            view,
            blocks,
            phys,
            lookups: Cell::new(0),
            dirty: None,
        }
    }

    /// Logs every write into `log` (a migration's bitmap of dirty pages).
    pub fn with_dirty_log(mut self, log: Option<&'a RefCell<DirtyBitmap>>) -> Self {
        self.dirty = log;
        self
    }

    /// Marks the pages of a host range written (no-op without a log).
    fn mark(&self, hpa: HostPhysAddr, len: usize) {
        let Some(log) = self.dirty else {
            return;
        };
        let h = hpa.as_u64();
        for (i, b) in self.blocks.iter().enumerate() {
            let start = b.hpa.as_u64();
            if h >= start && h - start < b.size {
                let _ = log.borrow_mut().set_range(i as u32, h - start, len as u64);
                return;
            }
        }
    }

    /// The flat view this accessor resolves addresses in.
    pub fn view(&self) -> &Rc<FlatView> {
        &self.view
    }

    /// How many flat-view lookups this accessor has made (tests check that
    /// span accesses make none).
    pub fn lookups(&self) -> u64 {
        self.lookups.get()
    }

    /// The RAM piece of `[at, end)` that starts at `at` (one flat-view
    /// lookup), for an access `[gpa, gpa + len)`.
    fn piece_at(
        &self,
        at: u64,
        end: u64,
        write: bool,
        gpa: u64,
        len: u64,
    ) -> Result<Piece, GuestMemError> {
        let not_mem = GuestMemError::NotMemory { gpa, len };
        self.lookups.set(self.lookups.get().wrapping_add(1));
        let r = self.view.lookup(at).ok_or(not_mem)?;
        let (b, readonly) = match r.target {
            RangeTarget::Ram(b) | RangeTarget::RamDevice(b) => (b, r.readonly),
            RangeTarget::RomDevice { backing, .. } if r.romd_mode => (backing, true),
            _ => return Err(not_mem),
        };
        if write && readonly {
            return Err(GuestMemError::ReadOnly { gpa, len });
        }
        let block = self.blocks.get(b.block as usize).ok_or(not_mem)?;
        let off = b
            .offset
            .checked_add(r.offset_in_region)
            .and_then(|o| o.checked_add(at - r.start))
            .ok_or(not_mem)?;
        let in_range = (r.end() - u128::from(at)).min(u128::from(u64::MAX)) as u64;
        let n = (end - at).min(in_range).min(block.size.saturating_sub(off));
        if n == 0 {
            return Err(not_mem);
        }
        Ok(Piece {
            block: b.block,
            offset: off,
            len: n,
            readonly,
        })
    }

    /// Splits `[gpa, gpa + len)` into host pieces `(hpa, offset in the
    /// access, bytes)`, checking every byte first.
    fn pieces(
        &self,
        gpa: u64,
        len: u64,
        write: bool,
    ) -> Result<Vec<(HostPhysAddr, usize, usize)>, GuestMemError> {
        let end = gpa
            .checked_add(len)
            .ok_or(GuestMemError::NotMemory { gpa, len })?;
        let mut out = Vec::new();
        let mut at = gpa;
        while at < end {
            let p = self.piece_at(at, end, write, gpa, len)?;
            // piece_at checked that the block exists and holds the piece.
            let hpa = self.blocks[p.block as usize].hpa.as_u64() + p.offset;
            out.push((HostPhysAddr::new(hpa), (at - gpa) as usize, p.len as usize));
            at += p.len;
        }
        Ok(out)
    }

    /// Checks that every byte of `[gpa, gpa + len)` is RAM (or ROM, unless
    /// `write`), without copying or allocating.
    pub fn check(&self, gpa: u64, len: u64, write: bool) -> Result<(), GuestMemError> {
        let end = gpa
            .checked_add(len)
            .ok_or(GuestMemError::NotMemory { gpa, len })?;
        let mut at = gpa;
        while at < end {
            at += self.piece_at(at, end, write, gpa, len)?.len;
        }
        Ok(())
    }

    /// Resolves `[gpa, gpa + len)` (`len` > 0) to one contiguous piece of one
    /// RAM block: `NotMemory` if any byte is not RAM/ROM or the range spans
    /// blocks or non-contiguous offsets, `ReadOnly` if `write` and some byte
    /// is read-only.
    pub fn resolve(&self, gpa: u64, len: u64, write: bool) -> Result<RamSpan, GuestMemError> {
        let not_mem = GuestMemError::NotMemory { gpa, len };
        let end = gpa.checked_add(len).ok_or(not_mem)?;
        let mut span: Option<RamSpan> = None;
        let mut at = gpa;
        while at < end {
            let p = self.piece_at(at, end, write, gpa, len)?;
            match &mut span {
                None => {
                    span = Some(RamSpan {
                        block: p.block,
                        offset: p.offset,
                        len: p.len,
                        writable: !p.readonly,
                        gpa,
                    })
                }
                Some(s) => {
                    if s.block != p.block || s.offset.checked_add(s.len) != Some(p.offset) {
                        return Err(not_mem);
                    }
                    s.len += p.len;
                    s.writable &= !p.readonly;
                }
            }
            at += p.len;
        }
        span.ok_or(not_mem)
    }

    /// Host address of `n` bytes at `off` in span `s`, checked against the
    /// span and its block.
    fn span_hpa(&self, s: &RamSpan, off: u64, n: usize) -> Result<HostPhysAddr, GuestMemError> {
        let err = GuestMemError::NotMemory {
            gpa: s.gpa.wrapping_add(off),
            len: n as u64,
        };
        let end = off.checked_add(n as u64).ok_or(err)?;
        if end > s.len {
            return Err(err);
        }
        let block = self.blocks.get(s.block as usize).ok_or(err)?;
        let start = s.offset.checked_add(off).ok_or(err)?;
        if start.checked_add(n as u64).is_none_or(|e| e > block.size) {
            return Err(err);
        }
        let hpa = block.hpa.as_u64().checked_add(start).ok_or(err)?;
        Ok(HostPhysAddr::new(hpa))
    }

    /// Copies `buf.len()` bytes at offset `off` of span `s` (no view lookup).
    pub fn read_span(&self, s: &RamSpan, off: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let h = self.span_hpa(s, off, buf.len())?;
        self.phys.read(h, buf);
        Ok(())
    }

    /// Copies `data` to offset `off` of span `s` (no view lookup); refuses a
    /// span that was not writable.
    pub fn write_span(&mut self, s: &RamSpan, off: u64, data: &[u8]) -> Result<(), GuestMemError> {
        let h = self.span_hpa(s, off, data.len())?;
        if !s.writable {
            return Err(GuestMemError::ReadOnly {
                gpa: s.gpa.wrapping_add(off),
                len: data.len() as u64,
            });
        }
        self.phys.write(h, data);
        self.mark(h, data.len());
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        for (h, off, n) in self.pieces(gpa, buf.len() as u64, false)? {
            self.phys.read(h, &mut buf[off..off + n]);
        }
        Ok(())
    }

    /// Copies `data` into guest RAM at `gpa` (ROM refuses the whole write).
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        for (h, off, n) in self.pieces(gpa, data.len() as u64, true)? {
            self.phys.write(h, &data[off..off + n]);
            self.mark(h, n);
        }
        Ok(())
    }

    /// Reads a guest structure.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T, GuestMemError> {
        let mut v = T::new_zeroed();
        self.read(gpa, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Writes a guest structure.
    pub fn write_obj<T: IntoBytes + Immutable>(
        &mut self,
        gpa: u64,
        v: &T,
    ) -> Result<(), GuestMemError> {
        self.write(gpa, v.as_bytes())
    }

    /// Whether every byte of the range is writable RAM.
    pub fn is_writable(&self, gpa: u64, len: u64) -> bool {
        self.pieces(gpa, len, true).is_ok()
    }
}

impl crate::emulate::GuestPhysRead for GuestMemory<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ()> {
        self.read(gpa, buf).map_err(|_| ())
    }
}

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamChunk {
    pub gpa: GuestPhysAddr,
    pub hpa: HostPhysAddr,
    pub size: u64,
}

/// An access outside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideRam {
    pub gpa: GuestPhysAddr,
    pub len: u64,
}

impl core::fmt::Display for OutsideRam {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "guest range {:#x}+{:#x} is not RAM",
            self.gpa.as_u64(),
            self.len
        )
    }
}

/// The guest's RAM.
#[derive(Clone, Debug, Default)]
pub struct GuestRam {
    chunks: Vec<RamChunk>,
}

impl GuestRam {
    /// An empty RAM map.
    pub const fn new() -> Self {
        Self { chunks: Vec::new() }
    }

    /// Adds a chunk (must not overlap an existing one).
    pub fn add(&mut self, chunk: RamChunk) -> Result<(), OutsideRam> {
        let end = chunk
            .gpa
            .as_u64()
            .checked_add(chunk.size)
            .ok_or(OutsideRam {
                gpa: chunk.gpa,
                len: chunk.size,
            })?;
        if self
            .chunks
            .iter()
            .any(|c| c.gpa.as_u64() < end && chunk.gpa.as_u64() < c.gpa.as_u64() + c.size)
        {
            return Err(OutsideRam {
                gpa: chunk.gpa,
                len: chunk.size,
            });
        }
        let i = self.chunks.partition_point(|c| c.gpa < chunk.gpa);
        self.chunks.insert(i, chunk);
        Ok(())
    }

    /// The chunks, in address order.
    pub fn chunks(&self) -> &[RamChunk] {
        &self.chunks
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| c.size).sum()
    }

    /// Splits `[gpa, gpa+len)` into host pieces, or fails if any byte is not
    /// RAM.
    fn pieces(
        &self,
        gpa: GuestPhysAddr,
        len: u64,
        mut f: impl FnMut(HostPhysAddr, u64, u64),
    ) -> Result<(), OutsideRam> {
        let err = OutsideRam { gpa, len };
        let end = gpa.as_u64().checked_add(len).ok_or(err)?;
        let mut at = gpa.as_u64();
        while at < end {
            let c = self
                .chunks
                .iter()
                .find(|c| c.gpa.as_u64() <= at && at < c.gpa.as_u64() + c.size)
                .ok_or(err)?;
            let off = at - c.gpa.as_u64();
            let n = (c.size - off).min(end - at);
            f(
                HostPhysAddr::new(c.hpa.as_u64() + off),
                at - gpa.as_u64(),
                n,
            );
            at += n;
        }
        Ok(())
    }

    /// Checks that every byte of a range is RAM (used before touching it,
    /// so a failed access changes nothing).
    pub fn check(&self, gpa: GuestPhysAddr, len: u64) -> Result<(), OutsideRam> {
        self.pieces(gpa, len, |_, _, _| {})
    }

    /// Copies guest memory into `buf`.
    pub fn read(
        &self,
        mem: &impl PhysAccess,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
    ) -> Result<(), OutsideRam> {
        self.check(gpa, buf.len() as u64)?;
        self.pieces(gpa, buf.len() as u64, |h, off, n| {
            mem.read(h, &mut buf[off as usize..(off + n) as usize])
        })
    }

    /// Copies `data` into guest memory.
    pub fn write(
        &self,
        mem: &mut impl PhysAccess,
        gpa: GuestPhysAddr,
        data: &[u8],
    ) -> Result<(), OutsideRam> {
        self.check(gpa, data.len() as u64)?;
        self.pieces(gpa, data.len() as u64, |h, off, n| {
            mem.write(h, &data[off as usize..(off + n) as usize])
        })
    }

    /// Zeroes guest memory.
    pub fn zero(
        &self,
        mem: &mut impl PhysAccess,
        gpa: GuestPhysAddr,
        len: u64,
    ) -> Result<(), OutsideRam> {
        self.check(gpa, len)?;
        self.pieces(gpa, len, |h, _, n| mem.zero(h, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::mock::MockPhys;

    use crate::memory::{MemorySystem, RamBacking};

    #[test]
    fn guest_memory_follows_the_current_view_and_refuses_rom_and_mmio() {
        let mut m = MockPhys::new(1 << 20);
        let mut mem = MemorySystem::new();
        let sys = mem.create_container("sys", 1 << 32).unwrap();
        let ram = mem
            .create_ram(
                "ram",
                0x2000u64.into(),
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        let rom = mem
            .create_rom(
                "rom",
                0x1000u64.into(),
                RamBacking {
                    block: 1,
                    offset: 0,
                },
            )
            .unwrap();
        let io = mem
            .create_mmio("io", 0x1000u64.into(), crate::memory::MmioHandle(0))
            .unwrap();
        mem.add_subregion(sys, 0x1_0000, ram).unwrap();
        mem.add_subregion(sys, 0x1_2000, rom).unwrap();
        mem.add_subregion(sys, 0x1_3000, io).unwrap();
        let space = mem.create_address_space("memory", sys).unwrap();
        let blocks = [
            RamBlock {
                hpa: HostPhysAddr::new(0x4_0000),
                size: 0x2000,
            },
            RamBlock {
                hpa: HostPhysAddr::new(0x5_0000),
                size: 0x1000,
            },
        ];
        m.mem[0x5_0000] = 0xAB;
        {
            let mut g = GuestMemory::new(mem.flat_view(space).unwrap(), &blocks, &mut m);
            g.write_obj(0x1_1ffc, &0x1122_3344u32).unwrap();
            assert_eq!(g.read_obj::<u16>(0x1_1ffe).unwrap(), 0x1122);
            // The last two RAM bytes, then two ROM bytes.
            assert_eq!(g.read_obj::<u32>(0x1_1ffe).unwrap(), 0x00AB_1122);
            // RAM then ROM: readable across, not writable.
            assert_eq!(g.read_obj::<u16>(0x1_1fff).unwrap(), 0xAB11);
            assert_eq!(
                g.write(0x1_1fff, &[0, 0]),
                Err(GuestMemError::ReadOnly {
                    gpa: 0x1_1fff,
                    len: 2
                })
            );
            assert_eq!(g.read_obj::<u8>(0x1_1fff).unwrap(), 0x11, "nothing written");
            assert!(g.read_obj::<u8>(0x1_3000).is_err(), "MMIO is not memory");
            assert!(g.read_obj::<u64>(u64::MAX - 3).is_err());
        }
        assert_eq!(&m.mem[0x4_1ffc..0x4_2000], &[0x44, 0x33, 0x22, 0x11]);
        // Inside a transaction the accessor sees the tree as it is now.
        mem.begin();
        mem.set_address(ram, 0x2_0000).unwrap();
        let g = GuestMemory::new(mem.flat_view(space).unwrap(), &blocks, &mut m);
        assert_eq!(g.read_obj::<u16>(0x2_1ffe).unwrap(), 0x1122);
        assert!(g.read_obj::<u8>(0x1_0000).is_err());
        drop(g);
        mem.commit().unwrap();
    }

    #[test]
    fn spans_are_one_piece_of_one_block_and_bounds_checked() {
        let mut m = MockPhys::new(2 << 20);
        let mut mem = MemorySystem::new();
        let sys = mem.create_container("sys", 1 << 32).unwrap();
        let backing = |block, offset| RamBacking { block, offset };
        // Block 0 shown as two regions at adjacent addresses with adjacent
        // offsets (one span), block 1 as ROM right after them.
        let lo = mem.create_ram("lo", 0x1000, backing(0, 0)).unwrap();
        let hi = mem.create_ram("hi", 0x1000, backing(0, 0x1000)).unwrap();
        let rom = mem.create_rom("rom", 0x1000, backing(1, 0)).unwrap();
        // Block 0 again, but not contiguous with `hi`'s offsets.
        let skew = mem.create_ram("skew", 0x1000, backing(0, 0)).unwrap();
        mem.add_subregion(sys, 0x1_0000, lo).unwrap();
        mem.add_subregion(sys, 0x1_1000, hi).unwrap();
        mem.add_subregion(sys, 0x1_2000, rom).unwrap();
        mem.add_subregion(sys, 0x2_0000, skew).unwrap();
        let space = mem.create_address_space("memory", sys).unwrap();
        let blocks = [
            RamBlock {
                hpa: HostPhysAddr::new(0x4_0000),
                size: 0x2000,
            },
            RamBlock {
                hpa: HostPhysAddr::new(0x5_0000),
                size: 0x1000,
            },
        ];
        let view = mem.flat_view(space).unwrap();
        let mut g = GuestMemory::new(view.clone(), &blocks, &mut m);
        assert!(Rc::ptr_eq(g.view(), &view));
        let s = g.resolve(0x1_0ff0, 0x20, true).unwrap();
        assert_eq!(
            s,
            RamSpan {
                block: 0,
                offset: 0xff0,
                len: 0x20,
                writable: true,
                gpa: 0x1_0ff0
            }
        );
        let lookups = g.lookups();
        g.write_span(&s, 0x1c, &[1, 2, 3, 4]).unwrap();
        let mut b = [0; 4];
        g.read_span(&s, 0x1c, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(g.lookups(), lookups, "span accesses make no lookups");
        assert_eq!(g.read_obj::<u32>(0x1_100c).unwrap(), 0x0403_0201);
        // Past the span (though still RAM): refused, nothing written.
        let past = GuestMemError::NotMemory {
            gpa: 0x1_0ff0 + 0x1d,
            len: 4,
        };
        assert_eq!(g.read_span(&s, 0x1d, &mut b), Err(past));
        assert_eq!(g.write_span(&s, 0x1d, &[9; 4]), Err(past));
        assert_eq!(g.read_span(&s, u64::MAX, &mut b).map_err(|_| ()), Err(()));
        assert_eq!(g.read_obj::<u32>(0x1_100c).unwrap(), 0x0403_0201);
        // A span that claims more than its block holds is refused too.
        let forged = RamSpan { len: 0x3000, ..s };
        assert!(g.read_span(&forged, 0x1010, &mut b).is_err());
        assert!(g.read_span(&forged, 0x100c, &mut b).is_ok());
        // RAM then ROM: different blocks. ROM: readable, not writable.
        assert_eq!(
            g.resolve(0x1_1ff0, 0x20, false),
            Err(GuestMemError::NotMemory {
                gpa: 0x1_1ff0,
                len: 0x20
            })
        );
        assert_eq!(
            g.resolve(0x1_2000, 0x10, true),
            Err(GuestMemError::ReadOnly {
                gpa: 0x1_2000,
                len: 0x10
            })
        );
        let r = g.resolve(0x1_2000, 0x10, false).unwrap();
        assert!(!r.writable);
        assert_eq!(
            g.write_span(&r, 0, &[1]),
            Err(GuestMemError::ReadOnly {
                gpa: 0x1_2000,
                len: 1
            })
        );
        // The end of `hi` is fine; a hole before `skew`, MMIO-free gaps
        // and wrapping ranges are not memory.
        assert!(g.resolve(0x1_1ff0, 0x10, true).is_ok());
        assert!(g.resolve(0x1_f000, 0x2000, false).is_err());
        assert!(g.resolve(0x3_0000, 1, false).is_err());
        assert!(g.resolve(u64::MAX, 2, false).is_err());
        assert!(g.resolve(0x1_0000, 0, false).is_err());
        assert_eq!(g.check(0x1_0000, 0x2000, true), Ok(()));
        assert!(g.check(0x1_1fff, 2, true).is_err());
        assert_eq!(g.check(0x1_1fff, 2, false), Ok(()));
    }

    #[test]
    fn spans_of_the_same_block_must_be_contiguous() {
        let mut m = MockPhys::new(2 << 20);
        let mut mem = MemorySystem::new();
        let sys = mem.create_container("sys", 1 << 32).unwrap();
        let a = mem
            .create_ram(
                "a",
                0x1000,
                RamBacking {
                    block: 0,
                    offset: 0x1000,
                },
            )
            .unwrap();
        let b = mem
            .create_ram(
                "b",
                0x1000,
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        mem.add_subregion(sys, 0, a).unwrap();
        mem.add_subregion(sys, 0x1000, b).unwrap();
        let space = mem.create_address_space("memory", sys).unwrap();
        let blocks = [RamBlock {
            hpa: HostPhysAddr::new(0x4_0000),
            size: 0x2000,
        }];
        let g = GuestMemory::new(mem.flat_view(space).unwrap(), &blocks, &mut m);
        // Readable and writable byte by byte, but block offsets 0x1fff, 0.
        assert_eq!(g.check(0xfff, 2, true), Ok(()));
        assert!(g.resolve(0xfff, 2, false).is_err());
        assert_eq!(g.resolve(0xff0, 0x10, false).unwrap().offset, 0x1ff0);
    }

    #[test]
    fn accesses_span_chunks_and_reject_holes() {
        let mut m = MockPhys::new(1 << 20);
        let mut ram = GuestRam::new();
        ram.add(RamChunk {
            gpa: GuestPhysAddr::new(0),
            hpa: HostPhysAddr::new(0x8000),
            size: 0x1000,
        })
        .unwrap();
        ram.add(RamChunk {
            gpa: GuestPhysAddr::new(0x1000),
            hpa: HostPhysAddr::new(0x2000),
            size: 0x1000,
        })
        .unwrap();
        ram.write(&mut m, GuestPhysAddr::new(0xffe), &[1, 2, 3, 4])
            .unwrap();
        assert_eq!(&m.mem[0x8ffe..0x9000], &[1, 2]);
        assert_eq!(&m.mem[0x2000..0x2002], &[3, 4]);
        let mut b = [0; 4];
        ram.read(&m, GuestPhysAddr::new(0xffe), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        // Straddling the end of RAM fails and writes nothing.
        assert!(ram
            .write(&mut m, GuestPhysAddr::new(0x1ffe), &[9, 9, 9, 9])
            .is_err());
        assert_eq!(&m.mem[0x2ffe..0x3000], &[0, 0]);
        assert!(ram
            .add(RamChunk {
                gpa: GuestPhysAddr::new(0x800),
                hpa: HostPhysAddr::new(0),
                size: 0x1000
            })
            .is_err());
        assert!(ram.read(&m, GuestPhysAddr::new(u64::MAX), &mut b).is_err());
    }

    #[test]
    fn writes_are_logged_by_page_when_a_log_is_attached() {
        use crate::dirty::DirtyBitmap;
        use core::cell::RefCell;
        let mut phys = MockPhys::new(1 << 20);
        let mut mem = MemorySystem::new();
        let sys = mem.create_container("sys", 1 << 32).unwrap();
        let back = RamBacking {
            block: 0,
            offset: 0,
        };
        let ram = mem.create_ram("ram", 0x8000u64.into(), back).unwrap();
        mem.add_subregion(sys, 0, ram).unwrap();
        let space = mem.create_address_space("memory", sys).unwrap();
        let view = mem.flat_view(space).unwrap();
        let blocks = [RamBlock {
            hpa: HostPhysAddr::new(0x4_0000),
            size: 0x8000,
        }];
        let log = RefCell::new(DirtyBitmap::new(&[0x8000]).unwrap());
        let mut m = GuestMemory::new(view.clone(), &blocks, &mut phys).with_dirty_log(Some(&log));
        m.write(0x1FFE, &[1, 2, 3, 4]).unwrap();
        let span = m.resolve(0x6000, 0x10, true).unwrap();
        m.write_span(&span, 8, &[7]).unwrap();
        let pages: alloc::vec::Vec<(u32, u64)> = log.borrow().iter().collect();
        assert_eq!(pages, [(0, 1), (0, 2), (0, 6)]);
        let mut m = GuestMemory::new(view, &blocks, &mut phys);
        m.write(0x5000, &[9]).unwrap();
        assert_eq!(log.borrow().count(), 3, "no log, no marks");
    }
}
