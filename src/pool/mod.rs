//! The host-pool ledger: hosts, their inventories, and the allocations VMs hold.
//!
//! A [`Ledger`] is one open pool file. `minivmm run` uses [`Ledger::claim_local`] for
//! admission; the `pool` commands use the rest; the scheduler claims through
//! [`Store::claim`], in the same transaction as its choice. Storage sits behind the
//! [`Store`] trait (SQLite by default).

pub mod cli;
mod local;
pub mod model;
pub mod owner;
pub mod postgres;
pub mod sqlite;
pub mod store;
pub mod table;
pub mod units;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use model::{Allocation, Amounts, Host, HostSpec, Inventory, Owner, Resource};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use store::{ClaimRequest, Committed, Delta, Released, Store};

/// A store's own database error, whatever the store (SQLite today), kept whole for
/// its message and for the store itself to inspect (by downcasting).
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool could not be opened.
    #[error("cannot open pool {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the store's database said.
        source: BackendError,
    },
    /// The file exists but is not a minivmm pool.
    #[error("{path} is not a minivmm pool: {reason}")]
    NotAPool {
        /// The file.
        path: PathBuf,
        /// How we know.
        reason: String,
    },
    /// The pool was written by a newer minivmm.
    #[error("{path} has pool schema version {found}; this minivmm knows up to {supported}")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// Ours.
        supported: i64,
    },
    /// The store's database failed during an operation (its own error inside:
    /// `rusqlite::Error` for SQLite).
    #[error("pool database error: {0}")]
    Database(BackendError),
    /// The pool's URL names a store this minivmm cannot open.
    #[error(
        "cannot open pool {url:?}: {why}. A pool is an SQLite file (a path or sqlite:PATH) \
         or a PostgreSQL database (postgres://USER@HOST/DB)"
    )]
    UnsupportedStore {
        /// As given.
        url: String,
        /// Why not.
        why: &'static str,
    },
    /// A file or /proc read failed.
    #[error("reading {what}: {source}")]
    Io {
        /// What was read.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// This machine's identity or capacity could not be found.
    #[error("{0}")]
    Local(String),
    /// Bad input from the user; nothing was changed.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// No host has this name.
    #[error("no host named {0} in the pool")]
    UnknownHost(String),
    /// A host with this name exists already.
    #[error("a host named {0} is already in the pool")]
    DuplicateHost(String),
    /// The host holds allocations.
    #[error("host {host} holds {count} allocation(s); release them first or use --force")]
    HostBusy {
        /// Host name.
        host: String,
        /// Allocations on it.
        count: usize,
    },
    /// No allocation has this id.
    #[error("no allocation with id {0}")]
    UnknownAllocation(i64),
    /// The host lacks one resource.
    #[error("host {host} lacks {resource}: asked {asked}, free {free}")]
    Insufficient {
        /// Host name.
        host: String,
        /// The resource that does not fit.
        resource: Resource,
        /// What was asked, with its unit.
        asked: String,
        /// What is free, with its unit.
        free: String,
    },
    /// The host is disabled.
    #[error("host {0} is disabled")]
    HostDisabled(String),
    /// The host has as many VMs as it may.
    #[error("host {host} already has its maximum of {max} VMs")]
    HostFull {
        /// Host name.
        host: String,
        /// Its limit.
        max: u64,
    },
    /// The host already holds a VM of this anti-affinity group.
    #[error("host {host} already holds a VM of group {group}")]
    GroupConflict {
        /// Host name.
        host: String,
        /// The group.
        group: String,
    },
    /// A VM of this name is recorded in the pool already.
    #[error("a VM named {0} is in the pool already")]
    VmExists(String),
    /// No VM of this name is recorded in the pool.
    #[error("no VM named {0} in the pool")]
    UnknownVm(String),
    /// The operation needs a pool shared by many hosts.
    #[error(
        "{0} needs a PostgreSQL pool (--pool postgres://...); an SQLite pool serves one \
         machine: create VMs there with `minivmm vm create` against its agent's socket"
    )]
    NeedsSharedPool(&'static str),
    /// Someone else changed the host between read and write; try again.
    #[error("host {0} was changed by someone else meanwhile; try again")]
    Conflict(String),
    /// The allocation a process holds is no longer in the pool as it claimed it: the
    /// pool lost writes (its -wal or -shm file was deleted under a running VM) or was
    /// edited behind its back. Nothing was released.
    #[error(
        "pool {pool}: allocation {id} of {claimed} {now}{cause}; nothing was released. \
         What it held may have been given to other VMs meanwhile: check `minivmm pool status` \
         and `minivmm pool allocations`",
        id = claimed.id,
        claimed = claimed.describe()
    )]
    ClaimLost {
        /// The pool file.
        pool: PathBuf,
        /// The allocation as it was claimed.
        claimed: Box<Allocation>,
        /// What the pool holds under its id now ("is no longer in the pool", ...).
        now: String,
        /// Why, when known ("; the pool's -wal file was ..."), or empty.
        cause: String,
    },
    /// A directory on the pool's path is a file, so the pool cannot be created there.
    #[error("cannot create pool {path}: {parent} is not a directory")]
    ParentNotDirectory {
        /// The pool file asked for.
        path: PathBuf,
        /// The first ancestor that exists and is not a directory.
        parent: PathBuf,
    },
    /// The pool's directory could not be created.
    #[error("cannot create the pool's directory {dir}: {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl PoolError {
    /// The ledger's error for a host named `host` that cannot take a claim.
    pub(crate) fn misfit(m: model::Misfit, host: String) -> PoolError {
        use model::Misfit;
        match m {
            Misfit::Disabled => PoolError::HostDisabled(host),
            Misfit::MaxVms(max) => PoolError::HostFull { host, max },
            Misfit::Group(group) => PoolError::GroupConflict { host, group },
            Misfit::Limit {
                resource,
                need,
                reason,
            } => PoolError::Invalid(format!("{resource} {need} on host {host}: {reason}")),
            Misfit::Lacks {
                resource,
                need,
                free,
            } => PoolError::Insufficient {
                host,
                resource,
                asked: resource.show(need),
                free: resource.show(free),
            },
        }
    }

    /// Whether this is the ledger saying "it does not fit here" (capacity, a
    /// disabled or full host, an anti-affinity group), rather than a failure.
    pub fn is_no_fit(&self) -> bool {
        matches!(
            self,
            PoolError::Insufficient { .. }
                | PoolError::HostDisabled(_)
                | PoolError::HostFull { .. }
                | PoolError::GroupConflict { .. }
        )
    }
}

