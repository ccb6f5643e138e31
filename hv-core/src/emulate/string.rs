//! String instructions: `movs`, `stos`, `lods`, `cmps` and `scas` on MMIO
//! (through [`execute`](super::execute)) and `ins`/`outs` port I/O
//! ([`string_io`]).
//!
//! Each call does at most one batch of iterations: it stops after
//! [`MAX_REP_ITERATIONS`], when the count reaches 0, when `repe`/`repne`
//! ends a compare, or before an element of either operand would leave the
//! page (4 KiB of linear space) its first element is in. Each operand is
//! translated once per call, with the guest's page tables. With the count
//! not yet 0, RIP stays on the instruction and the guest runs it again, as
//! KVM does; an interrupt may be taken in between.

use super::alu::{self, AluOp, DF, ZF};
use super::bus::{Executed, PhysBus, PortBus};
use super::decode::{write_reg, RegRef};
use super::exec::{advance, Ctx};
use super::walk::{translate, GuestPhysRead};
use super::{AccessKind, Bitness, CpuMode, EmulateError, MmioExit, Regs, Seg};
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

/// The most iterations of a `rep` string instruction one call performs.
pub const MAX_REP_ITERATIONS: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StrKind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rep {
    None,
    /// F3: `rep`, or `repe` for compares.
    Repe,
    /// F2: `repne` for compares, `rep` for the others (as on hardware).
    Repne,
}

/// A decoded memory string instruction.
#[derive(Clone, Copy, Debug)]
pub(super) struct StrOp {
    kind: StrKind,
    size: u8,
    /// Address size in bytes: 2, 4 or 8.
    asize: u8,
    /// The source segment (DS or the override) of `movs`/`lods`/`cmps`.
    src_seg: Seg,
    rep: Rep,
}

/// `None`: not a memory string instruction. `Some(Err(reason))`: one this
/// emulator refuses.
pub(super) fn classify(insn: &Instruction) -> Option<Result<StrOp, &'static str>> {
    use Code as C;
    let (kind, size) = match insn.code() {
        C::Movsb_m8_m8 => (StrKind::Movs, 1),
        C::Movsw_m16_m16 => (StrKind::Movs, 2),
        C::Movsd_m32_m32 => (StrKind::Movs, 4),
        C::Movsq_m64_m64 => (StrKind::Movs, 8),
        C::Stosb_m8_AL => (StrKind::Stos, 1),
        C::Stosw_m16_AX => (StrKind::Stos, 2),
        C::Stosd_m32_EAX => (StrKind::Stos, 4),
        C::Stosq_m64_RAX => (StrKind::Stos, 8),
        C::Lodsb_AL_m8 => (StrKind::Lods, 1),
        C::Lodsw_AX_m16 => (StrKind::Lods, 2),
        C::Lodsd_EAX_m32 => (StrKind::Lods, 4),
        C::Lodsq_RAX_m64 => (StrKind::Lods, 8),
        C::Cmpsb_m8_m8 => (StrKind::Cmps, 1),
        C::Cmpsw_m16_m16 => (StrKind::Cmps, 2),
        C::Cmpsd_m32_m32 => (StrKind::Cmps, 4),
        C::Cmpsq_m64_m64 => (StrKind::Cmps, 8),
        C::Scasb_AL_m8 => (StrKind::Scas, 1),
        C::Scasw_AX_m16 => (StrKind::Scas, 2),
        C::Scasd_EAX_m32 => (StrKind::Scas, 4),
        C::Scasq_RAX_m64 => (StrKind::Scas, 8),
        _ => return None,
    };
    let asize = (0..insn.op_count()).find_map(|i| match insn.op_kind(i) {
        OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => Some(2),
        OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => Some(4),
        OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => Some(8),
        _ => None,
    });
    let src_seg = Seg::from_register(insn.memory_segment());
    let rep = if insn.has_rep_prefix() {
        Rep::Repe
    } else if insn.has_repne_prefix() {
        Rep::Repne
    } else {
        Rep::None
    };
    Some(match (asize, src_seg) {
        (Some(asize), Some(src_seg)) => Ok(StrOp {
            kind,
            size,
            asize,
            src_seg,
            rep,
        }),
        _ => Err("unexpected string operands"),
    })
}

