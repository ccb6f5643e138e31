//! The PC's cascaded 8259A pair (Intel 8259A datasheet, order 231468):
//! master at ports 0x20/0x21, slave at 0xA0/0xA1 on the master's IR2, and
//! the chipset's ELCR registers (ports 0x4D0/0x4D1, PIIX/ICH) that make a
//! line level- instead of edge-triggered.
//!
//! Not emulated: special fully nested mode, single (uncascaded) mode,
//! buffered mode, the 8080/85 call format (µPM = 0) and ICW1's LTIM bit
//! (trigger modes come from the ELCR only, as on PIIX). The master's IR2
//! follows the slave's INT output as a level, so a slave request is never
//! lost to the edge detector, and ISA IRQ 2 (the cascade) cannot be raised.

use super::LineLevel;

/// Lines 0, 1 and 2 of the master and 8 and 13 (slave bits 0 and 5) are
/// edge-only; the ELCR bits for them are read-only 0.
const ELCR_MASK: [u8; 2] = [0xF8, 0xDE];
/// The cascade input on the master.
const CASCADE_LINE: u8 = 2;

/// One 8259A's registers; the save/load format.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PicChipState {
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// Input levels last seen, for edge detection.
    pub inputs: u8,
    /// ICW2: vector of IR0 (bits 7:3).
    pub base: u8,
    /// Rotation: line `(p + priority_add) & 7` has priority `p`, 0 highest.
    pub priority_add: u8,
    /// OCW3 RR/RIS: port 0 reads ISR instead of IRR.
    pub read_isr: bool,
    /// OCW3 P: the next read is a poll.
    pub poll: bool,
    /// OCW3 SMM: special mask mode.
    pub special_mask: bool,
    /// 0 = operating; 1, 2, 3 = waiting for ICW2, ICW3, ICW4.
    pub init_state: u8,
    /// ICW1 IC4: an ICW4 follows.
    pub icw4: bool,
    /// ICW1 SNGL: no ICW3 follows.
    pub single: bool,
    /// ICW4 AEOI.
    pub auto_eoi: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_on_aeoi: bool,
    /// Edge/level control (1 = level).
    pub elcr: u8,
}

