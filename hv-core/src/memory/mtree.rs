//! QEMU `info mtree` text formats: printing (`info mtree [-D]` and
//! `info mtree -f`) and parsing the tree format back into a
//! [`MemorySystem`].
//!
//! Tern extends QEMU's tree format in two ways, in both printer and parser: a
//! pure container has the type `container` (QEMU 7.2 prints `i/o`), and a
//! read-only alias has the type `rom` (QEMU prints the target's type).
//!
//! QEMU prints address spaces and flat views in hash-table order; Tern prints
//! them in creation order (address-space names sorted within a section, as
//! QEMU does).

use super::render::Arena;
use super::{
    AddressSpaceId, FlatView, MemoryError, MemorySystem, MmioHandle, RamBacking, RegionId,
    RegionKind,
};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write;

/// QEMU `MR_SIZE`: inclusive size as printed.
fn mr_size(size: u128) -> u64 {
    if size == 0 {
        0
    } else {
        (size - 1) as u64
    }
}

/// QEMU `memory_region_type` with Tern's two extensions.
pub fn region_type(mem: &MemorySystem, id: RegionId) -> Result<&'static str, MemoryError> {
    let mut id = id;
    loop {
        let r = mem.get(id)?;
        return Ok(match r.kind {
            RegionKind::Alias { target, .. } => {
                if r.readonly {
                    "rom"
                } else {
                    id = target;
                    continue;
                }
            }
            RegionKind::Container => "container",
            RegionKind::RamDevice(_) => "ramd",
            RegionKind::RomDevice { .. } if r.romd_mode => "romd",
            RegionKind::Ram(_) | RegionKind::Rom(_) => {
                if r.readonly {
                    "rom"
                } else {
                    "ram"
                }
            }
            _ => "i/o",
        });
    }
}

/// Prints the region trees of all address spaces like QEMU's
/// `info mtree` (`show_disabled` = `-D`).
pub fn format_tree(mem: &MemorySystem, show_disabled: bool) -> Result<String, MemoryError> {
    let mut out = String::new();
    let mut queue = Queue::default();
    // Group address spaces by root region, in order of first appearance.
    let mut groups: Vec<(RegionId, Vec<String>)> = Vec::new();
    let mut group_of: BTreeMap<RegionId, usize> = BTreeMap::new();
    for id in mem.address_spaces() {
        let root = mem.address_space_root(id)?;
        let name = mem.address_space_name(id)?.to_string();
        match group_of.get(&root) {
            Some(&g) => groups[g].1.push(name),
            None => {
                group_of.insert(root, groups.len());
                groups.push((root, alloc::vec![name]));
            }
        }
    }
    for (root, mut names) in groups {
        names.sort();
        for n in names {
            let _ = writeln!(out, "address-space: {n}");
        }
        print_mr(&mut out, mem, root, &mut queue, show_disabled)?;
        out.push('\n');
    }
    let mut i = 0;
    while let Some(&mr) = queue.list.get(i) {
        let _ = writeln!(out, "memory-region: {}", mem.get(mr)?.name);
        print_mr(&mut out, mem, mr, &mut queue, show_disabled)?;
        out.push('\n');
        i += 1;
    }
    Ok(out)
}

/// Alias targets to print in `memory-region:` sections, in the order
/// first met.
#[derive(Default)]
struct Queue {
    list: Vec<RegionId>,
    seen: BTreeSet<RegionId>,
}

/// Prints the subtree of `top` (QEMU `mtree_print_mr`), without recursion.
fn print_mr(
    out: &mut String,
    mem: &MemorySystem,
    top: RegionId,
    queue: &mut Queue,
    show_disabled: bool,
) -> Result<(), MemoryError> {
    // (region, level, base), popped in print order.
    let mut stack: Vec<(RegionId, usize, u64)> = alloc::vec![(top, 1, 0)];
    while let Some((id, level, base)) = stack.pop() {
        let r = mem.get(id)?;
        let cur_start = base.wrapping_add(r.addr);
        let cur_end = cur_start.wrapping_add(mr_size(r.size));
        if cur_start < base || cur_end < cur_start {
            out.push_str("[DETECTED OVERFLOW!] ");
        }
        let nv = if r.nonvolatile { "nv-" } else { "" };
        let ty = region_type(mem, id)?;
        let disabled = if r.enabled { "" } else { " [disabled]" };
        if r.enabled || show_disabled {
            for _ in 0..level {
                out.push_str("  ");
            }
            let _ = write!(
                out,
                "{cur_start:016x}-{cur_end:016x} (prio {}, {nv}{ty}): ",
                r.priority
            );
            if let RegionKind::Alias { target, offset } = r.kind {
                let _ = writeln!(
                    out,
                    "alias {} @{} {:016x}-{:016x}{disabled}",
                    r.name,
                    mem.get(target)?.name,
                    offset,
                    offset.wrapping_add(mr_size(r.size)),
                );
            } else {
                let _ = writeln!(out, "{}{disabled}", r.name);
            }
        }
        if let RegionKind::Alias { target, .. } = r.kind {
            if queue.seen.insert(target) {
                queue.list.push(target);
            }
        }
        // QEMU orders the printout by address, then priority (descending),
        // keeping list order otherwise.
        let mut subs: Vec<(u64, i32, RegionId)> = Vec::with_capacity(r.subregions.len());
        for &s in r.subregions.iter().rev() {
            let sr = mem.get(s)?;
            subs.push((sr.addr, sr.priority, s));
        }
        subs.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        stack.extend(
            subs.iter()
                .rev()
                .map(|&(_, _, s)| (s, level + 1, cur_start)),
        );
    }
    Ok(())
}

