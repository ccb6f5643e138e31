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
//! # Two entry points
//!
//! * [`emulate`] decodes one of the mov forms into a single [`MmioAccess`]
//!   that the caller performs and completes with [`MmioAccess::finish`].
//! * [`execute`] performs a whole instruction itself: every data access
//!   goes through a [`PhysBus`] (which dispatches to RAM, ROM or a
//!   device), and the registers, RFLAGS and RIP are updated. It handles
//!   everything `emulate` does plus read-modify-write, compares and memory
//!   string instructions. [`string_io`] does the same for `ins`/`outs`
//!   exits ([`StringIo::from_exit`] decodes them) with a [`PortBus`].
//!
//! ```text
//! let mode = vcpu.cpu_mode()?;           // CRs, EFER, CS.L/D, segment bases
//! let mut regs = Regs { gpr, rip, rflags };
//! let exit = MmioExit::from_ept_violation(qualification, guest_phys, guest_linear)?;
//! match execute(&mode, &guest_ram, &mut bus, &mut regs, &exit) {
//!     Ok(done) => { /* write regs back; done.rip_advanced: instruction completed */ }
//!     Err(e) => { /* stop the VM and print e; regs are unchanged */ }
//! }
//! // or, for the single-access API:
//! let access = emulate(&mode, &guest_ram, &regs, &exit)?;
//! let value = match access.write_value() {
//!     Some(v) => { device.write(access.gpa, access.size(), v); 0 }
//!     None => device.read(access.gpa, access.size()),
//! };
//! access.finish(value, &mut regs); // destination register, RIP, RFLAGS.RF
//! ```
//!
//! Exits on guest paging-structure accesses (qualification bit 7 set, bit 8
//! clear) are not instruction operands: [`MmioExit::from_ept_violation`]
//! refuses them (a caller building [`MmioExit`] by hand must not pass a
//! linear address for them). The caller remains responsible for what this
//! module cannot see: after a completed instruction the handler should
//! clear STI/MOV-SS blocking in the interruptibility state and, if
//! RFLAGS.TF was set, inject the single-step `#DB`.
//!
//! # Supported forms
//!
//! Both entry points: `mov r/m, r` (88/89), `mov r, r/m` (8A/8B),
//! `mov r/m, imm` (C6/C7), `movzx` (0F B6/B7), `movsx` (0F BE/BF),
//! `movsxd` (63) and `mov` with a memory offset (A0–A3), at sizes 1, 2, 4
//! and 8, with any operand-size, address-size, REX and segment prefixes.
//!
//! [`execute`] only, with `lock` accepted where the CPU accepts it:
//!
//! * `add, or, adc, sbb, and, sub, xor` with a memory destination (r/m,reg;
//!   r/m,imm; r/m,imm8 sign-extended) or a memory source and a register
//!   destination; `inc, dec, not, neg` of memory; `cmp` (both orders) and
//!   `test` (read only); `xchg` of memory with a register (no flags).
//! * `bt, bts, btr, btc` with an immediate (modulo the operand width) or a
//!   register: the register form's bit offset is signed and may address
//!   outside the operand, as the SDM says (the access is at
//!   EA + size * (offset SAR log2(width)), bit offset MOD width); the GPA
//!   is the exit's, and the linear-address check uses the displaced
//!   address.
//! * `movs, stos, lods, cmps, scas` at sizes 1, 2, 4 and 8, with or
//!   without `rep`/`repe`/`repne` (`F2` on `movs`/`stos`/`lods` acts as
//!   `rep`, as on hardware), honouring RFLAGS.DF and the address size
//!   (SI/DI/CX, ESI/EDI/ECX or RSI/RDI/RCX, wrapping within it; a 16-bit
//!   write keeps bits 63:16, a 32-bit write clears bits 63:32). The source
//!   is DS (or the override) and the destination ES; in 64-bit mode only
//!   FS/GS bases are non-zero ([`CpuMode::base`]). Each element is
//!   translated with the guest's page tables and goes through the
//!   [`PhysBus`], so either side may be RAM or MMIO; one of the operands'
//!   first element must be at the exit's GPA.
//! * Flags are exactly the SDM's: add/adc/sub/sbb/cmp/neg set all six
//!   status flags (neg: CF = source != 0); and/or/xor/test clear CF and OF
//!   and leave AF (undefined) 0; inc/dec keep CF; not changes none; bt*
//!   set only CF (the others undefined, left as they were). Completion
//!   clears RFLAGS.RF and advances RIP with the code width's wrap.
//!
//! `rep` string instructions (and [`string_io`]) do at most one batch per
//! call: up to [`MAX_REP_ITERATIONS`], stopping before an element of
//! either operand leaves the page its first element is in. If the count
//! is not yet 0 RIP stays on the instruction (and RF is left alone) so the
//! guest executes it again, as KVM does; `rep` with a zero count does
//! nothing and advances RIP.
//!
//! Refused with [`EmulateError::Unsupported`] (carrying the bytes, the
//! mnemonic and a reason): shifts and rotates, `cmpxchg`/`xadd`, stack and
//! control-flow operands, SSE/AVX/MMX, `ins`/`outs` through [`execute`]
//! (they reach [`string_io`]), and anything else. Other errors: a string
//! element that crosses a page or wraps its offset
//! ([`EmulateError::ElementSplit`]), a string operand whose page walk fails
//! ([`EmulateError::OperandWalk`]: the guest would take a #PF, which is not
//! injected), an exit GPA that is neither string operand
//! ([`EmulateError::StringMismatch`]), a failed bus access
//! ([`EmulateError::Bus`]).
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
//!   for the access that exited; later string elements are not checked).
//! * [`emulate`] keeps its original linear-address check, which knows only
//!   CS.base outside 64-bit mode and no FS/GS base (those operands are not
//!   checked); [`execute`] uses [`CpuMode::seg_base`] for every segment.
//! * The register form of `bt*` wraps the displaced effective address at
//!   the address size for the check; with 16-bit addressing the CPU's
//!   wrap of the displacement could differ only in that check (the GPA is
//!   always the exit's).
//! * Read-modify-write is one [`PhysBus::read`] then one
//!   [`PhysBus::write`]; `lock` atomicity against other vCPUs is the bus's
//!   business (devices are serialised by the caller).
//! * On an error after some accesses (a failing write of a
//!   read-modify-write, a bus error in the middle of a `rep` batch), those
//!   accesses are not undone; the registers are left unchanged and the
//!   caller is expected to stop the VM.

