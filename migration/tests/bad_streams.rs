//! A corpus of bad streams, one per error class, each refused with the
//! right error, offset and section.

mod common;

use common::*;
use hv_core::vmstate::{load, ErrorKind};
use migration::error::{StreamError, StreamErrorKind as K};
use migration::reader::read_all;
use migration::{read_self_described, StreamReader};

fn err(data: &[u8]) -> StreamError {
    read_self_described(data).map(|_| ()).unwrap_err()
}

fn err_local(data: &[u8]) -> StreamError {
    read_all(StreamReader::new(data, LocalSizer))
        .map(|_| ())
        .unwrap_err()
}

fn section(e: &StreamError) -> Option<(u32, &str)> {
    e.section.as_ref().map(|s| (s.id, s.idstr.as_str()))
}

fn set_be32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn set_be64(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn bad_magic_and_version() {
    let (mut d, _) = build(true);
    d[0] = b'X';
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::BadMagic(0x5845_564d), 0));
    let (mut d, _) = build(true);
    set_be32(&mut d, 4, 2);
    assert_eq!((err(&d).kind, err(&d).offset), (K::BadVersion(2), 4));
    set_be32(&mut d, 4, 4);
    assert_eq!(err(&d).kind, K::BadVersion(4));
}

#[test]
fn configuration_errors() {
    let (mut d, _) = build(true);
    d[8] = 0x01;
    assert_eq!((err(&d).kind, err(&d).offset), (K::ConfigurationMissing, 8));
    // Empty machine name.
    let (d, _) = build(true);
    let mut e = d[..9].to_vec();
    e.extend_from_slice(&[0, 0, 0, 0]);
    e.extend_from_slice(&d[13 + 8..]);
    assert_eq!((err(&e).kind, err(&e).offset), (K::EmptyMachineName, 9));
    // A second configuration where a section should be.
    let (mut d, l) = build(true);
    d[l.devices[0].0] = 0x07;
    assert_eq!(err(&d).kind, K::ConfigurationTwice);
    // An unknown configuration subsection.
    let (d, _) = build(true);
    let mut e = d[..21].to_vec();
    e.push(0x05);
    e.push(18);
    e.extend_from_slice(b"configuration/xyzw");
    e.extend_from_slice(&[0, 0, 0, 1]);
    e.extend_from_slice(&d[21..]);
    let x = err(&e);
    assert!(matches!(x.kind, K::BadConfiguration(_)), "{x}");
    assert_eq!(x.offset, 21);
}

#[test]
fn truncation_anywhere() {
    let (d, l) = build(false);
    // Every cut is refused at or before the cut, never after.
    for cut in 0..d.len() {
        let e = err_local(&d[..cut]);
        assert!(e.offset <= cut, "cut {cut}: {e}");
        if cut < d.len() {
            // A cut just inside a subsection leaves the body complete
            // without it, so the footer check sees the marker.
            assert!(
                matches!(
                    e.kind,
                    K::Truncated { .. } | K::Body(_) | K::MissingFooter { got: 0x05 }
                ),
                "cut {cut}: {e}"
            );
        }
    }
    // Inside a page's data: at the data.
    let page_data = l.part_pages[1] + 8;
    let e = err_local(&d[..page_data + 100]);
    assert_eq!(e.offset, page_data);
    assert_eq!(section(&e), Some((2, "ram")));
    assert!(matches!(
        e.kind,
        K::Truncated {
            what: "a RAM page",
            need: 4096,
            have: 100
        }
    ));
    // Inside the magic.
    assert_eq!(err_local(&d[..3]).offset, 0);
    // Inside a device body: the offset of the field that did not fit.
    let (start, _) = l.devices[2];
    let body = start + 1 + 4 + 1 + 6 + 8;
    let e = err_local(&d[..body + 3]);
    assert_eq!(e.offset, body);
    assert_eq!(section(&e), Some((9, "ttimer")));
    assert!(matches!(e.kind, K::Body(_)));
}

