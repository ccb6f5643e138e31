//! The stream reader: a pull parser over the bytes of a whole stream.
//!
//! Receiver state machine (each step reads one record; anything else is an
//! error naming the byte offset and, inside a section, the section):
//!
//! ```text
//! Header ──magic, version 3──▶ Config ──07 + machine──▶ Sections
//! Sections ──01/04 header──▶ (idstr "ram": RamRecords | other: Body)
//!          ──02/03 id──────▶ (RAM: RamRecords | other: Body)   id opened by a START
//!          ──08 command────▶ Sections
//!          ──00───────────▶ AfterEof
//! RamRecords ──block / page──▶ RamRecords    (current block kept across sections)
//!            ──EOS──────────▶ Footer
//! Body (length from the SectionSizer) ──▶ Footer ──7e + same id──▶ Sections
//! AfterEof ──end of input──▶ Done
//!          ──06 len JSON (exactly to the end)──▶ Done
//! ```
//!
//! Device bodies carry no length, so the reader asks a [`SectionSizer`]:
//! [`StreamReader::self_described`] walks each body with the stream's own
//! description (found first by its position at the end of the stream);
//! Tern's loader can instead delimit bodies with its devices' own
//! descriptions. The reader never panics and allocates only in proportion
//! to the input (one entry per section and per RAM block).

use crate::desc::{DescSizer, SectionSizer, VmDescription};
use crate::error::{SectionRef, StreamError, StreamErrorKind as K};
use crate::format::{
    ram_flags, section, CONFIGURATION_NAME, MAGIC, PAGE_SIZE, RAM_IDSTR, RAM_INSTANCE, RAM_VERSION,
    VERSION,
};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::ops::Range;
use hv_core::vmstate::Json;

/// The kind of a section record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
    Full,
}

impl SectionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "START",
            Self::Part => "PART",
            Self::End => "END",
            Self::Full => "FULL",
        }
    }
}

/// A section's header (for PART/END, the idstr, instance and version are
/// those of the START that opened the id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionInfo<'a> {
    pub kind: SectionKind,
    /// Offset of the type byte.
    pub offset: usize,
    pub id: u32,
    pub idstr: &'a str,
    pub instance: u32,
    pub version: u32,
    /// Offset of the first payload byte.
    pub payload_start: usize,
}

/// The configuration section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configuration<'a> {
    pub offset: usize,
    pub machine: &'a str,
    /// `configuration/target-page-bits`, if sent.
    pub page_bits: Option<u32>,
    /// `configuration/capabilities`, if sent.
    pub capabilities: Vec<&'a str>,
    /// `configuration/uuid`, if sent.
    pub uuid: Option<[u8; 16]>,
}

/// What a RAM page record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind<'a> {
    /// The page is filled with this byte (QEMU writes 0).
    Zero(u8),
    /// The page's bytes.
    Normal(&'a [u8]),
}

/// One RAM page record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamPage<'a> {
    /// Offset of the record's header.
    pub offset: usize,
    pub section_id: u32,
    pub block: &'a str,
    /// Byte offset in the block.
    pub addr: u64,
    pub kind: PageKind<'a>,
}

/// One record of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Record<'a> {
    /// Magic and version were good.
    Header {
        version: u32,
    },
    Configuration(Configuration<'a>),
    /// A section starts; its records (RAM) or its end follow.
    SectionBegin(SectionInfo<'a>),
    /// A RAM block of the setup's list.
    RamBlock {
        offset: usize,
        name: &'a str,
        length: u64,
    },
    RamPage(RamPage<'a>),
    /// A section's payload ended and its footer matched.
    SectionEnd {
        info: SectionInfo<'a>,
        payload: Range<usize>,
        body: &'a [u8],
    },
    Command {
        offset: usize,
        cmd: u16,
        data: &'a [u8],
    },
    Eof {
        offset: usize,
    },
    /// The description record (`json` is its text, `value` parsed).
    VmDescription {
        offset: usize,
        json: &'a str,
        value: Json,
    },
}

struct Registered<'a> {
    idstr: &'a str,
    instance: u32,
    version: u32,
    ram: bool,
    full: bool,
    closed: bool,
}

enum State<'a> {
    Header,
    Config,
    Sections,
    Ram {
        info: SectionInfo<'a>,
        /// Bytes of block lengths still to come in the block list.
        list_left: Option<u64>,
        first: bool,
    },
    Footer {
        info: SectionInfo<'a>,
        end: usize,
    },
    AfterEof,
    Done,
    Failed(StreamError),
}

