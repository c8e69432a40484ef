//! The Linux "zero page" (`struct boot_params`, Documentation/arch/x86/zero-page.rst):
//! the e820 memory map, command line and initrd location, handed to a bzImage or an
//! ELF kernel entered in 64-bit mode (RSI points at it).

use crate::vmm::memory::GuestRam;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BootInfo};
use crate::vmm::config::VmConfig;
use crate::vmm::memory::{layout, memory_map};

/// "Undefined" boot loader ID (boot.rst, type_of_loader): we have none assigned.
const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags: the heap_end_ptr field is valid (boot.rst, CAN_USE_HEAP).
const CAN_USE_HEAP: u8 = 0x80;
/// The "must be 0xAA55" boot_flag and "HdrS" header magic of the setup header.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;

/// Writes `boot_params` at [`layout::ZERO_PAGE`]. For a bzImage, `header` is its own
/// setup header (copied as boot.rst asks); for an ELF, a minimal one is made up.
pub fn write_zero_page(
    mem: &GuestRam,
    config: &VmConfig,
    info: &BootInfo,
    header: Option<setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            kernel_alignment: 0x100_0000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let hdr = &mut params.hdr;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags |= CAN_USE_HEAP;
    // The real-mode heap ends 0x200 below the 0x10000-byte setup segment's end; a
    // 64-bit entry never uses it, but the field must be sane.
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = config.cmdline.len() as u32;
    if let Some((addr, size)) = info.initrd {
        // Placed below 3 GiB by load_initrd; never truncated silently all the same.
        let field =
            |what, value: u64| u32::try_from(value).map_err(|_| BootError::Field32 { what, value });
        hdr.ramdisk_image = field("initrd address", addr)?;
        hdr.ramdisk_size = field("initrd size", size)?;
    }
    let map = memory_map(config.memory_mib);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = super::acpi::RSDP_ADDR;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|_| BootError::Write("boot_params zero page"))
}
