//! One virtual machine on KVM, from a [`VmConfig`] to an [`Outcome`].
//!
//! Building a VM reads top to bottom in [`Vm::new`]: validate the config, map guest
//! memory, load the kernel and write the boot structures, create the KVM VM with its
//! in-kernel interrupt controllers and timer, wire COM1's interrupt, create and set up
//! the vCPUs. [`Vm::run`] starts one thread per vCPU and waits for the first of them
//! to end the VM (or for the timeout, or a stop request), then stops the rest.

pub mod boot;
pub mod config;
pub mod console;
pub mod devices;
pub mod hostfile;
pub mod kvm;
pub mod memory;
pub mod ratelimit;
pub mod seccomp;
pub mod vcpu;
pub mod virtio;

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vmm::memory::GuestRam;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use boot::{BootInfo, KernelFormat};
pub use config::{IrqChip, SerialIn, SerialOut, VmConfig};
pub use vcpu::{ExitKind, ExitStats, GuestFailure};

use devices::mmio::MmioSlot;
use devices::{DeviceEvent, Devices, lock};
use vcpu::{VcpuEnd, VcpuShared};

/// Address of the 3-page region VT-x needs for real-mode emulation (KVM_SET_TSS_ADDR):
/// just below the BIOS ROM at the top of 4 GiB, inside the MMIO gap, never RAM.
const TSS_ADDR: usize = 0xfffb_d000;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// /dev/kvm cannot be used.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The kernel or initrd could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// More vCPUs than this KVM supports.
    #[error("--vcpus {asked} is more than this host's KVM supports ({max}, KVM_CAP_MAX_VCPUS)")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
    /// A KVM ioctl building the VM failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Setting up a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The serial output file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    SerialFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `--disk` image cannot be used.
    #[error(transparent)]
    Disk(#[from] virtio::block::DiskError),
    /// A `--share` directory cannot be served.
    #[error(transparent)]
    Share(#[from] virtio::fs::ShareError),
    /// A thread or eventfd could not be created.
    #[error("cannot {what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub enum End {
    /// The guest wrote this value to isa-debug-exit.
    DebugExit(u32),
    /// The guest reset the machine (i8042 reset line or a KVM reset event).
    Reset,
    /// The guest powered off (KVM system event).
    Poweroff,
    /// Triple fault: KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// The timeout elapsed.
    Timeout,
    /// Stopped by a [`StopHandle`] (e.g. a signal to the process, or Ctrl-A x).
    Stopped(StopReason),
    /// KVM could not run the guest.
    GuestError(Box<GuestFailure>),
    /// A vCPU thread failed for minivmm's own reasons (it panicked, or could not
    /// install its seccomp filter): not the guest's doing, so it is reported (and
    /// exits) as minivmm's failure.
    VmmBug(String),
}

/// Why someone stopped the VM from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The process got this signal (SIGINT, SIGTERM...).
    Signal(i32),
    /// The user typed the console escape (Ctrl-A x).
    Escape,
    /// A library caller asked.
    Requested,
}

/// Process exit statuses for each end, documented in the README. Debug-exit gives
/// QEMU's odd (v << 1) | 1; every other end has an even status so the two never mix.
pub mod status {
    /// Reset or poweroff: the guest shut down normally.
    pub const CLEAN: i32 = 0;
    /// Command-line usage error (clap's convention).
    pub const USAGE: i32 = 2;
    /// The guest triple-faulted.
    pub const TRIPLE_FAULT: i32 = 120;
    /// KVM could not run the guest (entry failure, internal/emulation error).
    pub const GUEST_ERROR: i32 = 122;
    /// --timeout elapsed (as timeout(1)).
    pub const TIMEOUT: i32 = 124;
    /// minivmm itself failed: bad input, no KVM, refused by the ledger.
    pub const VMM_ERROR: i32 = 125;
}

impl End {
    /// The process exit status this end maps to.
    pub fn exit_status(&self) -> i32 {
        match self {
            End::DebugExit(v) => devices::debug_exit::exit_status(*v),
            End::Reset | End::Poweroff => status::CLEAN,
            End::TripleFault => status::TRIPLE_FAULT,
            End::Timeout => status::TIMEOUT,
            End::Stopped(StopReason::Signal(n)) => 128 + n,
            End::Stopped(_) => 130,
            End::GuestError(_) => status::GUEST_ERROR,
            End::VmmBug(_) => status::VMM_ERROR,
        }
    }

    /// A short name for JSON and logs.
    pub fn name(&self) -> &'static str {
        match self {
            End::DebugExit(_) => "debug-exit",
            End::Reset => "reset",
            End::Poweroff => "poweroff",
            End::TripleFault => "triple-fault",
            End::Timeout => "timeout",
            End::Stopped(_) => "stopped",
            End::GuestError(_) => "error",
            End::VmmBug(_) => "vmm-error",
        }
    }
}

