//! A small Tern stream with known contents and the offsets of its parts.
#![allow(dead_code)]

use hv_core::vmstate;
use hv_core::vmstate::{load_prefix, VmStateHooks};
use migration::error::StreamErrorKind;
use migration::reader::SectionInfo;
use migration::{MemChannel, RamSection, SectionSizer, StreamWriter};

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Lane as "tdev-lane", version 1, minimum 1 {
        pub head: u16,
        pub tail: u16,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct TdevFifo as "tdev/fifo", version 2, minimum 1 {
        pub level: u8,
        pub bytes: [u8; 8] [buffer],
    }
}

vmstate! {
    /// A device with every kind of field.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Tdev as "tdev", version 2, minimum 1, hooks {
        pub ctrl: u32,
        pub enabled: bool,
        pub regs: [u16; 4],
        pub deadline: i64 [since 2],
        pub lanes_n: u8,
        pub lanes: Vec<Lane> [count = lanes_n, max = 16],
        pub blob_len: u32,
        pub blob: Vec<u8> [len = blob_len, max = 256],
    }
    subsections {
        pub fifo: Option<TdevFifo>,
    }
}

impl VmStateHooks for Tdev {
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        if self.ctrl & 0x8000_0000 != 0 {
            return Err("reserved ctrl bit".into());
        }
        Ok(())
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct Timer as "ttimer", version 1, minimum 1 {
        pub expire: u64,
        pub armed: bool,
    }
}

pub fn tdev(seed: u8) -> Tdev {
    Tdev {
        ctrl: 0x1234_0000 | u32::from(seed),
        enabled: seed % 2 == 1,
        regs: [1, 2, 3, u16::from(seed)],
        deadline: -5,
        lanes_n: 2,
        lanes: vec![
            Lane { head: 1, tail: 2 },
            Lane {
                head: 3,
                tail: seed.into(),
            },
        ],
        blob_len: 3,
        blob: vec![seed, 0, 0xff],
        fifo: seed.is_multiple_of(2).then_some(TdevFifo {
            level: 3,
            bytes: [seed; 8],
        }),
    }
}

pub fn timer() -> Timer {
    Timer {
        expire: u64::MAX,
        armed: false,
    }
}

pub const BLOCKS: [(&str, u64); 2] = [("tern.ram", 0x10000), ("tern.rom", 0x2000)];

/// The pages written: (block, addr, fill) where fill 0 is a zero page.
pub const PAGES_PART: [(&str, u64, u8); 5] = [
    ("tern.ram", 0x0, 0),
    ("tern.ram", 0x1000, 0x11),
    ("tern.rom", 0x1000, 0x22),
    ("tern.rom", 0x0, 0),
    ("tern.ram", 0xf000, 0x33),
];
pub const PAGES_END: [(&str, u64, u8); 2] = [("tern.ram", 0x2000, 0x44), ("tern.ram", 0x1000, 0)];

pub fn page(fill: u8, addr: u64) -> Vec<u8> {
    let mut p = vec![fill; 4096];
    if fill != 0 {
        p[0] = addr as u8 ^ 0x5a;
    }
    p
}

/// Offsets of a built stream.
#[derive(Debug, Default)]
pub struct Layout {
    pub ram_start: usize,
    pub part: usize,
    /// Header offsets of the PART's page records.
    pub part_pages: Vec<usize>,
    pub part_footer: usize,
    pub end: usize,
    pub end_footer: usize,
    /// (section start, footer offset) of the three device sections.
    pub devices: Vec<(usize, usize)>,
    pub eof: usize,
    pub vmdesc: usize,
}

/// RAM id 2, devices `tdev` 0 (id 5), `tdev` 1 (id 6), `ttimer` 0 (id 9).
pub fn build(with_desc: bool) -> (Vec<u8>, Layout) {
    let mut l = Layout::default();
    let mut w = StreamWriter::new(MemChannel::new(), "tern-q35").unwrap();
    let pos = |w: &StreamWriter<MemChannel>| w.position() as usize;
    l.ram_start = pos(&w);
    w.ram_setup(2, &BLOCKS).unwrap();
    l.part = pos(&w);
    w.ram_begin(RamSection::Part).unwrap();
    for (b, a, f) in PAGES_PART {
        l.part_pages.push(pos(&w));
        w.ram_page(b, a, &page(f, a)).unwrap();
    }
    l.part_footer = pos(&w) + 8;
    w.ram_finish().unwrap();
    l.end = pos(&w);
    w.ram_begin(RamSection::End).unwrap();
    for (b, a, f) in PAGES_END {
        w.ram_page(b, a, &page(f, a)).unwrap();
    }
    l.end_footer = pos(&w) + 8;
    w.ram_finish().unwrap();
    for (id, idstr, inst) in [(5, "tdev", 0), (6, "tdev", 1), (9, "ttimer", 0)] {
        let start = pos(&w);
        if idstr == "tdev" {
            w.device(id, idstr, inst, &mut tdev(inst as u8)).unwrap();
        } else {
            w.device(id, idstr, inst, &mut timer()).unwrap();
        }
        l.devices.push((start, pos(&w) - 5));
    }
    l.eof = pos(&w);
    l.vmdesc = l.eof + 1;
    let out = w.finish(with_desc).unwrap().into_bytes();
    (out, l)
}

/// Tern's loader delimits device bodies with its own states, so a stream
/// without a description (QEMU's `suppress-vmdesc`) reads too.
pub struct LocalSizer;

impl SectionSizer for LocalSizer {
    fn body_len(&mut self, info: &SectionInfo<'_>, rest: &[u8]) -> Result<usize, StreamErrorKind> {
        let r = match info.idstr {
            "tdev" => load_prefix::<Tdev>(rest, info.version).map(|(_, n)| n),
            "ttimer" => load_prefix::<Timer>(rest, info.version).map(|(_, n)| n),
            _ => return Err(StreamErrorKind::NoDescription),
        };
        r.map_err(StreamErrorKind::Body)
    }
}
