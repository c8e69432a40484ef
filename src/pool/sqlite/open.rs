//! Opening a pool file: refusing foreign files, WAL and FULL sync, schema migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::SqliteStore;
use crate::pool::PoolError;

/// PRAGMA application_id of a minivmm pool: "MVMM" in ASCII, so `file` and we can tell it.
const APP_ID: i64 = 0x4d56_4d4d;

/// Schema migrations; entry i brings user_version i to i + 1.
const MIGRATIONS: &[&str] = &[
    // v1: hosts (with usage and usable capacity denormalised, so a claim is checked and
    // recorded by one conditional UPDATE of one row), per-resource
    // inventories, labels, owners, allocations. `generation` holds the pool generation of
    // a host's last change. The allocation indexes are partial: a plain claim (no group,
    // no owner) touches no index page, which keeps batched placements cheap.
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value ANY) WITHOUT ROWID;
     INSERT INTO meta VALUES ('format', 'minivmm-pool'), ('generation', 0), ('removed_at', 0);
     CREATE TABLE hosts(
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, enabled INTEGER NOT NULL,
        cost REAL NOT NULL, hours REAL NOT NULL, max_vms INTEGER,
        generation INTEGER NOT NULL, vms INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL,
        used_vcpus INTEGER NOT NULL DEFAULT 0, used_memory_mib INTEGER NOT NULL DEFAULT 0,
        used_disk_gib INTEGER NOT NULL DEFAULT 0,
        usable_vcpus INTEGER NOT NULL DEFAULT 0, usable_memory_mib INTEGER NOT NULL DEFAULT 0,
        usable_disk_gib INTEGER NOT NULL DEFAULT 0, limited INTEGER NOT NULL DEFAULT 0);
     CREATE INDEX hosts_generation ON hosts(generation);
     CREATE TABLE inventories(
        host_id INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE, resource TEXT NOT NULL,
        total INTEGER NOT NULL, reserved INTEGER NOT NULL, ratio REAL NOT NULL,
        min_unit INTEGER, max_unit INTEGER, step INTEGER,
        PRIMARY KEY(host_id, resource)) WITHOUT ROWID;
     CREATE TABLE labels(
        host_id INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE, key TEXT NOT NULL,
        value TEXT NOT NULL, PRIMARY KEY(host_id, key)) WITHOUT ROWID;
     CREATE TABLE owners(
        id INTEGER PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
        start_time INTEGER NOT NULL, boot_id TEXT NOT NULL, UNIQUE(host, pid, start_time, boot_id));
     CREATE TABLE allocations(
        id INTEGER PRIMARY KEY AUTOINCREMENT, host_id INTEGER NOT NULL REFERENCES hosts(id),
        vm_name TEXT NOT NULL, grp TEXT, vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL,
        disk_gib INTEGER NOT NULL, owner_id INTEGER REFERENCES owners(id), created INTEGER NOT NULL);
     CREATE INDEX allocations_group ON allocations(host_id, grp) WHERE grp IS NOT NULL;
     CREATE INDEX allocations_owner ON allocations(owner_id) WHERE owner_id IS NOT NULL;",
];

/// Turns "not a database" and "corrupt" into a message about the file, not about SQL.
fn classify(path: &Path, e: rusqlite::Error) -> PoolError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => PoolError::NotAPool {
            path: path.to_path_buf(),
            reason: "the file is not an SQLite database".into(),
        },
        Some(ErrorCode::DatabaseCorrupt) => PoolError::NotAPool {
            path: path.to_path_buf(),
            reason: "the SQLite database is corrupt".into(),
        },
        _ => PoolError::Open {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

impl SqliteStore {
    /// Opens the pool file at `path`, creating it (and its directory) if absent, and
    /// migrates its schema; refuses files that are not minivmm pools.
    pub fn open(path: &Path) -> Result<SqliteStore, PoolError> {
        if path.is_dir() {
            return Err(PoolError::NotAPool {
                path: path.to_path_buf(),
                reason: "it is a directory".into(),
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| PoolError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|e| classify(path, e))?;
        // Waiting writers queue on the lock instead of failing: claims are short.
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| classify(path, e))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
        };
        store.check_identity()?;
        store
            .configure()
            .and_then(|()| store.migrate())
            .map_err(|e| match e {
                PoolError::Sql(s) => classify(path, s),
                other => other,
            })?;
        Ok(store)
    }

    /// The file this store uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a file that some other program wrote, or a newer minivmm.
    fn check_identity(&self) -> Result<(), PoolError> {
        let not_pool = |reason: String| PoolError::NotAPool {
            path: self.path.clone(),
            reason,
        };
        let read = |pragma: &str| -> Result<i64, PoolError> {
            self.conn
                .pragma_query_value(None, pragma, |r| r.get(0))
                .map_err(|e| classify(&self.path, e))
        };
        let app_id = read("application_id")?;
        let version = read("user_version")?;
        if app_id == 0 {
            let tables: i64 = self
                .conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(|e| classify(&self.path, e))?;
            if tables > 0 {
                return Err(not_pool(
                    "it is an SQLite database of another program".into(),
                ));
            }
        } else if app_id != APP_ID {
            return Err(not_pool(format!(
                "it is an SQLite database of another program (application_id {app_id:#x})"
            )));
        }
        if version > MIGRATIONS.len() as i64 {
            return Err(PoolError::TooNew {
                path: self.path.clone(),
                found: version,
                supported: MIGRATIONS.len() as i64,
            });
        }
        Ok(())
    }

    /// WAL lets readers (`pool list`) run during claims; FULL makes commits durable.
    fn configure(&self) -> Result<(), PoolError> {
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "pool {}: journal mode is {mode}, not WAL",
                self.path.display()
            );
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        // 32 MiB of page cache: a 100,000-host pool's hot pages stay in memory.
        self.conn.pragma_update(None, "cache_size", -32768)?;
        Ok(())
    }

    /// Brings the schema to the latest version, in one transaction, and checks the meta
    /// table names a pool.
    fn migrate(&mut self) -> Result<(), PoolError> {
        let latest = MIGRATIONS.len() as i64;
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < latest {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Read again under the lock: another process may have migrated meanwhile.
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
                log::info!("pool: migrating schema to version {}", i + 1);
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", i as i64 + 1)?;
            }
            tx.pragma_update(None, "application_id", APP_ID)?;
            tx.commit()?;
        }
        let format: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .optional()
            .or_else(|e| match e {
                // A database claiming our application_id but lacking our tables.
                rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                    Ok(None)
                }
                e => Err(e),
            })?;
        if format.as_deref() != Some("minivmm-pool") {
            return Err(PoolError::NotAPool {
                path: self.path.clone(),
                reason: "its meta table does not name a minivmm pool".into(),
            });
        }
        Ok(())
    }
}