/// Everything known about a VM after it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// Time [`Vm::new`] took to build the VM (memory, kernel, KVM VM, vCPUs).
    pub build_time: Duration,
    /// From the start of [`Vm::run`] to the end of the last vCPU thread.
    pub run_time: Duration,
    /// Time to close the VM and vCPU file descriptors after the last vCPU thread
    /// ended: the host kernel tears the VM down then (with the in-kernel irqchip and
    /// PIT this waits for SRCU grace periods, ~15-25 ms on PVM hosts).
    pub teardown_time: Duration,
    /// From the start of [`Vm::run`] to the guest's first serial byte.
    pub first_output: Option<Duration>,
    /// Bytes the guest wrote to the console.
    pub console_bytes: u64,
    /// Of those, bytes that never reached the console's destination: it did not keep
    /// up (nobody read the pipe), failed, or was given up at the end (see
    /// `console::OutputPump`).
    pub console_dropped: u64,
    /// Console writes KVM kept in its coalesced ring instead of exiting to us (see
    /// `devices::coalesced`); None when the VM ran without the ring (KVM lacks
    /// KVM_CAP_COALESCED_PIO, or `--trace-exits`).
    pub console_coalesced: Option<u64>,
    /// vCPUs the VM had.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel's format.
    pub format: KernelFormat,
    /// VM exits of all vCPUs.
    pub exits: ExitStats,
    /// What each virtio device did.
    pub devices: Vec<virtio::DeviceReport>,
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_status(&self) -> i32 {
        self.end.exit_status()
    }
}

enum Event {
    Vcpu(u32, VcpuEnd),
    Stop(StopReason),
}

/// Asks a running VM to stop, from any thread (a signal handler thread, a test):
/// at once, or by pressing its ACPI power button.
#[derive(Clone)]
pub struct StopHandle {
    events: Sender<Event>,
    /// Weak: a handle kept after the VM ended must not keep its devices alive.
    devices: std::sync::Weak<Devices>,
}

impl StopHandle {
    /// Requests the stop; the VM ends with [`End::Stopped`]. Does nothing once the VM
    /// has ended.
    pub fn stop(&self, why: StopReason) {
        let _ = self.events.send(Event::Stop(why));
    }

    /// Presses the VM's ACPI power button, asking the guest to shut down (see
    /// `devices::acpi_pm`). False when the guest has not enabled the power button
    /// event (a guest without ACPI, or not yet booted that far), or the VM has ended:
    /// nothing will happen then.
    pub fn power_button(&self) -> bool {
        self.devices
            .upgrade()
            .is_some_and(|d| d.acpi_pm.press_power_button())
    }
}

/// A built VM, ready to run.
pub struct Vm {
    // Field order is drop order: vCPU fds go before the VM fd.
    vcpus: Vec<VcpuFd>,
    /// Shared with a split irqchip's IOAPIC, which sets GSI routes through it until
    /// `finish` detaches it.
    vm: Arc<VmFd>,
    shared: Arc<VcpuShared>,
    build_time: Duration,
    boot: BootInfo,
    vcpu_count: u32,
    memory_mib: u64,
    timeout: Option<Duration>,
    serial_in: SerialIn,
    /// Whether the VM has KVM's PIT (decides how it is torn down).
    kernel_pit: bool,
    /// The virtio devices, served by a worker thread while the VM runs.
    virtio: Vec<Arc<virtio::VirtioMmio>>,
    /// The seccomp filters each thread installs as it starts.
    filters: seccomp::Filters,
    seccomp_mode: seccomp::SeccompMode,
    /// Whether `run` filters its calling thread too ([`Vm::confine_caller`]).
    confine_caller: bool,
    events: (Sender<Event>, Receiver<Event>),
}

impl Vm {
    /// Builds the VM described by `config`. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        config.validate()?;
        let filters = seccomp::Filters::build(config.seccomp)?;
        // Disks first: a missing or locked image is refused before anything else.
        let mut backends: Vec<Box<dyn virtio::VirtioDevice>> = Vec::new();
        for d in &config.disks {
            let image = virtio::block::DiskImage::open(&d.path, d.read_only)?;
            backends.push(Box::new(virtio::block::Block::new(image)));
        }
        let mem = memory::create_guest_memory(config.memory_mib)?;
        for (share, tag) in config.shares.iter().zip(config.share_tags()) {
            let fs =
                virtio::fs::Fs::new(&share.path, &tag, share.read_only, share.keep_cache, &mem)?;
            backends.push(Box::new(fs));
        }
        if config.rng {
            backends.push(Box::new(virtio::rng::Rng::default()));
        }
        let mut config = config;
        if let Some(out) = config.virtio_console.take() {
            backends.push(Box::new(virtio::console::Console::new(out.0)));
        }
        // validate() bounded the count by the interrupt lines there are.
        let slots: Vec<MmioSlot> = (0..backends.len()).filter_map(MmioSlot::nth).collect();
        let boot = boot::load(&mem, &config, &slots)?;
        let t_loaded = t0.elapsed();

        let kvm = kvm::open()?;
        let max = kvm.get_max_vcpus();
        if config.vcpus as usize > max {
            return Err(VmError::TooManyVcpus {
                asked: config.vcpus,
                max,
            });
        }
        let vm = Arc::new(kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?);
        register_memory(&vm, &mem)?;
        create_interrupt_controllers(&vm, config.irqchip, config.pit)?;

