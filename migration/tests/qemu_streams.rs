//! Real QEMU 7.2 streams (fixtures recorded with `qemu-system-x86_64 -M pc|q35
//! -m 16 -nodefaults -display none -S -rtc base=2020-01-01T00:00:00,clock=vm`
//! and `migrate "exec:cat > FILE"`): parsed completely, every device body
//! walked by the stream's own description, and rewritten byte for byte by
//! Tern's writer.

use hv_core::vmstate;
use hv_core::vmstate::{load, save_described, Json, StructDesc};
use migration::desc::{walk_section, Value};
use migration::reader::{PageKind, Record, SectionKind};
use migration::{read_self_described, MemChannel, RamSection, StreamReader, StreamWriter};

const PC: &[u8] = include_bytes!("fixtures/pc-m16.mig");
const Q35: &[u8] = include_bytes!("fixtures/q35-m16.mig");

/// Per-kind section counts, pages and machine of each fixture (from the
/// notes' measurements: pc-m16 has 1 START, 1 PART, 1 END, 30 FULL and
/// 4177 zero + 49 normal pages).
#[test]
fn fixtures_parse_completely() {
    for (data, machine, full) in [(PC, "pc-i440fx-7.2", 30), (Q35, "pc-q35-7.2", 29)] {
        let s = read_self_described(data).unwrap();
        assert_eq!(s.configuration.machine, machine);
        let count = |k| s.sections.iter().filter(|(i, _)| i.kind == k).count();
        assert_eq!(
            [
                count(SectionKind::Start),
                count(SectionKind::Part),
                count(SectionKind::End),
                count(SectionKind::Full)
            ],
            [1, 1, 1, full]
        );
        assert_eq!(s.ram_section, Some(2));
        let desc = s.description.as_ref().unwrap();
        let devices = desc.get("devices").unwrap().as_array().unwrap();
        assert_eq!(devices.len(), full, "one description per FULL section");
        // Every page of every block exactly once.
        let total: u64 = s.ram_blocks.iter().map(|b| b.1).sum();
        assert_eq!(s.pages.len() as u64, total / 4096);
        let mut seen = std::collections::BTreeSet::new();
        for p in &s.pages {
            assert!(seen.insert((p.block, p.addr)), "page sent twice");
        }
        assert_eq!(
            s.ram_blocks.first().map(|b| (b.0, b.1)),
            Some(("pc.ram", 0x100_0000))
        );
    }
    let s = read_self_described(PC).unwrap();
    let zero = s
        .pages
        .iter()
        .filter(|p| matches!(p.kind, PageKind::Zero(0)))
        .count();
    assert_eq!((zero, s.pages.len() - zero), (4177, 49));
    let names: Vec<&str> = s.ram_blocks.iter().map(|b| b.0).collect();
    assert_eq!(
        names,
        [
            "pc.ram",
            "/rom@etc/acpi/tables",
            "pc.bios",
            "pc.rom",
            "/rom@etc/table-loader",
            "/rom@etc/acpi/rsdp"
        ]
    );
}

/// The first records and offsets of pc-m16, as the notes measured them.
#[test]
fn record_offsets_match_the_notes() {
    let mut r = StreamReader::self_described(PC).unwrap();
    assert_eq!(
        r.next_record().unwrap(),
        Some(Record::Header { version: 3 })
    );
    match r.next_record().unwrap() {
        Some(Record::Configuration(c)) => assert_eq!((c.offset, c.machine), (8, "pc-i440fx-7.2")),
        other => panic!("{other:?}"),
    }
    let mut firsts = Vec::new();
    let mut eof = None;
    let mut vmdesc = None;
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::SectionBegin(i) if firsts.len() < 4 => {
                firsts.push((i.offset, i.kind, i.id, i.idstr.to_string()))
            }
            Record::Eof { offset } => eof = Some(offset),
            Record::VmDescription { offset, json, .. } => vmdesc = Some((offset, json.len())),
            _ => {}
        }
    }
    assert_eq!(
        firsts,
        [
            (0x1a, SectionKind::Start, 2, "ram".to_string()),
            (0xc4, SectionKind::Part, 2, "ram".to_string()),
            (0x3a58b, SectionKind::End, 2, "ram".to_string()),
            (0x3a59d, SectionKind::Full, 0, "timer".to_string()),
        ]
    );
    assert_eq!(eof, Some(0x3d7d6));
    assert_eq!(vmdesc, Some((0x3d7d7, 98649)));
}

