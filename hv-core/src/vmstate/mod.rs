//! VMState: one description of a device's migratable state gives its save,
//! its load and its wire description, encoded exactly as QEMU's vmstate
//! (`migration/vmstate.c`, `vmstate-types.c`; see QEMU's
//! `docs/devel/migration/main.rst`).
//!
//! A device state is a plain struct declared with [`vmstate!`](crate::vmstate!),
//! which implements [`VmState`] for it from the field list:
//!
//! ```
//! use hv_core::vmstate;
//! use hv_core::vmstate::{load, save, VmStateHooks};
//!
//! vmstate! {
//!     /// One queue of the example device.
//!     #[derive(Clone, Debug, PartialEq)]
//!     pub struct QueueState as "example-queue", version 1, minimum 1 {
//!         pub head: u16,
//!         pub tail: u16,
//!     }
//! }
//!
//! vmstate! {
//!     /// Sent only when the FIFO is enabled.
//!     #[derive(Clone, Debug, PartialEq)]
//!     pub struct FifoState as "example/fifo", version 1, minimum 1 {
//!         pub level: u8,
//!     }
//! }
//!
//! vmstate! {
//!     #[derive(Clone, Debug, PartialEq)]
//!     pub struct ExampleState as "example", version 3, minimum 2, hooks {
//!         pub divider: u16,
//!         pub enabled: bool,
//!         pub fifo: [u8; 16],                   // array of uint8
//!         pub cmos: [u8; 8] [buffer],           // the same bytes, described as a buffer
//!         pub timer: u64 [since 3],             // absent in version-2 streams
//!         pub num_queues: u16,
//!         pub queues: Vec<QueueState> [count = num_queues, max = 64],
//!         pub buf_len: u32,
//!         pub buf: Vec<u8> [len = buf_len, max = 4096],
//!     }
//!     subsections {
//!         pub fifo_state: Option<FifoState>,
//!     }
//! }
//!
//! impl VmStateHooks for ExampleState {
//!     fn post_load(&mut self, _version: u32) -> Result<(), String> {
//!         if self.divider == 0 { Err("divider 0".into()) } else { Ok(()) }
//!     }
//! }
//!
//! let mut s = ExampleState {
//!     divider: 12, enabled: true, fifo: [0; 16], cmos: [7; 8], timer: 99,
//!     num_queues: 1, queues: vec![QueueState { head: 1, tail: 2 }],
//!     buf_len: 2, buf: vec![0xaa, 0xbb], fifo_state: None,
//! };
//! let bytes = save(&mut s).unwrap();
//! assert_eq!(load::<ExampleState>(&bytes, 3).unwrap(), s);
//! ```
//!
//! Syntax: `vmstate! { <attrs> <vis> struct Name as "vmsd-name", version V,
//! minimum M [, hooks] { <fields> } [subsections { <subsections> }] }`.
//! A field is `<attrs> <vis> name: Type [options]`; the options in brackets
//! are optional and comma-separated:
//!
//! | field | wire | description type |
//! |---|---|---|
//! | `x: u8`/`u16`/`u32`/`u64`/`i8`..`i64` | big-endian | `uint8`...`int64` |
//! | `x: bool` | one byte, 0 or 1 (anything else fails the load) | `bool` |
//! | `x: Nested` (a `vmstate!` struct) | its body inline (fields + subsections), no version | `struct` |
//! | `x: [T; N]` (T one of the above) | N elements back to back | `array_len` N (or `index` per element) |
//! | `x: Vec<T> [count = c]` | `c` elements; `c` is an earlier integer field | as arrays |
//! | `x: [u8; N] [buffer]` | N raw bytes | `buffer` |
//! | `x: Vec<u8> [len = c]` | `c` raw bytes (QEMU `VMSTATE_VBUFFER`) | `buffer` |
//!
//! Options: `since N` (the field exists from version N on; older streams
//! leave it at its empty value), `count = field` / `len = field` (see the
//! table), `max = E` (the largest count or length a load accepts; without it
//! the bytes left in the section bound it), `buffer`.
//!
//! Subsections are `name: Option<Sub>` where `Sub` is a `vmstate!` struct
//! whose vmsd name is `"<parent>/<child>"` (checked at compile time). After
//! the fields, each subsection that is `Some` and whose
//! [`VmStateHooks::needed`] says so is written as QEMU does: byte `0x05`,
//! counted name, be32 version, body. Loading follows QEMU's peek rule (a
//! `0x05` with a name that starts with the parent's name is ours; an unknown
//! one of ours fails), accepts subsections in any order, and refuses one
//! sent twice.
//!
//! Loading is all or nothing: [`load`] decodes into a fresh value, checks
//! versions, counts, booleans and that the section has no trailing bytes,
//! runs [`VmStateHooks::post_load`] (whose error fails the load), and only
//! then returns the value. Errors ([`VmStateError`]) carry the field path
//! and the byte offset inside the section.
//!
//! The description ([`StructDesc`], serialised by [`StructDesc::to_json`])
//! is QEMU's vmdesc: it is produced while saving, because as in QEMU it
//! records what was actually written (counts, subsections sent, sizes).
//!
//! This module depends on no other part of hv-core, so device models and
//! the `migration` crate can both use it.

