//! What a hostile user, a broken pipe or a fuzzed file found (issue 16), one test per
//! defect: each failed before its fix.

use pool_util::common;
mod pool_util;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::wait_or_kill;
use pool_util::Scratch;

/// minivmm's status when stdout's reader left: 128 + SIGPIPE, what the shell reports
/// for any other program in the same place.
const READER_LEFT: i32 = 141;

/// Runs `cmd` with stdout a pipe whose read end is closed before the child starts, so
/// its first write meets EPIPE whatever the timing.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    cmd.stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run minivmm")
}

/// `minivmm ARGS... --pool POOL`, with a quiet log.
fn at(pool: &Path, args: &[&str]) -> Command {
    let mut c = pool_util::minivmm(pool, args[0]);
    c.args(&args[1..]);
    c
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

/// Asserts `o` ended with [`READER_LEFT`] and did not panic; returns its stderr.
fn quiet_end(what: &str, o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert_eq!(o.status.code(), Some(READER_LEFT), "{what}: stderr {err}");
    err
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let s = Scratch::new("closed-stdout");
    let pool = s.pool();
    pool_util::ok(
        &pool,
        &[
            "pool", "add-host", "h1", "--vcpus", "8", "--memory", "8G", "--disk", "100",
        ],
    );
    let held = json(&pool_util::ok(
        &pool,
        &[
            "pool", "--json", "claim", "h1", "--vcpus", "1", "--memory", "512",
        ],
    ))["id"]
        .as_i64()
        .expect("claim id");

    let mut check = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    check.arg("check");
    let mut check_json = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    check_json.args(["check", "--json"]);
    let other = s.dir.join("other.db");
    let read_only: Vec<(&str, Command)> = vec![
        ("check", check),
        ("check --json", check_json),
        ("pool status", at(&pool, &["pool", "status"])),
        (
            "pool --json status",
            at(&pool, &["pool", "--json", "status"]),
        ),
        ("pool list", at(&pool, &["pool", "list"])),
        ("pool allocations", at(&pool, &["pool", "allocations"])),
        ("pool gc", at(&pool, &["pool", "gc"])),
        ("pool init", at(&other, &["pool", "init"])),
        (
            "pool add-host",
            at(
                &other,
                &[
                    "pool", "add-host", "h2", "--vcpus", "2", "--memory", "1G", "--disk", "1",
                ],
            ),
        ),
        (
            "schedule --dry-run",
            at(
                &pool,
                &["schedule", "--vcpus", "1", "--memory", "256", "--dry-run"],
            ),
        ),
    ];
    for (what, cmd) in read_only {
        quiet_end(what, &with_closed_stdout(cmd));
    }
    // The host added with nobody reading is there all the same.
    assert!(pool_util::ok(&other, &["pool", "list"]).contains("h2"));

    // Commands that change the ledger finish their change, and say on stderr what
    // could not be printed: the user must be able to find a claim they hold.
    let before = json(&pool_util::ok(&pool, &["pool", "--json", "allocations"]));
    let before = before.as_array().expect("allocations").len();
    let err = quiet_end(
        "pool claim",
        &with_closed_stdout(at(
            &pool,
            &[
                "pool", "claim", "h1", "--vcpus", "1", "--memory", "256", "--name", "lost",
            ],
        )),
    );
    let err2 = quiet_end(
        "schedule",
        &with_closed_stdout(at(
            &pool,
            &[
                "schedule", "--vcpus", "1", "--memory", "256", "--name", "placed",
            ],
        )),
    );
    let after = json(&pool_util::ok(&pool, &["pool", "--json", "allocations"]));
    let after = after.as_array().expect("allocations").clone();
    assert_eq!(after.len(), before + 2, "both claims committed: {after:?}");
    for (name, err) in [("lost", &err), ("placed", &err2)] {
        let a = after
            .iter()
            .find(|a| a["vm_name"] == name)
            .unwrap_or_else(|| panic!("no allocation for {name}: {after:?}"));
        let id = a["id"].as_i64().expect("id");
        assert!(
            err.contains(&format!("allocation {id}")) && err.contains("pool release"),
            "stderr must name allocation {id} and how to release it: {err}"
        );
    }

    quiet_end(
        "pool release",
        &with_closed_stdout(at(&pool, &["pool", "release", &held.to_string()])),
    );
    let left = pool_util::ok(&pool, &["pool", "--json", "allocations"]);
    assert!(
        !json(&left)
            .as_array()
            .expect("allocations")
            .iter()
            .any(|a| a["id"] == held),
        "the release went through: {left}"
    );
}

/// A full disk behind stdout is an error (not a panic), said on stderr.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let s = Scratch::new("full-stdout");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let o = at(&s.pool(), &["pool", "list"])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .expect("run minivmm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(o.status.code(), Some(125), "stderr {err}");
    assert!(err.contains("standard output"), "stderr: {err}");
}

