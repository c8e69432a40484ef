//! `minivmm exec`: a command in a fresh VM, with Debian's cloud kernel and its
//! modules (scripts/fetch-debian-kernel.sh; the variables come from scripts/test.sh).
//!
//! On hardware-style KVM (scripts/test-nested-kvm.sh runs this binary there) the
//! guest reaches the command: exit statuses and a signal death come back exactly,
//! 10 MB of stdout and of stderr arrive complete and apart, the current directory
//! is shared read-write and the rest of the host is not written, --timeout stops a
//! command that hangs, and --share narrows what the guest can read. Under PVM a
//! Linux guest cannot reach userspace, and `exec` must say so in one line at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::linux::{files_or_skip, hardware_kvm};

const KERNEL: &str = "MINIVMM_DEBIAN_VMLINUX";
const MODULES: &str = "MINIVMM_DEBIAN_MODULES";
/// Only turns a hang of minivmm itself into a failure: a boot on the nested bed
/// takes 20-40 s, and every exec here has a --timeout below this.
const LIMIT: Duration = Duration::from_secs(600);

/// `minivmm exec` with the test kernel (and its modules, when `files` has them),
/// run in `dir`, no ledger.
fn exec_in(dir: &Path, files: &[PathBuf], flags: &[&str], command: &[&str]) -> Output {
    let mut c = common::minivmm();
    c.current_dir(dir)
        .arg("exec")
        .arg("--kernel")
        .arg(&files[0]);
    // Without the modules (`&files[..1]`) the kernel has no virtio driver.
    if let Some(modules) = files.get(1) {
        c.arg("--modules").arg(modules);
    }
    c.args(["--no-ledger", "--vcpus", "2", "--memory", "512M"])
        .args(flags);
    // minivmm's own limit, well under this test's: a guest that never finishes is
    // then reported by minivmm (status 124, the console's last lines).
    if !flags.contains(&"--timeout") {
        c.args(["--timeout", "300s"]);
    }
    c.arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().expect("cannot start minivmm");
    let out = common::KillOnDrop(child);
    wait_output(out, LIMIT)
}

/// Collects the child's output, killing it past `limit`.
fn wait_output(mut child: common::KillOnDrop, limit: Duration) -> Output {
    use std::io::Read;
    let mut so = child.0.stdout.take().unwrap();
    let mut se = child.0.stderr.take().unwrap();
    // Read both pipes at once: 10 MB on one would block the other.
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        so.read_to_end(&mut v).map(|_| v)
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        se.read_to_end(&mut v).map(|_| v)
    });
    let code = common::wait_or_kill(&mut child.0, limit);
    let stdout = t_out.join().unwrap().unwrap();
    let stderr = t_err.join().unwrap().unwrap();
    let status = std::os::unix::process::ExitStatusExt::from_raw(code.unwrap_or(-1) << 8);
    assert!(
        code.is_some(),
        "minivmm exec did not end within {limit:?}:\n{}",
        String::from_utf8_lossy(&stderr)
    );
    Output {
        status,
        stdout,
        stderr,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ctx(o: &Output) -> String {
    let tail = |b: &[u8]| {
        let t = text(b);
        let n = t.len().saturating_sub(3000);
        t[t.floor_char_boundary(n)..].to_string()
    };
    // Quoted: stderr holds the guest's console tail (see common::quoted).
    format!(
        "status {:?}\n--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
        o.status.code(),
        common::quoted(&tail(&o.stdout)),
        common::quoted(&tail(&o.stderr))
    )
}

/// The files, or None after a skip; on PVM, checks the refusal and returns None.
fn setup(test: &str) -> Option<(Vec<PathBuf>, PathBuf)> {
    let files = files_or_skip(test, &[KERNEL, MODULES])?;
    let dir = common::scratch(test);
    if !hardware_kvm() {
        let o = exec_in(&dir, &files, &[], &["true"]);
        assert_eq!(o.status.code(), Some(125), "{}", ctx(&o));
        let err = text(&o.stderr);
        assert!(
            err.contains("PVM") && err.contains("does not reach userspace"),
            "{}",
            ctx(&o)
        );
        assert_eq!(err.lines().count(), 1, "one line, not more: {}", ctx(&o));
        return None;
    }
    Some((files, dir))
}

#[test]
fn exit_statuses_come_back_exactly() {
    let Some((files, dir)) = setup("exit_statuses_come_back_exactly") else {
        return;
    };
    for (cmd, want) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("kill -9 $$", 128 + 9),
    ] {
        let o = exec_in(&dir, &files, &[], &["sh", "-c", cmd]);
        assert_eq!(o.status.code(), Some(want), "sh -c {cmd:?}: {}", ctx(&o));
        if want == 137 {
            assert!(
                text(&o.stderr).contains("killed by signal 9"),
                "{}",
                ctx(&o)
            );
        }
    }
    let o = exec_in(&dir, &files, &[], &["no-such-command-here"]);
    assert_eq!(o.status.code(), Some(127), "{}", ctx(&o));
    assert!(
        text(&o.stderr).contains("cannot run no-such-command-here"),
        "{}",
        ctx(&o)
    );
}

