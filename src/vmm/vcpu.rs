//! One virtual CPU: its set-up (CPUID, MSRs, FPU, registers, LAPIC) and its run loop.
//!
//! Each vCPU runs on its own thread, calling KVM_RUN until the guest does something
//! KVM hands back to us (an I/O port access, MMIO outside RAM, a shutdown...). Only
//! vCPU 0, the bootstrap processor, gets registers: the others sit in KVM's
//! "wait for SIPI" state until the guest starts them with INIT-SIPI-SIPI through its
//! in-kernel LAPIC, so their threads just call KVM_RUN and block.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::vmm::memory::GuestRam;
use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::boot::{EntryPoint, x86};
use super::devices::{DeviceEvent, Devices};

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A set-up ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Setup {
        /// vCPU index.
        id: u32,
        /// The ioctl (e.g. "KVM_SET_CPUID2").
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
}

/// Why a vCPU's run loop ended.
#[derive(Debug, Clone)]
pub enum VcpuEnd {
    /// A device asked to end the VM.
    Device(DeviceEvent),
    /// KVM_EXIT_SHUTDOWN: a triple fault (or the guest asked for a shutdown cycle).
    TripleFault,
    /// KVM_EXIT_SYSTEM_EVENT of type SHUTDOWN: the guest powered off.
    Poweroff,
    /// KVM_EXIT_SYSTEM_EVENT of type RESET.
    Reset,
    /// The guest could not go on: KVM entry failure, internal error, an unexpected exit.
    Failed(Box<GuestFailure>),
    /// minivmm failed on this thread, not the guest: a panic (caught in its
    /// spawner) or a seccomp filter it could not install.
    Internal(String),
    /// The VMM asked it to stop.
    Stopped,
}

/// A report of a vCPU that KVM could not run, with what a person needs to debug it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestFailure {
    /// vCPU index.
    pub vcpu: u32,
    /// What KVM said, e.g. "KVM internal error, suberror 1 (emulation failure)".
    pub reason: String,
    /// General and control registers, formatted.
    pub registers: String,
    /// Up to 16 bytes of guest code at RIP, if readable.
    pub code_at_rip: Vec<u8>,
}

impl std::fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "vCPU {}: {}", self.vcpu, self.reason)?;
        writeln!(f, "{}", self.registers)?;
        write!(f, "code at RIP: {:02x?}", self.code_at_rip)
    }
}

/// Kinds of VM exit, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// IN from a port.
    IoIn,
    /// OUT to a port.
    IoOut,
    /// Read of an address outside RAM.
    MmioRead,
    /// Write to an address outside RAM.
    MmioWrite,
    /// KVM_RUN interrupted by a signal (the VMM kicking the vCPU).
    Interrupted,
    /// Everything else (shutdown, system event, HLT without irqchip...).
    Other,
}

impl ExitKind {
    /// All kinds, in display order.
    pub const ALL: [ExitKind; 6] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Interrupted,
        ExitKind::Other,
    ];

    /// A short name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// Exit counts and the time the VMM spent handling them, per kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExitStats {
    /// Count per [`ExitKind`], indexed by its position in [`ExitKind::ALL`].
    pub count: [u64; 6],
    /// Handling time per kind.
    pub time: [Duration; 6],
}

impl ExitStats {
    fn record(&mut self, kind: ExitKind, took: Duration) {
        let i = kind as usize;
        self.count[i] += 1;
        self.time[i] += took;
    }

    /// Adds another vCPU's statistics to these.
    pub fn merge(&mut self, other: &ExitStats) {
        for i in 0..self.count.len() {
            self.count[i] += other.count[i];
            self.time[i] += other.time[i];
        }
    }

    /// Total exits.
    pub fn total(&self) -> u64 {
        self.count.iter().sum()
    }
}

/// State every vCPU thread of a VM shares.
pub struct VcpuShared {
    /// The port-I/O devices.
    pub devices: Arc<Devices>,
    /// Set when the VM is ending: each thread checks it before re-entering the guest.
    pub stop: AtomicBool,
    /// Set (before `stop`) when the VM ends at its timeout: each vCPU then logs
    /// where it stood, for a guest that hung without a word.
    pub timed_out: AtomicBool,
    /// Guest memory, to read code bytes for failure reports.
    pub mem: GuestRam,
    /// Log every exit.
    pub trace: bool,
}

