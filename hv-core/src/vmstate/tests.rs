//! Tests of the vmstate encoding, loading rules and descriptions.

use super::*;
use crate::vmstate;
use alloc::string::String;
use alloc::vec;

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Regs as "test-regs", version 1, minimum 1 {
        pub a: u16,
        pub flags: [bool; 2],
    }
}

vmstate! {
    /// A struct with a subsection (so arrays of it are not compressible).
    #[derive(Clone, Debug, PartialEq)]
    pub struct Queue as "test-queue", version 2, minimum 1 {
        pub head: u16,
        pub tail: u16 [since 2],
    }
    subsections {
        pub extra: Option<QueueExtra>,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct QueueExtra as "test-queue/extra", version 1, minimum 1 {
        pub v: u8,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Fifo as "test/fifo", version 1, minimum 1, hooks {
        pub level: u8,
        pub data: [u8; 4] [buffer],
    }
}

impl VmStateHooks for Fifo {
    fn needed(&self) -> bool {
        self.level != 0
    }
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.level > 4 {
            Err("fifo level above 4".into())
        } else {
            Ok(())
        }
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Other as "test/other", version 3, minimum 3 {
        pub x: u32,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Dev as "test", version 3, minimum 2, hooks {
        pub b: u8,
        pub s: i16,
        pub on: bool,
        pub arr: [u32; 3],
        pub regs: Regs,
        pub late: u64 [since 3],
        pub n: u8,
        pub queues: Vec<Queue> [count = n, max = 8],
        pub blen: i32,
        pub buf: Vec<u8> [len = blen, max = 64],
        pub rs: [Regs; 2],
    }
    subsections {
        pub fifo: Option<Fifo>,
        pub other: Option<Other>,
    }
}

impl VmStateHooks for Dev {
    fn pre_save(&mut self) -> Result<(), String> {
        if self.b == 0xee {
            return Err("b is poisoned".into());
        }
        // A derived field: the buffer length follows the buffer.
        self.blen = self.buf.len() as i32;
        Ok(())
    }
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.s < 0 {
            Err("s negative".into())
        } else {
            Ok(())
        }
    }
}

fn sample() -> Dev {
    Dev {
        b: 0x11,
        s: 0x0203,
        on: true,
        arr: [1, 2, 0xdead_beef],
        regs: Regs {
            a: 0xabcd,
            flags: [true, false],
        },
        late: 0x0102_0304_0506_0708,
        n: 2,
        queues: vec![
            Queue {
                head: 5,
                tail: 6,
                extra: Some(QueueExtra { v: 9 }),
            },
            Queue {
                head: 7,
                tail: 8,
                extra: None,
            },
        ],
        blen: 0, // set by pre_save
        buf: vec![0xaa, 0xbb, 0xcc],
        rs: [
            Regs {
                a: 1,
                flags: [false, true],
            },
            Regs {
                a: 2,
                flags: [true, true],
            },
        ],
        fifo: Some(Fifo {
            level: 2,
            data: [1, 2, 3, 4],
        }),
        other: None,
    }
}

/// The expected wire bytes of `sample()`, written out by hand.
fn sample_bytes() -> Vec<u8> {
    let mut v = vec![0x11, 0x02, 0x03, 0x01];
    v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 0xde, 0xad, 0xbe, 0xef]);
    v.extend_from_slice(&[0xab, 0xcd, 1, 0]); // regs
    v.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // late
    v.push(2); // n
    v.extend_from_slice(&[0, 5, 0, 6]); // queue 0
    v.extend_from_slice(&[0x05, 16]);
    v.extend_from_slice(b"test-queue/extra");
    v.extend_from_slice(&[0, 0, 0, 1, 9]);
    v.extend_from_slice(&[0, 7, 0, 8]); // queue 1
    v.extend_from_slice(&[0, 0, 0, 3, 0xaa, 0xbb, 0xcc]); // blen, buf
    v.extend_from_slice(&[0, 1, 0, 1, 0, 2, 1, 1]); // rs
    v.extend_from_slice(&[0x05, 9]);
    v.extend_from_slice(b"test/fifo");
    v.extend_from_slice(&[0, 0, 0, 1, 2, 1, 2, 3, 4]);
    v
}

