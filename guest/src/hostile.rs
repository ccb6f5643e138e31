//! Scenario `virtio-hostile` (machine `devices=net:1x1,blk:2x1`; an
//! `expect=` option overrides that shape): bad input on blk0's queue 0,
//! one case at a time. For each case the device must set
//! DEVICE_NEEDS_RESET (status bit 0x40) and, once DRIVER_OK was set, send
//! a configuration interrupt (2.1.2); the driver then resets it, brings it
//! up again and proves it works with a good write and read. After every
//! case blk1 serves a good write and read and net0 passes a frame to
//! itself, and both are still up: one device's error touches no other.
//! `case=<name>[,<name>...]` runs only those cases.

use crate::hw;
use crate::virtio::{
    bail, parse_expect, say, setup, wait_for, Kind, Override, Pages, Virtio, Vq, BLK_T_IN,
    D_INDIRECT, D_NEXT, D_WRITE, IND_OFF, R, S_DRIVER_OK, S_NEEDS_RESET, S_UP,
};
use crate::{virtio_blk, virtio_net};

/// Guest-physical addresses with no RAM behind them.
const NO_RAM: u64 = 0x7_F000_0000;
const APIC_PAGE: u64 = 0xFEE0_0000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    BufferOutsideRam,
    BufferInMmio,
    DescriptorLoop,
    LengthOverflow,
    AddressWrap,
    NextBeyondSize,
    HeadBeyondSize,
    AvailIdxJump,
    MisalignedDescTable,
    RingOutsideRam,
    NestedIndirect,
}

const CASES: [Case; 11] = [
    Case::BufferOutsideRam,
    Case::BufferInMmio,
    Case::DescriptorLoop,
    Case::LengthOverflow,
    Case::AddressWrap,
    Case::NextBeyondSize,
    Case::HeadBeyondSize,
    Case::AvailIdxJump,
    Case::MisalignedDescTable,
    Case::RingOutsideRam,
    Case::NestedIndirect,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::BufferOutsideRam => "buffer-outside-ram",
            Case::BufferInMmio => "buffer-in-mmio",
            Case::DescriptorLoop => "descriptor-loop",
            Case::LengthOverflow => "length-overflow",
            Case::AddressWrap => "address-wrap",
            Case::NextBeyondSize => "next-beyond-size",
            Case::HeadBeyondSize => "head-beyond-size",
            Case::AvailIdxJump => "avail-idx-jump",
            Case::MisalignedDescTable => "misaligned-desc-table",
            Case::RingOutsideRam => "ring-outside-ram",
            Case::NestedIndirect => "nested-indirect",
        }
    }
}

