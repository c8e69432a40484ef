//! Every port a guest can write: COM1, the i8042 controller, CMOS/RTC, ACPI PM, the
//! split irqchip's 8254 PIT (its counters and port 0x61; the timer thread is not
//! started) and whatever else lies on the port bus. Any sequence of IN and OUT
//! instructions of any width must leave minivmm standing (no panic, no overflow),
//! whatever state the devices reach.
//!
//! Input: 5 bytes per access — port (u16), flags (bit 7: IN, else OUT; bits 0–1:
//! 1, 2 or 4 bytes), and two bytes of data repeated to the width.
#![no_main]

use std::sync::Mutex;

use minivmm::vmm::devices::{self, Devices, i8042::I8042, pit::Pit, serial};
use vmm_sys_util::eventfd::EventFd;

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let devices = Devices {
        serial: Mutex::new(serial::new_com1(eventfd(), devices::Console::discard())),
        com1_ring: None,
        com1_coalesced: Default::default(),
        i8042: Mutex::new(I8042::new(eventfd(), eventfd())),
        cmos: Default::default(),
        acpi_pm: Default::default(),
        mmio: Default::default(),
        ioapic: None,
        pit: Some(Pit::new(eventfd())),
    };
    for op in data.chunks_exact(5) {
        let port = u16::from_le_bytes([op[0], op[1]]);
        let len = [1usize, 2, 4, 4][usize::from(op[2] & 3)];
        let mut buf = [op[3], op[4], op[3], op[4]];
        if op[2] & 0x80 != 0 {
            devices.pio_read(port, &mut buf[..len]);
        } else if devices.pio_write(port, &buf[..len]).is_some() {
            // A reset or a power-off: the VM would end here.
            return;
        }
    }
});