/// Prints flat views like QEMU's `info mtree -f`, for the given views.
/// Address spaces sharing a view (same `Rc`) are listed under one
/// `FlatView #N`.
pub fn format_flat_views(
    mem: &MemorySystem,
    views: &[(AddressSpaceId, Rc<FlatView>)],
) -> Result<String, MemoryError> {
    let mut out = String::new();
    let mut groups: Vec<(Rc<FlatView>, Vec<AddressSpaceId>)> = Vec::new();
    // By the view's address: the same `Rc` is the same view.
    let mut group_of: BTreeMap<*const FlatView, usize> = BTreeMap::new();
    for (id, v) in views {
        match group_of.get(&Rc::as_ptr(v)) {
            Some(&g) => groups[g].1.push(*id),
            None => {
                group_of.insert(Rc::as_ptr(v), groups.len());
                groups.push((v.clone(), alloc::vec![*id]));
            }
        }
    }
    for (n, (view, ids)) in groups.iter().enumerate() {
        let _ = writeln!(out, "FlatView #{n}");
        for &id in ids {
            let root = mem.address_space_root(id)?;
            let r = mem.get(root)?;
            let _ = write!(
                out,
                " AS \"{}\", root: {}",
                mem.address_space_name(id)?,
                r.name
            );
            if let RegionKind::Alias { target, .. } = r.kind {
                let _ = write!(out, ", alias {}", mem.get(target)?.name);
            }
            out.push('\n');
        }
        match view.root {
            Some(root) => {
                let _ = writeln!(out, " Root memory region: {}", mem.get(root)?.name);
            }
            None => out.push_str(" Root memory region: (none)\n"),
        }
        if view.ranges.is_empty() {
            out.push_str("  No rendered FlatView\n\n");
            continue;
        }
        for fr in &view.ranges {
            let r = mem.get(fr.region)?;
            let ty = if fr.readonly {
                "rom"
            } else {
                region_type(mem, fr.region)?
            };
            let nv = if fr.nonvolatile { "nv-" } else { "" };
            let end = fr.start.wrapping_add(mr_size(fr.size));
            let _ = write!(
                out,
                "  {:016x}-{end:016x} (prio {}, {nv}{ty}): {}",
                fr.start, r.priority, r.name
            );
            if fr.offset_in_region != 0 {
                let _ = write!(out, " @{:016x}", fr.offset_in_region);
            }
            out.push('\n');
        }
        out.push('\n');
    }
    Ok(out)
}

/// `info mtree -f` of the current views of all address spaces.
pub fn format_flat(mem: &mut MemorySystem) -> Result<String, MemoryError> {
    let mut views = Vec::new();
    for id in mem.address_spaces() {
        views.push((id, mem.flat_view(id)?));
    }
    format_flat_views(mem, &views)
}

// ----------------------------------------------------------------------
// Parsing
// ----------------------------------------------------------------------

/// One parsed region line of the tree format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeLine {
    /// 1-based line number.
    pub line: usize,
    /// Indentation level (1 for a section's root).
    pub level: usize,
    pub start: u64,
    /// Inclusive end.
    pub end: u64,
    pub priority: i32,
    pub nonvolatile: bool,
    pub ty: String,
    pub name: String,
    /// `(target, offset)` for aliases.
    pub alias: Option<(String, u64)>,
    pub disabled: bool,
}

fn perr(line: usize, msg: &str) -> MemoryError {
    MemoryError::Parse {
        line,
        msg: msg.into(),
    }
}

fn parse_range(s: &str, line: usize) -> Result<(u64, u64), MemoryError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| perr(line, "expected START-END"))?;
    let a = u64::from_str_radix(a, 16).map_err(|_| perr(line, "bad start address"))?;
    let b = u64::from_str_radix(b, 16).map_err(|_| perr(line, "bad end address"))?;
    Ok((a, b))
}

/// A region's `START-END` (inclusive end): the end may not lie below the
/// start.
fn parse_span(s: &str, line: usize) -> Result<(u64, u64), MemoryError> {
    let (a, b) = parse_range(s, line)?;
    if b < a {
        return Err(perr(
            line,
            &format!("region end {b:016x} is below its start {a:016x}"),
        ));
    }
    Ok((a, b))
}

/// Splits `(prio P, TYPE): REST` after the range; returns (prio, nv, type, rest).
fn parse_prio_type(s: &str, line: usize) -> Result<(i32, bool, String, &str), MemoryError> {
    let s = s
        .strip_prefix(" (prio ")
        .ok_or_else(|| perr(line, "expected ' (prio '"))?;
    let (prio, s) = s
        .split_once(", ")
        .ok_or_else(|| perr(line, "expected ', '"))?;
    let prio: i32 = prio.parse().map_err(|_| perr(line, "bad priority"))?;
    let (ty, rest) = s
        .split_once("): ")
        .ok_or_else(|| perr(line, "expected '): '"))?;
    let (nv, ty) = match ty.strip_prefix("nv-") {
        Some(t) => (true, t),
        None => (false, ty),
    };
    Ok((prio, nv, ty.to_string(), rest))
}

/// Parses one region line of the tree format.
pub fn parse_tree_line(text: &str, line: usize) -> Result<TreeLine, MemoryError> {
    let text = text.strip_prefix("[DETECTED OVERFLOW!] ").unwrap_or(text);
    let body = text.trim_start_matches(' ');
    let indent = text.len() - body.len();
    if !indent.is_multiple_of(2) || indent == 0 {
        return Err(perr(line, "bad indentation"));
    }
    let (range, rest) = body.split_at(body.find(' ').ok_or_else(|| perr(line, "short line"))?);
    let (start, end) = parse_span(range, line)?;
    let (priority, nonvolatile, ty, rest) = parse_prio_type(rest, line)?;
    let (rest, disabled) = match rest.strip_suffix(" [disabled]") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (name, alias) = match rest.strip_prefix("alias ") {
        Some(a) => {
            let (head, range) = a.rsplit_once(' ').ok_or_else(|| perr(line, "bad alias"))?;
            let (off, _) = parse_range(range, line)?;
            let (name, target) = head
                .rsplit_once(" @")
                .ok_or_else(|| perr(line, "alias without @target"))?;
            (name.to_string(), Some((target.to_string(), off)))
        }
        None => (rest.to_string(), None),
    };
    Ok(TreeLine {
        line,
        level: indent / 2,
        start,
        end,
        priority,
        nonvolatile,
        ty,
        name,
        alias,
        disabled,
    })
}

