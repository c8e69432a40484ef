//! The 8254 programmable interval timer in userspace, for a VM with a split irqchip.
//!
//! KVM's PIT (KVM_CREATE_PIT2) needs KVM's own IOAPIC and PIC, so with
//! `--irqchip split` the timer is here: ports 0x40-0x42 (counters 0-2), 0x43 (control
//! word), and port 0x61's gate and output bits of counter 2 (the PC's speaker port),
//! after the Intel 8254 datasheet.
//!
//! A counter's value is computed when read, from the time since it was loaded at the
//! 8254's 1.193182 MHz: nothing runs while the guest only reads (Linux calibrates its
//! TSC on counter 2, mode 0, gated through port 0x61). Counter 0 drives ISA IRQ 0: in
//! modes 0 and 4 once at terminal count, in modes 2 and 3 once per period; the
//! [`PitTimer`] thread sleeps until the next such moment and pulses the IRQ 0 irqfd.
//! A period shorter than [`MIN_PERIOD`] is stretched to it (as KVM's own PIT does), so
//! a guest that asks for a 1 µs timer gets 5,000 interrupts a second, not a host
//! thread spinning; ticks the thread could not deliver in time are merged into one,
//! as the interrupt line would merge them. While IRQ 0's IOAPIC pin is masked (the
//! IOAPIC tells us, [`Pit::pin_watch`]) its edges would be dropped anyway, so the
//! thread sleeps: a parked guest with a fast timer costs its host nothing.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Counter 0's data port; counters 1 and 2 follow.
pub const COUNTER0_PORT: u16 = 0x40;
/// The control word port.
pub const CONTROL_PORT: u16 = 0x43;
/// The PC's system control port B: bit 0 gates counter 2, bit 1 enables the
/// speaker, bit 5 reads counter 2's output, bit 4 toggles with DRAM refresh.
pub const SPEAKER_PORT: u16 = 0x61;

/// The 8254's input clock on a PC.
pub const PIT_HZ: u64 = 1_193_182;
/// The shortest period counter 0 interrupts with.
pub const MIN_PERIOD: Duration = Duration::from_micros(200);
/// A refresh request every 15.085 µs on a PC; port 0x61 bit 4 toggles with it.
const REFRESH_NS: u128 = 15_085;

/// Errors starting the timer thread.
#[derive(Debug, thiserror::Error)]
pub enum PitError {
    /// The thread could not be started.
    #[error("cannot start the PIT timer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// One of the three counters.
#[derive(Debug, Clone, Copy)]
struct Counter {
    /// Operating mode 0-5 (6 and 7 are 2 and 3 again).
    mode: u8,
    /// Read/write access from the control word: 1 low byte, 2 high byte, 3 both.
    access: u8,
    /// The count written, 1..=65536 (a written 0 means 65536).
    reload: u32,
    /// The low byte of a two-byte count, once written.
    low: Option<u8>,
    /// Whether the next two-byte read returns the high byte.
    read_high: bool,
    /// When counting (re)started; `None` while stopped (no count yet, gate low).
    since: Option<Instant>,
    /// Input clocks counted before the gate last went low.
    paused: u64,
    /// A count latched by the counter-latch or read-back command.
    latched: Option<u16>,
    /// A status byte latched by read-back; read before the count.
    status: Option<u8>,
    /// The gate input: always high for counters 0 and 1.
    gate: bool,
    /// Whether a count was written since the last control word.
    loaded: bool,
}

impl Counter {
    fn new(gate: bool) -> Counter {
        Counter {
            mode: 0,
            access: 3,
            reload: 0x10000,
            low: None,
            read_high: false,
            since: None,
            paused: 0,
            latched: None,
            status: None,
            gate,
            loaded: false,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode & 3, 2 | 3)
    }

    /// Input clocks counted since the count was loaded.
    fn elapsed(&self, now: Instant) -> u64 {
        match self.since {
            Some(t) => self.paused + clocks(now.saturating_duration_since(t)),
            None => self.paused,
        }
    }

    /// The counting element's value now.
    fn count(&self, now: Instant) -> u16 {
        if !self.loaded {
            return 0;
        }
        let n = u64::from(self.reload);
        let e = self.elapsed(now);
        let v = if self.periodic() {
            n - e % n
        } else {
            // One-shot modes count on past terminal count, wrapping at 16 bits.
            (n + 0x10000 - e % 0x10000) % 0x10000
        };
        v as u16
    }

