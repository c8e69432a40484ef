//! `minivmm serve` and `minivmm vm ...`: the agent and its command-line client.
//!
//! main.rs needs the variants `Serve(ServeArgs)` and `Vm(VmArgs)` and an arm each
//! calling [`serve`] and [`vm`], whose value is the process exit status.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::ServeOptions;
use super::client::{self, ClientError};
use super::spec::{DiskRequest, Memory, RestartPolicy, ShareRequest, VmSpec};
use super::supervisor::{AgentConfig, Fleet};
use crate::outln;
use crate::pool::table::Table;
use crate::vmm::{config, status};

/// `minivmm serve` flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The Unix socket to listen on (created mode 0600) [default: $MINIVMM_SOCKET,
    /// else $XDG_RUNTIME_DIR/minivmm/agent.sock, else
    /// ~/.local/state/minivmm/agent.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Let the members of this group use the socket too (mode 0660): they can
    /// then run VMs as the agent's user.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Where the agent keeps each VM's spec, console log and outcome
    /// [default: ~/.local/state/minivmm/agent].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A directory whose kernels, initrds, disk images and shared directories VMs
    /// may use (repeatable; at least one). Paths in requests are relative to it;
    /// nothing outside it can be named, through `..` or symbolic links either.
    #[arg(long, value_name = "DIR", required = true)]
    pub images: Vec<PathBuf>,
    /// The pool the VMs claim their resources in: an SQLite file, where this
    /// agent's API creates VMs (see `minivmm run --help`), or a PostgreSQL pool
    /// shared by many hosts (postgres://...), where the agent starts the VMs that
    /// `minivmm vm create --pool` places on its host (--host-name) and refuses
    /// creations through its socket [default: $MINIVMM_POOL, else a file in
    /// ~/.local/state/minivmm].
    #[arg(long, value_name = "PATH|URL")]
    pub pool: Option<PathBuf>,
    /// With a PostgreSQL pool: the pool's host this agent runs (added beforehand
    /// with `minivmm pool add-host`) [default: this machine's hostname].
    #[arg(long, value_name = "NAME")]
    pub host_name: Option<String>,
    /// With a PostgreSQL pool: how long a host's agent may be silent before the
    /// other agents mark the host down and show its VMs as lost.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub down_after: Duration,
    /// How long a stopped VM may take to end before it is killed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub stop_grace: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
}

/// `minivmm serve`.
pub fn serve(args: ServeArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("minivmm serve: cannot find my own binary to run VMs with: {e}");
            return status::VMM_ERROR;
        }
    };
    let pool = match args.pool.map(Ok).unwrap_or_else(crate::pool::default_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("minivmm serve: {e}; give --pool PATH");
            return status::VMM_ERROR;
        }
    };
    let fleet = match crate::pool::locate(&pool) {
        Ok(crate::pool::Location::Postgres(url)) => {
            let host = match args
                .host_name
                .map(Ok)
                .unwrap_or_else(crate::pool::owner::hostname)
            {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("minivmm serve: {e}; give --host-name NAME");
                    return status::VMM_ERROR;
                }
            };
            Some(Fleet {
                url,
                host,
                down_after: args.down_after,
            })
        }
        Ok(_) if args.host_name.is_some() => {
            eprintln!(
                "minivmm serve: --host-name needs a PostgreSQL pool (--pool postgres://...); \
                 an SQLite pool's agent is its machine's host"
            );
            return status::USAGE;
        }
        Ok(_) => None,
        Err(e) => {
            eprintln!("minivmm serve: {e}");
            return status::USAGE;
        }
    };
    for d in &args.images {
        if !d.is_dir() {
            eprintln!("minivmm serve: --images {}: not a directory", d.display());
            return status::VMM_ERROR;
        }
    }
    let opts = ServeOptions {
        socket: args.socket.unwrap_or_else(client::default_socket),
        group: args.group,
        agent: AgentConfig {
            state_dir: args
                .state_dir
                .unwrap_or_else(|| client::state_home().join("minivmm/agent")),
            images: args.images,
            pool,
            exe,
            stop_grace: args.stop_grace,
            fleet,
        },
    };
    match super::serve(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("minivmm serve: {e}");
            status::VMM_ERROR
        }
    }
}

