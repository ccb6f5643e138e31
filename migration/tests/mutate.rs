//! Property tests: mutated streams (a real QEMU stream and a Tern one) never
//! panic the reader, every error's offset lies inside the input, and the
//! memory the reader holds stays proportional to the input.

mod common;

use common::LocalSizer;
use migration::desc::walk_section;
use migration::reader::read_all;
use migration::{read_self_described, StreamReader};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts this thread's live heap bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// bookkeeping only touches const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + layout.size());
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(layout.size())));
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak heap growth while `f` runs.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get) - base)
}

const PC: &[u8] = include_bytes!("fixtures/pc-m16.mig");

#[derive(Clone, Debug)]
enum Mutation {
    Xor(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn apply(data: &mut Vec<u8>, m: &Mutation) {
    let len = data.len().max(1);
    match m {
        Mutation::Xor(at, x) => {
            let i = at % len;
            if let Some(b) = data.get_mut(i) {
                *b ^= x | 1;
            }
        }
        Mutation::Set(at, v) => {
            let i = at % len;
            if let Some(b) = data.get_mut(i) {
                *b = *v;
            }
        }
        Mutation::Truncate(n) => data.truncate(n % len),
        Mutation::Insert(at, bytes) => {
            let i = at % len;
            data.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(at, n) => {
            let i = at % len;
            let end = (i + n).min(data.len());
            data.drain(i..end);
        }
    }
}

/// Offsets biased to where the structure is: the header and RAM setup,
/// the device sections, the description, or anywhere.
fn offset(len: usize, regions: &'static [(usize, usize)]) -> impl Strategy<Value = usize> {
    prop_oneof![
        (0..regions.len(), any::<usize>()).prop_map(move |(r, x)| {
            let (a, b) = regions[r];
            a + x % (b - a).max(1)
        }),
        0..len,
    ]
}

fn mutation(len: usize, regions: &'static [(usize, usize)]) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (offset(len, regions), any::<u8>()).prop_map(|(a, x)| Mutation::Xor(a, x)),
        2 => (offset(len, regions), prop_oneof![Just(0u8), Just(0xff), Just(0x05), Just(0x7e), any::<u8>()])
            .prop_map(|(a, v)| Mutation::Set(a, v)),
        1 => offset(len, regions).prop_map(Mutation::Truncate),
        1 => (offset(len, regions), prop::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        1 => (offset(len, regions), 1usize..6).prop_map(|(a, n)| Mutation::Delete(a, n)),
    ]
}

/// pc-m16: header+RAM setup, START..first pages, device sections, JSON.
const PC_REGIONS: &[(usize, usize)] = &[
    (0, 0xe0),
    (0x3a58b, 0x3d7d7),
    (0x3d7d7, 0x3d800),
    (0x3d800, 350_517),
];

fn check(data: &[u8]) {
    let (r, peak) = peak_during(|| match read_self_described(data) {
        Err(e) => {
            assert!(
                e.offset <= data.len(),
                "offset {} past {}: {e}",
                e.offset,
                data.len()
            );
            0
        }
        Ok(s) => {
            // The reader delimited each body by skipping it with the
            // description; walking it field by field must agree exactly.
            if let Some(j) = &s.description {
                if let Ok(d) = migration::VmDescription::from_json(j) {
                    for (i, body) in s.devices() {
                        if let Some(sd) = d.find(i.idstr, i.instance) {
                            let (_, used) = walk_section(sd, body).unwrap_or_else(|e| {
                                panic!("{}: skip took it, walk refuses: {e}", i.idstr)
                            });
                            assert_eq!(used, body.len(), "{}", i.idstr);
                        }
                    }
                }
            }
            s.sections.len()
        }
    });
    let _ = r;
    assert!(
        peak <= 64 * data.len() + (1 << 20),
        "peak {peak} for {} bytes",
        data.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_qemu_stream_never_panics(ms in prop::collection::vec(mutation(PC.len(), PC_REGIONS), 1..4)) {
        let mut d = PC.to_vec();
        for m in &ms {
            apply(&mut d, m);
        }
        check(&d);
    }

    #[test]
    fn mutated_tern_stream_never_panics(
        ms in prop::collection::vec(mutation(20_000, &[(0, 0x80), (16_000, 20_000)]), 1..4),
        with_desc in any::<bool>(),
    ) {
        let (mut d, _) = common::build(with_desc);
        for m in &ms {
            apply(&mut d, m);
        }
        check(&d);
        if let Err(e) = read_all(StreamReader::new(&d, LocalSizer)) {
            prop_assert!(e.offset <= d.len());
        }
    }
}

#[test]
fn unmutated_streams_pass_the_checks() {
    check(PC);
    let (d, _) = common::build(true);
    check(&d);
    assert!(read_self_described(PC).is_ok());
    // The bound is not vacuous: parsing pc-m16 holds well above zero.
    let (_, peak) = peak_during(|| read_self_described(PC).map(|s| s.pages.len()));
    assert!(peak > 100_000, "{peak}");
}
