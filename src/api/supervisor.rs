//! The agent's VMs: one `minivmm run` child process per VM, watched by a thread
//! each, with what the agent knows kept in memory and on disk under
//! `STATE_DIR/vms/NAME/`, so that a restarted agent adopts the VMs still running:
//!
//! | file         | written by | holds                                          |
//! |--------------|------------|------------------------------------------------|
//! | spec.json    | agent      | the request and its resolved paths             |
//! | run.json     | agent      | the VM process: pid, start time, restarts      |
//! | console.log  | VM process | the serial console (`run --serial-out`)        |
//! | outcome.json | VM process | how it ended (`run --json-out`)                |
//! | stderr.log   | VM process | its error messages                             |
//!
//! A VM process is started in a session of its own (setsid), so a signal to the
//! agent's process group, or the agent's death, never reaches it. It claims its
//! own resources in the ledger (the claim's owner is its pid and start time), tells
//! the agent through a pipe (`--ready-fd`) once its vCPUs run, and releases the
//! claim itself when it ends; one that is killed leaves a stale claim that the
//! agent's `gc` releases.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ApiError;
use super::spec::{Resolved, RestartPolicy, VmSpec};
use crate::pool::Ledger;
use crate::pool::owner::process_start_time;

/// How long a VM process may take from start to running vCPUs before the agent
/// gives up on it (building a VM takes milliseconds; a big kernel and initrd on a
/// slow disk, seconds).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a VM process may take to end after SIGTERM before it is killed: its
/// teardown takes milliseconds, so this is only for one that is stuck.
const KILL_AFTER: Duration = Duration::from_secs(5);

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its process is being started (or restarted after a backoff).
    Starting,
    /// Its vCPUs run.
    Running,
    /// A stop was asked for; the process has not ended yet.
    Stopping,
    /// It ended: the guest ended it (reset, poweroff, debug-exit), or it was
    /// stopped.
    Exited,
    /// It ended through a failure: the guest triple-faulted, KVM could not run it,
    /// minivmm failed, or its process died without a report (SIGKILL).
    Failed,
}

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent keeps its VMs' files.
    pub state_dir: PathBuf,
    /// Where kernels, initrds, disks and shares must be.
    pub images: Vec<PathBuf>,
    /// The pool file the VM processes claim their resources in.
    pub pool: PathBuf,
    /// The minivmm binary the VM processes run.
    pub exe: PathBuf,
    /// How long a stopped VM may take to end before it is killed.
    pub stop_grace: Duration,
    /// Set when the agent serves a host of a shared (PostgreSQL) pool: it starts
    /// the VMs the pool places on that host, instead of taking them from its API.
    pub fleet: Option<Fleet>,
}

/// An agent's place in a shared pool.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The pool's postgres:// URL.
    pub url: String,
    /// The pool's host this agent serves.
    pub host: String,
    /// How long an agent may be silent before other agents mark its host down.
    pub down_after: Duration,
}

/// What the VM process file run.json says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunFile {
    pid: u32,
    /// In clock ticks since boot (/proc/PID/stat field 22), to tell the process
    /// from a later one that got its pid.
    start_time: u64,
    /// Seconds since the epoch.
    started_at: f64,
    restarts: u32,
}

/// spec.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SpecFile {
    spec: VmSpec,
    resolved: Resolved,
    created_at: f64,
}

struct Record {
    spec: VmSpec,
    resolved: Resolved,
    state: State,
    created_at: f64,
    run: Option<RunFile>,
    /// The VM process's summary once it ended (outcome.json).
    outcome: Option<Value>,
    /// Why it failed, when the outcome does not say.
    error: Option<String>,
    restarts: u32,
    /// Bumped for every process started, so a watcher of an old one cannot
    /// overwrite what a newer one did.
    generation: u64,
    /// A stop or delete was asked for: no restart.
    stop_requested: bool,
    /// Its process has been started and has not said yet that it runs.
    spawning: bool,
}

/// The VMs of this agent.
pub struct Supervisor {
    cfg: AgentConfig,
    vms: Mutex<BTreeMap<String, Record>>,
    /// Signalled on every state change.
    changed: Condvar,
    started: Instant,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("cannot {what}: {e}"))
}

/// Whether the process `pid` is the one that started at `start_time`, and has not
/// ended.
fn alive(pid: u32, start_time: u64) -> bool {
    crate::pool::owner::process_alive(pid, start_time)
}

