//! Host tests: page walks over hand-built tables, every supported form,
//! every error path, and proptests that nothing the guest controls panics.

use super::*;
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;

mod exec;

/// Sparse guest RAM: only the pages that were written exist.
#[derive(Default, Clone)]
struct Mem {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Mem {
    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let a = gpa + i as u64;
            let page = self
                .pages
                .entry(a & !0xfff)
                .or_insert_with(|| vec![0; 0x1000]);
            page[(a & 0xfff) as usize] = *b;
        }
    }
    fn w64(&mut self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
    fn w32(&mut self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes());
    }
    fn r64(&self, gpa: u64) -> u64 {
        let mut b = [0; 8];
        self.read_phys(gpa, &mut b).unwrap();
        u64::from_le_bytes(b)
    }
    /// Makes a page exist (zeroed).
    fn touch(&mut self, gpa: u64) {
        self.pages
            .entry(gpa & !0xfff)
            .or_insert_with(|| vec![0; 0x1000]);
    }
}

impl GuestPhysRead for Mem {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa.checked_add(i as u64).ok_or(())?;
            let page = self.pages.get(&(a & !0xfff)).ok_or(())?;
            *b = page[(a & 0xfff) as usize];
        }
        Ok(())
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
const A: u64 = 0xf_ffff_ffff_f000;

/// Allocates page tables from `next` upwards.
struct Tables {
    cr3: u64,
    next: u64,
}

impl Tables {
    fn new(mem: &mut Mem) -> Self {
        mem.touch(0x1000);
        Self {
            cr3: 0x1000,
            next: 0x2000,
        }
    }
    fn alloc(&mut self, mem: &mut Mem) -> u64 {
        let t = self.next;
        self.next += 0x1000;
        mem.touch(t);
        t
    }
    /// Entry address at each of the 4 levels for `linear`, creating
    /// intermediate tables down to `stop` levels (4 = PTE).
    fn entry4(&mut self, mem: &mut Mem, linear: u64, depth: usize) -> u64 {
        let mut table = self.cr3;
        for (i, shift) in [39u64, 30, 21, 12].iter().enumerate() {
            let e = table + ((linear >> shift) & 0x1ff) * 8;
            if i + 1 == depth {
                return e;
            }
            let v = mem.r64(e);
            table = if v & P == 0 {
                let t = self.alloc(mem);
                mem.w64(e, t | P | RW);
                t
            } else {
                v & A
            };
        }
        unreachable!()
    }
    fn map4(&mut self, mem: &mut Mem, linear: u64, gpa: u64) {
        let e = self.entry4(mem, linear, 4);
        mem.w64(e, gpa | P | RW);
    }
    /// 32-bit paging: 4 KiB page.
    fn map32(&mut self, mem: &mut Mem, linear: u64, gpa: u64) {
        let pde = self.cr3 + ((linear >> 22) & 0x3ff) * 4;
        let mut b = [0; 4];
        mem.read_phys(pde, &mut b).unwrap();
        let v = u32::from_le_bytes(b) as u64;
        let pt = if v & P == 0 {
            let t = self.alloc(mem);
            mem.w32(pde, (t | P | RW) as u32);
            t
        } else {
            v & 0xffff_f000
        };
        mem.w32(pt + ((linear >> 12) & 0x3ff) * 4, (gpa | P | RW) as u32);
    }
    /// PAE paging: 4 KiB page; the PDPT is at cr3.
    fn map_pae(&mut self, mem: &mut Mem, linear: u64, gpa: u64) {
        let pdpte = self.cr3 + ((linear >> 30) & 3) * 8;
        let v = mem.r64(pdpte);
        let pd = if v & P == 0 {
            let t = self.alloc(mem);
            mem.w64(pdpte, t | P);
            t
        } else {
            v & A
        };
        let pde = pd + ((linear >> 21) & 0x1ff) * 8;
        let v = mem.r64(pde);
        let pt = if v & P == 0 {
            let t = self.alloc(mem);
            mem.w64(pde, t | P | RW);
            t
        } else {
            v & A
        };
        mem.w64(pt + ((linear >> 12) & 0x1ff) * 8, gpa | P | RW);
    }
}

const CODE: u64 = 0x7fff_0000_1000;
const CODE_GPA: u64 = 0x20_0000;
const MMIO: u64 = 0xfed0_0010;

fn mode64(cr3: u64) -> CpuMode {
    CpuMode {
        cr0: CpuMode::CR0_PE | CpuMode::CR0_PG | CpuMode::CR0_WP,
        cr3,
        cr4: CpuMode::CR4_PAE,
        efer: CpuMode::EFER_LME | CpuMode::EFER_LMA | CpuMode::EFER_NXE,
        cs_base: 0,
        cs_l: true,
        cs_db: false,
        seg_base: [0; 6],
    }
}

/// A 64-bit guest with `code` at `CODE` and recognisable register values.
fn setup64(code: &[u8]) -> (CpuMode, Mem, Regs) {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    t.map4(&mut mem, CODE, CODE_GPA);
    mem.write(CODE_GPA, code);
    let mut regs = Regs {
        rip: CODE,
        rflags: 2 | Regs::RFLAGS_RF,
        ..Regs::default()
    };
    for (i, g) in regs.gpr.iter_mut().enumerate() {
        *g = 0x1111_1111_1111_1111u64.wrapping_mul(i as u64 + 1) ^ 0x8070_6050_4030_2010;
    }
    (mode64(t.cr3), mem, regs)
}

fn run64(code: &[u8], kind: AccessKind) -> Result<(MmioAccess, Regs), EmulateError> {
    let (mode, mem, regs) = setup64(code);
    emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, kind)).map(|a| (a, regs))
}

/// A write must give `value` at `size` and advance RIP by the code length.
#[track_caller]
fn check_write(code: &[u8], size: u8, value: impl Fn(&Regs) -> u64) {
    let (a, regs) = run64(code, AccessKind::Write).unwrap();
    assert_eq!(a.size(), size, "{code:x?}");
    assert_eq!(a.write_value(), Some(value(&regs)), "{code:x?}");
    assert_eq!(a.gpa, MMIO);
    let mut after = regs;
    a.finish(0xdead, &mut after);
    assert_eq!(after.gpr, regs.gpr, "a write changes no register");
    assert_eq!(after.rip, regs.rip + code.len() as u64);
    assert_eq!(after.rflags & Regs::RFLAGS_RF, 0);
}

/// A read of `loaded` must give `size` and leave `expect(before)` in the
/// registers.
#[track_caller]
fn check_read(code: &[u8], size: u8, loaded: u64, expect: impl Fn(&mut [u64; 16])) {
    let (a, regs) = run64(code, AccessKind::Read).unwrap();
    assert_eq!(a.size(), size, "{code:x?}");
    assert_eq!(a.write_value(), None);
    let mut after = regs;
    finish(&a, loaded, &mut after);
    let mut want = regs.gpr;
    expect(&mut want);
    assert_eq!(after.gpr, want, "{code:x?}");
    assert_eq!(after.rip, regs.rip + code.len() as u64);
}

