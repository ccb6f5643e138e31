//! The bench set-up does what it claims, and a deferred load of it gives
//! the exact counters the issue asks for.

use super::*;
use crate::machine::{CommitMode, DeviceSection};
use crate::virtio::pci::{STATUS_DRIVER_OK, STATUS_FEATURES_OK};

const SHAPE: &str = "net:2x4,blk:3x2";
const RAM: u64 = 4 << 20;

fn set_up(spec: &str) -> Machine {
    let mut m = machine_of(&DeviceSpec::parse(spec).unwrap(), RAM).unwrap();
    let drv = set_up_as_driver(&mut m);
    assert_eq!(drv.len(), 5);
    m
}

#[test]
fn the_driver_set_up_enables_every_queue_and_maps_every_bar() {
    let mut m = set_up(SHAPE);
    let states = function_states(&mut m);
    // Net: 4 pairs and the control queue; blk: 2 queues.
    let queues: Vec<usize> = states.iter().map(|s| s.queues).collect();
    assert_eq!(queues, [9, 9, 2, 2, 2]);
    for s in &states {
        assert_eq!(s.queues_ready, s.queues, "{s:?}");
        assert_eq!(
            s.status,
            1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            "{s:?}"
        );
        assert!(s.msix_enabled && s.bus_master && s.bars_mapped, "{s:?}");
    }
    // A fresh machine of the same shape has none of it.
    let mut fresh = machine_of(&DeviceSpec::parse(SHAPE).unwrap(), RAM).unwrap();
    for s in function_states(&mut fresh) {
        assert_eq!(s.queues_ready, 0);
        assert!(!s.msix_enabled && !s.bus_master && !s.bars_mapped, "{s:?}");
    }
}

#[test]
fn every_function_of_the_scaling_machine_is_set_up() {
    let mut m = machine_of_functions(10, 3, RAM).unwrap();
    assert_eq!(set_up_as_driver(&mut m).len(), 10);
    let states = function_states(&mut m);
    assert_eq!(states.len(), 10);
    assert_eq!(states[9].devfn, 8 + 9);
    assert!(states
        .iter()
        .all(|s| s.queues_ready == 3 && s.bars_mapped && s.bus_master));
    assert!(machine_of_functions(249, 1, RAM).is_err());
}

fn load(spec: &str, mode: CommitMode) -> (crate::machine::LoadStats, u64, u64, Machine) {
    let src = set_up(spec);
    let saved = src.save_devices();
    let sections: Vec<DeviceSection> = saved
        .iter()
        .map(|(id, version, data)| DeviceSection {
            id,
            version: *version,
            data,
        })
        .collect();
    let mut m = machine_of(&DeviceSpec::parse(spec).unwrap(), RAM).unwrap();
    let ept = attach_ept(&mut m);
    let (u0, i0) = {
        let e = ept.borrow();
        (e.counters.updates, e.host().invepts)
    };
    let stats = m.load_devices(&sections, mode, true).unwrap();
    let e = ept.borrow();
    let (u, i) = (e.counters.updates - u0, e.host().invepts - i0);
    drop(e);
    assert_eq!(
        m.save_devices(),
        saved,
        "{mode:?}: the target equals the source"
    );
    (stats, u, i, m)
}

#[test]
fn a_deferred_load_of_the_set_up_commits_once() {
    let (stats, updates, invepts, mut m) = load(SHAPE, CommitMode::Deferred);
    assert_eq!(stats.listener_commits, 1, "{stats:?}");
    assert_eq!(stats.forced_commits, 0, "{stats:?}");
    assert_eq!(stats.commits, 1, "{stats:?}");
    // Per function: BAR 4, BAR 1 and the bus-master alias; the test
    // device moves and turns its window on.
    assert_eq!(stats.mutations, 5 * 3 + 2, "{stats:?}");
    assert_eq!((updates, invepts), (1, 1));
    // The loaded machine is set up as the source was.
    for s in function_states(&mut m) {
        assert!(s.queues_ready == s.queues && s.bars_mapped && s.bus_master);
    }
}

#[test]
fn eager_and_forced_read_commit_per_function() {
    let (eager, updates, invepts, _) = load(SHAPE, CommitMode::Eager);
    assert_eq!(eager.forced_commits, 0);
    // Each function's mappings are one commit, and the test device's move
    // another; only the test device's window changes what the EPT maps.
    assert_eq!(eager.listener_commits, 5 + 1, "{eager:?}");
    assert_eq!((updates, invepts), (1, 1), "{eager:?}");
    let (forced, _, _, _) = load(SHAPE, CommitMode::ForcedRead);
    assert!(forced.forced_commits >= 5, "{forced:?}");
}

#[test]
fn a_clocked_load_counts_the_same_and_times_every_phase() {
    use core::sync::atomic::{AtomicU64, Ordering};
    static TICKS: AtomicU64 = AtomicU64::new(0);
    fn tick() -> u64 {
        TICKS.fetch_add(1, Ordering::Relaxed)
    }
    let (plain, _, _, _) = load(SHAPE, CommitMode::Deferred);
    let src = set_up(SHAPE);
    let saved = src.save_devices();
    let sections: Vec<DeviceSection> = saved
        .iter()
        .map(|(id, version, data)| DeviceSection {
            id,
            version: *version,
            data,
        })
        .collect();
    let mut m = machine_of(&DeviceSpec::parse(SHAPE).unwrap(), RAM).unwrap();
    attach_ept(&mut m);
    let (stats, p) = m
        .load_devices_clocked(&sections, CommitMode::Deferred, true, tick)
        .unwrap();
    assert_eq!(stats, plain);
    // The clock advances one tick per reading: each phase that ran was
    // read at least once around its work.
    for (what, t) in [
        ("check", p.check),
        ("duplicate", p.duplicate),
        ("decode", p.decode),
        ("map", p.map),
        ("post_load", p.post_load),
        ("commit", p.commit),
    ] {
        assert!(t >= 1, "{what}: {p:?}");
    }
    assert_eq!(m.save_devices(), saved);
}
