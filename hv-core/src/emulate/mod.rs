//! MMIO instruction emulation for EPT-violation exits.
//!
//! An EPT violation on an MMIO page tells the hypervisor the guest-physical
//! address and whether the access was a read or a write, but not the data
//! or the register involved. This module recovers them from the faulting
//! instruction, independently of the hardware:
//!
//! 1. [`fetch`] reads up to 15 bytes at CS.base + RIP, translating each page
//!    with [`translate`] (the guest page-table walk), so an instruction may
//!    straddle a page boundary. Fewer bytes are fine when the decoder does
//!    not need the missing ones (an instruction at the end of mapped memory).
//! 2. The bytes are decoded with iced-x86 at the mode's bitness into an
//!    [`MmioOp`]: the access size, and either the value to write or the
//!    destination register with its extension.
//! 3. The result is checked against the exit: direction (a decoded write for
//!    a read fault is an error), the access must not cross a page
//!    (a split access is reported rather than half-emulated) and, when the
//!    exit supplies the guest-linear address and the segment base is known,
//!    the instruction's effective address must match it (otherwise the
//!    memory operand is not the one that faulted).
//!
//! # Use from the EPT-violation handler
//!
//! ```text
//! let mode = CpuMode { cr0, cr3, cr4, efer, cs_base, cs_l, cs_db }; // from the VMCS
//! let mut regs = Regs { gpr, rip, rflags };
//! let exit = MmioExit::from_ept_violation(qualification, guest_phys, guest_linear)?;
//! let access = emulate(&mode, &guest_ram, &regs, &exit)?; // Err: stop the VM, print it
//! let value = match access.write_value() {
//!     Some(v) => { device.write(access.gpa, access.size(), v); 0 }
//!     None => device.read(access.gpa, access.size()),
//! };
//! access.finish(value, &mut regs); // destination register, RIP, RFLAGS.RF
//! // write regs.gpr / rip / rflags back to the VMCS and the saved GPRs
//! ```
//!
//! Exits on guest paging-structure accesses (qualification bit 7 set, bit 8
//! clear) are not instruction operands: [`MmioExit::from_ept_violation`]
//! refuses them (a caller building [`MmioExit`] by hand must not pass a
//! linear address for them). The caller remains responsible for what this
//! module cannot see: after
//! [`MmioAccess::finish`] the handler should clear STI/MOV-SS blocking in
//! the interruptibility state and, if RFLAGS.TF was set, inject the
//! single-step `#DB`.
//!
//! # Supported forms
//!
//! `mov r/m, r` (88/89), `mov r, r/m` (8A/8B), `mov r/m, imm` (C6/C7),
//! `movzx` (0F B6/B7), `movsx` (0F BE/BF), `movsxd` (63) and `mov` with a
//! memory offset (A0–A3), at sizes 1, 2, 4 and 8, with any operand-size,
//! address-size, REX and segment prefixes (the segment is irrelevant: the
//! GPA comes from the exit). Everything else (string instructions,
//! read-modify-write, `xchg`, `lock`, SSE/AVX moves, ...) is an
//! [`EmulateError::Unsupported`] carrying the bytes and the mnemonic.
//!
//! # Limits
//!
//! * The walk treats every access as a supervisor access (no CPL in
//!   [`CpuMode`]), does not check bits 51:MAXPHYADDR, does not set A/D
//!   bits, and reads the PAE PDPTEs from memory (the CPU uses the copies
//!   it loaded with CR3; they match unless the guest changed the PDPT
//!   without reloading CR3). 1 GiB pages are assumed to be supported.
//!   5-level paging is refused.
//! * Segment limits and protection are not checked (the hardware did so
//!   before the exit).

mod decode;
mod fetch;
mod walk;

#[cfg(test)]
mod tests;

pub use decode::{Extend, MmioDir, MmioOp, ReadDest, RegRef};
pub use fetch::{fetch, FetchFault, Fetched, InsnBytes, MAX_INSN_LEN};
pub use iced_x86::Mnemonic;
pub use walk::{translate, GuestPhysRead, Level, WalkError};

use decode::{DecodeFailure, Decoded};
use iced_x86::Register;

/// The guest's general-purpose registers, RIP and RFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// In x86 encoding order: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi,
    /// r8..r15 (see the `R*` index constants).
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

impl Regs {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
    /// RFLAGS.RF (resume flag), cleared when an instruction completes.
    pub const RFLAGS_RF: u64 = 1 << 16;
}