/// A guest that writes 'A' to COM1 forever.
fn chatty_guest(dir: &Path) -> std::path::PathBuf {
    common::tiny_guest(
        dir,
        "chatty",
        "  mov $0x3f8, %dx\n  mov $0x41, %al\n1: out %al, %dx\n  jmp 1b\n",
        false,
    )
}

/// A pipe of one page (the smallest Linux allows), for a console nobody reads: it fills
/// after 4 KiB, however slowly the guest writes on a loaded host.
fn small_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    use std::os::fd::AsRawFd;
    let (r, w) = std::io::pipe().expect("pipe");
    // SAFETY: F_SETPIPE_SZ only resizes the pipe behind the descriptor.
    let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert_eq!(size, 4096, "F_SETPIPE_SZ");
    (r, w)
}

/// Bytes waiting in the pipe behind `fd`.
fn queued(fd: &impl std::os::fd::AsRawFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD on the console pipe");
    n
}

/// True when a thread of process `pid` sleeps in a pipe write: the pipe is full and the
/// writer waits for a reader.
fn in_pipe_write(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write"))
    })
}

/// A console pipe nobody reads must not keep the VM, or its claim, alive: --timeout
/// ends it with 124 and the summary counts the bytes that could not be delivered.
#[test]
fn an_unread_console_does_not_defeat_the_timeout() {
    if !common::kvm_or_skip("an_unread_console_does_not_defeat_the_timeout") {
        return;
    }
    let s = Scratch::new("unread-console-timeout");
    let guest = chatty_guest(&s.dir);
    let summary = s.dir.join("summary.json");
    let errors = std::fs::File::create(s.dir.join("stderr")).unwrap();
    let (mut console, w) = small_pipe();
    let mut child = common::minivmm()
        .args(["run", "--no-pit", "--timeout", "2s", "--json-out"])
        .arg(&summary)
        .arg("--kernel")
        .arg(&guest)
        .stdout(w)
        .stderr(errors)
        .spawn()
        .expect("spawn minivmm");
    let code = wait_or_kill(&mut child, std::time::Duration::from_secs(30));
    let err = std::fs::read_to_string(s.dir.join("stderr")).unwrap_or_default();
    assert_eq!(
        code,
        Some(124),
        "still running 28 s after its timeout: {err}"
    );
    let j = json(&std::fs::read_to_string(&summary).expect("summary written"));
    assert_eq!(j["reason"], "timeout", "{j}");
    let dropped = j["console_dropped_bytes"]
        .as_u64()
        .expect("console_dropped_bytes");
    let written = j["console_bytes"].as_u64().expect("console_bytes");
    let mut delivered = Vec::new();
    std::io::Read::read_to_end(&mut console, &mut delivered).expect("read the pipe");
    let delivered = delivered.len() as u64;
    // A write blocked half-way when the VM ended counts as dropped whole: the sum may
    // exceed what the guest wrote by less than one write (64 KiB), never fall short.
    assert!(
        delivered <= 4096
            && delivered + dropped >= written
            && delivered + dropped < written + (64 << 10),
        "wrote {written}, delivered {delivered}, counted {dropped} dropped"
    );
    assert!(written > 4096, "the guest filled the pipe: {j}");
}

