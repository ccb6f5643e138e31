//! Interrupt controllers and timers of a PC: the local APIC (one per vCPU),
//! the I/O APIC, the legacy 8259 PIC pair, the 8254 PIT and the CMOS RTC.
//!
//! Each model is plain state plus register semantics, tested on the host.
//! Time is virtual nanoseconds ([`Nanos`]) handed in by the caller; a
//! model never reads a clock itself, so the same inputs give the same
//! outputs. Models that raise interrupts return what they raise (levels of
//! ISA/GSI lines, [`ApicMessage`]s) instead of calling each other: the
//! machine routes them (`machine.rs`), which keeps every model testable on
//! its own and keeps routing in one place.

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod rtc;

/// Virtual time in nanoseconds since the VM was created.
pub type Nanos = u64;

/// How a local APIC delivers a message (SDM Vol. 3A, 11.6.1, ICR bits 10:8;
/// the same encoding is used by I/O APIC redirection entries and MSIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; 0b011 is reserved.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => return None,
        })
    }

    /// The 3-bit encoding.
    pub const fn bits(self) -> u8 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

/// An interrupt message for local APICs: what the I/O APIC sends for a
/// redirection entry, what an MSI write means, what an IPI carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicMessage {
    pub vector: u8,
    pub delivery: DeliveryMode,
    /// Level-triggered (the local APIC sets TMR and the EOI is broadcast
    /// back to the I/O APIC).
    pub level: bool,
    /// Destination: an APIC ID (physical) or a logical mask.
    pub dest: u32,
    pub logical: bool,
}

impl ApicMessage {
    /// Decodes an MSI (a device's 32-bit write of `data` to `addr`; SDM Vol.
    /// 3A, 11.11): an interrupt address is 0xFEEx_xxxx with the destination
    /// ID in bits 19:12 and the destination mode (1 = logical) in bit 2; the
    /// data holds the vector (7:0), the delivery mode (10:8) and the trigger
    /// mode (bit 15, 1 = level). `None` if `addr` is not an interrupt address
    /// (bits 63:32 set too: no extended destination IDs) or the delivery
    /// mode is the reserved 0b011.
    pub const fn from_msi(addr: u64, data: u32) -> Option<Self> {
        if addr & !0xF_FFFF != 0xFEE0_0000 {
            return None;
        }
        let Some(delivery) = DeliveryMode::from_bits((data >> 8) as u8 & 7) else {
            return None;
        };
        Some(Self {
            vector: data as u8,
            delivery,
            level: data & (1 << 15) != 0,
            dest: ((addr >> 12) & 0xFF) as u32,
            logical: addr & (1 << 2) != 0,
        })
    }
}

/// What a guest-visible line of the ISA/GSI world is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineLevel {
    Low,
    High,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_messages_decode() {
        let m = ApicMessage::from_msi(0xFEE0_3004, 0x8000 | (1 << 8) | 0x61).unwrap();
        assert_eq!(
            m,
            ApicMessage {
                vector: 0x61,
                delivery: DeliveryMode::LowestPriority,
                level: true,
                dest: 3,
                logical: true,
            }
        );
        let m = ApicMessage::from_msi(0xFEEF_F000, 0x0430).unwrap();
        assert_eq!((m.dest, m.logical, m.level), (0xFF, false, false));
        assert_eq!(m.delivery, DeliveryMode::Nmi);
        assert_eq!(m.vector, 0x30);
        // Not an interrupt address, or a reserved delivery mode.
        assert_eq!(ApicMessage::from_msi(0xFED0_0000, 0x30), None);
        assert_eq!(ApicMessage::from_msi(0xFEF0_0000, 0x30), None);
        assert_eq!(ApicMessage::from_msi(0x1_FEE0_0000, 0x30), None);
        assert_eq!(ApicMessage::from_msi(0, 0x30), None);
        assert_eq!(ApicMessage::from_msi(0xFEE0_0000, 0x330), None);
    }
}
