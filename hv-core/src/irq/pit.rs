//! The 8254 programmable interval timer (Intel 8254 datasheet, order
//! 231164) as wired in a PC: three channels clocked at [`PIT_HZ`] at ports
//! 0x40-0x42, the control word at 0x43; channel 0's OUT is ISA IRQ 0,
//! channel 1's gate is tied high (DRAM refresh), channel 2's gate and OUT
//! are bits 0 and 5 of port 0x61, whose bits 0-3 and 4 (refresh toggle)
//! this model also owns.
//!
//! Counters are not ticked: a channel remembers when it started counting
//! and computes its count and OUT from the caller's `now`. A count is
//! clock `d` after the start is `floor(elapsed_ns * PIT_HZ / 10^9)`; the
//! datasheet's extra clock to load the count register is not modelled.
//!
//! Not emulated: BCD counting (the BCD bit is stored and reported in the
//! status, the count is used as binary), the end-of-period reload of a
//! count written to a running mode 2/3 channel (it restarts at once), and
//! the channel 1 refresh timing itself (bit 4 of port 0x61 toggles every
//! 15.085 µs of virtual time whatever channel 1 is programmed to).

use super::Nanos;

/// The PIT's input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;
const NS_PER_SEC: u64 = 1_000_000_000;
/// Port 0x61 bit 4 toggles on each refresh request: 18 PIT clocks.
const REFRESH_NS: u64 = 15_085;
/// At most this many IRQ 0 edges per [`Pit::poll`]: edges an edge-triggered
/// PIC or I/O APIC has not taken yet coalesce into one anyway, so after a
/// stall the guest sees one tick, not a burst (QEMU's "lost tick discard").
pub const MAX_EDGES_PER_POLL: u32 = 1;

// Read/write byte states (control word bits 5:4 plus the lo/hi flip-flop).
const RW_LSB: u8 = 1;
const RW_MSB: u8 = 2;
const RW_WORD_LO: u8 = 3;
const RW_WORD_HI: u8 = 4;

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first instant at which `ticks` clocks have elapsed.
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// One channel's registers and counting state; part of [`PitState`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PitChannelState {
    /// The count in use, 1..=65536 (a written 0 means 65536); 0 when none
    /// was written since the control word.
    pub count: u32,
    /// Control word bits 3:1 as written (6 and 7 act as 2 and 3).
    pub mode: u8,
    /// Control word bits 5:4: 1 low byte, 2 high byte, 3 low then high.
    pub access: u8,
    pub bcd: bool,
    pub gate: bool,
    /// A count is loaded and (modes 1 and 5) the gate has triggered.
    pub running: bool,
    /// Virtual time at which counting last started or resumed.
    pub start: Nanos,
    /// Clocks counted before `start` (a mode 0/4 count paused by the gate,
    /// a mode 2/3 count frozen by it).
    pub base_ticks: u64,
    /// Rising edges of OUT in this run already returned by `poll`.
    pub edges_seen: u64,
    /// Status bit 6: a count was written and not loaded yet.
    pub null_count: bool,
    /// Byte state of the next data-port read (`RW_*`).
    pub read_state: u8,
    /// Byte state of the next data-port write.
    pub write_state: u8,
    /// Low byte of a lo/hi count written so far.
    pub write_lsb: u8,
    /// Latched count and its byte state (0 = nothing latched).
    pub latch: u16,
    pub latch_state: u8,
    /// Latched status byte.
    pub status: u8,
    pub status_latched: bool,
}

impl PitChannelState {
    /// The mode the channel acts in (6 and 7 alias 2 and 3).
    fn mode(&self) -> u8 {
        match self.mode & 7 {
            m @ 6..=7 => m - 4,
            m => m,
        }
    }

    fn counting(&self) -> bool {
        self.running && (self.gate || matches!(self.mode(), 1 | 5))
    }

