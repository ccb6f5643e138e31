//! PCI as firmware sees it: configuration mechanism #1 (ports 0xCF8/0xCFC)
//! and ECAM for bus 0, enumeration of every slot and function, BAR sizing
//! and assignment, the capability list and MSI-X set-up.
//!
//! BARs are assigned the way SeaBIOS does it: every BAR of every function
//! is sized first (decoding off, all ones written, read back, original
//! restored), then the BARs are placed largest first, each naturally
//! aligned, into three windows: I/O from 0xC000, 32-bit memory from
//! 0xD000_0000 (below 0xFE00_0000), 64-bit memory either in the same
//! window or, with `bar64=high`, from 7 GiB (below 8 GiB, the end of the
//! guest's identity map). Every read-back is checked.

use crate::hw;
use crate::io;
use boot::BootInfo;
use core::fmt::{self, Write};

macro_rules! say {
    ($($t:tt)*) => { let _ = writeln!(io::Serial, $($t)*); };
}

macro_rules! bail {
    ($what:expr, $($t:tt)*) => {{
        say!("guest: {}: {}", $what, format_args!($($t)*));
        return Err($what);
    }};
}

pub type R<T = ()> = Result<T, &'static str>;

/// ECAM base (bus 0 only: 1 MiB).
pub const ECAM_BASE: u64 = 0xB000_0000;
/// The most functions kept.
pub const MAX_FUNCS: usize = 64;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_MASTER: u16 = 1 << 2;
pub const CMD_INTX_OFF: u16 = 1 << 10;
const STATUS_CAPS: u16 = 1 << 4;

pub const CAP_MSIX: u8 = 0x11;
pub const CAP_VENDOR: u8 = 0x09;

/// Bus, device (slot), function.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

impl Bdf {
    fn cf8(self, off: u8) -> u32 {
        0x8000_0000
            | u32::from(self.bus) << 16
            | u32::from(self.dev & 0x1F) << 11
            | u32::from(self.func & 7) << 8
            | u32::from(off & 0xFC)
    }

    fn ecam(self, off: u16) -> u64 {
        ECAM_BASE
            + (u64::from(self.bus) << 20)
            + (u64::from(self.dev & 0x1F) << 15)
            + (u64::from(self.func & 7) << 12)
            + u64::from(off & 0xFFC)
    }
}

pub fn read32(b: Bdf, off: u8) -> u32 {
    io::outl(0xCF8, b.cf8(off));
    hw::inl(0xCFC)
}

pub fn read16(b: Bdf, off: u8) -> u16 {
    io::outl(0xCF8, b.cf8(off));
    hw::inw(0xCFC + u16::from(off & 2))
}

pub fn read8(b: Bdf, off: u8) -> u8 {
    io::outl(0xCF8, b.cf8(off));
    io::inb(0xCFC + u16::from(off & 3))
}

pub fn write32(b: Bdf, off: u8, v: u32) {
    io::outl(0xCF8, b.cf8(off));
    io::outl(0xCFC, v);
}

pub fn write16(b: Bdf, off: u8, v: u16) {
    io::outl(0xCF8, b.cf8(off));
    io::outw(0xCFC + u16::from(off & 2), v);
}

/// A dword of configuration space through ECAM.
pub fn ecam_read32(b: Bdf, off: u16) -> u32 {
    hw::rd32(b.ecam(off))
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub enum BarKind {
    #[default]
    None,
    Io,
    Mem32,
    Mem64,
}

/// One BAR after sizing (and, later, assignment). A 64-bit BAR occupies
/// its slot and the next; the next slot is then `None`.
#[derive(Clone, Copy, Default)]
pub struct Bar {
    pub kind: BarKind,
    pub prefetch: bool,
    pub size: u64,
    pub addr: u64,
}

impl Bar {
    pub const ZERO: Bar = Bar {
        kind: BarKind::None,
        prefetch: false,
        size: 0,
        addr: 0,
    };

    pub fn is_mem(&self) -> bool {
        matches!(self.kind, BarKind::Mem32 | BarKind::Mem64)
    }
}

/// One PCI function.
#[derive(Clone, Copy, Default)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
    pub rev: u8,
    /// Header type without the multi-function bit.
    pub header: u8,
    pub bars: [Bar; 6],
}

impl Function {
    pub const ZERO: Function = Function {
        bdf: Bdf {
            bus: 0,
            dev: 0,
            func: 0,
        },
        vendor: 0,
        device: 0,
        class: [0; 3],
        rev: 0,
        header: 0,
        bars: [Bar::ZERO; 6],
    };
}

