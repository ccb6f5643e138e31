//! Images and emulators: a GRUB ISO for Bochs and real machines, Bochs with
//! VMX, and QEMU (TCG for the boot path, KVM where the host has VMX).

use crate::build::{build_all, Images};
use crate::cli::{self, Parsed};
use crate::deps;
use std::ffi::OsString;
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
    run_bochs_disk(name, images, kernel_args, guests, timeout, echo, None)
}

/// Boots Tern in Bochs from a GRUB ISO, with `disk` (a raw image whose
/// size is a whole number of 16-head, 63-sector cylinders) as the
/// secondary ATA master: the channel `migrate=disk` writes its stream to.
pub fn run_bochs_disk(
    name: &str,
    images: &Images,
    kernel_args: &str,
    guests: &[GuestSpec],
    timeout: Duration,
    echo: bool,
    disk: Option<&Path>,
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
             {disk}\
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
            disk = match disk {
                Some(d) => format!(
                    "ata1: enabled=1, ioaddr1=0x170, ioaddr2=0x370, irq=15\n\
                     ata1-master: type=disk, path={}, mode=flat, cylinders={}, heads=16, spt=63\n",
                    d.display(),
                    fs::metadata(d)
                        .map_err(|e| format!("{}: {e}", d.display()))?
                        .len()
                        / CYLINDER
                ),
                None => String::new(),
            },
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

/// Bytes of one cylinder of a migration disk (16 heads, 63 sectors).
pub const CYLINDER: u64 = 16 * 63 * 512;

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
    run_qemu_disk(name, images, kernel_args, guests, kvm, timeout, echo, None)
}

/// [`run_qemu`] with `disk` as the secondary IDE master (the channel
/// `migrate=disk` writes its stream to).
#[allow(clippy::too_many_arguments)]
pub fn run_qemu_disk(
    name: &str,
    images: &Images,
    kernel_args: &str,
    guests: &[GuestSpec],
    kvm: bool,
    timeout: Duration,
    echo: bool,
    disk: Option<&Path>,
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
    if let Some(d) = disk {
        cmd.arg("-drive")
            .arg(format!("file={},format=raw,if=ide,index=2", d.display()));
    }
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

/// `cargo xtask run --help`.
pub const RUN_USAGE: &str = "\
usage: cargo xtask run [OPTIONS] [KERNEL ARGS...] [-- KERNEL ARGS...]

Boots Tern with the test guest (or any multiboot image) and shows its console.
QEMU with KVM when /dev/kvm exists and the host CPU has VMX, Bochs otherwise.

options:
  --emulator bochs|qemu    the emulator (qemu without VMX on the host: TCG, where
                           Tern only reports that VMX is missing)
  --guest 'ARGS'           the VM's command line
                           (default: name=demo scenario=hello expect_ram_kib=32768,
                           or scenario=virtio when a devices= argument is given)
  --guest-image FILE       run this multiboot (v1) ELF image instead of the test
                           guest; its file name becomes argv[0], and it gets no
                           test-guest arguments unless --guest is given
  --module FILE[=STRING]   a multiboot module of the VM, with its string (repeatable)
  -h, --help               this text

Kernel arguments are Tern's command line: ram=MiB lowmem=MiB budget=N
rom_writes=stop ept=rebuild mtree log=debug e9 testdev (README.md says what each
does); `mtree` is added unless given. Words after `--` are kernel arguments even
when they start with '-'.
";

/// `cargo xtask image --help`.
pub const IMAGE_USAGE: &str = "\
usage: cargo xtask image [OPTIONS] [KERNEL ARGS...] [-- KERNEL ARGS...]

Builds Tern and writes target/tern.iso, a GRUB rescue ISO (multiboot2) that boots
Tern with its command line and the VM as a boot module, for Bochs or a real machine.

options:
  --guest 'ARGS'           the VM's command line
                           (default: name=demo scenario=hello expect_ram_kib=32768)
  --guest-image FILE       a multiboot (v1) ELF image instead of the test guest
  --module FILE[=STRING]   a multiboot module of the VM, with its string (repeatable)
  -h, --help               this text

Kernel arguments as for `cargo xtask run` (`mtree` is added unless given).
";

/// The emulator `--emulator` asks for (QEMU's accelerator is chosen when
/// it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatorChoice {
    Bochs,
    Qemu,
}

/// The options of `run` and `image`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// `None`: QEMU with KVM where it can run VMX, else Bochs.
    pub emulator: Option<EmulatorChoice>,
    /// The VM's command line.
    pub guest: String,
    /// A multiboot image to run instead of Tern's test guest.
    pub guest_image: Option<PathBuf>,
    /// Multiboot modules of the VM: (file, string).
    pub modules: Vec<(PathBuf, String)>,
    /// Tern's command line.
    pub kernel: String,
}

impl RunOptions {
    /// Every file named on the command line exists.
    pub fn check_files(&self) -> Result<(), String> {
        if let Some(f) = &self.guest_image {
            if !f.is_file() {
                return Err(format!("--guest-image: {} is not a file", f.display()));
            }
        }
        for (f, _) in &self.modules {
            if !f.is_file() {
                return Err(format!("--module: {} is not a file", f.display()));
            }
        }
        Ok(())
    }
}

