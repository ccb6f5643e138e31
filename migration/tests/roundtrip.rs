//! Streams Tern writes read back to the same content.

mod common;

use common::*;
use hv_core::vmstate::load;
use migration::error::StreamErrorKind;
use migration::reader::{read_all, PageKind, Record, SectionKind};
use migration::{read_self_described, StreamReader};

#[test]
fn written_stream_reads_back() {
    let (data, l) = build(true);
    let s = read_self_described(&data).unwrap();
    assert_eq!(s.configuration.machine, "tern-q35");
    assert_eq!(s.ram_section, Some(2));
    assert_eq!(s.ram_blocks, BLOCKS.to_vec());
    // Pages: same blocks, addresses and contents, in order.
    let expected: Vec<_> = PAGES_PART.iter().chain(PAGES_END.iter()).collect();
    assert_eq!(s.pages.len(), expected.len());
    for (p, &&(b, a, f)) in s.pages.iter().zip(&expected) {
        assert_eq!((p.block, p.addr), (b, a));
        match p.kind {
            PageKind::Zero(fill) => assert_eq!((fill, f), (0, 0)),
            PageKind::Normal(bytes) => assert_eq!(bytes, &page(f, a)[..]),
        }
    }
    assert_eq!(s.pages[0].offset, l.part_pages[0]);
    // Devices: bodies load back into equal states.
    let devs: Vec<_> = s.devices().collect();
    assert_eq!(devs.len(), 3);
    let (i0, b0) = devs[0];
    assert_eq!(
        (i0.id, i0.idstr, i0.instance, i0.version),
        (5, "tdev", 0, 2)
    );
    assert_eq!(i0.offset, l.devices[0].0);
    assert_eq!(load::<Tdev>(b0, 2).unwrap(), tdev(0));
    assert_eq!(load::<Tdev>(devs[1].1, 2).unwrap(), tdev(1));
    assert_eq!(load::<Timer>(devs[2].1, 1).unwrap(), timer());
    // The description lists the three devices with their fields.
    let d = s.description.unwrap();
    let list = d.get("devices").unwrap().as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(d.get("page_size").unwrap().as_u64(), Some(4096));
    assert!(list[0].to_compact().starts_with(
        r#"{"name": "tdev", "instance_id": 0, "vmsd_name": "tdev", "version": 2, "fields": [{"name": "ctrl", "type": "uint32", "size": 4}, "#
    ));
    assert!(list[0].to_compact().ends_with(r#""subsections": [{"vmsd_name": "tdev/fifo", "version": 2, "fields": [{"name": "level", "type": "uint8", "size": 1}, {"name": "bytes", "type": "buffer", "size": 8}]}]}"#));
}

#[test]
fn continue_flag_is_used_within_a_block_and_across_sections() {
    let (data, l) = build(true);
    let flags = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap()) & 0xfff;
    // PART: ram(named) ram(cont) rom(named) rom(cont) ram(named).
    let f: Vec<u64> = l.part_pages.iter().map(|&a| flags(a)).collect();
    assert_eq!(f, [0x02, 0x28, 0x08, 0x22, 0x08]);
    // END's first page is in tern.ram, the block the PART ended with.
    assert_eq!(flags(l.end + 5), 0x28);
    // A zero page is 9 bytes plus its name: 8 + 1 + "tern.ram" + 1.
    assert_eq!(l.part_pages[1] - l.part_pages[0], 8 + 1 + 8 + 1);
}

#[test]
fn records_come_in_stream_order() {
    let (data, l) = build(true);
    let mut r = StreamReader::self_described(&data).unwrap();
    let mut kinds = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        kinds.push(match rec {
            Record::Header { .. } => "header".to_string(),
            Record::Configuration(_) => "config".into(),
            Record::SectionBegin(i) => format!("begin {} {}", i.kind.name(), i.idstr),
            Record::RamBlock { name, .. } => format!("block {name}"),
            Record::RamPage(_) => "page".into(),
            Record::SectionEnd { info, payload, .. } => {
                format!("end {} {}..{}", info.id, payload.start, payload.end)
            }
            Record::Command { .. } => "command".into(),
            Record::Eof { offset } => format!("eof {offset}"),
            Record::VmDescription { offset, .. } => format!("vmdesc {offset}"),
        });
    }
    let s = |x: &str| x.to_string();
    let mut expected = vec![
        s("header"),
        s("config"),
        s("begin START ram"),
        s("block tern.ram"),
        s("block tern.rom"),
        format!("end 2 {}..{}", l.ram_start + 17, l.part - 5),
        s("begin PART ram"),
    ];
    expected.extend(std::iter::repeat_n(s("page"), 5));
    expected.push(format!("end 2 {}..{}", l.part + 5, l.part_footer));
    expected.push(s("begin END ram"));
    expected.extend(std::iter::repeat_n(s("page"), 2));
    expected.push(format!("end 2 {}..{}", l.end + 5, l.end_footer));
    for (i, (id, name)) in [(5, "tdev"), (6, "tdev"), (9, "ttimer")].iter().enumerate() {
        expected.push(format!("begin FULL {name}"));
        let (start, footer) = l.devices[i];
        let hdr = 1 + 4 + 1 + name.len() + 8;
        expected.push(format!("end {id} {}..{}", start + hdr, footer));
    }
    expected.push(format!("eof {}", l.eof));
    expected.push(format!("vmdesc {}", l.vmdesc));
    assert_eq!(kinds, expected);
}

