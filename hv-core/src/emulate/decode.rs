//! Decoding of the MMIO instruction forms into [`MmioOp`], and applying a
//! completed access to the register file.

use super::fetch::InsnBytes;
use super::{Bitness, Regs};
use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register,
};

/// A general-purpose register operand, as x86 encodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegRef {
    /// 0..=15 in encoding order (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi,
    /// r8..r15); the index into [`Regs::gpr`].
    pub index: u8,
    /// AH, CH, DH or BH: bits 15:8 of registers 0..=3.
    pub high_byte: bool,
}

/// How a value loaded from memory lands in its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// Same width as the access (`mov r, r/m`, `movsxd r32, r/m32`).
    Plain,
    /// Zero-extended to the destination width (`movzx`).
    Zero,
    /// Sign-extended to the destination width (`movsx`, `movsxd r64`).
    Sign,
}

/// The destination of an MMIO read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadDest {
    pub reg: RegRef,
    /// Destination width in bytes (1, 2, 4 or 8).
    pub width: u8,
    pub extend: Extend,
}

/// Direction of an MMIO access, with the data of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioDir {
    /// The device is read; the value goes to `ReadDest`.
    Read(ReadDest),
    /// The device is written with `value` (already truncated to the access
    /// size; immediates sign-extended first, as the CPU does).
    Write { value: u64 },
}

/// One decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioOp {
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub dir: MmioDir,
    /// The instruction's bytes (its length is the RIP advance).
    pub insn: InsnBytes,
    pub mnemonic: Mnemonic,
    /// Code width of the instruction, for RIP wrap-around.
    pub bitness: Bitness,
}

/// Why no instruction could be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeFailure {
    /// The decoder ran out of bytes.
    NeedMoreBytes,
    /// Not a valid instruction (`#UD` on hardware).
    Invalid,
}

/// A decoded, supported instruction with the iced form kept for address
/// checks.
pub(super) struct Decoded {
    pub op: MmioOp,
    pub insn: Instruction,
    /// Operand index of the memory operand.
    pub mem_operand: u32,
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// Maps an iced general-purpose register to its encoding and width.
pub(super) fn gpr(r: Register) -> Option<(RegRef, u8)> {
    let n = r as u32;
    let al = Register::AL as u32;
    let ah = Register::AH as u32;
    let spl = Register::SPL as u32;
    let r15l = Register::R15L as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    let r15 = Register::R15 as u32;
    let (index, width, high_byte) = if (al..ah).contains(&n) {
        (n - al, 1, false)
    } else if (ah..spl).contains(&n) {
        (n - ah, 1, true)
    } else if (spl..=r15l).contains(&n) {
        (n - spl + 4, 1, false)
    } else if (ax..eax).contains(&n) {
        (n - ax, 2, false)
    } else if (eax..rax).contains(&n) {
        (n - eax, 4, false)
    } else if (rax..=r15).contains(&n) {
        (n - rax, 8, false)
    } else {
        return None;
    };
    Some((
        RegRef {
            index: (index & 15) as u8,
            high_byte,
        },
        width,
    ))
}

/// Reads a register operand of `width` bytes.
pub(super) fn read_reg(regs: &Regs, reg: RegRef, width: u8) -> u64 {
    let full = regs.gpr[usize::from(reg.index & 15)];
    if reg.high_byte {
        (full >> 8) & 0xff
    } else {
        full & mask(width)
    }
}

/// Writes a register operand of `width` bytes with x86 semantics: 8/16-bit
/// writes keep the other bits, 32-bit writes zero bits 63:32.
pub(super) fn write_reg(regs: &mut Regs, reg: RegRef, width: u8, value: u64) {
    let slot = &mut regs.gpr[usize::from(reg.index & 15)];
    *slot = match (width, reg.high_byte) {
        (1, true) => (*slot & !0xff00) | ((value & 0xff) << 8),
        (1, false) => (*slot & !0xff) | (value & 0xff),
        (2, _) => (*slot & !0xffff) | (value & 0xffff),
        (4, _) => value & 0xffff_ffff,
        _ => value,
    };
}

/// Sign-extends the low `size` bytes of `v` to 64 bits.
fn sign_extend(v: u64, size: u8) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

impl MmioOp {
    /// Whether the device is written.
    pub fn is_write(&self) -> bool {
        matches!(self.dir, MmioDir::Write { .. })
    }

