//! `cargo xtask migrate [--save FILE | --load FILE | --file FILE]`: a VM
//! migrates from one Tern to another through a file. The source Tern
//! writes its stream to an ATA disk the emulator backs with a host file
//! (sector 0: a header with the length; the stream from sector 1); xtask
//! copies the stream out, and a second Tern boots with it as the VM's
//! module (`incoming`).

use crate::build::Images;
use crate::emu::{self, Emulator, GuestSpec, RunOutput};
use crate::migrate::inspect;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

/// The disk's header: magic, then the stream's length (little-endian).
const DISK_MAGIC: &[u8; 8] = b"TERNMIG1";
const SECTOR: usize = 512;

/// A fresh, sparse migration disk large enough for `bytes` of stream.
pub fn make_disk(path: &Path, bytes: u64) -> Result<(), String> {
    let cylinders = (bytes + SECTOR as u64).div_ceil(emu::CYLINDER).max(2);
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(cylinders * emu::CYLINDER)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// One Tern run of a migration: where and how.
pub struct Half<'a> {
    /// The run's name (its directory under target/xtask).
    pub name: &'a str,
    pub images: &'a Images,
    pub emulator: Emulator,
    /// Tern's command line (`migrate=disk` is added on the source).
    pub kernel_args: &'a str,
    pub timeout: Duration,
    /// Show the console as it comes.
    pub echo: bool,
}

/// The stream on a migration disk: the header, then only its bytes.
fn read_stream(disk: &Path) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    let mut header = vec![0u8; SECTOR];
    f.read_exact(&mut header)
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    // The header's checks, against a buffer of just the header plus the
    // disk's size.
    if &header[..8] != DISK_MAGIC {
        return Err("the migration disk holds no complete stream (no header)".into());
    }
    let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if (SECTOR as u64).checked_add(len).is_none_or(|e| e > size) {
        return Err(format!("the header's length {len} runs past the disk"));
    }
    let mut stream = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(SECTOR as u64))
        .and_then(|_| f.read_exact(&mut stream))
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    Ok(stream)
}

/// The source half: Tern runs the guest with `migrate=disk`; when the guest
/// asks, the stream goes to a disk that is then copied out to `out`.
pub fn save(h: &Half, guest: &GuestSpec, out: &Path) -> Result<RunOutput, String> {
    let Half {
        name,
        images,
        emulator,
        kernel_args,
        timeout,
        echo,
    } = *h;
    let dir = crate::root().join("target/xtask").join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let disk = dir.join("migration-disk.img");
    make_disk(&disk, 256 << 20)?;
    let args = format!("{kernel_args} migrate=disk");
    let guests = std::slice::from_ref(guest);
    let run = match emulator {
        Emulator::Bochs => {
            emu::run_bochs_disk(name, images, &args, guests, timeout, echo, Some(&disk))?
        }
        Emulator::QemuKvm | Emulator::QemuTcg => emu::run_qemu_disk(
            name,
            images,
            &args,
            guests,
            emulator == Emulator::QemuKvm,
            timeout,
            echo,
            Some(&disk),
        )?,
    };
    if run.timed_out {
        return Err(format!("the source did not finish within {timeout:?}"));
    }
    if run.tern_status != Some(0) {
        return Err(format!(
            "the source Tern ended with status {:?}\n--- source console ---\n{}",
            run.tern_status, run.serial
        ));
    }
    let tail = |text: &str| -> String {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    let stream = read_stream(&disk).map_err(|e| {
        format!(
            "{e}\n--- the source's console (last lines) ---\n{}",
            tail(&run.serial)
        )
    })?;
    std::fs::write(out, stream).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(run)
}

/// The target half: a second Tern boots with the stream as the VM's
/// module (`incoming` on its line), loads it and runs the guest on.
pub fn load(h: &Half, guest_line: &str, stream: &Path) -> Result<RunOutput, String> {
    let Half {
        name,
        images,
        emulator,
        kernel_args,
        timeout,
        echo,
    } = *h;
    if !stream.is_file() {
        return Err(format!("{}: not a file", stream.display()));
    }
    let guest = GuestSpec {
        image: stream.to_path_buf(),
        cmdline: format!("{guest_line} incoming"),
    };
    let guests = std::slice::from_ref(&guest);
    match emulator {
        Emulator::Bochs => emu::run_bochs(name, images, kernel_args, guests, timeout, echo),
        Emulator::QemuKvm | Emulator::QemuTcg => emu::run_qemu(
            name,
            images,
            kernel_args,
            guests,
            emulator == Emulator::QemuKvm,
            timeout,
            echo,
        ),
    }
}

/// What `cargo xtask migrate` does besides `inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Inspect(PathBuf),
    /// QEMU's `scripts/analyze-migration.py` (at this path) reads the
    /// stream; its sections are compared with Tern's reader's.
    Analyze {
        file: PathBuf,
        script: Option<PathBuf>,
    },
    /// Source only: the stream goes to this file.
    Save(PathBuf),
    /// Target only: this file is loaded.
    Load(PathBuf),
    /// Both halves, through this file (default under target/).
    Both(Option<PathBuf>),
}

