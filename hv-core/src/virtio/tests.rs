//! virtio-pci devices on a real `Machine`, driven by the small driver of
//! [`crate::testing::driver`] (written from the virtio 1.x spec):
//! configuration through CF8/CFC, BARs, MSI-X, rings in guest RAM, kicks
//! through the write notifiers.

use super::blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use super::net::VirtioNet;
use super::pci::{VirtioPci, NO_VECTOR, STATUS_NEEDS_RESET};
use super::spec::{add_devices, DeviceSpec};
use crate::addr::HostPhysAddr;
use crate::devices::Device;
use crate::ept_listener::RamBlock;
use crate::machine::{Machine, BIOS_SIZE};
use crate::phys::mock::MockPhys;
use crate::testing::driver::*;
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

const RAM: u64 = 4 << 20;
fn machine(spec: &str) -> Machine {
    let mut m = crate::machine::tests::pc(RAM, 3 << 30);
    m.add_pci_host().unwrap();
    add_devices(&mut m, &DeviceSpec::parse(spec).unwrap(), 16, None).unwrap();
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
    m.attach_ram(blocks, Box::new(MockPhys::new(8 << 20)));
    m
}

fn blk_request(d: &mut Drv, m: &mut Machine, q: usize, kind: u32, sector: u64, data: u64) {
    let hdr = 0x30_0000;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    ram_write(m, hdr, &h);
    ram_write(m, hdr + 16, &[0xEE]);
    let write = kind == VIRTIO_BLK_T_IN;
    d.submit(
        m,
        q,
        &[(hdr, 16, false), (data, 1024, write), (hdr + 16, 1, true)],
    );
}

#[test]
fn blk_writes_and_reads_back_through_every_queue_with_msix() {
    let mut m = machine("blk:1x2");
    let mut d = Drv::init(&mut m, 0, 1, V1 | 1 << 12, true);
    assert_eq!(d.queues.len(), 2);
    for q in 0..2usize {
        let data: Vec<u8> = (0..1024).map(|i| (i * 7 + q * 13) as u8).collect();
        ram_write(&mut m, 0x31_0000, &data);
        let msis = m.stats.msis;
        blk_request(&mut d, &mut m, q, VIRTIO_BLK_T_OUT, 4 * q as u64, 0x31_0000);
        assert_eq!(
            d.used(&mut m, q),
            (1, 0, 1),
            "OUT completes with status only"
        );
        assert_eq!(ram_read(&mut m, 0x30_0010, 1), [0], "status OK");
        assert_eq!(m.stats.msis, msis + 1, "one MSI-X message per completion");
        ram_write(&mut m, 0x32_0000, &[0u8; 1024]);
        blk_request(&mut d, &mut m, q, VIRTIO_BLK_T_IN, 4 * q as u64, 0x32_0000);
        assert_eq!(d.used(&mut m, q), (2, 0, 1025));
        assert_eq!(ram_read(&mut m, 0x32_0000, 1024), data);
    }
    // Past the end of the 16-sector disk: IOERR, the device keeps going.
    blk_request(&mut d, &mut m, 0, VIRTIO_BLK_T_IN, 15, 0x32_0000);
    assert_eq!(ram_read(&mut m, 0x30_0010, 1), [1]);
    assert_eq!(d.status(&mut m), 0x0F);
}

