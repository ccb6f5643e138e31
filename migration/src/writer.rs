//! The stream writer: QEMU 7.2's precopy layout, byte for byte.
//!
//! ```text
//! "QEVM" be32 3
//! 07 be32 len machine-name                         configuration
//! 01 id 03"ram" be32 0 be32 4  MEM_SIZE blocks EOS  7e id   RAM setup (START)
//! 02 id  pages... EOS  7e id                       RAM iterations (PART)*
//! 03 id  pages... EOS  7e id                       RAM completion (END)
//! 04 id idstr be32 instance be32 version body 7e id  one per device (FULL)
//! 00                                               EOF
//! 06 be32 len {"page_size": 4096, "devices": [...]}  description (optional)
//! ```
//!
//! The caller chooses section ids (QEMU numbers handlers in registration
//! order) and calls, in order: [`StreamWriter::new`],
//! [`StreamWriter::ram_setup`], any number of
//! [`StreamWriter::ram_begin`]/[`StreamWriter::ram_page`]/[`StreamWriter::ram_finish`]
//! rounds (the last one an END), the device sections, and
//! [`StreamWriter::finish`].

use crate::channel::ChannelWrite;
use crate::error::WriteError;
use crate::format::{
    ram_flags, section, MAGIC, PAGE_SIZE, RAM_IDSTR, RAM_INSTANCE, RAM_VERSION, VERSION,
};
use alloc::collections::BTreeSet;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hv_core::vmstate::{save_described, Json, VmState};

/// Which RAM section a round of pages goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamSection {
    /// An iteration (`SECTION_PART`).
    Part,
    /// The completion (`SECTION_END`), written once, last.
    End,
}

struct RamState {
    id: u32,
    blocks: Vec<(String, u64)>,
    /// The block the last page named (CONTINUE applies while it stays the
    /// same, across sections, as in QEMU's `save_page_header`).
    last: Option<usize>,
    open: bool,
    ended: bool,
}

/// Writes one migration stream to a channel.
pub struct StreamWriter<C: ChannelWrite> {
    ch: C,
    written: u64,
    ids: BTreeSet<u32>,
    ram: Option<RamState>,
    devices: Vec<Json>,
}

impl<C: ChannelWrite> StreamWriter<C> {
    /// Writes the header and the configuration section naming `machine`
    /// (e.g. `pc-i440fx-7.2`).
    pub fn new(ch: C, machine: &str) -> Result<Self, WriteError> {
        let len = u32::try_from(machine.len()).map_err(|_| WriteError::BadMachineName)?;
        if len == 0 {
            return Err(WriteError::BadMachineName);
        }
        let mut w = Self {
            ch,
            written: 0,
            ids: BTreeSet::new(),
            ram: None,
            devices: Vec::new(),
        };
        w.put(&MAGIC.to_be_bytes())?;
        w.put(&VERSION.to_be_bytes())?;
        w.put(&[section::CONFIGURATION])?;
        w.put(&len.to_be_bytes())?;
        w.put(machine.as_bytes())?;
        Ok(w)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> Result<(), WriteError> {
        self.ch.write_all(b)?;
        self.written = self.written.saturating_add(b.len() as u64);
        Ok(())
    }

    fn counted(&mut self, name: &str) -> Result<(), WriteError> {
        let len = u8::try_from(name.len())
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| WriteError::BadName(name.to_string()))?;
        self.put(&[len])?;
        self.put(name.as_bytes())
    }

    fn claim(&mut self, id: u32) -> Result<(), WriteError> {
        if self.ids.insert(id) {
            Ok(())
        } else {
            Err(WriteError::DuplicateSectionId(id))
        }
    }

