//! The virtio-net test of scenario `virtio`.
//!
//! Every NIC is switched to all its queue pairs (VIRTIO_NET_CTRL_MQ
//! VQ_PAIRS_SET on the control queue, ack checked). The peer of NIC `k` is
//! NIC `k ^ 1` if it exists, else `k` itself. RX buffers (12 + 1514 bytes
//! each, poisoned) are posted on every RX queue first: as many as frames
//! are expected there, plus one spare that must stay unused. Then every
//! NIC sends two frames on each TX queue `i` to its peer (the first as a
//! direct two-descriptor chain, the second through an indirect table).
//! The backend must deliver each exactly once on the peer's RX queue
//! `i mod peer_pairs`, intact: ethertype 0x88B5, a payload naming the
//! sender, pair and sequence, a fill pattern and a checksum. Lengths vary
//! from 64 to 1514 bytes. TX buffers must come back with used length 0.

use crate::hw;
use crate::virtio::{
    bail, say, ticks, wait_for, Kind, Seg, Used, Virtio, MAX_DEVS, R, TIMEOUT_TICKS,
};

pub const HDR: u32 = 12;
pub const MTU_FRAME: u32 = 1514;
pub const ETHERTYPE: u16 = 0x88B5;
const MAX_PAIRS: usize = 64;
const FRAMES_PER_PAIR: u8 = 2;

const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

fn fnv32(addr: u64, len: u64) -> u32 {
    (0..len).fold(0x811C_9DC5u32, |h, i| {
        (h ^ u32::from(hw::rd8(addr + i))).wrapping_mul(0x0100_0193)
    })
}

fn fill_byte(nic: u8, pair: u16, seq: u8, j: u32) -> u8 {
    (j.wrapping_mul(31) ^ (u32::from(nic) << 5) ^ (u32::from(pair) * 7) ^ (u32::from(seq) * 101))
        as u8
}

/// Frame length for (sender, pair, sequence): 64..=1514.
pub fn frame_len(nic: u8, pair: u16, seq: u8) -> u32 {
    64 + (u32::from(nic) * 131 + u32::from(pair) * 37 + u32::from(seq) * 613) % (MTU_FRAME - 64 + 1)
}

/// Writes header and frame at `buf` (a 2 KiB slot); returns the frame
/// length.
fn build(buf: u64, dst: [u8; 6], src: [u8; 6], nic: u8, pair: u16, seq: u8) -> u32 {
    hw::fill(buf, u64::from(HDR), 0);
    let f = buf + u64::from(HDR);
    let len = frame_len(nic, pair, seq);
    for i in 0..6 {
        hw::wr8(f + i, dst[i as usize]);
        hw::wr8(f + 6 + i, src[i as usize]);
    }
    for (i, b) in ETHERTYPE.to_be_bytes().into_iter().enumerate() {
        hw::wr8(f + 12 + i as u64, b);
    }
    for (i, b) in b"TERN".iter().enumerate() {
        hw::wr8(f + 14 + i as u64, *b);
    }
    hw::wr8(f + 18, nic);
    hw::wr8(f + 19, seq);
    hw::wr16(f + 20, pair);
    hw::wr16(f + 22, len as u16);
    for j in 24..len - 4 {
        hw::wr8(f + u64::from(j), fill_byte(nic, pair, seq, j));
    }
    let sum = fnv32(f, u64::from(len - 4));
    for (i, b) in sum.to_le_bytes().into_iter().enumerate() {
        hw::wr8(f + u64::from(len - 4) + i as u64, b);
    }
    len
}

/// Device index of NIC `k`.
fn nic(drv: &Virtio, k: usize) -> Option<usize> {
    drv.devs()
        .iter()
        .position(|d| d.kind == Kind::Net && d.nth == k)
}

/// Who sent a frame.
#[derive(Clone, Copy)]
pub struct FrameId {
    pub nic: u8,
    pub pair: u16,
    pub seq: u8,
}

