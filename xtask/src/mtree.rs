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

use crate::cli::{self, Parsed};
use hv_core::memory::mtree::{self, FlatBlock};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `cargo xtask mtree --help`.
pub const USAGE: &str = "\
usage: cargo xtask mtree (--flat TREE | --tree TREE | --compare TREE FLAT | --mark RAW FLAT)

QEMU `info mtree` dumps through Tern's memory API. TREE is an `info mtree -D`
dump with Tern's `container`/`rom` types, FLAT an `info mtree -f` dump, RAW a
tree dump as QEMU 7.2 prints it.

options:
  --flat TREE           print Tern's flat view of every address space of TREE
                        (`info mtree -f` format)
  --tree TREE           parse TREE and print it back (`info mtree -D` format)
  --compare TREE FLAT   compare Tern's flat views of TREE with QEMU's FLAT; an
                        error on any difference
  --mark RAW FLAT       mark RAW for Tern from QEMU's flat view FLAT (regions
                        QEMU never maps become `container`, read-only aliases
                        `rom`) and print it
  -h, --help            this text
";

/// What `mtree` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Flat(PathBuf),
    Tree(PathBuf),
    Compare { tree: PathBuf, flat: PathBuf },
    Mark { raw: PathBuf, flat: PathBuf },
}

/// Parses `cargo xtask mtree` arguments: exactly one mode.
pub fn parse<I>(args: I) -> Result<Parsed<Mode>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short};
    const CMD: &str = "mtree";
    let mut mode: Option<Mode> = None;
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        let next = match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("flat") => Mode::Flat(path(&mut p)?),
            Long("tree") => Mode::Tree(path(&mut p)?),
            Long("compare") => Mode::Compare {
                tree: path(&mut p)?,
                flat: path(&mut p)?,
            },
            Long("mark") => Mode::Mark {
                raw: path(&mut p)?,
                flat: path(&mut p)?,
            },
            other => return Err(cli::error(CMD, other.unexpected())),
        };
        if mode.replace(next).is_some() {
            return Err(cli::error(
                CMD,
                "one of --flat, --tree, --compare, --mark only",
            ));
        }
    }
    mode.map(Parsed::Run)
        .ok_or_else(|| cli::error(CMD, "one of --flat, --tree, --compare, --mark is needed"))
}

fn path(p: &mut lexopt::Parser) -> Result<PathBuf, String> {
    p.value()
        .map(PathBuf::from)
        .map_err(|e| cli::error("mtree", e))
}

