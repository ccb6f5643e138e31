//! PCI tests: config-space masks, BARs, capabilities and MSI-X on a bare
//! [`PciConfig`], then the bus on a real [`Machine`]: CF8/CFC and ECAM,
//! BAR mapping through config writes (one memory commit per write), the
//! bus-master address space, MSI-X through a BAR, migration.

use super::host::{ecam_decode, HOST_BRIDGE_IDS};
use super::*;
use crate::addr::HostPhysAddr;
use crate::devices::testing::Harness;
use crate::devices::{Device, DeviceCtx};
use crate::ept_listener::RamBlock;
use crate::irq::{ApicMessage, DeliveryMode};
use crate::machine::{Machine, MachineError, MemTarget, BIOS_SIZE, ECAM_BASE};
use crate::phys::mock::MockPhys;
use alloc::boxed::Box;
use alloc::vec;

const IDS: PciIds = PciIds {
    vendor: 0x1234,
    device: 0x5678,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
    class: 0x02_0000,
    revision: 3,
};

// ---------------------------------------------------------------------------
// Config space
// ---------------------------------------------------------------------------

#[test]
fn header_fields_are_read_only_and_command_bits_writable() {
    let mut c = PciConfig::new(IDS);
    assert_eq!(c.read(PCI_VENDOR_ID, 4), 0x5678_1234);
    assert_eq!(c.read(PCI_REVISION_ID, 4), 0x0200_0003);
    assert_eq!(c.read(PCI_SUBSYSTEM_VENDOR_ID, 4), 0x1100_1af4);
    c.write(PCI_VENDOR_ID, 4, 0xFFFF_FFFF);
    c.write(PCI_REVISION_ID, 4, 0);
    c.write(PCI_HEADER_TYPE, 1, 0x80);
    c.write(PCI_SUBSYSTEM_VENDOR_ID, 4, 0);
    c.write(PCI_CAPABILITY_LIST, 1, 0x40);
    assert_eq!(c.read(PCI_VENDOR_ID, 4), 0x5678_1234);
    assert_eq!(c.read(PCI_REVISION_ID, 4), 0x0200_0003);
    assert_eq!(c.read(PCI_HEADER_TYPE, 1), 0);
    assert_eq!(c.read(PCI_SUBSYSTEM_VENDOR_ID, 4), 0x1100_1af4);
    assert_eq!(c.read(PCI_CAPABILITY_LIST, 1), 0);
    // Only IO, MEMORY, MASTER, SERR and INTX_DISABLE stick.
    c.write(PCI_COMMAND, 2, 0xFFFF);
    assert_eq!(
        c.command(),
        PCI_COMMAND_IO
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE
    );
    assert!(c.bus_master());
    // A byte write changes only its byte.
    c.write(PCI_COMMAND, 1, 0);
    assert_eq!(c.command(), PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE);
    assert!(!c.bus_master());
    // Cache line size and interrupt line are writable; the pin is not.
    c.write(PCI_INTERRUPT_LINE, 2, 0x010B);
    assert_eq!(c.read(PCI_INTERRUPT_LINE, 2), 0x000B);
    c.write(PCI_CACHE_LINE_SIZE, 4, 0xFFFF_FFFF);
    assert_eq!(c.read(PCI_CACHE_LINE_SIZE, 4), 0x0000_00FF);
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut c = PciConfig::new(IDS);
    let errors = PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_PARITY;
    c.set_u16(PCI_STATUS, errors | PCI_STATUS_CAP_LIST);
    c.write(PCI_STATUS, 2, 0);
    assert_eq!(
        c.get_u16(PCI_STATUS),
        errors | PCI_STATUS_CAP_LIST,
        "0 clears nothing"
    );
    c.write(PCI_STATUS, 2, PCI_STATUS_REC_MASTER_ABORT.into());
    assert_eq!(
        c.get_u16(PCI_STATUS),
        PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_PARITY | PCI_STATUS_CAP_LIST
    );
    // Writing ones everywhere clears every error bit but not CAP_LIST.
    c.write(PCI_COMMAND, 4, 0xFFFF_0000);
    assert_eq!(c.get_u16(PCI_STATUS), PCI_STATUS_CAP_LIST);
    assert_eq!(
        c.command(),
        0,
        "the command half of the dword was written as 0"
    );
}

#[test]
fn bars_size_and_read_back_their_flags() {
    let mut c = PciConfig::new(IDS);
    c.declare_bar(0, BarKind::Mem32 { prefetch: false }, 0x1000, 0)
        .unwrap();
    c.declare_bar(1, BarKind::Mem64 { prefetch: true }, 0x4000, 1)
        .unwrap();
    c.declare_bar(3, BarKind::Io, 32, 2).unwrap();
    c.declare_bar(4, BarKind::Mem64 { prefetch: false }, 8 << 30, 3)
        .unwrap();
    assert_eq!(c.read(0x10, 4), 0);
    assert_eq!(c.read(0x14, 4), 0xC);
    assert_eq!(c.read(0x1C, 4), 1);
    for bar in 0..6 {
        c.write(0x10 + 4 * bar, 4, 0xFFFF_FFFF);
    }
    assert_eq!(c.read(0x10, 4), 0xFFFF_F000);
    assert_eq!(c.read(0x14, 4), 0xFFFF_C00C, "64-bit prefetchable");
    assert_eq!(
        c.read(0x18, 4),
        0xFFFF_FFFF,
        "upper half of a small 64-bit BAR"
    );
    assert_eq!(c.read(0x1C, 4), 0xFFFF_FFE1, "I/O");
    assert_eq!(c.read(0x20, 4), 0x0000_0004, "8 GiB: no low address bits");
    assert_eq!(c.read(0x24, 4), 0xFFFF_FFFE);
    assert_eq!(c.read(PCI_ROM_ADDRESS, 4), 0, "no ROM BAR");
    // Byte writes to a BAR.
    c.write(0x11, 1, 0x00);
    c.write(0x13, 1, 0xE0);
    assert_eq!(c.read(0x10, 4), 0xE0FF_0000);
    let info = c.bar(1).unwrap();
    assert_eq!(
        info,
        BarInfo {
            kind: BarKind::Mem64 { prefetch: true },
            size: 0x4000,
            region: 1
        }
    );
    assert_eq!(c.bar(2), None, "upper half of BAR 1");
    let regs: Vec<u8> = c.bars().map(|(b, _)| b).collect();
    assert_eq!(regs, [0, 1, 3, 4]);
}