// CPUID bits (Intel SDM vol. 2A, CPUID; AMD APM vol. 3, appendix E).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Patches the host's supported CPUID for vCPU `id` of `count`: its APIC ID (leaf 1
/// EBX\[31:24\], leaves 0xb/0x1f EDX, AMD 0x8000001e), and a topology of one socket
/// with `count` single-threaded cores, so the guest's view matches the MP table.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u32, count: u32) {
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package − 1 in EAX[31:26] (Intel deterministic cache leaf).
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),                   // SMT level: 1 thread
                    1 => (core_bits, count, (2 << 8) | 1), // core level
                    n => (0, 0, n),                        // invalid level
                };
            }
            0x8000_0001 if count > 1 => e.ecx |= EXT1_ECX_CMP_LEGACY,
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1).min(255);
            }
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff; // core ID; threads per core − 1 = 0
                e.ecx = 0;
            }
            _ => {}
        }
    }
    keep_xsave_consistent(cpuid.as_mut_slice());
}

/// CPUID leaf 1 ECX bit 26: XSAVE/XRSTOR/XSETBV and XCR0 exist.
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// CPUID leaf 0xD: the XSAVE state components (Intel SDM vol. 1, 13.2).
const LEAF_XSTATE: u32 = 0xd;
/// XSAVE's legacy region (512 bytes) plus its header (64): the standard-format
/// area of x87 and SSE state alone, the least 0xD.0 ECX can say.
const XSAVE_LEGACY_AND_HEADER: u32 = 576;

/// A CPUID feature flag: (leaf, register, bit), leaf 7 being subleaf 0.
#[derive(Clone, Copy, Debug)]
enum Flag {
    Leaf1Ecx(u32),
    Leaf7Ebx(u32),
    Leaf7Ecx(u32),
    Leaf7Edx(u32),
}

/// The XCR0 state components past x87 and SSE (which every x86-64 has) and the
/// feature flag that enables each, paired as Linux pairs them
/// (arch/x86/kernel/fpu/xstate.c, xsave_cpuid_features\[\]): a guest kernel drops a
/// component whose flag it does not see, then checks 0xD's sizes against what is
/// left and warns "XSAVE consistency problem" when they differ.
const XSTATE_FLAGS: [(u32, Flag); 9] = [
    (2, Flag::Leaf1Ecx(28)),  // YMM: AVX
    (3, Flag::Leaf7Ebx(14)),  // BNDREGS: MPX
    (4, Flag::Leaf7Ebx(14)),  // BNDCSR: MPX
    (5, Flag::Leaf7Ebx(16)),  // opmask: AVX512F
    (6, Flag::Leaf7Ebx(16)),  // ZMM_Hi256: AVX512F
    (7, Flag::Leaf7Ebx(16)),  // Hi16_ZMM: AVX512F
    (9, Flag::Leaf7Ecx(3)),   // PKRU: PKU
    (17, Flag::Leaf7Edx(24)), // XTILECFG: AMX-TILE
    (18, Flag::Leaf7Edx(24)), // XTILEDATA: AMX-TILE
];