#[test]
fn writes_64bit_all_sizes_and_sources() {
    use Regs as R;
    // mov [rdi], al
    check_write(&[0x88, 0x07], 1, |r| r.gpr[R::RAX] & 0xff);
    // mov [rdi], ah (no REX: reg 4 is AH)
    check_write(&[0x88, 0x27], 1, |r| (r.gpr[R::RAX] >> 8) & 0xff);
    // mov [rdi], bh
    check_write(&[0x88, 0x3f], 1, |r| (r.gpr[R::RBX] >> 8) & 0xff);
    // mov [rdi], spl (REX: reg 4 is SPL)
    check_write(&[0x40, 0x88, 0x27], 1, |r| r.gpr[R::RSP] & 0xff);
    // mov [rdi], r9b
    check_write(&[0x44, 0x88, 0x0f], 1, |r| r.gpr[R::R9] & 0xff);
    // mov [rdi], ax
    check_write(&[0x66, 0x89, 0x07], 2, |r| r.gpr[R::RAX] & 0xffff);
    // mov [rdi], eax
    check_write(&[0x89, 0x07], 4, |r| r.gpr[R::RAX] & 0xffff_ffff);
    // mov [rdi], rax
    check_write(&[0x48, 0x89, 0x07], 8, |r| r.gpr[R::RAX]);
    // mov [rdi+0x10], r12d
    check_write(&[0x44, 0x89, 0x67, 0x10], 4, |r| {
        r.gpr[R::R12] & 0xffff_ffff
    });
    // mov [rsi+rcx*8-8], r15
    check_write(&[0x4c, 0x89, 0x7c, 0xce, 0xf8], 8, |r| r.gpr[R::R15]);
    // mov byte [rdi], 0x80
    check_write(&[0xc6, 0x07, 0x80], 1, |_| 0x80);
    // mov word [rdi], 0x1234
    check_write(&[0x66, 0xc7, 0x07, 0x34, 0x12], 2, |_| 0x1234);
    // mov dword [rdi], 0xdeadbeef
    check_write(&[0xc7, 0x07, 0xef, 0xbe, 0xad, 0xde], 4, |_| 0xdead_beef);
    // mov qword [rdi], -2 (imm32 sign-extended to 64)
    check_write(&[0x48, 0xc7, 0x07, 0xfe, 0xff, 0xff, 0xff], 8, |_| {
        0xffff_ffff_ffff_fffe
    });
    // mov qword [rdi+0x20], 0x7fffffff
    check_write(&[0x48, 0xc7, 0x47, 0x20, 0xff, 0xff, 0xff, 0x7f], 8, |_| {
        0x7fff_ffff
    });
    // mov [0xfed00010], al / ax / eax / rax (moffs64)
    let moffs = MMIO.to_le_bytes();
    let with = |pre: &[u8]| [pre, &moffs[..]].concat();
    check_write(&with(&[0xa2]), 1, |r| r.gpr[R::RAX] & 0xff);
    check_write(&with(&[0x66, 0xa3]), 2, |r| r.gpr[R::RAX] & 0xffff);
    check_write(&with(&[0xa3]), 4, |r| r.gpr[R::RAX] & 0xffff_ffff);
    check_write(&with(&[0x48, 0xa3]), 8, |r| r.gpr[R::RAX]);
    // mov fs:[rdi], eax (segment override ignored)
    check_write(&[0x64, 0x89, 0x07], 4, |r| r.gpr[R::RAX] & 0xffff_ffff);
    // mov [edi], eax (address-size prefix)
    check_write(&[0x67, 0x89, 0x07], 4, |r| r.gpr[R::RAX] & 0xffff_ffff);
    // mov [rip+0x100], ecx
    check_write(&[0x89, 0x0d, 0x00, 0x01, 0x00, 0x00], 4, |r| {
        r.gpr[R::RCX] & 0xffff_ffff
    });
}

