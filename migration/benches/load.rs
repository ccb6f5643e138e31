//! The seed's table on the host: the non-iterable load of its three device
//! shapes in each commit mode, against the floor, and how the load scales
//! with the number of memory-map changes it makes and with the number of
//! address spaces.
//!
//! Each shape's source machine is set up as a guest's drivers leave it
//! ([`hv_core::testing::set_up_as_driver`]: BARs assigned, bus mastering
//! and MSI-X on, every queue enabled with its rings in RAM); its device
//! state is saved into a stream with [`StreamWriter`]. One load is: parse
//! the stream ([`read_self_described`]), then [`Machine::load_devices`]
//! into a fresh target of the same shape with RAM and an EPT listener over
//! an in-memory host (real table updates). Building the target is not
//! timed (`iter_batched`).
//!
//! The floor is what no load can avoid: the same parse, one render of
//! every address space and one EPT build of the final memory map.
//!
//! Run with `cargo xtask bench` (which writes the table, the JSON and the
//! plot). Environment: `TERN_BENCH_QUICK=1` for short runs,
//! `TERN_BENCH_OUT=DIR` to write `counters.json` (exact counters of one
//! untimed load per shape and mode, the phase breakdown, the scaling
//! points) into DIR.

use criterion::{BatchSize, BenchmarkId, Criterion};
use hv_core::devices::DeviceId;
use hv_core::machine::{CommitMode, DeviceSection, LoadPhases, LoadStats, Machine};
use hv_core::testing::{self, MemEpt, MemHost};
use hv_core::virtio::spec::DeviceSpec;
use hv_core::vmstate::Json;
use migration::reader::find_description;
use migration::{read_self_described, MemChannel, StreamWriter, VmDescription};
use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The seed's shapes, by the cover letter's test names.
const SHAPES: [(&str, &str); 3] = [
    ("test1", "net:8x16,blk:16x4"),
    ("test2", "net:8x1,blk:16x1"),
    ("test3", "net:1x16,blk:1x4"),
];
const MODES: [CommitMode; 3] = [
    CommitMode::Eager,
    CommitMode::ForcedRead,
    CommitMode::Deferred,
];
/// Guest RAM of every bench machine (the rings of the largest shape and
/// the test device's 2 MiB window fit).
const RAM: u64 = 16 << 20;
/// Queues of each virtio-blk function of the scaling machines.
const SCALE_QUEUES: u16 = 2;
/// Table memory of each EPT host.
const EPT_HOST: u64 = 8 << 20;

fn quick() -> bool {
    std::env::var_os("TERN_BENCH_QUICK").is_some_and(|v| v != "0")
}

fn progress(what: &str) {
    eprintln!("[tern-bench] {what}");
}

/// Nanoseconds since the first call (the phase clock).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Every device's state in a stream, with its description (as the
/// source's non-iterable part would be sent).
fn stream_of(m: &Machine) -> Vec<u8> {
    let mut w = StreamWriter::new(MemChannel::new(), "pc").expect("header");
    for (i, (dev, version, body, desc)) in m.save_devices_described().into_iter().enumerate() {
        w.device_raw(
            i as u32 + 1,
            &dev.idstr,
            dev.instance,
            version,
            &body,
            desc.map(|d| d.to_json()),
        )
        .expect("device section");
    }
    w.finish(true).expect("EOF").into_bytes()
}

/// The parsed device sections of a stream, owning their identities.
struct Parsed<'a> {
    sections: Vec<(DeviceId, u32, &'a [u8])>,
}

fn parse(stream: &[u8]) -> Parsed<'_> {
    let p = read_self_described(stream).expect("the stream parses");
    let sections = p
        .devices()
        .map(|(info, body)| {
            (
                DeviceId {
                    idstr: info.idstr.into(),
                    instance: info.instance,
                },
                info.version,
                *body,
            )
        })
        .collect();
    Parsed { sections }
}

impl Parsed<'_> {
    fn sections(&self) -> Vec<DeviceSection<'_>> {
        self.sections
            .iter()
            .map(|(id, version, data)| DeviceSection {
                id,
                version: *version,
                data,
            })
            .collect()
    }
}

/// One non-iterable load: parse, then every device in `mode`.
fn load(m: &mut Machine, stream: &[u8], mode: CommitMode) -> LoadStats {
    let p = parse(stream);
    m.load_devices(&p.sections(), mode, true)
        .expect("the load succeeds")
}

/// What a load is timed against.
struct Case {
    name: String,
    build: Box<dyn Fn() -> Machine>,
    stream: Vec<u8>,
}

