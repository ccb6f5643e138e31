//! Tern in Bochs beside the host benchmark: the seed's shapes with the real
//! kernel and test guest, migrated within one Tern in each load mode. With
//! `clock: sync=none` Bochs counts one TSC tick per instruction, so the
//! numbers (non-iterable load and downtime from src-downtime-start to
//! dst-vm-started) are exact and repeat from run to run.

use crate::build::Images;
use crate::emu::{run_bochs, GuestSpec};
use std::time::Duration;

/// One shape and mode in Bochs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BochsRow {
    pub shape: String,
    pub mode: String,
    pub load_ticks: u64,
    pub downtime_ticks: u64,
    pub renders: u64,
    pub listener_commits: u64,
    pub forced_commits: u64,
    pub ept_updates: u64,
    pub invepts: u64,
    pub sections: u64,
}

/// The JSON object of the console line that contains `marker`.
fn json_line(serial: &str, marker: &str) -> Result<serde_json::Value, String> {
    let line = serial
        .lines()
        .find(|l| l.contains(marker))
        .ok_or_else(|| format!("no {marker:?} line"))?;
    let text = &line[line.find(marker).unwrap_or(0) + marker.len()..];
    serde_json::from_str(text.trim()).map_err(|e| format!("{marker:?} line: {e}: {line}"))
}

/// Unsigned field `key` of a JSON object Tern printed.
fn field(v: &serde_json::Value, key: &str) -> Result<u64, String> {
    v[key].as_u64().ok_or_else(|| format!("no {key} in: {v}"))
}

/// The row of one run's console.
pub fn parse_row(shape: &str, mode: &str, serial: &str) -> Result<BochsRow, String> {
    let load = json_line(serial, "] migration load json: ")?;
    let source = json_line(serial, "] migration source json: ")?;
    if !serial.contains("guest: PASS migrate") {
        return Err("the guest did not pass after the migration".into());
    }
    Ok(BochsRow {
        shape: shape.into(),
        mode: mode.into(),
        load_ticks: field(&load, "load_ticks")?,
        downtime_ticks: field(&source, "downtime_ticks")?,
        renders: field(&load, "renders")?,
        listener_commits: field(&load, "listener_commits")?,
        forced_commits: field(&load, "forced_commits")?,
        ept_updates: field(&load, "ept_updates")?,
        invepts: field(&load, "invepts")?,
        sections: field(&load, "sections")?,
    })
}

/// Runs every shape in every mode (local migration, pre-copy).
pub fn measure(images: &Images, shapes: &[&str]) -> Result<Vec<BochsRow>, String> {
    crate::deps::ensure(&[crate::deps::BOCHS])?;
    let mut rows = Vec::new();
    for shape in shapes {
        for mode in ["eager", "forced-read", "deferred"] {
            println!("xtask: Bochs {shape} {mode} ...");
            let guest = GuestSpec {
                image: images.guest.clone(),
                cmdline: format!("name=b scenario=migrate expect={shape} pages=256"),
            };
            let out = run_bochs(
                "bench-bochs",
                images,
                &format!("migrate=local migrate.commit={mode} devices={shape}"),
                &[guest],
                Duration::from_secs(300),
                false,
            )?;
            if out.timed_out || out.tern_status != Some(0) {
                return Err(format!(
                    "Bochs run {shape} {mode} failed (status {:?}):\n{}",
                    out.tern_status, out.serial
                ));
            }
            let row = parse_row(shape, mode, &out.serial)?;
            println!(
                "xtask: Bochs {shape} {mode}: load {} instructions, downtime {}",
                row.load_ticks, row.downtime_ticks
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

pub const USAGE: &str = "\
usage: cargo xtask bench-bochs [--json FILE] [SHAPE...]

Migrates the seed's device shapes (default all three) within one Tern in Bochs, in
each load mode (eager, forced-read, deferred), and prints the non-iterable load and
the downtime (src-downtime-start to dst-vm-started) in guest TSC ticks: one tick per
instruction, exact and repeatable, with the load's counters.

options:
  --json FILE   write the rows as JSON
  -h, --help    this text
";

/// `cargo xtask bench-bochs` options: shapes and a JSON file.
pub type Options = (Vec<String>, Option<std::path::PathBuf>);

pub fn parse<I>(args: I) -> Result<crate::cli::Parsed<Options>, String>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    use crate::cli::{self, Parsed};
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "bench-bochs";
    let (mut shapes, mut json) = (Vec::new(), None);
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("json") => json = Some(p.value().map_err(|e| cli::error(CMD, e))?.into()),
            Value(v) => {
                let s = cli::string(CMD, Ok(v))?;
                crate::bench_qemu::parse_shape(&s).map_err(|e| cli::error(CMD, e))?;
                shapes.push(s);
            }
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    Ok(Parsed::Run((shapes, json)))
}

/// The rows as JSON.
pub fn rows_json(rows: &[BochsRow]) -> String {
    let v: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "shape": r.shape, "mode": r.mode, "load_ticks": r.load_ticks,
                "downtime_ticks": r.downtime_ticks, "renders": r.renders,
                "listener_commits": r.listener_commits, "forced_commits": r.forced_commits,
                "ept_updates": r.ept_updates, "invepts": r.invepts, "sections": r.sections,
            })
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}

/// The rows as a markdown table, with eager/deferred per shape.
pub fn table(rows: &[BochsRow]) -> String {
    let mut t = String::from(
        "| shape | mode | load (instructions) | downtime (instructions) | renders | listener commits | forced commits | EPT updates | INVEPTs | load / deferred |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let deferred = rows
            .iter()
            .find(|d| d.shape == r.shape && d.mode == "deferred")
            .map_or(0, |d| d.load_ticks);
        let ratio = if deferred == 0 {
            "-".to_string()
        } else {
            format!("{:.1}x", r.load_ticks as f64 / deferred as f64)
        };
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio} |\n",
            r.shape,
            r.mode,
            r.load_ticks,
            r.downtime_ticks,
            r.renders,
            r.listener_commits,
            r.forced_commits,
            r.ept_updates,
            r.invepts
        );
    }
    t
}

pub fn cmd((shapes, json): &Options) -> Result<Vec<BochsRow>, String> {
    let images = crate::build::build_all()?;
    let default: Vec<String> = crate::bench_qemu::SEED_SHAPES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let shapes: Vec<&str> = if shapes.is_empty() { &default } else { shapes }
        .iter()
        .map(String::as_str)
        .collect();
    let rows = measure(&images, &shapes)?;
    println!("\n{}", table(&rows));
    if let Some(f) = json {
        std::fs::write(f, rows_json(&rows)).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_from_the_json_lines() {
        let serial = "\
[b] migration source json: {\"transport\":\"local\",\"mode\":\"deferred\",\"downtime_ticks\":4242,\"total_ticks\":9}
[b'] migration load json: {\"mode\":\"deferred\",\"sections\":28,\"load_ticks\":6079544,\"pages\":1,\"renders\":1,\"listener_commits\":1,\"forced_commits\":0,\"ept_updates\":0,\"invepts\":0}
[b'] guest: PASS migrate
";
        let r = parse_row("net:1x1", "deferred", serial).unwrap();
        assert_eq!(
            (
                r.load_ticks,
                r.downtime_ticks,
                r.sections,
                r.listener_commits
            ),
            (6_079_544, 4242, 28, 1)
        );
        assert!(parse_row("s", "m", &serial.replace("PASS", "FAIL")).is_err());
        assert!(parse_row("s", "m", &serial.replace("load_ticks", "x")).is_err());
    }
}
