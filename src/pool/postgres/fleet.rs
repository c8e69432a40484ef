//! The pool's VMs across hosts: what was placed where, what its creator wants, what
//! its host's agent last saw, and whether that agent is alive.
//!
//! `minivmm vm create --pool postgres://...` places a VM with the scheduler and, in
//! the same transaction as its allocation, records a row here (desired `running`,
//! state `pending`) and sends NOTIFY on the channel [`CHANNEL`]. Every agent
//! (`minivmm serve --pool postgres://... --host-name H`) LISTENs on it and also
//! looks every few seconds (a notification is lost while its connection is down),
//! starts the VMs placed on its host, and writes their state back. A delete sets
//! desired `deleted`; the agent stops the VM, then [`PostgresStore::forget`]s it,
//! which releases its allocation. Agents heartbeat; one silent past a deadline is
//! marked down by any other, and its VMs are shown as `lost`, never moved: they may
//! well still run on a host that only lost its network.

use std::time::Duration;

use fallible_iterator::FallibleIterator;
use postgres::{Client, Transaction};
use serde::Serialize;

use super::{PostgresStore, connect, now};
use crate::pool::PoolError;
use crate::pool::store::ClaimRequest;

/// The NOTIFY channel on which VM creations and deletions are announced.
pub const CHANNEL: &str = "minivmm_vms";

/// One VM of the pool.
#[derive(Clone, Debug, Serialize)]
pub struct VmRecord {
    /// Unique in the pool.
    pub name: String,
    /// The host it was placed on.
    pub host: String,
    /// Its spec, as JSON text.
    pub spec: String,
    /// What its creator wants: `running` or `deleted`.
    pub desired: String,
    /// What its agent last reported: `pending` (not started yet), `running`,
    /// `exited`, `failed`; or `lost` when its host stopped heartbeating.
    pub state: String,
    /// Exit status, once it ended.
    pub status: Option<i32>,
    /// Why it failed or was lost.
    pub reason: Option<String>,
    /// Its allocation in the ledger.
    pub allocation: Option<i64>,
    /// Whether its host is marked down.
    pub host_down: bool,
    /// Seconds since the epoch of the last change.
    pub updated: i64,
}

/// Records the VM of a claim, in the claim's transaction, and announces it.
pub(super) fn record(
    tx: &mut Transaction<'_>,
    req: &ClaimRequest,
    allocation: i64,
    spec: &str,
    created: i64,
) -> Result<(), PoolError> {
    tx.execute(
        "INSERT INTO vms(name, host_id, allocation_id, spec, desired, state, created, updated)
         VALUES ($1, $2, $3, $4, 'running', 'pending', $5, $5)",
        &[&req.vm_name, &req.host_id, &allocation, &spec, &created],
    )?;
    tx.execute(&format!("NOTIFY {CHANNEL}"), &[])?;
    Ok(())
}

const SELECT_VMS: &str = "SELECT v.name, h.name, v.spec, v.desired, v.state, v.status, v.reason,
       v.allocation_id, COALESCE(a.down, false), v.updated
     FROM vms v JOIN hosts h ON h.id = v.host_id LEFT JOIN agents a ON a.host_id = v.host_id";

impl PostgresStore {
    /// The pool's VMs (those placed on `host` only, if given), by name.
    pub fn vms(&mut self, host: Option<&str>) -> Result<Vec<VmRecord>, PoolError> {
        self.ensure_connected()?;
        let rows = match host {
            Some(h) => self.client.query(
                &format!("{SELECT_VMS} WHERE h.name = $1 ORDER BY v.name"),
                &[&h],
            )?,
            None => self
                .client
                .query(&format!("{SELECT_VMS} ORDER BY v.name"), &[])?,
        };
        rows.iter()
            .map(|r| {
                Ok(VmRecord {
                    name: r.try_get(0)?,
                    host: r.try_get(1)?,
                    spec: r.try_get(2)?,
                    desired: r.try_get(3)?,
                    state: r.try_get(4)?,
                    status: r.try_get(5)?,
                    reason: r.try_get(6)?,
                    allocation: r.try_get(7)?,
                    host_down: r.try_get(8)?,
                    updated: r.try_get(9)?,
                })
            })
            .collect()
    }

    /// An agent's report of a VM's state; writes (and returns true) only when it
    /// differs from the recorded one.
    pub fn report(
        &mut self,
        name: &str,
        state: &str,
        status: Option<i32>,
        reason: Option<&str>,
    ) -> Result<bool, PoolError> {
        self.ensure_connected()?;
        let n = self.client.execute(
            "UPDATE vms SET state = $2, status = $3, reason = $4, updated = $5
             WHERE name = $1 AND (state, status, reason) IS DISTINCT FROM ($2, $3, $4)",
            &[&name, &state, &status, &reason, &now()],
        )?;
        Ok(n > 0)
    }

