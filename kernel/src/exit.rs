//! How Tern ends: its status, and the way out chosen on the command line
//! (`exit=qemu` writes isa-debug-exit, `exit=bochs` takes Bochs's magic
//! breakpoint, anything else halts, as on a real machine).

use spin::Once;

/// Tern's exit status. 0 and 1..=119 are guest statuses (the first non-zero
/// one of any VM); the values from 120 up are Tern's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u8);

impl Status {
    /// Every VM ended with status 0.
    pub const OK: Self = Self(0);
    /// A VM was stopped by the hypervisor (bad exit, EPT violation...).
    pub const VM_STOPPED: Self = Self(120);
    /// The CPU lacks VMX or a feature Tern needs.
    pub const NO_VMX: Self = Self(121);
    /// The boot information or the guest modules could not be used.
    pub const BOOT_ERROR: Self = Self(122);
    /// The hypervisor itself panicked or took an exception.
    pub const HYPERVISOR_FAULT: Self = Self(123);
}

/// Where to go at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// QEMU's isa-debug-exit at port 0xF4 (process status `(s << 1) | 1`).
    Qemu,
    /// Bochs's magic breakpoint.
    Bochs,
    /// Halt the CPU.
    Halt,
}

static METHOD: Once<Method> = Once::new();

/// Sets the way out; the first call wins.
pub fn set_method(m: Method) {
    METHOD.call_once(|| m);
}

/// Prints the status line the runners read, then leaves.
pub fn exit(status: Status) -> ! {
    crate::println!("tern: exit status {}", status.0);
    match METHOD.get().copied().unwrap_or(Method::Halt) {
        Method::Qemu => crate::cpu::qemu_exit(u32::from(status.0)),
        Method::Bochs => crate::cpu::bochs_magic_break(),
        Method::Halt => {}
    }
    crate::cpu::halt_forever()
}
