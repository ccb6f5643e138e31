//! Images and emulators: a GRUB ISO for Bochs and real machines, Bochs with
//! VMX, and QEMU (TCG for the boot path, KVM where the host has VMX).

use crate::build::{build_all, Images};
use crate::deps;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A guest module: image path and its command line.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub image: PathBuf,
    pub cmdline: String,
}

/// Which emulator to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    Bochs,
    QemuTcg,
    QemuKvm,
}

/// What an emulator run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// Tern's console (COM1).
    pub serial: String,
    /// Tern's exit status as it printed it, if it got that far.
    pub tern_status: Option<u8>,
    /// Whether the hard timeout ended the run.
    pub timed_out: bool,
    pub wall: Duration,
}

/// Writes a GRUB rescue ISO with Tern, its command line and the guests.
pub fn make_iso(
    images: &Images,
    kernel_args: &str,
    guests: &[GuestSpec],
    out: &Path,
) -> Result<(), String> {
    deps::ensure(&[deps::ISO])?;
    let dir = out.with_extension("d");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("boot/grub")).map_err(|e| e.to_string())?;
    fs::copy(&images.kernel, dir.join("boot/tern")).map_err(|e| format!("copy kernel: {e}"))?;
    let mut modules = String::new();
    for (i, g) in guests.iter().enumerate() {
        let name = format!("guest{i}.elf");
        fs::copy(&g.image, dir.join("boot").join(&name)).map_err(|e| format!("copy guest: {e}"))?;
        modules += &format!("  module2 /boot/{name} {}\n", g.cmdline);
    }
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"Tern\" {{\n  multiboot2 /boot/tern {kernel_args}\n{modules}  boot\n}}\n"
    );
    fs::write(dir.join("boot/grub/grub.cfg"), cfg).map_err(|e| e.to_string())?;
    let o = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(out)
        .arg(&dir)
        .output()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

fn work_dir(name: &str) -> Result<PathBuf, String> {
    let d = crate::root().join("target/xtask").join(name);
    fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

/// Parses `tern: exit status N` from the console.
pub fn parse_status(serial: &str) -> Option<u8> {
    serial.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("tern: exit status ")?
            .trim()
            .parse()
            .ok()
    })
}

/// What `supervise` saw.
struct Supervised {
    text: String,
    timed_out: bool,
    wall: Duration,
    /// The emulator's own exit code, if it ended by itself.
    exit_code: Option<i32>,
}

/// Runs a child with a hard timeout, streaming `log` to stdout if `echo`.
fn supervise(
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
    echo: bool,
    done: impl Fn(&str) -> bool,
) -> Result<Supervised, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut shown = 0;
    let mut timed_out = false;
    let mut exit_code = None;
    let mut finished_at: Option<Instant> = None;
    loop {
        let text = read_lossy(log);
        if echo && text.len() > shown {
            print!("{}", &text[shown..]);
            shown = text.len();
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            exit_code = status.code();
            break;
        }
        // Once Tern said its last word, give the emulator a moment to exit
        // by itself, then end it.
        if done(&text) {
            let t = *finished_at.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = read_lossy(log);
    if echo && text.len() > shown {
        print!("{}", &text[shown..]);
    }
    if echo && !text.is_empty() && !text.ends_with('\n') {
        println!();
    }
    Ok(Supervised {
        text,
        timed_out,
        wall: start.elapsed(),
        exit_code,
    })
}

fn read_lossy(p: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = fs::File::open(p) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).replace('\r', "")
}