    /// Asks for a VM's deletion: its agent stops it and then forgets it. A VM whose
    /// host is down, or has no agent yet, is forgotten at once (its allocation
    /// released): nobody else would. Returns the VM as it was.
    pub fn request_delete(&mut self, name: &str) -> Result<VmRecord, PoolError> {
        let vm = self
            .vms(None)?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| PoolError::UnknownVm(name.to_string()))?;
        let has_agent = self
            .client
            .query_opt(
                "SELECT 1 FROM agents a JOIN hosts h ON h.id = a.host_id
                 WHERE h.name = $1 AND NOT a.down",
                &[&vm.host],
            )?
            .is_some();
        if !has_agent {
            self.forget(name)?;
            return Ok(vm);
        }
        let mut tx = self.client.transaction()?;
        tx.execute(
            "UPDATE vms SET desired = 'deleted', updated = $2 WHERE name = $1",
            &[&name, &now()],
        )?;
        tx.execute(&format!("NOTIFY {CHANNEL}"), &[])?;
        tx.commit()?;
        Ok(vm)
    }

    /// Removes a VM's record and releases its allocation, in one transaction under
    /// the pool's write lock. Returns whether there was one.
    pub fn forget(&mut self, name: &str) -> Result<bool, PoolError> {
        self.write(true, |w| {
            let row = w.tx.query_opt(
                "DELETE FROM vms WHERE name = $1 RETURNING allocation_id",
                &[&name],
            )?;
            let Some(row) = row else {
                return Ok(false);
            };
            if let Some(id) = row.try_get::<_, Option<i64>>(0)? {
                w.release(id)?;
            }
            Ok(true)
        })
    }

    /// The agent of host `host` is alive: records the time (and clears a down mark).
    pub fn heartbeat(&mut self, host: &str) -> Result<(), PoolError> {
        self.ensure_connected()?;
        let machine = crate::pool::owner::hostname()?;
        let n = self.client.execute(
            "INSERT INTO agents(host_id, heartbeat, down, pid, machine)
             SELECT id, $2, false, $3, $4 FROM hosts WHERE name = $1
             ON CONFLICT (host_id) DO UPDATE SET heartbeat = $2, down = false, pid = $3,
               machine = $4",
            &[&host, &now(), &i64::from(std::process::id()), &machine],
        )?;
        if n == 0 {
            return Err(PoolError::UnknownHost(host.to_string()));
        }
        Ok(())
    }

    /// Marks down every host whose agent has not heartbeaten for `after`, and its
    /// pending or running VMs lost. Returns the hosts marked now.
    pub fn mark_down(&mut self, after: Duration) -> Result<Vec<String>, PoolError> {
        self.ensure_connected()?;
        let deadline = now() - after.as_secs() as i64;
        let mut tx = self.client.transaction()?;
        let rows = tx.query(
            "UPDATE agents a SET down = true FROM hosts h
             WHERE h.id = a.host_id AND NOT a.down AND a.heartbeat < $1
             RETURNING a.host_id, h.name",
            &[&deadline],
        )?;
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let names: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
        if !ids.is_empty() {
            let reason = format!(
                "host down: its agent was silent for over {}s",
                after.as_secs()
            );
            tx.execute(
                "UPDATE vms SET state = 'lost', reason = $2, updated = $3
                 WHERE host_id = ANY($1) AND state IN ('pending', 'running')",
                &[&ids, &reason, &now()],
            )?;
        }
        tx.commit()?;
        Ok(names)
    }

    /// Seconds since each host's agent last heartbeat (None: never), and whether it
    /// is marked down, by host name.
    pub fn agents(&mut self) -> Result<Vec<(String, Option<i64>, bool)>, PoolError> {
        self.ensure_connected()?;
        let now = now();
        let rows = self.client.query(
            "SELECT h.name, a.heartbeat, COALESCE(a.down, false) FROM hosts h
             LEFT JOIN agents a ON a.host_id = h.id ORDER BY h.name COLLATE \"C\"",
            &[],
        )?;
        rows.iter()
            .map(|r| {
                let hb: Option<i64> = r.try_get(1)?;
                Ok((r.try_get(0)?, hb.map(|t| now - t), r.try_get(2)?))
            })
            .collect()
    }
}

/// A connection that LISTENs on [`CHANNEL`], for an agent to wake up when a VM is
/// placed on (or deleted from) some host.
pub struct Listener {
    url: String,
    client: Option<Client>,
}

impl Listener {
    /// Connects lazily: [`Listener::wait`] (re)connects when needed.
    pub fn new(url: &str) -> Listener {
        Listener {
            url: url.to_string(),
            client: None,
        }
    }

    /// Waits up to `limit` for a notification; returns whether one came. A broken
    /// connection is dropped (and the wait simply times out), to be made again on
    /// the next call: the caller's periodic look covers what was missed.
    pub fn wait(&mut self, limit: Duration) -> bool {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            let config = match self.url.parse::<postgres::Config>() {
                Ok(c) => c,
                Err(_) => {
                    std::thread::sleep(limit);
                    return false;
                }
            };
            match connect(&config, &super::redact(&self.url)).and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
                Ok(c)
            }) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    log::warn!("pool: cannot listen for VM changes: {e}");
                    std::thread::sleep(limit);
                    return false;
                }
            }
        }
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        let mut n = client.notifications();
        let got = matches!(n.timeout_iter(limit).next(), Ok(Some(_)));
        // Several announcements may be queued: one look serves them all.
        while let Ok(Some(_)) = n.iter().next() {}
        got
    }
}
