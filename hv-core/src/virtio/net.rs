//! virtio-net (virtio 1.x 5.1) with multiple queue pairs
//! (`VIRTIO_NET_F_MQ` and the control queue's `VQ_PAIRS_SET`), attached
//! to the VM's switch.
//!
//! Queues: receive 0, transmit 0, receive 1, transmit 1, ..., control
//! last. A frame the driver transmits on pair `i` leaves through the
//! machine's switch, which hands it to the NIC whose MAC it is addressed to
//! (every other NIC for broadcast) on that NIC's pair `i` modulo its active
//! pairs, as one tap queue per pair would. A frame that finds no receive
//! buffer waits in a small per-queue backlog until the driver adds one.

use super::pci::{BackendState, QueueIo, VirtioBackend};
use super::queue::QueueError;
use crate::devices::{read_le, DeviceCtx, StateError};
use alloc::collections::VecDeque;
use alloc::vec::Vec;

pub const VIRTIO_ID_NET: u16 = 1;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
pub const VIRTIO_NET_F_MQ: u32 = 22;

pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

/// Length of `virtio_net_hdr_v1` in front of every frame.
pub const HDR_LEN: usize = 12;
/// Largest frame accepted from a driver (a jumbo frame of 64 KiB).
pub const MAX_FRAME: usize = 65_550;
/// Frames that may wait per receive queue.
pub const BACKLOG: usize = 64;
/// Bytes of frames one transmit pass may hand to the switch (the rest
/// waits for the next kick), and bytes waiting in a NIC's backlogs: a
/// driver cannot make Tern hold more.
pub const TX_BYTES_PER_PASS: usize = 1 << 20;
pub const BACKLOG_BYTES: usize = 256 << 10;
/// Most queue pairs (the transport allows 127 queues in all).
pub const MAX_PAIRS: u16 = 63;

/// Counters of one NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames dropped: no room in the backlog, buffer too small, queue not
    /// set up.
    pub rx_dropped: u64,
    pub ctrl_commands: u64,
}

/// A virtio-net device.
#[derive(Clone)]
pub struct VirtioNet {
    mac: [u8; 6],
    pairs: u16,
    active_pairs: u16,
    backlog: Vec<VecDeque<Vec<u8>>>,
    pub counters: NetCounters,
}

impl VirtioNet {
    /// A NIC with `pairs` queue pairs (1 to 63).
    pub fn new(pairs: u16, mac: [u8; 6]) -> Self {
        let pairs = pairs.clamp(1, MAX_PAIRS);
        Self {
            mac,
            pairs,
            active_pairs: 1,
            backlog: (0..pairs).map(|_| VecDeque::new()).collect(),
            counters: NetCounters::default(),
        }
    }

    /// Pairs the driver enabled with VQ_PAIRS_SET.
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    fn ctrl_queue(&self) -> u16 {
        self.pairs * 2
    }