#[test]
fn encodes_exactly_as_qemu_vmstate() {
    let mut d = sample();
    let bytes = save(&mut d).unwrap();
    assert_eq!(bytes, sample_bytes());
    assert_eq!(d.blen, 3, "pre_save ran");
}

#[test]
fn round_trip() {
    let mut d = sample();
    let bytes = save(&mut d).unwrap();
    let back: Dev = load(&bytes, 3).unwrap();
    assert_eq!(back, d);
    // Subsections: absent ones stay None; a not-needed one is not sent.
    let mut d2 = sample();
    d2.fifo = Some(Fifo {
        level: 0,
        data: [9; 4],
    });
    d2.other = Some(Other { x: 77 });
    let bytes2 = save(&mut d2).unwrap();
    let back2: Dev = load(&bytes2, 3).unwrap();
    assert_eq!(back2.fifo, None);
    assert_eq!(back2.other, Some(Other { x: 77 }));
}

#[test]
fn description_is_qemu_vmdesc() {
    let mut d = sample();
    let (bytes, desc) = save_described(&mut d).unwrap();
    assert_eq!(bytes, sample_bytes());
    let regs = r#"{"vmsd_name": "test-regs", "version": 1, "fields": [{"name": "a", "type": "uint16", "size": 2}, {"name": "flags", "array_len": 2, "type": "bool", "size": 1}]}"#;
    let expected = [
        r#"{"vmsd_name": "test", "version": 3, "fields": ["#,
        r#"{"name": "b", "type": "uint8", "size": 1}, "#,
        r#"{"name": "s", "type": "int16", "size": 2}, "#,
        r#"{"name": "on", "type": "bool", "size": 1}, "#,
        r#"{"name": "arr", "array_len": 3, "type": "uint32", "size": 4}, "#,
        r#"{"name": "regs", "type": "struct", "struct": "#,
        regs,
        r#", "size": 4}, "#,
        r#"{"name": "late", "type": "uint64", "size": 8}, "#,
        r#"{"name": "n", "type": "uint8", "size": 1}, "#,
        r#"{"name": "queues", "index": 0, "type": "struct", "struct": {"vmsd_name": "test-queue", "version": 2, "fields": [{"name": "head", "type": "uint16", "size": 2}, {"name": "tail", "type": "uint16", "size": 2}], "subsections": [{"vmsd_name": "test-queue/extra", "version": 1, "fields": [{"name": "v", "type": "uint8", "size": 1}]}]}, "size": 27}, "#,
        r#"{"name": "queues", "index": 1, "type": "struct", "struct": {"vmsd_name": "test-queue", "version": 2, "fields": [{"name": "head", "type": "uint16", "size": 2}, {"name": "tail", "type": "uint16", "size": 2}]}, "size": 4}, "#,
        r#"{"name": "blen", "type": "int32", "size": 4}, "#,
        r#"{"name": "buf", "type": "buffer", "size": 3}, "#,
        r#"{"name": "rs", "array_len": 2, "type": "struct", "struct": "#,
        regs,
        r#", "size": 4}], "#,
        r#""subsections": [{"vmsd_name": "test/fifo", "version": 1, "fields": [{"name": "level", "type": "uint8", "size": 1}, {"name": "data", "type": "buffer", "size": 4}]}]}"#,
    ]
    .concat();
    assert_eq!(desc.to_json().to_compact(), expected);
    // And the description reads back to the same value.
    let parsed = StructDesc::from_json(&Json::parse(&expected).unwrap()).unwrap();
    assert_eq!(parsed, desc);
}

#[test]
fn constants_follow_the_fields() {
    // b1 s2 on1 arr12 regs4 late8 n1 blen4 rs8 (vectors and subsections 0).
    assert_eq!(<Dev as VmState>::MIN_SIZE, 41);
    let compressible = [
        <Dev as VmState>::COMPRESSIBLE,
        <Queue as VmState>::COMPRESSIBLE,
        <Regs as VmState>::COMPRESSIBLE,
        <[Regs; 2] as VmValue>::COMPRESSIBLE,
    ];
    assert_eq!(compressible, [false, false, true, true]);
    assert_eq!(<Queue as VmState>::MIN_SIZE, 4);
    let e = Dev::empty();
    assert_eq!((e.b, e.queues.len(), e.fifo.is_none()), (0, 0, true));
}