#[test]
fn reads_64bit_all_sizes_and_extensions() {
    use Regs as R;
    // mov al, [rdi]: keeps bits 63:8
    check_read(&[0x8a, 0x07], 1, 0x1ab, |g| {
        g[R::RAX] = g[R::RAX] & !0xff | 0xab
    });
    // mov bh, [rdi]: bits 15:8 of rbx only
    check_read(&[0x8a, 0x3f], 1, 0xcd, |g| {
        g[R::RBX] = g[R::RBX] & !0xff00 | 0xcd00
    });
    // mov ah, [rdi]
    check_read(&[0x8a, 0x27], 1, 0x12, |g| {
        g[R::RAX] = g[R::RAX] & !0xff00 | 0x1200
    });
    // mov dil, [rdi] (REX: reg 7 is DIL)
    check_read(&[0x40, 0x8a, 0x3f], 1, 0x99, |g| {
        g[R::RDI] = g[R::RDI] & !0xff | 0x99
    });
    // mov r11b, [rdi]
    check_read(&[0x44, 0x8a, 0x1f], 1, 0x42, |g| {
        g[R::R11] = g[R::R11] & !0xff | 0x42
    });
    // mov ax, [rdi]: keeps bits 63:16
    check_read(&[0x66, 0x8b, 0x07], 2, 0xf_beef, |g| {
        g[R::RAX] = g[R::RAX] & !0xffff | 0xbeef
    });
    // mov eax, [rdi]: zero-extends into 64 bits
    check_read(&[0x8b, 0x07], 4, 0x1234_8765_4321, |g| {
        g[R::RAX] = 0x8765_4321
    });
    // mov rax, [rdi]
    check_read(&[0x48, 0x8b, 0x07], 8, u64::MAX - 5, |g| {
        g[R::RAX] = u64::MAX - 5
    });
    // mov r15, [rsi+rcx*8]
    check_read(&[0x4c, 0x8b, 0x3c, 0xce], 8, 7, |g| g[R::R15] = 7);
    // mov esp, [rdi]
    check_read(&[0x8b, 0x27], 4, 0x1000, |g| g[R::RSP] = 0x1000);
    // movzx eax, byte [rdi]
    check_read(&[0x0f, 0xb6, 0x07], 1, 0x3ff, |g| g[R::RAX] = 0xff);
    // movzx ax, byte [rdi]: 16-bit destination keeps bits 63:16
    check_read(&[0x66, 0x0f, 0xb6, 0x07], 1, 0x80, |g| {
        g[R::RAX] = g[R::RAX] & !0xffff | 0x80
    });
    // movzx rax, word [rdi]
    check_read(&[0x48, 0x0f, 0xb7, 0x07], 2, 0x1_8001, |g| {
        g[R::RAX] = 0x8001
    });
    // movzx ecx, word [rdi]
    check_read(&[0x0f, 0xb7, 0x0f], 2, 0xffff, |g| g[R::RCX] = 0xffff);
    // movzx r8, byte [rdi]
    check_read(&[0x4c, 0x0f, 0xb6, 0x07], 1, 0x7f, |g| g[R::R8] = 0x7f);
    // movsx eax, byte [rdi]: sign-extends to 32, then zero-extends
    check_read(&[0x0f, 0xbe, 0x07], 1, 0x80, |g| g[R::RAX] = 0xffff_ff80);
    // movsx rax, byte [rdi]
    check_read(&[0x48, 0x0f, 0xbe, 0x07], 1, 0x80, |g| {
        g[R::RAX] = 0xffff_ffff_ffff_ff80
    });
    // movsx ax, byte [rdi]: keeps bits 63:16
    check_read(&[0x66, 0x0f, 0xbe, 0x07], 1, 0xfe, |g| {
        g[R::RAX] = g[R::RAX] & !0xffff | 0xfffe
    });
    // movsx eax, byte [rdi] with a positive value
    check_read(&[0x0f, 0xbe, 0x07], 1, 0x17f, |g| g[R::RAX] = 0x7f);
    // movsx rdx, word [rdi]
    check_read(&[0x48, 0x0f, 0xbf, 0x17], 2, 0x8000, |g| {
        g[R::RDX] = 0xffff_ffff_ffff_8000
    });
    // movsx edx, word [rdi]
    check_read(&[0x0f, 0xbf, 0x17], 2, 0x8000, |g| g[R::RDX] = 0xffff_8000);
    // movsxd rax, dword [rdi]
    check_read(&[0x48, 0x63, 0x07], 4, 0x8000_0000, |g| {
        g[R::RAX] = 0xffff_ffff_8000_0000
    });
    // movsxd r9, dword [rdi] with a positive value
    check_read(&[0x4c, 0x63, 0x0f], 4, 0x1_7000_0000, |g| {
        g[R::R9] = 0x7000_0000
    });
    // movsxd eax, dword [rdi] (no REX.W: a plain 32-bit load)
    check_read(&[0x63, 0x07], 4, 0x8000_0000, |g| g[R::RAX] = 0x8000_0000);
    // mov al / ax / eax / rax, [moffs64]
    let moffs = MMIO.to_le_bytes();
    let with = |pre: &[u8]| [pre, &moffs[..]].concat();
    check_read(&with(&[0xa0]), 1, 0x5a, |g| {
        g[R::RAX] = g[R::RAX] & !0xff | 0x5a
    });
    check_read(&with(&[0x66, 0xa1]), 2, 0x5a5a, |g| {
        g[R::RAX] = g[R::RAX] & !0xffff | 0x5a5a
    });
    check_read(&with(&[0xa1]), 4, 0xa5a5_a5a5, |g| g[R::RAX] = 0xa5a5_a5a5);
    check_read(&with(&[0x48, 0xa1]), 8, 1 << 63, |g| g[R::RAX] = 1 << 63);
    // mov eax, gs:[rip+0x100]
    check_read(&[0x65, 0x8b, 0x05, 0, 1, 0, 0], 4, 3, |g| g[R::RAX] = 3);
}

#[test]
fn op_fields_describe_the_access() {
    // movsx rdx, word [rdi]
    let (a, _) = run64(&[0x48, 0x0f, 0xbf, 0x17], AccessKind::Read).unwrap();
    assert_eq!(a.op.insn_len(), 4);
    assert_eq!(a.op.mnemonic, Mnemonic::Movsx);
    assert_eq!(a.op.insn.as_slice(), &[0x48, 0x0f, 0xbf, 0x17]);
    assert_eq!(
        a.op.dir,
        MmioDir::Read(ReadDest {
            reg: RegRef {
                index: Regs::RDX as u8,
                high_byte: false
            },
            width: 8,
            extend: Extend::Sign
        })
    );
    assert_eq!(a.op.loaded_value(0xffff_8001), Some(0xffff_ffff_ffff_8001));
    // Trailing bytes after the instruction are not part of it.
    let (a, _) = run64(&[0x89, 0x07, 0x90, 0x90], AccessKind::Write).unwrap();
    assert_eq!(a.op.insn.as_slice(), &[0x89, 0x07]);
    assert_eq!(a.op.loaded_value(1), None);
}

/// 32-bit protected mode, flat, paging off.
fn mode32() -> CpuMode {
    CpuMode {
        cr0: CpuMode::CR0_PE,
        cs_db: true,
        ..CpuMode::default()
    }
}

fn regs_at(rip: u64) -> Regs {
    let mut regs = Regs {
        rip,
        rflags: 2,
        ..Regs::default()
    };
    for (i, g) in regs.gpr.iter_mut().enumerate() {
        *g = 0xaaaa_bbbb_0000_0000 | (0x0101_0101 * (i as u64 + 1));
    }
    regs
}

#[test]
fn protected_mode_paging_off() {
    let mut mem = Mem::default();
    let rip = 0x10_0000;
    let regs = regs_at(rip);
    let mode = mode32();
    assert_eq!(mode.bitness(), Bitness::B32);
    assert_eq!(mode.paging_mode(), PagingMode::Off);
    let go = |mem: &Mem, code: &[u8], kind| {
        let mut mem = mem.clone();
        mem.write(rip, code);
        emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, kind))
    };
    // mov [edi], eax
    let a = go(&mem, &[0x89, 0x07], AccessKind::Write).unwrap();
    assert_eq!((a.size(), a.write_value()), (4, Some(0x0101_0101)));
    // mov word [ebx], 0x1234
    let a = go(&mem, &[0x66, 0xc7, 0x03, 0x34, 0x12], AccessKind::Write).unwrap();
    assert_eq!((a.size(), a.write_value()), (2, Some(0x1234)));
    // mov eax, [0xfed00010] (moffs32)
    let a = go(&mem, &[0xa1, 0x10, 0x00, 0xd0, 0xfe], AccessKind::Read).unwrap();
    assert_eq!(a.size(), 4);
    let mut r = regs;
    a.finish(0x8000_0001, &mut r);
    assert_eq!(r.gpr[Regs::RAX], 0x8000_0001);
    assert_eq!(r.rip, rip + 5);
    // mov cx, [ebx]: keeps the rest of rcx
    let a = go(&mem, &[0x66, 0x8b, 0x0b], AccessKind::Read).unwrap();
    let mut r = regs;
    a.finish(0xffff, &mut r);
    assert_eq!(r.gpr[Regs::RCX], regs.gpr[Regs::RCX] & !0xffff | 0xffff);
    // movzx edx, byte [esi]
    let a = go(&mem, &[0x0f, 0xb6, 0x16], AccessKind::Read).unwrap();
    let mut r = regs;
    a.finish(0x80, &mut r);
    assert_eq!(r.gpr[Regs::RDX], 0x80);
    // 48 is `dec eax` in 32-bit mode, not REX.W
    let e = go(&mem, &[0x48, 0x89, 0x07], AccessKind::Write).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Unsupported {
                mnemonic: Mnemonic::Dec,
                ..
            }
        ),
        "{e}"
    );
    // CS.base counts outside 64-bit mode.
    let cs = CpuMode {
        cs_base: 0x1000,
        ..mode
    };
    mem.write(0x1000 + 0x20, &[0x88, 0x3f]); // mov [edi], bh
    let r = Regs { rip: 0x20, ..regs };
    let a = emulate(&cs, &mem, &r, &MmioExit::new(MMIO, AccessKind::Write)).unwrap();
    assert_eq!(a.write_value(), Some((regs.gpr[Regs::RBX] >> 8) & 0xff));
    // EIP wraps at 4 GiB when advanced.
    let mut m2 = Mem::default();
    m2.write(0xffff_fffe, &[0x89, 0x07]);
    let r = Regs {
        rip: 0xffff_fffe,
        ..regs
    };
    let a = emulate(&mode, &m2, &r, &MmioExit::new(MMIO, AccessKind::Write)).unwrap();
    let mut r2 = r;
    a.finish(0, &mut r2);
    assert_eq!(r2.rip, 0);
}

