//! Guest RAM as a list of contiguous host chunks, read and written only
//! through bounds-checked copies. No reference into guest memory ever
//! escapes: the guest may change it at any time.

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::phys::PhysAccess;
use alloc::vec::Vec;

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
}