/// Makes leaf 0xD agree with the feature flags the guest is shown: a VMM must not
/// offer an XSAVE state component whose enabling flag it hides, and 0xD.0 ECX (the
/// XSAVE area size for every component XCR0 may enable) must fit what is offered.
///
/// KVM_GET_SUPPORTED_CPUID does not guarantee this: PVM's hides XSAVE itself (leaf
/// 1 ECX bit 26), AVX (bit 28) and PKU (leaf 7 ECX bit 3) yet lists x87|SSE|YMM|PKRU
/// (0x207) in 0xD.0 EAX. So: with XSAVE hidden, 0xD is emptied; otherwise each
/// component in [`XSTATE_FLAGS`] whose flag is clear leaves 0xD.0 EAX/EDX and its
/// own subleaf is zeroed, and 0xD.0 ECX becomes the end of the highest component
/// left (offset 0xD.n EBX + size 0xD.n EAX, standard format). 0xD.0 EBX and 0xD.1
/// EBX (sizes for the XCR0 and XSS in force) are KVM's: it rewrites them whenever
/// the guest's XCR0 or XSS changes (kvm_update_cpuid_runtime); here they are only
/// capped to the new maximum.
pub fn keep_xsave_consistent(entries: &mut [kvm_cpuid_entry2]) {
    let find = |entries: &[kvm_cpuid_entry2], function: u32, index: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default()
    };
    let leaf1 = find(entries, 1, 0);
    let leaf7 = find(entries, 7, 0);
    let shown = |flag: Flag| {
        let (reg, bit) = match flag {
            Flag::Leaf1Ecx(b) => (leaf1.ecx, b),
            Flag::Leaf7Ebx(b) => (leaf7.ebx, b),
            Flag::Leaf7Ecx(b) => (leaf7.ecx, b),
            Flag::Leaf7Edx(b) => (leaf7.edx, b),
        };
        reg & (1 << bit) != 0
    };
    if leaf1.ecx & LEAF1_ECX_XSAVE == 0 {
        for e in entries.iter_mut().filter(|e| e.function == LEAF_XSTATE) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        return;
    }
    let hidden = XSTATE_FLAGS
        .iter()
        .filter(|(_, flag)| !shown(*flag))
        .fold(0u64, |m, (component, _)| m | 1 << component);
    let leaf0 = find(entries, LEAF_XSTATE, 0);
    let offered = (u64::from(leaf0.edx) << 32 | u64::from(leaf0.eax)) & !hidden;
    let mut max_size = XSAVE_LEGACY_AND_HEADER;
    for e in entries.iter_mut().filter(|e| e.function == LEAF_XSTATE) {
        // Subleaves 2..=62 describe component n; 0 and 1 are the summaries.
        if (2..63).contains(&e.index) {
            if hidden & (1 << e.index) != 0 {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            } else if offered & (1 << e.index) != 0 {
                max_size = max_size.max(e.ebx.saturating_add(e.eax));
            }
        }
    }
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_XSTATE && e.index == 0)
    {
        e.eax = offered as u32;
        e.edx = (offered >> 32) as u32;
        e.ecx = max_size;
        e.ebx = e.ebx.min(max_size);
    }
}

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
/// AMD's hardware configuration register (AMD APM vol. 2, and the BKDG of family 10h+).
const MSR_K7_HWCR: u32 = 0xc001_0015;
/// HWCR bit 24, TscFreqSel: the TSC counts at the P0 frequency. Real AMD CPUs since
/// family 10h have it set, and Linux on an AMD host prints "[Firmware Bug]: TSC doesn't
/// count with P0 frequency!" when it reads 0. Intel guests never read it.
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;
/// The first Linux release whose KVM accepts TscFreqSel in a write of HWCR (commit
/// "KVM: x86: Virtualize HWCR.TscFreqSel [bit 24]"). Older KVMs take only 0 and
/// McStatusWrEn (bit 18), refuse anything else and log "Unhandled WRMSR(0xc0010015)"
/// in the host's kernel log, once per vCPU.
const HWCR_TSC_FREQ_SEL_SINCE: (u32, u32) = (6, 7);

/// The MSRs every vCPU starts with, as firmware leaves them, reduced to what this
/// KVM accepts: an MSR is written only when KVM_GET_MSR_INDEX_LIST names it, and
/// HWCR only with a value this KVM takes (KVM has no query for the bits of an MSR
/// it accepts, so that comes from the host kernel's release). A refused write
/// costs a line in the host's log for every vCPU of every VM: a host running
/// thousands of VMs must see none.
#[derive(Debug, Clone)]
pub struct BootMsrs {
    entries: Vec<kvm_msr_entry>,
}

