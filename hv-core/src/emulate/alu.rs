//! Integer arithmetic with the x86 status flags, as the SDM (Vol. 1,
//! 3.4.3.1 and the Vol. 2 instruction pages) defines them for each
//! instruction. Pure functions over values already truncated to the
//! operand size.

pub(super) const CF: u64 = 1 << 0;
pub(super) const PF: u64 = 1 << 2;
pub(super) const AF: u64 = 1 << 4;
pub(super) const ZF: u64 = 1 << 6;
pub(super) const SF: u64 = 1 << 7;
pub(super) const DF: u64 = 1 << 10;
pub(super) const OF: u64 = 1 << 11;
/// The six status flags.
pub(super) const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// An operation with a memory operand and a status-flag result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AluOp {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
    Test,
    Inc,
    Dec,
    Not,
    Neg,
}

impl AluOp {
    /// Whether the result is written to the destination (`cmp` and `test`
    /// only set flags).
    pub(super) fn writes(self) -> bool {
        !matches!(self, Self::Cmp | Self::Test)
    }

    /// Whether the operation has a second (source) operand.
    pub(super) fn binary(self) -> bool {
        !matches!(self, Self::Inc | Self::Dec | Self::Not | Self::Neg)
    }
}

/// Bit-test operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BitOp {
    Bt,
    Bts,
    Btr,
    Btc,
}

/// All ones in the low `size` bytes.
pub(super) const fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// ZF, SF and PF of a result (PF: even parity of the low byte).
fn zsp(r: u64, sign: u64) -> u64 {
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & sign != 0 {
        f |= SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// Computes `dst op src` at `size` bytes (both already truncated; `src` is
/// ignored by the unary operations) with the incoming `rflags`. Returns the
/// result (meaningless for `cmp`/`test`, which write nothing) and the new
/// RFLAGS: the status flags replaced as the instruction defines them, all
/// other bits kept.
///
/// * add/adc/sub/sbb/cmp: all six flags from the result.
/// * and/or/xor/test: CF = OF = 0; AF is undefined in the SDM and left 0
///   here.
/// * inc/dec: like add/sub 1 but CF is kept.
/// * neg: like 0 - dst, CF = (dst != 0).
/// * not: no flag changes.
pub(super) fn alu(op: AluOp, size: u8, dst: u64, src: u64, rflags: u64) -> (u64, u64) {
    let bits = u32::from(size.clamp(1, 8)) * 8;
    let m = mask(size);
    let sign = 1u64 << (bits - 1);
    let (a, b) = (dst & m, src & m);
    let carry_in = u64::from(rflags & CF != 0);
    // (result, CF, OF, AF)
    let (r, cf, of, af) = match op {
        AluOp::Add | AluOp::Adc => {
            let c = if op == AluOp::Adc { carry_in } else { 0 };
            let wide = u128::from(a) + u128::from(b) + u128::from(c);
            let r = (wide as u64) & m;
            (
                r,
                (wide >> bits) != 0,
                (a ^ r) & (b ^ r) & sign != 0,
                (a ^ b ^ r) & 0x10 != 0,
            )
        }
        AluOp::Sub | AluOp::Sbb | AluOp::Cmp => {
            let c = if op == AluOp::Sbb { carry_in } else { 0 };
            let r = a.wrapping_sub(b).wrapping_sub(c) & m;
            (
                r,
                u128::from(a) < u128::from(b) + u128::from(c),
                (a ^ b) & (a ^ r) & sign != 0,
                (a ^ b ^ r) & 0x10 != 0,
            )
        }
        AluOp::And | AluOp::Test => (a & b, false, false, false),
        AluOp::Or => (a | b, false, false, false),
        AluOp::Xor => (a ^ b, false, false, false),
        AluOp::Inc => {
            let r = a.wrapping_add(1) & m;
            (r, carry_in != 0, r == sign, (a ^ 1 ^ r) & 0x10 != 0)
        }
        AluOp::Dec => {
            let r = a.wrapping_sub(1) & m;
            (r, carry_in != 0, a == sign, (a ^ 1 ^ r) & 0x10 != 0)
        }
        AluOp::Neg => {
            let r = a.wrapping_neg() & m;
            (r, a != 0, a == sign, (a ^ r) & 0x10 != 0)
        }
        AluOp::Not => return (!a & m, rflags),
    };
    let mut f = zsp(r, sign);
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    if af {
        f |= AF;
    }
    (r, (rflags & !STATUS) | f)
}

/// `bt*` on `value` at bit `bit` (already reduced modulo the operand
/// width). Returns the new value (unchanged for `bt`) and RFLAGS with CF =
/// the old bit; the other status flags are kept (OF, SF, AF and PF are
/// undefined in the SDM, ZF unaffected).
pub(super) fn bit_op(op: BitOp, value: u64, bit: u32, rflags: u64) -> (u64, u64) {
    let b = 1u64 << (bit & 63);
    let cf = if value & b != 0 { CF } else { 0 };
    let v = match op {
        BitOp::Bt => value,
        BitOp::Bts => value | b,
        BitOp::Btr => value & !b,
        BitOp::Btc => value ^ b,
    };
    (v, (rflags & !CF) | cf)
}
