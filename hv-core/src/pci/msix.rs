//! MSI-X (PCI Local Bus 3.0, 6.8.2), with QEMU's `hw/pci/msix.c` semantics:
//! a vector is masked when its entry's mask bit is set or the function is
//! masked (MSI-X disabled or mask-all set); a notification of a masked
//! vector sets its pending bit, and the transition to unmasked (entry write,
//! or an enable/mask-all change in config space) clears the bit and sends
//! the message. With MSI-X disabled a notification sends and records
//! nothing (the function would use INTx).

use super::*;
use crate::devices::{read_le, write_le, DeviceCtx};
use crate::irq::ApicMessage;

impl PciConfig {
    /// Sets up MSI-X (QEMU `msix_init`): `vectors` entries (1..=2048) at
    /// `table_offset` in BAR `table_bar`, the pending bits at `pba_offset`
    /// in BAR `pba_bar`. Both BARs must be declared memory BARs that hold
    /// their structure, offsets are 8-byte aligned, and table and PBA do not
    /// overlap. The capability's enable and mask-all bits are writable;
    /// every entry starts masked. Returns the capability's offset.
    pub fn msix_init(
        &mut self,
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<u8, PciError> {
        if self.msix.is_some() {
            return Err(PciError::MsixPresent);
        }
        if vectors == 0 || vectors > PCI_MSIX_MAX_VECTORS {
            return Err(PciError::BadMsix("vector count"));
        }
        let table_len = u64::from(vectors) * PCI_MSIX_ENTRY_SIZE;
        let pba_len = u64::from(vectors).next_multiple_of(64) / 8;
        let fits = |bar: u8, off: u32, len: u64| {
            self.bar(bar).is_some_and(|b| {
                !b.kind.is_io() && u64::from(off).checked_add(len).is_some_and(|e| e <= b.size)
            })
        };
        if !fits(table_bar, table_offset, table_len) {
            return Err(PciError::BadMsix(
                "the table does not fit in its memory BAR",
            ));
        }
        if !fits(pba_bar, pba_offset, pba_len) {
            return Err(PciError::BadMsix("the PBA does not fit in its memory BAR"));
        }
        if (table_offset | pba_offset) & PCI_MSIX_BIR_MASK != 0 {
            return Err(PciError::BadMsix("offsets must be 8-byte aligned"));
        }
        let (t, p) = (u64::from(table_offset), u64::from(pba_offset));
        if table_bar == pba_bar && t < p + pba_len && p < t + table_len {
            return Err(PciError::BadMsix("table and PBA overlap"));
        }
        let cap = self.add_capability(PCI_CAP_ID_MSIX, PCI_MSIX_CAP_LEN)?;
        let c = u16::from(cap);
        self.set_u16(c + u16::from(PCI_MSIX_FLAGS), vectors - 1);
        self.set_u32(
            c + u16::from(PCI_MSIX_TABLE),
            table_offset | u32::from(table_bar),
        );
        self.set_u32(c + u16::from(PCI_MSIX_PBA), pba_offset | u32::from(pba_bar));
        let control_hi = c + u16::from(PCI_MSIX_FLAGS) + 1;
        let wm = ((PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL) >> 8) as u8;
        self.set_wmask_u8(control_hi, wm);
        let mut table = vec![0; table_len as usize];
        for v in 0..u64::from(vectors) {
            let ctrl = v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL;
            write_le(&mut table, ctrl, 4, PCI_MSIX_ENTRY_CTRL_MASKBIT.into());
        }
        self.msix = Some(Msix {
            cap,
            vectors,
            table,
            pba: vec![0; pba_len as usize],
            function_masked: true,
        });
        Ok(cap)
    }

    /// The MSI-X capability's offset, if the function has MSI-X.
    pub fn msix_capability(&self) -> Option<u8> {
        self.msix.as_ref().map(|m| m.cap)
    }

    fn msix_control(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| {
            self.get_u16(u16::from(m.cap) + u16::from(PCI_MSIX_FLAGS))
        })
    }

    /// Whether MSI-X is enabled in the capability.
    pub fn msix_enabled(&self) -> bool {
        self.msix.is_some() && self.msix_control() & PCI_MSIX_FLAGS_ENABLE != 0
    }

