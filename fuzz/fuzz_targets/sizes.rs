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
    }
    let _ = parse_duration(s);
});
