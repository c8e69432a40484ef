//! The ledger in one SQLite file: WAL, synchronous=FULL, claims in BEGIN IMMEDIATE.
//!
//! BEGIN IMMEDIATE takes the database's single write lock before anything is read, so a
//! claim's check ("does it still fit?") and its write can never interleave with another
//! process's: that is the whole concurrency argument. synchronous=FULL makes every commit
//! wait for the WAL to reach the disk, so a claim reported to the caller survives a
//! power cut, not just a crash.

mod open;
mod read;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::{Connection, TransactionBehavior, params};

use super::PoolError;
use super::model::{Allocation, Amounts, Host, HostSpec, Resource};
use super::store::{Chooser, Committed, Delta, Store};
use read::{N, Which, bind, load_allocations, load_host_by_id, load_hosts, u};
use writer::Writer;

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

/// Seconds since the Unix epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl SqliteStore {
    /// Runs `f` in a BEGIN IMMEDIATE transaction, committing only if it succeeds.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&mut Writer::new(&tx))?;
        tx.commit()?;
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn add_hosts(&mut self, specs: &[HostSpec]) -> Result<(), PoolError> {
        for spec in specs {
            spec.validate()?;
        }
        self.write(|w| {
            let g = w.generation()?;
            for spec in specs {
                let exists = w
                    .conn
                    .prepare_cached("SELECT 1 FROM hosts WHERE name = ?1")?
                    .exists([&spec.name])?;
                if exists {
                    return Err(PoolError::DuplicateHost(spec.name.clone()));
                }
                let id: i64 = w
                    .conn
                    .prepare_cached(
                        "INSERT INTO hosts(name, enabled, cost, hours, max_vms, generation, created)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
                    )?
                    .query_row(
                        params![spec.name, spec.enabled, spec.cost, spec.hours, bind(spec.max_vms), N(g), now()],
                        |r| r.get(0),
                    )?;
                w.write_spec(id, spec)?;
                log::info!("pool: added host {} (id {id})", spec.name);
            }
            Ok(())
        })
    }

    fn host(&mut self, name: &str) -> Result<Host, PoolError> {
        let id = Writer::new(&self.conn).host_id(name)?;
        load_host_by_id(&self.conn, id)
    }

    fn update_host(
        &mut self,
        name: &str,
        spec: &HostSpec,
        generation: u64,
    ) -> Result<Host, PoolError> {
        spec.validate()?;
        self.write(|w| {
            let id = w.host_id(name)?;
            let current = load_host_by_id(w.conn, id)?;
            if current.generation != generation {
                return Err(PoolError::Conflict(name.to_string()));
            }
            if spec.name != name
                && w.conn
                    .prepare_cached("SELECT 1 FROM hosts WHERE name = ?1")?
                    .exists([&spec.name])?
            {
                return Err(PoolError::DuplicateHost(spec.name.clone()));
            }
            for r in Resource::ALL {
                let (usable, used) = (spec.inventory(r).usable(), current.used.get(r));
                if used > usable {
                    return Err(PoolError::Invalid(format!(
                        "{r} on host {name}: {} is in use, more than the new usable {}",
                        r.show(used),
                        r.show(usable)
                    )));
                }
            }
            let g = w.generation()?;
            w.conn.execute(
                "UPDATE hosts SET name = ?1, enabled = ?2, cost = ?3, hours = ?4, max_vms = ?5,
                 generation = ?6 WHERE id = ?7",
                params![
                    spec.name,
                    spec.enabled,
                    spec.cost,
                    spec.hours,
                    bind(spec.max_vms),
                    N(g),
                    id
                ],
            )?;
            w.write_spec(id, spec)
        })?;
        self.host(&spec.name)
    }

    fn remove_host(&mut self, name: &str, force: bool) -> Result<usize, PoolError> {
        self.write(|w| {
            let id = w.host_id(name)?;
            let ids: Vec<i64> = w
                .conn
                .prepare_cached("SELECT id FROM allocations WHERE host_id = ?1")?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if !ids.is_empty() && !force {
                return Err(PoolError::HostBusy {
                    host: name.to_string(),
                    count: ids.len(),
                });
            }
            for a in &ids {
                w.release(*a)?;
            }
            let g = w.generation()?;
            w.conn.execute("DELETE FROM hosts WHERE id = ?1", [id])?;
            // Schedulers that cached this host must reload everything.
            w.conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'removed_at'",
                [N(g)],
            )?;
            Ok(ids.len())
        })
    }

    fn hosts(&mut self) -> Result<Vec<Host>, PoolError> {
        load_hosts(&self.conn, Which::All)
    }

    fn allocations(&mut self) -> Result<Vec<Allocation>, PoolError> {
        load_allocations(&self.conn, None)
    }

    fn release(&mut self, id: i64) -> Result<Allocation, PoolError> {
        self.write(|w| w.release(id))
    }

    fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError> {
        self.write(|w| w.release_stale())
    }

    fn recount(&mut self) -> Result<BTreeMap<String, (Amounts, u64)>, PoolError> {
        let mut stmt = self.conn.prepare(
            "SELECT h.name, COALESCE(SUM(a.vcpus), 0), COALESCE(SUM(a.memory_mib), 0),
                    COALESCE(SUM(a.disk_gib), 0), COUNT(a.id)
             FROM hosts h LEFT JOIN allocations a ON a.host_id = h.id GROUP BY h.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (Amounts::new(u(r, 1)?, u(r, 2)?, u(r, 3)?), u(r, 4)?),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn claim(
        &mut self,
        seen: Option<u64>,
        choose: &mut Chooser<'_>,
        dry_run: bool,
    ) -> Result<Committed, PoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut w = Writer::new(&tx);
        let before = w.meta("generation")?;
        w.release_stale()?;
        let current = w.meta("generation")?;
        let removed_at = w.meta("removed_at")?;
        let delta = match seen {
            None => Delta::Unchanged,
            Some(s) if s == current => Delta::Unchanged,
            Some(s) if s >= removed_at && s < current => {
                Delta::Hosts(load_hosts(w.conn, Which::Since(s))?)
            }
            _ => Delta::Everything(load_hosts(w.conn, Which::All)?),
        };
        let requests = choose(delta)?;
        let results: Vec<_> = requests.iter().map(|r| w.claim(r)).collect();
        let generation = w.generation.unwrap_or(current);
        if dry_run {
            tx.rollback()?;
            return Ok(Committed {
                generation: before,
                results,
            });
        }
        tx.commit()?;
        Ok(Committed {
            generation,
            results,
        })
    }
}
