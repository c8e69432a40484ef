//! Running the tiny guests of guest/ (built by build.rs into MINIVMM_GUEST_DIR)
//! under the minivmm binary, and reading what they report.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common;

/// Path of a built guest, e.g. `guest("hello.elf")` or `guest("hello-64.elf")`.
pub fn guest(file: &str) -> PathBuf {
    let p = PathBuf::from(env!("MINIVMM_GUEST_DIR")).join(file);
    assert!(
        p.exists(),
        "{} is missing: build.rs builds guest/",
        p.display()
    );
    p
}

/// Both builds of a guest: PVH entry and 64-bit entry.
pub fn both(name: &str) -> [String; 2] {
    [format!("{name}.elf"), format!("{name}-64.elf")]
}

/// What to send to the guest's serial input.
pub enum Input<'a> {
    /// Nothing: stdin is /dev/null.
    None,
    /// These bytes at once, then end of file.
    Now(&'a [u8]),
    /// These bytes once the console shows the first string, then end of file.
    After(&'a str, &'a [u8]),
}

/// One `minivmm run` of a guest.
pub struct Run {
    pub what: String,
    pub status: Option<i32>,
    pub json: serde_json::Value,
    pub console: String,
    pub stderr: String,
}

impl Run {
    /// Context for assertion messages.
    pub fn ctx(&self) -> String {
        format!(
            "{}: status {:?}\n--- console ---\n{}\n--- stderr ---\n{}\n--- json ---\n{}",
            self.what, self.status, self.console, self.stderr, self.json
        )
    }

    /// Asserts how the VM ended: the exit status, and the same in the JSON line.
    pub fn assert_end(&self, reason: &str, status: i32) {
        assert_eq!(self.status, Some(status), "{}", self.ctx());
        assert_eq!(self.json["reason"], reason, "{}", self.ctx());
        assert_eq!(self.json["exit_code"], status, "{}", self.ctx());
    }

    /// Asserts that the console has this exact line.
    pub fn assert_line(&self, line: &str) {
        assert!(
            self.console.lines().any(|l| l == line),
            "missing line {line:?}\n{}",
            self.ctx()
        );
    }

    /// The first console line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> &str {
        self.console
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{}", self.ctx()))
    }
}

/// Runs `minivmm run --kernel K --cmdline C --vcpus N --memory M --timeout T
/// --serial-out FILE --json` and collects the result.
pub fn run(
    kernel: &str,
    cmdline: &str,
    vcpus: u32,
    memory: &str,
    timeout: &str,
    input: Input,
) -> Run {
    run_with(kernel, cmdline, vcpus, memory, timeout, input, &[])
}

/// [`run`] with more `minivmm run` flags.
pub fn run_with(
    kernel: &str,
    cmdline: &str,
    vcpus: u32,
    memory: &str,
    timeout: &str,
    input: Input,
    extra: &[&str],
) -> Run {
    let what = format!("{kernel} cmdline {cmdline:?} vcpus {vcpus} memory {memory}");
    // Unique per run: tests of one binary run side by side.
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = common::scratch(&format!(
        "guest-{}-{kernel}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let console = dir.join("console.txt");
    let mut cmd = common::minivmm();
    cmd.arg("run")
        .arg("--kernel")
        .arg(guest(kernel))
        .args(["--cmdline", cmdline])
        .args(["--vcpus", &vcpus.to_string()])
        .args(["--memory", memory])
        .args(["--timeout", timeout])
        .arg("--serial-out")
        .arg(&console)
        .arg("--json")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(match input {
            Input::None => Stdio::null(),
            _ => Stdio::piped(),
        });
    let mut child = cmd.spawn().expect("cannot start minivmm");
    match input {
        Input::None => {}
        Input::Now(bytes) => {
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(bytes)
                .expect("cannot write to minivmm's stdin");
        }
        Input::After(prompt, bytes) => {
            let mut stdin = child.stdin.take().unwrap();
            let start = Instant::now();
            loop {
                let seen = std::fs::read_to_string(&console).unwrap_or_default();
                if seen.contains(prompt) {
                    stdin
                        .write_all(bytes)
                        .expect("cannot write to minivmm's stdin");
                    break;
                }
                if start.elapsed() > Duration::from_secs(15)
                    || child.try_wait().ok().flatten().is_some()
                {
                    break; // the assertions below report what the console shows
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let out = child.wait_with_output().expect("cannot wait for minivmm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_default();
    Run {
        what,
        status: out.status.code(),
        json,
        console: std::fs::read_to_string(&console).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a guest with no input and the usual 10 s timeout.
pub fn run_simple(kernel: &str, cmdline: &str, vcpus: u32, memory: &str) -> Run {
    run(kernel, cmdline, vcpus, memory, "10s", Input::None)
}