/// `minivmm vm`: talk to the agent.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// The agent's socket [default: as `minivmm serve`'s].
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Print the agent's JSON instead of tables and sentences.
    #[arg(long, global = true)]
    pub json: bool,
    /// Talk to a shared PostgreSQL pool (postgres://...) instead of one agent:
    /// `create` places the VM with the scheduler and its host's agent starts it;
    /// `list` and `show` give every VM of the pool with its host; `delete` asks its
    /// agent to stop and remove it.
    #[arg(long, value_name = "URL", global = true)]
    pub pool: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: VmCommand,
}

/// The `vm` subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM and start it; returns once its vCPUs run
    Create(Box<CreateArgs>),
    /// List the agent's VMs
    List,
    /// Show one VM
    Show {
        /// The VM
        name: String,
    },
    /// Stop a VM (it stays listed, as exited)
    Stop {
        /// The VM
        name: String,
        /// Return only once it has ended
        #[arg(long)]
        wait: bool,
    },
    /// Stop a VM if it runs, and remove it with its files
    Delete {
        /// The VM
        name: String,
    },
    /// Print a VM's console and go on printing what it writes until it ends
    Console {
        /// The VM
        name: String,
    },
    /// Print a VM's console log so far
    Logs {
        /// The VM
        name: String,
    },
}

/// `minivmm vm create` flags: what `POST /v1/vms` takes.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Unique name of the VM on this agent
    pub name: String,
    /// Kernel image, relative to one of the agent's --images directories
    #[arg(long, value_name = "FILE")]
    pub kernel: String,
    /// Initial ramdisk, relative to an --images directory
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<String>,
    /// Kernel command line
    #[arg(long)]
    pub cmdline: Option<String>,
    /// vCPUs
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory: 512M, 1.5G; a bare number is MiB
    #[arg(long, default_value = "128M")]
    pub memory: String,
    /// A raw disk image in an --images directory (repeatable; `,ro` read-only)
    #[arg(long, value_name = "FILE[,ro]")]
    pub disk: Vec<String>,
    /// A directory in an --images directory shared over virtio-fs (repeatable)
    #[arg(long, value_name = "DIR[,tag=TAG][,ro]")]
    pub share: Vec<String>,
    /// A label (repeatable)
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// Anti-affinity group: refused when a VM of it runs on this host
    #[arg(long)]
    pub group: Option<String>,
    /// Start it again when it ends: never, on-failure (non-zero status), always
    #[arg(long, value_enum, default_value = "never")]
    pub restart: RestartArg,
}

/// `--restart`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RestartArg {
    /// Leave it ended
    Never,
    /// Start it again after a non-zero status
    OnFailure,
    /// Start it again however it ended
    Always,
}

impl CreateArgs {
    fn spec(&self) -> Result<VmSpec, String> {
        let disks = self
            .disk
            .iter()
            .map(|d| {
                let (path, ro) = match d.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (d.as_str(), false),
                };
                DiskRequest {
                    path: path.to_string(),
                    read_only: ro,
                }
            })
            .collect();
        let shares = self
            .share
            .iter()
            .map(|s| {
                let spec: config::ShareSpec =
                    s.parse().map_err(|e: config::ConfigError| e.to_string())?;
                Ok(ShareRequest {
                    path: spec.path.display().to_string(),
                    tag: spec.tag,
                    read_only: spec.read_only,
                })
            })
            .collect::<Result<_, String>>()?;
        let labels = self
            .label
            .iter()
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("--label {l:?}: write KEY=VALUE"))
            })
            .collect::<Result<_, String>>()?;
        Ok(VmSpec {
            name: self.name.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            memory: Memory::Text(self.memory.clone()),
            disks,
            shares,
            labels,
            group: self.group.clone(),
            restart: match self.restart {
                RestartArg::Never => RestartPolicy::Never,
                RestartArg::OnFailure => RestartPolicy::OnFailure,
                RestartArg::Always => RestartPolicy::Always,
            },
        })
    }
}

