//! The pool's tables in PostgreSQL, in their own schema, created or migrated on open.

use postgres::Client;

use crate::pool::PoolError;

/// The schema (namespace) holding the pool's tables, so a database shared with other
/// programs keeps them apart; every connection puts it first on its search_path.
pub(super) const SCHEMA: &str = "minivmm";

/// Takes the pool's write lock for the transaction and reads the pool generation.
pub(super) const LOCK_GENERATION: &str =
    "SELECT value FROM meta WHERE key = 'generation' FOR UPDATE";

/// Key of the transaction-scoped advisory lock that serialises schema creation and
/// migration among processes opening a new pool together: "MVMM".
const MIGRATION_LOCK: i64 = 0x4d56_4d4d;

/// Schema migrations; entry i brings version i to i + 1. The tables mirror the SQLite
/// store's (see its migrations for why each column is there).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value BIGINT NOT NULL);
     INSERT INTO meta VALUES ('generation', 0), ('removed_at', 0);
     CREATE TABLE hosts(
        id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, enabled BOOLEAN NOT NULL,
        cost DOUBLE PRECISION NOT NULL, hours DOUBLE PRECISION NOT NULL, max_vms BIGINT,
        generation BIGINT NOT NULL, vms BIGINT NOT NULL DEFAULT 0, created BIGINT NOT NULL,
        used_vcpus BIGINT NOT NULL DEFAULT 0, used_memory_mib BIGINT NOT NULL DEFAULT 0,
        used_disk_gib BIGINT NOT NULL DEFAULT 0,
        usable_vcpus BIGINT NOT NULL DEFAULT 0, usable_memory_mib BIGINT NOT NULL DEFAULT 0,
        usable_disk_gib BIGINT NOT NULL DEFAULT 0, limited BOOLEAN NOT NULL DEFAULT false);
     CREATE INDEX hosts_generation ON hosts(generation);
     CREATE TABLE inventories(
        host_id BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE, resource TEXT NOT NULL,
        total BIGINT NOT NULL, reserved BIGINT NOT NULL, ratio DOUBLE PRECISION NOT NULL,
        min_unit BIGINT, max_unit BIGINT, step BIGINT, PRIMARY KEY(host_id, resource));
     CREATE TABLE labels(
        host_id BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE, key TEXT NOT NULL,
        value TEXT NOT NULL, PRIMARY KEY(host_id, key));
     CREATE TABLE owners(
        id BIGSERIAL PRIMARY KEY, host TEXT NOT NULL, pid BIGINT NOT NULL,
        start_time BIGINT NOT NULL, boot_id TEXT NOT NULL, UNIQUE(host, pid, start_time, boot_id));
     CREATE TABLE allocations(
        id BIGSERIAL PRIMARY KEY, host_id BIGINT NOT NULL REFERENCES hosts(id),
        vm_name TEXT NOT NULL, grp TEXT, vcpus BIGINT NOT NULL, memory_mib BIGINT NOT NULL,
        disk_gib BIGINT NOT NULL, owner_id BIGINT REFERENCES owners(id), created BIGINT NOT NULL);
     CREATE INDEX allocations_host ON allocations(host_id);
     CREATE INDEX allocations_group ON allocations(host_id, grp) WHERE grp IS NOT NULL;
     CREATE INDEX allocations_owner ON allocations(owner_id) WHERE owner_id IS NOT NULL;",
    // v2: the pool's VMs (placed by any scheduler, started by their host's agent) and
    // the agents' heartbeats. A VM row holds its allocation; `desired` is what its
    // creator wants (running, deleted), `state` what its agent last reported.
    "CREATE TABLE vms(
        name TEXT PRIMARY KEY, host_id BIGINT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        allocation_id BIGINT REFERENCES allocations(id) ON DELETE SET NULL,
        spec TEXT NOT NULL, desired TEXT NOT NULL, state TEXT NOT NULL, status INTEGER,
        reason TEXT, created BIGINT NOT NULL, updated BIGINT NOT NULL);
     CREATE INDEX vms_host ON vms(host_id);
     CREATE TABLE agents(
        host_id BIGINT PRIMARY KEY REFERENCES hosts(id) ON DELETE CASCADE,
        heartbeat BIGINT NOT NULL, down BOOLEAN NOT NULL DEFAULT false, pid BIGINT NOT NULL,
        machine TEXT NOT NULL);",
];

/// Session settings for every pool connection: the pool's schema first on the
/// search_path; a wait for another writer's lock gives up after 30 s, as the SQLite
/// store's busy timeout does; and a session of ours that sits idle inside a
/// transaction for 60 s (a process stopped mid-claim) is ended by the server, so its
/// lock cannot hold every other writer of the pool back for ever.
pub(super) fn configure(config: &mut postgres::Config) {
    let mut options = config.get_options().unwrap_or("").to_string();
    if !options.is_empty() {
        options.push(' ');
    }
    options.push_str(&format!(
        "-c search_path={SCHEMA} -c lock_timeout=30s -c idle_in_transaction_session_timeout=60s"
    ));
    config.options(&options);
}

/// Creates the schema and tables if absent and migrates them, in one transaction under
/// an advisory lock; refuses a `minivmm` schema that is not a pool, or a newer one.
pub(super) fn migrate(client: &mut Client, shown: &str) -> Result<(), PoolError> {
    let latest = MIGRATIONS.len() as i64;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))?;
    let has_meta: bool = tx
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{SCHEMA}.meta")],
        )?
        .get(0);
    let not_pool = |reason: &str| PoolError::NotAPool {
        path: shown.into(),
        reason: reason.to_string(),
    };
    let version: i64 = if has_meta {
        let rows = tx.query("SELECT value FROM meta WHERE key = 'schema'", &[])?;
        match rows.first() {
            Some(r) => r.get(0),
            None => return Err(not_pool("its minivmm.meta table has no schema version")),
        }
    } else {
        let tables: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
                &[&SCHEMA],
            )?
            .get(0);
        if tables > 0 {
            return Err(not_pool(
                "its schema minivmm holds tables of another program",
            ));
        }
        tx.batch_execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value BIGINT NOT NULL)")?;
        tx.execute("INSERT INTO meta VALUES ('schema', 0)", &[])?;
        0
    };
    if version > latest {
        return Err(PoolError::TooNew {
            path: shown.into(),
            found: version,
            supported: latest,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        log::info!("pool {shown}: migrating schema to version {}", i + 1);
        // Version 1 creates meta itself; the bootstrap table above is its stand-in.
        if i == 0 {
            tx.batch_execute("DROP TABLE meta")?;
        }
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO meta VALUES ('schema', $1) ON CONFLICT (key) DO UPDATE SET value = $1",
            &[&(i as i64 + 1)],
        )?;
    }
    tx.commit()?;
    Ok(())
}
