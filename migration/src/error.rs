//! Errors of the stream reader and writer.

use crate::channel::ChannelError;
use alloc::string::String;
use core::fmt;
use hv_core::vmstate::{JsonError, VmStateError};

/// The section an error happened in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionRef {
    pub id: u32,
    pub idstr: String,
}

/// Why a stream was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamErrorKind {
    /// The stream ends inside `what`.
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// Not `QEVM`.
    BadMagic(u32),
    /// Stream version other than 3 (2 is QEMU's obsolete format).
    BadVersion(u32),
    /// The configuration section is not the first record.
    ConfigurationMissing,
    /// A configuration section after the first record.
    ConfigurationTwice,
    /// The configuration carries an empty machine name (QEMU accepts it;
    /// Tern does not).
    EmptyMachineName,
    /// A configuration subsection Tern does not know, or a bad value in one.
    BadConfiguration(String),
    /// A top-level type byte QEMU does not define.
    UnknownSectionType(u8),
    /// A known type byte where it cannot be (a subsection marker, a footer
    /// without a section, a description before EOF).
    UnexpectedSectionType(u8),
    /// A section header with a zero-length idstr.
    EmptyIdstr,
    /// A name that is not UTF-8.
    NotUtf8(&'static str),
    /// START or FULL with an id already used.
    DuplicateSectionId(u32),
    /// A second FULL section for the same (idstr, instance).
    DuplicateDevice {
        idstr: String,
        instance: u32,
    },
    /// PART or END for an id no START opened.
    UnknownSectionId(u32),
    /// PART or END after the section's END, or for a FULL section.
    SectionClosed(u32),
    /// The byte after a section body is not the footer marker.
    MissingFooter {
        got: u8,
    },
    /// The footer names another section.
    FooterMismatch {
        expected: u32,
        got: u32,
    },
    /// The RAM section is not instance 0, version 4.
    RamHeader {
        instance: u32,
        version: u32,
    },
    /// A RAM record's flags are not a combination QEMU 7.2 writes.
    RamBadFlags(u64),
    /// The block list outside the first record of a RAM START, or twice.
    RamUnexpectedBlockList,
    /// A page before any block list.
    RamNoBlockList,
    /// A block longer than what is `left` of the announced total.
    RamBlockListMismatch {
        left: u64,
    },
    /// An empty block name, or a block length that is not page-aligned.
    RamBadBlock(String),
    RamDuplicateBlock(String),
    RamUnknownBlock(String),
    /// CONTINUE with no block named before.
    RamContinueWithoutBlock,
    RamOffsetOutOfBlock {
        block: String,
        addr: u64,
        length: u64,
    },
    /// No description for a section whose body must be walked to be
    /// delimited.
    NoDescription,
    /// The description's version differs from the section header's.
    DescriptionVersion {
        desc: u32,
        header: u32,
    },
    /// The body does not follow its description (offset of the inner error
    /// is relative to the body; the stream offset is in [`StreamError`]).
    Body(VmStateError),
    /// The description record is not the vmdesc QEMU writes.
    BadDescription(String),
    Json(JsonError),
    /// The description record's length disagrees with the bytes left.
    DescriptionLength {
        declared: u64,
        left: u64,
    },
    /// Bytes after EOF that are not a description record.
    TrailingData,
}

/// A refused stream: what, where (byte offset in the stream) and in which
/// section.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamError {
    pub offset: usize,
    pub section: Option<SectionRef>,
    pub kind: StreamErrorKind,
}

impl StreamError {
    pub fn new(offset: usize, kind: StreamErrorKind) -> Self {
        Self {
            offset,
            section: None,
            kind,
        }
    }
}