/// The default pool file: $MINIVMM_POOL, else $XDG_STATE_HOME/minivmm/pool.db, else
/// ~/.local/state/minivmm/pool.db.
pub fn default_path() -> Result<PathBuf, PoolError> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("MINIVMM_POOL") {
        return Ok(PathBuf::from(p));
    }
    let state = var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .ok_or_else(|| {
            PoolError::Local("neither MINIVMM_POOL, XDG_STATE_HOME nor HOME is set".into())
        })?;
    Ok(state.join("minivmm/pool.db"))
}

/// Where a pool is: an SQLite file or a PostgreSQL database.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    /// An SQLite file (created on first use).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

/// Where a pool named by `--pool` or `$MINIVMM_POOL` is: a path (`pool.db`,
/// `/var/lib/minivmm/pool.db`), `sqlite:PATH` (`sqlite:///abs/path` too), or a
/// PostgreSQL URL (`postgres://user@host/db`, `postgresql:///db?host=/run/postgresql`).
pub fn locate(given: &Path) -> Result<Location, PoolError> {
    let text = given.to_string_lossy();
    let unsupported = |why| PoolError::UnsupportedStore {
        url: text.to_string(),
        why,
    };
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(Location::Postgres(text.into_owned()));
    }
    if let Some(rest) = text.strip_prefix("sqlite:") {
        // sqlite:///abs/path and sqlite://localhost/abs/path name a file URL's path.
        let rest = rest
            .strip_prefix("//localhost")
            .or_else(|| rest.strip_prefix("//"))
            .unwrap_or(rest);
        if rest.is_empty() {
            return Err(unsupported("the URL names no file"));
        }
        return Ok(Location::Sqlite(PathBuf::from(rest)));
    }
    let url_scheme = text.split_once("://").map(|(scheme, _)| scheme);
    if url_scheme.is_some_and(|sc| {
        !sc.is_empty() && sc.chars().all(|c| c.is_ascii_alphanumeric() || c == '+')
    }) {
        return Err(unsupported("unknown URL scheme"));
    }
    Ok(Location::Sqlite(given.to_path_buf()))
}

