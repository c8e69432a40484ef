//! virtio devices on the virtio-mmio transport (virtio 1.2, OASIS, §4.2).
//!
//! A virtio device is a register file plus shared-memory queues. The driver in the
//! guest finds the registers (here: a 4 KiB page of MMIO, described on the kernel
//! command line and in the ACPI DSDT), negotiates features, and tells the device
//! where each virtqueue's three rings lie in guest RAM (§2.7: the descriptor table,
//! the driver's "available" ring, the device's "used" ring). From then on a request
//! is a chain of descriptors — guest-physical buffers, each readable or writable by
//! the device — put on the available ring, then a write of the queue's index to
//! QueueNotify. The device does the work, puts the chain's head on the used ring
//! and raises its interrupt.
//!
//! How that maps onto KVM here:
//! - Register accesses are MMIO exits handled on the vCPU thread ([`VirtioMmio`]
//!   as an [`MmioDevice`]). They only change register state; they wait while the
//!   worker holds the device for a request (InterruptStatus and InterruptACK never
//!   do), and never once the VM is ending.
//! - A write to QueueNotify never reaches userspace as an exit: it is bound to an
//!   eventfd with KVM_IOEVENTFD (address = the register, datamatch = the queue
//!   index), which KVM signals and the vCPU goes straight back into the guest.
//! - One thread per VM ([`worker::Worker`]) waits on those eventfds with epoll and
//!   does the device's work (disk I/O, reading random bytes): a vCPU never waits
//!   for a device.
//! - The interrupt is an eventfd bound with KVM_IRQFD to the device's IOAPIC pin:
//!   the worker writes it and KVM injects the interrupt, no vCPU exit involved.
//!
//! The rings are read and written with rust-vmm's `virtio-queue`; each chain is
//! checked before use (see [`Chain`]), and a driver that breaks the rules gets the
//! device marked DEVICE_NEEDS_RESET (§2.1.1), never a panic or a host access
//! outside guest RAM.

pub mod block;
pub mod console;
pub mod fs;
pub mod fs_guard;
pub mod rng;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::vmm::memory::GuestRam;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::devices::lock;
use crate::vmm::devices::mmio::MmioDevice;

/// "virt" in little endian: the MagicValue register (§4.2.2).
const MAGIC: u32 = 0x7472_6976;
/// The transport version this device speaks: 2, the non-legacy interface.
const VERSION: u32 = 2;
/// VendorID: not a PCI vendor; "MVMM" for this VMM.
const VENDOR_ID: u32 = 0x4d4d_564d;

/// Register offsets of virtio-mmio version 2 (§4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device has hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest has given up on the device.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: the device used buffers in at least one virtqueue.
const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the device's configuration (or its status) changed.
const INT_CONFIG_CHANGE: u32 = 2;

/// Feature bit 32: the device follows virtio 1.x, not the legacy interface. A
/// version-2 MMIO device must offer it and the driver must accept it (§6.1).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why a device stopped serving a queue: each is a driver breaking the spec, and
/// marks the device DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The rings of a ready queue are not all inside guest RAM, or misaligned.
    #[error("queue {0}'s rings are not inside guest RAM")]
    BadRings(usize),
    /// The device's code panicked on a request (minivmm's bug, or a library's,
    /// such as the FUSE server's, on a request it did not expect). The device is
    /// broken; the worker and every other device go on.
    #[error("queue {queue}: the device panicked serving it: {what}")]
    Panicked {
        /// The queue.
        queue: usize,
        /// The panic's message.
        what: String,
    },
    /// The available ring's index moved further than the queue has entries.
    #[error("queue {queue}: the available ring is broken: {source}")]
    Avail {
        /// The queue.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
    /// A descriptor chain loops, is longer than the queue, or its next index is
    /// out of range, so it never ends.
    #[error(
        "queue {queue}: the chain at descriptor {head} does not end (a loop, or longer than the queue)"
    )]
    EndlessChain {
        /// The queue.
        queue: usize,
        /// The chain's first descriptor.
        head: u16,
    },
    /// A buffer lies (partly) outside guest RAM.
    #[error("queue {queue}: descriptor buffer {addr:#x}+{len} is outside guest RAM")]
    OutsideRam {
        /// The queue.
        queue: usize,
        /// Guest-physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one (§2.7.4.2).
    #[error("queue {queue}: a device-readable buffer follows a writable one in chain {head}")]
    ReadableAfterWritable {
        /// The queue.
        queue: usize,
        /// The chain's first descriptor.
        head: u16,
    },
    /// The used ring could not be written.
    #[error("queue {queue}: cannot write the used ring: {source}")]
    Used {
        /// The queue.
        queue: usize,
        /// What virtio-queue found.
        source: virtio_queue::Error,
    },
}

