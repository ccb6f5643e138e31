//! The whole incoming path (`migration::incoming::load`), as the kernel runs
//! it for a stream from another Tern: a machine of a seed shape whose guest
//! assigned every BAR and turned on memory decoding and bus mastering
//! streams its RAM, disks, devices, `tern-vm` and `cpu`; a fresh machine of
//! the same shape loads it in each mode and ends up equal. Refused streams
//! (one per error class, then a property test of random mutations) change
//! nothing: devices, memory tree, flat views and RAM are compared with a
//! snapshot taken before the load.

use hv_core::devices::DeviceId;
use hv_core::machine::{CommitMode, Machine, MachineConfig};
use hv_core::memory::{ListenerCtx, MemoryListener};
use hv_core::vcpu::{VcpuState, VcpuWire};
use hv_core::virtio::spec::{add_devices, DeviceSpec};
use hv_core::vmstate::Json;
use migration::incoming::{self, IncomingError, Loaded, RamTarget, TernVmWire};
use migration::reader::read_self_described;
use migration::writer::RamSection;
use migration::{MemChannel, StreamWriter};
use proptest::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

const SHAPE: &str = "net:2x4,blk:2x2";
const RAM: u64 = 1 << 20;
const DISK: u64 = 8 << 10;

/// Counts the commits reaching a listener of the system memory space (as
/// the EPT listener would receive them).
#[derive(Default)]
struct Commits(u64);

impl MemoryListener for Commits {
    fn commit(&mut self, _cx: &ListenerCtx<'_>) {
        self.0 += 1;
    }
}

fn machine() -> Machine {
    machine_with(Rc::new(RefCell::new(Commits::default())))
}

fn machine_with(commits: Rc<RefCell<Commits>>) -> Machine {
    let mut m = Machine::new_pc(&MachineConfig::default()).unwrap();
    m.add_platform(1_000_000_000, 0).unwrap();
    m.add_pci_host().unwrap();
    add_devices(&mut m, &DeviceSpec::parse(SHAPE).unwrap(), 16, None).unwrap();
    let space = m.memory;
    m.mem.add_listener(space, 0, commits).unwrap();
    m
}

/// What a driver leaves: BAR 4 (64-bit) and BAR 1 of every virtio function
/// assigned, memory decoding and bus mastering on, MSI-X enabled.
fn set_up(m: &mut Machine) {
    let fns: Vec<u8> = m.pci_devices().map(|(devfn, _)| devfn).collect();
    for (i, devfn) in fns.into_iter().filter(|&d| d != 0).enumerate() {
        let i = i as u32;
        m.pci_config_write(0, devfn, 0x20, 4, 0xD000_0000 + i * 0x4000)
            .unwrap();
        m.pci_config_write(0, devfn, 0x24, 4, 0).unwrap();
        m.pci_config_write(0, devfn, 0x14, 4, 0xD100_0000 + i * 0x1000)
            .unwrap();
        m.pci_config_write(0, devfn, 0x04, 2, 0x6).unwrap();
    }
}

fn vcpu() -> VcpuState {
    let mut s = VcpuState {
        fxsave: vec![0; 512],
        pat: 0x0007_0406_0007_0406,
        dr: [0, 0, 0, 0, 0xFFFF_0FF0, 0x400],
        cr0: 0x8000_0011,
        efer: 0x500,
        rip: 0x10_0000,
        tsc: 123_456_789,
        ..Default::default()
    };
    s.fxsave[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
    s
}

fn check(s: &VcpuState) -> Result<(), String> {
    s.check(0xFFBF, 0).map_err(String::from)
}

/// RAM blocks in host memory of the test.
#[derive(Clone, Debug, PartialEq)]
struct Ram(Vec<(String, Vec<u8>)>);

impl Ram {
    fn new() -> Self {
        Self(vec![
            ("pc.ram".into(), vec![0; RAM as usize]),
            (
                "0000:00:03.0/virtio-blk.disk".into(),
                vec![0; DISK as usize],
            ),
        ])
    }
}

impl RamTarget for Ram {
    fn blocks(&self) -> Vec<(String, u64)> {
        self.0
            .iter()
            .map(|(n, b)| (n.clone(), b.len() as u64))
            .collect()
    }
    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.0[block].1[o..o + data.len()].copy_from_slice(data);
    }
}