/// A dump file as text (a binary file is an error with the byte offset).
fn read(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    mtree::text_of(&bytes)
        .map(str::to_string)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_tree(path: &Path) -> Result<mtree::ParsedTree, String> {
    mtree::parse_tree(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_flat(path: &Path) -> Result<Vec<FlatBlock>, String> {
    mtree::parse_flat(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// `cargo xtask mtree`.
pub fn main(mode: &Mode) -> Result<(), String> {
    match mode {
        Mode::Flat(tree) => {
            let mut p = parse_tree(tree)?;
            print!(
                "{}",
                mtree::format_flat(&mut p.mem).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Mode::Tree(tree) => {
            let p = parse_tree(tree)?;
            print!(
                "{}",
                mtree::format_tree(&p.mem, true).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Mode::Compare { tree, flat } => {
            let mut p = parse_tree(tree)?;
            let q = parse_flat(flat)?;
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
        Mode::Mark { raw, flat } => {
            let q = parse_flat(flat)?;
            let text = read(raw)?;
            print!(
                "{}",
                mark(&text, &q).map_err(|e| format!("{}: {e}", raw.display()))?
            );
            Ok(())
        }
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
        let mut space_of = BTreeMap::new();
        for (n, sid) in &p.spaces {
            space_of.entry(n.as_str()).or_insert(*sid);
        }
        for blk in qemu {
            for (name, _) in &blk.spaces {
                let Some(&sid) = space_of.get(name.as_str()) else {
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
                    let l = line_mut(&mut lines, ln)?;
                    *l = mtree::retype_line(l, ty).ok_or("retype failed")?;
                }
            }
            return Ok(lines.join("\n") + "\n");
        }
        for ln in to_mark {
            let l = line_mut(&mut lines, ln)?;
            *l = mtree::retype_line(l, "rom").ok_or("retype failed")?;
        }
    }
    Err("marking did not converge".into())
}

/// Line `ln` (1-based) of `lines`.
fn line_mut(lines: &mut [String], ln: usize) -> Result<&mut String, String> {
    ln.checked_sub(1)
        .and_then(|i| lines.get_mut(i))
        .ok_or_else(|| format!("line {ln}: no such line"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    fn fixture(name: &str) -> PathBuf {
        crate::root()
            .join("hv-core/tests/fixtures/mtree")
            .join(name)
    }

    #[test]
    fn mtree_help() {
        for a in [&["-h"][..], &["--help"], &["--flat", "t", "--help"]] {
            assert_eq!(parse(args(a)), Ok(Parsed::Help(USAGE)));
        }
        for o in ["--flat", "--tree", "--compare", "--mark"] {
            assert!(USAGE.contains(o), "{o}");
        }
    }

    #[test]
    fn mtree_each_mode() {
        assert_eq!(ok(parse(args(&["--flat", "t"]))), Mode::Flat("t".into()));
        assert_eq!(ok(parse(args(&["--tree=t"]))), Mode::Tree("t".into()));
        assert_eq!(
            ok(parse(args(&["--compare", "t", "f"]))),
            Mode::Compare {
                tree: "t".into(),
                flat: "f".into()
            }
        );
        assert_eq!(
            ok(parse(args(&["--mark", "r", "f"]))),
            Mode::Mark {
                raw: "r".into(),
                flat: "f".into()
            }
        );
    }

    #[test]
    fn mtree_bad_command_lines_are_errors() {
        let e = err(parse(args(&[])));
        assert!(e.starts_with("mtree: one of --flat, --tree, --compare, --mark is needed"));
        assert_eq!(
            err(parse(args(&["--flatten", "t"]))),
            "mtree: invalid option '--flatten' (see `cargo xtask mtree --help`)"
        );
        assert!(err(parse(args(&["--flat", "a", "--tree", "b"]))).contains("only"));
        assert!(err(parse(args(&["t"]))).starts_with("mtree: unexpected argument \"t\""));
        for a in [&["--flat"][..], &["--compare", "t"], &["--mark"]] {
            let e = err(parse(args(a)));
            assert!(e.starts_with("mtree: missing argument for option"), "{e}");
        }
    }

    #[test]
    fn mtree_binary_file_is_an_error_with_its_offset() {
        let f = std::env::temp_dir().join(format!("xtask-mtree-{}.bin", std::process::id()));
        std::fs::write(&f, b"address-space: memory\n\x7fELF\x02\x01\x01\0\0").unwrap();
        let e = main(&Mode::Flat(f.clone())).unwrap_err();
        std::fs::remove_file(&f).unwrap();
        assert_eq!(
            e,
            format!(
                "{}: line 2: not text: NUL byte at byte offset 29",
                f.display()
            )
        );
    }

    #[test]
    fn mtree_mark_reproduces_the_marked_fixtures() {
        // The marked fixtures were made by `--mark` from the raw dumps: doing
        // it again gives the same tree (the header comments aside).
        for m in [
            "pc-128m",
            "pc-5g-devices",
            "pc-isa",
            "q35-5g-devices",
            "q35-bridge",
        ] {
            let raw = read(&fixture(&format!("{m}.tree.raw"))).unwrap();
            let flat = parse_flat(&fixture(&format!("{m}.flat"))).unwrap();
            let marked = mark(&raw, &flat).unwrap();
            let want = read(&fixture(&format!("{m}.tree"))).unwrap();
            let body = |t: &str| -> Vec<String> {
                t.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(String::from)
                    .collect()
            };
            assert_eq!(body(&marked), body(&want), "{m}");
            assert_ne!(body(&raw), body(&want), "{m}: marking changes nothing");
        }
    }
}