mod alu;
mod bus;
mod decode;
mod exec;
mod fetch;
mod string;
mod walk;

#[cfg(test)]
mod tests;

pub use bus::{BusError, Executed, PhysBus, PortBus};
pub use decode::{Extend, MmioDir, MmioOp, ReadDest, RegRef};
pub use exec::execute;
pub use fetch::{fetch, FetchFault, Fetched, InsnBytes, MAX_INSN_LEN};
pub use iced_x86::Mnemonic;
pub use string::{string_io, StringIo, MAX_REP_ITERATIONS};
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
    /// Segment bases in the encoding order ES, CS, SS, DS, FS, GS (index
    /// with [`Seg`]), used by [`execute`] and [`string_io`] for data
    /// operands. The CS entry is not used: [`cs_base`](Self::cs_base) is.
    /// In 64-bit mode only the FS and GS entries matter (the others count
    /// as 0, as on hardware). [`emulate`] uses only `cs_base`, as before.
    pub seg_base: [u64; 6],
}

/// A segment register, in encoding order (the VM-exit
/// instruction-information field and [`CpuMode::seg_base`] use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

impl Seg {
    /// The segment with encoding `n` (0..=5).
    pub const fn from_index(n: u8) -> Option<Self> {
        Some(match n {
            0 => Self::Es,
            1 => Self::Cs,
            2 => Self::Ss,
            3 => Self::Ds,
            4 => Self::Fs,
            5 => Self::Gs,
            _ => return None,
        })
    }

    /// The segment of an iced segment register.
    fn from_register(r: Register) -> Option<Self> {
        Some(match r {
            Register::ES => Self::Es,
            Register::CS => Self::Cs,
            Register::SS => Self::Ss,
            Register::DS => Self::Ds,
            Register::FS => Self::Fs,
            Register::GS => Self::Gs,
            _ => return None,
        })
    }
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

    /// The base of `seg` for a data access: 0 for ES, CS, SS and DS in
    /// 64-bit mode, else `cs_base` for CS and `seg_base` for the others.
    pub const fn base(&self, seg: Seg) -> u64 {
        match (seg, self.bitness()) {
            (Seg::Fs | Seg::Gs, _) => self.seg_base[seg as usize],
            (_, Bitness::B64) => 0,
            (Seg::Cs, _) => self.cs_base,
            _ => self.seg_base[seg as usize],
        }
    }

