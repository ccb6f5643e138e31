//! `cargo xtask run-suite DIR`: runs a directory of multiboot test kernels
//! (kvm-unit-tests' `x86/`, or any directory of `.flat`/`.elf` images) as
//! Tern guests in Bochs, one line per kernel and a summary table.
//!
//! With a `unittests.cfg` (kvm-unit-tests' format: `[name]` sections with
//! `file`, `smp`, `arch`, `test_args`, `accel`, `timeout`), each section is
//! a test; kernels that need more than one CPU, another architecture or
//! KVM itself are listed as not run, with the reason. Without one, every
//! `.flat` and `.elf` file is a test with no arguments.
//!
//! Tests run as consecutive VMs of one Tern boot (`budget=` bounds each
//! one); if Tern itself stops early, the run resumes with the next test in
//! a new boot, so one bad kernel cannot hide the others' results. A
//! kernel's status is kvm-unit-tests' exit code: 0 pass, 1 fail, 38 all
//! skipped, 63 abort; Tern's 120 means Tern stopped the VM (the reason is
//! in the table).

use crate::build::build_all;
use crate::cli::{self, Parsed};
use crate::emu::{run_bochs, GuestSpec};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One test to run, or a reason it is not run.
#[derive(Clone, Debug)]
struct Test {
    name: String,
    file: PathBuf,
    args: String,
    timeout_s: u64,
    skip: Option<String>,
}

/// Strips one level of quotes.
fn unquote(v: &str) -> String {
    let v = v.trim();
    for q in ['\'', '"'] {
        if let Some(x) = v.strip_prefix(q).and_then(|x| x.strip_suffix(q)) {
            return x.to_string();
        }
    }
    v.to_string()
}

/// Tests from kvm-unit-tests' `unittests.cfg`.
fn parse_cfg(dir: &Path, text: &str, default_timeout: u64) -> Vec<Test> {
    let mut tests = Vec::new();
    let mut cur: Option<(String, Vec<(String, String)>)> = None;
    let finish = |sec: Option<(String, Vec<(String, String)>)>, tests: &mut Vec<Test>| {
        let Some((name, kv)) = sec else { return };
        let get = |k: &str| kv.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let Some(file) = get("file") else { return };
        let smp: u32 = get("smp").and_then(|v| v.trim().parse().ok()).unwrap_or(1);
        let arch = get("arch");
        let accel = get("accel");
        let mut skip = None;
        if smp > 1 {
            skip = Some(format!("needs {smp} CPUs (Tern runs one vCPU per VM)"));
        } else if arch.as_deref() == Some("i386") {
            skip = Some("i386 build only".into());
        } else if accel.as_deref() == Some("kvm") {
            skip = Some("KVM only (accel = kvm)".into());
        } else if !dir.join(&file).is_file() {
            skip = Some(format!("{file} not built"));
        }
        let timeout_s = get("timeout")
            .and_then(|v| v.trim().trim_end_matches('s').parse().ok())
            .unwrap_or(default_timeout)
            .min(default_timeout.max(1));
        tests.push(Test {
            name,
            file: dir.join(file),
            args: get("test_args").map(|v| unquote(&v)).unwrap_or_default(),
            timeout_s,
            skip,
        });
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            finish(cur.take(), &mut tests);
            cur = Some((name.to_string(), Vec::new()));
        } else if let (Some((_, kv)), Some((k, v))) = (cur.as_mut(), line.split_once('=')) {
            kv.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    finish(cur, &mut tests);
    tests
}

/// Every `.flat`/`.elf` file of `dir`.
fn scan_dir(dir: &Path, timeout: u64) -> Result<Vec<Test>, String> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("flat" | "elf")))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|f| Test {
            name: f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            file: f,
            args: String::new(),
            timeout_s: timeout,
            skip: None,
        })
        .collect())
}

/// How one test ended.
#[derive(Clone, Debug)]
struct Outcome {
    result: &'static str,
    detail: String,
}

