//! The stream's own description (vmdesc) and walking a device section's
//! body with it, as QEMU's `scripts/analyze-migration.py` does: this is how
//! sections of devices Tern does not model (QEMU's own streams) are
//! delimited and printed.

use crate::error::StreamErrorKind;
use crate::format::section;
use crate::reader::SectionInfo;
use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hv_core::vmstate::{
    ArrayMark, Decoder, ErrorKind, FieldDesc, Json, Nested, StructDesc, VmStateError,
};

/// One device section's description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionDesc {
    /// The section's idstr.
    pub name: String,
    pub instance_id: u32,
    /// The body's description. Old-style sections (no vmsd, e.g. `slirp`)
    /// have an empty `vmsd_name` and no version.
    pub body: StructDesc,
    /// Whether the description carries a `version` (vmsd sections do).
    pub has_version: bool,
}

/// The whole description record.
#[derive(Clone, Debug, PartialEq)]
pub struct VmDescription {
    pub page_size: u64,
    pub devices: Vec<SectionDesc>,
    index: BTreeMap<(String, u32), usize>,
}

impl VmDescription {
    /// Reads QEMU's vmdesc: `{"page_size": n, "devices": [...]}` (a
    /// `configuration` key, written by QEMU newer than 7.2, is accepted and
    /// ignored).
    pub fn from_json(j: &Json) -> Result<Self, String> {
        let page_size = j
            .get("page_size")
            .and_then(Json::as_u64)
            .filter(|p| p.is_power_of_two())
            .ok_or("page_size missing or not a power of two")?;
        let list = j
            .get("devices")
            .and_then(Json::as_array)
            .ok_or("devices missing")?;
        let mut devices = Vec::new();
        let mut index = BTreeMap::new();
        for (i, d) in list.iter().enumerate() {
            let name = d
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| alloc::format!("device {i}: no name"))?
                .to_string();
            let instance_id = d
                .get("instance_id")
                .and_then(Json::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| alloc::format!("device {name:?}: no instance_id"))?;
            let body =
                StructDesc::from_json(d).map_err(|e| alloc::format!("device {name:?}: {e}"))?;
            let has_version = d.get("version").is_some();
            if index
                .insert((name.clone(), instance_id), devices.len())
                .is_some()
            {
                return Err(alloc::format!(
                    "device {name:?} {instance_id} described twice"
                ));
            }
            devices.push(SectionDesc {
                name,
                instance_id,
                body,
                has_version,
            });
        }
        Ok(Self {
            page_size,
            devices,
            index,
        })
    }

    /// The description of section (`idstr`, `instance`).
    pub fn find(&self, idstr: &str, instance: u32) -> Option<&SectionDesc> {
        let i = *self.index.get(&(idstr.to_string(), instance))?;
        self.devices.get(i)
    }
}

/// A value read by a walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a, 'd> {
    Uint(u64),
    Int(i64),
    Bool(bool),
    /// Bytes of a type without a numeric reading (buffers, timers, opaque
    /// types such as `pci config`).
    Bytes(&'a [u8]),
    Struct(Walked<'a, 'd>),
}

/// One element of a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkedField<'a, 'd> {
    pub name: &'d str,
    /// The array index, for array elements.
    pub index: Option<u64>,
    pub ty: &'d str,
    /// Offset of the element inside the section body.
    pub offset: usize,
    pub value: Value<'a, 'd>,
}

/// A walked body (or nested struct, or subsection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Walked<'a, 'd> {
    pub vmsd_name: &'d str,
    pub fields: Vec<WalkedField<'a, 'd>>,
    /// (name, version on the wire, body).
    pub subsections: Vec<(&'a str, u32, Walked<'a, 'd>)>,
}

fn desc_err(at: usize, m: &str) -> VmStateError {
    VmStateError::new(at, ErrorKind::Description(m.to_string()))
}

/// Reads one scalar as its type name says (`uintN`, `intN`, `bool` and
/// their `equal`/`le` variants); `None` for other types.
fn scalar(ty: &str, b: &[u8]) -> Option<Value<'static, 'static>> {
    if b.len() > 8 || b.is_empty() {
        return None;
    }
    let u = b.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x));
    let base = ty.split(' ').next().unwrap_or("");
    match base {
        "bool" if b.len() == 1 => Some(Value::Bool(b[0] != 0)),
        "uint8" | "uint16" | "uint32" | "uint64" => Some(Value::Uint(u)),
        "int8" | "int16" | "int32" | "int64" => {
            let shift = 64 - 8 * b.len() as u32;
            Some(Value::Int(((u << shift) as i64) >> shift))
        }
        _ => None,
    }
}