    /// The linear address of `offset` in `seg`: the base plus the offset,
    /// truncated to 32 bits outside 64-bit mode. The offset must already
    /// be wrapped to the address size.
    pub const fn linear(&self, seg: Seg, offset: u64) -> u64 {
        let la = self.base(seg).wrapping_add(offset);
        match self.bitness() {
            Bitness::B64 => la,
            _ => la & 0xffff_ffff,
        }
    }

    /// Advances `rip` by `len` with the code width's wrap (IP, EIP or RIP).
    pub const fn next_rip(&self, rip: u64, len: u64) -> u64 {
        let next = rip.wrapping_add(len);
        match self.bitness() {
            Bitness::B64 => next,
            Bitness::B32 => next & 0xffff_ffff,
            Bitness::B16 => next & 0xffff,
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
    /// A [`PhysBus`] or [`PortBus`] access failed. Accesses made before it
    /// (earlier iterations of a string instruction, the read of a
    /// read-modify-write) are not undone; the registers are unchanged.
    Bus {
        rip: u64,
        mnemonic: Mnemonic,
        error: BusError,
    },
    /// A string operand's linear address does not translate (the guest
    /// would take a #PF, which this module does not inject).
    OperandWalk {
        rip: u64,
        mnemonic: Mnemonic,
        linear: u64,
        access: AccessKind,
        error: WalkError,
    },
    /// A string element at `linear` crosses a page or wraps around the end
    /// of its address size.
    ElementSplit {
        rip: u64,
        mnemonic: Mnemonic,
        linear: u64,
        size: u8,
    },
    /// Neither operand of a string instruction covers the faulting GPA
    /// (`None`: the instruction has no such operand).
    StringMismatch {
        rip: u64,
        bytes: InsnBytes,
        mnemonic: Mnemonic,
        exit_gpa: u64,
        src_gpa: Option<u64>,
        dst_gpa: Option<u64>,
    },
    /// A [`StringIo`] that cannot come from an INS/OUTS exit in this mode.
    BadStringIo { reason: &'static str },
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
            Self::Bus {
                rip,
                mnemonic,
                error,
            } => write!(f, "{mnemonic:?} at rip {rip:#x}: bus access at {error}"),
            Self::OperandWalk {
                rip,
                mnemonic,
                linear,
                access,
                error,
            } => write!(
                f,
                "{mnemonic:?} at rip {rip:#x}: {access} of linear {linear:#x} does not \
                 translate: {error}"
            ),
            Self::ElementSplit {
                rip,
                mnemonic,
                linear,
                size,
            } => write!(
                f,
                "{mnemonic:?} at rip {rip:#x}: {size}-byte element at linear {linear:#x} \
                 crosses a page or wraps its offset"
            ),
            Self::StringMismatch {
                rip,
                bytes,
                mnemonic,
                exit_gpa,
                src_gpa,
                dst_gpa,
            } => write!(
                f,
                "{mnemonic:?} [{bytes}] at rip {rip:#x}: neither operand (source {src_gpa:x?}, \
                 destination {dst_gpa:x?}) is the faulting GPA {exit_gpa:#x}"
            ),
            Self::BadStringIo { reason } => write!(f, "string I/O exit: {reason}"),
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

/// Fetches the instruction at `rip` and decodes it with iced at the mode's
/// bitness.
fn fetch_insn<M: GuestPhysRead + ?Sized>(
    mode: &CpuMode,
    mem: &M,
    rip: u64,
) -> Result<(iced_x86::Instruction, InsnBytes), EmulateError> {
    let fetched = fetch(mode, mem, rip);
    if let (true, Some(fault)) = (fetched.bytes.is_empty(), fetched.stop) {
        return Err(EmulateError::Fetch { rip, fault });
    }
    decode::decode_insn(mode.bitness(), &fetched.bytes, rip).map_err(|e| match e {
        DecodeFailure::NeedMoreBytes => match fetched.stop {
            Some(fault) => EmulateError::Truncated {
                rip,
                bytes: fetched.bytes,
                fault,
            },
            None => EmulateError::Invalid {
                rip,
                bytes: fetched.bytes,
            },
        },
        DecodeFailure::Invalid => EmulateError::Invalid {
            rip,
            bytes: fetched.bytes,
        },
    })
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
    let (insn, ib) = fetch_insn(mode, mem, rip)?;
    let d = decode::mov_form(mode.bitness(), insn, ib, regs).map_err(|reason| {
        EmulateError::Unsupported {
            rip,
            bytes: ib,
            mnemonic: insn.mnemonic(),
            reason: reason.unwrap_or_else(|| decode::unsupported_reason(&insn)),
        }
    })?;
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
