//! Getting from firmware to Rust.
//!
//! Owns the boot headers (multiboot2 and the PVH note for the hypervisor, a
//! multiboot v1 header for the test guest), the 32-bit entry and switch to
//! long mode ([`trampoline`]), and the parsing of what the boot loader hands
//! over into one [`BootInfo`]. It never touches anything past that: no
//! allocator, no page tables beyond the boot identity map, no devices.
#![cfg_attr(not(test), no_std)]

pub mod info;
pub mod trampoline;

pub use info::{
    BootIdentityMap, BootInfo, BootProtocol, MemoryKind, MemoryRange, Module, PhysReader,
};