/// Every device section is walked by its description with no byte left
/// over, and the walk reads the values QEMU wrote.
#[test]
fn every_device_section_walks_exactly() {
    for data in [PC, Q35] {
        let r = StreamReader::self_described(data).unwrap();
        let desc = r.description().unwrap().clone();
        let s = migration::reader::read_all(r).unwrap();
        let mut walked = 0;
        for (info, body) in s.devices() {
            let d = desc.find(info.idstr, info.instance).unwrap();
            let (w, used) = walk_section(d, body).unwrap();
            assert_eq!(used, body.len(), "{}", info.idstr);
            assert_eq!(w.subsections.len(), d.body.subsections.len());
            walked += 1;
        }
        assert_eq!(walked, desc.devices.len());
    }
    // A value: globalstate's runstate is "prelaunch" (size 10 with NUL).
    let r = StreamReader::self_described(PC).unwrap();
    let desc = r.description().unwrap().clone();
    let s = migration::reader::read_all(r).unwrap();
    let (_, body) = s.devices().find(|(i, _)| i.idstr == "globalstate").unwrap();
    let (w, _) = walk_section(desc.find("globalstate", 0).unwrap(), body).unwrap();
    assert_eq!(w.fields[0].value, Value::Uint(10));
    match &w.fields[1].value {
        Value::Bytes(b) => assert!(b.starts_with(b"prelaunch\0")),
        v => panic!("{v:?}"),
    }
    // fw_cfg's two subsections.
    let (_, body) = s.devices().find(|(i, _)| i.idstr == "fw_cfg").unwrap();
    let (w, _) = walk_section(desc.find("fw_cfg", 0).unwrap(), body).unwrap();
    let subs: Vec<(&str, u32)> = w.subsections.iter().map(|s| (s.0, s.1)).collect();
    assert_eq!(subs, [("fw_cfg/dma", 0), ("fw_cfg/acpi_mr", 1)]);
}

/// Tern's writer, fed what the reader found, reproduces QEMU's stream
/// byte for byte (header, configuration, RAM with ZERO/PAGE/CONTINUE and
/// EOS, device sections, footers, EOF, and the description JSON).
#[test]
fn writer_reproduces_qemu_streams_byte_for_byte() {
    for data in [PC, Q35] {
        let s = read_self_described(data).unwrap();
        let desc = s.description.clone().unwrap();
        let devices = desc.get("devices").unwrap().as_array().unwrap();
        let mut w = StreamWriter::new(MemChannel::new(), s.configuration.machine).unwrap();
        let ram_id = s.ram_section.unwrap();
        w.ram_setup(ram_id, &s.ram_blocks).unwrap();
        let mut pages = s.pages.iter().peekable();
        let mut dev = 0;
        for (info, body) in &s.sections {
            match info.kind {
                SectionKind::Start => {}
                SectionKind::Part | SectionKind::End => {
                    w.ram_begin(if info.kind == SectionKind::Part {
                        RamSection::Part
                    } else {
                        RamSection::End
                    })
                    .unwrap();
                    let range = info.payload_start..info.payload_start + body.len();
                    while let Some(p) = pages.next_if(|p| range.contains(&p.offset)) {
                        let zero = [0u8; 4096];
                        let page = match p.kind {
                            PageKind::Zero(_) => &zero[..],
                            PageKind::Normal(b) => b,
                        };
                        w.ram_page(p.block, p.addr, page).unwrap();
                    }
                    w.ram_finish().unwrap();
                }
                SectionKind::Full => {
                    // The description minus name/instance_id.
                    let Json::Object(pairs) = &devices[dev] else {
                        panic!()
                    };
                    dev += 1;
                    let rest: Vec<_> = pairs[2..].to_vec();
                    w.device_raw(
                        info.id,
                        info.idstr,
                        info.instance,
                        info.version,
                        body,
                        Some(Json::Object(rest)),
                    )
                    .unwrap();
                }
            }
        }
        let out = w.finish(true).unwrap().into_bytes();
        assert_eq!(out.len(), data.len());
        assert!(
            out == data,
            "first difference at {:?}",
            out.iter().zip(data).position(|(a, b)| a != b)
        );
    }
}