/// `cargo xtask migrate` options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateOptions {
    pub action: Action,
    pub emulator: Option<emu::EmulatorChoice>,
    /// The VM's command line.
    pub guest: String,
    /// Tern's command line (both halves).
    pub kernel: String,
}

/// The guest line for a shape: the migrate scenario with virtio I/O when
/// `devices=` is among the kernel arguments.
pub fn default_guest(kernel: &str) -> String {
    match emu::option(kernel, "devices") {
        Some(d) => format!("name=mig scenario=migrate expect={d} pages=512"),
        None => "name=mig scenario=migrate pages=512".into(),
    }
}

/// The `migration ... json` lines of a console.
fn json_lines(serial: &str) -> Vec<&str> {
    serial.lines().filter(|l| l.contains(" json: ")).collect()
}

pub fn migrate_cmd(o: &MigrateOptions) -> Result<(), String> {
    match &o.action {
        Action::Inspect(f) => return inspect(f).map(|out| print!("{out}")),
        Action::Analyze { file, script } => return analyze(file, script.as_deref()),
        _ => {}
    }
    let emulator = emu::pick_emulator(o.emulator);
    if emulator == Emulator::QemuTcg {
        return Err(
            "QEMU without KVM has no VMX: use --emulator bochs, or a host with /dev/kvm and VMX"
                .into(),
        );
    }
    let images = crate::build::build_all()?;
    let timeout = Duration::from_secs(900);
    let default_file = crate::root().join("target/xtask/migrate/stream.mig");
    let guest = GuestSpec {
        image: images.guest.clone(),
        cmdline: o.guest.clone(),
    };
    println!("xtask: migrating under {emulator:?}");
    let (src, dst) = match &o.action {
        Action::Inspect(_) | Action::Analyze { .. } => unreachable!("handled above"),
        Action::Save(f) => (Some((f.clone(), true)), None),
        Action::Load(f) => (None, Some(f.clone())),
        Action::Both(f) => {
            let f = f.clone().unwrap_or(default_file);
            (Some((f.clone(), true)), Some(f))
        }
    };
    let mut summary = Vec::new();
    if let Some((file, echo)) = &src {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        println!("xtask: source Tern (the stream goes to {})", file.display());
        let half = Half {
            name: "migrate-src",
            images: &images,
            emulator,
            kernel_args: &o.kernel,
            timeout,
            echo: *echo,
        };
        let run = save(&half, &guest, file)?;
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        println!("xtask: stream of {len} bytes written to {}", file.display());
        summary.extend(
            json_lines(&run.serial)
                .into_iter()
                .map(|l| format!("source: {l}")),
        );
    }
    if let Some(file) = &dst {
        println!("xtask: target Tern (loading {})", file.display());
        let half = Half {
            name: "migrate-dst",
            images: &images,
            emulator,
            kernel_args: &o.kernel,
            timeout,
            echo: true,
        };
        let run = load(&half, &o.guest, file)?;
        summary.extend(
            json_lines(&run.serial)
                .into_iter()
                .map(|l| format!("target: {l}")),
        );
        match (run.timed_out, run.tern_status) {
            (true, _) => return Err(format!("the target did not finish within {timeout:?}")),
            (false, Some(0)) => {}
            (false, s) => return Err(format!("the target Tern ended with status {s:?}")),
        }
    }
    println!("xtask: migration stats");
    for l in summary {
        println!("  {l}");
    }
    Ok(())
}