    fn full_header(
        &mut self,
        ty: u8,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<(), WriteError> {
        if idstr.is_empty() || idstr.len() > 255 {
            return Err(WriteError::BadName(idstr.to_string()));
        }
        self.claim(id)?;
        self.put(&[ty])?;
        self.put(&id.to_be_bytes())?;
        self.counted(idstr)?;
        self.put(&instance.to_be_bytes())?;
        self.put(&version.to_be_bytes())
    }

    fn footer(&mut self, id: u32) -> Result<(), WriteError> {
        self.put(&[section::FOOTER])?;
        self.put(&id.to_be_bytes())
    }

    /// The RAM setup section (`SECTION_START` of `ram` v4): the block list
    /// with each block's used length, in the order given.
    pub fn ram_setup(&mut self, id: u32, blocks: &[(&str, u64)]) -> Result<(), WriteError> {
        if self.ram.is_some() {
            return Err(WriteError::RamOrder("second RAM setup"));
        }
        let mut total = 0u64;
        let mut names = BTreeSet::new();
        for &(name, length) in blocks {
            if name.is_empty() || name.len() > 255 || !names.insert(name) {
                return Err(WriteError::BadName(name.to_string()));
            }
            total = total
                .checked_add(length)
                .filter(|_| length.is_multiple_of(PAGE_SIZE))
                .ok_or_else(|| WriteError::BadBlockLength {
                    name: name.to_string(),
                    length,
                })?;
        }
        self.full_header(section::START, id, RAM_IDSTR, RAM_INSTANCE, RAM_VERSION)?;
        self.put(&(total | ram_flags::MEM_SIZE).to_be_bytes())?;
        for &(name, length) in blocks {
            self.counted(name)?;
            self.put(&length.to_be_bytes())?;
        }
        self.put(&ram_flags::EOS.to_be_bytes())?;
        self.footer(id)?;
        self.ram = Some(RamState {
            id,
            blocks: blocks.iter().map(|&(n, l)| (n.to_string(), l)).collect(),
            last: None,
            open: false,
            ended: false,
        });
        Ok(())
    }

    /// Opens a RAM iteration (PART) or the completion (END).
    pub fn ram_begin(&mut self, kind: RamSection) -> Result<(), WriteError> {
        let ram = self
            .ram
            .as_mut()
            .ok_or(WriteError::RamOrder("pages before the RAM setup"))?;
        if ram.open || ram.ended {
            return Err(WriteError::RamOrder("RAM section already open or ended"));
        }
        ram.open = true;
        ram.ended = kind == RamSection::End;
        let id = ram.id;
        let ty = match kind {
            RamSection::Part => section::PART,
            RamSection::End => section::END,
        };
        self.put(&[ty])?;
        self.put(&id.to_be_bytes())
    }

    /// Writes one page of `block` at byte offset `addr`: a ZERO record with
    /// fill byte 0 if it is all zeros (9 bytes, as QEMU 7.2), a PAGE record
    /// otherwise; the block name is left out (CONTINUE) when the previous
    /// page was in the same block.
    pub fn ram_page(&mut self, block: &str, addr: u64, page: &[u8]) -> Result<(), WriteError> {
        let ram = self
            .ram
            .as_mut()
            .filter(|r| r.open)
            .ok_or(WriteError::RamOrder("page outside a RAM section"))?;
        let idx = ram
            .blocks
            .iter()
            .position(|(n, _)| n == block)
            .ok_or_else(|| WriteError::UnknownBlock(block.to_string()))?;
        let length = ram.blocks[idx].1;
        let fits = addr.is_multiple_of(PAGE_SIZE)
            && page.len() as u64 == PAGE_SIZE
            && addr.checked_add(PAGE_SIZE).is_some_and(|e| e <= length);
        if !fits {
            return Err(WriteError::BadPage {
                block: block.to_string(),
                addr,
            });
        }
        let cont = ram.last == Some(idx);
        ram.last = Some(idx);
        let zero = page.iter().all(|&b| b == 0);
        let mut header = addr
            | if zero {
                ram_flags::ZERO
            } else {
                ram_flags::PAGE
            };
        if cont {
            header |= ram_flags::CONTINUE;
        }
        self.put(&header.to_be_bytes())?;
        if !cont {
            self.counted(block)?;
        }
        if zero {
            self.put(&[0])
        } else {
            self.put(page)
        }
    }

    /// Closes the open RAM section (EOS and footer).
    pub fn ram_finish(&mut self) -> Result<(), WriteError> {
        let ram = self
            .ram
            .as_mut()
            .filter(|r| r.open)
            .ok_or(WriteError::RamOrder("no RAM section open"))?;
        ram.open = false;
        let id = ram.id;
        self.put(&ram_flags::EOS.to_be_bytes())?;
        self.footer(id)
    }

    fn no_open_ram(&self) -> Result<(), WriteError> {
        match &self.ram {
            Some(r) if r.open => Err(WriteError::RamOrder("RAM section still open")),
            _ => Ok(()),
        }
    }

    /// A device section (`SECTION_FULL`) with the state's body at its
    /// current version, and its description for the vmdesc.
    pub fn device<T: VmState>(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        state: &mut T,
    ) -> Result<(), WriteError> {
        let (body, desc) = save_described(state).map_err(|error| WriteError::State {
            idstr: idstr.to_string(),
            error,
        })?;
        self.device_raw(id, idstr, instance, T::VERSION, &body, Some(desc.to_json()))
    }

    /// A device section from an already encoded body. `desc` is the
    /// section's description object without `name`/`instance_id` (a
    /// vmsd's `vmsd_name`, `version`, `fields`...; or an old-style `size`,
    /// `fields`); `None` leaves the device out of the vmdesc.
    pub fn device_raw(
        &mut self,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
        body: &[u8],
        desc: Option<Json>,
    ) -> Result<(), WriteError> {
        self.no_open_ram()?;
        let pairs = match desc {
            None => None,
            Some(Json::Object(p)) => Some(p),
            Some(_) => return Err(WriteError::BadDescription),
        };
        self.full_header(section::FULL, id, idstr, instance, version)?;
        self.put(body)?;
        self.footer(id)?;
        if let Some(p) = pairs {
            let mut obj = alloc::vec![
                ("name".to_string(), Json::Str(idstr.to_string())),
                ("instance_id".to_string(), Json::Int(instance.into())),
            ];
            obj.extend(p);
            self.devices.push(Json::Object(obj));
        }
        Ok(())
    }

    /// The description record this stream would end with.
    pub fn description(&self) -> Json {
        Json::Object(alloc::vec![
            ("page_size".to_string(), Json::Int(PAGE_SIZE.into())),
            ("devices".to_string(), Json::Array(self.devices.clone())),
        ])
    }

    /// Writes EOF and, if `with_description`, the description record
    /// (QEMU leaves it out with `suppress-vmdesc=on`); returns the channel.
    pub fn finish(mut self, with_description: bool) -> Result<C, WriteError> {
        self.no_open_ram()?;
        self.put(&[section::EOF])?;
        if with_description {
            let text = self.description().to_compact();
            let len = u32::try_from(text.len()).map_err(|_| WriteError::BadDescription)?;
            self.put(&[section::VMDESCRIPTION])?;
            self.put(&len.to_be_bytes())?;
            self.put(text.as_bytes())?;
        }
        self.ch.flush()?;
        Ok(self.ch)
    }
}