impl BootMsrs {
    /// Works out the list for this KVM (once per process: it depends only on the
    /// host).
    pub fn for_host(kvm: &kvm_ioctls::Kvm) -> Result<BootMsrs, kvm_ioctls::Error> {
        static PLAN: std::sync::OnceLock<BootMsrs> = std::sync::OnceLock::new();
        if let Some(p) = PLAN.get() {
            return Ok(p.clone());
        }
        let known = kvm.get_msr_index_list()?;
        let known = known.as_slice();
        let hwcr_ok = host_kernel_release().is_some_and(|v| v >= HWCR_TSC_FREQ_SEL_SINCE);
        let wanted = [
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING, true),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB, true),
            (MSR_K7_HWCR, HWCR_TSC_FREQ_SEL, hwcr_ok),
        ];
        let entries = wanted
            .into_iter()
            .filter(|(index, _, ok)| {
                let take = *ok && known.contains(index);
                if !take {
                    log::debug!("MSR {index:#x} left at KVM's default: this KVM refuses our value");
                }
                take
            })
            .map(|(index, data, _)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        Ok(PLAN.get_or_init(|| BootMsrs { entries }).clone())
    }

    /// The MSR indices that will be written, in order.
    pub fn indices(&self) -> Vec<u32> {
        self.entries.iter().map(|e| e.index).collect()
    }
}

/// The running kernel's release as (major, minor), from uname(2): "6.1.0-41-amd64"
/// gives (6, 1).
fn host_kernel_release() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain bytes; uname(2) fills it and returns 0 on success.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    parse_release(&release)
}

/// "6.18.44-pvm" → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Sets up vCPU `id`: CPUID, MSRs, FPU, LAPIC, and for the boot vCPU the registers
/// the boot protocol asks for.
pub fn configure(
    vcpu: &VcpuFd,
    id: u32,
    count: u32,
    supported_cpuid: &CpuId,
    msrs: &BootMsrs,
    entry: &EntryPoint,
) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    let mut cpuid = supported_cpuid.clone();
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let list = Msrs::from_entries(&msrs.entries).map_err(|_| VcpuError::Setup {
        id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let written = vcpu.set_msrs(&list).map_err(err("KVM_SET_MSRS"))?;
    if written != msrs.entries.len() {
        // KVM_SET_MSRS stops at the first MSR it refuses. These are comforts of
        // firmware, not something a guest cannot boot without: say so and go on.
        log::warn!(
            "vCPU {id}: KVM refused MSR {:#x} (wrote {written} of {})",
            msrs.entries[written].index,
            msrs.entries.len()
        );
    }

    // x87 control word 0x37f and MXCSR 0x1f80 are the values after FNINIT / reset
    // (Intel SDM vol. 1, 8.1.5 and 10.2.3.1).
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;

    // LAPIC LVT LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as a PC BIOS
    // leaves them (Intel SDM vol. 3A, 10.5.1; MP spec 1.4, 3.6.2 virtual wire mode).
    let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    set_lapic_reg(&mut lapic.regs, 0x350, 0x7 << 8);
    set_lapic_reg(&mut lapic.regs, 0x360, 0x4 << 8);
    vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;

    if id == 0 {
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&x86::boot_sregs(sregs, entry))
            .map_err(err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&x86::boot_regs(entry))
            .map_err(err("KVM_SET_REGS"))?;
    }
    Ok(())
}

fn set_lapic_reg(regs: &mut [libc::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

/// What one KVM_RUN turned into, computed while the exit borrows the vCPU.
enum Step {
    Continue(ExitKind),
    End(ExitKind, VcpuEnd),
    Internal,
    FailEntry(u64),
    Unexpected(String),
}

/// Runs vCPU `id` until the VM ends; returns why and the exit statistics.
pub fn run(mut vcpu: VcpuFd, id: u32, shared: Arc<VcpuShared>) -> (VcpuEnd, ExitStats) {
    let mut stats = ExitStats::default();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            if shared.timed_out.load(Ordering::Acquire) {
                log_at_timeout(&vcpu, id, &stats);
            }
            return (VcpuEnd::Stopped, stats);
        }
        let result = vcpu.run();
        let t0 = Instant::now();
        let step = match result {
            Ok(exit) => handle_exit(exit, id, &shared),
            Err(e) if e.errno() == libc::EINTR => Step::Continue(ExitKind::Interrupted),
            // An AP leaving wait-for-SIPI returns EAGAIN once; just enter again.
            Err(e) if e.errno() == libc::EAGAIN => Step::Continue(ExitKind::Other),
            Err(e) => Step::Unexpected(format!("KVM_RUN failed: {e}")),
        };
        let end = match step {
            Step::Continue(kind) => {
                stats.record(kind, t0.elapsed());
                continue;
            }
            Step::End(kind, end) => {
                stats.record(kind, t0.elapsed());
                if matches!(end, VcpuEnd::TripleFault) {
                    log_triple_fault(&vcpu, id);
                }
                end
            }
            Step::Internal => {
                let ie = internal_error_report(&mut vcpu);
                failure(&vcpu, id, ie, &shared.mem)
            }
            Step::FailEntry(reason) => failure(
                &vcpu,
                id,
                format!("KVM entry failure, hardware reason {reason:#x}"),
                &shared.mem,
            ),
            Step::Unexpected(what) => failure(&vcpu, id, what, &shared.mem),
        };
        return (end, stats);
    }
}