        let os = |what| move |source| VmError::Os { what, source };
        let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
        vm.register_irqfd(&com1_irq, devices::COM1_IRQ)
            .map_err(ioctl("KVM_IRQFD"))?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
        vm.register_irqfd(&kbd_irq, devices::i8042::KBD_IRQ)
            .map_err(ioctl("KVM_IRQFD"))?;
        let aux_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
        vm.register_irqfd(&aux_irq, devices::i8042::AUX_IRQ)
            .map_err(ioctl("KVM_IRQFD"))?;
        let sci = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
        vm.register_irqfd(&sci, u32::from(boot::acpi::SCI_IRQ))
            .map_err(ioctl("KVM_IRQFD"))?;
        let (mut mmio, virtio) = virtio_devices(&vm, backends, &slots, &mem)?;
        let (ioapic, pit) = match config.irqchip {
            IrqChip::Kernel => (None, None),
            IrqChip::Split => {
                let router = Box::new(KvmRouter(std::sync::Mutex::new(Some(vm.clone()))));
                // Its ID follows the CPUs', as the MP table and MADT say.
                let mut ioapic = devices::ioapic::Ioapic::new(config.vcpus as u8, router);
                // A virtio interrupt that came while its pin was masked is delivered
                // at the unmask (see VirtioMmio::reassert).
                for d in &virtio {
                    let dev = d.clone();
                    let watch = move |routed: bool| {
                        if routed {
                            dev.reassert();
                        }
                    };
                    ioapic.watch_pin(d.slot().irq as usize, Box::new(watch));
                }
                let pit = if config.pit {
                    // ISA IRQ 0 is IOAPIC pin (and GSI) 0 in the MP table and MADT.
                    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
                    vm.register_irqfd(&irq, 0).map_err(ioctl("KVM_IRQFD"))?;
                    let pit = devices::pit::Pit::new(irq);
                    ioapic.watch_pin(0, pit.pin_watch());
                    Some(pit)
                } else {
                    None
                };
                let ioapic = Arc::new(ioapic);
                mmio.insert_range(
                    devices::ioapic::IOAPIC_BASE,
                    devices::ioapic::IOAPIC_SIZE,
                    ioapic.clone(),
                );
                (Some(ioapic), pit)
            }
        };
        let t_vm = t0.elapsed();
        let cpuid = supported_cpuid(&kvm)?;
        let msrs = vcpu::BootMsrs::for_host(&kvm).map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(ioctl("KVM_CREATE_VCPU"))?;
            vcpu::configure(&fd, id, config.vcpus, &cpuid, &msrs, &boot.entry)?;
            vcpus.push(fd);
        }
        let t_vcpus = t0.elapsed();
        // Each exit shows in --trace-exits, as a learner expects: no coalescing then.
        let com1_ring = if config.trace_exits {
            None
        } else {
            coalesce_com1(&kvm, &vm, &vcpus[0])
        };

        let console = serial_console(config.serial_out, &filters)?;
        let devices = Arc::new(Devices {
            serial: std::sync::Mutex::new(devices::serial::new_com1(com1_irq, console)),
            com1_ring,
            com1_coalesced: Default::default(),
            i8042: std::sync::Mutex::new(devices::i8042::I8042::new(kbd_irq, aux_irq)),
            cmos: Default::default(),
            acpi_pm: devices::acpi_pm::AcpiPm::new(sci),
            mmio,
            ioapic,
            pit,
        });
        log::debug!(
            "VM built in {:?}: memory + kernel {t_loaded:?}, KVM VM + devices {:?}, vCPUs {:?}",
            t0.elapsed(),
            t_vm - t_loaded + (t0.elapsed() - t_vcpus),
            t_vcpus - t_vm
        );

        Ok(Vm {
            vcpus,
            vm,
            shared: Arc::new(VcpuShared {
                devices,
                stop: Default::default(),
                timed_out: Default::default(),
                mem,
                trace: config.trace_exits,
            }),
            boot,
            vcpu_count: config.vcpus,
            memory_mib: config.memory_mib,
            timeout: config.timeout,
            serial_in: config.serial_in,
            kernel_pit: config.pit && config.irqchip == IrqChip::Kernel,
            virtio,
            filters,
            seccomp_mode: config.seccomp,
            confine_caller: false,
            events: mpsc::channel(),
            build_time: t0.elapsed(),
        })
    }

    /// Where the kernel went and how it will be entered.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            events: self.events.0.clone(),
            devices: Arc::downgrade(&self.shared.devices),
        }
    }

    /// Makes [`Vm::run`] install the seccomp filter of [`seccomp::ThreadKind::Main`]
    /// on the calling thread once every thread of the VM has started (new threads
    /// inherit their creator's filter, so it cannot come sooner). For a caller that,
    /// like the `minivmm` binary, has nothing left to do on that thread but wait for
    /// the VM, tear it down, release its claim and report: the filter stays for the
    /// thread's life. Nothing happens with `--seccomp off`.
    pub fn confine_caller(&mut self) {
        self.confine_caller = true;
    }

    /// Runs the VM until the guest ends it, the timeout elapses or a stop is
    /// requested; every vCPU thread is joined before this returns. The same as
    /// [`Vm::start`] then [`VmHandle::wait`].
    pub fn run(self) -> Result<Outcome, VmError> {
        self.start()?.wait()
    }

    /// Starts the VM's threads (one per vCPU, the virtio device thread, and the
    /// stdin thread with [`SerialIn::Stdin`]) and returns at once with a handle to
    /// watch, stop and wait for it. If a thread cannot be started, the ones that did
    /// are stopped and joined and the VM is torn down before the error returns.
    pub fn start(mut self) -> Result<VmHandle, VmError> {
        kick::install();
        let start = Instant::now();
        let tx = self.events.0.clone();
        let mut handle = VmHandle {
            threads: Vec::new(),
            worker: None,
            pit_timer: None,
            pump: None,
            start,
            vm: None,
        };
        let spawned = self.spawn_threads(&mut handle, &tx);
        handle.vm = Some(self);
        match spawned {
            Ok(()) => Ok(handle),
            Err(e) => {
                handle.finish(End::Stopped(StopReason::Requested));
                Err(e)
            }
        }
    }

    /// The threads of [`Vm::start`], recorded in `handle` as they start so that a
    /// failure part-way stops the ones already running.
    fn spawn_threads(&mut self, handle: &mut VmHandle, tx: &Sender<Event>) -> Result<(), VmError> {
        if !self.virtio.is_empty() {
            let w = virtio::worker::Worker::start(self.virtio.clone(), self.filters.clone())
                .map_err(|source| VmError::Os {
                    what: "start the virtio device thread",
                    source,
                })?;
            handle.worker = Some(w);
        }
        if let Some(pit) = &self.shared.devices.pit {
            let t = devices::pit::PitTimer::start(pit, self.filters.clone()).map_err(|e| {
                VmError::Os {
                    what: "start the PIT timer thread",
                    source: match e {
                        devices::pit::PitError::Thread(io) => io,
                    },
                }
            })?;
            handle.pit_timer = Some(t);
        }
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let filters = self.filters.clone();
            let t = spawn_vcpu(id as u32, fd, self.shared.clone(), tx.clone(), filters).map_err(
                |source| VmError::Os {
                    what: "start a vCPU thread",
                    source,
                },
            )?;
            handle.threads.push(t);
        }
        if self.serial_in == SerialIn::Stdin {
            let raw = console::RawTerminal::enable(0);
            let stop = self.stop_handle();
            let pump = console::StdinPump::start(
                self.shared.devices.clone(),
                raw.is_some(),
                self.filters.clone(),
                move || stop.stop(StopReason::Escape),
            )
            .map_err(|source| VmError::Os {
                what: "start the stdin thread",
                source,
            })?;
            handle.pump = Some((pump, raw));
        }
        if self.confine_caller {
            seccomp::filter(seccomp::ThreadKind::Main, self.seccomp_mode)
                .and_then(|p| seccomp::apply(seccomp::ThreadKind::Main, p.as_ref()))?;
        }
        Ok(())
    }
}

