//! `minivmm serve` and `minivmm vm` on real KVM with the tiny guests: the agent runs
//! each VM as a process of its own, reports and stops them, refuses bad requests
//! with 4xx, adopts its VMs after a SIGKILL, and leaves nothing behind.

mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One agent with its own socket, state, images and pool under a scratch directory.
struct Agent {
    dir: PathBuf,
    process: Option<KillOnDrop>,
    /// More `serve` flags.
    extra: Vec<String>,
}

impl Agent {
    /// Starts an agent whose --images holds the built tiny guests.
    fn start(name: &str) -> Agent {
        Agent::start_with(name, &[])
    }

    /// As [`Agent::start`], with more `serve` flags.
    fn start_with(name: &str, extra: &[&str]) -> Agent {
        let dir = scratch(name);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        for g in ["echo.elf", "hello.elf", "irq.elf"] {
            let from = Path::new(env!("MINIVMM_GUEST_DIR")).join(g);
            std::fs::copy(from, dir.join("images").join(g)).unwrap();
        }
        let mut a = Agent {
            dir,
            process: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        a.restart();
        a
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn pool(&self) -> PathBuf {
        self.dir.join("pool.db")
    }

    /// (Re)starts the agent process on the same state and waits for its socket.
    fn restart(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--images")
            .arg(self.dir.join("images"))
            .arg("--pool")
            .arg(self.pool())
            .arg("--stop-grace")
            .arg("5s")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("agent.log")).unwrap())
            .spawn()
            .expect("start minivmm serve");
        let mut child = KillOnDrop(child);
        let t0 = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!("the agent ended ({st}): {}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no socket: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.process = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Kills the agent with SIGKILL (its VMs go on).
    fn kill(&mut self) {
        let mut p = self.process.take().expect("agent running");
        signal(&p.0, libc::SIGKILL);
        p.0.wait().unwrap();
    }

    /// `minivmm vm --socket S ARGS...`.
    fn vm(&self, args: &[&str]) -> std::process::Output {
        output({
            let mut c = minivmm();
            c.arg("vm").arg("--socket").arg(self.socket()).args(args);
            c
        })
    }

    /// `minivmm vm --json ARGS...`, which must succeed, as JSON.
    fn vm_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let o = self.vm(&all);
        assert!(
            o.status.success(),
            "vm {args:?}: {}\n{}",
            stderr(&o),
            self.log()
        );
        serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
    }

    /// One raw HTTP request; returns the status and the body.
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        http(&self.socket(), method, path, body)
    }

    /// Waits until VM `name` is in `state`; returns its JSON.
    fn wait_state(&self, name: &str, state: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.vm_json(&["show", name]);
            if v["state"] == state {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{name} never {state}: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `minivmm run` processes this agent's VMs run in.
    fn vm_processes(&self) -> Vec<u32> {
        run_processes_naming(&self.pool().display().to_string())
    }

    /// Nothing left: no VM process, no claim, no VM directory.
    fn assert_clean(&self) {
        let t0 = Instant::now();
        while !self.vm_processes().is_empty() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.vm_processes(), Vec::<u32>::new(), "VM processes left");
        assert_eq!(
            allocations(&self.pool()),
            Vec::<Value>::new(),
            "claims left"
        );
        let left: Vec<_> = std::fs::read_dir(self.dir.join("state/vms"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "VM directories left: {left:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed test leaves no VM running.
        for pid in self.vm_processes() {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// A minimal HTTP/1.1 client: one request per connection, `Connection: close`,
/// content-length or chunked bodies.
fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the agent");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) and close before reading a huge body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if raw.is_empty() {
        return (0, String::new()); // closed without an answer
    }
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out += &tail[..n];
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn serve_runs_lists_stops_and_deletes_vms() {
    if !kvm_or_skip("serve_runs_lists_stops_and_deletes_vms") {
        return;
    }
    let agent = Agent::start("serve-basic");
    // The socket is the agent's door: only its owner may use it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let e1 = agent.vm_json(&[
        "create", "e1", "--kernel", "echo.elf", "--vcpus", "2", "--label", "team=ci",
    ]);
    assert_eq!(e1["state"], "running", "{e1}");
    let pid = e1["pid"].as_u64().expect("a running VM has a pid");
    assert!(pid_alive(pid));
    let h1 = agent.vm_json(&[
        "create",
        "h1",
        "--kernel",
        "hello.elf",
        "--cmdline",
        "exit=3",
    ]);
    assert!(h1["state"] == "running" || h1["state"] == "exited", "{h1}");
    let h1 = agent.wait_state("h1", "exited");
    assert_eq!(
        (h1["exit_code"].as_i64(), h1["reason"].as_str()),
        (Some(7), Some("debug-exit"))
    );

    // The ledger holds what the running VM claimed: 2 vCPUs, 128 MiB.
    let claims = allocations(&agent.pool());
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0]["vm_name"], "e1");

    let list = agent.vm_json(&["list"]);
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, ["e1", "h1"]);
    let table = stdout(&agent.vm(&["list"]));
    assert!(
        table.starts_with("NAME") && table.contains("e1") && table.contains("running"),
        "{table}"
    );

