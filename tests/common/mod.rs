//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A ledger file of its own for one minivmm invocation, so that tests running side
/// by side do not count against each other's admission on this host, and none
/// touches the user's default pool.
pub fn private_pool() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let pools = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pools");
    std::fs::create_dir_all(&pools).unwrap();
    pools.join(format!(
        "{}-{}.db",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The minivmm binary cargo built for these tests, with a [`private_pool`].
pub fn minivmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.stdin(Stdio::null()).env("MINIVMM_POOL", private_pool());
    c
}

/// True when /dev/kvm can be used. When it cannot, prints a loud SKIP line; when
/// MINIVMM_REQUIRE_KVM=1 (CI sets it), panics instead, so a CI runner without KVM
/// fails rather than passing on skipped tests.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("MINIVMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable but MINIVMM_REQUIRE_KVM=1");
        }
        eprintln!(
            "\n*** SKIP {test}: /dev/kvm is missing or not usable; this test needs KVM ***\n"
        );
    }
    ok
}

/// Runs a command to completion and returns its output.
pub fn output(mut c: Command) -> Output {
    c.output().expect("cannot run minivmm")
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A fresh scratch directory under target/ for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds a tiny x86-64 guest from assembly with the system toolchain: `pvh` adds a
/// Xen PVH note so it is entered in 32-bit mode. Returns the ELF's path.
pub fn tiny_guest(dir: &Path, name: &str, body: &str, pvh: bool) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let note = if pvh {
        ".section .note.Xen, \"a\"\n.align 4\n.long 4, 4, 18\n.asciz \"Xen\"\n.align 4\n.long _start\n"
    } else {
        ""
    };
    let mode = if pvh { ".code32" } else { ".code64" };
    std::fs::write(
        &src,
        format!("{note}.text\n{mode}\n.globl _start\n_start:\n{body}\n"),
    )
    .unwrap();
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let ok = Command::new("gcc")
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .unwrap()
        .success()
        && Command::new("ld")
            .args(["-static", "-nostdlib", "-Ttext=0x100000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .unwrap()
            .success();
    assert!(ok, "cannot assemble the test guest {name}");
    elf
}

/// Assembly that prints `msg` on COM1 and writes `code` to isa-debug-exit.
pub fn hello_body(msg: &str, code: u32, pvh: bool) -> String {
    let lea = if pvh {
        "mov $msg, %esi"
    } else {
        "lea msg(%rip), %rsi"
    };
    format!(
        "  mov $0x3f8, %dx\n  {lea}\n1: lodsb\n  test %al, %al\n  jz 2f\n  out %al, %dx\n  jmp 1b\n\
         2: mov $0xf4, %dx\n  mov ${code}, %eax\n  out %eax, %dx\n  hlt\nmsg: .asciz \"{msg}\\n\"\n"
    )
}
pub mod linux;