pub mod json;
mod macros;
#[cfg(test)]
mod tests;

pub use json::{Json, JsonError};

#[doc(hidden)]
pub use alloc::vec::Vec as __Vec;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// QEMU's subsection marker byte (`QEMU_VM_SUBSECTION`).
pub const SUBSECTION_MARKER: u8 = 0x05;

// ---------------------------------------------------------------------------
// Descriptions (QEMU's vmdesc JSON)

/// How a field entry of a description stands for an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrayMark {
    /// One element.
    Single,
    /// A compressed array: this entry describes element 0 of `n` alike
    /// ones (`"array_len": n`).
    Len(u64),
    /// One element of an array that cannot be compressed (`"index": i`).
    Index(u64),
}

/// A nested description inside a field entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nested {
    None,
    /// `"type": "struct"` with a `"struct": {...}` object.
    Struct(StructDesc),
    /// QEMU's `tmp` style: `vmsd_name`/`version`/`fields` written into the
    /// field entry itself.
    Inline(StructDesc),
}

/// One entry of a description's `fields` array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldDesc {
    pub name: String,
    pub array: ArrayMark,
    /// QEMU's type name (`uint32`, `struct`, `buffer`, ...).
    pub ty: String,
    pub nested: Nested,
    /// Bytes written for one element.
    pub size: u64,
}

/// A vmsd's description: what QEMU writes for a section body, a nested
/// struct or a subsection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructDesc {
    pub vmsd_name: String,
    pub version: u32,
    pub fields: Vec<FieldDesc>,
    /// The subsections that were sent, in order (absent from the JSON when
    /// empty).
    pub subsections: Vec<StructDesc>,
}

impl StructDesc {
    /// The keys QEMU writes for a vmsd, in its order: `vmsd_name`,
    /// `version`, `fields`, then `subsections` if any were sent.
    pub fn json_pairs(&self) -> Vec<(String, Json)> {
        let mut v = alloc::vec![
            ("vmsd_name".to_string(), Json::Str(self.vmsd_name.clone())),
            ("version".to_string(), Json::Int(self.version.into())),
            (
                "fields".to_string(),
                Json::Array(self.fields.iter().map(FieldDesc::to_json).collect()),
            ),
        ];
        if !self.subsections.is_empty() {
            v.push((
                "subsections".to_string(),
                Json::Array(self.subsections.iter().map(StructDesc::to_json).collect()),
            ));
        }
        v
    }

    pub fn to_json(&self) -> Json {
        Json::Object(self.json_pairs())
    }

    /// Reads a description. `vmsd_name` and `version` may be absent (QEMU's
    /// old-style sections have neither); `fields` is required.
    pub fn from_json(j: &Json) -> Result<StructDesc, &'static str> {
        if j.as_object().is_none() {
            return Err("description is not an object");
        }
        let vmsd_name = match j.get("vmsd_name") {
            None => String::new(),
            Some(v) => v.as_str().ok_or("vmsd_name is not a string")?.to_string(),
        };
        let version = match j.get("version") {
            None => 0,
            Some(v) => v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or("version is not a 32-bit number")?,
        };
        let fields = j
            .get("fields")
            .ok_or("description has no fields")?
            .as_array()
            .ok_or("fields is not an array")?
            .iter()
            .map(FieldDesc::from_json)
            .collect::<Result<Vec<_>, _>>()?;
        let subsections = match j.get("subsections") {
            None => Vec::new(),
            Some(s) => s
                .as_array()
                .ok_or("subsections is not an array")?
                .iter()
                .map(StructDesc::from_json)
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(StructDesc {
            vmsd_name,
            version,
            fields,
            subsections,
        })
    }
}

