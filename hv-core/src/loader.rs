//! Loading multiboot (v1) guest images the way QEMU's `-kernel` does: the
//! ELF32 or ELF64 program headers are copied into guest RAM at their
//! physical addresses; the multiboot information structure, the command
//! lines and the modules go after the image (page aligned, as QEMU puts
//! them), so nothing the loader writes can collide with the image; the
//! vCPU starts at the ELF entry in 32-bit protected mode with paging off,
//! `EAX = 0x2BADB002` and `EBX` pointing at the structure.
//!
//! Everything in the image is untrusted: every offset and size is checked
//! and a bad image is an error, never a panic.

use crate::addr::GuestPhysAddr;
use crate::guest_mem::{GuestRam, OutsideRam};
use crate::phys::PhysAccess;

/// `EAX` at a multiboot entry.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header magic in the image.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Layout of the information block (after the image, page aligned): the
/// structure, the memory map, the loader name, the module list, then the
/// command lines; the modules follow, each page aligned.
const MMAP_OFF: u64 = 0x80;
const NAME_OFF: u64 = 0x180;
const MODS_OFF: u64 = 0x190;
/// At most this many modules (16 bytes each in the list).
pub const MAX_MODULES: usize = 16;
const STRINGS_OFF: u64 = MODS_OFF + 16 * MAX_MODULES as u64;
/// The longest command line (the VM's or a module's).
pub const MAX_CMDLINE: usize = 4095;

/// A multiboot module for the guest: its bytes and its string.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// A loaded guest: where to start it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u32,
    pub info: u32,
    /// Lowest and highest guest-physical byte the image occupies.
    pub image: (u64, u64),
}

/// Why an image cannot be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    NoMultibootHeader,
    BadChecksum,
    NotElf,
    UnsupportedElf(&'static str),
    /// A header or segment points outside the file.
    Truncated,
    /// A segment does not fit guest RAM.
    SegmentOutsideRam {
        paddr: u64,
        memsz: u64,
    },
    EntryAbove4G(u64),
    CmdlineTooLong,
    TooManyModules,
    /// The boot information and modules do not fit in RAM after the image.
    NoRoomForBootInfo,
    Memory(OutsideRam),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMultibootHeader => write!(f, "no multiboot header in the first 8 KiB"),
            Self::BadChecksum => write!(f, "multiboot header checksum is wrong"),
            Self::NotElf => write!(f, "not an ELF image"),
            Self::UnsupportedElf(why) => write!(f, "unsupported ELF: {why}"),
            Self::Truncated => write!(f, "image is truncated"),
            Self::SegmentOutsideRam { paddr, memsz } => {
                write!(f, "segment {paddr:#x}+{memsz:#x} does not fit guest RAM")
            }
            Self::EntryAbove4G(e) => write!(f, "entry point {e:#x} is above 4 GiB"),
            Self::CmdlineTooLong => write!(f, "command line too long"),
            Self::TooManyModules => write!(f, "more than {MAX_MODULES} modules"),
            Self::NoRoomForBootInfo => write!(
                f,
                "no RAM after the image for the boot information and modules"
            ),
            Self::Memory(e) => write!(f, "{e}"),
        }
    }
}

impl From<OutsideRam> for LoadError {
    fn from(e: OutsideRam) -> Self {
        Self::Memory(e)
    }
}

fn u16_at(b: &[u8], off: u64) -> Result<u16, LoadError> {
    let o = usize::try_from(off).map_err(|_| LoadError::Truncated)?;
    o.checked_add(2)
        .and_then(|e| b.get(o..e))
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(LoadError::Truncated)
}

fn u32_at(b: &[u8], off: u64) -> Result<u32, LoadError> {
    let o = usize::try_from(off).map_err(|_| LoadError::Truncated)?;
    o.checked_add(4)
        .and_then(|e| b.get(o..e))
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(LoadError::Truncated)
}

fn u64_at(b: &[u8], off: u64) -> Result<u64, LoadError> {
    Ok(u64::from(u32_at(b, off)?) | (u64::from(u32_at(b, off + 4)?) << 32))
}

/// Finds and checks the multiboot header; returns its flags.
pub fn multiboot_flags(image: &[u8]) -> Result<u32, LoadError> {
    let limit = image.len().min(8192) as u64;
    let mut off = 0;
    while off + 12 <= limit {
        if u32_at(image, off)? == MULTIBOOT_HEADER_MAGIC {
            let flags = u32_at(image, off + 4)?;
            let sum = MULTIBOOT_HEADER_MAGIC
                .wrapping_add(flags)
                .wrapping_add(u32_at(image, off + 8)?);
            return if sum == 0 {
                Ok(flags)
            } else {
                Err(LoadError::BadChecksum)
            };
        }
        off += 4;
    }
    Err(LoadError::NoMultibootHeader)
}

struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Loads `image` into `ram` and writes the multiboot information, with
/// `modules` after it.
pub fn load_multiboot(
    image: &[u8],
    cmdline: &str,
    modules: &[Module],
    ram: &GuestRam,
    mem: &mut impl PhysAccess,
) -> Result<Loaded, LoadError> {
    let flags = multiboot_flags(image)?;
    if image.get(0..4) != Some(b"\x7fELF") {
        return Err(if flags & (1 << 16) != 0 {
            LoadError::UnsupportedElf("a.out kludge images are not supported")
        } else {
            LoadError::NotElf
        });
    }
    let class64 = match image.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err(LoadError::UnsupportedElf("bad class")),
    };
    if image.get(5) != Some(&1) {
        return Err(LoadError::UnsupportedElf("not little-endian"));
    }
    if u16_at(image, 16)? != 2 {
        return Err(LoadError::UnsupportedElf("not an executable"));
    }
    if !matches!(u16_at(image, 18)?, 3 | 62) {
        return Err(LoadError::UnsupportedElf("not x86"));
    }
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            u64_at(image, 24)?,
            u64_at(image, 32)?,
            u16_at(image, 54)?,
            u16_at(image, 56)?,
        )
    } else {
        (
            u32_at(image, 24)?.into(),
            u32_at(image, 28)?.into(),
            u16_at(image, 42)?,
            u16_at(image, 44)?,
        )
    };
    let entry = u32::try_from(entry).map_err(|_| LoadError::EntryAbove4G(entry))?;
    // Header fields that contradict the format are refused: an entry
    // smaller than a program header would make every entry the same one.
    if phentsize < if class64 { 56 } else { 32 } {
        return Err(LoadError::UnsupportedElf(
            "program header entries too small",
        ));
    }
    if cmdline.len() > MAX_CMDLINE || modules.iter().any(|m| m.cmdline.len() > MAX_CMDLINE) {
        return Err(LoadError::CmdlineTooLong);
    }
    if modules.len() > MAX_MODULES {
        return Err(LoadError::TooManyModules);
    }

    // First pass: read and check every segment, so a bad image writes nothing.
    let mut segments = alloc::vec::Vec::new();
    for i in 0..u64::from(phnum) {
        let ph = phoff
            .checked_add(i * u64::from(phentsize))
            .filter(|&ph| ph < image.len() as u64)
            .ok_or(LoadError::Truncated)?;
        if u32_at(image, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let s = if class64 {
            Segment {
                offset: u64_at(image, ph + 8)?,
                paddr: u64_at(image, ph + 24)?,
                filesz: u64_at(image, ph + 32)?,
                memsz: u64_at(image, ph + 40)?,
            }
        } else {
            Segment {
                offset: u32_at(image, ph + 4)?.into(),
                paddr: u32_at(image, ph + 12)?.into(),
                filesz: u32_at(image, ph + 16)?.into(),
                memsz: u32_at(image, ph + 20)?.into(),
            }
        };
        let outside = LoadError::SegmentOutsideRam {
            paddr: s.paddr,
            memsz: s.memsz,
        };
        let file_end = s.offset.checked_add(s.filesz).ok_or(LoadError::Truncated)?;
        if file_end > image.len() as u64 || s.filesz > s.memsz {
            return Err(LoadError::Truncated);
        }
        s.paddr.checked_add(s.memsz).ok_or(outside)?;
        // Every byte of the segment must be RAM (a hole in the middle, such
        // as the ROM at 0xE0000, counts as outside).
        ram.check(GuestPhysAddr::new(s.paddr), s.memsz)
            .map_err(|_| outside)?;
        segments.push(s);
    }
    if segments.is_empty() {
        return Err(LoadError::UnsupportedElf("no loadable segment"));
    }
    // The work of loading is bounded by the size of guest RAM: segments
    // that together are larger than RAM must overlap, and are refused.
    let total = segments
        .iter()
        .try_fold(0u64, |t, s| t.checked_add(s.memsz))
        .filter(|&t| t <= ram.size())
        .is_some();
    if !total {
        return Err(LoadError::UnsupportedElf(
            "segments larger than guest RAM together",
        ));
    }
    let lo = segments.iter().map(|s| s.paddr).min().unwrap_or(0);
    let hi = segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    // The boot information and the modules go after the image; all of it
    // must be RAM before anything is written.
    let info = hi
        .div_ceil(4096)
        .checked_mul(4096)
        .ok_or(LoadError::NoRoomForBootInfo)?;
    let strings_len: u64 = (cmdline.len() + 1) as u64
        + modules
            .iter()
            .map(|m| (m.cmdline.len() + 1) as u64)
            .sum::<u64>();
    let mut at = (info + STRINGS_OFF + strings_len).div_ceil(4096) * 4096;
    let mut placed = alloc::vec::Vec::new();
    for m in modules {
        let start = at;
        let end = start
            .checked_add(m.data.len() as u64)
            .ok_or(LoadError::NoRoomForBootInfo)?;
        placed.push((start, end));
        at = end
            .div_ceil(4096)
            .checked_mul(4096)
            .ok_or(LoadError::NoRoomForBootInfo)?;
    }
    ram.check(GuestPhysAddr::new(info), at - info)
        .map_err(|_| LoadError::NoRoomForBootInfo)?;
    for s in &segments {
        let data = &image[s.offset as usize..(s.offset + s.filesz) as usize];
        ram.write(mem, GuestPhysAddr::new(s.paddr), data)?;
        ram.zero(
            mem,
            GuestPhysAddr::new(s.paddr + s.filesz),
            s.memsz - s.filesz,
        )?;
    }
    for (m, &(start, _)) in modules.iter().zip(&placed) {
        ram.write(mem, GuestPhysAddr::new(start), m.data)?;
    }
    write_info(ram, mem, info, cmdline, modules, &placed)?;
    Ok(Loaded {
        entry,
        info: u32::try_from(info).map_err(|_| LoadError::NoRoomForBootInfo)?,
        image: (lo, hi),
    })
}