    /// Clocks elapsed in this run at `now`.
    fn elapsed(&self, now: Nanos) -> u64 {
        if !self.counting() {
            return self.base_ticks;
        }
        self.base_ticks
            .saturating_add(ns_to_ticks(now.saturating_sub(self.start)))
    }

    fn restart(&mut self, now: Nanos) {
        self.running = true;
        self.start = now;
        self.base_ticks = 0;
        self.edges_seen = 0;
        self.null_count = false;
    }

    /// The OUT pin (datasheet, "Mode definitions").
    fn out(&self, now: Nanos) -> bool {
        if !self.running || self.count == 0 {
            // After the control word OUT is low in mode 0, high otherwise;
            // modes 1 and 5 stay high until triggered.
            return self.mode() != 0;
        }
        let n = u64::from(self.count);
        let d = self.elapsed(now);
        match self.mode() {
            0 | 1 => d >= n,
            // Low for the clock at which the count is 1.
            2 => !self.gate || d % n != n - 1,
            // High for the first ceil(n/2) clocks of each period.
            3 => !self.gate || d % n < n.div_ceil(2),
            // Low for the clock at which the count reaches 0.
            _ => d != n,
        }
    }

    /// The counting element's value, as a latch or a read sees it.
    fn value(&self, now: Nanos) -> u16 {
        if !self.running || self.count == 0 {
            return self.count as u16;
        }
        let n = u64::from(self.count);
        let d = self.elapsed(now);
        let v = match self.mode() {
            2 => n - d % n,
            // Decrements by two, twice per period.
            3 => n - (2 * (d % n)) % n,
            // One-shots keep counting down past 0.
            _ => n.wrapping_sub(d),
        };
        v as u16
    }

    /// Rising edges of OUT from the start of this run to clock `d`.
    fn edges(&self, d: u64) -> u64 {
        let n = u64::from(self.count).max(1);
        match self.mode() {
            0 | 1 => u64::from(d >= n),
            2 | 3 => d / n,
            _ => u64::from(d > n),
        }
    }

    /// The run clock of the next rising edge not yet seen by `poll`.
    fn next_edge_tick(&self) -> Option<u64> {
        let n = u64::from(self.count);
        match self.mode() {
            0 | 1 if self.edges_seen == 0 => Some(n),
            2 | 3 => Some(self.edges_seen.saturating_add(1).saturating_mul(n)),
            4 | 5 if self.edges_seen == 0 => Some(n + 1),
            _ => None,
        }
    }

    fn set_gate(&mut self, gate: bool, now: Nanos) {
        if gate == self.gate {
            return;
        }
        match self.mode() {
            // The gate enables counting: pause and resume.
            0 | 4 => {
                if gate {
                    self.start = now;
                } else {
                    self.base_ticks = self.elapsed(now);
                }
            }
            // A rising gate reloads and restarts; a low gate stops counting.
            2 | 3 => {
                if gate {
                    if self.count != 0 {
                        self.restart(now);
                    }
                } else {
                    self.base_ticks = self.elapsed(now);
                }
            }
            // A rising gate triggers (or retriggers) the one-shot.
            _ => {
                if gate && self.count != 0 {
                    self.restart(now);
                }
            }
        }
        self.gate = gate;
    }

    fn control(&mut self, v: u8) {
        let access = (v >> 4) & 3;
        *self = Self {
            mode: (v >> 1) & 7,
            access,
            bcd: v & 1 != 0,
            gate: self.gate,
            null_count: true,
            read_state: access,
            write_state: access,
            ..Self::default()
        };
    }

    fn latch_count(&mut self, now: Nanos) {
        // A second latch before the first is read is ignored.
        if self.latch_state == 0 {
            self.latch = self.value(now);
            self.latch_state = match self.access {
                RW_LSB => RW_LSB,
                RW_MSB => RW_MSB,
                _ => RW_WORD_LO,
            };
        }
    }

