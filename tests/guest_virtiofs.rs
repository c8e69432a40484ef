//! The virtiofs guest under minivmm: `--share DIR[,tag=T][,ro]` served as virtio-fs
//! devices, driven by a tiny guest (guest/virtiofs.c) that speaks FUSE over the
//! virtqueues by hand: FUSE_INIT, lookups, open/read/release of a file the test
//! wrote; `..` at the root and symbolic links that point out of the share, which must
//! never lead the guest outside it; a file and a directory created on a writable
//! share, found on the host; every change refused with EROFS on a `,ro` share; the
//! devices' place among disks and the rng; and the `--share` refusals.

mod common;
mod guest_support;

use std::path::{Path, PathBuf};

use guest_support::*;

const VMM_ERROR: i32 = 125;
const USAGE: i32 = 2;
const EROFS: i32 = 30;

/// What the test writes into hello.txt of the writable share.
const HELLO: &str = "hello from the minivmm host";
/// hello.txt of the read-only share.
const HELLO_RO: &str = "read-only hello";
/// The file outside the shares that `link` points to: never to be seen by the guest.
const SECRET: &str = "minivmm-secret-3f9c1e outside every share";
/// What the guest writes into made-by-guest.txt (guest/virtiofs.c, payload).
const WRITTEN: &str = "written by guest";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The layout of one run: a writable share, a read-only one, and a directory beside
/// them holding the secret, which `link` (to the file) and `dirlink` (to the
/// directory) in the writable share point at with absolute paths.
struct Dirs {
    rw: PathBuf,
    ro: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
}

