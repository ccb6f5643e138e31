//! Host tests for [`execute`] and [`string_io`]: every new form against a
//! mock bus that records its accesses, flags worked out by hand, string
//! batching and wrap-around, refusals, and proptests that nothing the guest
//! controls panics.

use super::*;
use crate::emulate::alu::{self, AluOp, AF, CF, DF, OF, PF, SF, ZF};

/// One recorded bus access: (gpa, size, value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acc {
    R(u64, u8, u64),
    W(u64, u8, u64),
}

/// RAM from a [`Mem`] plus device ranges holding bytes; every access is
/// logged. A read of a GPA in `fail` fails.
struct Bus {
    ram: Mem,
    dev: BTreeMap<u64, u8>,
    log: Vec<Acc>,
    fail: Option<u64>,
}

fn is_dev(gpa: u64) -> bool {
    (0xfed0_0000..0xfee0_0000).contains(&gpa) || (0xa_0000..0xc_0000).contains(&gpa)
}

impl Bus {
    fn new(ram: &Mem) -> Self {
        Self {
            ram: ram.clone(),
            dev: BTreeMap::new(),
            log: Vec::new(),
            fail: None,
        }
    }
    fn set(&mut self, gpa: u64, size: u8, v: u64) {
        for i in 0..u64::from(size) {
            let a = gpa + i;
            if is_dev(a) {
                self.dev.insert(a, (v >> (8 * i)) as u8);
            } else {
                self.ram.write(a, &[(v >> (8 * i)) as u8]);
            }
        }
    }
    fn get(&self, gpa: u64, size: u8) -> u64 {
        let mut v = 0;
        for i in 0..u64::from(size) {
            let a = gpa + i;
            let b = if is_dev(a) {
                self.dev.get(&a).copied().unwrap_or(0)
            } else {
                let mut b = [0];
                self.ram.read_phys(a, &mut b).map(|()| b[0]).unwrap_or(0xee)
            };
            v |= u64::from(b) << (8 * i);
        }
        v
    }
    fn check(&self, gpa: u64, size: u8) -> Result<(), BusError> {
        assert!(matches!(size, 1 | 2 | 4 | 8), "size {size}");
        assert!((gpa & 0xfff) + u64::from(size) <= 0x1000, "split {gpa:#x}");
        if self.fail == Some(gpa) {
            return Err(BusError {
                gpa,
                reason: "device error",
            });
        }
        let mut b = [0u8; 8];
        if !is_dev(gpa)
            && self
                .ram
                .read_phys(gpa, &mut b[..usize::from(size)])
                .is_err()
        {
            return Err(BusError {
                gpa,
                reason: "nothing there",
            });
        }
        Ok(())
    }
    fn dev_log(&self) -> Vec<Acc> {
        self.log
            .iter()
            .copied()
            .filter(|a| matches!(a, Acc::R(g, ..) | Acc::W(g, ..) if is_dev(*g)))
            .collect()
    }
}

impl PhysBus for Bus {
    fn read(&mut self, gpa: u64, size: u8) -> Result<u64, BusError> {
        self.check(gpa, size)?;
        let v = self.get(gpa, size);
        self.log.push(Acc::R(gpa, size, v));
        Ok(v)
    }
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> Result<(), BusError> {
        self.check(gpa, size)?;
        assert_eq!(value & !alu::mask(size), 0, "value wider than the access");
        self.set(gpa, size, value);
        self.log.push(Acc::W(gpa, size, value));
        Ok(())
    }
}

/// Ports: reads return `next` and count up; writes are logged.
#[derive(Default)]
struct Ports {
    next: u64,
    log: Vec<(bool, u16, u8, u64)>,
}

impl PortBus for Ports {
    fn read(&mut self, port: u16, size: u8) -> u64 {
        let v = self.next & alu::mask(size);
        self.next += 0x0101;
        self.log.push((false, port, size, v));
        v
    }
    fn write(&mut self, port: u16, size: u8, value: u64) -> Result<(), BusError> {
        if port == 0xdead {
            return Err(BusError {
                gpa: u64::from(port),
                reason: "port error",
            });
        }
        self.log.push((true, port, size, value));
        Ok(())
    }
}

/// Guest RAM at linear RAM_LIN (4 pages, identity GPA), a device at
/// linear DEV_LIN -> GPA DEV (2 pages).
const RAM_LIN: u64 = 0x10_0000;
const DEV_LIN: u64 = 0x20_0000;
const DEV: u64 = 0xfed0_0000;

fn guest64(code: &[u8]) -> (CpuMode, Mem, Regs) {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    t.map4(&mut mem, CODE, CODE_GPA);
    for i in 0..4 {
        t.map4(&mut mem, RAM_LIN + i * 0x1000, RAM_LIN + i * 0x1000);
        mem.touch(RAM_LIN + i * 0x1000);
    }
    for i in 0..2 {
        t.map4(&mut mem, DEV_LIN + i * 0x1000, DEV + i * 0x1000);
    }
    mem.write(CODE_GPA, code);
    let mut regs = Regs {
        rip: CODE,
        rflags: 2 | Regs::RFLAGS_RF,
        ..Regs::default()
    };
    regs.gpr[Regs::RDI] = DEV_LIN;
    regs.gpr[Regs::RSI] = RAM_LIN;
    (mode64(t.cr3), mem, regs)
}

/// Runs `code` once on a fresh 64-bit guest after `prep`.
fn run(
    code: &[u8],
    exit: MmioExit,
    prep: impl FnOnce(&mut Regs, &mut Bus),
) -> (Regs, Result<Executed, EmulateError>, Regs, Bus) {
    let (mode, mem, mut regs) = guest64(code);
    let mut bus = Bus::new(&mem);
    prep(&mut regs, &mut bus);
    let before = regs;
    let r = execute(&mode, &mem, &mut bus, &mut regs, &exit);
    if r.is_err() {
        assert_eq!(regs, before, "an error leaves the registers alone");
    }
    (before, r, regs, bus)
}

fn wexit() -> MmioExit {
    MmioExit::new(DEV, AccessKind::Write).with_linear(DEV_LIN)
}
fn rexit() -> MmioExit {
    MmioExit::new(DEV, AccessKind::Read).with_linear(DEV_LIN)
}

/// An RMW/compare on the dword..byte at DEV holding `mem` with RAX = `rax`
/// and the status flags `flags_in`: (memory after, status flags after,
/// registers after, accesses).
#[track_caller]
fn alu_case(
    code: &[u8],
    size: u8,
    exit: MmioExit,
    mem: u64,
    rax: u64,
    flags_in: u64,
) -> (u64, u64, Regs, usize) {
    let (before, r, after, bus) = run(code, exit, |regs, bus| {
        regs.gpr[Regs::RAX] = rax;
        regs.rflags |= flags_in;
        bus.set(DEV, size, mem);
    });
    let e = r.unwrap_or_else(|e| panic!("{code:x?}: {e}"));
    assert!(e.rip_advanced && e.iterations == 1);
    assert_eq!(after.rip, before.rip + code.len() as u64, "{code:x?}");
    assert_eq!(after.rflags & Regs::RFLAGS_RF, 0);
    assert_eq!(
        after.rflags & !alu::STATUS,
        before.rflags & !alu::STATUS & !Regs::RFLAGS_RF,
        "only status flags and RF change"
    );
    assert_eq!(e.mem_accesses as usize, bus.log.len());
    assert!(bus
        .log
        .iter()
        .all(|a| matches!(a, Acc::R(DEV, s, _) | Acc::W(DEV, s, _) if *s == size)));
    (
        bus.get(DEV, size),
        after.rflags & alu::STATUS,
        after,
        bus.log.len(),
    )
}