    /// The table size (0 without MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| m.vectors)
    }

    /// Disabled or mask-all: no vector may fire.
    pub(super) fn msix_function_masked_now(&self) -> bool {
        !self.msix_enabled() || self.msix_control() & PCI_MSIX_FLAGS_MASKALL != 0
    }

    fn entry_masked(&self, vector: u16) -> bool {
        self.msix.as_ref().is_none_or(|m| {
            let ctrl = u64::from(vector) * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL;
            read_le(&m.table, ctrl, 4) as u32 & PCI_MSIX_ENTRY_CTRL_MASKBIT != 0
        })
    }

    /// Whether `vector` is masked (its entry or the whole function).
    pub fn msix_is_masked(&self, vector: u16) -> bool {
        self.msix_function_masked_now() || self.entry_masked(vector)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn msix_is_pending(&self, vector: u16) -> bool {
        self.msix.as_ref().is_some_and(|m| {
            m.pba
                .get(usize::from(vector / 8))
                .is_some_and(|b| b & (1 << (vector % 8)) != 0)
        })
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        if let Some(b) = self
            .msix
            .as_mut()
            .and_then(|m| m.pba.get_mut(usize::from(vector / 8)))
        {
            let bit = 1 << (vector % 8);
            if on {
                *b |= bit;
            } else {
                *b &= !bit;
            }
        }
    }

    /// A guest read of the vector table (`offset` from the table's start);
    /// bytes past the table read 0.
    pub fn msix_table_read(&self, offset: u64, size: u8) -> u64 {
        self.msix
            .as_ref()
            .map_or(0, |m| read_le(&m.table, offset, size))
    }

    /// A guest write to the vector table. A vector that goes from masked to
    /// unmasked with its pending bit set is sent now and its bit cleared.
    pub fn msix_table_write(&mut self, ctx: &mut DeviceCtx, offset: u64, size: u8, value: u64) {
        let vectors = self.msix_vectors();
        if vectors == 0 {
            return;
        }
        let last = offset.saturating_add(u64::from(size.clamp(1, 8)) - 1);
        let first = offset / PCI_MSIX_ENTRY_SIZE;
        let end = (last / PCI_MSIX_ENTRY_SIZE).min(u64::from(vectors) - 1);
        // An access touches at most two entries.
        let touched: Vec<(u16, bool)> = (first..=end)
            .map(|v| (v as u16, self.msix_is_masked(v as u16)))
            .collect();
        if let Some(m) = &mut self.msix {
            write_le(&mut m.table, offset, size, value);
        }
        for (v, was_masked) in touched {
            self.mask_update(ctx, v, was_masked);
        }
    }

    /// A guest read of the pending bits (`offset` from the PBA's start);
    /// the PBA is read-only, bytes past it read 0.
    pub fn msix_pba_read(&self, offset: u64, size: u8) -> u64 {
        self.msix
            .as_ref()
            .map_or(0, |m| read_le(&m.pba, offset, size))
    }

    /// The device signals `vector`: sent if MSI-X is enabled and neither the
    /// entry nor the function is masked, recorded as pending if masked;
    /// nothing happens with MSI-X disabled or for a vector past the table.
    pub fn msix_notify(&mut self, ctx: &mut DeviceCtx, vector: u16) {
        if vector >= self.msix_vectors() || !self.msix_enabled() {
            return;
        }
        if self.msix_is_masked(vector) {
            self.set_pending(vector, true);
        } else {
            self.send(ctx, vector);
        }
    }

    /// After a configuration write (and [`PciConfig::write`]): when the
    /// write covered the MSI-X control's upper byte and MSI-X is enabled,
    /// a change of the function mask (enable or mask-all) that unmasks the
    /// function sends every pending vector whose entry is unmasked (QEMU
    /// `msix_write_config`).
    pub fn after_write(&mut self, ctx: &mut DeviceCtx, off: u16, size: u8) {
        let Some(m) = &self.msix else { return };
        let control_hi = u32::from(m.cap) + u32::from(PCI_MSIX_FLAGS) + 1;
        let (start, end) = (u32::from(off), u32::from(off) + u32::from(size));
        if !(start <= control_hi && control_hi < end) {
            return;
        }
        let was = m.function_masked;
        let now = self.msix_function_masked_now();
        if let Some(m) = &mut self.msix {
            m.function_masked = now;
        }
        if !self.msix_enabled() || was == now {
            return;
        }
        for v in 0..self.msix_vectors() {
            let was_masked = was || self.entry_masked(v);
            self.mask_update(ctx, v, was_masked);
        }
    }

    /// QEMU `msix_handle_mask_update`: a vector that became unmasked with
    /// its pending bit set is sent.
    fn mask_update(&mut self, ctx: &mut DeviceCtx, vector: u16, was_masked: bool) {
        if was_masked && !self.msix_is_masked(vector) && self.msix_is_pending(vector) {
            self.set_pending(vector, false);
            self.send(ctx, vector);
        }
    }

    /// Sends the message of `vector`'s entry: an interrupt message if the
    /// address is an interrupt address, else the 32-bit data is written to
    /// memory through the function's bus-master space (as QEMU does; it is
    /// dropped if that fails).
    fn send(&self, ctx: &mut DeviceCtx, vector: u16) {
        let Some(m) = &self.msix else { return };
        let entry = u64::from(vector) * PCI_MSIX_ENTRY_SIZE;
        let addr = read_le(&m.table, entry + PCI_MSIX_ENTRY_LOWER_ADDR, 8);
        let data = read_le(&m.table, entry + PCI_MSIX_ENTRY_DATA, 4) as u32;
        match ApicMessage::from_msi(addr, data) {
            Some(msg) => ctx.msi(msg),
            None => {
                let _ = ctx.mem.write(addr, &data.to_le_bytes());
            }
        }
    }
}