/// Writes the bad request of `case` into queue 0 of device `d` (already
/// up, idle) and notifies.
fn feed(drv: &mut Virtio, d: usize, case: Case) -> R {
    let p = drv.vq_data(d, 0, 1)?;
    let (hdr, status, data) = (p, p + 0x10, p + 0x400);
    hw::wr32(hdr, BLK_T_IN);
    hw::wr32(hdr + 4, 0);
    hw::wr64(hdr + 8, 0);
    hw::wr8(status, 0xFF);
    let vq = drv.vq(d, 0);
    let (t, size) = (vq.desc, vq.size);
    let w = Vq::write_desc;
    // A good IN request: descriptors 0, 1, 2.
    let good = |t: u64| {
        w(t, 0, hdr, 16, D_NEXT, 1);
        w(t, 1, data, 512, D_WRITE | D_NEXT, 2);
        w(t, 2, status, 1, D_WRITE, 0);
    };
    let mut head = 0u16;
    let mut idx = vq.published().wrapping_add(1);
    match case {
        Case::BufferOutsideRam | Case::BufferInMmio | Case::AddressWrap => {
            let (addr, len) = match case {
                Case::BufferOutsideRam => (NO_RAM, 512),
                Case::BufferInMmio => (APIC_PAGE, 512),
                _ => (0xFFFF_FFFF_FFFF_F000, 0x2000),
            };
            w(t, 0, hdr, 16, D_NEXT, 1);
            w(t, 1, addr, len, D_WRITE | D_NEXT, 2);
            w(t, 2, status, 1, D_WRITE, 0);
        }
        Case::DescriptorLoop => {
            w(t, 0, hdr, 16, D_NEXT, 1);
            w(t, 1, data, 512, D_WRITE | D_NEXT, 0);
        }
        Case::LengthOverflow => {
            w(t, 0, hdr, 16, D_NEXT, 1);
            w(t, 1, data, 0xFFFF_F000, D_WRITE | D_NEXT, 2);
            w(t, 2, data, 0xFFFF_F000, D_WRITE | D_NEXT, 3);
            w(t, 3, status, 1, D_WRITE, 0);
        }
        Case::NextBeyondSize => {
            w(t, 0, hdr, 16, D_NEXT, size);
        }
        Case::HeadBeyondSize => {
            good(t);
            head = size + 3;
        }
        Case::AvailIdxJump => {
            good(t);
            idx = vq.published().wrapping_add(size + 1);
        }
        Case::MisalignedDescTable | Case::RingOutsideRam => good(t),
        Case::NestedIndirect => {
            let a = vq.ring + IND_OFF;
            let b = a + 0x100;
            w(t, 0, a, 16, D_INDIRECT, 0);
            w(a, 0, b, 48, D_INDIRECT, 0);
            good(b);
        }
    }
    let slots = if case == Case::AvailIdxJump { size } else { 1 };
    for i in 0..slots {
        let slot = vq.published().wrapping_add(i) % size;
        hw::wr16(vq.avail + 4 + 2 * u64::from(slot), head);
    }
    vq.publish_raw(idx);
    vq.notify_now();
    Ok(())
}

/// One case: bad input, NEEDS_RESET and the interrupt checked, reset and
/// recovery proven.
fn case(drv: &mut Virtio, n: u64, case: Case, blk0: usize, blk1: usize, net0: usize) -> R {
    let name = case.name();
    let dev = drv.devs[blk0];
    let irq0 = dev.irqs();
    let _ = dev.isr();
    let gen0 = dev.generation();
    match case {
        Case::MisalignedDescTable | Case::RingOutsideRam => {
            let ring = drv.vq_ref(blk0, 0).ring;
            let over = Override {
                queue: 0,
                desc: (case == Case::MisalignedDescTable).then_some(ring + 0x808),
                device: (case == Case::RingOutsideRam).then_some(NO_RAM),
            };
            if drv.bring_up(blk0, Some(over))? {
                feed(drv, blk0, case)?;
            } else {
                say!(
                    "guest: hostile {name}: NEEDS_RESET at queue set-up (status {:#04x})",
                    dev.status()
                );
            }
        }
        _ => feed(drv, blk0, case)?,
    }
    let ok = wait_for(|| {
        let st = dev.status();
        st & S_NEEDS_RESET != 0 && (st & S_DRIVER_OK == 0 || dev.irqs() > irq0)
    });
    let (st, isr, gen) = (dev.status(), dev.isr(), dev.generation());
    let irqs = dev.irqs() - irq0;
    say!(
        "guest: hostile {name}: status {st:#04x}, ISR {isr:#04x}, generation {gen0} -> {gen}, interrupts +{irqs}"
    );
    if !ok {
        if st & S_NEEDS_RESET == 0 {
            let vq = *drv.vq_ref(blk0, 0);
            let p = drv.vq_data(blk0, 0, 1)?;
            if vq.used < hw::MAPPED_END {
                say!(
                    "guest: hostile {name}: used idx {} (published {}), request status byte {:#04x}",
                    vq.used_idx(),
                    vq.published(),
                    hw::rd8(p + 0x10)
                );
            }
            bail!(
                "device did not set NEEDS_RESET",
                "hostile {name}: status {st:#04x} after the bad input"
            );
        }
        bail!(
            "no configuration interrupt after NEEDS_RESET",
            "hostile {name}: status {st:#04x}, vector {:#x} still at {irq0}",
            dev.vector
        );
    }
    if case == Case::BufferInMmio {
        let svr = crate::virtio::apic_read(0xF0);
        if svr != 0x1FF {
            bail!(
                "local APIC changed by the device",
                "SVR {svr:#x}, want 0x1ff"
            );
        }
    }
    // Recovery: reset, full bring-up, a good write and read.
    if !drv.bring_up(blk0, None)? {
        bail!("device not up after reset", "hostile {name}");
    }
    let salt = 0x4000 + n;
    virtio_blk::write(drv, blk0, 0, 0, salt)?;
    virtio_blk::read_check(drv, blk0, 0, 0, salt)?;
    say!("guest: hostile {name}: NEEDS_RESET ok, recovered");
    // The others kept working.
    let sector = 16 + 2 * n;
    virtio_blk::write(drv, blk1, 0, sector, salt)?;
    virtio_blk::read_check(drv, blk1, 0, sector, salt)?;
    virtio_net::loopback(drv, net0)?;
    for d in [blk0, blk1, net0] {
        let st = drv.devs[d].status();
        if st != S_UP {
            bail!(
                "device not up after a hostile case",
                "hostile {name}: {} status {st:#04x}",
                drv.devs[d].name()
            );
        }
    }
    Ok(())
}

