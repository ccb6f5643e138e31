//! The PC platform under a guest: the interrupt controllers and timers of
//! `irq/` wired together as on a PC, and exposed to the machine as one
//! device with several regions.
//!
//! Wiring (as QEMU's `pc` machine):
//! - ISA IRQ *n* goes to the 8259 pair (line *n*) and to I/O APIC pin *n*,
//!   except IRQ 0 (the PIT), which is pin 2 (the override every PC's MADT
//!   declares).
//! - The master PIC's INTR reaches the CPU through LINT0 of the local APIC
//!   when LINT0 is ExtINT (set at reset for the BSP, as QEMU does) or the
//!   APIC is disabled.
//! - The I/O APIC's messages and device MSIs go to the local APIC if it
//!   matches their destination; an EOI of a level-triggered vector is
//!   broadcast back to the I/O APIC.
//!
//! One local APIC: a VM has one vCPU today. The vCPU asks
//! [`Platform::interrupt_pending`] before each entry and takes the vector
//! with [`Platform::acknowledge`] when it injects it.

pub mod state;

use crate::devices::{Device, DeviceCtx, RegionIndex};
use crate::irq::ioapic::IoApic;
use crate::irq::lapic::{ApicEffects, ApicError, LocalApic};
use crate::irq::pic::Pic;
use crate::irq::pit::Pit;
use crate::irq::rtc::Rtc;
use crate::irq::{ApicMessage, LineLevel, Nanos};

/// Region indices of the platform device.
pub mod region {
    use crate::devices::RegionIndex;
    /// Ports 0x20-0x21.
    pub const PIC_MASTER: RegionIndex = 0;
    /// Ports 0xA0-0xA1.
    pub const PIC_SLAVE: RegionIndex = 1;
    /// Ports 0x4D0-0x4D1.
    pub const ELCR: RegionIndex = 2;
    /// Ports 0x40-0x43.
    pub const PIT: RegionIndex = 3;
    /// Port 0x61.
    pub const PORT61: RegionIndex = 4;
    /// Ports 0x70-0x71.
    pub const RTC: RegionIndex = 5;
    /// 0xFEC00000, 4 KiB.
    pub const IOAPIC: RegionIndex = 6;
    /// 0xFEE00000, 4 KiB.
    pub const LAPIC: RegionIndex = 7;
}

/// Where each region goes: (name, port or address, size, in I/O space).
pub const REGIONS: [(&str, u64, u64, bool); 8] = [
    ("pic-master", 0x20, 2, true),
    ("pic-slave", 0xA0, 2, true),
    ("elcr", 0x4D0, 2, true),
    ("pit", 0x40, 4, true),
    ("port61", 0x61, 1, true),
    ("rtc", 0x70, 2, true),
    ("ioapic", 0xFEC0_0000, 0x1000, false),
    ("lapic", 0xFEE0_0000, 0x1000, false),
];

/// Counters of interrupt traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// Interrupts handed to the vCPU (vectors acknowledged).
    pub delivered: u64,
    /// Of those, through the PIC (ExtINT).
    pub via_pic: u64,
    /// PIT channel-0 and RTC interrupts raised.
    pub pit_irqs: u64,
    pub rtc_irqs: u64,
    /// Messages from the I/O APIC and MSIs accepted by the local APIC.
    pub apic_messages: u64,
}

/// The interrupt controllers and timers of one VM.
#[derive(Clone)]
pub struct Platform {
    pub pic: Pic,
    pub pit: Pit,
    pub ioapic: IoApic,
    pub rtc: Rtc,
    pub lapic: LocalApic,
    /// The guest's TSC at the last [`Platform::advance`].
    pub guest_tsc: u64,
    pub now: Nanos,
    pub stats: PlatformStats,
}

/// ISA IRQ 0 is I/O APIC pin 2.
fn ioapic_pin(gsi: u8) -> u8 {
    if gsi == 0 {
        2
    } else {
        gsi
    }
}