#[test]
fn counted_string_overrun() {
    let (mut d, l) = build(false);
    let (start, _) = l.devices[2];
    d[start + 5] = 200;
    d.truncate(start + 6 + 10);
    let e = err_local(&d);
    assert_eq!(e.offset, start + 6);
    assert!(matches!(
        e.kind,
        K::Truncated {
            what: "a section idstr",
            need: 200,
            have: 10
        }
    ));
    // A RAM block name in the setup list.
    let (mut d, l) = build(false);
    let name_len = l.ram_start + 17 + 8;
    assert_eq!(d[name_len], 8);
    d[name_len] = 0xff;
    let e = err_local(&d[..name_len + 20]);
    assert_eq!(e.offset, name_len + 1);
    assert!(matches!(
        e.kind,
        K::Truncated {
            what: "a RAM block name",
            ..
        }
    ));
}

#[test]
fn unknown_and_unexpected_section_types() {
    let (mut d, l) = build(true);
    let at = l.devices[1].0;
    d[at] = 0x09;
    let e = err(&d);
    assert_eq!(
        (e.kind, e.offset, e.section),
        (K::UnknownSectionType(9), at, None)
    );
    d[at] = 0x7e;
    assert_eq!(err(&d).kind, K::UnexpectedSectionType(0x7e));
    d[at] = 0x05;
    assert_eq!(err(&d).kind, K::UnexpectedSectionType(0x05));
}

#[test]
fn footer_errors() {
    let (mut d, l) = build(true);
    let (_, footer) = l.devices[0];
    d[footer + 4] ^= 1;
    let e = err(&d);
    assert_eq!(
        e.kind,
        K::FooterMismatch {
            expected: 5,
            got: 4
        }
    );
    assert_eq!((e.offset, section(&e)), (footer, Some((5, "tdev"))));
    let (mut d, _) = build(true);
    d[footer] = 0;
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::MissingFooter { got: 0 }, footer));
    // The RAM PART's footer.
    let (mut d, l) = build(true);
    d[l.part_footer] = 0x7f;
    let e = err(&d);
    assert_eq!(
        (&e.kind, e.offset),
        (&K::MissingFooter { got: 0x7f }, l.part_footer)
    );
    assert_eq!(section(&e), Some((2, "ram")));
}

#[test]
fn duplicate_sections() {
    // Section id 6 renumbered to 5 (header and footer).
    let (mut d, l) = build(true);
    let (start, footer) = l.devices[1];
    set_be32(&mut d, start + 1, 5);
    set_be32(&mut d, footer + 1, 5);
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::DuplicateSectionId(5), start + 1));
    // The same device twice (tdev instance 1 made instance 0).
    let (mut d, l) = build(true);
    let (start, _) = l.devices[1];
    set_be32(&mut d, start + 10, 0);
    let e = err(&d);
    assert_eq!(
        e.kind,
        K::DuplicateDevice {
            idstr: "tdev".into(),
            instance: 0
        }
    );
    assert_eq!(e.offset, start + 5);
    // A FULL reusing the RAM's id.
    let (mut d, l) = build(true);
    let (start, footer) = l.devices[0];
    set_be32(&mut d, start + 1, 2);
    set_be32(&mut d, footer + 1, 2);
    assert_eq!(err(&d).kind, K::DuplicateSectionId(2));
}

#[test]
fn part_and_end_need_an_open_section() {
    let (mut d, l) = build(true);
    set_be32(&mut d, l.part + 1, 3);
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::UnknownSectionId(3), l.part + 1));
    // A PART after the END.
    let (d, l) = build(true);
    let end_len = l.end_footer + 5 - l.end;
    let mut e2 = d[..l.end_footer + 5].to_vec();
    e2.extend_from_slice(&d[l.end..l.end_footer + 5]);
    let copy = l.end_footer + 5;
    e2[copy] = 0x02;
    e2.extend_from_slice(&d[l.end_footer + 5..]);
    assert_eq!(e2.len(), d.len() + end_len);
    let e = err(&e2);
    assert_eq!((e.kind, e.offset), (K::SectionClosed(2), copy + 1));
    // A PART for a device (FULL) section.
    let (d, l) = build(true);
    let mut e3 = d[..l.eof].to_vec();
    e3.extend_from_slice(&[0x02, 0, 0, 0, 5]);
    e3.extend_from_slice(&d[l.eof..]);
    let e = err(&e3);
    assert_eq!((e.kind, e.offset), (K::SectionClosed(5), l.eof + 1));
}