/// Builds the multiboot information at `base` (flags: mem, cmdline, mods,
/// mmap, loader name).
fn write_info(
    ram: &GuestRam,
    mem: &mut impl PhysAccess,
    base: u64,
    cmdline: &str,
    modules: &[Module],
    placed: &[(u64, u64)],
) -> Result<(), LoadError> {
    let mut info = [0u8; 116];
    let put = |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let flags = 1 | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);
    let addr32 = |a: u64| u32::try_from(a).map_err(|_| LoadError::NoRoomForBootInfo);
    // Memory map entries: (size=20, base, len, type) for each RAM chunk.
    let mut mmap = alloc::vec::Vec::new();
    let mut upper_kib = 0;
    let mut entry = |base: u64, len: u64| {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes());
    };
    for c in ram.chunks() {
        let (base, end) = (c.gpa.as_u64(), c.gpa.as_u64() + c.size);
        // As on a PC, RAM under 1 MiB stops at 640 KiB (VGA and BIOS
        // windows); the map resumes at 1 MiB.
        if base < 0xA0000 {
            entry(base, end.min(0xA0000) - base);
        }
        if end > 0x10_0000 {
            let from = base.max(0x10_0000);
            entry(from, end - from);
            if from == 0x10_0000 {
                upper_kib = (end - from) / 1024;
            }
        }
    }
    if mmap.len() as u64 > NAME_OFF - MMAP_OFF {
        return Err(LoadError::UnsupportedElf(
            "too many RAM chunks for the memory map",
        ));
    }
    // Command lines, NUL-terminated, one after the other.
    let mut strings = alloc::vec::Vec::new();
    let string_at = |s: &str, strings: &mut alloc::vec::Vec<u8>| {
        let at = base + STRINGS_OFF + strings.len() as u64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at
    };
    let cmdline_at = string_at(cmdline, &mut strings);
    let mut mods = alloc::vec::Vec::new();
    for (m, &(start, end)) in modules.iter().zip(placed) {
        let s = string_at(m.cmdline, &mut strings);
        for v in [start, end, s, 0] {
            mods.extend_from_slice(&addr32(v)?.to_le_bytes());
        }
    }
    put(&mut info, 0, flags);
    put(&mut info, 4, 639);
    put(&mut info, 8, upper_kib.min(u64::from(u32::MAX)) as u32);
    put(&mut info, 16, addr32(cmdline_at)?);
    put(&mut info, 20, modules.len() as u32);
    put(&mut info, 24, addr32(base + MODS_OFF)?);
    put(&mut info, 44, mmap.len() as u32);
    put(&mut info, 48, addr32(base + MMAP_OFF)?);
    put(&mut info, 64, addr32(base + NAME_OFF)?);
    ram.zero(mem, GuestPhysAddr::new(base), STRINGS_OFF)?;
    ram.write(mem, GuestPhysAddr::new(base), &info)?;
    ram.write(mem, GuestPhysAddr::new(base + MMAP_OFF), &mmap)?;
    ram.write(mem, GuestPhysAddr::new(base + NAME_OFF), b"Tern\0")?;
    ram.write(mem, GuestPhysAddr::new(base + MODS_OFF), &mods)?;
    ram.write(mem, GuestPhysAddr::new(base + STRINGS_OFF), &strings)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_mem::RamChunk;
    use crate::phys::mock::MockPhys;

    /// A minimal ELF32 multiboot image: one PT_LOAD of 16 file bytes and 32
    /// memory bytes at 0x100000, entry 0x100004.
    fn elf32() -> Vec<u8> {
        let mut f = vec![0u8; 0x200];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 1;
        f[5] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&3u16.to_le_bytes());
        f[24..28].copy_from_slice(&0x10_0004u32.to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&0x100u32.to_le_bytes());
        f[ph + 12..ph + 16].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[ph + 16..ph + 20].copy_from_slice(&16u32.to_le_bytes());
        f[ph + 20..ph + 24].copy_from_slice(&32u32.to_le_bytes());
        // Multiboot header at 0x100 (also the segment's first bytes).
        f[0x100..0x104].copy_from_slice(&MULTIBOOT_HEADER_MAGIC.to_le_bytes());
        f[0x108..0x10c].copy_from_slice(&0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC).to_le_bytes());
        f[0x10c..0x110].copy_from_slice(&[0xAA; 4]);
        f
    }

    fn ram(m: &mut MockPhys) -> GuestRam {
        let mut r = GuestRam::new();
        let hpa = crate::frames::FrameAllocator::alloc_contiguous(m, 2 << 20, 4096).unwrap();
        r.add(RamChunk {
            gpa: GuestPhysAddr::new(0),
            hpa,
            size: 2 << 20,
        })
        .unwrap();
        r
    }

    #[test]
    fn elf32_is_loaded_with_bss_and_info() {
        let mut m = MockPhys::new(8 << 20);
        let r = ram(&mut m);
        // Dirty the bss first to see it zeroed.
        r.write(&mut m, GuestPhysAddr::new(0x10_0010), &[0xff; 16])
            .unwrap();
        let module = Module {
            data: b"NR_CPUS=1\n",
            cmdline: "env",
        };
        let l = load_multiboot(&elf32(), "scenario=hello", &[module], &r, &mut m).unwrap();
        // The information block is at the first page after the image.
        assert_eq!(
            l,
            Loaded {
                entry: 0x10_0004,
                info: 0x10_1000,
                image: (0x10_0000, 0x10_0020)
            }
        );
        let mut b = [0u8; 32];
        r.read(&m, GuestPhysAddr::new(0x10_0000), &mut b).unwrap();
        assert_eq!(&b[12..16], &[0xAA; 4]);
        assert_eq!(&b[16..32], &[0; 16]);
        let mut info = [0u8; 28];
        r.read(&m, GuestPhysAddr::new(0x10_1000), &mut info)
            .unwrap();
        let at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap()) as u64;
        assert_eq!(at(8), 1024, "mem_upper in KiB");
        assert_eq!(at(0) & (1 << 3), 1 << 3, "mods present");
        let mut c = [0u8; 15];
        r.read(&m, GuestPhysAddr::new(at(16)), &mut c).unwrap();
        assert_eq!(&c, b"scenario=hello\0");
        assert_eq!(at(20), 1, "one module");
        let mut md = [0u8; 16];
        r.read(&m, GuestPhysAddr::new(at(24)), &mut md).unwrap();
        let mw = |o: usize| u32::from_le_bytes(md[o..o + 4].try_into().unwrap()) as u64;
        assert_eq!(mw(0) % 4096, 0, "module page aligned");
        assert!(mw(0) > at(16), "module after the command lines");
        assert_eq!(mw(4) - mw(0), 10);
        let mut data = [0u8; 10];
        r.read(&m, GuestPhysAddr::new(mw(0)), &mut data).unwrap();
        assert_eq!(&data, b"NR_CPUS=1\n");
        let mut name = [0u8; 4];
        r.read(&m, GuestPhysAddr::new(mw(8)), &mut name).unwrap();
        assert_eq!(&name, b"env\0");
    }

    #[test]
    fn bad_images_are_refused_without_writing() {
        let mut m = MockPhys::new(8 << 20);
        let r = ram(&mut m);
        let mut img = elf32();
        img[0x108] ^= 1;
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::BadChecksum)
        );
        let mut img = elf32();
        img[52 + 16..52 + 20].copy_from_slice(&0x1000u32.to_le_bytes()); // filesz past EOF
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::Truncated)
        );
        let mut img = elf32();
        img[52 + 12..52 + 16].copy_from_slice(&0x1f_fff0u32.to_le_bytes()); // runs off RAM
        assert!(matches!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        // An image that ends where RAM ends leaves no room for the boot
        // information: refused, nothing written.
        let mut img = elf32();
        img[52 + 12..52 + 16].copy_from_slice(&0x1f_ffe0u32.to_le_bytes());
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::NoRoomForBootInfo)
        );
        // 65535 entries of size 0 would be the same segment again and again.
        let mut img = elf32();
        img[42..44].copy_from_slice(&0u16.to_le_bytes());
        img[44..46].copy_from_slice(&0xFFFFu16.to_le_bytes());
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::UnsupportedElf(
                "program header entries too small"
            ))
        );
        // Two segments of 1.5 MiB each cannot both be in 2 MiB of RAM.
        let mut img = elf32();
        img[44..46].copy_from_slice(&2u16.to_le_bytes());
        img[52 + 20..52 + 24].copy_from_slice(&0x18_0000u32.to_le_bytes());
        img[52 + 12..52 + 16].copy_from_slice(&0x1000u32.to_le_bytes());
        let ph2 = 52 + 32;
        img[ph2..ph2 + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph2 + 12..ph2 + 16].copy_from_slice(&0x2000u32.to_le_bytes());
        img[ph2 + 20..ph2 + 24].copy_from_slice(&0x18_0000u32.to_le_bytes());
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::UnsupportedElf(
                "segments larger than guest RAM together"
            ))
        );
        let many = [Module {
            data: b"",
            cmdline: "",
        }; MAX_MODULES + 1];
        assert_eq!(
            load_multiboot(&elf32(), "", &many, &r, &mut m),
            Err(LoadError::TooManyModules)
        );
        assert_eq!(
            load_multiboot(&[0; 64], "", &[], &r, &mut m),
            Err(LoadError::NoMultibootHeader)
        );
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert_eq!(
            load_multiboot(&elf32(), &long, &[], &r, &mut m),
            Err(LoadError::CmdlineTooLong)
        );
        // An ELF64 program-header offset near 2^64 is truncation, not an
        // arithmetic overflow.
        let mut img = elf32();
        img[4] = 2;
        img[24..32].copy_from_slice(&0x10_0004u64.to_le_bytes());
        img[32..40].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        img[54..56].copy_from_slice(&56u16.to_le_bytes());
        img[56..58].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            load_multiboot(&img, "", &[], &r, &mut m),
            Err(LoadError::Truncated)
        );
        // A second segment across a hole in RAM is refused before the first
        // one is written (RAM here maps to the same host bytes as `r`).
        let c = r.chunks()[0];
        let mut holed = GuestRam::new();
        holed
            .add(RamChunk {
                gpa: c.gpa,
                hpa: c.hpa,
                size: 0x10_4000,
            })
            .unwrap();
        let hpa = crate::addr::HostPhysAddr::new(c.hpa.as_u64() + 0x10_8000);
        holed
            .add(RamChunk {
                gpa: GuestPhysAddr::new(0x10_8000),
                hpa,
                size: 0x10_0000,
            })
            .unwrap();
        let mut img = elf32();
        img[44..46].copy_from_slice(&2u16.to_le_bytes());
        let ph2 = 52 + 32;
        img[ph2..ph2 + 4].copy_from_slice(&1u32.to_le_bytes());
        img[ph2 + 12..ph2 + 16].copy_from_slice(&0x10_3000u32.to_le_bytes());
        img[ph2 + 20..ph2 + 24].copy_from_slice(&0x8000u32.to_le_bytes());
        assert!(matches!(
            load_multiboot(&img, "", &[], &holed, &mut m),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let mut all = vec![0u8; 2 << 20];
        r.read(&m, GuestPhysAddr::new(0), &mut all).unwrap();
        assert!(
            all.iter().all(|&b| b == 0),
            "a refused image wrote guest memory"
        );
    }
}