/// 10 MB on each stream, apart and complete; the environment, the directory, the
/// CPUs; a file written in the shared current directory comes back, one written
/// under /etc does not reach the host.
#[test]
fn streams_files_and_environment() {
    let test = "streams_files_and_environment";
    let Some((files, dir)) = setup(test) else {
        return;
    };
    let marker = format!("/etc/minivmm-exec-{}", std::process::id());
    let script = format!(
        "set -e
echo \"cwd=$(pwd) nproc=$(nproc) host=$(hostname) var=$MINIVMM_T uid=$(id -u) lo=$(cat /sys/class/net/lo/flags) mounts=$(awk '$2 == \"/tmp\" || $2 == \"/dev/shm\" {{ printf \"%s:%s,\", $2, $3 }}' /proc/mounts)\"
date +%s >&2
head -c 10000000 /dev/zero | tr '\\000' o
head -c 10000000 /dev/zero | tr '\\000' e >&2
echo made-in-the-vm > result.txt
echo not-for-the-host > {marker}
test -s {marker}
exit 42"
    );
    let console = common::scratch(&format!("{test}-console")).join("console.txt");
    let console_flag = console.to_str().unwrap();
    let o = exec_in(
        &dir,
        &files,
        &[
            "--env",
            "MINIVMM_T=from-the-flag",
            "--console-file",
            console_flag,
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(o.status.code(), Some(42), "{}", ctx(&o));
    // The kernel's console went to the file, not to stdout or stderr.
    let seen = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        seen.contains("minivmm-init: running sh"),
        "{}",
        common::quoted(&seen)
    );
    let out = text(&o.stdout);
    let (first, rest) = out.split_once('\n').unwrap_or(("", ""));
    let cwd = dir.canonicalize().unwrap();
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(
        first,
        format!(
            "cwd={} nproc=2 host=minivmm var=from-the-flag uid={uid} lo=0x9 mounts=/dev/shm:tmpfs,/tmp:tmpfs,",
            cwd.display()
        ),
        "{}",
        ctx(&o)
    );
    // The guest's clock is the host's (CMOS, then kvmclock): the first stderr line.
    let (clock, err_rest) = o
        .stderr
        .split_at(o.stderr.iter().position(|b| *b == b'\n').unwrap_or(0) + 1);
    let guest_now: i64 = text(clock).trim().parse().unwrap_or(0);
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host_now - guest_now).abs() < 600,
        "guest clock {guest_now}, host {host_now}"
    );
    assert_eq!(rest.len(), 10_000_000, "{}", ctx(&o));
    assert!(
        rest.bytes().all(|b| b == b'o'),
        "stdout mixed with something"
    );
    // Nothing but the command's stderr on stderr: no stdout byte, no console line.
    assert_eq!(err_rest.len(), 10_000_000, "{}", ctx(&o));
    assert!(err_rest.iter().all(|b| *b == b'e'), "{}", ctx(&o));
    assert_eq!(
        std::fs::read_to_string(dir.join("result.txt")).unwrap_or_default(),
        "made-in-the-vm\n"
    );
    assert!(
        !Path::new(&marker).exists(),
        "the guest's write to {marker} reached the host"
    );
}

#[test]
fn a_hanging_command_is_stopped_by_the_timeout() {
    let Some((files, dir)) = setup("a_hanging_command_is_stopped_by_the_timeout") else {
        return;
    };
    let o = exec_in(
        &dir,
        &files,
        &["--timeout", "90s"],
        &["sh", "-c", "echo started; exec sleep 100000"],
    );
    assert_eq!(o.status.code(), Some(124), "{}", ctx(&o));
    assert_eq!(text(&o.stdout), "started\n", "{}", ctx(&o));
    assert!(text(&o.stderr).contains("--timeout expired"), "{}", ctx(&o));
}

/// A guest that never reaches the command, and a kernel that panics under it: each
/// ends with 123 and one line saying which, and the console's last lines (kept,
/// though not shown for a command that ran).
#[test]
fn a_guest_that_fails_gives_123_and_says_why() {
    let test = "a_guest_that_fails_gives_123_and_says_why";
    let Some((files, dir)) = setup(test) else {
        return;
    };
    // Debian's kernel has its virtio drivers as modules: without them the init
    // has no device to mount the root from.
    let o = exec_in(&dir, &files[..1], &[], &["true"]);
    assert_eq!(o.status.code(), Some(123), "{}", ctx(&o));
    let err = text(&o.stderr);
    let reason: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("minivmm exec: "))
        .collect();
    assert_eq!(reason.len(), 1, "one reason line: {}", ctx(&o));
    assert!(
        reason[0].contains("before it reported the command's status")
            || reason[0].contains("could not start the command"),
        "{}",
        ctx(&o)
    );
    assert!(
        err.contains("--- the guest's console, last lines ---") && err.contains("minivmm-init: "),
        "the init's own words in the console tail: {}",
        ctx(&o)
    );

    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            test,
            "MINIVMM_REQUIRE_ROOT",
            "the kernel-panic half needs root in the guest (exec runs the command as the caller) to write /proc/sysrq-trigger",
            "run the tests as root, as the nested bed (scripts/test-nested-kvm.sh) does",
        );
        return;
    }
    let o = exec_in(
        &dir,
        &files,
        &[],
        &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 100"],
    );
    assert_eq!(o.status.code(), Some(123), "{}", ctx(&o));
    assert!(
        text(&o.stderr).contains("minivmm exec: the guest kernel panicked: ")
            && text(&o.stderr).contains("sysrq triggered crash"),
        "{}",
        ctx(&o)
    );
}