/// Runs QEMU's `analyze-migration.py` on `file` (state and RAM dump) and
/// checks that it found every section Tern's own reader finds, by name.
pub fn analyze(file: &Path, script: Option<&Path>) -> Result<(), String> {
    let script = script.ok_or(
        "analyze needs QEMU's scripts/analyze-migration.py, which is not part of Tern or of \
         a Debian package: pass --script PATH from a QEMU source tree (e.g. \
         `git clone --depth 1 -b v7.2.0 https://gitlab.com/qemu-project/qemu`)",
    )?;
    if !script.is_file() {
        return Err(format!("--script: {} is not a file", script.display()));
    }
    let data = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed = migration::read_self_described(&data)
        .map_err(|e| format!("{}: Tern's reader refuses it: {e}", file.display()))?;
    // The state dump keys sections "idstr (id)"; the description lists
    // every device section (RAM is not one) as "name": "idstr".
    let mut ours: Vec<(String, Option<String>)> = parsed
        .sections
        .iter()
        .filter(|(i, _)| i.kind == migration::reader::SectionKind::Full || i.idstr == "ram")
        .map(|(i, _)| {
            (
                format!("\"{} ({})\"", i.idstr, i.id),
                (i.idstr != "ram").then(|| format!("\"name\": \"{}\"", i.idstr)),
            )
        })
        .collect();
    ours.dedup();
    // `-m` (RAM contents) is left out: QEMU 7.2's script fails with it on
    // any stream with data pages under Python 3, QEMU's own included.
    for dump in ["state", "desc"] {
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(script).arg("-f").arg(file).args(["-d", dump]);
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run python3 (Debian package python3): {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "analyze-migration.py -d {dump} failed on {}:\n{}",
                file.display(),
                tail.join("\n")
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let missing: Vec<&String> = ours
            .iter()
            .filter_map(|(state, desc)| {
                if dump == "state" {
                    Some(state)
                } else {
                    desc.as_ref()
                }
            })
            .filter(|s| !text.contains(s.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "analyze-migration.py did not report sections {missing:?}"
            ));
        }
        println!(
            "xtask: analyze-migration.py -d {dump} read {} ({} bytes of JSON, all {} sections)",
            file.display(),
            text.len(),
            ours.len()
        );
    }
    Ok(())
}

/// `cargo xtask migrate --help`.
pub const USAGE: &str = "\
usage: cargo xtask migrate [OPTIONS] [KERNEL ARGS...] [-- KERNEL ARGS...]
       cargo xtask migrate inspect FILE
       cargo xtask migrate analyze FILE --script PATH/analyze-migration.py

Migrates a VM from one Tern to another through a file, as QEMU's
`migrate \"exec:cat > FILE\"` and `-incoming \"exec:cat FILE\"`: the source Tern
runs the guest with `migrate=disk`; when the guest asks, RAM is sent while it
runs (pre-copy), then the vCPU stops and the rest of RAM, the RAM disks, every
device, the VM and the vCPU go to a disk the emulator backs with a file, from
which xtask copies the stream. A second Tern boots with the stream as the VM's
module (`incoming`), loads it (`migrate.commit=` chooses the load mode) and runs
the guest on. Both halves print their stats; the last lines sum them up.
QEMU with KVM where the host has VMX, Bochs otherwise.

options:
  --save FILE             run the source only; the stream goes to FILE
  --load FILE             run the target only, from FILE
  --file FILE             both halves through FILE
                          (default: target/xtask/migrate/stream.mig)
  --emulator bochs|qemu   the emulator
  --guest 'ARGS'          the VM's command line (default: the migrate scenario,
                          with virtio I/O on the devices of a devices= argument)
  -h, --help              this text

Kernel arguments are Tern's, the same for both halves: e.g. devices=net:8x16,blk:16x4
migrate.commit=deferred|eager|forced-read migrate.precopy=on|off disk=64K.

`inspect FILE` prints a stream in QEMU's format (Tern's or QEMU's own): each
section's offset, type, id, idstr, instance, version and length, RAM pages by kind
per block, every device's fields walked with the stream's own description, and the
description. Bad input is an error with its byte offset.