#[test]
fn rmw_arithmetic_flags() {
    // add byte [rdi], 1 with 0xff: 0x00; carry out (CF), carry out of bit 3
    // (AF), zero (ZF), 0 bits set (PF even); no signed overflow.
    let (m, f, _, n) = alu_case(&[0x80, 0x07, 0x01], 1, wexit(), 0xff, 0, 0);
    assert_eq!((m, f, n), (0x00, CF | ZF | AF | PF, 2));
    // sub dword [rdi], 1 with 0: 0xffffffff; borrow (CF), borrow into bit 3
    // (AF), negative (SF), low byte 0xff has 8 bits (PF); 0 - 1 is no
    // signed overflow.
    let (m, f, _, _) = alu_case(&[0x83, 0x2f, 0x01], 4, wexit(), 0, 0, 0);
    assert_eq!((m, f), (0xffff_ffff, CF | SF | AF | PF));
    // adc dword [rdi], eax with eax = 0x7fffffff, mem 0, CF = 1:
    // 0 + 0x7fffffff + 1 = 0x80000000: positive + positive = negative (OF),
    // SF, carry out of bit 3 (AF), low byte 0 (PF), no carry out (CF = 0).
    let (m, f, _, _) = alu_case(&[0x11, 0x07], 4, wexit(), 0, 0x7fff_ffff, CF);
    assert_eq!((m, f), (0x8000_0000, OF | SF | AF | PF));
    // adc byte [rdi], 0xff with mem 0 and CF = 1: 0x100 -> 0, CF, ZF, AF, PF.
    let (m, f, _, _) = alu_case(&[0x80, 0x17, 0xff], 1, wexit(), 0, 0, CF);
    assert_eq!((m, f), (0, CF | ZF | AF | PF));
    // The same without CF in: 0xff, no carry, SF, PF (8 bits), no AF.
    let (m, f, _, _) = alu_case(&[0x80, 0x17, 0xff], 1, wexit(), 0, 0, 0);
    assert_eq!((m, f), (0xff, SF | PF));
    // sbb word [rdi], 1 with 1 and CF = 1: 1 - 1 - 1 = 0xffff, borrow (CF),
    // SF, AF, PF; OF = 0.
    let (m, f, _, _) = alu_case(&[0x66, 0x83, 0x1f, 0x01], 2, wexit(), 1, 0, CF);
    assert_eq!((m, f), (0xffff, CF | SF | AF | PF));
    // sub qword [rdi], rax: 0x8000000000000000 - 1 = 0x7fff...: negative -
    // positive = positive (OF), AF (borrow into bit 3), PF (0xff).
    let (m, f, _, _) = alu_case(&[0x48, 0x29, 0x07], 8, wexit(), 1 << 63, 1, 0);
    assert_eq!((m, f), (0x7fff_ffff_ffff_ffff, OF | AF | PF));
    // add qword [rdi], rax: carry out of bit 63.
    let (m, f, _, _) = alu_case(&[0x48, 0x01, 0x07], 8, wexit(), u64::MAX, 2, 0);
    assert_eq!((m, f), (1, CF | AF));
    // add word [rdi], 0x7fff (imm16) with 1: 0x8000, OF, SF, AF, PF (0x00).
    let (m, f, _, _) = alu_case(&[0x66, 0x81, 0x07, 0xff, 0x7f], 2, wexit(), 1, 0, 0);
    assert_eq!((m, f), (0x8000, OF | SF | AF | PF));
    // lock add dword [rdi], eax: the same as without lock.
    let (m, f, _, _) = alu_case(&[0xf0, 0x01, 0x07], 4, wexit(), 2, 3, 0);
    assert_eq!((m, f), (5, PF)); // 0b101: two bits, even
}

#[test]
fn rmw_unary_flags() {
    // neg byte [rdi] of 0x80: 0x80 again; CF (source != 0), OF (the most
    // negative value), SF; one bit set: PF = 0; 0 - 0x80 borrows nothing
    // from bit 4 (AF = 0).
    let (m, f, _, _) = alu_case(&[0xf6, 0x1f], 1, wexit(), 0x80, 0, 0);
    assert_eq!((m, f), (0x80, CF | OF | SF));
    // neg of 0: 0, CF = 0, ZF, PF.
    let (m, f, _, _) = alu_case(&[0xf7, 0x1f], 4, wexit(), 0, 0, CF);
    assert_eq!((m, f), (0, ZF | PF));
    // neg dword of 1: 0xffffffff, CF, SF, AF, PF.
    let (m, f, _, _) = alu_case(&[0xf7, 0x1f], 4, wexit(), 1, 0, 0);
    assert_eq!((m, f), (0xffff_ffff, CF | SF | AF | PF));
    // inc dword [rdi] of 0x7fffffff with CF in: 0x80000000, OF, SF, AF, PF
    // and CF kept.
    let (m, f, _, _) = alu_case(&[0xff, 0x07], 4, wexit(), 0x7fff_ffff, 0, CF);
    assert_eq!((m, f), (0x8000_0000, CF | OF | SF | AF | PF));
    // inc byte of 0xff: 0, ZF, AF, PF; CF stays clear (not a carry).
    let (m, f, _, _) = alu_case(&[0xfe, 0x07], 1, wexit(), 0xff, 0, 0);
    assert_eq!((m, f), (0, ZF | AF | PF));
    // dec qword [rdi] of 0: all ones, SF, AF, PF; CF kept (0).
    let (m, f, _, _) = alu_case(&[0x48, 0xff, 0x0f], 8, wexit(), 0, 0, 0);
    assert_eq!((m, f), (u64::MAX, SF | AF | PF));
    // dec word of 0x8000: 0x7fff, OF, AF, PF (0xff); CF kept (1).
    let (m, f, _, _) = alu_case(&[0x66, 0xff, 0x0f], 2, wexit(), 0x8000, 0, CF);
    assert_eq!((m, f), (0x7fff, CF | OF | AF | PF));
    // not dword [rdi]: no flag changes at all.
    let (m, f, _, _) = alu_case(&[0xf7, 0x17], 4, wexit(), 0xffff, 0, CF | ZF | OF);
    assert_eq!((m, f), (0xffff_0000, CF | ZF | OF));
}

#[test]
fn rmw_logic_flags() {
    // and dword [rdi], 0xfffffff0 (imm8 -16 sign-extended) of 0x0f0f0f0f:
    // 0x0f0f0f00; CF, OF cleared, AF left 0 (undefined), PF (0x00).
    let (m, f, _, _) = alu_case(
        &[0x83, 0x27, 0xf0],
        4,
        wexit(),
        0x0f0f_0f0f,
        0,
        CF | OF | AF,
    );
    assert_eq!((m, f), (0x0f0f_0f00, PF));
    // or word [rdi], 0x8000 of 1: 0x8001, SF; low byte 0x01: PF = 0.
    let (m, f, _, _) = alu_case(&[0x66, 0x81, 0x0f, 0x00, 0x80], 2, wexit(), 1, 0, 0);
    assert_eq!((m, f), (0x8001, SF));
    // or byte [rdi], al
    let (m, f, _, _) = alu_case(&[0x08, 0x07], 1, wexit(), 0x0c, 0x1_03, 0);
    assert_eq!((m, f), (0x0f, PF));
    // xor qword [rdi], rax with equal values: 0, ZF, PF.
    let (m, f, _, _) = alu_case(&[0x48, 0x31, 0x07], 8, wexit(), 0x1234, 0x1234, CF);
    assert_eq!((m, f), (0, ZF | PF));
    // or qword [rdi], -1 (imm8 sign-extended to 64 bits)
    let (m, f, _, _) = alu_case(&[0x48, 0x83, 0x0f, 0xff], 8, wexit(), 0, 0, 0);
    assert_eq!((m, f), (u64::MAX, SF | PF));
}

#[test]
fn compares_read_only() {
    // cmp dword [rdi], eax: 5 - 7 = 0xfffffffe: CF, SF, AF; 0xfe has 7
    // bits: PF = 0. One read, no write.
    let (m, f, _, n) = alu_case(&[0x39, 0x07], 4, rexit(), 5, 7, 0);
    assert_eq!((m, f, n), (5, CF | SF | AF, 1));
    // cmp eax, [rdi]: 7 - 5 = 2; nothing set (0x02: one bit, PF = 0).
    let (m, f, after, n) = alu_case(&[0x3b, 0x07], 4, rexit(), 5, 7, CF);
    assert_eq!((m, f, n), (5, 0, 1));
    assert_eq!(after.gpr[Regs::RAX], 7, "cmp writes no register");
    // cmp byte [rdi], 0x80 with 0x7f: 0xff; CF, OF (positive - negative =
    // negative), SF, PF.
    let (_, f, _, _) = alu_case(&[0x80, 0x3f, 0x80], 1, rexit(), 0x7f, 0, 0);
    assert_eq!(f, CF | OF | SF | PF);
    // cmp qword [rdi], 1 (imm8): equal: ZF, PF.
    let (_, f, _, _) = alu_case(&[0x48, 0x83, 0x3f, 0x01], 8, rexit(), 1, 0, 0);
    assert_eq!(f, ZF | PF);
    // test dword [rdi], eax: 0x80000000 & 0x80000001 = 0x80000000: SF, PF.
    let (m, f, _, n) = alu_case(&[0x85, 0x07], 4, rexit(), 0x8000_0000, 0x8000_0001, CF | OF);
    assert_eq!((m, f, n), (0x8000_0000, SF | PF, 1));
    // test byte [rdi], 1 with 2: 0, ZF, PF.
    let (_, f, _, _) = alu_case(&[0xf6, 0x07, 0x01], 1, rexit(), 2, 0, 0);
    assert_eq!(f, ZF | PF);
    // A compare reported as a write is a direction mismatch.
    let (_, r, _, _) = run(&[0x39, 0x07], wexit(), |_, _| {});
    assert!(
        matches!(r, Err(EmulateError::DirectionMismatch { .. })),
        "{r:?}"
    );
}