/// Makes every wait of this process for another process's lock on a pool give up at
/// once, and every later one at its first look: the operation fails with SQLite's
/// "database is locked". For a process told to stop (`minivmm run` calls it from its
/// signal thread): admission must not hold a stop back for the 30 s a claim may wait.
/// There is no undoing it.
pub fn interrupt_waits() {
    sqlite::interrupt_waits();
}

/// One open pool. Cheap to clone and share between threads: the store (one database
/// connection) sits behind a mutex.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<Mutex<Box<dyn Store>>>,
    path: PathBuf,
}

impl Ledger {
    /// Opens (creating if absent) the pool at `path` or the default path. A relative
    /// path is taken from the current directory, once, here: messages then name the
    /// file in full and `init` measures the right file system.
    pub fn open(path: Option<&Path>) -> Result<Ledger, PoolError> {
        let location = match path {
            Some(p) => locate(p)?,
            None => locate(&default_path()?)?,
        };
        let path = match location {
            Location::Postgres(url) => {
                let store = PostgresStore::open(&url)?;
                return Ok(Ledger::with_store(
                    Box::new(store),
                    postgres::redact(&url).into(),
                ));
            }
            Location::Sqlite(path) => path,
        };
        let path = std::path::absolute(&path).map_err(|source| PoolError::Io {
            what: format!("the current directory, to find pool {:?}", path.display()),
            source,
        })?;
        let store = SqliteStore::open(&path)?;
        Ok(Ledger::with_store(Box::new(store), path))
    }

    /// A ledger over any store; `path` names it in messages and places `init`'s disk
    /// measurement.
    pub fn with_store(store: Box<dyn Store>, path: PathBuf) -> Ledger {
        Ledger {
            store: Arc::new(Mutex::new(store)),
            path,
        }
    }

    /// The pool file, or the PostgreSQL URL (password hidden).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Locks the store for one operation.
    pub fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        // A panic while holding the lock leaves SQLite consistent (its transaction rolls
        // back on drop), so a poisoned lock is safe to keep using.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers this machine with its real capacity, unless a host of its name exists.
    /// Returns the host and whether it was added now.
    pub fn init_local(&self) -> Result<(Host, bool), PoolError> {
        let name = owner::hostname()?;
        let mut store = self.store();
        match store.host(&name) {
            Ok(h) => return Ok((h, false)),
            Err(PoolError::UnknownHost(_)) => {}
            Err(e) => return Err(e),
        }
        // The parent of a bare "p.db" is "", which statvfs cannot find: that is ".".
        // A shared database says nothing of this machine's disks: count the root's.
        let dir = match locate(&self.path) {
            Ok(Location::Sqlite(_)) => self
                .path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
            _ => Path::new("/"),
        };
        let spec = local::local_host_spec(dir)?;
        match store.add_hosts(std::slice::from_ref(&spec)) {
            // Another process registered it between our look and our write: fine.
            Ok(()) | Err(PoolError::DuplicateHost(_)) => Ok((store.host(&name)?, true)),
            Err(e) => Err(e),
        }
    }

    /// Adds a host.
    pub fn add_host(&self, spec: &HostSpec) -> Result<Host, PoolError> {
        let mut store = self.store();
        store.add_hosts(std::slice::from_ref(spec))?;
        store.host(&spec.name)
    }

    /// Changes a host with `edit`, atomically against concurrent edits (by generation).
    pub fn set_host(
        &self,
        name: &str,
        edit: impl Fn(&mut HostSpec) -> Result<(), PoolError>,
    ) -> Result<Host, PoolError> {
        let mut store = self.store();
        // A claim elsewhere bumps the generation too; retry a few times on such races.
        for _ in 0..8 {
            let host = store.host(name)?;
            let mut spec = host.spec.clone();
            edit(&mut spec)?;
            match store.update_host(name, &spec, host.generation) {
                Err(PoolError::Conflict(_)) => continue,
                other => return other,
            }
        }
        Err(PoolError::Conflict(name.to_string()))
    }

    /// Claims `amounts` on the named host, held until released explicitly.
    pub fn claim_on(
        &self,
        host: &str,
        vm_name: &str,
        amounts: Amounts,
        owner: Option<Owner>,
    ) -> Result<Allocation, PoolError> {
        self.claim_on_grouped(host, vm_name, None, amounts, owner)
    }