/// Scenario `virtio-hostile`.
pub fn scenario(info: &boot::BootInfo) -> R {
    let expect = parse_expect(info.option("expect").unwrap_or("net:1x1,blk:2x1"))?;
    let drv = Virtio::take(Pages::new(info)?)?;
    setup(drv, info, expect, info.option("bar64") == Some("high"))?;
    let find = |kind, nth| {
        drv.devs()
            .iter()
            .position(|d| d.kind == kind && d.nth == nth)
    };
    let (Some(blk0), Some(blk1), Some(net0)) =
        (find(Kind::Blk, 0), find(Kind::Blk, 1), find(Kind::Net, 0))
    else {
        bail!("hostile needs blk0, blk1 and net0", "see expect=");
    };
    let need = 16 + 2 * CASES.len() as u64 + virtio_blk::SECTORS as u64;
    for d in [blk0, blk1] {
        if drv.devs[d].capacity < need {
            bail!(
                "disk too small",
                "{}: {} sectors, hostile needs {need}",
                drv.devs[d].name(),
                drv.devs[d].capacity
            );
        }
    }
    // Everything works before the first case.
    virtio_blk::write(drv, blk0, 0, 0, 0x4000)?;
    virtio_blk::read_check(drv, blk0, 0, 0, 0x4000)?;
    virtio_blk::write(drv, blk1, 0, 16, 0x5000)?;
    virtio_blk::read_check(drv, blk1, 0, 16, 0x5000)?;
    virtio_net::loopback(drv, net0)?;
    let only = info.option("case");
    for o in only.into_iter().flat_map(|o| o.split(',')) {
        if !CASES.iter().any(|c| c.name() == o) {
            bail!("unknown hostile case", "{o:?} in case=");
        }
    }
    let mut ran = 0;
    for (n, &c) in CASES.iter().enumerate() {
        if only.is_none_or(|o| o.split(',').any(|o| o == c.name())) {
            case(drv, n as u64 + 1, c, blk0, blk1, net0)?;
            ran += 1;
        }
    }
    crate::virtio::check_all_up(drv)?;
    let (b0, b1, n0) = (drv.devs[blk0], drv.devs[blk1], drv.devs[net0]);
    say!(
        "guest: hostile: {ran} cases; blk0 writes={} reads={}; blk1 writes={} reads={}; net0 tx={} rx={}",
        b0.writes,
        b0.reads,
        b1.writes,
        b1.reads,
        n0.tx,
        n0.rx
    );
    crate::virtio::apic_write(0x380, 0);
    Ok(())
}
