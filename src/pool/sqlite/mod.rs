//! The ledger in one SQLite file: WAL, synchronous=FULL, claims in BEGIN IMMEDIATE.
//!
//! BEGIN IMMEDIATE takes the database's single write lock before anything is read, so a
//! claim's check ("does it still fit?") and its write can never interleave with another
//! process's: that is the whole concurrency argument. synchronous=FULL makes every commit
//! wait for the WAL to reach the disk, so a claim reported to the caller survives a
//! power cut, not just a crash.

mod files;
mod open;
mod read;
mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::{Connection, TransactionBehavior, params};

use super::PoolError;
use super::model::{Allocation, Amounts, Host, HostSpec};
use super::store::{Chooser, Committed, Delta, Released, Store};
use read::{N, Which, bind, load_allocations, load_host_by_id, load_hosts, u};
use writer::Writer;

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// Whether this process created the file (it did not exist before [`Self::open`]).
    created: bool,
    /// The pool file and companions this connection opened (None until it has).
    files: Option<files::PoolFiles>,
}

/// See [`crate::pool::interrupt_waits`].
pub(crate) fn interrupt_waits() {
    open::INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
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

    fn host_id(&mut self, name: &str) -> Result<i64, PoolError> {
        Writer::new(&self.conn).host_id(name)
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
            spec.holds(name, &current.used)?;
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

    fn release_claimed(&mut self, claimed: &Allocation) -> Result<Released, PoolError> {
        let pool = self.path.clone();
        let damage = self.files.as_ref().and_then(|f| f.damage(&f.now()));
        let wal = files::companion(&pool, "-wal");
        match damage {
            None => self
                .write(|w| w.release_claimed(claimed, &pool, ""))
                .map(|allocation| Released {
                    allocation,
                    damage: None,
                }),
            // Nobody else could read the pool since, so this connection's view is
            // the pool: release through it, and its checkpoint when the last
            // connection closes writes everything back into the pool file.
            Some(files::Damage::WalOnly) => {
                // That checkpoint must happen even on a relaxed connection.
                self.conn.set_db_config(
                    rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                    false,
                )?;
                let allocation = self.write(|w| {
                    w.release_claimed(
                        claimed,
                        &pool,
                        "; the pool's -wal file was deleted meanwhile",
                    )
                })?;
                let damage = format!(
                    "pool {}: its write-ahead log {} was deleted while this process held \
                     allocation {} of {}. Until this process (or the last one holding the \
                     pool open since before) exits, other processes cannot read the pool \
                     (\"disk I/O error\"); this one still had its latest state, released \
                     the allocation, and writes the pool back when it closes it. Never \
                     delete a pool's -wal or -shm file while minivmm runs",
                    pool.display(),
                    wal.display(),
                    claimed.id,
                    claimed.describe()
                );
                Ok(Released {
                    allocation,
                    damage: Some(damage),
                })
            }
            // Other processes may have rebuilt the pool from the pool file and given
            // this allocation's id and resources to another VM: look at the pool they
            // see, and release there only what is still this very claim.
            Some(files::Damage::Diverged) => {
                let cause = format!(
                    "; the pool's shared-memory index {} (or the pool file) was deleted \
                     or replaced while this process held the allocation, so every process \
                     that opened the pool since saw it as it was at its last checkpoint, \
                     without this claim. Never delete a pool's -wal or -shm file while \
                     minivmm runs",
                    files::companion(&pool, "-shm").display()
                );
                let lost = |now: String| PoolError::ClaimLost {
                    pool: pool.clone(),
                    claimed: Box::new(claimed.clone()),
                    now,
                    cause: cause.clone(),
                };
                if let Err(e) = self.reopen() {
                    return Err(lost(format!(
                        "cannot be checked: the pool on disk cannot be opened ({e})"
                    )));
                }
                self.write(|w| w.release_claimed(claimed, &pool, &cause))
                    .map_err(|e| match e {
                        e @ PoolError::ClaimLost { .. } => e,
                        e => lost(format!(
                            "cannot be checked: the pool on disk cannot be read ({e})"
                        )),
                    })
                    .map(|allocation| Released {
                        allocation,
                        damage: Some(format!(
                            "pool {}: allocation {} survived{cause}",
                            pool.display(),
                            claimed.id
                        )),
                    })
            }
        }
    }

    fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError> {
        self.write(|w| w.release_stale())
    }

    fn discard_if_unused(&mut self) -> Result<bool, PoolError> {
        if !self.created {
            return Ok(false);
        }
        // Under the write lock, so no other process can write between the look and the
        // unlink; one that opened the file meanwhile gets SQLITE_READONLY_DBMOVED on
        // its next write (SQLite checks for an unlinked file), not a silent loss.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let unused: bool = tx.query_row(
            "SELECT (SELECT count(*) FROM hosts) = 0 AND (SELECT count(*) FROM allocations) = 0
                 AND (SELECT value FROM meta WHERE key = 'generation') = 0",
            [],
            |r| r.get(0),
        )?;
        if unused {
            open::remove_files(&self.path)?;
        }
        drop(tx); // rolls back: nothing was written
        Ok(unused)
    }

    fn relax_durability(&mut self) -> Result<(), PoolError> {
        // In WAL mode, NORMAL syncs the WAL at checkpoints only: a commit survives a
        // crash of this process (it is in the OS's page cache) but not a power loss.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        // And no checkpoint when it closes: as the pool's last connection it would
        // copy the WAL into the pool file, sync it and unlink the WAL, for the next
        // process to create it again. The WAL is checkpointed by whichever commit
        // finds it over 100 pages instead, so it stays small for the next opener's
        // recovery to read.
        self.conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        self.conn.pragma_update(None, "wal_autocheckpoint", 100)?;
        Ok(())
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

    fn changes(&mut self, seen: u64) -> Result<(u64, Delta), PoolError> {
        // A read transaction: in WAL mode it neither waits for nor blocks a writer.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let w = Writer::new(&tx);
        let current = w.meta("generation")?;
        let delta = delta_since(&w, Some(seen), current)?;
        tx.commit()?;
        Ok((current, delta))
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
        let delta = delta_since(&w, seen, current)?;
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

/// What changed since generation `seen` (see [`Store::claim`]), read by `w`'s
/// transaction, the pool being at generation `current`.
fn delta_since(w: &Writer<'_>, seen: Option<u64>, current: u64) -> Result<Delta, PoolError> {
    let removed_at = w.meta("removed_at")?;
    Ok(match seen {
        None => Delta::Unchanged,
        Some(s) if s == current => Delta::Unchanged,
        Some(s) if s >= removed_at && s < current => {
            Delta::Hosts(load_hosts(w.conn, Which::Since(s))?)
        }
        _ => Delta::Everything(load_hosts(w.conn, Which::All)?),
    })
}

/// SQLite's errors become the ledger's backend-neutral [`PoolError::Database`].
impl From<rusqlite::Error> for PoolError {
    fn from(e: rusqlite::Error) -> PoolError {
        PoolError::Database(Box::new(e))
    }
}