`analyze FILE --script PATH` runs QEMU's own scripts/analyze-migration.py (from a
QEMU source tree; it is not shipped with Tern) on the stream (`-d state` and
`-d desc`), and checks that it reports every section Tern's reader finds.
";

/// Parses `cargo xtask migrate` arguments.
pub fn parse<I>(args: I) -> Result<crate::cli::Parsed<MigrateOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<std::ffi::OsString>,
{
    use crate::cli::{self, Parsed};
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "migrate";
    let mut p = cli::parser(args);
    let mut action = None;
    let mut emulator = None;
    let mut guest = None;
    let mut script = None;
    let mut kernel: Vec<String> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let set = |a: Action, action: &mut Option<Action>| -> Result<(), String> {
        if action.is_some() {
            return Err(cli::error(CMD, "one of --save, --load, --file only"));
        }
        *action = Some(a);
        Ok(())
    };
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("save") => set(
                Action::Save(p.value().map_err(|e| cli::error(CMD, e))?.into()),
                &mut action,
            )?,
            Long("load") => set(
                Action::Load(p.value().map_err(|e| cli::error(CMD, e))?.into()),
                &mut action,
            )?,
            Long("file") => set(
                Action::Both(Some(p.value().map_err(|e| cli::error(CMD, e))?.into())),
                &mut action,
            )?,
            Long("emulator") => {
                let v = cli::string(CMD, p.value())?;
                emulator = Some(match v.as_str() {
                    "bochs" => emu::EmulatorChoice::Bochs,
                    "qemu" => emu::EmulatorChoice::Qemu,
                    _ => {
                        return Err(cli::error(
                            CMD,
                            format!("--emulator takes bochs or qemu, not {v:?}"),
                        ))
                    }
                });
            }
            Long("guest") => guest = Some(cli::string(CMD, p.value())?),
            Long("script") => {
                script = Some(PathBuf::from(p.value().map_err(|e| cli::error(CMD, e))?))
            }
            Value(w) => words.push(cli::string(CMD, Ok(w))?),
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    if words.first().map(String::as_str) == Some("analyze") {
        return match (words.as_slice(), &action) {
            ([_, file], None) => Ok(Parsed::Run(MigrateOptions {
                action: Action::Analyze {
                    file: file.into(),
                    script,
                },
                emulator,
                guest: String::new(),
                kernel: String::new(),
            })),
            _ => Err(cli::error(CMD, "expected `analyze FILE --script PATH`")),
        };
    }
    if script.is_some() {
        return Err(cli::error(CMD, "--script goes with `analyze FILE`"));
    }
    if words.first().map(String::as_str) == Some("inspect") {
        return match (words.as_slice(), &action) {
            ([_, file], None) => Ok(Parsed::Run(MigrateOptions {
                action: Action::Inspect(file.into()),
                emulator,
                guest: String::new(),
                kernel: String::new(),
            })),
            _ => Err(cli::error(CMD, "expected `inspect FILE`")),
        };
    }
    for w in words {
        if w == "--" {
            continue;
        }
        if w.starts_with("migrate=") {
            return Err(cli::error(
                CMD,
                "migrate= is set by xtask (disk on the source, none on the target)",
            ));
        }
        kernel.push(w);
    }
    let kernel = kernel.join(" ");
    Ok(Parsed::Run(MigrateOptions {
        action: action.unwrap_or(Action::Both(None)),
        emulator,
        guest: guest.unwrap_or_else(|| default_guest(&kernel)),
        kernel,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_comes_off_the_disk_only_with_a_whole_header() {
        let dir = std::env::temp_dir().join(format!("tern-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        make_disk(&disk, 4096).unwrap();
        assert!(read_stream(&disk).unwrap_err().contains("no header"));
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[..8].copy_from_slice(DISK_MAGIC);
        bytes[8..16].copy_from_slice(&5u64.to_le_bytes());
        bytes[512..517].copy_from_slice(b"QEVM!");
        std::fs::write(&disk, &bytes).unwrap();
        assert_eq!(read_stream(&disk).unwrap(), b"QEVM!");
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&disk, &bytes).unwrap();
        assert!(read_stream(&disk)
            .unwrap_err()
            .contains("runs past the disk"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
