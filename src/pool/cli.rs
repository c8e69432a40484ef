//! `minivmm pool ...`: look after the ledger from the command line.
//!
//! main.rs needs one variant `Pool(minivmm::pool::cli::PoolArgs)` and one arm calling
//! [`run`], whose value is the process exit status.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::model::{Amounts, Host, HostSpec, Resource, parse_label};
use super::table::Table;
use super::units::{parse_gib, parse_mib, parse_positive, parse_reserved};
use super::{Allocation, Ledger, PoolError, owner};

/// Options shared by every `pool` and `schedule` command.
#[derive(Debug, Clone, Args)]
pub struct PoolLocation {
    /// The pool: an SQLite file (PATH or sqlite:PATH) or a PostgreSQL database shared
    /// by many hosts (postgres://USER@HOST/DB, or postgresql:///DB?host=/run/postgresql)
    /// [default: $MINIVMM_POOL, else $XDG_STATE_HOME/minivmm/pool.db, else
    /// ~/.local/state/minivmm/pool.db]
    #[arg(long, value_name = "PATH", global = true)]
    pub pool: Option<PathBuf>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    pub json: bool,
}

impl PoolLocation {
    /// Opens the pool these options name.
    pub fn open(&self) -> Result<Ledger, PoolError> {
        Ledger::open(self.pool.as_deref())
    }
}

/// `minivmm pool`: the host-pool ledger.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Where the pool is, and the output format.
    #[command(flatten)]
    pub location: PoolLocation,
    /// What to do.
    #[command(subcommand)]
    pub command: PoolCommand,
}

/// The `pool` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Register this machine with its real capacity (CPUs, MemTotal, free disk)
    Init,
    /// Add a host
    AddHost(Box<AddHostArgs>),
    /// Change a host
    SetHost(Box<SetHostArgs>),
    /// Remove a host (refused while it holds allocations, unless --force)
    RemoveHost {
        /// Host name
        name: String,
        /// Drop its allocations too
        #[arg(long)]
        force: bool,
    },
    /// List hosts
    List,
    /// Use per host and resource, with the management index M = R·T/C
    Status,
    /// List allocations
    Allocations,
    /// Claim resources on a named host
    Claim(ClaimArgs),
    /// Release an allocation
    Release {
        /// Allocation id (see `pool allocations`)
        id: i64,
    },
    /// Release allocations whose owner process is gone
    Gc,
}

/// Flags that describe a host, for add-host and set-host.
#[derive(Debug, Args)]
pub struct HostFlags {
    /// vCPUs kept for the host itself
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub reserved_vcpus: Option<u64>,
    /// Memory kept for the host itself (e.g. 2G)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub reserved_memory: Option<String>,
    /// Disk kept for the host itself (e.g. 20G)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub reserved_disk: Option<String>,
    /// vCPU allocation ratio [default: 4.0]
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub cpu_ratio: Option<String>,
    /// Memory allocation ratio [default: 1.0]
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub mem_ratio: Option<String>,
    /// Disk allocation ratio [default: 1.0]
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    pub disk_ratio: Option<String>,
    /// Cost per hour [default: 1]
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    pub cost: Option<String>,
    /// Hours per day the host is available, T in M = R·T/C [default: 24]
    #[arg(long, value_name = "H", allow_negative_numbers = true)]
    pub hours: Option<String>,
    /// At most N VMs on this host
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_vms: Option<u64>,
    /// Label key=value (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Per-request limits of a resource: RESOURCE=MIN:MAX:STEP, any part may be empty
    /// (e.g. vcpus=1:16:1, memory_mib=::256)
    #[arg(long = "limit", value_name = "RES=MIN:MAX:STEP")]
    pub limits: Vec<String>,
}

/// `pool add-host`.
#[derive(Debug, Args)]
pub struct AddHostArgs {
    /// Host name
    pub name: String,
    /// vCPUs (physical CPUs; the ratio overcommits them)
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: u64,
    /// Memory (e.g. 64G; a bare number is MiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: String,
    /// Disk (e.g. 500G; a bare number is GiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: String,
    /// Add it disabled
    #[arg(long)]
    pub disabled: bool,
    /// The other properties.
    #[command(flatten)]
    pub flags: HostFlags,
}

