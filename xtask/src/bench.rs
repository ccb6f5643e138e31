//! `cargo xtask bench`: the seed's table from Tern's own runs.
//!
//! Runs the load benchmark of the migration crate (`migration/benches/
//! load.rs`: the seed's three device shapes loaded in each commit mode
//! against the floor, and the scaling series), reads criterion's estimates
//! (`<criterion home>/<group>/<id>/new/estimates.json`) and the exact
//! counters the benchmark wrote (`counters.json`), and writes:
//! - a markdown table in the style of the seed's cover letter (per shape:
//!   before = eager, forced-read, after = deferred, floor, and the ratios),
//!   with the date and the machine it came from, on stdout (and `--markdown
//!   FILE`);
//! - `--json FILE`: per shape and mode the load time, renders, listener
//!   commits, forced commits, EPT updates, INVEPTs, and the ratios;
//! - the scaling plot (`docs/load-scaling.svg`, or `--svg FILE`).
//!
//! Other measurements join the same table as [`Row`]s: a QEMU run of the
//! same shapes ([`Source::Qemu`], its load time in the `eager` column: QEMU
//! without the seed's patch commits eagerly) gives each shape its
//! QEMU/deferred ratio; a Bochs run ([`Source::Bochs`], exact instruction
//! counts from the scenario logs) adds rows in instructions with downtime.
//! See [`Report::add_row`].

use crate::cli::{self, Parsed};
use serde_json::{json, Value};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `cargo xtask bench --help`.
pub const USAGE: &str = "\
usage: cargo xtask bench [OPTIONS] [-- CRITERION ARGS...]

Times the non-iterable load of the seed's three device shapes (net:8x16,blk:16x4,
net:8x1,blk:16x1, net:1x16,blk:1x4), set up as a guest's drivers leave them, in
each commit mode (eager = before, forced-read, deferred = after) against the
floor (parsing the stream, one render of every address space, one EPT build),
with the EPT listener doing real table updates over an in-memory host; then how
the load scales with the number of memory-map changes (0-248 virtio functions)
and how creating address spaces scales (1-1,024). Prints the table with the
date and machine, the exact counters of one load per shape and mode, and where
the deferred load's time goes; writes the scaling plot.

options:
  --quick           short criterion runs and fewer scaling points (under 2 min);
                    without --quick, --qemu and --bochs are on
  --json FILE       write every number as JSON
  --markdown FILE   write the report (markdown) to FILE too
  --svg FILE        where the scaling plot goes (default docs/load-scaling.svg)
  --no-svg          do not write the plot
  --rows FILE       add rows measured elsewhere (QEMU, Bochs) from a JSON file:
                    [{\"test\": \"test1\", \"shape\": \"net:8x16,blk:16x4\",
                      \"source\": \"qemu\" | \"bochs\", \"setup\": \"7.2, TCG, ...\",
                      \"unit\": \"ns\" | \"instructions\",
                      \"eager\": {\"load\": N, \"downtime\": N}, \"forced-read\": {..},
                      \"deferred\": {..}}]  (may be given more than once)
  --qemu            add QEMU's rows: the same shapes in QEMU 7.2 (q35, TCG, no vhost,
                    1 vCPU, multi-queue taps: needs root), loaded 5 times each after
                    Tern's test guest set every queue up (`cargo xtask bench-qemu`)
  --bochs           add Tern's rows in Bochs: each shape migrated in each mode, in
                    guest instructions, with the downtime (`cargo xtask bench-bochs`)
  --hv-core         also run hv-core's benchmarks (flat-view render and commit,
                    transactions, read policies, EPT update against rebuild)
  --all             the load benchmark and hv-core's
  --only-hv-core    only hv-core's benchmarks (criterion's output, no table)
  -h, --help        this text
  FILTER            only the benchmarks whose name contains FILTER (criterion's)
  -- ARGS           pass ARGS to criterion
";

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchOptions {
    pub quick: bool,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    /// `None`: no plot.
    pub svg: Option<PathBuf>,
    pub load: bool,
    pub hv_core: bool,
    /// JSON files of rows measured elsewhere (see [`rows_from_json`]).
    pub rows: Vec<PathBuf>,
    /// Measure QEMU's rows (root) and Tern's in Bochs too.
    pub qemu: bool,
    pub bochs: bool,
    pub criterion: Vec<OsString>,
}

/// Parses `cargo xtask bench`'s arguments.
pub fn parse<I>(args: I) -> Result<Parsed<BenchOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "bench";
    let mut o = BenchOptions {
        svg: Some(PathBuf::from("docs/load-scaling.svg")),
        load: true,
        ..Default::default()
    };
    let mut p = cli::parser(args);
    let (mut qemu, mut bochs) = (None, None);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("quick") => o.quick = true,
            Long("qemu") => qemu = Some(true),
            Long("no-qemu") => qemu = Some(false),
            Long("bochs") => bochs = Some(true),
            Long("no-bochs") => bochs = Some(false),
            Long("json") => o.json = Some(cli::string(CMD, p.value())?.into()),
            Long("markdown") => o.markdown = Some(cli::string(CMD, p.value())?.into()),
            Long("svg") => o.svg = Some(cli::string(CMD, p.value())?.into()),
            Long("no-svg") => o.svg = None,
            Long("rows") => o.rows.push(cli::string(CMD, p.value())?.into()),
            Long("hv-core") | Long("all") => o.hv_core = true,
            Long("only-hv-core") => {
                o.hv_core = true;
                o.load = false;
            }
            // A benchmark name filter, or anything after `--`.
            Value(v) => o.criterion.push(v),
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    o.qemu = o.load && qemu.unwrap_or(!o.quick);
    o.bochs = o.load && bochs.unwrap_or(!o.quick);
    Ok(Parsed::Run(o))
}