/// Walks `desc` over `dec`: every field by its described size (structs
/// recursively, checking their size), then every described subsection,
/// which must come in order with its name.
pub fn walk<'a, 'd>(
    desc: &'d StructDesc,
    dec: &mut Decoder<'a>,
) -> Result<Walked<'a, 'd>, VmStateError> {
    let mut budget = step_budget(dec);
    walk_in(desc, dec, &mut budget)
}

/// Element visits a walk or skip of `dec` may make: proportional to the
/// bytes left, so a description of nested zero-size arrays cannot make
/// the work (or a walk's output) grow beyond the input.
fn step_budget(dec: &Decoder<'_>) -> u64 {
    (dec.remaining() as u64)
        .saturating_mul(16)
        .saturating_add(4096)
}

/// Counts one element visit against `budget`.
fn step(budget: &mut u64, at: usize) -> Result<(), VmStateError> {
    *budget = budget.checked_sub(1).ok_or_else(|| {
        desc_err(
            at,
            "the description asks for more elements than the bytes can hold",
        )
    })?;
    Ok(())
}

/// Refuses field `f` (`count` elements) if the bytes left cannot hold it:
/// no loop or allocation goes past what the input can back.
fn room(f: &FieldDesc, count: u64, dec: &Decoder<'_>) -> Result<(), VmStateError> {
    if count.saturating_mul(f.size.max(1)) > dec.remaining() as u64 {
        return Err(VmStateError::new(
            dec.pos(),
            ErrorKind::Truncated {
                need: count.saturating_mul(f.size),
                have: dec.remaining() as u64,
            },
        )
        .in_field(&f.name));
    }
    Ok(())
}

/// Reads the header of described subsection `sub` (marker, its name, its
/// version): it must come next, under that name.
fn subsection_header<'a>(
    sub: &StructDesc,
    dec: &mut Decoder<'a>,
) -> Result<(&'a str, u32), VmStateError> {
    let at = dec.pos();
    let marker = dec.u8().map_err(|e| e.in_subsection(&sub.vmsd_name))?;
    if marker != section::SUBSECTION {
        return Err(
            desc_err(at, "described subsection not in the stream").in_subsection(&sub.vmsd_name)
        );
    }
    let len = dec.u8()?;
    let name = dec.take(usize::from(len))?;
    if name != sub.vmsd_name.as_bytes() {
        return Err(desc_err(at, "subsection name differs from the description")
            .in_subsection(&sub.vmsd_name));
    }
    // Names were compared with a &str, so this is UTF-8.
    let name = core::str::from_utf8(name).map_err(|_| desc_err(at, "subsection name"))?;
    let version = dec.u32()?;
    Ok((name, version))
}

fn walk_in<'a, 'd>(
    desc: &'d StructDesc,
    dec: &mut Decoder<'a>,
    budget: &mut u64,
) -> Result<Walked<'a, 'd>, VmStateError> {
    let mut out = Walked {
        vmsd_name: &desc.vmsd_name,
        fields: Vec::new(),
        subsections: Vec::new(),
    };
    for f in &desc.fields {
        let (count, first) = match f.array {
            ArrayMark::Single => (1, None),
            ArrayMark::Len(n) => (n, Some(0)),
            ArrayMark::Index(i) => (1, Some(i)),
        };
        room(f, count, dec)?;
        for k in 0..count {
            let index = first.map(|i| i + k);
            let at = dec.pos();
            step(budget, at).map_err(|e| e.in_field(&f.name))?;
            let value = match &f.nested {
                Nested::Struct(s) | Nested::Inline(s) => {
                    let w = walk_in(s, dec, budget).map_err(|e| match index {
                        Some(i) => e.in_index(i).in_field(&f.name),
                        None => e.in_field(&f.name),
                    })?;
                    if (dec.pos() - at) as u64 != f.size {
                        return Err(desc_err(at, "struct size differs from the description")
                            .in_field(&f.name));
                    }
                    Value::Struct(w)
                }
                Nested::None => {
                    let n = usize::try_from(f.size).unwrap_or(usize::MAX);
                    let b = dec.take(n).map_err(|e| e.in_field(&f.name))?;
                    scalar(&f.ty, b).unwrap_or(Value::Bytes(b))
                }
            };
            out.fields.push(WalkedField {
                name: &f.name,
                index,
                ty: &f.ty,
                offset: at,
                value,
            });
        }
    }
    for sub in &desc.subsections {
        let (name, version) = subsection_header(sub, dec)?;
        let w = walk_in(sub, dec, budget).map_err(|e| e.in_subsection(name))?;
        out.subsections.push((name, version, w));
    }
    Ok(out)
}