#[test]
fn real_mode_16bit() {
    let mode = CpuMode {
        cs_base: 0xf0000,
        ..CpuMode::default()
    };
    assert_eq!(mode.bitness(), Bitness::B16);
    let mut mem = Mem::default();
    // mov [bx], al at f000:fffe: IP wraps to 0 afterwards.
    mem.write(0xffffe, &[0x88, 0x07]);
    let regs = regs_at(0xfffe);
    let a = emulate(
        &mode,
        &mem,
        &regs,
        &MmioExit::new(0xa0000, AccessKind::Write),
    )
    .unwrap();
    assert_eq!((a.size(), a.write_value()), (1, Some(0x01)));
    let mut r = regs;
    a.finish(0, &mut r);
    assert_eq!(r.rip, 0);
    // mov ax, [si] with an instruction split by the IP wrap: 8b at ffff,
    // 04 at offset 0 (linear f0000).
    mem.write(0xfffff, &[0x8b]);
    mem.write(0xf0000, &[0x04]);
    let regs = regs_at(0xffff);
    let a = emulate(
        &mode,
        &mem,
        &regs,
        &MmioExit::new(0xa0000, AccessKind::Read),
    )
    .unwrap();
    assert_eq!(a.size(), 2);
    let mut r = regs;
    a.finish(0x1234, &mut r);
    assert_eq!(r.gpr[Regs::RAX], regs.gpr[Regs::RAX] & !0xffff | 0x1234);
    assert_eq!(r.rip, 1);
    // 66 in 16-bit code selects 32-bit operands: mov [bx], eax
    mem.write(0xf0100, &[0x66, 0x89, 0x07]);
    let a = emulate(
        &mode,
        &mem,
        &regs_at(0x100),
        &MmioExit::new(0xa0000, AccessKind::Write),
    )
    .unwrap();
    assert_eq!(a.size(), 4);
}

#[test]
fn protected_mode_32bit_paging() {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    let code = 0xc010_0ffe_u64; // straddles into the next page
    t.map32(&mut mem, code, 0x30_0000);
    t.map32(&mut mem, code + 0x1000, 0x50_0000);
    // movzx eax, word [ebx+0x10]: 0f b7 | 43 10
    mem.write(0x30_0ffe, &[0x0f, 0xb7]);
    mem.write(0x50_0000, &[0x43, 0x10]);
    let mode = CpuMode {
        cr0: CpuMode::CR0_PE | CpuMode::CR0_PG | CpuMode::CR0_WP,
        cr3: t.cr3,
        cr4: CpuMode::CR4_PSE,
        cs_db: true,
        ..CpuMode::default()
    };
    assert_eq!(mode.paging_mode(), PagingMode::Bits32);
    let regs = regs_at(code);
    let a = emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Read)).unwrap();
    assert_eq!(a.op.insn_len(), 4);
    let mut r = regs;
    a.finish(0xabcd, &mut r);
    assert_eq!(r.gpr[Regs::RAX], 0xabcd);
    assert_eq!(r.rip, code + 4);

    // A 4 MiB page (PSE) with PSE-36 high bits: PA bits 39:32 from 20:13.
    let pde = t.cr3 + (0x8000_0000u64 >> 22) * 4;
    mem.w32(pde, 0x8040_0000 | (0x3 << 13) | PS as u32 | 3);
    assert_eq!(
        translate(&mode, &mem, 0x8012_3456, AccessKind::Read),
        Ok(0x3_8052_3456)
    );
    // Bit 21 of a 4 MiB PDE is reserved.
    mem.w32(pde, 0x8040_0000 | (1 << 21) | PS as u32 | 3);
    assert!(matches!(
        translate(&mode, &mem, 0x8012_3456, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pd,
            ..
        })
    ));
    // Without CR4.PSE the PS bit is ignored: the PDE points to a table.
    let nopse = CpuMode { cr4: 0, ..mode };
    mem.w32(pde, 0x0060_0000 | PS as u32 | 3);
    mem.w32(0x60_0000 + (0x123 * 4), 0x0077_7003);
    assert_eq!(
        translate(&nopse, &mem, 0x8012_3456, AccessKind::Read),
        Ok(0x77_7456)
    );
    // Not present at each level.
    assert!(matches!(
        translate(&mode, &mem, 0x4000_0000, AccessKind::Read),
        Err(WalkError::NotPresent {
            level: Level::Pd,
            ..
        })
    ));
    assert!(matches!(
        translate(&mode, &mem, code + 0x2000, AccessKind::Read),
        Err(WalkError::NotPresent {
            level: Level::Pt,
            ..
        })
    ));
}

#[test]
fn pae_paging() {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    let code = 0x8000_3000_u64;
    t.map_pae(&mut mem, code, 0x40_0000);
    mem.write(0x40_0000, &[0x89, 0x07]); // mov [edi], eax
    let mode = CpuMode {
        cr0: CpuMode::CR0_PE | CpuMode::CR0_PG | CpuMode::CR0_WP,
        cr3: t.cr3,
        cr4: CpuMode::CR4_PAE,
        efer: CpuMode::EFER_NXE,
        cs_db: true,
        ..CpuMode::default()
    };
    assert_eq!(mode.paging_mode(), PagingMode::Pae);
    let regs = regs_at(code);
    let a = emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Write)).unwrap();
    assert_eq!(a.write_value(), Some(0x0101_0101));
    // 2 MiB page.
    let pdpte = mem.r64(t.cr3 + 2 * 8);
    let pde = (pdpte & A) + ((0x8060_0000u64 >> 21) & 0x1ff) * 8;
    mem.w64(pde, 0x1_2340_0000 | PS | P | RW);
    assert_eq!(
        translate(&mode, &mem, 0x8065_4321, AccessKind::Write),
        Ok(0x1_2345_4321)
    );
    // Bits 62:52 are reserved in PAE paging.
    mem.w64(pde, 0x1_2340_0000 | PS | P | RW | (1 << 55));
    assert!(matches!(
        translate(&mode, &mem, 0x8065_4321, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pd,
            ..
        })
    ));
    // A PDPTE with R/W set has reserved bit 1 set; a missing one is not
    // present.
    mem.w64(t.cr3 + 8, 0x9000 | P | RW);
    assert!(matches!(
        translate(&mode, &mem, 0x4000_0000, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pdpt,
            ..
        })
    ));
    assert!(matches!(
        translate(&mode, &mem, 0xc000_0000, AccessKind::Read),
        Err(WalkError::NotPresent {
            level: Level::Pdpt,
            ..
        })
    ));
}

