//! [`execute`]: a whole instruction performed against a [`PhysBus`].

use super::alu::{self, AluOp, BitOp};
use super::bus::{BusError, Executed, PhysBus};
use super::decode::{self, gpr, read_reg, write_reg, Decoded, RegRef};
use super::fetch::InsnBytes;
use super::string;
use super::walk::GuestPhysRead;
use super::{fetch_insn, AccessKind, Bitness, CpuMode, EmulateError, MmioDir, MmioExit, Regs, Seg};
use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind};

/// The instruction, for error reports.
#[derive(Clone, Copy)]
pub(super) struct Ctx {
    pub rip: u64,
    pub bytes: InsnBytes,
    pub mnemonic: Mnemonic,
}

impl Ctx {
    pub(super) fn bus(&self) -> impl Fn(BusError) -> EmulateError + '_ {
        move |error| EmulateError::Bus {
            rip: self.rip,
            mnemonic: self.mnemonic,
            error,
        }
    }
}

/// The non-memory operand of an ALU instruction.
#[derive(Clone, Copy, Debug)]
enum Src {
    /// Unary operation.
    None,
    Reg(RegRef),
    /// Already sign-extended and truncated to the operand size.
    Imm(u64),
}

/// What an instruction does, once decoded.
enum Plan {
    /// A mov form: one access.
    Mov(Decoded),
    /// `op [mem], src`, or `op reg, [mem]` when `reg_dst` is set.
    Alu {
        op: AluOp,
        size: u8,
        reg_dst: Option<RegRef>,
        src: Src,
    },
    /// `xchg [mem], reg`.
    Xchg { size: u8, reg: RegRef },
    /// `bt* [mem], bit`: the access is `delta` bytes from the operand's
    /// address (the register form's signed bit offset, SDM Vol. 2
    /// "BT—Bit Test").
    Bit {
        op: BitOp,
        size: u8,
        bit: u32,
        delta: u64,
    },
}

fn alu_op(m: Mnemonic) -> Option<AluOp> {
    use Mnemonic as M;
    Some(match m {
        M::Add => AluOp::Add,
        M::Or => AluOp::Or,
        M::Adc => AluOp::Adc,
        M::Sbb => AluOp::Sbb,
        M::And => AluOp::And,
        M::Sub => AluOp::Sub,
        M::Xor => AluOp::Xor,
        M::Cmp => AluOp::Cmp,
        M::Test => AluOp::Test,
        M::Inc => AluOp::Inc,
        M::Dec => AluOp::Dec,
        M::Not => AluOp::Not,
        M::Neg => AluOp::Neg,
        _ => return None,
    })
}

fn bit_op(m: Mnemonic) -> Option<BitOp> {
    Some(match m {
        Mnemonic::Bt => BitOp::Bt,
        Mnemonic::Bts => BitOp::Bts,
        Mnemonic::Btr => BitOp::Btr,
        Mnemonic::Btc => BitOp::Btc,
        _ => return None,
    })
}

/// Size of the (integer) memory operand.
fn mem_size(insn: &Instruction) -> Option<u8> {
    use MemorySize as S;
    Some(match insn.memory_size() {
        S::UInt8 | S::Int8 => 1,
        S::UInt16 | S::Int16 => 2,
        S::UInt32 | S::Int32 => 4,
        S::UInt64 | S::Int64 => 8,
        _ => return None,
    })
}

/// A general-purpose register operand `i` of exactly `size` bytes.
fn reg_operand(insn: &Instruction, i: u32, size: u8) -> Option<RegRef> {
    if insn.op_kind(i) != OpKind::Register {
        return None;
    }
    match gpr(insn.op_register(i)) {
        Some((r, w)) if w == size => Some(r),
        _ => None,
    }
}

/// Operand `i` as a register or an immediate (sign-extended as the
/// instruction defines, then truncated to `size`).
fn src_operand(insn: &Instruction, i: u32, size: u8) -> Option<Src> {
    match insn.op_kind(i) {
        OpKind::Register => reg_operand(insn, i, size).map(Src::Reg),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(Src::Imm(insn.immediate(i) & alu::mask(size))),
        _ => None,
    }
}

