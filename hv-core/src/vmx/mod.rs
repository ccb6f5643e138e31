//! VMX abstractions that need no CPU: capability decoding and control
//! computation ([`caps`]), VM-exit decoding ([`exit`]) and VM-instruction
//! errors ([`error`]). The kernel executes the instructions; everything it
//! decides is decided here, where the host tests can reach it.

pub mod caps;
pub mod error;
pub mod exit;

pub use caps::{ControlError, VmxCaps};
pub use error::VmInstructionError;
pub use exit::{ExitReason, VmExitInfo};