/// The processor state that decides address translation and code width,
/// as read from the VMCS guest-state area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// IA32_EFER; LMA must reflect the "IA-32e mode guest" entry control.
    pub efer: u64,
    pub cs_base: u64,
    /// CS.L (64-bit code segment).
    pub cs_l: bool,
    /// CS.D/B (32-bit default operand size).
    pub cs_db: bool,
}

/// Code width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bitness {
    B16,
    B32,
    B64,
}

impl Bitness {
    /// 16, 32 or 64.
    pub const fn bits(self) -> u32 {
        match self {
            Self::B16 => 16,
            Self::B32 => 32,
            Self::B64 => 64,
        }
    }
}

/// Paging mode (SDM Vol. 3A, 4.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG = 0: linear = physical.
    Off,
    /// 32-bit paging (CR4.PAE = 0).
    Bits32,
    /// PAE paging (EFER.LMA = 0).
    Pae,
    /// 4-level paging.
    Level4,
    /// 5-level paging (CR4.LA57): not supported by [`translate`].
    Level5,
}

impl CpuMode {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PSE: u64 = 1 << 4;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_LA57: u64 = 1 << 12;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;

    /// Whether IA-32e mode is active (EFER.LMA).
    pub const fn long_mode(&self) -> bool {
        self.efer & Self::EFER_LMA != 0
    }

    /// The code width: 64 in IA-32e mode with CS.L, else 32 with CS.D, else
    /// 16 (real mode, virtual-8086 mode and 16-bit protected-mode code).
    pub const fn bitness(&self) -> Bitness {
        if self.long_mode() && self.cs_l {
            Bitness::B64
        } else if self.cs_db {
            Bitness::B32
        } else {
            Bitness::B16
        }
    }

    /// The paging mode that CR0, CR4 and EFER select.
    pub const fn paging_mode(&self) -> PagingMode {
        if self.cr0 & Self::CR0_PG == 0 {
            PagingMode::Off
        } else if self.cr4 & Self::CR4_PAE == 0 {
            PagingMode::Bits32
        } else if !self.long_mode() {
            PagingMode::Pae
        } else if self.cr4 & Self::CR4_LA57 != 0 {
            PagingMode::Level5
        } else {
            PagingMode::Level4
        }
    }
}

/// Kind of memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    /// Instruction fetch.
    Fetch,
}

impl core::fmt::Display for AccessKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "fetch",
        })
    }
}

/// What the EPT-violation exit says about the access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioExit {
    /// Guest-physical address (VMCS "guest-physical address").
    pub gpa: u64,
    /// Read or write (qualification bits 0/1); a fetch is refused.
    pub kind: AccessKind,
    /// The guest-linear address, if the qualification says it is valid and
    /// the access was to the instruction's operand (bits 7 and 8 set).
    /// Used to check that the decoded operand is the faulting one.
    pub linear: Option<u64>,
}

impl MmioExit {
    /// An exit without a guest-linear address.
    pub const fn new(gpa: u64, kind: AccessKind) -> Self {
        Self {
            gpa,
            kind,
            linear: None,
        }
    }

    /// Adds the guest-linear address.
    pub const fn with_linear(self, linear: u64) -> Self {
        Self {
            linear: Some(linear),
            ..self
        }
    }

    /// Builds the exit from the raw EPT-violation exit qualification
    /// (SDM Vol. 3C, Table 28-7) and the "guest-physical address" and
    /// "guest-linear address" VMCS fields: bit 1 (write) makes a write,
    /// else bit 2 (fetch) a fetch, else a read; the linear address is kept
    /// when bits 7 and 8 are both set. Bit 7 set with bit 8 clear means the
    /// guest's page walk touched a paging-structure entry at `gpa`: not an
    /// instruction operand, so an error.
    pub const fn from_ept_violation(
        qualification: u64,
        gpa: u64,
        guest_linear: u64,
    ) -> Result<Self, EmulateError> {
        let kind = if qualification & (1 << 1) != 0 {
            AccessKind::Write
        } else if qualification & (1 << 2) != 0 {
            AccessKind::Fetch
        } else {
            AccessKind::Read
        };
        let linear_valid = qualification & (1 << 7) != 0;
        let translation = qualification & (1 << 8) != 0;
        if linear_valid && !translation {
            return Err(EmulateError::PagingStructureAccess {
                gpa,
                linear: guest_linear,
            });
        }
        Ok(Self {
            gpa,
            kind,
            linear: if linear_valid {
                Some(guest_linear)
            } else {
                None
            },
        })
    }
}