impl Case {
    fn shape(name: &str, shape: &str) -> Self {
        let spec = DeviceSpec::parse(shape).expect("shape");
        let build = move || testing::machine_of(&spec, RAM).expect("machine");
        Self::new(name, Box::new(build))
    }

    fn functions(n: u16) -> Self {
        let build = move || testing::machine_of_functions(n, SCALE_QUEUES, RAM).expect("machine");
        Self::new(&format!("{n}"), Box::new(build))
    }

    fn new(name: &str, build: Box<dyn Fn() -> Machine>) -> Self {
        let mut src = build();
        testing::set_up_as_driver(&mut src);
        let stream = stream_of(&src);
        Self {
            name: name.into(),
            build,
            stream,
        }
    }

    /// A fresh target with its EPT listener.
    fn target(&self) -> (Machine, MemEpt) {
        let mut m = (self.build)();
        let ept = testing::attach_ept(&mut m);
        (m, ept)
    }

    /// The exact counters of one load in `mode`, with its phases.
    fn counters(&self, mode: CommitMode, runs: usize) -> Value {
        let (mut m, ept) = self.target();
        let (u0, i0) = ept_counts(&ept);
        let s = load(&mut m, &self.stream, mode);
        let (u1, i1) = ept_counts(&ept);
        let mut phases = Vec::new();
        for _ in 0..runs {
            let (mut m, _ept) = self.target();
            let p = parse(&self.stream);
            let (_, ph) = m
                .load_devices_clocked(&p.sections(), mode, true, now_ns)
                .expect("the load succeeds");
            phases.push(ph);
        }
        json!({
            "sections": s.sections,
            "renders": s.renders,
            "on_demand_renders": s.on_demand_renders,
            "commits": s.commits,
            "listener_commits": s.listener_commits,
            "forced_commits": s.forced_commits,
            "mutations": s.mutations,
            "ept_updates": u1 - u0,
            "invepts": i1 - i0,
            "phases_ns": median_phases(&phases),
        })
    }

    /// The floor's exact work: renders of every space, one EPT build.
    fn floor_counters(&self) -> Value {
        let mut m = (self.build)();
        load(&mut m, &self.stream, CommitMode::Deferred);
        let spaces = m.mem.address_spaces().len();
        let s = &self.stream[..];
        let parse_ns = median_ns(|| {
            black_box(parse(s));
        });
        // Where the parse goes: finding the description record, parsing
        // its JSON, turning it into section descriptions; the rest is
        // walking the sections (each body by its description) and listing
        // them.
        let at = find_description(s).expect("a description");
        let text = std::str::from_utf8(&s[at + 5..]).expect("UTF-8");
        let find_ns = median_ns(|| {
            black_box(find_description(s));
        });
        let json_ns = median_ns(|| {
            black_box(Json::parse(text).expect("JSON"));
        });
        let j = Json::parse(text).expect("JSON");
        let desc_ns = median_ns(|| {
            black_box(VmDescription::from_json(&j).expect("description"));
        });
        json!({
            "renders": spaces,
            "address_spaces": spaces,
            "ept_builds": 1,
            "stream_bytes": s.len(),
            "description_bytes": text.len(),
            "parse_ns": parse_ns,
            "parse_phases_ns": {
                "find_description": find_ns,
                "description_json": json_ns,
                "description_decode": desc_ns,
                "walk_sections": parse_ns.saturating_sub(find_ns + json_ns + desc_ns),
            },
        })
    }
}

