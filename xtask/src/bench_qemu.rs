//! QEMU beside Tern: the seed's device shapes in QEMU (Debian
//! `qemu-system-x86`, q35, TCG), saved with `migrate "exec:cat > FILE"`
//! once the guest state is set up, and loaded with `-incoming defer` +
//! `migrate-incoming`; the non-iterable load time comes from QEMU's own
//! trace timestamps (`-msg timestamp=on`): from the first device section's
//! `qemu_loadvm_state_section_startfull` (the first one that is not `ram`)
//! to `qemu_loadvm_state_post_main`.
//!
//! Guest states: `firmware` (SeaBIOS assigned the BARs and found nothing to
//! boot) and `tern-guest` (Tern's own test guest, booted by QEMU's
//! multiboot loader, enumerated PCI, assigned BARs, enabled MSI-X and set up
//! every queue of every device, did block I/O and sent frames: the state
//! closest to what Tern's loads restore). Multi-queue virtio-net needs
//! multi-queue taps, which only root can create.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The guest state a QEMU stream is taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    Firmware,
    TernGuest,
}

impl GuestState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Firmware => "firmware",
            Self::TernGuest => "tern-guest",
        }
    }
}

/// One shape's QEMU measurement.
#[derive(Clone, Debug)]
pub struct QemuRow {
    pub shape: String,
    pub state: GuestState,
    /// Non-iterable load time of each run, in milliseconds.
    pub runs_ms: Vec<f64>,
    /// Device sections the loads went through.
    pub sections: usize,
    pub stream_bytes: u64,
}