/// Replaces the type of a region line (used to mark QEMU dumps).
pub fn retype_line(text: &str, ty: &str) -> Option<String> {
    let open = text.find(" (prio ")?;
    let comma = open + text[open..].find(", ")?;
    let close = comma + text[comma..].find("): ")?;
    let old = &text[comma + 2..close];
    let nv = if old.starts_with("nv-") { "nv-" } else { "" };
    Some(format!("{}, {nv}{ty}{}", &text[..comma], &text[close..]))
}

/// The deepest a parsed tree may nest, counting subregion and alias steps:
/// rendering a flat view and printing walk the tree recursively, and QEMU's
/// own machines stay far below this.
pub const MAX_DEPTH: usize = 1024;

/// The most `memory-region:` sections that may share one name (QEMU prints
/// one `pci_bridge_pci` per PCI bridge, at most 256): an alias to such a name
/// weighs every candidate.
pub const MAX_SAME_NAME: usize = 1024;

/// The 1-based line of byte `offset` of `bytes`.
fn line_at(bytes: &[u8], offset: usize) -> usize {
    let before = bytes.get(..offset).unwrap_or(bytes);
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

/// A dump read from a file as text: UTF-8 without NUL bytes. Anything else
/// (a binary file) is a parse error giving the byte offset of the first bad
/// byte.
pub fn text_of(bytes: &[u8]) -> Result<&str, MemoryError> {
    let text = core::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        perr(
            line_at(bytes, at),
            &format!("not UTF-8 text: invalid byte at byte offset {at}"),
        )
    })?;
    check_no_nul(text)?;
    Ok(text)
}

fn check_no_nul(text: &str) -> Result<(), MemoryError> {
    match text.bytes().position(|b| b == 0) {
        Some(at) => Err(perr(
            line_at(text.as_bytes(), at),
            &format!("not text: NUL byte at byte offset {at}"),
        )),
        None => Ok(()),
    }
}

#[derive(Debug)]
struct Node {
    l: TreeLine,
    parent: Option<usize>,
    children: Vec<usize>,
}

#[derive(Debug, Default)]
struct Section {
    /// Line of the section's first header.
    line: usize,
    spaces: Vec<String>,
    region: Option<String>,
    root: Option<usize>,
}

/// A tree dump parsed into a fresh [`MemorySystem`].
pub struct ParsedTree {
    pub mem: MemorySystem,
    /// Address spaces in order of appearance.
    pub spaces: Vec<(String, AddressSpaceId)>,
    /// Line numbers (1-based) describing each region.
    pub lines: BTreeMap<RegionId, Vec<usize>>,
}

/// A node's address in its parent (a section root's printed start).
fn addr_of(nodes: &[Node], i: usize) -> u64 {
    match nodes[i].parent {
        Some(p) => nodes[i].l.start.wrapping_sub(nodes[p].l.start),
        None => nodes[i].l.start,
    }
}

/// A node's size (the line's end is not below its start: checked when the
/// line was parsed).
fn size_of(l: &TreeLine) -> u128 {
    u128::from(l.end - l.start) + 1
}

/// Everything that makes two printed subtrees the same region: the line
/// (address relative to the parent) and the shapes of the children, in
/// order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct ShapeKey<'a> {
    name: &'a str,
    ty: &'a str,
    priority: i32,
    disabled: bool,
    nonvolatile: bool,
    alias: Option<(&'a str, u64)>,
    size: u64,
    addr: u64,
    children: Vec<u32>,
}

/// A number per node such that two nodes have the same number exactly when
/// their subtrees print the same. Children come after their parent in
/// `nodes`, so one backward pass sees every child first.
fn shapes(nodes: &[Node]) -> Vec<u32> {
    let mut ids = alloc::vec![0u32; nodes.len()];
    let mut table: BTreeMap<ShapeKey<'_>, u32> = BTreeMap::new();
    for i in (0..nodes.len()).rev() {
        let n = &nodes[i];
        let key = ShapeKey {
            name: &n.l.name,
            ty: &n.l.ty,
            priority: n.l.priority,
            disabled: n.l.disabled,
            nonvolatile: n.l.nonvolatile,
            alias: n.l.alias.as_ref().map(|(t, o)| (t.as_str(), *o)),
            size: n.l.end - n.l.start,
            addr: addr_of(nodes, i),
            children: n.children.iter().map(|&c| ids[c]).collect(),
        };
        // At most one number per node: fits u32 for any slice that fits
        // in memory as nodes.
        let next = table.len() as u32;
        ids[i] = *table.entry(key).or_insert(next);
    }
    ids
}

/// The subtree of `n` in print (pre-)order.
fn collect(nodes: &[Node], n: usize, out: &mut Vec<usize>) {
    let mut stack = alloc::vec![n];
    while let Some(x) = stack.pop() {
        out.push(x);
        stack.extend(nodes[x].children.iter().rev().copied());
    }
}

/// Makes every node of the subtree `from` stand for the same node of the
/// identically shaped subtree `to`.
fn map_canon(nodes: &[Node], canon: &mut [usize], from: usize, to: usize) {
    let mut stack = alloc::vec![(from, to)];
    while let Some((a, b)) = stack.pop() {
        canon[a] = canon[b];
        stack.extend(
            nodes[a]
                .children
                .iter()
                .copied()
                .zip(nodes[b].children.iter().copied()),
        );
    }
}

fn kind_for(ty: &str, line: usize, counter: &mut u32) -> Result<RegionKind, MemoryError> {
    *counter = counter
        .checked_add(1)
        .ok_or_else(|| perr(line, "too many regions"))?;
    let backing = RamBacking {
        block: *counter,
        offset: 0,
    };
    Ok(match ty {
        "container" => RegionKind::Container,
        "i/o" => RegionKind::Mmio(MmioHandle(*counter)),
        "ram" => RegionKind::Ram(backing),
        "rom" => RegionKind::Rom(backing),
        "ramd" => RegionKind::RamDevice(backing),
        "romd" => RegionKind::RomDevice {
            backing,
            ops: MmioHandle(*counter),
        },
        _ => return Err(perr(line, "unknown region type")),
    })
}