fn classify(serial: &str, name: &str) -> Option<Outcome> {
    let prefix = format!("[{name}] ");
    let lines: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    let stopped = lines.iter().find_map(|l| l.strip_prefix("stopped: "))?;
    let status: u32 = stopped
        .rsplit("(status ")
        .next()
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .unwrap_or(u32::MAX);
    let summary = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("SUMMARY: "))
        .map(str::to_string);
    let fails: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FAIL: "))
        .take(3)
        .collect();
    let (result, detail) = match status {
        0 => ("PASS", summary.unwrap_or_default()),
        1 => (
            "FAIL",
            format!(
                "{}{}",
                summary.unwrap_or_default(),
                if fails.is_empty() {
                    String::new()
                } else {
                    format!("; first failures: {}", fails.join(" | "))
                }
            ),
        ),
        38 => ("SKIP", summary.unwrap_or_else(|| "all skipped".into())),
        63 => (
            "ABORT",
            lines
                .iter()
                .rev()
                .find(|l| l.contains("Unhandled") || l.contains("abort") || l.contains("FAIL"))
                .map_or_else(|| stopped.to_string(), |s| s.to_string()),
        ),
        _ => ("STOPPED", stopped.to_string()),
    };
    Some(Outcome { result, detail })
}

/// `cargo xtask run-suite --help`.
pub const USAGE: &str = "\
usage: cargo xtask run-suite DIR [OPTIONS]

Runs every test kernel of DIR as a Tern guest in Bochs: one line per kernel, then
a markdown table and a summary. DIR is a kvm-unit-tests checkout (or its x86/),
whose unittests.cfg gives each test's file and arguments (kernels that need more
than one CPU or KVM itself are listed as not run); without a unittests.cfg, every
.flat and .elf file of DIR is a test without arguments.

options:
  --timeout SECS   time limit of each kernel, 1 to 86400 (default 120)
  --ram MIB        guest RAM of each kernel (default 128)
  --only A,B       run only these tests (unittests.cfg section names or file stems)
  --out FILE       also write the table and the summary to FILE
  -h, --help       this text
";

/// The options of `run-suite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuiteOptions {
    pub dir: PathBuf,
    /// Seconds per kernel (1..=86400).
    pub timeout: u64,
    /// Guest RAM in MiB.
    pub ram: u64,
    pub only: Option<Vec<String>>,
    pub out: Option<PathBuf>,
}

/// Parses `cargo xtask run-suite` arguments.
pub fn parse<I>(args: I) -> Result<Parsed<SuiteOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "run-suite";
    let mut dir: Option<PathBuf> = None;
    let mut o = SuiteOptions {
        dir: PathBuf::new(),
        timeout: 120,
        ram: 128,
        only: None,
        out: None,
    };
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("timeout") => {
                let v = cli::string(CMD, p.value())?;
                o.timeout = v
                    .parse()
                    .ok()
                    .filter(|t| (1..=86_400).contains(t))
                    .ok_or_else(|| {
                        cli::error(
                            CMD,
                            format!("--timeout takes 1 to 86400 seconds, not {v:?}"),
                        )
                    })?;
            }
            Long("ram") => {
                let v = cli::string(CMD, p.value())?;
                o.ram = v
                    .parse()
                    .ok()
                    .filter(|&r| r > 0)
                    .ok_or_else(|| cli::error(CMD, format!("--ram takes MiB, not {v:?}")))?;
            }
            Long("only") => {
                let names: Vec<String> = cli::string(CMD, p.value())?
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(String::from)
                    .collect();
                if names.is_empty() {
                    return Err(cli::error(CMD, "--only needs test names"));
                }
                o.only = Some(names);
            }
            Long("out") => {
                o.out = Some(PathBuf::from(p.value().map_err(|e| cli::error(CMD, e))?));
            }
            Value(d) => {
                if let Some(first) = &dir {
                    return Err(cli::error(
                        CMD,
                        format!(
                            "one DIR only, not {} and {}",
                            first.display(),
                            PathBuf::from(d).display()
                        ),
                    ));
                }
                dir = Some(PathBuf::from(d));
            }
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    o.dir = dir.ok_or_else(|| cli::error(CMD, "DIR missing"))?;
    Ok(Parsed::Run(o))
}