/// Sign-extends the low `size` bytes of `v`.
fn sign_extend(v: u64, size: u8) -> i64 {
    match size {
        1 => i64::from(v as u8 as i8),
        2 => i64::from(v as u16 as i16),
        4 => i64::from(v as u32 as i32),
        _ => v as i64,
    }
}

/// The index of the (single, ModRM or moffs) memory operand.
fn mem_operand(insn: &Instruction) -> Option<u32> {
    (0..insn.op_count()).find(|&i| insn.op_kind(i) == OpKind::Memory)
}

/// Why `execute` refuses `insn`.
fn refusal(insn: &Instruction) -> &'static str {
    use Mnemonic as M;
    let any_mem = (0..insn.op_count()).any(|i| {
        !matches!(
            insn.op_kind(i),
            OpKind::Register
                | OpKind::Immediate8
                | OpKind::Immediate8_2nd
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64
        )
    });
    match insn.mnemonic() {
        M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd => {
            "ins/outs: port I/O exits go through string_io"
        }
        M::Shl
        | M::Shr
        | M::Sar
        | M::Sal
        | M::Rol
        | M::Ror
        | M::Rcl
        | M::Rcr
        | M::Shld
        | M::Shrd => "shift or rotate of memory",
        M::Cmpxchg | M::Xadd | M::Cmpxchg8b | M::Cmpxchg16b => {
            "compare-exchange or exchange-add of memory"
        }
        _ if !any_mem => "register operands only: no memory access",
        _ => decode::unsupported_reason(insn),
    }
}

/// Decodes the non-string forms `execute` handles.
fn plan(
    bitness: Bitness,
    insn: Instruction,
    ib: InsnBytes,
    regs: &Regs,
) -> Result<Plan, &'static str> {
    match decode::mov_form(bitness, insn, ib, regs) {
        Ok(d) => return Ok(Plan::Mov(d)),
        Err(Some(reason)) => return Err(reason),
        Err(None) => {}
    }
    let Some(mem) = mem_operand(&insn) else {
        return Err(refusal(&insn));
    };
    let mn = insn.mnemonic();
    if let Some(op) = alu_op(mn) {
        let size = mem_size(&insn).ok_or("unexpected operand size")?;
        return match (op.binary(), insn.op_count(), mem) {
            (false, 1, 0) => Ok(Plan::Alu {
                op,
                size,
                reg_dst: None,
                src: Src::None,
            }),
            (true, 2, 0) => Ok(Plan::Alu {
                op,
                size,
                reg_dst: None,
                src: src_operand(&insn, 1, size).ok_or("unexpected source operand")?,
            }),
            (true, 2, 1) => Ok(Plan::Alu {
                op,
                size,
                reg_dst: Some(reg_operand(&insn, 0, size).ok_or("unexpected destination operand")?),
                src: Src::None,
            }),
            _ => Err("unexpected operands"),
        };
    }
    if mn == Mnemonic::Xchg {
        let size = mem_size(&insn).ok_or("unexpected operand size")?;
        let other = if mem == 0 { 1 } else { 0 };
        let reg = reg_operand(&insn, other, size).ok_or("unexpected xchg operand")?;
        return Ok(Plan::Xchg { size, reg });
    }
    if let Some(op) = bit_op(mn) {
        let size = mem_size(&insn).ok_or("unexpected operand size")?;
        if mem != 0 || !matches!(size, 2 | 4 | 8) {
            return Err("unexpected operands");
        }
        let bits = u32::from(size) * 8;
        return match src_operand(&insn, 1, size) {
            Some(Src::Imm(imm)) => Ok(Plan::Bit {
                op,
                size,
                bit: (imm as u32) & (bits - 1),
                delta: 0,
            }),
            Some(Src::Reg(r)) => {
                // The register is a signed bit offset from the operand's
                // address: the access is at (offset SAR log2(bits)) units of
                // `size` bytes, the bit is offset MOD bits.
                let offset = sign_extend(read_reg(regs, r, size), size);
                let units = offset >> bits.trailing_zeros();
                Ok(Plan::Bit {
                    op,
                    size,
                    bit: (offset as u32) & (bits - 1),
                    delta: units.wrapping_mul(i64::from(size)) as u64,
                })
            }
            _ => Err("unexpected bit offset operand"),
        };
    }
    Err(refusal(&insn))
}

