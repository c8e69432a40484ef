//! Many hosts on one PostgreSQL pool: three agents on this machine serve three hosts
//! of the pool; VMs created through the pool run where the scheduler placed them;
//! an agent killed and restarted adopts its VMs; a silent agent's host is marked
//! down and its VMs lost; deletes leave nothing behind. Real KVM, tiny guests, a real
//! PostgreSQL started by the test.

mod pool_util;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pool_util::common::{KillOnDrop, kvm_or_skip, run_processes_naming, signal};
use pool_util::{Backend, Scratch};
use serde_json::Value;

/// One agent serving host `host` of the pool.
struct Agent {
    host: String,
    dir: PathBuf,
    images: PathBuf,
    url: String,
    process: Option<KillOnDrop>,
}

impl Agent {
    fn start(dir: &Path, images: &Path, url: &str, host: &str) -> Agent {
        let mut a = Agent {
            host: host.to_string(),
            dir: dir.join(host),
            images: images.to_path_buf(),
            url: url.to_string(),
            process: None,
        };
        std::fs::create_dir_all(&a.dir).unwrap();
        a.restart();
        a
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// (Re)starts the agent on the same state directory; waits for its socket.
    fn restart(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .args(["serve", "--socket"])
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--images")
            .arg(&self.images)
            .args(["--pool", &self.url, "--host-name", &self.host])
            .args(["--down-after", "3s", "--stop-grace", "2s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("agent.log")).unwrap())
            .spawn()
            .expect("start minivmm serve");
        let mut child = KillOnDrop(child);
        let t0 = Instant::now();
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(st) = child.0.try_wait().unwrap() {
                panic!("agent {} ended ({st}): {}", self.host, self.log());
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

    /// The agent's own view: VM name → (state, pid).
    fn local(&self) -> BTreeMap<String, (String, Option<u64>)> {
        let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .args(["vm", "--json", "list", "--socket"])
            .arg(self.socket())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["name"].as_str().unwrap().to_string(),
                    (
                        vm["state"].as_str().unwrap().to_string(),
                        vm["pid"].as_u64(),
                    ),
                )
            })
            .collect()
    }

    /// Pids of the `minivmm run` processes of this agent's VMs.
    fn vm_processes(&self) -> Vec<u32> {
        run_processes_naming(&self.dir.join("state").display().to_string())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(p) = &self.process {
            // A test that failed with the agent stopped leaves it running on.
            signal_pid(p.0.id(), libc::SIGCONT);
        }
        self.process = None;
        for pid in self.vm_processes() {
            signal_pid(pid, libc::SIGKILL);
        }
    }
}

fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid of ours.
    unsafe { libc::kill(pid as i32, sig) };
}

/// `minivmm vm --pool URL ARGS...`, which must succeed; its stdout.
fn pool_vm(url: &str, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["vm", "--pool", url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "vm {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The pool's VMs: name → record.
fn pool_vms(url: &str) -> BTreeMap<String, Value> {
    let v: Value = serde_json::from_str(&pool_vm(url, &["--json", "list"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|vm| (vm["name"].as_str().unwrap().to_string(), vm.clone()))
        .collect()
}

/// Waits until `ok` holds for the pool's VMs.
fn wait_pool(
    url: &str,
    what: &str,
    limit: Duration,
    ok: impl Fn(&BTreeMap<String, Value>) -> bool,
) {
    let t0 = Instant::now();
    loop {
        let vms = pool_vms(url);
        if ok(&vms) {
            return;
        }
        if t0.elapsed() > limit {
            let mut states: BTreeMap<String, usize> = BTreeMap::new();
            for v in vms.values() {
                let key = format!("{} on {} ({})", v["state"], v["host"], v["reason"]);
                *states.entry(key).or_default() += 1;
            }
            panic!("never {what} in {limit:?}: {} VMs: {states:#?}", vms.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn allocations(url: &str) -> Vec<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["pool", "--json", "allocations", "--pool", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn three_agents_run_what_the_pool_places() {
    if !kvm_or_skip("three_agents_run_what_the_pool_places") {
        return;
    }
    let Some(pg @ Backend::Postgres(server)) =
        Backend::postgres("three_agents_run_what_the_pool_places")
    else {
        return;
    };
    let s = Scratch::with("fleet", pg);
    let url = s.pool().display().to_string();
    let images = s.dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(
        Path::new(env!("MINIVMM_GUEST_DIR")).join("irq.elf"),
        images.join("irq.elf"),
    )
    .unwrap();
    let hosts = ["h1", "h2", "h3"];
    for h in hosts {
        let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
            .args([
                "pool", "add-host", h, "--vcpus", "16", "--memory", "8G", "--disk", "10",
            ])
            .args(["--pool", &url])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut agents: Vec<Agent> = hosts
        .iter()
        .map(|h| Agent::start(&s.dir, &images, &url, h))
        .collect();

    // An agent of a shared pool takes no orders through its socket.
    let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args(["vm", "create", "x", "--kernel", "irq.elf", "--socket"])
        .arg(agents[0].socket())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("vm create --pool"));

    // Bad input is refused before anything is placed.
    let bad = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args([
            "vm", "create", "../x", "--kernel", "irq.elf", "--pool", &url,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad VM name"));

    // 150 VMs through the pool: each lands where the scheduler placed it, and runs.
    let count: usize = std::env::var("MINIVMM_FLEET_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let mut placed = BTreeMap::new();
    let t0 = Instant::now();
    for i in 0..count {
        let name = format!("vm{i:03}");
        let out = pool_vm(
            &url,
            &[
                "--json",
                "create",
                &name,
                "--kernel",
                "irq.elf",
                "--cmdline",
                "wait=0",
                "--memory",
                "64M",
            ],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        placed.insert(name, v["host"].as_str().unwrap().to_string());
    }
    eprintln!("fleet: {count} VMs placed at {:?}", t0.elapsed());
    // A name is the pool's, not a host's: a second VM of the same name is refused.
    let again = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .args([
            "vm", "create", "vm000", "--kernel", "irq.elf", "--pool", &url,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("a VM named vm000 is in the pool already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    wait_pool(&url, "all running", Duration::from_secs(180), |vms| {
        vms.len() == count && vms.values().all(|v| v["state"] == "running")
    });
    eprintln!("fleet: all running at {:?}", t0.elapsed());
    let vms = pool_vms(&url);
    let allocs = allocations(&url);
    assert_eq!(allocs.len(), count, "one allocation per VM");
    for (name, host) in &placed {
        assert_eq!(vms[name]["host"], host.as_str(), "{name} moved");
        let a = allocs
            .iter()
            .find(|a| a["vm_name"] == name.as_str())
            .unwrap();
        assert_eq!(a["host"], host.as_str(), "{name}'s allocation is elsewhere");
    }
    for a in &agents {
        let local = a.local();
        let mine: Vec<&String> = placed
            .iter()
            .filter(|(_, h)| **h == a.host)
            .map(|(n, _)| n)
            .collect();
        assert!(
            !mine.is_empty(),
            "the scheduler spreads: {} got none",
            a.host
        );
        assert_eq!(local.keys().collect::<Vec<_>>(), mine, "agent {}", a.host);
        assert!(
            local
                .values()
                .all(|(st, pid)| st == "running" && pid.is_some())
        );
        assert_eq!(
            a.vm_processes().len(),
            mine.len(),
            "one process per VM on {}",
            a.host
        );
    }

    // SIGKILL an agent: its VMs go on; restarted, it adopts them and starts none twice.
    let before = agents[0].local();
    let p = agents[0].process.take().unwrap();
    signal(&p.0, libc::SIGKILL);
    drop(p);
    agents[0].restart();
    assert_eq!(agents[0].local(), before, "adopted with the same pids");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agents[0].vm_processes().len(), before.len());
    // Its host may have been marked down while it was away; it reports them again.
    wait_pool(&url, "all running again", Duration::from_secs(30), |vms| {
        vms.values().all(|v| v["state"] == "running")
    });

    // An agent that stops heartbeating: its host is marked down, its VMs lost (not
    // moved); back, they are running again.
    let h3 = agents[2].process.as_ref().unwrap().0.id();
    signal_pid(h3, libc::SIGSTOP);
    wait_pool(&url, "h3 down", Duration::from_secs(30), |vms| {
        vms.values()
            .filter(|v| v["host"] == "h3")
            .all(|v| v["state"] == "lost" && v["host_down"] == true)
    });
    let vms = pool_vms(&url);
    let others: Vec<String> = vms
        .values()
        .filter(|v| v["host"] != "h3" && v["state"] != "running")
        .map(|v| {
            format!(
                "{} on {}: {} ({})",
                v["name"], v["host"], v["state"], v["reason"]
            )
        })
        .collect();
    assert!(
        others.is_empty(),
        "only h3's VMs are lost: {others:?}\n{}",
        agents[0].log()
    );
    signal_pid(h3, libc::SIGCONT);
    wait_pool(&url, "h3 back", Duration::from_secs(30), |vms| {
        vms.values()
            .all(|v| v["state"] == "running" && v["host_down"] == false)
    });

    // PostgreSQL restarted under them: the agents connect again (their VMs run on
    // meanwhile), and go on following the pool.
    server.restart();
    let after: Vec<usize> = agents.iter().map(|a| a.vm_processes().len()).collect();
    assert_eq!(
        after.iter().sum::<usize>(),
        count,
        "a VM died with the database"
    );

    // Deleting every VM through the pool: each agent stops and forgets its own,
    // and the pool releases their allocations.
    for name in placed.keys() {
        pool_vm(&url, &["delete", name]);
    }
    wait_pool(&url, "all deleted", Duration::from_secs(120), |vms| {
        vms.is_empty()
    });
    assert_eq!(allocations(&url), Vec::<Value>::new(), "allocations left");
    for a in &agents {
        assert!(a.local().is_empty(), "agent {} kept VMs", a.host);
        let t0 = Instant::now();
        while !a.vm_processes().is_empty() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            a.vm_processes(),
            Vec::<u32>::new(),
            "VM processes left on {}",
            a.host
        );
    }
    drop(agents);
}