fn handle_exit(exit: VcpuExit<'_>, id: u32, shared: &VcpuShared) -> Step {
    let trace = shared.trace;
    match exit {
        VcpuExit::IoIn(port, data) => {
            shared.devices.pio_read(port, data);
            if trace {
                log::info!(
                    "vcpu{id} io-in  port {port:#06x} size {} -> {data:02x?}",
                    data.len()
                );
            }
            Step::Continue(ExitKind::IoIn)
        }
        VcpuExit::IoOut(port, data) => {
            if trace {
                log::info!(
                    "vcpu{id} io-out port {port:#06x} size {} <- {data:02x?}",
                    data.len()
                );
            }
            match shared.devices.pio_write(port, data) {
                Some(ev) => Step::End(ExitKind::IoOut, VcpuEnd::Device(ev)),
                None => Step::Continue(ExitKind::IoOut),
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            // Addresses no device owns read as all-ones, like an empty bus.
            if !shared.devices.mmio.read(addr, data) {
                log::debug!(
                    "vcpu{id} unhandled mmio read {addr:#x} ({} bytes)",
                    data.len()
                );
            }
            if trace {
                log::info!(
                    "vcpu{id} mmio-read  {addr:#x} size {} -> {data:02x?}",
                    data.len()
                );
            }
            Step::Continue(ExitKind::MmioRead)
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !shared.devices.mmio.write(addr, data) {
                log::debug!("vcpu{id} unhandled mmio write {addr:#x} {data:02x?}");
            }
            if trace {
                log::info!(
                    "vcpu{id} mmio-write {addr:#x} size {} <- {data:02x?}",
                    data.len()
                );
            }
            Step::Continue(ExitKind::MmioWrite)
        }
        VcpuExit::Shutdown => Step::End(ExitKind::Other, VcpuEnd::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                Step::End(ExitKind::Other, VcpuEnd::Poweroff)
            }
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Step::End(ExitKind::Other, VcpuEnd::Reset),
            other => Step::Unexpected(format!("KVM system event {other}")),
        },
        // With the in-kernel LAPIC, HLT is handled inside KVM; an exit here is harmless.
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Step::Continue(ExitKind::Other),
        // Split irqchip: a LAPIC's EOI of a level-triggered vector routed from our IOAPIC.
        VcpuExit::IoapicEoi(vector) => {
            if let Some(io) = &shared.devices.ioapic {
                io.end_of_interrupt(vector);
            }
            Step::Continue(ExitKind::Other)
        }
        VcpuExit::InternalError => Step::Internal,
        VcpuExit::FailEntry(reason, _) => Step::FailEntry(reason),
        other => Step::Unexpected(format!("unexpected VM exit {other:?}")),
    }
}

/// Reads KVM_EXIT_INTERNAL_ERROR's details from the shared kvm_run page.
fn internal_error_report(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
    // `internal` member of the exit union.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let what = match ie.suberror {
        1 => " (emulation failure: KVM could not emulate the instruction at RIP)",
        2 => " (simultaneous exception)",
        3 => " (delivery event)",
        _ => "",
    };
    let n = (ie.ndata as usize).min(ie.data.len());
    format!(
        "KVM internal error, suberror {}{what}; data {:x?}",
        ie.suberror,
        &ie.data[..n]
    )
}

