//! Opening /dev/kvm and checking that it can run minivmm's VMs, with errors that say
//! how to fix the host. Used by `Vm::new` and by `minivmm check`.

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every kernel since 2.6.22 reports (KVM_GET_API_VERSION).
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities minivmm relies on, with what each is for.
pub const REQUIRED_CAPS: [(Cap, &str, &str); 6] = [
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
        "permission denied opening /dev/kvm: add your user to its group (ls -l /dev/kvm; usually `sudo usermod -aG kvm $USER`, then log in again) or run as root"
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
    /// None of the known modules is visible.
    Unknown,
}

impl KvmFlavor {
    /// Detects the flavour from the loaded modules (/sys/module/kvm_*). PVM is
    /// checked first: it can be loaded beside kvm_amd/kvm_intel without using them.
    pub fn detect() -> KvmFlavor {
        let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmFlavor::Pvm
        } else if loaded("kvm_intel") {
            KvmFlavor::HardwareIntel
        } else if loaded("kvm_amd") {
            KvmFlavor::HardwareAmd
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
                "unknown KVM implementation (no kvm_intel, kvm_amd or kvm_pvm module visible)"
            }
        }
    }
}
