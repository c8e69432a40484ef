//! Port-I/O devices and the bus that routes a vCPU's IN/OUT exits to them.
//!
//! With `--irqchip kernel` the interrupt controllers (PIC, IOAPIC, LAPIC) and the PIT
//! live inside KVM (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) and never reach us; with
//! `--irqchip split` only the LAPICs do, and the IOAPIC ([`ioapic`], MMIO at
//! 0xfec00000) and the PIT ([`pit`], ports 0x40-0x43 and 0x61) are ours. What else
//! reaches us:
//!
//! | ports       | device                                        |
//! |-------------|-----------------------------------------------|
//! | 0x3f8-0x3ff | COM1, a 16550 UART (vm-superio), IRQ 4        |
//! | 0x60, 0x64  | i8042 PS/2 controller, keyboard; IRQ 1, 12    |
//! | 0x70, 0x71  | CMOS RAM and real-time clock (host UTC time)  |
//! | 0xf4-0xf7   | isa-debug-exit, as QEMU's                     |
//! | 0x600-0x607 | ACPI PM1a and sleep registers: S5 powers off  |
//! | anything else | reads all-ones, writes dropped (debug log)  |
//!
//! Memory-mapped devices (virtio) live on the [`mmio::MmioBus`], from 0xd0000000.

pub mod acpi_pm;
pub mod cmos;
pub mod coalesced;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod mmio;
pub mod pit;
pub mod serial;

use std::sync::Mutex;

pub use serial::{Console, ConsoleStats};

/// A request from a device to end the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// isa-debug-exit was written this value.
    DebugExit(u32),
    /// The guest pulsed the reset line (i8042 command 0xfe, or output port bit 0 cleared).
    Reset,
    /// The guest entered ACPI S5 (soft off) through the FADT's registers.
    Poweroff,
}

/// COM1's base port (the PC's standard first serial port).
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line on the ISA bus (and IOAPIC pin).
pub const COM1_IRQ: u32 = 4;

/// All port-I/O devices of one VM, shared by its vCPU threads.
pub struct Devices {
    /// COM1. A mutex because any vCPU may touch it and the stdin thread feeds it.
    /// Reach it through [`Devices::com1`], which first applies the writes KVM
    /// coalesced.
    pub serial: Mutex<serial::Com1>,
    /// KVM's ring of the writes to COM1's data port it kept instead of exiting
    /// (see [`coalesced`]); None when KVM cannot, or with `--trace-exits`.
    pub com1_ring: Option<coalesced::Ring>,
    /// Writes taken from `com1_ring` so far: each one an exit saved.
    pub com1_coalesced: std::sync::atomic::AtomicU64,
    /// The i8042 keyboard controller and its keyboard.
    pub i8042: Mutex<i8042::I8042>,
    /// CMOS RAM and clock.
    pub cmos: Mutex<cmos::Cmos>,
    /// ACPI power management registers (power-off).
    pub acpi_pm: acpi_pm::AcpiPm,
    /// The memory-mapped devices.
    pub mmio: mmio::MmioBus,
    /// The userspace IOAPIC of a split irqchip (also on `mmio`), for the EOIs KVM
    /// reports.
    pub ioapic: Option<std::sync::Arc<ioapic::Ioapic>>,
    /// The userspace PIT of a split irqchip, unless `--no-pit`.
    pub pit: Option<pit::Pit>,
}

impl Devices {
    /// Locks COM1 and hands it, first, the data-port writes KVM coalesced since the
    /// last look, in order. Every access to the UART goes through here, so the guest
    /// never sees a register before its earlier writes took effect. Returns the
    /// lock and how many writes were drained.
    pub fn com1(&self) -> (std::sync::MutexGuard<'_, serial::Com1>, usize) {
        let mut com1 = lock(&self.serial);
        let n = match &self.com1_ring {
            Some(ring) => ring.drain(|port, data| {
                write_com1(
                    &mut com1,
                    port.wrapping_sub(u64::from(COM1_BASE)) as u8,
                    data,
                )
            }),
            None => 0,
        };
        if n > 0 {
            self.com1_coalesced
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        (com1, n)
    }

    /// Handles an IN from `port`, filling `data` (1, 2 or 4 bytes).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff => {
                let v = self.com1().0.read((port - COM1_BASE) as u8);
                data.fill(0);
                data[0] = v;
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => lock(&self.i8042).read(port, data),
            cmos::INDEX_PORT | cmos::DATA_PORT => lock(&self.cmos).read(port, data),
            acpi_pm::PORT..=acpi_pm::PORT_END => self.acpi_pm.read(port, data),
            pit::COUNTER0_PORT..=pit::CONTROL_PORT | pit::SPEAKER_PORT => match &self.pit {
                Some(p) => p.read(port, data),
                None => unclaimed_read(port, data),
            },
            _ => unclaimed_read(port, data),
        }
    }

    /// Handles an OUT of `data` to `port`; returns an event if the write ends the VM.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<DeviceEvent> {
        match port {
            COM1_BASE..=0x3ff => {
                write_com1(&mut self.com1().0, (port - COM1_BASE) as u8, data);
                None
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => lock(&self.i8042).write(port, data),
            debug_exit::PORT..=debug_exit::PORT_END => debug_exit::write(data),
            cmos::INDEX_PORT | cmos::DATA_PORT => {
                lock(&self.cmos).write(port, data);
                None
            }
            acpi_pm::PORT..=acpi_pm::PORT_END => self.acpi_pm.write(port, data),
            pit::COUNTER0_PORT..=pit::CONTROL_PORT | pit::SPEAKER_PORT if self.pit.is_some() => {
                if let Some(p) = &self.pit {
                    p.write(port, data);
                }
                None
            }
            0x80 => None, // POST code / io_delay port: written constantly, means nothing.
            _ => {
                log::debug!("unhandled port write {port:#x} {data:02x?}");
                None
            }
        }
    }
}

/// Writes `data` to COM1's register at `offset`, a byte at a time: a `rep outsb`
/// arrives as several bytes at once, and each is one write.
fn write_com1(com1: &mut serial::Com1, offset: u8, data: &[u8]) {
    for b in data {
        if let Err(e) = com1.write(offset, *b) {
            crate::vmm::ratelimit::warn_limited!("serial console: {e:?}");
        }
    }
}

/// An IN from a port nobody owns: all ones, as an empty ISA bus reads.
fn unclaimed_read(port: u16, data: &mut [u8]) {
    log::debug!("unhandled port read {port:#x} ({} bytes)", data.len());
    data.fill(0xff);
}

/// Locks a device, even if another vCPU thread panicked while holding it: device
/// state stays usable and a panic elsewhere is reported on its own.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
