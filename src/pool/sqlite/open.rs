//! Opening a pool file: refusing foreign files, WAL and FULL sync, schema migrations.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use super::SqliteStore;
use super::files::PoolFiles;
use crate::pool::PoolError;

/// PRAGMA application_id of a minivmm pool: "MVMM" in ASCII, so `file` and we can tell it.
const APP_ID: i64 = 0x4d56_4d4d;

/// How long a claim waits for another process's write before giving up; claims are short.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Set by [`crate::pool::interrupt_waits`]: every wait for the pool's lock in this
/// process gives up at its next look.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// SQLite's busy handler for every pool connection: called, with the number of times
/// it was called for this lock attempt, when another connection holds the lock this
/// one needs (SQLITE_BUSY); returning true retries, false gives up with SQLITE_BUSY.
///
/// It waits as SQLite's own busy timeout does (sleeps of 1 ms growing to 100 ms, for
/// up to [`BUSY_TIMEOUT`] in all) but gives up as soon as [`INTERRUPTED`] is set, so a
/// process told to stop (SIGTERM while `run` waits for admission on a pool another
/// process keeps locked) stops within one sleep instead of after 30 s.
fn wait_for_lock(count: i32) -> bool {
    const SLEEPS_MS: [u64; 12] = [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];
    thread_local! {
        static SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    let now = Instant::now();
    if count == 0 {
        SINCE.with(|s| s.set(Some(now)));
    }
    let since = SINCE.with(|s| s.get()).unwrap_or(now);
    if INTERRUPTED.load(Ordering::Relaxed) || now.duration_since(since) >= BUSY_TIMEOUT {
        return false;
    }
    let step = usize::try_from(count).unwrap_or(0).min(SLEEPS_MS.len() - 1);
    std::thread::sleep(Duration::from_millis(SLEEPS_MS[step]));
    !INTERRUPTED.load(Ordering::Relaxed)
}

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
            source: Box::new(e),
        },
    }
}

/// What a file says about itself: header fields and whether it holds any schema.
struct Identity {
    /// PRAGMA application_id (0 in a fresh file).
    app_id: i64,
    /// PRAGMA user_version: the schema version our migrations reached.
    version: i64,
    /// Number of schema objects (tables, indexes) in the file.
    objects: i64,
}