#[test]
fn bar_declarations_are_checked() {
    let mut c = PciConfig::new(IDS);
    let m32 = BarKind::Mem32 { prefetch: false };
    let m64 = BarKind::Mem64 { prefetch: false };
    assert_eq!(c.declare_bar(6, m32, 16, 0), Err(PciError::NoSuchBar(6)));
    assert_eq!(c.declare_bar(5, m64, 16, 0), Err(PciError::NoSuchBar(5)));
    assert_eq!(
        c.declare_bar(0, m32, 0x3000, 0),
        Err(PciError::BadBarSize(0x3000))
    );
    assert_eq!(c.declare_bar(0, m32, 8, 0), Err(PciError::BadBarSize(8)));
    assert_eq!(c.declare_bar(0, m32, 0, 0), Err(PciError::BadBarSize(0)));
    assert_eq!(
        c.declare_bar(0, m32, 1 << 32, 0),
        Err(PciError::BadBarSize(1 << 32))
    );
    assert_eq!(
        c.declare_bar(0, BarKind::Io, 2, 0),
        Err(PciError::BadBarSize(2))
    );
    c.declare_bar(0, m64, 16, 0).unwrap();
    assert_eq!(c.declare_bar(1, m32, 16, 0), Err(PciError::BarInUse(1)));
    assert_eq!(c.declare_bar(0, m32, 16, 0), Err(PciError::BarInUse(0)));
    c.declare_bar(2, m32, 16, 0).unwrap();
    assert_eq!(c.declare_bar(1, m64, 16, 0), Err(PciError::BarInUse(1)));
    c.declare_bar(4, m64, 16, 0).unwrap();
    assert_eq!(c.declare_bar(3, m64, 16, 0), Err(PciError::BarInUse(4)));
}

#[test]
fn bar_address_follows_pci_bar_address() {
    let mut c = PciConfig::new(IDS);
    c.declare_bar(0, BarKind::Mem32 { prefetch: false }, 0x1000, 0)
        .unwrap();
    c.declare_bar(1, BarKind::Mem64 { prefetch: false }, 0x1000, 1)
        .unwrap();
    c.declare_bar(3, BarKind::Io, 0x20, 2).unwrap();
    c.write(0x10, 4, 0xE000_0123);
    c.write(0x1C, 4, 0xC040);
    assert_eq!(c.bar_address(0), None, "memory decoding off");
    assert_eq!(c.bar_address(3), None, "I/O decoding off");
    c.write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY.into());
    assert_eq!(c.bar_address(0), Some(0xE000_0000), "low bits masked");
    assert_eq!(c.bar_address(3), None, "I/O still off");
    c.write(PCI_COMMAND, 2, PCI_COMMAND_IO.into());
    assert_eq!(c.bar_address(0), None);
    assert_eq!(c.bar_address(3), Some(0xC040));
    c.write(PCI_COMMAND, 2, (PCI_COMMAND_IO | PCI_COMMAND_MEMORY).into());
    // Address 0 is unmapped.
    assert_eq!(c.bar_address(1), None);
    c.write(0x10, 4, 0);
    assert_eq!(c.bar_address(0), None);
    // A 32-bit BAR must end below 0xFFFF_FFFF.
    c.write(0x10, 4, 0xFFFF_F000);
    assert_eq!(c.bar_address(0), None);
    c.write(0x10, 4, 0xFFFF_E000);
    assert_eq!(c.bar_address(0), Some(0xFFFF_E000));
    // A 64-bit BAR may sit above 4 GiB but not at the very end.
    c.write(0x14, 4, 0x8000_0000);
    c.write(0x18, 4, 0x10);
    assert_eq!(c.bar_address(1), Some(0x10_8000_0000));
    c.write(0x14, 4, 0xFFFF_F000);
    c.write(0x18, 4, 0xFFFF_FFFF);
    assert_eq!(c.bar_address(1), None, "ends at 2^64 - 1");
    c.write(0x14, 4, 0xFFFF_E000);
    assert_eq!(c.bar_address(1), Some(0xFFFF_FFFF_FFFF_E000));
    c.write(0x18, 4, 0);
    c.write(0x14, 4, 0xFFFF_F000);
    assert_eq!(c.bar_address(1), Some(0xFFFF_F000), "no 32-bit limit");
    // I/O: the PC port space ends at 0xFFFF.
    c.write(0x1C, 4, 0xFFE0);
    assert_eq!(c.bar_address(3), Some(0xFFE0));
    c.write(0x1C, 4, 0x1_0000);
    assert_eq!(c.bar_address(3), None);
    c.write(0x1C, 4, 0);
    assert_eq!(c.bar_address(3), None);
    assert_eq!(c.bar_address(2), None, "upper half");
    assert_eq!(c.bar_address(5), None, "undeclared");
    assert_eq!(c.bar_address(200), None);
}

#[test]
fn reads_and_writes_at_the_edges() {
    let mut c = PciConfig::new(IDS);
    assert_eq!(c.read(0xFFC, 4), 0, "extended space reads 0");
    c.write(0x100, 4, 0xFFFF_FFFF);
    assert_eq!(c.read(0x100, 4), 0, "and is read-only");
    assert_eq!(c.read(0x1000, 4), 0xFFFF_FFFF);
    assert_eq!(c.read(0xFFFE, 2), 0xFFFF);
    assert_eq!(
        c.read(0xFFF, 4),
        0xFFFF_FF00,
        "bytes past 4 KiB read as ones"
    );
    assert_eq!(c.read(u16::MAX, 4), 0xFFFF_FFFF);
    c.write(u16::MAX, 4, 0);
    c.write(0xFFF, 4, 0);
    // The device-specific area is writable, as QEMU's default wmask.
    c.write(0x80, 4, 0xDEAD_BEEF);
    assert_eq!(c.read(0x80, 4), 0xDEAD_BEEF);
    assert_eq!(c.read(0x81, 2), 0xADBE, "unaligned word");
    c.set_u32(0x100, 0x1234_5678);
    assert_eq!(c.read(0x100, 4), 0x1234_5678);
    c.set_wmask_u16(0x100, 0xFF00);
    c.write(0x100, 4, 0);
    assert_eq!(c.read(0x100, 4), 0x1234_0078);
}

