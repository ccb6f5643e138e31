//! The I/O APIC (Intel 82093AA datasheet, order 290566; EOI register of
//! version 0x20 as in the ICH datasheets): 24 pins, registers reached
//! through IOREGSEL (offset 0x00) and IOWIN (offset 0x10) of the MMIO
//! block at [`IOAPIC_BASE`], and the EOI register at offset 0x40.
//!
//! `set_irq` takes a pin's electrical level; a redirection entry with
//! polarity low-active (bit 13) treats Low as asserted. Interrupts are
//! delivered at once, so delivery status (bit 12) always reads 0.
//!
//! Not emulated: the 82093AA's bus arbitration (the arbitration register
//! reads the ID), bits 55:17 of a redirection entry (reserved, read 0),
//! interrupt storm detection. An entry with the reserved delivery mode
//! 0b011 delivers nothing.

use super::{ApicMessage, DeliveryMode, LineLevel};
use alloc::vec::Vec;

/// The I/O APIC's MMIO address in a PC.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// IOAPICVER: version 0x20, maximum redirection entry 23.
const VERSION: u32 = 0x20 | ((IOAPIC_PINS as u32 - 1) << 16);

const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDIR: u8 = 0x10;

const OFF_IOREGSEL: u64 = 0x00;
const OFF_IOWIN: u64 = 0x10;
const OFF_EOI: u64 = 0x40;

// Redirection entry bits (82093AA, 3.2.4).
const POLARITY_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Vector, delivery mode, destination mode, polarity, trigger, mask,
/// destination.
const WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

/// The I/O APIC's registers and pin levels; the save/load format of
/// [`IoApic`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IoApicState {
    /// IOAPICID bits 27:24.
    pub id: u8,
    pub ioregsel: u8,
    pub redir: [u64; IOAPIC_PINS],
    /// Electrical level of each pin, bit n = pin n.
    pub pin_level: u32,
}