/// `minivmm vm ...`: 0 when the agent did it, 1 when it refused (its message is
/// printed), 125 when it could not be reached.
pub fn vm(args: VmArgs) -> i32 {
    if let Some(url) = &args.pool {
        return pool_vm(url, &args);
    }
    let socket = args.socket.clone().unwrap_or_else(client::default_socket);
    let call =
        |method: &str, path: &str, body: Option<String>| -> Result<(u16, Vec<u8>), ClientError> {
            let mut out = Vec::new();
            let st = client::request(&socket, method, path, body, |_, c| out.extend_from_slice(c))?;
            Ok((st, out))
        };
    let result = match &args.command {
        VmCommand::Create(c) => match c.spec() {
            Ok(spec) => {
                let body = serde_json::to_string(&spec).unwrap_or_default();
                call("POST", "/v1/vms", Some(body))
            }
            Err(e) => {
                eprintln!("minivmm vm create: {e}");
                return status::USAGE;
            }
        },
        VmCommand::List => call("GET", "/v1/vms", None),
        VmCommand::Show { name } => call("GET", &format!("/v1/vms/{name}"), None),
        VmCommand::Stop { name, wait } => {
            let q = if *wait { "?wait=1" } else { "" };
            call("POST", &format!("/v1/vms/{name}/stop{q}"), None)
        }
        VmCommand::Delete { name } => call("DELETE", &format!("/v1/vms/{name}"), None),
        VmCommand::Logs { name } => call("GET", &format!("/v1/vms/{name}/console"), None),
        VmCommand::Console { name } => {
            // Streamed: each chunk goes out as it comes.
            let path = format!("/v1/vms/{name}/console?follow=1");
            let mut failed = Vec::new();
            let st = client::request(&socket, "GET", &path, None, |st, c| {
                if st == 200 {
                    crate::output::print(format_args!("{}", String::from_utf8_lossy(c)));
                } else {
                    failed.extend_from_slice(c);
                }
            });
            return match st {
                Ok(200) => 0,
                Ok(st) => report_error(st, &failed),
                Err(e) => {
                    eprintln!("minivmm vm: {e}");
                    status::VMM_ERROR
                }
            };
        }
    };
    let (st, body) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("minivmm vm: {e}");
            return status::VMM_ERROR;
        }
    };
    if !(200..300).contains(&st) {
        return report_error(st, &body);
    }
    if let VmCommand::Logs { .. } = args.command {
        crate::output::print(format_args!("{}", String::from_utf8_lossy(&body)));
        return 0;
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if args.json {
        outln!("{}", if v.is_null() { json!({}) } else { v });
        return 0;
    }
    match &args.command {
        VmCommand::List => print_table(&v),
        VmCommand::Delete { name } => outln!("deleted {name}"),
        _ => print_vm(&v),
    }
    0
}