#[test]
fn capabilities_form_a_list() {
    let mut c = PciConfig::new(IDS);
    assert_eq!(c.capabilities().count(), 0);
    assert_eq!(c.get_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    let a = c.add_capability(PCI_CAP_ID_VNDR, 16).unwrap();
    let b = c.add_capability(PCI_CAP_ID_VNDR, 5).unwrap();
    let m = c.add_capability(0x05, 10).unwrap();
    assert_eq!((a, b, m), (0x40, 0x50, 0x58), "dword-aligned, no overlap");
    assert_ne!(c.get_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    // A driver's walk: newest first.
    let mut walk = Vec::new();
    let mut at = c.read(PCI_CAPABILITY_LIST, 1) as u16;
    while at != 0 {
        walk.push((at, c.read(at, 1) as u8));
        at = c.read(at + 1, 1) as u16;
    }
    assert_eq!(walk, [(0x58, 0x05), (0x50, 0x09), (0x40, 0x09)]);
    let listed: Vec<(u8, u8)> = c.capabilities().collect();
    assert_eq!(listed, [(0x58, 0x05), (0x50, 0x09), (0x40, 0x09)]);
    assert_eq!(c.find_capability(PCI_CAP_ID_VNDR), Some(0x50));
    assert_eq!(c.find_capability(PCI_CAP_ID_MSIX), None);
    // Capability bytes are read-only unless the device opens them.
    c.set_u8(0x43, 0x11);
    c.write(0x40, 4, 0xFFFF_FFFF);
    assert_eq!(c.read(0x40, 4), 0x1100_0009, "the first one ends the list");
    c.set_wmask_u8(0x43, 0xF0);
    c.write(0x40, 4, 0xFFFF_FFFF);
    assert_eq!(c.read(0x40, 4), 0xF100_0009);
    assert_eq!(
        c.add_capability(PCI_CAP_ID_VNDR, 1),
        Err(PciError::BadCapabilityLength(1))
    );
    assert_eq!(
        c.add_capability(PCI_CAP_ID_VNDR, 0xC4),
        Err(PciError::BadCapabilityLength(0xC4))
    );
    // 0x64..0x100 is 156 bytes.
    assert_eq!(
        c.add_capability(PCI_CAP_ID_VNDR, 157),
        Err(PciError::NoCapabilitySpace)
    );
    assert_eq!(c.add_capability(PCI_CAP_ID_VNDR, 156), Ok(0x64));
    assert_eq!(
        c.add_capability(PCI_CAP_ID_VNDR, 2),
        Err(PciError::NoCapabilitySpace)
    );
}

#[test]
fn a_looping_capability_list_ends() {
    let mut c = PciConfig::new(IDS);
    let a = c.add_capability(PCI_CAP_ID_VNDR, 4).unwrap();
    c.set_u8(u16::from(a) + 1, a);
    assert_eq!(c.capabilities().count(), 48);
    assert_eq!(c.find_capability(0x42), None);
}

// ---------------------------------------------------------------------------
// MSI-X on a bare config
// ---------------------------------------------------------------------------

fn msix_config(vectors: u16) -> PciConfig {
    let mut c = PciConfig::new(IDS);
    c.declare_bar(0, BarKind::Mem32 { prefetch: false }, 0x1000, 0)
        .unwrap();
    c.declare_bar(2, BarKind::Mem64 { prefetch: false }, 0x4000, 1)
        .unwrap();
    c.msix_init(vectors, 2, 0, 2, 0x2000).unwrap();
    c
}

const MSI_ADDR: u64 = 0xFEE0_1000;

fn program(c: &mut PciConfig, h: &mut Harness, vector: u64, addr: u64, data: u32) {
    let e = vector * 16;
    h.with(|ctx| {
        c.msix_table_write(ctx, e, 4, addr & 0xFFFF_FFFF);
        c.msix_table_write(ctx, e + 4, 4, addr >> 32);
        c.msix_table_write(ctx, e + 8, 4, data.into());
    });
}

fn set_control(c: &mut PciConfig, h: &mut Harness, bits: u16) {
    let cap = u16::from(c.msix_capability().unwrap());
    let off = cap + u16::from(PCI_MSIX_FLAGS);
    c.write(off, 2, bits.into());
    h.with(|ctx| c.after_write(ctx, off, 2));
}

#[test]
fn msix_capability_layout_and_masks() {
    let mut c = msix_config(9);
    let cap = c.find_capability(PCI_CAP_ID_MSIX).unwrap();
    assert_eq!(Some(cap), c.msix_capability());
    let cap = u16::from(cap);
    assert_eq!(c.read(cap + 2, 2), 8, "table size - 1");
    assert_eq!(c.read(cap + 4, 4), 2, "table at 0 of BAR 2");
    assert_eq!(c.read(cap + 8, 4), 0x2002, "PBA at 0x2000 of BAR 2");
    c.write(cap, 4, 0xFFFF_FFFF);
    assert_eq!(
        c.read(cap + 2, 2),
        u32::from(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL | 8),
        "only enable and mask-all are writable"
    );
    c.write(cap + 4, 4, 0);
    assert_eq!(c.read(cap + 4, 4), 2);
    assert!(c.msix_enabled());
    assert_eq!(c.msix_vectors(), 9);
    for v in 0..9 {
        assert_eq!(c.msix_table_read(v * 16 + 12, 4), 1, "entries start masked");
    }
    assert_eq!(c.msix_table_read(9 * 16, 4), 0, "past the table");
    assert_eq!(c.msix_pba_read(0, 8), 0);
}

#[test]
fn msix_init_checks_its_layout() {
    let mut c = PciConfig::new(IDS);
    c.declare_bar(0, BarKind::Mem32 { prefetch: false }, 0x1000, 0)
        .unwrap();
    c.declare_bar(1, BarKind::Io, 0x100, 1).unwrap();
    assert!(matches!(
        c.msix_init(0, 0, 0, 0, 0x800),
        Err(PciError::BadMsix(_))
    ));
    assert!(matches!(
        c.msix_init(2049, 0, 0, 0, 0x800),
        Err(PciError::BadMsix(_))
    ));
    assert!(
        matches!(c.msix_init(4, 3, 0, 0, 0x800), Err(PciError::BadMsix(_))),
        "undeclared BAR"
    );
    assert!(
        matches!(c.msix_init(4, 1, 0, 0, 0x800), Err(PciError::BadMsix(_))),
        "I/O BAR"
    );
    assert!(
        matches!(
            c.msix_init(4, 0, 0xFC8, 0, 0x800),
            Err(PciError::BadMsix(_))
        ),
        "table too long"
    );
    assert!(
        matches!(c.msix_init(4, 0, 0, 0, 0xFFC), Err(PciError::BadMsix(_))),
        "PBA too long"
    );
    assert!(
        matches!(c.msix_init(4, 0, 4, 0, 0x800), Err(PciError::BadMsix(_))),
        "misaligned"
    );
    assert!(
        matches!(c.msix_init(4, 0, 0, 0, 0x38), Err(PciError::BadMsix(_))),
        "overlap"
    );
    assert_eq!(c.capabilities().count(), 0, "nothing added by failures");
    assert_eq!(c.msix_init(4, 0, 0, 0, 0x40), Ok(0x40));
    assert_eq!(c.msix_init(4, 0, 0, 0, 0x40), Err(PciError::MsixPresent));
    assert_eq!(c.msix_table_read(0x3C, 4), 1);
}

#[test]
fn masked_vectors_pend_and_fire_on_unmask() {
    let mut c = msix_config(9);
    let mut h = Harness::new();
    program(&mut c, &mut h, 8, MSI_ADDR | (3 << 12), 0x4031);
    // Disabled: nothing sent, nothing pending.
    h.with(|ctx| c.msix_notify(ctx, 8));
    assert!(h.irq.msis.is_empty());
    assert_eq!(c.msix_pba_read(0, 4), 0);
    set_control(&mut c, &mut h, PCI_MSIX_FLAGS_ENABLE);
    // Enabled, entry masked: pending bit 8 (byte 1, bit 0).
    h.with(|ctx| c.msix_notify(ctx, 8));
    assert!(h.irq.msis.is_empty());
    assert!(c.msix_is_pending(8));
    assert_eq!(c.msix_pba_read(0, 4), 0x100);
    assert_eq!(c.msix_pba_read(1, 1), 1);
    // Out-of-range vectors are ignored.
    h.with(|ctx| c.msix_notify(ctx, 9));
    h.with(|ctx| c.msix_notify(ctx, u16::MAX));
    assert_eq!(c.msix_pba_read(0, 8), 0x100);
    // Unmasking the entry delivers it and clears the bit.
    h.with(|ctx| c.msix_table_write(ctx, 8 * 16 + 12, 4, 0));
    assert_eq!(
        h.irq.msis,
        [ApicMessage {
            vector: 0x31,
            delivery: DeliveryMode::Fixed,
            level: false,
            dest: 3,
            logical: false,
        }]
    );
    assert_eq!(c.msix_pba_read(0, 4), 0);
    // Unmasked now: a notification goes straight out.
    h.with(|ctx| c.msix_notify(ctx, 8));
    assert_eq!(h.irq.msis.len(), 2);
    // Masking again and unmasking without a pending bit sends nothing.
    h.with(|ctx| c.msix_table_write(ctx, 8 * 16 + 12, 4, 1));
    h.with(|ctx| c.msix_table_write(ctx, 8 * 16 + 12, 4, 0));
    assert_eq!(h.irq.msis.len(), 2);
    assert_eq!(c.msix_table_read(8 * 16, 8), MSI_ADDR | (3 << 12));
}

#[test]
fn function_mask_holds_vectors_until_cleared() {
    let mut c = msix_config(4);
    let mut h = Harness::new();
    program(&mut c, &mut h, 1, MSI_ADDR, 0x41);
    program(&mut c, &mut h, 2, MSI_ADDR, 0x42);
    // Unmask entries 1 and 2 (8-byte write of data + control of entry 1).
    h.with(|ctx| c.msix_table_write(ctx, 16 + 8, 8, 0x41));
    h.with(|ctx| c.msix_table_write(ctx, 2 * 16 + 12, 4, 0));
    set_control(
        &mut c,
        &mut h,
        PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
    );
    assert!(c.msix_is_masked(1));
    h.with(|ctx| {
        c.msix_notify(ctx, 1);
        c.msix_notify(ctx, 2);
        c.msix_notify(ctx, 0);
    });
    assert!(h.irq.msis.is_empty());
    assert_eq!(c.msix_pba_read(0, 1), 0b111);
    // Entry writes while the function is masked send nothing.
    h.with(|ctx| c.msix_table_write(ctx, 2 * 16 + 12, 4, 0));
    assert!(h.irq.msis.is_empty());
    // A config write that does not touch the control leaves it alone.
    let cap = u16::from(c.msix_capability().unwrap());
    h.with(|ctx| c.after_write(ctx, cap + 4, 4));
    assert!(h.irq.msis.is_empty());
    // Clearing mask-all (byte write of the control's upper byte) sends the
    // pending, unmasked vectors; vector 0 stays pending (its entry is masked).
    c.write(cap + 3, 1, 0x80);
    h.with(|ctx| c.after_write(ctx, cap + 3, 1));
    let vectors: Vec<u8> = h.irq.msis.iter().map(|m| m.vector).collect();
    assert_eq!(vectors, [0x41, 0x42]);
    assert_eq!(c.msix_pba_read(0, 1), 0b001);
}

#[test]
fn disabling_msix_keeps_pending_bits_but_sends_nothing() {
    let mut c = msix_config(4);
    let mut h = Harness::new();
    program(&mut c, &mut h, 0, MSI_ADDR, 0x50);
    set_control(
        &mut c,
        &mut h,
        PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
    );
    h.with(|ctx| c.msix_table_write(ctx, 12, 4, 0));
    h.with(|ctx| c.msix_notify(ctx, 0));
    assert!(c.msix_is_pending(0));
    set_control(&mut c, &mut h, 0);
    assert!(h.irq.msis.is_empty(), "disabled: nothing sent");
    h.with(|ctx| c.msix_notify(ctx, 0));
    assert!(h.irq.msis.is_empty());
    set_control(&mut c, &mut h, PCI_MSIX_FLAGS_ENABLE);
    assert_eq!(
        h.irq.msis.len(),
        1,
        "enabled unmasked: the pending vector goes out"
    );
    assert!(!c.msix_is_pending(0));
}

#[test]
fn a_non_interrupt_address_is_no_interrupt() {
    let mut c = msix_config(1);
    let mut h = Harness::new();
    program(&mut c, &mut h, 0, 0x1000, 0x30);
    set_control(&mut c, &mut h, PCI_MSIX_FLAGS_ENABLE);
    h.with(|ctx| c.msix_table_write(ctx, 12, 4, 0));
    h.with(|ctx| c.msix_notify(ctx, 0));
    assert!(h.irq.msis.is_empty());
    assert!(!c.msix_is_pending(0));
}

#[test]
fn config_state_roundtrips_and_refuses_other_layouts() {
    let mut c = msix_config(9);
    let mut h = Harness::new();
    program(&mut c, &mut h, 3, MSI_ADDR, 0x77);
    set_control(
        &mut c,
        &mut h,
        PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
    );
    h.with(|ctx| c.msix_notify(ctx, 3));
    c.write(0x18, 4, 0xE000_0000);
    c.write(
        PCI_COMMAND,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).into(),
    );
    let mut saved = Vec::new();
    c.save(&mut saved);
    assert_eq!(saved.len(), c.state_len());
    assert_eq!(saved.len(), 4096 + 9 * 16 + 8);
    let mut d = msix_config(9);
    d.load(&saved).unwrap();
    assert_eq!(d.read(0x18, 4), 0xE000_0004);
    assert_eq!(d.bar_address(2), Some(0xE000_0000));
    assert!(d.bus_master());
    assert!(d.msix_is_pending(3));
    assert_eq!(d.msix_table_read(3 * 16 + 8, 4), 0x77);
    // The loaded function mask is the state later writes change from.
    let cap = u16::from(d.msix_capability().unwrap());
    h.with(|ctx| d.msix_table_write(ctx, 3 * 16 + 12, 4, 0));
    assert_eq!(h.irq.msis.len(), 0, "still masked by the function");
    d.write(cap + 3, 1, 0x80);
    h.with(|ctx| d.after_write(ctx, cap + 3, 1));
    assert_eq!(h.irq.msis.len(), 1);

    // Refusals change nothing.
    let fresh = msix_config(9);
    let mut before = Vec::new();
    fresh.save(&mut before);
    let mut e = msix_config(9);
    let mut bad = saved.clone();
    bad[0] ^= 1;
    assert!(
        matches!(e.load(&bad), Err(StateError::Invalid(_))),
        "vendor ID"
    );
    let mut bad = saved.clone();
    bad[0x18] ^= 0x8;
    assert!(
        matches!(e.load(&bad), Err(StateError::Invalid(_))),
        "BAR flags"
    );
    let mut bad = saved.clone();
    bad[usize::from(cap) + 2] ^= 1;
    assert!(
        matches!(e.load(&bad), Err(StateError::Invalid(_))),
        "MSI-X size"
    );
    let mut bad = saved.clone();
    *bad.last_mut().unwrap() = 0x80;
    assert!(
        matches!(e.load(&bad), Err(StateError::Invalid(_))),
        "stray pending bit"
    );
    assert!(matches!(
        e.load(&saved[1..]),
        Err(StateError::Length { .. })
    ));
    let mut other = PciConfig::new(IDS);
    assert!(matches!(other.load(&saved), Err(StateError::Length { .. })));
    let mut after = Vec::new();
    e.save(&mut after);
    assert_eq!(after, before);
}

// ---------------------------------------------------------------------------
// The bus on a machine
// ---------------------------------------------------------------------------

/// A PCI function with BAR 0 (32-bit memory, 4 KiB, region 0), BAR 1+2
/// (64-bit prefetchable memory, 16 KiB, region 1), BAR 3 (I/O, 32 bytes,
/// region 2) and BAR 4 (32-bit memory, 4 KiB, region 3) holding a 4-vector
/// MSI-X table at 0 and its PBA at 0x800; region 4 is a window outside the
/// BARs that the device enables with `COMMAND.MEMORY`.
struct TestPci {
    config: PciConfig,
    /// Writes of register 0 of BAR 0 read 4 bytes of DMA at the value.
    dma: Option<Result<u32, crate::guest_mem::GuestMemError>>,
    /// (offset, size) of every config write the device was told about.
    written: Vec<(u16, u8)>,
}

const TEST_MAGIC: u64 = 0xC0DE_0000;

impl TestPci {
    fn new() -> Self {
        let mut config = PciConfig::new(IDS);
        config
            .declare_bar(0, BarKind::Mem32 { prefetch: false }, 0x1000, 0)
            .unwrap();
        config
            .declare_bar(1, BarKind::Mem64 { prefetch: true }, 0x4000, 1)
            .unwrap();
        config.declare_bar(3, BarKind::Io, 32, 2).unwrap();
        config
            .declare_bar(4, BarKind::Mem32 { prefetch: false }, 0x1000, 3)
            .unwrap();
        config.msix_init(4, 4, 0, 4, 0x800).unwrap();
        Self {
            config,
            dma: None,
            written: Vec::new(),
        }
    }
}

impl Device for TestPci {
    fn read(&mut self, _ctx: &mut DeviceCtx, region: u8, offset: u64, size: u8) -> u64 {
        match region {
            3 if offset < 0x800 => self.config.msix_table_read(offset, size),
            3 => self.config.msix_pba_read(offset - 0x800, size),
            r => TEST_MAGIC | (u64::from(r) << 12) | offset,
        }
    }
    fn write(&mut self, ctx: &mut DeviceCtx, region: u8, offset: u64, size: u8, value: u64) {
        match (region, offset) {
            (3, o) if o < 0x800 => self.config.msix_table_write(ctx, o, size, value),
            (0, 0) => self.dma = Some(ctx.mem.read_obj::<u32>(value)),
            (0, 8) => self.config.msix_notify(ctx, value as u16),
            _ => {}
        }
    }
    fn pci(&mut self) -> Option<&mut PciConfig> {
        Some(&mut self.config)
    }
    /// Device-specific reaction: the window region (index 4) follows
    /// `COMMAND.MEMORY`, through a memory request.
    fn pci_config_written(&mut self, ctx: &mut DeviceCtx, offset: u16, size: u8) {
        self.written.push((offset, size));
        let covers_command = offset <= PCI_COMMAND && PCI_COMMAND < offset + u16::from(size);
        if let Some(window) = ctx.region(4).filter(|_| covers_command) {
            let on = self.config.command() & PCI_COMMAND_MEMORY != 0;
            ctx.request(crate::devices::MemoryRequest::Enable { region: window, on });
        }
    }
    fn state_version(&self) -> u32 {
        1
    }
    fn save(&self, out: &mut Vec<u8>) {
        self.config.save(out);
    }
    fn load(&mut self, _ctx: &mut DeviceCtx, _version: u32, data: &[u8]) -> Result<(), StateError> {
        self.config.load(data)
    }
    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

const DEVFN: u8 = devfn(3, 0);
const WINDOW: u64 = 0xE300_0000;
const RAM: u64 = 4 << 20;

/// A PC with 4 MiB of RAM (host memory attached), the host bridge and the
/// test function at 00:03.0 with its four regions.
fn machine() -> (Machine, u32) {
    let mut m = crate::machine::tests::pc(RAM, 3 << 30);
    m.add_pci_host().unwrap();
    let d = m
        .add_pci_device("0000:00:03.0/test-pci", DEVFN, Box::new(TestPci::new()))
        .unwrap();
    m.add_device_region(d, "bar0", 0x1000).unwrap();
    m.add_device_region(d, "bar1", 0x4000).unwrap();
    m.add_device_region(d, "bar3", 32).unwrap();
    m.add_device_region(d, "msix", 0x1000).unwrap();
    let w = m.add_device_region(d, "window", 0x1000).unwrap();
    m.mem.set_enabled(w, false).unwrap();
    m.mem.add_subregion(m.regions.system, WINDOW, w).unwrap();
    let phys = MockPhys::new(8 << 20);
    let blocks = vec![
        RamBlock {
            hpa: HostPhysAddr::new(0x10_0000),
            size: RAM,
        },
        RamBlock {
            hpa: HostPhysAddr::new(0x60_0000),
            size: BIOS_SIZE,
        },
    ];
    m.attach_ram(blocks, Box::new(phys));
    (m, d)
}

fn cfc_select(m: &mut Machine, bus: u8, devfn: u8, reg: u8) {
    let a = (1 << 31) | (u32::from(bus) << 16) | (u32::from(devfn) << 8) | u32::from(reg);
    m.pio_write(0xCF8, 4, a.into()).unwrap();
}

fn cfg_read(m: &mut Machine, off: u16, size: u8) -> u64 {
    cfc_select(m, 0, DEVFN, (off & 0xFC) as u8);
    m.pio_read(0xCFC + (off & 3), size).unwrap()
}

fn cfg_write(m: &mut Machine, off: u16, size: u8, v: u64) {
    cfc_select(m, 0, DEVFN, (off & 0xFC) as u8);
    m.pio_write(0xCFC + (off & 3), size, v).unwrap();
}

fn mmio_read(m: &mut Machine, gpa: u64, size: u8) -> Option<u64> {
    match m.memory_target(gpa).unwrap() {
        MemTarget::Device { handle, offset, .. } => {
            Some(m.device_read(handle, offset, size).unwrap())
        }
        _ => None,
    }
}

fn mmio_write(m: &mut Machine, gpa: u64, size: u8, v: u64) {
    let MemTarget::Device { handle, offset, .. } = m.memory_target(gpa).unwrap() else {
        panic!("nothing at {gpa:#x}")
    };
    m.device_write(handle, offset, size, v).unwrap();
}

fn ecam(devfn: u8, off: u16) -> u64 {
    ECAM_BASE + (u64::from(devfn) << 12) + u64::from(off)
}

fn commits(m: &Machine) -> u64 {
    m.mem.stats().commits
}

#[test]
fn cf8_cfc_and_ecam_reach_the_same_function() {
    let (mut m, _) = machine();
    assert_eq!(cfg_read(&mut m, 0, 4), 0x5678_1234);
    assert_eq!(cfg_read(&mut m, 2, 2), 0x5678, "word at 0xCFE");
    assert_eq!(cfg_read(&mut m, 0xB, 1), 0x02, "class byte at 0xCFF");
    assert_eq!(mmio_read(&mut m, ecam(DEVFN, 0), 4), Some(0x5678_1234));
    assert_eq!(mmio_read(&mut m, ecam(DEVFN, 0xA), 2), Some(0x0200));
    // A write through one mechanism is read through the other.
    mmio_write(&mut m, ecam(DEVFN, PCI_INTERRUPT_LINE), 1, 0x0B);
    assert_eq!(cfg_read(&mut m, PCI_INTERRUPT_LINE, 1), 0x0B);
    cfg_write(&mut m, 0x81, 1, 0x5A);
    assert_eq!(mmio_read(&mut m, ecam(DEVFN, 0x80), 4), Some(0x5A00));
    // An 8-byte ECAM read is two dwords.
    assert_eq!(
        mmio_read(&mut m, ecam(DEVFN, 0), 8),
        Some(0x0010_0000_5678_1234),
        "status: capability list"
    );
    // The host bridge at 00.0.
    cfc_select(&mut m, 0, 0, 0);
    assert_eq!(
        m.pio_read(0xCFC, 4).unwrap(),
        u64::from(HOST_BRIDGE_IDS.device) << 16 | u64::from(HOST_BRIDGE_IDS.vendor)
    );
    assert_eq!(mmio_read(&mut m, ecam(0, 0xA), 2), Some(0x0600));
    // The latch reads back; narrow writes do not latch.
    cfc_select(&mut m, 0, DEVFN, 0x10);
    assert_eq!(m.pio_read(0xCF8, 4).unwrap(), 0x8000_1810);
    assert_eq!(m.pio_read(0xCF9, 1).unwrap(), 0x18);
    m.pio_write(0xCF8, 1, 0).unwrap();
    m.pio_write(0xCFA, 2, 0).unwrap();
    assert_eq!(m.pio_read(0xCF8, 4).unwrap(), 0x8000_1810);
    // An 8-byte access at the window's end does not wrap to bus 0.
    let ecam_handle = match m.memory_target(ECAM_BASE).unwrap() {
        MemTarget::Device { handle, .. } => handle,
        t => panic!("{t:?}"),
    };
    let last = crate::machine::ECAM_SIZE - 4;
    assert_eq!(m.device_read(ecam_handle, last, 8).unwrap(), u64::MAX);
    m.device_write(ecam_handle, last, 8, 0).unwrap();
    assert_eq!(mmio_read(&mut m, ecam(0, 0), 4), Some(0x29c0_8086));
    assert_eq!(ecam_decode(0x0123_4567).bus, 0x12);
    assert_eq!(ecam_decode(0x0123_4567).devfn, 0x34);
    assert_eq!(ecam_decode(0x0123_4567).offset, 0x567);
}

#[test]
fn empty_slots_and_other_buses_read_all_ones() {
    let (mut m, _) = machine();
    let before = commits(&m);
    cfc_select(&mut m, 0, devfn(4, 0), 0);
    assert_eq!(m.pio_read(0xCFC, 4).unwrap(), 0xFFFF_FFFF);
    assert_eq!(m.pio_read(0xCFD, 1).unwrap(), 0xFF);
    m.pio_write(0xCFC, 4, 0).unwrap();
    // Bus 1 has no functions; the same devfn there is not the test device.
    cfc_select(&mut m, 1, DEVFN, 0x3C);
    assert_eq!(m.pio_read(0xCFC, 4).unwrap(), 0xFFFF_FFFF);
    m.pio_write(0xCFC, 1, 0x0E).unwrap();
    // Without the enable bit the data window is closed.
    m.pio_write(0xCF8, 4, (u64::from(DEVFN) << 8) | 0x3C)
        .unwrap();
    assert_eq!(m.pio_read(0xCFC, 4).unwrap(), 0xFFFF_FFFF);
    m.pio_write(0xCFC, 1, 0x0E).unwrap();
    assert_eq!(
        mmio_read(&mut m, ecam(devfn(4, 1), 0), 4),
        Some(0xFFFF_FFFF)
    );
    let bus1 = ECAM_BASE + (1 << 20) + (u64::from(DEVFN) << 12);
    assert_eq!(mmio_read(&mut m, bus1, 2), Some(0xFFFF));
    mmio_write(&mut m, bus1 + 0x3C, 1, 0x0E);
    assert_eq!(cfg_read(&mut m, 0x3C, 1), 0, "no write reached 00:03.0");
    assert_eq!(cfg_read(&mut m, 0, 4), 0x5678_1234);
    assert_eq!(commits(&m), before);
    let funcs: Vec<(u8, u32)> = m.pci_devices().collect();
    assert_eq!(funcs.len(), 2);
    assert_eq!(funcs[0].0, 0);
    assert_eq!(funcs[1].0, DEVFN);
}

#[test]
fn bars_map_move_and_unmap_with_one_commit_per_write() {
    let (mut m, d) = machine();
    let bar0 = 0xE000_0000;
    // Programming the BAR with decoding off maps nothing.
    let c = commits(&m);
    cfg_write(&mut m, 0x10, 4, bar0);
    assert_eq!(commits(&m), c);
    assert_eq!(mmio_read(&mut m, bar0, 4), None);
    cfg_write(&mut m, 0x14, 4, 0xE010_0000);
    cfg_write(&mut m, 0x18, 4, 0x1);
    cfg_write(&mut m, 0x1C, 4, 0xC000);
    cfg_write(&mut m, 0x20, 4, 0xE020_0000);
    assert_eq!(commits(&m), c);
    // Memory decoding on: three memory BARs mapped and the device's window
    // enabled (its own memory request) in one commit.
    assert_eq!(mmio_read(&mut m, WINDOW, 4), None);
    cfg_write(&mut m, PCI_COMMAND, 2, PCI_COMMAND_MEMORY.into());
    assert_eq!(commits(&m), c + 1);
    assert_eq!(
        mmio_read(&mut m, WINDOW + 4, 4),
        Some(TEST_MAGIC | (4 << 12) | 4)
    );
    assert_eq!(mmio_read(&mut m, bar0 + 0x10, 4), Some(TEST_MAGIC | 0x10));
    assert_eq!(
        mmio_read(&mut m, 0x1_E010_0000 + 8, 4),
        Some(TEST_MAGIC | (1 << 12) | 8)
    );
    assert_eq!(
        mmio_read(&mut m, 0xE020_000C, 4),
        Some(1),
        "MSI-X entry 0 mask"
    );
    assert_eq!(m.pio_read(0xC000, 4).unwrap(), 0xFFFF_FFFF, "I/O still off");
    // Move BAR 0: one commit, old address empty.
    let c = commits(&m);
    cfg_write(&mut m, 0x10, 4, 0xE800_0000);
    assert_eq!(commits(&m), c + 1);
    assert_eq!(mmio_read(&mut m, bar0, 4), None);
    assert_eq!(mmio_read(&mut m, 0xE800_0004, 4), Some(TEST_MAGIC | 4));
    // Move the 64-bit BAR below 4 GiB by rewriting its upper half.
    cfg_write(&mut m, 0x18, 4, 0);
    assert_eq!(commits(&m), c + 2);
    assert_eq!(mmio_read(&mut m, 0x1_E010_0000, 4), None);
    assert_eq!(
        mmio_read(&mut m, 0xE010_0000, 4),
        Some(TEST_MAGIC | (1 << 12))
    );
    // I/O on as well: the I/O BAR appears in the I/O space.
    cfg_write(
        &mut m,
        PCI_COMMAND,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_IO).into(),
    );
    assert_eq!(commits(&m), c + 3);
    assert_eq!(m.pio_read(0xC004, 4).unwrap(), TEST_MAGIC | (2 << 12) | 4);
    // A write that changes nothing commits nothing.
    cfg_write(
        &mut m,
        PCI_COMMAND,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_IO).into(),
    );
    cfg_write(&mut m, 0x80, 4, 0x1234);
    assert_eq!(commits(&m), c + 3);
    // BAR sizing with decoding on (as firmware does): unmapped while all
    // ones, mapped back when restored.
    cfg_write(&mut m, 0x10, 4, 0xFFFF_FFFF);
    assert_eq!(cfg_read(&mut m, 0x10, 4), 0xFFFF_F000);
    assert_eq!(mmio_read(&mut m, 0xE800_0000, 4), None);
    cfg_write(&mut m, 0x10, 4, 0xE800_0000);
    assert_eq!(mmio_read(&mut m, 0xE800_0000, 4), Some(TEST_MAGIC));
    // Memory decoding off unmaps every memory BAR in one commit.
    let c = commits(&m);
    cfg_write(&mut m, PCI_COMMAND, 2, PCI_COMMAND_IO.into());
    assert_eq!(commits(&m), c + 1);
    for a in [0xE800_0000, 0xE010_0000, 0xE020_0000, WINDOW] {
        assert_eq!(mmio_read(&mut m, a, 4), None, "{a:#x}");
    }
    assert_eq!(m.pio_read(0xC000, 4).unwrap(), TEST_MAGIC | (2 << 12));
    assert!(!m.pci_update_mappings(d).unwrap(), "nothing left to change");
    // Every config write reached the device.
    let written = m
        .device::<TestPci>("0000:00:03.0/test-pci")
        .unwrap()
        .written
        .len();
    assert_eq!(written, 14);
}