/// Where a started VM is in its life, as [`VmHandle::state`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Its vCPUs run the guest.
    Running,
    /// A stop was requested or the guest ended it; the threads are being stopped
    /// and joined (by [`VmHandle::wait`]).
    Stopping,
}

/// A running VM: what [`Vm::start`] returns. Dropping it without [`VmHandle::wait`]
/// stops the VM and joins its threads all the same (the outcome is lost).
pub struct VmHandle {
    threads: Vec<JoinHandle<(VcpuEnd, ExitStats)>>,
    worker: Option<virtio::worker::Worker>,
    /// The userspace PIT's timer thread (split irqchip).
    pit_timer: Option<devices::pit::PitTimer>,
    pump: Option<(console::StdinPump, Option<console::RawTerminal>)>,
    start: Instant,
    /// The VM itself; taken by `finish`.
    vm: Option<Vm>,
}

impl VmHandle {
    /// Running, or stopping once a stop was asked for or a vCPU left its run loop
    /// (the guest ended the VM, or KVM could not go on).
    pub fn state(&self) -> VmState {
        let stopping = self.threads.iter().any(|t| t.is_finished())
            || self
                .vm
                .as_ref()
                .is_none_or(|vm| vm.shared.stop.load(Ordering::Acquire));
        if stopping {
            VmState::Stopping
        } else {
            VmState::Running
        }
    }

    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        match &self.vm {
            Some(vm) => vm.stop_handle(),
            // Only `finish` takes the VM, and it consumes the handle.
            None => StopHandle {
                events: mpsc::channel().0,
                devices: std::sync::Weak::new(),
            },
        }
    }

    /// Asks the VM to stop; [`VmHandle::wait`] then returns [`End::Stopped`].
    pub fn stop(&self, why: StopReason) {
        self.stop_handle().stop(why);
    }

    /// Waits until the guest ends the VM, the timeout elapses or a stop is
    /// requested, then stops every thread, joins them, tears the VM down and
    /// returns what happened.
    pub fn wait(mut self) -> Result<Outcome, VmError> {
        let end = match &self.vm {
            Some(vm) => {
                let devices = &vm.shared.devices;
                // Console bytes KVM coalesced from a guest that then leaves the UART
                // alone reach the console on this thread's tick.
                let mut drain = || {
                    devices.com1_ring.as_ref().is_some_and(|r| !r.is_empty())
                        && devices.com1().1 > 0
                };
                let tick = devices
                    .com1_ring
                    .is_some()
                    .then_some(&mut drain as &mut dyn FnMut() -> bool);
                wait_for_end(&vm.events.1, self.start, vm.timeout, tick)
            }
            None => End::Stopped(StopReason::Requested),
        };
        Ok(self.finish(end))
    }

    /// Stops and joins every thread, closes the VM, and drains the console.
    fn finish(&mut self, end: End) -> Outcome {
        let vm = self
            .vm
            .take()
            .expect("finish runs once, and the VM is set until then");
        // Before the stop flag: a vCPU that sees the stop of a timeout says where it was.
        if matches!(end, End::Timeout) {
            vm.shared.timed_out.store(true, Ordering::Release);
        }
        // Stop every vCPU: raise the flag, then signal all the threads at once, again
        // and again until every one has left KVM_RUN (a signal that lands just before
        // KVM_RUN would be missed, hence the repeat), and only then join them.
        vm.shared.stop.store(true, Ordering::Release);
        if matches!(end, End::Timeout) {
            // A guest that ran out of time is often waiting on a device: say where
            // each one stands, and whether its IOAPIC pin was masked (bit 16).
            for d in &vm.virtio {
                let pin = d.slot().irq as usize;
                let rte = vm
                    .shared
                    .devices
                    .ioapic
                    .as_ref()
                    .and_then(|io| io.entry(pin));
                let rte = rte.map_or(String::new(), |e| format!(", IOAPIC entry {e:#x}"));
                log::warn!("at the timeout, {}{rte}", d.describe_queues());
            }
        }
        for d in &vm.virtio {
            d.halt();
        }
        kick::until_all_finished(&self.threads);
        let mut exits = ExitStats::default();
        for t in self.threads.drain(..) {
            if let Ok((_, stats)) = t.join() {
                exits.merge(&stats);
            }
        }
        let run_time = self.start.elapsed();
        self.worker = None; // stops and joins the device thread: no more guest memory access
        self.pit_timer = None;
        self.pump = None; // joins the stdin thread, then restores the terminal
        // Close the VM now (the vCPU fds went with their threads) to time the
        // kernel's teardown; guest memory is unmapped later, with `shared`.
        let t_teardown = Instant::now();
        if !vm.kernel_pit {
            delete_memory_slots(&vm.vm, &vm.shared.mem);
        }
        if let Some(io) = &vm.shared.devices.ioapic {
            io.detach(); // its reference to the VM fd, so that the close below is the last
        }
        let Vm {
            vm: vm_fd,
            shared,
            events,
            build_time,
            boot,
            vcpu_count,
            memory_mib,
            timeout,
            virtio,
            ..
        } = vm;
        drop(vm_fd);
        let teardown_time = t_teardown.elapsed();
        let console = {
            // The guest's last coalesced bytes (e.g. before its debug-exit) first.
            let (com1, _) = shared.devices.com1();
            let deadline = timeout.map(|t| self.start + t);
            drain_console(com1.writer(), &end, &events.1, deadline);
            com1.writer().stats()
        };
        Outcome {
            end,
            build_time,
            run_time,
            teardown_time,
            first_output: console
                .first_byte
                .map(|t| t.saturating_duration_since(self.start)),
            console_bytes: console.bytes,
            console_dropped: console.dropped,
            console_coalesced: shared.devices.com1_ring.as_ref().map(|_| {
                shared
                    .devices
                    .com1_coalesced
                    .load(std::sync::atomic::Ordering::Relaxed)
            }),
            vcpus: vcpu_count,
            memory_mib,
            format: boot.format,
            exits,
            devices: virtio.iter().map(|d| d.report()).collect(),
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.vm.is_some() {
            self.finish(End::Stopped(StopReason::Requested));
        }
    }
}