#[test]
fn alu_with_register_destination() {
    // add eax, [rdi]: 1 + 0xffffffff = 0 in eax (bits 63:32 cleared), CF,
    // ZF, AF, PF.
    let (m, f, after, n) = alu_case(
        &[0x03, 0x07],
        4,
        rexit(),
        0xffff_ffff,
        0xabcd_0000_0000_0001,
        0,
    );
    assert_eq!((m, f, n), (0xffff_ffff, CF | ZF | AF | PF, 1));
    assert_eq!(after.gpr[Regs::RAX], 0);
    // sub ah, [rdi]: 0x10 - 0x01 = 0x0f in bits 15:8 only; AF.
    let (_, f, after, _) = alu_case(&[0x2a, 0x27], 1, rexit(), 1, 0xff_10_ff, 0);
    assert_eq!(after.gpr[Regs::RAX], 0xff_0f_ff);
    assert_eq!(f, AF | PF);
}

#[test]
fn xchg_both_orders() {
    // xchg [rdi], eax (87 07) and xchg eax, [rdi] (87 07 written the other
    // way round by assemblers; 86 for bytes).
    for (code, size, rax, mem, want_rax) in [
        (
            &[0x87u8, 0x07][..],
            4u8,
            0x1111_2222_3333_4444u64,
            0xdead_beefu64,
            0xdead_beefu64,
        ),
        (&[0x48, 0x87, 0x07], 8, 5, u64::MAX, u64::MAX),
        (&[0x86, 0x27], 1, 0xabcd, 0x12, 0x12cd), // xchg [rdi], ah
        (&[0xf0, 0x66, 0x87, 0x07], 2, 0x1_0002, 0x3333, 0x1_3333),
    ] {
        let (before, r, after, bus) = run(code, wexit(), |regs, bus| {
            regs.gpr[Regs::RAX] = rax;
            bus.set(DEV, size, mem);
        });
        let e = r.unwrap();
        assert_eq!(after.gpr[Regs::RAX], want_rax, "{code:x?}");
        let written = match size {
            1 => (rax >> 8) & 0xff,
            _ => rax & alu::mask(size),
        };
        assert_eq!(
            bus.log,
            [Acc::R(DEV, size, mem), Acc::W(DEV, size, written)]
        );
        assert_eq!(e.mem_accesses, 2);
        assert_eq!(after.rflags, before.rflags & !Regs::RFLAGS_RF, "no flags");
    }
    // Reported as a read (the exit may report either for a
    // read-modify-write): still fine.
    let (_, r, _, _) = run(&[0x87, 0x07], rexit(), |_, _| {});
    assert!(r.is_ok());
}

#[test]
fn bit_test_forms() {
    // bts dword [rdi], 3 with 0: 8, CF = 0; other flags kept (ZF in).
    let (m, f, _, n) = alu_case(&[0x0f, 0xba, 0x2f, 0x03], 4, wexit(), 0, 0, ZF);
    assert_eq!((m, f, n), (8, ZF, 2));
    // btr dword [rdi], 3 with 0xff: 0xf7, CF = 1.
    let (m, f, _, _) = alu_case(&[0x0f, 0xba, 0x37, 0x03], 4, wexit(), 0xff, 0, 0);
    assert_eq!((m, f), (0xf7, CF));
    // btc word [rdi], 19: the immediate is taken modulo 16: bit 3.
    let (m, f, _, _) = alu_case(&[0x66, 0x0f, 0xba, 0x3f, 19], 2, wexit(), 0x8, 0, 0);
    assert_eq!((m, f), (0, CF));
    // bt qword [rdi], 63: read only.
    let (m, f, _, n) = alu_case(&[0x48, 0x0f, 0xba, 0x27, 63], 8, rexit(), 1 << 63, 0, 0);
    assert_eq!((m, f, n), (1 << 63, CF, 1));
    // bt [rdi], eax with eax = 3: register form inside the operand.
    let (_, f, _, _) = alu_case(&[0x0f, 0xa3, 0x07], 4, rexit(), 8, 3, 0);
    assert_eq!(f, CF);
}

#[test]
fn bit_offset_outside_the_operand() {
    // bts [rdi], eax with eax = 35: dword at rdi + 4, bit 3.
    let exit = MmioExit::new(DEV + 4, AccessKind::Write).with_linear(DEV_LIN + 4);
    let (_, r, after, bus) = run(&[0x0f, 0xab, 0x07], exit, |regs, _| {
        regs.gpr[Regs::RAX] = 35;
    });
    r.unwrap();
    assert_eq!(bus.log, [Acc::R(DEV + 4, 4, 0), Acc::W(DEV + 4, 4, 8)]);
    assert_eq!(after.rflags & CF, 0);
    // bt [rdi], eax with eax = -1: dword at rdi - 4, bit 31.
    let exit = MmioExit::new(DEV + 0x1000 - 4, AccessKind::Read).with_linear(DEV_LIN + 0x1000 - 4);
    let (_, r, after, bus) = run(&[0x0f, 0xa3, 0x07], exit, |regs, bus| {
        regs.gpr[Regs::RAX] = 0xffff_ffff;
        regs.gpr[Regs::RDI] = DEV_LIN + 0x1000;
        bus.set(DEV + 0xffc, 4, 0x8000_0000);
    });
    r.unwrap();
    assert_eq!(bus.log, [Acc::R(DEV + 0xffc, 4, 0x8000_0000)]);
    assert_eq!(after.rflags & CF, CF);
    // btc qword [rdi], rax with rax = 64 * 3 + 5: qword at rdi + 24, bit 5.
    let exit = MmioExit::new(DEV + 24, AccessKind::Write).with_linear(DEV_LIN + 24);
    let (_, r, _, bus) = run(&[0x48, 0x0f, 0xbb, 0x07], exit, |regs, _| {
        regs.gpr[Regs::RAX] = 64 * 3 + 5;
    });
    r.unwrap();
    assert_eq!(bus.log[1], Acc::W(DEV + 24, 8, 1 << 5));
    // btr word [rdi], ax with ax = -17 (0xffef): word at rdi - 4, bit 15.
    let exit = MmioExit::new(DEV + 0x100 - 4, AccessKind::Write).with_linear(DEV_LIN + 0x100 - 4);
    let (_, r, _, bus) = run(&[0x66, 0x0f, 0xb3, 0x07], exit, |regs, bus| {
        regs.gpr[Regs::RAX] = 0xffef;
        regs.gpr[Regs::RDI] = DEV_LIN + 0x100;
        bus.set(DEV + 0xfc, 2, 0xffff);
    });
    r.unwrap();
    assert_eq!(bus.log[1], Acc::W(DEV + 0xfc, 2, 0x7fff));
    // The exit's linear address must be the displaced one.
    let (_, r, _, _) = run(&[0x0f, 0xab, 0x07], wexit(), |regs, _| {
        regs.gpr[Regs::RAX] = 35;
    });
    assert!(
        matches!(r, Err(EmulateError::OperandMismatch { operand_linear, .. }) if operand_linear == DEV_LIN + 4),
        "{r:?}"
    );
}