/// SIGTERM stops a VM whose console pipe is full (143, as for any VM).
#[test]
fn an_unread_console_does_not_defeat_sigterm() {
    if !common::kvm_or_skip("an_unread_console_does_not_defeat_sigterm") {
        return;
    }
    let s = Scratch::new("unread-console-term");
    let guest = chatty_guest(&s.dir);
    let errors = std::fs::File::create(s.dir.join("stderr")).unwrap();
    let (console, w) = small_pipe();
    let mut child = common::minivmm()
        .args(["run", "--no-pit", "--kernel"])
        .arg(&guest)
        .stdout(w)
        .stderr(errors)
        .spawn()
        .expect("spawn minivmm");
    // A full pipe proves the guest runs, so the signal thread is in place, and is the
    // state that used to hang: some thread of minivmm then sleeps in pipe_write. Where
    // /proc does not show that, a pipe that stopped filling for a second will do.
    let start = std::time::Instant::now();
    let mut last = (0, start);
    loop {
        let queued = queued(&console);
        if queued != last.0 {
            last = (queued, std::time::Instant::now());
        }
        if queued > 0
            && (in_pipe_write(child.id()) || last.1.elapsed() > std::time::Duration::from_secs(1))
        {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30)
                && child.try_wait().expect("wait").is_none(),
            "minivmm never blocked on its console pipe"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let code = wait_or_kill(&mut child, std::time::Duration::from_secs(30));
    let err = std::fs::read_to_string(s.dir.join("stderr")).unwrap_or_default();
    assert_eq!(code, Some(143), "SIGTERM did not stop it: {err}");
    drop(console);
}

/// Makes a FIFO (named pipe) at `path`.
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `minivmm run ARGS...`, which must fail with 125 naming `needle`, before the VM
/// runs and without hanging.
fn refused(test: &str, args: &[&std::ffi::OsStr], needles: &[&str]) {
    let s = Scratch::new(test);
    let errors = std::fs::File::create(s.dir.join("stderr")).unwrap();
    let mut child = common::minivmm()
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(errors)
        .spawn()
        .expect("spawn minivmm");
    let code = wait_or_kill(&mut child, std::time::Duration::from_secs(30));
    let err = std::fs::read_to_string(s.dir.join("stderr")).unwrap_or_default();
    assert_eq!(
        code,
        Some(125),
        "{test}: {args:?} (None: killed after 30 s): {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{test}: expected {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{test}: {err}");
}

/// A kernel or initrd that is not a regular file (a FIFO would block the open, a
/// device has no size) is refused by name with the fix, before anything is read.
#[test]
fn kernels_and_initrds_must_be_regular_files() {
    let s = Scratch::new("not-regular");
    let fifo = s.dir.join("kernel.fifo");
    mkfifo(&fifo);
    let hello = Path::new(env!("MINIVMM_GUEST_DIR")).join("hello.elf");
    let fifo_msg = format!("{}: it is a FIFO", fifo.display());
    refused(
        "fifo-kernel",
        &["--kernel".as_ref(), fifo.as_ref()],
        &[&fifo_msg, "not a regular file"],
    );
    refused(
        "fifo-initrd",
        &[
            "--kernel".as_ref(),
            hello.as_ref(),
            "--initrd".as_ref(),
            fifo.as_ref(),
        ],
        &[&format!("cannot read initrd {fifo_msg}")],
    );
    refused(
        "device-initrd",
        &[
            "--kernel".as_ref(),
            hello.as_ref(),
            "--initrd".as_ref(),
            "/dev/zero".as_ref(),
        ],
        &["cannot read initrd /dev/zero: it is a character device"],
    );
    refused(
        "directory-kernel",
        &["--kernel".as_ref(), "/".as_ref()],
        &["cannot read kernel /: it is a directory"],
    );
}

/// --serial-out and --json-out on a FIFO nobody reads are refused at once (an open for
/// writing would wait for a reader, with signals blocked); with a reader they work.
#[test]
fn output_fifos_without_a_reader_are_refused() {
    let s = Scratch::new("output-fifo");
    let fifo = s.dir.join("out.fifo");
    mkfifo(&fifo);
    let hello = Path::new(env!("MINIVMM_GUEST_DIR")).join("hello.elf");
    for flag in ["--serial-out", "--json-out"] {
        refused(
            flag.trim_start_matches('-'),
            &[
                "--kernel".as_ref(),
                hello.as_ref(),
                flag.as_ref(),
                fifo.as_ref(),
            ],
            &[
                &fifo.display().to_string(),
                "no process has it open for reading",
            ],
        );
    }
    if !common::kvm_or_skip("output_fifos_without_a_reader_are_refused") {
        return;
    }
    // With a reader, a FIFO is a fine console.
    use std::os::unix::fs::OpenOptionsExt;
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO's read end");
    let mut child = common::minivmm()
        .args(["run", "--no-pit", "--cmdline", "exit=3", "--serial-out"])
        .arg(&fifo)
        .arg("--kernel")
        .arg(&hello)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn minivmm");
    let code = wait_or_kill(&mut child, std::time::Duration::from_secs(30));
    assert_eq!(code, Some(7), "hello exits 3: status 7");
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut text);
    assert!(
        text.contains("hello: exit 3"),
        "console through the FIFO: {text:?}"
    );
}

