//! The host bridge of bus 0 (q35's MCH as a PCI function at 00.0) and the
//! state of its configuration mechanisms: the CF8 address latch (mechanism
//! #1, ports 0xCF8/0xCFC) and the ECAM window (PCI Express enhanced
//! configuration access). The machine dispatches the bridge's regions
//! itself (it has to reach the other functions); this model holds the
//! state and decodes addresses.

use super::*;
use crate::devices::{Device, DeviceCtx};

/// Region index of the 4-byte address latch at 0xCF8.
pub const REGION_CONFIG_ADDRESS: RegionIndex = 0;
/// Region index of the 4-byte data window at 0xCFC.
pub const REGION_CONFIG_DATA: RegionIndex = 1;
/// Region index of the ECAM window.
pub const REGION_ECAM: RegionIndex = 2;

/// Port of the address latch.
pub const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// Port of the data window.
pub const CONFIG_DATA_PORT: u16 = 0xCFC;

/// Identity of the host bridge: Intel 82G33/Q35 MCH, class host bridge,
/// QEMU's default subsystem IDs.
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x8086,
    device: 0x29c0,
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
    class: 0x06_0000,
    revision: 0,
};

/// A configuration access target: bus, device/function, register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    pub bus: u8,
    pub devfn: u8,
    pub offset: u16,
}

/// Decodes an ECAM offset: bus in bits 27:20, devfn in 19:12, register in
/// 11:0.
pub const fn ecam_decode(offset: u64) -> ConfigAddress {
    ConfigAddress {
        bus: (offset >> 20) as u8,
        devfn: (offset >> 12) as u8,
        offset: (offset & 0xFFF) as u16,
    }
}

/// The host bridge.
#[derive(Clone)]
pub struct PciHostBridge {
    pub config: PciConfig,
    /// The CF8 latch as last written by a 32-bit write.
    pub config_address: u32,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfig::new(HOST_BRIDGE_IDS),
            config_address: 0,
        }
    }

    /// A read of the latch region (any size, from `offset`).
    pub fn address_read(&self, offset: u64, size: u8) -> u64 {
        let shift = 8 * (offset & 3);
        u64::from(self.config_address >> shift) & crate::devices::all_ones(size)
    }

    /// A write to the latch region: only a 32-bit write at 0xCF8 latches
    /// (as QEMU's `pci_host_config_write`); narrower writes go nowhere.
    pub fn address_write(&mut self, offset: u64, size: u8, value: u64) {
        if offset == 0 && size == 4 {
            self.config_address = value as u32;
        }
    }

    /// The target of a data-window access at `offset` (0..4) of 0xCFC, if
    /// the latch's enable bit (31) is set: bus in bits 23:16, devfn in
    /// 15:8, dword register in 7:2, the byte from the port.
    pub fn data_target(&self, offset: u64) -> Option<ConfigAddress> {
        let a = self.config_address;
        (a & (1 << 31) != 0).then_some(ConfigAddress {
            bus: (a >> 16) as u8,
            devfn: (a >> 8) as u8,
            offset: (a & 0xFC) as u16 + (offset & 3) as u16,
        })
    }
}

crate::vmstate! {
    /// The host bridge's migration section: the CF8 latch and its own
    /// configuration space.
    #[derive(Clone, Debug, PartialEq)]
    pub struct HostWire as "mch", version 2, minimum 2 {
        pub config_address: u32,
        pub pci_len: u32,
        pub pci: Vec<u8> [len = pci_len, max = 65536],
    }
}

impl PciHostBridge {
    fn wire(&self) -> HostWire {
        let mut pci = Vec::new();
        self.config.save(&mut pci);
        HostWire {
            config_address: self.config_address,
            pci_len: pci.len() as u32,
            pci,
        }
    }
}

impl Device for PciHostBridge {
    // The machine handles the bridge's regions itself.
    fn read(&mut self, _ctx: &mut DeviceCtx, _region: RegionIndex, _offset: u64, size: u8) -> u64 {
        crate::devices::all_ones(size)
    }
    fn write(&mut self, _: &mut DeviceCtx, _: RegionIndex, _: u64, _: u8, _: u64) {}
    fn pci(&mut self) -> Option<&mut PciConfig> {
        Some(&mut self.config)
    }
    fn state_version(&self) -> u32 {
        <HostWire as crate::vmstate::VmState>::VERSION
    }
    fn save_described(&self) -> Option<(Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut self.wire()).ok()
    }
    fn load(&mut self, _ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        let w: HostWire = crate::vmstate::load(data, version)?;
        let mut config = self.config.clone();
        config.load(&w.pci)?;
        self.config = config;
        self.config_address = w.config_address;
        Ok(())
    }
    fn duplicate(&self) -> Option<alloc::boxed::Box<dyn Device>> {
        Some(alloc::boxed::Box::new(self.clone()))
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
