//! Scenario `migrate`: the guest keeps working while Tern migrates it, as
//! QEMU's migration test does. It asks to be migrated (hypercall MIGRATE)
//! and increments the first byte of every page of a range, round after
//! round, while Tern sends RAM; after every round every page must hold the
//! round's value, so a write the dirty log lost shows at once. When the
//! generation hypercall says it moved, it checks the pages again, that
//! its TSC did not go back, and goes on with more rounds. With `expect=` it also sets up its virtio devices and
//! does I/O on every queue before and after the migration.
//!
//! Options: `pages=N` (default 2048: 8 MiB from 16 MiB), `expect=` as the
//! virtio scenario, `migrations=N` (default 1).

use crate::hw::{rd8, wr8};
use crate::io::vmcall;
use crate::mmio::{Load, Store};
use crate::virtio::say;

use boot::BootInfo;

type R = Result<(), &'static str>;

const BASE: u64 = 16 << 20;
/// Where the test device's RAM window shows RAM offset 0.
const WINDOW: u64 = 0xC000_0000;
/// A word of RAM checked through the window.
const MARK_AT: u64 = 0x3000;
const MARK: u64 = 0x5445_524E_5749_4E00;

/// RAM at `MARK_AT` reads `want` through the window.
fn check_window(want: u64) -> R {
    let got = crate::mmio::load(WINDOW + MARK_AT, Load::Plain64, 0);
    if got != want {
        say!("guest: window read {got:#x}, RAM holds {want:#x}");
        return Err("the test device's RAM window does not show RAM");
    }
    Ok(())
}
const MIGRATE: u64 = 4;
const GENERATION: u64 = 5;

/// One round over pages `[from, to)`.
fn touch(from: u64, to: u64) {
    for p in from..to {
        let a = BASE + p * 4096;
        wr8(a, rd8(a).wrapping_add(1));
    }
}

/// Pages `[0, k)` must hold `v + 1` and `[k, n)` must hold `v`: the
/// pattern a round stopped at page `k` leaves.
fn check(n: u64, k: u64, v: u8) -> R {
    for p in 0..n {
        let got = rd8(BASE + p * 4096);
        let want = if p < k { v.wrapping_add(1) } else { v };
        if got != want {
            say!("guest: page {p}: {got}, expected {want} (round stopped at page {k})");
            return Err("a page lost a write across the migration");
        }
    }
    Ok(())
}

pub fn scenario(info: &BootInfo) -> R {
    let n: u64 = info
        .option("pages")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let migrations: u32 = info
        .option("migrations")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if n == 0
        || BASE + n * 4096
            > info
                .memory
                .iter()
                .map(|r| r.start + r.len)
                .max()
                .unwrap_or(0)
    {
        return Err("pages= does not fit in RAM above 16 MiB");
    }
    let mut virtio = match info.option("expect") {
        Some(e) => {
            let expect = crate::virtio::parse_expect(e)?;
            let drv = crate::virtio::Virtio::take(crate::virtio::Pages::new(info)?)?;
            crate::virtio::setup(drv, info, expect, false)?;
            crate::virtio_blk::run(drv)?;
            crate::virtio_net::run(drv)?;
            Some(drv)
        }
        None => None,
    };
    crate::hw::fill(BASE, n * 4096, 0);
    // The test device's RAM window (an alias of RAM at 0xC0000000, in the
    // device's migrated state): the target's load maps it, so its one
    // commit updates EPT once.
    crate::mmio::store(crate::TEST_BASE + 8, Store::Reg64(crate::TEST_BASE | 1));
    crate::mmio::store(MARK_AT, Store::Reg64(MARK));
    check_window(MARK)?;
    let mut v = 0u8;
    for m in 0..migrations {
        let before = crate::idt::rdtsc();
        let r = vmcall(MIGRATE, 0);
        if r != 0 {
            say!("guest: MIGRATE returned {r}");
            return Err("Tern did not start a migration");
        }
        // Rounds go on while Tern sends RAM; each ends with every page
        // checked, so a write lost in the move is seen at once.
        let mut rounds = 0u32;
        while vmcall(GENERATION, 0) == u64::from(m) {
            touch(0, n);
            v = v.wrapping_add(1);
            check(n, 0, v)?;
            rounds += 1;
            // Device I/O while RAM is sent: the devices' writes into guest
            // memory (used rings, read buffers) must reach the target too.
            if rounds.is_multiple_of(8) {
                if let Some(drv) = virtio.as_deref_mut() {
                    crate::virtio_blk::run(drv)?;
                }
            }
            if rounds > 100_000 {
                return Err("the migration never completed");
            }
        }
        let after = crate::idt::rdtsc();
        say!(
            "guest: migrated ({} of {migrations}) after {rounds} rounds; checking {n} pages",
            m + 1
        );
        if after < before {
            return Err("the TSC went back across the migration");
        }
        check(n, 0, v)?;
        check_window(MARK.wrapping_add(u64::from(m)))?;
        crate::mmio::store(
            WINDOW + MARK_AT,
            Store::Reg64(MARK.wrapping_add(u64::from(m) + 1)),
        );
        if crate::mmio::load(MARK_AT, Load::Plain64, 0) != MARK.wrapping_add(u64::from(m) + 1) {
            return Err("a write through the RAM window did not reach RAM after the migration");
        }
        say!(
            "guest: the test device's RAM window is mapped after migration {}",
            m + 1
        );
        touch(0, n / 2);
        check(n, n / 2, v)?;
        touch(n / 2, n);
        v = v.wrapping_add(1);
        check(n, 0, v)?;
        if let Some(drv) = virtio.as_deref_mut() {
            crate::virtio_blk::verify(drv)?;
            say!(
                "guest: every disk still holds what was written before migration {}",
                m + 1
            );
            crate::virtio_blk::run(drv)?;
            crate::virtio_net::run(drv)?;
            crate::virtio::check_all_up(drv)?;
            say!("guest: virtio I/O on every queue after migration {}", m + 1);
        }
    }
    for _ in 0..2 {
        touch(0, n);
        v = v.wrapping_add(1);
    }
    check(n, 0, v)?;
    say!("guest: {n} pages follow the pattern after {migrations} migration(s)");
    Ok(())
}
