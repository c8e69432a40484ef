//! Helpers shared by the pool and scheduler tests: scratch pools in either store, the
//! conformance macro that runs a test against both, and the CLI binary.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
pub mod common;
pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Which store a test's pool lives in.
#[derive(Clone, Copy)]
pub enum Backend {
    /// A pool file in the scratch directory.
    Sqlite,
    /// A fresh database on this process's PostgreSQL test server.
    Postgres(&'static pg::Server),
}

impl Backend {
    /// The PostgreSQL backend, starting the server on first use; None after a
    /// recorded skip when PostgreSQL is not installed (a failure in CI).
    pub fn postgres(test: &str) -> Option<Backend> {
        pg::server(test).map(Backend::Postgres)
    }
}

/// Runs each named test, a function taking a [`Backend`], once per store: as
/// `sqlite::NAME` and `postgres::NAME`. The two stores promise the same, so the same
/// assertions must hold for both: this is the stores' conformance suite.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name($crate::pool_util::Backend::Sqlite)
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                if let Some(b) = $crate::pool_util::Backend::postgres(stringify!($name)) {
                    super::$name(b)
                }
            })*
        }
    };
}

/// A scratch directory removed on drop, and a pool (a file in it, or a database
/// dropped with it).
pub struct Scratch {
    pub dir: PathBuf,
    pool: PathBuf,
    database: Option<(&'static pg::Server, String)>,
}

impl Scratch {
    /// A scratch directory with an SQLite pool.
    pub fn new(tag: &str) -> Scratch {
        Scratch::with(tag, Backend::Sqlite)
    }

    /// A scratch directory with a pool in `backend`.
    pub fn with(tag: &str, backend: Backend) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "minivmm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let (pool, database) = match backend {
            Backend::Sqlite => (dir.join("pool.db"), None),
            Backend::Postgres(server) => {
                let db = server.create_database();
                (PathBuf::from(server.url(&db)), Some((server, db)))
            }
        };
        Scratch {
            dir,
            pool,
            database,
        }
    }

    /// The pool: a file path or a PostgreSQL URL, as `--pool` and `Ledger::open` take.
    pub fn pool(&self) -> PathBuf {
        self.pool.clone()
    }

    /// Whether the pool is an SQLite file.
    pub fn is_sqlite(&self) -> bool {
        self.database.is_none()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((server, db)) = &self.database {
            server.drop_database(db);
        }
    }
}

/// `minivmm <sub> --pool P`, ready for more arguments.
pub fn minivmm(pool: &Path, sub: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.env_remove("MINIVMM_POOL").env("RUST_LOG", "warn");
    c.arg(sub).arg("--pool").arg(pool);
    c
}

/// Runs `minivmm <sub> --pool P args...` and returns its output.
pub fn run(pool: &Path, args: &[&str]) -> Output {
    minivmm(pool, args[0])
        .args(&args[1..])
        .output()
        .expect("run minivmm")
}

/// Runs and expects success; returns stdout.
pub fn ok(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and expects failure; returns stderr.
pub fn fails(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything a user can see of the pool, for "nothing changed" checks.
pub fn snapshot(pool: &Path) -> String {
    ok(pool, &["pool", "--json", "list"]) + &ok(pool, &["pool", "--json", "allocations"])
}

/// Holds the pool's write lock, as a writer in another process would, until dropped:
/// SQLite's BEGIN IMMEDIATE, or PostgreSQL's row lock on the pool generation.
pub enum WriteLock {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::Client),
}

impl Scratch {
    /// Takes the pool's write lock from a connection of its own.
    pub fn lock_writes(&self) -> WriteLock {
        if self.is_sqlite() {
            let c = rusqlite::Connection::open(&self.pool).expect("open");
            c.execute_batch("BEGIN IMMEDIATE").expect("write lock");
            WriteLock::Sqlite(c)
        } else {
            let mut c = postgres::Client::connect(self.pool.to_str().unwrap(), postgres::NoTls)
                .expect("connect");
            c.batch_execute(
                "BEGIN; SELECT value FROM minivmm.meta WHERE key = 'generation' FOR UPDATE",
            )
            .expect("write lock");
            WriteLock::Postgres(c)
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = match self {
            WriteLock::Sqlite(c) => c.execute_batch("ROLLBACK").map_err(|e| e.to_string()),
            WriteLock::Postgres(c) => c.batch_execute("ROLLBACK").map_err(|e| e.to_string()),
        };
    }
}
