//! What `benches/load.rs` measures, checked: the seed's largest shape set
//! up as drivers leave it, saved into a stream, parsed and loaded into a
//! fresh target with an EPT listener gives the exact counters the bench
//! reports (deferred: one listener commit, no forced commit, one EPT
//! update and one INVEPT), and the target ends up equal to the source.

use hv_core::devices::DeviceId;
use hv_core::machine::{CommitMode, DeviceSection, LoadStats, Machine};
use hv_core::testing::{self, MemEpt};
use hv_core::virtio::spec::DeviceSpec;
use migration::{read_self_described, MemChannel, StreamWriter};

const SHAPE: &str = "net:8x16,blk:16x4";
const RAM: u64 = 16 << 20;

fn machine() -> Machine {
    testing::machine_of(&DeviceSpec::parse(SHAPE).unwrap(), RAM).unwrap()
}

fn stream_of(m: &Machine) -> Vec<u8> {
    let mut w = StreamWriter::new(MemChannel::new(), "pc").unwrap();
    for (i, (dev, version, body, desc)) in m.save_devices_described().into_iter().enumerate() {
        let desc = desc.map(|d| d.to_json());
        w.device_raw(i as u32 + 1, &dev.idstr, dev.instance, version, &body, desc)
            .unwrap();
    }
    w.finish(true).unwrap().into_bytes()
}

fn load(stream: &[u8], mode: CommitMode) -> (LoadStats, u64, u64, Machine, MemEpt) {
    let parsed = read_self_described(stream).unwrap();
    let ids: Vec<(DeviceId, u32, &[u8])> = parsed
        .devices()
        .map(|(i, body)| {
            let id = DeviceId {
                idstr: i.idstr.into(),
                instance: i.instance,
            };
            (id, i.version, *body)
        })
        .collect();
    let sections: Vec<DeviceSection> = ids
        .iter()
        .map(|(id, version, data)| DeviceSection {
            id,
            version: *version,
            data,
        })
        .collect();
    let mut m = machine();
    let ept = testing::attach_ept(&mut m);
    let before = (ept.borrow().counters.updates, ept.borrow().host().invepts);
    let stats = m.load_devices(&sections, mode, true).unwrap();
    let updates = ept.borrow().counters.updates - before.0;
    let invepts = ept.borrow().host().invepts - before.1;
    (stats, updates, invepts, m, ept)
}

#[test]
fn the_bench_load_of_the_seed_shape_has_the_exact_counters() {
    let mut src = machine();
    let drivers = testing::set_up_as_driver(&mut src);
    assert_eq!(drivers.len(), 24);
    // 8 NICs of 16 pairs and a control queue, 16 disks of 4 queues.
    let queues: usize = drivers.iter().map(|d| d.queues.len()).sum();
    assert_eq!(queues, 8 * 33 + 16 * 4);
    let states = testing::function_states(&mut src);
    assert!(states
        .iter()
        .all(|s| s.queues_ready == s.queues && s.bars_mapped && s.bus_master && s.msix_enabled));
    let stream = stream_of(&src);
    let saved = src.save_devices();

    let (d, updates, invepts, mut m, ept) = load(&stream, CommitMode::Deferred);
    assert_eq!(
        (d.listener_commits, d.forced_commits, d.commits),
        (1, 0, 1),
        "{d:?}"
    );
    assert_eq!((updates, invepts), (1, 1));
    // Two BARs and the bus-master alias per function, the test device's
    // move and window; the pending tree is rendered twice (the test
    // device's own load reads it, then every post-load shares one render).
    assert_eq!(d.mutations, 24 * 3 + 2, "{d:?}");
    assert_eq!(d.renders, 2, "{d:?}");
    assert_eq!(m.save_devices(), saved);
    assert!(testing::function_states(&mut m)
        .iter()
        .all(|s| s.queues_ready == s.queues && s.bars_mapped));
    // The window of the test device is mapped to guest RAM in the EPT.
    let window = ept.borrow().translate(hv_core::machine::TEST_WINDOW_BASE);
    assert_eq!(
        window.map(|(h, _, _)| h.as_u64()),
        Some(testing::RAM_HPA),
        "window in the EPT"
    );

    let (e, updates, _, _, _) = load(&stream, CommitMode::Eager);
    assert_eq!(
        (e.listener_commits, e.forced_commits),
        (25, 0),
        "one commit per function and one for the test device: {e:?}"
    );
    assert_eq!(updates, 1);
    let (f, _, _, _, _) = load(&stream, CommitMode::ForcedRead);
    assert_eq!((f.listener_commits, f.forced_commits), (25, 25), "{f:?}");
}