/// The pull parser. Call [`StreamReader::next_record`] until it returns
/// `Ok(None)`; after an error it keeps returning that error.
pub struct StreamReader<'a, S: SectionSizer = DescSizer> {
    data: &'a [u8],
    pos: usize,
    sizer: S,
    page_size: u64,
    state: State<'a>,
    sections: BTreeMap<u32, Registered<'a>>,
    devices: BTreeSet<(&'a str, u32)>,
    blocks: Vec<(&'a str, u64)>,
    block_index: BTreeMap<&'a str, usize>,
    have_blocks: bool,
    current_block: Option<usize>,
    /// The section being read, for errors.
    section: Option<(u32, &'a str)>,
    /// The description already parsed (by [`StreamReader::self_described`])
    /// and its record's offset: the record at the end reuses it.
    parsed_desc: Option<(usize, Json)>,
}

/// Finds the description record at the end of `data`: the last offset `p`
/// with `data[p] == 0x06`, a be32 length that runs exactly to the end, and
/// a `{` after it. JSON text has no 0x06 byte, so the last match is the
/// real one.
pub fn find_description(data: &[u8]) -> Option<usize> {
    let len = data.len();
    (0..len.checked_sub(6)?).rev().find(|&p| {
        data[p] == section::VMDESCRIPTION
            && data[p + 5] == b'{'
            && u32::from_be_bytes([data[p + 1], data[p + 2], data[p + 3], data[p + 4]]) as usize
                == len - p - 5
    })
}

/// Parses a description record's JSON at `offset` (the 0x06 byte).
fn parse_description(data: &[u8], offset: usize) -> Result<(&str, Json), StreamError> {
    let start = offset + 5;
    let text = data.get(start..).unwrap_or(&[]);
    let text = core::str::from_utf8(text)
        .map_err(|e| StreamError::new(start + e.valid_up_to(), K::NotUtf8("description")))?;
    let value = Json::parse(text).map_err(|e| StreamError::new(start + e.offset, K::Json(e)))?;
    Ok((text, value))
}

impl<'a> StreamReader<'a, DescSizer> {
    /// A reader that delimits device sections with the stream's own
    /// description. A stream without one can still be read up to its
    /// first device section; a description that is there but broken is an
    /// error.
    pub fn self_described(data: &'a [u8]) -> Result<Self, StreamError> {
        let desc = match find_description(data) {
            None => None,
            Some(off) => {
                let (_, j) = parse_description(data, off)?;
                let d = VmDescription::from_json(&j)
                    .map_err(|m| StreamError::new(off, K::BadDescription(m)))?;
                Some((d, off, j))
            }
        };
        let (desc, parsed) = match desc {
            Some((d, off, j)) => (Some(d), Some((off, j))),
            None => (None, None),
        };
        let mut r = Self::new(data, DescSizer { desc });
        r.parsed_desc = parsed;
        Ok(r)
    }

    /// The description found at the end of the stream, if any.
    pub fn description(&self) -> Option<&VmDescription> {
        self.sizer.desc.as_ref()
    }
}

impl<'a, S: SectionSizer> StreamReader<'a, S> {
    pub fn new(data: &'a [u8], sizer: S) -> Self {
        Self {
            data,
            pos: 0,
            sizer,
            page_size: PAGE_SIZE,
            state: State::Header,
            sections: BTreeMap::new(),
            devices: BTreeSet::new(),
            blocks: Vec::new(),
            block_index: BTreeMap::new(),
            have_blocks: false,
            current_block: None,
            section: None,
            parsed_desc: None,
        }
    }

    /// The sizer (e.g. to take back a description).
    pub fn sizer(&self) -> &S {
        &self.sizer
    }

    /// The RAM blocks of the setup section (name, used length).
    pub fn ram_blocks(&self) -> &[(&'a str, u64)] {
        &self.blocks
    }

    /// The page size RAM records use.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    fn err(&self, offset: usize, kind: K) -> StreamError {
        StreamError {
            offset,
            section: self.section.map(|(id, idstr)| SectionRef {
                id,
                idstr: idstr.to_string(),
            }),
            kind,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StreamError> {
        let have = self.data.len() - self.pos;
        if n > have {
            return Err(self.err(
                self.pos,
                K::Truncated {
                    what,
                    need: n as u64,
                    have: have as u64,
                },
            ));
        }
        let b = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, StreamError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, StreamError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StreamError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }

    /// A counted string (length byte + bytes) that must be UTF-8.
    fn counted(&mut self, what: &'static str) -> Result<&'a str, StreamError> {
        let at = self.pos;
        let len = self.u8(what)?;
        let b = self.take(usize::from(len), what)?;
        core::str::from_utf8(b).map_err(|_| self.err(at, K::NotUtf8(what)))
    }

    /// The next record, `Ok(None)` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Record<'a>>, StreamError> {
        if let State::Failed(e) = &self.state {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }

    fn step(&mut self) -> Result<Option<Record<'a>>, StreamError> {
        match core::mem::replace(&mut self.state, State::Done) {
            State::Header => {
                let magic = self.u32("the magic")?;
                if magic != MAGIC {
                    return Err(self.err(0, K::BadMagic(magic)));
                }
                let version = self.u32("the version")?;
                if version != VERSION {
                    return Err(self.err(4, K::BadVersion(version)));
                }
                self.state = State::Config;
                Ok(Some(Record::Header { version }))
            }
            State::Config => {
                let at = self.pos;
                if self.u8("the configuration")? != section::CONFIGURATION {
                    return Err(self.err(at, K::ConfigurationMissing));
                }
                let c = self.configuration(at)?;
                self.state = State::Sections;
                Ok(Some(Record::Configuration(c)))
            }
            State::Sections => self.section_record(),
            State::Ram {
                info,
                list_left,
                first,
            } => self.ram_record(info, list_left, first),
            State::Footer { info, end } => {
                self.pos = end;
                let at = self.pos;
                let got = self.u8("the section footer")?;
                if got != section::FOOTER {
                    return Err(self.err(at, K::MissingFooter { got }));
                }
                let id = self.u32("the section footer")?;
                if id != info.id {
                    return Err(self.err(
                        at,
                        K::FooterMismatch {
                            expected: info.id,
                            got: id,
                        },
                    ));
                }
                self.section = None;
                self.state = State::Sections;
                let payload = info.payload_start..end;
                Ok(Some(Record::SectionEnd {
                    info,
                    body: self.data.get(payload.clone()).unwrap_or(&[]),
                    payload,
                }))
            }
            State::AfterEof => {
                let at = self.pos;
                if at == self.data.len() {
                    return Ok(None);
                }
                if self.u8("the description")? != section::VMDESCRIPTION {
                    return Err(self.err(at, K::TrailingData));
                }
                let len = self.u32("the description")?;
                let left = (self.data.len() - self.pos) as u64;
                if u64::from(len) != left {
                    return Err(self.err(
                        at + 1,
                        K::DescriptionLength {
                            declared: len.into(),
                            left,
                        },
                    ));
                }
                let (json, value) = match self.parsed_desc.take() {
                    // Parsed once already, when the reader was made.
                    Some((off, value)) if off == at => {
                        let text = &self.data[at + 5..];
                        let json = core::str::from_utf8(text).map_err(|e| {
                            self.err(at + 5 + e.valid_up_to(), K::NotUtf8("description"))
                        })?;
                        (json, value)
                    }
                    _ => parse_description(self.data, at)?,
                };
                self.pos = self.data.len();
                Ok(Some(Record::VmDescription {
                    offset: at,
                    json,
                    value,
                }))
            }
            State::Done => Ok(None),
            State::Failed(e) => Err(e),
        }
    }

    fn configuration(&mut self, at: usize) -> Result<Configuration<'a>, StreamError> {
        let len = self.u32("the machine name")?;
        let name = self.take(len as usize, "the machine name")?;
        let machine =
            core::str::from_utf8(name).map_err(|_| self.err(at + 5, K::NotUtf8("machine name")))?;
        if machine.is_empty() {
            return Err(self.err(at + 1, K::EmptyMachineName));
        }
        let mut c = Configuration {
            offset: at,
            machine,
            page_bits: None,
            capabilities: Vec::new(),
            uuid: None,
        };
        // Optional subsections, as vmstate reads them.
        let prefix = CONFIGURATION_NAME.as_bytes();
        while self.data.get(self.pos) == Some(&section::SUBSECTION) {
            let sat = self.pos;
            let rest = &self.data[self.pos..];
            let Some(&len) = rest.get(1) else { break };
            let Some(name) = rest.get(2..2 + usize::from(len)) else {
                break;
            };
            if usize::from(len) < prefix.len() + 1 || !name.starts_with(prefix) {
                break;
            }
            self.pos += 2 + usize::from(len);
            let version = self.u32("a configuration subsection")?;
            let bad = |m: &str| K::BadConfiguration(m.to_string());
            match name {
                b"configuration/target-page-bits" if version == 1 => {
                    let bits = self.u32("target-page-bits")?;
                    if !(9..=16).contains(&bits) || c.page_bits.is_some() {
                        return Err(self.err(sat, bad("target-page-bits")));
                    }
                    c.page_bits = Some(bits);
                    self.page_size = 1 << bits;
                }
                b"configuration/capabilities" if version == 1 => {
                    let n = self.u32("capabilities")?;
                    if n as usize > self.data.len() - self.pos {
                        return Err(self.err(sat, bad("capability count")));
                    }
                    for _ in 0..n {
                        let cap = self.counted("a capability")?;
                        c.capabilities.push(cap);
                    }
                }
                b"configuration/uuid" if version == 1 => {
                    let mut u = [0u8; 16];
                    u.copy_from_slice(self.take(16, "the uuid")?);
                    c.uuid = Some(u);
                }
                _ => {
                    let n = String::from_utf8_lossy(name);
                    return Err(self.err(
                        sat,
                        K::BadConfiguration(alloc::format!("subsection {n:?} version {version}")),
                    ));
                }
            }
        }
        Ok(c)
    }

    fn section_record(&mut self) -> Result<Option<Record<'a>>, StreamError> {
        let at = self.pos;
        let ty = self.u8("a section type")?;
        match ty {
            section::EOF => {
                self.state = State::AfterEof;
                Ok(Some(Record::Eof { offset: at }))
            }
            section::START | section::FULL => {
                let id = self.u32("a section header")?;
                let idstr_at = self.pos;
                let idstr = self.counted("a section idstr")?;
                self.section = Some((id, idstr));
                if idstr.is_empty() {
                    return Err(self.err(idstr_at, K::EmptyIdstr));
                }
                let instance = self.u32("a section header")?;
                let version = self.u32("a section header")?;
                let kind = if ty == section::START {
                    SectionKind::Start
                } else {
                    SectionKind::Full
                };
                if self.sections.contains_key(&id) {
                    return Err(self.err(at + 1, K::DuplicateSectionId(id)));
                }
                let ram = idstr == RAM_IDSTR;
                if kind == SectionKind::Full && !ram && !self.devices.insert((idstr, instance)) {
                    return Err(self.err(
                        idstr_at,
                        K::DuplicateDevice {
                            idstr: idstr.to_string(),
                            instance,
                        },
                    ));
                }
                self.sections.insert(
                    id,
                    Registered {
                        idstr,
                        instance,
                        version,
                        ram,
                        full: kind == SectionKind::Full,
                        closed: kind == SectionKind::Full,
                    },
                );
                let info = SectionInfo {
                    kind,
                    offset: at,
                    id,
                    idstr,
                    instance,
                    version,
                    payload_start: self.pos,
                };
                self.open_section(info, ram)
            }
            section::PART | section::END => {
                let id = self.u32("a section id")?;
                let kind = if ty == section::PART {
                    SectionKind::Part
                } else {
                    SectionKind::End
                };
                let Some(reg) = self.sections.get_mut(&id) else {
                    return Err(self.err(at + 1, K::UnknownSectionId(id)));
                };
                let (idstr, instance, version, ram) =
                    (reg.idstr, reg.instance, reg.version, reg.ram);
                let closed = reg.closed || reg.full;
                if kind == SectionKind::End {
                    reg.closed = true;
                }
                self.section = Some((id, idstr));
                if closed {
                    return Err(self.err(at + 1, K::SectionClosed(id)));
                }
                let info = SectionInfo {
                    kind,
                    offset: at,
                    id,
                    idstr,
                    instance,
                    version,
                    payload_start: self.pos,
                };
                self.open_section(info, ram)
            }
            section::COMMAND => {
                let cmd = self.u16("a command")?;
                let len = self.u16("a command")?;
                let data = self.take(usize::from(len), "a command")?;
                self.state = State::Sections;
                Ok(Some(Record::Command {
                    offset: at,
                    cmd,
                    data,
                }))
            }
            section::CONFIGURATION => Err(self.err(at, K::ConfigurationTwice)),
            section::SUBSECTION | section::VMDESCRIPTION | section::FOOTER => {
                Err(self.err(at, K::UnexpectedSectionType(ty)))
            }
            _ => Err(self.err(at, K::UnknownSectionType(ty))),
        }
    }

    fn open_section(
        &mut self,
        info: SectionInfo<'a>,
        ram: bool,
    ) -> Result<Option<Record<'a>>, StreamError> {
        if ram {
            if info.instance != RAM_INSTANCE || info.version != RAM_VERSION {
                return Err(self.err(
                    info.offset,
                    K::RamHeader {
                        instance: info.instance,
                        version: info.version,
                    },
                ));
            }
            self.state = State::Ram {
                info,
                list_left: None,
                first: true,
            };
        } else {
            let rest = &self.data[self.pos..];
            let len = match self.sizer.body_len(&info, rest) {
                Ok(n) if n <= rest.len() => n,
                Ok(_) => {
                    return Err(self.err(
                        self.pos,
                        K::Truncated {
                            what: "a section body",
                            need: 0,
                            have: rest.len() as u64,
                        },
                    ))
                }
                Err(K::Body(e)) => {
                    let off = self.pos.saturating_add(e.offset).min(self.data.len());
                    return Err(self.err(off, K::Body(e)));
                }
                Err(k) => return Err(self.err(info.offset, k)),
            };
            self.state = State::Footer {
                info,
                end: self.pos + len,
            };
        }
        Ok(Some(Record::SectionBegin(info)))
    }

    fn ram_record(
        &mut self,
        info: SectionInfo<'a>,
        list_left: Option<u64>,
        first: bool,
    ) -> Result<Option<Record<'a>>, StreamError> {
        let at = self.pos;
        if let Some(left) = list_left {
            // One entry of the setup's block list.
            let name = self.counted("a RAM block name")?;
            let length = self.u64("a RAM block length")?;
            if name.is_empty() || !length.is_multiple_of(self.page_size) {
                return Err(self.err(at, K::RamBadBlock(name.to_string())));
            }
            let Some(left) = left.checked_sub(length) else {
                return Err(self.err(at, K::RamBlockListMismatch { left }));
            };
            if self.block_index.insert(name, self.blocks.len()).is_some() {
                return Err(self.err(at, K::RamDuplicateBlock(name.to_string())));
            }
            self.blocks.push((name, length));
            self.state = State::Ram {
                info,
                list_left: (left > 0).then_some(left),
                first: false,
            };
            return Ok(Some(Record::RamBlock {
                offset: at,
                name,
                length,
            }));
        }
        let header = self.u64("a RAM record")?;
        let mask = self.page_size - 1;
        let flags = header & mask;
        let addr = header & !mask;
        let is = |f: u64| flags == f;
        if is(ram_flags::EOS) {
            self.state = State::Footer {
                info,
                end: self.pos,
            };
            return self.step();
        }
        if is(ram_flags::MEM_SIZE) {
            if !(first && info.kind == SectionKind::Start) || self.have_blocks {
                return Err(self.err(at, K::RamUnexpectedBlockList));
            }
            self.have_blocks = true;
            // Each entry takes at least 10 bytes: the list cannot be longer
            // than the input, whatever the total says.
            self.state = State::Ram {
                info,
                list_left: (addr > 0).then_some(addr),
                first: false,
            };
            return self.step();
        }
        let zero = is(ram_flags::ZERO) || is(ram_flags::ZERO | ram_flags::CONTINUE);
        let page = is(ram_flags::PAGE) || is(ram_flags::PAGE | ram_flags::CONTINUE);
        if !zero && !page {
            return Err(self.err(at, K::RamBadFlags(flags)));
        }
        if !self.have_blocks {
            return Err(self.err(at, K::RamNoBlockList));
        }
        let idx = if flags & ram_flags::CONTINUE != 0 {
            self.current_block
                .ok_or_else(|| self.err(at, K::RamContinueWithoutBlock))?
        } else {
            let name_at = self.pos;
            let name = self.counted("a RAM block name")?;
            *self
                .block_index
                .get(name)
                .ok_or_else(|| self.err(name_at, K::RamUnknownBlock(name.to_string())))?
        };
        self.current_block = Some(idx);
        let (block, length) = self.blocks[idx];
        if addr.checked_add(self.page_size).is_none_or(|e| e > length) {
            return Err(self.err(
                at,
                K::RamOffsetOutOfBlock {
                    block: block.to_string(),
                    addr,
                    length,
                },
            ));
        }
        let kind = if zero {
            PageKind::Zero(self.u8("a zero page")?)
        } else {
            PageKind::Normal(self.take(self.page_size as usize, "a RAM page")?)
        };
        self.state = State::Ram {
            info,
            list_left: None,
            first: false,
        };
        Ok(Some(Record::RamPage(RamPage {
            offset: at,
            section_id: info.id,
            block,
            addr,
            kind,
        })))
    }
}