/// Starts vCPU `id`'s thread; it reports how it ended on `tx` and returns its exit
/// statistics when joined.
fn spawn_vcpu(
    id: u32,
    fd: VcpuFd,
    shared: Arc<VcpuShared>,
    tx: Sender<Event>,
    filters: seccomp::Filters,
) -> std::io::Result<JoinHandle<(VcpuEnd, ExitStats)>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            // A panic in a vCPU thread (a bug of ours) must still end the VM, or the
            // main thread would wait for an event that never comes.
            // The filter goes on before the first KVM_RUN: from then on this thread
            // runs what the guest drives.
            if let Err(e) = filters.enter(seccomp::ThreadKind::Vcpu) {
                let end = VcpuEnd::Internal(format!("vCPU {id}: {e}"));
                let _ = tx.send(Event::Vcpu(id, end.clone()));
                return (end, ExitStats::default());
            }
            let run = std::panic::AssertUnwindSafe(|| vcpu::run(fd, id, shared));
            let (end, stats) = std::panic::catch_unwind(run).unwrap_or_else(|payload| {
                let what = panic_message(payload.as_ref());
                (
                    VcpuEnd::Internal(format!("the vCPU {id} thread panicked: {what}")),
                    ExitStats::default(),
                )
            });
            let _ = tx.send(Event::Vcpu(id, end.clone()));
            (end, stats)
        })
}