    fn latch_status(&mut self, now: Nanos) {
        if !self.status_latched {
            self.status = u8::from(self.out(now)) << 7
                | u8::from(self.null_count) << 6
                | (self.access & 3) << 4
                | (self.mode & 7) << 1
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    fn load(&mut self, v: u16, now: Nanos) {
        self.count = if v == 0 { 0x1_0000 } else { u32::from(v) };
        match self.mode() {
            // Loaded on the next gate trigger.
            1 | 5 => self.null_count = true,
            _ => self.restart(now),
        }
    }

    fn read(&mut self, now: Nanos) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if self.latch_state != 0 {
            let [lo, hi] = self.latch.to_le_bytes();
            let (byte, next) = match self.latch_state {
                RW_LSB => (lo, 0),
                RW_WORD_LO => (lo, RW_WORD_HI),
                _ => (hi, 0),
            };
            self.latch_state = next;
            return byte;
        }
        let [lo, hi] = self.value(now).to_le_bytes();
        match self.read_state {
            RW_LSB => lo,
            RW_MSB => hi,
            RW_WORD_LO => {
                self.read_state = RW_WORD_HI;
                lo
            }
            _ => {
                self.read_state = RW_WORD_LO;
                hi
            }
        }
    }

    fn write(&mut self, v: u8, now: Nanos) {
        match self.write_state {
            RW_LSB => self.load(u16::from(v), now),
            RW_MSB => self.load(u16::from(v) << 8, now),
            RW_WORD_LO => {
                self.write_lsb = v;
                self.write_state = RW_WORD_HI;
                if self.mode() == 0 {
                    // Writing the first byte stops a mode 0 count, OUT low.
                    self.base_ticks = self.elapsed(now);
                    self.running = false;
                }
            }
            RW_WORD_HI => {
                self.write_state = RW_WORD_LO;
                self.load(u16::from_le_bytes([self.write_lsb, v]), now);
            }
            _ => {}
        }
    }

    fn sanitize(&mut self) {
        self.mode &= 7;
        self.access &= 3;
        if self.count > 0x1_0000 {
            self.count = 0x1_0000;
        }
        if self.count == 0 {
            self.running = false;
        }
        for s in [&mut self.read_state, &mut self.write_state] {
            if !(RW_LSB..=RW_WORD_HI).contains(s) {
                *s = RW_WORD_LO;
            }
        }
        if self.latch_state > RW_WORD_HI {
            self.latch_state = 0;
        }
    }
}

/// The PIT's registers; the save/load format of [`Pit`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bits 0-3 as written (bit 0 is channel 2's gate).
    pub port61: u8,
}

/// The 8254 with the port 0x61 bits it drives.
#[derive(Clone, Debug)]
pub struct Pit {
    ch: [PitChannelState; 3],
    port61: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// The PIT at virtual time 0 as QEMU resets it: every channel in mode 3
    /// with count 65536 (lo/hi access) and counting, so IRQ 0 runs at
    /// 18.2 Hz before anyone programs it; channel 2's gate low.
    pub fn new() -> Self {
        let channel = |gate| PitChannelState {
            count: 0x1_0000,
            mode: 3,
            access: 3,
            gate,
            running: true,
            read_state: RW_WORD_LO,
            write_state: RW_WORD_LO,
            ..PitChannelState::default()
        };
        Self {
            ch: [channel(true), channel(true), channel(false)],
            port61: 0,
        }
    }

    /// Reads ports 0x40-0x42 (counters) and 0x61; others read 0xFF.
    pub fn read(&mut self, port: u16, now: Nanos) -> u8 {
        match port {
            0x40..=0x42 => self.ch[usize::from(port - 0x40)].read(now),
            0x61 => {
                let refresh = (now / REFRESH_NS) & 1 != 0;
                self.port61 | u8::from(refresh) << 4 | u8::from(self.ch[2].out(now)) << 5
            }
            _ => 0xFF,
        }
    }