/// One request from the driver: a checked descriptor chain, as lists of
/// guest-physical buffers. Every buffer is inside guest RAM (one region each).
#[derive(Debug, Default)]
pub struct Chain {
    /// Index of the first descriptor: what goes back on the used ring.
    pub head: u16,
    /// Buffers the device may read, in order.
    pub readable: Vec<(GuestAddress, u32)>,
    /// Buffers the device may write, in order, after every readable one.
    pub writable: Vec<(GuestAddress, u32)>,
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|(_, l)| u64::from(*l)).sum()
    }
}

/// Takes the next request off `queue`'s available ring, checked: `Ok(None)` when
/// the ring is empty. virtio-queue's chain iterator stops quietly at a loop or a bad
/// descriptor (after at most queue-size steps); a chain whose last descriptor still
/// says "next" is therefore one that does not end, and is refused here.
pub fn pop_chain(
    queue: &mut Queue,
    index: usize,
    mem: &GuestRam,
) -> Result<Option<Chain>, VirtioError> {
    let desc_chain = match queue.iter(mem) {
        Ok(mut it) => match it.next() {
            Some(c) => c,
            None => return Ok(None),
        },
        Err(source) => {
            return Err(VirtioError::Avail {
                queue: index,
                source,
            });
        }
    };
    let mut chain = Chain {
        head: desc_chain.head_index(),
        ..Default::default()
    };
    let mut last: Option<Descriptor> = None;
    for d in desc_chain {
        // A buffer must lie in one RAM region for the device to hand it to a
        // host system call; the 3 GiB hole is the only place two regions meet.
        if d.len() > 0 && mem.get_slice(d.addr(), d.len() as usize).is_err() {
            return Err(VirtioError::OutsideRam {
                queue: index,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if d.is_write_only() {
            chain.writable.push((d.addr(), d.len()));
        } else if !chain.writable.is_empty() {
            return Err(VirtioError::ReadableAfterWritable {
                queue: index,
                head: chain.head,
            });
        } else {
            chain.readable.push((d.addr(), d.len()));
        }
        last = Some(d);
    }
    match last {
        Some(d) if !d.has_next() => Ok(Some(chain)),
        _ => Err(VirtioError::EndlessChain {
            queue: index,
            head: chain.head,
        }),
    }
}

/// Puts a served chain on `queue`'s used ring with the bytes written into it.
pub fn complete(
    queue: &mut Queue,
    index: usize,
    mem: &GuestRam,
    head: u16,
    len: u32,
) -> Result<(), VirtioError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| VirtioError::Used {
            queue: index,
            source,
        })
}

/// Serves a read of a device's configuration space from its bytes: what lies
/// beyond them reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    if let Some(src) = config.get(start..start.saturating_add(data.len())) {
        data.copy_from_slice(src);
    }
}

/// Bytes moved by a device, reported in the VM's outcome.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes the device read from its backend into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes the device wrote from guest memory to its backend.
    pub write_bytes: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
}

/// What a device did, for the JSON outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    /// "virtio-blk" or "virtio-rng".
    pub kind: &'static str,
    /// The backing file, for disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Guest-physical base address of its registers.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// Bytes read from the backend (guest reads).
    pub read_bytes: u64,
    /// Bytes written to the backend (guest writes).
    pub write_bytes: u64,
    /// Requests completed.
    pub requests: u64,
    /// True if the driver broke the device (DEVICE_NEEDS_RESET was set).
    pub broken: bool,
}

/// A virtio device's own behaviour, behind the common transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (§5): 2 block, 4 entropy.
    fn device_id(&self) -> u32;
    /// The feature bits offered; [`VIRTIO_F_VERSION_1`] is added by the transport.
    fn features(&self) -> u64;
    /// The largest size of each queue; the number of queues is this slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Serves every request waiting on queue `index`. Returns true if it put at
    /// least one chain on the used ring (the driver is then interrupted).
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, VirtioError>;
    /// The byte counters, shared with the outcome (read without the device's lock).
    fn counters(&self) -> &Arc<Counters>;
    /// Fills in the device-specific parts of its report.
    fn report(&self) -> (&'static str, Option<String>);
}