#[test]
fn bus_master_enables_dma() {
    let (mut m, d) = machine();
    m.guest_memory()
        .unwrap()
        .write(0x2000, &0xFEED_F00Du32.to_le_bytes())
        .unwrap();
    assert!(m.dma_space(d).is_some());
    assert!(m.dma_space(m.pci_host().unwrap()).is_some());
    cfg_write(&mut m, 0x10, 4, 0xE000_0000);
    cfg_write(&mut m, PCI_COMMAND, 2, PCI_COMMAND_MEMORY.into());
    let dma = |m: &mut Machine| {
        mmio_write(m, 0xE000_0000, 4, 0x2000);
        m.device::<TestPci>("0000:00:03.0/test-pci")
            .unwrap()
            .dma
            .take()
            .unwrap()
    };
    assert!(dma(&mut m).is_err(), "no bus mastering: DMA fails");
    let c = commits(&m);
    cfg_write(
        &mut m,
        PCI_COMMAND,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).into(),
    );
    assert_eq!(commits(&m), c + 1);
    assert_eq!(dma(&mut m), Ok(0xFEED_F00D));
    // The bus-master space is the system memory (shared view).
    let space = m.dma_space(d).unwrap();
    let a = m.mem.committed_view(space).unwrap();
    let b = m.mem.committed_view(m.memory).unwrap();
    assert!(alloc::rc::Rc::ptr_eq(&a, &b));
    assert_eq!(
        m.mem.address_space_name(space).unwrap(),
        "0000:00:03.0/test-pci"
    );
    // Master and memory off together: one commit, DMA fails again.
    cfg_write(&mut m, PCI_COMMAND, 2, 0);
    assert_eq!(commits(&m), c + 2);
    cfg_write(&mut m, PCI_COMMAND, 2, PCI_COMMAND_MEMORY.into());
    assert!(dma(&mut m).is_err());
    // Other devices keep the memory space.
    assert_eq!(m.dma_space(0), None);
}

