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

/// True when this run is CI's: `CI=true` (or `1`), as CI services set it. There every
/// skip is a failure: a prerequisite missing on a runner must be fixed, not hidden.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The file every skip is recorded in, one line `test: why` per skip: `$MINIVMM_SKIP_LOG`
/// if set, else `skips.log` in cargo's target/tmp. scripts/test.sh empties it before
/// `cargo test` and prints it afterwards, since cargo hides a passing test's stderr.
pub fn skip_log() -> PathBuf {
    match std::env::var_os("MINIVMM_SKIP_LOG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_TARGET_TMPDIR")).join("skips.log"),
    }
}

/// The one way a test (or part of one) skips because a prerequisite is missing: `why`
/// says what is missing, `fix` how to provide it, `require` names the switch (e.g.
/// `MINIVMM_REQUIRE_KVM`) that, set to 1, forbids this skip.
///
/// With `CI=true` or `require`=1 this panics with the reason and the fix, so the test
/// fails. Otherwise it prints a loud SKIP line on stderr and appends `test: why` to
/// [`skip_log`], for the run's summary; the caller then returns (or leaves out its
/// part). Test binaries run in parallel, so the line goes out in one `O_APPEND` write.
pub fn skip(test: &str, require: &str, why: &str, fix: &str) {
    let why = why.replace('\n', " ");
    if in_ci() {
        panic!("{test}: {why} — a skip is a failure with CI=true. Fix: {fix}");
    }
    if std::env::var(require).as_deref() == Ok("1") {
        panic!("{test}: {why} — a skip is a failure with {require}=1. Fix: {fix}");
    }
    eprintln!("\n*** SKIP {test}: {why}. Fix: {fix} ***\n");
    let log = skip_log();
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let line = format!("{test}: {why}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| {
            use std::io::Write;
            f.write(line.as_bytes())
        });
    match written {
        Ok(n) if n == line.len() => {}
        Ok(n) => panic!(
            "{test}: skip record cut short ({n} bytes) in {}",
            log.display()
        ),
        // An unrecorded skip would be invisible again: fail instead.
        Err(e) => panic!("{test}: cannot record the skip in {}: {e}", log.display()),
    }
}

/// True when /dev/kvm can be opened read-write. When it cannot, [`skip`]s (a failure in
/// CI or with MINIVMM_REQUIRE_KVM=1, which .ci/run sets) and returns false.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(
                test,
                "MINIVMM_REQUIRE_KVM",
                &format!("this test needs KVM and /dev/kvm cannot be opened read-write ({e})"),
                "run on a host with KVM (modprobe kvm_intel or kvm_amd), as root or in the kvm group; `minivmm check` says what is missing",
            );
            false
        }
    }
}

/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
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

/// Waits for `child` at most `limit`; kills it and returns None if it is still
/// running then. The limit only turns a hang into a failure: a passing run ends long
/// before it.
pub fn wait_or_kill(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st.code().unwrap_or(-1));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) and reaped on drop, so a failing assertion leaves
/// no VM running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends signal `sig` to `child` with kill(2).
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Every allocation of `pool`, from `minivmm pool --pool POOL --json allocations`.
pub fn allocations(pool: &Path) -> Vec<serde_json::Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["pool", "--json", "--pool"])
        .arg(pool)
        .arg("allocations")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run minivmm pool allocations");
    assert!(o.status.success(), "pool allocations: {}", stderr(&o));
    let out = stdout(&o);
    match serde_json::from_str(out.trim()) {
        Ok(serde_json::Value::Array(a)) => a,
        other => panic!("pool allocations printed {out:?}: {other:?}"),
    }
}

/// Waits until `pool` holds an allocation for VM `name` and returns it; panics if
/// `child` ends first, or after `limit` (which only turns a hang into a failure).
pub fn wait_for_allocation(
    pool: &Path,
    name: &str,
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        if let Some(a) = allocations(pool).into_iter().find(|a| a["vm_name"] == name) {
            return a;
        }
        if let Some(st) = child.try_wait().expect("wait") {
            panic!(
                "minivmm ended ({st}) before claiming {name} in {}",
                pool.display()
            );
        }
        assert!(
            start.elapsed() < limit,
            "no allocation for {name} after {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Assembly (PVH entry: 32-bit protected mode, paging off) of a guest that keeps every
/// vCPU busy: the BSP software-enables its local APIC, sends INIT and then two
/// start-up IPIs to all other processors (ICR destination shorthand "all excluding
/// self", SDM Vol. 3A §11.6.1), whose real-mode entry at 0x10000 is `jmp .`, and
/// spins itself.
pub const BUSY_SMP_GUEST: &str = "  movl $0xfeeb, 0x10000\n\
  orl $0x100, 0xfee000f0\n\
  movl $0, 0xfee00310\n\
  movl $0x000c4500, 0xfee00300\n\
  mov $200000, %ecx\n1: dec %ecx\n  jnz 1b\n\
  movl $0x000c4610, 0xfee00300\n\
  mov $20000, %ecx\n2: dec %ecx\n  jnz 2b\n\
  movl $0x000c4610, 0xfee00300\n\
3: jmp 3b\n";

/// Builds [`BUSY_SMP_GUEST`] in `dir`; returns the ELF's path.
pub fn busy_smp_guest(dir: &Path) -> PathBuf {
    tiny_guest(dir, "busy-smp", BUSY_SMP_GUEST, true)
}

/// What each thread of process `pid` is doing, from /proc: name, state, the kernel
/// function it waits in, and (readable by root) its kernel stack. For reports of
/// a minivmm that did not end when it should have.
pub fn threads_report(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state is the first field after the parenthesised name.
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|r| r.split(' ').next())
            .unwrap_or("?");
        out.push_str(&format!(
            "thread {} {:?} state {state} wchan {}\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

/// `text` with every line quoted as "| LINE": a guest kernel's console in a failure
/// report must not look like the test host's own kernel log (the nested bed stops
/// its outer VM on a "[ secs ] BUG:" or RCU-stall line at the start of a line).
pub fn quoted(text: &str) -> String {
    text.lines()
        .map(|l| format!("| {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Pids of the `minivmm run` processes whose command line names `needle` (a pool, a
/// state directory): an agent's VM processes, found in /proc.
pub fn run_processes_naming(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(" run ") && cmd.contains(needle)
        })
        .collect()
}