#[test]
fn mov_forms_through_execute() {
    // mov [rdi], eax
    let (before, r, after, bus) = run(&[0x89, 0x07], wexit(), |regs, _| {
        regs.gpr[Regs::RAX] = 0x1_2345_6789;
    });
    let e = r.unwrap();
    assert_eq!(bus.log, [Acc::W(DEV, 4, 0x2345_6789)]);
    assert_eq!((e.mem_accesses, e.rip_advanced), (1, true));
    assert_eq!(after.rip, before.rip + 2);
    assert_eq!(after.gpr, before.gpr);
    // movsx rax, word [rdi]
    let (_, r, after, _) = run(&[0x48, 0x0f, 0xbf, 0x07], rexit(), |_, bus| {
        bus.set(DEV, 2, 0x8001);
    });
    r.unwrap();
    assert_eq!(after.gpr[Regs::RAX], 0xffff_ffff_ffff_8001);
    // Direction still checked.
    let (_, r, _, _) = run(&[0x89, 0x07], rexit(), |_, _| {});
    assert!(matches!(r, Err(EmulateError::DirectionMismatch { .. })));
    // mov eax, fs:[rdi]: with execute the FS base counts.
    let (mode, mem, mut regs) = guest64(&[0x64, 0x8b, 0x07]);
    let mode = CpuMode {
        seg_base: [0x111, 0, 0x222, 0x333, 0x1000, 0x2000],
        ..mode
    };
    regs.gpr[Regs::RDI] = DEV_LIN - 0x1000;
    let mut bus = Bus::new(&mem);
    assert!(execute(&mode, &mem, &mut bus, &mut regs.clone(), &rexit()).is_ok());
    // ... and the DS base does not in 64-bit mode.
    let (_, mem, _) = guest64(&[0x8b, 0x07]);
    let mut r2 = regs;
    r2.gpr[Regs::RDI] = DEV_LIN;
    assert!(execute(&mode, &mem, &mut bus, &mut r2, &rexit()).is_ok());
}