/// One memory operand of a string instruction.
#[derive(Clone, Copy)]
struct Side {
    seg: Seg,
    /// RSI or RDI.
    reg: usize,
    access: AccessKind,
}

/// A side's first element, translated.
#[derive(Clone, Copy)]
struct Placed {
    gpa: u64,
    /// How many elements from the first stay in its page and do not wrap
    /// the offset (at least 1).
    fit: u64,
}

/// The low `asize` bytes of register `idx`.
fn addr_reg(regs: &Regs, idx: usize, asize: u8) -> u64 {
    regs.gpr[idx & 15] & alu::mask(asize)
}

/// Writes an address-size register: 16-bit keeps bits 63:16, 32-bit
/// zero-extends (as a 32-bit register write does), 64-bit is whole.
fn set_addr_reg(regs: &mut Regs, idx: usize, asize: u8, v: u64) {
    let slot = &mut regs.gpr[idx & 15];
    *slot = match asize {
        2 => (*slot & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff,
        _ => v,
    };
}

/// Steps RSI or RDI by one element, wrapping within the address size.
fn step_reg(regs: &mut Regs, idx: usize, asize: u8, size: u8, down: bool) {
    let v = addr_reg(regs, idx, asize);
    let v = if down {
        v.wrapping_sub(u64::from(size))
    } else {
        v.wrapping_add(u64::from(size))
    };
    set_addr_reg(regs, idx, asize, v);
}

/// Translates `side`'s first element and works out how many elements fit.
#[allow(clippy::too_many_arguments)]
fn place<M: GuestPhysRead + ?Sized>(
    mode: &CpuMode,
    mem: &M,
    regs: &Regs,
    side: Side,
    size: u8,
    asize: u8,
    down: bool,
    rip: u64,
    mnemonic: Mnemonic,
) -> Result<Placed, EmulateError> {
    let amask = alu::mask(asize);
    let sz = u64::from(size);
    let off = addr_reg(regs, side.reg, asize);
    let linear = mode.linear(side.seg, off);
    let page_off = linear & 0xfff;
    let last = amask - (sz - 1);
    if off > last || page_off + sz > 0x1000 {
        return Err(EmulateError::ElementSplit {
            rip,
            mnemonic,
            linear,
            size,
        });
    }
    let gpa =
        translate(mode, mem, linear, side.access).map_err(|error| EmulateError::OperandWalk {
            rip,
            mnemonic,
            linear,
            access: side.access,
            error,
        })?;
    let fit = if down {
        (off / sz).min(page_off / sz) + 1
    } else {
        ((last - off) / sz + 1).min((0x1000 - page_off) / sz)
    };
    Ok(Placed { gpa, fit })
}

/// GPA of element `k` of a side.
fn element(p: Placed, k: u64, size: u8, down: bool) -> u64 {
    let d = k.wrapping_mul(u64::from(size));
    if down {
        p.gpa.wrapping_sub(d)
    } else {
        p.gpa.wrapping_add(d)
    }
}

const RAX: RegRef = RegRef {
    index: Regs::RAX as u8,
    high_byte: false,
};

/// `movs`/`stos`/`lods`/`cmps`/`scas`, one batch.
pub(super) fn execute_string<M, B>(
    mode: &CpuMode,
    mem: &M,
    bus: &mut B,
    regs: &mut Regs,
    exit: &MmioExit,
    op: StrOp,
    ctx: &Ctx,
) -> Result<Executed, EmulateError>
where
    M: GuestPhysRead + ?Sized,
    B: PhysBus + ?Sized,
{
    let StrOp {
        kind,
        size,
        asize,
        src_seg,
        rep,
    } = op;
    let down = regs.rflags & DF != 0;
    let repeated = rep != Rep::None;
    let count = if repeated {
        addr_reg(regs, Regs::RCX, asize)
    } else {
        1
    };
    let mut r = *regs;
    let done = |r: &mut Regs, mem_accesses, iterations, rip_advanced| {
        if rip_advanced {
            advance(mode, r, ctx.bytes.len());
        }
        Executed {
            mnemonic: ctx.mnemonic,
            mem_accesses,
            port_accesses: 0,
            iterations,
            rip_advanced,
        }
    };
    if count == 0 {
        let e = done(&mut r, 0, 0, true);
        *regs = r;
        return Ok(e);
    }
    let src = matches!(kind, StrKind::Movs | StrKind::Lods | StrKind::Cmps).then_some(Side {
        seg: src_seg,
        reg: Regs::RSI,
        access: AccessKind::Read,
    });
    let dst = (kind != StrKind::Lods).then_some(Side {
        seg: Seg::Es,
        reg: Regs::RDI,
        access: if matches!(kind, StrKind::Movs | StrKind::Stos) {
            AccessKind::Write
        } else {
            AccessKind::Read
        },
    });
    let place = |s: Side| place(mode, mem, regs, s, size, asize, down, ctx.rip, ctx.mnemonic);
    let src_p = src.map(place).transpose()?;
    let dst_p = dst.map(place).transpose()?;
    let covers =
        |p: Option<Placed>| p.is_some_and(|p| exit.gpa.wrapping_sub(p.gpa) < u64::from(size));
    if !covers(src_p) && !covers(dst_p) {
        return Err(EmulateError::StringMismatch {
            rip: ctx.rip,
            bytes: ctx.bytes,
            mnemonic: ctx.mnemonic,
            exit_gpa: exit.gpa,
            src_gpa: src_p.map(|p| p.gpa),
            dst_gpa: dst_p.map(|p| p.gpa),
        });
    }
    let n = [src_p, dst_p]
        .iter()
        .flatten()
        .map(|p| p.fit)
        .fold(count.min(u64::from(MAX_REP_ITERATIONS)), u64::min);
    let m = alu::mask(size);
    let berr = ctx.bus();
    let mut accesses = 0u32;
    let mut iterations = 0u32;
    let mut ended = false;
    for k in 0..n {
        let src_gpa = src_p.map(|p| element(p, k, size, down));
        let dst_gpa = dst_p.map(|p| element(p, k, size, down));
        match (kind, src_gpa, dst_gpa) {
            (StrKind::Movs, Some(s), Some(d)) => {
                let v = bus.read(s, size).map_err(&berr)?;
                bus.write(d, size, v).map_err(&berr)?;
                accesses += 2;
            }
            (StrKind::Stos, _, Some(d)) => {
                bus.write(d, size, r.gpr[Regs::RAX] & m).map_err(&berr)?;
                accesses += 1;
            }
            (StrKind::Lods, Some(s), _) => {
                let v = bus.read(s, size).map_err(&berr)?;
                write_reg(&mut r, RAX, size, v);
                accesses += 1;
            }
            (StrKind::Cmps, Some(s), Some(d)) => {
                let a = bus.read(s, size).map_err(&berr)?;
                let b = bus.read(d, size).map_err(&berr)?;
                r.rflags = alu::alu(AluOp::Cmp, size, a, b, r.rflags).1;
                accesses += 2;
            }
            (StrKind::Scas, _, Some(d)) => {
                let b = bus.read(d, size).map_err(&berr)?;
                r.rflags = alu::alu(AluOp::Cmp, size, r.gpr[Regs::RAX], b, r.rflags).1;
                accesses += 1;
            }
            // Every kind has the sides it uses (see `src`/`dst` above).
            _ => break,
        }
        if let Some(s) = src {
            step_reg(&mut r, s.reg, asize, size, down);
        }
        if let Some(d) = dst {
            step_reg(&mut r, d.reg, asize, size, down);
        }
        iterations += 1;
        if repeated {
            let c = addr_reg(&r, Regs::RCX, asize).wrapping_sub(1);
            set_addr_reg(&mut r, Regs::RCX, asize, c);
            if matches!(kind, StrKind::Cmps | StrKind::Scas) {
                let zf = r.rflags & ZF != 0;
                if (rep == Rep::Repe && !zf) || (rep == Rep::Repne && zf) {
                    ended = true;
                    break;
                }
            }
        }
    }
    let complete = !repeated || ended || addr_reg(&r, Regs::RCX, asize) == 0;
    let e = done(&mut r, accesses, iterations, complete);
    *regs = r;
    Ok(e)
}

/// A string I/O exit (`ins`/`outs`, with or without `rep`), as the exit
/// qualification and the VM-exit instruction-information field describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StringIo {
    pub port: u16,
    /// 1, 2 or 4.
    pub size: u8,
    /// `ins` (port to memory) rather than `outs`.
    pub input: bool,
    pub rep: bool,
    /// Address size in bytes: 2, 4 or 8.
    pub addr_size: u8,
    /// Source segment of `outs` (encoding order, see [`Seg`]); `ins`
    /// always writes ES:RDI and ignores it.
    pub seg: u8,
    /// Instruction length (VM-exit instruction length), 1..=15.
    pub insn_len: u8,
}

