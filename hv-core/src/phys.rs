//! Access to host-physical memory, as a trait so that EPT building, guest
//! memory and guest loading run unchanged in host tests.

use crate::addr::HostPhysAddr;

/// Reads and writes host-physical memory. The kernel implements it over its
/// identity map; tests over a `Vec`. Implementations check nothing beyond
/// their own bounds, so an implementation over raw host memory must not be
/// creatable by safe code: the kernel's `HostMem::new` is `unsafe`, and its
/// holders (guest memory bounded by the VM's RAM blocks, the EPT host
/// bounded by its own tables) only pass memory they own.
pub trait PhysAccess {
    /// Copies `buf.len()` bytes from `addr`.
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]);
    /// Copies `data` to `addr`.
    fn write(&mut self, addr: HostPhysAddr, data: &[u8]);

    /// Reads a little-endian `u64`.
    fn read_u64(&self, addr: HostPhysAddr) -> u64 {
        let mut b = [0; 8];
        self.read(addr, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a little-endian `u64`.
    fn write_u64(&mut self, addr: HostPhysAddr, v: u64) {
        self.write(addr, &v.to_le_bytes())
    }

    /// Fills `len` bytes at `addr` with zeroes.
    fn zero(&mut self, addr: HostPhysAddr, len: u64) {
        let z = [0u8; 256];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(z.len() as u64);
            self.write(HostPhysAddr::new(addr.as_u64() + off), &z[..n as usize]);
            off += n;
        }
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod mock {
    //! A flat host memory and a counting frame allocator over it (host
    //! tests, and the `testing` feature).
    use super::*;
    use crate::frames::{FrameAllocator, FreeRanges};
    use alloc::vec;
    use alloc::vec::Vec;

    /// `size` bytes of "host memory" starting at physical address 0.
    pub struct MockPhys {
        pub mem: Vec<u8>,
        pub free: FreeRanges,
        pub allocated: u64,
        pub freed: u64,
        /// One entry per INVEPT: how many frames had been freed then.
        pub invepts: Vec<u64>,
        /// Make INVEPT fail.
        pub fail_invept: bool,
    }

    impl MockPhys {
        /// Memory of `size` bytes; frames from 1 MiB up are allocatable.
        pub fn new(size: u64) -> Self {
            let mut free = FreeRanges::new();
            free.insert(0x10_0000, size).unwrap();
            Self {
                mem: vec![0; size as usize],
                free,
                allocated: 0,
                freed: 0,
                invepts: Vec::new(),
                fail_invept: false,
            }
        }
        /// Frames handed out and not given back.
        pub fn outstanding(&self) -> u64 {
            self.allocated - self.freed
        }
    }

    impl PhysAccess for MockPhys {
        fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
            let a = addr.as_u64() as usize;
            buf.copy_from_slice(&self.mem[a..a + buf.len()]);
        }
        fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
            let a = addr.as_u64() as usize;
            self.mem[a..a + data.len()].copy_from_slice(data);
        }
    }

    impl crate::ept_listener::EptHost for MockPhys {
        fn invept(&mut self, _eptp: u64) -> bool {
            self.invepts.push(self.freed);
            !self.fail_invept
        }
    }

    impl FrameAllocator for MockPhys {
        fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
            let a = self.free.take(size, align)?;
            self.mem[a as usize..(a + size) as usize].fill(0);
            self.allocated += size / 4096;
            Some(HostPhysAddr::new(a))
        }
        fn free_contiguous(&mut self, addr: HostPhysAddr, size: u64) {
            self.free
                .insert(addr.as_u64(), addr.as_u64() + size)
                .unwrap();
            self.freed += size / 4096;
        }
    }
}