/// The seed's test name of a shape.
fn test_of(shape: &str) -> &'static str {
    match shape {
        "net:8x16,blk:16x4" => "test1",
        "net:8x1,blk:16x1" => "test2",
        "net:1x16,blk:1x4" => "test3",
        _ => "other",
    }
}

/// QEMU's rows: each seed shape after Tern's test guest set it up.
fn qemu_rows(start: Instant) -> Result<Vec<Row>, String> {
    use crate::bench_qemu::{measure, work_dir, GuestState, SEED_SHAPES, SETUP_NOTE};
    let images = crate::build::build_all()?;
    let mut rows = Vec::new();
    for shape in SEED_SHAPES {
        progress(start, &format!("QEMU {shape}: save once, load 5 times"));
        let state = GuestState::TernGuest;
        let r = measure(shape, state, 5, &images.guest, &work_dir(shape, state))?;
        rows.push(Row {
            test: test_of(shape).into(),
            shape: shape.into(),
            source: Source::Qemu {
                setup: format!(
                    "{SETUP_NOTE} Guest state: {} (min {:.2} ms, median of {} loads)",
                    state.name(),
                    r.min_ms(),
                    r.runs_ms.len()
                ),
            },
            unit: Unit::Nanoseconds,
            eager: ModeResult {
                load: Some(r.median_ms() * 1e6),
                ..Default::default()
            },
            forced_read: ModeResult::default(),
            deferred: ModeResult::default(),
            floor: None,
        });
    }
    Ok(rows)
}

/// Tern's rows in Bochs: each seed shape migrated in each mode.
fn bochs_rows(start: Instant) -> Result<Vec<Row>, String> {
    use crate::bench_bochs::{measure, BochsRow};
    use crate::bench_qemu::SEED_SHAPES;
    progress(
        start,
        "Bochs: each shape migrated in each mode (about 3 minutes)",
    );
    let images = crate::build::build_all()?;
    let all = measure(&images, &SEED_SHAPES)?;
    let mode = |shape: &str, m: &str| -> ModeResult {
        all.iter()
            .find(|r: &&BochsRow| r.shape == shape && r.mode == m)
            .map_or_else(ModeResult::default, |r| ModeResult {
                load: Some(r.load_ticks as f64),
                downtime: Some(r.downtime_ticks as f64),
                renders: Some(r.renders),
                listener_commits: Some(r.listener_commits),
                forced_commits: Some(r.forced_commits),
                ept_updates: Some(r.ept_updates),
                invepts: Some(r.invepts),
                mutations: None,
            })
    };
    Ok(SEED_SHAPES
        .iter()
        .map(|shape| Row {
            test: test_of(shape).into(),
            shape: (*shape).into(),
            source: Source::Bochs,
            unit: Unit::Instructions,
            eager: mode(shape, "eager"),
            forced_read: mode(shape, "forced-read"),
            deferred: mode(shape, "deferred"),
            floor: None,
        })
        .collect())
}

/// Where a row's numbers come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// This benchmark: Tern's memory API, devices and EPT listener on the
    /// host (criterion, wall-clock time).
    Host,
    /// QEMU on the same machine (its trace timestamps); say how it was set
    /// up (accelerator, vhost, vCPUs, guest state) in `setup`.
    Qemu { setup: String },
    /// Tern's kernel under Bochs, in guest instructions (exact).
    Bochs,
}

impl Source {
    fn label(&self) -> String {
        match self {
            Self::Host => "Tern, host".into(),
            Self::Qemu { .. } => "QEMU".into(),
            Self::Bochs => "Tern, Bochs".into(),
        }
    }

    fn key(&self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Qemu { .. } => "qemu",
            Self::Bochs => "bochs",
        }
    }
}

/// The unit of a row's times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Nanoseconds,
    /// Guest instructions (Bochs, one TSC tick per instruction).
    Instructions,
}