#[test]
fn frames_cross_the_switch_on_the_same_queue_pair() {
    let mut m = machine("net:2x2");
    let features = V1 | 1 << 5 | 1 << 17 | 1 << 22;
    let mut a = Drv::init(&mut m, 0, 1, features, true);
    let mut b = Drv::init(&mut m, 1, 2, features, true);
    let mac_b: Vec<u8> = (0..6)
        .map(|k| mmio_read(&mut m, b.device + k, 1) as u8)
        .collect();
    // Both NICs enable 2 pairs on the control queue (queue 4).
    for d in [&mut a, &mut b] {
        ram_write(&mut m, 0x30_0000, &[4, 0, 2, 0]);
        d.submit(&mut m, 4, &[(0x30_0000, 4, false), (0x30_0010, 1, true)]);
        assert_eq!(ram_read(&mut m, 0x30_0010, 1), [0], "VQ_PAIRS_SET acked");
    }
    // B posts a receive buffer on rx1 (queue 2); A sends on tx1 (queue 3).
    b.submit(&mut m, 2, &[(0x34_0000, 2048, true)]);
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&mac_b);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xB5]);
    frame.extend_from_slice(b"tern frame on pair 1");
    ram_write(&mut m, 0x33_0000, &frame);
    a.submit(&mut m, 3, &[(0x33_0000, frame.len() as u32, false)]);
    assert_eq!(a.used(&mut m, 3), (1, 0, 0));
    let (idx, _, len) = b.used(&mut m, 2);
    assert_eq!((idx, len as usize), (1, frame.len()));
    let got = ram_read(&mut m, 0x34_0000, frame.len());
    assert_eq!(&got[12..], &frame[12..]);
    assert_eq!(got[10], 1, "num_buffers");
    assert_eq!(b.used(&mut m, 0).0, 0, "nothing on pair 0");
    assert_eq!(m.stats.frames_switched, 1);
}

#[test]
fn frames_waiting_for_receive_buffers_are_bounded_in_bytes() {
    let mut m = machine("net:2x1");
    let features = V1 | 1 << 5 | 1 << 17 | 1 << 22;
    let mut a = Drv::init(&mut m, 0, 1, features, true);
    let b = Drv::init(&mut m, 1, 2, features, true);
    let mac_b: Vec<u8> = (0..6)
        .map(|k| mmio_read(&mut m, b.device + k, 1) as u8)
        .collect();
    // B posts no receive buffer; A sends 8 frames of 60,000 bytes.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&mac_b);
    frame.resize(12 + 60_000, 0x5A);
    ram_write(&mut m, 0x20_0000, &frame);
    for _ in 0..8 {
        a.submit(&mut m, 1, &[(0x20_0000, frame.len() as u32, false)]);
    }
    let nic = m
        .device::<VirtioPci<VirtioNet>>("0000:00:02.0/virtio-net")
        .unwrap();
    let c = nic.backend.counters;
    // 256 KiB of backlog holds 4 of them; the rest are dropped.
    assert_eq!(c.rx_dropped, 4, "{c:?}");
    assert_eq!(m.stats.frames_switched, 8);
}

#[test]
fn bad_descriptor_needs_reset_with_one_report_and_reset_recovers() {
    let mut m = machine("blk:1x1");
    let mut d = Drv::init(&mut m, 0, 1, V1, true);
    let msis = m.stats.msis;
    d.submit(
        &mut m,
        0,
        &[
            (0x30_0000, 16, false),
            (0x7_0000_0000, 512, true),
            (0x30_0010, 1, true),
        ],
    );
    assert_eq!(d.status(&mut m) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(m.stats.msis, msis + 1, "configuration interrupt");
    let reports = m.take_reports();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].1.contains("not RAM"), "{reports:?}");
    // More kicks do nothing and report nothing more.
    mmio_write(&mut m, d.notify, 2, 0);
    assert!(m.take_reports().is_empty());
    // Reset, set up again, and it works.
    mmio_write(&mut m, d.common + 0x14, 1, 0);
    assert_eq!(d.status(&mut m), 0);
    let mut d = Drv::init(&mut m, 0, 1, V1, true);
    ram_write(&mut m, 0x31_0000, &[0x5A; 1024]);
    blk_request(&mut d, &mut m, 0, VIRTIO_BLK_T_OUT, 0, 0x31_0000);
    assert_eq!(d.status(&mut m), 0x0F, "{:?}", m.take_reports());
    assert_eq!(ram_read(&mut m, 0x30_0010, 1), [0]);
}

