//! Device models. Each is plain state plus register semantics; the kernel
//! wires them to a VM's port or memory space. Guests control every value
//! written here, so no input may panic.

pub mod debug_exit;
pub mod pio;
pub mod uart;

pub use pio::{PioBus, PioDevice, PioOutcome};