/// Finds the node an alias line points at.
struct Targets<'a> {
    nodes: &'a [Node],
    /// `memory-region:` sections by name: their (canonical) root nodes.
    sections: BTreeMap<String, Vec<usize>>,
    /// The first node of each name (canonical), for a target printed in
    /// no section of its own.
    first: BTreeMap<&'a str, usize>,
    /// Child extents of candidates, by node (see [`score`]).
    spans: Vec<Option<(Vec<u128>, Vec<u128>)>>,
    /// Candidates some alias already resolved to.
    used: Vec<bool>,
}

/// How many children of candidate `c` overlap `[w0, w1)`; `spans` keeps
/// each candidate's child extents (sorted starts, sorted exclusive ends)
/// once computed.
fn score(
    nodes: &[Node],
    spans: &mut [Option<(Vec<u128>, Vec<u128>)>],
    c: usize,
    w0: u128,
    w1: u128,
) -> usize {
    let Some(slot) = spans.get_mut(c) else {
        return 0;
    };
    let (starts, ends) = slot.get_or_insert_with(|| {
        let mut s = Vec::with_capacity(nodes[c].children.len());
        let mut e = Vec::with_capacity(nodes[c].children.len());
        for &k in &nodes[c].children {
            let a = u128::from(addr_of(nodes, k));
            s.push(a);
            e.push(a + size_of(&nodes[k].l));
        }
        s.sort_unstable();
        e.sort_unstable();
        (s, e)
    });
    // Children starting before the window's end, less those that end
    // before its start (those start before its end too).
    let before_end = starts.partition_point(|&s| s < w1);
    let ended = ends.partition_point(|&e| e <= w0);
    before_end.saturating_sub(ended)
}

impl Targets<'_> {
    /// The target of alias node `n`.
    fn resolve(&mut self, n: usize) -> Result<usize, MemoryError> {
        let Targets {
            nodes,
            sections,
            first,
            spans,
            used,
        } = self;
        let l = &nodes[n].l;
        let Some((target, offset)) = &l.alias else {
            return Err(perr(l.line, "internal: not an alias"));
        };
        let is_used = |c: usize| used.get(c).copied().unwrap_or(false);
        let t = match sections.get(target.as_str()).map(Vec::as_slice) {
            Some(&[t]) => t,
            // Several distinct regions share the name (e.g. one
            // `pci_bridge_pci` per PCI bridge): pick the one with the most
            // subregions inside the alias window (bridge windows are
            // computed from the BARs behind the bridge). Aliases are
            // visited in print order, which is the order QEMU queued their
            // targets: on a tie prefer the first section no alias has
            // claimed yet, else the first.
            Some(cands) if !cands.is_empty() => {
                let w0 = u128::from(*offset);
                let w1 = w0 + size_of(l);
                // (best score, first with it, first unclaimed with it)
                let mut best: Option<(usize, usize, Option<usize>)> = None;
                for &c in cands {
                    let s = score(nodes, spans, c, w0, w1);
                    let unclaimed = (!is_used(c)).then_some(c);
                    match &mut best {
                        Some((b, _, u)) if s == *b => *u = u.or(unclaimed),
                        Some((b, _, _)) if s < *b => {}
                        _ => best = Some((s, c, unclaimed)),
                    }
                }
                let (_, first_tied, unclaimed) =
                    best.ok_or_else(|| perr(l.line, "alias target not found"))?;
                unclaimed.unwrap_or(first_tied)
            }
            _ => *first
                .get(target.as_str())
                .ok_or_else(|| perr(l.line, "alias target not found"))?,
        };
        if let Some(u) = used.get_mut(t) {
            *u = true;
        }
        Ok(t)
    }
}

/// The `i`-th outgoing edge of `n` in the region graph (children, then the
/// alias target): `None` past the last one, `Some(None)` for a missing
/// alias target.
fn edge(nodes: &[Node], target: &[Option<usize>], n: usize, i: usize) -> Option<Option<usize>> {
    let kids = &nodes[n].children;
    match i.cmp(&kids.len()) {
        core::cmp::Ordering::Less => Some(kids.get(i).copied()),
        core::cmp::Ordering::Equal => Some(target.get(n).copied().flatten()),
        core::cmp::Ordering::Greater => None,
    }
}

/// Orders the nodes reachable from `roots` so that every node comes after
/// all nodes that contain or alias it, and checks that no path is longer
/// than [`MAX_DEPTH`] or runs in a circle. Iterative: any input depth is
/// safe.
fn order_nodes(
    nodes: &[Node],
    target: &[Option<usize>],
    roots: &[usize],
) -> Result<Vec<usize>, MemoryError> {
    const NEW: u8 = 0;
    const OPEN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = alloc::vec![NEW; nodes.len()];
    let mut depth = alloc::vec![0usize; nodes.len()];
    let mut post = Vec::with_capacity(roots.len());
    for &r in roots {
        if state[r] != NEW {
            continue;
        }
        state[r] = OPEN;
        let mut stack: Vec<(usize, usize)> = alloc::vec![(r, 0)];
        while let Some(top) = stack.last_mut() {
            let (n, i) = *top;
            top.1 += 1;
            match edge(nodes, target, n, i) {
                Some(None) => {}
                Some(Some(m)) => match state[m] {
                    NEW => {
                        state[m] = OPEN;
                        stack.push((m, 0));
                    }
                    OPEN => {
                        return Err(perr(
                            nodes[n].l.line,
                            "cycle: this region contains or aliases itself",
                        ))
                    }
                    _ => {}
                },
                None => {
                    let mut d = 0;
                    let mut j = 0;
                    while let Some(e) = edge(nodes, target, n, j) {
                        if let Some(m) = e {
                            d = d.max(depth[m]);
                        }
                        j += 1;
                    }
                    depth[n] = d + 1;
                    if depth[n] > MAX_DEPTH {
                        return Err(perr(
                            nodes[n].l.line,
                            &format!(
                                "regions nest more than {MAX_DEPTH} deep (through subregions and aliases)"
                            ),
                        ));
                    }
                    state[n] = DONE;
                    post.push(n);
                    stack.pop();
                }
            }
        }
    }
    post.reverse();
    Ok(post)
}

