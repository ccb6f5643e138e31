//! Differential test: Tern's flat views of QEMU's own region trees must equal
//! QEMU's `info mtree -f` output (fixtures: tests/fixtures/mtree/README.md).

use hv_core::memory::mtree;

const MACHINES: &[&str] = &[
    "pc-128m",
    "pc-5g-devices",
    "pc-isa",
    "q35-5g-devices",
    "q35-bridge",
];

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/mtree/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn flat_views_match_qemu() {
    for m in MACHINES {
        let mut p = mtree::parse_tree(&fixture(&format!("{m}.tree"))).expect("parse tree");
        let qemu = mtree::parse_flat(&fixture(&format!("{m}.flat"))).expect("parse flat");
        let n_ranges: usize = qemu.iter().map(|b| b.ranges.len()).sum();
        assert!(n_ranges > 20, "{m}: fixture has too few ranges");
        let n_spaces: usize = qemu.iter().map(|b| b.spaces.len()).sum();
        assert_eq!(p.spaces.len(), n_spaces, "{m}: address-space count");
        let diffs = mtree::compare_flat(&mut p.mem, &p.spaces, &qemu).expect("compare");
        assert!(
            diffs.is_empty(),
            "{m}: {} differences:\n{}",
            diffs.len(),
            diffs.join("\n")
        );
    }
}

#[test]
fn compare_detects_a_difference() {
    // The comparison itself must be able to fail: disable one RAM alias.
    let mut p = mtree::parse_tree(&fixture("pc-128m.tree")).unwrap();
    let qemu = mtree::parse_flat(&fixture("pc-128m.flat")).unwrap();
    let below = p
        .mem
        .regions()
        .find(|&r| p.mem.region_name(r).unwrap() == "ram-below-4g")
        .unwrap();
    p.mem.set_enabled(below, false).unwrap();
    let diffs = mtree::compare_flat(&mut p.mem, &p.spaces, &qemu).unwrap();
    assert!(!diffs.is_empty());
}

#[test]
fn tree_roundtrip_is_line_for_line() {
    for m in MACHINES {
        let text = fixture(&format!("{m}.tree"));
        let p = mtree::parse_tree(&text).unwrap();
        let printed = mtree::format_tree(&p.mem, true).unwrap();
        // QEMU prints sections in hash order; compare as multisets of lines.
        let mut a: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let mut b: Vec<&str> = printed.lines().collect();
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            let only_a: Vec<_> = a.iter().filter(|l| !b.contains(l)).take(5).collect();
            let only_b: Vec<_> = b.iter().filter(|l| !a.contains(l)).take(5).collect();
            panic!(
                "{m}: {} vs {} lines; only in fixture: {only_a:?}; only printed: {only_b:?}",
                a.len(),
                b.len()
            );
        }
        // And printing is a fixed point of parse/print.
        let again = mtree::format_tree(&mtree::parse_tree(&printed).unwrap().mem, true).unwrap();
        assert_eq!(printed, again, "{m}");
    }
}

#[test]
fn flat_output_is_qemu_text() {
    // Tern's -f text for each address space is byte-identical to QEMU's block
    // (modulo the block order and AS order inside a block).
    let mut p = mtree::parse_tree(&fixture("q35-5g-devices.tree")).unwrap();
    let ours = mtree::format_flat(&mut p.mem).unwrap();
    let theirs = fixture("q35-5g-devices.flat");
    let blocks = |t: &str| -> Vec<String> {
        let mut v: Vec<String> = t
            .split("FlatView #")
            .skip(1)
            .map(|b| {
                let mut lines: Vec<&str> = b.lines().skip(1).collect();
                let n_as = lines.iter().take_while(|l| l.starts_with(" AS ")).count();
                lines[..n_as].sort_unstable();
                lines.join("\n")
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(blocks(&ours), blocks(&theirs));
}