#[test]
fn four_level_walk_large_pages_and_errors() {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    let mode = mode64(t.cr3);
    assert_eq!(mode.paging_mode(), PagingMode::Level4);
    assert_eq!(mode.bitness(), Bitness::B64);
    t.map4(&mut mem, 0x1234_5000, 0xabc_d000);
    assert_eq!(
        translate(&mode, &mem, 0x1234_5678, AccessKind::Write),
        Ok(0xabc_d678)
    );
    // 2 MiB page
    let pde = t.entry4(&mut mem, 0x4000_0000, 3);
    mem.w64(pde, 0x8000_0000 | PS | P | RW);
    assert_eq!(
        translate(&mode, &mem, 0x4012_3456, AccessKind::Read),
        Ok(0x8012_3456)
    );
    // Reserved bits 20:13 of a 2 MiB PDE.
    mem.w64(pde, 0x8000_0000 | (1 << 13) | PS | P | RW);
    assert!(matches!(
        translate(&mode, &mem, 0x4012_3456, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pd,
            ..
        })
    ));
    // 1 GiB page
    let pdpte = t.entry4(&mut mem, 0x80_0000_0000, 2);
    mem.w64(pdpte, 0x1_c000_0000 | PS | P | RW);
    assert_eq!(
        translate(&mode, &mem, 0x80_1234_5678, AccessKind::Read),
        Ok(0x1_d234_5678)
    );
    // Reserved bits 29:13 of a 1 GiB PDPTE.
    mem.w64(pdpte, 0x1_c000_0000 | (1 << 20) | PS | P | RW);
    assert!(matches!(
        translate(&mode, &mem, 0x80_1234_5678, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pdpt,
            ..
        })
    ));
    // Bits 62:52 are ignored in 4-level paging (protection keys etc.).
    mem.w64(pdpte, 0x1_c000_0000 | (0x7f << 52) | PS | P | RW);
    assert!(translate(&mode, &mem, 0x80_1234_5678, AccessKind::Read).is_ok());

    // Not present at each level.
    let np = |linear, level| {
        let r = translate(&mode, &mem, linear, AccessKind::Read);
        assert!(
            matches!(r, Err(WalkError::NotPresent { level: l, .. }) if l == level),
            "{linear:#x}: {r:?}"
        );
    };
    np(0x100_0000_0000, Level::Pml4);
    np(0x1_0000_0000, Level::Pdpt); // same PML4E as 0x1234_5000
    np(0x1000_0000, Level::Pd);
    np(0x1234_6000, Level::Pt);
    let e = translate(&mode, &mem, 0x1234_6000, AccessKind::Read).unwrap_err();
    assert!(alloc::format!("{e}").contains("PTE at"), "{e}");

    // PS in a PML4E is reserved; so is XD without EFER.NXE.
    let pml4e = t.cr3;
    let old = mem.r64(pml4e);
    mem.w64(pml4e, old | PS);
    assert!(matches!(
        translate(&mode, &mem, 0x1234_5000, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pml4,
            ..
        })
    ));
    mem.w64(pml4e, old | XD);
    let no_nx = CpuMode {
        efer: CpuMode::EFER_LMA,
        ..mode
    };
    assert!(matches!(
        translate(&no_nx, &mem, 0x1234_5000, AccessKind::Read),
        Err(WalkError::Reserved {
            level: Level::Pml4,
            ..
        })
    ));
    // With NXE, XD forbids fetches only.
    assert!(translate(&mode, &mem, 0x1234_5000, AccessKind::Read).is_ok());
    assert!(matches!(
        translate(&mode, &mem, 0x1234_5000, AccessKind::Fetch),
        Err(WalkError::NoExecute {
            level: Level::Pml4,
            ..
        })
    ));
    mem.w64(pml4e, old);

    // Read-only PTE: writes fail with CR0.WP, succeed without.
    let pte = t.entry4(&mut mem, 0x1234_5000, 4);
    mem.w64(pte, 0xabc_d000 | P);
    assert!(matches!(
        translate(&mode, &mem, 0x1234_5000, AccessKind::Write),
        Err(WalkError::ReadOnly {
            level: Level::Pt,
            ..
        })
    ));
    assert!(translate(&mode, &mem, 0x1234_5000, AccessKind::Read).is_ok());
    let no_wp = CpuMode {
        cr0: mode.cr0 & !CpuMode::CR0_WP,
        ..mode
    };
    assert!(translate(&no_wp, &mem, 0x1234_5000, AccessKind::Write).is_ok());

    // A table outside guest RAM.
    let pde = t.entry4(&mut mem, 0x1234_5000, 3);
    mem.w64(pde, 0x7_0000_0000 | P | RW);
    assert!(matches!(
        translate(&mode, &mem, 0x1234_5000, AccessKind::Read),
        Err(WalkError::TableUnreadable {
            level: Level::Pt,
            entry_gpa: 0x7_0000_0a28
        })
    ));
    let gone = CpuMode {
        cr3: 0x9990_0000,
        ..mode
    };
    assert!(matches!(
        translate(&gone, &mem, 0, AccessKind::Read),
        Err(WalkError::TableUnreadable {
            level: Level::Pml4,
            ..
        })
    ));

    // Non-canonical and 5-level.
    assert_eq!(
        translate(&mode, &mem, 0x8000_0000_0000, AccessKind::Read),
        Err(WalkError::NonCanonical {
            linear: 0x8000_0000_0000
        })
    );
    let la57 = CpuMode {
        cr4: mode.cr4 | CpuMode::CR4_LA57,
        ..mode
    };
    assert_eq!(la57.paging_mode(), PagingMode::Level5);
    assert_eq!(
        translate(&la57, &mem, 0, AccessKind::Read),
        Err(WalkError::FiveLevelPaging)
    );
}