fn make_dirs(name: &str) -> Dirs {
    let dir = common::scratch(name);
    let (rw, ro, outside) = (dir.join("share"), dir.join("ro"), dir.join("outside"));
    for d in [&rw, &ro, &outside] {
        std::fs::create_dir(d).unwrap();
    }
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::write(rw.join("hello.txt"), HELLO).unwrap();
    std::fs::write(ro.join("hello.txt"), HELLO_RO).unwrap();
    std::os::unix::fs::symlink(&secret, rw.join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, rw.join("dirlink")).unwrap();
    Dirs {
        rw,
        ro,
        outside,
        secret,
    }
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs the virtiofs guest with 64M, no PIT, a 20 s timeout and these extra flags.
fn run_virtiofs(kernel: &str, cmdline: &str, extra: &[&str]) -> Run {
    let mut flags = vec!["--no-pit", "--no-ledger"];
    flags.extend_from_slice(extra);
    run_with(kernel, cmdline, 1, "64M", "20s", Input::None, &flags)
}

/// Checks `virtiofs: dev N at ADDR irq IRQ id ID` and returns IRQ.
fn dev_line(r: &Run, n: u32, addr: u64, id: u32) -> u32 {
    let prefix = format!("virtiofs: dev {n} at {addr:#x} irq ");
    let line = r.line(&prefix);
    let rest = &line[prefix.len()..];
    let (irq, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    assert_eq!(tail, format!("id {id}"), "{line}\n{}", r.ctx());
    irq.parse()
        .unwrap_or_else(|_| panic!("{line}\n{}", r.ctx()))
}

/// The errno of a line ending `-> -N` (0 for `-> 0`).
fn errno_of(r: &Run, prefix: &str) -> i32 {
    let line = r.line(prefix);
    let n: i32 = line
        .rsplit("-> ")
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no result in {line:?}\n{}", r.ctx()));
    -n
}

/// The lines every share gives (device `n`, whose hello.txt holds `text`): FUSE_INIT
/// at protocol 7, the root, hello.txt looked up, opened, read and released, and
/// `..` at the root staying there.
fn check_reads(r: &Run, n: u32, text: &str) {
    let p = |l: &str| format!("virtiofs {n}: {l}");
    r.assert_line(&p("request queues 1, queue sizes 16 16"));
    let init = r.line(&p("init server "));
    assert!(
        init.starts_with(&p("init server 7."))
            && init.contains(" negotiated 7.")
            // 1 MiB requests, not fuse-backend-rs's default of 4 KiB (fs.rs).
            && init.ends_with(" max_write 1048576 max_pages 256 big_writes"),
        "{init}\n{}",
        r.ctx()
    );
    r.assert_line(&p("root nodeid 1 is a directory"));
    let lookup = r.line(&p("hello.txt nodeid "));
    assert!(
        lookup.ends_with(&format!(" regular size {}", text.len())),
        "{lookup}\n{}",
        r.ctx()
    );
    r.assert_line(&p(&format!(
        "hello.txt read {} bytes \"{text}\"",
        text.len()
    )));
    r.assert_line(&p(".. at root stays at root (nodeid 1)"));
    // A name with a slash is not looked up at all (EINVAL), so "../x" cannot climb.
    assert_eq!(errno_of(r, &p("lookup \"../hello.txt\" -> ")), 22);
    r.assert_line(&p("release hello.txt -> 0"));
}

/// A writable share (`tag=rw`) and a read-only one (`tag=ro,ro`): the guest reads
/// both, creates and writes on the first and is refused every change on the second;
/// symbolic links never take it out of the share.
#[test]
fn shares_read_write_refuse_and_stay_inside() {
    if !common::kvm_or_skip("shares_read_write_refuse_and_stay_inside") {
        return;
    }
    for kernel in both("virtiofs") {
        let d = make_dirs(&format!("virtiofs-rw-ro-{kernel}"));
        let rw = format!("{},tag=rw", s(&d.rw));
        let ro = format!("{},tag=ro,ro", s(&d.ro));
        let r = run_virtiofs(
            &kernel,
            "virtiofs.rw=rw virtiofs.ro=ro",
            &["--share", &rw, "--share", &ro],
        );
        r.assert_end("debug-exit", 33);
        r.assert_line("virtiofs: found 2 devices");
        let irqs = [
            dev_line(&r, 0, 0xd000_0000, 26),
            dev_line(&r, 1, 0xd000_1000, 26),
        ];
        assert_ne!(irqs[0], irqs[1], "{}", r.ctx());
        r.assert_line("virtiofs: dev 0 tag rw");
        r.assert_line("virtiofs: dev 1 tag ro");
        check_reads(&r, 0, HELLO);
        check_reads(&r, 1, HELLO_RO);

        // The symlink is a symlink: its own text, never the file it names.
        r.assert_line("virtiofs 0: link is a symlink (mode 0120777)");
        r.assert_line(&format!("virtiofs 0: link readlink \"{}\"", s(&d.secret)));
        assert!(errno_of(&r, "virtiofs 0: open link -> ") > 0);
        assert!(errno_of(&r, "virtiofs 0: read link with hello.txt's handle -> ") > 0);
        r.assert_line("virtiofs 0: forget on the hiprio queue, used len 0");
        r.assert_line("virtiofs 0: dirlink is a symlink (mode 0120777)");
        assert!(errno_of(&r, "virtiofs 0: lookup secret.txt through dirlink -> ") > 0);
        r.assert_line("virtiofs 1: no link");

        // Writes on the writable share.
        r.assert_line("virtiofs 0: rw create made-by-guest.txt -> 0");
        r.assert_line(&format!(
            "virtiofs 0: rw write 16 bytes -> {}",
            WRITTEN.len()
        ));
        r.assert_line("virtiofs 0: rw release -> 0");
        r.assert_line("virtiofs 0: rw made-by-guest.txt reads back 16 bytes ok");
        assert_eq!(
            errno_of(&r, "virtiofs 0: rw create again with O_EXCL -> "),
            17
        );
        r.assert_line("virtiofs 0: rw mkdir dir-by-guest -> 0");
        assert!(errno_of(&r, "virtiofs 0: rw create through dirlink -> ") > 0);
        assert!(errno_of(&r, "virtiofs 0: rw mkdir through dirlink -> ") > 0);

        // Every change refused on the read-only share, by EROFS.
        for what in [
            "create",
            "mkdir",
            "setattr size 0",
            "open O_WRONLY",
            "open O_RDWR",
            "open O_TRUNC",
            "write through a read-only handle",
        ] {
            r.assert_line(&format!("virtiofs 1: ro {what} -> -{EROFS}"));
        }
        r.assert_line("virtiofs: ok");

        // The host sees the guest's file and directory, and nothing else changed.
        let made = d.rw.join("made-by-guest.txt");
        assert_eq!(
            std::fs::read_to_string(&made).unwrap_or_default(),
            WRITTEN,
            "{}\n{}",
            made.display(),
            r.ctx()
        );
        assert!(d.rw.join("dir-by-guest").is_dir(), "{}", r.ctx());
        assert_eq!(
            names(&d.rw),
            [
                "dir-by-guest",
                "dirlink",
                "hello.txt",
                "link",
                "made-by-guest.txt"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(d.rw.join("hello.txt")).unwrap(),
            HELLO
        );
        assert_eq!(names(&d.ro), ["hello.txt"], "{}", r.ctx());
        assert_eq!(
            std::fs::read_to_string(d.ro.join("hello.txt")).unwrap(),
            HELLO_RO
        );
        assert_eq!(names(&d.outside), ["secret.txt"], "{}", r.ctx());
        assert_eq!(std::fs::read_to_string(&d.secret).unwrap(), SECRET);
        assert!(
            !r.console.contains(SECRET) && !r.stderr.contains(SECRET),
            "the secret outside the share reached the guest\n{}",
            r.ctx()
        );

        // --json: one virtio-fs device per share, served, never broken.
        let devices = r.json["devices"].as_array().cloned().unwrap_or_default();
        assert_eq!(devices.len(), 2, "{}", r.ctx());
        for (dev, tag) in devices.iter().zip(["rw", "ro"]) {
            assert_eq!(dev["kind"], "virtio-fs", "{}", r.ctx());
            assert_eq!(dev["broken"], false, "{}", r.ctx());
            assert!(dev["requests"].as_u64().unwrap_or(0) > 10, "{}", r.ctx());
            let path = dev["path"].as_str().unwrap_or("");
            assert!(path.ends_with(&format!("(tag {tag})")), "{}", r.ctx());
        }
        assert!(!r.stderr.contains("panicked"), "{}", r.ctx());
    }
}

/// Shares sit after the disks and before the rng; an unnamed share is `share0`;
/// a tag of the full 36 bytes reaches the guest whole; without `virtiofs.rw` the
/// guest changes nothing.
#[test]
fn shares_between_disks_and_rng_with_default_and_full_length_tags() {
    if !common::kvm_or_skip("shares_between_disks_and_rng_with_default_and_full_length_tags") {
        return;
    }
    let d = make_dirs("virtiofs-placement");
    let disk = d.outside.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let tag36 = "t".repeat(35) + "z";
    let second = format!("{},tag={tag36},ro", s(&d.ro));
    let r = run_virtiofs(
        "virtiofs.elf",
        "",
        &[
            "--disk",
            s(&disk),
            "--share",
            s(&d.rw),
            "--share",
            &second,
            "--rng",
        ],
    );
    r.assert_end("debug-exit", 33);
    r.assert_line("virtiofs: found 4 devices");
    dev_line(&r, 0, 0xd000_0000, 2);
    dev_line(&r, 1, 0xd000_1000, 26);
    dev_line(&r, 2, 0xd000_2000, 26);
    dev_line(&r, 3, 0xd000_3000, 4);
    r.assert_line("virtiofs: dev 1 tag share0");
    r.assert_line(&format!("virtiofs: dev 2 tag {tag36}"));
    check_reads(&r, 1, HELLO);
    check_reads(&r, 2, HELLO_RO);
    assert!(!r.console.contains(": rw ") && !r.console.contains(": ro "));
    r.assert_line("virtiofs: ok");
    assert_eq!(
        names(&d.rw),
        ["dirlink", "hello.txt", "link"],
        "{}",
        r.ctx()
    );
    assert!(!r.console.contains(SECRET), "{}", r.ctx());
}

/// A tag the command line names but no share has is the guest's failure, so that the
/// write checks cannot be skipped unnoticed.
#[test]
fn a_named_tag_without_a_share_fails_the_guest() {
    if !common::kvm_or_skip("a_named_tag_without_a_share_fails_the_guest") {
        return;
    }
    let d = make_dirs("virtiofs-no-such-tag");
    let r = run_virtiofs(
        "virtiofs-64.elf",
        "virtiofs.rw=nope",
        &["--share", s(&d.rw)],
    );
    r.assert_end("debug-exit", 35);
    r.assert_line("virtiofs: FAIL no share has the tag in virtiofs.rw=nope");
}

/// `run --share ARGS...` with the hello guest: must fail before the VM runs.
fn refused(args: &[&str], status: i32, needles: &[&str]) {
    let mut c = common::minivmm();
    c.args(["run", "--no-ledger", "--no-pit", "--timeout", "10s"])
        .arg("--kernel")
        .arg(guest("hello.elf"))
        .args(["--serial", "none"]);
    for a in args {
        c.args(["--share", a]);
    }
    let o = common::output(c);
    let err = common::stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(status),
        "--share {args:?}: stderr:\n{err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "--share {args:?}: no {n:?} in stderr:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "minivmm panicked: {err}");
}

#[test]
fn bad_shares_are_refused() {
    let d = make_dirs("virtiofs-bad-shares");
    let missing = d.outside.join("missing");
    refused(&[s(&missing)], VMM_ERROR, &[s(&missing), "not a directory"]);
    refused(
        &[s(&d.secret)],
        VMM_ERROR,
        &[s(&d.secret), "not a directory"],
    );
    let long = format!("{},tag={}", s(&d.rw), "x".repeat(37));
    refused(&[&long], USAGE, &["x".repeat(37).as_str(), "1 to 36 bytes"]);
    let empty = format!("{},tag=", s(&d.rw));
    refused(&[&empty], USAGE, &["1 to 36 bytes"]);
    let a = format!("{},tag=same", s(&d.rw));
    let b = format!("{},tag=same,ro", s(&d.ro));
    refused(
        &[&a, &b],
        VMM_ERROR,
        &["two --share directories", "\"same\""],
    );
    // An explicit tag that is another share's default.
    let b = format!("{},tag=share0", s(&d.ro));
    refused(&[s(&d.rw), &b], VMM_ERROR, &["\"share0\""]);
    let bogus = format!("{},bogus", s(&d.rw));
    refused(&[&bogus], USAGE, &["unknown option \"bogus\""]);
    // Nothing was created in the directories.
    assert_eq!(names(&d.rw), ["dirlink", "hello.txt", "link"]);
    assert_eq!(names(&d.ro), ["hello.txt"]);
}

/// The umask in a /proc/PID/status (of a process, or of a thread's task).
fn umask_in(status: &Path) -> String {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no Umask in {}", status.display()))
}

/// A share must not change the umask of minivmm's process: the FUSE server clears
/// it for itself (so that the guest's modes apply as given), at set-up and again on
/// every FUSE_INIT, and a cleared umask makes every file the process creates
/// afterwards world-writable, starting with the --serial-out file.
#[test]
fn a_share_leaves_the_process_umask_alone() {
    if !common::kvm_or_skip("a_share_leaves_the_process_umask_alone") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = make_dirs("virtiofs-umask");
    let console = d.outside.join("console.txt");
    let mut c = common::minivmm();
    // virtiofs.end=hlt: the guest stops after its FUSE_INIT and checks, the VM stays.
    c.args(["run", "--no-ledger", "--no-pit", "--timeout", "20s"])
        .arg("--kernel")
        .arg(guest("virtiofs.elf"))
        .args(["--cmdline", "virtiofs.rw=share0 virtiofs.end=hlt"])
        .args(["--share", s(&d.rw)])
        .arg("--serial-out")
        .arg(&console)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().expect("cannot start minivmm");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("virtiofs: ok")
    {
        if start.elapsed() > std::time::Duration::from_secs(15)
            || child.try_wait().ok().flatten().is_some()
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let theirs = umask_in(&PathBuf::from(format!("/proc/{}/status", child.id())));
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("virtiofs: ok"), "{text}");
    let mine = umask_in(Path::new("/proc/self/status"));
    assert_eq!(
        theirs, mine,
        "minivmm's umask after the guest's FUSE_INIT, and the one it was started with"
    );
    // What this process's umask (inherited by minivmm) makes of a new file.
    let file = d.outside.join("mine.txt");
    std::fs::write(&file, "x").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&console),
        mode(&file),
        "the --serial-out file has mode {:o}, a file created with the same umask {:o}",
        mode(&console),
        mode(&file)
    );
    // The guest's own modes still apply in the share (0644 and 0755 with umask 022).
    assert_eq!(mode(&d.rw.join("made-by-guest.txt")), 0o644, "{text}");
    assert_eq!(mode(&d.rw.join("dir-by-guest")), 0o755, "{text}");
}