    /// The OUT pin now (datasheet, "mode definitions").
    fn out(&self, now: Instant) -> bool {
        if !self.loaded {
            return self.mode != 0;
        }
        let n = u64::from(self.reload);
        let e = self.elapsed(now);
        match self.mode & 7 {
            0 | 1 => e >= n,
            3 | 7 => e % n < n.div_ceil(2),
            // 2, 4, 5: high but for one clock; a read almost never sees it.
            _ => true,
        }
    }

    /// Starts counting from the reload value, if the gate lets it.
    fn start(&mut self, now: Instant) {
        self.paused = 0;
        // Modes 1 and 5 wait for a rising gate edge; the rest count on a high gate.
        let triggered = matches!(self.mode & 7, 1 | 5);
        self.since = (self.gate && !triggered).then_some(now);
    }

    fn set_gate(&mut self, gate: bool, now: Instant) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if !self.loaded {
            return;
        }
        if gate {
            if matches!(self.mode & 7, 1 | 2 | 3 | 5 | 6 | 7) {
                // A rising edge (re)triggers modes 1 and 5 and reloads 2 and 3.
                self.paused = 0;
            }
            self.since = Some(now);
        } else {
            self.paused = self.elapsed(now);
            self.since = None;
        }
    }

    fn status_byte(&self, now: Instant) -> u8 {
        let out = u8::from(self.out(now)) << 7;
        let null = u8::from(!self.loaded) << 6;
        out | null | self.access << 4 | self.mode << 1
    }

    fn read(&mut self, now: Instant) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let v = self.latched.unwrap_or_else(|| self.count(now));
        let (byte, done) = match self.access {
            1 => (v as u8, true),
            2 => ((v >> 8) as u8, true),
            _ if self.read_high => ((v >> 8) as u8, true),
            _ => (v as u8, false),
        };
        if self.access == 3 {
            self.read_high = !done;
        }
        if done {
            self.latched = None;
        }
        byte
    }

    /// A byte of a new count; true once the count is complete and loaded.
    fn write(&mut self, b: u8, now: Instant) -> bool {
        let value = match (self.access, self.low) {
            (1, _) => u32::from(b),
            (2, _) => u32::from(b) << 8,
            (_, None) => {
                self.low = Some(b);
                return false;
            }
            (_, Some(lo)) => {
                self.low = None;
                u32::from(lo) | u32::from(b) << 8
            }
        };
        self.reload = if value == 0 { 0x10000 } else { value };
        self.loaded = true;
        self.start(now);
        true
    }
}

