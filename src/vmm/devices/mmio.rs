//! The MMIO bus: guest-physical address ranges outside RAM that belong to a device.
//!
//! A guest load or store to an address KVM has no memory slot for leaves KVM_RUN
//! with KVM_EXIT_MMIO (the address, the length, the data for a write); the vCPU
//! thread looks the address up here and calls the device that owns it. Device
//! ranges are handed out from the 32-bit MMIO gap below 4 GiB, where the PC keeps
//! its own devices too (the IOAPIC at 0xfec00000, the LAPIC at 0xfee00000), so a
//! 32-bit guest can reach them and no RAM is ever shadowed.

use std::sync::Arc;

/// A device reached through memory-mapped I/O. Offsets are from the start of the
/// device's range; `data` is 1, 2, 4 or 8 bytes, as the guest's instruction had.
pub trait MmioDevice: Send + Sync {
    /// A guest read at `offset`: fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Where the first device range goes: 0xd0000000, above the 3 GiB where RAM stops
/// ([`crate::vmm::memory::MMIO_GAP_START`]) and far below the IOAPIC and LAPIC.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// Each device gets one 4 KiB page: a virtio-mmio register file is 0x100 bytes plus
/// its configuration space, and a page keeps devices apart for guests that map them.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// Interrupt lines handed to MMIO devices, in order: the ISA IRQs a PC leaves free
/// here (no parallel port, floppy or IDE), which are edge-triggered and active high
/// on the IOAPIC as the MP table and ACPI's defaults say, so a pulse on an irqfd is
/// one interrupt. 1, 4 and 12 are the i8042's and COM1's, 8 the RTC's, 9 the SCI,
/// 0 and 2 the timer's.
pub const DEVICE_IRQS: [u32; 7] = [5, 6, 7, 10, 11, 14, 15];

/// Where one MMIO device sits and which interrupt line it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base address.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// IOAPIC pin (= ISA IRQ = GSI).
    pub irq: u32,
}

impl MmioSlot {
    /// The slot of the `i`-th device, or `None` past the last free interrupt line.
    pub fn nth(i: usize) -> Option<MmioSlot> {
        Some(MmioSlot {
            base: MMIO_DEVICES_START + i as u64 * MMIO_DEVICE_SIZE,
            size: MMIO_DEVICE_SIZE,
            irq: *DEVICE_IRQS.get(i)?,
        })
    }

    /// How Linux's virtio_mmio driver is told about this device on the kernel
    /// command line (drivers/virtio/virtio_mmio.c, VIRTIO_MMIO_CMDLINE_DEVICES):
    /// `virtio_mmio.device=<size>@<base>:<irq>`.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.size / 1024,
            self.base,
            self.irq
        )
    }
}

/// The devices of one VM by address. Fixed once the VM is built, so lookups need
/// no lock; each device locks its own state.
#[derive(Default)]
pub struct MmioBus {
    /// Base, length and device.
    devices: Vec<(u64, u64, Arc<dyn MmioDevice>)>,
}

impl MmioBus {
    /// Adds `device` at `slot`.
    pub fn insert(&mut self, slot: MmioSlot, device: Arc<dyn MmioDevice>) {
        self.insert_range(slot.base, slot.size, device);
    }

    /// Adds `device` at `size` bytes from `base`: for devices at fixed PC addresses,
    /// such as the IOAPIC.
    pub fn insert_range(&mut self, base: u64, size: u64, device: Arc<dyn MmioDevice>) {
        self.devices.push((base, size, device));
    }

    /// The device owning `addr` and the offset into its range.
    fn find(&self, addr: u64) -> Option<(&dyn MmioDevice, u64)> {
        self.devices
            .iter()
            .find(|(base, size, _)| addr >= *base && addr - base < *size)
            .map(|(base, _, d)| (d.as_ref(), addr - base))
    }

    /// Handles a guest read of `addr`; unclaimed addresses read as all ones, as an
    /// empty bus does on a PC. Returns false when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles a guest write to `addr`. Returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn slots_follow_each_other_with_their_own_irq() {
        let a = MmioSlot::nth(0).unwrap();
        let b = MmioSlot::nth(1).unwrap();
        assert_eq!(a.base, 0xd000_0000);
        assert_eq!(b.base, 0xd000_1000);
        assert_ne!(a.irq, b.irq);
        assert_eq!(a.cmdline_arg(), "virtio_mmio.device=4K@0xd0000000:5");
        assert!(MmioSlot::nth(DEVICE_IRQS.len()).is_none());
    }

    #[test]
    fn accesses_reach_the_owner_at_the_right_offset() {
        let mut bus = MmioBus::default();
        let dev = Arc::new(Recorder(Mutex::new(Vec::new())));
        bus.insert(MmioSlot::nth(1).unwrap(), dev.clone());
        let mut d = [0u8; 4];
        assert!(bus.read(0xd000_1010, &mut d));
        assert_eq!(d, [0x10; 4]);
        assert!(bus.write(0xd000_1ffc, &[1, 2]));
        assert_eq!(dev.0.lock().unwrap()[0], (0xffc, vec![1, 2]));
        // The page before and after belong to nobody.
        assert!(!bus.read(0xd000_0ffc, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0xd000_2000, &[0]));
    }
}