/// A whole stream, read and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedStream<'a> {
    pub configuration: Configuration<'a>,
    /// The RAM section's id, if there was one.
    pub ram_section: Option<u32>,
    pub ram_blocks: Vec<(&'a str, u64)>,
    pub pages: Vec<RamPage<'a>>,
    /// Every section (RAM ones too) as (header, payload).
    pub sections: Vec<(SectionInfo<'a>, &'a [u8])>,
    pub description: Option<Json>,
}

impl<'a> ParsedStream<'a> {
    /// The device (FULL, non-RAM) sections.
    pub fn devices(&self) -> impl Iterator<Item = &(SectionInfo<'a>, &'a [u8])> {
        self.sections
            .iter()
            .filter(|(i, _)| i.kind == SectionKind::Full && i.idstr != RAM_IDSTR)
    }
}

/// Reads a whole stream with `reader`.
pub fn read_all<'a, S: SectionSizer>(
    mut reader: StreamReader<'a, S>,
) -> Result<ParsedStream<'a>, StreamError> {
    let mut configuration = None;
    let mut ram_section = None;
    let mut pages = Vec::new();
    let mut sections = Vec::new();
    let mut description = None;
    while let Some(r) = reader.next_record()? {
        match r {
            Record::Configuration(c) => configuration = Some(c),
            Record::SectionBegin(i) if i.idstr == RAM_IDSTR => ram_section = Some(i.id),
            Record::RamPage(p) => pages.push(p),
            Record::SectionEnd { info, body, .. } => sections.push((info, body)),
            Record::VmDescription { value, .. } => description = Some(value),
            _ => {}
        }
    }
    let configuration = configuration.ok_or(StreamError::new(0, K::ConfigurationMissing))?;
    Ok(ParsedStream {
        configuration,
        ram_section,
        ram_blocks: reader.ram_blocks().to_vec(),
        pages,
        sections,
        description,
    })
}

/// Reads a whole stream, delimiting device sections with its own
/// description.
pub fn read_self_described(data: &[u8]) -> Result<ParsedStream<'_>, StreamError> {
    read_all(StreamReader::self_described(data)?)
}