#[test]
fn ram_record_errors() {
    let first = |l: &Layout| l.part_pages[0];
    // Unknown block name.
    let (mut d, l) = build(true);
    d[first(&l) + 9] = b'X';
    let e = err(&d);
    assert_eq!(e.kind, K::RamUnknownBlock("Xern.ram".into()));
    assert_eq!((e.offset, section(&e)), (first(&l) + 8, Some((2, "ram"))));
    // A page past the block's end (tern.ram is 0x10000 bytes).
    let (mut d, l) = build(true);
    set_be64(&mut d, first(&l), 0x10000 | 0x02);
    let e = err(&d);
    assert!(matches!(
        e.kind,
        K::RamOffsetOutOfBlock {
            addr: 0x10000,
            length: 0x10000,
            ..
        }
    ));
    assert_eq!(e.offset, first(&l));
    // Flag combinations QEMU 7.2 does not write.
    for flags in [0x41, 0x40, 0x0a, 0x100, 0x200, 0x00, 0x01, 0x30, 0x12] {
        let (mut d, l) = build(true);
        set_be64(&mut d, first(&l), flags);
        let e = err(&d);
        assert_eq!(
            (e.kind, e.offset),
            (K::RamBadFlags(flags), first(&l)),
            "{flags:#x}"
        );
    }
    // CONTINUE with no block named before.
    let (mut d, l) = build(true);
    set_be64(&mut d, first(&l), 0x22);
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::RamContinueWithoutBlock, first(&l)));
    // A block list outside the setup.
    let (mut d, l) = build(true);
    set_be64(&mut d, first(&l), 0x2000 | 0x04);
    assert_eq!(err(&d).kind, K::RamUnexpectedBlockList);
    // Pages before the block list.
    let (mut d, l) = build(true);
    set_be64(&mut d, l.ram_start + 17, 0x02);
    let e = err(&d);
    assert_eq!((e.kind, e.offset), (K::RamNoBlockList, l.ram_start + 17));
    // A block longer than the announced total.
    let (mut d, l) = build(true);
    set_be64(&mut d, l.ram_start + 17, 0x1000 | 0x04);
    let e = err(&d);
    assert!(matches!(e.kind, K::RamBlockListMismatch { .. }));
    assert_eq!(e.offset, l.ram_start + 25);
    // A block length that is not page-aligned.
    let (mut d, l) = build(true);
    let len_at = l.ram_start + 17 + 8 + 9;
    set_be64(&mut d, len_at, 0x10001);
    assert_eq!(err(&d).kind, K::RamBadBlock("tern.ram".into()));
    // The RAM section with a version other than 4.
    let (mut d, l) = build(true);
    set_be32(&mut d, l.ram_start + 13, 5);
    let e = err(&d);
    assert_eq!(
        (e.kind, e.offset),
        (
            K::RamHeader {
                instance: 0,
                version: 5
            },
            l.ram_start
        )
    );
}

