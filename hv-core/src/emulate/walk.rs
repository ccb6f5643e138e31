//! Guest page-table walk (SDM Vol. 3A, chapter 4 "Paging").
//!
//! Every paging-structure entry is read through [`GuestPhysRead`] at the
//! moment it is needed: the guest (or another vCPU) may change its tables
//! at any time, so nothing is cached and nothing is trusted. Malformed
//! tables yield a [`WalkError`] naming the level, never a panic.

use super::{AccessKind, CpuMode, PagingMode};
use core::fmt;

/// Read access to guest-physical memory (RAM only; MMIO reads fail).
pub trait GuestPhysRead {
    /// Fills `buf` from guest-physical `gpa`, or fails if any byte of the
    /// range is not readable guest RAM. A failure leaves `buf` unspecified.
    #[allow(clippy::result_unit_err)]
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ()>;
}

/// A level of the paging hierarchy, named by the entry read there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Page-map level-4 entry (4-level paging).
    Pml4,
    /// Page-directory-pointer-table entry (PAE and 4-level paging).
    Pdpt,
    /// Page-directory entry (all paging modes).
    Pd,
    /// Page-table entry (all paging modes).
    Pt,
}

impl Level {
    /// The SDM's name of the entry at this level.
    pub const fn entry_name(self) -> &'static str {
        match self {
            Self::Pml4 => "PML4E",
            Self::Pdpt => "PDPTE",
            Self::Pd => "PDE",
            Self::Pt => "PTE",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.entry_name())
    }
}

/// Why a linear address could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` (read from `entry_gpa`) has P = 0.
    NotPresent {
        level: Level,
        entry_gpa: u64,
        entry: u64,
    },
    /// The entry at `level` has a reserved bit set.
    Reserved {
        level: Level,
        entry_gpa: u64,
        entry: u64,
    },
    /// A write through an entry with R/W = 0 while CR0.WP = 1.
    ReadOnly {
        level: Level,
        entry_gpa: u64,
        entry: u64,
    },
    /// An instruction fetch through an entry with XD = 1 (EFER.NXE = 1).
    NoExecute {
        level: Level,
        entry_gpa: u64,
        entry: u64,
    },
    /// The entry's own address is not readable guest RAM.
    TableUnreadable { level: Level, entry_gpa: u64 },
    /// A 64-bit linear address that is not canonical.
    NonCanonical { linear: u64 },
    /// CR4.LA57: 5-level paging is not supported by this walker.
    FiveLevelPaging,
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotPresent {
                level,
                entry_gpa,
                entry,
            } => write!(f, "{level} at {entry_gpa:#x} not present ({entry:#x})"),
            Self::Reserved {
                level,
                entry_gpa,
                entry,
            } => write!(
                f,
                "{level} at {entry_gpa:#x} has reserved bits set ({entry:#x})"
            ),
            Self::ReadOnly {
                level,
                entry_gpa,
                entry,
            } => write!(f, "{level} at {entry_gpa:#x} is read-only ({entry:#x})"),
            Self::NoExecute {
                level,
                entry_gpa,
                entry,
            } => write!(f, "{level} at {entry_gpa:#x} is no-execute ({entry:#x})"),
            Self::TableUnreadable { level, entry_gpa } => {
                write!(f, "{level} at {entry_gpa:#x} is not in guest RAM")
            }
            Self::NonCanonical { linear } => {
                write!(f, "linear address {linear:#x} is not canonical")
            }
            Self::FiveLevelPaging => f.write_str("5-level paging (CR4.LA57) is not supported"),
        }
    }
}

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of a PAE / 4-level entry or of CR3.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits 62:52 of a PAE-paging entry are reserved (4-level paging ignores
/// them). Bits 51:MAXPHYADDR are not checked: `CpuMode` does not carry
/// MAXPHYADDR, and an address beyond guest RAM fails to read anyway.
const PAE_HIGH_RSVD: u64 = 0x7ff0_0000_0000_0000;
/// PAE PDPTE (loaded like PDPTE registers): bits 2:1, 8:5 and 63:52.
const PAE_PDPTE_RSVD: u64 = 0xfff0_0000_0000_01e6;
/// Bits 20:13 of an entry mapping a 2 MiB page.
const RSVD_2M: u64 = 0x001f_e000;
/// Bits 29:13 of an entry mapping a 1 GiB page.
const RSVD_1G: u64 = 0x3fff_e000;
/// Bit 21 of a 32-bit-paging PDE mapping a 4 MiB page (PSE-36 with
/// MAXPHYADDR 40 uses bits 20:13 as address bits 39:32).
const RSVD_4M: u64 = 1 << 21;

/// State shared by the levels of one walk.
struct Walk<'a, M: ?Sized> {
    mem: &'a M,
    access: AccessKind,
    /// Writes honour R/W (CR0.WP = 1; the walker assumes supervisor mode).
    wp: bool,
    /// EFER.NXE: bit 63 is XD rather than reserved.
    nxe: bool,
}

