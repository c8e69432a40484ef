//! ACPI tables (ACPI 6.5, chapter 5.2): how a kernel built without the MP-table
//! parser (Debian's, for one) learns the CPUs, the interrupt controllers and how to
//! power the machine off.
//!
//! Tables are generated with rust-vmm's `acpi_tables` crate (Cloud Hypervisor's)
//! and placed in the BIOS area at [`layout::ACPI`], below the MP table:
//!
//! ```text
//! RSDP ─► XSDT ─┬─► FADT ─┬─► DSDT   \_S5_ sleep type for power-off; virtio-mmio devices
//!               │         └─► FACS
//!               └─► MADT              local APICs, IOAPIC, SCI override, NMI
//! ```
//!
//! The FADT describes a PC with fixed ACPI hardware, not a hardware-reduced one:
//! Linux treats a hardware-reduced machine as having no 8259 PIC and no PIT, and then
//! leaves the ISA interrupts (COM1's IRQ 4, the PIT's IRQ 0) unconfigured unless
//! the DSDT describes each device. With fixed hardware, the ISA interrupts stay
//! identity-mapped to IOAPIC pins exactly as the MP table says. Power-off goes
//! through PM1a_CNT; the FADT also names the hardware-reduced sleep registers, which
//! the same device implements, for guests that use those.
//!
//! A Linux guest needs CONFIG_PCI to load these (or any) tables, although there is
//! no PCI bus here: without it ACPICA fails to install its default PCI_Config handler
//! before it reads the DSDT ("ACPI Error: AE_BAD_PARAMETER, During Region
//! initialization (tbxfload-52)") and Linux turns ACPI off, power-off included.
//! scripts/linux/acpi.config says where in the source.

use crate::vmm::memory::GuestRam;
use acpi_tables::Aml;
use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use super::mptable::{APIC_ADDR, IOAPIC_ADDR};
use crate::vmm::devices::acpi_pm;
use crate::vmm::devices::cmos;
use crate::vmm::devices::mmio::MmioSlot;
use crate::vmm::memory::layout;

/// Where the RSDP goes: the start of the ACPI area, 16-byte aligned inside
/// 0xe0000..0xfffff, where an OS searches for it (ACPI 6.5, 5.2.5.1). Also handed to
/// Linux in boot_params.acpi_rsdp_addr and to PVH kernels in start_info.rsdp_paddr.
pub const RSDP_ADDR: u64 = layout::ACPI;
/// The ACPI area ends where the MP table begins.
const ACPI_END: u64 = layout::MPTABLE;

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"MINVMM";
/// OEM table ID in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"MINIVMM ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;

/// ISA IRQ of the System Control Interrupt (as on PCs, and QEMU's). Nothing raises
/// it: there are no fixed events or GPEs; Linux needs a valid one to attach to.
pub const SCI_IRQ: u8 = 9;

// MADT (ACPI 6.5, 5.2.12).
/// MADT revision (ACPI 6.3 and later; the structures used here are unchanged since).
const MADT_REVISION: u8 = 5;
/// MADT flags: PCAT_COMPAT, "the system also has a PC-AT-compatible dual-8259"
/// (KVM's in-kernel irqchip has one) (table 5.20).
const MADT_PCAT_COMPAT: u32 = 1;
// Interrupt controller structure types (table 5.21).
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Processor Local APIC flags: Enabled (table 5.23).
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags (table 5.26): active high (polarity 01), level triggered (trigger 11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b11_01;
/// Local APIC NMI: processor UID 0xff means all processors (5.2.12.7).
const ALL_PROCESSORS: u8 = 0xff;

// FADT (ACPI 6.5, 5.2.9).
/// IA-PC boot architecture flags (table 5.11): LEGACY_DEVICES (ISA devices such as
/// the CMOS clock and COM1 exist) and 8042 (the i8042 exists: `reboot=k` uses it).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// So many CPUs that the tables outgrow 0xe0000..0xf0000.
    #[error("the ACPI tables for {0} vCPUs do not fit below the MP table")]
    TooBig(u32),
    /// Writing them into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    Write,
}