/// `cargo xtask run-suite`.
pub fn run_suite(o: &SuiteOptions) -> Result<(), String> {
    let SuiteOptions {
        dir,
        timeout,
        ram,
        only,
        out: out_file,
    } = o.clone();
    let dir = if dir.join("unittests.cfg").is_file() || !dir.join("x86/unittests.cfg").is_file() {
        dir
    } else {
        dir.join("x86")
    };
    let cfg = dir.join("unittests.cfg");
    let mut tests = if cfg.is_file() {
        let text = fs::read_to_string(&cfg).map_err(|e| format!("{}: {e}", cfg.display()))?;
        parse_cfg(&dir, &text, timeout)
    } else {
        scan_dir(&dir, timeout)?
    };
    if let Some(only) = &only {
        tests.retain(|t| only.contains(&t.name));
    }
    if tests.is_empty() {
        return Err(format!("no test kernels in {}", dir.display()));
    }
    let images = build_all()?;
    // kvm-unit-tests' environment (its one multiboot module), as its own
    // runner passes it; the VMs get pc-testdev (`testdev`), as QEMU's
    // `-device pc-testdev` in kvm-unit-tests' x86/run.
    let env = crate::root().join("target/xtask/suite-env");
    fs::create_dir_all(crate::root().join("target/xtask")).map_err(|e| e.to_string())?;
    fs::write(&env, "TERN=1\n").map_err(|e| e.to_string())?;
    let mut results: Vec<(Test, Outcome)> = Vec::new();
    let runnable: Vec<Test> = tests.iter().filter(|t| t.skip.is_none()).cloned().collect();
    let mut next = 0;
    let mut boot = 0;
    while next < runnable.len() {
        // 30 tests (60 boot modules with their environments) per boot.
        let batch = &runnable[next..runnable.len().min(next + 30)];
        let guests: Vec<GuestSpec> = batch
            .iter()
            .flat_map(|t| {
                [
                    GuestSpec {
                        image: t.file.clone(),
                        cmdline: format!("{}.flat {}", t.name, t.args).trim().to_string(),
                    },
                    GuestSpec {
                        image: env.clone(),
                        cmdline: format!("module-for={}", t.name),
                    },
                ]
            })
            .collect();
        // budget= counts 1M-tick slices: 20 ms each at Bochs' 50 MHz TSC.
        let slices = timeout * 50;
        let kernel_args = format!("ram={ram} budget={slices} testdev");
        let wall: u64 = batch.iter().map(|t| t.timeout_s + 5).sum::<u64>() + 60;
        boot += 1;
        let out = run_bochs(
            // Per invocation, so two suites never share a work directory.
            &format!("suite-{}-{boot}", std::process::id()),
            &images,
            &kernel_args,
            &guests,
            Duration::from_secs(wall),
            false,
        )?;
        let mut progressed = false;
        for t in batch {
            match classify(&out.serial, &t.name) {
                Some(o) => {
                    println!("{:<28} {:<8} {}", t.name, o.result, o.detail);
                    results.push((t.clone(), o));
                    next += 1;
                    progressed = true;
                }
                None => {
                    // Tern ended (or hung) during this test.
                    let why = match (out.timed_out, out.tern_status) {
                        (true, _) => "the run timed out in this test".to_string(),
                        (false, Some(s)) => format!("Tern ended with status {s} in this test"),
                        (false, None) => "Tern ended without a status in this test".into(),
                    };
                    let last = out
                        .serial
                        .lines()
                        .rev()
                        .find(|l| l.starts_with("tern:"))
                        .unwrap_or("")
                        .to_string();
                    let o = Outcome {
                        result: "TERN",
                        detail: format!("{why}: {last}"),
                    };
                    println!("{:<28} {:<8} {}", t.name, o.result, o.detail);
                    results.push((t.clone(), o));
                    next += 1;
                    progressed = true;
                    break;
                }
            }
        }
        if !progressed {
            break;
        }
    }
    for t in tests.iter().filter(|t| t.skip.is_some()) {
        let o = Outcome {
            result: "NOT RUN",
            detail: t.skip.clone().unwrap_or_default(),
        };
        println!("{:<28} {:<8} {}", t.name, o.result, o.detail);
        results.push((t.clone(), o));
    }
    let count = |r: &str| results.iter().filter(|(_, o)| o.result == r).count();
    let mut table = String::from("| test | result | detail |\n|---|---|---|\n");
    for (t, o) in &results {
        table += &format!(
            "| {} | {} | {} |\n",
            t.name,
            o.result,
            o.detail.replace('|', "/")
        );
    }
    let summary = format!(
        "{} kernels: {} PASS, {} FAIL, {} SKIP, {} ABORT, {} STOPPED by Tern, {} TERN (hypervisor ended), {} NOT RUN",
        results.len(),
        count("PASS"),
        count("FAIL"),
        count("SKIP"),
        count("ABORT"),
        count("STOPPED"),
        count("TERN"),
        count("NOT RUN")
    );
    println!("\n{table}\n{summary}");
    if let Some(f) = out_file {
        fs::write(&f, format!("{table}\n{summary}\n"))
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    if count("TERN") > 0 {
        return Err("Tern itself ended during a test".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    #[test]
    fn suite_help() {
        for a in [&["-h"][..], &["--help"], &["dir", "--ram", "64", "-h"]] {
            assert_eq!(parse(args(a)), Ok(Parsed::Help(USAGE)));
        }
        for o in ["--timeout", "--ram", "--only", "--out"] {
            assert!(USAGE.contains(o), "{o}");
        }
    }

    #[test]
    fn suite_each_option() {
        assert_eq!(
            ok(parse(args(&["kut"]))),
            SuiteOptions {
                dir: "kut".into(),
                timeout: 120,
                ram: 128,
                only: None,
                out: None
            }
        );
        let o = ok(parse(args(&[
            "--timeout",
            "30",
            "--ram=64",
            "--only",
            "msr,,vmexit_cpuid",
            "kut/x86",
            "--out",
            "r.md",
        ])));
        assert_eq!(
            o,
            SuiteOptions {
                dir: "kut/x86".into(),
                timeout: 30,
                ram: 64,
                only: Some(vec!["msr".into(), "vmexit_cpuid".into()]),
                out: Some("r.md".into())
            }
        );
    }

    #[test]
    fn suite_bad_command_lines_are_errors() {
        assert_eq!(
            err(parse(args(&["kut", "--verbose"]))),
            "run-suite: invalid option '--verbose' (see `cargo xtask run-suite --help`)"
        );
        assert!(err(parse(args(&[]))).starts_with("run-suite: DIR missing"));
        assert!(err(parse(args(&["a", "b"]))).contains("one DIR only, not a and b"));
        for (o, v) in [
            ("--timeout", "0"),
            ("--timeout", "86401"),
            ("--timeout", "x"),
            ("--ram", "0"),
            ("--ram", "-1"),
        ] {
            let e = err(parse(args(&["kut", o, v])));
            assert!(e.starts_with(&format!("run-suite: {o} takes")), "{e}");
        }
        assert!(err(parse(args(&["kut", "--only", ","]))).contains("--only needs test names"));
        for o in ["--timeout", "--ram", "--only", "--out"] {
            assert_eq!(
                err(parse(args(&["kut", o]))),
                format!("run-suite: missing argument for option '{o}' (see `cargo xtask run-suite --help`)")
            );
        }
    }

    #[test]
    fn cfg_sections_become_tests_with_reasons() {
        let dir = std::env::temp_dir().join(format!("tern-suite-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("msr.flat"), b"x").unwrap();
        fs::write(dir.join("vmexit.flat"), b"x").unwrap();
        let cfg = "# c\n[msr]\nfile = msr.flat\n\n[x2apic]\nfile = apic.flat\nsmp = 2\n\
                   [vmexit_cpuid]\nfile = vmexit.flat\ntest_args = 'cpuid'\ntimeout = 30\n\
                   [pmu]\nfile = msr.flat\naccel = kvm\n[c8b]\nfile = msr.flat\narch = i386\n\
                   [gone]\nfile = gone.flat\n";
        let t = parse_cfg(&dir, cfg, 120);
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["msr", "x2apic", "vmexit_cpuid", "pmu", "c8b", "gone"]
        );
        assert!(t[0].skip.is_none());
        assert!(t[1].skip.as_deref().unwrap().contains("2 CPUs"));
        assert_eq!((t[2].args.as_str(), t[2].timeout_s), ("cpuid", 30));
        assert!(t[3].skip.as_deref().unwrap().contains("KVM"));
        assert!(t[4].skip.as_deref().unwrap().contains("i386"));
        assert!(t[5].skip.as_deref().unwrap().contains("not built"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn console_lines_classify_each_kernel() {
        let serial = "[a] PASS: x\n[a] SUMMARY: 3 tests\n[a] stopped: guest exited with status 0 (status 0)\n\
                      [b] FAIL: y\n[b] SUMMARY: 2 tests, 1 unexpected failures\n[b] stopped: guest exited with status 1 (status 1)\n\
                      [c] stopped: guest triple fault (status 120)\n[d] SUMMARY: 1 tests, 1 skipped\n[d] stopped: guest exited with status 38 (status 38)\n";
        let a = classify(serial, "a").unwrap();
        assert_eq!((a.result, a.detail.as_str()), ("PASS", "3 tests"));
        let b = classify(serial, "b").unwrap();
        assert_eq!(b.result, "FAIL");
        assert!(b.detail.contains("first failures: y"), "{}", b.detail);
        let c = classify(serial, "c").unwrap();
        assert_eq!(
            (c.result, c.detail.as_str()),
            ("STOPPED", "guest triple fault (status 120)")
        );
        assert_eq!(classify(serial, "d").unwrap().result, "SKIP");
        assert!(classify(serial, "e").is_none());
    }
}
