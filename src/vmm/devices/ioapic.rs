//! The I/O APIC in userspace, for a VM with a split irqchip (`--irqchip split`).
//!
//! With KVM_CAP_SPLIT_IRQCHIP the local APICs stay in KVM but the IOAPIC, the 8259s
//! and the PIT do not exist there: the IOAPIC's register page at 0xfec00000 becomes
//! ordinary MMIO that exits to us. This is that page, after the Intel 82093AA
//! datasheet (§3.0, §3.2.4), version 0x11 as KVM's own and as the MP table says.
//!
//! Interrupts never pass through this code. Each device already signals its pin
//! through an irqfd bound to GSI = pin (KVM_IRQFD); what the guest writes to a
//! redirection entry becomes an MSI route for that GSI (KVM_SET_GSI_ROUTING): the
//! address and data an IOAPIC would put on the bus for that entry (destination,
//! vector, delivery mode, trigger). KVM then hands a device's pulse straight to the
//! LAPICs, as fast as with the in-kernel IOAPIC. A masked entry has no route, so a
//! pulse on it is dropped, as a real IOAPIC drops edges on a masked pin; a device
//! whose line is still up (a virtio device with InterruptStatus set) watches its pin
//! ([`Ioapic::watch_pin`]) and pulses again when the guest unmasks it, as KVM's
//! in-kernel IOAPIC would deliver the edge it kept in its IRR.
//!
//! What follows from delivering without us: the Delivery Status and Remote IRR bits
//! always read 0 (every line here is a pulse, so nothing is ever left pending), and
//! the EOI of a level-triggered vector (KVM_EXIT_IOAPIC_EOI, KVM scans the routes of
//! the first [`PINS`] GSIs for level-triggered ones) or a write to the EOI register
//! has no Remote IRR to clear; both are accepted and counted.

use std::sync::Mutex;

/// Guest-physical base of the IOAPIC's register page, where the MP table and the
/// MADT say it is (the PC's standard address).
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The register page's length.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Redirection entries (input pins), as KVM's in-kernel IOAPIC has; also the number
/// of GSIs reserved for it in KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP).
pub const PINS: usize = 24;

/// IOREGSEL: which register IOWIN reaches (offset 0x00).
const IOREGSEL: u64 = 0x00;
/// IOWIN: the selected register's value (offset 0x10).
const IOWIN: u64 = 0x10;
/// EOI register of the later IOxAPIC (version 0x20; offset 0x40): not advertised by
/// version 0x11, but a write there is accepted as that register would be.
const EOI: u64 = 0x40;

/// Register indices behind IOWIN.
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;

/// Version register: version 0x11 (the 82093AA) and the highest entry index in bits
/// 16-23.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

/// Redirection entry bits (datasheet §3.2.4).
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// The bits a guest can write: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask (0-11, 13, 15, 16) and the destination (56-63). Delivery Status
/// and Remote IRR are read-only, the rest reserved.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// Delivery modes (bits 8-10) that have an MSI meaning KVM acts on: fixed, lowest
/// priority, NMI, INIT. SMI, ExtINT (nothing here drives an 8259's INTA cycle) and
/// the two reserved codes get no route: the pin behaves as masked.
const ROUTABLE_MODES: [u64; 4] = [0, 1, 4, 5];

/// The x86 MSI address window: 0xfee00000 with the destination APIC ID in bits 12-19
/// and the destination mode in bit 2 (SDM Vol. 3A §11.11.1).
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// One pin's route as KVM gets it: GSI `gsi` raises the MSI (`address`, `data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    /// The GSI, equal to the IOAPIC pin.
    pub gsi: u32,
    /// MSI address (low 32 bits; the high half is 0).
    pub address: u32,
    /// MSI data: vector, delivery mode, trigger mode.
    pub data: u32,
}

/// Where the routes go: KVM_SET_GSI_ROUTING in a VM, a recorder in unit tests.
pub trait MsiRouter: Send + Sync {
    /// Replaces the whole GSI routing table with `routes`.
    fn set_routes(&self, routes: &[MsiRoute]) -> Result<(), String>;
    /// Lets go of the VM: routes set after this fail.
    fn detach(&self) {}
}

/// Told whether a pin has a route (true) or drops its edges (false), each time that
/// changes: how the PIT learns that nobody hears its ticks.
pub type PinWatch = Box<dyn Fn(bool) + Send + Sync>;

/// The userspace IOAPIC of one VM.
pub struct Ioapic {
    state: Mutex<State>,
    router: Box<dyn MsiRouter>,
    /// Watchers of one pin each.
    watches: Vec<(usize, PinWatch)>,
}

struct State {
    /// IOREGSEL.
    select: u32,
    /// The ID register's APIC ID (bits 24-27).
    id: u32,
    table: [u64; PINS],
    /// What KVM was last given, so that a write that changes no route (Linux masks
    /// every pin at boot, one by one) costs no ioctl: KVM_SET_GSI_ROUTING waits for
    /// an SRCU grace period each time.
    routes: Vec<MsiRoute>,
    /// EOIs seen (KVM_EXIT_IOAPIC_EOI and the EOI register).
    eois: u64,
}