/// One table as placed in guest memory.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its signature: "RSD PTR " is shortened to "RSDP", the FADT is "FACP".
    pub name: &'static str,
    /// Guest physical address.
    pub addr: u64,
    /// The table's bytes, checksum included.
    pub bytes: Vec<u8>,
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Hands out addresses in the ACPI area, each table 64-byte aligned (the FACS
/// must be; the others need 8, and 64 keeps a hex dump readable).
struct Placer {
    next: u64,
    vcpus: u32,
}

impl Placer {
    fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(64);
        self.next = addr + len as u64;
        if self.next > ACPI_END {
            return Err(AcpiError::TooBig(self.vcpus));
        }
        Ok(addr)
    }
}

/// Builds every table for a VM with `vcpus` vCPUs, RSDP first, each with the
/// address it is meant for, describing the virtio-mmio `devices` too. [`write()`]
/// puts them in guest memory; tests dump them.
pub fn build(vcpus: u32, devices: &[MmioSlot], pic: bool) -> Result<Vec<Table>, AcpiError> {
    let dsdt = dsdt(devices);
    let facs = to_bytes(&FACS::new());
    let madt = madt(vcpus, pic);

    let mut at = Placer {
        next: RSDP_ADDR,
        vcpus,
    };
    let rsdp_addr = at.place(Rsdp::len())?;
    let xsdt_addr = at.place(36 + 2 * 8)?;
    let fadt_addr = at.place(FADT::len())?;
    let facs_addr = at.place(facs.len())?;
    let dsdt_addr = at.place(dsdt.len())?;
    let madt_addr = at.place(madt.len())?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let table = |name, addr, bytes| Table { name, addr, bytes };
    Ok(vec![
        table("RSDP", rsdp_addr, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        table("XSDT", xsdt_addr, to_bytes(&xsdt)),
        table("FACP", fadt_addr, to_bytes(&fadt(dsdt_addr, facs_addr))),
        table("FACS", facs_addr, facs),
        table("DSDT", dsdt_addr, dsdt),
        table("APIC", madt_addr, madt),
    ])
}

/// Writes the tables into guest memory; the RSDP lands at [`RSDP_ADDR`].
pub fn write(mem: &GuestRam, vcpus: u32, devices: &[MmioSlot], pic: bool) -> Result<(), AcpiError> {
    for t in build(vcpus, devices, pic)? {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|_| AcpiError::Write)?;
    }
    Ok(())
}

/// An I/O-port Generic Address Structure (ACPI 6.5, 5.2.3.2).
fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}

