//! What the ledger records: hosts with their inventories, and allocations against them.
//!
//! The model follows OpenStack Placement: each host has, per resource class, a total,
//! a reserved part and an allocation ratio, so usable = (total − reserved) × ratio.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::PoolError;

/// A resource class a host offers and a VM consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Virtual CPUs.
    Vcpus,
    /// Memory, in MiB.
    MemoryMib,
    /// Disk, in GiB.
    DiskGib,
}

impl Resource {
    /// Every resource class, in a fixed order that also indexes [`Amounts`].
    pub const ALL: [Resource; 3] = [Resource::Vcpus, Resource::MemoryMib, Resource::DiskGib];

    /// The name used in the database and in `--json` output.
    pub fn key(self) -> &'static str {
        match self {
            Resource::Vcpus => "vcpus",
            Resource::MemoryMib => "memory_mib",
            Resource::DiskGib => "disk_gib",
        }
    }

    /// The word used in messages for people.
    pub fn noun(self) -> &'static str {
        match self {
            Resource::Vcpus => "vcpus",
            Resource::MemoryMib => "memory",
            Resource::DiskGib => "disk",
        }
    }

    /// Formats an amount of this resource with its unit.
    pub fn show(self, amount: u64) -> String {
        match self {
            Resource::Vcpus => format!("{amount}"),
            Resource::MemoryMib => format!("{amount} MiB"),
            Resource::DiskGib => format!("{amount} GiB"),
        }
    }

    /// Position of this resource in [`Resource::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses a database key back into a resource.
    pub fn from_key(key: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.key() == key)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

/// An amount of every resource class: what a VM asks for or what a host has in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
}

impl Amounts {
    /// Builds amounts from the three classes.
    pub fn new(vcpus: u64, memory_mib: u64, disk_gib: u64) -> Amounts {
        Amounts {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    /// The amount of one resource.
    pub fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Vcpus => self.vcpus,
            Resource::MemoryMib => self.memory_mib,
            Resource::DiskGib => self.disk_gib,
        }
    }

    /// A mutable reference to the amount of one resource.
    pub fn get_mut(&mut self, r: Resource) -> &mut u64 {
        match r {
            Resource::Vcpus => &mut self.vcpus,
            Resource::MemoryMib => &mut self.memory_mib,
            Resource::DiskGib => &mut self.disk_gib,
        }
    }

    /// Refuses a request that asks for nothing at all, or for more than SQLite can store.
    pub fn validate_request(&self) -> Result<(), PoolError> {
        if self.vcpus == 0 {
            return Err(PoolError::Invalid("vcpus must be at least 1".into()));
        }
        if self.memory_mib == 0 {
            return Err(PoolError::Invalid("memory must be at least 1 MiB".into()));
        }
        for r in Resource::ALL {
            if self.get(r) > i64::MAX as u64 {
                return Err(PoolError::Invalid(format!("{r} amount is too large")));
            }
        }
        Ok(())
    }
}

/// One resource class of one host, as Placement's inventory record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Physical amount on the host.
    pub total: u64,
    /// Amount kept back for the host itself.
    pub reserved: u64,
    /// Overcommit factor applied to total − reserved.
    pub ratio: f64,
    /// Smallest amount one allocation may ask for.
    pub min_unit: Option<u64>,
    /// Largest amount one allocation may ask for.
    pub max_unit: Option<u64>,
    /// An allocation must ask for a multiple of this.
    pub step: Option<u64>,
}

impl Inventory {
    /// An inventory with no reservation, the given ratio and no per-request limits.
    pub fn new(total: u64, ratio: f64) -> Inventory {
        Inventory {
            total,
            reserved: 0,
            ratio,
            min_unit: None,
            max_unit: None,
            step: None,
        }
    }

    /// What can be allocated in all: (total − reserved) × ratio, rounded down.
    pub fn usable(&self) -> u64 {
        // The one place the formula lives: the store and the scheduler both call this,
        // so they can never disagree on what fits.
        (self.total.saturating_sub(self.reserved) as f64 * self.ratio).floor() as u64
    }

    /// Checks the inventory is meaningful; `r` names it in the message.
    pub fn validate(&self, r: Resource) -> Result<(), PoolError> {
        let bad = |why: String| Err(PoolError::Invalid(format!("{r}: {why}")));
        if self.total == 0 {
            return bad("total must be greater than zero".into());
        }
        if self.total > i64::MAX as u64 {
            return bad("total is too large".into());
        }
        if self.reserved > self.total {
            return bad(format!(
                "reserved {} is more than total {}",
                r.show(self.reserved),
                r.show(self.total)
            ));
        }
        if !(self.ratio.is_finite() && self.ratio > 0.0) {
            return bad(format!(
                "allocation ratio must be above 0, got {}",
                self.ratio
            ));
        }
        if self.usable() > i64::MAX as u64 {
            return bad("usable capacity is too large".into());
        }
        if self.min_unit == Some(0) || self.max_unit == Some(0) || self.step == Some(0) {
            return bad("min, max and step must be at least 1".into());
        }
        if let (Some(lo), Some(hi)) = (self.min_unit, self.max_unit)
            && lo > hi
        {
            return bad(format!("min {lo} is above max {hi}"));
        }
        Ok(())
    }

