//! Virtio 1.x device-side building blocks (virtio spec v1.2, OASIS).
//!
//! - [`queue`]: the split virtqueue (§2.7): ring validation and caches,
//!   descriptor-chain walking, used-ring publication, notification
//!   suppression. Transports (virtio-pci) and device models build on it.
//!
//! Feature bits are bit *numbers* (`1u64 << VIRTIO_F_VERSION_1`).

pub mod queue;

pub use queue::{
    AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};

/// Virtio 1.x (modern) device (§6).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Descriptors may refer to indirect descriptor tables (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `used_event` / `avail_event` notification suppression (§2.7.7, §2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// "No MSI-X vector" (virtio-pci `config_msix_vector` / `queue_msix_vector`).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xFFFF;
/// Largest queue size a split ring can have (§2.7: 32768).
pub const VIRTQUEUE_MAX_SIZE: u16 = 32768;

pub mod blk;
pub mod net;
pub mod pci;
pub mod spec;

#[cfg(test)]
mod tests;