    /// Instruction length in bytes.
    pub fn insn_len(&self) -> u8 {
        self.insn.len() as u8
    }

    /// The value a read of `raw` (low `size` bytes used) puts in its
    /// destination, extended to the destination width; `None` for a write.
    pub fn loaded_value(&self, raw: u64) -> Option<u64> {
        let MmioDir::Read(dest) = self.dir else {
            return None;
        };
        let v = raw & mask(self.size);
        let v = match dest.extend {
            Extend::Plain | Extend::Zero => v,
            Extend::Sign => sign_extend(v, self.size),
        };
        Some(v & mask(dest.width))
    }

    /// Writes the result of a read (`value`: the device's data, low `size`
    /// bytes used) into the destination register. Does nothing for a write.
    /// Does not advance RIP.
    pub fn complete_read(&self, value: u64, regs: &mut Regs) {
        if let (MmioDir::Read(dest), Some(v)) = (self.dir, self.loaded_value(value)) {
            write_reg(regs, dest.reg, dest.width, v);
        }
    }

    /// Advances RIP past the instruction (wrapping at IP/EIP width outside
    /// 64-bit mode) and clears RFLAGS.RF, as completing an instruction does.
    pub fn advance(&self, regs: &mut Regs) {
        let next = regs.rip.wrapping_add(u64::from(self.insn_len()));
        regs.rip = match self.bitness {
            Bitness::B64 => next,
            Bitness::B32 => next & 0xffff_ffff,
            Bitness::B16 => next & 0xffff,
        };
        regs.rflags &= !Regs::RFLAGS_RF;
    }

    /// [`complete_read`](Self::complete_read) then [`advance`](Self::advance):
    /// everything the instruction does besides the device access.
    /// `read_value` is ignored for a write.
    pub fn complete(&self, read_value: u64, regs: &mut Regs) {
        self.complete_read(read_value, regs);
        self.advance(regs);
    }
}

/// A short reason for an unsupported instruction, for the report.
pub(super) fn unsupported_reason(insn: &Instruction) -> &'static str {
    use Mnemonic as M;
    if insn.has_lock_prefix() {
        return "lock prefix (atomic read-modify-write)";
    }
    let string = (0..insn.op_count()).any(|i| {
        matches!(
            insn.op_kind(i),
            OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    });
    if string {
        return "string instruction";
    }
    let vector = (0..insn.op_count()).any(|i| {
        insn.op_kind(i) == OpKind::Register && {
            let r = insn.op_register(i) as u32;
            (Register::MM0 as u32..=Register::MM7 as u32).contains(&r)
                || (Register::XMM0 as u32..=Register::ZMM31 as u32).contains(&r)
        }
    });
    if vector {
        return "SSE/AVX/MMX access";
    }
    match insn.mnemonic() {
        M::Xchg | M::Cmpxchg | M::Xadd | M::Cmpxchg8b | M::Cmpxchg16b => "atomic read-modify-write",
        M::Add
        | M::Or
        | M::Adc
        | M::Sbb
        | M::And
        | M::Sub
        | M::Xor
        | M::Inc
        | M::Dec
        | M::Not
        | M::Neg
        | M::Bts
        | M::Btr
        | M::Btc
        | M::Shl
        | M::Shr
        | M::Sar
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr => "read-modify-write",
        M::Cmp | M::Test | M::Bt => "compare against memory",
        M::Push | M::Pop | M::Call | M::Jmp => "stack or control-flow access to memory",
        _ => "not a mov/movzx/movsx/movsxd form",
    }
}

/// Decodes one instruction at the start of `bytes` (fetched at `rip`):
/// the iced form and its bytes.
pub(super) fn decode_insn(
    bitness: Bitness,
    bytes: &InsnBytes,
    rip: u64,
) -> Result<(Instruction, InsnBytes), DecodeFailure> {
    let Ok(mut decoder) = Decoder::try_new(bitness.bits(), bytes.as_slice(), DecoderOptions::NONE)
    else {
        return Err(DecodeFailure::Invalid);
    };
    decoder.set_ip(rip);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => DecodeFailure::NeedMoreBytes,
            _ => DecodeFailure::Invalid,
        });
    }
    Ok((insn, bytes.truncated(insn.len())))
}