/// The virtio-mmio register file of one device, and the device.
pub struct VirtioMmio {
    state: Mutex<Transport>,
    /// InterruptStatus, outside the lock: the guest's interrupt handler reads it
    /// and writes InterruptACK on every interrupt, and must not wait while the
    /// worker holds `state` through a long request (a 1 MiB write, an fdatasync).
    interrupt_status: AtomicU32,
    /// Set when the VM is ending ([`VirtioMmio::halt`]): a vCPU waiting for
    /// `state` gives up, so that a request that never returns cannot keep the vCPU,
    /// and so the VM, from ending.
    halted: AtomicBool,
    /// Set once DEVICE_NEEDS_RESET was raised, for the report.
    was_broken: AtomicBool,
    /// The device's kind, backend and counters, for reports that must not wait
    /// for the device.
    kind: &'static str,
    backend: Option<String>,
    counters: Arc<Counters>,
    /// Guest RAM. Declared after `state` (which holds the device) so that it drops
    /// after it: virtio-fs keeps a borrowed view of these mappings (fs.rs).
    mem: GuestRam,
    /// Bound to the device's IOAPIC pin with KVM_IRQFD.
    irq: EventFd,
    /// One per queue, bound to QueueNotify with KVM_IOEVENTFD.
    notify: Vec<EventFd>,
    slot: crate::vmm::devices::mmio::MmioSlot,
}

/// Register state, changed by the driver.
struct Transport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    /// Queues (bit per index) given a size or ring address that was refused.
    refused: u64,
}

