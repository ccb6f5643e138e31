//! Boot information from multiboot2, multiboot v1 and PVH, in one shape.
//!
//! Parsing reads physical memory through [`PhysReader`] so that the same code
//! runs on the host in tests (over a byte buffer) and on bare metal (over the
//! boot identity map). Every length and pointer the boot loader gives is
//! checked against what the reader can supply; nothing here panics.

use heapless::{String, Vec};

/// The most memory-map entries kept.
pub const MAX_MEMORY_RANGES: usize = 64;
/// The most boot modules kept.
pub const MAX_MODULES: usize = 64;
/// The longest command line kept (longer ones are an error, not truncated).
pub const MAX_CMDLINE: usize = 512;

/// How the image was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Multiboot v1 (`EAX = 0x2BADB002`), used for guests.
    Multiboot1,
    /// Multiboot2 (`EAX = 0x36D76289`): GRUB, real machines, Bochs.
    Multiboot2,
    /// PVH (`hvm_start_info` in EBX): QEMU `-kernel`.
    Pvh,
}

impl BootProtocol {
    /// Decodes the protocol number the trampoline passes.
    pub fn from_trampoline(n: u32) -> Option<Self> {
        match n {
            1 => Some(Self::Multiboot1),
            2 => Some(Self::Multiboot2),
            3 => Some(Self::Pvh),
            _ => None,
        }
    }
}

/// What a physical range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Usable RAM.
    Usable,
    /// ACPI tables, reclaimable after they are read.
    AcpiReclaimable,
    /// Anything else: reserved, NVS, defective.
    Reserved,
}

/// One entry of the physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: MemoryKind,
}

/// A boot module (a guest image) and its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Physical address of the first byte.
    pub start: u64,
    /// Physical address one past the last byte.
    pub end: u64,
    /// The module's command line (may be empty).
    pub cmdline: String<MAX_CMDLINE>,
}

/// Everything the kernel needs from the boot loader.
#[derive(Clone, Debug, Default)]
pub struct BootInfo {
    /// How the image was started (`None` only for a default value).
    pub protocol: Option<BootProtocol>,
    /// Physical memory map.
    pub memory: Vec<MemoryRange, MAX_MEMORY_RANGES>,
    /// Boot modules.
    pub modules: Vec<Module, MAX_MODULES>,
    /// The image's command line.
    pub cmdline: String<MAX_CMDLINE>,
    /// Physical address and length of the boot information itself, which
    /// must not be handed out as free memory before it has been parsed.
    pub info_range: (u64, u64),
}

/// Why the boot information could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The trampoline saw no known magic number.
    UnknownProtocol(u32),
    /// A structure lies outside readable memory.
    Unreadable { addr: u64, len: u64 },
    /// A magic number or version field is wrong.
    BadMagic { what: &'static str, found: u64 },
    /// The multiboot2 crate refused the information structure.
    Multiboot2,
    /// More entries than this build keeps.
    TooMany(&'static str),
    /// A string is not UTF-8 or too long.
    BadString(&'static str),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownProtocol(n) => write!(f, "unknown boot protocol {n}"),
            Self::Unreadable { addr, len } => {
                write!(f, "boot structure at {addr:#x}+{len:#x} is not readable")
            }
            Self::BadMagic { what, found } => write!(f, "bad {what}: {found:#x}"),
            Self::Multiboot2 => write!(f, "invalid multiboot2 information"),
            Self::TooMany(what) => write!(f, "too many {what}"),
            Self::BadString(what) => write!(f, "bad {what} string"),
        }
    }
}

/// Reads physical memory during boot.
pub trait PhysReader {
    /// Copies `buf.len()` bytes at physical address `addr` into `buf`, or
    /// returns `false` if any of them is not readable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// Reads a little-endian `u32`.
    fn u32(&self, addr: u64) -> Result<u32, BootError> {
        let mut b = [0; 4];
        self.read(addr, &mut b)
            .then(|| u32::from_le_bytes(b))
            .ok_or(BootError::Unreadable { addr, len: 4 })
    }

    /// Reads a little-endian `u64`.
    fn u64(&self, addr: u64) -> Result<u64, BootError> {
        let mut b = [0; 8];
        self.read(addr, &mut b)
            .then(|| u64::from_le_bytes(b))
            .ok_or(BootError::Unreadable { addr, len: 8 })
    }