/// `pool set-host`.
#[derive(Debug, Args)]
pub struct SetHostArgs {
    /// Host name
    pub name: String,
    /// New vCPU total
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: Option<u64>,
    /// New memory total
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// New disk total
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: Option<String>,
    /// Let it take new VMs
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Stop new VMs landing on it (existing ones stay)
    #[arg(long)]
    pub disable: bool,
    /// Remove a label (repeatable)
    #[arg(long, value_name = "KEY")]
    pub unlabel: Vec<String>,
    /// Remove the VM count limit
    #[arg(long, conflicts_with = "max_vms")]
    pub no_max_vms: bool,
    /// The other properties.
    #[command(flatten)]
    pub flags: HostFlags,
}

/// `pool claim`.
#[derive(Debug, Args)]
pub struct ClaimArgs {
    /// Host name
    pub host: String,
    /// vCPUs
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: u64,
    /// Memory (a bare number is MiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: String,
    /// Disk (a bare number is GiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: Option<String>,
    /// VM name
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// Hold the claim as this process until it is killed, instead of until `pool release`
    #[arg(long)]
    pub hold: bool,
}

impl HostFlags {
    /// Applies every flag given to `spec`.
    fn apply(&self, spec: &mut HostSpec) -> Result<(), PoolError> {
        let inv = &mut spec.inventories;
        let (cpu, mem, disk) = (
            Resource::Vcpus.index(),
            Resource::MemoryMib.index(),
            Resource::DiskGib.index(),
        );
        if let Some(n) = self.reserved_vcpus {
            inv[cpu].reserved = n;
        }
        if let Some(s) = &self.reserved_memory {
            inv[mem].reserved = parse_reserved(s, 20)?;
        }
        if let Some(s) = &self.reserved_disk {
            inv[disk].reserved = parse_reserved(s, 30)?;
        }
        for (flag, value, i) in [
            ("cpu ratio", &self.cpu_ratio, cpu),
            ("memory ratio", &self.mem_ratio, mem),
            ("disk ratio", &self.disk_ratio, disk),
        ] {
            if let Some(v) = value {
                inv[i].ratio = parse_positive(flag, v)?;
            }
        }
        if let Some(c) = &self.cost {
            spec.cost = parse_positive("cost", c)?;
        }
        if let Some(h) = &self.hours {
            spec.hours = parse_positive("hours", h)?;
        }
        if let Some(m) = self.max_vms {
            spec.max_vms = Some(m);
        }
        for l in &self.labels {
            let (k, v) = parse_label(l)?;
            spec.labels.insert(k, v);
        }
        for l in &self.limits {
            apply_limit(spec, l)?;
        }
        Ok(())
    }
}

/// Parses RESOURCE=MIN:MAX:STEP into the host's inventory.
fn apply_limit(spec: &mut HostSpec, text: &str) -> Result<(), PoolError> {
    let bad = || {
        PoolError::Invalid(format!(
            "limit {text:?} must look like vcpus=MIN:MAX:STEP (resources: vcpus, memory_mib, disk_gib)"
        ))
    };
    let (key, parts) = text.split_once('=').ok_or_else(bad)?;
    let r = Resource::from_key(key).ok_or_else(bad)?;
    let parts: Vec<&str> = parts.split(':').collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut values = [None; 3];
    for (slot, p) in values.iter_mut().zip(&parts) {
        if !p.is_empty() {
            *slot = Some(p.parse::<u64>().map_err(|_| bad())?);
        }
    }
    let inv = &mut spec.inventories[r.index()];
    (inv.min_unit, inv.max_unit, inv.step) = (values[0], values[1], values[2]);
    Ok(())
}

/// Runs one `pool` command; returns the exit status. A command that fails on a pool it
/// created leaves no file behind.
pub fn run(args: PoolArgs) -> Result<i32, PoolError> {
    let ledger = args.location.open()?;
    let result = execute(&ledger, args.command, args.location.json);
    if result.is_err() {
        ledger.discard_if_unused();
    }
    result
}

