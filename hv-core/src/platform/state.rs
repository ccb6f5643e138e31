//! The platform's migratable state, described once with `vmstate!`: the
//! local APIC, the I/O APIC, the 8259 pair, the 8254 and the CMOS RTC, as
//! nested states of one `platform` section (QEMU's vmsd names for each).
//! Virtual time (`now`) travels with it, so timers keep their deadlines.

use super::Platform;
use crate::irq::ioapic::{IoApicState, IOAPIC_PINS};
use crate::irq::lapic::LapicState;
use crate::irq::pic::{PicChipState, PicState};
use crate::irq::pit::{PitChannelState, PitState};
use crate::irq::rtc::RtcState;
use crate::vmstate;
use crate::vmstate::VmStateHooks;
use alloc::vec::Vec;

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct ApicWire as "apic", version 1, minimum 1 {
        pub apic_base: u64,
        pub id: u32,
        pub tpr: u8,
        pub ldr: u32,
        pub dfr: u32,
        pub svr: u32,
        pub isr: [u32; 8],
        pub tmr: [u32; 8],
        pub irr: [u32; 8],
        pub esr: u32,
        pub esr_pending: u32,
        pub icr: u64,
        pub lvt: [u32; 6],
        pub timer_initial: u32,
        pub timer_divide: u32,
        pub timer_armed: bool,
        pub timer_anchor: u64,
        pub timer_anchor_count: u32,
        pub timer_next: u64,
        pub tsc_deadline: u64,
        pub nmi_pending: bool,
        pub extint_pending: bool,
        pub init_pending: bool,
        pub sipi_pending: bool,
        pub sipi_vector: u8,
        pub lint_level: [bool; 2],
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct IoApicWire as "ioapic", version 1, minimum 1 {
        pub id: u8,
        pub ioregsel: u8,
        pub redir: [u64; 24],
        pub pin_level: u32,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct PicWire as "i8259", version 1, minimum 1 {
        pub irr: u8,
        pub isr: u8,
        pub imr: u8,
        pub inputs: u8,
        pub base: u8,
        pub priority_add: u8,
        pub read_isr: bool,
        pub poll: bool,
        pub special_mask: bool,
        pub init_state: u8,
        pub icw4: bool,
        pub single: bool,
        pub auto_eoi: bool,
        pub rotate_on_aeoi: bool,
        pub elcr: u8,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct PitChannelWire as "i8254_channel", version 1, minimum 1 {
        pub count: u32,
        pub mode: u8,
        pub access: u8,
        pub bcd: bool,
        pub gate: bool,
        pub running: bool,
        pub start: u64,
        pub base_ticks: u64,
        pub edges_seen: u64,
        pub null_count: bool,
        pub read_state: u8,
        pub write_state: u8,
        pub write_lsb: u8,
        pub latch: u16,
        pub latch_state: u8,
        pub status: u8,
        pub status_latched: bool,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct RtcWire as "mc146818rtc", version 1, minimum 1 {
        pub cmos: [u8; 128] [buffer],
        pub index: u8,
        pub nmi_disabled: bool,
        pub base_ns: u64,
        pub offset_ns: i64,
        pub last: u64,
        pub irq_pending: bool,
    }
}

vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct PlatformWire as "platform", version 1, minimum 1, hooks {
        pub now: u64,
        pub guest_tsc: u64,
        pub apic: ApicWire,
        pub ioapic: IoApicWire,
        pub pic_master: PicWire,
        pub pic_slave: PicWire,
        pub pit_channels: u8,
        pub pit: Vec<PitChannelWire> [count = pit_channels, max = 3],
        pub port61: u8,
        pub rtc: RtcWire,
    }
}

impl VmStateHooks for PlatformWire {
    fn post_load(&mut self, _version: u32) -> Result<(), alloc::string::String> {
        if self.pit.len() != 3 {
            return Err("the 8254 has 3 channels".into());
        }
        Ok(())
    }
}

fn pic_wire(c: &PicChipState) -> PicWire {
    PicWire {
        irr: c.irr,
        isr: c.isr,
        imr: c.imr,
        inputs: c.inputs,
        base: c.base,
        priority_add: c.priority_add,
        read_isr: c.read_isr,
        poll: c.poll,
        special_mask: c.special_mask,
        init_state: c.init_state,
        icw4: c.icw4,
        single: c.single,
        auto_eoi: c.auto_eoi,
        rotate_on_aeoi: c.rotate_on_aeoi,
        elcr: c.elcr,
    }
}

fn pic_chip(w: &PicWire) -> PicChipState {
    PicChipState {
        irr: w.irr,
        isr: w.isr,
        imr: w.imr,
        inputs: w.inputs,
        base: w.base,
        priority_add: w.priority_add,
        read_isr: w.read_isr,
        poll: w.poll,
        special_mask: w.special_mask,
        init_state: w.init_state,
        icw4: w.icw4,
        single: w.single,
        auto_eoi: w.auto_eoi,
        rotate_on_aeoi: w.rotate_on_aeoi,
        elcr: w.elcr,
    }
}

impl PlatformWire {
    /// The wire form of a platform.
    pub fn of(p: &Platform) -> Self {
        let a: LapicState = p.lapic.save();
        let io: IoApicState = p.ioapic.save();
        let pic: PicState = p.pic.save();
        let pit: PitState = p.pit.save();
        let rtc: RtcState = p.rtc.save();
        let mut cmos = [0u8; 128];
        let n = rtc.cmos.len().min(128);
        cmos[..n].copy_from_slice(&rtc.cmos[..n]);
        let mut redir = [0u64; 24];
        redir.copy_from_slice(&io.redir[..IOAPIC_PINS.min(24)]);
        Self {
            now: p.now,
            guest_tsc: p.guest_tsc,
            apic: ApicWire {
                apic_base: a.apic_base,
                id: a.id,
                tpr: a.tpr,
                ldr: a.ldr,
                dfr: a.dfr,
                svr: a.svr,
                isr: a.isr,
                tmr: a.tmr,
                irr: a.irr,
                esr: a.esr,
                esr_pending: a.esr_pending,
                icr: a.icr,
                lvt: a.lvt,
                timer_initial: a.timer_initial,
                timer_divide: a.timer_divide,
                timer_armed: a.timer_armed,
                timer_anchor: a.timer_anchor,
                timer_anchor_count: a.timer_anchor_count,
                timer_next: a.timer_next,
                tsc_deadline: a.tsc_deadline,
                nmi_pending: a.nmi_pending,
                extint_pending: a.extint_pending,
                init_pending: a.init_pending,
                sipi_pending: a.sipi_vector.is_some(),
                sipi_vector: a.sipi_vector.unwrap_or(0),
                lint_level: a.lint_level,
            },
            ioapic: IoApicWire {
                id: io.id,
                ioregsel: io.ioregsel,
                redir,
                pin_level: io.pin_level,
            },
            pic_master: pic_wire(&pic.master),
            pic_slave: pic_wire(&pic.slave),
            pit_channels: 3,
            pit: pit
                .channels
                .iter()
                .map(|c| PitChannelWire {
                    count: c.count,
                    mode: c.mode,
                    access: c.access,
                    bcd: c.bcd,
                    gate: c.gate,
                    running: c.running,
                    start: c.start,
                    base_ticks: c.base_ticks,
                    edges_seen: c.edges_seen,
                    null_count: c.null_count,
                    read_state: c.read_state,
                    write_state: c.write_state,
                    write_lsb: c.write_lsb,
                    latch: c.latch,
                    latch_state: c.latch_state,
                    status: c.status,
                    status_latched: c.status_latched,
                })
                .collect(),
            port61: pit.port61,
            rtc: RtcWire {
                cmos,
                index: rtc.index,
                nmi_disabled: rtc.nmi_disabled,
                base_ns: rtc.base_ns,
                offset_ns: rtc.offset_ns,
                last: rtc.last,
                irq_pending: rtc.irq_pending,
            },
        }
    }

    /// Applies the wire form to `p` (a copy being loaded); the local APIC
    /// checks its state and refuses what it cannot take.
    pub fn apply(&self, p: &mut Platform) -> Result<(), &'static str> {
        let a = &self.apic;
        p.lapic
            .load(&LapicState {
                apic_base: a.apic_base,
                id: a.id,
                tpr: a.tpr,
                ldr: a.ldr,
                dfr: a.dfr,
                svr: a.svr,
                isr: a.isr,
                tmr: a.tmr,
                irr: a.irr,
                esr: a.esr,
                esr_pending: a.esr_pending,
                icr: a.icr,
                lvt: a.lvt,
                timer_initial: a.timer_initial,
                timer_divide: a.timer_divide,
                timer_armed: a.timer_armed,
                timer_anchor: a.timer_anchor,
                timer_anchor_count: a.timer_anchor_count,
                timer_next: a.timer_next,
                tsc_deadline: a.tsc_deadline,
                nmi_pending: a.nmi_pending,
                extint_pending: a.extint_pending,
                init_pending: a.init_pending,
                sipi_vector: a.sipi_pending.then_some(a.sipi_vector),
                lint_level: a.lint_level,
            })
            .map_err(|e| match e {
                crate::irq::lapic::ApicError::InvalidState(why) => why,
                _ => "local APIC state refused",
            })?;
        let mut redir = p.ioapic.save().redir;
        redir[..24].copy_from_slice(&self.ioapic.redir);
        p.ioapic.load(&IoApicState {
            id: self.ioapic.id,
            ioregsel: self.ioapic.ioregsel,
            redir,
            pin_level: self.ioapic.pin_level,
        });
        p.pic.load(&PicState {
            master: pic_chip(&self.pic_master),
            slave: pic_chip(&self.pic_slave),
        });
        let ch = |c: &PitChannelWire| PitChannelState {
            count: c.count,
            mode: c.mode,
            access: c.access,
            bcd: c.bcd,
            gate: c.gate,
            running: c.running,
            start: c.start,
            base_ticks: c.base_ticks,
            edges_seen: c.edges_seen,
            null_count: c.null_count,
            read_state: c.read_state,
            write_state: c.write_state,
            write_lsb: c.write_lsb,
            latch: c.latch,
            latch_state: c.latch_state,
            status: c.status,
            status_latched: c.status_latched,
        };
        let [c0, c1, c2] = match self.pit.as_slice() {
            [a, b, c] => [ch(a), ch(b), ch(c)],
            _ => return Err("the 8254 has 3 channels"),
        };
        p.pit.load(&PitState {
            channels: [c0, c1, c2],
            port61: self.port61,
        });
        p.rtc.load(&RtcState {
            cmos: self.rtc.cmos.to_vec(),
            index: self.rtc.index,
            nmi_disabled: self.rtc.nmi_disabled,
            base_ns: self.rtc.base_ns,
            offset_ns: self.rtc.offset_ns,
            last: self.rtc.last,
            irq_pending: self.rtc.irq_pending,
        });
        p.now = self.now;
        p.guest_tsc = self.guest_tsc;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Harness;
    use crate::devices::Device;

    /// A platform with state in every model: APIC software-enabled with a
    /// timer armed, a vector pending, PIC initialised, PIT counting.
    fn busy() -> Platform {
        let mut p = Platform::new(1_000_000_000, 1_767_225_600);
        p.lapic.mmio_write(0xF0, 4, 0x1FF, 0);
        p.lapic.mmio_write(0x320, 4, 0x20030, 0);
        p.lapic.mmio_write(0x3E0, 4, 0xB, 0);
        p.lapic.mmio_write(0x380, 4, 1000, 0);
        p.now = 42;
        p
    }

    #[test]
    fn a_platform_at_reset_round_trips() {
        // The reset state (LINT0 in virtual-wire mode on a software-
        // disabled APIC, as the PC platform starts) must load.
        let p = Platform::new(1_000_000_000, 0);
        let mut bytes = Vec::new();
        p.save(&mut bytes);
        let mut q = Platform::new(1_000_000_000, 0);
        let mut h = Harness::new();
        h.with(|c| q.load(c, p.state_version(), &bytes)).unwrap();
    }

    #[test]
    fn platform_state_round_trips_and_bad_bytes_change_nothing() {
        let src = busy();
        let mut bytes = Vec::new();
        src.save(&mut bytes);
        let mut h = Harness::new();
        let mut dst = Platform::new(1_000_000_000, 0);
        let v = src.state_version();
        h.with(|c| dst.load(c, v, &bytes)).unwrap();
        let mut again = Vec::new();
        dst.save(&mut again);
        assert_eq!(again, bytes);
        assert_eq!(dst.now, 42);
        // A truncated state and a bad boolean are refused; nothing changes.
        let mut fresh = Platform::new(1_000_000_000, 0);
        let mut before = Vec::new();
        fresh.save(&mut before);
        assert!(h
            .with(|c| fresh.load(c, v, &bytes[..bytes.len() - 1]))
            .is_err());
        let mut bad = bytes.clone();
        // `timer_armed` of the APIC: after now, guest_tsc (16 bytes) and
        // apic_base..timer_divide.
        let at = 16 + 8 + 4 + 1 + 4 + 4 + 4 + 3 * 32 + 4 + 4 + 8 + 24 + 4 + 4;
        assert!(bad[at] <= 1);
        bad[at] = 7;
        assert!(h.with(|c| fresh.load(c, v, &bad)).is_err());
        let mut after = Vec::new();
        fresh.save(&mut after);
        assert_eq!(after, before);
    }
}