/// With --share, the host's / is not the guest's: a directory not shared is not
/// there, one shared read-only cannot be written.
#[test]
fn share_narrows_what_the_guest_sees() {
    let test = "share_narrows_what_the_guest_sees";
    let Some((files, dir)) = setup(test) else {
        return;
    };
    let hidden = common::scratch(&format!("{test}-hidden"));
    std::fs::write(hidden.join("secret.txt"), "not for the guest").unwrap();
    let ro = common::scratch(&format!("{test}-ro"));
    std::fs::write(ro.join("visible.txt"), "shared read-only").unwrap();
    // The tools `sh -c` needs: on a merged-/usr host all under /usr (the guest's
    // init makes /bin, /lib... links to it); else /bin and the libraries beside it
    // (the nested bed's busybox is in /bin). A VM has room for 7 devices: the
    // console, the rng, the current directory and `ro` leave 3.
    let mut flags: Vec<String> = Vec::new();
    let real_dir = |d: &str| Path::new(d).is_dir() && !Path::new(d).is_symlink();
    let tools: Vec<&str> = if real_dir("/bin") {
        ["/bin", "/lib", "/lib64"]
            .into_iter()
            .filter(|d| real_dir(d))
            .collect()
    } else {
        vec!["/usr"]
    };
    for d in tools {
        flags.extend(["--share".into(), format!("{d},ro")]);
    }
    flags.extend(["--share".into(), format!("{},ro", ro.display())]);
    let script = format!(
        "cat {ro}/visible.txt; echo; \
         if cat {hidden}/secret.txt 2>/dev/null; then echo SEEN; else echo hidden; fi; \
         if echo x > {ro}/new.txt 2>/dev/null; then echo WROTE; else echo read-only; fi",
        ro = ro.display(),
        hidden = hidden.display()
    );
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let o = exec_in(&dir, &files, &flag_refs, &["sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(0), "{}", ctx(&o));
    assert_eq!(
        text(&o.stdout),
        "shared read-only\nhidden\nread-only\n",
        "{}",
        ctx(&o)
    );
    assert!(!ro.join("new.txt").exists());
}

#[test]
fn bad_requests_are_refused_before_any_vm() {
    let test = "bad_requests_are_refused_before_any_vm";
    let Some(files) = files_or_skip(test, &[KERNEL, MODULES]) else {
        return;
    };
    let dir = common::scratch(test);
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .current_dir(&dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (o.status.code(), text(&o.stderr))
    };
    let k = files[0].to_str().unwrap();
    let (code, err) = run(&["exec", "--kernel", k]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("CMD"), "{err}");
    // A request wrong in itself is refused as such, before the host is looked at.
    let (code, err) = run(&["exec", "--kernel", k, "--env", "NOEQUALS", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("NAME=VALUE"), "{err}");
    let (code, err) = run(&["exec", "--kernel", k, "--vcpus", "0", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("--vcpus 0 is out of range"), "{err}");
    let (code, err) = run(&["exec", "--kernel", "/nonexistent/vmlinuz", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    if hardware_kvm() {
        assert!(
            err.contains("cannot read the guest kernel /nonexistent/vmlinuz"),
            "{err}"
        );
        let (code, err) = run(&["exec", "--kernel", k, "--rw", "/nonexistent", "--", "true"]);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains("--rw /nonexistent"), "{err}");
        let bad_console = [
            "exec",
            "--kernel",
            k,
            "--console-file",
            "/nonexistent/c.txt",
            "--",
            "true",
        ];
        let (code, err) = run(&bad_console);
        assert_eq!(code, Some(125), "{err}");
        assert!(err.contains("--console-file /nonexistent/c.txt"), "{err}");
        let d = dir.to_str().unwrap();
        let many = [
            "exec", "--kernel", k, "--rw", d, "--rw", d, "--rw", d, "--rw", d, "--", "true",
        ];
        let (code, err) = run(&many);
        assert_eq!(code, Some(125), "{err}");
        assert!(
            err.contains("4 directories to share") && err.contains("at most 3"),
            "{err}"
        );
    } else {
        assert!(err.contains("PVM"), "{err}");
    }
}