impl StringIo {
    /// Decodes an I/O-instruction exit for INS/OUTS: the exit qualification
    /// (SDM Vol. 3C, Table 28-5: bits 2:0 size - 1, bit 3 direction (1 =
    /// IN), bit 4 string, bit 5 REP, bits 31:16 port), the VM-exit
    /// instruction-information field (Table "Format of the VM-Exit
    /// Instruction-Information Field as Used for INS and OUTS": bits 9:7
    /// address size 0/1/2 = 16/32/64-bit, bits 17:15 segment register,
    /// undefined for INS) and the VM-exit instruction length.
    pub fn from_exit(
        qualification: u64,
        instr_info: u32,
        insn_len: u32,
    ) -> Result<Self, EmulateError> {
        let bad = |reason| Err(EmulateError::BadStringIo { reason });
        if qualification & (1 << 4) == 0 {
            return bad("not a string instruction (qualification bit 4 clear)");
        }
        let size = match qualification & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return bad("reserved access-size encoding"),
        };
        let addr_size = match (instr_info >> 7) & 7 {
            0 => 2,
            1 => 4,
            2 => 8,
            _ => return bad("reserved address-size encoding"),
        };
        let input = qualification & (1 << 3) != 0;
        let seg = if input {
            Seg::Es as u8
        } else {
            ((instr_info >> 15) & 7) as u8
        };
        let Ok(insn_len @ 1..=15) = u8::try_from(insn_len) else {
            return bad("instruction length not in 1..=15");
        };
        Ok(Self {
            port: (qualification >> 16) as u16,
            size,
            input,
            rep: qualification & (1 << 5) != 0,
            addr_size,
            seg,
            insn_len,
        })
    }

    fn mnemonic(&self) -> Mnemonic {
        match (self.input, self.size) {
            (true, 1) => Mnemonic::Insb,
            (true, 2) => Mnemonic::Insw,
            (true, _) => Mnemonic::Insd,
            (false, 1) => Mnemonic::Outsb,
            (false, 2) => Mnemonic::Outsw,
            (false, _) => Mnemonic::Outsd,
        }
    }

    /// Refuses values no exit in `mode` can give.
    fn check(&self, mode: &CpuMode) -> Result<Seg, EmulateError> {
        let bad = |reason| Err(EmulateError::BadStringIo { reason });
        if !matches!(self.size, 1 | 2 | 4) {
            return bad("access size not 1, 2 or 4");
        }
        let ok_asize = match mode.bitness() {
            Bitness::B64 => matches!(self.addr_size, 4 | 8),
            _ => matches!(self.addr_size, 2 | 4),
        };
        if !ok_asize {
            return bad("address size impossible in this mode");
        }
        if !(1..=15).contains(&self.insn_len) {
            return bad("instruction length not in 1..=15");
        }
        if self.input {
            return Ok(Seg::Es);
        }
        match Seg::from_index(self.seg) {
            Some(seg) => Ok(seg),
            None => bad("segment register encoding above 5"),
        }
    }
}