/// What a caught panic said: `panic!` carries a `&str` or a `String`.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The shortest and longest pause between two calls of [`wait_for_end`]'s `tick`:
/// short while it finds work (console bytes flowing), doubling up to the longest
/// while it does not, so that an idle VM costs two wake-ups a second.
const TICK_MIN: Duration = Duration::from_millis(10);
const TICK_MAX: Duration = Duration::from_millis(500);

/// Waits for the first event that ends the VM; meanwhile calls `tick`, if any, now
/// and then (it says whether it found work).
fn wait_for_end(
    rx: &Receiver<Event>,
    start: Instant,
    timeout: Option<Duration>,
    mut tick: Option<&mut dyn FnMut() -> bool>,
) -> End {
    let mut every = TICK_MIN;
    loop {
        let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
        let wait = match (left, tick.is_some()) {
            (Some(left), true) => Some(left.min(every)),
            (Some(left), false) => Some(left),
            (None, true) => Some(every),
            (None, false) => None,
        };
        let ev = match wait {
            Some(wait) => match rx.recv_timeout(wait) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) if left.is_some_and(|l| l <= wait) => {
                    return End::Timeout;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(tick) = tick.as_mut() {
                        every = if tick() {
                            TICK_MIN
                        } else {
                            (every * 2).min(TICK_MAX)
                        };
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return End::Stopped(StopReason::Requested),
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => return End::Stopped(StopReason::Requested),
            },
        };
        let (id, end) = match ev {
            Event::Stop(why) => return End::Stopped(why),
            Event::Vcpu(id, end) => (id, end),
        };
        log::debug!("vCPU {id} ended: {end:?}");
        return match end {
            VcpuEnd::Stopped => continue,
            VcpuEnd::Device(DeviceEvent::DebugExit(v)) => End::DebugExit(v),
            VcpuEnd::Device(DeviceEvent::Reset) | VcpuEnd::Reset => End::Reset,
            VcpuEnd::Device(DeviceEvent::Poweroff) | VcpuEnd::Poweroff => End::Poweroff,
            VcpuEnd::TripleFault => End::TripleFault,
            VcpuEnd::Failed(f) => End::GuestError(f),
            VcpuEnd::Internal(what) => End::VmmBug(what),
        };
    }
}

/// Puts each virtio device on the MMIO bus at its slot, with its interrupt (an
/// eventfd bound to the slot's IOAPIC pin with KVM_IRQFD) and its queue
/// notifications (an eventfd per queue bound to the QueueNotify register with
/// KVM_IOEVENTFD, the queue index as datamatch, so the guest's notify costs no exit
/// to userspace).
#[allow(clippy::type_complexity)]
fn virtio_devices(
    vm: &VmFd,
    backends: Vec<Box<dyn virtio::VirtioDevice>>,
    slots: &[MmioSlot],
    mem: &GuestRam,
) -> Result<(devices::mmio::MmioBus, Vec<Arc<virtio::VirtioMmio>>), VmError> {
    let os = |what| move |source| VmError::Os { what, source };
    let mut bus = devices::mmio::MmioBus::default();
    let mut all = Vec::new();
    for (backend, slot) in backends.into_iter().zip(slots) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create an eventfd"))?;
        vm.register_irqfd(&irq, slot.irq)
            .map_err(ioctl("KVM_IRQFD"))?;
        let dev = Arc::new(
            virtio::VirtioMmio::new(backend, mem.clone(), irq, *slot)
                .map_err(os("create a virtio queue eventfd"))?,
        );
        let (addr, fds) = dev.notify_fds();
        for (i, fd) in fds.iter().enumerate() {
            let at = kvm_ioctls::IoEventAddress::Mmio(addr);
            // Without it, the MMIO exit path signals the same eventfd: slower, same result.
            if let Err(e) = vm.register_ioevent(fd, &at, i as u32) {
                log::debug!("KVM_IOEVENTFD at {addr:#x}: {e}; notifies take the exit path");
            }
        }
        bus.insert(*slot, dev.clone());
        all.push(dev);
    }
    Ok((bus, all))
}

/// Hands each RAM range to KVM (KVM_SET_USER_MEMORY_REGION, one slot per range).
fn register_memory(vm: &VmFd, mem: &GuestRam) -> Result<(), VmError> {
    for r in memory_slots(mem) {
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM fd:
        // in `Vm` the fd field drops before `shared` (which holds `mem`), and on
        // `Vm::new`'s error paths the local `vm` drops before the earlier `mem`.
        unsafe { vm.set_user_memory_region(r) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Deletes the VM's memory slots just before its fd is closed (KVM_SET_USER_MEMORY_REGION
/// with size 0), to end a short-lived VM sooner.
///
/// Creating the irqchip leaves an SRCU grace period running in the host kernel, paced
/// by timer ticks (~16 ms on the hosts measured), and closing the VM fd waits for what
/// is left of it. Deleting a slot waits for an *expedited* grace period instead, and
/// that hurries the pending one along: a VM that lived 0.1 ms ends in ~8 ms instead of
/// ~16 ms, and one that lived longer pays only the expedited period, well under 1 ms
/// (examples/exit_floor.rs --delete-slots). Only without a PIT: the PIT's own teardown
/// then takes longer than the wait it saves. Failures only cost time, so they are
/// logged, not returned.
fn delete_memory_slots(vm: &VmFd, mem: &GuestRam) {
    for r in memory_slots(mem) {
        let r = kvm_userspace_memory_region {
            memory_size: 0,
            ..r
        };
        // SAFETY: size 0 deletes the slot; KVM stops referring to the mapping, which
        // stays alive until `mem` drops.
        if let Err(e) = unsafe { vm.set_user_memory_region(r) } {
            log::debug!("deleting memory slot {} before teardown: {e}", r.slot);
        }
    }
}

/// One KVM memory slot per RAM range of `mem`, numbered from 0.
fn memory_slots(mem: &GuestRam) -> impl Iterator<Item = kvm_userspace_memory_region> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        })
}