impl<M: GuestPhysRead + ?Sized> Walk<'_, M> {
    fn read32(&self, level: Level, entry_gpa: u64) -> Result<u64, WalkError> {
        let mut b = [0u8; 4];
        self.mem
            .read_phys(entry_gpa, &mut b)
            .map_err(|()| WalkError::TableUnreadable { level, entry_gpa })?;
        Ok(u64::from(u32::from_le_bytes(b)))
    }

    fn read64(&self, level: Level, entry_gpa: u64) -> Result<u64, WalkError> {
        let mut b = [0u8; 8];
        self.mem
            .read_phys(entry_gpa, &mut b)
            .map_err(|()| WalkError::TableUnreadable { level, entry_gpa })?;
        Ok(u64::from_le_bytes(b))
    }

    /// Checks P, reserved bits, R/W and XD of one entry.
    fn check(&self, level: Level, entry_gpa: u64, entry: u64, rsvd: u64) -> Result<(), WalkError> {
        if entry & P == 0 {
            return Err(WalkError::NotPresent {
                level,
                entry_gpa,
                entry,
            });
        }
        let rsvd = if self.nxe { rsvd } else { rsvd | XD };
        if entry & rsvd != 0 {
            return Err(WalkError::Reserved {
                level,
                entry_gpa,
                entry,
            });
        }
        if self.access == AccessKind::Write && self.wp && entry & RW == 0 {
            return Err(WalkError::ReadOnly {
                level,
                entry_gpa,
                entry,
            });
        }
        if self.access == AccessKind::Fetch && self.nxe && entry & XD != 0 {
            return Err(WalkError::NoExecute {
                level,
                entry_gpa,
                entry,
            });
        }
        Ok(())
    }

    /// 32-bit paging (CR0.PG = 1, CR4.PAE = 0).
    fn bits32(&self, cr3: u64, pse: bool, linear: u64) -> Result<u64, WalkError> {
        let linear = linear & 0xffff_ffff;
        let pde_gpa = (cr3 & 0xffff_f000) | (((linear >> 22) & 0x3ff) * 4);
        let pde = self.read32(Level::Pd, pde_gpa)?;
        // XD does not exist here: the walk's `nxe` is false for this mode.
        if pse && pde & PS != 0 {
            self.check(Level::Pd, pde_gpa, pde, RSVD_4M)?;
            let high = ((pde >> 13) & 0xff) << 32;
            return Ok(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        self.check(Level::Pd, pde_gpa, pde, 0)?;
        let pte_gpa = (pde & 0xffff_f000) | (((linear >> 12) & 0x3ff) * 4);
        let pte = self.read32(Level::Pt, pte_gpa)?;
        self.check(Level::Pt, pte_gpa, pte, 0)?;
        Ok((pte & 0xffff_f000) | (linear & 0xfff))
    }

    /// PAE paging (CR0.PG = 1, CR4.PAE = 1, EFER.LMA = 0).
    fn pae(&self, cr3: u64, linear: u64) -> Result<u64, WalkError> {
        let linear = linear & 0xffff_ffff;
        let pdpte_gpa = (cr3 & 0xffff_ffe0) | (((linear >> 30) & 3) * 8);
        let pdpte = self.read64(Level::Pdpt, pdpte_gpa)?;
        if pdpte & P == 0 {
            return Err(WalkError::NotPresent {
                level: Level::Pdpt,
                entry_gpa: pdpte_gpa,
                entry: pdpte,
            });
        }
        // PDPTEs carry no R/W or XD: only presence and reserved bits.
        if pdpte & PAE_PDPTE_RSVD != 0 {
            return Err(WalkError::Reserved {
                level: Level::Pdpt,
                entry_gpa: pdpte_gpa,
                entry: pdpte,
            });
        }
        self.pd_pt(pdpte & ADDR_MASK, linear, PAE_HIGH_RSVD)
    }

    /// The page-directory and page-table levels shared by PAE and 4-level
    /// paging, starting at the page directory at `pd`.
    fn pd_pt(&self, pd: u64, linear: u64, high_rsvd: u64) -> Result<u64, WalkError> {
        let pde_gpa = pd | (((linear >> 21) & 0x1ff) * 8);
        let pde = self.read64(Level::Pd, pde_gpa)?;
        if pde & PS != 0 {
            self.check(Level::Pd, pde_gpa, pde, high_rsvd | RSVD_2M)?;
            return Ok((pde & ADDR_MASK & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        self.check(Level::Pd, pde_gpa, pde, high_rsvd)?;
        let pte_gpa = (pde & ADDR_MASK) | (((linear >> 12) & 0x1ff) * 8);
        let pte = self.read64(Level::Pt, pte_gpa)?;
        self.check(Level::Pt, pte_gpa, pte, high_rsvd)?;
        Ok((pte & ADDR_MASK) | (linear & 0xfff))
    }

    /// 4-level paging (CR0.PG = 1, CR4.PAE = 1, EFER.LMA = 1, CR4.LA57 = 0).
    fn level4(&self, cr3: u64, linear: u64) -> Result<u64, WalkError> {
        // Bits 63:47 must all equal bit 47.
        let top = linear >> 47;
        if top != 0 && top != 0x1_ffff {
            return Err(WalkError::NonCanonical { linear });
        }
        let pml4e_gpa = (cr3 & ADDR_MASK) | (((linear >> 39) & 0x1ff) * 8);
        let pml4e = self.read64(Level::Pml4, pml4e_gpa)?;
        // PS is reserved in a PML4E.
        self.check(Level::Pml4, pml4e_gpa, pml4e, PS)?;
        let pdpte_gpa = (pml4e & ADDR_MASK) | (((linear >> 30) & 0x1ff) * 8);
        let pdpte = self.read64(Level::Pdpt, pdpte_gpa)?;
        if pdpte & PS != 0 {
            self.check(Level::Pdpt, pdpte_gpa, pdpte, RSVD_1G)?;
            return Ok((pdpte & ADDR_MASK & !0x3fff_ffff) | (linear & 0x3fff_ffff));
        }
        self.check(Level::Pdpt, pdpte_gpa, pdpte, 0)?;
        self.pd_pt(pdpte & ADDR_MASK, linear, 0)
    }
}

/// Translates a guest linear address into a guest-physical address for
/// `access`, walking the guest's page tables as the paging mode of `mode`
/// says.
///
/// Accesses are checked as supervisor accesses: R/W matters for writes only
/// when CR0.WP = 1, XD only for fetches and only when EFER.NXE = 1. With
/// paging off, the linear address (truncated to 32 bits) is the physical
/// address. Accessed/dirty bits are not set (the hardware has already done so
/// for the access that exited).
pub fn translate<M: GuestPhysRead + ?Sized>(
    mode: &CpuMode,
    mem: &M,
    linear: u64,
    access: AccessKind,
) -> Result<u64, WalkError> {
    let paging = mode.paging_mode();
    let walk = Walk {
        mem,
        access,
        wp: mode.cr0 & CpuMode::CR0_WP != 0,
        nxe: paging != PagingMode::Bits32 && mode.efer & CpuMode::EFER_NXE != 0,
    };
    match paging {
        PagingMode::Off => Ok(linear & 0xffff_ffff),
        PagingMode::Bits32 => walk.bits32(mode.cr3, mode.cr4 & CpuMode::CR4_PSE != 0, linear),
        PagingMode::Pae => walk.pae(mode.cr3, linear),
        PagingMode::Level4 => walk.level4(mode.cr3, linear),
        PagingMode::Level5 => Err(WalkError::FiveLevelPaging),
    }
}
