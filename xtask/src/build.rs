//! Building the bare-metal binaries.

use std::path::PathBuf;
use std::process::Command;

/// Paths of the built images.
pub struct Images {
    pub kernel: PathBuf,
    pub guest: PathBuf,
}

/// Builds `tern` and `tern-guest` (release) for `x86_64-unknown-none`.
pub fn build_all() -> Result<Images, String> {
    let root = crate::root();
    for pkg in ["tern-kernel", "tern-guest"] {
        // Each package is built on its own so the boot crate's headers are
        // not unified between them.
        let status = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "-p",
                pkg,
                "--target",
                "x86_64-unknown-none",
            ])
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