/// Runs `minivmm ARGS...` in `dir` with `env` set, and returns its output.
fn in_dir(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.current_dir(dir)
        .env_remove("MINIVMM_POOL")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null());
    c.output().expect("run minivmm")
}

fn succeeded(what: &str, o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what}: {:?} {err}", o.status);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A bare file name is a pool in the current directory, from every way of naming one.
#[test]
fn relative_pool_paths_work() {
    let s = Scratch::new("relative-pool");
    let d = &s.dir;
    let out = succeeded(
        "pool --pool p.db init",
        &in_dir(d, &[], &["pool", "--pool", "p.db", "init"]),
    );
    assert!(out.contains("registered this machine"), "{out}");
    succeeded(
        "MINIVMM_POOL=q.db pool init",
        &in_dir(d, &[("MINIVMM_POOL", "q.db")], &["pool", "init"]),
    );
    succeeded(
        "pool --pool sub/r.db init",
        &in_dir(d, &[], &["pool", "--pool", "sub/r.db", "init"]),
    );
    for p in ["p.db", "q.db", "sub/r.db"] {
        let list = pool_util::ok(&d.join(p), &["pool", "--json", "list"]);
        assert_eq!(json(&list).as_array().map(Vec::len), Some(1), "{p}: {list}");
    }
    if !common::kvm_or_skip("relative_pool_paths_work") {
        return;
    }
    let hello = Path::new(env!("MINIVMM_GUEST_DIR")).join("hello.elf");
    let o = in_dir(
        d,
        &[],
        &[
            "run",
            "--pool",
            "v.db",
            "--no-pit",
            "--serial",
            "none",
            "--cmdline",
            "exit=3",
            "--kernel",
            hello.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "run --pool v.db: {err}");
    let list = pool_util::ok(&d.join("v.db"), &["pool", "--json", "list"]);
    assert_eq!(json(&list).as_array().map(Vec::len), Some(1), "{list}");
}

/// A command that fails leaves no pool file behind that it created; one that was
/// there stays.
#[test]
fn a_failed_command_leaves_no_new_pool() {
    let s = Scratch::new("no-new-pool");
    let d = &s.dir;
    let gone = |name: &str| {
        for suffix in ["", "-wal", "-shm"] {
            let p = d.join(format!("{name}{suffix}"));
            assert!(!p.exists(), "{} was left behind", p.display());
        }
    };
    let o = in_dir(d, &[], &["pool", "--pool", "a.db", "release", "5"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    gone("a.db");
    let o = in_dir(
        d,
        &[],
        &[
            "schedule", "--pool", "b.db", "--vcpus", "1", "--memory", "1G",
        ],
    );
    assert!(!o.status.success(), "{o:?}");
    gone("b.db");
    let o = in_dir(
        d,
        &[("MINIVMM_POOL", "c.db")],
        &["pool", "claim", "nohost", "--vcpus", "1", "--memory", "1G"],
    );
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    gone("c.db");
    // An existing pool, empty or not, is never removed.
    succeeded(
        "pool list",
        &in_dir(d, &[], &["pool", "--pool", "e.db", "list"]),
    );
    let o = in_dir(d, &[], &["pool", "--pool", "e.db", "release", "5"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(d.join("e.db").exists(), "an existing pool was removed");
}

/// A 64-bit ELF kernel of one PT_LOAD segment at 1 MiB whose code writes 0x10 to
/// isa-debug-exit (status 33), claiming `memsz` bytes of memory.
fn elf_claiming(memsz: u64) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_AT: u64 = 64 + 56;
    // mov $0xf4, %dx; mov $0x10, %eax; out %eax, %dx; hlt
    let code = [0x66, 0xba, 0xf4, 0x00, 0xb8, 0x10, 0, 0, 0, 0xef, 0xf4];
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(LOAD + CODE_AT).to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&half.to_le_bytes());
    }
    let filesz = CODE_AT + code.len() as u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
    for word in [0, LOAD, LOAD, filesz, memsz, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.extend_from_slice(&code);
    assert_eq!(f.len() as u64, filesz);
    f
}

/// An ELF whose segment ends at 2^64 - 1 used to make the initrd's lower bound wrap
/// to 0 (a debug build panicked) and the VM ran; it is refused, with or without an
/// initrd, and says why.
#[test]
fn an_elf_ending_at_the_top_of_the_address_space_is_refused() {
    if !common::kvm_or_skip("an_elf_ending_at_the_top_of_the_address_space_is_refused") {
        return;
    }
    let s = Scratch::new("elf-end");
    let sane = s.dir.join("sane.elf");
    std::fs::write(&sane, elf_claiming(0x1000)).unwrap();
    let o = common::output({
        let mut c = common::minivmm();
        c.args(["run", "--no-pit", "--serial", "none", "--kernel"])
            .arg(&sane);
        c
    });
    assert_eq!(
        o.status.code(),
        Some(33),
        "the crafted ELF itself runs: {o:?}"
    );

    let top = s.dir.join("top.elf");
    std::fs::write(&top, elf_claiming(u64::MAX - 0x10_0000)).unwrap();
    let initrd = s.dir.join("initrd");
    std::fs::write(&initrd, [0u8; 4096]).unwrap();
    let top_msg = format!("{} ends at 0xffffffffffffffff", top.display());
    refused(
        "elf-end-initrd",
        &[
            "--kernel".as_ref(),
            top.as_ref(),
            "--initrd".as_ref(),
            initrd.as_ref(),
        ],
        &[&top_msg, "beyond the VM's RAM"],
    );
    refused(
        "elf-end",
        &["--kernel".as_ref(), top.as_ref()],
        &[&top_msg, "beyond the VM's RAM"],
    );
}

/// A guest that asks 100,000 times for a sleep state minivmm does not have (S3
/// through the ACPI sleep control register) used to get a warning each time: 15.7 MB
/// of log in 1.3 s. Guest-triggered warnings are rate-limited per call site: the log
/// stays small, and says that lines were suppressed.
#[test]
fn a_guest_cannot_flood_the_log() {
    if !common::kvm_or_skip("a_guest_cannot_flood_the_log") {
        return;
    }
    let s = Scratch::new("log-flood");
    // SLEEP_CONTROL_REG (0x606): SLP_TYP 3 in bits 2-4, SLP_EN (bit 5); then
    // isa-debug-exit 0x10 (status 33).
    let guest = common::tiny_guest(
        &s.dir,
        "sleepy",
        "  mov $0x606, %dx\n  mov $0x2c, %al\n  mov $100000, %ecx\n\
         1: out %al, %dx\n  dec %ecx\n  jnz 1b\n\
         mov $0xf4, %dx\n  mov $0x10, %eax\n  out %eax, %dx\n  hlt\n",
        false,
    );
    let err_path = s.dir.join("stderr");
    let errors = std::fs::File::create(&err_path).unwrap();
    let mut child = common::minivmm()
        .args([
            "run",
            "--no-ledger",
            "--no-pit",
            "--serial",
            "none",
            "--kernel",
        ])
        .arg(&guest)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(errors)
        .spawn()
        .expect("spawn minivmm");
    let code = wait_or_kill(&mut child, std::time::Duration::from_secs(120));
    let log = std::fs::read(&err_path).unwrap_or_default();
    let text = String::from_utf8_lossy(&log);
    let head: String = text.chars().take(2000).collect();
    assert_eq!(
        code,
        Some(33),
        "the guest wrote 100,000 times and left: {head}"
    );
    assert!(
        log.len() < 64 << 10,
        "{} bytes of log for one guest: {head}",
        log.len()
    );
    assert!(text.contains("sleep type 3"), "the warning itself: {text}");
    assert!(text.contains("suppressing similar messages"), "{text}");
}

/// `minivmm run` of the spinning guest named `name` on `pool`, its stderr in `err`;
/// it runs until signalled (the timeout only bounds a test that went wrong).
fn spinning_vm(pool: &Path, name: &str, err: &Path) -> common::KillOnDrop {
    let spin = Path::new(env!("MINIVMM_GUEST_DIR")).join("spin.elf");
    let child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["run", "--no-pit", "--serial", "none", "--timeout", "120s"])
        .args(["--vcpus", "2", "--memory", "64M", "--name", name, "--pool"])
        .arg(pool)
        .arg("--kernel")
        .arg(spin)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err).expect("stderr file"))
        .spawn()
        .expect("spawn minivmm");
    common::KillOnDrop(child)
}