    // The console: what the guest wrote so far, and followed to the VM's end.
    let logs = stdout(&agent.vm(&["logs", "e1"]));
    assert!(logs.starts_with("echo: ready"), "{logs:?}");
    let followed = agent.vm(&["console", "h1"]);
    assert!(
        followed.status.success() && stdout(&followed).contains("x"),
        "{}",
        stderr(&followed)
    );

    let stopped = agent.vm_json(&["stop", "e1", "--wait"]);
    assert_eq!(
        (stopped["state"].as_str(), stopped["reason"].as_str()),
        (Some("exited"), Some("stopped")),
        "{stopped}"
    );
    assert!(!pid_alive(pid), "the VM process {pid} outlived its stop");
    assert_eq!(
        allocations(&agent.pool()),
        Vec::<Value>::new(),
        "a stopped VM released its claim"
    );

    let host = agent.http("GET", "/v1/host", b"");
    assert_eq!(host.0, 200);
    let host: Value = serde_json::from_str(&host.1).unwrap();
    assert_eq!(host["vms"]["exited"], 2, "{host}");
    let (st, metrics) = agent.http("GET", "/metrics", b"");
    assert_eq!(st, 200);
    assert!(
        metrics.contains("minivmm_vms{state=\"exited\"} 2"),
        "{metrics}"
    );

    for name in ["e1", "h1"] {
        let o = agent.vm(&["delete", name]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(agent.vm_json(&["list"]), serde_json::json!([]));
    agent.assert_clean();
}

/// A stop presses the ACPI power button: a guest that listens powers off by itself
/// (exit 0, reason poweroff); one that does not is stopped at once, not after the
/// grace period.
#[test]
fn a_stop_asks_the_guest_to_power_off() {
    if !kvm_or_skip("a_stop_asks_the_guest_to_power_off") {
        return;
    }
    let agent = Agent::start("serve-stop");
    agent.vm_json(&[
        "create",
        "acpi",
        "--kernel",
        "irq.elf",
        "--cmdline",
        "sci=1",
    ]);
    agent.vm_json(&["create", "deaf", "--kernel", "echo.elf"]);
    // Until the guest has enabled the event, a press would be lost.
    let t0 = Instant::now();
    while !stdout(&agent.vm(&["logs", "acpi"])).contains("waiting for the power button") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            stdout(&agent.vm(&["logs", "acpi"]))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = agent.vm_json(&["stop", "acpi", "--wait"]);
    assert_eq!(
        (
            v["state"].as_str(),
            v["reason"].as_str(),
            v["exit_code"].as_i64()
        ),
        (Some("exited"), Some("poweroff"), Some(0)),
        "{v}"
    );
    assert!(stdout(&agent.vm(&["logs", "acpi"])).contains("power button ok"));
    let t0 = Instant::now();
    let v = agent.vm_json(&["stop", "deaf", "--wait"]);
    assert_eq!(
        (v["reason"].as_str(), v["exit_code"].as_i64()),
        (Some("stopped"), Some(128 + 30)),
        "{v}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "waited out the 5 s grace period"
    );
    for n in ["acpi", "deaf"] {
        assert!(agent.vm(&["delete", n]).status.success());
    }
    agent.assert_clean();
}

/// `--group` opens the socket to a group (0660, that group), and an unknown group
/// is refused before anything listens.
#[test]
fn the_socket_can_be_opened_to_a_group() {
    if !kvm_or_skip("the_socket_can_be_opened_to_a_group") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: getgid(2) cannot fail; getgrgid(3)'s result is read at once.
    let (gid, group) = unsafe {
        let gid = libc::getgid();
        let gr = libc::getgrgid(gid);
        assert!(!gr.is_null(), "this process's group has no name");
        (
            gid,
            std::ffi::CStr::from_ptr((*gr).gr_name)
                .to_string_lossy()
                .into_owned(),
        )
    };
    let agent = Agent::start_with("serve-group", &["--group", &group]);
    let m = std::fs::metadata(agent.socket()).unwrap();
    assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, gid));
    assert_eq!(agent.vm_json(&["list"]), serde_json::json!([]));