#[test]
fn bus_errors_are_reported() {
    let (_, r, _, bus) = run(&[0x01, 0x07], wexit(), |_, bus| bus.fail = Some(DEV));
    assert!(
        matches!(
            r,
            Err(EmulateError::Bus {
                error: BusError { gpa: DEV, .. },
                mnemonic: Mnemonic::Add,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(bus.log.is_empty());
    let e = r.unwrap_err();
    assert!(alloc::format!("{e}").contains("device error"), "{e}");
}

/// Element `i` of a test pattern.
fn pat(i: u64) -> u64 {
    0x1111_1111u64.wrapping_mul(i + 1) ^ 0xa5a5_0000
}

#[test]
fn rep_movsd_ram_to_mmio_both_directions() {
    // rep movsd, DF = 0: 4 dwords from RAM_LIN to the device.
    let (before, r, after, bus) = run(
        &[0xf3, 0xa5],
        MmioExit::new(DEV, AccessKind::Write),
        |regs, bus| {
            regs.gpr[Regs::RCX] = 4;
            for i in 0..4 {
                bus.set(RAM_LIN + 4 * i, 4, pat(i) & 0xffff_ffff);
            }
        },
    );
    let e = r.unwrap();
    assert_eq!((e.iterations, e.mem_accesses, e.rip_advanced), (4, 8, true));
    let want: Vec<Acc> = (0..4)
        .map(|i| Acc::W(DEV + 4 * i, 4, pat(i) & 0xffff_ffff))
        .collect();
    assert_eq!(bus.dev_log(), want);
    assert_eq!(after.gpr[Regs::RSI], RAM_LIN + 16);
    assert_eq!(after.gpr[Regs::RDI], DEV_LIN + 16);
    assert_eq!(after.gpr[Regs::RCX], 0);
    assert_eq!(after.rip, before.rip + 2);
    assert_eq!(after.rflags & Regs::RFLAGS_RF, 0);
    // DF = 1: from the last element down.
    let (_, r, after, bus) = run(
        &[0xf3, 0xa5],
        MmioExit::new(DEV + 12, AccessKind::Write),
        |regs, bus| {
            regs.gpr[Regs::RCX] = 4;
            regs.gpr[Regs::RSI] = RAM_LIN + 12;
            regs.gpr[Regs::RDI] = DEV_LIN + 12;
            regs.rflags |= DF;
            for i in 0..4 {
                bus.set(RAM_LIN + 4 * i, 4, pat(i) & 0xffff_ffff);
            }
        },
    );
    assert_eq!(r.unwrap().iterations, 4);
    let want: Vec<Acc> = (0..4)
        .rev()
        .map(|i| Acc::W(DEV + 4 * i, 4, pat(i) & 0xffff_ffff))
        .collect();
    assert_eq!(bus.dev_log(), want);
    assert_eq!(after.gpr[Regs::RSI], RAM_LIN - 4);
    assert_eq!(after.gpr[Regs::RDI], DEV_LIN - 4);
    assert_eq!(after.rflags & DF, DF);
}

#[test]
fn rep_movsd_mmio_to_ram_both_directions() {
    for down in [false, true] {
        let start = if down { 12 } else { 0 };
        let (_, r, after, bus) = run(
            &[0xf3, 0xa5],
            MmioExit::new(DEV + start, AccessKind::Read),
            |regs, bus| {
                regs.gpr[Regs::RCX] = 4;
                regs.gpr[Regs::RSI] = DEV_LIN + start;
                regs.gpr[Regs::RDI] = RAM_LIN + 0x1000 + start;
                if down {
                    regs.rflags |= DF;
                }
                for i in 0..4 {
                    bus.set(DEV + 4 * i, 4, pat(i) & 0xffff_ffff);
                }
            },
        );
        assert_eq!(r.unwrap().mem_accesses, 8);
        for i in 0..4 {
            assert_eq!(bus.get(RAM_LIN + 0x1000 + 4 * i, 4), pat(i) & 0xffff_ffff);
        }
        let reads: Vec<u64> = bus
            .dev_log()
            .iter()
            .map(|a| match a {
                Acc::R(g, 4, _) => *g,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut want: Vec<u64> = (0..4).map(|i| DEV + 4 * i).collect();
        if down {
            want.reverse();
        }
        assert_eq!(reads, want);
        let end = if down { start.wrapping_sub(16) } else { 16 };
        assert_eq!(after.gpr[Regs::RSI], (DEV_LIN).wrapping_add(end));
        assert_eq!(after.gpr[Regs::RCX], 0);
    }
}

#[test]
fn movs_all_sizes_and_single() {
    // movsb / movsw / movsq without rep: one element, RCX untouched.
    for (code, size) in [(&[0xa4u8][..], 1u8), (&[0x66, 0xa5], 2), (&[0x48, 0xa5], 8)] {
        let (before, r, after, bus) =
            run(code, MmioExit::new(DEV, AccessKind::Write), |regs, bus| {
                regs.gpr[Regs::RCX] = 7;
                bus.set(RAM_LIN, 8, 0x0807_0605_0403_0201);
            });
        let e = r.unwrap();
        assert_eq!((e.iterations, e.rip_advanced), (1, true));
        assert_eq!(
            bus.dev_log(),
            [Acc::W(DEV, size, 0x0807_0605_0403_0201 & alu::mask(size))]
        );
        assert_eq!(after.gpr[Regs::RCX], 7);
        assert_eq!(after.gpr[Regs::RSI], RAM_LIN + u64::from(size));
        assert_eq!(after.rip, before.rip + code.len() as u64);
    }
}

#[test]
fn rep_stosb_is_bounded_and_restarts() {
    // rep stosb with RCX = 10000 from 0x100 before the end of the device's
    // first page: 256 stores, then RIP stays for the guest to re-execute.
    let code = [0xf3, 0xaa];
    let (mode, mem, mut regs) = guest64(&code);
    regs.gpr[Regs::RCX] = 10_000;
    regs.gpr[Regs::RAX] = 0x5a;
    regs.gpr[Regs::RDI] = DEV_LIN + 0xf00;
    let mut bus = Bus::new(&mem);
    let exit = MmioExit::new(DEV + 0xf00, AccessKind::Write);
    let before = regs;
    let e = execute(&mode, &mem, &mut bus, &mut regs, &exit).unwrap();
    assert_eq!(
        (e.iterations, e.mem_accesses, e.rip_advanced),
        (256, 256, false)
    );
    assert_eq!(regs.rip, before.rip, "RIP stays on the instruction");
    assert_eq!(regs.rflags, before.rflags, "RF is not cleared either");
    assert_eq!(regs.gpr[Regs::RCX], 10_000 - 256);
    assert_eq!(regs.gpr[Regs::RDI], DEV_LIN + 0x1000);
    assert!(bus
        .log
        .iter()
        .enumerate()
        .all(|(i, a)| *a == Acc::W(DEV + 0xf00 + i as u64, 1, 0x5a)));
    // Re-executed: the next page, a whole page (= MAX_REP_ITERATIONS).
    let exit = MmioExit::new(DEV + 0x1000, AccessKind::Write);
    let e = execute(&mode, &mem, &mut bus, &mut regs, &exit).unwrap();
    assert_eq!(e.iterations, MAX_REP_ITERATIONS);
    assert!(!e.rip_advanced);
    assert_eq!(regs.gpr[Regs::RCX], 10_000 - 256 - 4096);
    // A count that ends inside the page completes the instruction.
    regs.gpr[Regs::RCX] = 3;
    regs.gpr[Regs::RDI] = DEV_LIN + 0x10;
    let exit = MmioExit::new(DEV + 0x10, AccessKind::Write);
    let e = execute(&mode, &mem, &mut bus, &mut regs, &exit).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (3, true));
    assert_eq!(regs.rip, before.rip + 2);
    // rep with RCX = 0: nothing, RIP advances.
    let mut r = before;
    r.gpr[Regs::RCX] = 0;
    let n = bus.log.len();
    let e = execute(&mode, &mem, &mut bus, &mut r, &exit).unwrap();
    assert_eq!((e.iterations, e.mem_accesses, e.rip_advanced), (0, 0, true));
    assert_eq!(bus.log.len(), n);
    assert_eq!(r.rip, before.rip + 2);
    // rep stosq with a 32-bit address size (67): ECX counts, EDI wraps in
    // 32 bits and bits 63:32 of RDI/RCX are cleared.
    let (mode, mem, mut regs) = guest64(&[0x67, 0xf3, 0x48, 0xab]);
    regs.gpr[Regs::RCX] = 0xffff_0000_0000_0002;
    regs.gpr[Regs::RDI] = 0xffff_0000_0000_0000 | DEV_LIN;
    regs.gpr[Regs::RAX] = u64::MAX;
    let mut bus = Bus::new(&mem);
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut regs,
        &MmioExit::new(DEV, AccessKind::Write),
    )
    .unwrap();
    assert_eq!(e.iterations, 2);
    assert_eq!(
        bus.log,
        [Acc::W(DEV, 8, u64::MAX), Acc::W(DEV + 8, 8, u64::MAX)]
    );
    assert_eq!(regs.gpr[Regs::RCX], 0);
    assert_eq!(regs.gpr[Regs::RDI], DEV_LIN + 16);
}

#[test]
fn lods_cmps_scas() {
    // lodsd: eax from the device, RSI steps.
    let (_, r, after, _) = run(
        &[0xad],
        MmioExit::new(DEV, AccessKind::Read),
        |regs, bus| {
            regs.gpr[Regs::RSI] = DEV_LIN;
            regs.gpr[Regs::RAX] = u64::MAX;
            bus.set(DEV, 4, 0x8765_4321);
        },
    );
    r.unwrap();
    assert_eq!(after.gpr[Regs::RAX], 0x8765_4321);
    assert_eq!(after.gpr[Regs::RSI], DEV_LIN + 4);
    // rep lodsb: 3 reads, AL ends with the last.
    let (_, r, after, bus) = run(
        &[0xf3, 0xac],
        MmioExit::new(DEV, AccessKind::Read),
        |regs, bus| {
            regs.gpr[Regs::RSI] = DEV_LIN;
            regs.gpr[Regs::RCX] = 3;
            regs.gpr[Regs::RAX] = 0x1234;
            bus.set(DEV, 4, 0x0033_2211);
        },
    );
    assert_eq!(r.unwrap().mem_accesses, 3);
    assert_eq!(after.gpr[Regs::RAX], 0x1233);
    assert_eq!(bus.log.len(), 3);
    // repe cmpsb, RAM (rsi) against the device (rdi): stops at the first
    // difference (index 2), RIP advances, flags of 'c' - 'x'.
    let (before, r, after, _) = run(
        &[0xf3, 0xa6],
        MmioExit::new(DEV, AccessKind::Read),
        |regs, bus| {
            regs.gpr[Regs::RCX] = 10;
            for (i, (a, b)) in b"abcd".iter().zip(b"abxd").enumerate() {
                bus.set(RAM_LIN + i as u64, 1, u64::from(*a));
                bus.set(DEV + i as u64, 1, u64::from(*b));
            }
        },
    );
    let e = r.unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (3, true));
    assert_eq!(after.gpr[Regs::RCX], 7);
    assert_eq!(after.rip, before.rip + 2);
    let (_, want) = alu::alu(
        AluOp::Cmp,
        1,
        u64::from(b'c'),
        u64::from(b'x'),
        before.rflags,
    );
    assert_eq!(after.rflags, want & !Regs::RFLAGS_RF);
    assert_eq!(after.rflags & (CF | ZF), CF); // 'c' < 'x'
                                              // repne scasw: looks for ax = 0x0202 in the device; found at index 2.
    let (_, r, after, _) = run(
        &[0x66, 0xf2, 0xaf],
        MmioExit::new(DEV, AccessKind::Read),
        |regs, bus| {
            regs.gpr[Regs::RCX] = 100;
            regs.gpr[Regs::RAX] = 0x0202;
            for i in 0..4u64 {
                bus.set(DEV + 2 * i, 2, 0x0101 * i);
            }
        },
    );
    assert_eq!(r.unwrap().iterations, 3);
    assert_eq!(after.gpr[Regs::RCX], 97);
    assert_eq!(after.gpr[Regs::RDI], DEV_LIN + 6);
    assert_eq!(after.rflags & ZF, ZF);
}

#[test]
fn real_mode_address_size_wrap() {
    // Real mode, DS base 0x10000, ES base 0xa0000 (device): rep movsb with
    // SI = 0xffff: one element at DS:ffff, then SI wraps to 0 (bits 63:16
    // kept) and the batch stops at the wrap.
    let mut mem = Mem::default();
    mem.write(0xf0100, &[0xf3, 0xa4]);
    mem.write(0x1ffff, &[0x77]);
    mem.write(0x10000, &[0x88]);
    let mode = CpuMode {
        cs_base: 0xf0000,
        seg_base: [0xa0000, 0xf0000, 0, 0x10000, 0, 0],
        ..CpuMode::default()
    };
    let mut regs = Regs {
        rip: 0x100,
        rflags: 2,
        ..Regs::default()
    };
    regs.gpr[Regs::RSI] = 0xdead_0000_0000_ffff;
    regs.gpr[Regs::RDI] = 0x10;
    regs.gpr[Regs::RCX] = 0xbeef_0000_0000_0002;
    let mut bus = Bus::new(&mem);
    let exit = MmioExit::new(0xa0010, AccessKind::Write);
    let e = execute(&mode, &mem, &mut bus, &mut regs, &exit).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (1, false));
    assert_eq!(
        bus.log,
        [Acc::R(0x1ffff, 1, 0x77), Acc::W(0xa0010, 1, 0x77)]
    );
    assert_eq!(regs.gpr[Regs::RSI], 0xdead_0000_0000_0000);
    assert_eq!(regs.gpr[Regs::RCX], 0xbeef_0000_0000_0001);
    assert_eq!(regs.rip, 0x100);
    // Again: the second element from DS:0000.
    let exit = MmioExit::new(0xa0011, AccessKind::Write);
    let e = execute(&mode, &mem, &mut bus, &mut regs, &exit).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (1, true));
    assert_eq!(bus.log[3], Acc::W(0xa0011, 1, 0x88));
    assert_eq!(regs.rip, 0x102);
    assert_eq!(regs.gpr[Regs::RCX], 0xbeef_0000_0000_0000);
    // stosw with DI = 0 and DF = 1: DI wraps to 0xfffe.
    mem.write(0xf0200, &[0xab]);
    let mut r = Regs {
        rip: 0x200,
        rflags: 2 | DF,
        ..Regs::default()
    };
    r.gpr[Regs::RAX] = 0xbeef;
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut r,
        &MmioExit::new(0xa0000, AccessKind::Write),
    )
    .unwrap();
    assert_eq!(e.mem_accesses, 1);
    assert_eq!(r.gpr[Regs::RDI], 0xfffe);
    assert_eq!(*bus.log.last().unwrap(), Acc::W(0xa0000, 2, 0xbeef));
    // A word at DI = 0xffff would wrap inside the element: refused.
    mem.write(0xf0300, &[0xab]);
    let mut r = Regs {
        rip: 0x300,
        rflags: 2,
        ..Regs::default()
    };
    r.gpr[Regs::RDI] = 0xffff;
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut r,
        &MmioExit::new(0xaffff, AccessKind::Write),
    )
    .unwrap_err();
    assert!(
        matches!(e, EmulateError::ElementSplit { size: 2, .. }),
        "{e:?}"
    );
}

