//! Host physical memory: the frame-allocator trait that everything needing
//! host frames (EPT tables, VMCS regions, guest RAM) goes through, and
//! [`FreeRanges`], the allocator the kernel builds from the memory map.

use crate::addr::{HostPhysAddr, PAGE_SIZE};

/// Hands out and takes back host memory. Implemented by the kernel over the
/// memory map and by counting mocks in tests.
pub trait FrameAllocator {
    /// `size` bytes (a multiple of 4 KiB) of contiguous host memory aligned to
    /// `align` (a power of two, at least 4 KiB), zeroed, or `None`.
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr>;

    /// Gives back a range obtained from `alloc_contiguous`.
    fn free_contiguous(&mut self, addr: HostPhysAddr, size: u64);

    /// One zeroed 4 KiB frame.
    fn alloc_frame(&mut self) -> Option<HostPhysAddr> {
        self.alloc_contiguous(PAGE_SIZE, PAGE_SIZE)
    }

    /// Gives back one 4 KiB frame.
    fn free_frame(&mut self, addr: HostPhysAddr) {
        self.free_contiguous(addr, PAGE_SIZE)
    }
}

/// Maximum number of disjoint free ranges tracked.
pub const MAX_FREE_RANGES: usize = 256;

/// A set of free physical ranges, first-fit, merging on free. It keeps its
/// bookkeeping in a fixed array so it works before the heap exists; the
/// kernel zeroes what it hands out.
#[derive(Debug, Default)]
pub struct FreeRanges {
    /// Sorted, disjoint, non-adjacent `(start, end)` pairs.
    ranges: heapless::Vec<(u64, u64), MAX_FREE_RANGES>,
    /// Bytes currently free.
    free: u64,
}

/// Why a range could not be added or freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// It overlaps memory that is already free (a double free).
    Overlap { start: u64, end: u64 },
    /// More disjoint ranges than [`MAX_FREE_RANGES`].
    Full,
}

impl FreeRanges {
    /// An empty set.
    pub const fn new() -> Self {
        Self {
            ranges: heapless::Vec::new(),
            free: 0,
        }
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> u64 {
        self.free
    }

    /// The free ranges, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Adds `[start, end)` (page-rounded inwards) to the free set.
    pub fn insert(&mut self, start: u64, end: u64) -> Result<(), RangeError> {
        let start = start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let end = end & !(PAGE_SIZE - 1);
        if start >= end {
            return Ok(());
        }
        let i = self.ranges.partition_point(|&(_, e)| e <= start);
        // Every range from i on ends after `start`; the one before ends at or
        // before it.
        if let Some(&(s, e)) = self.ranges.get(i) {
            if s < end && start < e {
                return Err(RangeError::Overlap {
                    start: s.max(start),
                    end: e.min(end),
                });
            }
        }
        let merge_prev = i > 0 && self.ranges[i - 1].1 == start;
        let merge_next = self.ranges.get(i).is_some_and(|&(s, _)| s == end);
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = end,
            (false, true) => self.ranges[i].0 = start,
            (false, false) => self
                .ranges
                .insert(i, (start, end))
                .map_err(|_| RangeError::Full)?,
        }
        self.free += end - start;
        Ok(())
    }

    /// Removes `[start, end)` from the free set wherever it is free (used to
    /// reserve the kernel image, modules and boot information).
    pub fn reserve(&mut self, start: u64, end: u64) -> Result<(), RangeError> {
        let start = start & !(PAGE_SIZE - 1);
        let end = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut i = 0;
        while i < self.ranges.len() {
            let (s, e) = self.ranges[i];
            if e <= start || s >= end {
                i += 1;
                continue;
            }
            self.ranges.remove(i);
            self.free -= e - s;
            if s < start {
                self.ranges
                    .insert(i, (s, start))
                    .map_err(|_| RangeError::Full)?;
                self.free += start - s;
                i += 1;
            }
            if e > end {
                self.ranges
                    .insert(i, (end, e))
                    .map_err(|_| RangeError::Full)?;
                self.free += e - end;
                i += 1;
            }
        }
        Ok(())
    }

    /// First fit of `size` bytes aligned to `align`; the memory is not zeroed.
    pub fn take(&mut self, size: u64, align: u64) -> Option<u64> {
        if size == 0 || !align.is_power_of_two() || !size.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let align = align.max(PAGE_SIZE);
        let (i, at) = self.ranges.iter().enumerate().find_map(|(i, &(s, e))| {
            let at = s.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(size)? <= e).then_some((i, at))
        })?;
        let (s, e) = self.ranges[i];
        let pieces = usize::from(s < at) + usize::from(at + size < e);
        if self.ranges.len() - 1 + pieces > MAX_FREE_RANGES {
            return None;
        }
        self.ranges.remove(i);
        let mut j = i;
        for piece in [(s, at), (at + size, e)] {
            if piece.0 < piece.1 {
                // Cannot fail: the capacity was checked above.
                self.ranges.insert(j, piece).ok()?;
                j += 1;
            }
        }
        self.free -= size;
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_rejects_double_free() {
        let mut f = FreeRanges::new();
        f.insert(0x1000, 0x3000).unwrap();
        f.insert(0x5000, 0x6000).unwrap();
        f.insert(0x3000, 0x5000).unwrap();
        assert_eq!(f.ranges().collect::<Vec<_>>(), vec![(0x1000, 0x6000)]);
        assert_eq!(f.free_bytes(), 0x5000);
        assert!(matches!(
            f.insert(0x2000, 0x3000),
            Err(RangeError::Overlap { .. })
        ));
        assert_eq!(f.free_bytes(), 0x5000);
    }

    #[test]
    fn take_respects_alignment_and_splits() {
        let mut f = FreeRanges::new();
        f.insert(0x1000, 0x60_0000).unwrap();
        let a = f.take(0x20_0000, 0x20_0000).unwrap();
        assert_eq!(a, 0x20_0000);
        assert_eq!(
            f.ranges().collect::<Vec<_>>(),
            vec![(0x1000, 0x20_0000), (0x40_0000, 0x60_0000)]
        );
        assert_eq!(f.free_bytes(), 0x60_0000 - 0x1000 - 0x20_0000);
        f.insert(a, a + 0x20_0000).unwrap();
        assert_eq!(f.ranges().collect::<Vec<_>>(), vec![(0x1000, 0x60_0000)]);
        assert_eq!(f.take(0x100_0000, 0x1000), None);
        assert_eq!(f.take(0x1001, 0x1000), None);
    }

    #[test]
    fn reserve_cuts_holes() {
        let mut f = FreeRanges::new();
        f.insert(0, 0x10_0000).unwrap();
        f.reserve(0x2800, 0x4100).unwrap();
        assert_eq!(
            f.ranges().collect::<Vec<_>>(),
            vec![(0, 0x2000), (0x5000, 0x10_0000)]
        );
        assert_eq!(f.free_bytes(), 0x10_0000 - 0x3000);
    }
}
