//! The MC146818 real-time clock and CMOS RAM (Motorola MC146818A
//! datasheet) at ports 0x70 (index; bit 7 disables NMI, stored only) and
//! 0x71 (data), with the PC's century byte at 0x32. Its interrupt is ISA
//! IRQ 8.
//!
//! The clock is `unix_secs` given at creation plus virtual time plus an
//! offset that guest writes change; registers are computed from it in UTC.
//! Flags (register C) are brought up to date lazily from the caller's
//! `now` on every access; periodic ticks are counted on a 32.768 kHz
//! time base from virtual time 0, updates happen on whole clock seconds.
//!
//! Not emulated: the divider bits of register A (stored; the oscillator
//! always runs at 32.768 kHz), the square-wave output, daylight saving
//! (DSE is stored only), the day-of-week counter (computed from the date;
//! guest writes are stored while SET is 1 but not kept afterwards), the
//! update cycle's length (an update is instantaneous at the second
//! boundary, UIP is set for the 244 µs before it), dates after 2554 (the
//! clock is a u64 of nanoseconds; later settings saturate). The alarm is checked
//! at each update as on the chip, but a halted guest waiting for one is
//! woken every second (see [`Rtc::next_event`]).

use super::Nanos;
use alloc::vec::Vec;

/// The RTC's ISA interrupt line.
pub const RTC_IRQ: u8 = 8;
/// Bytes of CMOS RAM, clock registers included.
pub const CMOS_SIZE: usize = 128;

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;
/// UIP is set this long before each update (datasheet: 244 µs).
const UIP_NS: u64 = 244_000;
const OSC_HZ: u64 = 32_768;

const SEC: u8 = 0x00;
const SEC_ALARM: u8 = 0x01;
const MIN: u8 = 0x02;
const MIN_ALARM: u8 = 0x03;
const HOUR: u8 = 0x04;
const HOUR_ALARM: u8 = 0x05;
const WDAY: u8 = 0x06;
const MDAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
/// Register D: valid RAM and time.
const D_VRT: u8 = 0x80;

/// The clock registers, computed rather than stored (except while SET).
fn is_clock_reg(i: u8) -> bool {
    matches!(i, SEC | MIN | HOUR | WDAY | MDAY | MONTH | YEAR | CENTURY)
}