impl Platform {
    /// The platform after reset; the RTC reads `unix_secs` at time 0.
    pub fn new(tsc_hz: u64, unix_secs: u64) -> Self {
        let mut lapic = LocalApic::new(0, tsc_hz);
        lapic.virtual_wire();
        // The 8259s as firmware leaves them: initialised with the real-mode
        // bases (0x08, 0x70), slave on IR2, every line masked but the
        // cascade. A guest that wants ISA interrupts programs them itself.
        let mut pic = Pic::new();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x08),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, 0x70),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, 0xFB),
            (0xA1, 0xFF),
        ] {
            pic.write(port, v);
        }
        Self {
            pic,
            pit: Pit::new(),
            ioapic: IoApic::new(),
            rtc: Rtc::new(unix_secs),
            lapic,
            guest_tsc: 0,
            now: 0,
            stats: PlatformStats::default(),
        }
    }

    /// Sets the level of a GSI (ISA IRQs 0-15 also reach the PIC).
    pub fn set_gsi(&mut self, gsi: u8, level: LineLevel) {
        if gsi < 16 {
            self.pic.set_irq(gsi, level);
        }
        let msgs = self.ioapic.set_irq(ioapic_pin(gsi), level);
        self.deliver(&msgs);
    }

    /// Delivers APIC messages (I/O APIC, MSIs, IPIs) to the local APIC.
    pub fn deliver(&mut self, msgs: &[ApicMessage]) {
        for m in msgs {
            let broadcast = !m.logical && (m.dest == 0xFF || m.dest == u32::MAX);
            if (broadcast || self.lapic.matches(m.dest, m.logical)) && self.lapic.accept(m) {
                self.stats.apic_messages += 1;
            }
        }
    }

    fn apic_effects(&mut self, fx: ApicEffects) {
        if !fx.exclude_self {
            self.deliver(&fx.ipis);
        }
        if let Some(v) = fx.eoi {
            let msgs = self.ioapic.eoi(v);
            self.deliver(&msgs);
        }
    }

    /// Brings the timers up to `now` and raises what they raise.
    pub fn advance(&mut self, now: Nanos, guest_tsc: u64) {
        self.now = now;
        self.guest_tsc = guest_tsc;
        if self.pit.poll(now) > 0 {
            self.stats.pit_irqs += 1;
            self.set_gsi(0, LineLevel::High);
            self.set_gsi(0, LineLevel::Low);
        }
        if self.rtc.poll(now) {
            self.stats.rtc_irqs += 1;
            self.set_gsi(8, LineLevel::High);
            self.set_gsi(8, LineLevel::Low);
        }
        self.lapic.poll_timer(now, guest_tsc);
    }

    /// Whether ISA IRQ `isa` can reach the CPU: unmasked at the PIC
    /// (and, for the slave, its cascade) or at its I/O APIC pin.
    fn isa_routed(&self, isa: u8) -> bool {
        (!self.pic.line_masked(isa) && self.lapic.lint0_extint())
            || !self.ioapic.pin_masked(ioapic_pin(isa))
    }

    /// When a timer next needs [`Platform::advance`]: only timers whose
    /// interrupt can reach the CPU count, so a halted vCPU is not woken
    /// for an interrupt nobody takes (and one that nothing can wake is
    /// reported as such).
    pub fn next_event(&self, now: Nanos) -> Option<Nanos> {
        [
            self.pit.next_event(now).filter(|_| self.isa_routed(0)),
            self.rtc.next_event(now).filter(|_| self.isa_routed(8)),
            self.lapic.next_timer_event(now, self.guest_tsc),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the PIC's vector may go to the CPU: through LINT0 in
    /// virtual-wire mode, or an ExtINT message (I/O APIC pin, MSI).
    fn pic_path(&self) -> bool {
        (self.lapic.lint0_extint() || self.lapic.extint_pending()) && self.pic.output()
    }

    /// Whether a maskable interrupt is waiting for the CPU.
    pub fn interrupt_pending(&self) -> bool {
        self.lapic.pending_vector().is_some() || self.pic_path()
    }

    /// Takes the interrupt the CPU is about to receive: the vector (the
    /// local APIC first, then the PIC through ExtINT).
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = if let Some(v) = self.lapic.pending_vector() {
            self.lapic.acknowledge(v);
            v
        } else if self.pic_path() {
            self.lapic.take_extint();
            self.stats.via_pic += 1;
            self.pic.acknowledge()
        } else {
            return None;
        };
        self.stats.delivered += 1;
        Some(v)
    }

    /// An x2APIC, APIC-base or TSC-deadline MSR read; `Err` is #GP.
    pub fn msr_read(&mut self, msr: u32) -> Result<u64, ApicError> {
        use crate::irq::lapic::{MSR_IA32_APIC_BASE, MSR_IA32_TSC_DEADLINE};
        match msr {
            MSR_IA32_APIC_BASE => Ok(self.lapic.base_msr()),
            MSR_IA32_TSC_DEADLINE => Ok(self.lapic.tsc_deadline_read()),
            _ => self.lapic.msr_read(msr, self.now),
        }
    }

    /// An x2APIC, APIC-base or TSC-deadline MSR write; `Err` is #GP.
    pub fn msr_write(&mut self, msr: u32, v: u64, guest_tsc: u64) -> Result<(), ApicError> {
        use crate::irq::lapic::{MSR_IA32_APIC_BASE, MSR_IA32_TSC_DEADLINE};
        match msr {
            MSR_IA32_APIC_BASE => self.lapic.set_base_msr(v),
            MSR_IA32_TSC_DEADLINE => {
                self.lapic.tsc_deadline_write(v, self.now, guest_tsc);
                Ok(())
            }
            _ => {
                let fx = self.lapic.msr_write(msr, v, self.now)?;
                self.apic_effects(fx);
                Ok(())
            }
        }
    }
}