impl FieldDesc {
    /// QEMU's key order: `name`, `array_len`/`index`, `type`, `struct`
    /// (or the inline vmsd keys), `size`.
    pub fn to_json(&self) -> Json {
        let mut v = alloc::vec![("name".to_string(), Json::Str(self.name.clone()))];
        match self.array {
            ArrayMark::Single => {}
            ArrayMark::Len(n) => v.push(("array_len".to_string(), Json::Int(n.into()))),
            ArrayMark::Index(i) => v.push(("index".to_string(), Json::Int(i.into()))),
        }
        v.push(("type".to_string(), Json::Str(self.ty.clone())));
        match &self.nested {
            Nested::None => {}
            Nested::Struct(s) => v.push(("struct".to_string(), s.to_json())),
            Nested::Inline(s) => v.extend(s.json_pairs()),
        }
        v.push(("size".to_string(), Json::Int(self.size.into())));
        Json::Object(v)
    }

    pub fn from_json(j: &Json) -> Result<FieldDesc, &'static str> {
        let name = j
            .get("name")
            .and_then(Json::as_str)
            .ok_or("field without a name")?
            .to_string();
        let ty = j
            .get("type")
            .and_then(Json::as_str)
            .ok_or("field without a type")?
            .to_string();
        let size = j
            .get("size")
            .and_then(Json::as_u64)
            .ok_or("field without a size")?;
        let array = match (j.get("array_len"), j.get("index")) {
            (None, None) => ArrayMark::Single,
            (Some(n), None) => ArrayMark::Len(n.as_u64().ok_or("bad array_len")?),
            (None, Some(i)) => ArrayMark::Index(i.as_u64().ok_or("bad index")?),
            (Some(_), Some(_)) => return Err("field with both array_len and index"),
        };
        let nested = if let Some(s) = j.get("struct") {
            Nested::Struct(StructDesc::from_json(s)?)
        } else if j.get("fields").is_some() {
            Nested::Inline(StructDesc::from_json(j)?)
        } else {
            Nested::None
        };
        Ok(FieldDesc {
            name,
            array,
            ty,
            nested,
            size,
        })
    }
}

// ---------------------------------------------------------------------------
// Errors

/// One step of the path to the field an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSeg {
    Field(String),
    Index(u64),
    Subsection(String),
}

/// What went wrong while encoding or decoding a state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes end before the field does.
    Truncated { need: u64, have: u64 },
    /// Bytes are left after the last field and subsection.
    Trailing { bytes: u64 },
    /// A `bool` byte other than 0 or 1.
    BadBool(u8),
    /// The stream's version is newer than this build knows.
    VersionTooNew { name: String, got: u32, max: u32 },
    /// The stream's version is older than this build still reads.
    VersionTooOld { name: String, got: u32, min: u32 },
    /// A count or length field above the declared maximum.
    CountTooLarge { count: u64, max: u64 },
    /// A signed count or length field below zero.
    NegativeCount(i64),
    /// On save: the count field disagrees with the array's length.
    CountMismatch { count: u64, len: u64 },
    /// A subsection with our prefix that this state does not have.
    UnknownSubsection(String),
    /// The same subsection twice.
    DuplicateSubsection(String),
    /// A `pre_save` or `post_load` hook refused the state.
    Hook(String),
    /// A description that cannot be followed (walkers of foreign
    /// descriptions).
    Description(String),
}

/// An error with the byte offset (inside the section body) and the field
/// path where it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStateError {
    /// Byte offset inside the section body (or the buffer being decoded).
    pub offset: usize,
    /// Innermost segment first.
    path: Vec<PathSeg>,
    pub kind: ErrorKind,
}

impl VmStateError {
    pub fn new(offset: usize, kind: ErrorKind) -> Self {
        Self {
            offset,
            path: Vec::new(),
            kind,
        }
    }

    /// Adds an outer field name to the path.
    pub fn in_field(mut self, name: &str) -> Self {
        self.path.push(PathSeg::Field(name.to_string()));
        self
    }

    /// Adds an outer array index to the path.
    pub fn in_index(mut self, i: u64) -> Self {
        self.path.push(PathSeg::Index(i));
        self
    }

    /// Adds an outer subsection to the path.
    pub fn in_subsection(mut self, name: &str) -> Self {
        self.path.push(PathSeg::Subsection(name.to_string()));
        self
    }

    /// The path, outermost first.
    pub fn path(&self) -> impl Iterator<Item = &PathSeg> {
        self.path.iter().rev()
    }

