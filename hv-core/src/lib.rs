//! Tern's hardware-independent core.
//!
//! Owns the memory API (region trees, flat views, listeners, transactions), the
//! VMX/VMCS abstractions that do not need the CPU (control computation, exit
//! decoding), guest memory access, guest image loading, device models, the
//! PCI bus and the vmstate descriptions of migratable state (`vmstate`, a
//! leaf module the `migration` crate uses too).
//! It never executes privileged instructions: the kernel reaches the hardware
//! through the small traits defined here, and host tests use mocks.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod addr;
pub mod devices;
pub mod dirty;
pub mod emulate;
pub mod ept;
pub mod ept_listener;
pub mod exits;
pub mod frames;
pub mod guest_mem;
pub mod irq;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod msr;
pub mod pci;
pub mod phys;
pub mod platform;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vcpu;
pub mod virtio;
pub mod vmstate;
pub mod vmx;