/// The I/O APIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    s: IoApicState,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// After reset: ID 0, every entry masked (82093AA, 3.2.4).
    pub fn new() -> Self {
        Self {
            s: IoApicState {
                redir: [MASKED; IOAPIC_PINS],
                ..IoApicState::default()
            },
        }
    }

    fn asserted(&self, pin: usize) -> bool {
        let high = self.s.pin_level & (1 << pin) != 0;
        let low_active = self.s.redir[pin] & POLARITY_LOW != 0;
        high != low_active
    }

    fn message(entry: u64) -> Option<ApicMessage> {
        Some(ApicMessage {
            vector: entry as u8,
            delivery: DeliveryMode::from_bits((entry >> 8) as u8 & 7)?,
            level: entry & TRIGGER_LEVEL != 0,
            dest: (entry >> 56) as u32,
            logical: entry & (1 << 11) != 0,
        })
    }

    /// Delivers a level-triggered pin's interrupt if it is asserted,
    /// unmasked and not already waiting for an EOI.
    fn service_level(&mut self, pin: usize, out: &mut Vec<ApicMessage>) {
        let entry = self.s.redir[pin];
        if entry & (TRIGGER_LEVEL | MASKED | REMOTE_IRR) != TRIGGER_LEVEL || !self.asserted(pin) {
            return;
        }
        if let Some(m) = Self::message(entry) {
            self.s.redir[pin] |= REMOTE_IRR;
            out.push(m);
        }
    }

    /// Reads the MMIO block at `offset`; IOWIN and EOI need 32-bit
    /// accesses, other accesses read 0.
    pub fn read(&mut self, offset: u64, size: u8) -> u32 {
        match offset {
            OFF_IOREGSEL => u32::from(self.s.ioregsel),
            OFF_IOWIN if size == 4 => self.read_reg(self.s.ioregsel),
            _ => 0,
        }
    }

    fn read_reg(&self, reg: u8) -> u32 {
        match reg {
            REG_ID | REG_ARB => u32::from(self.s.id) << 24,
            REG_VER => VERSION,
            _ => match self.redir_index(reg) {
                Some((pin, true)) => (self.s.redir[pin] >> 32) as u32,
                Some((pin, false)) => self.s.redir[pin] as u32,
                None => 0,
            },
        }
    }

    /// Pin and high-half flag of a redirection register.
    fn redir_index(&self, reg: u8) -> Option<(usize, bool)> {
        let i = usize::from(reg.checked_sub(REG_REDIR)?);
        (i < 2 * IOAPIC_PINS).then_some((i / 2, i % 2 == 1))
    }

    /// Writes the MMIO block; returns the interrupts this delivers (an
    /// unmasked level pin that is asserted, an EOI).
    pub fn write(&mut self, offset: u64, size: u8, v: u32) -> Vec<ApicMessage> {
        let mut out = Vec::new();
        match offset {
            OFF_IOREGSEL => self.s.ioregsel = v as u8,
            OFF_IOWIN if size == 4 => self.write_reg(self.s.ioregsel, v, &mut out),
            OFF_EOI if size == 4 => out = self.eoi(v as u8),
            _ => {}
        }
        out
    }

    fn write_reg(&mut self, reg: u8, v: u32, out: &mut Vec<ApicMessage>) {
        if reg == REG_ID {
            self.s.id = (v >> 24) as u8 & 0x0F;
            return;
        }
        let Some((pin, high)) = self.redir_index(reg) else {
            return; // version and arbitration are read-only
        };
        let old = self.s.redir[pin];
        let new = if high {
            (old & 0xFFFF_FFFF) | (u64::from(v) << 32)
        } else {
            (old & !0xFFFF_FFFF) | u64::from(v)
        };
        let mut entry = (new & WRITABLE) | (old & REMOTE_IRR);
        if entry & TRIGGER_LEVEL == 0 {
            // Remote IRR means nothing for an edge-triggered pin.
            entry &= !REMOTE_IRR;
        }
        self.s.redir[pin] = entry;
        self.service_level(pin, out);
    }

    /// Drives pin `pin` (0..=23; others are ignored). An edge-triggered
    /// pin delivers when it becomes asserted if unmasked (a masked edge is
    /// lost, 82093AA 3.2.4); a level-triggered pin delivers while asserted
    /// unless masked or its remote IRR is set.
    pub fn set_irq(&mut self, pin: u8, level: LineLevel) -> Vec<ApicMessage> {
        let mut out = Vec::new();
        let pin = usize::from(pin);
        if pin >= IOAPIC_PINS {
            return out;
        }
        let was = self.asserted(pin);
        match level {
            LineLevel::High => self.s.pin_level |= 1 << pin,
            LineLevel::Low => self.s.pin_level &= !(1 << pin),
        }
        let entry = self.s.redir[pin];
        if entry & TRIGGER_LEVEL != 0 {
            self.service_level(pin, &mut out);
        } else if !was && self.asserted(pin) && entry & MASKED == 0 {
            out.extend(Self::message(entry));
        }
        out
    }

    /// The EOI for `vector` that a local APIC broadcasts (or the guest
    /// writes to the EOI register): clears remote IRR of level entries
    /// with that vector and delivers again those still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<ApicMessage> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let entry = self.s.redir[pin];
            if entry as u8 == vector && entry & REMOTE_IRR != 0 {
                self.s.redir[pin] &= !REMOTE_IRR;
                self.service_level(pin, &mut out);
            }
        }
        out
    }

    /// Whether pin `pin`'s redirection entry is masked (pins past the
    /// last are).
    pub fn pin_masked(&self, pin: u8) -> bool {
        self.s
            .redir
            .get(usize::from(pin))
            .is_none_or(|e| e & (1 << 16) != 0)
    }

    /// All registers, for migration.
    pub fn save(&self) -> IoApicState {
        self.s.clone()
    }

    /// Restores registers saved by [`save`](Self::save), dropping bits no
    /// I/O APIC holds. Delivers nothing: a level pin that was waiting for
    /// its EOI still is.
    pub fn load(&mut self, s: &IoApicState) {
        self.s = s.clone();
        self.s.id &= 0x0F;
        self.s.pin_level &= (1 << IOAPIC_PINS) - 1;
        for e in &mut self.s.redir {
            *e &= WRITABLE | REMOTE_IRR;
            if *e & TRIGGER_LEVEL == 0 {
                *e &= !REMOTE_IRR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LineLevel::{High, Low};

    fn reg_write(a: &mut IoApic, reg: u8, v: u32) -> Vec<ApicMessage> {
        a.write(OFF_IOREGSEL, 4, u32::from(reg));
        a.write(OFF_IOWIN, 4, v)
    }

    fn reg_read(a: &mut IoApic, reg: u8) -> u32 {
        a.write(OFF_IOREGSEL, 4, u32::from(reg));
        a.read(OFF_IOWIN, 4)
    }

    /// Programs pin `pin` (high half first, as Linux does).
    fn route(a: &mut IoApic, pin: u8, lo: u32, hi: u32) -> Vec<ApicMessage> {
        reg_write(a, 0x11 + 2 * pin, hi);
        reg_write(a, 0x10 + 2 * pin, lo)
    }

    fn fixed(vector: u8, level: bool, dest: u32) -> ApicMessage {
        ApicMessage {
            vector,
            delivery: DeliveryMode::Fixed,
            level,
            dest,
            logical: false,
        }
    }

    #[test]
    fn id_version_arbitration() {
        let mut a = IoApic::new();
        assert_eq!(reg_read(&mut a, 0x01), 0x0017_0020);
        assert_eq!(reg_read(&mut a, 0x00), 0);
        reg_write(&mut a, 0x00, 0x0A00_0000);
        assert_eq!(reg_read(&mut a, 0x00), 0x0A00_0000);
        assert_eq!(reg_read(&mut a, 0x02), 0x0A00_0000);
        reg_write(&mut a, 0x00, 0xFFFF_FFFF);
        assert_eq!(reg_read(&mut a, 0x00), 0x0F00_0000, "4-bit ID");
        reg_write(&mut a, 0x01, 0);
        assert_eq!(reg_read(&mut a, 0x01), 0x0017_0020, "read-only");
    }

    #[test]
    fn reset_masks_all_and_selector_reads_back() {
        let mut a = IoApic::new();
        for pin in 0..24u8 {
            assert_eq!(reg_read(&mut a, 0x10 + 2 * pin), 0x0001_0000);
            assert_eq!(reg_read(&mut a, 0x11 + 2 * pin), 0);
        }
        assert_eq!(a.read(OFF_IOREGSEL, 4), 0x3F);
        // Past the table (0x40 = entry 24) and unknown registers read 0.
        assert_eq!(reg_read(&mut a, 0x40), 0);
        assert_eq!(reg_read(&mut a, 0xFF), 0);
        assert_eq!(reg_read(&mut a, 0x03), 0);
        // IOWIN needs 32-bit accesses.
        a.write(OFF_IOREGSEL, 1, 0x01);
        assert_eq!(a.read(OFF_IOWIN, 1), 0);
        assert_eq!(a.read(OFF_IOWIN, 4), 0x0017_0020);
        assert_eq!(a.read(0x20, 4), 0);
    }

    #[test]
    fn redirection_entry_fields() {
        let mut a = IoApic::new();
        // Vector 0x31, lowest priority (001), logical, low-active, level,
        // plus delivery status and remote IRR, which are read-only.
        let lo = 0x31 | 1 << 8 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15;
        // The pin idles high, as a low-active line does.
        assert!(a.set_irq(5, High).is_empty(), "masked");
        assert!(route(&mut a, 5, lo, 0xFFFF_FFFF).is_empty());
        assert_eq!(reg_read(&mut a, 0x1A), 0x0000_A931);
        assert_eq!(reg_read(&mut a, 0x1B), 0xFF00_0000, "only bits 63:56");
        // Pin 5 low-active and level: low is asserted.
        let m = a.set_irq(5, Low);
        assert_eq!(
            m,
            [ApicMessage {
                vector: 0x31,
                delivery: DeliveryMode::LowestPriority,
                level: true,
                dest: 0xFF,
                logical: true,
            }]
        );
        assert_eq!(reg_read(&mut a, 0x1A), 0x0000_E931, "remote IRR set");
        assert!(a.set_irq(5, High).is_empty());
    }

    #[test]
    fn edge_pin() {
        let mut a = IoApic::new();
        route(&mut a, 4, 0x24, 0x0300_0000);
        assert_eq!(a.set_irq(4, High), [fixed(0x24, false, 3)]);
        assert!(a.set_irq(4, High).is_empty(), "no edge");
        assert!(a.set_irq(4, Low).is_empty());
        assert_eq!(a.set_irq(4, High), [fixed(0x24, false, 3)]);
        assert_eq!(reg_read(&mut a, 0x18), 0x24, "no remote IRR on edge pins");
        assert!(a.eoi(0x24).is_empty());
    }

    #[test]
    fn masked_edge_is_lost() {
        let mut a = IoApic::new();
        route(&mut a, 1, 0x0001_0021, 0);
        assert!(a.set_irq(1, High).is_empty());
        assert!(
            route(&mut a, 1, 0x21, 0).is_empty(),
            "unmasking delivers nothing"
        );
        a.set_irq(1, Low);
        assert_eq!(a.set_irq(1, High), [fixed(0x21, false, 0)]);
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut a = IoApic::new();
        route(&mut a, 10, 0x8040, 0x0100_0000);
        let m = fixed(0x40, true, 1);
        assert_eq!(a.set_irq(10, High), [m]);
        assert_eq!(reg_read(&mut a, 0x24) & 0x4000, 0x4000);
        assert!(a.set_irq(10, High).is_empty(), "waits for EOI");
        assert!(a.eoi(0x41).is_empty(), "other vector");
        assert_eq!(a.eoi(0x40), [m], "still asserted: again");
        a.set_irq(10, Low);
        assert!(a.eoi(0x40).is_empty());
        assert_eq!(reg_read(&mut a, 0x24), 0x8040);
        assert_eq!(a.set_irq(10, High), [m]);
    }

    #[test]
    fn eoi_register() {
        let mut a = IoApic::new();
        // Low-active and the pin is low: asserted once unmasked.
        assert_eq!(route(&mut a, 16, 0xA050, 0).len(), 1);
        assert!(a.set_irq(16, Low).is_empty());
        assert!(a.write(OFF_EOI, 1, 0x50).is_empty(), "32-bit only");
        assert_eq!(a.write(OFF_EOI, 4, 0x50).len(), 1);
        a.set_irq(16, High);
        assert!(a.write(OFF_EOI, 4, 0x50).is_empty());
        assert_eq!(reg_read(&mut a, 0x30) & 0x4000, 0);
    }

    #[test]
    fn eoi_serves_every_entry_with_the_vector() {
        let mut a = IoApic::new();
        route(&mut a, 20, 0x8066, 0);
        route(&mut a, 21, 0x8066, 0x0200_0000);
        a.set_irq(20, High);
        a.set_irq(21, High);
        assert_eq!(a.eoi(0x66), [fixed(0x66, true, 0), fixed(0x66, true, 2)]);
    }

    #[test]
    fn unmasking_asserted_level_pin_delivers() {
        let mut a = IoApic::new();
        route(&mut a, 9, 0x0001_8039, 0);
        assert!(a.set_irq(9, High).is_empty(), "masked");
        assert_eq!(route(&mut a, 9, 0x8039, 0), [fixed(0x39, true, 0)]);
        // Rewriting the entry keeps remote IRR: no second delivery.
        assert!(route(&mut a, 9, 0x8039, 0).is_empty());
    }

    #[test]
    fn trigger_mode_changes() {
        let mut a = IoApic::new();
        route(&mut a, 3, 0x0001_0033, 0);
        a.set_irq(3, High);
        // Made level and unmasked while asserted: delivered.
        assert_eq!(route(&mut a, 3, 0x8033, 0), [fixed(0x33, true, 0)]);
        // Made edge: remote IRR cleared, nothing delivered.
        assert!(route(&mut a, 3, 0x0033, 0).is_empty());
        assert_eq!(reg_read(&mut a, 0x16), 0x33);
    }

    #[test]
    fn polarity_change_reevaluates_level_pin() {
        let mut a = IoApic::new();
        route(&mut a, 11, 0x8070, 0);
        assert!(a.set_irq(11, Low).is_empty());
        // Low-active now: the low pin is asserted.
        assert_eq!(route(&mut a, 11, 0xA070, 0), [fixed(0x70, true, 0)]);
    }

    #[test]
    fn other_delivery_modes() {
        let mut a = IoApic::new();
        route(&mut a, 0, 0x0700, 0);
        let m = a.set_irq(0, High);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].delivery, DeliveryMode::ExtInt);
        route(&mut a, 2, 0x0400, 0);
        assert_eq!(a.set_irq(2, High)[0].delivery, DeliveryMode::Nmi);
        // Reserved mode 011 on a level pin: nothing, and no remote IRR.
        route(&mut a, 6, 0x8300 | 0x46, 0);
        assert!(a.set_irq(6, High).is_empty());
        assert_eq!(reg_read(&mut a, 0x1C), 0x8346);
    }

    #[test]
    fn out_of_range_pins_ignored() {
        let mut a = IoApic::new();
        assert!(a.set_irq(24, High).is_empty());
        assert!(a.set_irq(255, High).is_empty());
        assert_eq!(a.save().pin_level, 0);
    }

    #[test]
    fn save_load_round_trip() {
        let mut a = IoApic::new();
        reg_write(&mut a, 0x00, 0x0200_0000);
        route(&mut a, 10, 0x8040, 0x0100_0000);
        a.set_irq(10, High);
        a.write(OFF_IOREGSEL, 4, 0x24);
        let s = a.save();
        let mut b = IoApic::new();
        b.load(&s);
        assert_eq!(b.save(), s);
        assert_eq!(b.read(OFF_IOWIN, 4), 0xC040);
        assert!(b.set_irq(10, High).is_empty(), "still waits for EOI");
        assert_eq!(b.eoi(0x40), a.eoi(0x40));
    }

    #[test]
    fn load_drops_impossible_bits() {
        let mut a = IoApic::new();
        a.load(&IoApicState {
            id: 0xFF,
            ioregsel: 0xFF,
            redir: [u64::MAX; IOAPIC_PINS],
            pin_level: u32::MAX,
        });
        let s = a.save();
        assert_eq!(s.id, 0x0F);
        assert_eq!(s.pin_level, 0x00FF_FFFF);
        assert_eq!(s.redir[0], 0xFF00_0000_0001_EFFF);
    }
}
