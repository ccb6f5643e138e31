//! `migrate inspect` on real QEMU streams and on bad input. The module is
//! compiled here directly until `cargo xtask migrate inspect` is wired into
//! xtask's command line.

#[path = "../src/migrate.rs"]
#[allow(dead_code)]
mod migrate;

use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migration/tests/fixtures")
        .join(name)
}

#[test]
fn inspects_qemu_pc_stream() {
    let out = migrate::inspect(&fixture("pc-m16.mig")).unwrap();
    for needle in [
        "stream: 350517 bytes",
        "CONFIG machine \"pc-i440fx-7.2\"",
        "      0x1a  START     2  ram",
        "   0x3a59d  FULL      0  timer",
        "   0x3d7d6  EOF",
        "   0x3d7d7  VMDESCRIPTION (98649 bytes)",
        "pc.ram                                  0x1000000     4096 pages:",
        "timer instance 0 (section 0, version 2, 24 bytes at 0x3a5b0)",
        "subsection fw_cfg/dma version 0:",
        "subsection fw_cfg/acpi_mr version 1:",
        "runstate (buffer) = 70 72 65 6c 61 75 6e 63 68 00",
        "\"page_size\": 4096",
    ] {
        assert!(out.contains(needle), "missing {needle:?}");
    }
    // One table line per section: 33 in pc-m16.
    let lines = out.lines().filter(|l| {
        let t = l.trim_start();
        ["START ", "PART ", "END ", "FULL "]
            .iter()
            .any(|k| t.split_once("  ").is_some_and(|(_, r)| r.starts_with(k)))
    });
    assert_eq!(lines.count(), 33);
    // Page counts add up to the notes' 4177 zero + 49 normal.
    let (mut zero, mut normal) = (0, 0);
    for l in out.lines().filter(|l| l.contains(" pages: ")) {
        let nums: Vec<u64> = l
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        let n = nums.len();
        zero += nums[n - 2];
        normal += nums[n - 1];
    }
    assert_eq!((zero, normal), (4177, 49));
}

#[test]
fn inspects_qemu_q35_stream() {
    let out = migrate::inspect(&fixture("q35-m16.mig")).unwrap();
    assert!(out.contains("CONFIG machine \"pc-q35-7.2\""));
    assert!(out.contains("0000:00:1f.0/ICH9LPC instance 0"));
}

#[test]
fn bad_input_names_the_offset() {
    let data = std::fs::read(fixture("pc-m16.mig")).unwrap();
    let mut bad = data.clone();
    bad[0x3a59d] = 0x09; // the timer section's type byte
    let e = migrate::inspect_bytes(&bad).unwrap_err();
    assert_eq!(e, "at offset 0x3a59d: unknown section type 0x09");
    // Cut inside a RAM record header.
    let cut = &data[..0xd9 + 4];
    let e = migrate::inspect_bytes(cut).unwrap_err();
    assert!(
        e.contains("offset 0xd9") && e.contains("section 2 (\"ram\")"),
        "{e}"
    );
    let e = migrate::inspect(Path::new("/nonexistent/stream.mig")).unwrap_err();
    assert!(e.starts_with("/nonexistent/stream.mig: "));
}
