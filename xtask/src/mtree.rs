//! `cargo xtask mtree`: QEMU `info mtree` tooling on top of hv-core's memory
//! API.
//!
//! * `--flat FILE`: parse a tree dump (`info mtree -D` format with Tern's
//!   `container`/`rom` extensions) and print Tern's flat view of every address
//!   space in `info mtree -f` format.
//! * `--tree FILE`: parse a tree dump and print it back (`info mtree -D`).
//! * `--compare TREE FLAT`: compare Tern's flat views of TREE with QEMU's
//!   `info mtree -f` dump FLAT; exits with an error on any difference.
//! * `--mark RAW FLAT`: mark a raw QEMU 7.2 tree dump for Tern: regions that
//!   never appear in QEMU's flat view become `container`, aliases that QEMU's
//!   flat view shows to be read-only become `rom`. Prints the marked tree.

use hv_core::memory::mtree::{self, FlatBlock};
use std::collections::BTreeSet;

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

fn usage() -> String {
    "usage: cargo xtask mtree (--flat TREE | --tree TREE | --compare TREE FLAT | --mark RAW FLAT)"
        .into()
}

pub fn main(args: &[String]) -> Result<(), String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["--flat", tree] => {
            let mut p = mtree::parse_tree(&read(tree)?).map_err(|e| format!("{tree}: {e}"))?;
            print!(
                "{}",
                mtree::format_flat(&mut p.mem).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        ["--tree", tree] => {
            let p = mtree::parse_tree(&read(tree)?).map_err(|e| format!("{tree}: {e}"))?;
            print!(
                "{}",
                mtree::format_tree(&p.mem, true).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        ["--compare", tree, flat] => {
            let mut p = mtree::parse_tree(&read(tree)?).map_err(|e| format!("{tree}: {e}"))?;
            let q = mtree::parse_flat(&read(flat)?).map_err(|e| format!("{flat}: {e}"))?;
            let diffs =
                mtree::compare_flat(&mut p.mem, &p.spaces, &q).map_err(|e| e.to_string())?;
            for d in &diffs {
                println!("{d}");
            }
            if diffs.is_empty() {
                println!("identical: {} address spaces", p.spaces.len());
                Ok(())
            } else {
                Err(format!("{} differences", diffs.len()))
            }
        }
        ["--mark", raw, flat] => {
            let q = mtree::parse_flat(&read(flat)?).map_err(|e| format!("{flat}: {e}"))?;
            print!("{}", mark(&read(raw)?, &q)?);
            Ok(())
        }
        _ => Err(usage()),
    }
}

/// Marks a raw QEMU tree dump (see module docs).
pub fn mark(raw: &str, qemu: &[FlatBlock]) -> Result<String, String> {
    let in_flat: BTreeSet<&str> = qemu
        .iter()
        .flat_map(|b| b.ranges.iter().map(|r| r.name.as_str()))
        .collect();
    let mut lines: Vec<String> = Vec::new();
    for (i, l) in raw.lines().enumerate() {
        let mut l = l.to_string();
        if l.starts_with(' ') || l.starts_with('[') {
            let t = mtree::parse_tree_line(&l, i + 1).map_err(|e| e.to_string())?;
            if t.alias.is_none() && t.ty == "i/o" && !in_flat.contains(t.name.as_str()) {
                l = mtree::retype_line(&l, "container").ok_or("retype failed")?;
            }
        }
        lines.push(l);
    }
    // Read-only aliases: where QEMU shows `rom` but Tern renders writable
    // RAM, mark the innermost alias on the path (slow resolver) as `rom`.
    for _round in 0..16 {
        let text = lines.join("\n") + "\n";
        let mut p = mtree::parse_tree(&text).map_err(|e| e.to_string())?;
        let mut to_mark: BTreeSet<usize> = BTreeSet::new();
        for blk in qemu {
            for (name, _) in &blk.spaces {
                let Some(&(_, sid)) = p.spaces.iter().find(|(n, _)| n == name) else {
                    continue;
                };
                let view = p.mem.flat_view(sid).map_err(|e| e.to_string())?;
                let root = p.mem.address_space_root(sid).map_err(|e| e.to_string())?;
                for r in blk.ranges.iter().filter(|r| r.ty == "rom") {
                    // Every piece of Tern's view inside QEMU's read-only range.
                    let writable = view.ranges().iter().filter(|fr| {
                        !fr.readonly && fr.start <= r.end && fr.end() > r.start as u128
                    });
                    for fr in writable {
                        let at = fr.start.max(r.start);
                        let hit = p.mem.resolve_slow(root, at).map_err(|e| e.to_string())?;
                        if let Some(alias) = hit.and_then(|h| h.aliases.last().copied()) {
                            if let Some(ls) = p.lines.get(&alias) {
                                to_mark.extend(ls.iter().copied());
                            }
                        }
                    }
                }
            }
        }
        if to_mark.is_empty() {
            // Make every line's type what Tern prints (alias types follow
            // their targets, which may have become `container`).
            for (&id, ls) in &p.lines {
                let ty = mtree::region_type(&p.mem, id).map_err(|e| e.to_string())?;
                for &ln in ls {
                    let l = &mut lines[ln - 1];
                    *l = mtree::retype_line(l, ty).ok_or("retype failed")?;
                }
            }
            return Ok(lines.join("\n") + "\n");
        }
        for ln in to_mark {
            let l = &mut lines[ln - 1];
            *l = mtree::retype_line(l, "rom").ok_or("retype failed")?;
        }
    }
    Err("marking did not converge".into())
}
