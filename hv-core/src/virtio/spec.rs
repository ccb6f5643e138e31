//! The VM's virtio device set from the kernel command line:
//! `devices=net:8x16,blk:16x4` means 8 virtio-net devices with 16 queue
//! pairs each and 16 virtio-blk devices with 4 queues each, placed on
//! PCI bus 0 from slot 1, network devices first.

use super::blk::{VirtioBlk, SECTOR};
use super::net::{VirtioNet, MAX_PAIRS};
use super::pci::{add_virtio_pci, MAX_QUEUES};
use crate::machine::{Machine, MachineError};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

/// Slots 1 to 31 of bus 0 (slot 0 is the host bridge).
pub const MAX_DEVICES: u16 = 31;
/// Default RAM-disk size: 128 KiB.
pub const DEFAULT_DISK_SECTORS: u64 = 256;
/// Largest RAM disk (the disks live in Tern's heap).
pub const MAX_DISK_BYTES: u64 = 64 << 20;

/// How many devices of a kind, and queues (pairs for net) each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Group {
    pub count: u16,
    pub queues: u16,
}

/// The device set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSpec {
    pub net: Group,
    pub blk: Group,
}

fn group(s: &str) -> Result<Group, &'static str> {
    let (n, q) = s.split_once('x').ok_or("expected COUNTxQUEUES")?;
    let count = n.parse().map_err(|_| "bad device count")?;
    let queues = q.parse().map_err(|_| "bad queue count")?;
    if queues == 0 {
        return Err("a device has at least one queue");
    }
    Ok(Group { count, queues })
}

impl DeviceSpec {
    /// Parses `net:NxP,blk:MxQ` (either part may be absent, each at most
    /// once).
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let mut spec = Self::default();
        let (mut net, mut blk) = (false, false);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (kind, g) = part.split_once(':').ok_or("expected KIND:COUNTxQUEUES")?;
            match kind {
                "net" if !net => {
                    spec.net = group(g)?;
                    net = true;
                }
                "blk" if !blk => {
                    spec.blk = group(g)?;
                    blk = true;
                }
                "net" | "blk" => return Err("a device kind appears twice"),
                _ => return Err("unknown device kind (net, blk)"),
            }
        }
        if spec.net.count.saturating_add(spec.blk.count) > MAX_DEVICES {
            return Err("at most 31 devices (PCI bus 0, slots 1-31)");
        }
        if spec.net.count > 0 && spec.net.queues > MAX_PAIRS {
            return Err("virtio-net has at most 63 queue pairs");
        }
        if spec.blk.count > 0 && spec.blk.queues > MAX_QUEUES {
            return Err("virtio-blk has at most 127 queues");
        }
        Ok(spec)
    }

    /// Number of devices.
    pub fn devices(&self) -> u16 {
        self.net.count + self.blk.count
    }
}

/// The MAC address of NIC `k`: 52:54:00:12:34:56 plus `k`.
pub fn mac(k: u16) -> [u8; 6] {
    let low = 0x3456u16.wrapping_add(k);
    [0x52, 0x54, 0x00, 0x12, (low >> 8) as u8, low as u8]
}

/// Adds the devices of `spec` to a machine that has a PCI host: NICs from
/// slot 1, then disks of `disk_sectors` sectors each; the first disk holds
/// `image` when given (zero-padded to its size, which grows to fit the
/// image). Returns the device indexes.
pub fn add_devices(
    m: &mut Machine,
    spec: &DeviceSpec,
    disk_sectors: u64,
    image: Option<&[u8]>,
) -> Result<Vec<u32>, MachineError> {
    let mut out = Vec::new();
    let mut slot = 1u8;
    for k in 0..spec.net.count {
        let net = VirtioNet::new(spec.net.queues, mac(k));
        let id = format!("0000:00:{slot:02x}.0/virtio-net");
        out.push(add_virtio_pci(m, &id, slot << 3, net)?);
        slot += 1;
    }
    for k in 0..spec.blk.count {
        let mut bytes = disk_sectors.saturating_mul(SECTOR);
        let img = if k == 0 { image } else { None };
        if let Some(img) = img {
            bytes = bytes.max((img.len() as u64).next_multiple_of(SECTOR));
        }
        if bytes == 0 || bytes > MAX_DISK_BYTES {
            return Err(MachineError::Config("a disk holds 1 sector to 64 MiB"));
        }
        let mut disk = vec![0u8; bytes as usize];
        if let Some(img) = img {
            disk[..img.len()].copy_from_slice(img);
        }
        let blk = VirtioBlk::new(spec.blk.queues, disk, &format!("tern-blk-{k}"));
        let id = format!("0000:00:{slot:02x}.0/virtio-blk");
        out.push(add_virtio_pci(m, &id, slot << 3, blk)?);
        slot += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_shapes() {
        let s = DeviceSpec::parse("net:8x16,blk:16x4").unwrap();
        assert_eq!(
            s.net,
            Group {
                count: 8,
                queues: 16
            }
        );
        assert_eq!(
            s.blk,
            Group {
                count: 16,
                queues: 4
            }
        );
        assert_eq!(s.devices(), 24);
        let s = DeviceSpec::parse("blk:1x4").unwrap();
        assert_eq!((s.net.count, s.blk.queues), (0, 4));
    }

    #[test]
    fn refuses_bad_specs() {
        for bad in [
            "net:8",
            "net:8x0",
            "disk:1x1",
            "net:1x1,net:1x1",
            "net:20x1,blk:12x1",
            "net:1x64",
            "blk:1x128",
            "net:axb",
            "net:99999x1",
        ] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_are_distinct_and_unicast() {
        let a = mac(0);
        let b = mac(1);
        assert_ne!(a, b);
        assert_eq!(a[0] & 1, 0);
        assert_eq!(a, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    }
}
