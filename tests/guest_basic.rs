//! The tiny guests hello, fault and spin under minivmm: exit codes through
//! isa-debug-exit on both entry paths, QEMU compatibility, triple fault, timeout.

mod common;
mod guest_support;

use guest_support::*;

#[test]
fn hello_exit_codes_both_entry_paths() {
    if !common::kvm_or_skip("hello_exit_codes_both_entry_paths") {
        return;
    }
    for (kernel, entry) in [("hello.elf", "pvh"), ("hello-64.elf", "64")] {
        for code in [0u32, 1, 3, 42, 127] {
            let cmdline = format!("exit={code}");
            let r = run_simple(kernel, &cmdline, 1, "64M");
            let status = ((code << 1) | 1) as i32;
            r.assert_end("debug-exit", status);
            assert_eq!(r.json["debug_exit_value"], code, "{}", r.ctx());
            r.assert_line(&format!("hello: hello world (entry {entry})"));
            r.assert_line(&format!("hello: cmdline \"{cmdline}\""));
            r.assert_line(&format!("hello: exit {code}"));
        }
    }
}

#[test]
fn hello_without_exit_on_the_cmdline_exits_0() {
    if !common::kvm_or_skip("hello_without_exit_on_the_cmdline_exits_0") {
        return;
    }
    for kernel in both("hello") {
        let r = run_simple(&kernel, "quiet", 1, "64M");
        r.assert_end("debug-exit", 1);
        r.assert_line("hello: exit 0");
    }
}

/// A test kernel written for QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04`
/// that reports success with 0x10 gives status 33 under minivmm, as under QEMU.
/// The same kernel runs under qemu-system-x86_64 too: without it that half skips
/// (a failure in CI or with MINIVMM_REQUIRE_QEMU=1, which scripts/test.sh sets).
#[test]
fn qemu_compatible_success_is_status_33() {
    if !common::kvm_or_skip("qemu_compatible_success_is_status_33") {
        return;
    }
    let r = run_simple("hello.elf", "exit=0x10", 1, "64M");
    r.assert_end("debug-exit", 33);
    r.assert_line("hello: exit 16");

    let dir = common::scratch("guest-qemu-compat");
    let console = dir.join("console.txt");
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,x-option-roms=off,rtc=off", "-enable-kvm"])
        .args(["-cpu", "host,-arch-capabilities", "-m", "64M", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(guest("hello.elf"))
        .args(["-append", "exit=0x10"])
        .stdin(std::process::Stdio::null())
        .output();
    match qemu {
        Err(e) => common::skip(
            "qemu_compatible_success_is_status_33 (QEMU half)",
            "MINIVMM_REQUIRE_QEMU",
            &format!("cannot run qemu-system-x86_64 ({e})"),
            "install Debian's qemu-system-x86 (apt-get install qemu-system-x86; scripts/test.sh does)",
        ),
        Ok(o) => {
            assert_eq!(
                o.status.code(),
                Some(33),
                "QEMU: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(std::fs::read_to_string(&console).unwrap(), r.console);
        }
    }
}

#[test]
fn fault_triple_faults() {
    if !common::kvm_or_skip("fault_triple_faults") {
        return;
    }
    for kernel in both("fault") {
        let r = run_simple(&kernel, "", 1, "64M");
        r.assert_end("triple-fault", 120);
        r.assert_line("fault: triple-faulting now (empty IDT, ud2)");
    }
}

#[test]
fn spin_runs_into_the_timeout() {
    if !common::kvm_or_skip("spin_runs_into_the_timeout") {
        return;
    }
    for kernel in both("spin") {
        for mode in ["busy", "hlt"] {
            let cmdline = if mode == "hlt" { "mode=hlt" } else { "" };
            let r = run(&kernel, cmdline, 1, "64M", "1s", Input::None);
            r.assert_end("timeout", 124);
            r.assert_line(&format!("spin: spinning (mode {mode})"));
        }
    }
}