    /// The path as text: `queues[2].head`, `example/fifo:level`.
    pub fn path_string(&self) -> String {
        let mut s = String::new();
        for seg in self.path() {
            match seg {
                PathSeg::Field(f) => {
                    if !s.is_empty() && !s.ends_with(':') {
                        s.push('.');
                    }
                    s.push_str(f);
                }
                PathSeg::Index(i) => {
                    let _ = fmt::Write::write_fmt(&mut s, format_args!("[{i}]"));
                }
                PathSeg::Subsection(n) => {
                    if !s.is_empty() {
                        s.push(' ');
                    }
                    s.push_str(n);
                    s.push(':');
                }
            }
        }
        s
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { need, have } => {
                write!(f, "truncated: {need} bytes needed, {have} left")
            }
            Self::Trailing { bytes } => write!(f, "{bytes} trailing bytes"),
            Self::BadBool(b) => write!(f, "bool byte {b:#04x} is neither 0 nor 1"),
            Self::VersionTooNew { name, got, max } => {
                write!(f, "{name}: version {got} is too new (newest {max})")
            }
            Self::VersionTooOld { name, got, min } => {
                write!(f, "{name}: version {got} is too old (oldest {min})")
            }
            Self::CountTooLarge { count, max } => write!(f, "count {count} above maximum {max}"),
            Self::NegativeCount(c) => write!(f, "negative count {c}"),
            Self::CountMismatch { count, len } => {
                write!(f, "count field says {count} but the array has {len}")
            }
            Self::UnknownSubsection(n) => write!(f, "unknown subsection {n:?}"),
            Self::DuplicateSubsection(n) => write!(f, "subsection {n:?} sent twice"),
            Self::Hook(m) => write!(f, "refused: {m}"),
            Self::Description(m) => write!(f, "description: {m}"),
        }
    }
}

impl fmt::Display for VmStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path_string();
        if path.is_empty() {
            write!(f, "{} at offset {:#x}", self.kind, self.offset)
        } else {
            write!(f, "{path}: {} at offset {:#x}", self.kind, self.offset)
        }
    }
}

// ---------------------------------------------------------------------------
// Byte encoder and decoder

/// Collects a body's bytes (and, if asked, its description).
pub struct Encoder {
    buf: Vec<u8>,
    describe: bool,
}

impl Encoder {
    /// `describe`: whether saves build their [`StructDesc`].
    pub fn new(describe: bool) -> Self {
        Self {
            buf: Vec::new(),
            describe,
        }
    }