/// Runs one `pool` command on an open ledger.
fn execute(ledger: &Ledger, command: PoolCommand, json: bool) -> Result<i32, PoolError> {
    match command {
        PoolCommand::Init => {
            let (host, added) = ledger.init_local()?;
            if json {
                print_json(&json!({"added": added, "host": host}));
            } else if added {
                crate::outln!("registered this machine as host {}", host.spec.name);
                crate::out!("{}", hosts_table(&[host]));
            } else {
                crate::outln!("this machine is already host {}", host.spec.name);
            }
        }
        PoolCommand::AddHost(a) => {
            let mut spec =
                HostSpec::new(&a.name, a.vcpus, parse_mib(&a.memory)?, parse_gib(&a.disk)?);
            spec.enabled = !a.disabled;
            a.flags.apply(&mut spec)?;
            let host = ledger.add_host(&spec)?;
            show_host(json, "added", host);
        }
        PoolCommand::SetHost(a) => {
            let host = ledger.set_host(&a.name, |spec| edit_host(&a, spec))?;
            show_host(json, "updated", host);
        }
        PoolCommand::RemoveHost { name, force } => {
            let dropped = ledger.store().remove_host(&name, force)?;
            if json {
                print_json(&json!({"removed": name, "released_allocations": dropped}));
            } else {
                crate::outln!("removed host {name} ({dropped} allocation(s) released)");
            }
        }
        PoolCommand::List => {
            let hosts = ledger.store().hosts()?;
            if json {
                print_json(&json!(hosts));
            } else {
                crate::out!("{}", hosts_table(&hosts));
            }
        }
        PoolCommand::Status => status(ledger, json)?,
        PoolCommand::Allocations => {
            let allocs = ledger.store().allocations()?;
            if json {
                print_json(&json!(allocs));
            } else {
                crate::out!("{}", allocations_table(&allocs));
            }
        }
        PoolCommand::Claim(c) => return claim(ledger, &c, json),
        PoolCommand::Release { id } => {
            let a = ledger.release(id)?;
            if json {
                print_json(&json!({"released": a}));
            } else {
                crate::outln!("released allocation {id} of VM {} on {}", a.vm_name, a.host);
            }
        }
        PoolCommand::Gc => {
            let released = ledger.gc()?;
            if json {
                print_json(&json!({"released": released}));
            } else {
                crate::outln!("released {} stale allocation(s)", released.len());
                if !released.is_empty() {
                    crate::out!("{}", allocations_table(&released));
                }
            }
        }
    }
    Ok(0)
}

/// Applies set-host's flags.
fn edit_host(a: &SetHostArgs, spec: &mut HostSpec) -> Result<(), PoolError> {
    if let Some(n) = a.vcpus {
        spec.inventories[Resource::Vcpus.index()].total = n;
    }
    if let Some(m) = &a.memory {
        spec.inventories[Resource::MemoryMib.index()].total = parse_mib(m)?;
    }
    if let Some(d) = &a.disk {
        spec.inventories[Resource::DiskGib.index()].total = parse_gib(d)?;
    }
    if a.enable {
        spec.enabled = true;
    }
    if a.disable {
        spec.enabled = false;
    }
    if a.no_max_vms {
        spec.max_vms = None;
    }
    for k in &a.unlabel {
        if spec.labels.remove(k).is_none() {
            return Err(PoolError::Invalid(format!(
                "host {} has no label {k:?}",
                spec.name
            )));
        }
    }
    a.flags.apply(spec)
}

/// `pool claim`.
fn claim(ledger: &Ledger, c: &ClaimArgs, json: bool) -> Result<i32, PoolError> {
    let disk = c.disk.as_deref().map(parse_gib).transpose()?.unwrap_or(0);
    let amounts = Amounts::new(c.vcpus, parse_mib(&c.memory)?, disk);
    let holder = if c.hold {
        Some(owner::current()?)
    } else {
        None
    };
    let a = ledger.claim_on(&c.host, &c.name, amounts, holder)?;
    if json {
        print_json(&json!(a));
    } else {
        crate::outln!("allocation {} on {}", a.id, a.host);
    }
    if c.hold {
        // Tests and scripts wait for that line (printed and flushed), then kill us: the
        // claim goes stale. With nobody reading, the claim is still held until killed.
        crate::output::report_lost(format_args!(
            "allocation {} on {} is held by this process until it is killed",
            a.id, a.host
        ));
        loop {
            std::thread::park();
        }
    }
    crate::output::report_lost(format_args!(
        "allocation {} on {} was claimed and stays claimed: `minivmm pool release {}` frees it",
        a.id, a.host, a.id
    ));
    Ok(0)
}