/// The mov forms as an [`MmioOp`], reading source registers from `regs`.
/// `Err(None)`: not a mov form (the caller picks the reason);
/// `Err(Some(reason))`: a mov form this emulator refuses.
pub(super) fn mov_form(
    bitness: Bitness,
    insn: Instruction,
    ib: InsnBytes,
    regs: &Regs,
) -> Result<Decoded, Option<&'static str>> {
    if insn.has_lock_prefix() {
        return Err(None);
    }

    // (access size, memory operand is operand 0 = write, destination width,
    // extension)
    use Code as C;
    let (size, write, width, extend) = match insn.code() {
        C::Mov_rm8_r8 | C::Mov_moffs8_AL => (1, true, 1, Extend::Plain),
        C::Mov_rm16_r16 | C::Mov_moffs16_AX => (2, true, 2, Extend::Plain),
        C::Mov_rm32_r32 | C::Mov_moffs32_EAX => (4, true, 4, Extend::Plain),
        C::Mov_rm64_r64 | C::Mov_moffs64_RAX => (8, true, 8, Extend::Plain),
        C::Mov_rm8_imm8 => (1, true, 1, Extend::Plain),
        C::Mov_rm16_imm16 => (2, true, 2, Extend::Plain),
        C::Mov_rm32_imm32 => (4, true, 4, Extend::Plain),
        C::Mov_rm64_imm32 => (8, true, 8, Extend::Plain),
        C::Mov_r8_rm8 | C::Mov_AL_moffs8 => (1, false, 1, Extend::Plain),
        C::Mov_r16_rm16
        | C::Mov_AX_moffs16
        | C::Movzx_r16_rm16
        | C::Movsx_r16_rm16
        | C::Movsxd_r16_rm16 => (2, false, 2, Extend::Plain),
        C::Mov_r32_rm32 | C::Mov_EAX_moffs32 | C::Movsxd_r32_rm32 => (4, false, 4, Extend::Plain),
        C::Mov_r64_rm64 | C::Mov_RAX_moffs64 => (8, false, 8, Extend::Plain),
        C::Movzx_r16_rm8 => (1, false, 2, Extend::Zero),
        C::Movzx_r32_rm8 => (1, false, 4, Extend::Zero),
        C::Movzx_r64_rm8 => (1, false, 8, Extend::Zero),
        C::Movzx_r32_rm16 => (2, false, 4, Extend::Zero),
        C::Movzx_r64_rm16 => (2, false, 8, Extend::Zero),
        C::Movsx_r16_rm8 => (1, false, 2, Extend::Sign),
        C::Movsx_r32_rm8 => (1, false, 4, Extend::Sign),
        C::Movsx_r64_rm8 => (1, false, 8, Extend::Sign),
        C::Movsx_r32_rm16 => (2, false, 4, Extend::Sign),
        C::Movsx_r64_rm16 => (2, false, 8, Extend::Sign),
        C::Movsxd_r64_rm32 => (4, false, 8, Extend::Sign),
        _ => return Err(None),
    };
    let (mem_operand, other) = if write { (0, 1) } else { (1, 0) };
    if insn.op_kind(mem_operand) != OpKind::Memory {
        return Err(Some("register operand: no memory access"));
    }
    let dir = if write {
        let value = match insn.op_kind(other) {
            OpKind::Immediate8 => u64::from(insn.immediate8()),
            OpKind::Immediate16 => u64::from(insn.immediate16()),
            OpKind::Immediate32 => u64::from(insn.immediate32()),
            OpKind::Immediate32to64 => insn.immediate32to64() as u64,
            OpKind::Register => {
                let (reg, w) = gpr(insn.op_register(other))
                    .ok_or(Some("source is not a general-purpose register"))?;
                read_reg(regs, reg, w)
            }
            _ => return Err(Some("unexpected source operand")),
        };
        MmioDir::Write {
            value: value & mask(size),
        }
    } else {
        let (reg, w) = match insn.op_kind(other) {
            OpKind::Register => gpr(insn.op_register(other)),
            _ => None,
        }
        .ok_or(Some("destination is not a general-purpose register"))?;
        if w != width {
            return Err(Some("unexpected destination width"));
        }
        MmioDir::Read(ReadDest { reg, width, extend })
    };
    Ok(Decoded {
        op: MmioOp {
            size,
            dir,
            insn: ib,
            mnemonic: insn.mnemonic(),
            bitness,
        },
        insn,
        mem_operand,
    })
}