#[test]
fn msix_through_the_bar_and_config_space() {
    let (mut m, _) = machine();
    m.add_platform(1_000_000_000, 0).unwrap();
    cfg_write(&mut m, 0x10, 4, 0xE000_0000);
    cfg_write(&mut m, 0x20, 4, 0xE020_0000);
    cfg_write(&mut m, PCI_COMMAND, 2, PCI_COMMAND_MEMORY.into());
    let table = 0xE020_0000u64;
    mmio_write(&mut m, table + 16, 4, 0xFEE0_0000);
    mmio_write(&mut m, table + 16 + 8, 4, 0x45);
    // Enable with mask-all through config space.
    let cap = u16::from(
        m.device::<TestPci>("0000:00:03.0/test-pci")
            .unwrap()
            .config
            .msix_capability()
            .unwrap(),
    );
    cfg_write(
        &mut m,
        cap + 2,
        2,
        u64::from(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL),
    );
    mmio_write(&mut m, table + 16 + 12, 4, 0);
    // The device signals vector 1: pending (function masked).
    mmio_write(&mut m, 0xE000_0008, 4, 1);
    assert_eq!(m.stats.msis, 0);
    assert_eq!(
        mmio_read(&mut m, 0xE020_0800, 4),
        Some(0b10),
        "PBA through the BAR"
    );
    // Clearing mask-all in config space delivers it.
    cfg_write(&mut m, cap + 2, 2, PCI_MSIX_FLAGS_ENABLE.into());
    assert_eq!(m.stats.msis, 1);
    assert_eq!(mmio_read(&mut m, 0xE020_0800, 4), Some(0));
    // Entry mask through the BAR: pend, then unmask delivers.
    mmio_write(&mut m, table + 16 + 12, 4, 1);
    mmio_write(&mut m, 0xE000_0008, 4, 1);
    assert_eq!(m.stats.msis, 1);
    mmio_write(&mut m, table + 16 + 12, 4, 0);
    assert_eq!(m.stats.msis, 2);
    // Disabled: nothing.
    cfg_write(&mut m, cap + 2, 2, 0);
    mmio_write(&mut m, 0xE000_0008, 4, 1);
    assert_eq!(m.stats.msis, 2);
}