impl Unit {
    fn key(self) -> &'static str {
        match self {
            Self::Nanoseconds => "ns",
            Self::Instructions => "instructions",
        }
    }

    /// A value in this unit for the table.
    pub fn show(self, v: f64) -> String {
        match self {
            Self::Nanoseconds if v >= 1e6 => format!("{:.2} ms", v / 1e6),
            Self::Nanoseconds if v >= 1e3 => format!("{:.1} µs", v / 1e3),
            Self::Nanoseconds => format!("{v:.0} ns"),
            Self::Instructions if v >= 1e6 => format!("{:.2} M instr", v / 1e6),
            Self::Instructions => format!("{v:.0} instr"),
        }
    }
}

/// One mode's measurement of a row; a field is `None` when the source
/// does not give it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModeResult {
    /// The non-iterable load.
    pub load: Option<f64>,
    /// Source stop to target start (Bochs, QEMU).
    pub downtime: Option<f64>,
    pub renders: Option<u64>,
    pub listener_commits: Option<u64>,
    pub forced_commits: Option<u64>,
    pub ept_updates: Option<u64>,
    pub invepts: Option<u64>,
    /// Memory-map mutations the load made.
    pub mutations: Option<u64>,
}

impl ModeResult {
    fn to_json(&self, unit: Unit) -> Value {
        json!({
            format!("load_{}", unit.key()): self.load,
            format!("downtime_{}", unit.key()): self.downtime,
            "renders": self.renders,
            "listener_commits": self.listener_commits,
            "forced_commits": self.forced_commits,
            "ept_updates": self.ept_updates,
            "invepts": self.invepts,
            "mutations": self.mutations,
        })
    }
}

/// One line of the table: one source's measurement of one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The seed's test name (`test1`...), which rows of one shape share.
    pub test: String,
    /// The device shape (`net:8x16,blk:16x4`).
    pub shape: String,
    pub source: Source,
    pub unit: Unit,
    /// Before: every change committed at once (QEMU without the seed).
    pub eager: ModeResult,
    /// The seed's patch: one transaction, reads force commits.
    pub forced_read: ModeResult,
    /// After: one transaction, one commit.
    pub deferred: ModeResult,
    /// Parsing with no state applied, one render of every address space,
    /// one EPT build.
    pub floor: Option<f64>,
}

/// The ratios of a row (each `None` without both numbers).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ratios {
    pub eager_over_deferred: Option<f64>,
    pub forced_read_over_deferred: Option<f64>,
    pub deferred_over_floor: Option<f64>,
    /// QEMU's load of the same shape over this row's deferred load.
    pub qemu_over_deferred: Option<f64>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Row {
    /// The load a row gives for its shape when compared with other sources:
    /// deferred if it has one, else eager (QEMU's only mode).
    fn reference_load(&self) -> Option<f64> {
        self.deferred.load.or(self.eager.load)
    }
}

/// The machine a report comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    pub cpu: String,
    pub cores: usize,
    /// `YYYY-MM-DD HH:MM UTC`.
    pub date: String,
}

impl HostInfo {
    /// This machine, now.
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
            .max(1);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            cpu,
            cores,
            date: utc_date(secs),
        }
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (proleptic Gregorian calendar).
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// One point of the scaling series.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalePoint {
    pub functions: u64,
    /// Memory-map changes the load made (exact, from the load's counters).
    pub changes: u64,
    pub deferred_ns: Option<f64>,
    pub eager_ns: Option<f64>,
    pub eager_listener_commits: Option<u64>,
}

/// Everything `cargo xtask bench` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub host: HostInfo,
    pub quick: bool,
    pub rows: Vec<Row>,
    /// Where the deferred load's time goes, per test: (phase, ns).
    pub phases: Vec<(String, Vec<(String, u64)>)>,
    pub scaling: Vec<ScalePoint>,
    /// (address spaces created, ns).
    pub address_spaces: Vec<(u64, f64)>,
}