#[test]
fn older_version_skips_newer_fields() {
    let mut d = sample();
    let full = save(&mut d).unwrap();
    // A version-2 body has no `late` (8 bytes at offset 20).
    let mut v2 = full[..20].to_vec();
    v2.extend_from_slice(&full[28..]);
    let back: Dev = load(&v2, 2).unwrap();
    assert_eq!(back.late, 0);
    assert_eq!(back.regs, d.regs);
    assert_eq!(back.buf, d.buf);
    // Version 3 expects `late`: the same bytes no longer fit.
    assert!(load::<Dev>(&v2, 3).is_err());
}

#[test]
fn version_range_is_checked() {
    let bytes = sample_bytes();
    let e = load::<Dev>(&bytes, 4).unwrap_err();
    assert!(matches!(
        e.kind,
        ErrorKind::VersionTooNew { got: 4, max: 3, .. }
    ));
    let e = load::<Dev>(&bytes, 1).unwrap_err();
    assert!(matches!(
        e.kind,
        ErrorKind::VersionTooOld { got: 1, min: 2, .. }
    ));
    // A subsection version outside its range: test/other is v3 only.
    let mut d = sample();
    d.fifo = None;
    d.other = Some(Other { x: 1 });
    let mut bytes = save(&mut d).unwrap();
    let vat = bytes.len() - 8; // be32 version then be32 x
    bytes[vat + 3] = 2;
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert!(matches!(
        e.kind,
        ErrorKind::VersionTooOld { got: 2, min: 3, .. }
    ));
    assert_eq!(e.offset, vat);
    assert_eq!(e.path_string(), "test/other:");
}

#[test]
fn bad_bool_names_field_and_offset() {
    let mut bytes = sample_bytes();
    bytes[3] = 2;
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadBool(2));
    assert_eq!((e.offset, e.path_string().as_str()), (3, "on"));
    // Inside a nested array of structs: rs[1] starts at 71, its flags at 73.
    let mut bytes = sample_bytes();
    let at = 73;
    assert_eq!(bytes[at], 1);
    bytes[at] = 0xff;
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadBool(0xff));
    assert_eq!(e.offset, at);
    assert_eq!(e.path_string(), "rs[1].flags[0]");
    assert!(alloc::format!("{e}").contains("rs[1].flags[0]"));
}

#[test]
fn counts_are_bounded_before_allocation() {
    // n = 9 > max 8.
    let mut bytes = sample_bytes();
    bytes[28] = 9;
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CountTooLarge { count: 9, max: 8 });
    assert_eq!((e.offset, e.path_string().as_str()), (29, "queues"));
    // blen = 0x7fffffff > max 64.
    let mut bytes = sample_bytes();
    let blen_at = 29 + 4 + 2 + 16 + 5 + 4;
    assert_eq!(&bytes[blen_at..blen_at + 4], &[0, 0, 0, 3]);
    bytes[blen_at..blen_at + 4].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::CountTooLarge { .. }));
    // blen negative.
    bytes[blen_at..blen_at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0xfe]);
    let e = load::<Dev>(&bytes, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NegativeCount(-2));
    assert_eq!(e.path_string(), "buf");
    // Within max but beyond the bytes left.
    vmstate! {
        pub struct Big as "big", version 1, minimum 1 {
            pub n: u32,
            pub items: Vec<u64> [count = n],
        }
    }
    let e = load::<Big>(&[0xff, 0xff, 0xff, 0xff, 0, 0], 1)
        .err()
        .unwrap();
    assert_eq!(
        e.kind,
        ErrorKind::Truncated {
            need: 0xffff_ffff * 8,
            have: 2
        }
    );
    assert_eq!(e.offset, 4);
}

#[test]
fn truncation_and_trailing_bytes() {
    let bytes = sample_bytes();
    let fifo_at = bytes.len() - 20;
    for cut in 0..bytes.len() {
        if cut == fifo_at {
            // Subsections are optional: the body without it is complete.
            assert_eq!(load::<Dev>(&bytes[..cut], 3).unwrap().fifo, None);
            continue;
        }
        let e = load::<Dev>(&bytes[..cut], 3).unwrap_err();
        assert!(e.offset <= cut, "cut {cut}: {e}");
    }
    let mut long = bytes.clone();
    long.push(0);
    let e = load::<Dev>(&long, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Trailing { bytes: 1 });
    assert_eq!(e.offset, bytes.len());
}