    /// Reads a NUL-terminated string of at most `MAX_CMDLINE` bytes.
    fn c_str(&self, addr: u64, what: &'static str) -> Result<String<MAX_CMDLINE>, BootError> {
        let mut out = heapless::Vec::<u8, MAX_CMDLINE>::new();
        if addr == 0 {
            return Ok(String::new());
        }
        for i in 0..=MAX_CMDLINE as u64 {
            let mut b = [0u8; 1];
            if !self.read(addr + i, &mut b) {
                return Err(BootError::Unreadable {
                    addr: addr + i,
                    len: 1,
                });
            }
            if b[0] == 0 {
                return String::from_utf8(out).map_err(|_| BootError::BadString(what));
            }
            out.push(b[0]).map_err(|_| BootError::BadString(what))?;
        }
        Err(BootError::BadString(what))
    }
}

/// The memory-map type numbers shared by multiboot, multiboot2 and PVH
/// (the E820 types).
fn kind_of(typ: u32) -> MemoryKind {
    match typ {
        1 => MemoryKind::Usable,
        3 => MemoryKind::AcpiReclaimable,
        _ => MemoryKind::Reserved,
    }
}

/// An E820-style entry (base u64, length u64, type u32) at `e`.
fn e820_entry(mem: &impl PhysReader, e: u64) -> Result<MemoryRange, BootError> {
    Ok(MemoryRange {
        start: mem.u64(e)?,
        len: mem.u64(e + 8)?,
        kind: kind_of(mem.u32(e + 16)?),
    })
}

fn push<T, const N: usize>(v: &mut Vec<T, N>, x: T, what: &'static str) -> Result<(), BootError> {
    v.push(x).map_err(|_| BootError::TooMany(what))
}

fn string_from(s: &str, what: &'static str) -> Result<String<MAX_CMDLINE>, BootError> {
    String::try_from(s).map_err(|_| BootError::BadString(what))
}

/// Reads physical memory through the trampoline's identity map of the
/// first 8 GiB (valid from `tern_entry64` until the image installs page
/// tables of its own that keep low memory identity mapped). Address 0 and
/// anything past 4 GiB are refused: boot structures live below 4 GiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootIdentityMap;

impl PhysReader for BootIdentityMap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(end) = addr.checked_add(buf.len() as u64) else {
            return false;
        };
        if addr == 0 || end > 1 << 32 || cfg!(not(target_os = "none")) {
            return false;
        }
        // SAFETY: on bare metal the range lies in the identity-mapped first
        // 4 GiB (checked above) and is only read, into `buf`.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}

/// `hvm_start_info.magic` (Xen's `XEN_HVM_START_MAGIC_VALUE`).
pub const PVH_MAGIC: u32 = 0x336e_c578;

impl BootInfo {
    /// Parses a PVH `hvm_start_info` at `addr` (layout from Xen's
    /// `arch-x86/hvm/start_info.h`: magic, version, flags, nr_modules,
    /// modlist_paddr, cmdline_paddr, rsdp_paddr, and from version 1
    /// memmap_paddr and memmap_entries).
    pub fn from_pvh(mem: &impl PhysReader, addr: u64) -> Result<Self, BootError> {
        let magic = mem.u32(addr)?;
        if magic != PVH_MAGIC {
            return Err(BootError::BadMagic {
                what: "PVH magic",
                found: magic.into(),
            });
        }
        let version = mem.u32(addr + 4)?;
        let nr_modules = mem.u32(addr + 12)?;
        let modlist = mem.u64(addr + 16)?;
        let cmdline = mem.u64(addr + 24)?;
        let mut info = BootInfo {
            protocol: Some(BootProtocol::Pvh),
            cmdline: mem.c_str(cmdline, "command line")?,
            info_range: (addr, 56),
            ..Default::default()
        };
        for i in 0..u64::from(nr_modules) {
            let e = modlist + i * 32;
            let start = mem.u64(e)?;
            let size = mem.u64(e + 8)?;
            let cmd = mem.u64(e + 16)?;
            let m = Module {
                start,
                end: start.checked_add(size).ok_or(BootError::Unreadable {
                    addr: start,
                    len: size,
                })?,
                cmdline: mem.c_str(cmd, "module command line")?,
            };
            push(&mut info.modules, m, "modules")?;
        }
        if version >= 1 {
            let map = mem.u64(addr + 40)?;
            let entries = mem.u32(addr + 48)?;
            for i in 0..u64::from(entries) {
                let r = e820_entry(mem, map + i * 24)?;
                push(&mut info.memory, r, "memory ranges")?;
            }
        }
        Ok(info)
    }

