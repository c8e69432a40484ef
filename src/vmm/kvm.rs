//! Opening /dev/kvm and checking that it can run minivmm's VMs, with errors that say
//! how to fix the host. Used by `Vm::new` and by `minivmm check`.

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every kernel since 2.6.22 reports (KVM_GET_API_VERSION).
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities minivmm relies on, with what each is for.
pub const REQUIRED_CAPS: [(Cap, &str, &str); 7] = [
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY",
        "guest RAM from our mmap",
    ),
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "in-kernel PIC, IOAPIC and LAPICs",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2", "in-kernel PIT timer"),
    (
        Cap::SplitIrqchip,
        "KVM_CAP_SPLIT_IRQCHIP",
        "LAPICs in KVM, IOAPIC and PIT in minivmm: --irqchip split",
    ),
    (
        Cap::Irqfd,
        "KVM_CAP_IRQFD",
        "serial interrupts through an eventfd",
    ),
    (
        Cap::ExtCpuid,
        "KVM_CAP_EXT_CPUID",
        "per-vCPU CPUID (APIC IDs, topology)",
    ),
    (
        Cap::SetTssAddr,
        "KVM_CAP_SET_TSS_ADDR",
        "the TSS page VT-x needs for real mode",
    ),
];

/// Why /dev/kvm cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "/dev/kvm does not exist: this host has no KVM. Load the module (modprobe kvm_intel or kvm_amd), enable virtualization (VT-x/AMD-V) in the firmware, or use a host or CI runner with KVM"
    )]
    Missing,
    /// Opening it was refused.
    #[error(
        "permission denied opening /dev/kvm: add your user to its group (ls -l /dev/kvm; usually `sudo usermod -aG kvm $USER`, then log in again), or on a CI runner open it with a udev rule (KERNEL==\"kvm\", MODE=\"0666\" in /etc/udev/rules.d/99-kvm.rules, then `udevadm trigger --name-match=kvm`), or run as root"
    )]
    Permission,
    /// Any other failure to open it.
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// The API version is not the stable one.
    #[error("/dev/kvm reports API version {0}, expected {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A capability minivmm needs is absent.
    #[error("this KVM lacks {name}, needed for {why}")]
    MissingCap {
        /// Capability name.
        name: &'static str,
        /// What minivmm uses it for.
        why: &'static str,
    },
}

/// Opens /dev/kvm and checks its API version and every required capability.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    })?;
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(v));
    }
    for (cap, name, why) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap { name, why });
        }
    }
    Ok(kvm)
}

/// Which implementation sits behind /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavor {
    /// KVM on Intel VT-x (kvm_intel).
    HardwareIntel,
    /// KVM on AMD-V/SVM (kvm_amd).
    HardwareAmd,
    /// PVM (kvm_pvm): no hardware virtualization, guest ring 0 is emulated.
    Pvm,
    /// /dev/kvm answers, but neither as VT-x/AMD-V nor as PVM.
    Unknown,
    /// There is no usable /dev/kvm.
    Absent,
}

/// CPUID leaf 0's EBX for "AuthenticAMD" ("Auth") and "GenuineIntel" ("Genu").
const CPUID_VENDOR_AMD_EBX: u32 = u32::from_le_bytes(*b"Auth");
const CPUID_VENDOR_INTEL_EBX: u32 = u32::from_le_bytes(*b"Genu");

impl KvmFlavor {
    /// Opens /dev/kvm and asks it which implementation it is ([`KvmFlavor::of`]).
    pub fn detect() -> KvmFlavor {
        match Kvm::new() {
            Ok(kvm) => KvmFlavor::of(&kvm),
            Err(_) => KvmFlavor::Absent,
        }
    }

    /// Asks an open KVM what it is. The VT-x and AMD-V back ends can run a guest's
    /// own guests and save their state, so KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE)
    /// returns the size of that state (non-zero even when nesting is off); PVM,
    /// which runs guests without hardware virtualization, returns 0. The vendor is
    /// the host CPU's, from KVM_GET_SUPPORTED_CPUID leaf 0. A KVM without nested
    /// state is called PVM only when the kvm_pvm module is loaded.
    pub fn of(kvm: &Kvm) -> KvmFlavor {
        if kvm.check_extension_int(Cap::NestedState) > 0 {
            let vendor = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .ok()
                .and_then(|c| c.as_slice().iter().find(|e| e.function == 0).map(|e| e.ebx));
            return match vendor {
                Some(CPUID_VENDOR_AMD_EBX) => KvmFlavor::HardwareAmd,
                Some(CPUID_VENDOR_INTEL_EBX) => KvmFlavor::HardwareIntel,
                _ => KvmFlavor::Unknown,
            };
        }
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            KvmFlavor::Pvm
        } else {
            KvmFlavor::Unknown
        }
    }

    /// True when guest kernel code runs at hardware speed.
    pub fn is_hardware(self) -> bool {
        matches!(self, KvmFlavor::HardwareIntel | KvmFlavor::HardwareAmd)
    }

    /// A one-paragraph explanation for the user.
    pub fn explain(self) -> &'static str {
        match self {
            KvmFlavor::HardwareIntel | KvmFlavor::HardwareAmd => {
                "hardware virtualization: guests run at native speed; Linux boots to userspace in well under a second"
            }
            KvmFlavor::Pvm => {
                "PVM (kvm_pvm, no VT-x/AMD-V): guest user code runs natively but guest kernel (ring-0) code is emulated instruction by instruction, ~10,000x slower, and XSAVE and software interrupts (int n, int3) cannot be emulated. Tiny guests (guest/) run in milliseconds; a Linux kernel prints its early boot lines and then stops with an emulation failure"
            }
            KvmFlavor::Unknown => {
                "unknown KVM implementation: it keeps no nested vCPU state (so not VT-x/AMD-V) and kvm_pvm is not loaded"
            }
            KvmFlavor::Absent => "no usable /dev/kvm",
        }
    }
}