impl VirtioMmio {
    /// Wraps `device` in a transport at `slot`. `irq` must be registered as an irqfd
    /// for `slot.irq` by the caller; the notify eventfds are created here (see
    /// [`VirtioMmio::notify_fds`]).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        irq: EventFd,
        slot: crate::vmm::devices::mmio::MmioSlot,
    ) -> std::io::Result<VirtioMmio> {
        let sizes = device.queue_max_sizes().to_vec();
        let (kind, backend) = device.report();
        let counters = device.counters().clone();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notify = Vec::with_capacity(sizes.len());
        for max in sizes {
            // The sizes are ours, powers of two up to 32768: Queue::new accepts them.
            let q = Queue::new(max).map_err(|e| std::io::Error::other(e.to_string()))?;
            queues.push(q);
            notify.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(VirtioMmio {
            state: Mutex::new(Transport {
                device,
                queues,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
                refused: 0,
            }),
            interrupt_status: AtomicU32::new(0),
            halted: AtomicBool::new(false),
            was_broken: AtomicBool::new(false),
            kind,
            backend,
            counters,
            mem,
            irq,
            notify,
            slot,
        })
    }

    /// The eventfd of each queue and the guest-physical address of QueueNotify, to
    /// register with KVM_IOEVENTFD (datamatch = the queue index).
    pub fn notify_fds(&self) -> (u64, &[EventFd]) {
        (self.slot.base + reg::QUEUE_NOTIFY, &self.notify)
    }

    /// The VM is ending: vCPUs stop waiting for the device (see `vcpu_lock`).
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Release);
    }

    /// Locks the registers for a vCPU's access. The worker holds the lock while it
    /// serves a request, which can take long (an fdatasync) or forever (a hung
    /// network file system under a share); the vCPU waits like a bus would, but gives up
    /// with `None` once the VM is ending, so the stop path never waits on a device.
    fn vcpu_lock(&self) -> Option<std::sync::MutexGuard<'_, Transport>> {
        let mut spins = 0u32;
        loop {
            match self.state.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if self.halted.load(Ordering::Acquire) {
                return None;
            }
            // Most waits are a few microseconds (one request); yield first, then
            // sleep so that a long one does not burn a host CPU.
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }

    /// Where the device sits.
    pub fn slot(&self) -> crate::vmm::devices::mmio::MmioSlot {
        self.slot
    }

    /// Serves queue `index` after its notify eventfd fired (the worker thread).
    pub fn process_queue(&self, index: usize) {
        let mut t = lock(&self.state);
        let t = &mut *t;
        if t.status & status::DRIVER_OK == 0 || t.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = t.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let result = if queue.is_valid(&self.mem) {
            // A panic here would end the one worker thread and with it every
            // device of the VM: catch it and break only this device. Unwind safety:
            // the device is marked broken below and is never served again before
            // the guest resets it (which gives it fresh queues).
            let device = &mut t.device;
            let mem = &self.mem;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                device.process(index, queue, mem)
            }))
            .unwrap_or_else(|payload| {
                Err(VirtioError::Panicked {
                    queue: index,
                    what: crate::vmm::panic_message(payload.as_ref()),
                })
            })
        } else {
            Err(VirtioError::BadRings(index))
        };
        match result {
            Ok(false) => {}
            Ok(true) => self.interrupt(INT_USED_BUFFER),
            Err(e) => {
                // Once per break, and a guest that resets and breaks a device
                // over and over is rate-limited.
                crate::vmm::ratelimit::warn_limited!(
                    "virtio device at {:#x} needs a reset: {e}",
                    self.slot.base
                );
                t.status |= status::DEVICE_NEEDS_RESET;
                self.was_broken.store(true, Ordering::Relaxed);
                self.interrupt(INT_CONFIG_CHANGE);
            }
        }
    }

    /// Pulses the interrupt again if InterruptStatus still has a bit set: for when
    /// the guest unmasks the device's IOAPIC pin. The virtio-mmio line is level in
    /// spirit (it stays up until the driver writes InterruptACK, virtio 1.2 §4.2.2),
    /// but our split IOAPIC delivers pulses, and drops those that came while the pin
    /// was masked; KVM's in-kernel IOAPIC keeps such an edge in its IRR and delivers
    /// it at the unmask, and so does this.
    pub fn reassert(&self) {
        if self.interrupt_status.load(Ordering::SeqCst) != 0
            && let Err(e) = self.irq.write(1)
        {
            log::debug!("virtio irqfd write: {e}");
        }
    }

    fn interrupt(&self, why: u32) {
        self.interrupt_status.fetch_or(why, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            log::debug!("virtio irqfd write: {e}");
        }
    }

    /// What the device did, for the outcome.
    pub fn report(&self) -> DeviceReport {
        let c = &self.counters;
        DeviceReport {
            kind: self.kind,
            path: self.backend.clone(),
            mmio_base: self.slot.base,
            irq: self.slot.irq,
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            broken: self.was_broken.load(Ordering::Relaxed),
        }
    }

    /// Where the device's queues stand, in one line, for a VM that ended by its
    /// timeout: it tells a guest that never kicked (avail = next, used = avail,
    /// nothing pending) from a kick the device never saw (avail ahead of next) and
    /// from an interrupt the guest never took (used ahead and InterruptStatus still
    /// set). Never waits: a device busy in a request says so instead.
    pub fn describe_queues(&self) -> String {
        let head = format!(
            "{} at {:#x} (irq {}): InterruptStatus {:#x}",
            self.kind,
            self.slot.base,
            self.slot.irq,
            self.interrupt_status.load(Ordering::SeqCst)
        );
        let t = match self.state.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return format!("{head}, busy in a request");
            }
        };
        let mut out = format!("{head}, Status {:#x}", t.status);
        for (i, q) in t.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            // The avail index is the driver's, read from guest memory now.
            let avail = q
                .avail_idx(&self.mem, Ordering::Acquire)
                .map(|w| w.0.to_string())
                .unwrap_or_else(|_| "unreadable".into());
            out.push_str(&format!(
                "; queue {i}: avail {avail}, next {}, used {}",
                q.next_avail(),
                q.next_used()
            ));
        }
        out
    }
}

