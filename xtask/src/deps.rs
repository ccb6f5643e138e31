//! Making sure the emulators and image tools are installed.

use std::process::Command;

/// A Debian package and a file that shows it is installed.
pub struct Need {
    pub package: &'static str,
    pub file: &'static str,
}

pub const BOCHS: &[Need] = &[
    Need {
        package: "bochs",
        file: "/usr/bin/bochs",
    },
    Need {
        package: "bochsbios",
        file: "/usr/share/bochs/BIOS-bochs-latest",
    },
    Need {
        package: "vgabios",
        file: "/usr/share/vgabios/vgabios.bin",
    },
    Need {
        package: "bochs-term",
        file: "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so.0.0.0",
    },
];
pub const QEMU: &[Need] = &[Need {
    package: "qemu-system-x86",
    file: "/usr/bin/qemu-system-x86_64",
}];
/// What `bench-qemu` runs besides QEMU: `objcopy` (QEMU's multiboot
/// loader takes 32-bit ELF only) and `ip` (multi-queue taps).
pub const QEMU_BENCH: &[Need] = &[
    Need {
        package: "binutils",
        file: "/usr/bin/objcopy",
    },
    Need {
        package: "iproute2",
        file: "/usr/sbin/ip",
    },
];
pub const ISO: &[Need] = &[
    Need {
        package: "grub-pc-bin",
        file: "/usr/lib/grub/i386-pc/multiboot2.mod",
    },
    Need {
        package: "grub-common",
        file: "/usr/bin/grub-mkrescue",
    },
    Need {
        package: "xorriso",
        file: "/usr/bin/xorriso",
    },
    Need {
        package: "mtools",
        file: "/usr/bin/mformat",
    },
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Installs what is missing with apt-get when running as root; otherwise
/// fails with the exact command to run.
pub fn ensure(needs: &[&[Need]]) -> Result<(), String> {
    let missing: Vec<&str> = needs
        .iter()
        .flat_map(|n| n.iter())
        .filter(|n| !std::path::Path::new(n.file).exists())
        .map(|n| n.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() {
        return Err(format!("missing Debian packages; run: sudo {line}"));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let update = Command::new("apt-get").args(["update", "-qq"]).status();
    if !update.map(|s| s.success()).unwrap_or(false) {
        return Err("apt-get update failed".into());
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(format!("installing failed: {line}"));
    }
    Ok(())
}