/// Clocks of the 8254's input in `d`.
fn clocks(d: Duration) -> u64 {
    (d.as_nanos() * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// Time for `n` input clocks.
fn clock_time(n: u64) -> Duration {
    Duration::from_nanos((u128::from(n) * 1_000_000_000 / u128::from(PIT_HZ)) as u64)
}

struct State {
    counters: [Counter; 3],
    /// Port 0x61 bit 1 (speaker data enable), kept for read-back.
    speaker: bool,
    /// When counter 0's output next rises, if it will.
    next_irq: Option<Instant>,
    /// Counter 0's interrupt period (stretched to MIN_PERIOD), for modes 2 and 3.
    period: Option<Duration>,
    /// Whether IRQ 0's IOAPIC pin has a route: while it has none its edges are
    /// dropped, so the thread sleeps instead of raising them (the counters, read from
    /// the clock, do not depend on it).
    heard: bool,
    /// Interrupts raised and merged, for the log at the end.
    raised: u64,
    merged: u64,
    stop: bool,
}

/// The PIT of one VM: its ports, and what its timer thread waits on.
pub struct Pit {
    shared: Arc<(Mutex<State>, Condvar)>,
    irq: Arc<EventFd>,
}

impl Pit {
    /// A PIT whose counter 0 pulses `irq` (an irqfd on the IOAPIC pin of ISA IRQ 0).
    pub fn new(irq: EventFd) -> Pit {
        let state = State {
            counters: [Counter::new(true), Counter::new(true), Counter::new(false)],
            speaker: false,
            next_irq: None,
            period: None,
            heard: true,
            raised: 0,
            merged: 0,
            stop: false,
        };
        Pit {
            shared: Arc::new((Mutex::new(state), Condvar::new())),
            irq: Arc::new(irq),
        }
    }

    /// A watch for the IOAPIC pin of IRQ 0 (`Ioapic::watch_pin`): the timer thread
    /// sleeps while the pin is masked, so a fast timer nobody hears costs no CPU.
    pub fn pin_watch(&self) -> Box<dyn Fn(bool) + Send + Sync> {
        let shared = self.shared.clone();
        Box::new(move |heard| {
            super::lock(&shared.0).heard = heard;
            shared.1.notify_one();
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        super::lock(&self.shared.0)
    }

    /// Handles an IN from one of the PIT's ports.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let now = Instant::now();
        let mut s = self.state();
        let v = match port {
            0x40..=0x42 => s.counters[usize::from(port - COUNTER0_PORT)].read(now),
            SPEAKER_PORT => {
                let c2 = &s.counters[2];
                let refresh = epoch_ns() / REFRESH_NS % 2 == 1;
                u8::from(c2.gate)
                    | u8::from(s.speaker) << 1
                    | u8::from(refresh) << 4
                    | u8::from(c2.out(now)) << 5
            }
            // The control word register cannot be read.
            _ => 0xff,
        };
        data.fill(0);
        data[0] = v;
    }

    /// Handles an OUT to one of the PIT's ports (only the first byte counts).
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        let now = Instant::now();
        let mut s = self.state();
        match port {
            0x40..=0x42 => {
                let i = usize::from(port - COUNTER0_PORT);
                if s.counters[i].write(b, now) && i == 0 {
                    self.schedule(&mut s, now);
                }
            }
            CONTROL_PORT => self.control(&mut s, b, now),
            SPEAKER_PORT => {
                s.speaker = b & 2 != 0;
                s.counters[2].set_gate(b & 1 != 0, now);
            }
            _ => {}
        }
    }

    fn control(&self, s: &mut State, b: u8, now: Instant) {
        let select = b >> 6;
        if select == 3 {
            // Read-back (bits 1-3 pick counters; bit 5 clear latches counts, bit 4
            // clear latches status).
            for i in 0..3 {
                if b & (2 << i) == 0 {
                    continue;
                }
                let c = &mut s.counters[i];
                if b & 0x20 == 0 && c.latched.is_none() {
                    c.latched = Some(c.count(now));
                }
                if b & 0x10 == 0 && c.status.is_none() {
                    c.status = Some(c.status_byte(now));
                }
            }
            return;
        }
        let c = &mut s.counters[usize::from(select)];
        let access = (b >> 4) & 3;
        if access == 0 {
            // Counter latch: the first latch holds until read.
            if c.latched.is_none() {
                c.latched = Some(c.count(now));
            }
            return;
        }
        // A new mode: the counter stops until its count is written. BCD (bit 0) is
        // not modelled: counts are binary.
        c.access = access;
        c.mode = (b >> 1) & 7;
        c.low = None;
        c.read_high = false;
        c.latched = None;
        c.status = None;
        c.loaded = false;
        c.since = None;
        c.paused = 0;
        if select == 0 {
            self.schedule(s, now);
        }
    }

    /// Sets when counter 0 next interrupts, and wakes the timer thread.
    fn schedule(&self, s: &mut State, now: Instant) {
        let c = s.counters[0];
        let (next, period) = match (c.loaded, c.mode & 7) {
            (true, 0 | 4) => (Some(now + clock_time(u64::from(c.reload))), None),
            (true, 2 | 3 | 6 | 7) => {
                let p = clock_time(u64::from(c.reload)).max(MIN_PERIOD);
                (Some(now + p), Some(p))
            }
            _ => (None, None),
        };
        s.next_irq = next;
        s.period = period;
        self.shared.1.notify_one();
    }

    /// The timer thread's loop: sleep until counter 0's next rising edge, pulse.
    fn serve(shared: &(Mutex<State>, Condvar), irq: &EventFd) {
        let mut s = super::lock(&shared.0);
        while !s.stop {
            let Some(at) = s.next_irq.filter(|_| s.heard) else {
                s = shared.1.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let now = Instant::now();
            if now < at {
                s = shared
                    .1
                    .wait_timeout(s, at - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            if let Err(e) = irq.write(1) {
                crate::vmm::ratelimit::warn_limited!("pit: irq 0 eventfd: {e}");
            }
            s.raised += 1;
            s.next_irq = s.period.map(|p| {
                let next = at + p;
                if next > now {
                    next
                } else {
                    // Late by a period or more: those ticks merge into this one.
                    s.merged += 1;
                    now + p
                }
            });
        }
        log::debug!(
            "pit: {} interrupts raised, {} late ones merged",
            s.raised,
            s.merged
        );
    }
}

/// A monotonic nanosecond offset so that port 0x61's refresh bit toggles with time
/// rather than with each read.
fn epoch_ns() -> u128 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos()
}

/// The thread that raises counter 0's interrupts; stopped and joined on drop.
pub struct PitTimer {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl PitTimer {
    /// Starts `pit`'s timer thread, which installs the `filters`' timer filter.
    pub fn start(pit: &Pit, filters: crate::vmm::seccomp::Filters) -> Result<PitTimer, PitError> {
        let shared = pit.shared.clone();
        let irq = pit.irq.clone();
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pit".into())
            .spawn(move || {
                if let Err(e) = filters.enter(crate::vmm::seccomp::ThreadKind::Timer) {
                    log::error!("pit: {e}; the guest gets no timer interrupts");
                    return;
                }
                Pit::serve(&for_thread, &irq);
            })
            .map_err(PitError::Thread)?;
        Ok(PitTimer {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for PitTimer {
    fn drop(&mut self) {
        super::lock(&self.shared.0).stop = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pit() -> Pit {
        Pit::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    fn inb(p: &Pit, port: u16) -> u8 {
        let mut d = [0u8];
        p.read(port, &mut d);
        d[0]
    }

    #[test]
    fn counter_2_counts_down_in_real_time_while_gated_as_linux_calibrates() {
        let p = pit();
        // Gate high, speaker off; counter 2, lobyte/hibyte, mode 0; count 0xffff.
        p.write(SPEAKER_PORT, &[1]);
        p.write(CONTROL_PORT, &[0xb0]);
        p.write(0x42, &[0xff]);
        p.write(0x42, &[0xff]);
        assert_eq!(inb(&p, SPEAKER_PORT) & 0x21, 0x01, "gate on, OUT2 low");
        let first = u16::from(inb(&p, 0x42)) | u16::from(inb(&p, 0x42)) << 8;
        std::thread::sleep(Duration::from_millis(20));
        let later = u16::from(inb(&p, 0x42)) | u16::from(inb(&p, 0x42)) << 8;
        // 20 ms is ~23,864 clocks; the sleep may run long, never short.
        let gone = first - later;
        assert!((23_000..60_000).contains(&gone), "{first} -> {later}");
        // Gate low stops the count.
        p.write(SPEAKER_PORT, &[0]);
        p.write(CONTROL_PORT, &[0x80]); // latch counter 2
        let held = u16::from(inb(&p, 0x42)) | u16::from(inb(&p, 0x42)) << 8;
        std::thread::sleep(Duration::from_millis(5));
        let again = u16::from(inb(&p, 0x42)) | u16::from(inb(&p, 0x42)) << 8;
        assert_eq!(held, again);
    }

    #[test]
    fn out2_rises_at_terminal_count_and_read_back_reports_it() {
        let p = pit();
        p.write(SPEAKER_PORT, &[1]);
        p.write(CONTROL_PORT, &[0x90]); // counter 2, low byte only, mode 0
        p.write(0x42, &[100]); // ~84 µs
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(inb(&p, SPEAKER_PORT) & 0x20, 0x20);
        // Read-back of counter 2's status: OUT high, count loaded, access 1, mode 0.
        p.write(CONTROL_PORT, &[0xc0 | 0x20 | 0x08]);
        assert_eq!(inb(&p, 0x42), 0x80 | 0x10);
    }

    #[test]
    fn counter_0_in_mode_2_interrupts_once_per_period() {
        let p = pit();
        let timer = PitTimer::start(
            &p,
            crate::vmm::seccomp::Filters::build(crate::vmm::seccomp::SeccompMode::Off).unwrap(),
        )
        .unwrap();
        // Mode 2 at 1 kHz.
        p.write(CONTROL_PORT, &[0x34]);
        p.write(0x40, &[0xa9]);
        p.write(0x40, &[0x04]);
        std::thread::sleep(Duration::from_millis(100));
        p.write(CONTROL_PORT, &[0x30]); // mode 0, no count: stopped
        drop(timer);
        let n = p.irq.read().unwrap();
        // 100 at 1 kHz; a loaded machine delivers fewer (late ones merge), never more.
        assert!((20..=101).contains(&n), "{n} interrupts in 100 ms");
    }

    #[test]
    fn a_1us_period_is_stretched_and_nonsense_is_harmless() {
        let p = pit();
        let timer = PitTimer::start(
            &p,
            crate::vmm::seccomp::Filters::build(crate::vmm::seccomp::SeccompMode::Off).unwrap(),
        )
        .unwrap();
        for port in [0x40u16, 0x41, 0x42, 0x43, 0x61] {
            for v in 0..=255u8 {
                p.write(port, &[v]);
                let _ = inb(&p, port);
            }
        }
        p.write(CONTROL_PORT, &[0x34]);
        p.write(0x40, &[1]);
        p.write(0x40, &[0]);
        std::thread::sleep(Duration::from_millis(100));
        drop(timer);
        let n = p.irq.read().unwrap_or(0);
        assert!(n <= 100_000 / 200 + 1, "{n} interrupts in 100 ms");
    }
}