#[test]
fn protected_mode_segment_bases() {
    // 32-bit flat-code guest, paging off, DS base 0x1000_0000, ES base
    // 0xfec0_0000: rep movsd from DS:0x100 to ES:0x10_0000 = 0xfed0_0000.
    let mut mem = Mem::default();
    let rip = 0x10_0000;
    mem.write(rip, &[0xf3, 0xa5, 0x64, 0xa4]);
    for i in 0..2 {
        mem.write(0x1000_0100 + 4 * i, &(pat(i) as u32).to_le_bytes());
    }
    mem.write(0x2000_0000, &[0x42]);
    let mode = CpuMode {
        seg_base: [0xfec0_0000, 0, 0, 0x1000_0000, 0x2000_0000, 0],
        ..mode32()
    };
    let mut regs = Regs {
        rip,
        rflags: 2,
        ..Regs::default()
    };
    regs.gpr[Regs::RSI] = 0x100;
    regs.gpr[Regs::RDI] = 0x10_0000;
    regs.gpr[Regs::RCX] = 2;
    let mut bus = Bus::new(&mem);
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut regs,
        &MmioExit::new(DEV, AccessKind::Write),
    )
    .unwrap();
    assert_eq!(e.iterations, 2);
    assert_eq!(
        bus.dev_log(),
        [
            Acc::W(DEV, 4, pat(0) & 0xffff_ffff),
            Acc::W(DEV + 4, 4, pat(1) & 0xffff_ffff)
        ]
    );
    assert_eq!(regs.rip, rip + 2);
    // fs movsb: FS base for the source, ES for the destination.
    regs.gpr[Regs::RSI] = 0;
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut regs,
        &MmioExit::new(DEV + 8, AccessKind::Write),
    )
    .unwrap();
    assert_eq!(e.mem_accesses, 2);
    assert_eq!(*bus.log.last().unwrap(), Acc::W(DEV + 8, 1, 0x42));
    // An ALU form checks the linear address with the DS base too:
    // add [ebx+4], eax.
    mem.write(rip + 0x10, &[0x01, 0x43, 0x04]);
    let mut r = Regs {
        rip: rip + 0x10,
        rflags: 2,
        ..Regs::default()
    };
    r.gpr[Regs::RBX] = 0x100;
    let ok = MmioExit::new(DEV, AccessKind::Write).with_linear(0x1000_0104);
    assert!(execute(&mode, &mem, &mut bus, &mut r.clone(), &ok).is_ok());
    let bad = MmioExit::new(DEV, AccessKind::Write).with_linear(0x104);
    let e = execute(&mode, &mem, &mut bus, &mut r, &bad).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::OperandMismatch {
                operand_linear: 0x1000_0104,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn sixty_four_bit_string_segments() {
    // gs lodsd: the GS base applies in 64-bit mode; DS's does not.
    let (mode, mem, mut regs) = guest64(&[0x65, 0xad, 0xad]);
    let mode = CpuMode {
        seg_base: [0x5000, 0, 0x5000, 0x5000, 0, DEV_LIN - RAM_LIN],
        ..mode
    };
    let mut bus = Bus::new(&mem);
    bus.set(DEV + 0x40, 4, 0xfeed);
    bus.set(RAM_LIN + 0x44, 4, 0xbeef);
    regs.gpr[Regs::RSI] = RAM_LIN + 0x40;
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut regs,
        &MmioExit::new(DEV + 0x40, AccessKind::Read),
    )
    .unwrap();
    assert_eq!(e.mem_accesses, 1);
    assert_eq!(regs.gpr[Regs::RAX], 0xfeed);
    // lodsd without override: DS counts as 0 -> RAM at RSI.
    let e = execute(
        &mode,
        &mem,
        &mut bus,
        &mut regs,
        &MmioExit::new(RAM_LIN + 0x44, AccessKind::Read),
    )
    .unwrap();
    assert_eq!(e.iterations, 1);
    assert_eq!(regs.gpr[Regs::RAX], 0xbeef);
}

