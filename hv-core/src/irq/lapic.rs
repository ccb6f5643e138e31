//! One vCPU's local APIC (SDM Vol. 3A, chapter 11) as a pure model: the
//! `IA32_APIC_BASE` mode machine (disabled, xAPIC, x2APIC), the register
//! file behind the xAPIC MMIO page and the x2APIC MSRs 800H-8FFH, the
//! interrupt request/in-service/trigger-mode bitmaps with TPR/PPR
//! priorities, IPIs through the ICR, the error status register, the six
//! local vector table entries and the timer in its one-shot, periodic and
//! TSC-deadline modes.
//!
//! What is not here: routing (an ICR write returns the [`ApicMessage`] and
//! the machine delivers it), lowest-priority arbitration (the caller picks
//! among the APICs that [`LocalApic::matches`]), the CMCI LVT entry,
//! EOI-broadcast suppression, directed EOI, thermal and performance-counter
//! interrupt sources (their LVT entries only hold what is written), SMI, and
//! level-triggered LINT inputs (remote IRR): [`LocalApic::set_lint`] treats
//! every LINT input as edge-triggered. INIT and start-up messages are only
//! recorded ([`LocalApic::take_init`], [`LocalApic::take_sipi`]); a
//! single-vCPU VM may ignore them.
//!
//! Access rules. The xAPIC page is only meaningful for aligned 32-bit
//! accesses at 16-byte-aligned offsets below 4 KiB: any other access reads
//! 0 and a write is ignored (SDM 11.4.1 says the registers must be accessed
//! with aligned 128-bit-spaced 32-bit loads and stores; what other widths do
//! is model-specific). An aligned access to a reserved offset reads 0 and
//! sets the ESR's illegal-register-address bit. In x2APIC mode the MSR
//! interface follows SDM 11.12.1: every error is an [`ApicError`], which
//! the caller turns into #GP(0).
//!
//! Time: the timer counts at [`BUS_HZ`] before division, computed from the
//! `now` the caller passes (virtual ns); no tick is ever stored, so the
//! current-count register is exact at any time and a poll that comes late
//! raises the interrupt once, not once per missed period.

use super::{ApicMessage, DeliveryMode, Nanos};
use alloc::vec::Vec;
use core::fmt;

/// The APIC timer's input clock before the divide configuration: 1 GHz,
/// i.e. one count per virtual nanosecond at divide-by-1. Real parts run it
/// at the core crystal or bus clock (25-200 MHz); guests calibrate it
/// against the PIT or read it from CPUID leaf 15H, so the exact value is
/// ours to choose, and a whole number of nanoseconds per tick keeps the
/// arithmetic exact.
pub const BUS_HZ: u64 = 1_000_000_000;

/// Nanoseconds per timer input tick (before division).
const NS_PER_TICK: u64 = 1_000_000_000 / BUS_HZ;
const _: () = assert!(1_000_000_000 % BUS_HZ == 0, "BUS_HZ must divide 1 GHz");

/// `IA32_APIC_BASE`.
pub const MSR_IA32_APIC_BASE: u32 = 0x1B;
/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6E0;
/// First and last MSR of the x2APIC register range.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8FF;
/// The APIC page's address after reset.
pub const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;

/// `IA32_APIC_BASE` bits (SDM Figure 11-5).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;
/// Bits 7:0 and 9 are reserved; bits above MAXPHYADDR are added at use.
const BASE_RESERVED_LOW: u64 = 0xFF | (1 << 9);
const BASE_ADDR_MASK: u64 = !0xFFF;

/// Version register: version 14H (integrated APIC), max LVT entry 5 (timer,
/// thermal, performance, LINT0, LINT1, error; no CMCI), bit 24 clear (no
/// EOI-broadcast suppression).
const VERSION: u32 = 0x0005_0014;

/// SVR: vector 7:0, APIC software enable (8), focus processor checking (9).
const SVR_ENABLE: u32 = 1 << 8;
const SVR_WRITABLE: u32 = 0x3FF;

/// ESR bits (SDM Figure 11-9).
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// ICR bits (SDM Figure 11-12); the low half is what xAPIC writes at 300H.
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
/// Vector, delivery mode, destination mode, level, trigger, shorthand.
/// Delivery status (bit 12) always reads 0: a send completes at once.
const ICR_LOW_WRITABLE: u64 = 0x000C_CFFF;
/// xAPIC: ICR high holds the destination in bits 31:24 (ICR bits 63:56).
const ICR_XAPIC_DEST: u64 = 0xFF00_0000 << 32;
/// x2APIC: a 32-bit destination in ICR bits 63:32.
const ICR_X2APIC_WRITABLE: u64 = 0xFFFF_FFFF_0000_0000 | ICR_LOW_WRITABLE;

/// Divide configuration: bits 0, 1 and 3.
const DIVIDE_WRITABLE: u32 = 0xB;

/// LVT entries, in register order (320H...370H): timer, thermal (1),
/// performance counters (2), LINT0, LINT1, error.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
const LVT_MASKED: u32 = 1 << 16;
/// Delivery status (12) and, for LINT0/1, remote IRR (14): read-only, and
/// since sends complete at once and LINT inputs are edge-triggered here,
/// they always read 0.
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_REMOTE_IRR: u32 = 1 << 14;
/// What software may write in each entry (SDM Figure 11-8).
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00FF, // timer: vector, mask, mode 18:17
    0x0001_07FF, // thermal: vector, delivery mode, mask
    0x0001_07FF, // performance counters: same
    0x0001_A7FF, // LINT0: vector, delivery mode, polarity, trigger, mask
    0x0001_A7FF, // LINT1: same
    0x0001_00FF, // error: vector, mask
];
/// Read-only (not reserved) bits: an x2APIC write may carry them.
const LVT_READ_ONLY: [u32; LVT_COUNT] = [
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS,
];
const LVT_TIMER_MODE_SHIFT: u32 = 17;

/// The xAPIC ID lives in bits 31:24 of the ID register; only these bits of
/// LDR are defined; DFR's model is bits 31:28 and the rest reads as ones.
const XAPIC_ID_SHIFT: u32 = 24;
const LDR_XAPIC_MASK: u32 = 0xFF00_0000;
const DFR_MODEL_MASK: u32 = 0xF000_0000;
const DFR_FLAT: u32 = 0xF;
const DFR_CLUSTER: u32 = 0x0;

/// Physical broadcast destinations.
const XAPIC_BROADCAST: u32 = 0xFF;
const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;

/// Where the APIC is in the `IA32_APIC_BASE` state machine (SDM 11.12.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicMode {
    /// EN = 0: the APIC is globally disabled; the PIC's INTR reaches the CPU
    /// directly.
    Disabled,
    /// EN = 1, EXTD = 0: registers in the MMIO page.
    XApic,
    /// EN = 1, EXTD = 1: registers in MSRs 800H-8FFH.
    X2Apic,
}

/// The LVT timer mode (bits 18:17). The reserved encoding 11b counts like
/// one-shot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// Why an APIC access or state change was refused. For MSR accesses and
/// `IA32_APIC_BASE` writes the caller injects #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// An x2APIC MSR accessed while the APIC is not in x2APIC mode.
    NotX2Apic { msr: u32 },
    /// No register at this MSR in x2APIC mode (reserved, DFR, ICR high,
    /// APR, RRD, CMCI).
    NoSuchRegister { msr: u32 },
    /// WRMSR to a read-only register.
    ReadOnly { msr: u32 },
    /// RDMSR of a write-only register (EOI, SELF IPI).
    WriteOnly { msr: u32 },
    /// WRMSR with reserved bits set (SDM 11.12.1.3).
    ReservedBits { msr: u32, value: u64 },
    /// An `IA32_APIC_BASE` value with reserved bits set, the invalid
    /// EN=0/EXTD=1 combination, or an illegal transition (x2APIC to xAPIC,
    /// disabled to x2APIC).
    BaseMsr { from: ApicMode, value: u64 },
    /// A saved state that no guest could have produced.
    InvalidState(&'static str),
}

impl fmt::Display for ApicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotX2Apic { msr } => {
                write!(f, "x2APIC MSR {msr:#x} accessed while not in x2APIC mode")
            }
            Self::NoSuchRegister { msr } => write!(f, "no x2APIC register at MSR {msr:#x}"),
            Self::ReadOnly { msr } => write!(f, "write to read-only x2APIC MSR {msr:#x}"),
            Self::WriteOnly { msr } => write!(f, "read of write-only x2APIC MSR {msr:#x}"),
            Self::ReservedBits { msr, value } => {
                write!(
                    f,
                    "reserved bits set writing {value:#x} to x2APIC MSR {msr:#x}"
                )
            }
            Self::BaseMsr { from, value } => {
                write!(
                    f,
                    "IA32_APIC_BASE write {value:#x} refused in {from:?} mode"
                )
            }
            Self::InvalidState(why) => write!(f, "invalid local APIC state: {why}"),
        }
    }
}

/// What a register write asks of the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApicEffects {
    /// IPIs to route (at most one per ICR write). A message aimed only at
    /// this APIC (self shorthand, or its own physical ID) has already been
    /// accepted and is not listed.
    pub ipis: Vec<ApicMessage>,
    /// The messages in `ipis` come from the "all excluding self" shorthand:
    /// route them to every APIC but this one.
    pub exclude_self: bool,
    /// The vector an EOI retired, if it was level-triggered (its TMR bit
    /// set): broadcast it to the I/O APIC.
    pub eoi: Option<u8>,
    /// The timer was reprogrammed: ask [`LocalApic::next_timer_event`] again.
    pub timer_changed: bool,
}

/// Every register and the timer's progress: what migration saves. PPR is
/// not stored (it is computed from TPR and ISR), nor is anything fixed at
/// creation (initial APIC ID, TSC frequency, MAXPHYADDR).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LapicState {
    /// `IA32_APIC_BASE`.
    pub apic_base: u64,
    /// The APIC ID: the 8-bit xAPIC ID (bits 31:24 of the register) in
    /// xAPIC mode, the 32-bit x2APIC ID in x2APIC mode.
    pub id: u32,
    pub tpr: u8,
    /// Register value (xAPIC bits 31:24, or the x2APIC cluster/mask form).
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    /// What ESR reads: the errors latched by the last ESR write.
    pub esr: u32,
    /// Errors seen since the last ESR write.
    pub esr_pending: u32,
    /// ICR as the x2APIC 64-bit register (xAPIC: low = 300H, high = 310H).
    pub icr: u64,
    /// Timer, thermal, performance, LINT0, LINT1, error.
    pub lvt: [u32; LVT_COUNT],
    pub timer_initial: u32,
    pub timer_divide: u32,
    /// A counting timer (one-shot or periodic) is running.
    pub timer_armed: bool,
    /// The current count was `timer_anchor_count` at `timer_anchor` ...
    pub timer_anchor: Nanos,
    pub timer_anchor_count: u32,
    /// ... and the next expiry is at `timer_next`.
    pub timer_next: Nanos,
    /// `IA32_TSC_DEADLINE` (0: disarmed).
    pub tsc_deadline: u64,
    pub nmi_pending: bool,
    pub extint_pending: bool,
    pub init_pending: bool,
    pub sipi_vector: Option<u8>,
    /// Last level seen on LINT0 and LINT1 (for edge detection).
    pub lint_level: [bool; 2],
}