/// The source's RAM: a pattern in a few pages, the rest zero.
fn source_ram() -> Ram {
    let mut r = Ram::new();
    for p in [0usize, 1, 7, 254] {
        r.0[0].1[p * 4096..(p + 1) * 4096].fill(p as u8 + 1);
    }
    r.0[1].1[4096..8192].fill(0xD1);
    r
}

fn stream_with(
    m: &Machine,
    ram: &Ram,
    edit: impl FnOnce(&mut StreamWriter<MemChannel>, &mut u32),
) -> Vec<u8> {
    let mut w = StreamWriter::new(MemChannel::new(), "pc").unwrap();
    let blocks: Vec<(&str, u64)> = ram
        .0
        .iter()
        .map(|(n, b)| (n.as_str(), b.len() as u64))
        .collect();
    w.ram_setup(0, &blocks).unwrap();
    w.ram_begin(RamSection::End).unwrap();
    for (name, bytes) in &ram.0 {
        for (i, page) in bytes.chunks(4096).enumerate() {
            w.ram_page(name, i as u64 * 4096, page).unwrap();
        }
    }
    w.ram_finish().unwrap();
    let mut id = 1;
    for (dev, version, body, desc) in m.save_devices_described() {
        w.device_raw(
            id,
            &dev.idstr,
            dev.instance,
            version,
            &body,
            desc.map(|d| d.to_json()),
        )
        .unwrap();
        id += 1;
    }
    edit(&mut w, &mut id);
    w.finish(true).unwrap().into_bytes()
}

fn add_vm(w: &mut StreamWriter<MemChannel>, id: &mut u32) {
    w.device(*id, "tern-vm", 0, &mut TernVmWire { generation: 3 })
        .unwrap();
    *id += 1;
}

fn add_cpu(w: &mut StreamWriter<MemChannel>, id: &mut u32, s: &VcpuState) {
    w.device(*id, "cpu", 0, &mut VcpuWire::of(s)).unwrap();
    *id += 1;
}

fn good_stream(m: &Machine) -> Vec<u8> {
    stream_with(m, &source_ram(), |w, id| {
        add_vm(w, id);
        add_cpu(w, id, &vcpu());
    })
}

type Snapshot = (Vec<(DeviceId, u32, Vec<u8>)>, String, String, Ram);

fn snapshot(m: &mut Machine, ram: &Ram) -> Snapshot {
    let (tree, flat) = m.mtree().unwrap();
    (m.save_devices(), tree, flat, ram.clone())
}

