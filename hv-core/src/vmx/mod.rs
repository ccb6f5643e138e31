//! VMX abstractions that need no CPU: capability decoding and control
//! computation ([`caps`]), VMCS field encodings ([`field`]), VM-exit
//! decoding ([`exit`]), the interruption-information word ([`event`]),
//! register bits the `x86`/`x86_64` crates do not name ([`regs`]) and
//! failed VMX instructions ([`error`]). The kernel executes the
//! instructions; everything it decides is decided here, where the host
//! tests can reach it.

pub mod caps;
pub mod error;
pub mod event;
pub mod exit;
pub mod field;
pub mod regs;

pub use caps::{ControlError, VmxCaps};
pub use error::{VmInstructionError, VmxFail, VmxFailKind, VmxInstruction};
pub use event::{EventType, InterruptionInfo};
pub use exit::{ExitReason, VmExitInfo};
pub use field::FieldEncoding;
