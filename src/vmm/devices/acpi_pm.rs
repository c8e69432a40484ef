//! ACPI power management registers in port I/O: what the FADT (boot/acpi.rs) points
//! the guest at so it can power off.
//!
//! Two ways in, so that both kinds of ACPI software find a register they know:
//! - the **PM1a event and control blocks** of fixed-hardware ACPI (ACPI 6.5, 4.8.3):
//!   Linux enters S5 by writing SLP_TYP (bits 10-12) then SLP_EN (bit 13) to PM1a_CNT;
//! - the **sleep control and status registers** of hardware-reduced ACPI (ACPI 6.5,
//!   4.8.3.7-8): SLP_TYP in bits 2-4 and SLP_EN in bit 5 of one byte.
//!
//! Writing SLP_EN with the S5 sleep type (the `_S5_` package in the DSDT says which
//! value that is) ends the VM as a power-off. No other sleep state exists here: a
//! request for one is logged and ignored.
//!
//! One fixed event exists: the **power button** (ACPI 6.5, 4.8.3.1.1 and 4.8.4.2.1),
//! which minivmm presses to ask a guest to shut down (`minivmm run` on SIGPWR, the
//! agent's stop). Pressing it sets PWRBTN_STS (bit 8 of PM1_STS) and, if the guest
//! set PWRBTN_EN (bit 8 of PM1_EN), raises the SCI (the FADT's SCI_INT, GSI 9,
//! through an irqfd); the guest's handler clears the status by writing 1 to it and,
//! in Linux, turns the event into KEY_POWER for whatever shuts the system down
//! (systemd-logind, acpid). The timer overflow event does not exist (no PM timer).
//!
//! | port        | register                                         |
//! |-------------|--------------------------------------------------|
//! | 0x600-0x601 | PM1a_STS: PWRBTN_STS, write 1 to clear           |
//! | 0x602-0x603 | PM1a_EN: fixed event enable, read/write          |
//! | 0x604-0x605 | PM1a_CNT: SCI_EN always set; SLP_TYP, SLP_EN     |
//! | 0x606       | SLEEP_CONTROL_REG: SLP_TYP, SLP_EN               |
//! | 0x607       | SLEEP_STATUS_REG: reads 0 (no wake event)        |

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::{DeviceEvent, lock};

/// PM1a_EVT_BLK: PM1 status (2 bytes) then PM1 enable (2 bytes).
pub const PM1A_EVT: u16 = 0x600;
/// Length of PM1a_EVT_BLK in bytes (FADT PM1_EVT_LEN).
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a_CNT_BLK: the PM1 control register.
pub const PM1A_CNT: u16 = 0x604;
/// Length of PM1a_CNT_BLK in bytes (FADT PM1_CNT_LEN).
pub const PM1_CNT_LEN: u8 = 2;
/// Hardware-reduced SLEEP_CONTROL_REG (one byte).
pub const SLEEP_CONTROL: u16 = 0x606;
/// Hardware-reduced SLEEP_STATUS_REG (one byte).
pub const SLEEP_STATUS: u16 = 0x607;
/// First port of the device.
pub const PORT: u16 = PM1A_EVT;
/// Last port of the device.
pub const PORT_END: u16 = SLEEP_STATUS;

/// The SLP_TYP value that means S5 (soft off). Any 3-bit value would do: it only has
/// to match the first element of the DSDT's `\_S5_` package.
pub const S5_SLP_TYP: u8 = 5;

/// PM1 control: SCI_EN, "the system is in ACPI mode" (ACPI 6.5, table 4.16).
const PM1_SCI_EN: u16 = 1 << 0;
/// PM1 control: SLP_TYP field position and SLP_EN (write-only) bit.
const PM1_SLP_TYP_SHIFT: u16 = 10;
const PM1_SLP_EN: u16 = 1 << 13;
/// Sleep control register: SLP_TYP field position and SLP_EN bit (ACPI 6.5, table 4.19).
const SLEEP_SLP_TYP_SHIFT: u8 = 2;
const SLEEP_SLP_EN: u8 = 1 << 5;

/// PM1 status and enable: the power button's bit (ACPI 6.5, tables 4.13 and 4.14).
const PWRBTN: u16 = 1 << 8;

/// Byte offsets of the registers from [`PORT`].
const PM1_STS_OFF: usize = 0;
const PM1_EN_OFF: usize = 2;
const PM1_CNT_OFF: usize = 4;
const SLEEP_CONTROL_OFF: usize = 6;