    /// Why a request for `amount` breaks this inventory's min/max/step, if it does.
    pub fn unit_violation(&self, amount: u64) -> Option<String> {
        if amount == 0 {
            return None;
        }
        if let Some(lo) = self.min_unit
            && amount < lo
        {
            return Some(format!("below the minimum {lo}"));
        }
        if let Some(hi) = self.max_unit
            && amount > hi
        {
            return Some(format!("above the maximum {hi}"));
        }
        if let Some(step) = self.step
            && !amount.is_multiple_of(step)
        {
            return Some(format!("not a multiple of {step}"));
        }
        None
    }
}

/// Why a host cannot take a request, from [`fit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Misfit {
    /// The host is disabled.
    Disabled,
    /// The host has its maximum number of VMs.
    MaxVms(u64),
    /// The host holds a VM of the request's anti-affinity group.
    Group(String),
    /// The request breaks the host's per-request min/max/step for a resource.
    Limit {
        /// The resource.
        resource: Resource,
        /// What the request asks.
        need: u64,
        /// How it breaks the limit ("below the minimum 2").
        reason: String,
    },
    /// The host lacks free capacity of a resource.
    Lacks {
        /// The resource.
        resource: Resource,
        /// What the request asks.
        need: u64,
        /// What is free.
        free: u64,
    },
}

/// A host's state as [`fit`] judges it.
#[derive(Debug, Clone, Copy)]
pub struct HostState<'a> {
    /// Takes new VMs.
    pub enabled: bool,
    /// Its VM count limit.
    pub max_vms: Option<u64>,
    /// Its live allocations.
    pub vms: u64,
    /// Its inventories, by [`Resource::index`].
    pub inventories: &'a [Inventory; 3],
    /// Sum of its live allocations.
    pub used: Amounts,
}

/// "Does this request fit this host": the one rule, for the ledger's claims (which
/// enforce it) and the scheduler's explanations (which report it), checked in one
/// order so both give the same reason: enabled, the VM count limit, the
/// anti-affinity group (`group`: its name and whether the host holds one of it),
/// each resource's per-request limits, then each resource's free capacity
/// (`usable − used`). The scheduler's vectorised pass and the store's one-statement
/// claim are faster forms of the same rule for hosts without limits or groups; they
/// only say yes or no, and a "no" is explained by this function.
pub fn fit(host: HostState<'_>, group: Option<(&str, bool)>, need: &Amounts) -> Result<(), Misfit> {
    if !host.enabled {
        return Err(Misfit::Disabled);
    }
    if let Some(max) = host.max_vms.filter(|m| host.vms >= *m) {
        return Err(Misfit::MaxVms(max));
    }
    if let Some((name, true)) = group {
        return Err(Misfit::Group(name.to_string()));
    }
    for r in Resource::ALL {
        let asked = need.get(r);
        if let Some(reason) = host.inventories[r.index()].unit_violation(asked) {
            return Err(Misfit::Limit {
                resource: r,
                need: asked,
                reason,
            });
        }
    }
    for r in Resource::ALL {
        let asked = need.get(r);
        let free = host.inventories[r.index()]
            .usable()
            .saturating_sub(host.used.get(r));
        if asked > free {
            return Err(Misfit::Lacks {
                resource: r,
                need: asked,
                free,
            });
        }
    }
    Ok(())
}

/// Everything an operator declares about a host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    /// Unique name.
    pub name: String,
    /// Disabled hosts keep their allocations but get no new ones.
    pub enabled: bool,
    /// Free-form key=value labels that requests can require.
    pub labels: BTreeMap<String, String>,
    /// Cost per hour (any currency); must be above zero.
    pub cost: f64,
    /// Hours per day the host is available: T in the management index M = R·T/C.
    pub hours: f64,
    /// At most this many VMs on the host, if set.
    pub max_vms: Option<u64>,
    /// vCPUs, memory (MiB), disk (GiB), indexed by [`Resource::index`].
    pub inventories: [Inventory; 3],
}

impl HostSpec {
    /// A host with the default ratios (cpu 4.0, memory 1.0, disk 1.0), cost 1 and no labels.
    pub fn new(name: &str, vcpus: u64, memory_mib: u64, disk_gib: u64) -> HostSpec {
        HostSpec {
            name: name.to_string(),
            enabled: true,
            labels: BTreeMap::new(),
            cost: 1.0,
            hours: 24.0,
            max_vms: None,
            inventories: [
                Inventory::new(vcpus, 4.0),
                Inventory::new(memory_mib, 1.0),
                Inventory::new(disk_gib, 1.0),
            ],
        }
    }

