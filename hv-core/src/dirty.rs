//! Dirty-page bitmaps for pre-copy RAM migration: one bit per 4 KiB page of
//! every RAM block (`RamBacking::block` is the block index), as QEMU keeps
//! one migration bitmap per `RAMBlock` (`RAMBlock::bmap`).
//!
//! The bitmap is filled from the EPT by
//! [`EptListener::sync_dirty`](crate::ept_listener::EptListener::sync_dirty)
//! and by whoever writes guest RAM from the host side (device models), and
//! drained by the migration loop ([`DirtyBitmap::take`], then
//! [`DirtyBitmap::iter`]).
//!
//! Nothing here panics on bad input: an unknown block or a page beyond a
//! block's end is an error (setters) or reads as clean (queries).

use crate::addr::PAGE_SIZE;
use alloc::vec::Vec;
use core::fmt;

/// Dirty-log client bit for migration in a region's dirty-log mask
/// (QEMU's `DIRTY_MEMORY_MIGRATION` is client 2, mask bit `1 << 2`). The EPT
/// listener logs a range whenever its mask is non-zero, whatever the client.
pub const LOG_MIGRATION: u8 = 1 << 2;

/// Why a bitmap operation was refused (nothing was changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyError {
    /// No such block, or a page at or beyond the block's end (`page` is the
    /// first page out of range).
    OutOfRange { block: u32, page: u64 },
    /// A byte range whose end overflows 64 bits.
    Overflow { block: u32 },
    /// The two bitmaps (or a bitmap and a block list) describe different
    /// blocks.
    ShapeMismatch,
    /// A block's bitmap cannot be allocated (or there are more than 2^32
    /// blocks).
    TooLarge { block: usize },
}

impl fmt::Display for DirtyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OutOfRange { block, page } => {
                write!(f, "page {page:#x} is not in RAM block {block}")
            }
            Self::Overflow { block } => write!(f, "byte range overflows in RAM block {block}"),
            Self::ShapeMismatch => write!(f, "dirty bitmaps of different RAM blocks"),
            Self::TooLarge { block } => write!(f, "dirty bitmap of RAM block {block} too large"),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Block {
    /// Pages in the block (its size rounded up to whole pages).
    pages: u64,
    /// Bit `p % 64` of word `p / 64` is page `p`; bits past `pages` stay 0.
    words: Vec<u64>,
    /// Bits set.
    count: u64,
}

impl Block {
    fn new(size: u64, index: usize) -> Result<Self, DirtyError> {
        let pages = size.div_ceil(PAGE_SIZE);
        let n = usize::try_from(pages.div_ceil(64))
            .map_err(|_| DirtyError::TooLarge { block: index })?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|_| DirtyError::TooLarge { block: index })?;
        words.resize(n, 0);
        Ok(Self {
            pages,
            words,
            count: 0,
        })
    }

    /// Pages `[first, end)` as (word index, mask) pairs; `first < end <=
    /// pages`, so every index is inside `words`.
    fn masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
        let (w0, w1) = (first / 64, (end - 1) / 64);
        (w0..=w1).map(move |w| {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { (end - 1) % 64 + 1 } else { 64 };
            let ones = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            (w as usize, ones)
        })
    }
}

/// One bit per 4 KiB page per RAM block.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    blocks: Vec<Block>,
    count: u64,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field(
                "pages",
                &self.blocks.iter().map(|b| b.pages).collect::<Vec<_>>(),
            )
            .field("dirty", &self.count)
            .finish()
    }
}

impl DirtyBitmap {
    /// A clean bitmap for blocks of `block_sizes` bytes (block `i` has
    /// `block_sizes[i]` bytes; a partial last page counts as a page).
    pub fn new(block_sizes: &[u64]) -> Result<Self, DirtyError> {
        if u32::try_from(block_sizes.len()).is_err() {
            return Err(DirtyError::TooLarge {
                block: block_sizes.len(),
            });
        }
        let mut blocks = Vec::new();
        blocks
            .try_reserve_exact(block_sizes.len())
            .map_err(|_| DirtyError::TooLarge { block: 0 })?;
        for (i, &size) in block_sizes.iter().enumerate() {
            blocks.push(Block::new(size, i)?);
        }
        Ok(Self { blocks, count: 0 })
    }

    /// Whether the bitmap has exactly the pages of blocks of `block_sizes`
    /// bytes.
    pub fn fits(&self, block_sizes: &[u64]) -> bool {
        self.blocks.len() == block_sizes.len()
            && self
                .blocks
                .iter()
                .zip(block_sizes)
                .all(|(b, s)| b.pages == s.div_ceil(PAGE_SIZE))
    }

    fn same_shape(&self, other: &Self) -> bool {
        self.blocks.len() == other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|(a, b)| a.pages == b.pages)
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Pages of `block`, `None` if there is no such block.
    pub fn pages(&self, block: u32) -> Option<u64> {
        self.blocks.get(block as usize).map(|b| b.pages)
    }