/// Initialises the pool in `s`, starts [`spinning_vm`] named `name` on it (stderr
/// in `s.dir/stderr`) and waits for its claim; returns the VM, the stderr file and
/// the claim.
fn vm_holding_a_claim(
    s: &Scratch,
    name: &str,
) -> (common::KillOnDrop, std::path::PathBuf, serde_json::Value) {
    let pool = s.pool();
    pool_util::ok(&pool, &["pool", "init"]);
    let err = s.dir.join("stderr");
    let mut vm = spinning_vm(&pool, name, &err);
    let mine =
        common::wait_for_allocation(&pool, name, &mut vm.0, std::time::Duration::from_secs(60));
    (vm, err, mine)
}

/// Claims 1 vCPU and 32 MiB for VM `name` on the pool's only host, held until
/// released; returns the allocation.
fn claim_other(pool: &Path, name: &str) -> serde_json::Value {
    let hosts = json(&pool_util::ok(pool, &["pool", "--json", "list"]));
    let host = hosts[0]["name"].as_str().expect("host name").to_string();
    json(&pool_util::ok(
        pool,
        &[
            "pool", "--json", "claim", &host, "--vcpus", "1", "--memory", "32", "--name", name,
        ],
    ))
}

/// Stops the VM with SIGTERM and returns its stderr; it must end with 143.
fn stop_and_read(vm: &mut common::KillOnDrop, err: &Path) -> String {
    common::signal(&vm.0, libc::SIGTERM);
    let code = wait_or_kill(&mut vm.0, std::time::Duration::from_secs(60));
    let text = std::fs::read_to_string(err).unwrap_or_default();
    assert_eq!(code, Some(143), "SIGTERM: {text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

/// Deleting the pool's -wal file under a running VM: nobody else can read the pool
/// until the VM's process (which still holds the write-ahead log open) writes it back
/// at exit. The release says so loudly, naming the pool and the allocation, and the
/// claim committed by another process meanwhile (still only in that log) survives.
#[test]
fn deleting_the_wal_under_a_running_vm_is_reported_and_keeps_other_claims() {
    if !common::kvm_or_skip(
        "deleting_the_wal_under_a_running_vm_is_reported_and_keeps_other_claims",
    ) {
        return;
    }
    let s = Scratch::new("wal-deleted");
    let pool = s.pool();
    let (mut vm, err, mine) = vm_holding_a_claim(&s, "walvm");
    let other = claim_other(&pool, "bystander");
    std::fs::remove_file(s.dir.join("pool.db-wal")).expect("delete the -wal file");

    let text = stop_and_read(&mut vm, &err);
    let id = mine["id"].as_i64().expect("id");
    for needle in [
        "POOL LEDGER DAMAGED",
        &pool.display().to_string(),
        &format!("allocation {id} of VM walvm"),
        "-wal",
        "was deleted",
    ] {
        assert!(text.contains(needle), "expected {needle:?} in: {text}");
    }
    let left = common::allocations(&pool);
    assert_eq!(
        left,
        vec![other],
        "only the bystander's claim is left, untouched"
    );
}

/// Deleting the -wal and -shm files under a running VM makes every later process see
/// the pool without the VM's claim, so its id and resources go to another VM. When
/// the VM ends, that other VM's allocation (same id or not) must not be erased: the
/// release finds its claim gone and says so loudly instead.
#[test]
fn a_lost_claim_is_reported_and_never_erases_another_vms() {
    if !common::kvm_or_skip("a_lost_claim_is_reported_and_never_erases_another_vms") {
        return;
    }
    let s = Scratch::new("claim-lost");
    let pool = s.pool();
    let (mut vm, err, mine) = vm_holding_a_claim(&s, "lostvm");
    for f in ["pool.db-wal", "pool.db-shm"] {
        std::fs::remove_file(s.dir.join(f)).expect("delete a companion file");
    }
    // The pool as everyone now sees it has lost the VM's claim.
    assert_eq!(common::allocations(&pool), Vec::<serde_json::Value>::new());
    let other = claim_other(&pool, "newcomer");

    let text = stop_and_read(&mut vm, &err);
    let id = mine["id"].as_i64().expect("id");
    for needle in [
        "POOL LEDGER DAMAGED",
        &pool.display().to_string(),
        &format!("allocation {id} of VM lostvm"),
        "nothing was released",
        "-shm",
    ] {
        assert!(text.contains(needle), "expected {needle:?} in: {text}");
    }
    let left = common::allocations(&pool);
    assert_eq!(left, vec![other], "the newcomer's claim is left, untouched");
}

/// `--timeout 0` is refused as zero (status 2), not as unparseable; `--initrd DIR`
/// says it is a directory; a pool under a regular file says the parent is not a
/// directory (status 125), and creates nothing.
#[test]
fn bad_timeout_initrd_and_pool_parent_say_what_is_wrong() {
    let s = Scratch::new("messages");
    let hello = Path::new(env!("MINIVMM_GUEST_DIR")).join("hello.elf");
    for zero in ["0", "0s", "0ms", "0.0m"] {
        let o = common::output({
            let mut c = common::minivmm();
            c.args(["run", "--no-ledger", "--timeout", zero, "--kernel"])
                .arg(&hello);
            c
        });
        let err = common::stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--timeout {zero}: {err}");
        assert!(
            err.contains("the timeout must be positive")
                && err.contains("leave --timeout out")
                && !err.contains("cannot parse"),
            "--timeout {zero}: {err}"
        );
    }
    refused(
        "initrd-directory",
        &[
            "--kernel".as_ref(),
            hello.as_ref(),
            "--no-ledger".as_ref(),
            "--initrd".as_ref(),
            s.dir.as_ref(),
        ],
        &[&format!(
            "cannot read initrd {}: it is a directory, not a regular file",
            s.dir.display()
        )],
    );
    let file = s.dir.join("plain");
    std::fs::write(&file, b"not a directory").unwrap();
    let inside = file.join("sub.db");
    let deeper = file.join("a/b/sub.db");
    let says = |p: &Path| {
        format!(
            "cannot create pool {}: {} is not a directory",
            p.display(),
            file.display()
        )
    };
    for pool in [&inside, &deeper] {
        refused(
            "pool-under-a-file",
            &[
                "--kernel".as_ref(),
                hello.as_ref(),
                "--pool".as_ref(),
                pool.as_ref(),
            ],
            &[&says(pool)],
        );
        let err = pool_util::fails(pool, &["pool", "list"]);
        assert!(err.contains(&says(pool)), "pool list: {err}");
        assert!(!err.contains("File exists"), "{err}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}