    /// Writes ports 0x40-0x43 and 0x61; others are ignored.
    pub fn write(&mut self, port: u16, v: u8, now: Nanos) {
        match port {
            0x40..=0x42 => self.ch[usize::from(port - 0x40)].write(v, now),
            0x43 => self.control(v, now),
            0x61 => {
                self.port61 = v & 0x0F;
                self.ch[2].set_gate(v & 1 != 0, now);
            }
            _ => {}
        }
    }

    fn control(&mut self, v: u8, now: Nanos) {
        let sel = v >> 6;
        if sel == 3 {
            // Read-back: bit 5 = 0 latches counts, bit 4 = 0 latches status,
            // bits 3:1 select channels 2:0.
            for (i, ch) in self.ch.iter_mut().enumerate() {
                if v & (2 << i) == 0 {
                    continue;
                }
                if v & 0x20 == 0 {
                    ch.latch_count(now);
                }
                if v & 0x10 == 0 {
                    ch.latch_status(now);
                }
            }
            return;
        }
        let ch = &mut self.ch[usize::from(sel)];
        if v & 0x30 == 0 {
            ch.latch_count(now);
        } else {
            ch.control(v);
        }
    }

    /// Channel `channel`'s OUT pin at `now` (false for channels above 2).
    pub fn out(&self, channel: u8, now: Nanos) -> bool {
        self.ch
            .get(usize::from(channel))
            .is_some_and(|c| c.out(now))
    }

    /// Rising edges of channel 0's OUT (IRQ 0 interrupts to raise) since
    /// the previous poll, at most [`MAX_EDGES_PER_POLL`]; the rest are
    /// dropped.
    pub fn poll(&mut self, now: Nanos) -> u32 {
        let c = &mut self.ch[0];
        if !c.running || c.count == 0 {
            return 0;
        }
        let total = c.edges(c.elapsed(now));
        let new = total.saturating_sub(c.edges_seen);
        c.edges_seen = c.edges_seen.max(total);
        new.min(u64::from(MAX_EDGES_PER_POLL)) as u32
    }

    /// When channel 0's next unseen rising edge happens (`now` if one is
    /// already due), or `None` if none will without a guest access.
    pub fn next_event(&self, now: Nanos) -> Option<Nanos> {
        let c = &self.ch[0];
        if !c.counting() || c.count == 0 {
            return None;
        }
        let tick = c.next_edge_tick()?;
        let at = c
            .start
            .saturating_add(ticks_to_ns(tick.saturating_sub(c.base_ticks)));
        Some(at.max(now))
    }

    /// All registers, for migration.
    pub fn save(&self) -> PitState {
        PitState {
            channels: self.ch.clone(),
            port61: self.port61,
        }
    }