/// A clock that advances by one at every reading.
fn counter() -> u64 {
    static T: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    T.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn load(
    m: &mut Machine,
    ram: &mut Ram,
    s: &[u8],
    mode: CommitMode,
) -> Result<Loaded, IncomingError> {
    incoming::load(m, ram, s, mode, &check, counter)
}

#[test]
fn a_whole_stream_loads_into_a_fresh_machine_in_each_mode() {
    let mut src = machine();
    set_up(&mut src);
    let bytes = good_stream(&src);
    let want = snapshot(&mut src, &source_ram());
    for mode in [
        CommitMode::Deferred,
        CommitMode::Eager,
        CommitMode::ForcedRead,
    ] {
        let commits = Rc::new(RefCell::new(Commits::default()));
        let mut dst = machine_with(commits.clone());
        let mut ram = Ram::new();
        let before = commits.borrow().0;
        let l = load(&mut dst, &mut ram, &bytes, mode).unwrap();
        let seen = commits.borrow().0 - before;
        let got = snapshot(&mut dst, &ram);
        assert_eq!(got.0, want.0, "{mode:?}: devices");
        assert_eq!(got.1, want.1, "{mode:?}: memory tree");
        assert_eq!(got.2, want.2, "{mode:?}: flat views");
        assert_eq!(got.3, want.3, "{mode:?}: RAM");
        assert_eq!(l.vcpu, vcpu());
        assert_eq!(l.vm.generation, 3);
        // Every device section is timed on its own, within the whole load.
        assert_eq!(l.section_ticks.len(), l.sections);
        assert!(
            l.section_ticks.iter().all(|(_, t)| *t > 0),
            "{:?}",
            l.section_ticks
        );
        let sum: u64 = l.section_ticks.iter().map(|(_, t)| t).sum();
        assert!(sum < l.load_ticks, "{sum} of {}", l.load_ticks);
        assert_eq!(l.pages, (RAM + DISK) / 4096);
        assert_eq!(l.zero_pages, (RAM + DISK) / 4096 - 5);
        // Deferred: the BAR mappings of every device reach the listeners
        // as one commit, and no read forces an early one.
        // The system memory listener sees one commit; the load's own
        // count adds the listeners of the devices' bus-master spaces.
        match mode {
            CommitMode::Deferred => {
                assert_eq!((seen, l.stats.forced_commits), (1, 0));
            }
            CommitMode::Eager => assert!(seen > 1, "eager: {seen} commits"),
            CommitMode::ForcedRead => {
                assert!(
                    seen > 1 && l.stats.forced_commits > 0,
                    "forced-read: {seen}"
                )
            }
        }
    }
}

/// One refused stream: the load fails with an error `want` accepts, and
/// the machine and RAM are as before.
fn refused(bytes: &[u8], want: fn(&IncomingError) -> bool) {
    for mode in [
        CommitMode::Deferred,
        CommitMode::Eager,
        CommitMode::ForcedRead,
    ] {
        let mut dst = machine();
        let mut ram = Ram::new();
        let before = snapshot(&mut dst, &ram);
        let e = load(&mut dst, &mut ram, bytes, mode).unwrap_err();
        assert!(want(&e), "{mode:?}: unexpected error {e}");
        let after = snapshot(&mut dst, &ram);
        assert_eq!(after.0, before.0, "{mode:?} {e}: devices changed");
        assert_eq!(after.1, before.1, "{mode:?} {e}: memory tree changed");
        assert_eq!(after.2, before.2, "{mode:?} {e}: flat views changed");
        if !matches!(e, IncomingError::Devices(_)) {
            assert!(after.3 == before.3, "{mode:?} {e}: RAM written");
        }
        // The error says where.
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn each_refused_stream_changes_nothing() {
    let mut src = machine();
    set_up(&mut src);
    let vm_missing = |e: &IncomingError| matches!(e, IncomingError::Vm { .. });
    // No cpu section; no tern-vm section; two cpu sections.
    refused(&stream_with(&src, &source_ram(), add_vm), vm_missing);
    refused(
        &stream_with(&src, &source_ram(), |w, id| add_cpu(w, id, &vcpu())),
        vm_missing,
    );
    refused(
        &stream_with(&src, &source_ram(), |w, id| {
            add_vm(w, id);
            add_cpu(w, id, &vcpu());
            w.device(*id, "cpu", 1, &mut VcpuWire::of(&vcpu())).unwrap();
        }),
        vm_missing,
    );
    // A vCPU state the check refuses (a reserved PAT type).
    let mut bad = vcpu();
    bad.pat = 2;
    refused(
        &stream_with(&src, &source_ram(), |w, id| {
            add_vm(w, id);
            add_cpu(w, id, &bad);
        }),
        |e| matches!(e, IncomingError::Vm { idstr, .. } if idstr == "cpu"),
    );
    // RAM blocks that are not this machine's.
    let mut other = source_ram();
    other.0[1].1.truncate(4096);
    refused(
        &stream_with(&src, &other, |w, id| {
            add_vm(w, id);
            add_cpu(w, id, &vcpu());
        }),
        |e| matches!(e, IncomingError::Blocks(_)),
    );
    // A device nobody here has.
    refused(
        &stream_with(&src, &source_ram(), |w, id| {
            add_vm(w, id);
            add_cpu(w, id, &vcpu());
            w.device_raw(*id, "0000:00:1f.0/nothing", 0, 1, &[1, 2], None)
                .unwrap();
        }),
        |e| matches!(e, IncomingError::Devices(_) | IncomingError::Stream(_)),
    );
    // Truncated anywhere.
    let good = good_stream(&src);
    for cut in [0, 9, 200, good.len() / 2, good.len() - 1] {
        refused(&good[..cut], |e| matches!(e, IncomingError::Stream(_)));
    }
    // A page record moved past the end of its block.
    let parsed = read_self_described(&good).unwrap();
    let page = parsed.pages.iter().find(|p| p.block == "pc.ram").unwrap();
    let mut moved = good.clone();
    let header = u64::from_be_bytes(moved[page.offset..page.offset + 8].try_into().unwrap());
    let moved_header = (header & 0xFFF) | RAM;
    moved[page.offset..page.offset + 8].copy_from_slice(&moved_header.to_be_bytes());
    refused(&moved, |e| {
        matches!(e, IncomingError::Page { .. } | IncomingError::Stream(_))
    });
    // A device section whose state is cut short (described as what it
    // is, so the stream reads and the device refuses it).
    let mut w = StreamWriter::new(MemChannel::new(), "pc").unwrap();
    let ram = source_ram();
    let blocks: Vec<(&str, u64)> = ram
        .0
        .iter()
        .map(|(n, b)| (n.as_str(), b.len() as u64))
        .collect();
    w.ram_setup(0, &blocks).unwrap();
    let mut id = 1;
    let mut cut_one = true;
    for (dev, version, mut body, desc) in src.save_devices_described() {
        let mut desc = desc.map(|d| d.to_json());
        if cut_one && dev.idstr.ends_with("/virtio-net") {
            cut_one = false;
            body.truncate(body.len() - 8);
            desc = Some(buffer_desc(&dev.idstr, version, body.len()));
        }
        w.device_raw(id, &dev.idstr, dev.instance, version, &body, desc)
            .unwrap();
        id += 1;
    }
    add_vm(&mut w, &mut id);
    add_cpu(&mut w, &mut id, &vcpu());
    let short = w.finish(true).unwrap().into_bytes();
    refused(&short, |e| matches!(e, IncomingError::Devices(_)));
}

fn buffer_desc(idstr: &str, version: u32, len: usize) -> Json {
    Json::Object(vec![
        ("vmsd_name".into(), Json::Str(idstr.into())),
        ("version".into(), Json::Int(version.into())),
        (
            "fields".into(),
            Json::Array(vec![Json::Object(vec![
                ("name".into(), Json::Str("state".into())),
                ("type".into(), Json::Str("buffer".into())),
                ("size".into(), Json::Int(len as i128)),
            ])]),
        ),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random damage to a real stream never panics the loader, and a
    /// refused load leaves the machine (and, unless the devices refused,
    /// RAM) as it was.
    #[test]
    fn mutated_streams_load_whole_or_not_at_all(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        mode in 0usize..3,
    ) {
        thread_local! {
            static GOOD: Vec<u8> = {
                let mut src = machine();
                set_up(&mut src);
                good_stream(&src)
            };
        }
        let mut bytes = GOOD.with(|g| g.clone());
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= v | 1;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        let mode = [CommitMode::Deferred, CommitMode::Eager, CommitMode::ForcedRead][mode];
        let mut dst = machine();
        let mut ram = Ram::new();
        let before = snapshot(&mut dst, &ram);
        if let Err(e) = load(&mut dst, &mut ram, &bytes, mode) {
            let after = snapshot(&mut dst, &ram);
            prop_assert_eq!(&after.0, &before.0, "devices changed: {}", e);
            prop_assert_eq!(&after.1, &before.1, "memory tree changed: {}", e);
            prop_assert_eq!(&after.2, &before.2, "flat views changed: {}", e);
            if !matches!(e, IncomingError::Devices(_)) {
                prop_assert!(after.3 == before.3, "RAM written: {}", e);
            }
        }
    }
}
