//! Rate limiting for the log lines a guest can cause.
//!
//! A guest decides how often it writes a register, so where a write can log a
//! warning the guest decides how much the host logs: 100,000 writes to the ACPI sleep
//! register made 15.7 MB of warnings in 1.3 s (issue 16). Every line at warn level or
//! above that a guest action can trigger goes through [`warn_limited!`], which lets
//! [`BURST`] lines from each call site through per [`INTERVAL`], the defaults of Linux's
//! own `printk_ratelimited` (DEFAULT_RATELIMIT_BURST, DEFAULT_RATELIMIT_INTERVAL). The
//! next line says that similar ones are being suppressed; the first line of a later
//! interval says how many were.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per [`INTERVAL`] before it is suppressed.
pub const BURST: u32 = 10;
/// The interval over which [`BURST`] lines are allowed.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What a call site should do with its next line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it.
    Log,
    /// Log it, and say that this many similar lines were dropped before it.
    LogAfterSuppressed(u64),
    /// Log it, and say that similar lines are suppressed until the interval ends.
    LogThenSuppress,
    /// Drop it (it is counted).
    Drop,
}

/// The state of one call site's limit: [`RateLimit::new`] is `const`, so each site
/// keeps one in a `static` (as [`warn_limited!`] does).
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the current interval began; None before the first line.
    start: Option<Instant>,
    /// Lines logged in the current interval, the suppression notice included.
    logged: u32,
    /// Lines dropped since the last report of them.
    dropped: u64,
}

impl RateLimit {
    /// A limit of `burst` lines per `interval`.
    pub const fn new(burst: u32, interval: Duration) -> RateLimit {
        RateLimit {
            burst,
            interval,
            state: Mutex::new(State {
                start: None,
                logged: 0,
                dropped: 0,
            }),
        }
    }

    /// The verdict on a line logged now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Verdict {
        // Nothing below can panic, so the lock is never poisoned; if it were, the
        // counters are still good numbers.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut reported = 0;
        if st
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.interval)
        {
            st.start = Some(now);
            st.logged = 0;
            reported = std::mem::take(&mut st.dropped);
        }
        if st.logged < self.burst {
            st.logged += 1;
            return match reported {
                0 => Verdict::Log,
                n => Verdict::LogAfterSuppressed(n),
            };
        }
        if st.logged == self.burst {
            st.logged += 1;
            return Verdict::LogThenSuppress;
        }
        st.dropped = st.dropped.saturating_add(1);
        Verdict::Drop
    }
}

/// `log::warn!`, at most [`BURST`] lines per [`INTERVAL`] from each place it is
/// written, for lines a guest can trigger as often as it likes.
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        use $crate::vmm::ratelimit::{BURST, INTERVAL, RateLimit, Verdict};
        static LIMIT: RateLimit = RateLimit::new(BURST, INTERVAL);
        match LIMIT.check() {
            Verdict::Log => ::log::warn!($($arg)+),
            Verdict::LogAfterSuppressed(n) => ::log::warn!(
                "{} (suppressed {n} similar messages before this one)",
                format_args!($($arg)+)
            ),
            Verdict::LogThenSuppress => ::log::warn!(
                "{} (suppressing similar messages for up to {} s)",
                format_args!($($arg)+),
                INTERVAL.as_secs()
            ),
            Verdict::Drop => {}
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_notice_then_silence_then_the_count() {
        let limit = RateLimit::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        for i in 0..3 {
            assert_eq!(limit.check_at(at(i)), Verdict::Log);
        }
        assert_eq!(limit.check_at(at(3)), Verdict::LogThenSuppress);
        for i in 0..1000 {
            assert_eq!(limit.check_at(at(4 + i % 4000)), Verdict::Drop);
        }
        // A new interval: the first line carries the count, then the burst again.
        assert_eq!(limit.check_at(at(5000)), Verdict::LogAfterSuppressed(1000));
        assert_eq!(limit.check_at(at(5001)), Verdict::Log);
        assert_eq!(limit.check_at(at(5002)), Verdict::Log);
        assert_eq!(limit.check_at(at(5003)), Verdict::LogThenSuppress);
        // A quiet site starts afresh, with nothing to report.
        assert_eq!(limit.check_at(at(20_000)), Verdict::Log);
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let limit = RateLimit::new(BURST, INTERVAL);
        let logged = (0..100_000)
            .filter(|_| limit.check() != Verdict::Drop)
            .count();
        // All in one interval unless this machine took 5 s for the loop.
        assert!(logged as u32 <= 2 * (BURST + 1), "{logged} lines");
    }
}