impl Transport {
    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Writing 0 to Status resets the device (§2.1.2, §4.2.3.1).
    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.refused = 0;
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        let mut v = v;
        // FEATURES_OK sticks only if the driver accepted a subset of what we
        // offer, including VERSION_1 (§2.2.2, §6.1); the driver reads Status back
        // to see whether it did.
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::debug!(
                    "virtio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                v &= !status::FEATURES_OK;
            }
        }
        // The device alone sets DEVICE_NEEDS_RESET; keep it until a reset.
        self.status = v | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn read(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => 0, // VirtioMmio answers it without the lock
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            // No shared memory regions (e.g. virtio-fs's DAX window): a region
            // that does not exist reads as length and base all ones (§4.2.2).
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            _ => {
                log::debug!("virtio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write(&mut self, offset: u64, v: u32) {
        // Queue set-up is allowed between FEATURES_OK and DRIVER_OK, on a queue
        // that is not yet ready (§4.2.3.2); anything else is ignored.
        let can_set_up_queue =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::SHM_SEL => {}
            reg::INTERRUPT_ACK => {} // VirtioMmio takes it without the lock
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                // virtio-queue refuses a size that is not a power of two up to the
                // maximum (§2.7) and misaligned rings, but only logs it and keeps
                // the old value; remember the refusal so the queue cannot be made
                // ready (QueueReady reads 0) until the device is reset.
                let bit = 1u64.checked_shl(self.queue_sel).unwrap_or(0);
                let refused = self.refused & bit != 0;
                let Some(q) = self.selected_queue() else {
                    return;
                };
                if !can_set_up_queue || (q.ready() && offset != reg::QUEUE_READY) {
                    log::debug!("virtio: queue register {offset:#x} written at the wrong time");
                    return;
                }
                let lo = |cur: u64| (cur & !0xffff_ffff) | u64::from(v);
                let hi = |cur: u64| (cur & 0xffff_ffff) | (u64::from(v) << 32);
                let ok = match offset {
                    // A size past u16 is refused, not truncated to its low bits.
                    reg::QUEUE_NUM => u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok()),
                    reg::QUEUE_READY => {
                        q.set_ready(v == 1 && !refused);
                        true
                    }
                    reg::QUEUE_DESC_LOW => q
                        .try_set_desc_table_address(GuestAddress(lo(q.desc_table())))
                        .is_ok(),
                    reg::QUEUE_DESC_HIGH => q
                        .try_set_desc_table_address(GuestAddress(hi(q.desc_table())))
                        .is_ok(),
                    reg::QUEUE_DRIVER_LOW => q
                        .try_set_avail_ring_address(GuestAddress(lo(q.avail_ring())))
                        .is_ok(),
                    reg::QUEUE_DRIVER_HIGH => q
                        .try_set_avail_ring_address(GuestAddress(hi(q.avail_ring())))
                        .is_ok(),
                    reg::QUEUE_DEVICE_LOW => q
                        .try_set_used_ring_address(GuestAddress(lo(q.used_ring())))
                        .is_ok(),
                    _ => q
                        .try_set_used_ring_address(GuestAddress(hi(q.used_ring())))
                        .is_ok(),
                };
                if !ok {
                    self.refused |= bit;
                }
            }
            _ => log::debug!("virtio: write {v:#x} to read-only or unknown register {offset:#x}"),
        }
    }
}

impl MmioDevice for VirtioMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            match self.vcpu_lock() {
                Some(t) => t.device.read_config(offset - reg::CONFIG, data),
                None => data.fill(0),
            }
            return;
        }
        // The registers are 32 bits wide and must be accessed as such (§4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!("virtio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
            return;
        }
        let v = if offset == reg::INTERRUPT_STATUS {
            self.interrupt_status.load(Ordering::SeqCst)
        } else {
            self.vcpu_lock().map_or(0, |mut t| t.read(offset))
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // No device here has writable configuration fields (virtio-blk's
            // writeback byte needs VIRTIO_BLK_F_CONFIG_WCE, not offered).
            log::debug!("virtio: config write at {offset:#x} ignored");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        if offset == reg::QUEUE_NOTIFY {
            // Normally KVM's ioeventfd takes this write; when it does not (no
            // ioeventfd, or an index no queue has), hand it to the worker the same
            // way so that the vCPU never does the device's work.
            if let Some(fd) = self.notify.get(v as usize)
                && let Err(e) = fd.write(1)
            {
                log::debug!("virtio notify eventfd: {e}");
            }
            return;
        }
        match offset {
            reg::INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS if v == 0 => {
                // A reset clears the interrupt too (§4.2.2), under the lock so that
                // no request of the old incarnation completes after it.
                if let Some(mut t) = self.vcpu_lock() {
                    t.write(offset, v);
                    self.interrupt_status.store(0, Ordering::SeqCst);
                }
            }
            _ => {
                if let Some(mut t) = self.vcpu_lock() {
                    t.write(offset, v);
                }
            }
        }
    }
}

