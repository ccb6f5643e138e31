//! One newtype per address kind, so a guest address is never taken for a
//! host one. `Debug` shows the kind.

use core::fmt;

macro_rules! addr_type {
    ($(#[$m:meta])* $name:ident, $tag:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            pub const fn new(a: u64) -> Self {
                Self(a)
            }
            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// `self + off`, or `None` on overflow.
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }
            /// Whether the address is a multiple of `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Rounds down to a multiple of `align` (a power of two).
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($tag, ":{:#x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

addr_type!(
    /// A guest-physical address (what EPT translates).
    GuestPhysAddr,
    "GPA"
);
addr_type!(
    /// A host-physical address (what EPT and VMCS pointers hold).
    HostPhysAddr,
    "HPA"
);
addr_type!(
    /// A host-virtual address (what the hypervisor dereferences).
    HostVirtAddr,
    "HVA"
);

/// 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_the_kind() {
        assert_eq!(format!("{:?}", GuestPhysAddr::new(0x1000)), "GPA:0x1000");
        assert_eq!(
            format!("{:?}", HostPhysAddr::new(0xfee0_0000)),
            "HPA:0xfee00000"
        );
    }

    #[test]
    fn alignment_helpers() {
        let a = GuestPhysAddr::new(0x20_1234);
        assert!(!a.is_aligned(PAGE_SIZE));
        assert_eq!(a.align_down(0x20_0000), GuestPhysAddr::new(0x20_0000));
        assert_eq!(GuestPhysAddr::new(u64::MAX).checked_add(1), None);
    }
}
