//! The VMM core on real KVM with small guests assembled here: both entry protocols,
//! every way a VM ends, serial to a file, JSON, large and SMP VMs, and no leaks.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Runs `minivmm run --kernel K ARGS...` to completion.
fn run_kernel(kernel: &std::path::Path, args: &[&str]) -> std::process::Output {
    output({
        let mut c = minivmm();
        c.arg("run").arg("--kernel").arg(kernel).args(args);
        c
    })
}

fn json(o: &std::process::Output) -> serde_json::Value {
    let s = stdout(o);
    serde_json::from_str(s.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"))
}

#[test]
fn debug_exit_status_both_entry_protocols() {
    if !kvm_or_skip("debug_exit_status_both_entry_protocols") {
        return;
    }
    let d = scratch("debug_exit");
    for (pvh, code, status) in [
        (true, 0, 1),
        (true, 3, 7),
        (false, 0x10, 33),
        (false, 5, 11),
    ] {
        let k = tiny_guest(
            &d,
            &format!("h{pvh}{code}"),
            &hello_body("hello guest", code, pvh),
            pvh,
        );
        let console = d.join("console.txt");
        let o = output({
            let mut c = minivmm();
            c.arg("run")
                .arg("--kernel")
                .arg(&k)
                .arg("--serial-out")
                .arg(&console)
                .args(["--json", "--timeout", "20s"]);
            c
        });
        assert_eq!(
            o.status.code(),
            Some(status),
            "pvh={pvh} code={code}: {}",
            stderr(&o)
        );
        assert_eq!(std::fs::read_to_string(&console).unwrap(), "hello guest\n");
        let j = json(&o);
        assert_eq!(j["reason"], "debug-exit");
        assert_eq!(j["exit_code"], status);
        assert_eq!(j["debug_exit_value"], code);
        assert_eq!(j["kernel_format"], if pvh { "elf-pvh" } else { "elf64" });
        assert!(j["first_output_ms"].as_f64().unwrap() > 0.0);
        // Where the wall time went: building, running and tearing down the VM.
        let part = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("no {k} in {j}"));
        assert!(part("build_ms") > 0.0 && part("run_ms") > 0.0);
        // Measured (closing the VM's descriptors takes time), and within the wall time.
        let teardown = part("teardown_ms");
        assert!(
            teardown.is_finite() && teardown > 0.0 && teardown <= part("wall_ms"),
            "teardown_ms {teardown} in {j}"
        );
        assert!(part("build_ms") + part("run_ms") + part("teardown_ms") <= part("wall_ms"));
        // hello_body writes THR without looking at LSR: KVM keeps each byte in its
        // coalesced ring (no exit) and minivmm applies them at the debug-exit, the
        // one OUT that exits.
        assert_eq!(
            j["console_coalesced_writes"], 12,
            "KVM_CAP_COALESCED_PIO (Linux 5.0+) missing or unused: {j}"
        );
        assert_eq!(j["exits"]["io-out"], 1, "{j}");
    }
}

/// A guest that writes the console and never touches the UART again (no LSR poll,
/// no exit of any kind: it spins) still gets its bytes out while it runs: the
/// coalesced ring is drained on a tick, not only when the guest comes back.
#[test]
fn coalesced_console_bytes_arrive_while_the_guest_spins() {
    if !kvm_or_skip("coalesced_console_bytes_arrive_while_the_guest_spins") {
        return;
    }
    let d = scratch("coalesced_tick");
    let body = hello_body("late bytes", 0, true).replace("2: mov $0xf4", "2: jmp 2b\n mov $0xf4");
    let k = tiny_guest(&d, "spinner", &body, true);
    let console = d.join("console.txt");
    let mut child = minivmm()
        .args([
            "run",
            "--no-ledger",
            "--json",
            "--timeout",
            "20s",
            "--kernel",
        ])
        .arg(&k)
        .arg("--serial-out")
        .arg(&console)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen = String::new();
    while t0.elapsed() < Duration::from_secs(15) && !seen.contains("late bytes\n") {
        std::thread::sleep(Duration::from_millis(50));
        seen = std::fs::read_to_string(&console).unwrap_or_default();
    }
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    assert_eq!(seen, "late bytes\n", "{}", stderr(&o));
    assert!(
        running,
        "the VM ended before its output came: {}",
        stderr(&o)
    );
}

