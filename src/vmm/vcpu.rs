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

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    /// Guest memory, to read code bytes for failure reports.
    pub mem: GuestMemoryMmap,
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
/// count with P0 frequency!" when it reads 0. Intel guests never read it. Recent KVMs
/// accept the bit from userspace; older ones refuse the write, which only costs the
/// warning, hence it comes last in the list below.
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Sets up vCPU `id`: CPUID, MSRs, FPU, LAPIC, and for the boot vCPU the registers
/// the boot protocol asks for.
pub fn configure(
    vcpu: &VcpuFd,
    id: u32,
    count: u32,
    supported_cpuid: &CpuId,
    entry: &EntryPoint,
) -> Result<(), VcpuError> {
    let err = |what| move |source| VcpuError::Setup { id, what, source };
    let mut cpuid = supported_cpuid.clone();
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;

    let entries = [
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        // Last: KVM_SET_MSRS stops at the first MSR it refuses.
        (MSR_K7_HWCR, HWCR_TSC_FREQ_SEL),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
        id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        log::debug!(
            "vCPU {id}: KVM accepted {written} of {} MSRs",
            entries.len()
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
            // No MMIO devices of our own: unbacked addresses read as all-ones, like
            // an empty bus.
            data.fill(0xff);
            log::debug!(
                "vcpu{id} unhandled mmio read {addr:#x} ({} bytes)",
                data.len()
            );
            if trace {
                log::info!("vcpu{id} mmio-read  {addr:#x} size {}", data.len());
            }
            Step::Continue(ExitKind::MmioRead)
        }
        VcpuExit::MmioWrite(addr, data) => {
            log::debug!("vcpu{id} unhandled mmio write {addr:#x} {data:02x?}");
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

fn failure(vcpu: &VcpuFd, id: u32, reason: String, mem: &GuestMemoryMmap) -> VcpuEnd {
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
}
