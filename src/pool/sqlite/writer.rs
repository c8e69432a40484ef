//! The writes of one transaction: hosts, claims, releases, stale owners.

use rusqlite::{Connection, OptionalExtension, params};

use super::now;
use super::read::{N, bind, inventory_at, load_allocations, opt, resource, u};
use crate::pool::model::{
    Allocation, Amounts, HostSpec, HostState, Inventory, Owner, Resource, fit,
};
use crate::pool::store::ClaimRequest;
use crate::pool::{PoolError, owner};

/// A write transaction's view: bumps the pool generation once, on the first change.
pub(super) struct Writer<'c> {
    pub(super) conn: &'c Connection,
    pub(super) generation: Option<u64>,
}

impl<'c> Writer<'c> {
    pub(super) fn new(conn: &'c Connection) -> Writer<'c> {
        Writer {
            conn,
            generation: None,
        }
    }

    /// The generation this transaction's changes carry.
    pub(super) fn generation(&mut self) -> Result<u64, PoolError> {
        if let Some(g) = self.generation {
            return Ok(g);
        }
        let g = self
            .conn
            .prepare_cached(
                "UPDATE meta SET value = value + 1 WHERE key = 'generation' RETURNING value",
            )?
            .query_row([], |r| u(r, 0))?;
        self.generation = Some(g);
        Ok(g)
    }

    /// Reads one meta counter.
    pub(super) fn meta(&self, key: &str) -> Result<u64, PoolError> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([key], |r| u(r, 0))?)
    }

    /// Id of a host by name.
    pub(super) fn host_id(&self, name: &str) -> Result<i64, PoolError> {
        self.conn
            .prepare_cached("SELECT id FROM hosts WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?
            .ok_or_else(|| PoolError::UnknownHost(name.to_string()))
    }

    /// Writes a host's labels and inventories.
    pub(super) fn write_spec(&mut self, id: i64, spec: &HostSpec) -> Result<(), PoolError> {
        self.conn
            .prepare_cached("DELETE FROM labels WHERE host_id = ?1")?
            .execute([id])?;
        for (k, v) in &spec.labels {
            self.conn
                .prepare_cached("INSERT INTO labels(host_id, key, value) VALUES (?1, ?2, ?3)")?
                .execute(params![id, k, v])?;
        }
        for r in Resource::ALL {
            let inv = spec.inventory(r);
            self.conn.prepare_cached(
                "INSERT INTO inventories(host_id, resource, total, reserved, ratio, min_unit, max_unit, step)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(host_id, resource) DO UPDATE SET total = ?3, reserved = ?4,
                   ratio = ?5, min_unit = ?6, max_unit = ?7, step = ?8",
            )?.execute(params![id, r.key(), N(inv.total), N(inv.reserved), inv.ratio, bind(inv.min_unit), bind(inv.max_unit), bind(inv.step)],
            )?;
        }
        // Usable is computed here, by Inventory::usable, and only copied into SQL.
        let usable = |r: Resource| N(spec.inventory(r).usable());
        let limited = spec
            .inventories
            .iter()
            .any(|i| i.min_unit.is_some() || i.max_unit.is_some() || i.step.is_some());
        self.conn
            .prepare_cached(
                "UPDATE hosts SET usable_vcpus = ?1, usable_memory_mib = ?2, usable_disk_gib = ?3,
                 limited = ?4 WHERE id = ?5",
            )?
            .execute(params![
                usable(Resource::Vcpus),
                usable(Resource::MemoryMib),
                usable(Resource::DiskGib),
                limited,
                id
            ])?;
        Ok(())
    }

    /// Releases one allocation: deletes it and gives its amounts back to the host.
    pub(super) fn release(&mut self, id: i64) -> Result<Allocation, PoolError> {
        let alloc = load_allocations(self.conn, Some(id))?
            .pop()
            .ok_or(PoolError::UnknownAllocation(id))?;
        let g = self.generation()?;
        let host_id: i64 = self
            .conn
            .prepare_cached("DELETE FROM allocations WHERE id = ?1 RETURNING host_id")?
            .query_row([id], |r| r.get(0))?;
        self.add_usage(host_id, &alloc.amounts, -1, g)?;
        Ok(alloc)
    }

    /// Releases allocation `claimed.id` if it is still `claimed`
    /// ([`Allocation::is_same_claim`]); otherwise writes nothing and returns
    /// [`PoolError::ClaimLost`] for `pool`, with `cause` appended to its message.
    pub(super) fn release_claimed(
        &mut self,
        claimed: &Allocation,
        pool: &std::path::Path,
        cause: &str,
    ) -> Result<Allocation, PoolError> {
        let now = match load_allocations(self.conn, Some(claimed.id))?.pop() {
            Some(a) if a.is_same_claim(claimed) => return self.release(claimed.id),
            Some(other) => format!("is gone: id {} now names {}", other.id, other.describe()),
            None => "is no longer in the pool".to_string(),
        };
        Err(PoolError::ClaimLost {
            pool: pool.to_path_buf(),
            claimed: Box::new(claimed.clone()),
            now,
            cause: cause.to_string(),
        })
    }

    /// Releases the allocations of every owner that is gone, and forgets those owners.
    pub(super) fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError> {
        let local_host = owner::hostname()?;
        let local_boot = owner::boot_id()?;
        let owners: Vec<(i64, Owner)> = self
            .conn
            .prepare_cached("SELECT id, host, pid, start_time, boot_id FROM owners")?
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    Owner {
                        host: r.get(1)?,
                        pid: r.get(2)?,
                        start_time: u(r, 3)?,
                        boot_id: r.get(4)?,
                    },
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut released = Vec::new();
        for (owner_id, o) in owners {
            if !owner::is_stale(&o, &local_host, &local_boot) {
                continue;
            }
            let ids: Vec<i64> = self
                .conn
                .prepare_cached("SELECT id FROM allocations WHERE owner_id = ?1")?
                .query_map([owner_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in ids {
                let a = self.release(id)?;
                log::info!(
                    "pool: released allocation {id} of VM {} on {}: its owner pid {} is gone",
                    a.vm_name,
                    a.host,
                    o.pid
                );
                released.push(a);
            }
            self.conn
                .prepare_cached("DELETE FROM owners WHERE id = ?1")?
                .execute([owner_id])?;
        }
        Ok(released)
    }

    /// Adds (`sign` 1) or removes (`sign` -1) one allocation's amounts on a host.
    pub(super) fn add_usage(
        &mut self,
        host_id: i64,
        a: &Amounts,
        sign: i64,
        g: u64,
    ) -> Result<(), PoolError> {
        let delta = |v: u64| sign * v as i64;
        self.conn
            .prepare_cached(
                "UPDATE hosts SET used_vcpus = used_vcpus + ?1, used_memory_mib = used_memory_mib + ?2,
                 used_disk_gib = used_disk_gib + ?3, vms = vms + ?4, generation = ?5 WHERE id = ?6",
            )?
            .execute(params![delta(a.vcpus), delta(a.memory_mib), delta(a.disk_gib), sign, N(g), host_id])?;
        Ok(())
    }

    /// Checks a claim in detail, returning the host name or the precise reason it fails.
    pub(super) fn check(&mut self, req: &ClaimRequest) -> Result<String, PoolError> {
        // One query reads the host row and its three inventories.
        let mut stmt = self.conn.prepare_cached(
            "SELECT h.name, h.enabled, h.max_vms, h.vms, h.used_vcpus, h.used_memory_mib,
                    h.used_disk_gib, i.resource, i.total, i.reserved, i.ratio, i.min_unit,
                    i.max_unit, i.step
             FROM hosts h JOIN inventories i ON i.host_id = h.id WHERE h.id = ?1",
        )?;
        let mut rows = stmt.query([req.host_id])?;
        let mut host: Option<(String, bool, Option<u64>, u64, Amounts)> = None;
        let mut invs = Vec::with_capacity(3);
        while let Some(r) = rows.next()? {
            if host.is_none() {
                let used = Amounts::new(u(r, 4)?, u(r, 5)?, u(r, 6)?);
                host = Some((r.get(0)?, r.get(1)?, opt(r, 2)?, u(r, 3)?, used));
            }
            invs.push((r.get::<_, String>(7)?, inventory_at(r, 8)?));
        }
        drop(rows);
        drop(stmt);
        let (name, enabled, max_vms, vms, used) =
            host.ok_or_else(|| PoolError::UnknownHost(format!("#{}", req.host_id)))?;
        let mut inventories: [Inventory; 3] = std::array::from_fn(|_| Inventory::new(0, 1.0));
        for (key, inv) in invs {
            inventories[resource(&key)?.index()] = inv;
        }
        let group = match &req.group {
            None => None,
            Some(g) => {
                let held = self
                    .conn
                    .prepare_cached(
                        "SELECT 1 FROM allocations WHERE host_id = ?1 AND grp = ?2 LIMIT 1",
                    )?
                    .exists(params![req.host_id, g])?;
                Some((g.as_str(), held))
            }
        };
        let state = HostState {
            enabled,
            max_vms,
            vms,
            inventories: &inventories,
            used,
        };
        fit(state, group, &req.amounts).map_err(|m| PoolError::misfit(m, name.clone()))?;
        Ok(name)
    }

    /// Records one allocation if it still fits; writes nothing when it does not.
    pub(super) fn claim(&mut self, req: &ClaimRequest) -> Result<Allocation, PoolError> {
        if req.vm_spec.is_some() {
            return Err(PoolError::NeedsSharedPool(
                "recording a VM for an agent to start",
            ));
        }
        let a = &req.amounts;
        let g = self.generation()?;
        // The common case in one statement: the row is updated only if the host is
        // enabled, below its VM limit, without per-request limits, and has room.
        let fast = if req.group.is_some() {
            None
        } else {
            self.conn
                .prepare_cached(
                    "UPDATE hosts SET used_vcpus = used_vcpus + ?1,
                       used_memory_mib = used_memory_mib + ?2, used_disk_gib = used_disk_gib + ?3,
                       vms = vms + 1, generation = ?4
                     WHERE id = ?5 AND enabled = 1 AND limited = 0
                       AND (max_vms IS NULL OR vms < max_vms)
                       AND used_vcpus + ?1 <= usable_vcpus AND used_memory_mib + ?2 <= usable_memory_mib
                       AND used_disk_gib + ?3 <= usable_disk_gib
                     RETURNING name",
                )?
                .query_row(params![N(a.vcpus), N(a.memory_mib), N(a.disk_gib), N(g), req.host_id], |r| r.get(0))
                .optional()?
        };
        let name: String = match fast {
            Some(name) => name,
            None => {
                // Refused, or a case the statement does not cover: the detailed check
                // names the reason, or passes and the usage is added here.
                let name = self.check(req)?;
                self.add_usage(req.host_id, a, 1, g)?;
                name
            }
        };
        let owner_id: Option<i64> = match &req.owner {
            None => None,
            Some(o) => Some(
                self.conn
                    .prepare_cached(
                        "INSERT INTO owners(host, pid, start_time, boot_id) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT DO UPDATE SET pid = excluded.pid RETURNING id",
                    )?
                    .query_row(params![o.host, o.pid, N(o.start_time), o.boot_id], |r| {
                        r.get(0)
                    })?,
            ),
        };
        let created = now();
        let id: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO allocations(host_id, vm_name, grp, vcpus, memory_mib, disk_gib, owner_id, created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            )?
            .query_row(
                params![req.host_id, req.vm_name, req.group, N(a.vcpus), N(a.memory_mib), N(a.disk_gib), owner_id, created],
                |r| r.get(0),
            )?;
        Ok(Allocation {
            id,
            host: name,
            vm_name: req.vm_name.clone(),
            group: req.group.clone(),
            amounts: req.amounts,
            owner: req.owner.clone(),
            created,
        })
    }
}