/// `minivmm run` of the virtiofs guest (PVH entry) with `cmdline`, 64M, no PIT,
/// no ledger, a 20 s timeout, `d.rw` shared as tag `rw`, the console to `console`,
/// stdin and stdout empty; the caller says where stderr goes and spawns it.
fn rw_share_command(d: &Dirs, cmdline: &str, console: &Path) -> std::process::Command {
    let mut cmd = common::minivmm();
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest_support::guest(&both("virtiofs")[0]))
        .args(["--cmdline", cmdline])
        .args([
            "--memory",
            "64M",
            "--timeout",
            "20s",
            "--no-pit",
            "--no-ledger",
        ])
        .args(["--share", &format!("{},tag=rw", s(&d.rw))])
        .arg("--serial-out")
        .arg(console)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    cmd
}

/// A FIFO on a share must not let the guest block the device's worker (a host
/// open(2) of a FIFO for reading waits for a writer, and every other request of
/// the VM would wait behind it): the open is refused (EBADF: the server reopens
/// only what it looked up), and the VM ends on its own, long before its timeout.
#[test]
fn a_fifo_on_a_share_cannot_block_the_device() {
    let test = "a_fifo_on_a_share_cannot_block_the_device";
    if !common::kvm_or_skip(test) {
        return;
    }
    let d = make_dirs(test);
    let fifo = d.rw.join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let console = d.outside.join("console.txt");
    let mut cmd = rw_share_command(&d, "virtiofs.rw=rw virtiofs.fifo=fifo", &console);
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("cannot start minivmm");
    // The limit only turns a hang (VM and worker stuck) into a failure.
    let status = common::wait_or_kill(&mut child, std::time::Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let seen = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        seen.contains("virtiofs 0: opening fifo fifo\n"),
        "the guest never opened the FIFO:\n{seen}\n{err}"
    );
    assert!(
        seen.contains(&format!("virtiofs 0: open fifo -> -{}\n", libc::EBADF)),
        "the FIFO's open was not refused:\n{seen}\n{err}"
    );
    assert_eq!(
        status,
        Some(33),
        "the guest did not end well:\n{seen}\n{err}"
    );
}

/// A share can need an open descriptor per file the guest has looked up, so
/// minivmm raises its soft RLIMIT_NOFILE to the hard limit (or more, with the
/// privilege): a VM started with a soft limit of 256 runs with a higher one.
#[test]
fn a_share_raises_the_open_file_limit() {
    let test = "a_share_raises_the_open_file_limit";
    if !common::kvm_or_skip(test) {
        return;
    }
    let d = make_dirs(test);
    let console = d.outside.join("console.txt");
    let mut cmd = rw_share_command(&d, "virtiofs.rw=rw virtiofs.end=hlt", &console);
    cmd.stderr(std::process::Stdio::null());
    // SAFETY: only setrlimit(2) runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let child = common::KillOnDrop(cmd.spawn().expect("cannot start minivmm"));
    let pid = child.0.id();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("virtiofs: ok")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "the guest did not get to its end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let soft: u64 = line
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(soft > 256, "{line}");
    drop(child);
}
