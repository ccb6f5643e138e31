//! A 16550A UART as far as a polling guest sees it: transmit is always
//! ready, nothing is ever received, the divisor latch and the scratch,
//! line-control and modem-control registers hold what is written.
//! Transmitted bytes are collected for the VM to print.

use super::{Device, DeviceOutcome};
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

impl Device for Uart16550 {
    fn read(&mut self, offset: u64, _size: u8) -> u64 {
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

    fn write(&mut self, offset: u64, _size: u8, value: u64) -> DeviceOutcome {
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
        DeviceOutcome::Done
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisor_latch_and_transmit() {
        let mut u = Uart16550::new();
        u.write(3, 1, 0x80);
        u.write(0, 1, 0x01);
        u.write(1, 1, 0x00);
        assert_eq!(u.divisor, 1);
        assert_eq!(u.read(0, 1), 1, "DLAB reads the divisor");
        u.write(3, 1, 0x03);
        u.write(0, 1, u64::from(b'o'));
        u.write(0, 1, u64::from(b'k'));
        assert_eq!(u.read(5, 1) & 0x20, 0x20, "transmit holding register empty");
        assert_eq!(u.take_output(), b"ok");
        assert!(u.take_output().is_empty());
        u.write(7, 1, 0x5a);
        assert_eq!(u.read(7, 1), 0x5a);
    }
}