/// Performs a string I/O instruction (`ins`/`outs`, `rep` or not) whose
/// exit `io` describes: `ins` reads `ports` and writes ES:RDI through
/// `bus`, `outs` reads seg:RSI through `bus` and writes `ports`. RDI/RSI
/// step by the size (down with RFLAGS.DF), RCX counts down with `rep`, and
/// RIP advances by `io.insn_len` once the instruction completes; a `rep`
/// with RCX = 0 only advances RIP. At most one batch per call (see the
/// module docs). On error `regs` is unchanged.
pub fn string_io<M, B, P>(
    mode: &CpuMode,
    mem: &M,
    bus: &mut B,
    ports: &mut P,
    regs: &mut Regs,
    io: &StringIo,
) -> Result<Executed, EmulateError>
where
    M: GuestPhysRead + ?Sized,
    B: PhysBus + ?Sized,
    P: PortBus + ?Sized,
{
    let rip = regs.rip;
    let seg = io.check(mode)?;
    let (size, asize) = (io.size, io.addr_size);
    let mnemonic = io.mnemonic();
    let down = regs.rflags & DF != 0;
    let count = if io.rep {
        addr_reg(regs, Regs::RCX, asize)
    } else {
        1
    };
    let mut r = *regs;
    let finish = |r: &mut Regs, mem_accesses, port_accesses, iterations, rip_advanced| {
        if rip_advanced {
            advance(mode, r, usize::from(io.insn_len));
        }
        Executed {
            mnemonic,
            mem_accesses,
            port_accesses,
            iterations,
            rip_advanced,
        }
    };
    if count == 0 {
        let e = finish(&mut r, 0, 0, 0, true);
        *regs = r;
        return Ok(e);
    }
    let side = if io.input {
        Side {
            seg: Seg::Es,
            reg: Regs::RDI,
            access: AccessKind::Write,
        }
    } else {
        Side {
            seg,
            reg: Regs::RSI,
            access: AccessKind::Read,
        }
    };
    let p = place(mode, mem, regs, side, size, asize, down, rip, mnemonic)?;
    let n = p.fit.min(count).min(u64::from(MAX_REP_ITERATIONS));
    let berr = |error| EmulateError::Bus {
        rip,
        mnemonic,
        error,
    };
    let m = alu::mask(size);
    let mut iterations = 0u32;
    for k in 0..n {
        let gpa = element(p, k, size, down);
        if io.input {
            let v = ports.read(io.port, size) & m;
            bus.write(gpa, size, v).map_err(berr)?;
        } else {
            let v = bus.read(gpa, size).map_err(berr)? & m;
            ports.write(io.port, size, v).map_err(berr)?;
        }
        step_reg(&mut r, side.reg, asize, size, down);
        if io.rep {
            let c = addr_reg(&r, Regs::RCX, asize).wrapping_sub(1);
            set_addr_reg(&mut r, Regs::RCX, asize, c);
        }
        iterations += 1;
    }
    let complete = !io.rep || addr_reg(&r, Regs::RCX, asize) == 0;
    let e = finish(&mut r, iterations, iterations, iterations, complete);
    *regs = r;
    Ok(e)
}