/// Address size in bytes: the mode's, toggled by a 0x67 prefix.
pub(super) fn address_size(bitness: Bitness, bytes: &InsnBytes) -> u8 {
    let a32 = bytes
        .as_slice()
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
            )
        })
        .any(|&b| b == 0x67);
    match (bitness, a32) {
        (Bitness::B64, false) => 8,
        (Bitness::B64, true) | (Bitness::B32, false) | (Bitness::B16, true) => 4,
        (Bitness::B32, true) | (Bitness::B16, false) => 2,
    }
}

/// Linear address of the memory operand `delta` bytes on (wrapping within
/// the address size), with every segment base from `mode`.
fn mem_linear(
    mode: &CpuMode,
    regs: &Regs,
    insn: &Instruction,
    ib: &InsnBytes,
    delta: u64,
) -> Option<u64> {
    let i = mem_operand(insn)?;
    let offset = insn.virtual_address(i, 0, |reg, _, _| {
        if Seg::from_register(reg).is_some() {
            Some(0)
        } else {
            gpr(reg).map(|(r, w)| read_reg(regs, r, w))
        }
    })?;
    let seg = Seg::from_register(insn.memory_segment())?;
    let amask = alu::mask(address_size(mode.bitness(), ib));
    Some(mode.linear(seg, offset.wrapping_add(delta) & amask))
}

/// Which exit directions an instruction can cause.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
    /// A read-modify-write: the exit may report either.
    Either,
}

/// Checks the exit against the memory operand (direction, page split,
/// linear address) and gives the GPA to access.
#[allow(clippy::too_many_arguments)]
fn check_operand(
    mode: &CpuMode,
    regs: &Regs,
    insn: &Instruction,
    ctx: &Ctx,
    exit: &MmioExit,
    size: u8,
    delta: u64,
    dir: Dir,
) -> Result<u64, EmulateError> {
    let decoded = match dir {
        Dir::Read => Some(AccessKind::Read),
        Dir::Write => Some(AccessKind::Write),
        Dir::Either => None,
    };
    if let Some(decoded) = decoded.filter(|&d| d != exit.kind) {
        return Err(EmulateError::DirectionMismatch {
            rip: ctx.rip,
            bytes: ctx.bytes,
            mnemonic: ctx.mnemonic,
            exit: exit.kind,
            decoded,
        });
    }
    if (exit.gpa & 0xfff) + u64::from(size) > 0x1000 {
        return Err(EmulateError::PageSplit {
            rip: ctx.rip,
            bytes: ctx.bytes,
            mnemonic: ctx.mnemonic,
            gpa: exit.gpa,
            size,
        });
    }
    if let (Some(exit_linear), Some(operand_linear)) =
        (exit.linear, mem_linear(mode, regs, insn, &ctx.bytes, delta))
    {
        let exit_linear = if mode.bitness() == Bitness::B64 {
            exit_linear
        } else {
            exit_linear & 0xffff_ffff
        };
        if exit_linear != operand_linear {
            return Err(EmulateError::OperandMismatch {
                rip: ctx.rip,
                bytes: ctx.bytes,
                mnemonic: ctx.mnemonic,
                exit_linear,
                operand_linear,
            });
        }
    }
    Ok(exit.gpa)
}

/// Completes an instruction: RIP past it with the code width's wrap,
/// RFLAGS.RF cleared.
pub(super) fn advance(mode: &CpuMode, regs: &mut Regs, len: usize) {
    regs.rip = mode.next_rip(regs.rip, len as u64);
    regs.rflags &= !Regs::RFLAGS_RF;
}