#[test]
fn subsection_rules() {
    let base = sample_bytes();
    let fifo_at = base.len() - 20;
    assert_eq!(base[fifo_at], 0x05);
    // Unknown name with our prefix: an error at the marker.
    let mut b = base.clone();
    b[fifo_at + 2 + 8] = b'X'; // test/fifX
    let e = load::<Dev>(&b, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnknownSubsection("test/fifX".into()));
    assert_eq!(e.offset, fifo_at);
    // Another prefix: not ours, so it is left over (trailing).
    let mut b = base.clone();
    b[fifo_at + 2] = b'x';
    let e = load::<Dev>(&b, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Trailing { bytes: 20 });
    // Sent twice.
    let mut b = base.clone();
    b.extend_from_slice(&base[fifo_at..]);
    let e = load::<Dev>(&b, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::DuplicateSubsection("test/fifo".into()));
    assert_eq!(e.offset, base.len());
    // Order does not matter.
    let mut d = sample();
    d.other = Some(Other { x: 5 });
    let sent = save(&mut d).unwrap();
    let other_at = sent.len() - 4 - 4 - 10 - 2;
    let mut swapped = sent[..fifo_at].to_vec();
    swapped.extend_from_slice(&sent[other_at..]);
    swapped.extend_from_slice(&sent[fifo_at..other_at]);
    assert_eq!(load::<Dev>(&swapped, 3).unwrap(), d);
    // A nested struct's subsection after a nested struct without them:
    // queue 1 carrying queue 0's extra works too.
    let b = base.clone();
    let back: Dev = load(&b, 3).unwrap();
    assert_eq!(back.queues[0].extra, Some(QueueExtra { v: 9 }));
}

#[test]
fn hooks_can_refuse() {
    // post_load of the subsection (level 5 > 4).
    let mut b = sample_bytes();
    let level_at = b.len() - 5;
    b[level_at] = 5;
    let e = load::<Dev>(&b, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Hook("fifo level above 4".into()));
    assert_eq!(e.path_string(), "test/fifo:");
    // post_load of the section.
    let mut b = sample_bytes();
    b[1] = 0x80;
    let e = load::<Dev>(&b, 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Hook("s negative".into()));
    // pre_save.
    let mut d = sample();
    d.b = 0xee;
    assert_eq!(
        save(&mut d).unwrap_err().kind,
        ErrorKind::Hook("b is poisoned".into())
    );
}

#[test]
fn save_checks_counts() {
    let mut d = sample();
    d.n = 3;
    let e = save(&mut d).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CountMismatch { count: 3, len: 2 });
    assert_eq!(e.path_string(), "queues");
    let mut d = sample();
    d.n = 9;
    d.queues = vec![Queue::empty(); 9];
    let e = save(&mut d).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CountTooLarge { count: 9, max: 8 });
}

#[test]
fn subsection_names_are_checked_at_compile_time() {
    assert!(is_subsection_name("test/fifo", "test"));
    assert!(!is_subsection_name("test", "test"));
    assert!(!is_subsection_name("test/", "test"));
    assert!(!is_subsection_name("testX/fifo", "test"));
    assert!(!is_subsection_name("tesT/fifo", "test"));
}

#[test]
fn empty_arrays_are_not_described() {
    let mut d = sample();
    d.n = 0;
    d.queues.clear();
    let (_, desc) = save_described(&mut d).unwrap();
    assert!(desc.fields.iter().all(|f| f.name != "queues"));
    // One element: no array marker.
    d.n = 1;
    d.queues.push(Queue::empty());
    let (_, desc) = save_described(&mut d).unwrap();
    let q: Vec<_> = desc.fields.iter().filter(|f| f.name == "queues").collect();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].array, ArrayMark::Single);
}

#[test]
fn load_prefix_reports_the_length() {
    let mut bytes = sample_bytes();
    let n = bytes.len();
    bytes.extend_from_slice(&[0x7e, 0, 0, 0, 1]);
    let (d, used) = load_prefix::<Dev>(&bytes, 3).unwrap();
    assert_eq!(used, n);
    assert_eq!(d, load::<Dev>(&bytes[..n], 3).unwrap());
}