#[test]
fn a_failing_mapping_is_abandoned_whole() {
    let (mut m, d) = machine();
    cfg_write(&mut m, 0x10, 4, 0xE000_0000);
    cfg_write(&mut m, 0x20, 4, 0xE020_0000);
    // BAR 4's region is already mapped elsewhere (a setup bug): mapping
    // it fails, and BAR 0's mapping in the same transaction is undone.
    let sys = m.regions.system;
    let r = m.mem.create_container("elsewhere", 1 << 20).unwrap();
    m.mem.add_subregion(sys, 0xD000_0000, r).unwrap();
    let bar4 = m
        .mem
        .regions()
        .into_iter()
        .find(|&id| m.mem.region(id).unwrap().name == "msix")
        .unwrap();
    m.mem.add_subregion(r, 0, bar4).unwrap();
    let c = commits(&m);
    cfc_select(&mut m, 0, DEVFN, PCI_COMMAND as u8);
    let err = m.pio_write(0xCFC, 2, PCI_COMMAND_MEMORY.into());
    assert!(matches!(err, Err(MachineError::Memory(_))), "{err:?}");
    assert_eq!(commits(&m), c, "nothing reached listeners");
    assert_eq!(
        mmio_read(&mut m, 0xE000_0000, 4),
        None,
        "BAR 0 not half-mapped"
    );
    assert_eq!(m.mem.transaction_depth(), 0);
    // Fixed: the next update maps both.
    m.mem.del_subregion(r, bar4).unwrap();
    assert!(m.pci_update_mappings(d).unwrap());
    assert_eq!(mmio_read(&mut m, 0xE000_0000, 4), Some(TEST_MAGIC));
    assert_eq!(mmio_read(&mut m, 0xE020_000C, 4), Some(1));
}