    /// Parses a multiboot v1 information structure at `addr` (flags bit 0:
    /// mem_lower/upper, bit 2: cmdline, bit 3: modules, bit 6: mmap).
    pub fn from_multiboot1(mem: &impl PhysReader, addr: u64) -> Result<Self, BootError> {
        let flags = mem.u32(addr)?;
        let mut info = BootInfo {
            protocol: Some(BootProtocol::Multiboot1),
            info_range: (addr, 116),
            ..Default::default()
        };
        if flags & (1 << 2) != 0 {
            info.cmdline = mem.c_str(mem.u32(addr + 16)?.into(), "command line")?;
        }
        if flags & (1 << 3) != 0 {
            let count = mem.u32(addr + 20)?;
            let list = u64::from(mem.u32(addr + 24)?);
            for i in 0..u64::from(count) {
                let e = list + i * 16;
                let m = Module {
                    start: mem.u32(e)?.into(),
                    end: mem.u32(e + 4)?.into(),
                    cmdline: mem.c_str(mem.u32(e + 8)?.into(), "module command line")?,
                };
                push(&mut info.modules, m, "modules")?;
            }
        }
        if flags & (1 << 6) != 0 {
            let len = u64::from(mem.u32(addr + 44)?);
            let base = u64::from(mem.u32(addr + 48)?);
            let mut off = 0;
            while off + 24 <= len {
                let size = u64::from(mem.u32(base + off)?);
                let r = e820_entry(mem, base + off + 4)?;
                push(&mut info.memory, r, "memory ranges")?;
                off += size + 4;
            }
        } else if flags & 1 != 0 {
            let upper = u64::from(mem.u32(addr + 8)?) * 1024;
            let low = u64::from(mem.u32(addr + 4)?) * 1024;
            push(
                &mut info.memory,
                MemoryRange {
                    start: 0,
                    len: low,
                    kind: MemoryKind::Usable,
                },
                "memory ranges",
            )?;
            push(
                &mut info.memory,
                MemoryRange {
                    start: 0x10_0000,
                    len: upper,
                    kind: MemoryKind::Usable,
                },
                "memory ranges",
            )?;
        }
        Ok(info)
    }

    /// Parses a multiboot2 information structure at `addr` with the
    /// `multiboot2` crate.
    ///
    /// # Safety
    /// `addr` must be the address the boot loader passed in EBX, identity
    /// mapped and not yet overwritten.
    pub unsafe fn from_multiboot2(addr: u64) -> Result<Self, BootError> {
        // SAFETY: the caller guarantees that `addr` is the boot loader's
        // information structure and that it is mapped; the crate checks the
        // header, total size and tag alignment.
        let mbi = unsafe {
            multiboot2::BootInformation::load(addr as *const multiboot2::BootInformationHeader)
        }
        .map_err(|_| BootError::Multiboot2)?;
        let mut info = BootInfo {
            protocol: Some(BootProtocol::Multiboot2),
            info_range: (addr, mbi.total_size() as u64),
            ..Default::default()
        };
        if let Some(tag) = mbi.command_line_tag() {
            info.cmdline = string_from(
                tag.cmdline()
                    .map_err(|_| BootError::BadString("command line"))?,
                "command line",
            )?;
        }
        for m in mbi.module_tags() {
            let cmd = m
                .cmdline()
                .map_err(|_| BootError::BadString("module command line"))?;
            let module = Module {
                start: m.start_address().into(),
                end: m.end_address().into(),
                cmdline: string_from(cmd, "module command line")?,
            };
            push(&mut info.modules, module, "modules")?;
        }
        if let Some(map) = mbi.memory_map_tag() {
            for a in map.memory_areas() {
                let kind = kind_of(a.typ().into());
                let r = MemoryRange {
                    start: a.start_address(),
                    len: a.size(),
                    kind,
                };
                push(&mut info.memory, r, "memory ranges")?;
            }
        }
        Ok(info)
    }

    /// Looks up `key=value` (or a bare `key`, giving `""`) among the
    /// whitespace-separated words of the command line before a `--`.
    pub fn option(&self, key: &str) -> Option<&str> {
        option(&self.cmdline, key)
    }

    /// The words after `--` on the command line (handed to guests).
    pub fn trailing_args(&self) -> &str {
        match self.cmdline.split_once(" -- ") {
            Some((_, rest)) => rest.trim(),
            None => self.cmdline.strip_prefix("-- ").unwrap_or("").trim(),
        }
    }
}

