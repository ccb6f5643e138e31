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
    let mut queue: Vec<RegionId> = Vec::new();
    // Group address spaces by root region, in order of first appearance.
    let mut groups: Vec<(RegionId, Vec<String>)> = Vec::new();
    for id in mem.address_spaces() {
        let root = mem.address_space_root(id)?;
        let name = mem.address_space_name(id)?.to_string();
        match groups.iter_mut().find(|(r, _)| *r == root) {
            Some((_, names)) => names.push(name),
            None => groups.push((root, alloc::vec![name])),
        }
    }
    for (root, mut names) in groups {
        names.sort();
        for n in names {
            let _ = writeln!(out, "address-space: {n}");
        }
        print_mr(&mut out, mem, root, 1, 0, &mut queue, show_disabled)?;
        out.push('\n');
    }
    let mut i = 0;
    while i < queue.len() {
        let mr = queue[i];
        let _ = writeln!(out, "memory-region: {}", mem.get(mr)?.name);
        print_mr(&mut out, mem, mr, 1, 0, &mut queue, show_disabled)?;
        out.push('\n');
        i += 1;
    }
    Ok(out)
}

fn print_mr(
    out: &mut String,
    mem: &MemorySystem,
    id: RegionId,
    level: usize,
    base: u64,
    queue: &mut Vec<RegionId>,
    show_disabled: bool,
) -> Result<(), MemoryError> {
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
        if !queue.contains(&target) {
            queue.push(target);
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
    for (_, _, s) in subs {
        print_mr(out, mem, s, level + 1, cur_start, queue, show_disabled)?;
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
    for (id, v) in views {
        match groups.iter_mut().find(|(g, _)| Rc::ptr_eq(g, v)) {
            Some((_, ids)) => ids.push(*id),
            None => groups.push((v.clone(), alloc::vec![*id])),
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
    let (start, end) = parse_range(range, line)?;
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

#[derive(Debug)]
struct Node {
    l: TreeLine,
    parent: Option<usize>,
    children: Vec<usize>,
}

#[derive(Debug, Default)]
struct Section {
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

fn addr_of(nodes: &[Node], i: usize) -> u64 {
    match nodes[i].parent {
        Some(p) => nodes[i].l.start.wrapping_sub(nodes[p].l.start),
        None => nodes[i].l.start,
    }
}

fn same_shape(nodes: &[Node], a: usize, b: usize) -> bool {
    let (x, y) = (&nodes[a], &nodes[b]);
    x.l.name == y.l.name
        && x.l.ty == y.l.ty
        && x.l.priority == y.l.priority
        && x.l.disabled == y.l.disabled
        && x.l.nonvolatile == y.l.nonvolatile
        && x.l.alias == y.l.alias
        && x.l.end.wrapping_sub(x.l.start) == y.l.end.wrapping_sub(y.l.start)
        && addr_of(nodes, a) == addr_of(nodes, b)
        && x.children.len() == y.children.len()
        && x.children
            .iter()
            .zip(&y.children)
            .all(|(&c, &d)| same_shape(nodes, c, d))
}

fn kind_for(ty: &str, line: usize, counter: &mut u32) -> Result<RegionKind, MemoryError> {
    *counter += 1;
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

/// Parses `info mtree [-D]` output (with Tern's `container`/`rom`
/// extensions) into a new memory system: one address space per
/// `address-space:` line, alias targets resolved through the
/// `memory-region:` sections (a section that repeats a subtree already
/// printed elsewhere is the same region). Lines starting with `#` are
/// ignored.
pub fn parse_tree(text: &str) -> Result<ParsedTree, MemoryError> {
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

    // Section roots of address spaces come first for identification.
    let mut canon: Vec<usize> = (0..nodes.len()).collect();
    let mut tree_nodes: Vec<usize> = Vec::new();
    for s in sections.iter().filter(|s| s.region.is_none()) {
        if let Some(r) = s.root {
            collect(&nodes, r, &mut tree_nodes);
        }
    }
    // Memory-region sections: identify with an identical subtree printed in
    // an address-space section, or keep as a separate (detached) tree. Two
    // memory-region sections are always distinct regions (QEMU queues alias
    // targets by identity), even when they have the same name.
    let as_nodes = tree_nodes.clone();
    let mut region_sections: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for s in sections.iter().filter(|s| s.region.is_some()) {
        let Some(root) = s.root else { continue };
        let name = s.region.clone().unwrap_or_default();
        let found = as_nodes
            .iter()
            .copied()
            .find(|&c| nodes[c].l.name == nodes[root].l.name && same_shape(&nodes, c, root));
        match found {
            Some(c) => map_canon(&nodes, &mut canon, root, c),
            None => collect(&nodes, root, &mut tree_nodes),
        }
        region_sections.entry(name).or_default().push(canon[root]);
    }

    let mut mem = MemorySystem::new();
    let mut ids: BTreeMap<usize, RegionId> = BTreeMap::new();
    let mut counter = 0;
    for &n in &tree_nodes {
        let l = &nodes[n].l;
        if l.alias.is_none() {
            let size = l.end.wrapping_sub(l.start) as u128 + 1;
            let kind = kind_for(&l.ty, l.line, &mut counter)?;
            let id = mem.create_region(&l.name, size, kind)?;
            ids.insert(n, id);
        }
    }
    let (mut busy, mut used) = (BTreeSet::new(), BTreeSet::new());
    for &n in &tree_nodes {
        create_alias(
            &nodes,
            n,
            &region_sections,
            &mut mem,
            &mut ids,
            &mut busy,
            &mut used,
        )?;
    }
    // Attach children: desired list order is priority-descending, stable
    // over print order; adding in reverse yields that order.
    for &n in &tree_nodes {
        let mut kids = nodes[n].children.clone();
        kids.sort_by(|&a, &b| nodes[b].l.priority.cmp(&nodes[a].l.priority));
        let pid = ids[&n];
        for &k in kids.iter().rev() {
            let cid = ids[&k];
            mem.add_subregion_overlap(pid, addr_of(&nodes, k), cid, nodes[k].l.priority)
                .map_err(|e| perr(nodes[k].l.line, &format!("{e:?}")))?;
        }
        if nodes[n].parent.is_none() {
            mem.set_detached_position(pid, nodes[n].l.start, nodes[n].l.priority)?;
        }
    }
    for &n in &tree_nodes {
        let l = &nodes[n].l;
        let id = ids[&n];
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
    let mut lines: BTreeMap<RegionId, Vec<usize>> = BTreeMap::new();
    for (n, node) in nodes.iter().enumerate() {
        if let Some(&id) = ids.get(&canon[n]) {
            lines.entry(id).or_default().push(node.l.line);
        }
    }
    let mut spaces = Vec::new();
    for s in &sections {
        if let Some(root) = s.root {
            for name in &s.spaces {
                let id = mem.create_address_space(name, ids[&canon[root]])?;
                spaces.push((name.clone(), id));
            }
        }
    }
    Ok(ParsedTree { mem, spaces, lines })
}

fn collect(nodes: &[Node], n: usize, out: &mut Vec<usize>) {
    out.push(n);
    for &c in &nodes[n].children {
        collect(nodes, c, out);
    }
}

fn map_canon(nodes: &[Node], canon: &mut [usize], from: usize, to: usize) {
    canon[from] = canon[to];
    for (&a, &b) in nodes[from].children.iter().zip(&nodes[to].children) {
        map_canon(nodes, canon, a, b);
    }
}

fn create_alias(
    nodes: &[Node],
    n: usize,
    sections: &BTreeMap<String, Vec<usize>>,
    mem: &mut MemorySystem,
    ids: &mut BTreeMap<usize, RegionId>,
    busy: &mut BTreeSet<usize>,
    used: &mut BTreeSet<usize>,
) -> Result<RegionId, MemoryError> {
    if let Some(&id) = ids.get(&n) {
        return Ok(id);
    }
    let l = &nodes[n].l;
    let Some((target, offset)) = &l.alias else {
        return Err(perr(l.line, "internal: region not created"));
    };
    if !busy.insert(n) {
        return Err(perr(l.line, "alias cycle"));
    }
    let size = l.end.wrapping_sub(l.start) as u128 + 1;
    let t = match sections.get(target).map(Vec::as_slice) {
        Some([t]) => *t,
        // Several distinct regions share the name (e.g. one `pci_bridge_pci`
        // per PCI bridge): pick the one with the most subregions inside the
        // alias window (bridge windows are computed from the BARs behind
        // the bridge); ties go to the first.
        Some(cands) if !cands.is_empty() => {
            let window = (*offset as u128, *offset as u128 + size);
            let score = |&c: &usize| {
                nodes[c]
                    .children
                    .iter()
                    .filter(|&&k| {
                        let s = addr_of(nodes, k) as u128;
                        let e = s + nodes[k].l.end.wrapping_sub(nodes[k].l.start) as u128 + 1;
                        s < window.1 && e > window.0
                    })
                    .count()
            };
            // Aliases are visited in print order, which is the order QEMU
            // queued their targets: on a tie prefer a section no alias has
            // claimed yet.
            let best = cands.iter().map(score).max().unwrap_or(0);
            let mut tied = cands.iter().filter(|c| score(c) == best);
            let first = *tied
                .clone()
                .next()
                .ok_or_else(|| perr(l.line, "alias target not found"))?;
            tied.find(|c| !used.contains(*c)).copied().unwrap_or(first)
        }
        _ => nodes
            .iter()
            .position(|x| &x.l.name == target)
            .ok_or_else(|| perr(l.line, "alias target not found"))?,
    };
    used.insert(t);
    let tid = create_alias(nodes, t, sections, mem, ids, busy, used)?;
    let id = mem.create_alias(&l.name, size, tid, *offset)?;
    ids.insert(n, id);
    busy.remove(&n);
    Ok(id)
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
            let (start, end) = parse_range(range, ln)?;
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
    let by_name = |blocks: &[FlatBlock], name: &str| -> Option<FlatBlock> {
        blocks
            .iter()
            .find(|b| b.spaces.iter().any(|(n, _)| n == name))
            .cloned()
    };
    let mut seen = BTreeSet::new();
    for blk in qemu {
        for (name, _) in &blk.spaces {
            if !seen.insert(name.clone()) {
                continue;
            }
            if !spaces.iter().any(|(n, _)| n == name) {
                diffs.push(format!("AS {name:?}: missing in Tern"));
                continue;
            }
            let Some(mine) = by_name(&ours, name) else {
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
