//! Host physical memory: the frame allocator built from the memory map, the
//! kernel heap, and the kernel's own page tables (an identity map of all
//! physical memory, so a host-physical address is its own host-virtual one).
//! Leaf module: the pointer casts from physical addresses live here.

use alloc::collections::BTreeMap;
use boot::{BootInfo, MemoryKind};
use hv_core::addr::{HostPhysAddr, HostVirtAddr};
use hv_core::frames::{FrameAllocator, FreeRanges};
use linked_list_allocator::LockedHeap;
use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{PageTable, PageTableFlags, PhysFrame};
use x86_64::PhysAddr;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static FRAMES: Mutex<FreeRanges> = Mutex::new(FreeRanges::new());
/// Ranges handed out once the heap exists (address -> size): only these
/// can be given back, so no caller can put memory it never got (the kernel
/// image, the heap, boot modules) into the free set.
static OUTSTANDING: Mutex<Option<BTreeMap<u64, u64>>> = Mutex::new(None);

const HEAP_SIZE: u64 = 16 << 20;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The kernel's frame allocator (a handle to the global free set).
#[derive(Clone, Copy, Debug, Default)]
pub struct Frames;

impl FrameAllocator for Frames {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
        let at = FRAMES.lock().take(size, align)?;
        // SAFETY: `take` handed out this range exclusively; it is identity
        // mapped and nobody else refers to it.
        unsafe { core::ptr::write_bytes(at as *mut u8, 0, size as usize) };
        if let Some(out) = OUTSTANDING.lock().as_mut() {
            out.insert(at, size);
        }
        Some(HostPhysAddr::new(at))
    }

    /// Gives back a range exactly as it was handed out; anything else
    /// (never allocated, freed twice, a different size) is refused and
    /// logged, and the free set does not change.
    fn free_contiguous(&mut self, addr: HostPhysAddr, size: u64) {
        let a = addr.as_u64();
        let handed_out = OUTSTANDING
            .lock()
            .as_mut()
            .is_some_and(|out| match out.get(&a) {
                Some(&s) if s == size => out.remove(&a).is_some(),
                _ => false,
            });
        if !handed_out {
            log::error!("frame allocator: {addr:?}+{size:#x} was not handed out; not freed");
            return;
        }
        if let Err(e) = FRAMES.lock().insert(a, a + size) {
            log::error!("frame allocator: freeing {addr:?}+{size:#x}: {e:?}");
        }
    }
}

/// Bytes of host memory still free.
pub fn free_bytes() -> u64 {
    FRAMES.lock().free_bytes()
}

/// The host-virtual address of a host-physical one (identity map).
pub fn phys_to_virt(p: HostPhysAddr) -> HostVirtAddr {
    HostVirtAddr::new(p.as_u64())
}

/// A pointer to host-physical memory, for leaf modules that must touch it.
pub fn phys_ptr<T>(p: HostPhysAddr) -> *mut T {
    phys_to_virt(p).as_u64() as *mut T
}

/// Why memory could not be set up.
#[derive(Debug)]
pub enum MemError {
    NoMemoryMap,
    Ranges(hv_core::frames::RangeError),
    OutOfMemory(&'static str),
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMemoryMap => write!(f, "the boot loader gave no memory map"),
            Self::Ranges(e) => write!(f, "bad memory map: {e:?}"),
            Self::OutOfMemory(what) => write!(f, "out of memory for the {what}"),
        }
    }
}

/// Builds the free set from the memory map (less the image, the modules and
/// the boot information), the heap, and the kernel's own page tables.
pub fn init(info: &BootInfo) -> Result<(), MemError> {
    if info.memory.is_empty() {
        return Err(MemError::NoMemoryMap);
    }
    let mut max_end = 1u64 << 32;
    {
        let mut f = FRAMES.lock();
        for r in info.memory.iter().filter(|r| r.kind == MemoryKind::Usable) {
            // Leave the first MiB alone (BIOS data, real-mode structures).
            let start = r.start.max(0x10_0000);
            let end = r.start.saturating_add(r.len);
            if start < end {
                f.insert(start, end).map_err(MemError::Ranges)?;
            }
        }
        for r in info
            .memory
            .iter()
            .filter(|r| r.kind != MemoryKind::Reserved)
        {
            max_end = max_end.max(r.start.saturating_add(r.len));
        }
        // Only the addresses of the linker symbols are taken.
        let (img_start, img_end) = (
            core::ptr::addr_of!(__image_start) as u64,
            core::ptr::addr_of!(__image_end) as u64,
        );
        f.reserve(img_start, img_end).map_err(MemError::Ranges)?;
        for m in &info.modules {
            f.reserve(m.start, m.end).map_err(MemError::Ranges)?;
        }
        f.reserve(info.info_range.0, info.info_range.0 + info.info_range.1)
            .map_err(MemError::Ranges)?;
        // Keep everything below 4 GiB that the boot identity map covers;
        // memory above it becomes reachable with the new page tables.
    }
    let heap = Frames
        .alloc_contiguous(HEAP_SIZE, 4096)
        .ok_or(MemError::OutOfMemory("heap"))?;
    // SAFETY: the range was just taken from the free set for the heap alone
    // and is identity mapped.
    unsafe { HEAP.lock().init(phys_ptr(heap), HEAP_SIZE as usize) };
    // From here on every range handed out is recorded (the heap itself is
    // never given back).
    *OUTSTANDING.lock() = Some(BTreeMap::new());
    build_page_tables(max_end)?;
    Ok(())
}

