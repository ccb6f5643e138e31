//! The virtio-blk test of scenario `virtio`: for every device and every
//! queue, two sectors at `8 * q` written with a pattern derived from
//! (device, queue, sector, byte), read back through the same queue and
//! again through the next queue, compared byte for byte; GET_ID and FLUSH
//! once per device. Every other request goes through an indirect table.
//! Every completion must move the used index and raise the device's
//! vector; at the end the interrupts must equal the completions.

use crate::hw;
use crate::virtio::{
    bail, say, BlkReq, Kind, Virtio, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT, R,
};

/// Sectors written per queue, and the stride between the queues' regions.
pub const SECTORS: u32 = 2;
pub const STRIDE: u64 = 8;
/// Where data goes in a queue's data page.
const DATA_OFF: u64 = 0x400;
const ID_OFF: u64 = 0x100;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// The byte at offset `j` of `sector`, as written by `salt` (device and
/// queue, or a hostile case).
pub fn pattern(salt: u64, sector: u64, j: u64) -> u8 {
    (mix(salt << 40 ^ sector << 12 ^ j) >> 24) as u8
}

fn fnv(addr: u64, len: u64) -> u64 {
    (0..len).fold(0xCBF2_9CE4_8422_2325, |h, i| {
        (h ^ u64::from(hw::rd8(addr + i))).wrapping_mul(0x100_0000_01B3)
    })
}

/// Writes `SECTORS` sectors at `sector` through queue `q` with the
/// pattern of `salt`.
pub fn write(drv: &mut Virtio, d: usize, q: u16, sector: u64, salt: u64) -> R {
    let buf = drv.vq_data(d, q, 1)? + DATA_OFF;
    let len = SECTORS * 512;
    for j in 0..u64::from(len) {
        hw::wr8(buf + j, pattern(salt, sector + j / 512, j % 512));
    }
    let ind = drv.devs[d].requests % 2 == 1;
    let st = drv.blk_request(
        d,
        q,
        BlkReq {
            ty: BLK_T_OUT,
            sector,
            buf,
            len,
        },
        ind,
    )?;
    if st != 0 {
        bail!(
            "write failed",
            "{} queue {q} sector {sector}: status {st}",
            drv.devs[d].name()
        );
    }
    drv.devs[d].writes += 1;
    Ok(())
}

/// Reads `SECTORS` sectors at `sector` through queue `q` into a poisoned
/// buffer and compares them with the pattern of `salt`.
pub fn read_check(drv: &mut Virtio, d: usize, q: u16, sector: u64, salt: u64) -> R {
    let buf = drv.vq_data(d, q, 1)? + DATA_OFF;
    let len = SECTORS * 512;
    hw::fill(buf, len.into(), 0xEE);
    let ind = drv.devs[d].requests % 2 == 1;
    let st = drv.blk_request(
        d,
        q,
        BlkReq {
            ty: BLK_T_IN,
            sector,
            buf,
            len,
        },
        ind,
    )?;
    let name = drv.devs[d].name();
    if st != 0 {
        bail!(
            "read failed",
            "{name} queue {q} sector {sector}: status {st}"
        );
    }
    drv.devs[d].reads += 1;
    let want = (0..u64::from(len)).fold(0xCBF2_9CE4_8422_2325u64, |h, j| {
        (h ^ u64::from(pattern(salt, sector + j / 512, j % 512))).wrapping_mul(0x100_0000_01B3)
    });
    let got = fnv(buf, len.into());
    if got != want {
        let bad = (0..u64::from(len))
            .find(|&j| hw::rd8(buf + j) != pattern(salt, sector + j / 512, j % 512))
            .unwrap_or(0);
        bail!(
            "data read back differs",
            "{name} queue {q} sector {sector}: checksum {got:#x}, want {want:#x}; first difference at byte {bad}: {:#04x}, want {:#04x}",
            hw::rd8(buf + bad),
            pattern(salt, sector + bad / 512, bad % 512)
        );
    }
    Ok(())
}

/// The test of one device.
fn device(drv: &mut Virtio, d: usize) -> R {
    let dev = drv.devs[d];
    let name = dev.name();
    let nq = dev.nq;
    let need = u64::from(nq - 1) * STRIDE + u64::from(SECTORS);
    if dev.capacity < need {
        bail!(
            "disk too small",
            "{name}: {} sectors, the test needs {need}",
            dev.capacity
        );
    }
    let salt = |q: u16| (dev.nth as u64) << 16 | u64::from(q);
    for q in 0..nq {
        let sector = u64::from(q) * STRIDE;
        write(drv, d, q, sector, salt(q))?;
        read_check(drv, d, q, sector, salt(q))?;
    }
    // Each region again through the next queue: the queues share one disk.
    for q in 0..nq {
        let via = (q + 1) % nq;
        read_check(drv, d, via, u64::from(q) * STRIDE, salt(q))?;
    }
    // GET_ID: 20 bytes, device-writable.
    let id = drv.vq_data(d, 0, 1)? + ID_OFF;
    hw::fill(id, 20, 0);
    let ind = drv.devs[d].requests % 2 == 1;
    let st = drv.blk_request(
        d,
        0,
        BlkReq {
            ty: BLK_T_GET_ID,
            sector: 0,
            buf: id,
            len: 20,
        },
        ind,
    )?;
    if st != 0 {
        bail!("GET_ID failed", "{name}: status {st}");
    }
    let mut s = [0u8; 20];
    for (i, b) in s.iter_mut().enumerate() {
        *b = hw::rd8(id + i as u64);
    }
    let n = s.iter().position(|&b| b == 0).unwrap_or(20);
    let text = core::str::from_utf8(&s[..n]).unwrap_or("(not UTF-8)");
    let ind = drv.devs[d].requests % 2 == 1;
    let st = drv.blk_request(
        d,
        nq - 1,
        BlkReq {
            ty: BLK_T_FLUSH,
            sector: 0,
            buf: 0,
            len: 0,
        },
        ind,
    )?;
    if st != 0 {
        bail!("FLUSH failed", "{name}: status {st}");
    }
    let dev = drv.devs[d];
    let irqs = dev.irqs() - dev.irq0;
    say!(
        "guest: {name}: id {text:?}, {} requests ({} writes, {} reads, GET_ID, FLUSH) on {nq} queues, {irqs} interrupts",
        dev.requests,
        dev.writes,
        dev.reads
    );
    if irqs != u64::from(dev.requests) {
        bail!(
            "interrupts differ from completions",
            "{name}: {irqs} interrupts for {} completions (one request at a time, used_event = consumed entries)",
            dev.requests
        );
    }
    Ok(())
}

/// The block test over every virtio-blk device.
pub fn run(drv: &mut Virtio) -> R {
    for d in 0..drv.ndev {
        if drv.devs[d].kind == Kind::Blk {
            device(drv, d)?;
        }
    }
    Ok(())
}

/// Reads back what [`run`] wrote on every queue of every disk (after a
/// migration: the disks must still hold it).
pub fn verify(drv: &mut Virtio) -> R {
    for d in 0..drv.ndev {
        let dev = drv.devs[d];
        if dev.kind != Kind::Blk {
            continue;
        }
        for q in 0..dev.nq {
            let salt = (dev.nth as u64) << 16 | u64::from(q);
            read_check(drv, d, q, u64::from(q) * STRIDE, salt)?;
        }
    }
    Ok(())
}