/// The registers' state: the 8 bytes behind ports 0x600-0x607, and the SCI.
#[derive(Debug, Default)]
pub struct AcpiPm {
    regs: Mutex<[u8; 8]>,
    /// Bound to the SCI's GSI with KVM_IRQFD; `None` in tests and fuzzing.
    sci: Option<EventFd>,
}

impl AcpiPm {
    /// The registers, raising the SCI through `sci`.
    pub fn new(sci: EventFd) -> AcpiPm {
        AcpiPm {
            regs: Default::default(),
            sci: Some(sci),
        }
    }

    /// Presses the power button: sets PWRBTN_STS and raises the SCI. Returns false,
    /// and does nothing, when the guest has not enabled the event (PWRBTN_EN clear):
    /// it would never look, so the caller had better stop the VM itself.
    pub fn press_power_button(&self) -> bool {
        let mut regs = lock(&self.regs);
        if u16::from_le_bytes([regs[PM1_EN_OFF], regs[PM1_EN_OFF + 1]]) & PWRBTN == 0 {
            return false;
        }
        regs[PM1_STS_OFF + 1] |= (PWRBTN >> 8) as u8;
        self.raise_sci();
        true
    }

    /// Pulses the SCI line (an eventfd write; KVM's irqfd asserts and deasserts it).
    fn raise_sci(&self) {
        if let Some(sci) = &self.sci
            && let Err(e) = sci.write(1)
        {
            log::warn!("cannot raise the SCI: {e}");
        }
    }

    /// Handles an IN of 1, 2 or 4 bytes starting at `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let regs = lock(&self.regs);
        for (i, b) in data.iter_mut().enumerate() {
            let off = usize::from(port - PORT) + i;
            *b = match off {
                // PM1 status and enable: the events pending, and what the guest
                // enabled.
                PM1_STS_OFF | 1 | PM1_EN_OFF | 3 => regs[off],
                // PM1 control, low byte: SCI_EN is always on (we are in ACPI mode).
                PM1_CNT_OFF => regs[off] | PM1_SCI_EN as u8,
                // PM1 control, high byte: SLP_TYP as written; SLP_EN reads 0.
                5 => regs[off] & !((PM1_SLP_EN >> 8) as u8),
                // Sleep control: SLP_EN reads 0.
                SLEEP_CONTROL_OFF => regs[off] & !SLEEP_SLP_EN,
                // Sleep status: no wake events, ever. Past the device: all-ones.
                7 => 0,
                _ => 0xff,
            };
        }
    }

    /// Handles an OUT of 1, 2 or 4 bytes starting at `port`; returns
    /// [`DeviceEvent::Poweroff`] when the guest enters S5.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<DeviceEvent> {
        let mut regs = lock(&self.regs);
        let pending = |r: &[u8; 8]| r[1] & r[3] != 0;
        let was_pending = pending(&regs);
        for (i, b) in data.iter().enumerate() {
            let off = usize::from(port - PORT) + i;
            match off {
                // PM1 status is write-1-to-clear.
                PM1_STS_OFF | 1 => regs[off] &= !*b,
                PM1_EN_OFF | 3 | PM1_CNT_OFF | 5 | SLEEP_CONTROL_OFF => regs[off] = *b,
                // The sleep status register has no events to clear.
                _ => {}
            }
        }
        // An event enabled while it is pending raises the SCI then, as a level
        // interrupt would.
        if pending(&regs) && !was_pending {
            self.raise_sci();
        }
        let pm1_cnt = u16::from_le_bytes([regs[PM1_CNT_OFF], regs[PM1_CNT_OFF + 1]]);
        if pm1_cnt & PM1_SLP_EN != 0 {
            regs[PM1_CNT_OFF + 1] &= !((PM1_SLP_EN >> 8) as u8);
            return enter_sleep_state(((pm1_cnt >> PM1_SLP_TYP_SHIFT) & 7) as u8, "PM1a_CNT");
        }
        let sleep = regs[SLEEP_CONTROL_OFF];
        if sleep & SLEEP_SLP_EN != 0 {
            regs[SLEEP_CONTROL_OFF] &= !SLEEP_SLP_EN;
            return enter_sleep_state((sleep >> SLEEP_SLP_TYP_SHIFT) & 7, "SLEEP_CONTROL_REG");
        }
        None
    }
}

