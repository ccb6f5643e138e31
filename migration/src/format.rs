//! Constants of QEMU's migration stream (`migration/savevm.c`,
//! `migration/ram.c`; QEMU's `docs/devel/migration/main.rst`).

/// `"QEVM"`.
pub const MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU still reads (`QEMU_VM_FILE_VERSION`).
pub const VERSION: u32 = 3;
/// QEMU's answer for the obsolete version 2 (`QEMU_VM_FILE_VERSION_COMPAT`).
pub const VERSION_COMPAT: u32 = 2;

/// Top-level record type bytes (`QEMU_VM_*`).
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// Flags in the low bits of a RAM record's be64 header
/// (`RAM_SAVE_FLAG_*`).
pub mod ram_flags {
    pub const FULL: u64 = 0x01;
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// The RAM section's idstr, instance and version.
pub const RAM_IDSTR: &str = "ram";
pub const RAM_INSTANCE: u32 = 0;
pub const RAM_VERSION: u32 = 4;

/// x86's target page size (the vmdesc's `page_size`).
pub const PAGE_SIZE: u64 = 4096;

/// The configuration section's vmsd name (its subsections start with it).
pub const CONFIGURATION_NAME: &str = "configuration";
