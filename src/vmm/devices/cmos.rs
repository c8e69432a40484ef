//! The PC's CMOS RAM and real-time clock (Motorola MC146818 compatible) on ports
//! 0x70 (index) and 0x71 (data): 128 bytes, of which the first 14 are the clock.
//!
//! The clock shows the host's wall-clock time in UTC, read when the guest reads it,
//! in BCD or binary and in 24- or 12-hour form as status register B selects. The
//! "update in progress" bit of register A is always clear and register D says the
//! time is valid, so a kernel reading the clock never waits for an update cycle
//! (Linux waits up to a second per read when it finds no RTC). Writes to the time
//! registers are ignored: the guest always sees the host's time. No alarm or
//! periodic interrupt is ever raised. Every other byte is plain RAM.
//!
//! No crate fits: vm-superio's RTC is ARM's PL031, and the CMOS models of other VMMs
//! live inside their device crates.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Index register: bits 0-6 select the byte; bit 7 masks NMIs (ignored here).
pub const INDEX_PORT: u16 = 0x70;
/// Data register: reads and writes the selected byte.
pub const DATA_PORT: u16 = 0x71;
/// CMOS byte holding the century (IBM PC convention; the FADT's CENTURY field names it).
pub const CENTURY: u8 = 0x32;

// Clock registers (MC146818 datasheet, "Address map").
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Register A: 32.768 kHz time base, 1024 Hz rate; bit 7 (UIP) clear.
const REG_A_VALUE: u8 = 0x26;
/// Register B bit 1: 24-hour mode. Bit 2: binary (not BCD).
const REG_B_24H: u8 = 1 << 1;
const REG_B_BINARY: u8 = 1 << 2;
/// Register D bit 7: valid RAM and time (the battery is good).
const REG_D_VRT: u8 = 1 << 7;
/// Hours register bit 7 in 12-hour mode: PM.
const HOURS_PM: u8 = 1 << 7;

/// A calendar date and time in UTC, as the clock registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year, e.g. 2026.
    pub year: u32,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 1 (Sunday) to 7 (Saturday), as the RTC counts.
    pub weekday: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59.
    pub second: u8,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01T00:00:00Z, by the
    /// days-to-civil-date conversion of the proleptic Gregorian calendar.
    pub fn from_unix(secs: u64) -> DateTime {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
        let z = days + 719_468;
        let era = z / 146_097;
        let day_of_era = z % 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153; // month counted from March
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = year_of_era + era * 400 + u64::from(month <= 2);
        DateTime {
            year: year as u32,
            month: month as u8,
            day: day as u8,
            // 1970-01-01 was a Thursday (5 when Sunday is 1).
            weekday: ((days + 4) % 7 + 1) as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// The host's current time.
    pub fn now() -> DateTime {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        DateTime::from_unix(secs)
    }
}

/// `v` (0-99) in packed BCD: tens in the high nibble.
pub fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS RAM and clock of one VM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    /// The time the clock registers show, and when it was read from the host. A read
    /// of the seconds register (where every reader starts) or a stale snapshot takes a
    /// new one, so the registers a guest reads in one go agree with each other.
    snapshot: Option<(Instant, DateTime)>,
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos::new()
    }
}

impl Cmos {
    /// A CMOS as a PC BIOS leaves it: BCD, 24-hour mode, time valid.
    pub fn new() -> Cmos {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = REG_A_VALUE;
        ram[usize::from(REG_B)] = REG_B_24H;
        ram[usize::from(REG_D)] = REG_D_VRT;
        Cmos {
            index: 0,
            ram,
            snapshot: None,
        }
    }

