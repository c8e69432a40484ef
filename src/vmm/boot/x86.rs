//! The CPU state a kernel expects at its first instruction: a GDT, identity page
//! tables, and the segment, control and general registers for each boot protocol.

use crate::vmm::memory::GuestRam;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, EntryPoint};
use crate::vmm::memory::layout;

/// GDT selectors. The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst,
/// "64-bit Boot Protocol") wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18; PVH wants a
/// flat 32-bit code segment, which we put at 0x08.
pub const CODE32_SEL: u16 = 0x08;
/// 64-bit code segment selector (__BOOT_CS).
pub const CODE64_SEL: u16 = 0x10;
/// Flat data segment selector (__BOOT_DS).
pub const DATA_SEL: u16 = 0x18;
/// Task state segment selector: VT-x refuses to enter a guest whose TR is unusable.
pub const TSS_SEL: u16 = 0x20;

// Control register and EFER bits (Intel SDM vol. 3A, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT descriptor from its parts (Intel SDM vol. 3A, 3.4.5, figure 3-8).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The descriptors at each selector: null, 32-bit code, 64-bit code, data, TSS.
/// Flags are the access byte plus G/DB/L in the top nibble.
fn gdt() -> [u64; 5] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff), // code, 32-bit (D=1), 4 KiB granular
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit (L=1)
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write
        gdt_entry(0x808b, 0, 0xfffff), // 32/64-bit busy TSS
    ]
}

/// The hidden part of a segment register, as KVM_SET_SREGS wants it, decoded from
/// the same descriptor the guest would load.
fn segment(sel: u16, desc: u64) -> kvm_segment {
    let flags = (desc >> 40) as u16;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT into guest memory.
pub fn write_gdt(mem: &GuestRam) -> Result<(), BootError> {
    for (i, desc) in gdt().iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(layout::GDT + 8 * i as u64))
            .map_err(|_| BootError::Write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT))
        .map_err(|_| BootError::Write("IDT"))
}

/// Writes identity page tables for the first 4 GiB with 2 MiB pages: one PML4 entry,
/// four PDPT entries, 4 × 512 PD entries (Intel SDM vol. 3A, 4.5, figure 4-9). The
/// Linux 64-bit entry and ELF kernels without PVH expect this mapping.
pub fn write_page_tables(mem: &GuestRam) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let pml4 = layout::PML4;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    let err = |_| BootError::Write("page tables");
    mem.write_obj(pdpt | PRESENT_RW, GuestAddress(pml4))
        .map_err(err)?;
    let mut entries = vec![0u8; 4 * 512 * 8];
    for i in 0..4u64 {
        mem.write_obj((pd + i * 0x1000) | PRESENT_RW, GuestAddress(pdpt + i * 8))
            .map_err(err)?;
    }
    for (j, chunk) in entries.chunks_exact_mut(8).enumerate() {
        let e = ((j as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&entries, GuestAddress(pd)).map_err(err)
}

/// Special registers for the boot CPU: protected mode with flat segments (PVH), or
/// long mode with paging on the identity tables (Linux 64-bit entry).
pub fn boot_sregs(mut sregs: kvm_sregs, entry: &EntryPoint) -> kvm_sregs {
    let table = gdt();
    let (code_sel, long_mode) = match entry {
        EntryPoint::Pvh { .. } => (CODE32_SEL, false),
        EntryPoint::Linux64 { .. } => (CODE64_SEL, true),
    };
    let data = segment(DATA_SEL, table[(DATA_SEL / 8) as usize]);
    sregs.cs = segment(code_sel, table[(code_sel / 8) as usize]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SEL, table[(TSS_SEL / 8) as usize]);
    sregs.tr.limit = 0xfffff;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        sregs.cr3 = layout::PML4;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    sregs
}

/// General registers at the entry point: the PVH protocol passes the start_info
/// address in EBX; the Linux 64-bit protocol passes boot_params in RSI.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set; interrupts off
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh { addr } => {
            regs.rip = *addr;
            regs.rbx = layout::PVH_INFO;
        }
        EntryPoint::Linux64 { addr } => {
            regs.rip = *addr;
            regs.rsi = layout::ZERO_PAGE;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm() {
        // Well-known encodings of flat segments.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(CODE64_SEL, gdt()[2]);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
    }
}