/// The median of 21 timed runs of `f`, in nanoseconds.
fn median_ns(mut f: impl FnMut()) -> u64 {
    let mut v: Vec<u64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

fn ept_counts(ept: &MemEpt) -> (u64, u64) {
    let e = ept.borrow();
    (e.counters.updates, e.host().invepts)
}

fn median_phases(runs: &[LoadPhases]) -> Value {
    let med = |f: fn(&LoadPhases) -> u64| {
        let mut v: Vec<u64> = runs.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    json!({
        "check": med(|p| p.check),
        "duplicate": med(|p| p.duplicate),
        "decode": med(|p| p.decode),
        "map": med(|p| p.map),
        "post_load": med(|p| p.post_load),
        "commit": med(|p| p.commit),
    })
}

/// The floor: parse, one render of every address space, one EPT build.
fn floor(m: &mut Machine, stream: &[u8], host: MemHost) -> MemEpt {
    black_box(parse(stream));
    for s in m.mem.address_spaces() {
        let root = m.mem.address_space_root(s).expect("space");
        black_box(m.mem.render_region(root).expect("render"));
    }
    testing::attach_ept_with(m, host)
}

fn configure(c: Criterion) -> Criterion {
    if quick() {
        c.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            .sample_size(10)
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20)
    }
}

fn bench_shapes(c: &mut Criterion, out: &mut Value) {
    let runs = if quick() { 5 } else { 25 };
    for (name, shape) in SHAPES {
        progress(&format!(
            "{name} ({shape}): building the source and its stream"
        ));
        let case = Case::shape(name, shape);
        let mut modes = serde_json::Map::new();
        for mode in MODES {
            modes.insert(mode.name().into(), case.counters(mode, runs));
        }
        out["shapes"].as_array_mut().expect("array").push(json!({
            "name": name,
            "shape": shape,
            "group": format!("load-{name}"),
            "modes": modes,
            "floor": case.floor_counters(),
        }));
        let mut g = c.benchmark_group(format!("load-{name}"));
        for mode in MODES {
            g.bench_function(mode.name(), |b| {
                b.iter_batched(
                    || case.target(),
                    |(mut m, ept)| {
                        load(&mut m, &case.stream, mode);
                        (m, ept)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        g.bench_function("floor", |b| {
            b.iter_batched(
                || {
                    let mut m = (case.build)();
                    load(&mut m, &case.stream, CommitMode::Deferred);
                    (m, MemHost::new(EPT_HOST))
                },
                |(mut m, host)| {
                    let ept = floor(&mut m, &case.stream, host);
                    (m, ept)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

fn bench_scaling(c: &mut Criterion, out: &mut Value) {
    let points: &[u16] = if quick() {
        &[0, 8, 64, 248]
    } else {
        &[0, 1, 2, 4, 8, 16, 32, 64, 128, 248]
    };
    let cases: Vec<Case> = points
        .iter()
        .map(|&n| {
            progress(&format!("scaling: {n} virtio-blk functions"));
            Case::functions(n)
        })
        .collect();
    for case in &cases {
        let mut modes = serde_json::Map::new();
        for mode in [CommitMode::Eager, CommitMode::Deferred] {
            modes.insert(mode.name().into(), case.counters(mode, 1));
        }
        out["scaling"].as_array_mut().expect("array").push(json!({
            "functions": case.name.parse::<u64>().unwrap_or(0),
            "queues": SCALE_QUEUES,
            "modes": modes,
        }));
    }
    for mode in [CommitMode::Deferred, CommitMode::Eager] {
        let mut g = c.benchmark_group(format!("scale-{}", mode.name()));
        for case in &cases {
            g.bench_function(BenchmarkId::from_parameter(&case.name), |b| {
                b.iter_batched(
                    || case.target(),
                    |(mut m, ept)| {
                        load(&mut m, &case.stream, mode);
                        (m, ept)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }
}

/// Creates `n` address spaces as PCI functions get theirs: a container
/// holding a (disabled) alias of the system root.
fn create_spaces(m: &mut Machine, n: u32) {
    let system = m.regions.system;
    for _ in 0..n {
        let c = m
            .mem
            .create_container("bus master container", 1 << 64)
            .expect("container");
        let a = m
            .mem
            .create_alias("bus master", 1 << 64, system, 0)
            .expect("alias");
        m.mem.set_enabled(a, false).expect("disable");
        m.mem.add_subregion(c, 0, a).expect("add");
        m.mem.create_address_space("bench", c).expect("space");
    }
}

fn bench_address_spaces(c: &mut Criterion, out: &mut Value) {
    let points: &[u32] = if quick() {
        &[1, 32, 1024]
    } else {
        &[1, 4, 16, 64, 256, 1024]
    };
    progress("address spaces");
    out["address_spaces"] = json!(points);
    let mut g = c.benchmark_group("address-spaces");
    for &n in points {
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || testing::pc_machine(RAM).expect("machine"),
                |mut m| {
                    create_spaces(&mut m, n);
                    m
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn main() {
    let mut c = configure(Criterion::default()).configure_from_args();
    let mut out = json!({
        "quick": quick(),
        "ram_bytes": RAM,
        "scale_queues": SCALE_QUEUES,
        "shapes": [],
        "scaling": [],
        "address_spaces": [],
    });
    bench_shapes(&mut c, &mut out);
    bench_scaling(&mut c, &mut out);
    bench_address_spaces(&mut c, &mut out);
    c.final_summary();
    if let Some(dir) = std::env::var_os("TERN_BENCH_OUT") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("output directory");
        let path = dir.join("counters.json");
        let text = serde_json::to_string_pretty(&out).expect("JSON");
        std::fs::write(&path, text).expect("counters.json");
        progress(&format!("counters written to {}", path.display()));
    } else {
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON"));
    }
}