impl QemuRow {
    pub fn min_ms(&self) -> f64 {
        self.runs_ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn median_ms(&self) -> f64 {
        let mut v = self.runs_ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
}

/// How QEMU's setup differs from the seed's, for the report.
pub const SETUP_NOTE: &str =
    "QEMU 7.2 (Debian) with TCG (no KVM on this machine), 1 vCPU, no vhost, \
q35, 512 MiB; the seed measured with KVM. Load time from QEMU's own trace timestamps.";

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, within: Duration) -> Result<Self, String> {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > within => {
                    return Err(format!("QMP socket {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Self {
            r: BufReader::new(s),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).map_err(|e| e.to_string())?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", "")?;
        Ok(q)
    }

    /// Runs a command; returns its `return` line (events are skipped).
    fn cmd(&mut self, name: &str, args: &str) -> Result<String, String> {
        let msg = if args.is_empty() {
            format!("{{\"execute\":\"{name}\"}}\n")
        } else {
            format!("{{\"execute\":\"{name}\",\"arguments\":{args}}}\n")
        };
        self.w
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP {name}: {e}"))?;
        loop {
            let mut line = String::new();
            let n = self
                .r
                .read_line(&mut line)
                .map_err(|e| format!("QMP {name}: {e}"))?;
            if n == 0 {
                return Err(format!("QMP {name}: QEMU closed the connection"));
            }
            if line.contains("\"error\"") {
                return Err(format!("QMP {name}: {}", line.trim()));
            }
            if line.contains("\"return\"") {
                return Ok(line);
            }
        }
    }

    /// Waits for `query-migrate` to say completed.
    fn wait_migration(&mut self, within: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let r = self.cmd("query-migrate", "")?;
            if r.contains("\"completed\"") {
                return Ok(());
            }
            if r.contains("\"failed\"") || r.contains("\"cancelled\"") {
                return Err(format!("migration failed: {}", r.trim()));
            }
            if start.elapsed() > within {
                return Err(format!("migration did not complete: {}", r.trim()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Kills QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Multi-queue taps, deleted when dropped.
struct Taps(Vec<String>);

impl Taps {
    /// `n` taps, multi-queue when `multi` (QEMU opens a one-queue tap
    /// without the flag, and the kernel refuses the mismatch).
    fn create(n: u16, multi: bool) -> Result<Self, String> {
        let mut t = Self(Vec::new());
        let mode: &[&str] = if multi {
            &["mode", "tap", "multi_queue"]
        } else {
            &["mode", "tap"]
        };
        for i in 0..n {
            let name = format!("ternqb{i}");
            let _ = Command::new("ip")
                .args(["tuntap", "del", "dev", &name, "mode", "tap", "multi_queue"])
                .output();
            let _ = Command::new("ip")
                .args(["tuntap", "del", "dev", &name, "mode", "tap"])
                .output();
            let o = Command::new("ip")
                .args(["tuntap", "add", "dev", &name])
                .args(mode)
                .output()
                .map_err(|e| format!("cannot run ip (package iproute2): {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "ip tuntap add {name}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            t.0.push(name);
        }
        Ok(t)
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip")
                .args(["link", "del", "dev", name])
                .output();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `net:NxP,blk:MxQ` as (N, P, M, Q).
pub fn parse_shape(shape: &str) -> Result<(u16, u16, u16, u16), String> {
    let mut n = (0, 0, 0, 0);
    for part in shape.split(',') {
        let (kind, rest) = part
            .split_once(':')
            .ok_or_else(|| format!("bad shape {shape:?}"))?;
        let (a, b) = rest
            .split_once('x')
            .ok_or_else(|| format!("bad shape {shape:?}"))?;
        let (a, b): (u16, u16) = (
            a.parse().map_err(|_| format!("bad shape {shape:?}"))?,
            b.parse().map_err(|_| format!("bad shape {shape:?}"))?,
        );
        match kind {
            "net" => (n.0, n.1) = (a, b),
            "blk" => (n.2, n.3) = (a, b),
            _ => return Err(format!("bad shape {shape:?}")),
        }
    }
    Ok(n)
}

/// QEMU's arguments for a shape: virtio-net from slot 1 then virtio-blk,
/// modern-only, as Tern places them.
fn machine_args(shape: &str, dir: &Path) -> Result<Vec<String>, String> {
    let (nets, pairs, blks, queues) = parse_shape(shape)?;
    let mut a: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-smp",
        "1",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut slot = 1;
    for i in 0..nets {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=n{i},ifname=ternqb{i},queues={pairs},script=no,downscript=no,vhost=off"
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=n{i},mq=on,vectors={},disable-legacy=on,addr={slot:#x}",
            2 * pairs + 2
        ));
        slot += 1;
    }
    for i in 0..blks {
        let img = dir.join(format!("blk{i}.img"));
        if !img.exists() {
            let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
            f.set_len(1 << 20).map_err(|e| e.to_string())?;
        }
        a.push("-drive".into());
        a.push(format!("if=none,id=d{i},file={},format=raw", img.display()));
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive=d{i},num-queues={queues},disable-legacy=on,addr={slot:#x}"
        ));
        slot += 1;
    }
    Ok(a)
}

fn spawn(args: &[String], extra: &[String], dir: &Path, tag: &str) -> Result<Qemu, String> {
    let log =
        std::fs::File::create(dir.join(format!("{tag}.stderr"))).map_err(|e| e.to_string())?;
    let child = Command::new("qemu-system-x86_64")
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    Ok(Qemu(child))
}

/// Parses a log-backend trace: the non-iterable load in milliseconds and
/// the number of device sections.
pub fn load_time_ms(trace: &str) -> Result<(f64, usize), String> {
    let stamp = |l: &str| -> Option<f64> {
        let at = l.split_once('@')?.1;
        at.split_once(':')?.0.parse().ok()
    };
    let mut first = None;
    let mut sections = 0;
    for l in trace.lines() {
        if l.contains(":qemu_loadvm_state_section_startfull ") {
            let idstr = l
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(i, _)| i);
            if idstr != Some("ram") {
                sections += 1;
                if first.is_none() {
                    first = stamp(l);
                }
            }
        } else if l.contains(":qemu_loadvm_state_post_main ") {
            let (Some(t0), Some(t1)) = (first, stamp(l)) else {
                return Err("post_main before any device section".into());
            };
            return Ok(((t1 - t0) * 1000.0, sections));
        }
    }
    Err("the trace has no qemu_loadvm_state_post_main".into())
}

/// Measures one shape in one guest state: one source run, `runs` loads.
pub fn measure(
    shape: &str,
    state: GuestState,
    runs: usize,
    guest_elf: &Path,
    dir: &Path,
) -> Result<QemuRow, String> {
    if !is_root() {
        return Err(
            "QEMU's row needs root: multi-queue virtio-net needs multi-queue taps (ip tuntap add ... multi_queue)"
                .into(),
        );
    }
    crate::deps::ensure(&[crate::deps::QEMU, crate::deps::QEMU_BENCH])?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (nets, pairs, ..) = parse_shape(shape)?;
    let _taps = Taps::create(nets, pairs > 1)?;
    let args = machine_args(shape, dir)?;
    let stream = dir.join("qemu.mig");
    let _ = std::fs::remove_file(&stream);

    // The source.
    let qmp = dir.join("src.qmp");
    let serial = dir.join("src.serial");
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&serial);
    let mut extra = vec![
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ];
    if state == GuestState::TernGuest {
        // QEMU's multiboot loader takes 32-bit ELF images only.
        let elf32 = dir.join("tern-guest32.elf");
        let o = Command::new("objcopy")
            .args(["-O", "elf32-i386"])
            .arg(guest_elf)
            .arg(&elf32)
            .output()
            .map_err(|e| format!("cannot run objcopy (package binutils): {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "objcopy: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        extra.extend([
            "-kernel".into(),
            elf32.display().to_string(),
            "-append".into(),
            format!("name=q scenario=virtio expect={shape}"),
        ]);
    }
    let src = spawn(&args, &extra, dir, "src")?;
    let stderr_of =
        |tag: &str| std::fs::read_to_string(dir.join(format!("{tag}.stderr"))).unwrap_or_default();
    let mut q = Qmp::connect(&qmp, Duration::from_secs(20))
        .map_err(|e| format!("{e}; QEMU said: {}", stderr_of("src").trim()))?;
    let start = Instant::now();
    match state {
        // SeaBIOS assigns BARs within the first seconds of TCG, then finds
        // nothing to boot.
        GuestState::Firmware => std::thread::sleep(Duration::from_secs(8)),
        GuestState::TernGuest => loop {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            // The devices are set up and their I/O done; the frames it sent
            // out through the taps do not come back, so it ends there.
            if text.contains("PASS virtio") || text.contains("FAIL virtio") {
                if !text.contains("virtio devices up") {
                    return Err(format!("the guest did not set up its devices:\n{text}"));
                }
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                return Err(format!("the guest did not finish its setup:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        },
    }
    let src_said = |e: String| format!("{e}; QEMU said: {}", stderr_of("src").trim());
    q.cmd("stop", "").map_err(src_said)?;
    q.cmd(
        "migrate",
        &format!("{{\"uri\":\"exec:cat > {}\"}}", stream.display()),
    )
    .map_err(src_said)?;
    q.wait_migration(Duration::from_secs(120))
        .map_err(src_said)?;
    let _ = q.cmd("quit", "");
    drop(src);
    let stream_bytes = std::fs::metadata(&stream).map(|m| m.len()).unwrap_or(0);

    // The loads.
    let mut row = QemuRow {
        shape: shape.into(),
        state,
        runs_ms: Vec::new(),
        sections: 0,
        stream_bytes,
    };
    for r in 0..runs {
        let qmp = dir.join(format!("dst{r}.qmp"));
        let trace = dir.join(format!("dst{r}.trace"));
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&trace);
        let extra: Vec<String> = vec![
            "-incoming".into(),
            "defer".into(),
            "-trace".into(),
            "qemu_loadvm_state_section_startfull".into(),
            "-trace".into(),
            "qemu_loadvm_state_post_main".into(),
            "-msg".into(),
            "timestamp=on".into(),
            "-D".into(),
            trace.display().to_string(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            // The same devices as the source, its UART included.
            "-serial".into(),
            "null".into(),
        ];
        let dst = spawn(&args, &extra, dir, &format!("dst{r}"))?;
        let mut q = Qmp::connect(&qmp, Duration::from_secs(20))
            .map_err(|e| format!("{e}; QEMU said: {}", stderr_of(&format!("dst{r}")).trim()))?;
        q.cmd(
            "migrate-incoming",
            &format!("{{\"uri\":\"exec:cat {}\"}}", stream.display()),
        )?;
        q.wait_migration(Duration::from_secs(120))
            .map_err(|e| format!("{e}; QEMU said: {}", stderr_of(&format!("dst{r}")).trim()))?;
        let _ = q.cmd("quit", "");
        drop(dst);
        let text =
            std::fs::read_to_string(&trace).map_err(|e| format!("{}: {e}", trace.display()))?;
        let (ms, sections) = load_time_ms(&text)?;
        row.runs_ms.push(ms);
        row.sections = sections;
    }
    Ok(row)
}

/// Where `cargo xtask bench --qemu` keeps its files.
pub fn work_dir(shape: &str, state: GuestState) -> PathBuf {
    crate::root().join("target/xtask/bench-qemu").join(format!(
        "{}-{}",
        shape.replace([':', ','], "_"),
        state.name()
    ))
}

/// `cargo xtask bench-qemu` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub shapes: Vec<String>,
    pub states: Vec<GuestState>,
    pub runs: usize,
    pub json: Option<PathBuf>,
}

pub const USAGE: &str = "\
usage: cargo xtask bench-qemu [--runs N] [--state firmware|tern-guest] [--json FILE] [SHAPE...]

Measures QEMU's non-iterable load time for the seed's device shapes (default: all
three: net:8x16,blk:16x4 net:8x1,blk:16x1 net:1x16,blk:1x4), in QEMU (q35, TCG,
multi-queue taps: needs root), from its own trace timestamps: each shape is saved
once after the guest set its devices up, then loaded N times (default 3); the
minimum and median are printed. Guest states: firmware (SeaBIOS assigned the BARs)
and tern-guest (Tern's test guest set up every queue); default both.

options:
  --runs N        loads per shape and state
  --state S       one guest state only (repeatable)
  --json FILE     write the rows as JSON
  -h, --help      this text
";

pub fn parse<I>(args: I) -> Result<crate::cli::Parsed<Options>, String>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    use crate::cli::{self, Parsed};
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "bench-qemu";
    let mut o = Options {
        shapes: Vec::new(),
        states: Vec::new(),
        runs: 3,
        json: None,
    };
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("runs") => {
                let v = cli::string(CMD, p.value())?;
                o.runs =
                    v.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        cli::error(CMD, format!("--runs takes a count, not {v:?}"))
                    })?;
            }
            Long("state") => {
                let v = cli::string(CMD, p.value())?;
                o.states.push(match v.as_str() {
                    "firmware" => GuestState::Firmware,
                    "tern-guest" => GuestState::TernGuest,
                    _ => {
                        return Err(cli::error(
                            CMD,
                            format!("--state takes firmware or tern-guest, not {v:?}"),
                        ))
                    }
                });
            }
            Long("json") => o.json = Some(p.value().map_err(|e| cli::error(CMD, e))?.into()),
            Value(v) => {
                let s = cli::string(CMD, Ok(v))?;
                parse_shape(&s).map_err(|e| cli::error(CMD, e))?;
                o.shapes.push(s);
            }
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    if o.shapes.is_empty() {
        o.shapes = SEED_SHAPES.iter().map(|s| s.to_string()).collect();
    }
    if o.states.is_empty() {
        o.states = vec![GuestState::Firmware, GuestState::TernGuest];
    }
    Ok(Parsed::Run(o))
}

/// The seed's three device shapes.
pub const SEED_SHAPES: [&str; 3] = ["net:8x16,blk:16x4", "net:8x1,blk:16x1", "net:1x16,blk:1x4"];

/// The rows as JSON.
pub fn rows_json(rows: &[QemuRow]) -> String {
    let v: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "shape": r.shape,
                "state": r.state.name(),
                "min_ms": r.min_ms(),
                "median_ms": r.median_ms(),
                "runs_ms": r.runs_ms,
                "sections": r.sections,
                "stream_bytes": r.stream_bytes,
            })
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}

pub fn cmd(o: &Options) -> Result<Vec<QemuRow>, String> {
    let images = crate::build::build_all()?;
    let mut rows = Vec::new();
    for shape in &o.shapes {
        for &state in &o.states {
            println!(
                "xtask: QEMU {shape} ({}), {} loads ...",
                state.name(),
                o.runs
            );
            let row = measure(shape, state, o.runs, &images.guest, &work_dir(shape, state))?;
            println!(
                "xtask: QEMU {shape} ({}): {} device sections, min {:.2} ms, median {:.2} ms",
                state.name(),
                row.sections,
                row.min_ms(),
                row.median_ms()
            );
            rows.push(row);
        }
    }
    println!("\n{SETUP_NOTE}\n");
    println!("| shape | guest state | device sections | min (ms) | median (ms) |");
    println!("|---|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.2} |",
            r.shape,
            r.state.name(),
            r.sections,
            r.min_ms(),
            r.median_ms()
        );
    }
    if let Some(f) = &o.json {
        std::fs::write(f, rows_json(&rows)).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_time_from_a_log_trace() {
        let t = "\
7892@1796076769.837242:qemu_loadvm_state_section_startfull 2(ram) 0 4
7892@1796076769.849419:qemu_loadvm_state_section_startfull 0(timer) 0 2
7892@1796076769.851290:qemu_loadvm_state_section_startfull 39(0000:00:01.0/virtio-net) 0 11
7892@1796076769.853002:qemu_loadvm_state_post_main 0
";
        let (ms, n) = load_time_ms(t).unwrap();
        assert!((ms - 3.583).abs() < 0.001, "{ms}");
        assert_eq!(n, 2);
        assert!(load_time_ms("7892@1.0:qemu_loadvm_state_post_main 0\n").is_err());
        assert!(load_time_ms("").is_err());
    }

    #[test]
    fn shapes_and_median() {
        assert_eq!(parse_shape("net:8x16,blk:16x4"), Ok((8, 16, 16, 4)));
        assert!(parse_shape("net:8").is_err());
        let r = QemuRow {
            shape: String::new(),
            state: GuestState::Firmware,
            runs_ms: vec![3.0, 1.0, 2.0, 10.0],
            sections: 0,
            stream_bytes: 0,
        };
        assert_eq!((r.min_ms(), r.median_ms()), (1.0, 2.5));
    }
}
