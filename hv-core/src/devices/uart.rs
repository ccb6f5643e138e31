//! A 16550A UART as far as a polling guest sees it: transmit is always
//! ready, nothing is ever received, the divisor latch and the scratch,
//! line-control and modem-control registers hold what is written.
//! Transmitted bytes are collected for the VM to print.

use super::{Device, DeviceCtx, RegionIndex, StateError};
use alloc::vec::Vec;

const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;
/// At most this much output is buffered before the oldest is dropped.
const MAX_OUTPUT: usize = 64 * 1024;

/// The UART's register state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uart16550 {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub divisor: u16,
    output: Vec<u8>,
    /// Bytes dropped because the output buffer was full.
    pub dropped: u64,
}

impl Uart16550 {
    /// A UART after reset.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.output)
    }
}

/// A guest's console line as text for the operator's terminal: the line's
/// trailing CR dropped, every other control character (ESC, BEL, BS, NUL,
/// a bare CR...) and DEL shown as `\xNN`, so a guest cannot move the
/// cursor, ring the bell or overwrite Tern's own lines.
pub fn escape_line(line: &[u8]) -> alloc::string::String {
    use core::fmt::Write;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = alloc::string::String::from_utf8_lossy(line);
    let mut out = alloc::string::String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\t') || c == '\u{7f}' {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

crate::vmstate! {
    /// The UART's migration section (the registers a guest set; transmitted
    /// bytes are already out).
    #[derive(Clone, Debug, PartialEq)]
    pub struct UartWire as "serial", version 2, minimum 2 {
        pub ier: u8,
        pub lcr: u8,
        pub mcr: u8,
        pub scr: u8,
        pub divisor: u16,
    }
}

impl Uart16550 {
    fn wire(&self) -> UartWire {
        UartWire {
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            scr: self.scr,
            divisor: self.divisor,
        }
    }
}

impl Device for Uart16550 {
    fn read(&mut self, _ctx: &mut DeviceCtx, _r: RegionIndex, offset: u64, _size: u8) -> u64 {
        let dlab = self.lcr & LCR_DLAB != 0;
        u64::from(match offset {
            0 if dlab => self.divisor as u8,
            1 if dlab => (self.divisor >> 8) as u8,
            0 => 0, // receive buffer: never anything
            1 => self.ier,
            2 => 0xC1, // IIR: FIFOs enabled, no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT,
            6 => 0xB0, // MSR: DCD, DSR, CTS
            7 => self.scr,
            _ => 0xff,
        })
    }

    fn write(&mut self, _ctx: &mut DeviceCtx, _r: RegionIndex, offset: u64, _size: u8, value: u64) {
        let v = value as u8;
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            1 if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(v) << 8),
            0 => {
                if self.output.len() >= MAX_OUTPUT {
                    self.output.remove(0);
                    self.dropped += 1;
                }
                self.output.push(v);
            }
            1 => self.ier = v & 0x0f,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {}
        }
    }

    fn state_version(&self) -> u32 {
        <UartWire as crate::vmstate::VmState>::VERSION
    }

    fn save_described(&self) -> Option<(alloc::vec::Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut self.wire()).ok()
    }

    fn load(&mut self, _ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        let w: UartWire = crate::vmstate::load(data, version)?;
        let (ier, lcr, mcr, scr, divisor) = (w.ier, w.lcr, w.mcr, w.scr, w.divisor);
        if ier & !0x0f != 0 || mcr & !0x1f != 0 {
            return Err(StateError::Invalid("UART IER or MCR reserved bits"));
        }
        (self.ier, self.lcr, self.mcr, self.scr, self.divisor) = (ier, lcr, mcr, scr, divisor);
        Ok(())
    }

    fn duplicate(&self) -> Option<alloc::boxed::Box<dyn Device>> {
        Some(alloc::boxed::Box::new(self.clone()))
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Harness;

    #[test]
    fn divisor_latch_and_transmit() {
        let mut h = Harness::new();
        let mut u = Uart16550::new();
        h.write(&mut u, 0, 3, 1, 0x80);
        h.write(&mut u, 0, 0, 1, 0x01);
        h.write(&mut u, 0, 1, 1, 0x00);
        assert_eq!(u.divisor, 1);
        assert_eq!(h.read(&mut u, 0, 0, 1), 1, "DLAB reads the divisor");
        h.write(&mut u, 0, 3, 1, 0x03);
        h.write(&mut u, 0, 0, 1, u64::from(b'o'));
        h.write(&mut u, 0, 0, 1, u64::from(b'k'));
        assert_eq!(
            h.read(&mut u, 0, 5, 1) & 0x20,
            0x20,
            "transmit holding register empty"
        );
        assert_eq!(u.take_output(), b"ok");
        assert!(u.take_output().is_empty());
        h.write(&mut u, 0, 7, 1, 0x5a);
        assert_eq!(h.read(&mut u, 0, 7, 1), 0x5a);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_line(b"ok\r"), "ok");
        assert_eq!(
            escape_line(b"\x1b[2J\rtern: exit status 0\x07\x08\x00\t."),
            "\\x1b[2J\\x0dtern: exit status 0\\x07\\x08\\x00\t."
        );
        assert_eq!(escape_line("é\u{7f}".as_bytes()), "é\\x7f");
    }

    #[test]
    fn state_round_trips_and_bad_state_changes_nothing() {
        let mut h = Harness::new();
        let mut u = Uart16550::new();
        h.write(&mut u, 0, 3, 1, 0x83);
        h.write(&mut u, 0, 0, 1, 0x0C);
        h.write(&mut u, 0, 7, 1, 0x42);
        let mut saved = alloc::vec::Vec::new();
        u.save(&mut saved);
        let mut v = Uart16550::new();
        let ver = u.state_version();
        h.with(|c| v.load(c, ver, &saved)).unwrap();
        assert_eq!((v.lcr, v.divisor, v.scr), (0x83, 0x0C, 0x42));
        let mut bad = saved.clone();
        bad[0] = 0xF0;
        let mut w = Uart16550::new();
        assert!(h.with(|c| w.load(c, ver, &bad)).is_err());
        assert!(h.with(|c| w.load(c, ver + 1, &saved)).is_err());
        assert!(h.with(|c| w.load(c, ver, &saved[..5])).is_err());
        assert_eq!(w, Uart16550::new());
    }
}