/// Prints one host after a change.
fn show_host(json: bool, verb: &str, host: Host) {
    if json {
        print_json(&json!(host));
    } else {
        crate::outln!("{verb} host {}", host.spec.name);
        crate::out!("{}", hosts_table(&[host]));
    }
}

/// Prints a JSON value on one line (through [`crate::output`]: never panics).
pub fn print_json(v: &serde_json::Value) {
    crate::outln!("{v}");
}

/// "used/usable" of one resource, with the inventory's total, reserved and ratio.
fn capacity(h: &Host, r: Resource) -> String {
    let inv = h.spec.inventory(r);
    let mut s = format!("{}/{}", h.used.get(r), inv.usable());
    if inv.reserved > 0 || inv.ratio != 1.0 {
        s.push_str(&format!(" ({}-{})x{}", inv.total, inv.reserved, inv.ratio));
    }
    s
}

/// The host table of `pool list`.
fn hosts_table(hosts: &[Host]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "STATE",
        "VCPUS",
        "MEMORY_MIB",
        "DISK_GIB",
        "VMS",
        "COST",
        "GEN",
        "LABELS",
    ]);
    for h in hosts {
        let labels: Vec<String> = h
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let vms = match h.spec.max_vms {
            Some(m) => format!("{}/{m}", h.vms),
            None => h.vms.to_string(),
        };
        t.row(vec![
            h.spec.name.clone(),
            if h.spec.enabled {
                "enabled"
            } else {
                "disabled"
            }
            .into(),
            capacity(h, Resource::Vcpus),
            capacity(h, Resource::MemoryMib),
            capacity(h, Resource::DiskGib),
            vms,
            h.spec.cost.to_string(),
            h.generation.to_string(),
            labels.join(","),
        ]);
    }
    t.render()
}

/// The allocation table.
fn allocations_table(allocs: &[Allocation]) -> String {
    let mut t = Table::new(&[
        "ID",
        "HOST",
        "VM",
        "VCPUS",
        "MEMORY_MIB",
        "DISK_GIB",
        "GROUP",
        "OWNER",
    ]);
    for a in allocs {
        let owner = match &a.owner {
            Some(o) => format!("pid {} on {}", o.pid, o.host),
            None => "until released".into(),
        };
        t.row(vec![
            a.id.to_string(),
            a.host.clone(),
            a.vm_name.clone(),
            a.amounts.vcpus.to_string(),
            a.amounts.memory_mib.to_string(),
            a.amounts.disk_gib.to_string(),
            a.group.clone().unwrap_or_default(),
            owner,
        ]);
    }
    t.render()
}

/// `pool status`: used/usable per host and resource, and the management index
/// M = R·T/C (free resource × hours available per day ÷ cost per hour), as the seeds
/// define it: how much capacity a unit of money buys on that host.
fn status(ledger: &Ledger, json: bool) -> Result<(), PoolError> {
    let hosts = ledger.store().hosts()?;
    let mut t = Table::new(&["HOST", "RESOURCE", "USED", "USABLE", "USE%", "M=R·T/C"]);
    let mut out = Vec::new();
    for h in &hosts {
        let mut resources = Vec::new();
        for r in Resource::ALL {
            let (used, usable, free) = (h.used.get(r), h.usable(r), h.free(r));
            let percent = if usable == 0 {
                0.0
            } else {
                100.0 * used as f64 / usable as f64
            };
            let m = free as f64 * h.spec.hours / h.spec.cost;
            t.row(vec![
                h.spec.name.clone(),
                r.key().into(),
                used.to_string(),
                usable.to_string(),
                format!("{percent:.1}"),
                format!("{m:.1}"),
            ]);
            resources.push(
                json!({"resource": r, "used": used, "usable": usable, "free": free,
                "percent": percent, "management_index": m}),
            );
        }
        out.push(
            json!({"host": h.spec.name, "enabled": h.spec.enabled, "vms": h.vms,
            "cost": h.spec.cost, "hours": h.spec.hours, "resources": resources}),
        );
    }
    if json {
        print_json(&json!(out));
    } else {
        crate::out!("{}", t.render());
        crate::outln!(
            "M = R·T/C: free amount × hours available per day ÷ cost per hour (the seeds' management index)"
        );
    }
    Ok(())
}