impl Report {
    /// Adds a row: a QEMU row of a test gives the other rows of that test
    /// their QEMU/deferred ratio; Bochs rows stand beside the host's.
    ///
    /// ```ignore
    /// report.add_row(Row {
    ///     test: "test1".into(),
    ///     shape: "net:8x16,blk:16x4".into(),
    ///     source: Source::Qemu { setup: "7.2, TCG, -smp 2, after firmware".into() },
    ///     unit: Unit::Nanoseconds,
    ///     eager: ModeResult { load: Some(40e6), ..Default::default() },
    ///     forced_read: ModeResult::default(),
    ///     deferred: ModeResult::default(),
    ///     floor: None,
    /// });
    /// ```
    pub fn add_row(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// A row's ratios, QEMU's against this row's deferred load when there
    /// is a QEMU row of the same test in the same unit.
    pub fn ratios(&self, row: &Row) -> Ratios {
        let qemu = self
            .rows
            .iter()
            .find(|r| {
                matches!(r.source, Source::Qemu { .. }) && r.test == row.test && r.unit == row.unit
            })
            .and_then(Row::reference_load);
        Ratios {
            eager_over_deferred: ratio(row.eager.load, row.deferred.load),
            forced_read_over_deferred: ratio(row.forced_read.load, row.deferred.load),
            deferred_over_floor: ratio(row.deferred.load, row.floor),
            qemu_over_deferred: if matches!(row.source, Source::Qemu { .. }) {
                None
            } else {
                ratio(qemu, row.deferred.load)
            },
        }
    }

    /// The report in markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Measured {} on {} ({} cores){}.\n",
            self.host.date,
            self.host.cpu,
            self.host.cores,
            if self.quick { ", --quick" } else { "" }
        );
        let _ = writeln!(
            s,
            "Time of loading non-iterable vmstate (parse + every device in one load; \
             before = eager commits, after = deferred, one commit):\n"
        );
        let _ = writeln!(
            s,
            "| test | shape | source | before (eager) | forced-read | after (deferred) | floor \
             | eager/deferred | forced-read/deferred | deferred/floor | QEMU/deferred |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let show = |u: Unit, v: Option<f64>| v.map_or("–".to_string(), |v| u.show(v));
        let x = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}x"));
        for r in &self.rows {
            let q = self.ratios(r);
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.test,
                r.shape,
                r.source.label(),
                show(r.unit, r.eager.load),
                show(r.unit, r.forced_read.load),
                show(r.unit, r.deferred.load),
                show(r.unit, r.floor),
                x(q.eager_over_deferred),
                x(q.forced_read_over_deferred),
                x(q.deferred_over_floor),
                x(q.qemu_over_deferred),
            );
        }
        // How each QEMU row was measured, once, under the table.
        for r in &self.rows {
            if let Source::Qemu { setup } = &r.source {
                let _ = writeln!(s, "\nQEMU, {}: {setup}", r.test);
            }
        }
        if self
            .rows
            .iter()
            .any(|r| r.eager.downtime.is_some() || r.deferred.downtime.is_some())
        {
            let _ = writeln!(s, "\nDowntime (source stop to target start):\n");
            let _ = writeln!(
                s,
                "| test | source | before (eager) | forced-read | after (deferred) |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|");
            for r in self
                .rows
                .iter()
                .filter(|r| r.eager.downtime.is_some() || r.deferred.downtime.is_some())
            {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    r.test,
                    r.source.label(),
                    show(r.unit, r.eager.downtime),
                    show(r.unit, r.forced_read.downtime),
                    show(r.unit, r.deferred.downtime),
                );
            }
        }
        let _ = writeln!(
            s,
            "\nExact counters of one load (renders, commits reaching listeners, commits \
             forced by reads, EPT updates and INVEPTs, memory-map mutations):\n"
        );
        let _ = writeln!(
            s,
            "| test | source | mode | renders | listener commits | forced commits | EPT updates | INVEPTs | mutations |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|");
        let n = |v: Option<u64>| v.map_or("–".to_string(), |v| v.to_string());
        for r in &self.rows {
            for (mode, m) in [
                ("eager", &r.eager),
                ("forced-read", &r.forced_read),
                ("deferred", &r.deferred),
            ] {
                if m.renders.is_none() && m.listener_commits.is_none() {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "| {} | {} | {mode} | {} | {} | {} | {} | {} | {} |",
                    r.test,
                    r.source.label(),
                    n(m.renders),
                    n(m.listener_commits),
                    n(m.forced_commits),
                    n(m.ept_updates),
                    n(m.invepts),
                    n(m.mutations),
                );
            }
        }
        if !self.phases.is_empty() {
            let names: Vec<&str> = self.phases[0].1.iter().map(|(k, _)| k.as_str()).collect();
            let _ = writeln!(
                s,
                "\nWhere the deferred load goes (medians, µs; `parse` is the floor's parse):\n"
            );
            let _ = writeln!(s, "| test | {} |", names.join(" | "));
            let _ = writeln!(s, "|---|{}", "---:|".repeat(names.len()));
            for (test, p) in &self.phases {
                let cells: Vec<String> = p
                    .iter()
                    .map(|(_, v)| format!("{:.1}", *v as f64 / 1e3))
                    .collect();
                let _ = writeln!(s, "| {test} | {} |", cells.join(" | "));
            }
        }
        if !self.scaling.is_empty() {
            let _ = writeln!(
                s,
                "\nScaling: virtio-blk functions (2 queues each) set up by a driver, load time \
                 against the memory-map changes the load makes:\n"
            );
            let _ = writeln!(
                s,
                "| functions | changes | deferred | eager | eager/deferred | eager listener commits |"
            );
            let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
            let u = Unit::Nanoseconds;
            for p in &self.scaling {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    p.functions,
                    p.changes,
                    show(u, p.deferred_ns),
                    show(u, p.eager_ns),
                    x(ratio(p.eager_ns, p.deferred_ns)),
                    n(p.eager_listener_commits),
                );
            }
        }
        if !self.address_spaces.is_empty() {
            let _ = writeln!(s, "\nCreating address spaces:\n");
            let _ = writeln!(s, "| address spaces | time | per space |");
            let _ = writeln!(s, "|---:|---:|---:|");
            for &(k, ns) in &self.address_spaces {
                let u = Unit::Nanoseconds;
                let _ = writeln!(
                    s,
                    "| {k} | {} | {} |",
                    u.show(ns),
                    u.show(ns / k.max(1) as f64)
                );
            }
        }
        s
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let q = self.ratios(r);
                json!({
                    "test": r.test,
                    "shape": r.shape,
                    "source": r.source.key(),
                    "source_label": r.source.label(),
                    "unit": r.unit.key(),
                    "modes": {
                        "eager": r.eager.to_json(r.unit),
                        "forced-read": r.forced_read.to_json(r.unit),
                        "deferred": r.deferred.to_json(r.unit),
                    },
                    format!("floor_{}", r.unit.key()): r.floor,
                    "ratios": {
                        "eager/deferred": q.eager_over_deferred,
                        "forced-read/deferred": q.forced_read_over_deferred,
                        "deferred/floor": q.deferred_over_floor,
                        "qemu/deferred": q.qemu_over_deferred,
                    },
                })
            })
            .collect();
        let phases: serde_json::Map<String, Value> = self
            .phases
            .iter()
            .map(|(t, p)| {
                let m: serde_json::Map<String, Value> =
                    p.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                (t.clone(), Value::Object(m))
            })
            .collect();
        json!({
            "date": self.host.date,
            "machine": { "cpu": self.host.cpu, "cores": self.host.cores },
            "quick": self.quick,
            "rows": rows,
            "deferred_phases_ns": phases,
            "scaling": self.scaling.iter().map(|p| json!({
                "functions": p.functions,
                "changes": p.changes,
                "deferred_ns": p.deferred_ns,
                "eager_ns": p.eager_ns,
                "eager_listener_commits": p.eager_listener_commits,
            })).collect::<Vec<_>>(),
            "address_spaces": self.address_spaces.iter().map(|&(n, ns)| json!({
                "count": n, "ns": ns,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Rows measured elsewhere, from JSON (the `--rows FILE` format in
/// [`USAGE`]): QEMU's trace timestamps, Bochs' instruction counts.
pub fn rows_from_json(v: &Value) -> Result<Vec<Row>, String> {
    let rows = v.as_array().ok_or("rows: expected a JSON array")?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let s = |k: &str| -> Result<String, String> {
                r[k].as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("row {i}: no {k:?}"))
            };
            let source = match s("source")?.as_str() {
                "qemu" => Source::Qemu { setup: s("setup")? },
                "bochs" => Source::Bochs,
                "host" => Source::Host,
                other => return Err(format!("row {i}: unknown source {other:?}")),
            };
            let unit = match r["unit"].as_str().unwrap_or("ns") {
                "ns" => Unit::Nanoseconds,
                "instructions" => Unit::Instructions,
                other => return Err(format!("row {i}: unknown unit {other:?}")),
            };
            let mode = |k: &str| {
                let m = &r[k];
                ModeResult {
                    load: m["load"].as_f64(),
                    downtime: m["downtime"].as_f64(),
                    renders: m["renders"].as_u64(),
                    listener_commits: m["listener_commits"].as_u64(),
                    forced_commits: m["forced_commits"].as_u64(),
                    ept_updates: m["ept_updates"].as_u64(),
                    invepts: m["invepts"].as_u64(),
                    mutations: m["mutations"].as_u64(),
                }
            };
            Ok(Row {
                test: s("test")?,
                shape: s("shape")?,
                source,
                unit,
                eager: mode("eager"),
                forced_read: mode("forced-read"),
                deferred: mode("deferred"),
                floor: r["floor"].as_f64(),
            })
        })
        .collect()
}

/// Criterion's median estimate of `<home>/<group>/<id>`, in ns.
pub fn estimate(home: &Path, group: &str, id: &str) -> Option<f64> {
    let p = home.join(group).join(id).join("new").join("estimates.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn mode_result(v: &Value, load: Option<f64>) -> ModeResult {
    ModeResult {
        load,
        downtime: None,
        renders: v["renders"].as_u64(),
        listener_commits: v["listener_commits"].as_u64(),
        forced_commits: v["forced_commits"].as_u64(),
        ept_updates: v["ept_updates"].as_u64(),
        invepts: v["invepts"].as_u64(),
        mutations: v["mutations"].as_u64(),
    }
}

/// The host rows, phases and scaling series from the benchmark's counters
/// and criterion's estimates under `home`.
pub fn host_report(counters: &Value, home: &Path, host: HostInfo) -> Report {
    let mut report = Report {
        host,
        quick: counters["quick"].as_bool().unwrap_or(false),
        rows: Vec::new(),
        phases: Vec::new(),
        scaling: Vec::new(),
        address_spaces: Vec::new(),
    };
    for s in counters["shapes"].as_array().into_iter().flatten() {
        let test = s["name"].as_str().unwrap_or("?").to_string();
        let group = s["group"].as_str().unwrap_or("?");
        let modes = &s["modes"];
        let m = |mode: &str| mode_result(&modes[mode], estimate(home, group, mode));
        report.add_row(Row {
            shape: s["shape"].as_str().unwrap_or("?").into(),
            source: Source::Host,
            unit: Unit::Nanoseconds,
            eager: m("eager"),
            forced_read: m("forced-read"),
            deferred: m("deferred"),
            floor: estimate(home, group, "floor"),
            test: test.clone(),
        });
        let ph = &modes["deferred"]["phases_ns"];
        let mut phases = vec![(
            "parse".to_string(),
            s["floor"]["parse_ns"].as_u64().unwrap_or(0),
        )];
        for k in ["check", "duplicate", "decode", "map", "post_load", "commit"] {
            phases.push((k.to_string(), ph[k].as_u64().unwrap_or(0)));
        }
        report.phases.push((test, phases));
    }
    for p in counters["scaling"].as_array().into_iter().flatten() {
        let f = p["functions"].as_u64().unwrap_or(0);
        let id = f.to_string();
        report.scaling.push(ScalePoint {
            functions: f,
            changes: p["modes"]["deferred"]["mutations"].as_u64().unwrap_or(0),
            deferred_ns: estimate(home, "scale-deferred", &id),
            eager_ns: estimate(home, "scale-eager", &id),
            eager_listener_commits: p["modes"]["eager"]["listener_commits"].as_u64(),
        });
    }
    for n in counters["address_spaces"].as_array().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if let Some(ns) = estimate(home, "address-spaces", &n.to_string()) {
            report.address_spaces.push((n, ns));
        }
    }
    report
}

/// The scaling plot: load time against memory-map changes (deferred,
/// eager) and address-space creation time against address spaces, log-log.
pub fn plot(report: &Report, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let series = |f: fn(&ScalePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .scaling
            .iter()
            .filter_map(|p| Some((p.changes.max(1) as f64, f(p)? / 1e6)))
            .collect()
    };
    let deferred = series(|p| p.deferred_ns);
    let eager = series(|p| p.eager_ns);
    let spaces: Vec<(f64, f64)> = report
        .address_spaces
        .iter()
        .map(|&(n, ns)| (n.max(1) as f64, ns / 1e6))
        .collect();
    let all: Vec<&(f64, f64)> = deferred.iter().chain(&eager).chain(&spaces).collect();
    if all.is_empty() {
        return Err("no scaling results to plot".into());
    }
    let ymin = all.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 2.0;
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0;
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max) * 1.5;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let caption = format!(
        "Tern: non-iterable load against memory-map changes ({}, {})",
        report.host.date, report.host.cpu
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..xmax).log_scale(), (ymin.max(1e-5)..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("memory-map changes made by the load / address spaces created")
        .y_desc("time (ms)")
        .draw()
        .map_err(|e| err(&e))?;
    let lines = [
        ("deferred load (one commit)", &deferred, BLUE),
        ("eager load (commit per change)", &eager, RED),
        ("creating N address spaces", &spaces, GREEN),
    ];
    for (label, pts, color) in lines {
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The cargo target directory (criterion's results and the counters go
/// under it).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                crate::root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| crate::root().join("target"))
}

fn progress(start: Instant, what: &str) {
    eprintln!(
        "[xtask bench {:>5.1}s] {what}",
        start.elapsed().as_secs_f64()
    );
}

/// Criterion arguments for `--quick` runs of hv-core's benches.
const QUICK_CRITERION: [&str; 6] = [
    "--warm-up-time",
    "0.1",
    "--measurement-time",
    "0.3",
    "--sample-size",
    "10",
];

/// `cargo xtask bench`.
pub fn bench_cmd(o: &BenchOptions) -> Result<(), String> {
    let start = Instant::now();
    let target = target_dir();
    let home = target.join("criterion");
    let out = target.join("tern-bench");
    let cargo = env!("CARGO");
    if o.load {
        // Results of an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(out.join("counters.json"));
        if o.criterion.is_empty() {
            for g in [
                "load-test1",
                "load-test2",
                "load-test3",
                "scale-deferred",
                "scale-eager",
                "address-spaces",
            ] {
                let _ = std::fs::remove_dir_all(home.join(g));
            }
        }
        progress(start, "building and running the load benchmark (release)");
        let ok = Command::new(cargo)
            .current_dir(crate::root())
            .args(["bench", "-p", "tern-migration", "--bench", "load", "--"])
            .args(&o.criterion)
            .env("CRITERION_HOME", &home)
            .env("TERN_BENCH_OUT", &out)
            .env("TERN_BENCH_QUICK", if o.quick { "1" } else { "0" })
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?
            .success();
        if !ok {
            return Err("the load benchmark failed".into());
        }
    }
    if o.hv_core {
        progress(start, "running hv-core's benchmarks (release)");
        let mut args: Vec<OsString> = Vec::new();
        if o.quick {
            args.extend(QUICK_CRITERION.iter().map(OsString::from));
        }
        args.extend(o.criterion.iter().cloned());
        let ok = Command::new(cargo)
            .current_dir(crate::root())
            .args(["bench", "-p", "hv-core", "--benches", "--"])
            .args(&args)
            .env("CRITERION_HOME", &home)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?
            .success();
        if !ok {
            return Err("hv-core's benchmarks failed".into());
        }
    }
    if !o.load {
        return Ok(());
    }
    progress(start, "reading criterion's estimates and the counters");
    let path = out.join("counters.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let counters: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut report = host_report(&counters, &home, HostInfo::here());
    if o.qemu {
        match qemu_rows(start) {
            Ok(rows) => rows.into_iter().for_each(|r| report.add_row(r)),
            Err(e) => {
                return Err(format!(
                    "QEMU's rows: {e}\n(`--no-qemu` leaves them out of the table)"
                ))
            }
        }
    }
    if o.bochs {
        for r in bochs_rows(start)? {
            report.add_row(r);
        }
    }
    for p in &o.rows {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        for row in rows_from_json(&v).map_err(|e| format!("{}: {e}", p.display()))? {
            report.add_row(row);
        }
    }
    let md = report.markdown();
    println!("\n{md}");
    if let Some(p) = &o.markdown {
        std::fs::write(p, &md).map_err(|e| format!("{}: {e}", p.display()))?;
        progress(start, &format!("report written to {}", p.display()));
    }
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        progress(start, &format!("JSON written to {}", p.display()));
    }
    if let Some(p) = &o.svg {
        let p = if p.is_relative() {
            crate::root().join(p)
        } else {
            p.clone()
        };
        plot(&report, &p)?;
        progress(start, &format!("plot written to {}", p.display()));
    }
    progress(start, "done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    #[test]
    fn options() {
        let o = ok(parse(args(&[])));
        assert!(o.load && !o.hv_core && !o.quick);
        assert_eq!(o.svg, Some(PathBuf::from("docs/load-scaling.svg")));
        let o = ok(parse(args(&[
            "--quick",
            "--json",
            "r.json",
            "--no-svg",
            "--all",
            "--",
            "load-test1",
            "--noplot",
        ])));
        assert!(o.quick && o.load && o.hv_core && o.svg.is_none());
        assert_eq!(o.json, Some(PathBuf::from("r.json")));
        assert_eq!(o.criterion, args(&["load-test1", "--noplot"]));
        let o = ok(parse(args(&["--only-hv-core"])));
        assert!(!o.load && o.hv_core && !o.qemu && !o.bochs);
        // QEMU and Bochs rows: on in a full run, off with --quick unless
        // asked for.
        let o = ok(parse(args(&[])));
        assert!(o.qemu && o.bochs);
        let o = ok(parse(args(&["--quick"])));
        assert!(!o.qemu && !o.bochs);
        let o = ok(parse(args(&["--quick", "--bochs"])));
        assert!(!o.qemu && o.bochs);
        let o = ok(parse(args(&["--no-qemu"])));
        assert!(!o.qemu && o.bochs);
        assert_eq!(parse(args(&["--help"])), Ok(Parsed::Help(USAGE)));
        assert!(err(parse(args(&["--fast"]))).contains("bench"));
        assert!(err(parse(args(&["--json"]))).contains("bench"));
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400 + 3600 + 120), "2000-02-29 01:02 UTC");
        assert_eq!(utc_date(1_798_675_200), "2026-12-31 00:00 UTC");
    }

    /// A criterion home with the given medians.
    fn fake_home(dir: &Path, results: &[(&str, &str, f64)]) {
        for (g, id, ns) in results {
            let d = dir.join(g).join(id).join("new");
            std::fs::create_dir_all(&d).unwrap();
            let v =
                json!({ "median": { "point_estimate": ns }, "mean": { "point_estimate": 0.0 } });
            std::fs::write(d.join("estimates.json"), v.to_string()).unwrap();
        }
    }

    fn counters() -> Value {
        let mode = |lc: u64, fc: u64| {
            json!({ "renders": lc * 2, "listener_commits": lc, "forced_commits": fc,
                    "ept_updates": 1, "invepts": 1, "mutations": 74,
                    "phases_ns": { "check": 1000, "duplicate": 2000, "decode": 3000,
                                   "map": 4000, "post_load": 5000, "commit": 6000 } })
        };
        json!({
            "quick": true,
            "shapes": [{
                "name": "test1", "shape": "net:8x16,blk:16x4", "group": "load-test1",
                "modes": { "eager": mode(25, 0), "forced-read": mode(25, 25), "deferred": mode(1, 0) },
                "floor": { "parse_ns": 800000 },
            }],
            "scaling": [
                { "functions": 0, "modes": { "deferred": { "mutations": 2 }, "eager": { "listener_commits": 1 } } },
                { "functions": 8, "modes": { "deferred": { "mutations": 26 }, "eager": { "listener_commits": 9 } } },
            ],
            "address_spaces": [1, 1024],
        })
    }

    fn host() -> HostInfo {
        HostInfo {
            cpu: "Test CPU".into(),
            cores: 2,
            date: "2026-11-30 22:00 UTC".into(),
        }
    }

    #[test]
    fn the_report_reads_estimates_and_counters_and_takes_qemu_and_bochs_rows() {
        let dir = std::env::temp_dir().join(format!("tern-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        fake_home(
            &dir,
            &[
                ("load-test1", "eager", 4e6),
                ("load-test1", "forced-read", 3e6),
                ("load-test1", "deferred", 1e6),
                ("load-test1", "floor", 0.8e6),
                ("scale-deferred", "0", 1e5),
                ("scale-deferred", "8", 2e5),
                ("scale-eager", "0", 1e5),
                ("scale-eager", "8", 6e5),
                ("address-spaces", "1", 900.0),
                ("address-spaces", "1024", 9e5),
            ],
        );
        let mut r = host_report(&counters(), &dir, host());
        assert_eq!(r.rows.len(), 1);
        let row = r.rows[0].clone();
        assert_eq!(row.deferred.listener_commits, Some(1));
        assert_eq!(row.forced_read.forced_commits, Some(25));
        let q = r.ratios(&row);
        assert_eq!(q.eager_over_deferred, Some(4.0));
        assert_eq!(q.forced_read_over_deferred, Some(3.0));
        assert_eq!(q.deferred_over_floor, Some(1.25));
        assert_eq!(q.qemu_over_deferred, None);
        assert_eq!(r.scaling[1].changes, 26);
        assert_eq!(r.scaling[1].eager_ns, Some(6e5));
        assert_eq!(r.address_spaces, vec![(1, 900.0), (1024, 9e5)]);
        assert_eq!(r.phases[0].1[0], ("parse".to_string(), 800_000));
        // The lead's rows: QEMU gives the host row its QEMU/deferred ratio.
        r.add_row(Row {
            test: "test1".into(),
            shape: "net:8x16,blk:16x4".into(),
            source: Source::Qemu {
                setup: "7.2, TCG, -smp 2, after firmware".into(),
            },
            unit: Unit::Nanoseconds,
            eager: ModeResult {
                load: Some(40e6),
                ..Default::default()
            },
            forced_read: ModeResult::default(),
            deferred: ModeResult::default(),
            floor: None,
        });
        let bochs = rows_from_json(&json!([{
            "test": "test1", "shape": "net:8x16,blk:16x4", "source": "bochs",
            "unit": "instructions",
            "eager": { "load": 9e6, "downtime": 2e7 },
            "deferred": { "load": 1e6, "downtime": 1.2e7, "listener_commits": 1 },
        }]))
        .unwrap();
        assert_eq!(bochs[0].deferred.listener_commits, Some(1));
        r.add_row(bochs[0].clone());
        assert!(
            rows_from_json(&json!([{ "test": "t", "shape": "s", "source": "kvm" }]))
                .unwrap_err()
                .contains("unknown source")
        );
        assert_eq!(r.ratios(&r.rows[0]).qemu_over_deferred, Some(40.0));
        assert_eq!(r.ratios(&r.rows[2]).eager_over_deferred, Some(9.0));
        assert_eq!(r.ratios(&r.rows[2]).qemu_over_deferred, None, "other unit");
        let md = r.markdown();
        assert!(md.contains("Test CPU (2 cores)"), "{md}");
        assert!(
            md.contains("| test1 | `net:8x16,blk:16x4` | Tern, host | 4.00 ms | 3.00 ms | 1.00 ms | 800.0 µs | 4.00x | 3.00x | 1.25x | 40.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| test1 | Tern, Bochs | 20.00 M instr | – | 12.00 M instr |"),
            "{md}"
        );
        let j = r.to_json();
        assert_eq!(j["rows"][0]["ratios"]["qemu/deferred"], json!(40.0));
        assert_eq!(
            j["rows"][0]["modes"]["deferred"]["listener_commits"],
            json!(1)
        );
        assert_eq!(j["rows"][0]["modes"]["eager"]["load_ns"], json!(4e6));
        assert_eq!(
            j["rows"][2]["modes"]["deferred"]["downtime_instructions"],
            json!(1.2e7)
        );
        assert_eq!(j["machine"]["cores"], json!(2));
        let svg = dir.join("plot.svg");
        plot(&r, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("deferred load"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