#[test]
fn instruction_straddling_pages_with_scattered_frames() {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    let page = 0x40_0000u64;
    t.map4(&mut mem, page, 0x90_0000);
    t.map4(&mut mem, page + 0x1000, 0x30_0000);
    // mov dword [rdi+0x10], 0xdeadbeef = c7 47 10 ef be ad de, split 3 | 4
    mem.write(0x90_0ffd, &[0xc7, 0x47, 0x10]);
    mem.write(0x30_0000, &[0xef, 0xbe, 0xad, 0xde]);
    let regs = Regs {
        rip: page + 0xffd,
        ..Regs::default()
    };
    let a = emulate(
        &mode64(t.cr3),
        &mem,
        &regs,
        &MmioExit::new(MMIO, AccessKind::Write),
    )
    .unwrap();
    assert_eq!((a.size(), a.write_value()), (4, Some(0xdead_beef)));
    let mut r = regs;
    a.finish(0, &mut r);
    assert_eq!(r.rip, page + 0x1004);
}

#[test]
fn short_fetch_at_end_of_mapped_memory() {
    let mut mem = Mem::default();
    let mut t = Tables::new(&mut mem);
    let page = 0x40_0000u64;
    t.map4(&mut mem, page, 0x90_0000);
    let mode = mode64(t.cr3);
    let regs = Regs {
        rip: page + 0xffe,
        ..Regs::default()
    };
    // mov [rdi], eax fits in the last two bytes: fine.
    mem.write(0x90_0ffe, &[0x89, 0x07]);
    let f = fetch(&mode, &mem, regs.rip);
    assert_eq!(f.bytes.as_slice(), &[0x89, 0x07]);
    assert!(matches!(
        f.stop,
        Some(FetchFault::Walk {
            linear: 0x40_1000,
            error: WalkError::NotPresent {
                level: Level::Pt,
                ..
            }
        })
    ));
    assert!(emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Write)).is_ok());
    // mov [rdi+0x10], eax needs the third byte: truncated.
    mem.write(0x90_0ffe, &[0x89, 0x47]);
    let e = emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Write)).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Truncated {
                fault: FetchFault::Walk { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(alloc::format!("{e}").contains("[89 47]"), "{e}");
    // The next page maps to a GPA that is not RAM (e.g. MMIO): truncated
    // too, with the GPA in the report.
    t.map4(&mut mem, page + 0x1000, 0xfee0_0000);
    let e = emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Write)).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Truncated {
                fault: FetchFault::Unreadable {
                    gpa: 0xfee0_0000,
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    // RIP itself unmapped: nothing fetched at all.
    let r = Regs {
        rip: 0x7000_0000,
        ..regs
    };
    let e = emulate(&mode, &mem, &r, &MmioExit::new(MMIO, AccessKind::Write)).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Fetch {
                rip: 0x7000_0000,
                ..
            }
        ),
        "{e:?}"
    );
    // Code page without execute permission.
    let pte = t.entry4(&mut mem, page, 4);
    mem.w64(pte, 0x90_0000 | P | RW | XD);
    let e = emulate(&mode, &mem, &regs, &MmioExit::new(MMIO, AccessKind::Write)).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Fetch {
                fault: FetchFault::Walk {
                    error: WalkError::NoExecute { .. },
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
}

#[track_caller]
fn unsupported(code: &[u8], kind: AccessKind) -> (Mnemonic, &'static str) {
    match run64(code, kind) {
        Err(EmulateError::Unsupported {
            bytes,
            mnemonic,
            reason,
            rip,
        }) => {
            assert_eq!(rip, CODE);
            assert!(code.starts_with(bytes.as_slice()) && !bytes.is_empty());
            (mnemonic, reason)
        }
        other => panic!("{code:x?}: {other:?}"),
    }
}

#[test]
fn unsupported_instructions_are_reported() {
    use AccessKind::*;
    // add [rdi], eax
    assert_eq!(
        unsupported(&[0x01, 0x07], Write),
        (Mnemonic::Add, "read-modify-write")
    );
    // xchg [rdi], eax
    assert_eq!(
        unsupported(&[0x87, 0x07], Write),
        (Mnemonic::Xchg, "atomic read-modify-write")
    );
    // lock add [rdi], eax
    assert_eq!(unsupported(&[0xf0, 0x01, 0x07], Write).0, Mnemonic::Add);
    assert!(unsupported(&[0xf0, 0x01, 0x07], Write).1.contains("lock"));
    // movsb / rep stosd
    assert_eq!(
        unsupported(&[0xa4], Write),
        (Mnemonic::Movsb, "string instruction")
    );
    assert_eq!(
        unsupported(&[0xf3, 0xab], Write),
        (Mnemonic::Stosd, "string instruction")
    );
    // movdqa xmm0, [rdi] / vmovdqu ymm0, [rdi] / movd eax? no: movd [rdi], xmm1
    assert_eq!(
        unsupported(&[0x66, 0x0f, 0x6f, 0x07], Read),
        (Mnemonic::Movdqa, "SSE/AVX/MMX access")
    );
    assert_eq!(
        unsupported(&[0xc5, 0xfe, 0x6f, 0x07], Read).0,
        Mnemonic::Vmovdqu
    );
    assert_eq!(
        unsupported(&[0x66, 0x0f, 0x7e, 0x0f], Write).0,
        Mnemonic::Movd
    );
    // cmp [rdi], eax / test [rdi], eax
    assert_eq!(unsupported(&[0x39, 0x07], Read).0, Mnemonic::Cmp);
    assert_eq!(unsupported(&[0x85, 0x07], Read).0, Mnemonic::Test);
    // push qword [rdi]
    assert_eq!(unsupported(&[0xff, 0x37], Read).0, Mnemonic::Push);
    // mov eax, ebx (8b c3): no memory operand at all
    assert_eq!(
        unsupported(&[0x8b, 0xc3], Read),
        (Mnemonic::Mov, "register operand: no memory access")
    );
    // mov [rdi], es (8c 07)
    assert_eq!(unsupported(&[0x8c, 0x07], Write).0, Mnemonic::Mov);
    // ud2, hlt, nop
    assert_eq!(unsupported(&[0x0f, 0x0b], Read).0, Mnemonic::Ud2);
    assert_eq!(unsupported(&[0xf4], Read).0, Mnemonic::Hlt);
    let e = run64(&[0x01, 0x07], Write).unwrap_err();
    let s = alloc::format!("{e}");
    assert!(s.contains("Add") && s.contains("[01 07]"), "{s}");
}

#[test]
fn invalid_and_refused_exits() {
    // push es is invalid in 64-bit mode; lock mov is #UD.
    for code in [&[0x06u8][..], &[0xf0, 0x89, 0x07]] {
        let e = run64(code, AccessKind::Write).unwrap_err();
        assert!(
            matches!(e, EmulateError::Invalid { .. }),
            "{code:x?}: {e:?}"
        );
    }
    // 15 prefixes and then more: longer than 15 bytes.
    let e = run64(&[0x66; 20], AccessKind::Write).unwrap_err();
    assert!(matches!(e, EmulateError::Invalid { .. }), "{e:?}");
    // An instruction fetch from MMIO cannot be emulated.
    let e = run64(&[0x89, 0x07], AccessKind::Fetch).unwrap_err();
    assert_eq!(
        e,
        EmulateError::FetchFromMmio {
            gpa: MMIO,
            rip: CODE
        }
    );
}

#[test]
fn direction_mismatch_is_an_error() {
    // mov [rdi], eax reported as a read fault
    let e = run64(&[0x89, 0x07], AccessKind::Read).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::DirectionMismatch {
                exit: AccessKind::Read,
                decoded: AccessKind::Write,
                mnemonic: Mnemonic::Mov,
                ..
            }
        ),
        "{e:?}"
    );
    // mov eax, [rdi] reported as a write fault
    let e = run64(&[0x8b, 0x07], AccessKind::Write).unwrap_err();
    assert!(
        alloc::format!("{e}").contains("is a read but the exit was a write"),
        "{e}"
    );
}