impl Ioapic {
    /// An IOAPIC with APIC ID `id` and every pin masked, as after reset.
    pub fn new(id: u8, router: Box<dyn MsiRouter>) -> Ioapic {
        Ioapic {
            state: Mutex::new(State {
                select: 0,
                id: u32::from(id & 0xf) << 24,
                table: [RTE_MASKED; PINS],
                routes: Vec::new(),
                eois: 0,
            }),
            router,
            watches: Vec::new(),
        }
    }

    /// Calls `watch` with whether `pin` is routed, now (every pin is masked at reset)
    /// and whenever that changes.
    pub fn watch_pin(&mut self, pin: usize, watch: PinWatch) {
        watch(false);
        self.watches.push((pin, watch));
    }

    /// An EOI for `vector` from a LAPIC (KVM_EXIT_IOAPIC_EOI). See the module doc:
    /// there is no Remote IRR to clear.
    pub fn end_of_interrupt(&self, vector: u8) {
        let mut s = super::lock(&self.state);
        s.eois += 1;
        log::trace!("ioapic: EOI of vector {vector:#x}");
    }

    /// Lets go of the router's hold on the VM, when the VM is being closed.
    pub fn detach(&self) {
        self.router.detach();
    }

    /// EOIs seen so far.
    pub fn eois(&self) -> u64 {
        super::lock(&self.state).eois
    }

    /// The redirection entry of `pin`, as the guest would read it.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        super::lock(&self.state).table.get(pin).copied()
    }

    fn read_register(s: &State) -> u32 {
        match s.select {
            REG_ID => s.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => s.id,
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let e = s.table[((r - REG_TABLE) / 2) as usize];
                if r % 2 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            // Reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_register(&self, s: &mut State, v: u32) {
        match s.select {
            REG_ID => s.id = v & 0x0f00_0000,
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let pin = ((r - REG_TABLE) / 2) as usize;
                let old = s.table[pin];
                let merged = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let read_only = old & (RTE_DELIVERY_STATUS | RTE_REMOTE_IRR);
                s.table[pin] = (merged & RTE_WRITABLE) | read_only;
                self.update_routes(s);
            }
            // Version and arbitration are read-only; the rest is reserved.
            _ => {}
        }
    }

    /// Recomputes every pin's route and hands the table to KVM if it changed.
    fn update_routes(&self, s: &mut State) {
        let routes: Vec<MsiRoute> = (0..PINS).filter_map(|p| route(p, s.table[p])).collect();
        if routes == s.routes {
            return;
        }
        match self.router.set_routes(&routes) {
            Ok(()) => {
                for (pin, watch) in &self.watches {
                    let routed = |rs: &[MsiRoute]| rs.iter().any(|r| r.gsi as usize == *pin);
                    let now = routed(&routes);
                    if now != routed(&s.routes) {
                        watch(now);
                    }
                }
                s.routes = routes;
            }
            // Not the guest's fault and not fatal: the pins keep their old routes.
            Err(e) => crate::vmm::ratelimit::warn_limited!("ioapic: {e}"),
        }
    }
}

/// The MSI an IOAPIC sends for `entry` on `pin`, or none when the pin is masked or
/// its delivery mode has no MSI meaning here.
fn route(pin: usize, entry: u64) -> Option<MsiRoute> {
    let mode = (entry >> RTE_DELIVERY_MODE_SHIFT) & 7;
    if entry & RTE_MASKED != 0 || !ROUTABLE_MODES.contains(&mode) {
        return None;
    }
    let dest = (entry >> 56) as u32;
    let logical = u32::from(entry & RTE_DEST_LOGICAL != 0);
    // MSI data (SDM Vol. 3A §11.11.2): vector, delivery mode, level (bit 14, always
    // assert) and trigger mode in bit 15, which makes KVM set the vector's TMR bit
    // and report its EOI to us.
    let data = (entry & (RTE_VECTOR | 7 << RTE_DELIVERY_MODE_SHIFT)) as u32
        | 1 << 14
        | if entry & RTE_LEVEL != 0 { 1 << 15 } else { 0 };
    Some(MsiRoute {
        gsi: pin as u32,
        address: MSI_ADDRESS_BASE | dest << 12 | logical << 2,
        data,
    })
}