/// Checks a frame received in `u` on RX queue of pair `r` of device `m`;
/// returns who sent it. Gives the buffer slot back.
fn check_rx(drv: &mut Virtio, m: usize, r: u16, u: Used) -> R<FrameId> {
    let me = drv.devs[m];
    let name = me.name();
    drv.vq(m, 2 * r).put_slot(u.addr)?;
    let buf = u.addr;
    let f = buf + u64::from(HDR);
    if u.len < HDR + 64 || u.len > HDR + MTU_FRAME {
        bail!(
            "received length out of range",
            "{name} rx{r}: used len {}",
            u.len
        );
    }
    let len = u.len - HDR;
    let gso = hw::rd8(buf + 1);
    let nbuf = hw::rd16(buf + 10);
    // Without MRG_RXBUF a frame uses one buffer, so num_buffers is 1
    // (5.1.6.4); no offloads were negotiated, so gso_type is NONE.
    if gso != 0 || nbuf != 1 {
        bail!(
            "bad virtio_net_hdr on receive",
            "{name} rx{r}: gso_type {gso} (want 0), num_buffers {nbuf} (want 1)"
        );
    }
    let mut magic = [0u8; 4];
    for (i, b) in magic.iter_mut().enumerate() {
        *b = hw::rd8(f + 14 + i as u64);
    }
    let ety = u16::from_be_bytes([hw::rd8(f + 12), hw::rd8(f + 13)]);
    if ety != ETHERTYPE || &magic != b"TERN" {
        bail!(
            "foreign frame received",
            "{name} rx{r}: ethertype {ety:#06x}, {len} bytes"
        );
    }
    let id = FrameId {
        nic: hw::rd8(f + 18),
        seq: hw::rd8(f + 19),
        pair: hw::rd16(f + 20),
    };
    let who = || (id.nic, id.pair, id.seq);
    let stated = u32::from(hw::rd16(f + 22));
    if stated != len || len != frame_len(id.nic, id.pair, id.seq) {
        bail!(
            "frame length changed in transit",
            "{name} rx{r}: used len says {len}, frame says {stated} (from nic/pair/seq {:?})",
            who()
        );
    }
    let at = f + u64::from(len - 4);
    let sum = u32::from_le_bytes([
        hw::rd8(at),
        hw::rd8(at + 1),
        hw::rd8(at + 2),
        hw::rd8(at + 3),
    ]);
    if fnv32(f, u64::from(len - 4)) != sum {
        bail!("frame checksum wrong", "{name} rx{r}: from {:?}", who());
    }
    if let Some(j) =
        (24..len - 4).find(|&j| hw::rd8(f + u64::from(j)) != fill_byte(id.nic, id.pair, id.seq, j))
    {
        bail!(
            "frame content wrong",
            "{name} rx{r}: from {:?}, byte {j}",
            who()
        );
    }
    if len < MTU_FRAME && hw::rd8(f + u64::from(len)) != 0xEE {
        bail!(
            "device wrote past the frame",
            "{name} rx{r}: byte after {len} changed"
        );
    }
    let Some(src) = nic(drv, usize::from(id.nic)) else {
        bail!("frame from no NIC", "{name} rx{r}: nic {}", id.nic);
    };
    let src_mac = drv.devs[src].mac;
    for i in 0..6 {
        if hw::rd8(f + i) != me.mac[i as usize] || hw::rd8(f + 6 + i) != src_mac[i as usize] {
            bail!(
                "frame addresses wrong",
                "{name} rx{r}: from {:?}, MACs do not match the NICs",
                who()
            );
        }
    }
    Ok(id)
}

/// Posts one poisoned RX buffer on RX queue of pair `r`.
fn post_rx(drv: &mut Virtio, d: usize, r: u16) -> R {
    let vq = drv.vq(d, 2 * r);
    let buf = vq.take_slot()?;
    hw::fill(buf, 2048, 0xEE);
    vq.add(&[Seg::wo(buf, HDR + MTU_FRAME)], false)?;
    Ok(())
}

/// Queues frame `seq` of `pair` from device `s` to MAC `dst` (not kicked).
fn queue_tx(drv: &mut Virtio, s: usize, pair: u16, seq: u8, dst: [u8; 6]) -> R {
    let (src, k) = (drv.devs[s].mac, drv.devs[s].nth as u8);
    let vq = drv.vq(s, 2 * pair + 1);
    let buf = vq.take_slot()?;
    let len = build(buf, dst, src, k, pair, seq);
    let segs = [Seg::ro(buf, HDR), Seg::ro(buf + u64::from(HDR), len)];
    vq.add(&segs, seq % 2 == 1)?;
    drv.devs[s].tx += 1;
    Ok(())
}

/// Takes a TX completion; its used length must be 0.
fn tx_done(drv: &mut Virtio, s: usize, pair: u16, u: Used) -> R {
    let name = drv.devs[s].name();
    if u.len != 0 {
        bail!(
            "TX used length not 0",
            "{name} tx{pair}: used len {} for a device-readable buffer",
            u.len
        );
    }
    drv.vq(s, 2 * pair + 1).put_slot(u.addr)
}

