//! `cargo xtask`: build, image, run, test and bench Tern.
//!
//! - `build`: the hypervisor and the test guest for `x86_64-unknown-none`.
//! - `image [--guest ARGS] [KERNEL ARGS]`: a GRUB rescue ISO (multiboot2 entry).
//! - `run [--emulator bochs|qemu] [--guest ARGS] [--guest-image FILE]
//!   [--module FILE[=STRING]] [KERNEL ARGS]`: boots Tern with the test guest
//!   (or any multiboot image, with multiboot modules) and shows its console.
//!   QEMU with KVM when `/dev/kvm` exists and the host CPU has VMX, Bochs
//!   otherwise.
//! - `run-suite DIR`: every test kernel of a directory (kvm-unit-tests'
//!   `x86/` with its `unittests.cfg`) as a Tern guest in Bochs, one line
//!   each and a summary table.
//! - `test`: host unit tests, then every bare-metal scenario under Bochs
//!   (VMX) and QEMU TCG (boot path, no-VMX report).
//! - `bench`: the criterion benchmarks (arguments go to criterion).
//! - `mtree --flat FILE`: Tern's flat views of an `info mtree` tree dump.

mod build;
mod deps;
mod emu;
mod mtree;
mod scenarios;
mod suite;

use std::path::PathBuf;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// `cargo xtask bench [CRITERION ARGS]`: the criterion benchmarks of
/// hv-core (memory API render/commit/transactions, EPT incremental versus
/// rebuild), in one run so that their ratios compare like with like.
fn bench(args: &[String]) -> Result<(), String> {
    let ok = std::process::Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["bench", "-p", "hv-core", "--benches", "--"])
        .args(args)
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?
        .success();
    if ok {
        Ok(())
    } else {
        Err("benchmarks failed".into())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let result = match args.first().map(String::as_str) {
        Some("build") => build::build_all().map(|_| ()),
        Some("image") => emu::image_cmd(rest),
        Some("run") => emu::run_cmd(rest),
        Some("test") => scenarios::test_cmd(rest),
        Some("mtree") => mtree::main(rest),
        Some("bench") => bench(rest),
        Some("run-suite") => suite::run_suite(rest),
        _ => Err(
            "usage: cargo xtask <build|image|run|run-suite|test|bench|mtree> [args]".to_string(),
        ),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}
