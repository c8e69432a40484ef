//! The Intel MultiProcessor table (MP spec 1.4, chapter 4): how a kernel built with
//! X86_MPPARSE learns how many CPUs there are, their APIC IDs, and how ISA interrupts
//! reach the IOAPIC. Linux searches for the floating pointer "_MP_" in the BIOS ROM
//! area 0xf0000..0xfffff, among other places; we put it there.

use crate::vmm::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::vmm::memory::layout;

/// Physical address of the local APIC (Intel SDM vol. 3A, 10.4.1: the default base).
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Physical address of the IOAPIC (the address KVM's in-kernel IOAPIC decodes).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC input pins of KVM's in-kernel IOAPIC (KVM_IOAPIC_NUM_PINS).
pub const IOAPIC_PINS: u8 = 24;

// Entry types and sizes (MP spec 1.4, table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
// Interrupt types (table 4-10).
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
// Processor entry flags (table 4-5): enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Local APIC version reported for every CPU: an integrated APIC (0x1x).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version of KVM's in-kernel IOAPIC (82093AA: 0x11).
const IOAPIC_VERSION: u8 = 0x11;
/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// So many CPUs that the table outgrows its slot.
    #[error("the MP table for {0} vCPUs does not fit in its 64 KiB slot")]
    TooBig(u32),
    /// Writing it into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// The sum of all bytes is zero in every MP structure (spec 4.1 and 4.2).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the configuration table's entries: one processor per vCPU (APIC ID = vCPU
/// index), the ISA bus, the IOAPIC (its ID follows the CPUs'), ISA IRQs 0-15
/// identity-mapped to IOAPIC pins (as KVM's default GSI routing wires them), and the
/// local APIC's LINT0 (ExtINT from the PIC, when `pic`: a split irqchip has none) and
/// LINT1 (NMI).
fn entries(vcpus: u32, pic: bool) -> (Vec<u8>, u16) {
    let ioapic_id = vcpus as u8;
    let mut t = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        t.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC), then 8 reserved bytes.
        t.extend_from_slice(&0x600u32.to_le_bytes());
        t.extend_from_slice(&0x201u32.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for irq in 0..16u8 {
        // type, interrupt type, flags (u16: conforming polarity/trigger), bus, bus IRQ,
        // destination IOAPIC, destination pin.
        t.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    let lints: &[(u8, u8)] = if pic {
        &[(0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)]
    } else {
        &[(1, INT_TYPE_NMI)]
    };
    for &(lint, kind) in lints {
        // Destination 0xff: every local APIC.
        t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }
    (t, count)
}

/// Writes the MP floating pointer and configuration table at [`layout::MPTABLE`].
/// `pic`: whether the VM has the 8259 pair (KVM's full irqchip) behind LINT0.
pub fn write(mem: &GuestRam, vcpus: u32, pic: bool) -> Result<(), MpTableError> {
    let base = layout::MPTABLE;
    let table_addr = base + 16;
    let (body, count) = entries(vcpus, pic);
    let table_len = 44 + body.len();
    if 16 + table_len > (layout::HIMEM - base) as usize {
        return Err(MpTableError::TooBig(vcpus));
    }

    // Floating pointer structure (spec 4.1, figure 4-2): 16 bytes.
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]); // length in 16-byte units
    fp[10] = checksum(&fp);

    // Configuration table header (spec 4.2, figure 4-3): 44 bytes.
    let mut ct = Vec::with_capacity(table_len);
    ct.extend_from_slice(b"PCMP");
    ct.extend_from_slice(&(table_len as u16).to_le_bytes());
    ct.extend_from_slice(&[SPEC_REV, 0]); // checksum patched below
    ct.extend_from_slice(b"MINIVMM ");
    ct.extend_from_slice(b"000000000000");
    ct.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    ct.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    ct.extend_from_slice(&count.to_le_bytes());
    ct.extend_from_slice(&APIC_ADDR.to_le_bytes());
    ct.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    ct.extend_from_slice(&body);
    ct[7] = checksum(&ct);

    mem.write_slice(&fp, GuestAddress(base))
        .and_then(|_| mem.write_slice(&ct, GuestAddress(table_addr)))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::create_guest_memory;

    /// Reads back the table written for `vcpus`: both checksums, the entry count, and
    /// every entry, walked by its type's length. Returns the processor entries' APIC
    /// IDs and flags in order.
    fn read_back(mem: &GuestRam, vcpus: u32) -> Vec<(u8, u8)> {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(layout::MPTABLE))
            .unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let count = u16::from_le_bytes([hdr[34], hdr[35]]) as usize;
        let mut ct = vec![0u8; len];
        mem.read_slice(&mut ct, GuestAddress(addr)).unwrap();
        assert_eq!(ct.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let (mut at, mut seen, mut cpus) = (44, 0, Vec::new());
        while at < len {
            let size = match ct[at] {
                ENTRY_PROCESSOR => {
                    cpus.push((ct[at + 1], ct[at + 3]));
                    20
                }
                ENTRY_BUS | ENTRY_IOAPIC | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => 8,
                other => panic!("{vcpus} vCPUs: unknown entry type {other} at {at}"),
            };
            at += size;
            seen += 1;
        }
        assert_eq!(at, len, "{vcpus} vCPUs: the last entry overruns the table");
        assert_eq!(seen, count, "{vcpus} vCPUs: entry count in the header");
        cpus
    }

    #[test]
    fn checksums_and_cpu_count() {
        for vcpus in [1, 2, 4, 64, 254] {
            let mem = create_guest_memory(32).unwrap();
            write(&mem, vcpus, true).unwrap();
            let cpus = read_back(&mem, vcpus);
            assert_eq!(cpus.len(), vcpus as usize, "processor entries");
            for (i, (apic_id, flags)) in cpus.into_iter().enumerate() {
                assert_eq!(apic_id as usize, i, "{vcpus} vCPUs: APIC ID of CPU {i}");
                let want = CPU_ENABLED | if i == 0 { CPU_BOOTSTRAP } else { 0 };
                assert_eq!(flags, want, "{vcpus} vCPUs: flags of CPU {i}");
            }
        }
    }

    #[test]
    fn max_vcpus_fit() {
        let mem = create_guest_memory(32).unwrap();
        assert!(write(&mem, 254, true).is_ok());
        assert_eq!(read_back(&mem, 254).len(), 254);
        assert!(matches!(
            write(&mem, 4000, true),
            Err(MpTableError::TooBig(4000))
        ));
    }
}