#[test]
fn timeout_stops_a_spinning_guest_with_124() {
    if !kvm_or_skip("timeout_stops_a_spinning_guest_with_124") {
        return;
    }
    let d = scratch("timeout");
    for (name, body) in [("busy", "1: jmp 1b"), ("halted", "cli\n1: hlt\n jmp 1b")] {
        let k = tiny_guest(&d, name, body, true);
        let t0 = Instant::now();
        let o = run_kernel(&k, &["--vcpus", "2", "--timeout", "500ms", "--json"]);
        assert_eq!(o.status.code(), Some(124), "{name}: {}", stderr(&o));
        assert_eq!(json(&o)["reason"], "timeout");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name}: stopping took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn triple_fault_and_i8042_reset() {
    if !kvm_or_skip("triple_fault_and_i8042_reset") {
        return;
    }
    let d = scratch("ends");
    // Loading an IDT with limit 0 and dividing by zero: #DE → #DF → shutdown.
    let fault = tiny_guest(
        &d,
        "fault",
        "  lidt idt\n  xor %ecx, %ecx\n  div %ecx\nidt: .word 0\n .long 0",
        true,
    );
    let o = run_kernel(&fault, &["--json", "--timeout", "20s"]);
    assert_eq!(o.status.code(), Some(120), "{}", stderr(&o));
    assert_eq!(json(&o)["reason"], "triple-fault");

    let reset = tiny_guest(
        &d,
        "reset",
        "  mov $0xfe, %al\n  out %al, $0x64\n1: jmp 1b",
        true,
    );
    let o = run_kernel(&reset, &["--json", "--timeout", "20s"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["reason"], "reset");
}

#[test]
fn unknown_ports_read_all_ones() {
    if !kvm_or_skip("unknown_ports_read_all_ones") {
        return;
    }
    let d = scratch("ports");
    // Read port 0x1234; exit with the value read (0xff expected → status 0xff<<1|1 & 0xff).
    let k = tiny_guest(
        &d,
        "ports",
        "  mov $0x1234, %dx\n  in %dx, %al\n  out %al, $0x99\n  movzbl %al, %eax\n  out %eax, $0xf4",
        true,
    );
    let o = run_kernel(&k, &["--json", "--timeout", "20s"]);
    assert_eq!(json(&o)["debug_exit_value"], 0xff, "{}", stderr(&o));
}

/// Emulation failures (here: `int3`, which PVM cannot emulate; on hardware KVM the
/// guest instead takes #BP with no IDT and triple-faults) end with a report, never a
/// hang.
#[test]
fn guest_failure_is_reported_with_registers() {
    if !kvm_or_skip("guest_failure_is_reported_with_registers") {
        return;
    }
    let d = scratch("failure");
    let k = tiny_guest(
        &d,
        "int3",
        "  mov $0x1234, %eax\n  lidt idt\n  int3\nidt: .word 0\n .long 0",
        true,
    );
    let o = run_kernel(&k, &["--json", "--timeout", "20s"]);
    let j = json(&o);
    match j["reason"].as_str().unwrap() {
        "error" => {
            assert_eq!(o.status.code(), Some(122));
            let err = stderr(&o);
            assert!(
                err.contains("rip=") && err.contains("rax=0x0000000000001234"),
                "{err}"
            );
            assert!(
                err.contains("code at RIP: [cc"),
                "the report shows the int3 opcode: {err}"
            );
        }
        "triple-fault" => assert_eq!(o.status.code(), Some(120)),
        other => panic!("unexpected end {other}: {}", stderr(&o)),
    }
}

/// Big guests are not prefaulted: a 16 GiB VM costs little resident memory. Not about
/// admission, so `--no-ledger`: it must run on a host with less RAM than that too.
#[test]
fn large_memory_is_lazy() {
    let test = "large_memory_is_lazy";
    if !kvm_or_skip(test) {
        return;
    }
    if !std::path::Path::new("/usr/bin/time").exists() {
        skip(
            test,
            "MINIVMM_REQUIRE_KVM",
            "/usr/bin/time (GNU time) is missing; it measures minivmm's peak RSS",
            "apt-get install time (scripts/test.sh installs it)",
        );
        return;
    }
    let d = scratch("large_memory");
    let k = tiny_guest(&d, "hello", &hello_body("big", 0, false), false);
    for mem in ["5G", "16G"] {
        let mut c = std::process::Command::new("/usr/bin/time");
        c.args([
            "-f",
            "maxrss_kib=%M",
            env!("CARGO_BIN_EXE_minivmm"),
            "run",
            "--kernel",
        ])
        .arg(&k)
        .args(["--memory", mem, "--no-ledger", "--json", "--timeout", "20s"])
        .env("MINIVMM_POOL", private_pool())
        .stdin(std::process::Stdio::null());
        let o = c.output().expect("cannot run /usr/bin/time");
        assert_eq!(o.status.code(), Some(1), "{mem}: {}", stderr(&o));
        let err = stderr(&o);
        let rss: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("maxrss_kib="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no maxrss in {err}"));
        assert!(rss < 64 * 1024, "{mem} guest used {rss} KiB RSS");
    }
}

/// SIGTERM to minivmm stops the VM cleanly with status 128+15.
#[test]
fn sigterm_stops_cleanly() {
    if !kvm_or_skip("sigterm_stops_cleanly") {
        return;
    }
    let d = scratch("sigterm");
    let k = tiny_guest(&d, "spin", "1: jmp 1b", true);
    let child = minivmm()
        .arg("run")
        .arg("--kernel")
        .arg(&k)
        .args(["--vcpus", "2", "--json", "--timeout", "60s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Signal only once a vCPU thread exists: by then minivmm has blocked SIGTERM for
    // its sigwait thread, so the default action (death) can no longer apply.
    let tasks = format!("/proc/{}/task", child.id());
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&tasks).map_or(0, |d| d.count()) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "vCPUs never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc_kill(child.id() as i32, 15) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143));
    assert_eq!(json(&o)["reason"], "stopped");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// --trace-exits logs each exit as it happens and a table of counts at the end.
#[test]
fn trace_exits_for_learners() {
    if !kvm_or_skip("trace_exits_for_learners") {
        return;
    }
    let d = scratch("trace");
    let k = tiny_guest(&d, "hello", &hello_body("ab", 4, true), true);
    let o = run_kernel(&k, &["--serial", "none", "--trace-exits"]);
    assert_eq!(o.status.code(), Some(9));
    let err = stderr(&o);
    assert!(
        err.contains("vcpu0 io-out port 0x03f8 size 1 <- [61]"),
        "{err}"
    );
    assert!(
        err.contains("vcpu0 io-out port 0x00f4 size 4 <- [04, 00, 00, 00]"),
        "{err}"
    );
    let row = err
        .lines()
        .find(|l| l.starts_with("io-out"))
        .expect("exit table");
    assert_eq!(
        row.split_whitespace().nth(1),
        Some("4"),
        "3 console bytes + 1 debug-exit: {row}"
    );
}

/// Standard input reaches the guest's UART receive FIFO: a guest that polls the line
/// status register echoes what it reads until it sees '.', then exits with the
/// number of bytes it echoed.
#[test]
fn stdin_reaches_the_guest() {
    if !kvm_or_skip("stdin_reaches_the_guest") {
        return;
    }
    let d = scratch("stdin");
    let body = "  xor %ecx, %ecx\n\
        1: mov $0x3fd, %dx\n  in %dx, %al\n  test $1, %al\n  jz 1b\n\
        mov $0x3f8, %dx\n  in %dx, %al\n  out %al, %dx\n  inc %ecx\n  cmp $0x2e, %al\n  jne 1b\n\
        mov %ecx, %eax\n  out %eax, $0xf4\n";
    let k = tiny_guest(&d, "echo", body, true);
    let mut child = minivmm()
        .arg("run")
        .arg("--kernel")
        .arg(&k)
        .args(["--timeout", "20s"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    // More than the UART's 64-byte FIFO holds, to exercise the back-pressure path.
    let input = format!("{}.", "minivmm echoes ".repeat(10));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(stdout(&o), input);
    assert_eq!(
        o.status.code(),
        Some(((input.len() as i32) << 1 | 1) & 0xff)
    );
}

/// Many more vCPUs than host cores: every vCPU thread is created, parked in
/// wait-for-SIPI, and stopped again when the BSP ends the VM.
#[test]
fn thirty_two_vcpus() {
    if !kvm_or_skip("thirty_two_vcpus") {
        return;
    }
    let d = scratch("vcpus32");
    let k = tiny_guest(&d, "hello", &hello_body("many", 6, false), false);
    let o = run_kernel(
        &k,
        &["--vcpus", "32", "--no-ledger", "--json", "--timeout", "20s"],
    );
    assert_eq!(o.status.code(), Some(13), "{}", stderr(&o));
    assert_eq!(json(&o)["vcpus"], 32);
}

/// --json-out writes the summary to a file and leaves stdout to the console.
#[test]
fn json_out_file_keeps_stdout_for_the_console() {
    if !kvm_or_skip("json_out_file_keeps_stdout_for_the_console") {
        return;
    }
    let d = scratch("json_out");
    let k = tiny_guest(&d, "hello", &hello_body("to stdout", 2, true), true);
    let summary = d.join("summary.json");
    let o = run_kernel(&k, &["--json-out", summary.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert_eq!(stdout(&o), "to stdout\n");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(j["reason"], "debug-exit");
    assert_eq!(j["exit_code"], 5);
}

/// A wrapper script's defaults can be overridden: the last --vcpus/--memory wins.
#[test]
fn later_flags_override_earlier_ones() {
    if !kvm_or_skip("later_flags_override_earlier_ones") {
        return;
    }
    let d = scratch("override");
    let k = tiny_guest(&d, "hello", &hello_body("x", 0, true), true);
    let o = run_kernel(
        &k,
        &[
            "--vcpus", "2", "--memory", "256M", "--vcpus", "3", "--memory", "64M", "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let j = json(&o);
    assert_eq!(
        (j["vcpus"].as_u64(), j["memory_mib"].as_u64()),
        (Some(3), Some(64))
    );
}

/// `Vm::start` returns while the guest runs: the handle says it is running, the
/// console can go to an in-memory ring, and a stop through the handle ends it.
#[test]
fn a_started_vm_is_watched_and_stopped_through_its_handle() {
    if !kvm_or_skip("a_started_vm_is_watched_and_stopped_through_its_handle") {
        return;
    }
    let echo = std::path::Path::new(env!("MINIVMM_GUEST_DIR")).join("echo.elf");
    let ring = minivmm::vmm::console::ConsoleRing::new(16);
    let mut c = minivmm::VmConfig::new(&echo);
    c.serial_out = minivmm::SerialOut::Writer(Box::new(ring.clone()));
    let handle = minivmm::Vm::new(c).unwrap().start().unwrap();
    // The echo guest prints its ready line, then polls its serial port for good.
    let t0 = std::time::Instant::now();
    while !String::from_utf8_lossy(&ring.contents()).contains("line)\n") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no ready line: {:?}",
            ring.contents()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(handle.state(), minivmm::VmState::Running);
    // Only the last 16 bytes are kept, and every byte is counted.
    let ready = "echo: ready (end with '.' at the start of a line)\n";
    assert_eq!(ring.contents(), ready.as_bytes()[ready.len() - 16..]);
    assert_eq!(ring.total(), ready.len() as u64);
    handle.stop(minivmm::StopReason::Requested);
    let o = handle.wait().unwrap();
    assert!(
        matches!(o.end, minivmm::End::Stopped(minivmm::StopReason::Requested)),
        "{:?}",
        o.end
    );
    assert_eq!(o.console_bytes, ready.len() as u64);
}
