//! Guest physical memory: where RAM is, where the VMM's boot structures go, and the
//! e820 map that tells the guest.
//!
//! x86 PCs keep the top of the 32-bit address space for devices (the LAPIC at
//! 0xfee00000, the IOAPIC at 0xfec00000, PCI BARs), so RAM beyond 3 GiB is placed
//! above 4 GiB. Memory is anonymous and mapped with MAP_NORESERVE: a page costs host
//! memory only once the guest touches it.
//!
//! Each RAM range starts on a 2 MiB boundary of the host's address space and is
//! advised for transparent huge pages (madvise MADV_HUGEPAGE), as QEMU and Cloud
//! Hypervisor do. KVM maps a guest-physical 2 MiB page with one large second-level
//! (EPT/NPT) entry only when the host page behind it is huge *and* the guest and host
//! addresses agree modulo 2 MiB (the slot's alignment check in KVM's
//! `kvm_alloc_memslot_metadata`); a plain mmap is only page-aligned, so every guest
//! page would then fault in, and miss the TLB, 4 KiB at a time.

use std::io;
use std::sync::Arc;
use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Host alignment of guest RAM: the x86-64 huge page (a 2 MiB page-directory entry).
const HUGE_PAGE: usize = 2 << 20;

/// Guest RAM as the rest of the VMM uses it: vm-memory's mmap-backed guest memory whose
/// regions own their mappings through [`RamOwner`].
pub type GuestRam = GuestMemoryMmap<RamOwner>;

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
        /// What mmap reported.
        source: io::Error,
    },
    /// vm-memory refused the mapped ranges (overlapping or empty: a bug here).
    #[error("cannot describe {mib} MiB of guest memory to vm-memory: {reason}")]
    Layout {
        /// Requested size in MiB.
        mib: u64,
        /// What vm-memory reported.
        reason: String,
    },
}

/// One host mapping of guest RAM, unmapped when the last region using it is dropped.
#[derive(Debug)]
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the pointer is only handed to munmap, once, on drop; no data is reached
// through it here.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of anonymous memory starting on a [`HUGE_PAGE`] boundary: a
    /// reservation `HUGE_PAGE` longer is made without access, the aligned part is
    /// mapped over it with MAP_FIXED, and the slack on either side is returned. The
    /// mapping from byte `advise_from` on is advised for huge pages.
    fn aligned(len: usize, advise_from: usize) -> io::Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let span = len + HUGE_PAGE;
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to it.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_NONE, flags, -1, 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = (base as usize).next_multiple_of(HUGE_PAGE);
        let head = start - base as usize;
        // SAFETY: [start, start + len) lies inside the reservation just made, which
        // only this function knows of, so MAP_FIXED replaces nothing of anyone else's.
        let addr = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: the whole reservation is ours.
            unsafe { libc::munmap(base, span) };
            return Err(e);
        }
        // SAFETY: both pieces are parts of our reservation outside [start, start + len).
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            libc::munmap((start + len) as *mut libc::c_void, span - head - len);
        }
        // Advice only: on a kernel without THP this fails and RAM stays in 4 KiB pages.
        if advise_from < len {
            // SAFETY: madvise on our own mapping changes no contents.
            let advised = unsafe {
                libc::madvise(
                    addr.add(advise_from),
                    len - advise_from,
                    libc::MADV_HUGEPAGE,
                )
            };
            if advised != 0 {
                log::debug!(
                    "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                    io::Error::last_os_error()
                );
            }
        }
        Ok(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `aligned` and is unmapped only here, when the
        // last vm-memory region referring to it (through `RamOwner`) has gone.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// What ties a guest RAM mapping's lifetime to vm-memory's regions.
///
/// vm-memory unmaps only mappings it made itself, and it cannot align them; a mapping
/// made here is handed to it as a raw pointer, which it never unmaps. So each region
/// carries an `Arc` of its [`Mapping`] in the slot vm-memory keeps for a dirty-page
/// bitmap (this one tracks nothing): the mapping lives exactly as long as some copy of
/// the guest memory does, in a vCPU thread, a device or the VM.
#[derive(Clone, Debug, Default)]
pub struct RamOwner {
    /// Held only to be dropped with the region; None when vm-memory owns the mapping.
    _mapping: Option<Arc<Mapping>>,
}

impl WithBitmapSlice<'_> for RamOwner {
    type S = ();
}

impl Bitmap for RamOwner {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

/// Lets vm-memory's own constructors (`from_ranges`, used by some tests) build a
/// `GuestRam` whose mappings vm-memory owns itself.
impl NewBitmap for RamOwner {
    fn with_len(_len: usize) -> Self {
        RamOwner { _mapping: None }
    }
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

/// Maps guest RAM (not prefaulted), each range 2 MiB-aligned and advised for huge
/// pages, but for the first 2 MiB of guest-physical memory.
pub fn create_guest_memory(mib: u64) -> Result<GuestRam, MemoryError> {
    let layout = |e: &dyn std::fmt::Display| MemoryError::Layout {
        mib,
        reason: e.to_string(),
    };
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mib) {
        let len = len as usize;
        // The first 2 MiB hold the boot structures, the legacy holes and all of a tiny
        // guest: a huge page there would cost such a guest 2 MiB of host memory for
        // the few KiB it touches, and saves a large one only a few hundred faults.
        let advise_from = if start == 0 { HUGE_PAGE } else { 0 };
        let mapping = Mapping::aligned(len, advise_from)
            .map_err(|source| MemoryError::Map { mib, source })?;
        let addr = mapping.addr as *mut u8;
        // SAFETY: [addr, addr + len) is the live mapping `mapping`, which the region's
        // RamOwner keeps alive for as long as the region exists.
        let region = unsafe {
            let owner = RamOwner {
                _mapping: Some(Arc::new(mapping)),
            };
            MmapRegionBuilder::new_with_bitmap(len, owner).with_raw_mmap_pointer(addr)
        }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| layout(&e))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| layout(&"a range overflows the guest address space"))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| layout(&e))
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

    /// Each range's host mapping starts on a 2 MiB boundary (so KVM can map it with
    /// large pages), is readable and writable to its last byte, and outlives the
    /// `GuestRam` it came from in a clone.
    #[test]
    fn ram_is_huge_page_aligned_and_lives_with_its_clones() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
        let mem = create_guest_memory(5 * 1024).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        for r in mem.iter() {
            let host = r.as_ptr() as usize;
            assert_eq!(
                host % HUGE_PAGE,
                0,
                "region at {:#x} mapped at {host:#x}",
                r.start_addr().0
            );
        }
        let last = GuestAddress((6 << 30) - 8);
        mem.write_obj(0x1234_5678_u64, last).unwrap();
        let copy = mem.clone();
        drop(mem);
        assert_eq!(copy.read_obj::<u64>(last).unwrap(), 0x1234_5678);
        assert_eq!(copy.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
    }
}