/// Logs which vCPU triple-faulted and, where KVM kept them, its registers. On Intel
/// (VMX) they are those of the fault that could not be delivered: RIP and CR2 name
/// the instruction and address, the IDT's base and limit whether it had one at all.
/// On AMD (SVM) the VMCB is undefined after a shutdown intercept, so KVM INITs the
/// vCPU before exiting (svm.c, shutdown_interception) and only the vCPU's number is
/// left: which one it was still tells an AP from the boot CPU.
fn log_triple_fault(vcpu: &VcpuFd, id: u32) {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => log::warn!(
            "vCPU {id} triple-faulted; KVM reset its registers (AMD), so where is unknown"
        ),
        (Ok(r), Ok(s)) => log::warn!(
            "vCPU {id} triple-faulted: rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} idt={:#x}+{:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.idt.base,
            s.idt.limit
        ),
        _ => log::warn!("vCPU {id} triple-faulted; its registers could not be read"),
    }
}

/// Logs where vCPU `id` stood when its VM's time ran out: RIP (look it up in the
/// kernel's System.map), RSP, RFLAGS' IF (0: interrupts off, as in a spin with them
/// masked), CR3, and how many exits it had made. A vCPU stopped in HLT waits for an
/// interrupt; one busy in the guest with few exits is spinning, or (on a nested bed)
/// stuck in the outer KVM's own handling of its faults.
fn log_at_timeout(vcpu: &VcpuFd, id: u32, stats: &ExitStats) {
    let exits = stats.total();
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => log::warn!(
            "at the timeout, vCPU {id} was at rip={:#x} rsp={:#x} if={} cr3={:#x}, after {exits} exits",
            r.rip,
            r.rsp,
            (r.rflags >> 9) & 1,
            s.cr3
        ),
        _ => log::warn!("at the timeout, vCPU {id} (registers unreadable), after {exits} exits"),
    }
}

