//! PVH boot (Xen's docs/misc/pvh.pandoc, "x86/HVM direct boot ABI"): the kernel is
//! entered in 32-bit protected mode with EBX = address of `struct hvm_start_info`,
//! which points at the command line, the modules (our initrd) and the memory map.

use crate::vmm::memory::GuestRam;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BootInfo};
use crate::vmm::config::VmConfig;
use crate::vmm::memory::{layout, memory_map};

/// "xEn3" with the 0x80 bit of the first byte set: XEN_HVM_START_MAGIC_VALUE.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes `hvm_start_info` (version 1, which has the memory map) at
/// [`layout::PVH_INFO`], then the module list and the memory map after it.
pub fn write_start_info(
    mem: &GuestRam,
    config: &VmConfig,
    info: &BootInfo,
) -> Result<(), BootError> {
    let start = layout::PVH_INFO;
    let modlist = start + 0x40;
    let memmap = modlist + 0x40;
    let map = memory_map(config.memory_mib);
    let mut si = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        memmap_paddr: memmap,
        memmap_entries: map.len() as u32,
        rsdp_paddr: super::acpi::RSDP_ADDR,
        ..Default::default()
    };
    let err = |_| BootError::Write("PVH start_info");
    if let Some((paddr, size)) = info.initrd {
        si.nr_modules = 1;
        si.modlist_paddr = modlist;
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist)).map_err(err)?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(memmap + 24 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(si, GuestAddress(start)).map_err(err)
}