    /// Restores registers saved by [`save`](Self::save); values no 8254
    /// can hold are cut down to ones it can.
    pub fn load(&mut self, s: &PitState) {
        self.ch = s.channels.clone();
        for c in &mut self.ch {
            c.sanitize();
        }
        // Channels 0 and 1 have their gates tied high.
        self.ch[0].gate = true;
        self.ch[1].gate = true;
        self.port61 = s.port61 & 0x0F;
        self.ch[2].gate = self.port61 & 1 != 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Clock instants used below, ceil(n * 10^9 / 1_193_182) ns:
    // 1 clock = 838.095... ns.
    const T4: u64 = 3_353; // 4 * 838.095 = 3352.38
    const T1000: u64 = 838_096; // 838095.34
    const T1193: u64 = 999_848; // 999847.74
    const T2386: u64 = 1_999_695; // 1999695.48
    const T3579: u64 = 2_999_543; // 2999543.22
    const T11932: u64 = 10_000_151; // 10000150.9
    const T65536: u64 = 54_925_402; // 54925401.9

    fn program(p: &mut Pit, ch: u8, cw_mode: u8, count: u16, now: Nanos) {
        p.write(0x43, ch << 6 | 0x30 | cw_mode << 1, now);
        p.write(0x40 + u16::from(ch), count as u8, now);
        p.write(0x40 + u16::from(ch), (count >> 8) as u8, now);
    }

    fn read_count(p: &mut Pit, ch: u8, now: Nanos) -> u16 {
        p.write(0x43, ch << 6, now);
        let port = 0x40 + u16::from(ch);
        u16::from_le_bytes([p.read(port, now), p.read(port, now)])
    }

    #[test]
    fn clock_conversions() {
        assert_eq!(ticks_to_ns(1193), T1193);
        assert_eq!(ns_to_ticks(T1193), 1193);
        assert_eq!(ns_to_ticks(T1193 - 1), 1192);
        assert_eq!(ns_to_ticks(NS_PER_SEC), PIT_HZ);
        assert_eq!(ticks_to_ns(u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn calibration_loop_on_channel_2() {
        // Linux's pit_calibrate_tsc: gate on, speaker off, ch2 mode 0,
        // 11932 clocks (10 ms), poll bit 5.
        let mut p = Pit::new();
        let t0 = 5_000;
        let b = p.read(0x61, t0);
        p.write(0x61, (b & !0x02) | 0x01, t0);
        p.write(0x43, 0xB0, t0);
        assert_eq!(p.read(0x61, t0) & 0x20, 0, "mode 0: OUT low at once");
        p.write(0x42, (11932 & 0xFF) as u8, t0);
        p.write(0x42, (11932 >> 8) as u8, t0);
        assert_eq!(p.read(0x61, t0 + T11932 - 1) & 0x20, 0);
        assert_eq!(p.read(0x61, t0 + T11932) & 0x20, 0x20);
        assert_eq!(p.read(0x61, t0 + 10 * T11932) & 0x20, 0x20, "stays high");
        // Count at clock 1000: 11932 - 1000.
        assert_eq!(read_count(&mut p, 2, t0 + T1000), 10932);
    }

    #[test]
    fn channel_2_gate_pauses_mode_0() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        program(&mut p, 2, 0, 2386, 0);
        // 1193 clocks, then the gate is off for 5 ms.
        p.write(0x61, 0x00, T1193);
        assert_eq!(read_count(&mut p, 2, T1193 + 5_000_000), 2386 - 1193);
        p.write(0x61, 0x01, T1193 + 5_000_000);
        let end = T1193 + 5_000_000 + T1193;
        assert_eq!(p.read(0x61, end - 1) & 0x20, 0);
        assert_eq!(p.read(0x61, end) & 0x21, 0x21);
    }

    #[test]
    fn count_zero_means_65536() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        program(&mut p, 2, 0, 0, 0);
        assert!(!p.out(2, T65536 - 1));
        assert!(p.out(2, T65536));
        assert_eq!(read_count(&mut p, 2, T1000), 64536, "65536 - 1000");
    }

    #[test]
    fn mode_2_periodic_irq0() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 1193, 0);
        assert_eq!(p.next_event(0), Some(T1193));
        assert_eq!(p.poll(T1193 - 1), 0);
        assert!(!p.out(0, T1193 - 1), "low for the clock at count 1");
        assert!(p.out(0, T1193));
        assert_eq!(p.poll(T1193), 1);
        assert_eq!(p.poll(T1193), 0, "each edge once");
        assert_eq!(p.next_event(T1193), Some(T2386));
        assert_eq!(p.poll(T2386), 1);
        assert_eq!(p.next_event(T2386 + 1), Some(T3579));
        // Count at clock 1000 of the third period: 1193 - 1000.
        assert_eq!(read_count(&mut p, 0, T2386 + T1000), 193);
    }