/// Replaces the boot page tables with an identity map of `[0, end)` in
/// 2 MiB pages (all of physical memory, including MMIO below 4 GiB).
fn build_page_tables(end: u64) -> Result<(), MemError> {
    const TWO_MIB: u64 = 2 << 20;
    let end = end.div_ceil(1 << 30) * (1 << 30);
    let table = |what| -> Result<&'static mut PageTable, MemError> {
        let f = Frames.alloc_frame().ok_or(MemError::OutOfMemory(what))?;
        // SAFETY: a fresh zeroed frame, identity mapped, owned by the page
        // tables from now on; zero is a valid (empty) page table.
        Ok(unsafe { &mut *phys_ptr::<PageTable>(f) })
    };
    let pml4 = table("PML4")?;
    let table_flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    let mut gb = 0;
    while gb < end {
        let i4 = ((gb >> 39) & 511) as usize;
        if pml4[i4].is_unused() {
            let pdpt = table("PDPT")?;
            pml4[i4].set_addr(PhysAddr::new(pdpt as *mut PageTable as u64), table_flags);
        }
        // SAFETY: the entry was set just above to a table of ours.
        let pdpt = unsafe { &mut *(pml4[i4].addr().as_u64() as *mut PageTable) };
        let pd = table("PD")?;
        for (i, e) in pd.iter_mut().enumerate() {
            e.set_addr(
                PhysAddr::new(gb + i as u64 * TWO_MIB),
                table_flags | PageTableFlags::HUGE_PAGE,
            );
        }
        pdpt[((gb >> 30) & 511) as usize]
            .set_addr(PhysAddr::new(pd as *mut PageTable as u64), table_flags);
        gb += 1 << 30;
    }
    let frame = PhysFrame::from_start_address(PhysAddr::new(pml4 as *mut PageTable as u64))
        .map_err(|_| MemError::OutOfMemory("aligned PML4"))?;
    // SAFETY: the new tables identity-map all physical memory, including the
    // running code, stack, heap and every frame handed out, exactly as the
    // boot tables did for the first 4 GiB.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    log::debug!("page tables: identity map of {:#x} bytes", end);
    Ok(())
}

/// Host memory as hv-core sees it: identity-mapped physical access plus the
/// frame allocator. Its holder can name any host-physical address, so only
/// `unsafe` code can create one ([`HostMem::new`]): safe code reaches host
/// memory only through an owner that got one that way (a VM's guest
/// memory, bounded by its RAM blocks; the EPT host, bounded by its tables).
#[derive(Debug)]
pub struct HostMem {
    _owned: (),
}

impl HostMem {
    /// # Safety
    /// Every range the holder passes to [`PhysAccess`](hv_core::phys::PhysAccess)
    /// must be host memory it owns while it accesses it: frames it took from
    /// the allocator and has not given back, or the RAM blocks of its VM.
    /// Nothing else (kernel image, heap, page tables, boot modules, other
    /// VMs' memory) may be named.
    pub const unsafe fn new() -> Self {
        Self { _owned: () }
    }
}

impl hv_core::phys::PhysAccess for HostMem {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        // SAFETY: the range is memory this holder owns (the contract of
        // `HostMem::new`), so nothing else refers to it mutably; all
        // physical memory is identity mapped, so the pointer is valid.
        unsafe { core::ptr::copy_nonoverlapping(phys_ptr::<u8>(addr), buf.as_mut_ptr(), buf.len()) }
    }
    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        // SAFETY: as for `read`: owned by the holder, identity mapped, and
        // `data` is a Rust slice, which cannot overlap host memory the
        // holder owns exclusively.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), phys_ptr::<u8>(addr), data.len()) }
    }
}

impl FrameAllocator for HostMem {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
        Frames.alloc_contiguous(size, align)
    }
    fn free_contiguous(&mut self, addr: HostPhysAddr, size: u64) {
        Frames.free_contiguous(addr, size)
    }
}

/// The bytes of a boot module.
pub fn module_bytes(m: &boot::Module) -> Option<&'static [u8]> {
    let len = usize::try_from(m.end.checked_sub(m.start)?).ok()?;
    if m.start == 0 {
        return None;
    }
    // SAFETY: the module's range was reserved in `init`, so no frame of it is
    // ever handed out; it is identity mapped and only read.
    Some(unsafe { core::slice::from_raw_parts(m.start as *const u8, len) })
}