#[test]
fn page_split_access_is_an_error() {
    let (mode, mem, regs) = setup64(&[0x89, 0x07]); // mov [rdi], eax
    let exit = MmioExit::new(0xfed0_0ffe, AccessKind::Write);
    let e = emulate(&mode, &mem, &regs, &exit).unwrap_err();
    assert!(
        matches!(e, EmulateError::PageSplit { size: 4, .. }),
        "{e:?}"
    );
    // The same at the last fitting offset is fine.
    let exit = MmioExit::new(0xfed0_0ffc, AccessKind::Write);
    assert!(emulate(&mode, &mem, &regs, &exit).is_ok());
}

#[test]
fn linear_address_must_match_the_operand() {
    // mov [rsi+rcx*8-8], r15
    let (mode, mem, regs) = setup64(&[0x4c, 0x89, 0x7c, 0xce, 0xf8]);
    let ea = regs.gpr[Regs::RSI]
        .wrapping_add(regs.gpr[Regs::RCX] << 3)
        .wrapping_sub(8);
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(ea);
    assert!(emulate(&mode, &mem, &regs, &exit).is_ok());
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(ea + 4);
    let e = emulate(&mode, &mem, &regs, &exit).unwrap_err();
    assert!(
        matches!(e, EmulateError::OperandMismatch { operand_linear, .. } if operand_linear == ea),
        "{e:?}"
    );
    // mov eax, [rip+0x100]: relative to the next instruction.
    let (mode, mem, regs) = setup64(&[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00]);
    let exit = MmioExit::new(MMIO, AccessKind::Read).with_linear(CODE + 6 + 0x100);
    assert!(emulate(&mode, &mem, &regs, &exit).is_ok());
    // fs: base is unknown: not checked.
    let (mode, mem, regs) = setup64(&[0x64, 0x89, 0x07]);
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(1);
    assert!(emulate(&mode, &mem, &regs, &exit).is_ok());
    // mov [edi], eax with the address-size prefix uses only edi.
    let (mode, mem, regs) = setup64(&[0x67, 0x89, 0x07]);
    let edi = regs.gpr[Regs::RDI] & 0xffff_ffff;
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(edi);
    assert!(emulate(&mode, &mem, &regs, &exit).is_ok());
    // Outside 64-bit mode only CS-relative operands are checked.
    let mut m = Mem::default();
    m.write(0x1000, &[0x2e, 0x89, 0x07]); // mov cs:[edi], eax
    let mode = CpuMode {
        cs_base: 0x100,
        ..mode32()
    };
    let regs = regs_at(0xf00);
    let edi = (regs.gpr[Regs::RDI] + 0x100) & 0xffff_ffff;
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(edi);
    assert!(emulate(&mode, &m, &regs, &exit).is_ok());
    let exit = MmioExit::new(MMIO, AccessKind::Write).with_linear(edi + 1);
    assert!(emulate(&mode, &m, &regs, &exit).is_err());
}

#[test]
fn insn_bytes_format() {
    let b = InsnBytes::new(&[0x48, 0x8b, 0x07]);
    assert_eq!(alloc::format!("{b}"), "48 8b 07");
    assert_eq!(alloc::format!("{b:?}"), "[48 8b 07]");
    assert_eq!(InsnBytes::new(&[0; 20]).len(), MAX_INSN_LEN);
    assert!(InsnBytes::default().is_empty());
}

fn any_mode() -> impl Strategy<Value = CpuMode> {
    (0usize..6, any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(k, cr3, cs_base, wp)| {
        let wp = if wp { CpuMode::CR0_WP } else { 0 };
        let pg = CpuMode::CR0_PE | CpuMode::CR0_PG | wp;
        let cr3 = cr3 & 0xf000; // inside the random RAM below
        match k {
            0 => mode64(cr3),
            1 => CpuMode {
                cs_base,
                ..mode32()
            },
            2 => CpuMode {
                cs_base: cs_base & 0xffff0,
                ..CpuMode::default()
            },
            3 => CpuMode {
                cr0: pg,
                cr3,
                cr4: CpuMode::CR4_PSE,
                cs_db: true,
                cs_base,
                ..CpuMode::default()
            },
            4 => CpuMode {
                cr0: pg,
                cr3,
                cr4: CpuMode::CR4_PAE,
                efer: CpuMode::EFER_NXE,
                cs_db: true,
                ..CpuMode::default()
            },
            _ => CpuMode {
                cs_l: false,
                ..mode64(cr3)
            },
        }
    })
}

proptest! {
    /// Random instruction bytes after a valid mapping: never a panic, and a
    /// success always advances RIP by the decoded length.
    #[test]
    fn random_instructions_never_panic(
        code in proptest::collection::vec(any::<u8>(), 0..20),
        regs in (proptest::array::uniform16(any::<u64>()), any::<u64>()),
        gpa in any::<u64>(),
        kind in 0u8..3,
        linear in proptest::option::of(any::<u64>()),
    ) {
        let (mode, mem, mut r) = setup64(&code);
        r.gpr = regs.0;
        r.rflags = regs.1;
        let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][usize::from(kind)];
        let exit = MmioExit { gpa, kind, linear };
        match emulate(&mode, &mem, &r, &exit) {
            Ok(a) => {
                prop_assert!(matches!(a.size(), 1 | 2 | 4 | 8));
                prop_assert!((1..=MAX_INSN_LEN).contains(&usize::from(a.op.insn_len())));
                let mut after = r;
                a.finish(gpa, &mut after);
                prop_assert_eq!(after.rip, r.rip + u64::from(a.op.insn_len()));
                let _ = alloc::format!("{a:?}");
            }
            Err(e) => {
                let _ = alloc::format!("{e}");
            }
        }
    }

    /// Random guest memory used as page tables and code, in every mode:
    /// never a panic.
    #[test]
    fn random_tables_and_code_never_panic(
        mode in any_mode(),
        ram in proptest::collection::vec(any::<u8>(), 0x10000),
        rip in any::<u64>(),
        linear in any::<u64>(),
        regs in proptest::array::uniform16(any::<u64>()),
        write in any::<bool>(),
        near in any::<bool>(),
    ) {
        let mut ram = ram;
        if near {
            // Keep table addresses inside the 64 KiB so walks go deep: clear
            // bits 51:16 of every 8-byte word (31:16 of every other dword).
            for w in ram.chunks_mut(8) {
                for b in &mut w[2..7] {
                    *b = 0;
                }
                w[6] &= 0xf0;
            }
        }
        let mut mem = Mem::default();
        for (i, page) in ram.chunks(0x1000).enumerate() {
            mem.pages.insert(i as u64 * 0x1000, page.to_vec());
        }
        // Half the time keep RIP inside the random RAM.
        let rip = if rip & 1 == 0 { rip & 0xffff } else { rip };
        let linear = if near { linear & 0xffff } else { linear };
        let kind = if write { AccessKind::Write } else { AccessKind::Read };
        let _ = translate(&mode, &mem, linear, kind);
        let _ = translate(&mode, &mem, linear, AccessKind::Fetch);
        let r = Regs { gpr: regs, rip, rflags: 2 };
        let exit = MmioExit::new(linear, kind).with_linear(linear);
        match emulate(&mode, &mem, &r, &exit) {
            Ok(a) => {
                let mut after = r;
                a.finish(linear, &mut after);
            }
            Err(e) => {
                let _ = alloc::format!("{e}");
            }
        }
    }
}