#[test]
fn a_loaded_config_is_mapped() {
    let (mut a, _) = machine();
    cfg_write(&mut a, 0x10, 4, 0xE000_0000);
    cfg_write(&mut a, 0x1C, 4, 0xC000);
    cfg_write(
        &mut a,
        PCI_COMMAND,
        2,
        (PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER).into(),
    );
    cfc_select(&mut a, 0, 0, 0x80);
    a.pio_write(0xCF8, 4, 0x8000_1804).unwrap();
    let saved = a.save_devices();
    let (mut b, d) = machine();
    for (id, version, bytes) in &saved {
        b.load_device(id, *version, bytes).unwrap();
    }
    assert_eq!(mmio_read(&mut b, 0xE000_0000, 4), Some(TEST_MAGIC));
    assert_eq!(b.pio_read(0xC000, 4).unwrap(), TEST_MAGIC | (2 << 12));
    assert_eq!(
        b.pio_read(0xCF8, 4).unwrap(),
        0x8000_1804,
        "the latch migrates"
    );
    b.guest_memory()
        .unwrap()
        .write(0x3000, &7u32.to_le_bytes())
        .unwrap();
    mmio_write(&mut b, 0xE000_0000, 4, 0x3000);
    let dma = b
        .device::<TestPci>("0000:00:03.0/test-pci")
        .unwrap()
        .dma
        .take();
    assert_eq!(dma, Some(Ok(7)), "bus mastering restored");
    assert!(!b.pci_update_mappings(d).unwrap());
    // A state of another device layout is refused and changes nothing.
    let (id, version, bytes) = saved
        .iter()
        .find(|(id, ..)| id.idstr.ends_with("test-pci"))
        .unwrap();
    let mut bad = bytes.clone();
    bad[PCI_DEVICE_ID as usize] ^= 0xFF;
    let (mut c, _) = machine();
    assert!(c.load_device(id, *version, &bad).is_err());
    assert_eq!(mmio_read(&mut c, 0xE000_0000, 4), None);
}