/// Boots Tern in Bochs from a GRUB ISO.
pub fn run_bochs(
    name: &str,
    images: &Images,
    kernel_args: &str,
    guests: &[GuestSpec],
    timeout: Duration,
    echo: bool,
) -> Result<RunOutput, String> {
    deps::ensure(&[deps::BOCHS])?;
    let dir = work_dir(name)?;
    let iso = dir.join("tern.iso");
    // Bochs prints port 0xE9 too (`e9`).
    make_iso(
        images,
        &format!("exit=bochs e9 {kernel_args}"),
        guests,
        &iso,
    )?;
    let serial = dir.join("serial.log");
    let _ = fs::remove_file(&serial);
    let rc = dir.join("bochs.rc");
    fs::write(&rc, "continue\nquit\n").map_err(|e| e.to_string())?;
    let cfg = dir.join("bochsrc");
    fs::write(
        &cfg,
        format!(
            "megs: 512\n\
             cpu: model=corei7_skylake_x, count=1, ips=50000000, reset_on_triple_fault=0\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             com1: enabled=1, mode=file, dev={serial}\n\
             port_e9_hack: enabled=1\n\
             display_library: term\n\
             clock: sync=none, time0=946681200\n\
             magic_break: enabled=1\n\
             panic: action=fatal\n\
             error: action=report\n\
             log: {log}\n\
             speaker: enabled=0\n\
             sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n",
            iso = iso.display(),
            serial = serial.display(),
            log = dir.join("bochs.log").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut cmd = Command::new("bochs");
    cmd.args(["-q", "-f"])
        .arg(&cfg)
        .arg("-rc")
        .arg(&rc)
        .env("TERM", "dumb")
        .current_dir(&dir);
    let sv = supervise(cmd, &serial, timeout, echo, |t| parse_status(t).is_some())?;
    Ok(RunOutput {
        tern_status: parse_status(&sv.text),
        serial: sv.text,
        timed_out: sv.timed_out,
        wall: sv.wall,
    })
}

/// Boots Tern in QEMU through PVH (`-kernel`), with the guests as modules.
pub fn run_qemu(
    name: &str,
    images: &Images,
    kernel_args: &str,
    guests: &[GuestSpec],
    kvm: bool,
    timeout: Duration,
    echo: bool,
) -> Result<RunOutput, String> {
    deps::ensure(&[deps::QEMU])?;
    let dir = work_dir(name)?;
    let serial = dir.join("serial.log");
    let _ = fs::remove_file(&serial);
    // QEMU's PVH loader takes one module (the initrd); its command line is
    // Tern's words after `--`.
    let guest = guests.first();
    let mut append = format!("exit=qemu {kernel_args}");
    if let Some(g) = guest {
        append += &format!(" -- {}", g.cmdline);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.arg("-kernel")
        .arg(&images.kernel)
        .args(["-append", &append]);
    if let Some(g) = guest {
        cmd.arg("-initrd").arg(&g.image);
    }
    cmd.args([
        "-display",
        "none",
        "-no-reboot",
        "-m",
        "512",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()));
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "max"]);
    }
    let sv = supervise(cmd, &serial, timeout, echo, |t| parse_status(t).is_some())?;
    let tern_status = parse_status(&sv.text);
    // isa-debug-exit makes QEMU exit with (status << 1) | 1: the console
    // and the process must agree.
    if let (Some(t), Some(code)) = (tern_status, sv.exit_code) {
        if code != (i32::from(t) << 1) | 1 {
            return Err(format!(
                "QEMU exited with {code}, but Tern printed status {t}"
            ));
        }
    }
    Ok(RunOutput {
        tern_status,
        serial: sv.text,
        timed_out: sv.timed_out,
        wall: sv.wall,
    })
}

fn host_has_vmx() -> bool {
    Path::new("/dev/kvm").exists()
        && fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.split_whitespace().any(|w| w == "vmx"))
            .unwrap_or(false)
}

struct RunArgs {
    emulator: Option<Emulator>,
    guest: String,
    /// A multiboot image to run instead of Tern's test guest.
    guest_image: Option<PathBuf>,
    /// Multiboot modules of the VM: (file, string).
    modules: Vec<(PathBuf, String)>,
    kernel: String,
}

/// The VM (and its modules) `run` and `image` start.
fn guest_specs(a: &RunArgs, images: &Images) -> Vec<GuestSpec> {
    let image = a
        .guest_image
        .clone()
        .unwrap_or_else(|| images.guest.clone());
    let mut cmdline = a.guest.clone();
    // A foreign image gets its file name as argv[0], as QEMU's -kernel.
    if a.guest_image.is_some() {
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        cmdline = format!("{name} {cmdline}").trim().to_string();
    }
    let vm_name = image
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm0".into());
    let vm_name = crate::emu::option(&cmdline, "name").unwrap_or(vm_name);
    let mut specs = vec![GuestSpec { image, cmdline }];
    for (file, string) in &a.modules {
        specs.push(GuestSpec {
            image: file.clone(),
            cmdline: format!("module-for={vm_name} {string}").trim().to_string(),
        });
    }
    specs
}