/// The PC's interrupt controllers and timer inside KVM, after the TSS page VT-x
/// needs for real mode (KVM_SET_TSS_ADDR). With [`IrqChip::Kernel`]: the 8259 PICs,
/// IOAPIC and per-vCPU LAPICs (KVM_CREATE_IRQCHIP), and, if asked for, the 8254 PIT
/// (KVM_CREATE_PIT2) whose speaker port we leave to KVM's dummy. With
/// [`IrqChip::Split`]: only the LAPICs (KVM_ENABLE_CAP of KVM_CAP_SPLIT_IRQCHIP, which
/// reserves the first GSIs for the userspace IOAPIC's routes); the rest is built by
/// [`Vm::new`] as devices of ours.
fn create_interrupt_controllers(vm: &VmFd, irqchip: IrqChip, pit: bool) -> Result<(), VmError> {
    vm.set_tss_address(TSS_ADDR)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    if irqchip == IrqChip::Split {
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = devices::ioapic::PINS as u64;
        return vm
            .enable_cap(&cap)
            .map_err(ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"));
    }
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    if !pit {
        return Ok(());
    }
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
}

/// The split irqchip's IOAPIC routes, handed to KVM (KVM_SET_GSI_ROUTING): every
/// route is an MSI route, as KVM requires without its own IOAPIC.
struct KvmRouter(std::sync::Mutex<Option<Arc<VmFd>>>);

impl devices::ioapic::MsiRouter for KvmRouter {
    fn set_routes(&self, routes: &[devices::ioapic::MsiRoute]) -> Result<(), String> {
        let entries: Vec<kvm_bindings::kvm_irq_routing_entry> = routes
            .iter()
            .map(|r| {
                let mut e = kvm_bindings::kvm_irq_routing_entry {
                    gsi: r.gsi,
                    type_: kvm_bindings::KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi = kvm_bindings::kvm_irq_routing_msi {
                    address_lo: r.address,
                    address_hi: 0,
                    data: r.data,
                    ..Default::default()
                };
                e
            })
            .collect();
        let table = kvm_bindings::KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("GSI routing table: {e:?}"))?;
        match &*lock(&self.0) {
            Some(vm) => vm
                .set_gsi_routing(&table)
                .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}")),
            None => Err("the VM is closed".into()),
        }
    }

    fn detach(&self) {
        lock(&self.0).take();
    }
}

/// Asks KVM to keep the guest's writes to COM1's data port in its coalesced ring
/// instead of exiting for each (see [`devices::coalesced`]) and maps the ring
/// through `vcpu`. None, and every write exits as before, when KVM lacks
/// KVM_CAP_COALESCED_PIO or either step fails: a slower console, nothing worse.
fn coalesce_com1(
    kvm: &kvm_ioctls::Kvm,
    vm: &VmFd,
    vcpu: &VcpuFd,
) -> Option<devices::coalesced::Ring> {
    if !kvm.check_extension(kvm_ioctls::Cap::CoalescedPio) {
        log::debug!("KVM has no KVM_CAP_COALESCED_PIO: every console byte exits");
        return None;
    }
    let port = kvm_ioctls::IoEventAddress::Pio(u64::from(devices::COM1_BASE));
    if let Err(e) = vm.register_coalesced_mmio(port, 1) {
        log::warn!("KVM_REGISTER_COALESCED_MMIO for COM1 failed ({e}): every console byte exits");
        return None;
    }
    match devices::coalesced::Ring::map(vcpu) {
        Ok(ring) => Some(ring),
        Err(e) => {
            log::warn!("cannot map KVM's coalesced ring ({e}): every console byte exits");
            let _ = vm.unregister_coalesced_mmio(port, 1);
            None
        }
    }
}

/// KVM_GET_SUPPORTED_CPUID, asked once per process: the answer depends only on the
/// host CPU and KVM, and each call costs ~0.3 ms under PVM (CPUID traps to the outer
/// hypervisor), which adds up for a library user running many VMs.
///
/// Plus the TSC-deadline mode of the LAPIC timer (leaf 1 ECX bit 24), which KVM's
/// LAPIC emulates but leaves out of that list: a VMM offers it when
/// KVM_CAP_TSC_DEADLINE_TIMER says so (Documentation/virt/kvm/api.rst). With it and
/// ARAT (leaf 6, which KVM lists), Linux needs no PIT: it times with the LAPIC alone
/// (`apic_needs_pit()`), as it must with a split irqchip and no 8259s, where the
/// PIT's IRQ 0 cannot be registered.
fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<kvm_bindings::CpuId, VmError> {
    static CPUID: std::sync::OnceLock<kvm_bindings::CpuId> = std::sync::OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c.clone());
    }
    let mut c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
    }
    Ok(CPUID.get_or_init(|| c).clone())
}