#[test]
fn string_refusals() {
    // The faulting GPA is neither operand.
    let (_, r, _, bus) = run(
        &[0xf3, 0xa5],
        MmioExit::new(DEV + 0x800, AccessKind::Write),
        |regs, _| {
            regs.gpr[Regs::RCX] = 2;
        },
    );
    assert!(
        matches!(r, Err(EmulateError::StringMismatch { exit_gpa, src_gpa: Some(RAM_LIN), dst_gpa: Some(DEV), .. }) if exit_gpa == DEV + 0x800),
        "{r:?}"
    );
    assert!(bus.log.is_empty());
    // Source not mapped: a page-walk error, nothing accessed.
    let (_, r, _, bus) = run(&[0xa5], MmioExit::new(DEV, AccessKind::Write), |regs, _| {
        regs.gpr[Regs::RSI] = 0x7000_0000;
    });
    assert!(
        matches!(
            r,
            Err(EmulateError::OperandWalk {
                linear: 0x7000_0000,
                access: AccessKind::Read,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(bus.log.is_empty());
    // Non-canonical destination.
    let (_, r, _, _) = run(&[0xaa], MmioExit::new(DEV, AccessKind::Write), |regs, _| {
        regs.gpr[Regs::RDI] = 0x8000_0000_0000;
    });
    assert!(
        matches!(
            r,
            Err(EmulateError::OperandWalk {
                error: WalkError::NonCanonical { .. },
                ..
            })
        ),
        "{r:?}"
    );
    // A dword element crossing a page.
    let (_, r, _, _) = run(
        &[0xab],
        MmioExit::new(DEV + 0xffe, AccessKind::Write),
        |regs, _| {
            regs.gpr[Regs::RDI] = DEV_LIN + 0xffe;
        },
    );
    assert!(
        matches!(r, Err(EmulateError::ElementSplit { size: 4, .. })),
        "{r:?}"
    );
    // A bus error in the middle of rep movs: reported, registers unchanged.
    let (_, r, _, bus) = run(
        &[0xf3, 0xa5],
        MmioExit::new(DEV, AccessKind::Write),
        |regs, bus| {
            regs.gpr[Regs::RCX] = 4;
            bus.fail = Some(DEV + 8);
        },
    );
    assert!(matches!(r, Err(EmulateError::Bus { .. })), "{r:?}");
    assert_eq!(bus.dev_log().len(), 2);
    // ins/outs are not for execute.
    let (_, r, _, _) = run(&[0x6c], MmioExit::new(DEV, AccessKind::Write), |_, _| {});
    assert!(
        matches!(
            r,
            Err(EmulateError::Unsupported {
                mnemonic: Mnemonic::Insb,
                ..
            })
        ),
        "{r:?}"
    );
}

#[track_caller]
fn refused(code: &[u8], kind: AccessKind) -> (Mnemonic, &'static str) {
    let (_, r, _, bus) = run(
        code,
        MmioExit::new(DEV, kind).with_linear(DEV_LIN),
        |_, _| {},
    );
    assert!(bus.log.is_empty(), "{code:x?}");
    match r {
        Err(EmulateError::Unsupported {
            mnemonic, reason, ..
        }) => (mnemonic, reason),
        other => panic!("{code:x?}: {other:?}"),
    }
}

#[test]
fn execute_refusals() {
    use AccessKind::*;
    assert_eq!(
        refused(&[0xd1, 0x27], Write),
        (Mnemonic::Shl, "shift or rotate of memory")
    );
    assert_eq!(refused(&[0x0f, 0xb1, 0x0f], Write).0, Mnemonic::Cmpxchg);
    assert_eq!(refused(&[0xf0, 0x0f, 0xc1, 0x07], Write).0, Mnemonic::Xadd);
    assert_eq!(refused(&[0xff, 0x37], Read).0, Mnemonic::Push);
    assert_eq!(
        refused(&[0x66, 0x0f, 0x6f, 0x07], Read),
        (Mnemonic::Movdqa, "SSE/AVX/MMX access")
    );
    assert_eq!(
        refused(&[0x01, 0xc3], Write),
        (Mnemonic::Add, "register operands only: no memory access")
    );
    assert_eq!(refused(&[0x87, 0xc3], Write).0, Mnemonic::Xchg);
    assert_eq!(refused(&[0x0f, 0xab, 0xc3], Write).0, Mnemonic::Bts);
    assert_eq!(refused(&[0xf4], Read).0, Mnemonic::Hlt);
    // The linear address must match for ALU forms.
    let exit = MmioExit::new(DEV, AccessKind::Write).with_linear(DEV_LIN + 8);
    let (_, r, _, bus) = run(&[0x83, 0x07, 0x01], exit, |_, _| {});
    assert!(
        matches!(r, Err(EmulateError::OperandMismatch { operand_linear: DEV_LIN, exit_linear, .. }) if exit_linear == DEV_LIN + 8),
        "{r:?}"
    );
    assert!(bus.log.is_empty());
    // Page split and instruction fetch from MMIO.
    let (_, r, _, _) = run(
        &[0x01, 0x07],
        MmioExit::new(DEV + 0xffe, AccessKind::Write),
        |_, _| {},
    );
    assert!(
        matches!(r, Err(EmulateError::PageSplit { size: 4, .. })),
        "{r:?}"
    );
    let (_, r, _, _) = run(
        &[0x01, 0x07],
        MmioExit::new(DEV, AccessKind::Fetch),
        |_, _| {},
    );
    assert!(
        matches!(r, Err(EmulateError::FetchFromMmio { .. })),
        "{r:?}"
    );
    // lock on a compare is #UD: invalid.
    let (_, r, _, _) = run(&[0xf0, 0x39, 0x07], rexit(), |_, _| {});
    assert!(matches!(r, Err(EmulateError::Invalid { .. })), "{r:?}");
}

#[test]
fn string_io_exit_decoding() {
    // rep outsb to 0x3f8, 64-bit addresses, DS: size 0, OUT, string, REP.
    let io = StringIo::from_exit(0x03f8_0030, (2 << 7) | (3 << 15), 2).unwrap();
    assert_eq!(
        io,
        StringIo {
            port: 0x3f8,
            size: 1,
            input: false,
            rep: true,
            addr_size: 8,
            seg: 3,
            insn_len: 2
        }
    );
    // rep insw from 0x1f0, 32-bit addresses: the segment field is ignored.
    let io = StringIo::from_exit(0x01f0_0039, (1 << 7) | (5 << 15), 3).unwrap();
    assert_eq!(
        (io.size, io.input, io.addr_size, io.seg, io.port),
        (2, true, 4, 0, 0x1f0)
    );
    // outsd without rep, 16-bit addresses.
    let io = StringIo::from_exit(0x0080_0013, 0, 1).unwrap();
    assert_eq!((io.size, io.rep, io.addr_size), (4, false, 2));
    for (q, info, len) in [
        (0x03f8_0020u64, 0u32, 2u32), // not a string instruction
        (0x03f8_0012, 0, 2),          // size encoding 2
        (0x03f8_0010, 3 << 7, 2),     // address size 3
        (0x03f8_0010, 0, 0),          // length 0
        (0x03f8_0010, 0, 16),         // length 16
    ] {
        let e = StringIo::from_exit(q, info, len).unwrap_err();
        assert!(matches!(e, EmulateError::BadStringIo { .. }), "{e:?}");
        let _ = alloc::format!("{e}");
    }
}

#[test]
fn rep_outsb_and_insw() {
    let (mode, mem, mut regs) = guest64(&[]);
    let mut bus = Bus::new(&mem);
    for (i, b) in b"hello".iter().enumerate() {
        bus.set(RAM_LIN + i as u64, 1, u64::from(*b));
    }
    let mut ports = Ports::default();
    regs.gpr[Regs::RCX] = 5;
    let io = StringIo::from_exit(0x03f8_0030, (2 << 7) | (3 << 15), 2).unwrap();
    let before = regs;
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!(
        (
            e.iterations,
            e.mem_accesses,
            e.port_accesses,
            e.rip_advanced
        ),
        (5, 5, 5, true)
    );
    let out: Vec<u8> = ports
        .log
        .iter()
        .map(|&(w, p, s, v)| {
            assert!(w && p == 0x3f8 && s == 1);
            v as u8
        })
        .collect();
    assert_eq!(out, b"hello");
    assert_eq!(regs.gpr[Regs::RSI], RAM_LIN + 5);
    assert_eq!(regs.gpr[Regs::RCX], 0);
    assert_eq!(regs.rip, before.rip + 2);
    assert_eq!(regs.rflags & Regs::RFLAGS_RF, 0);

    // rep insw into the device, DF = 1, 3 words from 0x1f0.
    let io = StringIo::from_exit(0x01f0_0039, 2 << 7, 2).unwrap();
    let mut regs = before;
    regs.gpr[Regs::RCX] = 3;
    regs.gpr[Regs::RDI] = DEV_LIN + 4;
    regs.rflags |= DF;
    ports.next = 0x1000;
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!(e.iterations, 3);
    assert_eq!(
        bus.dev_log(),
        [
            Acc::W(DEV + 4, 2, 0x1000),
            Acc::W(DEV + 2, 2, 0x1101),
            Acc::W(DEV, 2, 0x1202)
        ]
    );
    assert_eq!(regs.gpr[Regs::RDI], DEV_LIN - 2);

    // outsw with an FS override (segment 4): the FS base applies.
    let mode_fs = CpuMode {
        seg_base: [0, 0, 0, 0, 0x1000, 0],
        ..mode
    };
    let io = StringIo::from_exit(0x0080_0011, (2 << 7) | (4 << 15), 3).unwrap();
    let mut regs = before;
    regs.gpr[Regs::RSI] = RAM_LIN - 0x1000;
    let e = string_io(&mode_fs, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!(e.port_accesses, 1);
    assert_eq!(
        *ports.log.last().unwrap(),
        (true, 0x80, 2, u64::from(u16::from_le_bytes(*b"he")))
    );
    assert_eq!(regs.rip, before.rip + 3);

    // rep outsb with RCX = 0: nothing, RIP advances.
    let io = StringIo::from_exit(0x03f8_0030, 2 << 7, 2).unwrap();
    let mut regs = before;
    regs.gpr[Regs::RCX] = 0;
    let n = ports.log.len();
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (0, true));
    assert_eq!(ports.log.len(), n);
    assert_eq!(regs.rip, before.rip + 2);

    // rep insb bounded by the page: 0x10 bytes before the end.
    let io = StringIo::from_exit(0x0060_0038, 2 << 7, 2).unwrap();
    let mut regs = before;
    regs.gpr[Regs::RCX] = 100;
    regs.gpr[Regs::RDI] = RAM_LIN + 0xff0;
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (16, false));
    assert_eq!(regs.rip, before.rip);
    assert_eq!(regs.gpr[Regs::RCX], 84);

    // Errors: a port write failure, an unmapped source, a bad StringIo.
    let io = StringIo::from_exit(0xdead_0010, 2 << 7, 1).unwrap();
    let mut regs = before;
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Bus {
                mnemonic: Mnemonic::Outsb,
                error: BusError { gpa: 0xdead, .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(regs, before);
    regs.gpr[Regs::RSI] = 0x7000_0000;
    let io = StringIo::from_exit(0x0080_0010, 2 << 7, 1).unwrap();
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap_err();
    assert!(matches!(e, EmulateError::OperandWalk { .. }), "{e:?}");
    for bad in [
        StringIo { size: 8, ..io },
        StringIo { addr_size: 2, ..io }, // 16-bit addresses in 64-bit mode
        StringIo { seg: 6, ..io },
        StringIo { insn_len: 0, ..io },
    ] {
        let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &bad).unwrap_err();
        assert!(
            matches!(e, EmulateError::BadStringIo { .. }),
            "{bad:?}: {e:?}"
        );
    }
}

#[test]
fn io_with_16bit_addresses_in_real_mode() {
    // rep outsb in real mode, DS base 0x20000, SI = 0xfffe, RCX = 5: two
    // bytes to the end of the offset space, then SI wraps to 0.
    let mut mem = Mem::default();
    mem.write(0x2fffe, b"ab");
    let mode = CpuMode {
        seg_base: [0, 0, 0, 0x20000, 0, 0],
        ..CpuMode::default()
    };
    let mut regs = Regs {
        rip: 0x7c00,
        rflags: 2,
        ..Regs::default()
    };
    regs.gpr[Regs::RSI] = 0xfffe;
    regs.gpr[Regs::RCX] = 5;
    let mut bus = Bus::new(&mem);
    let mut ports = Ports::default();
    let io = StringIo::from_exit(0x03f8_0030, 3 << 15, 2).unwrap();
    let e = string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &io).unwrap();
    assert_eq!((e.iterations, e.rip_advanced), (2, false));
    assert_eq!(regs.gpr[Regs::RSI], 0);
    assert_eq!(regs.gpr[Regs::RCX], 3);
    assert_eq!(regs.rip, 0x7c00);
}

/// Naive flags for add/adc/sub/sbb/cmp from wide signed and unsigned
/// arithmetic.
fn naive(op: AluOp, size: u8, a: u64, b: u64, c: bool) -> u64 {
    let bits = u32::from(size) * 8;
    let m = alu::mask(size);
    let (a, b) = (a & m, b & m);
    let c = i128::from(c);
    let sa = i128::from(a)
        - if a >> (bits - 1) != 0 {
            1i128 << bits
        } else {
            0
        };
    let sb = i128::from(b)
        - if b >> (bits - 1) != 0 {
            1i128 << bits
        } else {
            0
        };
    let (ua, ub) = (i128::from(a), i128::from(b));
    let (wide, signed, nibble) = match op {
        AluOp::Add | AluOp::Adc => (ua + ub + c, sa + sb + c, (ua & 15) + (ub & 15) + c),
        _ => (ua - ub - c, sa - sb - c, (ua & 15) - (ub & 15) - c),
    };
    let r = (wide as u64) & m;
    let mut f = 0;
    if wide < 0 || wide > i128::from(m) {
        f |= CF;
    }
    if signed < -(1i128 << (bits - 1)) || signed >= (1i128 << (bits - 1)) {
        f |= OF;
    }
    if !(0..=15).contains(&nibble) {
        f |= AF;
    }
    if r == 0 {
        f |= ZF;
    }
    if r >> (bits - 1) != 0 {
        f |= SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

proptest! {
    /// The flag logic against a naive model from wide arithmetic.
    #[test]
    fn arithmetic_flags_match_the_naive_model(
        op in 0usize..5,
        size in prop::sample::select(vec![1u8, 2, 4, 8]),
        a in any::<u64>(),
        b in any::<u64>(),
        c in any::<bool>(),
        rest in any::<u64>(),
    ) {
        let op = [AluOp::Add, AluOp::Adc, AluOp::Sub, AluOp::Sbb, AluOp::Cmp][op];
        let carry = c && matches!(op, AluOp::Adc | AluOp::Sbb);
        let rflags = (rest & !alu::STATUS) | if c { CF } else { 0 };
        let m = alu::mask(size);
        let (r, f) = alu::alu(op, size, a & m, b & m, rflags);
        prop_assert_eq!(f & alu::STATUS, naive(op, size, a, b, carry));
        prop_assert_eq!(f & !alu::STATUS, rflags & !alu::STATUS);
        let want = match op {
            AluOp::Add | AluOp::Adc => (a & m).wrapping_add(b & m).wrapping_add(u64::from(carry)),
            _ => (a & m).wrapping_sub(b & m).wrapping_sub(u64::from(carry)),
        } & m;
        prop_assert_eq!(r, want);
    }

    /// Random instruction bytes, registers, flags and exits through
    /// `execute` on a guest with RAM and a device: never a panic; the bus
    /// sees only whole in-page accesses (checked by the mock); RIP either
    /// advances by at most 15 or stays for a repeat.
    #[test]
    fn execute_random_bytes_never_panics(
        code in proptest::collection::vec(any::<u8>(), 0..16),
        prefix in prop::sample::select(vec![&[][..], &[0xf3][..], &[0xf2], &[0xf0], &[0x66], &[0x67], &[0x48], &[0x64], &[0xf3, 0x48]]),
        gpr in proptest::array::uniform16(any::<u64>()),
        near in any::<u16>(),
        rflags in any::<u64>(),
        gpa in prop::sample::select(vec![DEV, DEV + 4, RAM_LIN, DEV + 0xffc, 0]),
        kind in 0u8..3,
        linear in proptest::option::of(any::<u64>()),
    ) {
        let code = [prefix, &code[..]].concat();
        let (mode, mem, mut regs) = guest64(&code);
        regs.gpr = gpr;
        // Keep RSI/RDI in mapped memory sometimes, with small counts.
        if near & 1 == 0 {
            regs.gpr[Regs::RSI] = RAM_LIN + u64::from(near >> 4);
            regs.gpr[Regs::RDI] = DEV_LIN + u64::from(near >> 4);
            regs.gpr[Regs::RCX] = u64::from(near >> 8);
        }
        regs.rflags = rflags;
        let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(kind)];
        let exit = MmioExit { gpa, kind, linear };
        let mut bus = Bus::new(&mem);
        let before = regs;
        match execute(&mode, &mem, &mut bus, &mut regs, &exit) {
            Ok(e) => {
                prop_assert_eq!(e.mem_accesses as usize, bus.log.len());
                prop_assert!(e.iterations <= MAX_REP_ITERATIONS);
                if e.rip_advanced {
                    let d = regs.rip.wrapping_sub(before.rip);
                    prop_assert!((1..=15).contains(&d));
                    prop_assert_eq!(regs.rflags & Regs::RFLAGS_RF, 0);
                } else {
                    prop_assert_eq!(regs.rip, before.rip);
                }
            }
            Err(e) => {
                prop_assert_eq!(regs, before);
                let _ = alloc::format!("{e}");
            }
        }
    }

    /// Random page tables, code, modes and segment bases: `execute` and
    /// `string_io` never panic.
    #[test]
    fn random_guest_state_never_panics(
        mode in any_mode(),
        seg_base in proptest::array::uniform6(any::<u64>()),
        ram in proptest::collection::vec(any::<u8>(), 0x10000),
        rip in any::<u64>(),
        gpr in proptest::array::uniform16(any::<u64>()),
        rflags in any::<u64>(),
        gpa in any::<u64>(),
        write in any::<bool>(),
        io in (any::<u16>(), 0u8..10, any::<bool>(), any::<bool>(), 0u8..10, 0u8..8, 0u8..17),
    ) {
        let mut mem = Mem::default();
        for (i, page) in ram.chunks(0x1000).enumerate() {
            mem.pages.insert(i as u64 * 0x1000, page.to_vec());
        }
        let mode = CpuMode { seg_base, ..mode };
        let rip = if rip & 1 == 0 { rip & 0xffff } else { rip };
        let mut gpr = gpr;
        if rip & 2 == 0 {
            gpr[Regs::RSI] &= 0xffff;
            gpr[Regs::RDI] &= 0xffff;
            gpr[Regs::RCX] &= 0xfff;
        }
        let mut regs = Regs { gpr, rip, rflags };
        let kind = if write { AccessKind::Write } else { AccessKind::Read };
        let mut bus = Bus::new(&mem);
        let _ = execute(&mode, &mem, &mut bus, &mut regs, &MmioExit::new(gpa & 0xffff, kind));
        let sio = StringIo {
            port: io.0,
            size: io.1,
            input: io.2,
            rep: io.3,
            addr_size: io.4,
            seg: io.5,
            insn_len: io.6,
        };
        let mut ports = Ports::default();
        let before = regs;
        match string_io(&mode, &mem, &mut bus, &mut ports, &mut regs, &sio) {
            Ok(e) => prop_assert!(e.iterations <= MAX_REP_ITERATIONS),
            Err(e) => {
                prop_assert_eq!(regs, before);
                let _ = alloc::format!("{e}");
            }
        }
    }
}
