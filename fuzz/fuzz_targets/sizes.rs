//! The size and duration grammars of the command line (`--memory 1.5G`,
//! `--timeout 90s`): any string is parsed or refused, never a panic or an
//! overflow, and what parses is in range.
#![no_main]

use minivmm::vmm::config::{parse_duration, parse_memory_mib};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mib) = parse_memory_mib(s) {
        assert!(mib > 0, "{s:?} parsed as 0 MiB");
        // One grammar: --memory agrees with the pool's sizes.
        assert_eq!(minivmm::units::parse_size(s, 20), Ok(mib), "{s:?}");
    }
    let has_unit = s.trim().ends_with(|c: char| c.is_ascii_alphabetic());
    if let Ok(gib) = minivmm::units::parse_size(s, 30)
        && has_unit
    {
        // With a unit, a whole number of GiB is a whole number of MiB, 1024 times
        // larger (a bare number is in the caller's unit).
        assert!(gib > 0);
        if let Some(mib) = gib.checked_mul(1024).filter(|&m| m <= i64::MAX as u64) {
            assert_eq!(minivmm::units::parse_size(s, 20), Ok(mib), "{s:?}");
        }
    }
    let _ = parse_duration(s);
});
