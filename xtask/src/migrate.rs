//! `cargo xtask migrate inspect FILE`: prints a migration stream (Tern's or
//! QEMU's) section by section: offsets, headers and lengths, RAM pages by
//! kind per block, every device section's fields walked by the stream's own
//! description, and the description itself. A bad stream is an error that
//! names the byte offset (and the section).

use migration::desc::{walk_section, Value, Walked};
use migration::reader::{PageKind, Record};
use migration::StreamReader;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Reads and describes the stream in `path`.
pub fn inspect(path: &Path) -> Result<String, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    inspect_bytes(&data).map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Default)]
struct BlockPages {
    length: u64,
    zero: u64,
    nonzero_fill: u64,
    normal: u64,
}

/// Describes a stream held in memory.
pub fn inspect_bytes(data: &[u8]) -> Result<String, String> {
    let mut out = String::new();
    let mut reader = StreamReader::self_described(data).map_err(|e| e.to_string())?;
    let desc = reader.description().cloned();
    let mut blocks: BTreeMap<String, BlockPages> = BTreeMap::new();
    let mut block_order: Vec<String> = Vec::new();
    let mut devices = String::new();
    let mut description = None;
    let _ = writeln!(out, "stream: {} bytes", data.len());
    let _ = writeln!(
        out,
        "{:>10}  {:<5} {:>5}  {:<36} {:>4} {:>4} {:>9}",
        "offset", "type", "id", "idstr", "inst", "ver", "length"
    );
    loop {
        let rec = match reader.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => return Err(e.to_string()),
        };
        match rec {
            Record::Header { version } => {
                let _ = writeln!(out, "{:>#10x}  QEVM  version {version}", 0);
            }
            Record::Configuration(c) => {
                let _ = write!(out, "{:>#10x}  CONFIG machine {:?}", c.offset, c.machine);
                if let Some(b) = c.page_bits {
                    let _ = write!(out, " page-bits {b}");
                }
                if !c.capabilities.is_empty() {
                    let _ = write!(out, " capabilities {:?}", c.capabilities);
                }
                if c.uuid.is_some() {
                    let _ = write!(out, " uuid");
                }
                out.push('\n');
            }
            Record::SectionBegin(_) => {}
            Record::RamBlock { name, length, .. } => {
                block_order.push(name.to_string());
                blocks.entry(name.to_string()).or_default().length = length;
            }
            Record::RamPage(p) => {
                let b = blocks.entry(p.block.to_string()).or_default();
                match p.kind {
                    PageKind::Zero(0) => b.zero += 1,
                    PageKind::Zero(_) => b.nonzero_fill += 1,
                    PageKind::Normal(_) => b.normal += 1,
                }
            }
            Record::SectionEnd {
                info,
                payload,
                body,
            } => {
                let _ = writeln!(
                    out,
                    "{:>#10x}  {:<5} {:>5}  {:<36} {:>4} {:>4} {:>9}",
                    info.offset,
                    info.kind.name(),
                    info.id,
                    info.idstr,
                    info.instance,
                    info.version,
                    payload.len()
                );
                let sd = desc
                    .as_ref()
                    .and_then(|d| d.find(info.idstr, info.instance));
                if let Some(sd) = sd {
                    let _ = writeln!(
                        devices,
                        "{} instance {} (section {}, version {}, {} bytes at {:#x})",
                        info.idstr,
                        info.instance,
                        info.id,
                        info.version,
                        body.len(),
                        payload.start
                    );
                    let (w, _) = walk_section(sd, body).map_err(|e| {
                        format!(
                            "section {} ({:?}) at offset {:#x}: {e}",
                            info.id,
                            info.idstr,
                            payload.start + e.offset
                        )
                    })?;
                    print_walk(&mut devices, &w, payload.start, 1);
                }
            }
            Record::Command { offset, cmd, data } => {
                let _ = writeln!(out, "{offset:>#10x}  COMMAND {cmd} ({} bytes)", data.len());
            }
            Record::Eof { offset } => {
                let _ = writeln!(out, "{offset:>#10x}  EOF");
            }
            Record::VmDescription {
                offset,
                json,
                value,
            } => {
                let _ = writeln!(out, "{offset:>#10x}  VMDESCRIPTION ({} bytes)", json.len());
                description = Some(value);
            }
        }
    }
    let _ = writeln!(out, "\nRAM blocks (pages by kind):");
    for name in &block_order {
        let b = &blocks[name];
        let pages = b.zero + b.nonzero_fill + b.normal;
        let _ = write!(
            out,
            "  {name:<36} {:>#12x}  {pages:>7} pages: {:>7} zero, {:>7} normal",
            b.length, b.zero, b.normal
        );
        if b.nonzero_fill > 0 {
            let _ = write!(out, ", {} filled with a non-zero byte", b.nonzero_fill);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\ndevices (walked by the stream's description):");
    out.push_str(&devices);
    match description {
        Some(d) => {
            let _ = writeln!(out, "\ndescription:\n{}", d.to_pretty(4));
        }
        None => out.push_str("\nno description record\n"),
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().take(32).enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{x:02x}");
    }
    if b.len() > 32 {
        let _ = write!(s, " ... ({} bytes)", b.len());
    }
    s
}

fn print_walk(out: &mut String, w: &Walked<'_, '_>, base: usize, depth: usize) {
    let pad = "  ".repeat(depth);
    for f in &w.fields {
        let name = match f.index {
            Some(i) => format!("{}[{i}]", f.name),
            None => f.name.to_string(),
        };
        let at = base + f.offset;
        match &f.value {
            Value::Struct(s) => {
                let _ = writeln!(out, "{pad}{name} ({} {}) @{at:#x}:", f.ty, s.vmsd_name);
                print_walk(out, s, base, depth + 1);
            }
            Value::Uint(v) => {
                let _ = writeln!(out, "{pad}{name} ({}) = {v:#x} ({v}) @{at:#x}", f.ty);
            }
            Value::Int(v) => {
                let _ = writeln!(out, "{pad}{name} ({}) = {v} @{at:#x}", f.ty);
            }
            Value::Bool(v) => {
                let _ = writeln!(out, "{pad}{name} ({}) = {v} @{at:#x}", f.ty);
            }
            Value::Bytes(b) => {
                let _ = writeln!(out, "{pad}{name} ({}) = {} @{at:#x}", f.ty, hex(b));
            }
        }
    }
    for (name, version, s) in &w.subsections {
        let _ = writeln!(out, "{pad}subsection {name} version {version}:");
        print_walk(out, s, base, depth + 1);
    }
}