impl super::mmio::MmioDevice for Ioapic {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let s = super::lock(&self.state);
        let v = match offset {
            IOREGSEL => s.select,
            IOWIN => Self::read_register(&s),
            _ => 0,
        };
        // Byte and word reads take the low bytes; 8-byte reads the value then zeros.
        let bytes = u64::from(v).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(raw);
        let mut s = super::lock(&self.state);
        match offset {
            IOREGSEL => s.select = v & 0xff,
            IOWIN => self.write_register(&mut s, v),
            EOI => s.eois += 1,
            _ => log::debug!("ioapic: write of {v:#x} to reserved offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mmio::MmioDevice;
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<MsiRoute>>>);

    impl MsiRouter for Arc<Recorder> {
        fn set_routes(&self, routes: &[MsiRoute]) -> Result<(), String> {
            self.0.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (Ioapic::new(2, Box::new(rec.clone())), rec)
    }

    fn write_reg(io: &Ioapic, reg: u32, v: u32) {
        io.write(IOREGSEL, &reg.to_le_bytes());
        io.write(IOWIN, &v.to_le_bytes());
    }

    fn read_reg(io: &Ioapic, reg: u32) -> u32 {
        io.write(IOREGSEL, &reg.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identifies_itself_as_an_ioapic_with_24_pins() {
        let (io, _) = ioapic();
        assert_eq!(read_reg(&io, REG_ID), 2 << 24);
        assert_eq!(read_reg(&io, REG_VERSION), 0x0017_0011);
        write_reg(&io, REG_VERSION, 0);
        assert_eq!(read_reg(&io, REG_VERSION), 0x0017_0011, "read-only");
        write_reg(&io, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&io, REG_ID), 0x0f00_0000);
        for pin in 0..PINS as u32 {
            assert_eq!(
                read_reg(&io, REG_TABLE + 2 * pin),
                1 << 16,
                "masked at reset"
            );
        }
    }

    #[test]
    fn an_unmasked_entry_becomes_the_msi_an_ioapic_would_send() {
        let (io, rec) = ioapic();
        // Pin 4: vector 0x34, fixed, physical destination APIC 3, edge.
        write_reg(&io, REG_TABLE + 9, 3 << 24);
        assert!(
            rec.0.lock().unwrap().is_empty(),
            "still masked: nothing changed"
        );
        write_reg(&io, REG_TABLE + 8, 0x34);
        let want = MsiRoute {
            gsi: 4,
            address: 0xfee0_3000,
            data: 0x4034,
        };
        assert_eq!(rec.0.lock().unwrap().last().unwrap(), &vec![want]);
        // Level-triggered, logical destination, lowest priority.
        write_reg(&io, REG_TABLE + 8, 0x34 | 1 << 15 | 1 << 11 | 1 << 8);
        let got = *rec.0.lock().unwrap().last().unwrap().first().unwrap();
        assert_eq!((got.address, got.data), (0xfee0_3004, 0xc134));
        // Masking removes the route.
        write_reg(&io, REG_TABLE + 8, 0x34 | 1 << 16);
        assert!(rec.0.lock().unwrap().last().unwrap().is_empty());
    }

    #[test]
    fn read_only_and_reserved_bits_do_not_stick_and_odd_modes_get_no_route() {
        let (io, rec) = ioapic();
        write_reg(&io, REG_TABLE, 0xffff_ffff);
        write_reg(&io, REG_TABLE + 1, 0xffff_ffff);
        assert_eq!(io.entry(0), Some(0xff00_0000_0001_afff));
        // ExtINT (7) and reserved modes: no route even unmasked.
        for mode in [2u32, 3, 6, 7] {
            write_reg(&io, REG_TABLE, 0x40 | mode << 8);
            let last = rec.0.lock().unwrap().last().cloned().unwrap_or_default();
            assert!(last.is_empty(), "mode {mode} routed: {last:?}");
        }
        // Unchanged routes are not handed to KVM again.
        let calls = rec.0.lock().unwrap().len();
        write_reg(&io, REG_TABLE, 0x40 | 7 << 8);
        assert_eq!(rec.0.lock().unwrap().len(), calls);
    }

    #[test]
    fn a_watched_pin_is_told_when_its_route_comes_and_goes() {
        let (mut io, _) = ioapic();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        io.watch_pin(0, Box::new(move |on| s.lock().unwrap().push(on)));
        write_reg(&io, REG_TABLE + 2, 0x31); // pin 1: not watched
        write_reg(&io, REG_TABLE, 0x30);
        write_reg(&io, REG_TABLE, 0x31); // still routed
        write_reg(&io, REG_TABLE, 0x30 | 1 << 16);
        assert_eq!(*seen.lock().unwrap(), vec![false, true, false]);
    }

    #[test]
    fn every_register_and_width_is_safe() {
        let (io, _) = ioapic();
        for reg in 0..=0xffu32 {
            for v in [0, 0xffff_ffff, 0x5555_5555, reg.wrapping_mul(0x0101_0101)] {
                write_reg(&io, reg, v);
                let _ = read_reg(&io, reg);
            }
        }
        for off in (0..IOAPIC_SIZE).step_by(4) {
            for len in [1usize, 2, 4, 8] {
                let mut d = vec![0u8; len];
                io.read(off, &mut d);
                io.write(off, &d);
            }
        }
        io.end_of_interrupt(0x34);
        assert!(io.eois() >= 1);
    }
}