/// The VM (and its modules) `run` and `image` start.
fn guest_specs(a: &RunOptions, images: &Images) -> Vec<GuestSpec> {
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

/// Parses `cargo xtask run` arguments.
pub fn parse_run<I>(args: I) -> Result<Parsed<RunOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    parse_vm("run", RUN_USAGE, args)
}

/// Parses `cargo xtask image` arguments (those of `run` but `--emulator`).
pub fn parse_image<I>(args: I) -> Result<Parsed<RunOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    parse_vm("image", IMAGE_USAGE, args)
}

fn parse_vm<I>(cmd: &str, usage: &'static str, args: I) -> Result<Parsed<RunOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};
    let mut r = RunOptions {
        emulator: None,
        guest: "name=demo scenario=hello expect_ram_kib=32768".into(),
        guest_image: None,
        modules: Vec::new(),
        kernel: String::new(),
    };
    let mut guest_given = false;
    let mut words: Vec<String> = Vec::new();
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(cmd, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(usage)),
            Long("emulator") if cmd == "run" => {
                r.emulator = Some(match cli::string(cmd, p.value())?.as_str() {
                    "bochs" => EmulatorChoice::Bochs,
                    "qemu" => EmulatorChoice::Qemu,
                    other => {
                        return Err(cli::error(
                            cmd,
                            format!("--emulator takes bochs or qemu, not {other:?}"),
                        ))
                    }
                });
            }
            Long("guest") => {
                r.guest = cli::string(cmd, p.value())?;
                guest_given = true;
            }
            Long("guest-image") => {
                r.guest_image = Some(PathBuf::from(p.value().map_err(|e| cli::error(cmd, e))?));
            }
            Long("module") => {
                let m = cli::string(cmd, p.value())?;
                let (f, string) = m.split_once('=').unwrap_or((&m, ""));
                if f.is_empty() {
                    return Err(cli::error(cmd, "--module needs FILE[=STRING]"));
                }
                r.modules.push((PathBuf::from(f), string.to_string()));
            }
            Value(w) => words.push(cli::string(cmd, Ok(w))?),
            other => return Err(cli::error(cmd, other.unexpected())),
        }
    }
    // A foreign image gets no test-guest arguments unless given.
    if r.guest_image.is_some() && !guest_given {
        r.guest.clear();
    }
    // With virtio devices, the test guest drives them all by default.
    if let (false, None, Some(spec)) = (
        guest_given,
        &r.guest_image,
        words.iter().find_map(|w| w.strip_prefix("devices=")),
    ) {
        r.guest = format!("name=demo scenario=virtio expect={spec}");
    }
    // `run` shows the VM's memory map at the end unless told otherwise.
    if !words.iter().any(|w| w.starts_with("mtree")) {
        words.push("mtree".into());
    }
    r.kernel = words.join(" ");
    Ok(Parsed::Run(r))
}

/// `cargo xtask image`.
pub fn image_cmd(a: &RunOptions) -> Result<(), String> {
    a.check_files()?;
    let images = build_all()?;
    let out = crate::root().join("target/tern.iso");
    let guests = guest_specs(a, &images);
    make_iso(&images, &a.kernel, &guests, &out)?;
    println!("xtask: wrote {}", out.display());
    Ok(())
}

/// `cargo xtask run`.
/// The emulator for a choice: QEMU with KVM where the host has VMX (TCG
/// when QEMU is asked for without it), Bochs otherwise.
pub fn pick_emulator(choice: Option<EmulatorChoice>) -> Emulator {
    match choice {
        Some(EmulatorChoice::Bochs) => Emulator::Bochs,
        Some(EmulatorChoice::Qemu) if host_has_vmx() => Emulator::QemuKvm,
        Some(EmulatorChoice::Qemu) => Emulator::QemuTcg,
        None if host_has_vmx() => Emulator::QemuKvm,
        None => Emulator::Bochs,
    }
}