#[test]
fn stream_without_description_reads_with_local_states() {
    let (with, _) = build(true);
    let (data, l) = build(false);
    assert_eq!(data.len(), l.eof + 1);
    assert_eq!(&with[..data.len()], &data[..]);
    let s = read_all(StreamReader::new(&data, LocalSizer)).unwrap();
    assert_eq!(s.description, None);
    assert_eq!(s.devices().count(), 3);
    assert_eq!(
        s.sections
            .iter()
            .filter(|(i, _)| i.kind == SectionKind::Full)
            .count(),
        3
    );
    // Self-described reading of it stops at the first device.
    let e = read_self_described(&data).unwrap_err();
    assert_eq!(e.kind, StreamErrorKind::NoDescription);
    assert_eq!(e.offset, l.devices[0].0);
    assert_eq!(e.section.unwrap().idstr, "tdev");
}

#[test]
fn writer_refuses_misuse() {
    use migration::{MemChannel, RamSection, StreamWriter, WriteError};
    assert_eq!(
        StreamWriter::new(MemChannel::new(), "").err(),
        Some(WriteError::BadMachineName)
    );
    let mut w = StreamWriter::new(MemChannel::new(), "m").unwrap();
    assert!(matches!(
        w.ram_begin(RamSection::Part),
        Err(WriteError::RamOrder(_))
    ));
    assert!(matches!(
        w.ram_setup(1, &[("a", 0x1001)]),
        Err(WriteError::BadBlockLength { .. })
    ));
    assert!(matches!(
        w.ram_setup(1, &[("a", 0x1000), ("a", 0x1000)]),
        Err(WriteError::BadName(_))
    ));
    w.ram_setup(1, &[("a", 0x2000)]).unwrap();
    assert!(matches!(
        w.ram_page("a", 0, &[0; 4096]),
        Err(WriteError::RamOrder(_))
    ));
    w.ram_begin(RamSection::Part).unwrap();
    assert!(matches!(
        w.ram_page("b", 0, &[0; 4096]),
        Err(WriteError::UnknownBlock(_))
    ));
    assert!(matches!(
        w.ram_page("a", 0x2000, &[0; 4096]),
        Err(WriteError::BadPage { .. })
    ));
    assert!(matches!(
        w.ram_page("a", 0x10, &[0; 4096]),
        Err(WriteError::BadPage { .. })
    ));
    assert!(matches!(
        w.ram_page("a", 0, &[0; 4095]),
        Err(WriteError::BadPage { .. })
    ));
    assert!(matches!(
        w.device(3, "ttimer", 0, &mut timer()),
        Err(WriteError::RamOrder(_))
    ));
    w.ram_finish().unwrap();
    assert_eq!(
        w.device(1, "ttimer", 0, &mut timer()),
        Err(WriteError::DuplicateSectionId(1))
    );
    let mut bad = tdev(0);
    bad.lanes_n = 5;
    assert!(matches!(
        w.device(3, "tdev", 0, &mut bad),
        Err(WriteError::State { .. })
    ));
    assert!(matches!(
        w.device(4, "", 0, &mut timer()),
        Err(WriteError::BadName(_))
    ));
    let full = MemChannel::with_limit(10);
    assert!(matches!(
        StreamWriter::new(full, "pc-i440fx-7.2").err(),
        Some(WriteError::Channel(_))
    ));
}