    /// Whether this (new) spec of host `name` still holds what is in use there:
    /// capacity may shrink, but never below its live allocations.
    pub fn holds(&self, name: &str, used: &Amounts) -> Result<(), PoolError> {
        for r in Resource::ALL {
            let (usable, used) = (self.inventory(r).usable(), used.get(r));
            if used > usable {
                return Err(PoolError::Invalid(format!(
                    "{r} on host {name}: {} is in use, more than the new usable {}",
                    r.show(used),
                    r.show(usable)
                )));
            }
        }
        Ok(())
    }

    /// The inventory of one resource class.
    pub fn inventory(&self, r: Resource) -> &Inventory {
        &self.inventories[r.index()]
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<(), PoolError> {
        validate_name("host name", &self.name)?;
        for (k, v) in &self.labels {
            validate_label(k, v)?;
        }
        if !(self.cost.is_finite() && self.cost > 0.0) {
            return Err(PoolError::Invalid(format!(
                "cost must be above 0, got {}",
                self.cost
            )));
        }
        if !(self.hours.is_finite() && self.hours > 0.0 && self.hours <= 24.0) {
            return Err(PoolError::Invalid(format!(
                "hours must be in (0, 24], got {}",
                self.hours
            )));
        }
        if self.max_vms == Some(0) || self.max_vms.is_some_and(|m| m > i64::MAX as u64) {
            return Err(PoolError::Invalid("max VMs must be at least 1".into()));
        }
        for r in Resource::ALL {
            self.inventory(r).validate(r)?;
        }
        Ok(())
    }
}

/// Checks a name (host, VM or group): printable, no spaces, not empty, not huge.
pub fn validate_name(what: &str, name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_graphic() && c != '=');
    if ok {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "{what} {name:?} must be 1 to 253 printable characters without spaces or '='"
        )))
    }
}

/// Checks one label.
pub fn validate_label(key: &str, value: &str) -> Result<(), PoolError> {
    validate_name("label key", key)?;
    if value.len() > 253 || value.chars().any(|c| c.is_control()) {
        return Err(PoolError::Invalid(format!(
            "label value {value:?} is not valid"
        )));
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), PoolError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| PoolError::Invalid(format!("label {s:?} must look like key=value")))?;
    validate_label(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// A host as recorded, with what is in use on it now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Database id.
    pub id: i64,
    /// What the operator declared.
    #[serde(flatten)]
    pub spec: HostSpec,
    /// Bumped on every change to the host or its allocations (compare-and-swap token).
    pub generation: u64,
    /// Sum of live allocations per resource.
    pub used: Amounts,
    /// Number of live allocations.
    pub vms: u64,
    /// Anti-affinity groups that hold an allocation here.
    pub groups: BTreeSet<String>,
}

impl Host {
    /// Usable capacity of one resource.
    pub fn usable(&self, r: Resource) -> u64 {
        self.spec.inventory(r).usable()
    }

    /// Free capacity of one resource (never negative, even if a ratio was lowered).
    pub fn free(&self, r: Resource) -> u64 {
        self.usable(r).saturating_sub(self.used.get(r))
    }
}

/// The process that holds an allocation, precise enough to detect pid reuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Hostname of the machine the process runs on.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// /proc/sys/kernel/random/boot_id of that machine's boot.
    pub boot_id: String,
}

/// Resources held by one VM on one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Database id, the handle for `pool release`.
    pub id: i64,
    /// Host name.
    pub host: String,
    /// VM name.
    pub vm_name: String,
    /// Anti-affinity group, if any.
    pub group: Option<String>,
    /// What is held.
    pub amounts: Amounts,
    /// The holding process; None for allocations held until released explicitly.
    pub owner: Option<Owner>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
}

impl Allocation {
    /// Whether `other` is this very claim: same id, VM, group, amounts, owner process
    /// and creation time. An id alone proves nothing once a pool lost its recent
    /// writes: the next claim is then given the same id again. The host is left out,
    /// since `pool set-host` may rename it.
    pub fn is_same_claim(&self, other: &Allocation) -> bool {
        self.id == other.id
            && self.vm_name == other.vm_name
            && self.group == other.group
            && self.amounts == other.amounts
            && self.owner == other.owner
            && self.created == other.created
    }

    /// "VM NAME (N vCPUs, M MiB, D GiB disk, held by pid P)", for messages.
    pub fn describe(&self) -> String {
        let holder = match &self.owner {
            Some(o) => format!("held by pid {} on {}", o.pid, o.host),
            None => "held until released".into(),
        };
        format!(
            "VM {} ({} vCPUs, {} MiB, {} GiB disk, {holder})",
            self.vm_name, self.amounts.vcpus, self.amounts.memory_mib, self.amounts.disk_gib
        )
    }
}