impl Device for Platform {
    fn read(&mut self, ctx: &mut DeviceCtx, r: RegionIndex, offset: u64, size: u8) -> u64 {
        let now = ctx.now;
        let port = |base: u16| base.wrapping_add(offset as u16);
        match r {
            region::PIC_MASTER => self.pic.read(port(0x20)).into(),
            region::PIC_SLAVE => self.pic.read(port(0xA0)).into(),
            region::ELCR => self.pic.read(port(0x4D0)).into(),
            region::PIT => self.pit.read(port(0x40), now).into(),
            region::PORT61 => self.pit.read(0x61, now).into(),
            region::RTC => self.rtc.read(port(0x70), now).into(),
            region::IOAPIC => self.ioapic.read(offset, size).into(),
            region::LAPIC => self.lapic.mmio_read(offset, size, now).into(),
            _ => crate::devices::all_ones(size),
        }
    }

    fn write(&mut self, ctx: &mut DeviceCtx, r: RegionIndex, offset: u64, size: u8, value: u64) {
        let now = ctx.now;
        let port = |base: u16| base.wrapping_add(offset as u16);
        match r {
            region::PIC_MASTER => self.pic.write(port(0x20), value as u8),
            region::PIC_SLAVE => self.pic.write(port(0xA0), value as u8),
            region::ELCR => self.pic.write(port(0x4D0), value as u8),
            region::PIT => self.pit.write(port(0x40), value as u8, now),
            region::PORT61 => self.pit.write(0x61, value as u8, now),
            region::RTC => self.rtc.write(port(0x70), value as u8, now),
            region::IOAPIC => {
                let msgs = self.ioapic.write(offset, size, value as u32);
                self.deliver(&msgs);
            }
            region::LAPIC => {
                let fx = self.lapic.mmio_write(offset, size, value as u32, now);
                self.apic_effects(fx);
            }
            _ => {}
        }
        // A timer register written: its state is current as of `now`.
        self.advance(now, self.guest_tsc);
    }

    fn state_version(&self) -> u32 {
        <state::PlatformWire as crate::vmstate::VmState>::VERSION
    }

    fn load(
        &mut self,
        _ctx: &mut DeviceCtx,
        version: u32,
        data: &[u8],
    ) -> Result<(), crate::devices::StateError> {
        let w: state::PlatformWire = crate::vmstate::load(data, version)?;
        let mut copy = self.clone();
        w.apply(&mut copy)
            .map_err(crate::devices::StateError::Invalid)?;
        *self = copy;
        Ok(())
    }