/// A decoded MMIO access, ready to be sent to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// The device address (from the exit).
    pub gpa: u64,
    pub op: MmioOp,
}

impl MmioAccess {
    /// Access size in bytes: 1, 2, 4 or 8.
    pub fn size(&self) -> u8 {
        self.op.size
    }

    /// Whether the device is written.
    pub fn is_write(&self) -> bool {
        self.op.is_write()
    }

    /// The value to write to the device (low `size` bytes), or `None` for a
    /// read.
    pub fn write_value(&self) -> Option<u64> {
        match self.op.dir {
            MmioDir::Write { value } => Some(value),
            MmioDir::Read(_) => None,
        }
    }

    /// Completes the instruction: for a read, puts `read_value` (the
    /// device's data, low `size` bytes used) in the destination register
    /// with x86 semantics; for a write, ignores it. Then advances RIP and
    /// clears RFLAGS.RF.
    pub fn finish(&self, read_value: u64, regs: &mut Regs) {
        self.op.complete(read_value, regs);
    }
}

/// Same as [`MmioAccess::finish`].
pub fn finish(access: &MmioAccess, read_value: u64, regs: &mut Regs) {
    access.finish(read_value, regs);
}

/// Why an MMIO access could not be emulated. Every variant has enough
/// context for a stop-the-VM report (see its `Display`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulateError {
    /// The EPT violation was on a guest paging-structure entry at `gpa`
    /// while translating `linear` (the guest keeps page tables in MMIO).
    PagingStructureAccess { gpa: u64, linear: u64 },
    /// The exit was an instruction fetch from MMIO: nothing to emulate.
    FetchFromMmio { gpa: u64, rip: u64 },
    /// Not even the first instruction byte could be fetched.
    Fetch { rip: u64, fault: FetchFault },
    /// The decoder needed bytes beyond those that could be fetched.
    Truncated {
        rip: u64,
        bytes: InsnBytes,
        fault: FetchFault,
    },
    /// Not a valid instruction.
    Invalid { rip: u64, bytes: InsnBytes },
    /// A valid instruction this emulator does not handle.
    Unsupported {
        rip: u64,
        bytes: InsnBytes,
        mnemonic: Mnemonic,
        reason: &'static str,
    },
    /// The instruction's access direction is not the exit's.
    DirectionMismatch {
        rip: u64,
        bytes: InsnBytes,
        mnemonic: Mnemonic,
        exit: AccessKind,
        decoded: AccessKind,
    },
    /// The access crosses a page boundary (`gpa`..`gpa + size`).
    PageSplit {
        rip: u64,
        bytes: InsnBytes,
        mnemonic: Mnemonic,
        gpa: u64,
        size: u8,
    },
    /// The memory operand's linear address is not the faulting one.
    OperandMismatch {
        rip: u64,
        bytes: InsnBytes,
        mnemonic: Mnemonic,
        exit_linear: u64,
        operand_linear: u64,
    },
}

impl core::fmt::Display for EmulateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::PagingStructureAccess { gpa, linear } => write!(
                f,
                "guest page walk for linear {linear:#x} touched a paging-structure entry at \
                 MMIO {gpa:#x}"
            ),
            Self::FetchFromMmio { gpa, rip } => {
                write!(f, "instruction fetch from MMIO {gpa:#x} at rip {rip:#x}")
            }
            Self::Fetch { rip, fault } => {
                write!(f, "cannot fetch the instruction at rip {rip:#x}: {fault}")
            }
            Self::Truncated { rip, bytes, fault } => write!(
                f,
                "instruction at rip {rip:#x} truncated after [{bytes}]: {fault}"
            ),
            Self::Invalid { rip, bytes } => {
                write!(f, "invalid instruction at rip {rip:#x}: [{bytes}]")
            }
            Self::Unsupported {
                rip,
                bytes,
                mnemonic,
                reason,
            } => write!(
                f,
                "unsupported MMIO instruction {mnemonic:?} [{bytes}] at rip {rip:#x}: {reason}"
            ),
            Self::DirectionMismatch {
                rip,
                bytes,
                mnemonic,
                exit,
                decoded,
            } => write!(
                f,
                "{mnemonic:?} [{bytes}] at rip {rip:#x} is a {decoded} but the exit was a {exit}"
            ),
            Self::PageSplit {
                rip,
                bytes,
                mnemonic,
                gpa,
                size,
            } => write!(
                f,
                "{mnemonic:?} [{bytes}] at rip {rip:#x}: {size}-byte access at {gpa:#x} crosses a page"
            ),
            Self::OperandMismatch {
                rip,
                bytes,
                mnemonic,
                exit_linear,
                operand_linear,
            } => write!(
                f,
                "{mnemonic:?} [{bytes}] at rip {rip:#x} accesses linear {operand_linear:#x}, \
                 but the exit faulted at {exit_linear:#x}"
            ),
        }
    }
}

