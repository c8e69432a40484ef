//! Bad input gets a clear error, a non-zero status and no panic, and leaves nothing
//! behind. Most of these fail before /dev/kvm is opened, so they run everywhere.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;

const VMM_ERROR: i32 = 125;
const USAGE: i32 = 2;

fn run_expect(args: &[&str], status: i32, needle: &str) -> String {
    let o = output({
        let mut c = minivmm();
        c.args(args);
        c
    });
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(status), "args {args:?}: stderr {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: expected {needle:?} in stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "minivmm panicked: {err}");
    err
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_kernel() {
    let d = scratch("missing_kernel");
    let out = d.join("console.txt");
    run_expect(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--serial-out",
            out.to_str().unwrap(),
        ],
        VMM_ERROR,
        "cannot read kernel /nonexistent/vmlinux",
    );
    assert!(
        !out.exists(),
        "a failed start must not leave a console file"
    );
}

#[test]
fn unreadable_kernel_is_a_directory() {
    run_expect(&["run", "--kernel", "/"], VMM_ERROR, "cannot read kernel /");
}

#[test]
fn random_bytes_are_not_a_kernel() {
    let d = scratch("random_bytes");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let k = write_file(&d, "random.bin", &bytes);
    run_expect(
        &["run", "--kernel", &k],
        VMM_ERROR,
        "is not a kernel minivmm can boot",
    );
    let empty = write_file(&d, "empty.bin", b"");
    run_expect(&["run", "--kernel", &empty], VMM_ERROR, "the file is empty");
}

/// A bzImage header (boot protocol 2.15, 64-bit entry) that announces more
/// protected-mode code than the file holds.
#[test]
fn truncated_bzimage() {
    let d = scratch("truncated_bzimage");
    let mut img = vec![0u8; 8192];
    img[0x1f1] = 4; // setup_sects
    img[0x1f4..0x1f8].copy_from_slice(&0x10000u32.to_le_bytes()); // syssize: 1 MiB
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let k = write_file(&d, "bzImage", &img);
    run_expect(&["run", "--kernel", &k], VMM_ERROR, "is truncated");
}

#[test]
fn elf_for_another_architecture() {
    let d = scratch("elf_arch");
    let mut elf = vec![0u8; 256];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little-endian
    elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let k = write_file(&d, "vmlinux-arm64", &elf);
    run_expect(
        &["run", "--kernel", &k],
        VMM_ERROR,
        "an ELF for another architecture",
    );
    elf[4] = 1; // ELFCLASS32
    let k = write_file(&d, "vmlinux-32", &elf);
    run_expect(&["run", "--kernel", &k], VMM_ERROR, "32-bit ELF");
}

#[test]
fn initrd_too_big_for_memory() {
    let d = scratch("initrd_too_big");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    let initrd = d.join("big.cpio");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(40 << 20).unwrap(); // sparse: costs no disk
    run_expect(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "32M",
        ],
        VMM_ERROR,
        "does not fit in guest memory",
    );
    run_expect(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent.cpio",
        ],
        VMM_ERROR,
        "cannot read initrd /nonexistent.cpio",
    );
}

#[test]
fn memory_flags() {
    run_expect(
        &["run", "--kernel", "k", "--memory", "lots"],
        USAGE,
        "cannot parse memory size",
    );
    run_expect(
        &["run", "--kernel", "k", "--memory", "8M"],
        USAGE,
        "too small",
    );
    run_expect(
        &["run", "--kernel", "k", "--memory", "4T"],
        USAGE,
        "too large",
    );
}

#[test]
fn vcpu_counts() {
    let d = scratch("vcpu_counts");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    let k = k.to_str().unwrap();
    run_expect(
        &["run", "--kernel", k, "--vcpus", "0"],
        VMM_ERROR,
        "--vcpus 0 is out of range",
    );
    run_expect(
        &["run", "--kernel", k, "--vcpus", "1000"],
        VMM_ERROR,
        "--vcpus 1000 is out of range",
    );
    run_expect(
        &["run", "--kernel", k, "--vcpus", "two"],
        USAGE,
        "invalid value",
    );
}

#[test]
fn cmdline_too_long() {
    let d = scratch("cmdline_too_long");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    let long = "x".repeat(5000);
    run_expect(
        &["run", "--kernel", k.to_str().unwrap(), "--cmdline", &long],
        VMM_ERROR,
        "kernel command line is 5000 bytes",
    );
}

#[test]
fn unknown_flag_and_bad_timeout() {
    run_expect(
        &["run", "--kernel", "k", "--frobnicate"],
        USAGE,
        "--frobnicate",
    );
    run_expect(
        &["run", "--kernel", "k", "--timeout", "soon"],
        USAGE,
        "cannot parse duration",
    );
    run_expect(&["launch"], USAGE, "unrecognized subcommand");
}

/// /dev/kvm hidden in a private mount namespace: the error names the missing device
/// and the fix. Needs root (unshare); skipped otherwise.
#[test]
fn dev_kvm_missing() {
    let d = scratch("dev_kvm_missing");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --no-ledger --kernel {}",
        env!("CARGO_BIN_EXE_minivmm"),
        k.display()
    );
    let o = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output();
    let Some(o) = o
        .ok()
        .filter(|o| !String::from_utf8_lossy(&o.stderr).contains("unshare:"))
    else {
        eprintln!("*** SKIP dev_kvm_missing: cannot create a mount namespace (needs root) ***");
        return;
    };
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(VMM_ERROR), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
    assert!(
        err.contains("modprobe"),
        "the error should say how to fix it: {err}"
    );
}

/// An unprivileged user cannot open root's crw------- /dev/kvm.
#[test]
fn dev_kvm_permission_denied() {
    let meta = std::fs::metadata("/dev/kvm");
    let world_rw = meta.as_ref().map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o006 == 0o006
    });
    if meta.is_err() || world_rw.unwrap_or(true) {
        eprintln!("*** SKIP dev_kvm_permission_denied: /dev/kvm is absent or world-accessible ***");
        return;
    }
    let d = scratch("dev_kvm_perm");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    // The guest file must be readable by the unprivileged user.
    let _ = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&d)
        .status();
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_minivmm"))
        .args(["run", "--no-ledger", "--kernel"])
        .arg(&k)
        .output();
    let Some(o) = o
        .ok()
        .filter(|o| !String::from_utf8_lossy(&o.stderr).contains("setpriv:"))
    else {
        eprintln!("*** SKIP dev_kvm_permission_denied: setpriv unavailable or not root ***");
        return;
    };
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(VMM_ERROR), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}

#[test]
fn help_explains_exit_statuses() {
    let o = output({
        let mut c = minivmm();
        c.args(["run", "--help"]);
        c
    });
    assert_eq!(o.status.code(), Some(0));
    let h = stdout(&o);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--timeout",
        "--serial-out",
        "--json",
    ] {
        assert!(h.contains(flag), "--help lacks {flag}");
    }
}