/// Skips `desc` over `dec` as [`walk`] reads it (the same checks: sizes,
/// nested struct sizes, subsection markers and names), without building
/// values: what the reader needs to delimit a body.
pub fn skip(desc: &StructDesc, dec: &mut Decoder<'_>) -> Result<(), VmStateError> {
    let mut budget = step_budget(dec);
    skip_in(desc, dec, &mut budget)
}

fn skip_in(desc: &StructDesc, dec: &mut Decoder<'_>, budget: &mut u64) -> Result<(), VmStateError> {
    for f in &desc.fields {
        let count = match f.array {
            ArrayMark::Single | ArrayMark::Index(_) => 1,
            ArrayMark::Len(n) => n,
        };
        room(f, count, dec)?;
        match &f.nested {
            Nested::Struct(s) | Nested::Inline(s) => {
                for k in 0..count {
                    let at = dec.pos();
                    step(budget, at).map_err(|e| e.in_field(&f.name))?;
                    skip_in(s, dec, budget).map_err(|e| match f.array {
                        ArrayMark::Single => e.in_field(&f.name),
                        ArrayMark::Len(_) => e.in_index(k).in_field(&f.name),
                        ArrayMark::Index(i) => e.in_index(i).in_field(&f.name),
                    })?;
                    if (dec.pos() - at) as u64 != f.size {
                        return Err(desc_err(at, "struct size differs from the description")
                            .in_field(&f.name));
                    }
                }
            }
            // Scalars and buffers: all elements at once (checked above).
            Nested::None => {
                let n = usize::try_from(count.saturating_mul(f.size)).unwrap_or(usize::MAX);
                dec.take(n).map_err(|e| e.in_field(&f.name))?;
            }
        }
    }
    for sub in &desc.subsections {
        subsection_header(sub, dec)?;
        skip_in(sub, dec, budget).map_err(|e| e.in_subsection(&sub.vmsd_name))?;
    }
    Ok(())
}

/// Walks a whole section body and returns the walk and the bytes used.
pub fn walk_section<'a, 'd>(
    desc: &'d SectionDesc,
    body: &'a [u8],
) -> Result<(Walked<'a, 'd>, usize), VmStateError> {
    let mut dec = Decoder::new(body);
    let w = walk(&desc.body, &mut dec)?;
    Ok((w, dec.pos()))
}

/// Tells the reader where a non-RAM section's body ends. The migration
/// format has no lengths: the reader of a body must understand it.
pub trait SectionSizer {
    /// The length of the body of `info` at the start of `rest` (which runs
    /// to the end of the stream).
    fn body_len(&mut self, info: &SectionInfo<'_>, rest: &[u8]) -> Result<usize, StreamErrorKind>;
}

/// Delimits bodies by walking the stream's own description.
#[derive(Clone, Debug, Default)]
pub struct DescSizer {
    pub desc: Option<VmDescription>,
}

impl SectionSizer for DescSizer {
    fn body_len(&mut self, info: &SectionInfo<'_>, rest: &[u8]) -> Result<usize, StreamErrorKind> {
        let d = self
            .desc
            .as_ref()
            .and_then(|d| d.find(info.idstr, info.instance))
            .ok_or(StreamErrorKind::NoDescription)?;
        if d.has_version && d.body.version != info.version {
            return Err(StreamErrorKind::DescriptionVersion {
                desc: d.body.version,
                header: info.version,
            });
        }
        let mut dec = Decoder::new(rest);
        skip(&d.body, &mut dec).map_err(StreamErrorKind::Body)?;
        Ok(dec.pos())
    }
}

/// No descriptions: every non-RAM section is refused (for streams whose
/// devices the caller delimits itself).
pub struct NoSizer;

impl SectionSizer for NoSizer {
    fn body_len(&mut self, _: &SectionInfo<'_>, _: &[u8]) -> Result<usize, StreamErrorKind> {
        Err(StreamErrorKind::NoDescription)
    }
}
