//! Guest physical memory: where RAM is, where the VMM's boot structures go, and the
//! e820 map that tells the guest.
//!
//! x86 PCs keep the top of the 32-bit address space for devices (the LAPIC at
//! 0xfee00000, the IOAPIC at 0xfec00000, PCI BARs), so RAM beyond 3 GiB is placed
//! above 4 GiB. Memory is anonymous and mapped with MAP_NORESERVE by vm-memory: a page
//! costs host memory only once the guest touches it.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit MMIO gap: RAM stops here below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB): RAM continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;

/// The VMM's fixed low-memory layout. Everything lives below 1 MiB, where a
/// bzImage or vmlinux is never loaded (they start at 1 MiB or higher).
pub mod layout {
    /// Global Descriptor Table (boot/x86.rs).
    pub const GDT: u64 = 0x500;
    /// Interrupt Descriptor Table: empty; the guest installs its own.
    pub const IDT: u64 = 0x600;
    /// PVH `hvm_start_info`, its module list and memory map (boot/pvh.rs).
    pub const PVH_INFO: u64 = 0x6000;
    /// Linux "zero page" `boot_params` (boot/linux.rs).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Initial stack pointer for the 64-bit entry (top of 0x8000..0x9000).
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// PML4 of the identity page tables; PDPT and four page directories follow.
    pub const PML4: u64 = 0x9000;
    /// Kernel command line, NUL-terminated.
    pub const CMDLINE: u64 = 0x20000;
    /// Most bytes the command line area holds (Linux x86's COMMAND_LINE_SIZE is 2048;
    /// a bzImage may announce a different limit in its header).
    pub const CMDLINE_MAX: usize = 2048;
    /// Top of the RAM the guest may use in base memory: the last KiB below 640 KiB
    /// stands for the BIOS's extended data area and is reserved, as on a PC.
    pub const EBDA: u64 = 0x9fc00;
    /// End of conventional memory (640 KiB); 0xa0000..1 MiB is VGA/BIOS space.
    pub const EBDA_END: u64 = 0xa0000;
    /// Intel MP table: floating pointer then configuration table, in the BIOS ROM
    /// area 0xf0000..0xfffff, one of the places the MP spec (1.4, 4.0) says to search;
    /// 64 KiB is room for 254 processor entries.
    pub const MPTABLE: u64 = 0xf0000;
    /// ACPI tables, inside the BIOS area 0xe0000..0xfffff where the RSDP is searched.
    pub const ACPI: u64 = 0xe0000;
    /// Start of high memory (1 MiB): kernels load here or above.
    pub const HIMEM: u64 = 0x10_0000;
}

/// Type of an e820 / PVH memory map entry (ACPI 6.4, table 15.312 "Address Range Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved: the guest must not use it as RAM (type 2).
    Reserved = 2,
}

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// RAM or reserved.
    pub kind: RegionKind,
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of guest RAM failed.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size in MiB.
        mib: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges (start, length) for `mib` MiB of guest memory: one below the MMIO
/// gap and, for guests bigger than 3 GiB, one from 4 GiB.
pub fn ram_ranges(mib: u64) -> Vec<(u64, u64)> {
    let bytes = mib << 20;
    if bytes <= MMIO_GAP_START {
        vec![(0, bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, bytes - MMIO_GAP_START)]
    }
}

/// Maps guest RAM (not prefaulted).
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mib)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

/// The memory map the guest sees (e820 for Linux boot, the PVH memmap for PVH): RAM
/// in base memory up to the MP table, the MP table and BIOS areas reserved, then RAM
/// from 1 MiB to the gap and from 4 GiB on.
pub fn memory_map(mib: u64) -> Vec<MapEntry> {
    use layout::*;
    let mut map = vec![
        MapEntry {
            addr: 0,
            size: EBDA,
            kind: RegionKind::Ram,
        },
        MapEntry {
            addr: EBDA,
            size: EBDA_END - EBDA,
            kind: RegionKind::Reserved,
        },
        MapEntry {
            addr: ACPI,
            size: HIMEM - ACPI,
            kind: RegionKind::Reserved,
        },
    ];
    for (start, len) in ram_ranges(mib) {
        let (start, len) = if start == 0 {
            (HIMEM, len - HIMEM)
        } else {
            (start, len)
        };
        map.push(MapEntry {
            addr: start,
            size: len,
            kind: RegionKind::Ram,
        });
    }
    map
}

/// End of RAM below the MMIO gap: the highest address + 1 that a 32-bit boot
/// structure (initrd, for instance) may use.
pub fn low_ram_end(mib: u64) -> u64 {
    (mib << 20).min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range() {
        assert_eq!(ram_ranges(128), vec![(0, 128 << 20)]);
        let map = memory_map(128);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == RegionKind::Ram)
            .map(|e| e.size)
            .sum();
        // All RAM but the 385 KiB hole between the EBDA and 1 MiB.
        assert_eq!(ram, (128 << 20) - (layout::HIMEM - layout::EBDA));
    }

    #[test]
    fn five_gib_crosses_the_gap() {
        let r = ram_ranges(5 * 1024);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        let last = *memory_map(5 * 1024).last().unwrap();
        assert_eq!(last.addr, 4 << 30);
        assert_eq!(last.size, 2 << 30);
        assert_eq!(low_ram_end(5 * 1024), MMIO_GAP_START);
    }
}