fn report_error(st: u16, body: &[u8]) -> i32 {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let msg = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    eprintln!("minivmm vm: {msg} (HTTP {st})");
    1
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn print_table(v: &Value) {
    let mut t = Table::new(&[
        "NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "EXIT", "REASON", "PID",
    ]);
    for vm in v.as_array().into_iter().flatten() {
        t.row(vec![
            cell(&vm["name"]),
            cell(&vm["state"]),
            cell(&vm["vcpus"]),
            format!("{}M", cell(&vm["memory_mib"])),
            vm["uptime_s"]
                .as_f64()
                .map(|s| format!("{s:.0}s"))
                .unwrap_or_else(|| "-".into()),
            cell(&vm["exit_code"]),
            cell(&vm["reason"]),
            cell(&vm["pid"]),
        ]);
    }
    crate::output::print(format_args!("{}", t.render()));
}

fn print_vm(v: &Value) {
    for key in [
        "name",
        "state",
        "pid",
        "exit_code",
        "reason",
        "error",
        "kernel",
        "vcpus",
        "memory_mib",
        "restart",
        "restarts",
        "uptime_s",
        "console_bytes",
    ] {
        if !v[key].is_null() {
            outln!("{key:<14} {}", cell(&v[key]));
        }
    }
}

/// `minivmm vm --pool URL ...`: the pool's VMs, through the database.
fn pool_vm(url: &str, args: &VmArgs) -> i32 {
    use crate::pool::{Ledger, Location, PoolError, PostgresStore, locate};
    use crate::scheduler::{Request, ScheduleError, Scheduler};
    if !matches!(locate(std::path::Path::new(url)), Ok(Location::Postgres(_))) {
        eprintln!(
            "minivmm vm: --pool {url:?}: not a postgres:// URL; VMs of a one-machine pool \
             are created through its agent's socket (--socket)"
        );
        return status::USAGE;
    }
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("minivmm vm: {e}");
        1
    };
    let find = |name: &str| -> Result<crate::pool::postgres::fleet::VmRecord, PoolError> {
        PostgresStore::open(url)?
            .vms(None)?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| PoolError::UnknownVm(name.to_string()))
    };
    match &args.command {
        VmCommand::Create(c) => {
            let spec = match c.spec() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("minivmm vm create: {e}");
                    return status::USAGE;
                }
            };
            if !super::spec::valid_name(&spec.name) {
                eprintln!(
                    "minivmm vm create: {}",
                    super::spec::SpecError::Name(spec.name.clone())
                );
                return status::USAGE;
            }
            let memory_mib = match &spec.memory {
                super::spec::Memory::Mib(m) => Ok(*m),
                super::spec::Memory::Text(t) => {
                    config::parse_memory_mib(t).map_err(|e| e.to_string())
                }
            };
            let memory_mib = match memory_mib {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("minivmm vm create: --memory: {e}");
                    return status::USAGE;
                }
            };
            let mut req = Request::new(
                &spec.name,
                crate::pool::Amounts::new(spec.vcpus.into(), memory_mib, 0),
            );
            req.group = spec.group.clone();
            req.vm_spec = Some(serde_json::to_string(&spec).unwrap_or_default());
            let placed = Ledger::open(Some(std::path::Path::new(url)))
                .map_err(ScheduleError::from)
                .and_then(|l| Scheduler::new(l).place(&req));
            match placed {
                Ok(p) => {
                    if args.json {
                        outln!(
                            "{}",
                            json!({"name": spec.name, "host": p.host, "allocation": p.allocation_id})
                        );
                    } else {
                        outln!(
                            "placed {} on {} (allocation {})",
                            spec.name,
                            p.host,
                            p.allocation_id
                        );
                    }
                    0
                }
                Err(e) => fail(&e),
            }
        }
        VmCommand::List => match PostgresStore::open(url).and_then(|mut s| s.vms(None)) {
            Ok(vms) if args.json => {
                outln!("{}", serde_json::to_value(&vms).unwrap_or_default());
                0
            }
            Ok(vms) => {
                let mut t = Table::new(&["NAME", "HOST", "STATE", "DESIRED", "EXIT", "REASON"]);
                for v in &vms {
                    let host = if v.host_down {
                        format!("{} (down)", v.host)
                    } else {
                        v.host.clone()
                    };
                    t.row(vec![
                        v.name.clone(),
                        host,
                        v.state.clone(),
                        v.desired.clone(),
                        v.status.map_or("-".into(), |s| s.to_string()),
                        v.reason.clone().unwrap_or_else(|| "-".into()),
                    ]);
                }
                crate::output::print(format_args!("{}", t.render()));
                0
            }
            Err(e) => fail(&e),
        },
        VmCommand::Show { name } => match find(name) {
            Ok(v) => {
                let v = serde_json::to_value(&v).unwrap_or_default();
                if args.json {
                    outln!("{v}");
                } else {
                    for (k, val) in v.as_object().into_iter().flatten() {
                        outln!("{k:<14} {}", cell(val));
                    }
                }
                0
            }
            Err(e) => fail(&e),
        },
        VmCommand::Delete { name } => {
            match PostgresStore::open(url).and_then(|mut s| s.request_delete(name)) {
                Ok(v) => {
                    if !args.json {
                        outln!("deleting {name} on {}", v.host);
                    }
                    0
                }
                Err(e) => fail(&e),
            }
        }
        _ => {
            eprintln!(
                "minivmm vm: with --pool, only create, list, show and delete; stop, console \
                 and logs go to the VM's agent (--socket) on its host"
            );
            status::USAGE
        }
    }
}