/// Linear address of the decoded memory operand, if every segment base and
/// register it needs is known (DS/ES/SS/CS are 0 in 64-bit mode; outside it
/// only CS.base is known).
fn operand_linear(mode: &CpuMode, regs: &Regs, d: &Decoded) -> Option<u64> {
    let b64 = mode.bitness() == Bitness::B64;
    let va = d
        .insn
        .virtual_address(d.mem_operand, 0, |reg, _, _| match reg {
            Register::ES | Register::SS | Register::DS if b64 => Some(0),
            Register::CS if b64 => Some(0),
            Register::CS => Some(mode.cs_base),
            _ => decode::gpr(reg).map(|(r, w)| decode::read_reg(regs, r, w)),
        })?;
    Some(if b64 { va } else { va & 0xffff_ffff })
}

/// Fetches and decodes the instruction at `regs.rip` that caused the MMIO
/// exit `exit`, and checks it against the exit. The returned access says
/// what to do with the device; [`MmioAccess::finish`] then updates `regs`.
/// `regs` is only read here.
pub fn emulate<M: GuestPhysRead + ?Sized>(
    mode: &CpuMode,
    mem: &M,
    regs: &Regs,
    exit: &MmioExit,
) -> Result<MmioAccess, EmulateError> {
    let rip = regs.rip;
    if exit.kind == AccessKind::Fetch {
        return Err(EmulateError::FetchFromMmio { gpa: exit.gpa, rip });
    }
    let fetched = fetch(mode, mem, rip);
    if let (true, Some(fault)) = (fetched.bytes.is_empty(), fetched.stop) {
        return Err(EmulateError::Fetch { rip, fault });
    }
    let d = match decode::decode(mode.bitness(), &fetched.bytes, rip, regs) {
        Ok(d) => d,
        Err(DecodeFailure::NeedMoreBytes) => {
            return Err(match fetched.stop {
                Some(fault) => EmulateError::Truncated {
                    rip,
                    bytes: fetched.bytes,
                    fault,
                },
                None => EmulateError::Invalid {
                    rip,
                    bytes: fetched.bytes,
                },
            })
        }
        Err(DecodeFailure::Invalid) => {
            return Err(EmulateError::Invalid {
                rip,
                bytes: fetched.bytes,
            })
        }
        Err(DecodeFailure::Unsupported {
            insn,
            mnemonic,
            reason,
        }) => {
            return Err(EmulateError::Unsupported {
                rip,
                bytes: insn,
                mnemonic,
                reason,
            })
        }
    };
    let op = d.op;
    let decoded = if op.is_write() {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    if decoded != exit.kind {
        return Err(EmulateError::DirectionMismatch {
            rip,
            bytes: op.insn,
            mnemonic: op.mnemonic,
            exit: exit.kind,
            decoded,
        });
    }
    if (exit.gpa & 0xfff) + u64::from(op.size) > 0x1000 {
        return Err(EmulateError::PageSplit {
            rip,
            bytes: op.insn,
            mnemonic: op.mnemonic,
            gpa: exit.gpa,
            size: op.size,
        });
    }
    if let (Some(exit_linear), Some(operand_linear)) = (exit.linear, operand_linear(mode, regs, &d))
    {
        let exit_linear = if mode.bitness() == Bitness::B64 {
            exit_linear
        } else {
            exit_linear & 0xffff_ffff
        };
        if exit_linear != operand_linear {
            return Err(EmulateError::OperandMismatch {
                rip,
                bytes: op.insn,
                mnemonic: op.mnemonic,
                exit_linear,
                operand_linear,
            });
        }
    }
    Ok(MmioAccess { gpa: exit.gpa, op })
}