/// Reads the lines of a tree dump into nodes and sections.
fn read_tree(text: &str) -> Result<(Vec<Node>, Vec<Section>), MemoryError> {
    check_no_nul(text)?;
    let mut nodes: Vec<Node> = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut cur: Option<Section> = None;
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        if raw.starts_with('#') {
            continue;
        }
        if raw.trim().is_empty() {
            if let Some(s) = cur.take() {
                if s.root.is_none() {
                    // Header lines followed directly by more headers: keep.
                    cur = Some(s);
                } else {
                    sections.push(s);
                }
            }
            continue;
        }
        if let Some(name) = raw.strip_prefix("address-space: ") {
            match &mut cur {
                Some(s) if s.root.is_none() && s.region.is_none() => s.spaces.push(name.into()),
                _ => {
                    if let Some(s) = cur.take() {
                        sections.push(s);
                    }
                    cur = Some(Section {
                        line: ln,
                        spaces: alloc::vec![name.into()],
                        ..Section::default()
                    });
                }
            }
            continue;
        }
        if let Some(name) = raw.strip_prefix("memory-region: ") {
            if let Some(s) = cur.take() {
                sections.push(s);
            }
            cur = Some(Section {
                line: ln,
                region: Some(name.into()),
                ..Section::default()
            });
            continue;
        }
        let l = parse_tree_line(raw, ln)?;
        let sec = cur
            .as_mut()
            .ok_or_else(|| perr(ln, "region outside a section"))?;
        let idx = nodes.len();
        if l.level == 1 {
            if sec.root.is_some() {
                return Err(perr(ln, "second root in section"));
            }
            sec.root = Some(idx);
            stack.clear();
            nodes.push(Node {
                l,
                parent: None,
                children: Vec::new(),
            });
        } else {
            if sec.root.is_none() || l.level > stack.len() + 1 {
                return Err(perr(ln, "bad nesting"));
            }
            stack.truncate(l.level - 1);
            let parent = *stack.last().ok_or_else(|| perr(ln, "bad nesting"))?;
            nodes.push(Node {
                l,
                parent: Some(parent),
                children: Vec::new(),
            });
            nodes[parent].children.push(idx);
        }
        stack.push(idx);
    }
    if let Some(s) = cur.take() {
        sections.push(s);
    }
    Ok((nodes, sections))
}

/// Parses `info mtree [-D]` output (with Tern's `container`/`rom`
/// extensions) into a new memory system: one address space per
/// `address-space:` line, alias targets resolved through the
/// `memory-region:` sections (a section that repeats a subtree already
/// printed elsewhere is the same region). Lines starting with `#` are
/// ignored.
///
/// The input may be hostile: every inconsistency is an error with its line
/// number (a binary file: see [`text_of`]), nesting (through subregions
/// and aliases) deeper than [`MAX_DEPTH`] is refused, nothing recurses, and
/// the parser's own work is O(n log n) in the size of the input, with at
/// most [`MAX_SAME_NAME`] candidates weighed per alias. (Creating the
/// address spaces is `MemorySystem::create_address_space`'s cost.)
pub fn parse_tree(text: &str) -> Result<ParsedTree, MemoryError> {
    let (nodes, sections) = read_tree(text)?;

    // Section roots of address spaces come first for identification.
    let mut canon: Vec<usize> = (0..nodes.len()).collect();
    let mut tree_nodes: Vec<usize> = Vec::new();
    for s in sections.iter().filter(|s| s.region.is_none()) {
        if let Some(r) = s.root {
            collect(&nodes, r, &mut tree_nodes);
        }
    }
    // Memory-region sections: identify with the first identical subtree
    // printed in an address-space section, or keep as a separate (detached)
    // tree. Two memory-region sections are always distinct regions (QEMU
    // queues alias targets by identity), even when they have the same name.
    let shape = shapes(&nodes);
    let mut first_of_shape: BTreeMap<u32, usize> = BTreeMap::new();
    for &n in &tree_nodes {
        first_of_shape.entry(shape[n]).or_insert(n);
    }
    let mut region_sections: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in &sections {
        let (Some(name), Some(root)) = (&s.region, s.root) else {
            continue;
        };
        match first_of_shape.get(&shape[root]) {
            Some(&c) => map_canon(&nodes, &mut canon, root, c),
            None => collect(&nodes, root, &mut tree_nodes),
        }
        let same = region_sections.entry(name.clone()).or_default();
        if same.len() >= MAX_SAME_NAME {
            return Err(perr(
                s.line,
                &format!("more than {MAX_SAME_NAME} memory-region sections named {name:?}"),
            ));
        }
        same.push(canon[root]);
    }
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        first.entry(n.l.name.as_str()).or_insert(canon[i]);
    }

    // Alias targets, in print order, following each alias chain to its end
    // (the order decides ties between same-named sections).
    let mut targets = Targets {
        nodes: &nodes,
        sections: region_sections,
        first,
        spans: alloc::vec![None; nodes.len()],
        used: alloc::vec![false; nodes.len()],
    };
    // Each step gives one more alias its target, so this ends; cycles are
    // found by `order_nodes`.
    let mut target: Vec<Option<usize>> = alloc::vec![None; nodes.len()];
    for &n in &tree_nodes {
        let mut cur = n;
        while nodes[cur].l.alias.is_some() && target[cur].is_none() {
            let t = targets.resolve(cur)?;
            target[cur] = Some(t);
            cur = t;
        }
    }
    let order = order_nodes(&nodes, &target, &tree_nodes)?;

    let mut mem = MemorySystem::new();
    // One transaction: each mutation marks only what the previous ones did
    // not, and the views are rendered once, at the commit.
    mem.begin();
    let mut ids: Vec<Option<RegionId>> = alloc::vec![None; nodes.len()];
    let mut counter = 0;
    for &n in &tree_nodes {
        let l = &nodes[n].l;
        if l.alias.is_none() {
            let kind = kind_for(&l.ty, l.line, &mut counter)?;
            ids[n] = Some(mem.create_region(&l.name, size_of(l), kind)?);
        }
    }
    let id_of = |ids: &[Option<RegionId>], n: usize| {
        ids.get(n)
            .copied()
            .flatten()
            .ok_or_else(|| perr(nodes[n].l.line, "internal: region not created"))
    };
    // Aliases after their targets (each chain from its end; `order_nodes`
    // refused cycles).
    for &n in &tree_nodes {
        let mut chain = Vec::new();
        let mut cur = n;
        while ids[cur].is_none() {
            let Some(t) = target[cur] else {
                return Err(perr(nodes[cur].l.line, "internal: region not created"));
            };
            chain.push(cur);
            cur = t;
        }
        for &a in chain.iter().rev() {
            let l = &nodes[a].l;
            let (Some((_, offset)), Some(t)) = (&l.alias, target[a]) else {
                return Err(perr(l.line, "internal: not an alias"));
            };
            let tid = id_of(&ids, t)?;
            ids[a] = Some(mem.create_alias(&l.name, size_of(l), tid, *offset)?);
        }
    }
    // Attach children, containers before what they contain and aliases
    // before their targets (so the cycle check of each attachment only
    // walks unattached regions). Desired list order is priority-descending,
    // stable over print order; adding in reverse yields that order.
    for &n in &order {
        let mut kids = nodes[n].children.clone();
        kids.sort_by(|&a, &b| nodes[b].l.priority.cmp(&nodes[a].l.priority));
        let pid = id_of(&ids, n)?;
        for &k in kids.iter().rev() {
            let cid = id_of(&ids, k)?;
            mem.add_subregion_overlap(pid, addr_of(&nodes, k), cid, nodes[k].l.priority)
                .map_err(|e| perr(nodes[k].l.line, &format!("{e:?}")))?;
        }
        if nodes[n].parent.is_none() {
            mem.set_detached_position(pid, nodes[n].l.start, nodes[n].l.priority)?;
        }
    }
    for &n in &tree_nodes {
        let l = &nodes[n].l;
        let id = id_of(&ids, n)?;
        if l.disabled {
            mem.set_enabled(id, false)?;
        }
        if l.nonvolatile {
            mem.set_nonvolatile(id, true)?;
        }
        if l.alias.is_some() && l.ty == "rom" {
            mem.set_readonly(id, true)?;
        }
    }
    mem.commit()?;
    let mut lines: BTreeMap<RegionId, Vec<usize>> = BTreeMap::new();
    for (n, node) in nodes.iter().enumerate() {
        if let Some(id) = ids.get(canon[n]).copied().flatten() {
            lines.entry(id).or_default().push(node.l.line);
        }
    }
    let mut spaces = Vec::new();
    for s in &sections {
        if let Some(root) = s.root {
            let rid = id_of(&ids, canon[root])?;
            for name in &s.spaces {
                let id = mem.create_address_space(name, rid)?;
                spaces.push((name.clone(), id));
            }
        }
    }
    Ok(ParsedTree { mem, spaces, lines })
}

