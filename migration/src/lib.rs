//! Tern's migration stream: QEMU's format (QEMU 7.2 precopy, see QEMU's
//! `docs/devel/migration/main.rst` and `migration/savevm.c`), written and
//! read byte for byte, so that `scripts/analyze-migration.py` and QEMU's
//! own streams interoperate with Tern's.
//!
//! * [`writer::StreamWriter`]: header, configuration, RAM (`ram` v4:
//!   block list, ZERO/PAGE records with CONTINUE, EOS), device sections
//!   from [`hv_core::vmstate`] states, EOF and the description record.
//! * [`reader::StreamReader`]: a pull parser yielding
//!   [`reader::Record`]s; every refusal is a [`error::StreamError`] with the
//!   byte offset and the section. Its module docs give the receiver's state
//!   machine.
//! * [`desc`]: the description record (vmdesc) and walking a device body
//!   with it, which delimits and prints sections of devices Tern does not
//!   model.
//! * [`channel`]: the byte transport.
//! * [`incoming`]: applying a whole stream to a target: RAM through a
//!   [`incoming::RamTarget`], devices through the machine's one-transaction
//!   load, the vCPU and Tern's `tern-vm` section handed back.
//!
//! The wire-format modules never touch devices or guest memory; only
//! `incoming` does, through the machine's own all-or-nothing load.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod channel;
pub mod desc;
pub mod error;
pub mod format;
pub mod incoming;
pub mod reader;
pub mod writer;

pub use channel::{ChannelError, ChannelRead, ChannelWrite, MemChannel};
pub use desc::{DescSizer, SectionSizer, VmDescription};
pub use error::{StreamError, StreamErrorKind, WriteError};
pub use reader::{read_self_described, ParsedStream, Record, StreamReader};
pub use writer::{RamSection, StreamWriter};