/// Fetches, decodes and performs the instruction at `regs.rip` that caused
/// the MMIO exit `exit`, with every data access going through `bus`
/// (`mem` serves the page walks and the instruction fetch), and updates
/// `regs`: destination registers, RFLAGS status flags, RSI/RDI/RCX of
/// string instructions, RIP (advanced unless a `rep` string instruction
/// must run again) and RFLAGS.RF.
///
/// Non-string forms access exactly the operand at `exit.gpa` (refused if
/// it crosses a page) after checking the direction and, when the exit has
/// one, the linear address; string forms translate every element with the
/// guest's page tables and require one of the operands to be at
/// `exit.gpa`. On error `regs` is unchanged (bus accesses already made
/// are not undone).
pub fn execute<M, B>(
    mode: &CpuMode,
    mem: &M,
    bus: &mut B,
    regs: &mut Regs,
    exit: &MmioExit,
) -> Result<Executed, EmulateError>
where
    M: GuestPhysRead + ?Sized,
    B: PhysBus + ?Sized,
{
    let rip = regs.rip;
    if exit.kind == AccessKind::Fetch {
        return Err(EmulateError::FetchFromMmio { gpa: exit.gpa, rip });
    }
    let (insn, ib) = fetch_insn(mode, mem, rip)?;
    let ctx = Ctx {
        rip,
        bytes: ib,
        mnemonic: insn.mnemonic(),
    };
    match string::classify(&insn) {
        Some(Ok(op)) => return string::execute_string(mode, mem, bus, regs, exit, op, &ctx),
        Some(Err(reason)) => {
            return Err(EmulateError::Unsupported {
                rip,
                bytes: ib,
                mnemonic: ctx.mnemonic,
                reason,
            })
        }
        None => {}
    }
    let plan =
        plan(mode.bitness(), insn, ib, regs).map_err(|reason| EmulateError::Unsupported {
            rip,
            bytes: ib,
            mnemonic: ctx.mnemonic,
            reason,
        })?;
    let mut r = *regs;
    let berr = ctx.bus();
    let accesses = match plan {
        Plan::Mov(d) => {
            let op = d.op;
            let dir = if op.is_write() { Dir::Write } else { Dir::Read };
            let gpa = check_operand(mode, regs, &insn, &ctx, exit, op.size, 0, dir)?;
            match op.dir {
                MmioDir::Write { value } => bus.write(gpa, op.size, value).map_err(&berr)?,
                MmioDir::Read(_) => {
                    let v = bus.read(gpa, op.size).map_err(&berr)?;
                    op.complete_read(v, &mut r);
                }
            }
            1
        }
        Plan::Alu {
            op,
            size,
            reg_dst: None,
            src,
        } => {
            let dir = if op.writes() { Dir::Either } else { Dir::Read };
            let gpa = check_operand(mode, regs, &insn, &ctx, exit, size, 0, dir)?;
            let b = match src {
                Src::None => 0,
                Src::Reg(reg) => read_reg(regs, reg, size),
                Src::Imm(v) => v,
            };
            let a = bus.read(gpa, size).map_err(&berr)?;
            let (v, flags) = alu::alu(op, size, a, b, r.rflags);
            if op.writes() {
                bus.write(gpa, size, v).map_err(&berr)?;
            }
            r.rflags = flags;
            if op.writes() {
                2
            } else {
                1
            }
        }
        Plan::Alu {
            op,
            size,
            reg_dst: Some(reg),
            ..
        } => {
            let gpa = check_operand(mode, regs, &insn, &ctx, exit, size, 0, Dir::Read)?;
            let b = bus.read(gpa, size).map_err(&berr)?;
            let (v, flags) = alu::alu(op, size, read_reg(regs, reg, size), b, r.rflags);
            if op.writes() {
                write_reg(&mut r, reg, size, v);
            }
            r.rflags = flags;
            1
        }
        Plan::Xchg { size, reg } => {
            let gpa = check_operand(mode, regs, &insn, &ctx, exit, size, 0, Dir::Either)?;
            let old = bus.read(gpa, size).map_err(&berr)?;
            bus.write(gpa, size, read_reg(regs, reg, size))
                .map_err(&berr)?;
            write_reg(&mut r, reg, size, old);
            2
        }
        Plan::Bit {
            op,
            size,
            bit,
            delta,
        } => {
            let dir = if op == BitOp::Bt {
                Dir::Read
            } else {
                Dir::Either
            };
            let gpa = check_operand(mode, regs, &insn, &ctx, exit, size, delta, dir)?;
            let old = bus.read(gpa, size).map_err(&berr)?;
            let (v, flags) = alu::bit_op(op, old, bit, r.rflags);
            if op != BitOp::Bt {
                bus.write(gpa, size, v).map_err(&berr)?;
            }
            r.rflags = flags;
            if op == BitOp::Bt {
                1
            } else {
                2
            }
        }
    };
    advance(mode, &mut r, ib.len());
    *regs = r;
    Ok(Executed {
        mnemonic: ctx.mnemonic,
        mem_accesses: accesses,
        port_accesses: 0,
        iterations: 1,
        rip_advanced: true,
    })
}