    let o = output({
        let mut c = minivmm();
        c.args(["serve", "--group", "no-such-group-here", "--images"])
            .arg(agent.dir.join("images"))
            .arg("--socket")
            .arg(agent.dir.join("other.sock"))
            .arg("--state-dir")
            .arg(agent.dir.join("other-state"));
        c
    });
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("no group named no-such-group-here"),
        "{}",
        stderr(&o)
    );
    assert!(!agent.dir.join("other.sock").exists());
    assert!(
        !agent.dir.join("other-state").exists(),
        "state made before the check"
    );
}

/// Every kind of bad request gets a 4xx with a message, and the agent goes on.
#[test]
fn serve_refuses_bad_requests_with_4xx() {
    if !kvm_or_skip("serve_refuses_bad_requests_with_4xx") {
        return;
    }
    let agent = Agent::start("serve-bad");
    std::fs::write(agent.dir.join("secret"), b"not an image").unwrap();
    std::os::unix::fs::symlink(agent.dir.join("secret"), agent.dir.join("images/link")).unwrap();
    let secret = agent.dir.join("secret").display().to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", "{\"name\":".into(), 400, "JSON"),
        (
            "unknown field",
            r#"{"name":"a","kernel":"echo.elf","vcpu":2}"#.into(),
            400,
            "unknown field",
        ),
        (
            "negative memory",
            r#"{"name":"a","kernel":"echo.elf","memory":-1}"#.into(),
            400,
            "memory",
        ),
        (
            "bad memory",
            r#"{"name":"a","kernel":"echo.elf","memory":"lots"}"#.into(),
            400,
            "lots",
        ),
        (
            "zero vCPUs",
            r#"{"name":"a","kernel":"echo.elf","vcpus":0}"#.into(),
            400,
            "vcpus",
        ),
        (
            "bad name",
            r#"{"name":"../x","kernel":"echo.elf"}"#.into(),
            400,
            "bad VM name",
        ),
        (
            "dot-dot",
            r#"{"name":"a","kernel":"../secret"}"#.into(),
            400,
            "not inside",
        ),
        (
            "symlink out",
            r#"{"name":"a","kernel":"link"}"#.into(),
            400,
            "not inside",
        ),
        (
            "absolute",
            format!(r#"{{"name":"a","kernel":"{secret}"}}"#),
            400,
            "not inside",
        ),
        (
            "disk outside",
            r#"{"name":"a","kernel":"echo.elf","disks":[{"path":"/etc/passwd"}]}"#.into(),
            400,
            "not inside",
        ),
        (
            "too big",
            r#"{"name":"a","kernel":"echo.elf","vcpus":200}"#.into(),
            422,
            "lacks vcpus",
        ),
    ];
    for (what, body, want, says) in &cases {
        let (st, text) = agent.http("POST", "/v1/vms", body.as_bytes());
        assert_eq!(st, *want, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"));
        assert!(
            v["error"].as_str().unwrap_or("").contains(says),
            "{what}: {text}"
        );
    }
    let huge = format!(
        r#"{{"name":"a","kernel":"echo.elf","cmdline":"{}"}}"#,
        "x".repeat(200_000)
    );
    assert_eq!(
        agent.http("POST", "/v1/vms", huge.as_bytes()).0,
        413,
        "huge body"
    );
    assert_eq!(agent.http("GET", "/v1/vms/nope", b"").0, 404);
    assert_eq!(agent.http("DELETE", "/v1/vms/nope", b"").0, 404);
    assert_eq!(agent.http("GET", "/v1/nothing", b"").0, 404);
    assert_eq!(agent.http("POST", "/v1/vms/nope/stop?wait=yes", b"").0, 400);

    // A duplicate name is a conflict, and the first VM is untouched.
    let body = br#"{"name":"d","kernel":"echo.elf"}"#;
    assert_eq!(agent.http("POST", "/v1/vms", body).0, 201);
    let (st, text) = agent.http("POST", "/v1/vms", body);
    assert_eq!(st, 409, "{text}");
    assert_eq!(agent.vm_json(&["show", "d"])["state"], "running");
    // The CLI says the agent's reason and exits 1.
    let o = agent.vm(&["create", "big", "--kernel", "echo.elf", "--vcpus", "200"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("lacks vcpus") && stderr(&o).contains("HTTP 422"),
        "{}",
        stderr(&o)
    );

    // An anti-affinity group holds one VM per host: the second is refused.
    let g1 = br#"{"name":"g1","kernel":"echo.elf","group":"web","memory":"1.5G"}"#;
    let (st, text) = agent.http("POST", "/v1/vms", g1);
    assert_eq!(st, 201, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["memory_mib"],
        1536
    );
    let (st, text) = agent.http(
        "POST",
        "/v1/vms",
        br#"{"name":"g2","kernel":"echo.elf","group":"web"}"#,
    );
    assert_eq!(st, 422, "{text}");
    assert!(text.contains("already holds a VM of group web"), "{text}");

    for vm in ["d", "g1"] {
        assert_eq!(agent.http("DELETE", &format!("/v1/vms/{vm}"), b"").0, 204);
    }
    agent.assert_clean();
}

/// The agent killed with SIGKILL while VMs run: they go on, and the next agent
/// adopts them (same pids), stops and deletes them, and nothing is left.
#[test]
fn a_restarted_agent_adopts_its_running_vms() {
    if !kvm_or_skip("a_restarted_agent_adopts_its_running_vms") {
        return;
    }
    let mut agent = Agent::start("serve-adopt");
    let names = ["a0", "a1", "a2", "a3", "a4"];
    let mut pids = Vec::new();
    for n in names {
        pids.push(
            agent.vm_json(&["create", n, "--kernel", "echo.elf"])["pid"]
                .as_u64()
                .unwrap(),
        );
    }
    agent.vm_json(&[
        "create",
        "h",
        "--kernel",
        "hello.elf",
        "--cmdline",
        "exit=1",
    ]);
    agent.wait_state("h", "exited");
    agent.kill();
    assert!(
        pids.iter().all(|&p| pid_alive(p)),
        "a VM died with its agent"
    );
    assert_eq!(allocations(&agent.pool()).len(), 5);

    agent.restart();
    let list = agent.vm_json(&["list"]);
    let running: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "running")
        .map(|v| v["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(running, pids, "{list}");
    assert_eq!(agent.vm_json(&["show", "h"])["exit_code"], 3);

    // An adopted VM is still watched: one that dies is seen to.
    let _ = agent.vm(&["stop", "a0"]);
    agent.wait_state("a0", "exited");
    for n in names.iter().chain(&["h"]) {
        let o = agent.vm(&["delete", n]);
        assert!(o.status.success(), "{n}: {}", stderr(&o));
    }
    agent.assert_clean();
}

/// The agent killed with SIGKILL in the middle of a create (its VM process waiting
/// for the pool's lock, held here): the VM process goes on, runs once the lock is
/// free, and the next agent adopts it; nothing is lost or left.
#[test]
fn an_agent_killed_mid_create_leaves_an_adoptable_vm() {
    if !kvm_or_skip("an_agent_killed_mid_create_leaves_an_adoptable_vm") {
        return;
    }
    let mut agent = Agent::start("serve-midcreate");
    // The pool exists (the agent made it); hold its write lock.
    let holder = rusqlite::Connection::open(agent.pool()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let socket = agent.socket();
    let create = std::thread::spawn(move || {
        http(
            &socket,
            "POST",
            "/v1/vms",
            br#"{"name":"m","kernel":"echo.elf"}"#,
        )
    });
    // Mid-create: the VM process exists and has been recorded, and waits.
    let run_json = agent.dir.join("state/vms/m/run.json");
    let t0 = Instant::now();
    while !run_json.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no run.json: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(agent.vm_processes().len(), 1);
    agent.kill();
    let (status, _) = create.join().unwrap();
    assert_eq!(status, 0, "the create's connection died with the agent");
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);

    agent.restart();
    let v = agent.wait_state("m", "running");
    let t0 = Instant::now();
    while allocations(&agent.pool()).len() != 1 {
        assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        v["pid"].as_u64(),
        agent.vm_processes().first().map(|&p| u64::from(p))
    );
    assert!(agent.vm(&["delete", "m"]).status.success());
    agent.assert_clean();
}

/// A VM process killed with SIGKILL: its VM is shown as failed, and the claim it
/// could not release is released by the agent.
#[test]
fn a_killed_vm_process_is_failed_and_its_claim_released() {
    if !kvm_or_skip("a_killed_vm_process_is_failed_and_its_claim_released") {
        return;
    }
    let agent = Agent::start("serve-killed");
    let pid = agent.vm_json(&["create", "k", "--kernel", "echo.elf"])["pid"]
        .as_u64()
        .unwrap();
    assert_eq!(allocations(&agent.pool()).len(), 1);
    // SAFETY: kill(2) on the VM process's pid, alive (checked by create).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let v = agent.wait_state("k", "failed");
    assert!(
        v["error"].as_str().unwrap_or("").contains("signal 9"),
        "{v}"
    );
    assert_eq!(
        allocations(&agent.pool()),
        Vec::<Value>::new(),
        "the dead VM's claim"
    );
    assert!(agent.vm(&["delete", "k"]).status.success());
    agent.assert_clean();
}

/// `--restart on-failure` starts a VM again after a non-zero status, and a stop
/// ends that.
#[test]
fn the_restart_policy_starts_a_failed_vm_again() {
    if !kvm_or_skip("the_restart_policy_starts_a_failed_vm_again") {
        return;
    }
    let agent = Agent::start("serve-restart");
    agent.vm_json(&[
        "create",
        "r",
        "--kernel",
        "hello.elf",
        "--cmdline",
        "exit=2",
        "--restart",
        "on-failure",
    ]);
    let t0 = Instant::now();
    loop {
        let v = agent.vm_json(&["show", "r"]);
        // Between runs it waits out a backoff, shown as starting.
        if v["restarts"].as_u64() >= Some(1) && v["exit_code"] == 5 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never restarted: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A stop ends the cycle: it stays ended.
    let _ = agent.vm(&["stop", "r", "--wait"]);
    let restarts = agent.wait_state("r", "exited")["restarts"].clone();
    std::thread::sleep(Duration::from_secs(3));
    let v = agent.vm_json(&["show", "r"]);
    assert_eq!(
        (v["state"].clone(), v["restarts"].clone()),
        ("exited".into(), restarts),
        "{v}"
    );
    assert!(agent.vm(&["delete", "r"]).status.success());
    agent.assert_clean();
}

/// docs/openapi.json describes the API as it is: every path and method it lists is
/// served (not the 404 of an unknown path, nor a 405), and every route of the
/// router is in it.
#[test]
fn the_openapi_file_matches_the_routes() {
    if !kvm_or_skip("the_openapi_file_matches_the_routes") {
        return;
    }
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(spec["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    let agent = Agent::start("serve-openapi");
    agent.vm_json(&["create", "o", "--kernel", "echo.elf"]);
    let mut documented = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
        {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    // The router's routes, read from its source: `.route("PATH", get(..).post(..))`.
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/mod.rs")).unwrap();
    let mut routed = Vec::new();
    for line in src
        .lines()
        .filter(|l| l.trim_start().starts_with(".route(\""))
    {
        let path = line.split('"').nth(1).unwrap();
        for m in ["get", "post", "delete", "put", "patch"] {
            if line.contains(&format!("{m}(")) {
                routed.push(format!("{} {path}", m.to_uppercase()));
            }
        }
    }
    routed.sort();
    assert_eq!(
        documented, routed,
        "docs/openapi.json and the router differ"
    );
    // Each documented route answers (DELETE last: it removes the VM).
    documented.sort_by_key(|r| r.starts_with("DELETE"));
    for r in &documented {
        let (method, path) = r.split_once(' ').unwrap();
        let path = path.replace("{name}", "o");
        // A create of the VM that exists: 409, proof that the route is there.
        let body: &[u8] = if r == "POST /v1/vms" {
            br#"{"name":"o","kernel":"echo.elf"}"#
        } else {
            b""
        };
        let (st, text) = agent.http(method, &path, body);
        assert!(st < 400 || st == 409, "{r}: {st} {text}");
    }
    agent.assert_clean();
}