/// One vCPU's local APIC.
#[derive(Clone, Debug)]
pub struct LocalApic {
    s: LapicState,
    /// The hardware-assigned (initial) APIC ID; the x2APIC ID.
    initial_id: u32,
    tsc_hz: u64,
    /// Guest MAXPHYADDR: base-address bits at and above it are reserved.
    phys_addr_bits: u8,
}

/// A register of the APIC's 256-entry index space (MMIO offset >> 4, or
/// MSR - 800H).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Rrd,
    Ldr,
    Dfr,
    Svr,
    Isr(usize),
    Tmr(usize),
    Irr(usize),
    Esr,
    IcrLow,
    IcrHigh,
    Lvt(usize),
    TimerInitial,
    TimerCurrent,
    TimerDivide,
    SelfIpi,
}

impl Reg {
    fn decode(index: u32) -> Option<Self> {
        Some(match index {
            0x02 => Self::Id,
            0x03 => Self::Version,
            0x08 => Self::Tpr,
            0x09 => Self::Apr,
            0x0A => Self::Ppr,
            0x0B => Self::Eoi,
            0x0C => Self::Rrd,
            0x0D => Self::Ldr,
            0x0E => Self::Dfr,
            0x0F => Self::Svr,
            0x10..=0x17 => Self::Isr((index - 0x10) as usize),
            0x18..=0x1F => Self::Tmr((index - 0x18) as usize),
            0x20..=0x27 => Self::Irr((index - 0x20) as usize),
            0x28 => Self::Esr,
            0x30 => Self::IcrLow,
            0x31 => Self::IcrHigh,
            0x32..=0x37 => Self::Lvt((index - 0x32) as usize),
            0x38 => Self::TimerInitial,
            0x39 => Self::TimerCurrent,
            0x3E => Self::TimerDivide,
            0x3F => Self::SelfIpi,
            _ => return None,
        })
    }

    /// Whether the register exists in xAPIC (MMIO) or x2APIC (MSR) mode
    /// (SDM Table 11-1 and 11-6).
    fn exists_in(self, x2apic: bool) -> bool {
        match self {
            Self::Apr | Self::Rrd | Self::Dfr | Self::IcrHigh => !x2apic,
            Self::SelfIpi => x2apic,
            _ => true,
        }
    }

    /// x2APIC: bits a WRMSR may set; `None` for read-only registers.
    fn x2apic_writable(self) -> Option<u64> {
        Some(match self {
            Self::Tpr => 0xFF,
            Self::Eoi | Self::Esr => 0,
            Self::Svr => u64::from(SVR_WRITABLE),
            Self::IcrLow => ICR_X2APIC_WRITABLE,
            Self::Lvt(i) => u64::from(LVT_WRITABLE[i] | LVT_READ_ONLY[i]),
            Self::TimerInitial => 0xFFFF_FFFF,
            Self::TimerDivide => u64::from(DIVIDE_WRITABLE),
            Self::SelfIpi => 0xFF,
            _ => return None,
        })
    }
}