/// The value of `key=` in a command line.
pub fn option(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(String::from)
}

fn parse_run_args(args: &[String]) -> Result<RunArgs, String> {
    let mut r = RunArgs {
        emulator: None,
        guest: "name=demo scenario=hello expect_ram_kib=32768".into(),
        guest_image: None,
        modules: Vec::new(),
        kernel: String::new(),
    };
    let mut guest_given = false;
    let mut it = args.iter();
    let mut words = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--emulator" => {
                r.emulator = Some(match it.next().map(String::as_str) {
                    Some("bochs") => Emulator::Bochs,
                    Some("qemu") => {
                        if host_has_vmx() {
                            Emulator::QemuKvm
                        } else {
                            Emulator::QemuTcg
                        }
                    }
                    other => return Err(format!("--emulator bochs|qemu, not {other:?}")),
                })
            }
            "--guest" => {
                r.guest = it.next().ok_or("--guest needs its command line")?.clone();
                guest_given = true;
            }
            "--guest-image" => {
                let f = PathBuf::from(it.next().ok_or("--guest-image needs a file")?);
                if !f.is_file() {
                    return Err(format!("--guest-image: {} is not a file", f.display()));
                }
                r.guest_image = Some(f);
            }
            "--module" => {
                let m = it.next().ok_or("--module needs FILE[=STRING]")?;
                let (f, string) = m.split_once('=').unwrap_or((m, ""));
                if !Path::new(f).is_file() {
                    return Err(format!("--module: {f} is not a file"));
                }
                r.modules.push((PathBuf::from(f), string.to_string()));
            }
            w if w.starts_with("--") => {
                return Err(format!(
                    "unknown option {w}; options: --emulator bochs|qemu, --guest 'ARGS', --guest-image FILE, --module FILE[=STRING]"
                ))
            }
            w => words.push(w.to_string()),
        }
    }
    // A foreign image gets no test-guest arguments unless given.
    if r.guest_image.is_some() && !guest_given {
        r.guest.clear();
    }
    // `run` shows the VM's memory map at the end unless told otherwise.
    if !words.iter().any(|w| w.starts_with("mtree")) {
        words.push("mtree".into());
    }
    r.kernel = words.join(" ");
    Ok(r)
}

/// `cargo xtask image`.
pub fn image_cmd(args: &[String]) -> Result<(), String> {
    let a = parse_run_args(args)?;
    let images = build_all()?;
    let out = crate::root().join("target/tern.iso");
    let guests = guest_specs(&a, &images);
    make_iso(&images, &a.kernel, &guests, &out)?;
    println!("xtask: wrote {}", out.display());
    Ok(())
}

/// `cargo xtask run`.
pub fn run_cmd(args: &[String]) -> Result<(), String> {
    let a = parse_run_args(args)?;
    let emulator = a.emulator.unwrap_or(if host_has_vmx() {
        Emulator::QemuKvm
    } else {
        Emulator::Bochs
    });
    let images = build_all()?;
    let guests = guest_specs(&a, &images);
    println!("xtask: running Tern under {emulator:?}");
    let timeout = Duration::from_secs(600);
    let out = match emulator {
        Emulator::Bochs => run_bochs("run", &images, &a.kernel, &guests, timeout, true)?,
        Emulator::QemuTcg => run_qemu("run", &images, &a.kernel, &guests, false, timeout, true)?,
        Emulator::QemuKvm => run_qemu("run", &images, &a.kernel, &guests, true, timeout, true)?,
    };
    match (out.timed_out, out.tern_status) {
        (true, _) => Err(format!("Tern did not finish within {timeout:?}")),
        (false, Some(0)) => {
            println!(
                "xtask: Tern exited with status 0 after {:.1} s",
                out.wall.as_secs_f64()
            );
            Ok(())
        }
        (false, Some(s)) => Err(format!("Tern exited with status {s}")),
        (false, None) => Err("Tern ended without printing its exit status".into()),
    }
}