/// One range of a parsed `info mtree -f` dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLine {
    pub start: u64,
    /// Inclusive end.
    pub end: u64,
    pub priority: i32,
    pub nonvolatile: bool,
    pub ty: String,
    pub name: String,
    pub offset: u64,
}

/// One `FlatView #N` block of a parsed `info mtree -f` dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlatBlock {
    /// `(address space, root name)`.
    pub spaces: Vec<(String, String)>,
    /// `None` for `(none)`.
    pub root: Option<String>,
    pub ranges: Vec<FlatLine>,
}

/// Parses `info mtree -f` output (without `-d`/`-o`).
pub fn parse_flat(text: &str) -> Result<Vec<FlatBlock>, MemoryError> {
    check_no_nul(text)?;
    let mut out: Vec<FlatBlock> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        if raw.starts_with('#') || raw.trim().is_empty() {
            continue;
        }
        if raw.starts_with("FlatView #") {
            out.push(FlatBlock::default());
            continue;
        }
        let blk = out
            .last_mut()
            .ok_or_else(|| perr(ln, "line outside FlatView"))?;
        if let Some(rest) = raw.strip_prefix(" AS \"") {
            let (name, rest) = rest
                .split_once("\", root: ")
                .ok_or_else(|| perr(ln, "bad AS line"))?;
            let root = rest.split_once(", alias ").map_or(rest, |(r, _)| r);
            blk.spaces.push((name.into(), root.into()));
        } else if let Some(root) = raw.strip_prefix(" Root memory region: ") {
            blk.root = if root == "(none)" {
                None
            } else {
                Some(root.into())
            };
        } else if raw == "  No rendered FlatView" {
        } else if let Some(body) = raw.strip_prefix("  ") {
            let (range, rest) =
                body.split_at(body.find(' ').ok_or_else(|| perr(ln, "short line"))?);
            let (start, end) = parse_span(range, ln)?;
            let (priority, nonvolatile, ty, rest) = parse_prio_type(rest, ln)?;
            // An offset suffix is " @" followed by 16 hex digits.
            let (name, offset) = match rest.rsplit_once(" @") {
                Some((n, off)) if off.len() == 16 && off.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    (
                        n,
                        u64::from_str_radix(off, 16).map_err(|_| perr(ln, "bad offset"))?,
                    )
                }
                _ => (rest, 0),
            };
            blk.ranges.push(FlatLine {
                start,
                end,
                priority,
                nonvolatile,
                ty,
                name: name.into(),
                offset,
            });
        } else {
            return Err(perr(ln, "unrecognised line"));
        }
    }
    Ok(out)
}