/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue.
fn set_pairs(drv: &mut Virtio, d: usize, pairs: u16) -> R {
    let cq = 2 * drv.devs[d].pairs;
    let data = drv.vq_data(d, cq, 1)?;
    hw::wr8(data, CTRL_MQ);
    hw::wr8(data + 1, CTRL_MQ_VQ_PAIRS_SET);
    hw::wr16(data + 0x10, pairs);
    hw::wr8(data + 0x20, 0xFF);
    let irq0 = drv.devs[d].irqs();
    let vq = drv.vq(d, cq);
    let segs = [
        Seg::ro(data, 2),
        Seg::ro(data + 0x10, 2),
        Seg::wo(data + 0x20, 1),
    ];
    vq.add(&segs, false)?;
    vq.kick();
    let u = drv.wait_used(d, cq, irq0, "VQ_PAIRS_SET")?;
    let ack = hw::rd8(data + 0x20);
    let name = drv.devs[d].name();
    if u.len != 1 || ack != 0 {
        bail!(
            "VQ_PAIRS_SET not acknowledged",
            "{name}: {pairs} pairs: ack {ack:#x} (want 0 = VIRTIO_NET_OK), used len {}",
            u.len
        );
    }
    say!("guest: {name}: VQ_PAIRS_SET {pairs} acknowledged");
    Ok(())
}

/// The network test over every virtio-net device.
pub fn run(drv: &mut Virtio) -> R {
    let mut nics = [0usize; MAX_DEVS];
    let mut n = 0;
    while let Some(d) = nic(drv, n) {
        nics[n] = d;
        n += 1;
    }
    if n == 0 {
        return Ok(());
    }
    let nics = &nics[..n];
    let peer = |k: usize| if k ^ 1 < n { k ^ 1 } else { k };
    for &d in nics {
        if usize::from(drv.devs[d].pairs) > MAX_PAIRS {
            bail!("too many pairs for the test", "{} pairs", drv.devs[d].pairs);
        }
        set_pairs(drv, d, drv.devs[d].pairs)?;
    }
    // Frames expected per (NIC, RX pair).
    let mut expect = [[0u16; MAX_PAIRS]; MAX_DEVS];
    for k in 0..n {
        let p = peer(k);
        let peer_pairs = drv.devs[nics[p]].pairs;
        for i in 0..drv.devs[nics[k]].pairs {
            expect[p][usize::from(i % peer_pairs)] += u16::from(FRAMES_PER_PAIR);
        }
    }
    let mut total_rx = 0u32;
    for (k, &d) in nics.iter().enumerate() {
        for r in 0..drv.devs[d].pairs {
            let want = expect[k][usize::from(r)];
            let post = want + 1;
            let size = drv.vq(d, 2 * r).size;
            if post > size || post > 64 {
                bail!(
                    "too many frames for one RX queue",
                    "{} rx{r}: {want} expected, queue size {size}",
                    drv.devs[d].name()
                );
            }
            drv.vq_data(d, 2 * r, u64::from(post).div_ceil(2))?;
            for _ in 0..post {
                post_rx(drv, d, r)?;
            }
            drv.vq(d, 2 * r).kick();
            total_rx += u32::from(want);
        }
    }
    let mut total_tx = 0u32;
    for (k, &s) in nics.iter().enumerate() {
        let dst = drv.devs[nics[peer(k)]].mac;
        for i in 0..drv.devs[s].pairs {
            drv.vq_data(s, 2 * i + 1, 1)?;
            for seq in 0..FRAMES_PER_PAIR {
                queue_tx(drv, s, i, seq, dst)?;
                total_tx += 1;
            }
            drv.vq(s, 2 * i + 1).kick();
        }
    }
    say!("guest: net: {total_tx} frames sent on {n} NICs, {total_rx} expected back");
    // Collect until every frame arrived and every TX buffer came back.
    let mut seen = [[0u8; MAX_PAIRS]; MAX_DEVS];
    let (mut got_rx, mut got_tx) = (0u32, 0u32);
    let mut last = ticks();
    while got_rx < total_rx || got_tx < total_tx {
        let mut progress = false;
        for (k, &d) in nics.iter().enumerate() {
            for r in 0..drv.devs[d].pairs {
                while let Some(u) = drv.vq(d, 2 * r).pop()? {
                    let id = check_rx(drv, d, r, u)?;
                    let name = drv.devs[d].name();
                    let s = usize::from(id.nic);
                    let spairs = nic(drv, s).map_or(0, |sd| drv.devs[sd].pairs);
                    let my_pairs = drv.devs[d].pairs;
                    if s >= n
                        || peer(s) != k
                        || id.pair >= spairs
                        || id.seq >= FRAMES_PER_PAIR
                        || id.pair % my_pairs != r
                    {
                        bail!(
                            "frame on the wrong NIC or queue",
                            "{name} rx{r}: frame from nic{} pair {} seq {}",
                            id.nic,
                            id.pair,
                            id.seq
                        );
                    }
                    let bit = 1u8 << id.seq;
                    if seen[s][usize::from(id.pair)] & bit != 0 {
                        bail!(
                            "frame delivered twice",
                            "{name} rx{r}: nic{} pair {} seq {}",
                            id.nic,
                            id.pair,
                            id.seq
                        );
                    }
                    seen[s][usize::from(id.pair)] |= bit;
                    drv.devs[d].rx += 1;
                    got_rx += 1;
                    progress = true;
                }
                while let Some(u) = drv.vq(d, 2 * r + 1).pop()? {
                    tx_done(drv, d, r, u)?;
                    got_tx += 1;
                    progress = true;
                }
            }
        }
        if got_rx >= total_rx && got_tx >= total_tx {
            break;
        }
        if progress {
            last = ticks();
        } else if ticks().wrapping_sub(last) > TIMEOUT_TICKS {
            say!("guest: net: {got_rx}/{total_rx} frames received, {got_tx}/{total_tx} TX buffers back");
            let mut shown = 0;
            for (k, &d) in nics.iter().enumerate() {
                for i in 0..drv.devs[d].pairs {
                    for seq in 0..FRAMES_PER_PAIR {
                        if seen[k][usize::from(i)] & (1 << seq) == 0 && shown < 8 {
                            let p = nics[peer(k)];
                            let rq = i % drv.devs[p].pairs;
                            let vq = drv.vq_ref(p, 2 * rq);
                            say!(
                                "guest: net: missing nic{k} pair {i} seq {seq} -> {} rx{rq} (used idx {}, consumed {}, avail {})",
                                drv.devs[p].name(),
                                vq.used_idx(),
                                vq.used_seen,
                                vq.published()
                            );
                            shown += 1;
                        }
                    }
                }
            }
            bail!(
                "frames lost",
                "{} of {total_rx} never arrived",
                total_rx - got_rx
            );
        }
        let drv_ref = &*drv;
        wait_for(|| {
            nics.iter()
                .any(|&d| (0..2 * drv_ref.devs[d].pairs).any(|q| drv_ref.vq_ref(d, q).pending()))
        });
    }
    // The spare buffer on every RX queue must stay unused: wait a little
    // for late duplicates.
    let t0 = ticks();
    let drv_ref = &*drv;
    crate::idt::wait(1000, || ticks().wrapping_sub(t0) >= 3);
    for &d in nics {
        for r in 0..drv_ref.devs[d].pairs {
            if drv_ref.vq_ref(d, 2 * r).pending() {
                bail!(
                    "extra frame received",
                    "{} rx{r}: more frames than were sent to it",
                    drv_ref.devs[d].name()
                );
            }
        }
    }
    for &d in nics {
        let dev = drv.devs[d];
        let irqs = dev.irqs() - dev.irq0;
        if irqs == 0 {
            bail!("no interrupt from a NIC", "{}", dev.name());
        }
        let completions: u32 = (0..dev.nq).map(|q| drv.vq_ref(d, q).completions).sum();
        say!(
            "guest: {}: {} frames sent, {} received on {} pairs, {completions} completions, {irqs} interrupts",
            dev.name(),
            dev.tx,
            dev.rx,
            dev.pairs
        );
    }
    Ok(())
}