// QEMU device states declared with vmstate!, to check Tern's encoding and
// description against QEMU's own bytes and vmdesc.

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct DmaRegs as "dma_regs", version 1, minimum 1 {
        pub now: [i32; 2],
        pub base: [u16; 2],
        pub mode: u8,
        pub page: u8,
        pub pageh: u8,
        pub dack: u8,
        pub eop: u8,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Dma as "dma", version 1, minimum 1 {
        pub command: u8,
        pub mask: u8,
        pub flip_flop: u8,
        pub dshift: i32,
        pub regs: [DmaRegs; 4],
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct I8259 as "i8259", version 1, minimum 1 {
        pub last_irr: u8,
        pub irr: u8,
        pub imr: u8,
        pub isr: u8,
        pub priority_add: u8,
        pub irq_base: u8,
        pub read_reg_select: u8,
        pub poll: u8,
        pub special_mask: u8,
        pub init_state: u8,
        pub auto_eoi: u8,
        pub rotate_on_auto_eoi: u8,
        pub special_fully_nested_mode: u8,
        pub init4: u8,
        pub single_mode: u8,
        pub elcr: u8,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct GlobalState as "globalstate", version 1, minimum 1 {
        pub size: u32,
        pub runstate: [u8; 100] [buffer],
    }
}

fn check_device<T: vmstate::VmState + Clone + PartialEq + std::fmt::Debug>(
    idstr: &str,
    instance: u32,
) {
    let s = read_self_described(PC).unwrap();
    let desc = s.description.clone().unwrap();
    let (info, body) = s
        .devices()
        .find(|(i, _)| i.idstr == idstr && i.instance == instance)
        .unwrap();
    let mut v: T = load(body, info.version).unwrap();
    let (bytes, d) = save_described(&mut v).unwrap();
    assert_eq!(&bytes[..], *body, "{idstr}: same bytes");
    let qemu = desc
        .get("devices")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .find(|d| {
            d.get("name").and_then(Json::as_str) == Some(idstr)
                && d.get("instance_id").and_then(Json::as_u64) == Some(instance.into())
        })
        .unwrap();
    let Json::Object(pairs) = qemu else { panic!() };
    assert_eq!(
        d.to_json(),
        Json::Object(pairs[2..].to_vec()),
        "{idstr}: same vmdesc"
    );
    assert_eq!(StructDesc::from_json(&d.to_json()).unwrap(), d);
}

#[test]
fn vmstate_matches_qemu_devices() {
    check_device::<Dma>("dma", 0);
    check_device::<Dma>("dma", 1);
    check_device::<I8259>("i8259", 0);
    check_device::<I8259>("i8259", 1);
    check_device::<GlobalState>("globalstate", 0);
    // The values are QEMU's: i8259 master's imr after reset is 0, the
    // runstate is "prelaunch".
    let s = read_self_described(PC).unwrap();
    let (_, body) = s.devices().find(|(i, _)| i.idstr == "globalstate").unwrap();
    let g: GlobalState = load(body, 1).unwrap();
    assert_eq!(g.size, 10);
    assert_eq!(&g.runstate[..10], b"prelaunch\0");
}