/// Days since 1970-01-01 to (year, month, day) (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month 1..=12, day 1..=31) to days since 1970-01-01; a day past
/// the month's end runs into the next month.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = year - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// 32.768 kHz oscillator cycles before virtual time `t`.
fn cycles(t: Nanos) -> u64 {
    (u128::from(t) * u128::from(OSC_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first virtual time at which `c` cycles have elapsed.
fn cycle_time(c: u64) -> Nanos {
    let ns = (u128::from(c) * u128::from(NS_PER_SEC)).div_ceil(u128::from(OSC_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The RTC's registers and clock; the save/load format of [`Rtc`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RtcState {
    /// The 128 CMOS bytes. Clock registers hold what the guest wrote while
    /// SET was 1; register C holds the flags; A's UIP and D are computed.
    pub cmos: Vec<u8>,
    pub index: u8,
    pub nmi_disabled: bool,
    /// The clock at virtual time 0, ns since the Unix epoch.
    pub base_ns: u64,
    /// Added to `base_ns + now` by guest writes to the clock.
    pub offset_ns: i64,
    /// Virtual time up to which register C is up to date.
    pub last: Nanos,
    /// IRQF rose since the last poll.
    pub irq_pending: bool,
}

/// The MC146818 RTC with its CMOS RAM.
#[derive(Clone, Debug)]
pub struct Rtc {
    cmos: [u8; CMOS_SIZE],
    index: u8,
    nmi_disabled: bool,
    base_ns: u64,
    offset_ns: i64,
    last: Nanos,
    irq_pending: bool,
}

/// The clock registers of one moment, as the chip shows them.
#[derive(Clone, Copy)]
struct Fields {
    sec: u8,
    min: u8,
    hour: u8,
    wday: u8,
    mday: u8,
    month: u8,
    year: u8,
    century: u8,
}

impl Rtc {
    /// An RTC whose clock reads `unix_secs` (UTC) at virtual time 0, with
    /// A = 0x26 (32.768 kHz, 1024 Hz rate), B = 0x02 (24-hour, BCD), as
    /// QEMU resets it; the rest of CMOS is 0.
    pub fn new(unix_secs: u64) -> Self {
        let mut cmos = [0; CMOS_SIZE];
        cmos[usize::from(REG_A)] = 0x26;
        cmos[usize::from(REG_B)] = B_24H;
        Self {
            cmos,
            index: 0,
            nmi_disabled: false,
            base_ns: unix_secs.saturating_mul(NS_PER_SEC),
            offset_ns: 0,
            last: 0,
            irq_pending: false,
        }
    }

    fn reg(&self, i: u8) -> u8 {
        self.cmos[usize::from(i & 0x7F)]
    }

    fn set_reg(&mut self, i: u8, v: u8) {
        self.cmos[usize::from(i & 0x7F)] = v;
    }

    fn setting(&self) -> bool {
        self.reg(REG_B) & B_SET != 0
    }

    /// The clock at virtual time `now`, ns since the Unix epoch.
    fn clock_ns(&self, now: Nanos) -> u64 {
        let t = i128::from(self.base_ns) + i128::from(now) + i128::from(self.offset_ns);
        t.clamp(0, i128::from(u64::MAX)) as u64
    }

    fn clock_secs(&self, now: Nanos) -> u64 {
        self.clock_ns(now) / NS_PER_SEC
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_DM_BINARY != 0
    }

    fn enc(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn dec(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0x0F)
        }
    }

    fn enc_hour(&self, h: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.enc(h);
        }
        let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
        self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
    }

    fn dec_hour(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.dec(v);
        }
        self.dec(v & 0x7F) % 12 + if v & 0x80 != 0 { 12 } else { 0 }
    }

    /// The registers showing Unix time `secs`.
    fn fields(&self, secs: u64) -> Fields {
        let days = (secs / SECS_PER_DAY) as i64;
        let tod = secs % SECS_PER_DAY;
        let (year, month, mday) = civil_from_days(days);
        Fields {
            sec: self.enc((tod % 60) as u8),
            min: self.enc((tod / 60 % 60) as u8),
            hour: self.enc_hour((tod / 3600) as u8),
            // 1970-01-01 was a Thursday; Sunday is 1.
            wday: self.enc(((days + 4) % 7 + 1) as u8),
            mday: self.enc(mday),
            month: self.enc(month),
            year: self.enc(year.rem_euclid(100) as u8),
            century: self.enc((year / 100).rem_euclid(100) as u8),
        }
    }

    /// The Unix time registers show, out-of-range fields cut to the
    /// nearest valid value, times before 1970 to 1970.
    fn secs_of(&self, f: &Fields) -> u64 {
        let year =
            i64::from(self.dec(f.century).min(99)) * 100 + i64::from(self.dec(f.year).min(99));
        let days = days_from_civil(
            year,
            self.dec(f.month).clamp(1, 12),
            self.dec(f.mday).clamp(1, 31),
        );
        let secs = days * SECS_PER_DAY as i64
            + i64::from(self.dec_hour(f.hour).min(23)) * 3600
            + i64::from(self.dec(f.min).min(59)) * 60
            + i64::from(self.dec(f.sec).min(59));
        secs.max(0) as u64
    }

    fn stored_fields(&self) -> Fields {
        Fields {
            sec: self.reg(SEC),
            min: self.reg(MIN),
            hour: self.reg(HOUR),
            wday: self.reg(WDAY),
            mday: self.reg(MDAY),
            month: self.reg(MONTH),
            year: self.reg(YEAR),
            century: self.reg(CENTURY),
        }
    }

    fn store_fields(&mut self, f: &Fields) {
        for (i, v) in [
            (SEC, f.sec),
            (MIN, f.min),
            (HOUR, f.hour),
            (WDAY, f.wday),
            (MDAY, f.mday),
            (MONTH, f.month),
            (YEAR, f.year),
            (CENTURY, f.century),
        ] {
            self.set_reg(i, v);
        }
    }

    /// Makes the clock read `secs` at `now`, keeping `frac` ns of the
    /// current second.
    fn set_clock(&mut self, secs: u64, frac: u64, now: Nanos) {
        let want = i128::from(secs) * i128::from(NS_PER_SEC) + i128::from(frac);
        let off = want - i128::from(self.base_ns) - i128::from(now);
        self.offset_ns = off.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    }

    /// Cycles per periodic interrupt from register A's rate select.
    fn period_cycles(&self) -> Option<u64> {
        match self.reg(REG_A) & 0x0F {
            0 => None,
            // Rates 1 and 2 repeat 8 and 9 at 32.768 kHz.
            rs @ 1..=2 => Some(1 << (rs + 6)),
            rs => Some(1 << (rs - 1)),
        }
    }

    /// Whether the alarm registers match the clock at `secs` (0xC0-0xFF
    /// is "don't care").
    fn alarm_matches(&self, secs: u64) -> bool {
        let f = self.fields(secs);
        [(SEC_ALARM, f.sec), (MIN_ALARM, f.min), (HOUR_ALARM, f.hour)]
            .iter()
            .all(|&(reg, now)| {
                let a = self.reg(reg);
                a & 0xC0 == 0xC0 || a == now
            })
    }

    fn update_irqf(&mut self) {
        let c = self.reg(REG_C);
        if c & self.reg(REG_B) & (C_PF | C_AF | C_UF) != 0 && c & C_IRQF == 0 {
            self.set_reg(REG_C, c | C_IRQF);
            self.irq_pending = true;
        }
    }

    /// Brings register C up to `now`.
    fn advance(&mut self, now: Nanos) {
        if now <= self.last {
            return;
        }
        let prev = core::mem::replace(&mut self.last, now);
        let mut c = self.reg(REG_C);
        if let Some(p) = self.period_cycles() {
            if cycles(now) / p > cycles(prev) / p {
                c |= C_PF;
            }
        }
        if !self.setting() {
            let (s0, s1) = (self.clock_secs(prev), self.clock_secs(now));
            if s1 > s0 {
                c |= C_UF;
                // Each time of day is checked once at most: a day's worth
                // of updates covers them all.
                let first = s1 - (s1 - s0).min(SECS_PER_DAY) + 1;
                if (first..=s1).any(|s| self.alarm_matches(s)) {
                    c |= C_AF;
                }
            }
        }
        self.set_reg(REG_C, c);
        self.update_irqf();
    }

    /// Reads port 0x71 (the selected CMOS byte); 0x70 and other ports read
    /// 0xFF.
    pub fn read(&mut self, port: u16, now: Nanos) -> u8 {
        if port != 0x71 {
            return 0xFF;
        }
        self.advance(now);
        match self.index {
            i if is_clock_reg(i) && !self.setting() => {
                let f = self.fields(self.clock_secs(now));
                match i {
                    SEC => f.sec,
                    MIN => f.min,
                    HOUR => f.hour,
                    WDAY => f.wday,
                    MDAY => f.mday,
                    MONTH => f.month,
                    YEAR => f.year,
                    _ => f.century,
                }
            }
            REG_A => {
                let frac = self.clock_ns(now) % NS_PER_SEC;
                let uip = !self.setting() && frac >= NS_PER_SEC - UIP_NS;
                self.reg(REG_A) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let c = self.reg(REG_C);
                self.set_reg(REG_C, 0);
                c
            }
            REG_D => D_VRT,
            i => self.reg(i),
        }
    }

    /// Writes port 0x70 (index, NMI disable) or 0x71 (data); others are
    /// ignored.
    pub fn write(&mut self, port: u16, v: u8, now: Nanos) {
        match port {
            0x70 => {
                self.index = v & 0x7F;
                self.nmi_disabled = v & 0x80 != 0;
            }
            0x71 => {
                self.advance(now);
                self.write_reg(self.index, v, now);
            }
            _ => {}
        }
    }

    fn write_reg(&mut self, i: u8, v: u8, now: Nanos) {
        match i {
            // While SET is 1 the clock registers are plain storage, read
            // into the clock when SET is cleared.
            i if is_clock_reg(i) && self.setting() => self.set_reg(i, v),
            i if is_clock_reg(i) => {
                let ns = self.clock_ns(now);
                let mut f = self.fields(ns / NS_PER_SEC);
                match i {
                    SEC => f.sec = v,
                    MIN => f.min = v,
                    HOUR => f.hour = v,
                    WDAY => return, // computed from the date
                    MDAY => f.mday = v,
                    MONTH => f.month = v,
                    YEAR => f.year = v,
                    _ => f.century = v,
                }
                let secs = self.secs_of(&f);
                self.set_clock(secs, ns % NS_PER_SEC, now);
            }
            REG_A => {
                let v = v & !A_UIP;
                self.set_reg(REG_A, v);
            }
            REG_B => {
                let old = self.reg(REG_B);
                // Setting SET clears UIE (datasheet, register B).
                let v = if v & B_SET != 0 { v & !B_UIE } else { v };
                self.set_reg(REG_B, v);
                if old & B_SET == 0 && v & B_SET != 0 {
                    let f = self.fields(self.clock_secs(now));
                    self.store_fields(&f);
                } else if old & B_SET != 0 && v & B_SET == 0 {
                    let secs = self.secs_of(&self.stored_fields());
                    self.set_clock(secs, 0, now);
                }
                self.update_irqf();
            }
            REG_C | REG_D => {} // read-only
            i => self.set_reg(i, v),
        }
    }

    /// Whether port 0x70's bit 7 (NMI disable) was last written as 1.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Stores a CMOS byte for the machine (memory sizes, boot settings).
    /// Clock and status registers (0x00-0x0D, 0x32) are not touched.
    pub fn set_cmos(&mut self, index: u8, v: u8) {
        let i = index & 0x7F;
        if i > REG_D && i != CENTURY {
            self.set_reg(i, v);
        }
    }

    /// Brings the flags up to `now`; true if IRQF rose since the last
    /// poll, i.e. IRQ 8 should be raised. IRQF stays set until the guest
    /// reads register C, so an unread interrupt is not raised again.
    pub fn poll(&mut self, now: Nanos) -> bool {
        self.advance(now);
        core::mem::take(&mut self.irq_pending)
    }

    /// When the next enabled interrupt may happen (`now` if one is already
    /// due), or `None` if none can until the guest reads register C or
    /// enables one. With AIE set this is the next update, each second.
    pub fn next_event(&self, now: Nanos) -> Option<Nanos> {
        if self.irq_pending {
            return Some(now);
        }
        let b = self.reg(REG_B);
        if self.reg(REG_C) & C_IRQF != 0 {
            return None;
        }
        let mut next: Option<Nanos> = None;
        if b & B_PIE != 0 {
            if let Some(p) = self.period_cycles() {
                let k = cycles(self.last) / p + 1;
                next = Some(cycle_time(k.saturating_mul(p)));
            }
        }
        if b & (B_UIE | B_AIE) != 0 && b & B_SET == 0 {
            let into = self.clock_ns(self.last) % NS_PER_SEC;
            let at = self.last.saturating_add(NS_PER_SEC - into);
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        next.map(|t| t.max(now))
    }

    /// All registers, for migration.
    pub fn save(&self) -> RtcState {
        RtcState {
            cmos: self.cmos.to_vec(),
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            base_ns: self.base_ns,
            offset_ns: self.offset_ns,
            last: self.last,
            irq_pending: self.irq_pending,
        }
    }

    /// Restores a state saved by [`save`](Self::save). CMOS bytes beyond
    /// 128 are ignored, missing ones read 0.
    pub fn load(&mut self, s: &RtcState) {
        self.cmos = [0; CMOS_SIZE];
        let n = s.cmos.len().min(CMOS_SIZE);
        self.cmos[..n].copy_from_slice(&s.cmos[..n]);
        self.cmos[usize::from(REG_A)] &= !A_UIP;
        self.index = s.index & 0x7F;
        self.nmi_disabled = s.nmi_disabled;
        self.base_ns = s.base_ns;
        self.offset_ns = s.offset_ns;
        self.last = s.last;
        self.irq_pending = s.irq_pending;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-14 22:13:20 UTC, a Tuesday: 19675 days (19675 % 7 = 5 days
    /// after a Thursday) and 80000 s.
    const T0: u64 = 1_700_000_000;
    const S: u64 = NS_PER_SEC;

    fn get(r: &mut Rtc, i: u8, now: Nanos) -> u8 {
        r.write(0x70, i, now);
        r.read(0x71, now)
    }

    fn put(r: &mut Rtc, i: u8, v: u8, now: Nanos) {
        r.write(0x70, i, now);
        r.write(0x71, v, now);
    }

    /// sec, min, hour, wday, mday, month, year, century.
    fn clock(r: &mut Rtc, now: Nanos) -> [u8; 8] {
        [SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY].map(|i| get(r, i, now))
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_675), (2023, 11, 14));
        // 2000-02-29: 30 years incl. 7 leap days, + 31 + 28 days.
        assert_eq!(civil_from_days(30 * 365 + 7 + 59), (2000, 2, 29));
        assert_eq!(days_from_civil(2000, 3, 1), 30 * 365 + 7 + 60);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        // 31 February 2023 is 3 March.
        assert_eq!(days_from_civil(2023, 2, 31), days_from_civil(2023, 3, 3));
    }

    #[test]
    fn reset_registers() {
        let mut r = Rtc::new(T0);
        assert_eq!(get(&mut r, REG_A, 0), 0x26);
        assert_eq!(get(&mut r, REG_B, 0), 0x02);
        assert_eq!(get(&mut r, REG_C, 0), 0x00);
        assert_eq!(get(&mut r, REG_D, 0), 0x80);
        assert_eq!(r.read(0x70, 0), 0xFF);
        assert_eq!(r.read(0x72, 0), 0xFF);
    }

    #[test]
    fn bcd_24_hour() {
        let mut r = Rtc::new(T0);
        assert_eq!(
            clock(&mut r, 0),
            [0x20, 0x13, 0x22, 0x03, 0x14, 0x11, 0x23, 0x20]
        );
        // 45 s later: 22:14:05.
        assert_eq!(clock(&mut r, 45 * S)[..3], [0x05, 0x14, 0x22]);
        assert_eq!(clock(&mut r, 46 * S - 1)[0], 0x05);
    }

    #[test]
    fn binary_and_12_hour() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_B, 0x06, 0);
        assert_eq!(clock(&mut r, 0), [20, 13, 22, 3, 14, 11, 23, 20]);
        // 12-hour binary: 22h is 10 PM.
        put(&mut r, REG_B, 0x04, 0);
        assert_eq!(get(&mut r, HOUR, 0), 0x80 | 10);
        // 12-hour BCD.
        put(&mut r, REG_B, 0x00, 0);
        assert_eq!(get(&mut r, HOUR, 0), 0x90);
        // Midnight is 12 AM, noon 12 PM, 01:00 is 1 AM.
        let mut m = Rtc::new(T0 - 80_000);
        put(&mut m, REG_B, 0x00, 0);
        assert_eq!(get(&mut m, HOUR, 0), 0x12);
        assert_eq!(get(&mut m, HOUR, 3_600 * S), 0x01);
        assert_eq!(get(&mut m, HOUR, 43_200 * S), 0x92);
        put(&mut m, REG_B, 0x02, 0);
        assert_eq!(get(&mut m, HOUR, 0), 0x00);
    }

    #[test]
    fn century_rollover() {
        // 2099-12-31 23:59:59, a Thursday; 2100-01-01 is a Friday.
        let mut r = Rtc::new(4_102_444_799);
        assert_eq!(
            clock(&mut r, 0),
            [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]
        );
        assert_eq!(
            clock(&mut r, S),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]
        );
    }

    #[test]
    fn set_mode_sets_the_clock() {
        let mut r = Rtc::new(T0);
        let t = 2 * S + 300_000_000;
        put(&mut r, REG_B, 0x82, t);
        assert_eq!(get(&mut r, REG_B, t), 0x82);
        get(&mut r, REG_C, t);
        for (i, v) in [
            (YEAR, 0x24),
            (MONTH, 0x02),
            (MDAY, 0x29),
            (HOUR, 0x12),
            (MIN, 0x00),
            (SEC, 0x00),
        ] {
            put(&mut r, i, v, t);
        }
        // Frozen while SET: the written values, and no update flag.
        assert_eq!(get(&mut r, SEC, t + 5 * S), 0x00);
        assert_eq!(get(&mut r, MDAY, t + 5 * S), 0x29);
        assert_eq!(get(&mut r, REG_A, t + S - 1), 0x26, "no UIP while SET");
        assert_eq!(get(&mut r, REG_C, t + 5 * S) & C_UF, 0);
        let t1 = t + 6 * S;
        put(&mut r, REG_B, 0x02, t1);
        // 2024-02-29 was a Thursday; the clock restarts at 12:00:00.000.
        assert_eq!(
            clock(&mut r, t1 + 1_500_000_000),
            [0x01, 0x00, 0x12, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        assert_eq!(get(&mut r, SEC, t1 + S - 1), 0x00);
    }

    #[test]
    fn month_then_day_in_set_mode_does_not_roll_over() {
        // 2023-01-31, then set February 15th field by field.
        let mut r = Rtc::new(1_675_123_200);
        assert_eq!(clock(&mut r, 0)[4..6], [0x31, 0x01]);
        put(&mut r, REG_B, 0x82, 0);
        put(&mut r, MONTH, 0x02, 0);
        put(&mut r, MDAY, 0x15, 0);
        put(&mut r, REG_B, 0x02, 0);
        assert_eq!(clock(&mut r, 0)[4..6], [0x15, 0x02]);
    }

    #[test]
    fn write_while_running_keeps_the_phase() {
        let mut r = Rtc::new(T0);
        // At 22:13:20.4 set seconds to 59: 22:14:00 comes 0.6 s later.
        put(&mut r, SEC, 0x59, 400_000_000);
        assert_eq!(clock(&mut r, 999_999_999)[..3], [0x59, 0x13, 0x22]);
        assert_eq!(clock(&mut r, S)[..3], [0x00, 0x14, 0x22]);
        // Day of week writes are ignored: it follows the date.
        put(&mut r, WDAY, 0x07, S);
        assert_eq!(get(&mut r, WDAY, S), 0x03);
    }

    #[test]
    fn garbage_time_is_cut_to_valid_values() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_B, 0x82, 0);
        for i in [SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR] {
            put(&mut r, i, 0xFF, 0);
        }
        put(&mut r, REG_B, 0x02, 0);
        // BCD 0xFF decodes to 165: cut to 2099-12-31 23:59:59, a Thursday.
        assert_eq!(
            clock(&mut r, 0),
            [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]
        );
        // Before 1970 is cut to the epoch.
        put(&mut r, REG_B, 0x82, 0);
        put(&mut r, CENTURY, 0x19, 0);
        put(&mut r, YEAR, 0x00, 0);
        put(&mut r, MONTH, 0x00, 0);
        put(&mut r, REG_B, 0x02, 0);
        assert_eq!(
            clock(&mut r, 0),
            [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x70, 0x19]
        );
    }

    #[test]
    fn uip_in_the_last_244_us() {
        let mut r = Rtc::new(T0);
        assert_eq!(get(&mut r, REG_A, 999_755_999), 0x26);
        assert_eq!(get(&mut r, REG_A, 999_756_000), 0xA6);
        assert_eq!(get(&mut r, REG_A, S - 1), 0xA6);
        assert_eq!(get(&mut r, REG_A, S), 0x26);
        // UIP is read-only.
        put(&mut r, REG_A, 0xA3, S);
        assert_eq!(get(&mut r, REG_A, S), 0x23);
    }

    #[test]
    fn periodic_interrupt() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_B, 0x42, 0);
        // Rate 6: 32 cycles = 976562.5 ns.
        assert_eq!(r.next_event(0), Some(976_563));
        assert!(!r.poll(976_562));
        assert!(r.poll(976_563));
        assert!(!r.poll(976_563));
        // Not acknowledged: no further interrupt, nothing to wait for.
        assert!(!r.poll(1_953_125));
        assert_eq!(r.next_event(1_953_125), None);
        assert_eq!(get(&mut r, REG_C, 1_953_125), 0xC0);
        assert_eq!(get(&mut r, REG_C, 1_953_125), 0x00, "read clears");
        // Third period ends at 3 * 976562.5 ns.
        assert_eq!(r.next_event(1_953_125), Some(2_929_688));
        assert!(r.poll(2_929_688));
    }

    #[test]
    fn periodic_rates() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_B, 0x42, 0);
        // Rate 1 repeats rate 8: 128 cycles = 3.90625 ms.
        put(&mut r, REG_A, 0x21, 0);
        assert_eq!(r.next_event(0), Some(3_906_250));
        // Rate 3: 4 cycles = 122070.3125 ns.
        put(&mut r, REG_A, 0x23, 0);
        assert_eq!(r.next_event(0), Some(122_071));
        // Rate 15: 16384 cycles = 0.5 s.
        put(&mut r, REG_A, 0x2F, 0);
        assert_eq!(r.next_event(0), Some(500_000_000));
        put(&mut r, REG_A, 0x20, 0);
        assert_eq!(r.next_event(0), None, "rate 0: no periodic interrupt");
        assert!(!r.poll(10 * S));
    }

    #[test]
    fn flags_without_enables() {
        let mut r = Rtc::new(T0);
        // PF and UF are set whether or not enabled; no IRQF.
        assert!(!r.poll(S));
        assert_eq!(r.next_event(S), None);
        assert_eq!(get(&mut r, REG_C, S), C_PF | C_UF);
        // Enabling PIE with PF pending raises at once.
        assert!(!r.poll(S + 976_563));
        put(&mut r, REG_B, 0x42, S + 976_563);
        assert!(r.poll(S + 976_563));
        assert_eq!(get(&mut r, REG_C, S + 976_563), 0xC0);
    }

    #[test]
    fn update_interrupt() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_A, 0x20, 0);
        put(&mut r, REG_B, 0x12, 300);
        assert_eq!(r.next_event(300), Some(S));
        assert!(!r.poll(S - 1));
        assert!(r.poll(S));
        assert_eq!(get(&mut r, REG_C, S), 0x90);
        assert_eq!(r.next_event(S), Some(2 * S));
        // SET clears UIE.
        put(&mut r, REG_B, 0x92, S);
        assert_eq!(get(&mut r, REG_B, S), 0x82);
        assert_eq!(r.next_event(S), None);
    }

    #[test]
    fn alarm_interrupt() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_A, 0x20, 0);
        put(&mut r, SEC_ALARM, 0x25, 0);
        put(&mut r, MIN_ALARM, 0x13, 0);
        put(&mut r, HOUR_ALARM, 0x22, 0);
        put(&mut r, REG_B, 0x22, 0);
        assert_eq!(r.next_event(0), Some(S), "woken at each update");
        assert!(!r.poll(5 * S - 1));
        assert!(r.poll(5 * S));
        assert_eq!(get(&mut r, REG_C, 5 * S), C_IRQF | C_AF | C_UF);
        assert!(!r.poll(6 * S));
        // A stall across the alarm second still sets AF.
        let mut late = Rtc::new(T0);
        for i in [SEC_ALARM, MIN_ALARM, HOUR_ALARM] {
            put(&mut late, i, get(&mut r, i, 0), 0);
        }
        put(&mut late, REG_B, 0x22, 0);
        assert!(late.poll(3_600 * S));
        assert_eq!(get(&mut late, REG_C, 3_600 * S) & C_AF, C_AF);
    }

    #[test]
    fn alarm_dont_care() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_A, 0x20, 0);
        // Any hour and minute, second 0x21.
        put(&mut r, SEC_ALARM, 0x21, 0);
        put(&mut r, MIN_ALARM, 0xC0, 0);
        put(&mut r, HOUR_ALARM, 0xFF, 0);
        put(&mut r, REG_B, 0x22, 0);
        assert!(r.poll(S));
        get(&mut r, REG_C, S);
        // 22:13:22 does not match.
        assert!(!r.poll(2 * S));
        assert_eq!(get(&mut r, REG_C, 2 * S), C_UF);
        assert!(r.poll(61 * S), "22:14:21");
    }

    #[test]
    fn cmos_storage_and_index() {
        let mut r = Rtc::new(T0);
        r.set_cmos(0x15, 0x80);
        r.set_cmos(0x34 | 0x80, 0x12);
        r.set_cmos(SEC, 0x99);
        r.set_cmos(REG_B, 0x99);
        assert_eq!(get(&mut r, 0x15, 0), 0x80);
        assert_eq!(get(&mut r, 0x34, 0), 0x12);
        assert_eq!(get(&mut r, REG_B, 0), 0x02);
        assert_eq!(get(&mut r, SEC, 0), 0x20);
        // Index bit 7 is NMI disable, not part of the index.
        r.write(0x70, 0x80 | 0x15, 0);
        assert!(r.nmi_disabled());
        assert_eq!(r.read(0x71, 0), 0x80);
        put(&mut r, 0x7F, 0xAB, 0);
        assert!(!r.nmi_disabled());
        assert_eq!(get(&mut r, 0x7F, 0), 0xAB);
        // C and D are read-only.
        put(&mut r, REG_C, 0xFF, 0);
        put(&mut r, REG_D, 0x00, 0);
        assert_eq!((get(&mut r, REG_C, 0), get(&mut r, REG_D, 0)), (0, 0x80));
    }

    #[test]
    fn save_load_round_trip() {
        let mut r = Rtc::new(T0);
        put(&mut r, REG_B, 0x46, 0);
        put(&mut r, SEC, 30, 0);
        r.set_cmos(0x5B, 0x44);
        r.poll(500_000_000);
        let s = r.save();
        let mut q = Rtc::new(0);
        q.load(&s);
        assert_eq!(q.save(), s);
        assert_eq!(clock(&mut q, 2 * S), clock(&mut r, 2 * S));
        assert_eq!(q.poll(3 * S), r.poll(3 * S));
        assert_eq!(get(&mut q, 0x5B, 3 * S), 0x44);
    }

    #[test]
    fn load_odd_state_does_not_panic() {
        let mut r = Rtc::new(T0);
        r.load(&RtcState {
            cmos: alloc::vec![0xFF; 3],
            index: 0xFF,
            base_ns: u64::MAX,
            offset_ns: i64::MAX,
            last: u64::MAX - 1,
            ..RtcState::default()
        });
        assert_eq!(r.save().cmos.len(), CMOS_SIZE);
        assert_eq!(r.save().index, 0x7F);
        for now in [0, u64::MAX] {
            r.poll(now);
            r.next_event(now);
            for i in 0..0x80 {
                get(&mut r, i, now);
                put(&mut r, i, 0xFF, now);
            }
        }
        r.load(&RtcState {
            cmos: alloc::vec![0xFF; 300],
            offset_ns: i64::MIN,
            ..RtcState::default()
        });
        assert_eq!(r.save().cmos[0x20], 0xFF);
        assert_eq!(get(&mut r, YEAR, 0), 0xFF, "SET is 1: the stored byte");
    }
}