/// One supported 64-bit form: (legacy prefix, REX.W, opcode bytes, write,
/// access size, immediate size, dest width for reads).
type Form = (Option<u8>, bool, &'static [u8], bool, u8, usize, u8);

const FORMS: &[Form] = &[
    (None, false, &[0x88], true, 1, 0, 0),
    (None, false, &[0x89], true, 4, 0, 0),
    (Some(0x66), false, &[0x89], true, 2, 0, 0),
    (None, true, &[0x89], true, 8, 0, 0),
    (None, false, &[0x8a], false, 1, 0, 1),
    (None, false, &[0x8b], false, 4, 0, 4),
    (Some(0x66), false, &[0x8b], false, 2, 0, 2),
    (None, true, &[0x8b], false, 8, 0, 8),
    (None, false, &[0xc6], true, 1, 1, 0),
    (None, false, &[0xc7], true, 4, 4, 0),
    (Some(0x66), false, &[0xc7], true, 2, 2, 0),
    (None, true, &[0xc7], true, 8, 4, 0),
    (None, false, &[0x0f, 0xb6], false, 1, 0, 4),
    (Some(0x66), false, &[0x0f, 0xb6], false, 1, 0, 2),
    (None, true, &[0x0f, 0xb6], false, 1, 0, 8),
    (None, false, &[0x0f, 0xb7], false, 2, 0, 4),
    (None, true, &[0x0f, 0xb7], false, 2, 0, 8),
    (None, false, &[0x0f, 0xbe], false, 1, 0, 4),
    (Some(0x66), false, &[0x0f, 0xbe], false, 1, 0, 2),
    (None, true, &[0x0f, 0xbe], false, 1, 0, 8),
    (None, false, &[0x0f, 0xbf], false, 2, 0, 4),
    (None, true, &[0x0f, 0xbf], false, 2, 0, 8),
    (None, true, &[0x63], false, 4, 0, 8),
    (None, false, &[0x63], false, 4, 0, 4),
];

proptest! {
    /// Every supported form with random ModRM/SIB/displacement/REX decodes,
    /// with the generated length, size and direction; a write changes no
    /// register, a read only its destination.
    #[test]
    fn generated_supported_forms_decode(
        form in 0..FORMS.len(),
        rex_rxb in 0u8..8,
        use_rex in any::<bool>(),
        md in 0u8..3,
        reg in 0u8..8,
        rm in 0u8..8,
        sib in any::<u8>(),
        tail in proptest::array::uniform8(any::<u8>()),
        loaded in any::<u64>(),
    ) {
        let (prefix, w, opcode, write, size, imm, width) = FORMS[form];
        let reg = if imm != 0 { 0 } else { reg }; // C6/C7 need /0
        let mut code = Vec::new();
        code.extend(prefix);
        let rex = w || use_rex;
        if rex {
            code.push(0x40 | (u8::from(w) << 3) | rex_rxb);
        }
        code.extend_from_slice(opcode);
        code.push((md << 6) | (reg << 3) | rm);
        let mut disp = match md {
            1 => 1,
            2 => 4,
            _ => 0,
        };
        if rm == 4 {
            code.push(sib);
            if md == 0 && sib & 7 == 5 {
                disp = 4;
            }
        } else if md == 0 && rm == 5 {
            disp = 4; // RIP-relative
        }
        code.extend_from_slice(&tail[..disp + imm]);
        let kind = if write { AccessKind::Write } else { AccessKind::Read };
        let (a, regs) = run64(&code, kind).map_err(|e| TestCaseError::fail(alloc::format!("{code:x?}: {e}")))?;
        prop_assert_eq!(usize::from(a.op.insn_len()), code.len(), "{:x?}", code);
        prop_assert_eq!(a.size(), size);
        prop_assert_eq!(a.is_write(), write);
        let mut after = regs;
        a.finish(loaded, &mut after);
        prop_assert_eq!(after.rip, regs.rip + code.len() as u64);
        if write {
            prop_assert_eq!(after.gpr, regs.gpr);
        } else {
            let r = (reg | ((rex_rxb & 4) << 1)) & if rex { 15 } else { 7 };
            let dest = if width == 1 && !rex && reg >= 4 { reg - 4 } else { r };
            let MmioDir::Read(d) = a.op.dir else { unreachable!() };
            prop_assert_eq!(usize::from(d.reg.index), usize::from(dest));
            prop_assert_eq!(d.width, width);
            for i in 0..16 {
                if i != usize::from(dest) {
                    prop_assert_eq!(after.gpr[i], regs.gpr[i]);
                }
            }
        }
    }
}

#[test]
fn exit_from_ept_violation_qualification() {
    // read, linear valid, translation access
    assert_eq!(
        MmioExit::from_ept_violation(0x181, 0x1000, 0x2000),
        Ok(MmioExit {
            gpa: 0x1000,
            kind: AccessKind::Read,
            linear: Some(0x2000)
        })
    );
    // read+write (read-modify-write): a write; linear not valid
    assert_eq!(
        MmioExit::from_ept_violation(0x3, 0x1000, 0x2000),
        Ok(MmioExit::new(0x1000, AccessKind::Write))
    );
    assert_eq!(
        MmioExit::from_ept_violation(0x84 | 0x100, 5, 6).map(|e| e.kind),
        Ok(AccessKind::Fetch)
    );
    // bit 7 without bit 8: the guest's page walk hit MMIO
    let e = MmioExit::from_ept_violation(0x81, 0x1000, 0x2000).unwrap_err();
    assert_eq!(
        e,
        EmulateError::PagingStructureAccess {
            gpa: 0x1000,
            linear: 0x2000
        }
    );
    assert!(alloc::format!("{e}").contains("paging-structure"));
}