    fn control(&mut self, ctx: &mut DeviceCtx, io: &mut QueueIo) -> Result<(), QueueError> {
        let q = self.ctrl_queue();
        for _ in 0..256 {
            let Some(queue) = io.queues.get_mut(usize::from(q)) else {
                return Ok(());
            };
            let Some(chain) = queue.pop(&ctx.mem)? else {
                break;
            };
            if chain.writable_len() < 1 || chain.readable_len() < 2 {
                return Err(QueueError::BadRequest {
                    head: chain.head,
                    why: "virtio-net control command without header or ack",
                });
            }
            let cmd = chain.read_all(&ctx.mem, 64)?;
            self.counters.ctrl_commands += 1;
            let ack = match (cmd[0], cmd[1]) {
                (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if cmd.len() >= 4 => {
                    let n = read_le(&cmd, 2, 2) as u16;
                    if (1..=self.pairs).contains(&n) {
                        self.active_pairs = n;
                        VIRTIO_NET_OK
                    } else {
                        VIRTIO_NET_ERR
                    }
                }
                _ => VIRTIO_NET_ERR,
            };
            chain.write_at(&mut ctx.mem, 0, &[ack])?;
            io.complete(ctx, q, chain.head, 1)?;
        }
        Ok(())
    }

    fn transmit(
        &mut self,
        ctx: &mut DeviceCtx,
        io: &mut QueueIo,
        q: u16,
    ) -> Result<(), QueueError> {
        let pair = q / 2;
        let mut sent = 0usize;
        for _ in 0..256 {
            if sent >= TX_BYTES_PER_PASS {
                break;
            }
            let Some(queue) = io.queues.get_mut(usize::from(q)) else {
                return Ok(());
            };
            let Some(chain) = queue.pop(&ctx.mem)? else {
                break;
            };
            let bytes = chain.read_all(&ctx.mem, HDR_LEN + MAX_FRAME)?;
            if bytes.len() > HDR_LEN {
                self.counters.tx_frames += 1;
                sent += bytes.len();
                ctx.send_frame(pair, &bytes[HDR_LEN..]);
            }
            io.complete(ctx, q, chain.head, 0)?;
        }
        Ok(())
    }

    /// Puts `frame` into the next buffer of receive queue `q`; false when
    /// no buffer is there.
    fn deliver(
        &mut self,
        ctx: &mut DeviceCtx,
        io: &mut QueueIo,
        q: u16,
        frame: &[u8],
    ) -> Result<bool, QueueError> {
        let Some(queue) = io.queues.get_mut(usize::from(q)) else {
            return Ok(false);
        };
        if !queue.ready {
            return Ok(false);
        }
        let Some(chain) = queue.pop(&ctx.mem)? else {
            return Ok(false);
        };
        let need = (HDR_LEN + frame.len()) as u64;
        if chain.writable_len() < need {
            self.counters.rx_dropped += 1;
            io.complete(ctx, q, chain.head, 0)?;
            return Ok(true);
        }
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        chain.write_at(&mut ctx.mem, 0, &hdr)?;
        chain.write_at(&mut ctx.mem, HDR_LEN as u64, frame)?;
        self.counters.rx_frames += 1;
        io.complete(ctx, q, chain.head, need as u32)?;
        Ok(true)
    }

    /// Sends what waits in the backlog of receive queue `q`.
    fn flush_backlog(
        &mut self,
        ctx: &mut DeviceCtx,
        io: &mut QueueIo,
        q: u16,
    ) -> Result<(), QueueError> {
        let pair = usize::from(q / 2);
        while let Some(frame) = self.backlog.get_mut(pair).and_then(|b| b.pop_front()) {
            if !self.deliver(ctx, io, q, &frame)? {
                if let Some(b) = self.backlog.get_mut(pair) {
                    b.push_front(frame);
                }
                break;
            }
        }
        Ok(())
    }
}

crate::vmstate! {
    /// virtio-net's own state: the MAC the guest may have set and the
    /// queue pairs in use (QEMU's `virtio-net` fields of the same names).
    #[derive(Clone, Debug, PartialEq)]
    pub struct VirtioNetWire as "virtio-pci/virtio-net", version 1, minimum 1 {
        pub mac: [u8; 6] [buffer],
        pub max_queue_pairs: u16,
        pub curr_queue_pairs: u16,
    }
}

impl VirtioBackend for VirtioNet {
    fn device_id(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn class(&self) -> u32 {
        0x02_00_00
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_MQ
    }

    fn num_queues(&self) -> u16 {
        self.pairs * 2 + 1
    }

    fn config_read(&self, offset: u64, size: u8) -> u64 {
        let mut c = [0u8; 0x10];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        read_le(&c, offset, size)
    }

    fn reset(&mut self) {
        self.active_pairs = 1;
        for b in &mut self.backlog {
            b.clear();
        }
    }

    fn process(&mut self, ctx: &mut DeviceCtx, io: &mut QueueIo, q: u16) -> Result<(), QueueError> {
        if q == self.ctrl_queue() {
            self.control(ctx, io)
        } else if q % 2 == 1 {
            self.transmit(ctx, io, q)
        } else {
            self.flush_backlog(ctx, io, q)
        }
    }

    fn receive(
        &mut self,
        ctx: &mut DeviceCtx,
        io: &mut QueueIo,
        pair: u16,
        frame: &[u8],
    ) -> Result<bool, QueueError> {
        let pair = pair % self.active_pairs.max(1);
        let q = pair * 2;
        let waiting = self
            .backlog
            .get(usize::from(pair))
            .is_some_and(|b| !b.is_empty());
        if !waiting && self.deliver(ctx, io, q, frame)? {
            return Ok(true);
        }
        let held: usize = self.backlog.iter().flatten().map(Vec::len).sum();
        match self.backlog.get_mut(usize::from(pair)) {
            Some(b) if b.len() < BACKLOG && held + frame.len() <= BACKLOG_BYTES => {
                b.push_back(frame.to_vec());
                Ok(true)
            }
            _ => {
                self.counters.rx_dropped += 1;
                Ok(false)
            }
        }
    }

    fn mac(&self) -> Option<[u8; 6]> {
        Some(self.mac)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        alloc::vec![
            ("tx", c.tx_frames),
            ("rx", c.rx_frames),
            ("rx_dropped", c.rx_dropped),
            ("ctrl", c.ctrl_commands),
        ]
    }

    fn save_state(&self) -> Option<BackendState> {
        Some(BackendState::Net(VirtioNetWire {
            mac: self.mac,
            max_queue_pairs: self.pairs,
            curr_queue_pairs: self.active_pairs,
        }))
    }

    fn load_state(&mut self, s: Option<&BackendState>) -> Result<(), StateError> {
        let Some(BackendState::Net(w)) = s else {
            return Err(StateError::Invalid("virtio-net state missing"));
        };
        if w.max_queue_pairs != self.pairs {
            return Err(StateError::Invalid("virtio-net queue pairs"));
        }
        if !(1..=self.pairs).contains(&w.curr_queue_pairs) {
            return Err(StateError::Invalid("virtio-net active pairs"));
        }
        self.mac = w.mac;
        self.active_pairs = w.curr_queue_pairs;
        Ok(())
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