/// The Fixed ACPI Description Table (ACPI 6.5, 5.2.9), revision 6.5: where the DSDT
/// and FACS are, and the power management registers of devices/acpi_pm.rs. No SMI
/// command port: the machine is always in ACPI mode (SCI_EN reads 1). No PM timer
/// and no GPE blocks (both optional). CENTURY names the CMOS byte holding the century.
fn fadt(dsdt_addr: u64, facs_addr: u64) -> FADT {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        // WBINVD works; C1 (HLT) on every CPU; no fixed power or sleep button.
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(acpi_pm::PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(acpi_pm::PM1A_CNT).into();
    f.pm1_evt_len = acpi_pm::PM1_EVT_LEN;
    f.pm1_cnt_len = acpi_pm::PM1_CNT_LEN;
    f.x_pm1a_evt_blk = io_gas(
        acpi_pm::PM1A_EVT,
        acpi_pm::PM1_EVT_LEN * 8,
        AccessSize::WordAccess,
    );
    f.x_pm1a_cnt_blk = io_gas(
        acpi_pm::PM1A_CNT,
        acpi_pm::PM1_CNT_LEN * 8,
        AccessSize::WordAccess,
    );
    f.sleep_control_reg = io_gas(acpi_pm::SLEEP_CONTROL, 8, AccessSize::ByteAccess);
    f.sleep_status_reg = io_gas(acpi_pm::SLEEP_STATUS, 8, AccessSize::ByteAccess);
    f.century = cmos::CENTURY;
    f.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    f.finalize()
}

/// The Differentiated System Description Table (ACPI 6.5, 5.2.11.1): a definition
/// block whose only object is `Name (_S5_, Package () { 5, 0, 0, 0 })`, the sleep
/// type values (SLP_TYPa, SLP_TYPb, reserved, reserved) for soft-off (7.4.2). Without
/// \_S5_ Linux does not register ACPI power-off. Revision 2: 64-bit AML integers.
///
/// Then one `Device` per virtio-mmio device under `\_SB`, which is how a kernel
/// whose virtio_mmio driver takes no command-line devices (Debian's) finds them:
/// `_HID "LNRO0005"` is the ID Linux's virtio_mmio binds to through ACPI
/// (drivers/virtio/virtio_mmio.c, `virtio_mmio_acpi_match`), and `_CRS` gives the
/// register page and the interrupt, edge-triggered and active high as the irqfd
/// pulse behind it.
fn dsdt(devices: &[MmioSlot]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let (slp_typ, zero) = (acpi_pm::S5_SLP_TYP, 0u8);
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&slp_typ, &zero, &zero, &zero]),
    );
    dsdt.append_slice(&to_bytes(&s5));
    if !devices.is_empty() {
        dsdt.append_slice(&to_bytes(&virtio_devices(devices)));
    }
    dsdt.as_slice().to_vec()
}

/// `Scope (\_SB) { Device (VR00) { ... } ... }` for the virtio-mmio devices.
fn virtio_devices(devices: &[MmioSlot]) -> AmlBytes {
    let mut out = Vec::new();
    let mut scope_body = Vec::new();
    for (i, slot) in devices.iter().enumerate() {
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid_value = i as u32;
        let uid = Name::new("_UID".into(), &uid_value);
        // Every device sits below 4 GiB (the MMIO gap), so 32-bit descriptors fit.
        let mem = Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
        let irq = Interrupt::new(true, true, false, false, slot.irq);
        let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq]));
        let dev = Device::new(format!("VR{i:02X}").as_str().into(), vec![&hid, &uid, &crs]);
        scope_body.push(AmlBytes(to_bytes(&dev)));
    }
    let parts: Vec<&dyn Aml> = scope_body.iter().map(|b| b as &dyn Aml).collect();
    Scope::new("\\_SB_".into(), parts).to_aml_bytes(&mut out);
    AmlBytes(out)
}

/// AML already encoded, to nest in another object.
struct AmlBytes(Vec<u8>);