/// Looks up `key=value` or a bare `key` in a command line (words before `--`).
pub fn option<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    for word in cmdline.split_whitespace() {
        if word == "--" {
            break;
        }
        match word.split_once('=') {
            Some((k, v)) if k == key => return Some(v),
            None if word == key => return Some(""),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buf(std::vec::Vec<u8>);
    impl PhysReader for Buf {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let Ok(a) = usize::try_from(addr) else {
                return false;
            };
            match self.0.get(a..a + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
    }
    impl Buf {
        fn put(&mut self, at: usize, b: &[u8]) {
            self.0[at..at + b.len()].copy_from_slice(b);
        }
    }

    fn pvh_image() -> Buf {
        let mut m = Buf(vec![0; 4096]);
        m.put(0x100, &PVH_MAGIC.to_le_bytes());
        m.put(0x104, &1u32.to_le_bytes());
        m.put(0x10c, &1u32.to_le_bytes()); // one module
        m.put(0x110, &0x200u64.to_le_bytes());
        m.put(0x118, &0x300u64.to_le_bytes()); // cmdline
        m.put(0x128, &0x400u64.to_le_bytes()); // memmap
        m.put(0x130, &2u32.to_le_bytes());
        m.put(0x200, &0x10_0000u64.to_le_bytes());
        m.put(0x208, &0x1234u64.to_le_bytes());
        m.put(0x300, b"log=debug -- scenario=hello\0");
        m.put(0x400, &0u64.to_le_bytes());
        m.put(0x408, &0x9fc00u64.to_le_bytes());
        m.put(0x410, &1u32.to_le_bytes());
        m.put(0x418, &0x10_0000u64.to_le_bytes());
        m.put(0x420, &0x7ef_0000u64.to_le_bytes());
        m.put(0x428, &2u32.to_le_bytes());
        m
    }

    #[test]
    fn pvh_start_info_is_parsed() {
        let info = BootInfo::from_pvh(&pvh_image(), 0x100).unwrap();
        assert_eq!(info.protocol, Some(BootProtocol::Pvh));
        assert_eq!(info.cmdline.as_str(), "log=debug -- scenario=hello");
        assert_eq!(info.option("log"), Some("debug"));
        assert_eq!(
            info.option("scenario"),
            None,
            "words after -- are the guest's"
        );
        assert_eq!(info.trailing_args(), "scenario=hello");
        assert_eq!(info.modules.len(), 1);
        assert_eq!(
            (info.modules[0].start, info.modules[0].end),
            (0x10_0000, 0x10_1234)
        );
        assert_eq!(info.memory.len(), 2);
        assert_eq!(info.memory[0].kind, MemoryKind::Usable);
        assert_eq!(
            info.memory[1],
            MemoryRange {
                start: 0x10_0000,
                len: 0x7ef_0000,
                kind: MemoryKind::Reserved
            }
        );
    }

    #[test]
    fn pvh_rejects_bad_magic_and_wild_pointers() {
        let mut m = pvh_image();
        m.put(0x100, &0u32.to_le_bytes());
        assert!(matches!(
            BootInfo::from_pvh(&m, 0x100),
            Err(BootError::BadMagic { .. })
        ));
        let mut m = pvh_image();
        m.put(0x110, &0xdead_0000u64.to_le_bytes());
        assert!(matches!(
            BootInfo::from_pvh(&m, 0x100),
            Err(BootError::Unreadable { .. })
        ));
        let mut m = pvh_image();
        m.put(0x10c, &1000u32.to_le_bytes());
        assert!(BootInfo::from_pvh(&m, 0x100).is_err());
    }

    #[test]
    fn unterminated_command_line_is_an_error() {
        let mut m = pvh_image();
        let long = vec![b'a'; 600];
        m.put(0x300, &long);
        assert_eq!(
            BootInfo::from_pvh(&m, 0x100).unwrap_err(),
            BootError::BadString("command line")
        );
    }

    #[test]
    fn multiboot1_info_is_parsed() {
        let mut m = Buf(vec![0; 4096]);
        m.put(0x100, &((1u32 << 2) | (1 << 6)).to_le_bytes());
        m.put(0x110, &0x300u32.to_le_bytes());
        m.put(0x100 + 44, &48u32.to_le_bytes());
        m.put(0x100 + 48, &0x400u32.to_le_bytes());
        for (i, (start, len, typ)) in [(0u64, 0x9fc00u64, 1u32), (0x10_0000, 0x1f0_0000, 1)]
            .iter()
            .enumerate()
        {
            let e = 0x400 + i * 24;
            m.put(e, &20u32.to_le_bytes());
            m.put(e + 4, &start.to_le_bytes());
            m.put(e + 12, &len.to_le_bytes());
            m.put(e + 20, &typ.to_le_bytes());
        }
        m.put(0x300, b"scenario=cpuid\0");
        let info = BootInfo::from_multiboot1(&m, 0x100).unwrap();
        assert_eq!(info.cmdline.as_str(), "scenario=cpuid");
        assert_eq!(info.option("scenario"), Some("cpuid"));
        assert_eq!(info.memory.len(), 2);
        assert_eq!(info.memory[1].len, 0x1f0_0000);
    }
}