    #[test]
    fn stalled_poll_coalesces() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 1193, 0);
        // 1000 periods (~1 s) pass unpolled.
        let late = 1_000 * T1193;
        assert_eq!(p.next_event(late), Some(late), "overdue: now");
        assert_eq!(p.poll(late), 1);
        assert_eq!(p.poll(late), 0);
        // The next edge is the 1001st: 1_194_193 clocks * 838.0953 ns.
        assert_eq!(p.next_event(late), Some(1_000_847_315));
    }

    #[test]
    fn mode_3_square_wave() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        program(&mut p, 2, 3, 4, 0);
        // Count 4: high for clocks 0-1, low for 2-3, counting 4, 2, 4, 2.
        let at = |t: u64| ticks_to_ns(t);
        let outs: [bool; 6] = core::array::from_fn(|t| p.out(2, at(t as u64)));
        assert_eq!(outs, [true, true, false, false, true, true]);
        let counts: [u16; 4] = core::array::from_fn(|t| read_count(&mut p, 2, at(t as u64)));
        assert_eq!(counts, [4, 2, 4, 2]);
        // Odd count 5: high for 3 clocks, low for 2.
        program(&mut p, 2, 3, 5, 0);
        let outs: [bool; 5] = core::array::from_fn(|t| p.out(2, at(t as u64)));
        assert_eq!(outs, [true, true, true, false, false]);
        // Gate low forces OUT high in mode 3.
        p.write(0x61, 0x00, at(3));
        assert!(p.out(2, at(4)));
    }

    #[test]
    fn mode_3_irq0_edges_once_per_period() {
        let mut p = Pit::new();
        program(&mut p, 0, 3, 4, 0);
        assert_eq!(p.next_event(0), Some(T4));
        assert_eq!(p.poll(T4 - 1), 0);
        assert_eq!(p.poll(T4), 1);
    }

    #[test]
    fn power_on_irq0_at_18_2_hz() {
        let mut p = Pit::new();
        assert_eq!(p.next_event(0), Some(T65536));
        assert_eq!(p.poll(T65536 - 1), 0);
        assert_eq!(p.poll(T65536), 1);
        // Channel 2: gate low, so mode 3 holds OUT high.
        assert_eq!(p.read(0x61, 0), 0x20);
    }

    #[test]
    fn mode_0_irq0_one_shot() {
        let mut p = Pit::new();
        program(&mut p, 0, 0, 1000, 100);
        assert_eq!(p.next_event(100), Some(100 + T1000));
        assert_eq!(p.poll(100 + T1000 - 1), 0);
        assert_eq!(p.poll(100 + T1000 + 5_000_000), 1);
        assert_eq!(p.poll(100 + 10 * T1000), 0, "terminal count: one edge");
        assert_eq!(p.next_event(100 + 10 * T1000), None);
        // After terminal count the counter wraps: 1000 - 1193 = -193.
        assert_eq!(read_count(&mut p, 0, 100 + T1193), 0u16.wrapping_sub(193));
        // A new count rearms it.
        program(&mut p, 0, 0, 4, 1_000_000_000);
        assert_eq!(p.next_event(1_000_000_000), Some(1_000_000_000 + T4));
    }

    #[test]
    fn mode_0_first_byte_stops_count() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        program(&mut p, 2, 0, 4, 0);
        assert!(p.out(2, T4));
        p.write(0x42, 0x10, T4);
        assert!(!p.out(2, T4), "OUT low after the first byte");
        assert!(!p.out(2, 10 * T4));
        p.write(0x42, 0x00, 10 * T4);
        assert_eq!(read_count(&mut p, 2, 10 * T4), 0x10);
    }

    #[test]
    fn mode_1_gate_triggers_one_shot() {
        let mut p = Pit::new();
        program(&mut p, 2, 1, 4, 0);
        assert!(p.out(2, 0), "high until triggered");
        assert!(p.out(2, 100 * T4));
        p.write(0x61, 0x01, 1_000);
        assert!(!p.out(2, 1_000), "low from the trigger");
        assert!(!p.out(2, 1_000 + T4 - 1));
        assert!(p.out(2, 1_000 + T4));
        // Gate low does not stop it; a new rising edge retriggers.
        p.write(0x61, 0x00, 2_000_000);
        p.write(0x61, 0x01, 3_000_000);
        assert!(!p.out(2, 3_000_000));
        assert!(p.out(2, 3_000_000 + T4));
    }

    #[test]
    fn mode_4_strobe_on_irq0() {
        let mut p = Pit::new();
        program(&mut p, 0, 4, 4, 0);
        let t5 = ticks_to_ns(5);
        assert!(p.out(0, T4 - 1));
        assert!(!p.out(0, T4), "low for one clock at count 0");
        assert!(p.out(0, t5));
        assert_eq!(p.next_event(0), Some(t5));
        assert_eq!(p.poll(T4), 0);
        assert_eq!(p.poll(t5), 1);
        assert_eq!(p.next_event(t5), None);
        assert_eq!(p.poll(100 * t5), 0);
    }

    #[test]
    fn mode_5_gate_triggered_strobe() {
        let mut p = Pit::new();
        program(&mut p, 2, 5, 4, 0);
        assert!(p.out(2, 10 * T4));
        p.write(0x61, 0x01, 500);
        assert!(p.out(2, 500 + T4 - 1));
        assert!(!p.out(2, 500 + T4));
        assert!(p.out(2, 500 + ticks_to_ns(5)));
    }

    #[test]
    fn mode_6_acts_as_mode_2() {
        let mut p = Pit::new();
        program(&mut p, 0, 6, 1193, 0);
        assert_eq!(p.next_event(0), Some(T1193));
        assert_eq!(read_count(&mut p, 0, T1000), 193);
        // The status reports the mode bits as written.
        p.write(0x43, 0xE2, T1000);
        assert_eq!(p.read(0x40, T1000), 0x80 | 0x30 | 6 << 1);
    }

    #[test]
    fn counter_latch_holds_value() {
        let mut p = Pit::new();
        program(&mut p, 0, 2, 2386, 0);
        p.write(0x43, 0x00, T1000);
        // Later reads still return the value at clock 1000.
        assert_eq!(p.read(0x40, T2386 - 5), (1386 & 0xFF) as u8);
        // A second latch before the high byte is read is ignored.
        p.write(0x43, 0x00, T1193);
        assert_eq!(p.read(0x40, T2386 - 5), (1386 >> 8) as u8);
        // Then live reads: count at clock 1193 of 2386 is 1193.
        assert_eq!(p.read(0x40, T1193), (1193 & 0xFF) as u8);
        assert_eq!(p.read(0x40, T1193), (1193 >> 8) as u8);
    }

    #[test]
    fn byte_access_modes() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        // Low byte only, mode 0: count 0x80.
        p.write(0x43, 0x90, 0);
        p.write(0x42, 0x80, 0);
        assert_eq!(p.read(0x42, 0), 0x80);
        assert_eq!(
            p.read(0x42, 0),
            0x80,
            "lsb mode: every read is the low byte"
        );
        assert!(!p.out(2, ticks_to_ns(0x7F)));
        assert!(p.out(2, ticks_to_ns(0x80)));
        // High byte only: 0x01 means 0x100.
        p.write(0x43, 0xA0, 0);
        p.write(0x42, 0x01, 0);
        assert_eq!(p.read(0x42, ticks_to_ns(0x10)), 0x00, "high byte of 0xF0");
        assert!(!p.out(2, ticks_to_ns(0xFF)));
        assert!(p.out(2, ticks_to_ns(0x100)));
        // Latch in lsb mode returns one byte, then live reads resume.
        p.write(0x43, 0x80, ticks_to_ns(0x20));
        assert_eq!(p.read(0x42, ticks_to_ns(0x30)), 0x00);
        assert_eq!(p.read(0x42, ticks_to_ns(0x30)), 0x00);
        p.write(0x43, 0x90, 0);
        p.write(0x42, 0x80, 0);
        p.write(0x43, 0x80, ticks_to_ns(0x20));
        assert_eq!(p.read(0x42, ticks_to_ns(0x30)), 0x60, "latched 0x80 - 0x20");
        assert_eq!(p.read(0x42, ticks_to_ns(0x30)), 0x50, "live 0x80 - 0x30");
    }

    #[test]
    fn read_back_status_and_count() {
        let mut p = Pit::new();
        // Control word only: null count, mode 0 OUT low, lo/hi, binary.
        p.write(0x43, 0x30, 0);
        p.write(0x43, 0xE2, 0); // read-back: status of channel 0
        assert_eq!(p.read(0x40, 0), 0x70);
        program(&mut p, 0, 2, 1193, 0);
        p.write(0x43, 0xC2, T1000); // count and status
        assert_eq!(p.read(0x40, T1000), 0x80 | 0x30 | 2 << 1);
        assert_eq!(p.read(0x40, T2386), 193);
        assert_eq!(p.read(0x40, T2386), 0);
        // Status only (bit 5 set), BCD channel 2, mode 1 untriggered.
        p.write(0x43, 0xB3, 0);
        p.write(0x42, 0x04, 0);
        p.write(0x42, 0x00, 0);
        p.write(0x43, 0xE8, 0);
        assert_eq!(p.read(0x42, 0), 0x80 | 0x40 | 0x30 | 1 << 1 | 1);
        // Count only (bit 4 set) of channels 0 and 2.
        p.write(0x43, 0xDA, T1000);
        assert_eq!(read_count(&mut p, 2, T1000), 4);
    }

    #[test]
    fn port_61_bits() {
        let mut p = Pit::new();
        p.write(0x61, 0xFE, 0);
        assert_eq!(p.read(0x61, 0) & 0x0F, 0x0E, "bits 0-3 stored");
        assert_eq!(p.read(0x61, 0) & 0xC0, 0);
        assert_eq!(p.read(0x61, 0) & 0x10, 0);
        assert_eq!(p.read(0x61, REFRESH_NS - 1) & 0x10, 0);
        assert_eq!(p.read(0x61, REFRESH_NS) & 0x10, 0x10);
        assert_eq!(p.read(0x61, 2 * REFRESH_NS) & 0x10, 0);
        // Mode 3 OUT is high with a low gate.
        assert_eq!(p.read(0x61, 0) & 0x20, 0x20);
        assert_eq!(p.read(0x43, 0), 0xFF);
        assert_eq!(p.read(0x44, 0), 0xFF);
    }

    #[test]
    fn save_load_round_trip() {
        let mut p = Pit::new();
        p.write(0x61, 0x01, 0);
        program(&mut p, 0, 2, 1193, 0);
        program(&mut p, 2, 0, 2386, 100);
        p.poll(T1193);
        p.write(0x43, 0x00, T1000);
        let s = p.save();
        let mut q = Pit::new();
        q.load(&s);
        assert_eq!(q.save(), s);
        assert_eq!(q.next_event(T1193), Some(T2386));
        assert_eq!(q.read(0x40, T2386), p.read(0x40, T2386));
        assert_eq!(q.read(0x61, T2386 + 100), 0x21);
    }

    #[test]
    fn load_garbage_does_not_panic() {
        let wild = PitChannelState {
            count: u32::MAX,
            mode: 0xFF,
            access: 0xFF,
            running: true,
            start: u64::MAX,
            base_ticks: u64::MAX,
            edges_seen: u64::MAX,
            read_state: 0xFF,
            write_state: 0xFF,
            latch_state: 0xFF,
            ..PitChannelState::default()
        };
        let mut p = Pit::new();
        p.load(&PitState {
            channels: [wild.clone(), wild.clone(), wild],
            port61: 0xFF,
        });
        for now in [0, u64::MAX] {
            p.poll(now);
            p.next_event(now);
            for port in [0x40, 0x41, 0x42, 0x61] {
                p.read(port, now);
            }
        }
        assert_eq!(p.save().channels[0].count, 0x1_0000);
        assert_eq!(p.save().port61, 0x0F);
        assert_eq!(p.save().channels[0].mode, 7);
    }
}