    /// Handles an IN of one byte (wider accesses fill the rest with the same byte's
    /// neighbours as all-ones, like an unconnected bus).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if port == DATA_PORT {
            data[0] = self.read_register(self.index);
        }
    }

    /// Handles an OUT: selects a byte (0x70) or writes it (0x71).
    pub fn write(&mut self, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match port {
            INDEX_PORT => self.index = v & 0x7f,
            _ => self.write_register(self.index, v),
        }
    }

    fn time(&mut self, index: u8) -> DateTime {
        match self.snapshot {
            Some((at, t)) if index != SECONDS && at.elapsed().as_millis() < 500 => t,
            _ => {
                let t = DateTime::now();
                self.snapshot = Some((Instant::now(), t));
                t
            }
        }
    }

    /// The value of CMOS byte `index` (0-127) at time `t`.
    pub fn register_at(&self, index: u8, t: &DateTime) -> u8 {
        let b = self.ram[usize::from(REG_B)];
        let enc = |v: u8| if b & REG_B_BINARY != 0 { v } else { to_bcd(v) };
        match index {
            SECONDS => enc(t.second),
            MINUTES => enc(t.minute),
            HOURS if b & REG_B_24H != 0 => enc(t.hour),
            HOURS => {
                // 12-hour mode: 12, 1..11 with bit 7 set after noon.
                let h12 = if t.hour.is_multiple_of(12) {
                    12
                } else {
                    t.hour % 12
                };
                enc(h12) | if t.hour >= 12 { HOURS_PM } else { 0 }
            }
            WEEKDAY => enc(t.weekday),
            DAY => enc(t.day),
            MONTH => enc(t.month),
            YEAR => enc((t.year % 100) as u8),
            CENTURY => enc((t.year / 100) as u8),
            // No interrupt flags are ever raised.
            REG_C => 0,
            _ => self.ram[usize::from(index & 0x7f)],
        }
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let is_clock = matches!(
            index,
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY
        );
        if is_clock {
            let t = self.time(index);
            self.register_at(index, &t)
        } else {
            self.register_at(index, &DateTime::from_unix(0))
        }
    }

    fn write_register(&mut self, index: u8, v: u8) {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY | REG_C => {
                log::debug!("CMOS: write {v:#04x} to clock register {index:#04x} ignored");
            }
            // UIP (bit 7) is read-only and always clear.
            REG_A => self.ram[usize::from(REG_A)] = v & 0x7f,
            // VRT is read-only and always set.
            REG_D => {}
            _ => self.ram[usize::from(index)] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-23T13:05:09Z, a Monday.
    const T: u64 = 1_795_439_109;

    #[test]
    fn civil_dates() {
        let t = DateTime::from_unix(T);
        assert_eq!(
            t,
            DateTime {
                year: 2026,
                month: 11,
                day: 23,
                weekday: 2,
                hour: 13,
                minute: 5,
                second: 9
            }
        );
        // A leap day, and the epoch.
        let leap = DateTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 5)
        );
    }

    #[test]
    fn bcd_and_binary_encodings() {
        let t = DateTime::from_unix(T);
        let mut c = Cmos::new();
        // Default: BCD, 24-hour.
        assert_eq!(c.register_at(SECONDS, &t), 0x09);
        assert_eq!(c.register_at(HOURS, &t), 0x13);
        assert_eq!(c.register_at(YEAR, &t), 0x26);
        assert_eq!(c.register_at(CENTURY, &t), 0x20);
        assert_eq!(c.register_at(MONTH, &t), 0x11);
        // Binary.
        c.write(INDEX_PORT, &[REG_B]);
        c.write(DATA_PORT, &[REG_B_24H | REG_B_BINARY]);
        assert_eq!(c.register_at(YEAR, &t), 26);
        assert_eq!(c.register_at(CENTURY, &t), 20);
        assert_eq!(c.register_at(DAY, &t), 23);
        // 12-hour binary: 13:05 is 1 PM.
        c.write(DATA_PORT, &[REG_B_BINARY]);
        assert_eq!(c.register_at(HOURS, &t), 1 | HOURS_PM);
        // 12-hour BCD, just after midnight: 12 AM.
        c.write(DATA_PORT, &[0]);
        let midnight = DateTime::from_unix(T - 13 * 3600);
        assert_eq!(c.register_at(HOURS, &midnight), 0x12);
        assert_eq!(to_bcd(59), 0x59);
    }

    #[test]
    fn status_registers_and_ram() {
        let mut c = Cmos::new();
        let mut b = [0u8];
        // Bit 7 of the index masks NMIs and is not part of the index.
        c.write(INDEX_PORT, &[0x80 | REG_A]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0] & 0x80, 0, "update in progress must be clear");
        c.write(DATA_PORT, &[0xa6]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0], 0x26);
        c.write(INDEX_PORT, &[REG_D]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0], REG_D_VRT);
        // Shutdown status byte (Linux writes it before starting APs): RAM.
        c.write(INDEX_PORT, &[0x0f]);
        c.write(DATA_PORT, &[0x0a]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0], 0x0a);
        c.write(INDEX_PORT, &[0x7f]);
        c.write(DATA_PORT, &[0x5a]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0], 0x5a);
        // The clock follows the host.
        c.write(INDEX_PORT, &[CENTURY]);
        c.read(DATA_PORT, &mut b);
        assert_eq!(b[0], to_bcd((DateTime::now().year / 100) as u8));
    }
}