    /// [`Ledger::claim_on`] for a VM of an anti-affinity group: refused
    /// ([`PoolError::GroupConflict`]) when the host holds a VM of that group already.
    pub fn claim_on_grouped(
        &self,
        host: &str,
        vm_name: &str,
        group: Option<&str>,
        amounts: Amounts,
        owner: Option<Owner>,
    ) -> Result<Allocation, PoolError> {
        model::validate_name("VM name", vm_name)?;
        if let Some(g) = group {
            model::validate_name("group", g)?;
        }
        amounts.validate_request()?;
        let mut store = self.store();
        let host_id = store.host_id(host)?;
        let request = ClaimRequest {
            host_id,
            vm_name: vm_name.to_string(),
            group: group.map(str::to_string),
            amounts,
            owner,
            vm_spec: None,
        };
        let mut choose = |_: Delta| Ok(vec![request.clone()]);
        let committed = store.claim(None, &mut choose, false)?;
        committed
            .results
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(PoolError::Local("the claim returned no result".into())))
    }

    /// Claims vcpus, memory and disk on the local host (registering it with its real capacity,
    /// like `pool init`, if the pool has no local host yet). Error message names the
    /// resource, what is asked and what is free.
    pub fn claim_local(
        &self,
        vm_name: &str,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
    ) -> Result<Claim, PoolError> {
        self.claim_local_grouped(vm_name, None, vcpus, memory_mib, disk_gib)
    }

    /// [`Ledger::claim_local`] for a VM of an anti-affinity group (see
    /// [`Ledger::claim_on_grouped`]).
    pub fn claim_local_grouped(
        &self,
        vm_name: &str,
        group: Option<&str>,
        vcpus: u32,
        memory_mib: u64,
        disk_gib: u64,
    ) -> Result<Claim, PoolError> {
        let owner = owner::current()?;
        // The common case, a host registered already, in one lookup; the first claim
        // on a machine registers it.
        let known = match self.store().host_id(&owner.host) {
            Ok(_) => true,
            Err(PoolError::UnknownHost(_)) => false,
            Err(e) => return Err(e),
        };
        if !known {
            self.init_local()?;
        }
        let amounts = Amounts::new(vcpus.into(), memory_mib, disk_gib);
        let host = owner.host.clone();
        let a = self.claim_on_grouped(&host, vm_name, group, amounts, Some(owner))?;
        log::info!(
            "pool: claimed {} vcpus, {} MiB, {disk_gib} GiB disk on {} for {vm_name} (allocation {})",
            vcpus,
            memory_mib,
            a.host,
            a.id
        );
        Ok(Claim {
            ledger: self.clone(),
            allocation: a,
            released: false,
        })
    }

    /// Lets this connection's commits go without waiting for the disk (SQLite's
    /// synchronous=NORMAL instead of FULL), for a process whose writes are its own
    /// claims ([`Ledger::claim_local`], held by this process) and their release, as
    /// `minivmm run`'s are. Two fsyncs are most of the ledger's
    /// share of a short VM's life, and they buy nothing here:
    ///
    /// - A crash of the process loses nothing: a commit is in the WAL, in the OS's
    ///   page cache, before the call returns; the claim stays until found stale
    ///   (tests/admission.rs kills `run` with SIGKILL and `gc` releases its claim).
    /// - A power loss (or OS crash) may lose the last such commits, but it kills the
    ///   process too, so the VM the claim was for is gone with it: a lost claim
    ///   holds nothing that runs. A lost release leaves a claim whose owner has the
    ///   previous boot's id: stale, released by the next claim or `gc`.
    /// - Order is kept: WAL frames are written in commit order, so a later commit
    ///   made durable (any FULL commit of another process, or a checkpoint) makes
    ///   these durable too; nothing can come back without what came before it.
    ///
    /// Writes this connection makes on the way (registering this machine as a host
    /// on first use, releasing other processes' stale claims) are idempotent: lost,
    /// they are made again by the next claim.
    ///
    /// The SQLite store also skips the checkpoint when such a connection closes
    /// (whichever commit finds the WAL over 100 pages checkpoints instead), unless it
    /// found its -wal file deleted: then that checkpoint is what saves the pool.
    pub fn relax_durability(&self) -> Result<(), PoolError> {
        self.store().relax_durability()
    }

    /// Releases one allocation by id.
    pub fn release(&self, id: i64) -> Result<Allocation, PoolError> {
        self.store().release(id)
    }

    /// Releases an allocation this process claimed, only if the pool still holds it as
    /// claimed (see [`Store::release_claimed`]).
    pub fn release_claimed(&self, claimed: &Allocation) -> Result<Released, PoolError> {
        self.store().release_claimed(claimed)
    }

    /// Releases every allocation whose owner process is gone.
    pub fn gc(&self) -> Result<Vec<Allocation>, PoolError> {
        self.store().release_stale()
    }

    /// For a command that failed: removes the pool file if this process created it
    /// and nothing was written to it, so a failure (or a mistyped `--pool`) leaves no
    /// empty pool behind. Errors are logged: the command's own error is the one to
    /// report.
    pub fn discard_if_unused(&self) {
        match self.store().discard_if_unused() {
            Ok(true) => log::info!("removed the unused pool {}", self.path.display()),
            Ok(false) => {}
            Err(e) => log::warn!(
                "could not remove the unused pool {}: {e}",
                self.path.display()
            ),
        }
    }
}

