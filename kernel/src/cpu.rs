//! The CPU as the hypervisor owns it: port I/O, GDT/TSS/IDT, exception
//! reports, control registers and MSRs. Leaf module: the `unsafe` for these
//! instructions lives here.

use core::arch::{asm, global_asm};
use spin::LazyLock;
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// The I/O ports Tern itself uses. Port I/O is only reached through the
/// owners below (`x86_64::instructions::port`, whose reads and writes are
/// `unsafe`); no other module names a port.
mod ports {
    /// Bochs/QEMU debug console (a byte written is printed).
    pub const DEBUGCON: u16 = 0xE9;
    /// QEMU's isa-debug-exit device.
    pub const QEMU_EXIT: u16 = 0xF4;
    /// 8254 PIT channel 2 data and the mode/command register.
    pub const PIT_CH2: u16 = 0x42;
    pub const PIT_MODE: u16 = 0x43;
    /// Keyboard-controller port B: PIT channel 2 gate (bit 0), speaker
    /// (bit 1), channel 2 output (bit 5).
    pub const PORT_B: u16 = 0x61;
    /// 8259 PICs: command and data ports of the master and the slave.
    pub const PIC1_CMD: u16 = 0x20;
    pub const PIC1_DATA: u16 = 0x21;
    pub const PIC2_CMD: u16 = 0xA0;
    pub const PIC2_DATA: u16 = 0xA1;
}

/// Writes a byte to the debug console port (0xE9).
pub fn debugcon_write(b: u8) {
    // SAFETY: 0xE9 is the emulator's debug console (nothing on real
    // hardware); writing it prints a byte and touches no memory.
    unsafe { x86_64::instructions::port::PortWriteOnly::<u8>::new(ports::DEBUGCON).write(b) }
}

/// Writes `code` to QEMU's isa-debug-exit port, which ends the emulator.
pub fn qemu_exit(code: u32) {
    // SAFETY: only called on the way out of Tern (`exit::exit`); the device
    // stops QEMU, and elsewhere the port is unused and touches no memory.
    unsafe { x86_64::instructions::port::PortWriteOnly::<u32>::new(ports::QEMU_EXIT).write(code) }
}

/// Reads a model-specific register. Reading an MSR that does not exist
/// raises #GP, which stops Tern with an exception report: callers only read
/// MSRs whose presence CPUID or the VMX capabilities showed.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR only writes EDX:EAX; if the MSR does not exist it
    // raises #GP, which the IDT reports before stopping Tern, so no memory
    // and no Rust state is changed either way.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR and value must be valid and must not break the kernel's own
/// execution environment.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the MSR and value keep the kernel's execution environment
    // intact (this function's contract), and WRMSR touches no memory.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// Executes CPUID.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is available on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// An FXSAVE image: the x87, MMX and SSE state with MXCSR (the guest state
/// Tern switches between VMs; Tern itself is built without SSE and never
/// touches it).
#[repr(C, align(16))]
#[derive(Clone)]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The state after reset (FINIT and MXCSR's reset value): FCW 0x37F,
    /// all registers empty or zero, MXCSR 0x1F80.
    pub fn reset() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Self(a)
    }
}

/// Saves the x87/SSE state.
pub fn fxsave(a: &mut FxArea) {
    // SAFETY: the area is 512 bytes, 16-byte aligned and ours; CR4.OSFXSR
    // is set and CR0.EM/TS clear (`enable_fxsr`).
    unsafe { asm!("fxsave64 [{}]", in(reg) a.0.as_mut_ptr(), options(nostack, preserves_flags)) }
}

/// Loads the x87/SSE state.
pub fn fxrstor(a: &FxArea) {
    // SAFETY: as for `fxsave`; the image came from FXSAVE or `reset`, so
    // MXCSR has no reserved bit set.
    unsafe { asm!("fxrstor64 [{}]", in(reg) a.0.as_ptr(), options(nostack, preserves_flags)) }
}

/// The MXCSR bits this CPU accepts (FXSAVE's MXCSR_MASK; 0 there means
/// the architectural default 0xFFBF).
pub fn mxcsr_mask() -> u32 {
    let mut a = FxArea([0; 512]);
    // Saving changes no state; the guest state is not in the registers
    // while Tern runs between VMs, so this reads Tern's reset state.
    fxsave(&mut a);
    match u32::from_le_bytes([a.0[28], a.0[29], a.0[30], a.0[31]]) {
        0 => 0xFFBF,
        m => m,
    }
}

/// Lets the host save and restore guests' x87/SSE state: CR4.OSFXSR and
/// OSXMMEXCPT on, CR0.EM and TS off, MP on.
pub fn enable_fxsr() {
    use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};
    // SAFETY: Tern is built soft-float and executes no x87/SSE code of its
    // own; these bits only allow FXSAVE/FXRSTOR of guest state.
    unsafe {
        let mut cr0 = Cr0::read();
        cr0.remove(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED);
        cr0.insert(Cr0Flags::MONITOR_COPROCESSOR);
        Cr0::write(cr0);
        Cr4::update(|f| f.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE));
    }
}