impl Identity {
    /// Reads the facts; call inside a transaction so they come from one snapshot.
    fn read(conn: &Connection) -> rusqlite::Result<Identity> {
        let pragma = |name: &str| conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0));
        Ok(Identity {
            app_id: pragma("application_id")?,
            version: pragma("user_version")?,
            objects: conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?,
        })
    }

    /// A fresh empty file or a pool this minivmm can migrate passes; anything else is named.
    fn check(&self, path: &Path) -> Result<(), PoolError> {
        let not_pool = |reason: String| PoolError::NotAPool {
            path: path.to_path_buf(),
            reason,
        };
        if self.app_id == 0 && self.objects > 0 {
            return Err(not_pool(
                "it is an SQLite database of another program".into(),
            ));
        }
        if self.app_id != 0 && self.app_id != APP_ID {
            return Err(not_pool(format!(
                "it is an SQLite database of another program (application_id {:#x})",
                self.app_id
            )));
        }
        if self.version > MIGRATIONS.len() as i64 {
            return Err(PoolError::TooNew {
                path: path.to_path_buf(),
                found: self.version,
                supported: MIGRATIONS.len() as i64,
            });
        }
        Ok(())
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
            create_parent(path, dir)?;
        }
        // lstat, not stat: a dangling symlink exists, and is not ours to remove.
        let created = std::fs::symlink_metadata(path).is_err();
        let conn = Connection::open(path).map_err(|e| classify(path, e))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            created,
            files: None,
        };
        let opened = store.set_up().map_err(|e| match e {
            PoolError::Database(e) => match e.downcast::<rusqlite::Error>() {
                Ok(s) => classify(path, *s),
                Err(e) => PoolError::Database(e),
            },
            other => other,
        });
        match opened {
            Ok(()) => {
                // set_up read the pool in WAL mode, so SQLite now holds the -wal and
                // -shm files open: these are the files this connection goes on using.
                store.files = Some(PoolFiles::at(path));
                Ok(store)
            }
            // A file we created and could not make a pool (disk full, I/O error) must
            // not stay behind, empty. A refused file is someone else's, as is one that
            // existed: both are left alone.
            Err(e @ (PoolError::NotAPool { .. } | PoolError::TooNew { .. })) => Err(e),
            Err(e) => {
                if created {
                    drop(store);
                    if let Err(rm) = remove_files(path) {
                        log::warn!("cannot remove the pool file this failed open created: {rm}");
                    }
                }
                Err(e)
            }
        }
    }

    /// Replaces this store's connection, whose -shm (or pool file) was deleted or
    /// replaced under it, with one to the files now on disk, the pool every other
    /// process sees.
    ///
    /// The old connection is closed with checkpoint-on-close turned off
    /// (SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE): otherwise, as the pool's last connection in
    /// this process, SQLite would copy its own, diverged WAL into the pool file and
    /// then unlink the `-wal` file now at the path, which holds other processes'
    /// claims. It is closed before the new one opens because SQLite shares one
    /// shared-memory index per pool file inode within a process: a second connection
    /// opened beside the old one would read the old, unlinked index. The new
    /// connection never creates a file: a pool file that is gone stays gone.
    pub(super) fn reopen(&mut self) -> Result<(), PoolError> {
        self.conn
            .set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        let placeholder = Connection::open_in_memory()?;
        let old = std::mem::replace(&mut self.conn, placeholder);
        old.close().map_err(|(_, e)| e)?;
        self.files = None;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        self.conn =
            Connection::open_with_flags(&self.path, flags).map_err(|e| classify(&self.path, e))?;
        self.conn.busy_handler(Some(wait_for_lock))?;
        self.configure()?;
        self.files = Some(PoolFiles::at(&self.path));
        Ok(())
    }

    /// Makes an open file a usable pool: busy timeout, identity check, WAL, schema.
    fn set_up(&mut self) -> Result<(), PoolError> {
        // Waiting writers queue on the lock instead of failing: claims are short.
        self.conn.busy_handler(Some(wait_for_lock))?;
        self.check_identity()?;
        self.configure()?;
        self.migrate()
    }

    /// The file this store uses.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a file that some other program wrote, or a newer minivmm.
    ///
    /// The facts are read in one read transaction: read one by one, a process creating
    /// the pool at the same moment could commit between them, and an empty header with
    /// tables behind it would look like another program's database.
    fn check_identity(&self) -> Result<(), PoolError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| classify(&self.path, e))?;
        let facts = Identity::read(&tx).map_err(|e| classify(&self.path, e))?;
        drop(tx);
        facts.check(&self.path)
    }

    /// WAL lets readers (`pool list`) run during claims; FULL makes commits durable.
    fn configure(&self) -> Result<(), PoolError> {
        let mode: String = self
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            self.enter_wal()?;
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        // 32 MiB of page cache: a 100,000-host pool's hot pages stay in memory.
        self.conn.pragma_update(None, "cache_size", -32768)?;
        Ok(())
    }

    /// Switches a new pool file to WAL (a persistent property of the file).
    ///
    /// The switch needs the file to itself, and SQLite answers SQLITE_BUSY at once rather
    /// than through the busy handler when another connection is using it, which happens
    /// when many processes open a new pool together. So retry, for as long as the busy
    /// timeout would have waited, or until waits are interrupted.
    fn enter_wal(&self) -> Result<(), PoolError> {
        let deadline = Instant::now() + BUSY_TIMEOUT;
        loop {
            match self
                .conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            {
                Ok(mode) => {
                    if !mode.eq_ignore_ascii_case("wal") {
                        log::warn!(
                            "pool {}: journal mode is {mode}, not WAL",
                            self.path.display()
                        );
                    }
                    return Ok(());
                }
                Err(e)
                    if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                        && Instant::now() < deadline
                        && !INTERRUPTED.load(Ordering::Relaxed) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
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
            let facts = Identity::read(&tx)?;
            facts.check(&self.path)?;
            let version = facts.version;
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

/// Creates the pool's directory `dir` and its parents. An ancestor that exists and is
/// not a directory is named as such: mkdir(2) would only answer EEXIST ("File exists")
/// or ENOTDIR for it, which names neither the file nor the fix.
fn create_parent(path: &Path, dir: &Path) -> Result<(), PoolError> {
    for ancestor in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        match std::fs::metadata(ancestor) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(PoolError::ParentNotDirectory {
                    path: path.to_path_buf(),
                    parent: ancestor.to_path_buf(),
                });
            }
            Err(_) => continue,
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| PoolError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })
}

/// Removes a pool file and its WAL and shared-memory companions; missing ones are fine.
pub(super) fn remove_files(path: &Path) -> Result<(), PoolError> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PoolError::Io {
                    what: format!("removing {}", Path::new(&name).display()),
                    source,
                });
            }
        }
    }
    Ok(())
}