#[test]
fn pci_setup_errors() {
    let mut m = crate::machine::tests::pc(32 << 20, 3 << 30);
    assert_eq!(
        m.add_pci_device("x", 8, Box::new(TestPci::new())),
        Err(MachineError::Config("no PCI host bridge"))
    );
    m.add_pci_host().unwrap();
    assert!(m.add_pci_host().is_err());
    assert!(
        m.add_pci_device("x", 0, Box::new(TestPci::new())).is_err(),
        "00.0 is the host"
    );
    m.add_pci_device("x", 8, Box::new(TestPci::new())).unwrap();
    assert!(m.add_pci_device("y", 8, Box::new(TestPci::new())).is_err());
    assert!(m
        .add_pci_device("z", 16, Box::new(crate::devices::debug_exit::DebugExit))
        .is_err());
    // A BAR naming a region the device lacks is an error, not a panic.
    cfc_select(&mut m, 0, 8, 0x10);
    m.pio_write(0xCFC, 4, 0xE000_0000).unwrap();
    cfc_select(&mut m, 0, 8, 0x04);
    assert!(m.pio_write(0xCFC, 2, PCI_COMMAND_MEMORY.into()).is_err());
    // RAM below 4 GiB reaching the ECAM window is refused.
    let mut big = Machine::new_pc(&crate::machine::MachineConfig {
        ram_bytes: 3 << 30,
        lowmem: 3 << 30,
    })
    .unwrap();
    assert!(big.add_pci_host().is_err());
}

#[test]
fn containers_take_region_indices() {
    let (mut m, d) = machine();
    // A sixth region: a container with an MMIO part, as a BAR with
    // several structures would be.
    let c = m.add_device_container(d, "bar5", 0x2000).unwrap();
    let part = m.add_device_region(d, "part", 0x100).unwrap();
    m.mem.add_subregion(c, 0x1000, part).unwrap();
    m.mem.add_subregion(m.regions.pci, 0xE100_0000, c).unwrap();
    assert_eq!(
        mmio_read(&mut m, 0xE100_1008, 4),
        Some(TEST_MAGIC | (6 << 12) | 8),
        "the part is region 6; the container took index 5"
    );
    assert_eq!(mmio_read(&mut m, 0xE100_0000, 4), None);
}
