//! COM1: vm-superio's 16550 UART model, raising IRQ 4 through an eventfd that KVM
//! injects into the in-kernel IOAPIC/PIC (KVM_IRQFD), so no VMM thread is involved
//! in delivering the interrupt.

use std::io::{self, Write};
use std::time::Instant;

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::console::OutputPump;

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
    /// Of those, bytes that never reached the console's sink: the sink was too slow
    /// (or nobody read it), failed, or still held them when the VM ended.
    pub dropped: u64,
}

/// The UART's output side: hands guest bytes to an [`OutputPump`] and counts them.
/// Writing never waits for the sink, so a console nobody reads cannot stall a vCPU.
pub struct Console {
    /// None when the output is discarded (no console).
    pump: Option<OutputPump>,
    first_byte: Option<Instant>,
    bytes: u64,
}

impl Console {
    /// A console writing to `sink` through its own writer thread, which installs
    /// its seccomp filter from `filters` first.
    pub fn new(
        sink: Box<dyn Write + Send>,
        filters: crate::vmm::seccomp::Filters,
    ) -> io::Result<Console> {
        Ok(Console {
            pump: Some(OutputPump::start(sink, filters)?),
            first_byte: None,
            bytes: 0,
        })
    }

    /// A console whose output nobody wants: counted, then discarded, with no thread.
    pub fn discard() -> Console {
        Console {
            pump: None,
            first_byte: None,
            bytes: 0,
        }
    }

    /// What has been written so far.
    pub fn stats(&self) -> ConsoleStats {
        ConsoleStats {
            first_byte: self.first_byte,
            bytes: self.bytes,
            dropped: self.pump.as_ref().map_or(0, OutputPump::dropped),
        }
    }

    /// The output pump, to drain or abandon at the VM's end; None without a sink.
    pub fn pump(&self) -> Option<&OutputPump> {
        self.pump.as_ref()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
        self.bytes += buf.len() as u64;
        if let Some(p) = &self.pump {
            p.push(buf);
        }
        Ok(buf.len())
    }

    /// Nothing to do: the writer thread flushes the sink after each write. (The UART
    /// model flushes after every byte; passing that on would cost a syscall a byte.)
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Builds COM1 with its interrupt eventfd and output console.
pub fn new_com1(irq: EventFd, console: Console) -> Com1 {
    Serial::new(IrqTrigger(irq), console)
}