/// DR0-DR3 and DR6, in that order.
pub fn read_debug_regs() -> [u64; 5] {
    let (a, b, c, d, e): (u64, u64, u64, u64, u64);
    // SAFETY: reading debug registers has no effect (CPL 0).
    unsafe {
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3", "mov {}, dr6",
             out(reg) a, out(reg) b, out(reg) c, out(reg) d, out(reg) e,
             options(nomem, nostack, preserves_flags))
    }
    [a, b, c, d, e]
}

/// Loads DR0-DR3 and DR6. Tern's own DR7 is always 0x400 (VM exits load
/// it), so these addresses never trigger in the hypervisor.
pub fn write_debug_regs(r: &[u64; 5]) {
    // SAFETY: with DR7 disabled in the host the breakpoint addresses have
    // no effect; DR6 values come with their fixed bits set.
    unsafe {
        asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}", "mov dr6, {}",
             in(reg) r[0], in(reg) r[1], in(reg) r[2], in(reg) r[3], in(reg) r[4],
             options(nomem, nostack, preserves_flags))
    }
}

/// Reads or writes a legacy PC port Tern owns (PIT channel 2, port B, the
/// PICs): these only count, gate the speaker or mask interrupt lines, touch
/// no memory, and no guest reaches them (every guest port access exits).
fn pc_out(port: u16, value: u8) {
    // SAFETY: see above; `port` is one of `ports`.
    unsafe { x86_64::instructions::port::Port::<u8>::new(port).write(value) }
}

fn pc_in(port: u16) -> u8 {
    // SAFETY: as for `pc_out`; reading these ports has no side effect.
    unsafe { x86_64::instructions::port::Port::<u8>::new(port).read() }
}

/// The TSC frequency in Hz, measured against the PIT (channel 2 gated by
/// port 0x61, mode 0, 10 ms); 1 GHz when the PIT does not count (the
/// measurement gives up after 2^26 polls).
pub fn calibrate_tsc() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const COUNT: u16 = 11_932; // 10 ms
    let gate = pc_in(ports::PORT_B);
    pc_out(ports::PORT_B, (gate & !0x02) | 0x01); // gate on, speaker off
    pc_out(ports::PIT_MODE, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0
    pc_out(ports::PIT_CH2, COUNT as u8);
    pc_out(ports::PIT_CH2, (COUNT >> 8) as u8);
    let start = rdtsc();
    let mut polls = 0u64;
    while pc_in(ports::PORT_B) & 0x20 == 0 {
        polls += 1;
        if polls >= 1 << 26 {
            pc_out(ports::PORT_B, gate);
            return 1_000_000_000;
        }
    }
    let ticks = rdtsc().wrapping_sub(start);
    pc_out(ports::PORT_B, gate);
    (u128::from(ticks) * u128::from(PIT_HZ) / u128::from(COUNT)).max(1) as u64
}

/// Masks every line of both legacy 8259 PICs: Tern polls its devices and
/// never takes an interrupt, and a guest must not receive the host's.
pub fn mask_legacy_pic() {
    pc_out(ports::PIC1_DATA, 0xff);
    pc_out(ports::PIC2_DATA, 0xff);
}

/// Ends an interrupt that a VM exit acknowledged: a non-specific EOI to the
/// legacy PICs for their default vectors (0x08-0x0F master, 0x70-0x77
/// slave), the local APIC's EOI register otherwise (if the APIC is on).
pub fn end_of_interrupt(vector: u8) {
    match vector {
        // OCW2 0x20: non-specific EOI.
        0x08..=0x0F => pc_out(ports::PIC1_CMD, 0x20),
        0x70..=0x77 => {
            pc_out(ports::PIC2_CMD, 0x20);
            pc_out(ports::PIC1_CMD, 0x20);
        }
        _ => {
            use x86_64::registers::model_specific::ApicBaseFlags;
            /// The EOI register's offset in the local APIC page (SDM Vol.
            /// 3A, Table 11-1).
            const EOI: u64 = 0xB0;
            let base = rdmsr(x86::msr::IA32_APIC_BASE);
            if ApicBaseFlags::from_bits_retain(base).contains(ApicBaseFlags::LAPIC_ENABLE) {
                let page = x86_64::PhysAddr::new_truncate(base).align_down(4096u64);
                let eoi = page.as_u64() + EOI;
                // SAFETY: the local APIC's register page is identity mapped
                // (all memory below 4 GiB is); writing 0 to EOI ends the
                // in-service interrupt and has no other effect.
                unsafe { core::ptr::write_volatile(eoi as *mut u32, 0) };
            }
        }
    }
}