impl Supervisor {
    /// Opens the agent's state: creates the directories and the local host in the
    /// ledger, releases claims of VM processes that died while no agent ran, and
    /// adopts every VM found under the state directory (running ones are watched
    /// again; ended ones are listed with their outcome).
    pub fn open(cfg: AgentConfig) -> Result<Arc<Supervisor>, ApiError> {
        std::fs::create_dir_all(cfg.state_dir.join("vms"))
            .map_err(internal("create the state directory"))?;
        let sup = Arc::new(Supervisor {
            cfg,
            vms: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            started: Instant::now(),
        });
        match &sup.cfg.fleet {
            // The pool's hosts are the operator's (`pool add-host`): this agent's
            // must be one of them; what its VMs hold is the placement's allocation.
            Some(f) => {
                sup.ledger()?
                    .store()
                    .host(&f.host)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            None => {
                sup.ledger()?
                    .init_local()
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                sup.gc();
            }
        }
        sup.adopt_all()?;
        Ok(sup)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Record>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ledger(&self) -> Result<Ledger, ApiError> {
        Ledger::open(Some(&self.cfg.pool))
            .map_err(|e| ApiError::Internal(format!("cannot open the pool: {e}")))
    }

    /// Releases the claims of VM processes that died without releasing them (a
    /// shared pool's VMs hold their placement's allocation instead).
    fn gc(&self) {
        if self.cfg.fleet.is_some() {
            return;
        }
        match self.ledger().map(|l| l.gc()) {
            Ok(Ok(released)) if !released.is_empty() => {
                log::info!("released {} stale claim(s)", released.len())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::warn!("pool gc: {e}"),
            Err(e) => log::warn!("pool gc: {e}"),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(name)
    }

    /// Reads every VM directory; see [`Supervisor::open`].
    fn adopt_all(self: &Arc<Self>) -> Result<(), ApiError> {
        let entries = std::fs::read_dir(self.cfg.state_dir.join("vms"))
            .map_err(internal("read the state directory"))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let spec: SpecFile = match read_json(&dir.join("spec.json")) {
                Some(s) => s,
                None => {
                    // A create that died before its spec was written: nothing ran.
                    log::warn!("removing {}: it has no spec.json", dir.display());
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
            };
            // No run.json: an agent killed between starting the VM process and
            // recording it. The process names its console file on its command line.
            let run: Option<RunFile> = read_json(&dir.join("run.json"))
                .or_else(|| find_vm_process(&dir.join("console.log")));
            let outcome: Option<Value> = read_json(&dir.join("outcome.json"));
            let mut rec = Record {
                spec: spec.spec,
                resolved: spec.resolved,
                state: State::Failed,
                created_at: spec.created_at,
                restarts: run.as_ref().map_or(0, |r| r.restarts),
                run: run.clone(),
                outcome: None,
                error: None,
                generation: 1,
                stop_requested: false,
                spawning: false,
            };
            let live = run.as_ref().filter(|r| alive(r.pid, r.start_time));
            match live {
                Some(r) => {
                    log::info!("adopted VM {name} (pid {})", r.pid);
                    rec.state = State::Running;
                    let (pid, gen_) = (r.pid, rec.generation);
                    self.lock().insert(name.clone(), rec);
                    let sup = self.clone();
                    std::thread::spawn(move || {
                        wait_pid(pid);
                        sup.ended(&name, gen_, None);
                    });
                }
                None => {
                    classify(&mut rec, outcome, None);
                    self.lock().insert(name, rec);
                }
            }
        }
        Ok(())
    }

    /// `POST /v1/vms`: checks the request, records the VM, starts its process and
    /// returns once its vCPUs run (or why they never will).
    pub fn create(self: &Arc<Self>, spec: VmSpec) -> Result<Value, ApiError> {
        if let Some(f) = &self.cfg.fleet {
            return Err(in_fleet(f, "create"));
        }
        self.start_new(spec)
    }

    /// Creates and starts a VM: the API's create, and a shared pool's placement.
    pub fn start_new(self: &Arc<Self>, spec: VmSpec) -> Result<Value, ApiError> {
        let resolved = spec
            .resolve(&self.cfg.images)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let name = spec.name.clone();
        {
            let mut vms = self.lock();
            if vms.contains_key(&name) {
                return Err(ApiError::Conflict(format!(
                    "a VM named {name} exists already"
                )));
            }
            vms.insert(
                name.clone(),
                Record {
                    spec: spec.clone(),
                    resolved: resolved.clone(),
                    state: State::Starting,
                    created_at: now(),
                    run: None,
                    outcome: None,
                    error: None,
                    restarts: 0,
                    generation: 0,
                    stop_requested: false,
                    spawning: false,
                },
            );
        }
        let created = self.write_spec(&name).and_then(|()| self.start_run(&name));
        if let Err(e) = created {
            // It never ran: nothing of it stays.
            self.lock().remove(&name);
            let _ = std::fs::remove_dir_all(self.dir(&name));
            self.changed.notify_all();
            return Err(e);
        }
        self.get(&name)
    }

    fn write_spec(&self, name: &str) -> Result<(), ApiError> {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).map_err(internal("create the VM's directory"))?;
        let file = {
            let vms = self.lock();
            let r = vms.get(name).ok_or_else(|| gone(name))?;
            SpecFile {
                spec: r.spec.clone(),
                resolved: r.resolved.clone(),
                created_at: r.created_at,
            }
        };
        write_json(&dir.join("spec.json"), &file)
    }

    /// Starts the VM's process and waits until it runs; then a thread watches it.
    fn start_run(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let (spec, resolved, generation) = {
            let mut vms = self.lock();
            let r = vms.get_mut(name).ok_or_else(|| gone(name))?;
            r.generation += 1;
            r.state = State::Starting;
            (r.spec.clone(), r.resolved.clone(), r.generation)
        };
        let dir = self.dir(name);
        let _ = std::fs::remove_file(dir.join("outcome.json"));
        let _ = std::fs::remove_file(dir.join("run.json"));
        let (mut process, ready_pipe) = self.spawn(&dir, &spec, &resolved)?;
        let pid = process.id();
        // Recorded before the wait, so that an agent killed meanwhile finds (and
        // adopts, or accounts for) the VM process when it comes back.
        let run = process_start_time(pid).map(|start_time| RunFile {
            pid,
            start_time,
            started_at: now(),
            restarts: self.lock().get(name).map_or(0, |r| r.restarts),
        });
        if let Some(run) = &run {
            write_json(&dir.join("run.json"), run)?;
            let mut vms = self.lock();
            if let Some(r) = vms.get_mut(name) {
                r.run = Some(run.clone());
                r.spawning = true;
            }
        }
        let ready = run.is_some() && wait_ready(ready_pipe, READY_TIMEOUT);
        let mut vms = self.lock();
        let rec = vms.get_mut(name);
        let (true, Some(r), Some(run)) = (ready, rec, run) else {
            drop(vms);
            // It is ending (or hung) before its vCPUs ran: it tells why in
            // outcome.json, written after it closed the pipe, so give it time.
            let deadline = Instant::now() + Duration::from_secs(10);
            while process.try_wait().ok().flatten().is_none() {
                if Instant::now() >= deadline {
                    let _ = process.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let status = process.wait().ok();
            let outcome: Option<Value> = read_json(&dir.join("outcome.json"));
            let err = start_failure(outcome.as_ref(), &dir);
            let mut vms = self.lock();
            if let Some(r) = vms.get_mut(name) {
                // A stop that came while it started: that is how it ended.
                r.spawning = false;
                classify(r, outcome, status);
            }
            drop(vms);
            self.changed.notify_all();
            return Err(err);
        };
        r.spawning = false;
        r.outcome = None;
        r.error = None;
        r.state = State::Running;
        if r.stop_requested {
            // Stopped while it was starting: it ends now.
            r.state = State::Stopping;
            signal(run.pid, run.start_time, libc::SIGTERM);
        }
        drop(vms);
        self.changed.notify_all();
        let sup = self.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                let status = process.wait().ok();
                sup.ended(&name, generation, status);
            })
            .map_err(internal("start a watcher thread"))?;
        Ok(())
    }

    /// Starts `minivmm run` for the VM; returns it and the pipe its ready line
    /// comes on.
    fn spawn(&self, dir: &Path, spec: &VmSpec, r: &Resolved) -> Result<(Child, OwnedFd), ApiError> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(internal("create a pipe")(std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just returned these two descriptors, owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let stderr = File::create(dir.join("stderr.log")).map_err(internal("create stderr.log"))?;
        let mut cmd = Command::new(&self.cfg.exe);
        cmd.arg("run").arg("--kernel").arg(&r.kernel);
        if let Some(i) = &r.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(c) = &spec.cmdline {
            cmd.arg("--cmdline").arg(c);
        }
        cmd.arg("--vcpus").arg(spec.vcpus.to_string());
        cmd.arg("--memory").arg(r.memory_mib.to_string());
        for d in &r.disks {
            let ro = if d.read_only { ",ro" } else { "" };
            cmd.arg("--disk").arg(format!("{}{ro}", d.path.display()));
        }
        for s in &r.shares {
            let mut arg = s.path.display().to_string();
            if let Some(t) = &s.tag {
                arg += &format!(",tag={t}");
            }
            if s.read_only {
                arg += ",ro";
            }
            cmd.arg("--share").arg(arg);
        }
        cmd.arg("--serial-out").arg(dir.join("console.log"));
        cmd.arg("--json-out").arg(dir.join("outcome.json"));
        cmd.arg("--name").arg(&spec.name);
        if self.cfg.fleet.is_some() {
            // Its resources are held by its placement's allocation in the pool.
            cmd.arg("--no-ledger");
        } else {
            if let Some(g) = &spec.group {
                cmd.arg("--group").arg(g);
            }
            cmd.arg("--pool").arg(&self.cfg.pool);
        }
        cmd.arg("--ready-fd").arg("3");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let wr_fd = wr.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: the agent's terminal, process group and death
                // do not reach the VM.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The ready pipe as fd 3, open across exec.
                if wr_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else if libc::dup2(wr_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = cmd.spawn().map_err(internal("start the VM process"))?;
        drop(wr);
        Ok((process, rd))
    }

    /// A VM process ended (`status` when it was our child): records how, and
    /// starts it again if its restart policy says so.
    fn ended(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) {
        // A process that was killed could not release its claim: release it before
        // the VM is shown as ended, so that whoever sees it ended sees its capacity back.
        if status.is_none_or(|s| s.code().is_none()) {
            self.gc();
        }
        let outcome: Option<Value> = read_json(&self.dir(name).join("outcome.json"));
        let restart = {
            let mut vms = self.lock();
            let Some(r) = vms.get_mut(name) else {
                return;
            };
            if r.generation != generation {
                return;
            }
            classify(r, outcome, status);
            let code = r.outcome.as_ref().and_then(|o| o["exit_code"].as_i64());
            let wanted = match r.spec.restart {
                RestartPolicy::Never => false,
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => code != Some(0),
            };
            if wanted && !r.stop_requested {
                r.restarts += 1;
                r.state = State::Starting;
                Some(Duration::from_secs(1 << r.restarts.min(6)).min(Duration::from_secs(60)))
            } else {
                None
            }
        };
        self.changed.notify_all();
        if let Some(backoff) = restart {
            log::info!("VM {name} ended; starting it again in {backoff:?}");
            std::thread::sleep(backoff);
            let still = self
                .lock()
                .get(name)
                .is_some_and(|r| r.generation == generation && !r.stop_requested);
            if still && let Err(e) = self.start_run(name) {
                let mut vms = self.lock();
                if let Some(r) = vms.get_mut(name) {
                    r.state = State::Failed;
                    r.error = Some(format!("restart failed: {}", e.message()));
                }
                self.changed.notify_all();
            }
        }
    }

    /// `POST /v1/vms/{name}/stop`: a graceful stop. SIGPWR to the VM process, which
    /// presses the guest's ACPI power button (a guest that has not enabled the event
    /// is stopped at once instead); if the VM has not ended after the grace period,
    /// SIGTERM, which stops it at once and cleanly (threads joined, claim released,
    /// outcome written); if even that has not ended it [`KILL_AFTER`] later,
    /// SIGKILL. With `wait`, returns when it has ended.
    pub fn stop(self: &Arc<Self>, name: &str, wait: bool) -> Result<Value, ApiError> {
        let target = {
            let mut vms = self.lock();
            let r = vms.get_mut(name).ok_or_else(|| not_found(name))?;
            r.stop_requested = true;
            match r.state {
                State::Running | State::Stopping => {
                    r.state = State::Stopping;
                    r.run.as_ref().map(|run| (run.pid, run.start_time))
                }
                // Its process is starting: it is stopped as soon as it runs.
                State::Starting if r.spawning => {
                    r.state = State::Stopping;
                    r.run.as_ref().map(|run| (run.pid, run.start_time))
                }
                // Waiting out a restart backoff: it just stays ended.
                State::Starting => {
                    r.state = State::Exited;
                    None
                }
                State::Exited | State::Failed => None,
            }
        };
        self.changed.notify_all();
        if let Some((pid, start_time)) = target {
            // SIGPWR: the VM process presses the guest's ACPI power button, or, if
            // the guest has not enabled that event, stops the VM at once.
            signal(pid, start_time, libc::SIGPWR);
            let sup = self.clone();
            let name2 = name.to_string();
            let escalate = move || {
                if sup.wait_ended(&name2, sup.cfg.stop_grace) {
                    return;
                }
                log::warn!(
                    "VM {name2} did not shut down within {:?}: stopping it",
                    sup.cfg.stop_grace
                );
                signal(pid, start_time, libc::SIGTERM);
                if !sup.wait_ended(&name2, KILL_AFTER) {
                    log::warn!("VM {name2} did not stop: killing it");
                    signal(pid, start_time, libc::SIGKILL);
                }
            };
            if wait {
                escalate();
                self.wait_ended(name, KILL_AFTER);
            } else {
                std::thread::spawn(escalate);
            }
        }
        self.get(name)
    }

    /// Waits until the VM is no longer starting, running or stopping (or is
    /// gone); false if `limit` passed first.
    fn wait_ended(&self, name: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut vms = self.lock();
        loop {
            let busy = vms
                .get(name)
                .is_some_and(|r| matches!(r.state, State::Running | State::Stopping));
            if !busy {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            vms = self
                .changed
                .wait_timeout(vms, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// `DELETE /v1/vms/{name}`: stops the VM (waiting for its end) and forgets it,
    /// with its files; its claim is released.
    pub fn delete(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        if let Some(f) = &self.cfg.fleet {
            return Err(in_fleet(f, "delete"));
        }
        self.remove(name)
    }

    /// Stops a VM, waits for its end, and forgets it with its files.
    pub fn remove(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        self.stop(name, true)?;
        if !self.wait_ended(name, Duration::from_secs(5)) {
            return Err(ApiError::Internal(format!(
                "VM {name} did not end; try again"
            )));
        }
        self.lock().remove(name);
        self.changed.notify_all();
        std::fs::remove_dir_all(self.dir(name)).map_err(internal("remove the VM's files"))?;
        self.gc();
        Ok(())
    }

    /// A VM's state, exit status and failure reason, if the agent has it.
    pub fn brief(&self, name: &str) -> Option<(State, Option<i32>, Option<String>)> {
        let vms = self.lock();
        let r = vms.get(name)?;
        let o = r.outcome.as_ref();
        let code = o
            .and_then(|o| o.get("exit_code"))
            .and_then(Value::as_i64)
            .and_then(|c| i32::try_from(c).ok());
        let reason = r.error.clone().or_else(|| {
            o.and_then(|o| o.get("error").or_else(|| o.get("reason")))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        Some((r.state, code, reason))
    }

    /// `GET /v1/vms/{name}`.
    pub fn get(&self, name: &str) -> Result<Value, ApiError> {
        let vms = self.lock();
        let r = vms.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.view(name, r))
    }

    /// `GET /v1/vms`.
    pub fn list(&self) -> Value {
        let vms = self.lock();
        Value::Array(vms.iter().map(|(n, r)| self.view(n, r)).collect())
    }

    /// The console file of a VM, if it has one yet.
    pub fn console_path(&self, name: &str) -> Result<PathBuf, ApiError> {
        if !self.lock().contains_key(name) {
            return Err(not_found(name));
        }
        Ok(self.dir(name).join("console.log"))
    }

    /// Whether the VM's process may still write to its console.
    pub fn is_live(&self, name: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|r| matches!(r.state, State::Starting | State::Running | State::Stopping))
    }

    fn view(&self, name: &str, r: &Record) -> Value {
        let run = r.run.as_ref();
        let live = matches!(r.state, State::Running | State::Stopping);
        let o = r.outcome.as_ref();
        let console_bytes = std::fs::metadata(self.dir(name).join("console.log"))
            .map(|m| m.len())
            .unwrap_or(0);
        json!({
            "name": name,
            "state": r.state,
            "pid": run.filter(|_| live).map(|r| r.pid),
            "exit_code": o.and_then(|o| o.get("exit_code").cloned()),
            "reason": o.and_then(|o| o.get("reason").cloned()),
            "error": r.error.clone().map(Value::from).or_else(|| o.and_then(|o| o.get("error").cloned())),
            "kernel": r.spec.kernel,
            "vcpus": r.spec.vcpus,
            "memory_mib": r.resolved.memory_mib,
            "disks": r.spec.disks,
            "shares": r.spec.shares,
            "labels": r.spec.labels,
            "group": r.spec.group,
            "restart": r.spec.restart,
            "restarts": r.restarts,
            "created_at": r.created_at,
            "started_at": run.map(|r| r.started_at),
            "uptime_s": run.filter(|_| live).map(|r| (now() - r.started_at).max(0.0)),
            "console_bytes": console_bytes,
            "exits_total": o.and_then(|o| o.get("exits_total").cloned()),
            "devices": o.and_then(|o| o.get("devices").cloned()),
        })
    }

    /// `GET /v1/host`: this host in the ledger (capacity, used, VMs) and the
    /// agent's VMs by state.
    pub fn host(&self) -> Result<Value, ApiError> {
        let ledger = self.ledger()?;
        let host = match &self.cfg.fleet {
            Some(f) => ledger.store().host(&f.host),
            None => ledger.init_local().map(|(h, _)| h),
        }
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(json!({
            "host": host,
            "vms": self.counts(),
            "agent_uptime_s": self.started.elapsed().as_secs_f64(),
        }))
    }

    fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut by: BTreeMap<&'static str, u64> =
            ["starting", "running", "stopping", "exited", "failed"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for r in self.lock().values() {
            *by.entry(state_name(r.state)).or_default() += 1;
        }
        by
    }

    /// `GET /metrics`, in Prometheus' text format.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut m = String::new();
        let _ = writeln!(
            m,
            "# HELP minivmm_vms VMs of this agent by state.\n# TYPE minivmm_vms gauge"
        );
        for (state, n) in self.counts() {
            let _ = writeln!(m, "minivmm_vms{{state=\"{state}\"}} {n}");
        }
        let restarts: u64 = self.lock().values().map(|r| u64::from(r.restarts)).sum();
        let _ = writeln!(
            m,
            "# HELP minivmm_vm_restarts_total Restarts by restart policy.\n# TYPE minivmm_vm_restarts_total counter\nminivmm_vm_restarts_total {restarts}"
        );
        if let Ok(Ok((host, _))) = self.ledger().map(|l| l.init_local()) {
            let _ = writeln!(
                m,
                "# HELP minivmm_host_capacity Usable capacity of this host in the ledger.\n# TYPE minivmm_host_capacity gauge"
            );
            let _ = writeln!(
                m,
                "# HELP minivmm_host_used Claimed capacity of this host in the ledger.\n# TYPE minivmm_host_used gauge"
            );
            for r in crate::pool::Resource::ALL {
                let _ = writeln!(
                    m,
                    "minivmm_host_capacity{{resource=\"{}\"}} {}",
                    r.key(),
                    host.usable(r)
                );
                let _ = writeln!(
                    m,
                    "minivmm_host_used{{resource=\"{}\"}} {}",
                    r.key(),
                    host.used.get(r)
                );
            }
        }
        let _ = writeln!(
            m,
            "# HELP minivmm_agent_uptime_seconds Time since the agent started.\n# TYPE minivmm_agent_uptime_seconds gauge\nminivmm_agent_uptime_seconds {:.3}",
            self.started.elapsed().as_secs_f64()
        );
        m
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Starting => "starting",
        State::Running => "running",
        State::Stopping => "stopping",
        State::Exited => "exited",
        State::Failed => "failed",
    }
}

/// Sets a record's end from the VM process's outcome.json (and exit status).
fn classify(r: &mut Record, outcome: Option<Value>, status: Option<std::process::ExitStatus>) {
    use std::os::unix::process::ExitStatusExt;
    let reason = outcome
        .as_ref()
        .and_then(|o| o["reason"].as_str().map(str::to_string));
    r.state = match reason.as_deref() {
        Some("vmm-error" | "error" | "triple-fault") => State::Failed,
        Some(_) => State::Exited,
        None => State::Failed,
    };
    if reason.is_none() {
        r.error = Some(match status.and_then(|s| s.signal()) {
            Some(sig) => format!("the VM process was killed by signal {sig}"),
            None => "the VM process ended without a report (killed?)".into(),
        });
    }
    r.outcome = outcome;
}

/// Why a VM process ended before it ran, from its outcome.json (already read, as
/// `outcome`) or, when that says nothing, its stderr.log.
fn start_failure(outcome: Option<&Value>, dir: &Path) -> ApiError {
    let msg = outcome
        .and_then(|o| o["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            let stderr = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            match stderr.trim() {
                "" => "the VM process ended before its vCPUs ran, and said nothing".into(),
                s => s.to_string(),
            }
        });
    match outcome.and_then(|o| o["error_kind"].as_str()) {
        Some("refused") => ApiError::Unprocessable(msg),
        Some("invalid") => ApiError::BadRequest(msg),
        _ => ApiError::Internal(msg),
    }
}

/// The API's answer to a create or delete on an agent that follows a shared pool.
fn in_fleet(f: &Fleet, what: &str) -> ApiError {
    ApiError::Conflict(format!(
        "this agent runs host {} of a shared pool: {what} VMs with `minivmm vm {what} --pool URL`, \
         which the scheduler places and this agent then starts",
        f.host
    ))
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no VM named {name}"))
}

fn gone(name: &str) -> ApiError {
    ApiError::Conflict(format!("VM {name} was deleted meanwhile"))
}

/// Sends `sig` to `pid` if it is still the process that started at `start_time`
/// (a pid is reused once its process is gone).
fn signal(pid: u32, start_time: u64, sig: libc::c_int) {
    if alive(pid, start_time) {
        // SAFETY: kill(2) with a checked pid.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

/// Waits for the ready line on `rd`: true if it came, false on end of file (the
/// process ended) or after `limit`.
fn wait_ready(rd: OwnedFd, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: rd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return false;
    }
    let mut f = File::from(rd);
    let mut buf = [0u8; 16];
    matches!(f.read(&mut buf), Ok(n) if buf[..n].starts_with(b"running"))
}

/// Waits until `pid` (not our child: an adopted VM process) has ended, with a
/// pidfd (Linux 5.3+), or by polling /proc where there is none.
fn wait_pid(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: the descriptor was just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a pidfd becomes readable when the process ends.
        while unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {}
        return;
    }
    let start = process_start_time(pid);
    while start.is_some() && process_start_time(pid) == start {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The live `minivmm run` process (found in /proc) whose `--serial-out` is
/// `console`: a VM process the agent started but had no time to record.
fn find_vm_process(console: &Path) -> Option<RunFile> {
    let want = console.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours = args.contains(&&b"run"[..])
            && args
                .windows(2)
                .any(|w| w[0] == b"--serial-out" && w[1] == want);
        let start_time = process_start_time(pid).filter(|_| ours)?;
        alive(pid, start_time).then(|| {
            log::warn!(
                "found the unrecorded VM process {pid} for {}",
                console.display()
            );
            RunFile {
                pid,
                start_time,
                started_at: now(),
                restarts: 0,
            }
        })
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `path` whole or not at all (a temporary file renamed over it), so an
/// agent killed mid-write never leaves half a file to adopt.
fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), ApiError> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(v).map_err(|e| ApiError::Internal(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(internal("write the VM's state"))?;
    std::fs::rename(&tmp, path).map_err(internal("write the VM's state"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unrecorded_vm_process_is_found_by_its_console_file() {
        let console =
            std::env::temp_dir().join(format!("minivmm-find-{}/console.log", std::process::id()));
        assert!(find_vm_process(&console).is_none());
        // A stand-in with the VM process's arguments ("; true" keeps sh from exec'ing).
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; true", "run", "--serial-out"])
            .arg(&console)
            .spawn()
            .expect("start sh");
        let found = (0..200).find_map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            find_vm_process(&console)
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found.map(|r| r.pid), Some(child.id()));
        assert!(
            find_vm_process(&console).is_none(),
            "a reaped process is not found"
        );
    }
}