    /// The block and its page range `[first, end)` for the bytes
    /// `[offset, offset + len)` (`len > 0`).
    fn span(
        &mut self,
        block: u32,
        offset: u64,
        len: u64,
    ) -> Result<(&mut Block, u64, u64), DirtyError> {
        let b = self
            .blocks
            .get_mut(block as usize)
            .ok_or(DirtyError::OutOfRange { block, page: 0 })?;
        let end = offset
            .checked_add(len)
            .ok_or(DirtyError::Overflow { block })?;
        let (first, last) = (offset / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        if last > b.pages {
            return Err(DirtyError::OutOfRange {
                block,
                page: first.max(b.pages),
            });
        }
        Ok((b, first, last))
    }

    /// The block, word index and bit of one page.
    fn bit(&mut self, block: u32, page: u64) -> Result<(&mut Block, usize, u64), DirtyError> {
        match self.blocks.get_mut(block as usize) {
            Some(b) if page < b.pages => Ok((b, (page / 64) as usize, 1 << (page % 64))),
            Some(b) => Err(DirtyError::OutOfRange {
                block,
                page: b.pages,
            }),
            None => Err(DirtyError::OutOfRange { block, page: 0 }),
        }
    }

    /// Marks one page; `true` if it was clean.
    pub fn set(&mut self, block: u32, page: u64) -> Result<bool, DirtyError> {
        let (b, w, bit) = self.bit(block, page)?;
        let new = b.words[w] & bit == 0;
        b.words[w] |= bit;
        b.count += u64::from(new);
        self.count += u64::from(new);
        Ok(new)
    }

    /// Marks every page that the bytes `[offset, offset + len)` of `block`
    /// touch; returns how many were clean. A range reaching beyond the block
    /// changes nothing and is an error.
    pub fn set_range(&mut self, block: u32, offset: u64, len: u64) -> Result<u64, DirtyError> {
        if len == 0 {
            return self
                .pages(block)
                .map(|_| 0)
                .ok_or(DirtyError::OutOfRange { block, page: 0 });
        }
        let (b, first, end) = self.span(block, offset, len)?;
        let mut new = 0;
        for (w, ones) in Block::masks(first, end) {
            new += u64::from((ones & !b.words[w]).count_ones());
            b.words[w] |= ones;
        }
        b.count += new;
        self.count += new;
        Ok(new)
    }

    /// Clears one page; `true` if it was dirty.
    pub fn clear(&mut self, block: u32, page: u64) -> Result<bool, DirtyError> {
        let (b, w, bit) = self.bit(block, page)?;
        let was = b.words[w] & bit != 0;
        b.words[w] &= !bit;
        b.count -= u64::from(was);
        self.count -= u64::from(was);
        Ok(was)
    }

    /// Clears every page that the bytes `[offset, offset + len)` touch;
    /// returns how many were dirty.
    pub fn clear_range(&mut self, block: u32, offset: u64, len: u64) -> Result<u64, DirtyError> {
        if len == 0 {
            return self
                .pages(block)
                .map(|_| 0)
                .ok_or(DirtyError::OutOfRange { block, page: 0 });
        }
        let (b, first, end) = self.span(block, offset, len)?;
        let mut gone = 0;
        for (w, ones) in Block::masks(first, end) {
            gone += u64::from((ones & b.words[w]).count_ones());
            b.words[w] &= !ones;
        }
        b.count -= gone;
        self.count -= gone;
        Ok(gone)
    }

    /// Marks every page of every block.
    pub fn set_all(&mut self) {
        let mut total = 0;
        for b in &mut self.blocks {
            if b.pages > 0 {
                for (w, ones) in Block::masks(0, b.pages) {
                    b.words[w] = ones;
                }
            }
            b.count = b.pages;
            total += b.pages;
        }
        self.count = total;
    }

    /// Whether a page is dirty (`false` for pages that do not exist).
    pub fn test(&self, block: u32, page: u64) -> bool {
        let Some(b) = self.blocks.get(block as usize) else {
            return false;
        };
        page < b.pages && b.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Clears every page.
    pub fn clear_all(&mut self) {
        for b in &mut self.blocks {
            if b.count != 0 {
                b.words.iter_mut().for_each(|w| *w = 0);
                b.count = 0;
            }
        }
        self.count = 0;
    }

    /// Dirty pages in all blocks.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Dirty pages in one block (0 for an unknown block).
    pub fn count_block(&self, block: u32) -> u64 {
        self.blocks.get(block as usize).map_or(0, |b| b.count)
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.count == 0
    }

    /// The dirty pages as `(block, page)`, by block then page.
    pub fn iter(&self) -> DirtyPages<'_> {
        DirtyPages {
            map: self,
            block: 0,
            word: 0,
            bits: 0,
        }
    }

    /// Returns the dirty pages and leaves this bitmap clean (same blocks).
    pub fn take(&mut self) -> DirtyBitmap {
        let clean = DirtyBitmap {
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    pages: b.pages,
                    words: alloc::vec![0; b.words.len()],
                    count: 0,
                })
                .collect(),
            count: 0,
        };
        core::mem::replace(self, clean)
    }

    /// Marks every page dirty in `other`; returns how many were clean here.
    /// Bitmaps of different blocks are refused unchanged.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<u64, DirtyError> {
        if !self.same_shape(other) {
            return Err(DirtyError::ShapeMismatch);
        }
        let mut total = 0;
        for (a, b) in self.blocks.iter_mut().zip(&other.blocks) {
            if b.count == 0 {
                continue;
            }
            let mut new = 0;
            for (x, y) in a.words.iter_mut().zip(&b.words) {
                new += u64::from((y & !*x).count_ones());
                *x |= y;
            }
            a.count += new;
            total += new;
        }
        self.count += total;
        Ok(total)
    }
}