/// CPUID leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode (SDM Vol. 3A
/// §11.5.4.1).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// COM1's output side for `out`, with its writer thread unless output is discarded.
fn serial_console(out: SerialOut, filters: &seccomp::Filters) -> Result<devices::Console, VmError> {
    let sink: Box<dyn std::io::Write + Send> = match out {
        SerialOut::None => return Ok(devices::Console::discard()),
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::Writer(w) => w,
        SerialOut::File(path) => match hostfile::create_output(&path) {
            Ok(f) => Box::new(f),
            Err(source) => return Err(VmError::SerialFile { path, source }),
        },
    };
    devices::Console::new(sink, filters.clone()).map_err(|source| VmError::Os {
        what: "start the console thread",
        source,
    })
}

/// How long console output may make no progress, once the VM was stopped (timeout,
/// signal, escape), before what is left of it is dropped: the stop must not wait on a
/// reader that went away, but a live one gets what the guest wrote.
const CONSOLE_STALL: Duration = Duration::from_millis(200);

/// Delivers what the guest wrote to the console before [`Vm::run`] returns, so that
/// none of it is lost at exit, without letting a console nobody reads keep the VM (and
/// its ledger claim) alive: after a stop, a stalled console is given up after
/// [`CONSOLE_STALL`]; after the guest's own end (a test's verdict, whose last lines
/// matter) it is waited for as `cat` would wait, but only up to the `--timeout`
/// deadline, and a stop request (a signal) still ends the wait.
fn drain_console(
    console: &devices::Console,
    end: &End,
    rx: &Receiver<Event>,
    deadline: Option<Instant>,
) {
    let Some(pump) = console.pump() else {
        return;
    };
    pump.close();
    let stopped = matches!(end, End::Timeout | End::Stopped(_));
    let mut last_progress = Instant::now();
    loop {
        match pump.wait(Duration::from_millis(20)) {
            console::Drain::Done => return,
            console::Drain::Progress => last_progress = Instant::now(),
            console::Drain::Stalled => {}
        }
        let give_up = if stopped {
            last_progress.elapsed() >= CONSOLE_STALL
        } else {
            deadline.is_some_and(|d| Instant::now() >= d)
        } || matches!(rx.try_recv(), Ok(Event::Stop(_)));
        if give_up {
            pump.abandon();
            return;
        }
    }
}

/// The real-time signal (SIGRTMIN) minivmm sends its vCPU threads to make KVM_RUN
/// return: a program that blocks signals around a VM must leave this one unblocked.
pub fn kick_signal() -> i32 {
    kick::signal()
}

/// Kicking vCPU threads out of KVM_RUN with a real-time signal whose handler does
/// nothing: the signal's arrival makes KVM_RUN return EINTR.
mod kick {
    use super::*;
    use std::sync::Once;
    use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    /// Installs the handler once per process.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            if let Err(e) = register_signal_handler(SIGRTMIN(), noop) {
                log::warn!("cannot install the vCPU kick signal handler: {e}");
            }
        });
    }

    /// The kick signal's number.
    pub fn signal() -> libc::c_int {
        SIGRTMIN()
    }

    /// Signals every thread not yet finished, waits a little, and again, until all
    /// have finished.
    ///
    /// All at once, not one after the other: a busy vCPU thread leaves KVM_RUN only
    /// when it next gets a host CPU, and with many more vCPU threads than cores that
    /// takes a scheduling round per thread. Kicked one by one (waiting for each before
    /// the next), 64 busy vCPUs on 2 cores took 2.2-2.6 s to stop; kicked together they
    /// all leave within the same round or two, and each one that leaves frees CPU
    /// time for the rest: 0.04-0.11 s (scripts/bench-stop.sh). The wait grows from 50 us to 10 ms, so a VM of a few idle
    /// vCPUs stops in well under a millisecond and a crowded host is not flooded with
    /// signals (at most one per thread per 10 ms).
    pub fn until_all_finished<T>(threads: &[JoinHandle<T>]) {
        let mut wait = Duration::from_micros(50);
        loop {
            let mut running = 0;
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the pthread_t is valid until the JoinHandle is joined or
                // dropped, and `threads` holds them all.
                unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN()) };
                running += 1;
            }
            if running == 0 {
                return;
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_vcpu_thread_is_minivmm_s_failure_not_the_guest_s() {
        let caught = std::panic::catch_unwind(|| panic!("boom at exit {}", 7)).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "boom at exit 7");
        let caught = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "plain");

        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(Event::Vcpu(1, VcpuEnd::Stopped)).unwrap();
        tx.send(Event::Vcpu(
            0,
            VcpuEnd::Internal("the vCPU 0 thread panicked: boom".into()),
        ))
        .unwrap();
        let end = wait_for_end(&rx, Instant::now(), None, None);
        assert!(
            matches!(&end, End::VmmBug(w) if w.ends_with("boom")),
            "{end:?}"
        );
        assert_eq!(end.exit_status(), status::VMM_ERROR);
        assert_eq!(end.name(), "vmm-error");
    }
}