/// The functions found on bus 0, in slot and function order.
pub struct Bus {
    funcs: [Function; MAX_FUNCS],
    len: usize,
}

impl Bus {
    pub fn functions(&self) -> &[Function] {
        &self.funcs[..self.len]
    }

    /// Scans all 32 slots of bus 0, function 0 and, for multi-function
    /// devices, functions 1-7. Prints each function.
    pub fn scan() -> R<Bus> {
        let mut bus = Bus {
            funcs: [Function::default(); MAX_FUNCS],
            len: 0,
        };
        for dev in 0..32u8 {
            let f0 = Bdf {
                bus: 0,
                dev,
                func: 0,
            };
            if read16(f0, 0) == 0xFFFF {
                continue;
            }
            let multi = read8(f0, 0x0E) & 0x80 != 0;
            for func in 0..if multi { 8 } else { 1 } {
                let b = Bdf { bus: 0, dev, func };
                let id = read32(b, 0);
                if id & 0xFFFF == 0xFFFF {
                    continue;
                }
                if id >> 16 == 0xFFFF {
                    bail!("bad device ID", "{b}: vendor/device dword {id:#010x}");
                }
                let cr = read32(b, 0x08);
                let f = Function {
                    bdf: b,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class: [(cr >> 24) as u8, (cr >> 16) as u8, (cr >> 8) as u8],
                    rev: cr as u8,
                    header: read8(b, 0x0E) & 0x7F,
                    bars: [Bar::default(); 6],
                };
                say!(
                    "guest: pci {b} {:04x}:{:04x} class {:02x}:{:02x}:{:02x} rev {:#04x} header {:#04x}{}",
                    f.vendor,
                    f.device,
                    f.class[0],
                    f.class[1],
                    f.class[2],
                    f.rev,
                    f.header,
                    if multi { " multi-function" } else { "" }
                );
                let Some(slot) = bus.funcs.get_mut(bus.len) else {
                    bail!("too many PCI functions", "more than {MAX_FUNCS}");
                };
                *slot = f;
                bus.len += 1;
            }
        }
        Ok(bus)
    }

    /// Sizes every BAR of every function (decoding off while sizing).
    pub fn size_bars(&mut self) -> R {
        for f in &mut self.funcs[..self.len] {
            let nbars = match f.header {
                0 => 6,
                1 => 2,
                _ => {
                    say!(
                        "guest: pci {}: header type {:#x}, BARs left alone",
                        f.bdf,
                        f.header
                    );
                    continue;
                }
            };
            let cmd = read16(f.bdf, 0x04);
            write16(f.bdf, 0x04, cmd & !(CMD_IO | CMD_MEM));
            let r = size_function(f, nbars);
            write16(f.bdf, 0x04, cmd & !(CMD_IO | CMD_MEM));
            r?;
        }
        Ok(())
    }

