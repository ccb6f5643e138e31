//! What a VMCS field encoding says about the field (SDM Vol. 3C, 25.11.2,
//! Table 25-21; the fields themselves are listed in Vol. 3D, Appendix B).
//!
//! The kernel's typed fields (`Field16`, `Field32`, ...) check their width
//! and group against this decoding when they are defined, and a failed
//! VMREAD/VMWRITE names its field through it.

/// A VMCS field encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldEncoding(pub u32);

/// The width of a field (encoding bits 14:13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldWidth {
    Bits16,
    Bits64,
    Bits32,
    /// Natural width: 64 bits on a 64-bit host.
    Natural,
}

/// The group of a field (encoding bits 11:10), as Appendix B sorts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldGroup {
    /// VM-execution, VM-exit and VM-entry controls.
    Control,
    /// VM-exit information: read-only data.
    ReadOnly,
    Guest,
    Host,
}

impl FieldEncoding {
    pub const fn width(self) -> FieldWidth {
        match (self.0 >> 13) & 3 {
            0 => FieldWidth::Bits16,
            1 => FieldWidth::Bits64,
            2 => FieldWidth::Bits32,
            _ => FieldWidth::Natural,
        }
    }

    pub const fn group(self) -> FieldGroup {
        match (self.0 >> 10) & 3 {
            0 => FieldGroup::Control,
            1 => FieldGroup::ReadOnly,
            2 => FieldGroup::Guest,
            _ => FieldGroup::Host,
        }
    }

    /// Whether the encoding names the high 32 bits of a 64-bit field
    /// (access type, bit 0).
    pub const fn is_high_half(self) -> bool {
        matches!(self.width(), FieldWidth::Bits64) && self.0 & 1 != 0
    }

    /// Whether the encoding is well formed: bits 31:15 and 12 are reserved
    /// (zero), and only 64-bit fields have a high half.
    pub const fn is_well_formed(self) -> bool {
        self.0 & !0x6FFF == 0 && (self.0 & 1 == 0 || matches!(self.width(), FieldWidth::Bits64))
    }
}

impl core::fmt::Display for FieldEncoding {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let width = match self.width() {
            FieldWidth::Bits16 => "16-bit",
            FieldWidth::Bits32 => "32-bit",
            FieldWidth::Bits64 if self.is_high_half() => "64-bit (high half)",
            FieldWidth::Bits64 => "64-bit",
            FieldWidth::Natural => "natural-width",
        };
        let group = match self.group() {
            FieldGroup::Control => "control",
            FieldGroup::ReadOnly => "read-only data",
            FieldGroup::Guest => "guest-state",
            FieldGroup::Host => "host-state",
        };
        write!(f, "{width} {group} field {:#06x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_appendix_b_encodings() {
        // VPID, CR3-target count, EPTP, guest RIP, exit qualification,
        // host TR selector, VM-instruction error, EPTP (high).
        let cases = [
            (0x0000, FieldWidth::Bits16, FieldGroup::Control),
            (0x400A, FieldWidth::Bits32, FieldGroup::Control),
            (0x201A, FieldWidth::Bits64, FieldGroup::Control),
            (0x681E, FieldWidth::Natural, FieldGroup::Guest),
            (0x6400, FieldWidth::Natural, FieldGroup::ReadOnly),
            (0x0C0C, FieldWidth::Bits16, FieldGroup::Host),
            (0x4400, FieldWidth::Bits32, FieldGroup::ReadOnly),
        ];
        for (enc, w, g) in cases {
            let e = FieldEncoding(enc);
            assert_eq!((e.width(), e.group()), (w, g), "{enc:#x}");
            assert!(e.is_well_formed(), "{enc:#x}");
            assert!(!e.is_high_half());
        }
        assert!(FieldEncoding(0x201B).is_high_half());
        assert!(!FieldEncoding(0x681F).is_well_formed(), "odd natural");
        assert!(!FieldEncoding(0x1_0000).is_well_formed());
        assert!(!FieldEncoding(0x1000).is_well_formed(), "bit 12");
    }

    #[test]
    fn names_width_and_group() {
        use alloc::string::ToString;
        assert_eq!(
            FieldEncoding(0x400A).to_string(),
            "32-bit control field 0x400a"
        );
        assert_eq!(
            FieldEncoding(0x201B).to_string(),
            "64-bit (high half) control field 0x201b"
        );
        assert_eq!(
            FieldEncoding(0x4400).to_string(),
            "32-bit read-only data field 0x4400"
        );
    }
}