pub fn run_cmd(a: &RunOptions) -> Result<(), String> {
    a.check_files()?;
    let emulator = pick_emulator(a.emulator);
    let images = build_all()?;
    let guests = guest_specs(a, &images);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    const DEFAULT_GUEST: &str = "name=demo scenario=hello expect_ram_kib=32768";

    #[test]
    fn run_and_image_help() {
        for a in [&["-h"][..], &["--help"], &["ram=64", "--help"]] {
            assert_eq!(parse_run(args(a)), Ok(Parsed::Help(RUN_USAGE)));
            assert_eq!(parse_image(args(a)), Ok(Parsed::Help(IMAGE_USAGE)));
        }
        for o in ["--emulator", "--guest", "--guest-image", "--module"] {
            assert!(RUN_USAGE.contains(o), "{o}");
        }
        assert!(!IMAGE_USAGE.contains("--emulator"));
    }

    #[test]
    fn run_defaults_add_mtree() {
        let r = ok(parse_run(args(&[])));
        assert_eq!(
            r,
            RunOptions {
                emulator: None,
                guest: DEFAULT_GUEST.into(),
                guest_image: None,
                modules: vec![],
                kernel: "mtree".into(),
            }
        );
        // Given (in any form), it is not added again.
        assert_eq!(ok(parse_run(args(&["mtree=off"]))).kernel, "mtree=off");
    }

    #[test]
    fn run_each_option() {
        let r = ok(parse_run(args(&[
            "--emulator",
            "bochs",
            "--guest",
            "name=x scenario=cpuid",
            "--module",
            "env.txt=A=1 B",
            "--module=plain.bin",
            "ram=64",
        ])));
        assert_eq!(r.emulator, Some(EmulatorChoice::Bochs));
        assert_eq!(r.guest, "name=x scenario=cpuid");
        assert_eq!(
            r.modules,
            [
                (PathBuf::from("env.txt"), "A=1 B".to_string()),
                (PathBuf::from("plain.bin"), String::new())
            ]
        );
        assert_eq!(r.kernel, "ram=64 mtree");
        let q = ok(parse_run(args(&["--emulator=qemu"])));
        assert_eq!(q.emulator, Some(EmulatorChoice::Qemu));
        // A foreign image loses the test guest's default arguments...
        let g = ok(parse_run(args(&["--guest-image", "k.elf"])));
        assert_eq!(
            (g.guest_image, g.guest.as_str()),
            (Some(PathBuf::from("k.elf")), "")
        );
        // ...but keeps given ones, in either order.
        let g = ok(parse_run(args(&[
            "--guest",
            "a b",
            "--guest-image",
            "k.elf",
        ])));
        assert_eq!(g.guest, "a b");
        let i = ok(parse_image(args(&["--guest", "scenario=ept", "lowmem=32"])));
        assert_eq!(
            (i.guest.as_str(), i.kernel.as_str()),
            ("scenario=ept", "lowmem=32 mtree")
        );
    }

    #[test]
    fn run_kernel_args_pass_through() {
        let r = ok(parse_run(args(&[
            "ram=64",
            "--guest",
            "g",
            "log=debug",
            "--",
            "-x",
            "--guest",
            "e9",
        ])));
        assert_eq!(r.guest, "g");
        assert_eq!(r.kernel, "ram=64 log=debug -x --guest e9 mtree");
        // A value that looks like an option is still the option's value.
        assert_eq!(ok(parse_run(args(&["--guest", "-v"]))).guest, "-v");
    }

    #[test]
    fn run_with_devices_drives_them_with_the_virtio_guest() {
        let r = ok(parse_run(args(&["devices=net:8x16,blk:16x4"])));
        assert_eq!(
            r.guest,
            "name=demo scenario=virtio expect=net:8x16,blk:16x4"
        );
        assert_eq!(r.kernel, "devices=net:8x16,blk:16x4 mtree");
        let r = ok(parse_run(args(&["--guest", "g", "devices=blk:1x1"])));
        assert_eq!(r.guest, "g");
    }

    #[test]
    fn run_unknown_and_bad_options_are_errors() {
        let e = err(parse_run(args(&["--emulater", "qemu"])));
        assert_eq!(
            e,
            "run: invalid option '--emulater' (see `cargo xtask run --help`)"
        );
        assert!(err(parse_run(args(&["-x"]))).contains("invalid option '-x'"));
        let e = err(parse_run(args(&["--emulator", "vbox"])));
        assert!(
            e.contains("--emulator takes bochs or qemu, not \"vbox\""),
            "{e}"
        );
        assert!(err(parse_image(args(&["--emulator", "qemu"])))
            .starts_with("image: invalid option '--emulator'"));
        assert!(err(parse_run(args(&["--module", "=x"]))).contains("FILE[=STRING]"));
        let e = err(parse_run(args(&["--guest-image=k.elf=x", "--emulator"])));
        assert!(
            e.starts_with("run: missing argument for option '--emulator'"),
            "{e}"
        );
        assert!(err(parse_run(args(&["--bare-metal-only"]))).contains("'--bare-metal-only'"));
    }

    #[test]
    fn run_missing_values_are_errors() {
        for o in ["--emulator", "--guest", "--guest-image", "--module"] {
            let e = err(parse_run(args(&["ram=64", o])));
            assert_eq!(
                e,
                format!("run: missing argument for option '{o}' (see `cargo xtask run --help`)")
            );
        }
    }

    #[test]
    fn run_named_files_must_exist() {
        let dir = std::env::temp_dir().join(format!("xtask-emu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k.elf");
        std::fs::write(&f, b"x").unwrap();
        let mut r = ok(parse_run(vec![
            OsString::from("--guest-image"),
            f.clone().into_os_string(),
        ]));
        assert_eq!(r.check_files(), Ok(()));
        r.modules.push((dir.join("missing"), String::new()));
        assert!(r.check_files().unwrap_err().starts_with("--module: "));
        r.guest_image = Some(dir.join("gone.elf"));
        assert!(r.check_files().unwrap_err().starts_with("--guest-image: "));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