    /// Places every sized BAR, largest first, writes it, enables decoding
    /// and bus mastering, and checks the result through CF8 and ECAM.
    pub fn assign_bars(&mut self, info: &BootInfo, bar64_high: bool) -> R {
        // (size, function index, BAR index); sorted by size, largest first.
        let mut order = [(0u64, 0usize, 0usize); MAX_FUNCS * 6];
        let mut n = 0;
        for (fi, f) in self.funcs[..self.len].iter().enumerate() {
            for (bi, b) in f.bars.iter().enumerate() {
                if b.kind != BarKind::None {
                    order[n] = (b.size, fi, bi);
                    n += 1;
                }
            }
        }
        let order = &mut order[..n];
        // Insertion sort: stable, no allocation, n is small.
        for i in 1..order.len() {
            let mut j = i;
            while j > 0 && order[j - 1].0 < order[j].0 {
                order.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut io_win = Window::new("I/O", 0xC000, 0x1_0000);
        let mut mem32 = Window::new("32-bit memory", 0xD000_0000, 0xFE00_0000);
        let mut mem64_high = Window::new("64-bit memory", 0x1_C000_0000, hw::MAPPED_END);
        for &(_, fi, bi) in order.iter() {
            let f = &mut self.funcs[fi];
            let bar = &mut f.bars[bi];
            let win = match bar.kind {
                BarKind::Io => &mut io_win,
                BarKind::Mem64 if bar64_high => &mut mem64_high,
                _ => &mut mem32,
            };
            bar.addr = win.take(bar.size)?;
            if bar.is_mem() {
                check_not_ram(info, bar.addr, bar.size)?;
            }
            let off = 0x10 + 4 * bi as u8;
            let low_bits = match bar.kind {
                BarKind::Io => 1,
                BarKind::Mem32 => u32::from(bar.prefetch) << 3,
                _ => 4 | u32::from(bar.prefetch) << 3,
            };
            write32(f.bdf, off, bar.addr as u32 | low_bits);
            if bar.kind == BarKind::Mem64 {
                write32(f.bdf, off + 4, (bar.addr >> 32) as u32);
            }
            let mut got = u64::from(read32(f.bdf, off));
            let mask = if bar.kind == BarKind::Io { !3 } else { !0xF };
            if bar.kind == BarKind::Mem64 {
                got |= u64::from(read32(f.bdf, off + 4)) << 32;
            }
            let kind = bar.kind;
            say!(
                "guest: pci {} BAR{bi} {}{} size {:#x} -> {:#x}",
                f.bdf,
                match kind {
                    BarKind::Io => "io",
                    BarKind::Mem32 => "mem32",
                    _ => "mem64",
                },
                if bar.prefetch { " prefetchable" } else { "" },
                bar.size,
                bar.addr
            );
            let io_mask = if kind == BarKind::Io {
                0xFFFF
            } else {
                u64::MAX
            };
            if got & mask & io_mask != bar.addr {
                bail!(
                    "BAR does not hold its address",
                    "{} BAR{bi}: wrote {:#x}, read {got:#x}",
                    f.bdf,
                    bar.addr
                );
            }
        }
        for f in &self.funcs[..self.len] {
            let io = f.bars.iter().any(|b| b.kind == BarKind::Io);
            let mem = f.bars.iter().any(|b| b.is_mem());
            let mut cmd = read16(f.bdf, 0x04) | CMD_MASTER;
            if io {
                cmd |= CMD_IO;
            }
            if mem {
                cmd |= CMD_MEM;
            }
            write16(f.bdf, 0x04, cmd);
            let got = read16(f.bdf, 0x04);
            let want = cmd & (CMD_IO | CMD_MEM);
            if got & want != want {
                bail!(
                    "decoding not enabled",
                    "{}: wrote COMMAND {cmd:#06x}, read {got:#06x}",
                    f.bdf
                );
            }
            // The same registers through ECAM: IDs, class, BARs, subsystem.
            for off in [0x00u8, 0x08, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x2C] {
                let (p, e) = (read32(f.bdf, off), ecam_read32(f.bdf, off.into()));
                if p != e {
                    bail!(
                        "ECAM differs from CF8/CFC",
                        "{} offset {off:#x}: CF8 {p:#010x}, ECAM {e:#010x}",
                        f.bdf
                    );
                }
            }
        }
        say!(
            "guest: pci: BARs assigned (I/O up to {:#x}, below 4 GiB up to {:#x}{}); ECAM agrees with CF8/CFC",
            io_win.next,
            mem32.next,
            if bar64_high { ", 64-bit from 7 GiB" } else { "" }
        );
        Ok(())
    }
}

/// Sizes the BARs of one function (decoding is off).
fn size_function(f: &mut Function, nbars: usize) -> R {
    let mut bi = 0;
    while bi < nbars {
        let off = 0x10 + 4 * bi as u8;
        let orig = read32(f.bdf, off);
        write32(f.bdf, off, 0xFFFF_FFFF);
        let rb = read32(f.bdf, off);
        write32(f.bdf, off, orig);
        let back = read32(f.bdf, off);
        if back != orig {
            bail!(
                "BAR not restored after sizing",
                "{} BAR{bi}: had {orig:#010x}, reads {back:#010x}",
                f.bdf
            );
        }
        if rb == 0 {
            bi += 1;
            continue;
        }
        // The type bits are hard-wired: all ones must not change them.
        let ty_mask = if rb & 1 == 1 { 0x3 } else { 0xF };
        if (rb ^ orig) & ty_mask != 0 {
            bail!(
                "BAR type bits changed by sizing",
                "{} BAR{bi}: had {orig:#010x}, all ones read {rb:#010x}",
                f.bdf
            );
        }
        let bar = if rb & 1 == 1 {
            // I/O: bits 31:2; devices may decode only 16 bits.
            let mask = u64::from(rb & !3) | 0xFFFF_FFFF_0000_0000;
            let mask = if rb >> 16 == 0 {
                mask | 0xFFFF_0000
            } else {
                mask
            };
            Bar {
                kind: BarKind::Io,
                prefetch: false,
                size: size_of_mask(f.bdf, bi, mask)?,
                addr: 0,
            }
        } else {
            let prefetch = rb & 8 != 0;
            match (rb >> 1) & 3 {
                0 => Bar {
                    kind: BarKind::Mem32,
                    prefetch,
                    size: size_of_mask(f.bdf, bi, u64::from(rb & !0xF) | 0xFFFF_FFFF_0000_0000)?,
                    addr: 0,
                },
                2 => {
                    if bi + 1 >= nbars {
                        bail!("64-bit BAR in the last slot", "{} BAR{bi}", f.bdf);
                    }
                    let hoff = off + 4;
                    let horig = read32(f.bdf, hoff);
                    write32(f.bdf, hoff, 0xFFFF_FFFF);
                    let hrb = read32(f.bdf, hoff);
                    write32(f.bdf, hoff, horig);
                    if read32(f.bdf, hoff) != horig {
                        bail!("BAR not restored after sizing", "{} BAR{}", f.bdf, bi + 1);
                    }
                    let mask = u64::from(hrb) << 32 | u64::from(rb & !0xF);
                    Bar {
                        kind: BarKind::Mem64,
                        prefetch,
                        size: size_of_mask(f.bdf, bi, mask)?,
                        addr: 0,
                    }
                }
                t => bail!("reserved memory BAR type", "{} BAR{bi}: type {t}", f.bdf),
            }
        };
        if bar.kind == BarKind::Io && bar.size > 0x100 {
            bail!(
                "I/O BAR too large",
                "{} BAR{bi}: {:#x} bytes",
                f.bdf,
                bar.size
            );
        }
        f.bars[bi] = bar;
        bi += if bar.kind == BarKind::Mem64 { 2 } else { 1 };
    }
    Ok(())
}

/// The size a sizing read-back (widened to 64 bits, the bits the BAR
/// cannot hold set) describes; the writable bits must be contiguous from
/// the top.
fn size_of_mask(b: Bdf, bi: usize, mask: u64) -> R<u64> {
    let size = mask & mask.wrapping_neg();
    if size == 0 || mask | (size - 1) != u64::MAX {
        bail!(
            "BAR sizing read-back is not a size",
            "{b} BAR{bi}: mask {mask:#x}"
        );
    }
    Ok(size)
}

/// One address window that BARs are placed in.
struct Window {
    name: &'static str,
    next: u64,
    limit: u64,
}

impl Window {
    fn new(name: &'static str, start: u64, limit: u64) -> Self {
        Window {
            name,
            next: start,
            limit,
        }
    }

    fn take(&mut self, size: u64) -> R<u64> {
        let at = self
            .next
            .checked_next_multiple_of(size)
            .filter(|a| a.checked_add(size).is_some_and(|e| e <= self.limit));
        let Some(at) = at else {
            bail!(
                "BAR window full",
                "{} window: {size:#x} bytes do not fit between {:#x} and {:#x}",
                self.name,
                self.next,
                self.limit
            );
        };
        self.next = at + size;
        Ok(at)
    }
}

/// A BAR must not cover anything the memory map describes.
fn check_not_ram(info: &BootInfo, addr: u64, size: u64) -> R {
    for r in info.memory.iter() {
        if addr < r.start.saturating_add(r.len) && r.start < addr + size {
            bail!(
                "BAR overlaps the memory map",
                "[{addr:#x}, +{size:#x}) overlaps {:?} [{:#x}, +{:#x})",
                r.kind,
                r.start,
                r.len
            );
        }
    }
    Ok(())
}

/// Walks the capability list; calls `found(id, offset)` for each entry.
/// A list that loops or points into the header is an error.
pub fn for_each_cap(b: Bdf, mut found: impl FnMut(u8, u8) -> R) -> R {
    if read16(b, 0x06) & STATUS_CAPS == 0 {
        return Ok(());
    }
    let mut at = read8(b, 0x34) & 0xFC;
    let mut steps = 0;
    while at != 0 {
        if at < 0x40 {
            bail!("capability pointer into the header", "{b}: {at:#x}");
        }
        steps += 1;
        if steps > 48 {
            bail!("capability list loops", "{b}: still going at {at:#x}");
        }
        found(read8(b, at), at)?;
        at = read8(b, at + 1) & 0xFC;
    }
    Ok(())
}

/// A function's MSI-X table, once set up.
#[derive(Clone, Copy, Default)]
pub struct MsiX {
    pub entries: u16,
    pub table: u64,
    pub table_bar: u8,
    pub table_off: u32,
    pub pba: u64,
    pub pba_bar: u8,
    pub pba_off: u32,
}

impl MsiX {
    pub const ZERO: MsiX = MsiX {
        entries: 0,
        table: 0,
        table_bar: 0,
        table_off: 0,
        pba: 0,
        pba_bar: 0,
        pba_off: 0,
    };
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_MASKALL: u16 = 1 << 14;

/// The local APIC's MSI address (destination APIC ID 0, physical).
pub const MSI_ADDR: u32 = 0xFEE0_0000;

/// Finds the MSI-X capability, locates the table and the PBA through it,
/// points every entry at `vector` (fixed, edge, APIC 0), unmasks them and
/// enables MSI-X (function mask cleared). Checks every read-back, and that
/// nothing is pending.
pub fn msix_setup(f: &Function, vector: u8) -> R<MsiX> {
    let b = f.bdf;
    let mut cap = 0;
    for_each_cap(b, |id, at| {
        if id == CAP_MSIX && cap == 0 {
            cap = at;
        }
        Ok(())
    })?;
    if cap == 0 {
        bail!("no MSI-X capability", "{b}");
    }
    let ctl = read16(b, cap + 2);
    let entries = (ctl & 0x7FF) + 1;
    let locate = |what: &'static str, reg: u32, len: u64| -> R<(u64, u8, u32)> {
        let bir = (reg & 7) as u8;
        let off = reg & !7;
        let Some(bar) = f.bars.get(usize::from(bir)).filter(|b| b.is_mem()) else {
            bail!(
                "MSI-X structure not in a memory BAR",
                "{b}: {what} in BAR{bir}"
            );
        };
        if u64::from(off) + len > bar.size {
            bail!(
                "MSI-X structure outside its BAR",
                "{b}: {what} at BAR{bir}+{off:#x}, {len:#x} bytes, BAR is {:#x}",
                bar.size
            );
        }
        Ok((bar.addr + u64::from(off), bir, off))
    };
    let (table, table_bar, table_off) =
        locate("table", read32(b, cap + 4), u64::from(entries) * 16)?;
    let (pba, pba_bar, pba_off) = locate(
        "PBA",
        read32(b, cap + 8),
        u64::from(entries).div_ceil(64) * 8,
    )?;
    let table_end = table + u64::from(entries) * 16;
    let pba_end = pba + u64::from(entries).div_ceil(64) * 8;
    if table < pba_end && pba < table_end {
        bail!(
            "MSI-X table and PBA overlap",
            "{b}: table [{table:#x}, {table_end:#x}), PBA [{pba:#x}, {pba_end:#x})"
        );
    }
    if ctl & MSIX_ENABLE != 0 {
        bail!("MSI-X enabled before the driver", "{b}: control {ctl:#06x}");
    }
    write16(b, cap + 2, ctl | MSIX_ENABLE | MSIX_MASKALL);
    for i in 0..u64::from(entries) {
        let e = table + 16 * i;
        hw::wr32(e + 12, 1);
        hw::wr32(e, MSI_ADDR);
        hw::wr32(e + 4, 0);
        hw::wr32(e + 8, vector.into());
        hw::wr32(e + 12, 0);
        let got = [
            hw::rd32(e),
            hw::rd32(e + 4),
            hw::rd32(e + 8),
            hw::rd32(e + 12),
        ];
        if got != [MSI_ADDR, 0, vector.into(), 0] {
            bail!(
                "MSI-X entry does not hold what was written",
                "{b} entry {i}: read {got:#x?}"
            );
        }
    }
    write16(b, cap + 2, (ctl | MSIX_ENABLE) & !MSIX_MASKALL);
    let now = read16(b, cap + 2);
    if now & (MSIX_ENABLE | MSIX_MASKALL) != MSIX_ENABLE || now & 0x7FF != ctl & 0x7FF {
        bail!(
            "MSI-X control after enabling",
            "{b}: wrote {:#06x}, read {now:#06x}",
            (ctl | MSIX_ENABLE) & !MSIX_MASKALL
        );
    }
    for w in 0..u64::from(entries).div_ceil(64) {
        let p = u64::from(hw::rd32(pba + 8 * w)) | u64::from(hw::rd32(pba + 8 * w + 4)) << 32;
        if p != 0 {
            bail!(
                "MSI-X pending bits set at start",
                "{b}: PBA qword {w} = {p:#x}"
            );
        }
    }
    Ok(MsiX {
        entries,
        table,
        table_bar,
        table_off,
        pba,
        pba_bar,
        pba_off,
    })
}