/// S5 ends the VM; S1-S4 would need the VM to wake up again, which nothing here can do.
fn enter_sleep_state(slp_typ: u8, register: &str) -> Option<DeviceEvent> {
    if slp_typ == S5_SLP_TYP {
        log::debug!("guest entered S5 through {register}: power off");
        return Some(DeviceEvent::Poweroff);
    }
    crate::vmm::ratelimit::warn_limited!(
        "guest asked for sleep type {slp_typ} through {register}; only S5 ({S5_SLP_TYP}) is supported, ignored"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm1a_control_s5_powers_off() {
        let pm = AcpiPm::default();
        // ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN, as 16-bit accesses.
        let typ = u16::from(S5_SLP_TYP) << PM1_SLP_TYP_SHIFT;
        assert_eq!(pm.write(PM1A_CNT, &typ.to_le_bytes()), None);
        let mut r = [0u8; 2];
        pm.read(PM1A_CNT, &mut r);
        assert_eq!(u16::from_le_bytes(r), typ | PM1_SCI_EN);
        let off = (typ | PM1_SLP_EN).to_le_bytes();
        assert_eq!(pm.write(PM1A_CNT, &off), Some(DeviceEvent::Poweroff));
        // The high byte alone carries SLP_TYP and SLP_EN too.
        assert_eq!(
            pm.write(PM1A_CNT + 1, &[off[1]]),
            Some(DeviceEvent::Poweroff)
        );
    }

    #[test]
    fn sleep_control_s5_powers_off_and_other_states_do_not() {
        let pm = AcpiPm::default();
        let s5 = (S5_SLP_TYP << SLEEP_SLP_TYP_SHIFT) | SLEEP_SLP_EN;
        assert_eq!(pm.write(SLEEP_CONTROL, &[s5]), Some(DeviceEvent::Poweroff));
        let s3 = (3 << SLEEP_SLP_TYP_SHIFT) | SLEEP_SLP_EN;
        assert_eq!(pm.write(SLEEP_CONTROL, &[s3]), None);
        let s3_pm1 = (3u16 << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN;
        assert_eq!(pm.write(PM1A_CNT, &s3_pm1.to_le_bytes()), None);
        // S5's type without SLP_EN only prepares.
        assert_eq!(
            pm.write(SLEEP_CONTROL, &[S5_SLP_TYP << SLEEP_SLP_TYP_SHIFT]),
            None
        );
    }

    #[test]
    fn the_power_button_sets_its_status_and_raises_the_sci_once_enabled() {
        let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let pm = AcpiPm::new(sci.try_clone().unwrap());
        let status = || {
            let mut r = [0u8; 2];
            pm.read(PM1A_EVT, &mut r);
            u16::from_le_bytes(r)
        };
        // Not enabled: the guest would never look, so nothing is pressed.
        assert!(!pm.press_power_button());
        assert_eq!(status(), 0);
        assert!(sci.read().is_err(), "no SCI");
        pm.write(PM1A_EVT + 2, &PWRBTN.to_le_bytes());
        assert!(pm.press_power_button());
        assert_eq!(status(), PWRBTN);
        assert_eq!(sci.read().unwrap(), 1, "one SCI");
        // Writing 0 clears nothing; writing the bit clears it.
        pm.write(PM1A_EVT, &[0, 0]);
        assert_eq!(status(), PWRBTN);
        pm.write(PM1A_EVT, &PWRBTN.to_le_bytes());
        assert_eq!(status(), 0);
        // Pending while disabled, then enabled: the SCI comes with the enable.
        assert!(pm.press_power_button());
        sci.read().unwrap();
        pm.write(PM1A_EVT + 2, &[0, 0]);
        pm.write(PM1A_EVT + 2, &PWRBTN.to_le_bytes());
        assert_eq!(sci.read().unwrap(), 1);
    }

    #[test]
    fn status_reads_zero_and_enable_is_kept() {
        let pm = AcpiPm::default();
        pm.write(PM1A_EVT, &[0xff, 0xff, 0x21, 0x00]);
        let mut r = [0u8; 4];
        pm.read(PM1A_EVT, &mut r);
        assert_eq!(r, [0, 0, 0x21, 0x00]);
        let mut s = [0xaa];
        pm.read(SLEEP_STATUS, &mut s);
        assert_eq!(s, [0]);
    }
}