    pub fn describing(&self) -> bool {
        self.describe
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// A cursor over a section body that refuses to read past its end.
/// Offsets are from the start of the body.
pub struct Decoder<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    /// Current offset.
    pub fn pos(&self) -> usize {
        self.at
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], VmStateError> {
        match self.peek(0, n) {
            Some(b) => {
                self.at += n;
                Ok(b)
            }
            None => Err(VmStateError::new(
                self.at,
                ErrorKind::Truncated {
                    need: n as u64,
                    have: self.remaining() as u64,
                },
            )),
        }
    }

    /// `n` bytes at `skip` bytes ahead, without moving.
    pub fn peek(&self, skip: usize, n: usize) -> Option<&'a [u8]> {
        let start = self.at.checked_add(skip)?;
        self.data.get(start..start.checked_add(n)?)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], VmStateError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, VmStateError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, VmStateError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, VmStateError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, VmStateError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), VmStateError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(VmStateError::new(
                self.at,
                ErrorKind::Trailing { bytes: n as u64 },
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Traits

/// Hooks a state may override (all have defaults). Without `hooks` in its
/// [`vmstate!`](crate::vmstate!) header, a state gets the defaults.
pub trait VmStateHooks {
    /// Before the state is written (QEMU `pre_save`): may bring derived
    /// fields up to date; an error fails the save.
    fn pre_save(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// After the state (fields and subsections) was decoded from a stream of
    /// `version` (QEMU `post_load`): may check invariants between fields;
    /// an error fails the load.
    fn post_load(&mut self, _version: u32) -> Result<(), String> {
        Ok(())
    }
    /// For a state used as a subsection: whether to send it (QEMU
    /// `needed`); only asked when the parent's `Option` is `Some`.
    fn needed(&self) -> bool {
        true
    }
}

/// Something that is one element of a field: a scalar or a nested state.
pub trait VmElem: Sized {
    /// QEMU's type name for the description.
    const TYPE_NAME: &'static str;
    /// The fewest bytes one element takes on the wire.
    const MIN_SIZE: usize;
    /// QEMU's `vmsd_can_compress`: arrays of it are described by element 0.
    const COMPRESSIBLE: bool;
    /// The value of a field a stream did not carry.
    fn elem_empty() -> Self;
    /// Writes the element; returns its nested description when describing.
    fn save_elem(&mut self, enc: &mut Encoder) -> Result<Option<StructDesc>, VmStateError>;
    fn load_elem(dec: &mut Decoder<'_>) -> Result<Self, VmStateError>;
}

/// The type of a field without options: one element or a fixed array.
pub trait VmValue: Sized {
    const MIN_SIZE: usize;
    const COMPRESSIBLE: bool;
    /// The value of a field a stream did not carry.
    fn value_empty() -> Self;
    /// Writes the field and appends its description entries.
    fn save_value(
        &mut self,
        enc: &mut Encoder,
        name: &str,
        descs: &mut Vec<FieldDesc>,
    ) -> Result<(), VmStateError>;
    fn load_value(dec: &mut Decoder<'_>) -> Result<Self, VmStateError>;
}

/// A state made by [`vmstate!`](crate::vmstate!). Use [`save`],
/// [`save_described`] and [`load`] rather than these methods.
pub trait VmState: VmStateHooks + Sized {
    /// QEMU's vmsd name.
    const NAME: &'static str;
    /// The version this build writes (and the newest it reads).
    const VERSION: u32;
    /// The oldest version this build reads.
    const MINIMUM: u32;
    /// The fewest bytes the body takes at [`Self::VERSION`].
    const MIN_SIZE: usize;
    /// Whether arrays of it may be described by element 0 (no subsections,
    /// recursively).
    const COMPRESSIBLE: bool;
    /// A value with every field empty (zeros, empty vectors, no
    /// subsections).
    fn empty() -> Self;
    /// Writes the fields (not the subsections).
    fn save_fields(
        &mut self,
        enc: &mut Encoder,
        descs: &mut Vec<FieldDesc>,
    ) -> Result<(), VmStateError>;
    /// Writes the subsections that are `Some` and needed.
    fn save_subsections(
        &mut self,
        enc: &mut Encoder,
        descs: &mut Vec<StructDesc>,
    ) -> Result<(), VmStateError>;
    /// Decodes the fields of a `version` body into a fresh value.
    fn load_fields(dec: &mut Decoder<'_>, version: u32) -> Result<Self, VmStateError>;
    /// Decodes the subsection `name` (its version and body follow in
    /// `dec`); `Ok(false)` if this state has no such subsection.
    fn load_subsection(&mut self, name: &[u8], dec: &mut Decoder<'_>)
        -> Result<bool, VmStateError>;
}

/// The type of a counted field (`Vec<T> [count = c]`).
pub trait VmCounted {
    const COMPRESSIBLE: bool;
}

impl<T: VmElem> VmCounted for Vec<T> {
    const COMPRESSIBLE: bool = T::COMPRESSIBLE;
}

/// Whether a field that exists from version `since` is in a body of
/// `version`.
pub const fn field_present(version: u32, since: u32) -> bool {
    since <= version
}

/// An integer field used as a count or length.
pub trait VmCount {
    /// The value, or `Err` with the value if it is negative.
    fn to_count(&self) -> Result<u64, i64>;
}

macro_rules! count_impls {
    (unsigned: $($u:ty),*; signed: $($s:ty),*) => {
        $(impl VmCount for $u {
            fn to_count(&self) -> Result<u64, i64> {
                Ok(u64::from(*self))
            }
        })*
        $(impl VmCount for $s {
            fn to_count(&self) -> Result<u64, i64> {
                u64::try_from(*self).map_err(|_| i64::from(*self))
            }
        })*
    };
}
count_impls!(unsigned: u8, u16, u32, u64; signed: i8, i16, i32, i64);

macro_rules! scalar_impls {
    ($($t:ty, $name:literal, $n:literal;)*) => {$(
        impl VmElem for $t {
            const TYPE_NAME: &'static str = $name;
            const MIN_SIZE: usize = $n;
            const COMPRESSIBLE: bool = true;
            fn elem_empty() -> Self {
                0
            }
            fn save_elem(&mut self, enc: &mut Encoder) -> Result<Option<StructDesc>, VmStateError> {
                enc.bytes(&self.to_be_bytes());
                Ok(None)
            }
            fn load_elem(dec: &mut Decoder<'_>) -> Result<Self, VmStateError> {
                let mut a = [0u8; $n];
                a.copy_from_slice(dec.take($n)?);
                Ok(<$t>::from_be_bytes(a))
            }
        }
        scalar_value!($t);
    )*};
}

macro_rules! scalar_value {
    ($t:ty) => {
        impl VmValue for $t {
            const MIN_SIZE: usize = <$t as VmElem>::MIN_SIZE;
            const COMPRESSIBLE: bool = true;
            fn value_empty() -> Self {
                <$t as VmElem>::elem_empty()
            }
            fn save_value(
                &mut self,
                enc: &mut Encoder,
                name: &str,
                descs: &mut Vec<FieldDesc>,
            ) -> Result<(), VmStateError> {
                save_elems(core::slice::from_mut(self), enc, name, descs, false)
            }
            fn load_value(dec: &mut Decoder<'_>) -> Result<Self, VmStateError> {
                <$t as VmElem>::load_elem(dec)
            }
        }
    };
}

scalar_impls! {
    u8, "uint8", 1;
    u16, "uint16", 2;
    u32, "uint32", 4;
    u64, "uint64", 8;
    i8, "int8", 1;
    i16, "int16", 2;
    i32, "int32", 4;
    i64, "int64", 8;
}

impl VmElem for bool {
    const TYPE_NAME: &'static str = "bool";
    const MIN_SIZE: usize = 1;
    const COMPRESSIBLE: bool = true;
    fn elem_empty() -> Self {
        false
    }
    fn save_elem(&mut self, enc: &mut Encoder) -> Result<Option<StructDesc>, VmStateError> {
        enc.u8(u8::from(*self));
        Ok(None)
    }
    fn load_elem(dec: &mut Decoder<'_>) -> Result<Self, VmStateError> {
        let at = dec.pos();
        match dec.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(VmStateError::new(at, ErrorKind::BadBool(b))),
        }
    }
}
scalar_value!(bool);

impl<T: VmElem, const N: usize> VmValue for [T; N] {
    const MIN_SIZE: usize = N * T::MIN_SIZE;
    const COMPRESSIBLE: bool = T::COMPRESSIBLE;
    fn value_empty() -> Self {
        core::array::from_fn(|_| T::elem_empty())
    }
    fn save_value(
        &mut self,
        enc: &mut Encoder,
        name: &str,
        descs: &mut Vec<FieldDesc>,
    ) -> Result<(), VmStateError> {
        save_elems(self, enc, name, descs, true)
    }
    fn load_value(dec: &mut Decoder<'_>) -> Result<Self, VmStateError> {
        let mut v = Vec::new();
        for i in 0..N {
            v.push(T::load_elem(dec).map_err(|e| e.in_index(i as u64))?);
        }
        // The loop pushed exactly N elements.
        v.try_into()
            .map_err(|_| VmStateError::new(dec.pos(), ErrorKind::Description("array".into())))
    }
}

// ---------------------------------------------------------------------------
// Building blocks the macro expands to

/// Writes `elems` as one field and describes it as QEMU does: one entry
/// with `array_len` for compressible arrays (none for an empty one), one
/// entry per element with `index` otherwise.
/// `indexed`: whether errors name the element index (arrays) or not (a
/// single value).
pub fn save_elems<T: VmElem>(
    elems: &mut [T],
    enc: &mut Encoder,
    name: &str,
    descs: &mut Vec<FieldDesc>,
    indexed: bool,
) -> Result<(), VmStateError> {
    let n = elems.len() as u64;
    for (i, e) in elems.iter_mut().enumerate() {
        let start = enc.len();
        let nested =
            e.save_elem(enc)
                .map_err(|err| if indexed { err.in_index(i as u64) } else { err })?;
        if enc.describing() && (i == 0 || !T::COMPRESSIBLE) {
            let array = match (n > 1, T::COMPRESSIBLE) {
                (false, _) => ArrayMark::Single,
                (true, true) => ArrayMark::Len(n),
                (true, false) => ArrayMark::Index(i as u64),
            };
            descs.push(FieldDesc {
                name: name.to_string(),
                array,
                ty: T::TYPE_NAME.to_string(),
                nested: nested.map_or(Nested::None, Nested::Struct),
                size: (enc.len() - start) as u64,
            });
        }
    }
    Ok(())
}

/// The count a count/length field holds.
pub fn count_value<C: VmCount>(c: &C, at: usize) -> Result<u64, VmStateError> {
    c.to_count()
        .map_err(|v| VmStateError::new(at, ErrorKind::NegativeCount(v)))
}

fn check_max(count: u64, max: Option<u64>, at: usize) -> Result<(), VmStateError> {
    match max {
        Some(m) if count > m => Err(VmStateError::new(
            at,
            ErrorKind::CountTooLarge { count, max: m },
        )),
        _ => Ok(()),
    }
}

/// Saves a counted array (`[count = c]`), whose length must equal the
/// count field.
pub fn save_counted<T: VmElem, C: VmCount>(
    elems: &mut [T],
    count: &C,
    max: Option<u64>,
    enc: &mut Encoder,
    name: &str,
    descs: &mut Vec<FieldDesc>,
) -> Result<(), VmStateError> {
    let n = count_value(count, enc.len())?;
    check_max(n, max, enc.len())?;
    if n != elems.len() as u64 {
        return Err(VmStateError::new(
            enc.len(),
            ErrorKind::CountMismatch {
                count: n,
                len: elems.len() as u64,
            },
        ));
    }
    save_elems(elems, enc, name, descs, true)
}

/// Loads a counted array; the count is checked against `max` and the bytes
/// left before anything is allocated.
pub fn load_counted<T: VmElem, C: VmCount>(
    dec: &mut Decoder<'_>,
    count: &C,
    max: Option<u64>,
) -> Result<Vec<T>, VmStateError> {
    let at = dec.pos();
    let n = count_value(count, at)?;
    check_max(n, max, at)?;
    let need = n.saturating_mul(T::MIN_SIZE as u64);
    if need > dec.remaining() as u64 || n > dec.remaining() as u64 {
        return Err(VmStateError::new(
            at,
            ErrorKind::Truncated {
                need: need.max(n),
                have: dec.remaining() as u64,
            },
        ));
    }
    let mut v = Vec::new();
    for i in 0..n {
        v.push(T::load_elem(dec).map_err(|e| e.in_index(i))?);
    }
    Ok(v)
}

fn buffer_desc(enc: &Encoder, name: &str, size: usize, descs: &mut Vec<FieldDesc>) {
    if enc.describing() {
        descs.push(FieldDesc {
            name: name.to_string(),
            array: ArrayMark::Single,
            ty: "buffer".to_string(),
            nested: Nested::None,
            size: size as u64,
        });
    }
}

/// Saves a fixed buffer (`[u8; N] [buffer]`).
pub fn save_buffer(bytes: &[u8], enc: &mut Encoder, name: &str, descs: &mut Vec<FieldDesc>) {
    enc.bytes(bytes);
    buffer_desc(enc, name, bytes.len(), descs);
}

pub fn load_buffer<const N: usize>(dec: &mut Decoder<'_>) -> Result<[u8; N], VmStateError> {
    let mut a = [0u8; N];
    a.copy_from_slice(dec.take(N)?);
    Ok(a)
}

/// Saves a buffer whose length is another field (`Vec<u8> [len = c]`).
pub fn save_vbuffer<C: VmCount>(
    bytes: &[u8],
    len: &C,
    max: Option<u64>,
    enc: &mut Encoder,
    name: &str,
    descs: &mut Vec<FieldDesc>,
) -> Result<(), VmStateError> {
    let n = count_value(len, enc.len())?;
    check_max(n, max, enc.len())?;
    if n != bytes.len() as u64 {
        return Err(VmStateError::new(
            enc.len(),
            ErrorKind::CountMismatch {
                count: n,
                len: bytes.len() as u64,
            },
        ));
    }
    save_buffer(bytes, enc, name, descs);
    Ok(())
}

pub fn load_vbuffer<C: VmCount>(
    dec: &mut Decoder<'_>,
    len: &C,
    max: Option<u64>,
) -> Result<Vec<u8>, VmStateError> {
    let at = dec.pos();
    let n = count_value(len, at)?;
    check_max(n, max, at)?;
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    Ok(dec.take(n)?.to_vec())
}

/// Checks a stream's version of `T` against what this build reads.
pub fn check_version<T: VmState>(version: u32, at: usize) -> Result<(), VmStateError> {
    if version > T::VERSION {
        Err(VmStateError::new(
            at,
            ErrorKind::VersionTooNew {
                name: T::NAME.to_string(),
                got: version,
                max: T::VERSION,
            },
        ))
    } else if version < T::MINIMUM {
        Err(VmStateError::new(
            at,
            ErrorKind::VersionTooOld {
                name: T::NAME.to_string(),
                got: version,
                min: T::MINIMUM,
            },
        ))
    } else {
        Ok(())
    }
}

/// Writes a body (pre_save, fields, subsections) at `T::VERSION`.
pub fn save_body<T: VmState>(
    v: &mut T,
    enc: &mut Encoder,
) -> Result<Option<StructDesc>, VmStateError> {
    v.pre_save()
        .map_err(|m| VmStateError::new(enc.len(), ErrorKind::Hook(m)))?;
    let mut fields = Vec::new();
    v.save_fields(enc, &mut fields)?;
    let mut subsections = Vec::new();
    v.save_subsections(enc, &mut subsections)?;
    Ok(enc.describing().then(|| StructDesc {
        vmsd_name: T::NAME.to_string(),
        version: T::VERSION,
        fields,
        subsections,
    }))
}

/// Writes subsection `sub` if it is `Some` and needed.
pub fn save_subsection<S: VmState>(
    sub: &mut Option<S>,
    enc: &mut Encoder,
    descs: &mut Vec<StructDesc>,
) -> Result<(), VmStateError> {
    let Some(s) = sub.as_mut() else {
        return Ok(());
    };
    if !s.needed() {
        return Ok(());
    }
    let name = S::NAME.as_bytes();
    enc.u8(SUBSECTION_MARKER);
    // The macro checks at compile time that the name fits a length byte.
    enc.u8(name.len() as u8);
    enc.bytes(name);
    enc.u32(S::VERSION);
    if let Some(d) = save_body(s, enc).map_err(|e| e.in_subsection(S::NAME))? {
        descs.push(d);
    }
    Ok(())
}

/// Loads the subsection body after its name (version + body) into `slot`.
pub fn load_subsection_into<S: VmState>(
    slot: &mut Option<S>,
    dec: &mut Decoder<'_>,
    at: usize,
) -> Result<(), VmStateError> {
    if slot.is_some() {
        return Err(VmStateError::new(
            at,
            ErrorKind::DuplicateSubsection(S::NAME.to_string()),
        ));
    }
    let vat = dec.pos();
    let version = dec.u32().map_err(|e| e.in_subsection(S::NAME))?;
    check_version::<S>(version, vat).map_err(|e| e.in_subsection(S::NAME))?;
    *slot = Some(load_body::<S>(dec, version).map_err(|e| e.in_subsection(S::NAME))?);
    Ok(())
}

/// Decodes a body of `version` (fields, subsections, post_load) into a
/// fresh value. The caller checked `version`.
pub fn load_body<T: VmState>(dec: &mut Decoder<'_>, version: u32) -> Result<T, VmStateError> {
    let mut v = T::load_fields(dec, version)?;
    // QEMU's vmstate_subsection_load: a subsection is ours while the next
    // byte is the marker, the name is at least "<parent>/" long and starts
    // with the parent's name. Anything else is left for the caller.
    let prefix = T::NAME.as_bytes();
    while dec.peek(0, 1) == Some(&[SUBSECTION_MARKER]) {
        let Some(&[len]) = dec.peek(1, 1) else { break };
        if usize::from(len) < prefix.len() + 1 {
            break;
        }
        let Some(name) = dec.peek(2, usize::from(len)) else {
            break;
        };
        if !name.starts_with(prefix) {
            break;
        }
        let at = dec.pos();
        dec.take(2 + usize::from(len))?;
        if !v.load_subsection(name, dec)? {
            return Err(VmStateError::new(
                at,
                ErrorKind::UnknownSubsection(String::from_utf8_lossy(name).into_owned()),
            ));
        }
    }
    v.post_load(version)
        .map_err(|m| VmStateError::new(dec.pos(), ErrorKind::Hook(m)))?;
    Ok(v)
}

/// Saves a state's body (what follows a section header).
pub fn save<T: VmState>(v: &mut T) -> Result<Vec<u8>, VmStateError> {
    let mut enc = Encoder::new(false);
    save_body(v, &mut enc)?;
    Ok(enc.into_bytes())
}

/// Saves a state's body and returns its description too.
pub fn save_described<T: VmState>(v: &mut T) -> Result<(Vec<u8>, StructDesc), VmStateError> {
    let mut enc = Encoder::new(true);
    let desc = save_body(v, &mut enc)?;
    let desc = desc.ok_or_else(|| {
        VmStateError::new(0, ErrorKind::Description("no description".to_string()))
    })?;
    Ok((enc.into_bytes(), desc))
}

/// Loads a whole section body of `version`: the version must be in
/// `[T::MINIMUM, T::VERSION]`, and the body must end exactly where the
/// state does. Nothing is returned unless all of it decoded and
/// `post_load` agreed.
pub fn load<T: VmState>(bytes: &[u8], version: u32) -> Result<T, VmStateError> {
    check_version::<T>(version, 0)?;
    let mut dec = Decoder::new(bytes);
    let v = load_body::<T>(&mut dec, version)?;
    dec.finish()?;
    Ok(v)
}

/// Loads a state of `version` from the start of `bytes` and says how many
/// bytes it used (what follows is not looked at). A stream's loader uses
/// this to delimit a device section, whose length is not on the wire.
pub fn load_prefix<T: VmState>(bytes: &[u8], version: u32) -> Result<(T, usize), VmStateError> {
    check_version::<T>(version, 0)?;
    let mut dec = Decoder::new(bytes);
    let v = load_body::<T>(&mut dec, version)?;
    Ok((v, dec.pos()))
}

/// Whether `sub` is a proper subsection name of `parent` (`parent/...`).
/// Used by the macro's compile-time check.
pub const fn is_subsection_name(sub: &str, parent: &str) -> bool {
    let (s, p) = (sub.as_bytes(), parent.as_bytes());
    if s.len() <= p.len() + 1 || s.len() > 255 || s[p.len()] != b'/' {
        return false;
    }
    let mut i = 0;
    while i < p.len() {
        if s[i] != p[i] {
            return false;
        }
        i += 1;
    }
    true
}
