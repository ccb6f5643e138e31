//! The interruption-information word of event injection and of the
//! IDT-vectoring and VM-exit interruption information (SDM Vol. 3C,
//! 25.8.3 Table 25-17, 25.9.2 Table 25-19, 25.9.3 Table 25-20).

/// Event types (bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventType {
    ExternalInterrupt = 0,
    Nmi = 2,
    HardwareException = 3,
    SoftwareInterrupt = 4,
    PrivilegedSoftwareException = 5,
    SoftwareException = 6,
    Other = 7,
}

/// An interruption-information word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct InterruptionInfo(u32);

impl InterruptionInfo {
    const VECTOR: u32 = 0xFF;
    const TYPE_SHIFT: u32 = 8;
    /// Deliver an error code (bit 11).
    const ERROR_CODE: u32 = 1 << 11;
    /// NMI unblocking due to IRET (bit 12; exit information only, reserved
    /// on injection).
    const NMI_UNBLOCKING: u32 = 1 << 12;
    /// Valid (bit 31).
    const VALID: u32 = 1 << 31;

    /// The "nothing to inject" word.
    pub const NONE: Self = Self(0);

    /// A valid event of type `kind` at `vector`.
    pub const fn new(kind: EventType, vector: u8, error_code: bool) -> Self {
        let err = if error_code { Self::ERROR_CODE } else { 0 };
        Self(vector as u32 | ((kind as u32) << Self::TYPE_SHIFT) | err | Self::VALID)
    }

    /// External interrupt `vector`.
    pub const fn external(vector: u8) -> Self {
        Self::new(EventType::ExternalInterrupt, vector, false)
    }

    /// NMI (vector 2).
    pub const fn nmi() -> Self {
        Self::new(EventType::Nmi, 2, false)
    }

    /// Hardware exception `vector`, with or without an error code.
    pub const fn exception(vector: u8, error_code: bool) -> Self {
        Self::new(EventType::HardwareException, vector, error_code)
    }

    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    pub const fn vector(self) -> u8 {
        (self.0 & Self::VECTOR) as u8
    }

    pub const fn has_error_code(self) -> bool {
        self.0 & Self::ERROR_CODE != 0
    }

    /// The same event for re-injection: the NMI-unblocking bit of exit
    /// information is reserved in the injection field (SDM 27.2.4).
    pub const fn for_reinjection(self) -> Self {
        Self(self.0 & !Self::NMI_UNBLOCKING)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_table_25_17() {
        assert_eq!(InterruptionInfo::external(0x20).bits(), 0x8000_0020);
        assert_eq!(InterruptionInfo::nmi().bits(), 0x8000_0202);
        assert_eq!(InterruptionInfo::exception(13, true).bits(), 0x8000_0B0D);
        assert_eq!(InterruptionInfo::exception(1, false).bits(), 0x8000_0301);
        let exit = InterruptionInfo::from_bits(0x8000_1B0E);
        assert!(exit.is_valid() && exit.has_error_code());
        assert_eq!(exit.vector(), 14);
        assert_eq!(exit.for_reinjection().bits(), 0x8000_0B0E);
        assert!(!InterruptionInfo::NONE.is_valid());
    }
}