fn bit_test(bits: &[u32; 8], v: u8) -> bool {
    bits[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bit_set(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] |= 1 << (v & 31);
}

fn bit_clear(bits: &mut [u32; 8], v: u8) {
    bits[usize::from(v >> 5)] &= !(1 << (v & 31));
}

/// The highest vector whose bit is set.
fn highest(bits: &[u32; 8]) -> Option<u8> {
    (0..8usize)
        .rev()
        .find(|&i| bits[i] != 0)
        .map(|i| (i as u8) * 32 + (31 - bits[i].leading_zeros() as u8))
}

/// The x2APIC logical ID derived from the x2APIC ID (SDM 11.12.10.2):
/// cluster in bits 31:16, one bit of the 16-bit mask in 15:0.
fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

impl LocalApic {
    /// An APIC after power-up RESET: xAPIC mode at 0xFEE00000, marked as the
    /// bootstrap processor's, software-disabled, every LVT entry masked.
    /// `tsc_hz` is the guest TSC frequency (for TSC-deadline mode).
    pub fn new(apic_id: u32, tsc_hz: u64) -> Self {
        let mut apic = Self {
            s: LapicState {
                apic_base: BASE_BSP,
                ..LapicState::default()
            },
            initial_id: apic_id,
            tsc_hz,
            phys_addr_bits: 52,
        };
        apic.reset();
        apic
    }

    /// Sets the guest's MAXPHYADDR (CPUID 80000008H:EAX[7:0]); base
    /// addresses at or above it are reserved. Default 52, the architectural
    /// maximum. Values outside 32..=52 are clamped.
    pub fn set_phys_addr_bits(&mut self, bits: u8) {
        self.phys_addr_bits = bits.clamp(32, 52);
    }

    /// Sets or clears the BSP flag of `IA32_APIC_BASE` (set by `new`); the
    /// guest cannot change it.
    pub fn set_bsp(&mut self, bsp: bool) {
        if bsp {
            self.s.apic_base |= BASE_BSP;
        } else {
            self.s.apic_base &= !BASE_BSP;
        }
    }

    /// Power-up RESET (SDM 11.12.5.1): xAPIC mode at the default base,
    /// the ID back to the initial APIC ID, every other register initialised.
    /// The BSP flag is kept.
    pub fn reset(&mut self) {
        let bsp = self.s.apic_base & BASE_BSP;
        self.s.apic_base = DEFAULT_APIC_BASE | BASE_EN | bsp;
        self.s.id = self.initial_id & 0xFF;
        self.init_registers();
    }

    /// An INIT (SDM 11.12.5.1): the mode and the ID are kept, every other
    /// register is initialised.
    pub fn init(&mut self) {
        self.init_registers();
    }

    /// Every register but `IA32_APIC_BASE` and the ID to its reset value.
    fn init_registers(&mut self) {
        let x2 = self.mode() == ApicMode::X2Apic;
        let s = &mut self.s;
        s.tpr = 0;
        s.ldr = if x2 { x2apic_ldr(s.id) } else { 0 };
        s.dfr = 0xFFFF_FFFF;
        s.svr = 0xFF;
        s.isr = [0; 8];
        s.tmr = [0; 8];
        s.irr = [0; 8];
        s.esr = 0;
        s.esr_pending = 0;
        s.icr = 0;
        s.lvt = [LVT_MASKED; LVT_COUNT];
        s.timer_initial = 0;
        s.timer_divide = 0;
        s.timer_armed = false;
        s.timer_anchor = 0;
        s.timer_anchor_count = 0;
        s.timer_next = 0;
        s.tsc_deadline = 0;
        s.nmi_pending = false;
        s.extint_pending = false;
        s.init_pending = false;
        s.sipi_vector = None;
        s.lint_level = [false; 2];
    }

    // ---- IA32_APIC_BASE ----------------------------------------------

    /// `IA32_APIC_BASE` as RDMSR reads it.
    pub fn base_msr(&self) -> u64 {
        self.s.apic_base
    }

    fn base_reserved(&self) -> u64 {
        BASE_RESERVED_LOW | (u64::MAX << self.phys_addr_bits)
    }

    /// WRMSR to `IA32_APIC_BASE` (SDM 11.4.4, 11.12.5). Refused (#GP, state
    /// unchanged): reserved bits, EN=0 with EXTD=1, x2APIC to xAPIC,
    /// disabled to x2APIC. Going to disabled initialises every register but
    /// the ID; xAPIC to x2APIC sets the x2APIC ID and logical ID. The BSP
    /// bit is read-only (the written value is ignored). A new base address
    /// is stored: the caller moves the MMIO page to [`Self::mmio_base`].
    pub fn set_base_msr(&mut self, value: u64) -> Result<(), ApicError> {
        let from = self.mode();
        let err = ApicError::BaseMsr { from, value };
        if value & self.base_reserved() != 0 {
            return Err(err);
        }
        let to = match (value & BASE_EN != 0, value & BASE_EXTD != 0) {
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            (false, true) => return Err(err),
        };
        match (from, to) {
            (ApicMode::X2Apic, ApicMode::XApic) | (ApicMode::Disabled, ApicMode::X2Apic) => {
                return Err(err)
            }
            _ => {}
        }
        self.s.apic_base = (value & !BASE_BSP) | (self.s.apic_base & BASE_BSP);
        match (from, to) {
            (ApicMode::XApic | ApicMode::X2Apic, ApicMode::Disabled) => self.init_registers(),
            (ApicMode::Disabled, ApicMode::XApic) => self.s.id &= 0xFF,
            (ApicMode::XApic, ApicMode::X2Apic) => {
                self.s.id = self.initial_id;
                self.s.ldr = x2apic_ldr(self.initial_id);
                self.s.dfr = 0xFFFF_FFFF;
            }
            _ => {}
        }
        Ok(())
    }

    /// The mode `IA32_APIC_BASE` selects.
    pub fn mode(&self) -> ApicMode {
        match (
            self.s.apic_base & BASE_EN != 0,
            self.s.apic_base & BASE_EXTD != 0,
        ) {
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
            _ => ApicMode::Disabled,
        }
    }

    /// Where the xAPIC page is mapped; `None` when the MMIO interface is
    /// off (APIC disabled or in x2APIC mode).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.s.apic_base & BASE_ADDR_MASK)
    }

    fn sw_enabled(&self) -> bool {
        self.s.svr & SVR_ENABLE != 0
    }

    // ---- Register access ---------------------------------------------

    /// A read of the xAPIC page at `offset`. Only aligned 32-bit reads at
    /// 16-byte-aligned offsets below 1000H are decoded; others, and any
    /// read outside xAPIC mode, return 0. A reserved register reads 0 and
    /// sets the ESR's illegal-register-address bit.
    pub fn mmio_read(&mut self, offset: u64, size: u8, now: Nanos) -> u32 {
        let Some(reg) = self.mmio_decode(offset, size) else {
            return 0;
        };
        // In xAPIC mode ICR reads as its two 32-bit halves.
        match reg {
            Reg::IcrLow => self.s.icr as u32 & ICR_LOW_WRITABLE as u32,
            Reg::IcrHigh => (self.s.icr >> 32) as u32,
            _ => self.read_reg(reg, now) as u32,
        }
    }

    /// A write to the xAPIC page at `offset`; the decoding rules are
    /// [`Self::mmio_read`]'s. Writes to read-only registers are ignored.
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u32, now: Nanos) -> ApicEffects {
        let mut fx = ApicEffects::default();
        let Some(reg) = self.mmio_decode(offset, size) else {
            return fx;
        };
        let value = u64::from(value);
        match reg {
            Reg::IcrLow => {
                self.s.icr = (self.s.icr & !0xFFFF_FFFF) | (value & ICR_LOW_WRITABLE);
                self.send_icr(&mut fx);
            }
            Reg::IcrHigh => {
                self.s.icr = (self.s.icr & 0xFFFF_FFFF) | ((value << 32) & ICR_XAPIC_DEST);
            }
            _ => self.write_reg(reg, value, now, &mut fx),
        }
        fx
    }

    /// The register an MMIO access names, or `None` (access ignored).
    fn mmio_decode(&mut self, offset: u64, size: u8) -> Option<Reg> {
        if self.mode() != ApicMode::XApic || size != 4 || offset & 0xF != 0 || offset >= 0x1000 {
            return None;
        }
        let reg = Reg::decode((offset >> 4) as u32).filter(|r| r.exists_in(false));
        if reg.is_none() {
            self.report_error(ESR_ILLEGAL_REGISTER);
        }
        reg
    }

    /// RDMSR of an x2APIC register (800H-8FFH) (SDM 11.12.1.2). Errors:
    /// not in x2APIC mode, no such register, a write-only register.
    pub fn msr_read(&mut self, msr: u32, now: Nanos) -> Result<u64, ApicError> {
        let reg = self.msr_decode(msr)?;
        match reg {
            Reg::Eoi | Reg::SelfIpi => Err(ApicError::WriteOnly { msr }),
            _ => Ok(self.read_reg(reg, now)),
        }
    }

    /// WRMSR to an x2APIC register. Errors: not in x2APIC mode, no such
    /// register, a read-only register, reserved bits set (bits 63:32 of
    /// everything but ICR, a non-zero EOI or ESR write).
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now: Nanos,
    ) -> Result<ApicEffects, ApicError> {
        let reg = self.msr_decode(msr)?;
        let writable = reg.x2apic_writable().ok_or(ApicError::ReadOnly { msr })?;
        if value & !writable != 0 {
            return Err(ApicError::ReservedBits { msr, value });
        }
        let mut fx = ApicEffects::default();
        match reg {
            Reg::IcrLow => {
                self.s.icr = value;
                self.send_icr(&mut fx);
            }
            _ => self.write_reg(reg, value, now, &mut fx),
        }
        Ok(fx)
    }

    fn msr_decode(&self, msr: u32) -> Result<Reg, ApicError> {
        if !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(ApicError::NoSuchRegister { msr });
        }
        if self.mode() != ApicMode::X2Apic {
            return Err(ApicError::NotX2Apic { msr });
        }
        Reg::decode(msr - MSR_X2APIC_FIRST)
            .filter(|r| r.exists_in(true))
            .ok_or(ApicError::NoSuchRegister { msr })
    }

    /// A register's value in the current mode (ICR: the x2APIC form).
    fn read_reg(&self, reg: Reg, now: Nanos) -> u64 {
        let s = &self.s;
        let x2 = self.mode() == ApicMode::X2Apic;
        u64::from(match reg {
            Reg::Id if x2 => s.id,
            Reg::Id => s.id << XAPIC_ID_SHIFT,
            Reg::Version => VERSION,
            Reg::Tpr => u32::from(s.tpr),
            Reg::Ppr => u32::from(self.ppr()),
            Reg::Apr | Reg::Rrd | Reg::Eoi | Reg::SelfIpi => 0,
            Reg::Ldr => s.ldr,
            Reg::Dfr => s.dfr | !DFR_MODEL_MASK,
            Reg::Svr => s.svr,
            Reg::Isr(i) => s.isr[i],
            Reg::Tmr(i) => s.tmr[i],
            Reg::Irr(i) => s.irr[i],
            Reg::Esr => s.esr,
            Reg::IcrLow => return s.icr,
            Reg::IcrHigh => (s.icr >> 32) as u32,
            Reg::Lvt(i) => s.lvt[i],
            Reg::TimerInitial => s.timer_initial,
            Reg::TimerCurrent => self.current_count(now),
            Reg::TimerDivide => s.timer_divide,
        })
    }

    /// A write of everything but ICR (whose halves differ by mode). Writes
    /// to read-only registers do nothing.
    fn write_reg(&mut self, reg: Reg, value: u64, now: Nanos, fx: &mut ApicEffects) {
        let v = value as u32;
        match reg {
            // xAPIC only: x2APIC refuses the write before this.
            Reg::Id => self.s.id = v >> XAPIC_ID_SHIFT,
            Reg::Tpr => self.s.tpr = v as u8,
            Reg::Eoi => self.eoi(fx),
            Reg::Ldr => self.s.ldr = v & LDR_XAPIC_MASK,
            Reg::Dfr => self.s.dfr = (v & DFR_MODEL_MASK) | !DFR_MODEL_MASK,
            Reg::Svr => {
                self.s.svr = v & SVR_WRITABLE;
                if !self.sw_enabled() {
                    for lvt in &mut self.s.lvt {
                        *lvt |= LVT_MASKED;
                    }
                    fx.timer_changed = true;
                }
            }
            Reg::Esr => {
                self.s.esr = self.s.esr_pending;
                self.s.esr_pending = 0;
            }
            Reg::Lvt(i) => self.write_lvt(i, v, now, fx),
            Reg::TimerInitial => {
                self.catch_up(now);
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.s.timer_initial = v;
                    self.start_counting(now);
                    fx.timer_changed = true;
                }
            }
            Reg::TimerDivide => {
                self.catch_up(now);
                let count = self.current_count(now);
                self.s.timer_divide = v & DIVIDE_WRITABLE;
                if self.s.timer_armed {
                    // Count on from here at the new rate (the fraction of
                    // a tick already elapsed is dropped).
                    self.rebase(now, count);
                }
                fx.timer_changed = true;
            }
            Reg::SelfIpi => self.send(DeliveryMode::Fixed, v as u8, None, fx),
            Reg::IcrLow | Reg::IcrHigh => {}
            Reg::Version
            | Reg::Apr
            | Reg::Ppr
            | Reg::Rrd
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::TimerCurrent => {}
        }
    }

    fn write_lvt(&mut self, i: usize, value: u32, now: Nanos, fx: &mut ApicEffects) {
        let mut v = value & LVT_WRITABLE[i];
        if !self.sw_enabled() {
            v |= LVT_MASKED;
        }
        if i != LVT_TIMER {
            self.s.lvt[i] = v;
            return;
        }
        self.catch_up(now);
        let old = self.timer_mode();
        let count = self.current_count(now);
        self.s.lvt[LVT_TIMER] = v;
        let new = self.timer_mode();
        fx.timer_changed = true;
        if old == new {
            return;
        }
        if old == TimerMode::TscDeadline || new == TimerMode::TscDeadline {
            // SDM 11.5.4.1: a switch to or from TSC-deadline mode disarms
            // the timer.
            self.s.timer_armed = false;
            self.s.timer_initial = 0;
            self.s.tsc_deadline = 0;
        } else if new == TimerMode::OneShot && self.s.timer_armed {
            // Periodic to one-shot: the count runs out once more.
            self.rebase(now, count);
        }
        // One-shot to periodic: the running count reloads when it ends.
    }

    // ---- Priorities, acceptance, delivery ----------------------------

    /// The task-priority register (CR8 is TPR[7:4]).
    pub fn tpr(&self) -> u8 {
        self.s.tpr
    }

    /// Sets TPR (a CR8 write: `cr8 << 4`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.s.tpr = tpr;
    }

    /// The processor-priority register (SDM 11.8.3.1): TPR if its class is
    /// at least the highest in-service class, otherwise that class.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.s.isr).unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 {
            self.s.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// Whether a message with this destination is for this APIC (SDM
    /// 11.6.2). xAPIC: physical ID or broadcast 0xFF; logical flat
    /// (DFR 1111b: any common bit with LDR[31:24]) or cluster (DFR 0000b:
    /// same cluster in bits 7:4 and a common bit in 3:0). x2APIC: physical
    /// 32-bit ID or 0xFFFFFFFF; logical cluster (bits 31:16) and mask
    /// (15:0). A disabled APIC matches nothing.
    pub fn matches(&self, dest: u32, logical: bool) -> bool {
        match self.mode() {
            ApicMode::Disabled => false,
            ApicMode::XApic => {
                if dest == XAPIC_BROADCAST || dest == X2APIC_BROADCAST {
                    return true;
                }
                if !logical {
                    return dest == self.s.id;
                }
                if dest > 0xFF {
                    return false;
                }
                let d = dest as u8;
                let ldr = (self.s.ldr >> 24) as u8;
                match self.s.dfr >> 28 {
                    DFR_FLAT => d & ldr != 0,
                    DFR_CLUSTER => d >> 4 == ldr >> 4 && d & ldr & 0xF != 0,
                    _ => false,
                }
            }
            ApicMode::X2Apic => {
                if dest == X2APIC_BROADCAST {
                    return true;
                }
                if !logical {
                    return dest == self.s.id;
                }
                dest >> 16 == self.s.ldr >> 16 && dest & self.s.ldr & 0xFFFF != 0
            }
        }
    }

    /// Accepts a message routed to this APIC (the caller checked
    /// [`Self::matches`]). Fixed and lowest-priority: IRR (and TMR if
    /// level-triggered, cleared if edge); a vector below 16 is refused and
    /// sets the ESR's receive-illegal-vector bit. NMI, ExtINT, INIT and
    /// start-up are recorded for the vCPU to take; SMI is not modelled.
    /// Returns whether the message was accepted. A disabled APIC accepts
    /// nothing; a software-disabled one holds fixed interrupts in IRR.
    pub fn accept(&mut self, msg: &ApicMessage) -> bool {
        if self.mode() == ApicMode::Disabled {
            return false;
        }
        match msg.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_fixed(msg.vector, msg.level)
            }
            DeliveryMode::Nmi => {
                self.s.nmi_pending = true;
                true
            }
            DeliveryMode::ExtInt => {
                self.s.extint_pending = true;
                true
            }
            DeliveryMode::Init => {
                self.s.init_pending = true;
                true
            }
            DeliveryMode::StartUp => {
                self.s.sipi_vector = Some(msg.vector);
                true
            }
            DeliveryMode::Smi => false,
        }
    }

    fn accept_fixed(&mut self, vector: u8, level: bool) -> bool {
        if vector < 16 {
            self.report_error(ESR_RECV_ILLEGAL_VECTOR);
            return false;
        }
        bit_set(&mut self.s.irr, vector);
        if level {
            bit_set(&mut self.s.tmr, vector);
        } else {
            bit_clear(&mut self.s.tmr, vector);
        }
        true
    }

    /// Records an error in the ESR and raises the LVT error interrupt if it
    /// is unmasked (an illegal error vector only records another error).
    fn report_error(&mut self, bits: u32) {
        self.s.esr_pending |= bits;
        let lvt = self.s.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 {
            let vector = lvt as u8;
            if vector >= 16 {
                self.accept_fixed(vector, false);
            } else {
                self.s.esr_pending |= ESR_RECV_ILLEGAL_VECTOR;
            }
        }
    }

    /// The vector to inject now: the highest IRR vector whose priority class
    /// is above PPR's, if the APIC is enabled in both senses.
    pub fn pending_vector(&self) -> Option<u8> {
        if self.mode() == ApicMode::Disabled || !self.sw_enabled() {
            return None;
        }
        let v = highest(&self.s.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The CPU took `vector` (the vector [`Self::pending_vector`] gave):
    /// IRR to ISR, which raises PPR. A vector not in IRR is ignored.
    pub fn acknowledge(&mut self, vector: u8) {
        if bit_test(&self.s.irr, vector) {
            bit_clear(&mut self.s.irr, vector);
            bit_set(&mut self.s.isr, vector);
        }
    }

    /// EOI: retires the highest in-service vector.
    fn eoi(&mut self, fx: &mut ApicEffects) {
        if let Some(v) = highest(&self.s.isr) {
            bit_clear(&mut self.s.isr, v);
            if bit_test(&self.s.tmr, v) {
                fx.eoi = Some(v);
            }
        }
    }

    /// Whether an NMI is waiting for the CPU.
    pub fn nmi_pending(&self) -> bool {
        self.s.nmi_pending
    }

    /// Takes a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.s.nmi_pending)
    }

    /// Whether an ExtINT message (from an I/O APIC pin or an MSI) waits.
    pub fn extint_pending(&self) -> bool {
        self.s.extint_pending
    }

    /// Takes a pending ExtINT message (the vector then comes from the PIC).
    pub fn take_extint(&mut self) -> bool {
        core::mem::take(&mut self.s.extint_pending)
    }

    /// Takes a pending INIT.
    pub fn take_init(&mut self) -> bool {
        core::mem::take(&mut self.s.init_pending)
    }

    /// Takes the vector of a pending start-up IPI.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.s.sipi_vector.take()
    }

    /// LINT0 unmasked in ExtINT mode even while the APIC is software
    /// disabled, as QEMU resets the BSP's APIC (firmware's virtual-wire
    /// mode): PIC interrupts reach a CPU whose guest never touched its APIC.
    pub fn virtual_wire(&mut self) {
        self.s.lvt[LVT_LINT0] = u32::from(DeliveryMode::ExtInt.bits()) << 8;
    }

    /// Whether the PIC's INTR output reaches the CPU: LINT0 unmasked in
    /// ExtINT mode ("virtual wire"), or the APIC globally disabled. The
    /// caller then takes the vector from the PIC.
    pub fn lint0_extint(&self) -> bool {
        if self.mode() == ApicMode::Disabled {
            return true;
        }
        let lvt = self.s.lvt[LVT_LINT0];
        lvt & LVT_MASKED == 0
            && DeliveryMode::from_bits((lvt >> 8) as u8) == Some(DeliveryMode::ExtInt)
    }

    /// The level of LINT`n` (0 or 1) changed. A rising edge on an unmasked
    /// entry delivers its NMI or fixed vector (edge semantics whatever the
    /// trigger bit says; ExtINT is [`Self::lint0_extint`]'s business).
    pub fn set_lint(&mut self, n: u8, level: bool) {
        let (slot, entry) = match n {
            0 => (0, LVT_LINT0),
            1 => (1, LVT_LINT1),
            _ => return,
        };
        let rising = level && !self.s.lint_level[slot];
        self.s.lint_level[slot] = level;
        let lvt = self.s.lvt[entry];
        if !rising || self.mode() == ApicMode::Disabled || lvt & LVT_MASKED != 0 {
            return;
        }
        match DeliveryMode::from_bits((lvt >> 8) as u8) {
            Some(DeliveryMode::Nmi) => self.s.nmi_pending = true,
            Some(DeliveryMode::Fixed) => {
                self.accept_fixed(lvt as u8, false);
            }
            _ => {}
        }
    }

    // ---- IPIs --------------------------------------------------------

    /// Sends what ICR describes (SDM 11.6.1).
    fn send_icr(&mut self, fx: &mut ApicEffects) {
        let low = self.s.icr as u32;
        let Some(delivery) = DeliveryMode::from_bits((low >> 8) as u8) else {
            return; // reserved delivery mode: nothing is sent
        };
        // INIT level de-assert only synchronises arbitration IDs; modern
        // processors ignore it (SDM 11.6.1).
        if delivery == DeliveryMode::Init
            && low & ICR_TRIGGER_LEVEL != 0
            && low & ICR_LEVEL_ASSERT == 0
        {
            return;
        }
        let dest = if self.mode() == ApicMode::X2Apic {
            (self.s.icr >> 32) as u32
        } else {
            (self.s.icr >> 56) as u32
        };
        let logical = low & ICR_DEST_LOGICAL != 0;
        let target = match (low >> 18) & 3 {
            0 => Some((dest, logical)),
            1 => None,
            shorthand => {
                fx.exclude_self = shorthand == 3;
                Some((self.broadcast(), false))
            }
        };
        self.send(delivery, low as u8, target, fx);
    }

    fn broadcast(&self) -> u32 {
        if self.mode() == ApicMode::X2Apic {
            X2APIC_BROADCAST
        } else {
            XAPIC_BROADCAST
        }
    }

    /// Sends an IPI to `target` (`None`: to self only). Messages for this
    /// APIC's own physical ID are accepted here; the rest go to the caller.
    /// The trigger mode of an IPI is always edge (SDM: the ICR trigger bit
    /// only qualifies INIT level de-assert).
    fn send(
        &mut self,
        delivery: DeliveryMode,
        vector: u8,
        target: Option<(u32, bool)>,
        fx: &mut ApicEffects,
    ) {
        if matches!(delivery, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.report_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        let own = self.s.id;
        let (dest, logical) = target.unwrap_or((own, false));
        let msg = ApicMessage {
            vector,
            delivery,
            level: false,
            dest,
            logical,
        };
        let only_self = target.is_none() || (!logical && dest == own && dest != self.broadcast());
        if only_self {
            self.accept(&msg);
        } else {
            fx.ipis.push(msg);
        }
    }

    // ---- Timer -------------------------------------------------------

    /// The LVT timer mode.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.s.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// The divide configuration's divisor (SDM Figure 11-10): bits 3,1:0
    /// = 000b..110b divide by 2..128, 111b by 1.
    fn divisor(&self) -> u64 {
        let d = self.s.timer_divide;
        let code = (d & 3) | ((d >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// Nanoseconds per count at the current divisor.
    fn tick_ns(&self) -> u64 {
        NS_PER_TICK * self.divisor()
    }

    /// (Re)starts the count from the initial count at `now`; 0 stops it.
    fn start_counting(&mut self, now: Nanos) {
        let initial = self.s.timer_initial;
        self.s.timer_armed = initial != 0;
        self.rebase(now, initial);
    }

    /// The count reads `count` at `now` and runs on from there.
    fn rebase(&mut self, now: Nanos, count: u32) {
        self.s.timer_anchor = now;
        self.s.timer_anchor_count = count;
        self.s.timer_next = now.saturating_add(u64::from(count) * self.tick_ns());
        if count == 0 {
            self.s.timer_armed = false;
        }
    }

    /// The current-count register: counts down from the anchor, then for
    /// periodic reloads the initial count at every expiry. 0 once a
    /// one-shot count ran out, when stopped, and in TSC-deadline mode.
    fn current_count(&self, now: Nanos) -> u32 {
        let s = &self.s;
        let mode = self.timer_mode();
        if !s.timer_armed || mode == TimerMode::TscDeadline {
            return 0;
        }
        let ticks = now.saturating_sub(s.timer_anchor) / self.tick_ns();
        let first = u64::from(s.timer_anchor_count);
        if ticks < first {
            return (first - ticks) as u32;
        }
        let initial = u64::from(s.timer_initial);
        match mode {
            TimerMode::Periodic if initial != 0 => (initial - (ticks - first) % initial) as u32,
            _ => 0,
        }
    }

    /// Fires a counting timer whose expiry has passed: at most one interrupt
    /// however many periods went by, and the next expiry computed from the
    /// anchor (no drift, no loop).
    fn catch_up(&mut self, now: Nanos) {
        if !self.s.timer_armed
            || now < self.s.timer_next
            || self.timer_mode() == TimerMode::TscDeadline
        {
            return;
        }
        let tick = self.tick_ns();
        let period = u64::from(self.s.timer_initial) * tick;
        if self.timer_mode() == TimerMode::Periodic && period != 0 {
            let first = self
                .s
                .timer_anchor
                .saturating_add(u64::from(self.s.timer_anchor_count) * tick);
            let periods = now.saturating_sub(first) / period;
            self.s.timer_next =
                first.saturating_add(periods.saturating_add(1).saturating_mul(period));
        } else {
            self.s.timer_armed = false;
        }
        self.fire_timer();
    }

    /// The timer expired: raise its vector unless the entry is masked.
    fn fire_timer(&mut self) {
        let lvt = self.s.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.accept_fixed(lvt as u8, false);
        }
    }

    /// Raises the timer interrupt if it is due at `now` (guest TSC
    /// `guest_tsc` for TSC-deadline mode). A masked one-shot still expires;
    /// a periodic timer raises at most one interrupt per call.
    pub fn poll_timer(&mut self, now: Nanos, guest_tsc: u64) {
        if self.mode() == ApicMode::Disabled {
            return;
        }
        if self.timer_mode() == TimerMode::TscDeadline {
            let deadline = self.s.tsc_deadline;
            if deadline != 0 && guest_tsc >= deadline {
                self.s.tsc_deadline = 0;
                self.fire_timer();
            }
        } else {
            self.catch_up(now);
        }
    }

    /// When the timer will next raise an interrupt (not before `now`), for
    /// a halted vCPU; `None` if it never will: stopped, masked (a masked
    /// timer's expiry changes nothing a poll could not compute later), or
    /// TSC-deadline with an unknown (0) TSC frequency.
    pub fn next_timer_event(&self, now: Nanos, guest_tsc: u64) -> Option<Nanos> {
        if self.mode() == ApicMode::Disabled || self.s.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        if self.timer_mode() == TimerMode::TscDeadline {
            let deadline = self.s.tsc_deadline;
            if deadline == 0 {
                return None;
            }
            if guest_tsc >= deadline {
                return Some(now);
            }
            if self.tsc_hz == 0 {
                return None;
            }
            let delta = u128::from(deadline - guest_tsc);
            let hz = u128::from(self.tsc_hz);
            let ns = (delta * 1_000_000_000).div_ceil(hz);
            return Some(now.saturating_add(u64::try_from(ns).unwrap_or(u64::MAX)));
        }
        self.s.timer_armed.then_some(self.s.timer_next.max(now))
    }

    /// WRMSR `IA32_TSC_DEADLINE`. Ignored unless the LVT timer is in
    /// TSC-deadline mode (SDM 11.5.4.1); 0 disarms. A deadline already
    /// reached (`guest_tsc_now >= tsc`) fires at once. `_now` is unused: the
    /// deadline is kept in TSC units and compared with the guest TSC.
    pub fn tsc_deadline_write(&mut self, tsc: u64, _now: Nanos, guest_tsc_now: u64) {
        if self.mode() == ApicMode::Disabled || self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.s.tsc_deadline = tsc;
        if tsc != 0 && guest_tsc_now >= tsc {
            self.s.tsc_deadline = 0;
            self.fire_timer();
        }
    }

    /// RDMSR `IA32_TSC_DEADLINE`: the armed deadline, 0 when disarmed, fired
    /// or not in TSC-deadline mode.
    pub fn tsc_deadline_read(&self) -> u64 {
        if self.mode() == ApicMode::Disabled || self.timer_mode() != TimerMode::TscDeadline {
            return 0;
        }
        self.s.tsc_deadline
    }

    // ---- Migration ---------------------------------------------------

    /// Every register and the timer's progress.
    pub fn save(&self) -> LapicState {
        self.s.clone()
    }

    /// Loads a saved state after checking it is one a guest could have
    /// produced; on error nothing changes.
    pub fn load(&mut self, s: &LapicState) -> Result<(), ApicError> {
        let invalid = ApicError::InvalidState;
        if s.apic_base & self.base_reserved() != 0 {
            return Err(invalid("IA32_APIC_BASE reserved bits set"));
        }
        if s.apic_base & (BASE_EN | BASE_EXTD) == BASE_EXTD {
            return Err(invalid("IA32_APIC_BASE has EXTD without EN"));
        }
        let x2 = s.apic_base & (BASE_EN | BASE_EXTD) == BASE_EN | BASE_EXTD;
        if x2 && (s.id != self.initial_id || s.ldr != x2apic_ldr(self.initial_id)) {
            return Err(invalid("x2APIC ID or logical ID differs from this vCPU's"));
        }
        if !x2 && (s.id > 0xFF || s.ldr & !LDR_XAPIC_MASK != 0) {
            return Err(invalid("xAPIC ID or LDR out of range"));
        }
        if s.dfr | DFR_MODEL_MASK != 0xFFFF_FFFF {
            return Err(invalid("DFR reserved bits clear"));
        }
        if s.svr & !SVR_WRITABLE != 0 {
            return Err(invalid("SVR reserved bits set"));
        }
        if s.icr & !(ICR_X2APIC_WRITABLE) != 0 {
            return Err(invalid("ICR reserved bits set"));
        }
        if s.timer_divide & !DIVIDE_WRITABLE != 0 {
            return Err(invalid("divide configuration reserved bits set"));
        }
        for (i, &lvt) in s.lvt.iter().enumerate() {
            if lvt & !LVT_WRITABLE[i] != 0 {
                return Err(invalid("LVT reserved or read-only bits set"));
            }
            // LINT0/LINT1 may be live on a software-disabled APIC: the PC
            // platform starts with LINT0 as the PIC's virtual wire.
            let lint = i == 3 || i == 4;
            if s.svr & SVR_ENABLE == 0 && lvt & LVT_MASKED == 0 && !lint {
                return Err(invalid("LVT unmasked while software-disabled"));
            }
        }
        if s.timer_armed && (s.timer_initial == 0 || s.timer_anchor_count == 0) {
            return Err(invalid("timer armed with a zero count"));
        }
        if s.sipi_vector.is_some() && s.apic_base & BASE_EN == 0 {
            return Err(invalid("start-up IPI pending on a disabled APIC"));
        }
        self.s = s.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TSC_HZ: u64 = 2_000_000_000;

    // MMIO offsets used below.
    const ID: u64 = 0x20;
    const VER: u64 = 0x30;
    const TPR: u64 = 0x80;
    const PPR: u64 = 0xA0;
    const EOI: u64 = 0xB0;
    const LDR: u64 = 0xD0;
    const DFR: u64 = 0xE0;
    const SVR: u64 = 0xF0;
    const ISR0: u64 = 0x100;
    const TMR0: u64 = 0x180;
    const IRR0: u64 = 0x200;
    const ESR: u64 = 0x280;
    const ICR_LO: u64 = 0x300;
    const ICR_HI: u64 = 0x310;
    const LVT_T: u64 = 0x320;
    const LVT_L0: u64 = 0x350;
    const LVT_L1: u64 = 0x360;
    const LVT_ERR: u64 = 0x370;
    const TMICT: u64 = 0x380;
    const TMCCT: u64 = 0x390;
    const TDCR: u64 = 0x3E0;

    fn r(a: &mut LocalApic, off: u64) -> u32 {
        a.mmio_read(off, 4, 0)
    }

    fn w(a: &mut LocalApic, off: u64, v: u32) -> ApicEffects {
        a.mmio_write(off, 4, v, 0)
    }

    /// An xAPIC with the software enable bit set (spurious vector 0xFF).
    fn enabled(id: u32) -> LocalApic {
        let mut a = LocalApic::new(id, TSC_HZ);
        w(&mut a, SVR, 0x1FF);
        a
    }

    fn x2apic(id: u32) -> LocalApic {
        let mut a = enabled(id);
        a.set_base_msr(DEFAULT_APIC_BASE | BASE_EN | BASE_EXTD)
            .unwrap();
        a
    }

    fn fixed(vector: u8, level: bool) -> ApicMessage {
        ApicMessage {
            vector,
            delivery: DeliveryMode::Fixed,
            level,
            dest: 0,
            logical: false,
        }
    }

    fn in_irr(a: &LocalApic, v: u8) -> bool {
        bit_test(&a.s.irr, v)
    }

    #[test]
    fn reset_values() {
        let mut a = LocalApic::new(3, TSC_HZ);
        assert_eq!(a.base_msr(), 0xFEE0_0900);
        assert_eq!(a.mode(), ApicMode::XApic);
        assert_eq!(a.mmio_base(), Some(0xFEE0_0000));
        assert_eq!(r(&mut a, ID), 0x0300_0000);
        assert_eq!(r(&mut a, VER), 0x0005_0014);
        assert_eq!(r(&mut a, TPR), 0);
        assert_eq!(r(&mut a, PPR), 0);
        assert_eq!(r(&mut a, LDR), 0);
        assert_eq!(r(&mut a, DFR), 0xFFFF_FFFF);
        assert_eq!(r(&mut a, SVR), 0xFF);
        for off in (0x320..=0x370).step_by(0x10) {
            assert_eq!(r(&mut a, off), 0x0001_0000, "LVT at {off:#x}");
        }
        assert_eq!(r(&mut a, ICR_LO), 0);
        assert_eq!(r(&mut a, TMICT), 0);
        assert_eq!(r(&mut a, TMCCT), 0);
        assert_eq!(r(&mut a, TDCR), 0);
        assert_eq!(a.pending_vector(), None);
        assert!(!a.lint0_extint(), "LINT0 masked after reset");
        assert_eq!(a.next_timer_event(0, 0), None);
        assert_eq!(a.tsc_deadline_read(), 0);
    }

    #[test]
    fn id_ldr_dfr_write_masks() {
        let mut a = enabled(3);
        w(&mut a, ID, 0x0A00_00FF);
        assert_eq!(r(&mut a, ID), 0x0A00_0000);
        assert!(a.matches(0x0A, false));
        assert!(!a.matches(3, false));
        w(&mut a, LDR, 0x1234_5678);
        assert_eq!(r(&mut a, LDR), 0x1200_0000);
        w(&mut a, DFR, 0);
        assert_eq!(r(&mut a, DFR), 0x0FFF_FFFF);
        w(&mut a, TPR, 0x1_23);
        assert_eq!(r(&mut a, TPR), 0x23);
        w(&mut a, SVR, 0xFFFF_FFFF);
        assert_eq!(
            r(&mut a, SVR),
            0x3FF,
            "no EOI-broadcast suppression (bit 12)"
        );
        // Read-only registers ignore writes.
        w(&mut a, VER, 0);
        assert_eq!(r(&mut a, VER), 0x0005_0014);
    }

    #[test]
    fn lvt_write_masks() {
        let mut a = enabled(0);
        // (offset, what an all-ones write reads back)
        let table = [
            (0x320, 0x0007_00FF), // timer: no delivery status
            (0x330, 0x0001_07FF), // thermal
            (0x340, 0x0001_07FF), // performance counters
            (0x350, 0x0001_A7FF), // LINT0: no delivery status, no remote IRR
            (0x360, 0x0001_A7FF), // LINT1
            (0x370, 0x0001_00FF), // error
        ];
        for (off, want) in table {
            w(&mut a, off, 0xFFFF_FFFF);
            assert_eq!(r(&mut a, off), want, "{off:#x}");
            w(&mut a, off, 0);
            assert_eq!(r(&mut a, off), 0, "{off:#x}");
        }
    }

    #[test]
    fn tpr_ppr_isr_priority() {
        let mut a = enabled(0);
        assert!(a.accept(&fixed(0x51, false)));
        assert!(a.accept(&fixed(0x35, false)));
        w(&mut a, TPR, 0x40);
        assert_eq!(r(&mut a, PPR), 0x40);
        assert_eq!(a.pending_vector(), Some(0x51), "class 5 > class 4");
        a.acknowledge(0x51);
        // ISR class 5 above TPR class 4: PPR = 0x50.
        assert_eq!(r(&mut a, PPR), 0x50);
        assert_eq!(r(&mut a, ISR0 + 0x20), 1 << (0x51 - 0x40));
        assert_eq!(a.pending_vector(), None, "0x35: class 3 <= 5");
        // TPR in the same class as ISR wins: PPR = TPR.
        w(&mut a, TPR, 0x58);
        assert_eq!(r(&mut a, PPR), 0x58);
        w(&mut a, TPR, 0x60);
        assert_eq!(r(&mut a, PPR), 0x60);
        w(&mut a, EOI, 0);
        assert_eq!(r(&mut a, PPR), 0x60, "ISR empty: PPR = TPR");
        assert_eq!(a.pending_vector(), None);
        // A vector of exactly PPR's class stays pending.
        w(&mut a, TPR, 0x30);
        assert_eq!(a.pending_vector(), None, "class 3 is not above class 3");
        w(&mut a, TPR, 0x2F);
        assert_eq!(a.pending_vector(), Some(0x35));
        a.set_tpr(0);
        assert_eq!(a.tpr(), 0);
        assert_eq!(a.pending_vector(), Some(0x35));
        // Acknowledging a vector that is not requested changes nothing.
        a.acknowledge(0x99);
        assert_eq!(a.ppr(), 0);
    }

    #[test]
    fn eoi_retires_highest_and_reports_level() {
        let mut a = enabled(0);
        a.accept(&fixed(0x40, true));
        assert_eq!(r(&mut a, TMR0 + 0x20), 1, "level sets TMR bit 0x40");
        a.acknowledge(0x40);
        a.accept(&fixed(0x60, false));
        assert_eq!(a.pending_vector(), Some(0x60));
        a.acknowledge(0x60);
        assert_eq!(r(&mut a, ISR0 + 0x20), 1);
        assert_eq!(r(&mut a, ISR0 + 0x30), 1);
        let fx = w(&mut a, EOI, 0);
        assert_eq!(fx.eoi, None, "0x60 was edge");
        assert_eq!(r(&mut a, ISR0 + 0x30), 0);
        assert_eq!(r(&mut a, ISR0 + 0x20), 1);
        assert_eq!(r(&mut a, PPR), 0x40);
        let fx = w(&mut a, EOI, 0);
        assert_eq!(fx.eoi, Some(0x40));
        assert_eq!(r(&mut a, PPR), 0);
        let fx = w(&mut a, EOI, 0);
        assert_eq!(fx, ApicEffects::default(), "EOI with nothing in service");
        // An edge-triggered acceptance clears the TMR bit again.
        a.accept(&fixed(0x40, false));
        assert_eq!(r(&mut a, TMR0 + 0x20), 0);
    }

    #[test]
    fn divide_encodings() {
        // (divide configuration, divisor)
        let table = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
        ];
        for (dcr, div) in table {
            let mut a = enabled(0);
            a.mmio_write(TDCR, 4, dcr, 0);
            let start = 1_000;
            a.mmio_write(TMICT, 4, 100, start);
            assert_eq!(a.mmio_read(TMCCT, 4, start), 100);
            assert_eq!(
                a.mmio_read(TMCCT, 4, start + div * 37 - 1),
                64,
                "dcr {dcr:#x}"
            );
            assert_eq!(a.mmio_read(TMCCT, 4, start + div * 37), 63, "dcr {dcr:#x}");
            assert_eq!(a.next_timer_event(start, 0), None, "masked");
        }
        let mut a = enabled(0);
        w(&mut a, TDCR, 0xFFFF_FFF4);
        assert_eq!(r(&mut a, TDCR), 0, "only bits 0, 1, 3");
    }

    #[test]
    fn one_shot_counts_fires_once() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x30);
        a.mmio_write(TDCR, 4, 0x3, 0); // divide by 16
        let fx = a.mmio_write(TMICT, 4, 1000, 100);
        assert!(fx.timer_changed);
        assert_eq!(a.mmio_read(TMCCT, 4, 100), 1000);
        // 175 ns = 10 whole ticks of 16 ns.
        assert_eq!(a.mmio_read(TMCCT, 4, 275), 990);
        assert_eq!(a.next_timer_event(100, 0), Some(100 + 16_000));
        assert_eq!(a.mmio_read(TMCCT, 4, 16_099), 1);
        a.poll_timer(16_099, 0);
        assert!(!in_irr(&a, 0x30));
        assert_eq!(a.mmio_read(TMCCT, 4, 16_100), 0);
        a.poll_timer(16_100, 0);
        assert!(in_irr(&a, 0x30));
        assert_eq!(a.pending_vector(), Some(0x30));
        a.acknowledge(0x30);
        w(&mut a, EOI, 0);
        assert_eq!(a.next_timer_event(20_000, 0), None);
        a.poll_timer(1_000_000, 0);
        assert!(!in_irr(&a, 0x30), "one-shot fires once");
        assert_eq!(a.mmio_read(TMCCT, 4, 1_000_000), 0);
        assert_eq!(r(&mut a, TMICT), 1000, "initial count is kept");
        // Writing the initial count restarts; writing 0 stops.
        a.mmio_write(TMICT, 4, 10, 2_000_000);
        assert_eq!(a.mmio_read(TMCCT, 4, 2_000_016), 9);
        a.mmio_write(TMICT, 4, 0, 2_000_032);
        assert_eq!(a.mmio_read(TMCCT, 4, 2_000_032), 0);
        assert_eq!(a.next_timer_event(2_000_032, 0), None);
        a.poll_timer(9_000_000, 0);
        assert!(!in_irr(&a, 0x30));
    }

    #[test]
    fn masked_one_shot_still_expires() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x0001_0030);
        w(&mut a, TDCR, 0xB);
        a.mmio_write(TMICT, 4, 10, 0);
        assert_eq!(a.next_timer_event(0, 0), None);
        a.poll_timer(10, 0);
        assert!(!in_irr(&a, 0x30));
        assert_eq!(a.mmio_read(TMCCT, 4, 10), 0);
        // Unmasking afterwards raises nothing: it already expired.
        a.mmio_write(LVT_T, 4, 0x30, 11);
        a.poll_timer(100, 0);
        assert!(!in_irr(&a, 0x30));
        assert_eq!(a.next_timer_event(100, 0), None);
    }

    #[test]
    fn periodic_reloads_without_drift() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x0002_0031);
        assert_eq!(a.timer_mode(), TimerMode::Periodic);
        w(&mut a, TDCR, 0xB); // divide by 1
        a.mmio_write(TMICT, 4, 50, 1000);
        // 120 ticks: 50 to the first expiry, then 70 % 50 = 20 into the next.
        assert_eq!(a.mmio_read(TMCCT, 4, 1120), 30);
        assert_eq!(a.mmio_read(TMCCT, 4, 1050), 50, "reloaded at expiry");
        a.poll_timer(1049, 0);
        assert!(!in_irr(&a, 0x31));
        a.poll_timer(1050, 0);
        assert!(in_irr(&a, 0x31));
        assert_eq!(a.next_timer_event(1050, 0), Some(1100));
        a.acknowledge(0x31);
        w(&mut a, EOI, 0);
        // A late poll: 207 ns after the first expiry, 4 whole periods.
        a.poll_timer(1257, 0);
        assert!(in_irr(&a, 0x31));
        assert_eq!(a.next_timer_event(1257, 0), Some(1300));
        a.acknowledge(0x31);
        w(&mut a, EOI, 0);
        a.poll_timer(1299, 0);
        assert!(!in_irr(&a, 0x31), "one interrupt per expiry, not per poll");
        a.poll_timer(1300, 0);
        assert!(in_irr(&a, 0x31));
    }

    #[test]
    fn periodic_tiny_count_does_not_loop() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x0002_0040);
        w(&mut a, TDCR, 0xB);
        a.mmio_write(TMICT, 4, 1, 5);
        a.poll_timer(5 + 1_000_000_000_000, 0);
        assert!(in_irr(&a, 0x40));
        assert_eq!(
            a.next_timer_event(5 + 1_000_000_000_000, 0),
            Some(5 + 1_000_000_000_001)
        );
        assert_eq!(a.mmio_read(TMCCT, 4, 5 + 1_000_000_000_000), 1);
        // The largest count at the largest divisor near the end of time
        // does not overflow.
        w(&mut a, TDCR, 0xA);
        a.mmio_write(TMICT, 4, u32::MAX, u64::MAX - 10);
        a.poll_timer(u64::MAX, 0);
        assert_eq!(a.next_timer_event(u64::MAX, 0), Some(u64::MAX));
    }

    #[test]
    fn divide_change_and_mode_change_keep_the_count() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x0002_0031); // periodic
        w(&mut a, TDCR, 0x0); // by 2
        a.mmio_write(TMICT, 4, 100, 0);
        assert_eq!(a.mmio_read(TMCCT, 4, 60), 70);
        let fx = a.mmio_write(TDCR, 4, 0xB, 60); // by 1 from here
        assert!(fx.timer_changed);
        assert_eq!(a.mmio_read(TMCCT, 4, 60), 70);
        assert_eq!(a.mmio_read(TMCCT, 4, 80), 50);
        assert_eq!(a.next_timer_event(60, 0), Some(130));
        // Periodic to one-shot at 80: the remaining 50 run out, then stop.
        a.mmio_write(LVT_T, 4, 0x31, 80);
        assert_eq!(a.timer_mode(), TimerMode::OneShot);
        assert_eq!(a.mmio_read(TMCCT, 4, 100), 30);
        a.poll_timer(130, 0);
        assert!(in_irr(&a, 0x31));
        assert_eq!(a.mmio_read(TMCCT, 4, 131), 0);
        assert_eq!(a.next_timer_event(131, 0), None);
    }

    #[test]
    fn timer_reprogramming_catches_up_a_missed_expiry() {
        let mut a = enabled(0);
        w(&mut a, LVT_T, 0x33);
        w(&mut a, TDCR, 0xB);
        a.mmio_write(TMICT, 4, 10, 0);
        // No poll before the guest restarts the timer at 25: the first
        // count ran out at 10, so its interrupt is raised.
        a.mmio_write(TMICT, 4, 10, 25);
        assert!(in_irr(&a, 0x33));
        assert_eq!(a.next_timer_event(25, 0), Some(35));
    }

    #[test]
    fn tsc_deadline_arm_fire_disarm() {
        let mut a = enabled(0);
        // Ignored while the LVT is in one-shot mode.
        a.tsc_deadline_write(5000, 0, 1000);
        assert_eq!(a.tsc_deadline_read(), 0);
        w(&mut a, LVT_T, 0x0004_0040);
        assert_eq!(a.timer_mode(), TimerMode::TscDeadline);
        a.tsc_deadline_write(5000, 10_000, 1000);
        assert_eq!(a.tsc_deadline_read(), 5000);
        // 4000 cycles at 2 GHz = 2000 ns.
        assert_eq!(a.next_timer_event(10_000, 1000), Some(12_000));
        assert_eq!(a.mmio_read(TMCCT, 4, 11_000), 0, "current count reads 0");
        a.mmio_write(TMICT, 4, 100, 11_000);
        assert_eq!(
            r(&mut a, TMICT),
            0,
            "initial count ignored in deadline mode"
        );
        a.poll_timer(11_999, 4999);
        assert!(!in_irr(&a, 0x40));
        a.poll_timer(12_000, 5000);
        assert!(in_irr(&a, 0x40));
        assert_eq!(a.tsc_deadline_read(), 0, "disarmed after firing");
        assert_eq!(a.next_timer_event(12_000, 5000), None);
        a.acknowledge(0x40);
        w(&mut a, EOI, 0);
        // Arm, then disarm with 0.
        a.tsc_deadline_write(9000, 13_000, 6000);
        a.tsc_deadline_write(0, 13_000, 6000);
        a.poll_timer(20_000, 10_000);
        assert!(!in_irr(&a, 0x40));
        // A deadline already passed fires at once.
        a.tsc_deadline_write(500, 20_000, 10_000);
        assert!(in_irr(&a, 0x40));
        assert_eq!(a.tsc_deadline_read(), 0);
        // Leaving deadline mode disarms; coming back finds it disarmed.
        a.tsc_deadline_write(90_000, 20_000, 10_000);
        w(&mut a, LVT_T, 0x40);
        w(&mut a, LVT_T, 0x0004_0040);
        assert_eq!(a.tsc_deadline_read(), 0);
    }

    #[test]
    fn tsc_deadline_rounds_up_to_whole_ns() {
        let mut a = LocalApic::new(0, 3_000_000_000);
        a.mmio_write(SVR, 4, 0x1FF, 0);
        a.mmio_write(LVT_T, 4, 0x0004_0040, 0);
        a.tsc_deadline_write(101, 7, 100);
        // One cycle at 3 GHz is a third of a ns: the event is at now + 1.
        assert_eq!(a.next_timer_event(7, 100), Some(8));
        a.tsc_deadline_write(u64::MAX, 7, 0);
        // u64::MAX cycles at 3 GHz ~ 6.1e18 ns: no overflow.
        assert_eq!(
            a.next_timer_event(7, 0),
            Some(7 + 6_148_914_691_236_517_205)
        );
        let mut z = LocalApic::new(0, 0);
        z.mmio_write(SVR, 4, 0x1FF, 0);
        z.mmio_write(LVT_T, 4, 0x0004_0040, 0);
        z.tsc_deadline_write(10, 0, 0);
        assert_eq!(z.next_timer_event(0, 0), None, "unknown TSC frequency");
    }

    #[test]
    fn x2apic_msr_rules() {
        let mut a = enabled(0x1234);
        assert_eq!(
            a.msr_read(0x802, 0),
            Err(ApicError::NotX2Apic { msr: 0x802 })
        );
        assert_eq!(
            a.msr_write(0x808, 0, 0),
            Err(ApicError::NotX2Apic { msr: 0x808 })
        );
        a.set_base_msr(0xFEE0_0000 | BASE_EN | BASE_EXTD).unwrap();
        assert_eq!(a.mode(), ApicMode::X2Apic);
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.mmio_read(ID, 4, 0), 0, "no MMIO in x2APIC mode");
        assert_eq!(a.msr_read(0x802, 0), Ok(0x1234));
        // Cluster 0x123, bit 4 of the mask.
        assert_eq!(a.msr_read(0x80D, 0), Ok(0x0123_0010));
        assert_eq!(a.msr_read(0x803, 0), Ok(0x0005_0014));
        assert_eq!(
            a.msr_read(0x80F, 0),
            Ok(0x1FF),
            "SVR kept across the switch"
        );
        assert_eq!(
            a.msr_write(0x802, 7, 0),
            Err(ApicError::ReadOnly { msr: 0x802 })
        );
        assert_eq!(
            a.msr_write(0x80D, 0, 0),
            Err(ApicError::ReadOnly { msr: 0x80D })
        );
        assert_eq!(
            a.msr_write(0x839, 0, 0),
            Err(ApicError::ReadOnly { msr: 0x839 })
        );
        assert_eq!(
            a.msr_write(0x820, 0, 0),
            Err(ApicError::ReadOnly { msr: 0x820 })
        );
        assert_eq!(
            a.msr_read(0x80B, 0),
            Err(ApicError::WriteOnly { msr: 0x80B })
        );
        assert_eq!(
            a.msr_read(0x83F, 0),
            Err(ApicError::WriteOnly { msr: 0x83F })
        );
        for msr in [
            0x800, 0x809, 0x80C, 0x80E, 0x82F, 0x831, 0x83A, 0x840, 0x8FF,
        ] {
            assert_eq!(
                a.msr_read(msr, 0),
                Err(ApicError::NoSuchRegister { msr }),
                "{msr:#x}"
            );
            assert_eq!(
                a.msr_write(msr, 0, 0),
                Err(ApicError::NoSuchRegister { msr })
            );
        }
        assert_eq!(
            a.msr_read(0x900, 0),
            Err(ApicError::NoSuchRegister { msr: 0x900 })
        );
        let reserved = |msr, value| Err(ApicError::ReservedBits { msr, value });
        assert_eq!(a.msr_write(0x80B, 1, 0), reserved(0x80B, 1));
        assert_eq!(a.msr_write(0x828, 1, 0), reserved(0x828, 1));
        assert_eq!(a.msr_write(0x808, 0x100, 0), reserved(0x808, 0x100));
        assert_eq!(a.msr_write(0x808, 1 << 32, 0), reserved(0x808, 1 << 32));
        assert_eq!(a.msr_write(0x80F, 0x11FF, 0), reserved(0x80F, 0x11FF));
        assert_eq!(a.msr_write(0x83F, 0x150, 0), reserved(0x83F, 0x150));
        assert_eq!(a.msr_write(0x83E, 0x4, 0), reserved(0x83E, 0x4));
        assert_eq!(a.msr_write(0x830, 1 << 12, 0), reserved(0x830, 1 << 12));
        assert_eq!(a.msr_write(0x837, 0x700, 0), reserved(0x837, 0x700));
        assert!(a.msr_write(0x838, 1 << 32, 0).is_err());
        // Legal writes.
        assert!(a.msr_write(0x808, 0x20, 0).is_ok());
        assert_eq!(a.msr_read(0x808, 0), Ok(0x20));
        assert_eq!(a.msr_read(0x80A, 0), Ok(0x20));
        assert!(a.msr_write(0x80B, 0, 0).is_ok());
        assert!(a.msr_write(0x828, 0, 0).is_ok());
        // LVT LINT0: delivery status and remote IRR are read-only, not
        // reserved: accepted and read back as 0.
        assert!(a.msr_write(0x835, 0x5700, 0).is_ok());
        assert_eq!(a.msr_read(0x835, 0), Ok(0x700));
        assert!(a.lint0_extint());
        // SELF IPI.
        assert!(a.msr_write(0x83F, 0x50, 0).unwrap().ipis.is_empty());
        assert!(in_irr(&a, 0x50));
        assert_eq!(a.msr_read(0x828, 0), Ok(0));
        // Timer through MSRs.
        a.msr_write(0x83E, 0xB, 100).unwrap();
        a.msr_write(0x838, 40, 100).unwrap();
        assert_eq!(a.msr_read(0x839, 110), Ok(30));
        assert_eq!(a.msr_read(0x838, 110), Ok(40));
    }

    #[test]
    fn base_msr_transitions() {
        let mut a = enabled(0x1F3);
        let base = a.base_msr();
        let x2 = DEFAULT_APIC_BASE | BASE_EN | BASE_EXTD;
        // EN=0, EXTD=1 is invalid.
        assert!(a.set_base_msr(DEFAULT_APIC_BASE | BASE_EXTD).is_err());
        // Reserved bits 0-7, 9 and above MAXPHYADDR.
        assert!(a.set_base_msr(base | 1).is_err());
        assert!(a.set_base_msr(base | 1 << 9).is_err());
        assert!(a.set_base_msr(base | 1 << 52).is_err());
        a.set_phys_addr_bits(36);
        assert!(a.set_base_msr(base | 1 << 36).is_err());
        assert_eq!(a.base_msr(), base, "refused writes change nothing");
        // Relocation; the BSP bit cannot be cleared by the guest.
        a.set_base_msr(0xFED0_0000 | BASE_EN).unwrap();
        assert_eq!(a.base_msr(), 0xFED0_0900);
        assert_eq!(a.mmio_base(), Some(0xFED0_0000));
        assert_eq!(r(&mut a, SVR), 0x1FF, "relocation keeps registers");
        // xAPIC -> x2APIC -> xAPIC is illegal.
        a.set_base_msr(x2).unwrap();
        assert_eq!(a.msr_read(0x802, 0), Ok(0x1F3));
        let err = a.set_base_msr(DEFAULT_APIC_BASE | BASE_EN);
        assert_eq!(
            err,
            Err(ApicError::BaseMsr {
                from: ApicMode::X2Apic,
                value: 0xFEE0_0800
            })
        );
        assert_eq!(a.mode(), ApicMode::X2Apic);
        // x2APIC -> disabled resets everything but the ID.
        a.msr_write(0x808, 0x20, 0).unwrap();
        a.accept(&fixed(0x40, false));
        a.set_base_msr(DEFAULT_APIC_BASE).unwrap();
        assert_eq!(a.mode(), ApicMode::Disabled);
        assert_eq!(a.base_msr(), 0xFEE0_0100);
        assert_eq!(a.mmio_base(), None);
        assert!(a.lint0_extint(), "globally disabled: PIC goes straight in");
        assert!(!a.accept(&fixed(0x41, false)));
        assert!(!a.matches(0xFF, false));
        assert_eq!(a.pending_vector(), None);
        assert_eq!(
            a.msr_read(0x802, 0),
            Err(ApicError::NotX2Apic { msr: 0x802 })
        );
        // disabled -> x2APIC is illegal; disabled -> xAPIC is fine.
        assert!(a.set_base_msr(x2).is_err());
        a.set_base_msr(DEFAULT_APIC_BASE | BASE_EN).unwrap();
        assert_eq!(r(&mut a, ID), 0xF300_0000, "xAPIC ID: low 8 bits");
        assert_eq!(r(&mut a, TPR), 0);
        assert_eq!(r(&mut a, SVR), 0xFF);
        assert_eq!(r(&mut a, IRR0 + 0x20), 0);
        assert_eq!(r(&mut a, LVT_L0), 0x0001_0000);
        assert_eq!(r(&mut a, DFR), 0xFFFF_FFFF);
        // xAPIC -> disabled also resets.
        w(&mut a, SVR, 0x1FF);
        a.set_base_msr(DEFAULT_APIC_BASE).unwrap();
        a.set_base_msr(DEFAULT_APIC_BASE | BASE_EN).unwrap();
        assert_eq!(r(&mut a, SVR), 0xFF);
        // A non-BSP APIC.
        a.set_bsp(false);
        assert_eq!(a.base_msr(), 0xFEE0_0800);
        a.reset();
        assert_eq!(a.base_msr(), 0xFEE0_0800, "RESET keeps the BSP flag");
    }

    #[test]
    fn self_ipi_xapic() {
        let mut a = enabled(3);
        // Self shorthand, fixed vector 0x45.
        let fx = w(&mut a, ICR_LO, 0x0004_0045);
        assert!(fx.ipis.is_empty());
        assert!(in_irr(&a, 0x45));
        assert_eq!(r(&mut a, ICR_LO), 0x0004_0045, "delivery status reads idle");
        // Own physical ID as destination.
        w(&mut a, ICR_HI, 0x03FF_FFFF);
        assert_eq!(r(&mut a, ICR_HI), 0x0300_0000);
        let fx = w(&mut a, ICR_LO, 0x46);
        assert!(fx.ipis.is_empty());
        assert!(in_irr(&a, 0x46));
        // Another APIC: routed by the caller.
        w(&mut a, ICR_HI, 0x0500_0000);
        let fx = w(&mut a, ICR_LO, 0x47);
        assert_eq!(
            fx.ipis,
            [ApicMessage {
                vector: 0x47,
                delivery: DeliveryMode::Fixed,
                level: false,
                dest: 5,
                logical: false
            }]
        );
        assert!(!fx.exclude_self);
        assert!(!in_irr(&a, 0x47));
        // NMI to self.
        let fx = w(&mut a, ICR_LO, 0x0004_0400);
        assert!(fx.ipis.is_empty());
        assert!(a.take_nmi());
        assert!(!a.take_nmi());
        // All excluding self, and all including self.
        let fx = w(&mut a, ICR_LO, 0x000C_0030);
        assert_eq!(fx.ipis.len(), 1);
        assert_eq!((fx.ipis[0].dest, fx.exclude_self), (0xFF, true));
        let fx = w(&mut a, ICR_LO, 0x0008_0030);
        assert_eq!((fx.ipis[0].dest, fx.exclude_self), (0xFF, false));
        // INIT level de-assert sends nothing.
        let fx = w(&mut a, ICR_LO, 0x0000_8500);
        assert!(fx.ipis.is_empty());
        // Illegal vector: nothing sent, ESR send-illegal-vector.
        let fx = w(&mut a, ICR_LO, 0x0004_0005);
        assert!(fx.ipis.is_empty());
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, ESR), 0x20);
    }

    #[test]
    fn self_ipi_x2apic() {
        let mut a = x2apic(0x103);
        let fx = a.msr_write(0x830, (0x103 << 32) | 0x48, 0).unwrap();
        assert!(fx.ipis.is_empty());
        assert!(in_irr(&a, 0x48));
        assert_eq!(a.msr_read(0x830, 0), Ok((0x103 << 32) | 0x48));
        let fx = a.msr_write(0x830, (0x7 << 32) | 0x49, 0).unwrap();
        assert_eq!(fx.ipis.len(), 1);
        assert_eq!((fx.ipis[0].vector, fx.ipis[0].dest), (0x49, 7));
        // Logical destination: always routed (others may match too).
        let fx = a.msr_write(0x830, (0x0010_0008 << 32) | 0x84A, 0).unwrap();
        assert_eq!(fx.ipis.len(), 1);
        assert!(fx.ipis[0].logical);
        // Self shorthand.
        let fx = a.msr_write(0x830, 0x0004_004B, 0).unwrap();
        assert!(fx.ipis.is_empty());
        assert!(in_irr(&a, 0x4B));
        // All excluding self in x2APIC: 32-bit broadcast.
        let fx = a.msr_write(0x830, 0x000C_004C, 0).unwrap();
        assert_eq!(fx.ipis[0].dest, 0xFFFF_FFFF);
        assert!(fx.exclude_self);
    }

    #[test]
    fn svr_software_disable_masks_lvts() {
        let mut a = enabled(0);
        w(&mut a, LVT_L0, 0x700);
        assert_eq!(r(&mut a, LVT_L0), 0x700);
        assert!(a.lint0_extint());
        a.accept(&fixed(0x80, false));
        assert_eq!(a.pending_vector(), Some(0x80));
        let fx = w(&mut a, SVR, 0xFF);
        assert!(fx.timer_changed);
        assert_eq!(r(&mut a, LVT_L0), 0x0001_0700);
        assert!(!a.lint0_extint());
        assert_eq!(a.pending_vector(), None, "held while software-disabled");
        // Masks cannot be cleared while software-disabled.
        w(&mut a, LVT_ERR, 0x33);
        assert_eq!(r(&mut a, LVT_ERR), 0x0001_0033);
        w(&mut a, LVT_T, 0x0002_0031);
        assert_eq!(r(&mut a, LVT_T), 0x0003_0031);
        // Re-enabling keeps the masks and releases the held interrupt.
        w(&mut a, SVR, 0x1FF);
        assert_eq!(r(&mut a, LVT_L0), 0x0001_0700);
        assert_eq!(a.pending_vector(), Some(0x80));
        w(&mut a, LVT_L0, 0x700);
        assert!(a.lint0_extint());
    }

    #[test]
    fn esr_write_before_read_and_error_interrupt() {
        let mut a = enabled(0);
        assert!(!a.accept(&fixed(5, false)));
        assert_eq!(r(&mut a, IRR0), 0);
        assert_eq!(r(&mut a, ESR), 0, "nothing latched before a write");
        w(&mut a, ESR, 0xFFFF);
        assert_eq!(r(&mut a, ESR), 0x40, "receive illegal vector");
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, ESR), 0);
        // With the error LVT unmasked the error raises its vector.
        w(&mut a, LVT_ERR, 0xE0);
        assert!(!a.accept(&fixed(15, true)));
        assert!(in_irr(&a, 0xE0));
        assert_eq!(a.pending_vector(), Some(0xE0));
        // A reserved register: reads 0, sets illegal register address.
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, 0x2F0), 0, "no CMCI entry");
        assert_eq!(r(&mut a, 0x3F0), 0, "SELF IPI is x2APIC only");
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, ESR), 0x80);
        // An illegal error vector records only another error.
        w(&mut a, LVT_ERR, 0x05);
        w(&mut a, ESR, 0);
        a.mmio_write(0x10, 4, 0, 0);
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, ESR), 0xC0);
    }

    #[test]
    fn odd_mmio_accesses_are_ignored() {
        let mut a = enabled(0);
        w(&mut a, TPR, 0x20);
        assert_eq!(a.mmio_read(TPR, 1, 0), 0);
        assert_eq!(a.mmio_read(TPR, 8, 0), 0);
        assert_eq!(a.mmio_read(TPR + 4, 4, 0), 0);
        assert_eq!(a.mmio_read(0x1000 + TPR, 4, 0), 0);
        assert_eq!(a.mmio_read(u64::MAX, 4, 0), 0);
        a.mmio_write(TPR, 2, 0x30, 0);
        a.mmio_write(TPR + 1, 4, 0x30, 0);
        a.mmio_write(u64::MAX - 15, 4, 0x30, 0);
        assert_eq!(r(&mut a, TPR), 0x20);
        w(&mut a, ESR, 0);
        assert_eq!(r(&mut a, ESR), 0, "only aligned accesses report errors");
    }

    #[test]
    fn accept_and_match_physical_and_logical() {
        let mut a = enabled(3);
        assert!(a.matches(3, false));
        assert!(!a.matches(4, false));
        assert!(a.matches(0xFF, false));
        assert!(!a.matches(0x103, false));
        // Flat logical: LDR bit 2.
        w(&mut a, LDR, 0x0400_0000);
        assert!(a.matches(0x04, true));
        assert!(a.matches(0x0C, true));
        assert!(!a.matches(0x08, true));
        assert!(!a.matches(0x104, true));
        // Cluster logical: cluster 2, member bit 0.
        w(&mut a, DFR, 0x0FFF_FFFF);
        w(&mut a, LDR, 0x2100_0000);
        assert!(a.matches(0x21, true));
        assert!(a.matches(0x23, true));
        assert!(!a.matches(0x22, true));
        assert!(!a.matches(0x31, true));
        assert!(a.matches(0xFF, true));
        // An undefined DFR model matches no logical destination.
        w(&mut a, DFR, 0x5FFF_FFFF);
        assert!(!a.matches(0x21, true));
        // x2APIC: ID 0x23 is cluster 2, mask bit 3.
        let b = x2apic(0x23);
        assert!(b.matches(0x23, false));
        assert!(!b.matches(0x24, false));
        assert!(b.matches(0xFFFF_FFFF, false));
        assert!(b.matches(0x0002_0008, true));
        assert!(b.matches(0x0002_000C, true));
        assert!(!b.matches(0x0002_0004, true));
        assert!(!b.matches(0x0003_0008, true));
        // Acceptance of each delivery mode.
        let mut c = enabled(0);
        let msg = |delivery, vector| ApicMessage {
            vector,
            delivery,
            level: false,
            dest: 0,
            logical: false,
        };
        assert!(c.accept(&msg(DeliveryMode::LowestPriority, 0x70)));
        assert!(in_irr(&c, 0x70));
        assert!(c.accept(&fixed(0x71, true)));
        assert_eq!(r(&mut c, TMR0 + 0x30), 1 << 17);
        assert!(c.accept(&msg(DeliveryMode::Nmi, 0)));
        assert!(c.take_nmi());
        assert!(c.accept(&msg(DeliveryMode::ExtInt, 0)));
        assert!(c.take_extint());
        assert!(!c.take_extint());
        assert!(c.accept(&msg(DeliveryMode::Init, 0)));
        assert!(c.take_init());
        assert!(c.accept(&msg(DeliveryMode::StartUp, 0x9A)));
        assert_eq!(c.take_sipi(), Some(0x9A));
        assert_eq!(c.take_sipi(), None);
        assert!(!c.accept(&msg(DeliveryMode::Smi, 0)));
    }

    #[test]
    fn lint_inputs() {
        let mut a = enabled(0);
        w(&mut a, LVT_L1, 0x400); // NMI
        a.set_lint(1, true);
        assert!(a.take_nmi());
        a.set_lint(1, true);
        assert!(!a.take_nmi(), "no new edge");
        a.set_lint(1, false);
        a.set_lint(1, true);
        assert!(a.take_nmi());
        w(&mut a, LVT_L0, 0x0001_0052); // masked fixed
        a.set_lint(0, true);
        assert!(!in_irr(&a, 0x52));
        a.set_lint(0, false);
        w(&mut a, LVT_L0, 0x52);
        a.set_lint(0, true);
        assert!(in_irr(&a, 0x52));
        a.set_lint(7, true); // no such pin: ignored
    }

    #[test]
    fn init_keeps_mode_and_id() {
        let mut a = x2apic(9);
        a.msr_write(0x808, 0x30, 0).unwrap();
        a.init();
        assert_eq!(a.mode(), ApicMode::X2Apic);
        assert_eq!(a.msr_read(0x802, 0), Ok(9));
        assert_eq!(a.msr_read(0x80D, 0), Ok(0x200));
        assert_eq!(a.msr_read(0x808, 0), Ok(0));
        assert_eq!(a.msr_read(0x80F, 0), Ok(0xFF));
    }

    #[test]
    fn save_load_roundtrip() {
        let mut a = enabled(2);
        w(&mut a, TPR, 0x10);
        w(&mut a, LDR, 0x0800_0000);
        w(&mut a, LVT_T, 0x0002_0031);
        a.mmio_write(TDCR, 4, 0x1, 0);
        a.mmio_write(TMICT, 4, 500, 1000);
        a.accept(&fixed(0x60, true));
        a.acknowledge(0x60);
        a.accept(&fixed(0x90, false));
        a.accept(&fixed(3, false)); // an error in ESR
        a.accept(&ApicMessage {
            delivery: DeliveryMode::Nmi,
            ..fixed(0, false)
        });
        let s = a.save();
        let mut b = LocalApic::new(2, TSC_HZ);
        b.load(&s).unwrap();
        assert_eq!(b.save(), s);
        assert_eq!(b.pending_vector(), Some(0x90));
        assert_eq!(b.ppr(), 0x60);
        assert_eq!(b.mmio_read(TMCCT, 4, 1400), 400);
        assert_eq!(b.next_timer_event(1400, 0), Some(3000));
        assert!(b.take_nmi());
        b.mmio_write(ESR, 4, 0, 0);
        assert_eq!(b.mmio_read(ESR, 4, 0), 0x40);
        let fx = b.mmio_write(EOI, 4, 0, 0);
        assert_eq!(fx.eoi, Some(0x60));

        // x2APIC state needs the same x2APIC ID.
        let x = x2apic(5).save();
        assert!(LocalApic::new(5, TSC_HZ).load(&x).is_ok());
        assert!(LocalApic::new(6, TSC_HZ).load(&x).is_err());

        // Corrupt states are refused and change nothing.
        let bad = |f: fn(&mut LapicState)| {
            let mut s = s.clone();
            f(&mut s);
            let mut c = LocalApic::new(2, TSC_HZ);
            let before = c.save();
            assert!(c.load(&s).is_err());
            assert_eq!(c.save(), before);
        };
        bad(|s| s.apic_base = DEFAULT_APIC_BASE | BASE_EXTD);
        bad(|s| s.apic_base |= 1);
        bad(|s| s.svr = 0x1000);
        bad(|s| s.lvt[LVT_ERROR] = 0x1000);
        bad(|s| s.dfr = 0);
        bad(|s| s.timer_divide = 0x10);
        bad(|s| s.icr = 1 << 12);
        bad(|s| s.id = 0x100);
        bad(|s| s.timer_initial = 0);
        bad(|s| {
            s.svr = 0xFF;
            s.lvt[2] = 0; // performance counters
        });
    }

    #[test]
    fn error_display() {
        let e = ApicError::ReservedBits {
            msr: 0x808,
            value: 0x100,
        };
        assert_eq!(
            alloc::format!("{e}"),
            "reserved bits set writing 0x100 to x2APIC MSR 0x808"
        );
    }

    #[test]
    fn guest_values_never_panic() {
        // Every register offset and MSR with awkward values, in every mode.
        let values = [0u64, 1, 0xFF, 0x1_0000, 0xFFFF_FFFF, u64::MAX];
        for mode_base in [
            DEFAULT_APIC_BASE | BASE_EN,
            DEFAULT_APIC_BASE | BASE_EN | BASE_EXTD,
        ] {
            let mut a = enabled(0xFF);
            a.set_base_msr(mode_base).unwrap();
            for off in (0..0x1010u64).step_by(0x10) {
                for &v in &values {
                    a.mmio_write(off, 4, v as u32, v);
                    a.mmio_read(off, 4, v);
                    let _ = a.msr_write(0x800 + (off >> 4) as u32, v, v);
                    let _ = a.msr_read(0x800 + (off >> 4) as u32, v);
                    a.poll_timer(v, v);
                    a.next_timer_event(v, v);
                    a.tsc_deadline_write(v, v, v);
                    if let Some(p) = a.pending_vector() {
                        a.acknowledge(p);
                    }
                }
            }
        }
    }
}