/// Iterator over the dirty pages of a [`DirtyBitmap`], in order.
pub struct DirtyPages<'a> {
    map: &'a DirtyBitmap,
    block: usize,
    /// Next word to load.
    word: usize,
    /// Bits of word `word - 1` not yet returned.
    bits: u64,
}

impl Iterator for DirtyPages<'_> {
    type Item = (u32, u64);

    fn next(&mut self) -> Option<(u32, u64)> {
        loop {
            if self.bits != 0 {
                let bit = u64::from(self.bits.trailing_zeros());
                self.bits &= self.bits - 1;
                // `word >= 1` whenever bits are loaded; block < 2^32 (new).
                let page = (self.word as u64 - 1) * 64 + bit;
                return Some((self.block as u32, page));
            }
            let b = self.map.blocks.get(self.block)?;
            match b.words.get(self.word) {
                Some(&w) if b.count != 0 => {
                    self.bits = w;
                    self.word += 1;
                }
                _ => {
                    self.block += 1;
                    self.word = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;

    #[test]
    fn set_test_count_and_order() {
        let mut d = DirtyBitmap::new(&[10 * 4096, 4096 * 200 + 1, 0]).unwrap();
        assert_eq!(d.pages(1), Some(201), "a partial last page counts");
        assert_eq!(d.pages(2), Some(0));
        assert_eq!(d.set(1, 200), Ok(true));
        assert_eq!(d.set(1, 200), Ok(false), "already dirty");
        assert_eq!(d.set(0, 9), Ok(true));
        assert_eq!(d.set(1, 63), Ok(true));
        assert_eq!(d.set(1, 64), Ok(true));
        assert_eq!(d.count(), 4);
        assert_eq!(
            (d.count_block(0), d.count_block(1), d.count_block(9)),
            (1, 3, 0)
        );
        assert!(d.test(1, 64) && !d.test(1, 65) && !d.test(0, 8));
        assert_eq!(
            d.iter().collect::<Vec<_>>(),
            [(0, 9), (1, 63), (1, 64), (1, 200)]
        );
        assert_eq!(d.clear(1, 63), Ok(true));
        assert_eq!(d.clear(1, 63), Ok(false));
        assert_eq!(d.iter().collect::<Vec<_>>(), [(0, 9), (1, 64), (1, 200)]);
        d.clear_all();
        assert_eq!((d.count(), d.iter().next()), (0, None));
    }

    #[test]
    fn out_of_range_is_refused_without_change() {
        let mut d = DirtyBitmap::new(&[8 * 4096]).unwrap();
        assert_eq!(
            d.set(0, 8),
            Err(DirtyError::OutOfRange { block: 0, page: 8 })
        );
        assert_eq!(
            d.set(3, 0),
            Err(DirtyError::OutOfRange { block: 3, page: 0 })
        );
        assert_eq!(
            d.set(0, u64::MAX),
            Err(DirtyError::OutOfRange { block: 0, page: 8 })
        );
        // A range that starts inside but ends outside changes nothing.
        assert!(d.set_range(0, 6 * 4096, 3 * 4096).is_err());
        assert_eq!(
            d.set_range(0, u64::MAX, 2),
            Err(DirtyError::Overflow { block: 0 })
        );
        assert_eq!(d.count(), 0);
        assert!(!d.test(0, u64::MAX) && !d.test(7, 0));
        assert_eq!(d.set_range(0, 0, 0), Ok(0));
        assert!(d.set_range(1, 0, 0).is_err());
        assert!(d.clear_range(0, 7 * 4096, 2 * 4096).is_err());
    }

    #[test]
    fn ranges_cover_touched_pages_across_words() {
        let mut d = DirtyBitmap::new(&[300 * 4096]).unwrap();
        // Bytes 4095..(130*4096 + 1) touch pages 0..=130.
        assert_eq!(d.set_range(0, 4095, 129 * 4096 + 2), Ok(131));
        assert_eq!(d.count(), 131);
        assert!(d.test(0, 0) && d.test(0, 130) && !d.test(0, 131));
        assert_eq!(d.set_range(0, 128 * 4096, 10 * 4096), Ok(7));
        assert_eq!(d.clear_range(0, 64 * 4096, 64 * 4096), Ok(64));
        assert_eq!(d.count(), 138 - 64);
        let pages: Vec<u64> = d.iter().map(|p| p.1).collect();
        let want: Vec<u64> = (0..64).chain(128..138).collect();
        assert_eq!(pages, want);
        d.set_all();
        assert_eq!((d.count(), d.count_block(0)), (300, 300));
        assert_eq!(d.iter().count(), 300);
        assert_eq!(d.iter().last(), Some((0, 299)));
    }

    #[test]
    fn take_and_merge() {
        let mut a = DirtyBitmap::new(&[64 * 4096, 64 * 4096]).unwrap();
        let mut b = a.clone();
        a.set(0, 1).unwrap();
        a.set(1, 63).unwrap();
        b.set(1, 63).unwrap();
        b.set(1, 0).unwrap();
        assert_eq!(a.merge(&b), Ok(1), "only (1, 0) was new");
        assert_eq!(a.iter().collect::<Vec<_>>(), [(0, 1), (1, 0), (1, 63)]);
        let taken = a.take();
        assert_eq!((a.count(), a.pages(1)), (0, Some(64)), "same shape, clean");
        assert_eq!(taken.count(), 3);
        assert_eq!(taken.iter().collect::<Vec<_>>(), [(0, 1), (1, 0), (1, 63)]);
        let other = DirtyBitmap::new(&[64 * 4096]).unwrap();
        assert_eq!(a.merge(&other), Err(DirtyError::ShapeMismatch));
        let wider = DirtyBitmap::new(&[64 * 4096, 65 * 4096]).unwrap();
        assert_eq!(a.merge(&wider), Err(DirtyError::ShapeMismatch));
        assert!(a.fits(&[64 * 4096, 63 * 4096 + 1]) && !a.fits(&[64 * 4096]));
    }

    proptest::proptest! {
        /// Random operations agree with a set of (block, page).
        #[test]
        fn matches_a_set_model(
            sizes in proptest::collection::vec(0u64..(300 * 4096), 1..4),
            ops in proptest::collection::vec((0u8..4, 0u32..5, 0u64..(320 * 4096), 0u64..(70 * 4096)), 1..60),
        ) {
            let mut d = DirtyBitmap::new(&sizes).unwrap();
            let mut model = BTreeSet::new();
            for (op, block, off, len) in ops {
                let pages = sizes.get(block as usize).map(|s| s.div_ceil(4096));
                let touched: Vec<u64> = if len == 0 { Vec::new() } else { (off / 4096..(off + len).div_ceil(4096)).collect() };
                let fits = pages.is_some_and(|p| touched.iter().all(|&x| x < p));
                match op {
                    0 => {
                        let r = d.set_range(block, off, len);
                        proptest::prop_assert_eq!(r.is_ok(), fits);
                        if fits {
                            let new = touched.iter().filter(|&&p| model.insert((block, p))).count() as u64;
                            proptest::prop_assert_eq!(r.unwrap(), new);
                        }
                    }
                    1 => {
                        let r = d.clear_range(block, off, len);
                        proptest::prop_assert_eq!(r.is_ok(), fits);
                        if fits {
                            let gone = touched.iter().filter(|&&p| model.remove(&(block, p))).count() as u64;
                            proptest::prop_assert_eq!(r.unwrap(), gone);
                        }
                    }
                    2 => {
                        let page = off / 4096;
                        let r = d.set(block, page);
                        proptest::prop_assert_eq!(r.is_ok(), pages.is_some_and(|p| page < p));
                        if r.is_ok() {
                            proptest::prop_assert_eq!(r.unwrap(), model.insert((block, page)));
                        }
                    }
                    _ => {
                        let t = d.take();
                        proptest::prop_assert_eq!(t.iter().collect::<BTreeSet<_>>(), core::mem::take(&mut model));
                    }
                }
                proptest::prop_assert_eq!(d.count(), model.len() as u64);
                let got: Vec<_> = d.iter().collect();
                let want: Vec<_> = model.iter().copied().collect();
                proptest::prop_assert_eq!(&got, &want);
                for (i, _) in sizes.iter().enumerate() {
                    let n = model.iter().filter(|p| p.0 == i as u32).count() as u64;
                    proptest::prop_assert_eq!(d.count_block(i as u32), n);
                }
            }
        }
    }
}
