//! A kernel file is hostile input: whatever its bytes, loading it into a 64 MiB VM
//! either succeeds inside guest RAM or is refused with an error — never a panic, an
//! overflow or a read past what the VM can hold (issue 16, items 5–7).
//!
//! The bytes go into a memfd opened by path (/proc/self/fd/N), so the loader runs
//! its real path: open, format detection (ELF / bzImage), ELF program-header checks,
//! segment copies, initrd placement and every boot structure.
#![no_main]

use minivmm::vmm::memory::GuestRam;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::OnceLock;

use minivmm::VmConfig;
use minivmm::vmm::boot;
use minivmm::vmm::memory::create_guest_memory;

const MEMORY_MIB: u64 = 64;

struct Setup {
    mem: GuestRam,
    file: std::fs::File,
    path: String,
}

fn setup() -> &'static std::sync::Mutex<Setup> {
    static S: OnceLock<std::sync::Mutex<Setup>> = OnceLock::new();
    S.get_or_init(|| {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"fuzz-kernel".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd was just created and is owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let mem = create_guest_memory(MEMORY_MIB).expect("guest memory");
        std::sync::Mutex::new(Setup { mem, file, path })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut s = setup().lock().unwrap_or_else(|p| p.into_inner());
    s.file.set_len(0).expect("truncate");
    s.file.seek(SeekFrom::Start(0)).expect("seek");
    s.file.write_all(data).expect("write");
    let mut config = VmConfig::new(s.path.clone());
    config.memory_mib = MEMORY_MIB;
    config.cmdline = "console=ttyS0".into();
    let _ = boot::load(&s.mem, &config, &[]);
});
