//! Building the bare-metal binaries.

use std::path::PathBuf;
use std::process::Command;

/// Paths of the built images.
pub struct Images {
    pub kernel: PathBuf,
    pub guest: PathBuf,
}

/// The bare-metal target, as pinned in `rust-toolchain.toml`.
pub const TARGET: &str = "x86_64-unknown-none";

/// Whether the active toolchain's sysroot holds the standard library of
/// `TARGET` (rustup does not add it when automatic installs are off).
fn target_installed(root: &std::path::Path) -> Result<bool, String> {
    let out = Command::new("rustc")
        .current_dir(root)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir())
}

/// Makes sure the pinned toolchain has `TARGET`: adds it with rustup, or
/// says exactly what to run when that is impossible.
pub fn ensure_target(root: &std::path::Path) -> Result<(), String> {
    if target_installed(root)? {
        return Ok(());
    }
    let hint = format!("rustup target add {TARGET} (in {})", root.display());
    eprintln!("xtask: adding the {TARGET} target to the pinned toolchain");
    let status = Command::new("rustup")
        .current_dir(root)
        .args(["target", "add", TARGET])
        .status()
        .map_err(|e| format!("the {TARGET} target is missing and rustup cannot be run ({e}); install rustup, then run: {hint}"))?;
    if !status.success() || !target_installed(root)? {
        return Err(format!("the {TARGET} target is missing; run: {hint}"));
    }
    Ok(())
}

/// Builds `tern` and `tern-guest` (release) for `x86_64-unknown-none`.
pub fn build_all() -> Result<Images, String> {
    let root = crate::root();
    ensure_target(&root)?;
    for pkg in ["tern-kernel", "tern-guest"] {
        // Each package is built on its own so the boot crate's headers are
        // not unified between them.
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--release", "-p", pkg, "--target", TARGET])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_NONE_RUSTFLAGS",
                "-C relocation-model=static",
            )
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building {pkg} failed"));
        }
    }
    let dir = root.join("target/x86_64-unknown-none/release");
    Ok(Images {
        kernel: dir.join("tern"),
        guest: dir.join("tern-guest"),
    })
}