    fn save_described(&self) -> Option<(alloc::vec::Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut state::PlatformWire::of(self)).ok()
    }

    fn duplicate(&self) -> Option<alloc::boxed::Box<dyn Device>> {
        Some(alloc::boxed::Box::new(self.clone()))
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

/// The platform's interrupt lines as raised by the other devices.
pub fn route(p: &mut Platform, lines: &[(u8, LineLevel)], msis: &[ApicMessage]) {
    for &(gsi, level) in lines {
        p.set_gsi(gsi, level);
    }
    p.deliver(msis);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Harness;

    const TSC_HZ: u64 = 1_000_000_000;

    fn out(h: &mut Harness, p: &mut Platform, r: RegionIndex, off: u64, v: u64) {
        h.write(p, r, off, 1, v);
    }

    #[test]
    fn pit_reaches_the_cpu_through_the_pic_only_when_unmasked() {
        let mut h = Harness::new();
        let mut p = Platform::new(TSC_HZ, 0);
        // Firmware state: everything masked, so the running PIT is no
        // reason to wake a halted vCPU.
        assert_eq!(p.next_event(0), None);
        // Rate generator, 1193 clocks (about 1 ms).
        out(&mut h, &mut p, region::PIT, 3, 0b0011_0100);
        out(&mut h, &mut p, region::PIT, 0, 1193 & 0xFF);
        out(&mut h, &mut p, region::PIT, 0, 1193 >> 8);
        out(&mut h, &mut p, region::PIC_MASTER, 1, 0xFE);
        let t = p.next_event(0).expect("IRQ 0 unmasked: a wake-up time");
        assert!((999_000..1_001_000).contains(&t), "{t}");
        p.advance(t - 1, 0);
        assert!(!p.interrupt_pending());
        p.advance(t, 0);
        assert!(p.interrupt_pending());
        // Vector base 0x08 (the firmware's), line 0.
        assert_eq!(p.acknowledge(), Some(0x08));
        assert_eq!((p.stats.delivered, p.stats.via_pic), (1, 1));
        assert!(!p.interrupt_pending(), "in service until EOI");
    }

    #[test]
    fn ioapic_pin_2_delivers_to_the_local_apic_and_level_eoi_goes_back() {
        let mut h = Harness::new();
        let mut p = Platform::new(TSC_HZ, 0);
        // Software-enable the APIC.
        h.write(&mut p, region::LAPIC, 0xF0, 4, 0x1FF);
        // Pin 5: vector 0x45, level-triggered, active high, to APIC 0.
        h.write(&mut p, region::IOAPIC, 0, 4, 0x10 + 2 * 5);
        h.write(&mut p, region::IOAPIC, 0x10, 4, 0x45 | (1 << 15));
        h.write(&mut p, region::IOAPIC, 0, 4, 0x10 + 2 * 5 + 1);
        h.write(&mut p, region::IOAPIC, 0x10, 4, 0);
        route(&mut p, &[(5, LineLevel::High)], &[]);
        assert_eq!(p.acknowledge(), Some(0x45));
        // Still asserted: the EOI broadcast makes the I/O APIC deliver again.
        h.write(&mut p, region::LAPIC, 0xB0, 4, 0);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(0x45));
        route(&mut p, &[(5, LineLevel::Low)], &[]);
        h.write(&mut p, region::LAPIC, 0xB0, 4, 0);
        assert!(!p.interrupt_pending(), "deasserted: no more deliveries");
        assert_eq!(p.stats.apic_messages, 2);
    }

    #[test]
    fn msis_and_apic_timer_wake_ups() {
        let mut h = Harness::new();
        let mut p = Platform::new(TSC_HZ, 0);
        h.write(&mut p, region::LAPIC, 0xF0, 4, 0x1FF);
        let msi = ApicMessage {
            vector: 0x61,
            delivery: crate::irq::DeliveryMode::Fixed,
            level: false,
            dest: 0,
            logical: false,
        };
        let other = ApicMessage { dest: 3, ..msi };
        route(&mut p, &[], &[other]);
        assert!(!p.interrupt_pending(), "another APIC's message");
        route(&mut p, &[], &[msi]);
        assert_eq!(p.acknowledge(), Some(0x61));
        // One-shot timer, divide by 1, 5000 ns.
        h.write(&mut p, region::LAPIC, 0x3E0, 4, 0xB);
        h.write(&mut p, region::LAPIC, 0x320, 4, 0x30);
        h.write(&mut p, region::LAPIC, 0x380, 4, 5000);
        assert_eq!(p.next_event(0), Some(5000));
        p.advance(4999, 0);
        p.advance(5000, 0);
        // 0x30 is a lower class than 0x61, still in service: held back.
        assert!(!p.interrupt_pending());
        assert_eq!(p.acknowledge(), None);
        h.write(&mut p, region::LAPIC, 0xB0, 4, 0);
        assert!(p.interrupt_pending());
        assert_eq!(p.acknowledge(), Some(0x30));
    }
}