/// Copies guest memory in `segs`, skipping the first `skip` bytes, into `out`
/// (which it fills completely or fails). For request headers and small payloads.
pub fn read_from_segments(
    mem: &GuestRam,
    segs: &[(GuestAddress, u32)],
    mut skip: u64,
    out: &mut [u8],
) -> bool {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        if mem
            .read_slice(&mut out[done..done + n], addr.unchecked_add(skip))
            .is_err()
        {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == out.len()
}

/// Copies `data` into the guest buffers `segs`, skipping `skip` bytes first.
/// Returns the bytes written.
pub fn write_to_segments(
    mem: &GuestRam,
    segs: &[(GuestAddress, u32)],
    mut skip: u64,
    data: &[u8],
) -> usize {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for &(addr, len) in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        if mem
            .write_slice(&data[done..done + n], addr.unchecked_add(skip))
            .is_err()
        {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::devices::mmio::MmioSlot;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x4000;

    fn rd(d: &VirtioMmio, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &VirtioMmio, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    /// An entropy device with its queue 0 set up as a driver would (§3.1.1).
    fn rng_ready() -> (VirtioMmio, GuestRam) {
        let (d, mem) = ready(Box::new(rng::Rng::default()));
        assert_eq!(rd(&d, reg::DEVICE_ID), 4);
        (d, mem)
    }

    /// `device` with its queue 0 (of 64 entries) set up as a driver would.
    fn ready(device: Box<dyn VirtioDevice>) -> (VirtioMmio, GuestRam) {
        ready_with(device, 8)
    }

    /// As [`ready`], with `queue_num` written to QueueNum.
    fn ready_with(device: Box<dyn VirtioDevice>, queue_num: u32) -> (VirtioMmio, GuestRam) {
        let mem = crate::vmm::memory::create_guest_memory(32).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = VirtioMmio::new(device, mem.clone(), irq, MmioSlot::nth(0).unwrap()).unwrap();
        assert_eq!(rd(&d, reg::MAGIC_VALUE), MAGIC);
        assert_eq!(rd(&d, reg::VERSION), 2);
        wr(&d, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&d, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&d, reg::DEVICE_FEATURES), 1, "VERSION_1 is offered");
        wr(&d, reg::DRIVER_FEATURES_SEL, 1);
        wr(&d, reg::DRIVER_FEATURES, 1);
        wr(
            &d,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&d, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&d, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&d, reg::QUEUE_NUM_MAX), 64);
        wr(&d, reg::QUEUE_NUM, queue_num);
        wr(&d, reg::QUEUE_DESC_LOW, DESC as u32);
        wr(&d, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        wr(&d, reg::QUEUE_DEVICE_LOW, USED as u32);
        wr(&d, reg::QUEUE_READY, 1);
        wr(&d, reg::STATUS, 0xf & !status::FAILED);
        (d, mem)
    }

    /// Writes descriptor `i` and puts `head` on the available ring.
    fn desc(mem: &GuestRam, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * i);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    fn offer(mem: &GuestRam, slot: u16, head: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    #[test]
    fn a_request_is_served_and_interrupts() {
        let (d, mem) = rng_ready();
        desc(&mem, 0, BUF, 32, WRITE, 0);
        offer(&mem, 0, 0);
        d.process_queue(0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let (id, len): (u32, u32) = (
            mem.read_obj(GuestAddress(USED + 4)).unwrap(),
            mem.read_obj(GuestAddress(USED + 8)).unwrap(),
        );
        assert_eq!((used_idx, id, len), (1, 0, 32));
        let mut bytes = [0u8; 32];
        mem.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
        assert!(bytes.iter().any(|&b| b != 0));
        assert_eq!(rd(&d, reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        assert_eq!(d.irq.read().unwrap(), 1);
        // An unmask while the line is still up pulses it again...
        d.reassert();
        assert_eq!(d.irq.read().unwrap(), 1);
        wr(&d, reg::INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(rd(&d, reg::INTERRUPT_STATUS), 0);
        assert_eq!(d.report().requests, 1);
        // ...and once acknowledged, not.
        d.reassert();
        assert!(d.irq.read().is_err(), "no pulse with InterruptStatus 0");
    }

    #[test]
    fn queue_state_tells_an_unserved_kick_from_an_untaken_interrupt() {
        let (d, mem) = rng_ready();
        desc(&mem, 0, BUF, 32, WRITE, 0);
        offer(&mem, 0, 0);
        // Offered, not yet served: the avail index is ahead of the device's.
        let s = d.describe_queues();
        assert!(s.contains("queue 0: avail 1, next 0, used 0"), "{s}");
        assert!(s.contains("InterruptStatus 0x0"), "{s}");
        d.process_queue(0);
        // Served, interrupt raised and not yet acknowledged by the driver.
        let s = d.describe_queues();
        assert!(s.contains("queue 0: avail 1, next 1, used 1"), "{s}");
        assert!(s.contains("InterruptStatus 0x1"), "{s}");
        // While the worker holds the device, the description does not wait for it.
        let _busy = d.state.lock().unwrap();
        assert!(d.describe_queues().ends_with("busy in a request"));
    }

    #[test]
    fn a_looping_chain_breaks_the_device_until_reset() {
        let (d, mem) = rng_ready();
        desc(&mem, 0, BUF, 16, WRITE | NEXT, 1);
        desc(&mem, 1, BUF, 16, WRITE | NEXT, 0);
        offer(&mem, 0, 0);
        d.process_queue(0);
        assert_ne!(rd(&d, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&d, reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 0, "nothing is used from a broken chain");
        assert!(d.report().broken);
        // A reset clears it; the queue must be set up again.
        wr(&d, reg::STATUS, 0);
        assert_eq!(rd(&d, reg::STATUS), 0);
        assert_eq!(rd(&d, reg::QUEUE_READY), 0);
    }

    /// A device whose code panics on every request.
    struct Panics(Arc<Counters>);

    impl VirtioDevice for Panics {
        fn device_id(&self) -> u32 {
            4
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64]
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn process(
            &mut self,
            _index: usize,
            _queue: &mut Queue,
            _mem: &GuestRam,
        ) -> Result<bool, VirtioError> {
            panic!("a request it did not expect")
        }
        fn counters(&self) -> &Arc<Counters> {
            &self.0
        }
        fn report(&self) -> (&'static str, Option<String>) {
            ("panics", None)
        }
    }

    #[test]
    fn a_device_that_panics_is_broken_and_the_worker_lives_on() {
        let (d, mem) = ready(Box::new(Panics(Arc::default())));
        desc(&mem, 0, BUF, 16, WRITE, 0);
        offer(&mem, 0, 0);
        // Returns, instead of unwinding through the worker's loop.
        d.process_queue(0);
        assert_ne!(rd(&d, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&d, reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(d.report().broken);
        // The state lock was released, not poisoned: the device still answers.
        wr(&d, reg::STATUS, 0);
        assert_eq!(rd(&d, reg::STATUS), 0);
    }

    #[test]
    fn buffers_outside_ram_and_bad_next_are_refused() {
        for (addr, next) in [(1u64 << 40, 0u16), (BUF, 200)] {
            let (d, mem) = rng_ready();
            let flags = if next == 0 { WRITE } else { WRITE | NEXT };
            desc(&mem, 0, addr, 16, flags, next);
            offer(&mem, 0, 0);
            d.process_queue(0);
            assert_ne!(
                rd(&d, reg::STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "addr {addr:#x} next {next}"
            );
        }
    }

    #[test]
    fn a_queue_size_past_16_bits_is_refused_not_truncated() {
        // 0x1_0008's low 16 bits are a valid size (8).
        let (d, _mem) = ready_with(Box::new(rng::Rng::default()), 0x1_0008);
        assert_eq!(
            rd(&d, reg::QUEUE_READY),
            0,
            "the queue cannot be made ready"
        );
        let (d, _mem) = ready_with(Box::new(rng::Rng::default()), 8);
        assert_eq!(rd(&d, reg::QUEUE_READY), 1);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mem = crate::vmm::memory::create_guest_memory(32).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = VirtioMmio::new(
            Box::new(rng::Rng::default()),
            mem,
            irq,
            MmioSlot::nth(0).unwrap(),
        )
        .unwrap();
        wr(&d, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(
            &d,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&d, reg::STATUS) & status::FEATURES_OK, 0);
        // Queue registers cannot be set before FEATURES_OK, nor a missing queue.
        wr(&d, reg::QUEUE_NUM, 8);
        wr(&d, reg::QUEUE_SEL, 99);
        assert_eq!(rd(&d, reg::QUEUE_NUM_MAX), 0);
        // No shared memory region: length reads as all ones.
        wr(&d, reg::SHM_SEL, 0);
        assert_eq!(rd(&d, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&d, reg::SHM_LEN_LOW + 4), u32::MAX);
        // Narrow accesses to registers read 0 and change nothing.
        let mut b = [0u8; 2];
        d.read(reg::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
