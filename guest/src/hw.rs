//! Raw hardware access for the PCI and virtio drivers: port input, volatile
//! loads and stores at physical addresses (device registers and DMA memory,
//! both reached through the boot identity map of the low 8 GiB), zeroing of
//! pages, and the end of the guest image. Leaf module: the drivers'
//! `unsafe` is here; everything above it is safe code.
//!
//! Every access checks that its address is identity-mapped and naturally
//! aligned and panics otherwise (the panic handler prints and fails the
//! scenario): a wild address must not turn into a page fault, which the
//! guest's IDT stubs would retry forever.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};

/// End of the boot identity map (first 8 GiB, 2 MiB pages).
pub const MAPPED_END: u64 = 8 << 30;

pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port input has no memory effect; the guest owns its ports.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) };
    v
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `inw`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}

fn check(addr: u64, size: u64) {
    let ok = addr.is_multiple_of(size) && addr.checked_add(size).is_some_and(|e| e <= MAPPED_END);
    assert!(ok, "physical access of {size} bytes at {addr:#x}");
}

macro_rules! phys_access {
    ($rd:ident, $wr:ident, $t:ty) => {
        /// Volatile load at an identity-mapped physical address.
        pub fn $rd(addr: u64) -> $t {
            check(addr, core::mem::size_of::<$t>() as u64);
            // SAFETY: `check` proved the address identity-mapped and aligned;
            // the drivers read only device registers and RAM they allocated
            // (a read of RAM or MMIO has no effect on the guest's own state).
            unsafe { core::ptr::read_volatile(addr as *const $t) }
        }

        /// Volatile store at an identity-mapped physical address.
        pub fn $wr(addr: u64, v: $t) {
            check(addr, core::mem::size_of::<$t>() as u64);
            // SAFETY: as for the load; the drivers write only device
            // registers and pages the bump allocator gave them, which
            // nothing in the guest image uses.
            unsafe { core::ptr::write_volatile(addr as *mut $t, v) }
        }
    };
}

phys_access!(rd8, wr8, u8);
phys_access!(rd16, wr16, u16);
phys_access!(rd32, wr32, u32);
phys_access!(rd64, wr64, u64);

/// Fills `len` bytes at `addr` (RAM from the page allocator) with `byte`.
pub fn fill(addr: u64, len: u64, byte: u8) {
    if len == 0 {
        return;
    }
    let ok = addr.checked_add(len).is_some_and(|e| e <= MAPPED_END);
    assert!(ok, "fill of {len:#x} bytes at {addr:#x}");
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the range is identity-mapped RAM that the caller owns (pages
    // from the bump allocator, outside the guest image and its stack).
    unsafe { core::ptr::write_bytes(addr as *mut u8, byte, len as usize) };
    compiler_fence(Ordering::SeqCst);
}

/// A full barrier (MFENCE): orders a store before a later load, as the
/// split virtqueue needs between publishing an index and reading the
/// other side's event index.
pub fn mb() {
    fence(Ordering::SeqCst);
}

/// Orders earlier loads and stores before later stores (publishing).
pub fn wmb() {
    fence(Ordering::Release);
}

/// Orders an index load before the loads of the entries it covers.
pub fn rmb() {
    fence(Ordering::Acquire);
}

extern "C" {
    static __image_end: u8;
}

/// First byte after the guest image (its BSS, boot page tables and stack
/// included), from the linker script.
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// A static that hands out one `&'static mut` to its value, once: for
/// driver state too large for the boot stack.
pub struct TakeOnce<T> {
    taken: AtomicBool,
    cell: UnsafeCell<T>,
}

// SAFETY: the value is reached only through `take`, which gives out at
// most one reference in the program's life, so no two contexts share it.
unsafe impl<T: Send> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    pub const fn new(v: T) -> Self {
        TakeOnce {
            taken: AtomicBool::new(false),
            cell: UnsafeCell::new(v),
        }
    }

    /// The value, the first time; `None` after that.
    // A `&mut` from `&self` is what this type is for; `taken` makes it
    // unique.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: `taken` was false, so this is the only call that ever
        // gets here: no other reference to the value exists or will.
        Some(unsafe { &mut *self.cell.get() })
    }
}