/// One frame from NIC device `d` to itself on pair 0 (its peer when it
/// is alone), checked on arrival; for the hostile scenario.
pub fn loopback(drv: &mut Virtio, d: usize) -> R {
    let name = drv.devs[d].name();
    drv.vq_data(d, 0, 2)?;
    drv.vq_data(d, 1, 1)?;
    post_rx(drv, d, 0)?;
    drv.vq(d, 0).kick();
    let irq0 = drv.devs[d].irqs();
    let seq = (drv.devs[d].tx % 2) as u8;
    queue_tx(drv, d, 0, seq, drv.devs[d].mac)?;
    drv.vq(d, 1).kick();
    let rx = drv.wait_used(d, 0, irq0, "loopback receive")?;
    let id = check_rx(drv, d, 0, rx)?;
    if usize::from(id.nic) != drv.devs[d].nth || id.pair != 0 || id.seq != seq {
        bail!(
            "loopback frame is not the one sent",
            "{name}: got nic{} pair {} seq {}",
            id.nic,
            id.pair,
            id.seq
        );
    }
    drv.devs[d].rx += 1;
    let drv_ref = &*drv;
    if !wait_for(|| drv_ref.vq_ref(d, 1).pending()) {
        bail!("TX buffer not returned", "{name} tx0");
    }
    let tx = drv.vq(d, 1).pop()?;
    if let Some(u) = tx {
        tx_done(drv, d, 0, u)?;
    }
    Ok(())
}