#[test]
fn without_bus_mastering_the_rings_are_not_reachable() {
    let mut m = machine("blk:1x1");
    // DMA goes through the function's bus-master space, which shows no
    // memory until COMMAND.MASTER is set: enabling the queue fails.
    let d = Drv::init(&mut m, 0, 1, V1, false);
    assert_eq!(d.status(&mut m) & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    let r = m.take_reports();
    assert!(r[0].1.contains("not one contiguous"), "{r:?}");
}

#[test]
fn msix_vectors_beyond_the_table_read_back_as_no_vector() {
    let mut m = machine("blk:1x1");
    let d = Drv::init(&mut m, 0, 1, V1, true);
    mmio_write(&mut m, d.common + 0x10, 2, 999);
    assert_eq!(mmio_read(&mut m, d.common + 0x10, 2), u64::from(NO_VECTOR));
    mmio_write(&mut m, d.common + 0x10, 2, 1);
    assert_eq!(mmio_read(&mut m, d.common + 0x10, 2), 1);
    let _ = d.devfn;
}

#[test]
fn features_the_device_did_not_offer_are_refused() {
    let mut m = machine("blk:1x1");
    let common = {
        let d = Drv::init(&mut m, 0, 1, V1, true);
        d.common
    };
    mmio_write(&mut m, common + 0x14, 1, 0);
    mmio_write(&mut m, common + 0x14, 1, 3);
    mmio_write(&mut m, common + 0x08, 4, 0);
    mmio_write(&mut m, common + 0x0C, 4, 1 << 30); // not offered
    mmio_write(&mut m, common + 0x08, 4, 1);
    mmio_write(&mut m, common + 0x0C, 4, 1);
    mmio_write(&mut m, common + 0x14, 1, 3 | 8);
    assert_eq!(mmio_read(&mut m, common + 0x14, 1) & 8, 0);
}

#[test]
fn device_state_saves_and_loads_whole_or_not_at_all() {
    let mut m = machine("net:1x2");
    let features = V1 | 1 << 5 | 1 << 17 | 1 << 22;
    let mut d = Drv::init(&mut m, 0, 1, features, true);
    ram_write(&mut m, 0x30_0000, &[4, 0, 2, 0]);
    d.submit(&mut m, 4, &[(0x30_0000, 4, false), (0x30_0010, 1, true)]);
    let saved = m.save_devices();
    let (id, version, bytes) = saved
        .iter()
        .find(|(id, _, _)| id.idstr.ends_with("virtio-net"))
        .cloned()
        .unwrap();
    // A truncated state is refused and nothing changes.
    let before = m.save_devices();
    assert!(m
        .load_device(&id, version, &bytes[..bytes.len() - 1])
        .is_err());
    assert_eq!(m.save_devices(), before);
    // The full state loads and reads back identical.
    m.load_device(&id, version, &bytes).unwrap();
    assert_eq!(m.save_devices(), before);
    let net = m
        .device::<VirtioPci<VirtioNet>>(&id.idstr)
        .expect("the NIC");
    assert_eq!(net.backend.active_pairs(), 2);
    assert_eq!(net.queues()[4].state().last_avail, 1);
    let _: &mut dyn Device = net;
}

#[test]
fn device_type_state_travels_as_its_own_described_subsection() {
    let mut m = machine("net:1x2,blk:1x1");
    let described = m.save_devices_described();
    let find = |kind: &str| {
        described
            .iter()
            .find(|(id, ..)| id.idstr.ends_with(kind))
            .cloned()
            .unwrap()
    };
    let (net_id, version, net_body, net_desc) = find("/virtio-net");
    let (blk_id, _, blk_body, blk_desc) = find("/virtio-blk");
    // Each section's description names its device type's subsection and
    // its fields (what analyze-migration.py shows).
    let net_json = format!("{:?}", net_desc.unwrap().to_json());
    let blk_json = format!("{:?}", blk_desc.unwrap().to_json());
    assert!(net_json.contains("virtio-pci/virtio-net") && net_json.contains("curr_queue_pairs"));
    assert!(blk_json.contains("virtio-pci/virtio-blk") && blk_json.contains("capacity"));
    assert!(!net_json.contains("virtio-pci/virtio-blk"));
    // A device refuses another type's state, and a disk of another size;
    // nothing changes.
    let before = m.save_devices();
    assert!(m.load_device(&blk_id, version, &net_body).is_err());
    assert!(m.load_device(&net_id, version, &blk_body).is_err());
    let mut other = machine("net:1x2,blk:1x1");
    let bigger: Vec<u8> = alloc::vec![0; 64 * 512];
    let blk = other
        .device::<VirtioPci<crate::virtio::blk::VirtioBlk>>(&blk_id.idstr)
        .unwrap();
    blk.backend
        .attach_disk(alloc::rc::Rc::new(core::cell::RefCell::new(bigger)));
    assert!(other.load_device(&blk_id, version, &blk_body).is_err());
    assert_eq!(m.save_devices(), before);
    m.load_device(&blk_id, version, &blk_body).unwrap();
    m.load_device(&net_id, version, &net_body).unwrap();
    assert_eq!(m.save_devices(), before);
}

// ----------------------------------------------------------------------
// Loading every device's state in one transaction (the migration load).
// ----------------------------------------------------------------------

mod load {
    use super::*;
    use crate::devices::DeviceId;
    use crate::ept::PageSizes;
    use crate::ept_listener::{EptCounters, EptListener, EptMode};
    use crate::machine::{
        CommitMode, DeviceSection, LoadError, TEST_DEVICE_BASE, TEST_WINDOW_BASE,
    };
    use crate::memory::FlatView;
    use crate::testing::MemHost;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    const SHAPE: &str = "net:2x2,blk:2x2";

    /// The machine of `SHAPE` plus the test device and its RAM window, as
    /// the kernel builds it.
    fn build() -> Machine {
        let mut m = machine(SHAPE);
        crate::testing::add_test_device(&mut m);
        m
    }

    /// A source machine as a guest left it: every device set up, frames
    /// and blocks moved, the test device moved with its window on.
    fn source() -> Machine {
        let mut m = build();
        let net = V1 | 1 << 5 | 1 << 17 | 1 << 22;
        let mut a = Drv::init(&mut m, 0, 1, net, true);
        let _b = Drv::init(&mut m, 1, 2, net, true);
        ram_write(&mut m, 0x30_0000, &[4, 0, 2, 0]);
        a.submit(&mut m, 4, &[(0x30_0000, 4, false), (0x30_0010, 1, true)]);
        let mut d = Drv::init(&mut m, 2, 3, V1 | 1 << 12, true);
        Drv::init(&mut m, 3, 4, V1 | 1 << 12, true);
        ram_write(&mut m, 0x31_0000, &[0x77; 1024]);
        blk_request(&mut d, &mut m, 1, VIRTIO_BLK_T_OUT, 2, 0x31_0000);
        mmio_write(&mut m, TEST_DEVICE_BASE + 8, 8, 0xFEA0_0000 | 1);
        m
    }

    fn target() -> (Machine, Rc<RefCell<EptListener<MemHost>>>) {
        let mut m = build();
        let host = MemHost::new(24 << 20);
        let blocks = vec![
            RamBlock {
                hpa: HostPhysAddr::new(0x1_0000_0000),
                size: RAM,
            },
            RamBlock {
                hpa: HostPhysAddr::new(0x2_0000_0000),
                size: BIOS_SIZE,
            },
        ];
        let sizes = PageSizes {
            two_mib: true,
            one_gib: true,
        };
        let ept = Rc::new(RefCell::new(
            EptListener::new(host, sizes, blocks, true, EptMode::Incremental).unwrap(),
        ));
        let space = m.memory;
        m.mem.add_listener(space, 0, ept.clone()).unwrap();
        (m, ept)
    }

    type Saved = Vec<(DeviceId, u32, Vec<u8>)>;

    fn sections(saved: &Saved) -> Vec<DeviceSection<'_>> {
        saved
            .iter()
            .map(|(id, version, data)| DeviceSection {
                id,
                version: *version,
                data,
            })
            .collect()
    }

    /// Every address space's committed view.
    fn views(m: &Machine) -> Vec<Rc<FlatView>> {
        m.mem
            .address_spaces()
            .into_iter()
            .map(|s| m.mem.committed_view(s).unwrap())
            .collect()
    }

    fn ept_state(ept: &Rc<RefCell<EptListener<MemHost>>>) -> (EptCounters, u64, Vec<Option<u64>>) {
        let e = ept.borrow();
        let probes = [
            0,
            0x1000,
            TEST_WINDOW_BASE,
            TEST_WINDOW_BASE + 0x1F_F000,
            RAM - 0x1000,
        ];
        let map = probes
            .iter()
            .map(|&g| e.translate(g).map(|(h, _, _)| h.as_u64()))
            .collect();
        (e.counters, e.host().invepts, map)
    }

    #[test]
    fn one_transaction_one_listener_commit_one_ept_update() {
        let mut src = source();
        let saved = src.save_devices();
        let want = views(&src);
        let (mut m, ept) = target();
        let ept_before = ept_state(&ept);
        let stats = m
            .load_devices(&sections(&saved), CommitMode::Deferred, true)
            .unwrap();
        // Exact counters of the deferred load: one listener commit (the
        // memory space is the only one with a listener), no forced
        // commit, one EPT update and one INVEPT (the test device's RAM
        // window appeared).
        assert_eq!(stats.listener_commits, 1, "{stats:?}");
        assert_eq!(stats.forced_commits, 0);
        assert_eq!(stats.commits, 1);
        // Renders in all: two on-demand renders of the pending tree (the
        // test device's own load moves its region before the PCI mappings
        // follow; then every post-load read shares one), and the commit
        // reuses the last one. Interleaved, each PCI function's read would
        // render once more.
        assert_eq!(
            (stats.renders, stats.on_demand_renders),
            (2, 2),
            "{stats:?}"
        );
        let (c, invepts, map) = ept_state(&ept);
        assert_eq!(c.updates - ept_before.0.updates, 1);
        assert_eq!(invepts - ept_before.1, 1);
        assert_eq!(map[2], Some(0x1_0000_0000), "window mapped to RAM");
        // Same devices, same views as the source.
        assert_eq!(m.save_devices(), saved);
        assert_eq!(views(&m), want);
        let _ = src.take_reports();
    }

    #[test]
    fn all_three_modes_leave_the_same_machine() {
        let saved = source().save_devices();
        let mut results = Vec::new();
        for mode in [
            CommitMode::Deferred,
            CommitMode::Eager,
            CommitMode::ForcedRead,
        ] {
            let (mut m, ept) = target();
            let stats = m.load_devices(&sections(&saved), mode, true).unwrap();
            let (_, _, map) = ept_state(&ept);
            results.push((mode, stats, m.save_devices(), views(&m), map));
        }
        let (_, deferred, dev0, views0, map0) = &results[0];
        for (mode, stats, dev, v, map) in &results[1..] {
            assert_eq!(dev, dev0, "{mode:?}: device state");
            assert_eq!(v, views0, "{mode:?}: flat views");
            assert_eq!(map, map0, "{mode:?}: EPT");
            assert!(
                stats.listener_commits > deferred.listener_commits,
                "{mode:?} commits to listeners more often: {stats:?}"
            );
        }
        assert!(
            results[2].1.forced_commits > 0,
            "forced-read forces commits"
        );
        assert_eq!(results[1].1.forced_commits, 0);
    }

    /// A load that fails leaves the target exactly as it was.
    fn assert_refused(saved: &Saved, mode: CommitMode, expect: impl Fn(&LoadError) -> bool) {
        let (mut m, ept) = target();
        let devices = m.save_devices();
        let v = views(&m);
        let e = ept_state(&ept);
        let listener_commits = m.mem.stats().listener_commits;
        let err = m
            .load_devices(&sections(saved), mode, true)
            .expect_err("the load must fail");
        assert!(expect(&err), "{mode:?}: {err}");
        assert_eq!(m.save_devices(), devices, "{mode:?}: devices changed");
        assert_eq!(views(&m), v, "{mode:?}: flat views changed");
        // The EPT maps the same in every mode. Only the deferred load never
        // showed the listener anything: forced-read and eager committed
        // intermediate states (then undid them), as the seed's and QEMU's
        // loads do.
        assert_eq!(ept_state(&ept).2, e.2, "{mode:?}: EPT mappings changed");
        if mode == CommitMode::Deferred {
            assert_eq!(ept_state(&ept), e, "{mode:?}: EPT touched");
            assert_eq!(m.mem.stats().listener_commits, listener_commits);
        }
        assert_eq!(m.mem.transaction_depth(), 0, "no transaction left open");
    }

    #[test]
    fn a_bad_section_changes_nothing_in_any_mode() {
        let saved = source().save_devices();
        for mode in [
            CommitMode::Deferred,
            CommitMode::Eager,
            CommitMode::ForcedRead,
        ] {
            // The last device's state is cut short: everything before it
            // loaded fine (BARs, the window) and must be undone.
            let mut bad = saved.clone();
            let last = bad.last_mut().unwrap();
            last.2.pop();
            assert_refused(&bad, mode, |e| matches!(e, LoadError::State { .. }));
            // A queue whose rings are outside RAM is refused after the
            // memory map followed the state (post-load).
            let mut bad = saved.clone();
            let blk = bad
                .iter_mut()
                .find(|(id, _, _)| id.idstr.ends_with("virtio-blk"))
                .unwrap();
            let at = find_u64(&blk.2, ring(2, 0)).expect("the saved ring address");
            blk.2[at..at + 8].copy_from_slice(&0x7_0000_0000u64.to_be_bytes());
            assert_refused(&bad, mode, |e| matches!(e, LoadError::PostLoad { .. }));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Real saved states with one byte changed or cut short: the load
        /// never panics, and when it refuses, nothing changed (devices,
        /// every flat view, the EPT, no transaction left open).
        #[test]
        fn mutated_states_load_whole_or_not_at_all(
            section in 0usize..64,
            at in 0usize..1 << 16,
            byte in proptest::prelude::any::<u8>(),
            cut in proptest::prelude::any::<bool>(),
        ) {
            let mut saved = source().save_devices();
            let n = saved.len();
            let data = &mut saved[section % n].2;
            if !data.is_empty() {
                let i = at % data.len();
                if cut {
                    data.truncate(i);
                } else {
                    data[i] = byte;
                }
            }
            let (mut m, ept) = target();
            let devices = m.save_devices();
            let v = views(&m);
            let e = ept_state(&ept);
            let r = m.load_devices(&sections(&saved), CommitMode::Deferred, true);
            proptest::prop_assert_eq!(m.mem.transaction_depth(), 0);
            if r.is_err() {
                proptest::prop_assert!(m.save_devices() == devices, "devices changed");
                proptest::prop_assert!(views(&m) == v, "views changed");
                proptest::prop_assert!(ept_state(&ept) == e, "EPT changed");
            }
        }
    }

    /// Where `v` is in a state (vmstate is big-endian).
    #[test]
    fn a_device_that_moved_its_regions_is_put_back_when_a_later_section_fails() {
        // The test device's state (which moves its region and turns its
        // RAM window on) comes first; a later section is cut short.
        let mut saved = source().save_devices();
        saved.reverse();
        assert!(saved[0].0.idstr == "tern-test");
        let last = saved.last_mut().unwrap();
        last.2.pop();
        for mode in [
            CommitMode::Deferred,
            CommitMode::Eager,
            CommitMode::ForcedRead,
        ] {
            assert_refused(&saved, mode, |e| matches!(e, LoadError::State { .. }));
        }
    }

    fn find_u64(data: &[u8], v: u64) -> Option<usize> {
        data.windows(8).position(|w| w == v.to_be_bytes())
    }

    #[test]
    fn sections_must_name_each_device_once() {
        let saved = source().save_devices();
        let mut dup = saved.clone();
        dup.push(saved[0].clone());
        assert_refused(&dup, CommitMode::Deferred, |e| {
            matches!(e, LoadError::Duplicate { .. })
        });
        let mut unknown = saved.clone();
        unknown[0].0.idstr = "0000:00:1f.0/virtio-gpu".into();
        assert_refused(&unknown, CommitMode::Deferred, |e| {
            matches!(e, LoadError::NoSuchDevice { .. })
        });
        let missing: Saved = saved[1..].to_vec();
        assert_refused(&missing, CommitMode::Deferred, |e| {
            matches!(e, LoadError::Missing { .. })
        });
    }
}