/// Executes UD2 (the `selftest=ud2` check of the exception path).
pub fn undefined_instruction() {
    // SAFETY: raises #UD, which the IDT reports before stopping Tern.
    unsafe { asm!("ud2", options(nomem, nostack)) }
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Bochs "magic breakpoint" (`xchg bx, bx`): with `magic_break: enabled=1`
/// and a debugger rc file ending in `quit`, Bochs exits here.
pub fn bochs_magic_break() {
    // SAFETY: `xchg bx, bx` only swaps a register with itself.
    unsafe { asm!("xchg bx, bx", options(nomem, nostack, preserves_flags)) }
}

/// The selectors of the kernel's GDT, used for VMCS host state.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

const DOUBLE_FAULT_IST: u16 = 0;

static TSS: LazyLock<TaskStateSegment> = LazyLock::new(|| {
    static mut DF_STACK: [u8; 16384] = [0; 16384];
    let mut tss = TaskStateSegment::new();
    // Only the address of the stack is taken, never a reference; the CPU is
    // its only user (on a double fault).
    let top = VirtAddr::from_ptr(core::ptr::addr_of!(DF_STACK)) + 16384u64;
    tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] = top;
    tss
});

static GDT: LazyLock<(GlobalDescriptorTable, Selectors)> = LazyLock::new(|| {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(&TSS));
    (gdt, Selectors { code, data, tss })
});

static IDT: LazyLock<InterruptDescriptorTable> = LazyLock::new(|| {
    let mut idt = InterruptDescriptorTable::new();
    let stubs = exception_stubs();
    macro_rules! set {
        ($($field:ident = $v:literal),*) => {$(
            // SAFETY: the stub is the assembly entry below for that vector; it
            // never returns to the faulting code, so any stack will do.
            unsafe { idt.$field.set_handler_addr(VirtAddr::new(stubs[$v])) };
        )*};
    }
    set!(
        divide_error = 0,
        debug = 1,
        non_maskable_interrupt = 2,
        breakpoint = 3,
        overflow = 4,
        bound_range_exceeded = 5,
        invalid_opcode = 6,
        device_not_available = 7,
        invalid_tss = 10,
        segment_not_present = 11,
        stack_segment_fault = 12,
        general_protection_fault = 13,
        page_fault = 14,
        x87_floating_point = 16,
        alignment_check = 17,
        machine_check = 18,
        simd_floating_point = 19,
        virtualization = 20,
        cp_protection_exception = 21,
        hv_injection_exception = 28,
        vmm_communication_exception = 29,
        security_exception = 30
    );
    // SAFETY: as above; the double fault stub runs on its own IST stack so a
    // kernel stack overflow is still reported.
    unsafe {
        idt.double_fault
            .set_handler_addr(VirtAddr::new(stubs[8]))
            .set_stack_index(DOUBLE_FAULT_IST);
    }
    idt
});

/// Loads the kernel's GDT, TSS and IDT and reloads every segment register.
pub fn init_tables() {
    let (gdt, sel) = &*GDT;
    gdt.load();
    // SAFETY: the selectors come from the GDT just loaded; the code segment
    // is a 64-bit ring-0 segment and the data segment a writable one.
    unsafe {
        CS::set_reg(sel.code);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        SS::set_reg(sel.data);
        FS::set_reg(SegmentSelector(0));
        GS::set_reg(SegmentSelector(0));
        load_tss(sel.tss);
    }
    IDT.load();
}

/// The kernel's GDT selectors.
pub fn selectors() -> Selectors {
    GDT.1
}

/// Base address of the TSS (for the VMCS host state).
pub fn tss_base() -> u64 {
    let tss: &TaskStateSegment = &TSS;
    tss as *const TaskStateSegment as u64
}

/// What the exception stubs push, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 error",
    "alignment check",
    "machine check",
    "SIMD error",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    crate::serial::break_lock();
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("?");
    crate::println!(
        "tern: hypervisor exception {} ({name}) error={:#x} rip={:#x} rsp={:#x} rflags={:#x} cr2={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.vector, frame.error_code, frame.rip, frame.rsp, frame.rflags, cr2,
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    crate::exit::exit(crate::exit::Status::HYPERVISOR_FAULT)
}

// One stub per vector: vectors without an error code push a zero so the
// frame has one shape, then the vector; the common part saves the scratch
// registers and calls the report, which never returns.
macro_rules! stubs {
    ($($v:literal $err:literal),*) => {
        global_asm!(
            $(
                concat!(".global tern_exc_", $v, "\ntern_exc_", $v, ":\n"),
                concat!(".if ", $err, " == 0\n push 0\n.endif\n"),
                concat!("push ", $v, "\n jmp tern_exc_common\n"),
            )*
            "tern_exc_common:",
            "push rbp", "push rdi", "push rsi", "push rdx", "push rcx", "push rbx", "push rax",
            "mov rdi, rsp",
            "and rsp, -16",
            "call {report}",
            "ud2",
            report = sym exception_report,
        );
        fn exception_stubs() -> [u64; 32] {
            [ $( { extern "C" { #[link_name = concat!("tern_exc_", $v)] fn stub(); } stub as *const () as u64 } ),* ]
        }
    };
}

stubs!(0 0, 1 0, 2 0, 3 0, 4 0, 5 0, 6 0, 7 0, 8 1, 9 0, 10 1, 11 1, 12 1, 13 1, 14 1, 15 0,
       16 0, 17 1, 18 0, 19 0, 20 0, 21 1, 22 0, 23 0, 24 0, 25 0, 26 0, 27 0, 28 0, 29 1, 30 1, 31 0);