#[test]
fn empty_idstr() {
    let (d, l) = build(true);
    let (start, _) = l.devices[0];
    let mut e = d[..start].to_vec();
    e.extend_from_slice(&[0x04, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    e.extend_from_slice(&d[start..]);
    let x = err(&e);
    assert_eq!((x.kind, x.offset), (K::EmptyIdstr, start + 5));
}

#[test]
fn description_errors() {
    // Invalid JSON inside the description record: found, then refused.
    let (mut d, l) = build(true);
    let at = l.vmdesc + 5 + 14; // the 4 of 4096
    d[at] = b'#';
    let e = err(&d);
    assert!(matches!(e.kind, K::Json(_)));
    assert_eq!(e.offset, at);
    // A wrong length: the record is not found where QEMU puts it; a
    // reader that does not need it refuses it at the length.
    let (mut d, l) = build(true);
    d[l.vmdesc + 4] ^= 1;
    assert_eq!(err(&d).kind, K::NoDescription);
    let e = err_local(&d);
    assert!(matches!(e.kind, K::DescriptionLength { .. }));
    assert_eq!(e.offset, l.vmdesc + 1);
    // Bytes after EOF that are no description.
    let (mut d, l) = build(false);
    d.push(0x00);
    let e = err_local(&d);
    assert_eq!((e.kind, e.offset), (K::TrailingData, l.eof + 1));
    // A description that disagrees with the section header's version.
    let (mut d, l) = build(true);
    let (start, _) = l.devices[0];
    set_be32(&mut d, start + 14, 1);
    let e = err(&d);
    assert_eq!(
        (e.kind, e.offset),
        (K::DescriptionVersion { desc: 2, header: 1 }, start)
    );
    // A description whose sizes do not fit the body: `ctrl` said 5 bytes.
    let (d, l) = build(true);
    let text = String::from_utf8(d[l.vmdesc + 5..].to_vec()).unwrap();
    let bad = text.replacen(
        r#""ctrl", "type": "uint32", "size": 4"#,
        r#""ctrl", "type": "uint32", "size": 5"#,
        1,
    );
    assert_ne!(bad, text);
    let mut d2 = d[..l.vmdesc + 5].to_vec();
    d2.extend_from_slice(bad.as_bytes());
    let e = err(&d2);
    assert!(matches!(e.kind, K::Body(_)), "{e}");
    assert_eq!(section(&e), Some((5, "tdev")));
    let (start, footer) = l.devices[0];
    assert!(e.offset > start && e.offset <= footer, "{e}");
    // A description that is JSON but not a vmdesc.
    let mut d3 = d[..l.vmdesc].to_vec();
    d3.push(0x06);
    d3.extend_from_slice(&4u32.to_be_bytes());
    d3.extend_from_slice(b"{}  ");
    assert!(matches!(err(&d3).kind, K::BadDescription(_)));
}

/// The reader delimits a body; the device's own state then refuses what
/// it cannot take, with the field path and the offset in the section.
#[test]
fn device_state_refuses_bad_values() {
    let (mut d, l) = build(true);
    let (start, _) = l.devices[0];
    let body = start + 1 + 4 + 1 + 4 + 8;
    d[body + 4] = 2; // `enabled`
    let s = read_self_described(&d).unwrap();
    let (info, b) = s.devices().next().unwrap();
    assert_eq!(info.payload_start, body);
    let e = load::<Tdev>(b, info.version).unwrap_err();
    assert_eq!(
        (&e.kind, e.offset, e.path_string()),
        (&ErrorKind::BadBool(2), 4, "enabled".into())
    );
    // post_load refuses the reserved bit.
    let (mut d, _) = build(true);
    d[body] |= 0x80;
    let s = read_self_described(&d).unwrap();
    let (_, b) = s.devices().next().unwrap();
    assert!(matches!(
        load::<Tdev>(b, 2).unwrap_err().kind,
        ErrorKind::Hook(_)
    ));
    // lanes_n above its maximum of 16.
    let (mut d, _) = build(false);
    let lanes_n = body + 4 + 1 + 8 + 8;
    assert_eq!(d[lanes_n], 2);
    d[lanes_n] = 17;
    let e = err_local(&d);
    assert_eq!(
        e.kind,
        K::Body(
            hv_core::vmstate::VmStateError::new(
                22,
                ErrorKind::CountTooLarge { count: 17, max: 16 }
            )
            .in_field("lanes")
        )
    );
    assert_eq!(e.offset, lanes_n + 1);
}

/// A description of nested zero-size struct arrays over a small body: the
/// walk and the skip stop with an error after work proportional to the
/// bytes, instead of visiting 1000^3 elements.
#[test]
fn nested_zero_size_arrays_cannot_multiply_the_work() {
    use hv_core::vmstate::{Decoder, Json};
    let leaf = r#"{"vmsd_name": "u", "version": 1, "fields": []}"#;
    let mut s = leaf.to_string();
    for name in ["c", "b"] {
        s = format!(
            r#"{{"vmsd_name": "{name}", "version": 1, "fields": [{{"name": "{name}", "array_len": 1000, "type": "struct", "struct": {s}, "size": 0}}]}}"#
        );
    }
    let json = format!(
        r#"{{"page_size": 4096, "devices": [{{"name": "x", "instance_id": 0, "vmsd_name": "x", "version": 1, "fields": [{{"name": "a", "array_len": 1000, "type": "struct", "struct": {s}, "size": 0}}]}}]}}"#
    );
    let desc = migration::VmDescription::from_json(&Json::parse(&json).unwrap()).unwrap();
    let d = desc.find("x", 0).unwrap();
    let body = vec![0u8; 1000];
    // Without the bound both would accept it (zero-size elements consume
    // nothing) after visiting 10^9 elements.
    let e = migration::desc::walk_section(d, &body).unwrap_err();
    assert!(
        e.to_string()
            .contains("more elements than the bytes can hold"),
        "{e}"
    );
    let e = migration::desc::skip(&d.body, &mut Decoder::new(&body)).unwrap_err();
    assert!(
        e.to_string()
            .contains("more elements than the bytes can hold"),
        "{e}"
    );
}