fn failure(vcpu: &VcpuFd, id: u32, reason: String, mem: &GuestRam) -> VcpuEnd {
    let (registers, code_at_rip) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => {
            let text = format!(
                "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
                 rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
                 rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
                 cs={:#06x} (base {:#x}, l={}, db={}) cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                s.cs.selector,
                s.cs.base,
                s.cs.l,
                s.cs.db,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            );
            let linear = s.cs.base.wrapping_add(r.rip);
            // With paging on, ask KVM to walk the guest's page tables.
            let phys = if s.cr0 & (1 << 31) != 0 {
                vcpu.translate_gva(linear)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address)
            } else {
                Some(linear)
            };
            let mut code = vec![0u8; 16];
            let code = match phys.map(|p| mem.read_slice(&mut code, GuestAddress(p))) {
                Some(Ok(())) => code,
                _ => Vec::new(),
            };
            (text, code)
        }
        _ => ("(registers unavailable)".to_string(), Vec::new()),
    };
    VcpuEnd::Failed(Box::new(GuestFailure {
        vcpu: id,
        reason,
        registers,
        code_at_rip,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_releases_parse_to_major_minor() {
        assert_eq!(super::parse_release("6.1.0-41-cloud-amd64"), Some((6, 1)));
        assert_eq!(super::parse_release("6.18.44"), Some((6, 18)));
        assert_eq!(super::parse_release("5.15"), Some((5, 15)));
        assert_eq!(super::parse_release("garbage"), None);
        assert!((6, 1) < super::HWCR_TSC_FREQ_SEL_SINCE);
        assert!((6, 18) >= super::HWCR_TSC_FREQ_SEL_SINCE);
    }

    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        let leaves = [1, 0xb, 0x8000_0008].map(|function| kvm_cpuid_entry2 {
            function,
            ..Default::default()
        });
        let mut cpuid = CpuId::from_entries(&leaves).unwrap();
        patch_cpuid(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ecx & 0xff, 3);
        assert_eq!((e[2].ecx >> 12) & 0xf, 2);
    }

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn regs(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> [u32; 4] {
        let e = entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap();
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    /// Leaf 0xD as an AMD host's KVM reports x87|SSE|YMM|PKRU: YMM (256 bytes at
    /// 576), PKRU (8 bytes at 2432), 0xD.0 ECX the end of PKRU.
    fn xstate_leaves() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0xd, 0, [0x207, 0x988, 0x988, 0]),
            leaf(0xd, 1, [0x5, 0, 0, 0]),
            leaf(0xd, 2, [0x100, 0x240, 0, 0]),
            leaf(0xd, 9, [0x8, 0x980, 0, 0]),
        ]
    }

    #[test]
    fn xsave_hidden_empties_leaf_0xd() {
        // PVM's KVM_GET_SUPPORTED_CPUID: leaf 1 ECX without XSAVE or AVX, leaf 7
        // without PKU, yet 0xD.0 EAX = 0x207.
        let mut e = vec![leaf(1, 0, [0, 0, 0x8120_2000, 0x078b_fbff])];
        e.push(leaf(7, 0, [0, 0x0180_0002, 0x4, 0xa800_0000]));
        e.extend(xstate_leaves());
        keep_xsave_consistent(&mut e);
        for index in [0, 1, 2, 9] {
            assert_eq!(regs(&e, 0xd, index), [0; 4], "0xD.{index}");
        }
        assert_eq!(regs(&e, 1, 0)[2], 0x8120_2000, "leaf 1 untouched");
    }

    #[test]
    fn a_hidden_flag_takes_its_component_and_size_out_of_leaf_0xd() {
        let xsave_avx = LEAF1_ECX_XSAVE | 1 << 28;
        // PKU (leaf 7 ECX bit 3) hidden: PKRU goes, the area ends after YMM.
        let mut e = vec![leaf(1, 0, [0, 0, xsave_avx, 0]), leaf(7, 0, [0; 4])];
        e.extend(xstate_leaves());
        keep_xsave_consistent(&mut e);
        assert_eq!(regs(&e, 0xd, 0), [0x7, 0x340, 0x340, 0]);
        assert_eq!(regs(&e, 0xd, 2), [0x100, 0x240, 0, 0]);
        assert_eq!(regs(&e, 0xd, 9), [0; 4]);
        assert_eq!(regs(&e, 0xd, 1), [0x5, 0, 0, 0], "0xD.1 is KVM's");

        // AVX hidden as well: x87|SSE alone, 576 bytes (what the Debian kernel's
        // "XSAVE consistency problem" compares against).
        let mut e = vec![leaf(1, 0, [0, 0, LEAF1_ECX_XSAVE, 0])];
        e.extend(xstate_leaves());
        keep_xsave_consistent(&mut e);
        assert_eq!(regs(&e, 0xd, 0), [0x3, 0x240, 0x240, 0]);
        assert_eq!(regs(&e, 0xd, 2), [0; 4]);
    }

    #[test]
    fn a_consistent_leaf_0xd_is_left_alone() {
        // The outer test VM's KVM (QEMU TCG, EPYC-Rome): XSAVE, AVX, no PKU, and
        // 0xD offers x87|SSE|YMM only; 0xD.0 EBX as KVM set it for XCR0 = x87.
        let before = vec![
            leaf(1, 0, [0x0083_0f10, 0, 0xf6f8_3203, 0x178b_fbfd]),
            leaf(7, 0, [0, 0x0198_01ab, 0x4, 0x2000_0000]),
            leaf(0xd, 0, [0x7, 0x240, 0x340, 0]),
            leaf(0xd, 1, [0x5, 0, 0, 0]),
            leaf(0xd, 2, [0x100, 0x240, 0, 0]),
        ];
        let mut after = before.clone();
        keep_xsave_consistent(&mut after);
        for b in &before {
            let want = regs(&before, b.function, b.index);
            assert_eq!(
                regs(&after, b.function, b.index),
                want,
                "{:#x}.{}",
                b.function,
                b.index
            );
        }
    }

    #[test]
    fn patch_cpuid_keeps_xsave_consistent() {
        let mut e = vec![leaf(1, 0, [0, 0, LEAF1_ECX_XSAVE, 0])];
        e.extend(xstate_leaves());
        let mut cpuid = CpuId::from_entries(&e).unwrap();
        patch_cpuid(&mut cpuid, 0, 1);
        assert_eq!(regs(cpuid.as_slice(), 0xd, 0)[0], 0x3);
    }
}