/// Compares Tern's current flat views of `spaces` with a parsed QEMU
/// `info mtree -f` dump, address space by address space (QEMU's block order
/// is arbitrary). Returns one message per difference (empty = identical
/// range for range: start, end, priority, type, region name, offset, and
/// the flat-view root name).
pub fn compare_flat(
    mem: &mut MemorySystem,
    spaces: &[(String, AddressSpaceId)],
    qemu: &[FlatBlock],
) -> Result<Vec<String>, MemoryError> {
    let ours = parse_flat(&format_flat(mem)?)?;
    let mut diffs = Vec::new();
    // Each address space's first block.
    let mut by_name: BTreeMap<&str, &FlatBlock> = BTreeMap::new();
    for b in &ours {
        for (n, _) in &b.spaces {
            by_name.entry(n.as_str()).or_insert(b);
        }
    }
    let tern_spaces: BTreeSet<&str> = spaces.iter().map(|(n, _)| n.as_str()).collect();
    let mut seen = BTreeSet::new();
    for blk in qemu {
        for (name, _) in &blk.spaces {
            if !seen.insert(name.as_str()) {
                continue;
            }
            if !tern_spaces.contains(name.as_str()) {
                diffs.push(format!("AS {name:?}: missing in Tern"));
                continue;
            }
            let Some(mine) = by_name.get(name.as_str()) else {
                diffs.push(format!("AS {name:?}: no Tern flat view"));
                continue;
            };
            if mine.root != blk.root {
                diffs.push(format!(
                    "AS {name:?}: root {:?} (Tern) vs {:?} (QEMU)",
                    mine.root, blk.root
                ));
            }
            let n = mine.ranges.len().max(blk.ranges.len());
            for i in 0..n {
                match (mine.ranges.get(i), blk.ranges.get(i)) {
                    (Some(a), Some(b)) if a == b => {}
                    (a, b) => {
                        diffs.push(format!("AS {name:?} range {i}: Tern {a:?} vs QEMU {b:?}"));
                        break;
                    }
                }
            }
        }
    }
    Ok(diffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "0000000000000000-0000000000000fff";

    fn parse_err(text: &str) -> (usize, String) {
        match parse_tree(text) {
            Err(MemoryError::Parse { line, msg }) => (line, msg),
            Err(e) => panic!("not a parse error: {e:?}"),
            Ok(_) => panic!("parsed"),
        }
    }

    /// `system` holds a RAM region and alias `a0`; `a0` aliases `a1`, ...,
    /// `a{n-1}` aliases the RAM region `a{n}`, each in its own section.
    /// The path system -> a0 -> ... -> a{n} is n + 2 regions deep.
    fn alias_chain(n: usize) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "address-space: memory");
        let _ = writeln!(
            t,
            "  0000000000000000-0000000000001fff (prio 0, container): system"
        );
        let _ = writeln!(t, "    {R} (prio 0, ram): alias a0 @a1 {R}");
        let _ = writeln!(
            t,
            "    0000000000001000-0000000000001fff (prio 0, ram): other\n"
        );
        for i in 1..n {
            let _ = writeln!(t, "memory-region: a{i}");
            let _ = writeln!(t, "  {R} (prio 0, ram): alias a{i} @a{} {R}\n", i + 1);
        }
        let _ = writeln!(t, "memory-region: a{n}\n  {R} (prio 0, ram): a{n}\n");
        t
    }

    #[test]
    fn mtree_alias_chain_deeper_than_the_limit_is_an_error_with_its_line() {
        let text = alias_chain(50_000);
        let (line, msg) = parse_err(&text);
        assert!(msg.contains("nest more than 1024"), "{msg}");
        // The line named is an alias of the chain.
        let l = text.lines().nth(line - 1).unwrap();
        assert!(l.contains("alias a"), "line {line}: {l}");
    }

    #[test]
    fn mtree_alias_chain_at_the_limit_parses_and_renders() {
        // system + a0..a{n-1} + a{n}: n + 2 = MAX_DEPTH.
        let n = MAX_DEPTH - 2;
        let mut p = parse_tree(&alias_chain(n)).unwrap();
        let (_, sid) = p.spaces[0];
        let view = p.mem.flat_view(sid).unwrap();
        let names: Vec<&str> = view
            .ranges()
            .iter()
            .map(|r| p.mem.region_name(r.region).unwrap())
            .collect();
        assert_eq!(names, [format!("a{n}").as_str(), "other"]);
        assert!(parse_tree(&alias_chain(n + 1)).is_err());
        // Printing walks the same depth.
        let tree = format_tree(&p.mem, true).unwrap();
        assert!(tree.contains(&format!("memory-region: a{n}\n")));
    }

    #[test]
    fn mtree_subregion_nesting_is_limited_with_its_line() {
        // c1 holds c2 (holding c3, ... down to the RAM `leaf`) and the RAM
        // `side`: two children, so the view is rendered from c1 down the
        // whole nest.
        let nest = |depth: usize| {
            let mut t = String::from(
                "address-space: memory\n  0000000000000000-0000000000001fff (prio 0, container): c1\n",
            );
            for level in 2..depth {
                let _ = writeln!(t, "{}{R} (prio 0, container): c{level}", "  ".repeat(level));
            }
            let _ = writeln!(t, "{}{R} (prio 0, ram): leaf", "  ".repeat(depth));
            t.push_str("    0000000000001000-0000000000001fff (prio 0, ram): side\n");
            t
        };
        let mut p = parse_tree(&nest(MAX_DEPTH)).unwrap();
        let (_, sid) = p.spaces[0];
        let view = p.mem.flat_view(sid).unwrap();
        let names: Vec<&str> = view
            .ranges()
            .iter()
            .map(|r| p.mem.region_name(r.region).unwrap())
            .collect();
        assert_eq!(names, ["leaf", "side"]);
        let printed = format_tree(&p.mem, true).unwrap();
        assert_eq!(printed.lines().count(), MAX_DEPTH + 3);
        let (line, msg) = parse_err(&nest(MAX_DEPTH + 1));
        assert!(msg.contains("nest more than"), "{msg}");
        // The region whose subtree is one too deep: c1.
        assert_eq!(line, 2);
    }

    #[test]
    fn mtree_alias_cycles_are_errors() {
        let two = format!(
            "address-space: memory\n  {R} (prio 0, container): system\n    {R} (prio 0, ram): alias x @a {R}\n\n\
             memory-region: a\n  {R} (prio 0, ram): alias a @b {R}\n\n\
             memory-region: b\n  {R} (prio 0, ram): alias b @a {R}\n"
        );
        let (line, msg) = parse_err(&two);
        assert_eq!(
            (line, msg.as_str()),
            (9, "cycle: this region contains or aliases itself")
        );
        // A container holding an alias of itself.
        let own = format!(
            "address-space: memory\n  {R} (prio 0, container): system\n    {R} (prio 0, container): alias x @system {R}\n"
        );
        let (line, msg) = parse_err(&own);
        assert!(msg.contains("cycle"), "{msg}");
        assert_eq!(line, 3);
    }

    #[test]
    fn mtree_100000_alias_target_sections_parse() {
        let n = 100_000u64;
        let mut t = format!(
            "address-space: memory\n  0000000000000000-{:016x} (prio 0, container): system\n",
            n * 0x1000 - 1
        );
        for i in 0..n {
            let s = i * 0x1000;
            let _ = writeln!(
                t,
                "    {s:016x}-{:016x} (prio 0, ram): alias a{i} @t{i} {R}",
                s + 0xfff
            );
        }
        t.push('\n');
        for i in 0..n {
            let _ = writeln!(t, "memory-region: t{i}\n  {R} (prio 0, ram): t{i}\n");
        }
        let mut p = parse_tree(&t).unwrap();
        assert_eq!(p.mem.region_count(), 1 + 2 * n as usize);
        let (_, sid) = p.spaces[0];
        let view = p.mem.flat_view(sid).unwrap();
        assert_eq!(view.ranges().len(), n as usize);
        let last = view.ranges().last().unwrap();
        assert_eq!(p.mem.region_name(last.region).unwrap(), "t99999");
        assert_eq!(last.start, (n - 1) * 0x1000);
    }

    #[test]
    fn mtree_100000_address_space_sections_parse() {
        let mut t = String::new();
        for i in 0..100_000 {
            let _ = writeln!(t, "address-space: as{i}\n  {R} (prio 0, ram): r{i}\n");
        }
        let p = parse_tree(&t).unwrap();
        assert_eq!(p.spaces.len(), 100_000);
        assert_eq!(p.spaces[99_999].0, "as99999");
    }

    #[test]
    fn mtree_same_named_sections_are_chosen_by_window_and_bounded() {
        // Two `bridge` regions, one with a child in 0x0-0xfff, the other in
        // 0x8000-0x8fff; each alias gets the one with a child in its window.
        let text =
            "address-space: memory\n  0000000000000000-000000000000ffff (prio 0, container): system\n\
             \x20   0000000000000000-0000000000000fff (prio 0, container): alias lo @bridge 0000000000008000-0000000000008fff\n\
             \x20   0000000000001000-0000000000001fff (prio 0, container): alias hi @bridge 0000000000000000-0000000000000fff\n\n\
             memory-region: bridge\n  0000000000000000-000000000000ffff (prio 0, container): bridge\n\
             \x20   0000000000000000-0000000000000fff (prio 0, ram): first\n\n\
             memory-region: bridge\n  0000000000000000-000000000000ffff (prio 0, container): bridge\n\
             \x20   0000000000008000-0000000000008fff (prio 0, ram): second\n";
        let mut p = parse_tree(text).unwrap();
        let (_, sid) = p.spaces[0];
        let view = p.mem.flat_view(sid).unwrap();
        let names: Vec<(u64, &str)> = view
            .ranges()
            .iter()
            .map(|r| (r.start, p.mem.region_name(r.region).unwrap()))
            .collect();
        assert_eq!(names, [(0, "second"), (0x1000, "first")]);

        let mut many = format!("address-space: memory\n  {R} (prio 0, container): system\n\n");
        for i in 0..=MAX_SAME_NAME {
            let _ = writeln!(many, "memory-region: x\n  {R} (prio 0, ram): x{i}\n");
        }
        let (line, msg) = parse_err(&many);
        assert!(msg.contains("memory-region sections named \"x\""), "{msg}");
        assert_eq!(many.lines().nth(line - 1), Some("memory-region: x"));
        assert_eq!(line, 4 + 3 * MAX_SAME_NAME);
    }

    #[test]
    fn mtree_binary_input_is_refused_with_its_byte_offset() {
        let good = format!("address-space: memory\n  {R} (prio 0, ram): r\n");
        assert!(text_of(good.as_bytes()).is_ok());
        let mut bytes = good.clone().into_bytes();
        bytes[30] = 0xff;
        let e = text_of(&bytes).unwrap_err().to_string();
        assert_eq!(e, "line 2: not UTF-8 text: invalid byte at byte offset 30");
        let mut bytes = good.into_bytes();
        bytes[25] = 0;
        let e = text_of(&bytes).unwrap_err().to_string();
        assert_eq!(e, "line 2: not text: NUL byte at byte offset 25");
        let text = core::str::from_utf8(&bytes).unwrap();
        assert_eq!(parse_tree(text).err().unwrap().to_string(), e);
        let flat = "FlatView #0\n AS \"m\", root: s\0\n";
        let at = flat.find('\0').unwrap();
        assert_eq!(
            parse_flat(flat).unwrap_err().to_string(),
            format!("line 2: not text: NUL byte at byte offset {at}")
        );
    }

    #[test]
    fn mtree_region_ending_below_its_start_is_an_error() {
        let text = "address-space: memory\n  0000000000002000-0000000000000fff (prio 0, ram): r\n";
        let (line, msg) = parse_err(text);
        assert_eq!(line, 2);
        assert!(msg.contains("below its start"), "{msg}");
        // A one-byte region (end = start) is fine.
        let one = "address-space: memory\n  0000000000002000-0000000000002000 (prio 0, ram): r\n";
        let p = parse_tree(one).unwrap();
        let id = p.mem.address_space_root(p.spaces[0].1).unwrap();
        assert_eq!(p.mem.region(id).unwrap().size, 1);
        let flat = "FlatView #0\n Root memory region: r\n  0000000000002000-0000000000000fff (prio 0, ram): r\n";
        assert_eq!(
            parse_flat(flat).unwrap_err().to_string(),
            "line 3: region end 0000000000000fff is below its start 0000000000002000"
        );
    }
}