/// An allocation held by this process; released on drop (and explicitly via release()).
///
/// The release checks that the pool still holds the allocation as it was claimed. When
/// it does not (the pool lost writes), nothing is released and the loss is reported on
/// stderr and in the log, naming the pool and the allocation: a quiet error would
/// hide a host that may now be overcommitted.
pub struct Claim {
    ledger: Ledger,
    allocation: Allocation,
    released: bool,
}

impl Claim {
    /// The allocation's id in the ledger.
    pub fn id(&self) -> i64 {
        self.allocation.id
    }

    /// The allocation as it was claimed.
    pub fn allocation(&self) -> &Allocation {
        &self.allocation
    }

    /// Releases the allocation now, reporting any error; damage to the pool that did
    /// not cost this claim is reported loudly and is not an error.
    pub fn release(mut self) -> Result<(), PoolError> {
        self.released = true;
        let released = self.ledger.release_claimed(&self.allocation)?;
        if let Some(damage) = released.damage {
            loud(&damage);
        }
        Ok(())
    }
}

/// Says `msg` on stderr and in the log. A damaged ledger must reach a person even when
/// logging is off or goes elsewhere, and stderr may be a closed pipe: nothing here
/// panics.
fn loud(msg: &str) {
    log::error!("{msg}");
    let _ = writeln!(std::io::stderr(), "minivmm: POOL LEDGER DAMAGED: {msg}");
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("id", &self.allocation.id)
            .field("pool", &self.ledger.path)
            .finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        match self.ledger.release_claimed(&self.allocation) {
            Ok(released) => {
                if let Some(damage) = released.damage {
                    loud(&damage);
                }
            }
            Err(e @ PoolError::ClaimLost { .. }) => loud(&e.to_string()),
            // Nothing leaks even so: the next claim or `pool gc` finds it stale once
            // this process is gone.
            Err(e) => log::error!(
                "pool {}: could not release allocation {}: {e}",
                self.ledger.path.display(),
                self.allocation.id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_named_by_path_or_url() {
        let p = |s: &str| locate(Path::new(s));
        let file = |s: &str| Location::Sqlite(PathBuf::from(s));
        assert_eq!(p("pool.db").unwrap(), file("pool.db"));
        assert_eq!(p("/var/lib/p.db").unwrap(), file("/var/lib/p.db"));
        assert_eq!(p("sqlite:p.db").unwrap(), file("p.db"));
        assert_eq!(p("sqlite:///var/p.db").unwrap(), file("/var/p.db"));
        assert_eq!(p("sqlite://localhost/var/p.db").unwrap(), file("/var/p.db"));
        // A colon in a plain file name is a file name.
        assert_eq!(p("a:b.db").unwrap(), file("a:b.db"));
        for url in ["postgres://h/db", "postgresql://u@h:5432/db"] {
            assert_eq!(p(url).unwrap(), Location::Postgres(url.into()));
        }
        for bad in ["mysql://h/db", "sqlite:"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("sqlite:PATH"), "{e}");
        }
    }
}