impl fmt::Display for StreamErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StreamErrorKind::*;
        match self {
            Truncated { what, need, have } => {
                write!(
                    f,
                    "stream ends inside {what} ({need} bytes needed, {have} left)"
                )
            }
            BadMagic(m) => write!(f, "not a migration stream (magic {m:#010x})"),
            BadVersion(2) => f.write_str("stream version 2 is obsolete"),
            BadVersion(v) => write!(f, "unsupported stream version {v}"),
            ConfigurationMissing => f.write_str("configuration section missing"),
            ConfigurationTwice => f.write_str("second configuration section"),
            EmptyMachineName => f.write_str("empty machine name in configuration"),
            BadConfiguration(m) => write!(f, "bad configuration: {m}"),
            UnknownSectionType(t) => write!(f, "unknown section type {t:#04x}"),
            UnexpectedSectionType(t) => write!(f, "section type {t:#04x} not allowed here"),
            EmptyIdstr => f.write_str("empty section idstr"),
            NotUtf8(what) => write!(f, "{what} is not UTF-8"),
            DuplicateSectionId(id) => write!(f, "section id {id} used twice"),
            DuplicateDevice { idstr, instance } => {
                write!(f, "device section {idstr:?} instance {instance} sent twice")
            }
            UnknownSectionId(id) => write!(f, "unknown section id {id}"),
            SectionClosed(id) => write!(f, "section {id} is closed"),
            MissingFooter { got } => write!(f, "missing section footer (got {got:#04x})"),
            FooterMismatch { expected, got } => {
                write!(f, "footer names section {got}, expected {expected}")
            }
            RamHeader { instance, version } => {
                write!(
                    f,
                    "RAM section instance {instance} version {version} (want 0, 4)"
                )
            }
            RamBadFlags(fl) => write!(f, "RAM record flags {fl:#x} not supported"),
            RamUnexpectedBlockList => f.write_str("RAM block list not allowed here"),
            RamNoBlockList => f.write_str("RAM page before the block list"),
            RamBlockListMismatch { left } => {
                write!(
                    f,
                    "RAM block longer than the {left:#x} bytes left of the total"
                )
            }
            RamBadBlock(m) => write!(f, "bad RAM block: {m}"),
            RamDuplicateBlock(n) => write!(f, "RAM block {n:?} listed twice"),
            RamUnknownBlock(n) => write!(f, "unknown RAM block {n:?}"),
            RamContinueWithoutBlock => f.write_str("RAM CONTINUE with no current block"),
            RamOffsetOutOfBlock {
                block,
                addr,
                length,
            } => write!(
                f,
                "RAM page {addr:#x} outside block {block:?} of {length:#x} bytes"
            ),
            NoDescription => f.write_str("no description to delimit the section body"),
            DescriptionVersion { desc, header } => {
                write!(f, "description version {desc} but section version {header}")
            }
            Body(e) => write!(f, "body: {e}"),
            BadDescription(m) => write!(f, "bad description record: {m}"),
            Json(e) => write!(f, "{e}"),
            DescriptionLength { declared, left } => {
                write!(f, "description record of {declared} bytes, {left} left")
            }
            TrailingData => f.write_str("data after EOF that is not a description"),
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {:#x}", self.offset)?;
        if let Some(s) = &self.section {
            write!(f, " in section {} ({:?})", s.id, s.idstr)?;
        }
        write!(f, ": {}", self.kind)
    }
}

/// Why a stream could not be written.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteError {
    Channel(ChannelError),
    /// A device's save failed.
    State {
        idstr: String,
        error: VmStateError,
    },
    DuplicateSectionId(u32),
    /// An idstr or block name that is empty or longer than 255 bytes.
    BadName(String),
    /// A machine name that is empty or does not fit.
    BadMachineName,
    /// A RAM block length that is not page-aligned, or lengths that
    /// overflow.
    BadBlockLength {
        name: String,
        length: u64,
    },
    UnknownBlock(String),
    /// A page outside its block, not page-aligned, or of the wrong size.
    BadPage {
        block: String,
        addr: u64,
    },
    /// RAM calls out of order (pages outside a PART/END, a second setup...).
    RamOrder(&'static str),
    /// A description that is not a JSON object.
    BadDescription,
}

impl From<ChannelError> for WriteError {
    fn from(e: ChannelError) -> Self {
        WriteError::Channel(e)
    }
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Channel(e) => write!(f, "{e}"),
            Self::State { idstr, error } => write!(f, "saving {idstr:?}: {error}"),
            Self::DuplicateSectionId(id) => write!(f, "section id {id} used twice"),
            Self::BadName(n) => write!(f, "bad name {n:?} (1..=255 bytes)"),
            Self::BadMachineName => f.write_str("bad machine name"),
            Self::BadBlockLength { name, length } => {
                write!(
                    f,
                    "RAM block {name:?} length {length:#x} is not page-aligned"
                )
            }
            Self::UnknownBlock(n) => write!(f, "unknown RAM block {n:?}"),
            Self::BadPage { block, addr } => write!(f, "bad page {addr:#x} of block {block:?}"),
            Self::RamOrder(m) => write!(f, "RAM out of order: {m}"),
            Self::BadDescription => f.write_str("description is not a JSON object"),
        }
    }
}
