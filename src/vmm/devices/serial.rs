//! COM1: vm-superio's 16550 UART model, raising IRQ 4 through an eventfd that KVM
//! injects into the in-kernel IOAPIC/PIC (KVM_IRQFD), so no VMM thread is involved
//! in delivering the interrupt.

use std::io::{self, Write};
use std::time::Instant;

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

/// COM1 as the VM sees it.
pub type Com1 = Serial<IrqTrigger, NoEvents, Console>;

/// Raises an interrupt by writing to an eventfd registered with KVM_IRQFD.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the console saw, for the run summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleStats {
    /// When the guest wrote its first byte.
    pub first_byte: Option<Instant>,
    /// Bytes the guest wrote.
    pub bytes: u64,
}

/// The UART's output side: forwards guest bytes to a sink and counts them.
pub struct Console {
    sink: Box<dyn Write + Send>,
    /// What has been written so far.
    pub stats: ConsoleStats,
    broken: bool,
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Console {
        Console {
            sink,
            stats: ConsoleStats::default(),
            broken: false,
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stats.first_byte.is_none() {
            self.stats.first_byte = Some(Instant::now());
        }
        self.stats.bytes += buf.len() as u64;
        // A console that went away (closed pipe, full disk) must not stop the guest:
        // warn once and discard from then on.
        if !self.broken
            && let Err(e) = self.sink.write_all(buf)
        {
            log::warn!("serial console output failed, discarding from now on: {e}");
            self.broken = true;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.broken && self.sink.flush().is_err() {
            self.broken = true;
        }
        Ok(())
    }
}

/// Builds COM1 with its interrupt eventfd and output sink.
pub fn new_com1(irq: EventFd, sink: Box<dyn Write + Send>) -> Com1 {
    Serial::new(IrqTrigger(irq), Console::new(sink))
}
