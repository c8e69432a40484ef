//! Bad input gets a clear error, a non-zero status and no panic, and leaves nothing
//! behind. Most of these fail before /dev/kvm is opened, so they run everywhere.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

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
        "memory size \"lots\": expected a number with an optional unit",
    );
    run_expect(
        &["run", "--kernel", "k", "--memory", "1500K"],
        USAGE,
        "must be a whole number of MiB",
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

/// Runs `script` with `sh -c` in a private mount namespace (`unshare --mount`, as
/// root; otherwise in a user namespace that maps us to root, which can mount a tmpfs
/// but not make device nodes). `None` after [`skip`] when no such namespace can be
/// made here; a failure of the script itself is the test's to judge.
fn in_mount_namespace(test: &str, script: &str, needs_real_root: bool) -> Option<Output> {
    let mut ns: Vec<&str> = vec!["--mount"];
    if !is_root() {
        if needs_real_root {
            skip(
                test,
                "MINIVMM_REQUIRE_KVM",
                "needs root: it makes a device node and runs minivmm as another user",
                "run the tests as root (sudo scripts/test.sh)",
            );
            return None;
        }
        ns = vec!["--user", "--map-root-user", "--mount"];
    }
    let probe = Command::new("unshare").args(&ns).arg("true").output();
    match probe {
        Ok(p) if p.status.success() => {}
        Ok(p) => {
            skip(
                test,
                "MINIVMM_REQUIRE_KVM",
                &format!(
                    "cannot create a mount namespace (`unshare {}`: {})",
                    ns.join(" "),
                    String::from_utf8_lossy(&p.stderr).trim()
                ),
                "run as root with CAP_SYS_ADMIN (sudo scripts/test.sh), or allow unprivileged user namespaces",
            );
            return None;
        }
        Err(e) => {
            skip(
                test,
                "MINIVMM_REQUIRE_KVM",
                &format!("cannot run unshare: {e}"),
                "install util-linux (it provides unshare and setpriv)",
            );
            return None;
        }
    }
    Some(
        Command::new("unshare")
            .args(&ns)
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    )
}

/// /dev/kvm hidden in a private mount namespace (an empty tmpfs over /dev): the error
/// names the missing device and the fix.
#[test]
fn dev_kvm_missing() {
    let d = scratch("dev_kvm_missing");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    let script = format!(
        "set -e; mount -t tmpfs none /dev; exec {} run --no-ledger --kernel {}",
        env!("CARGO_BIN_EXE_minivmm"),
        k.display()
    );
    let Some(o) = in_mount_namespace("dev_kvm_missing", &script, false) else {
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

/// An unprivileged user cannot open root's crw------- /dev/kvm. The host's own node may
/// be world-writable (many distributions make it so), so the test makes its own: in a
/// private mount namespace, a tmpfs over /dev holding a fresh KVM device node (char
/// 10:232) with mode 0600, owned by root; then minivmm runs as nobody (uid 65534).
#[test]
fn dev_kvm_permission_denied() {
    let test = "dev_kvm_permission_denied";
    let d = scratch("dev_kvm_perm");
    let k = tiny_guest(&d, "hello", &hello_body("hi", 0, true), true);
    // The guest file must be readable by the unprivileged user.
    let chmod = Command::new("chmod").args(["-R", "a+rX"]).arg(&d).status();
    assert!(
        chmod.is_ok_and(|s| s.success()),
        "chmod -R a+rX {}",
        d.display()
    );
    let script = format!(
        "set -e; mount -t tmpfs -o mode=0755 none /dev; mknod -m 0600 /dev/kvm c 10 232;          chown 0:0 /dev/kvm; ls -ln /dev/kvm >&2;          exec setpriv --reuid=65534 --regid=65534 --clear-groups {} run --no-ledger --kernel {}",
        env!("CARGO_BIN_EXE_minivmm"),
        k.display()
    );
    let Some(o) = in_mount_namespace(test, &script, true) else {
        return;
    };
    let err = stderr(&o);
    assert!(
        err.starts_with("crw------- 1 0 0 10, 232 "),
        "the namespace's /dev/kvm is not root's 0600 KVM node: {err}"
    );
    assert_eq!(o.status.code(), Some(VMM_ERROR), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}

/// Runs `minivmm run --kernel K ARGS...` on a tiny guest built from `body`; returns its
/// exit status.
fn run_guest(d: &Path, name: &str, body: &str, args: &[&str]) -> Option<i32> {
    let k = tiny_guest(d, name, body, true);
    let o = output({
        let mut c = minivmm();
        c.arg("run")
            .arg("--kernel")
            .arg(&k)
            .args(["--serial", "none", "--timeout", "20s"])
            .args(args);
        c
    });
    o.status.code()
}

/// Starts a guest that prints a line and spins, waits for that line (the VM runs),
/// sends SIGTERM and returns the exit status.
fn run_until_signalled(d: &Path) -> Option<i32> {
    use std::io::BufRead;
    let k = tiny_guest(
        d,
        "up",
        // "up\n" on COM1, then spin.
        "  mov $0x3f8, %dx\n  mov $0x75, %al\n  out %al, %dx\n  mov $0x70, %al\n  out %al, %dx\n\
         mov $0x0a, %al\n  out %al, %dx\n1: jmp 1b",
        true,
    );
    let mut child = KillOnDrop(
        minivmm()
            .arg("run")
            .arg("--kernel")
            .arg(&k)
            .args(["--timeout", "60s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "up\n", "the guest did not start");
    signal(&child.0, 15);
    child.0.wait().unwrap().code()
}

/// Every exit status `minivmm --help` lists (and README's usage error and closed
/// stdout) is the status of a real run that ends that way.
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

    let o = output({
        let mut c = minivmm();
        c.arg("--help");
        c
    });
    assert_eq!(o.status.code(), Some(0));
    let h = stdout(&o);
    let table = h
        .split("Exit status of `minivmm run`:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("--help has no exit status table:\n{h}"));
    let listed: Vec<&str> = table
        .lines()
        .map_while(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        listed,
        ["0", "(v<<1)|1", "120", "122", "124", "125", "128+n"],
        "the statuses --help lists:\n{table}"
    );

    // README's: a usage error is 2; a closed stdout on `check` is 141.
    let o = output({
        let mut c = minivmm();
        c.args(["run", "--kernel", "/x", "--no-such-flag"]);
        c
    });
    assert_eq!(o.status.code(), Some(USAGE), "{}", stderr(&o));
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = minivmm()
        .arg("check")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
    let o = output({
        let mut c = minivmm();
        c.args(["run", "--kernel", "/nonexistent/vmlinux"]);
        c
    });
    assert_eq!(o.status.code(), Some(VMM_ERROR), "125: {}", stderr(&o));
    if !kvm_or_skip("help_explains_exit_statuses") {
        return;
    }

    let d = scratch("exit_statuses");
    for status in listed {
        let (got, want) = match status {
            // Reset through the i8042 (pulse the CPU reset line).
            "0" => (
                run_guest(
                    &d,
                    "reset",
                    "  mov $0xfe, %al\n  out %al, $0x64\n1: jmp 1b",
                    &[],
                ),
                0,
            ),
            // isa-debug-exit with v = 5.
            "(v<<1)|1" => (
                run_guest(&d, "exit5", &hello_body("bye", 5, true), &[]),
                (5 << 1) | 1,
            ),
            // #DE with an empty IDT: #DF, then shutdown.
            "120" => (
                run_guest(
                    &d,
                    "fault",
                    "  lidt idt\n  xor %ecx, %ecx\n  div %ecx\nidt: .word 0\n .long 0",
                    &[],
                ),
                120,
            ),
            // Executing where no memory is: KVM cannot fetch, let alone emulate, the
            // instruction (an emulation failure, KVM_EXIT_INTERNAL_ERROR).
            "122" => (
                run_guest(&d, "nomem", "  mov $0xd0000000, %eax\n  jmp *%eax", &[]),
                122,
            ),
            "124" => (
                run_guest(&d, "spin", "1: jmp 1b", &["--timeout", "200ms"]),
                124,
            ),
            // A VM refused by the ledger: more memory than the local host has.
            "125" => (
                run_guest(&d, "big", &hello_body("x", 0, true), &["--memory", "1024G"]),
                125,
            ),
            "128+n" => (run_until_signalled(&d), 128 + 15),
            other => panic!("no case for the listed status {other}"),
        };
        assert_eq!(got, Some(want), "the status listed as {status}");
    }
}

/// A VM stopped at its timeout says where each vCPU stood: a guest that hangs
/// without a word is then found in its System.map, not guessed at.
#[test]
fn a_timeout_says_where_each_vcpu_was() {
    if !kvm_or_skip("a_timeout_says_where_each_vcpu_was") {
        return;
    }
    let d = scratch("timeout_where");
    let k = tiny_guest(&d, "spin", "1: jmp 1b", true);
    let o = output({
        let mut c = minivmm();
        c.arg("run")
            .arg("--kernel")
            .arg(&k)
            .args(["--serial", "none", "--timeout", "300ms"]);
        c
    });
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err
        .lines()
        .find(|l| l.contains("at the timeout, vCPU 0 was at rip=0x"))
        .unwrap_or_else(|| panic!("no position of vCPU 0: {err}"));
    // The guest spins with interrupts as the boot left them (off) and no exits.
    assert!(line.contains(" if=0 ") && line.contains("after "), "{line}");
}