impl PicChipState {
    /// The priority level (0 highest) of the most urgent line in `mask`.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
    }

    /// The line this chip presents on INT: an unmasked request of higher
    /// priority than everything in service (datasheet, "fully nested").
    fn pending(&self) -> Option<u8> {
        let req = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        match self.highest(in_service) {
            Some(cur) if cur <= req => None,
            _ => Some((req + self.priority_add) & 7),
        }
    }

    fn set_input(&mut self, line: u8, high: bool) {
        let bit = 1u8 << (line & 7);
        if self.elcr & bit != 0 {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && self.inputs & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.inputs |= bit;
        } else {
            self.inputs &= !bit;
        }
    }

    /// The second INTA pulse for `line`: IRR to ISR (level requests stay
    /// in IRR while the line is high).
    fn intack(&mut self, line: u8) {
        let bit = 1u8 << (line & 7);
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// A poll command read: acknowledges like INTA, returns I (bit 7) and
    /// the line.
    fn poll_read(&mut self) -> u8 {
        match self.pending() {
            Some(line) => {
                self.intack(line);
                0x80 | line
            }
            None => 0,
        }
    }

    fn read(&mut self, cmd_port: bool) -> u8 {
        if self.poll {
            self.poll = false;
            return self.poll_read();
        }
        match (cmd_port, self.read_isr) {
            (true, true) => self.isr,
            (true, false) => self.irr,
            (false, _) => self.imr,
        }
    }

    fn write_cmd(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: IMR, ISR, rotation, SMM cleared; status read is IRR;
            // the edge detector is reset, so a line already high must go
            // low and high again.
            *self = Self {
                irr: self.inputs & self.elcr,
                inputs: self.inputs,
                elcr: self.elcr,
                init_state: 1,
                icw4: v & 0x01 != 0,
                single: v & 0x02 != 0,
                ..Self::default()
            };
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 0x01 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2: R, SL, EOI in bits 7:5, level in 2:0.
            let line = v & 7;
            match v >> 5 {
                0b000 => self.rotate_on_aeoi = false,
                0b100 => self.rotate_on_aeoi = true,
                op @ (0b001 | 0b101) => {
                    if let Some(p) = self.highest(self.isr) {
                        let served = (p + self.priority_add) & 7;
                        self.isr &= !(1 << served);
                        if op == 0b101 {
                            self.priority_add = (served + 1) & 7;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << line),
                0b111 => {
                    self.isr &= !(1 << line);
                    self.priority_add = (line + 1) & 7;
                }
                0b110 => self.priority_add = (line + 1) & 7,
                _ => {} // 0b010: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        self.init_state = match self.init_state {
            1 => {
                self.base = v & 0xF8;
                match (self.single, self.icw4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                }
            }
            // ICW3: the PC's wiring is fixed (slave on IR2, ID 2).
            2 if self.icw4 => 3,
            2 => 0,
            3 => {
                self.auto_eoi = v & 0x02 != 0;
                0
            }
            _ => {
                self.imr = v;
                0
            }
        };
    }

    fn write_elcr(&mut self, v: u8, mask: u8) {
        self.elcr = v & mask;
        // A level line's request follows its input from now on.
        self.irr = (self.irr & !self.elcr) | (self.inputs & self.elcr);
    }

    /// Makes a loaded state one the chip could be in.
    fn sanitize(&mut self, elcr_mask: u8) {
        self.base &= 0xF8;
        self.priority_add &= 7;
        self.elcr &= elcr_mask;
        if self.init_state > 3 {
            self.init_state = 0;
        }
    }
}

/// Both 8259As; the save/load format of [`Pic`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PicState {
    pub master: PicChipState,
    pub slave: PicChipState,
}

/// The cascaded 8259A pair with its ELCR registers.
#[derive(Clone, Debug, Default)]
pub struct Pic {
    master: PicChipState,
    slave: PicChipState,
}

impl Pic {
    /// The pair after power-on (as QEMU resets it): every register 0,
    /// nothing masked, vector bases 0, all lines edge-triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// The master's IR2 is the slave's INT output.
    fn cascade(&mut self) {
        let out = self.slave.pending().is_some();
        let bit = 1u8 << CASCADE_LINE;
        if out {
            self.master.irr |= bit;
            self.master.inputs |= bit;
        } else {
            self.master.irr &= !bit;
            self.master.inputs &= !bit;
        }
    }

    /// Reads an I/O port; ports other than the PICs' and the ELCRs' read
    /// 0xFF.
    pub fn read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 | 0x21 => self.master.read(port == 0x20),
            0xA0 | 0xA1 => self.slave.read(port == 0xA0),
            0x4D0 => self.master.elcr,
            0x4D1 => self.slave.elcr,
            _ => 0xFF,
        };
        // A poll read acknowledges.
        self.cascade();
        v
    }

    /// Writes an I/O port; other ports are ignored.
    pub fn write(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.master.write_cmd(v),
            0x21 => self.master.write_data(v),
            0xA0 => self.slave.write_cmd(v),
            0xA1 => self.slave.write_data(v),
            0x4D0 => self.master.write_elcr(v, ELCR_MASK[0]),
            0x4D1 => self.slave.write_elcr(v, ELCR_MASK[1]),
            _ => {}
        }
        self.cascade();
    }

    /// Drives ISA line `line` (0..=15). An edge-triggered line latches a
    /// request on a rising edge; a level-triggered one requests while
    /// high. Line 2 (the cascade) and lines above 15 are ignored.
    pub fn set_irq(&mut self, line: u8, level: LineLevel) {
        let high = level == LineLevel::High;
        match line {
            CASCADE_LINE => {}
            0..=7 => self.master.set_input(line, high),
            8..=15 => self.slave.set_input(line - 8, high),
            _ => {}
        }
        self.cascade();
    }

    /// The master's INT pin: the CPU should run an INTA cycle.
    /// Whether ISA line `line` (0-15) is masked: at its chip, or for the
    /// slave's lines also at the master's cascade input.
    pub fn line_masked(&self, line: u8) -> bool {
        match line {
            0..=7 => self.master.imr & (1 << line) != 0,
            8..=15 => self.slave.imr & (1 << (line - 8)) != 0 || self.master.imr & (1 << 2) != 0,
            _ => true,
        }
    }

    pub fn output(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The INTA cycle: the vector of the most urgent request, moved from
    /// IRR to ISR (unless AEOI). With nothing to serve the 8259A answers
    /// IR7 of the chip that has none (spurious IRQ 7 or 15) and sets no
    /// ISR bit on that chip.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.pending() {
            Some(CASCADE_LINE) => {
                let v = match self.slave.pending() {
                    Some(line) => {
                        self.slave.intack(line);
                        self.slave.base | line
                    }
                    None => self.slave.base | 7,
                };
                self.master.intack(CASCADE_LINE);
                v
            }
            Some(line) => {
                self.master.intack(line);
                self.master.base | line
            }
            None => self.master.base | 7,
        };
        self.cascade();
        vector
    }

    /// The ICW2 vector bases of master and slave.
    pub fn vector_base(&self) -> (u8, u8) {
        (self.master.base, self.slave.base)
    }

    /// All registers, for migration.
    pub fn save(&self) -> PicState {
        PicState {
            master: self.master.clone(),
            slave: self.slave.clone(),
        }
    }

    /// Restores registers saved by [`save`](Self::save); values no 8259A
    /// can hold are cut down to ones it can.
    pub fn load(&mut self, s: &PicState) {
        self.master = s.master.clone();
        self.slave = s.slave.clone();
        self.master.sanitize(ELCR_MASK[0]);
        self.slave.sanitize(ELCR_MASK[1]);
        self.cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LineLevel::{High, Low};

    /// The sequence Linux's `init_8259A` and SeaBIOS use: edge, cascade,
    /// ICW4 with 8086 mode; master at `mbase`, slave at `sbase`.
    fn init(pic: &mut Pic, mbase: u8, sbase: u8, icw4: u8) {
        pic.write(0x20, 0x11);
        pic.write(0x21, mbase);
        pic.write(0x21, 0x04);
        pic.write(0x21, icw4);
        pic.write(0xA0, 0x11);
        pic.write(0xA1, sbase);
        pic.write(0xA1, 0x02);
        pic.write(0xA1, icw4);
    }

    fn pic() -> Pic {
        let mut p = Pic::new();
        init(&mut p, 0x20, 0x28, 0x01);
        p
    }

    fn isr(p: &mut Pic, cmd: u16) -> u8 {
        p.write(cmd, 0x0B);
        p.read(cmd)
    }

    fn irr(p: &mut Pic, cmd: u16) -> u8 {
        p.write(cmd, 0x0A);
        p.read(cmd)
    }

    fn pulse(p: &mut Pic, line: u8) {
        p.set_irq(line, High);
        p.set_irq(line, Low);
    }

    #[test]
    fn power_on_state() {
        let mut p = Pic::new();
        assert_eq!(p.vector_base(), (0, 0));
        assert_eq!(p.read(0x21), 0);
        assert_eq!(p.read(0xA1), 0);
        assert_eq!(p.read(0x4D0), 0);
        assert!(!p.output());
        assert_eq!(p.read(0x22), 0xFF);
        assert_eq!(p.read(0x60), 0xFF);
    }

    #[test]
    fn init_sequence_sets_bases_and_clears_mask() {
        let mut p = Pic::new();
        p.write(0x21, 0xFF);
        assert_eq!(p.read(0x21), 0xFF);
        // ICW2's low three bits are not part of the base.
        init(&mut p, 0x0F, 0x77, 0x01);
        assert_eq!(p.vector_base(), (0x08, 0x70));
        assert_eq!(p.read(0x21), 0, "ICW1 clears IMR");
        p.write(0x21, 0xFB);
        p.write(0xA1, 0xFF);
        assert_eq!((p.read(0x21), p.read(0xA1)), (0xFB, 0xFF));
    }

    #[test]
    fn init_without_icw4_and_single_mode() {
        let mut p = Pic::new();
        // ICW1 without IC4: ICW2, ICW3, then operating.
        p.write(0x20, 0x10);
        p.write(0x21, 0x40);
        p.write(0x21, 0x04);
        p.write(0x21, 0x12);
        assert_eq!(p.read(0x21), 0x12, "third byte is OCW1");
        // SNGL with IC4: ICW2 then ICW4 (AEOI), no ICW3.
        p.write(0x20, 0x13);
        p.write(0x21, 0x50);
        p.write(0x21, 0x03);
        p.write(0x21, 0x34);
        assert_eq!(p.vector_base().0, 0x50);
        assert_eq!(p.read(0x21), 0x34);
        p.write(0x21, 0);
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x53);
        assert_eq!(isr(&mut p, 0x20), 0, "AEOI from the ICW4 in the right slot");
    }

    #[test]
    fn edge_request_ack_eoi() {
        let mut p = pic();
        p.set_irq(1, High);
        assert!(p.output());
        assert_eq!(irr(&mut p, 0x20), 0x02);
        assert_eq!(p.acknowledge(), 0x21);
        assert!(!p.output());
        assert_eq!(isr(&mut p, 0x20), 0x02);
        assert_eq!(irr(&mut p, 0x20), 0x00);
        // Still high: no new edge, no new request.
        p.set_irq(1, High);
        assert_eq!(irr(&mut p, 0x20), 0x00);
        p.write(0x20, 0x20);
        assert_eq!(isr(&mut p, 0x20), 0);
        assert!(!p.output());
        p.set_irq(1, Low);
        p.set_irq(1, High);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x21);
    }

    #[test]
    fn edge_latched_request_survives_line_going_low() {
        let mut p = pic();
        pulse(&mut p, 4);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn fully_nested_priorities() {
        let mut p = pic();
        pulse(&mut p, 5);
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x23, "IR3 before IR5");
        assert!(!p.output(), "IR5 waits while IR3 is in service");
        pulse(&mut p, 1);
        assert!(p.output(), "IR1 preempts IR3");
        assert_eq!(p.acknowledge(), 0x21);
        assert_eq!(isr(&mut p, 0x20), 0x0A);
        // Non-specific EOI ends the highest in service: IR1.
        p.write(0x20, 0x20);
        assert_eq!(isr(&mut p, 0x20), 0x08);
        assert!(!p.output());
        p.write(0x20, 0x20);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x25);
    }

    #[test]
    fn specific_eoi() {
        let mut p = pic();
        pulse(&mut p, 3);
        p.acknowledge();
        pulse(&mut p, 1);
        p.acknowledge();
        assert_eq!(isr(&mut p, 0x20), 0x0A);
        p.write(0x20, 0x63); // specific EOI, level 3
        assert_eq!(isr(&mut p, 0x20), 0x02);
    }

    #[test]
    fn masked_request_waits_in_irr() {
        let mut p = pic();
        p.write(0x21, 0x10);
        pulse(&mut p, 4);
        assert!(!p.output());
        assert_eq!(irr(&mut p, 0x20), 0x10);
        p.write(0x21, 0x00);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn slave_through_cascade() {
        let mut p = pic();
        pulse(&mut p, 10);
        assert!(p.output());
        assert_eq!(irr(&mut p, 0x20), 0x04, "slave INT on master IR2");
        assert_eq!(p.acknowledge(), 0x2A);
        assert_eq!(isr(&mut p, 0x20), 0x04);
        assert_eq!(isr(&mut p, 0xA0), 0x04);
        // A lower-priority slave request waits for the slave's EOI...
        pulse(&mut p, 12);
        assert!(!p.output());
        p.write(0xA0, 0x20);
        assert_eq!(isr(&mut p, 0xA0), 0);
        // ...and for the master's, since IR2 is in service there.
        assert!(!p.output());
        p.write(0x20, 0x20);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x2C);
        // A master line above IR2 preempts the slave's service.
        pulse(&mut p, 0);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x20);
        assert_eq!(isr(&mut p, 0x20), 0x05);
    }

    #[test]
    fn slave_mask_hides_request_from_master() {
        let mut p = pic();
        p.write(0xA1, 0x01);
        pulse(&mut p, 8);
        assert!(!p.output());
        assert_eq!(irr(&mut p, 0xA0), 0x01);
        p.write(0xA1, 0x00);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x28);
        // Master mask on IR2 hides every slave line.
        p.write(0xA0, 0x20);
        p.write(0x20, 0x20);
        p.write(0x21, 0x04);
        pulse(&mut p, 15);
        assert!(!p.output());
    }

    #[test]
    fn cascade_line_cannot_be_raised() {
        let mut p = pic();
        p.set_irq(2, High);
        assert!(!p.output());
        p.set_irq(16, High);
        p.set_irq(255, High);
        assert!(!p.output());
        assert_eq!(irr(&mut p, 0x20), 0);
        assert_eq!(irr(&mut p, 0xA0), 0);
    }

    #[test]
    fn spurious_irq7() {
        let mut p = pic();
        pulse(&mut p, 4);
        // Masked between INTR and INTA: the master answers IR7.
        p.write(0x21, 0x10);
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(isr(&mut p, 0x20), 0, "no ISR bit for a spurious IRQ");
        assert_eq!(irr(&mut p, 0x20), 0x10, "the real request still waits");
    }

    #[test]
    fn elcr_masks_and_level_lines() {
        let mut p = pic();
        p.write(0x4D0, 0xFF);
        p.write(0x4D1, 0xFF);
        assert_eq!(p.read(0x4D0), 0xF8, "lines 0, 1, 2 are edge-only");
        assert_eq!(p.read(0x4D1), 0xDE, "lines 8 and 13 are edge-only");
        p.write(0x4D0, 0x00);
        p.write(0x4D1, 0x08); // line 11 level
        p.set_irq(11, High);
        assert_eq!(p.acknowledge(), 0x2B);
        assert_eq!(irr(&mut p, 0xA0), 0x08, "a level request stays in IRR");
        p.write(0xA0, 0x20);
        p.write(0x20, 0x20);
        assert!(p.output(), "still high after EOI: requested again");
        p.set_irq(11, Low);
        assert!(!p.output());
        assert_eq!(irr(&mut p, 0xA0), 0);
        // An edge line 12 latched and then released still requests.
        pulse(&mut p, 12);
        assert!(p.output());
    }

    #[test]
    fn elcr_switch_takes_the_input_level() {
        let mut p = pic();
        pulse(&mut p, 9);
        assert_eq!(irr(&mut p, 0xA0), 0x02);
        // Made level while the input is low: the latched edge is dropped.
        p.write(0x4D1, 0x02);
        assert_eq!(irr(&mut p, 0xA0), 0x00);
        assert!(!p.output());
    }

    #[test]
    fn auto_eoi() {
        let mut p = Pic::new();
        init(&mut p, 0x08, 0x70, 0x03);
        pulse(&mut p, 6);
        assert_eq!(p.acknowledge(), 0x0E);
        assert_eq!(isr(&mut p, 0x20), 0);
        pulse(&mut p, 7);
        assert!(p.output(), "no EOI needed");
        assert_eq!(p.acknowledge(), 0x0F);
        pulse(&mut p, 13);
        assert_eq!(p.acknowledge(), 0x75);
        assert_eq!((isr(&mut p, 0x20), isr(&mut p, 0xA0)), (0, 0));
    }

    #[test]
    fn rotate_on_aeoi() {
        let mut p = Pic::new();
        init(&mut p, 0x08, 0x70, 0x03);
        p.write(0x20, 0x80); // rotate in AEOI mode
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x0B);
        // IR3 is now lowest: IR4 beats IR0.
        pulse(&mut p, 0);
        pulse(&mut p, 4);
        assert_eq!(p.acknowledge(), 0x0C);
        // IR4 lowest now: IR0 is next anyway, then clear the rotate mode.
        p.write(0x20, 0x00);
        assert_eq!(p.acknowledge(), 0x08);
        // Still IR5 highest; had IR0 rotated, IR1 would be.
        pulse(&mut p, 1);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x0D);
    }

    #[test]
    fn set_priority_and_rotate_on_eoi() {
        let mut p = pic();
        // Lowest = IR4: order 5, 6, 7, 0, 1, 2, 3, 4.
        p.write(0x20, 0xC4);
        pulse(&mut p, 1);
        pulse(&mut p, 6);
        assert_eq!(p.acknowledge(), 0x26);
        assert!(!p.output(), "IR1 is below IR6 now");
        // Rotate on non-specific EOI: IR6 becomes lowest, IR7 highest.
        p.write(0x20, 0xA0);
        assert_eq!(isr(&mut p, 0x20), 0);
        pulse(&mut p, 7);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x27);
        assert!(!p.output(), "IR1 (level 2) and IR5 (level 6) wait for IR7");
        p.write(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x21);
    }

    #[test]
    fn rotate_on_specific_eoi() {
        let mut p = pic();
        pulse(&mut p, 3);
        p.acknowledge();
        // Rotate on specific EOI for 3: IR3 lowest, IR4 highest.
        p.write(0x20, 0xE3);
        assert_eq!(isr(&mut p, 0x20), 0);
        pulse(&mut p, 0);
        pulse(&mut p, 4);
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn poll_mode() {
        let mut p = pic();
        p.write(0x21, 0x80);
        p.write(0x20, 0x0C);
        assert_eq!(p.read(0x20), 0x00, "nothing requested");
        pulse(&mut p, 5);
        p.write(0x20, 0x0C);
        assert_eq!(p.read(0x21), 0x85, "poll works on either port");
        assert_eq!(isr(&mut p, 0x20), 0x20, "a poll acknowledges");
        assert_eq!(p.read(0x21), 0x80, "only one read is a poll");
    }

    #[test]
    fn poll_through_cascade() {
        let mut p = pic();
        pulse(&mut p, 14);
        p.write(0x20, 0x0C);
        assert_eq!(p.read(0x20), 0x82);
        p.write(0xA0, 0x0C);
        assert_eq!(p.read(0xA0), 0x86);
        assert_eq!(isr(&mut p, 0xA0), 0x40);
        assert!(!p.output());
    }

    #[test]
    fn special_mask_mode() {
        let mut p = pic();
        pulse(&mut p, 3);
        p.acknowledge();
        p.write(0x21, 0x08); // mask IR3, which is in service
        p.write(0x20, 0x68); // set special mask mode
        pulse(&mut p, 5);
        assert!(p.output(), "IR5 allowed while masked IR3 is in service");
        assert_eq!(p.acknowledge(), 0x25);
        p.write(0x20, 0x48); // reset special mask mode
        pulse(&mut p, 6);
        assert!(!p.output());
    }

    #[test]
    fn icw1_resets_state_and_edge_detector() {
        let mut p = pic();
        p.set_irq(1, High);
        p.acknowledge();
        p.write(0x20, 0xC4);
        pulse(&mut p, 3);
        init(&mut p, 0x20, 0x28, 0x01);
        assert_eq!(isr(&mut p, 0x20), 0);
        assert_eq!(irr(&mut p, 0x20), 0, "edge requests are dropped");
        // IR1 still high: it needs a new edge.
        p.set_irq(1, High);
        assert!(!p.output());
        p.set_irq(1, Low);
        pulse(&mut p, 1);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x21, "rotation reset: IR1 before IR5");
    }

    #[test]
    fn save_load_round_trip() {
        let mut p = pic();
        p.write(0x4D1, 0x08);
        p.set_irq(11, High);
        pulse(&mut p, 3);
        p.acknowledge();
        p.write(0x21, 0x40);
        let s = p.save();
        let mut q = Pic::new();
        q.load(&s);
        assert_eq!(q.save(), s);
        assert_eq!(q.vector_base(), (0x20, 0x28));
        assert_eq!(q.acknowledge(), p.acknowledge());
        assert_eq!(q.save(), p.save());
    }

    #[test]
    fn load_cuts_impossible_values() {
        let s = PicState {
            master: PicChipState {
                base: 0xFF,
                priority_add: 0xF8,
                init_state: 0xFF,
                elcr: 0xFF,
                irr: 0xFF,
                ..PicChipState::default()
            },
            slave: PicChipState {
                elcr: 0xFF,
                ..PicChipState::default()
            },
        };
        let mut p = Pic::new();
        p.load(&s);
        assert_eq!(p.vector_base(), (0xF8, 0));
        assert_eq!(p.read(0x4D0), 0xF8);
        assert_eq!(p.read(0x4D1), 0xDE);
        assert_eq!(p.acknowledge(), 0xF8, "IR0 highest");
        // IR2 follows the (idle) slave, whatever the stream said.
        assert_eq!(irr(&mut p, 0x20), 0xFA);
    }
}