impl Aml for AmlBytes {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The Multiple APIC Description Table (ACPI 6.5, 5.2.12): one enabled Processor
/// Local APIC per vCPU (processor UID = APIC ID = vCPU index, as CPUID reports), the
/// IOAPIC (ID after the CPUs', as in the MP table) with GSI base 0, and LINT1 of
/// every local APIC as NMI.
///
/// Interrupt source overrides: KVM's default GSI routing (arch/x86/kvm/irq_comm.c,
/// `default_routing`) wires GSI n to PIC input n and IOAPIC pin n for n < 16, and the
/// in-kernel PIT raises GSI 0, so ISA IRQ n is GSI n: ACPI's default without an
/// override (5.2.12.5), and what the MP table says. A QEMU-style IRQ 0 → GSI 2
/// override would be wrong here. The one override is for the SCI, level triggered
/// and active high as KVM's IOAPIC sees it.
///
/// PCAT_COMPAT only with `pic`: a split irqchip has no 8259s.
fn madt(vcpus: u32, pic: bool) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_ADDR);
    madt.write_u32(40, if pic { MADT_PCAT_COMPAT } else { 0 });
    for cpu in 0..vcpus {
        let mut e = vec![MADT_LOCAL_APIC, 8, cpu as u8, cpu as u8];
        e.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
        madt.append_slice(&e);
    }
    let mut ioapic = vec![MADT_IO_APIC, 12, vcpus as u8, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    // Bus 0 (ISA), source IRQ, GSI, flags.
    let mut sci = vec![MADT_INTERRUPT_OVERRIDE, 10, 0, SCI_IRQ];
    sci.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    sci.extend_from_slice(&INTI_ACTIVE_HIGH_LEVEL.to_le_bytes());
    madt.append_slice(&sci);
    // Processor UID, flags (conforming), LINT#.
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn find<'a>(tables: &'a [Table], name: &str) -> &'a Table {
        tables.iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn every_checksum_is_right_and_lengths_match() {
        for vcpus in [1, 2, 4, 8, 254] {
            let tables = build(vcpus, &[], true).unwrap();
            for t in &tables {
                match t.name {
                    "RSDP" => {
                        assert_eq!(sum(&t.bytes[..20]), 0, "RSDP v1 checksum");
                        assert_eq!(sum(&t.bytes), 0, "RSDP extended checksum");
                        assert_eq!(u32_at(&t.bytes, 20) as usize, t.bytes.len());
                    }
                    "FACS" => assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len()),
                    _ => {
                        assert_eq!(sum(&t.bytes), 0, "{} checksum", t.name);
                        assert_eq!(&t.bytes[..4], t.name.as_bytes());
                        assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len());
                    }
                }
                assert!(t.addr + t.bytes.len() as u64 <= ACPI_END);
            }
        }
    }

    #[test]
    fn pointers_link_the_tables() {
        let tables = build(4, &[], true).unwrap();
        let rsdp = find(&tables, "RSDP");
        assert_eq!(rsdp.addr, RSDP_ADDR);
        assert_eq!(rsdp.addr % 16, 0);
        assert_eq!(&rsdp.bytes[..8], b"RSD PTR ");
        assert_eq!(
            rsdp.bytes[15], 2,
            "RSDP revision 2 (ACPI 2.0+, has the XSDT)"
        );
        let xsdt = find(&tables, "XSDT");
        assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt.bytes, o))
            .collect();
        assert_eq!(
            entries,
            vec![find(&tables, "FACP").addr, find(&tables, "APIC").addr]
        );
        let fadt = &find(&tables, "FACP").bytes;
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt[131], 5, "FADT minor revision");
        assert_eq!(u64_at(fadt, 140), find(&tables, "DSDT").addr, "X_DSDT");
        assert_eq!(
            u64_at(fadt, 132),
            find(&tables, "FACS").addr,
            "X_FIRMWARE_CTRL"
        );
        assert_eq!(find(&tables, "FACS").addr % 64, 0);
        assert_eq!(
            u32_at(fadt, 64),
            u32::from(acpi_pm::PM1A_CNT),
            "PM1a_CNT_BLK"
        );
        assert_eq!(u64_at(fadt, 244 + 4), u64::from(acpi_pm::SLEEP_CONTROL));
        assert_eq!(u32_at(fadt, 112) & (1 << 20), 0, "not hardware-reduced");
        // \_S5_ holds the SLP_TYP the PM device powers off on.
        let dsdt = &find(&tables, "DSDT").bytes;
        // NameOp "_S5_" PackageOp PkgLength(7) NumElements(4) BytePrefix(5) Zero Zero Zero
        let s5 = [
            b"\x08_S5_\x12\x07\x04\x0a".as_slice(),
            &[acpi_pm::S5_SLP_TYP, 0, 0, 0],
        ]
        .concat();
        assert_eq!(&dsdt[36..36 + s5.len()], s5.as_slice());
    }

    #[test]
    fn madt_has_a_local_apic_per_vcpu() {
        for vcpus in [1u32, 2, 4, 8] {
            let tables = build(vcpus, &[], true).unwrap();
            let madt = &find(&tables, "APIC").bytes;
            assert_eq!(u32_at(madt, 36), APIC_ADDR);
            let mut off = 44;
            let (mut ids, mut ioapics) = (Vec::new(), 0);
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(madt[off + 2], madt[off + 3], "UID = APIC ID");
                        assert_eq!(u32_at(madt, off + 4), LAPIC_ENABLED);
                        ids.push(u32::from(madt[off + 3]));
                    }
                    MADT_IO_APIC => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, off + 4), IOAPIC_ADDR);
                        assert_eq!(u32_at(madt, off + 8), 0, "GSI base");
                    }
                    _ => {}
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    /// ACPICA's own interpreter — acpiexec, from Debian's acpica-tools like iasl, the
    /// same code as Linux's drivers/acpi/acpica — loads the FADT, FACS, DSDT and MADT
    /// without a warning or an error (a FADT whose 32-bit and 64-bit register blocks
    /// disagree gives "Firmware Warning (ACPI): 32/64X length mismatch"), and evaluates
    /// `\_S5_` to the sleep type the PM device powers off on. acpiexec makes its own
    /// RSDP and XSDT. Skipped without acpiexec unless MINIVMM_REQUIRE_IASL=1.
    #[test]
    fn acpica_loads_the_tables_and_evaluates_s5() {
        let Ok(version) = std::process::Command::new("acpiexec").arg("-v").output() else {
            assert_ne!(
                std::env::var("MINIVMM_REQUIRE_IASL").as_deref(),
                Ok("1"),
                "acpiexec is missing but MINIVMM_REQUIRE_IASL=1"
            );
            eprintln!("SKIP: acpiexec is missing; apt-get install acpica-tools");
            return;
        };
        assert!(version.status.success());
        let dir = std::env::temp_dir().join(format!("minivmm-acpiexec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // With two virtio devices, so that their AML is checked too.
        let devices = [MmioSlot::nth(0).unwrap(), MmioSlot::nth(1).unwrap()];
        let tables = build(2, &devices, true).unwrap();
        let mut files = Vec::new();
        for name in ["FACP", "FACS", "DSDT", "APIC"] {
            let file = dir.join(format!("{}.dat", name.to_lowercase()));
            std::fs::write(&file, &find(&tables, name).bytes).unwrap();
            files.push(file);
        }
        let out = std::process::Command::new("acpiexec")
            .args(["-b", "evaluate \\_S5_; evaluate \\_SB_.VR01._CRS"])
            .args(&files)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "acpiexec failed:\n{text}");
        assert!(
            text.contains("ACPI: 1 ACPI AML tables successfully acquired and loaded"),
            "{text}"
        );
        for bad in ["Error", "Warning", "Exception", "AE_"] {
            // acpiexec's built-in self-tests of optional hardware (GPE blocks, the PM
            // timer, PM2) report AE_ codes of their own: "Unexpected ... (aetests-N)".
            let found = text
                .lines()
                .find(|l| l.contains(bad) && !l.contains("(aetests-"));
            assert_eq!(found, None, "acpiexec reports {bad:?}:\n{text}");
        }
        let s5 = format!(
            "[Package] Contains 4 Elements:\n    [Integer] = {:016X}\n    \
             [Integer] = 0000000000000000\n    [Integer] = 0000000000000000\n    \
             [Integer] = 0000000000000000\n",
            acpi_pm::S5_SLP_TYP
        );
        assert!(text.contains(&s5), "no {s5:?} in:\n{text}");
    }

    #[test]
    fn tables_are_written_to_guest_memory() {
        let mem = crate::vmm::memory::create_guest_memory(32).unwrap();
        write(&mem, 2, &[], true).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(build(254, &[], true).is_ok());
    }
}
