//! The ledger in a shared PostgreSQL database, for a pool that spans many machines.
//!
//! Same tables as the SQLite store, in the schema `minivmm` of the database the URL
//! names. The concurrency argument is the SQLite one, moved to a row lock: every write
//! transaction first takes `SELECT ... FOR UPDATE` on the pool's generation row, so
//! writers (claims, releases, host edits) from any number of processes on any number
//! of machines run one after another, and each sees everything committed before it.
//! A claim's check ("does it still fit?") and its write therefore cannot interleave
//! with another's: no host is ever overcommitted. The generation row is also what the
//! schedulers' incremental refresh needs: every change carries the next generation,
//! in commit order. Reads take a REPEATABLE READ snapshot and no lock.
//!
//! Durability is PostgreSQL's: a COMMIT returns once the WAL record is flushed
//! (`synchronous_commit = on`, the default), and on a replicated server once the
//! standbys the operator named have it.
//!
//! A connection that broke since the last operation (the server restarted) is found
//! at the next transaction's first statement and opened again, once, before anything
//! was done. A break in the middle of a transaction fails that operation with
//! [`PoolError::Database`], and the server rolls the transaction back: a claim is made
//! whole or not at all. (A break after COMMIT was sent leaves the caller unsure: the
//! claim may be in the pool, whole, without its caller knowing; it is never retried.)

pub mod fleet;
mod read;
mod schema;

use std::collections::{BTreeMap, HashMap};

use postgres::{Client, GenericClient, IsolationLevel, NoTls, Statement, Transaction};

use super::PoolError;
use super::model::{
    Allocation, Amounts, Host, HostSpec, HostState, Inventory, Owner, Resource, fit,
};
use super::owner;
use super::store::{Chooser, ClaimRequest, Committed, Delta, Released, Store};
use read::{Which, load_allocations, load_hosts, n, opt_n, u};

/// The PostgreSQL store: one connection, opened again when it breaks.
pub struct PostgresStore {
    client: Client,
    config: postgres::Config,
    /// The URL with any password hidden, for messages.
    shown: String,
    /// Prepared statements of this connection, by their SQL text.
    prepared: HashMap<&'static str, Statement>,
}

/// Seconds since the Unix epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The URL as it may be shown: the password, if any, replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match auth.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`, with
    /// `?host=/run/postgresql` for a Unix socket directory) and creates or checks the
    /// schema. Waits at most `connect_timeout` from the URL, 10 s by default.
    pub fn open(url: &str) -> Result<PostgresStore, PoolError> {
        let shown = redact(url);
        let mut config: postgres::Config = url.parse().map_err(|e| PoolError::Open {
            path: shown.clone().into(),
            source: Box::new(e),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("minivmm");
        }
        schema::configure(&mut config);
        let client = connect(&config, &shown)?;
        let mut store = PostgresStore {
            client,
            config,
            shown,
            prepared: HashMap::new(),
        };
        schema::migrate(&mut store.client, &store.shown)?;
        Ok(store)
    }

    /// Opens the connection again if the server closed it (a restart, an idle
    /// timeout); statements prepared on the old one are gone with it.
    fn ensure_connected(&mut self) -> Result<(), PoolError> {
        if self.client.is_closed() {
            log::warn!("pool {}: connection lost; reconnecting", self.shown);
            self.prepared.clear();
            self.client = connect(&self.config, &self.shown)?;
        }
        Ok(())
    }

    /// Connects again after `e` if `e` says the connection broke: a server
    /// restarted since the last operation is only noticed on the next statement.
    /// Called when a transaction's first statement failed, before which nothing can
    /// be half done, so the caller may then try again once.
    fn reconnect_after(&mut self, e: postgres::Error) -> Result<(), PoolError> {
        if !self.client.is_closed() && !e.is_closed() {
            return Err(e.into());
        }
        log::warn!("pool {}: connection lost ({e}); reconnecting", self.shown);
        self.prepared.clear();
        self.client = connect(&self.config, &self.shown)?;
        Ok(())
    }

    /// Runs `f` in a transaction (read-only on one snapshot, or read-write), then
    /// commits it, or rolls it back unless `commit`. A connection found broken at
    /// BEGIN is opened again once: before BEGIN nothing can be half done.
    fn transact<T>(
        &mut self,
        read_only: bool,
        commit: bool,
        f: impl FnOnce(
            &mut Transaction<'_>,
            &mut HashMap<&'static str, Statement>,
        ) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        self.ensure_connected()?;
        let mut retried = false;
        let mut tx = loop {
            let e = match if read_only {
                self.client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
            } else {
                self.client.transaction()
            } {
                Ok(tx) => break tx,
                Err(e) => e,
            };
            if retried {
                return Err(e.into());
            }
            retried = true;
            self.reconnect_after(e)?;
        };
        let out = f(&mut tx, &mut self.prepared)?;
        if commit {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(out)
    }

    /// Runs `f` in a read-only transaction on one snapshot.
    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        self.transact(true, true, |tx, _| f(tx))
    }

    /// Runs `f` in a write transaction holding the pool's write lock, committing only
    /// if it succeeds (and `commit` says so).
    fn write<T>(
        &mut self,
        commit: bool,
        f: impl FnOnce(&mut Writer<'_, '_>) -> Result<T, PoolError>,
    ) -> Result<T, PoolError> {
        self.transact(false, commit, |tx, prepared| {
            let before = u(&tx.query_one(schema::LOCK_GENERATION, &[])?, 0)?;
            f(&mut Writer {
                tx,
                prepared,
                before,
                generation: None,
            })
        })
    }
}

/// Opens a connection, with an error that names the pool and what to check.
fn connect(config: &postgres::Config, shown: &str) -> Result<Client, PoolError> {
    config.connect(NoTls).map_err(|e| {
        // "error connecting to server" alone names no cause: add the OS's or the
        // server's ("No such file or directory", "password authentication failed").
        let why = match std::error::Error::source(&e) {
            Some(cause) => {
                format!("{e}: {cause}; is PostgreSQL running there, and may this user connect?")
            }
            None => e.to_string(),
        };
        PoolError::Open {
            path: shown.into(),
            source: why.into(),
        }
    })
}

/// One write transaction: bumps the pool generation once, on the first change.
struct Writer<'t, 'c> {
    tx: &'t mut Transaction<'c>,
    prepared: &'t mut HashMap<&'static str, Statement>,
    /// The generation when the transaction took the lock.
    before: u64,
    generation: Option<u64>,
}

impl Writer<'_, '_> {
    /// A statement prepared once per connection.
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, PoolError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// The generation this transaction's changes carry.
    fn generation(&mut self) -> Result<u64, PoolError> {
        if let Some(g) = self.generation {
            return Ok(g);
        }
        let s = self
            .stmt("UPDATE meta SET value = value + 1 WHERE key = 'generation' RETURNING value")?;
        let g = u(&self.tx.query_one(&s, &[])?, 0)?;
        self.generation = Some(g);
        Ok(g)
    }

    /// The pool generation as this transaction sees it now.
    fn current(&self) -> u64 {
        self.generation.unwrap_or(self.before)
    }

    /// Id of a host by name.
    fn host_id(&mut self, name: &str) -> Result<i64, PoolError> {
        let s = self.stmt("SELECT id FROM hosts WHERE name = $1")?;
        self.tx
            .query_opt(&s, &[&name])?
            .map(|r| r.get(0))
            .ok_or_else(|| PoolError::UnknownHost(name.to_string()))
    }

    /// Writes a host's labels and inventories, and its usable capacity.
    fn write_spec(&mut self, id: i64, spec: &HostSpec) -> Result<(), PoolError> {
        self.tx
            .execute("DELETE FROM labels WHERE host_id = $1", &[&id])?;
        for (k, v) in &spec.labels {
            self.tx.execute(
                "INSERT INTO labels(host_id, key, value) VALUES ($1, $2, $3)",
                &[&id, k, v],
            )?;
        }
        for r in Resource::ALL {
            let inv = spec.inventory(r);
            self.tx.execute(
                "INSERT INTO inventories(host_id, resource, total, reserved, ratio, min_unit,
                   max_unit, step) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT(host_id, resource) DO UPDATE SET total = $3, reserved = $4,
                   ratio = $5, min_unit = $6, max_unit = $7, step = $8",
                &[
                    &id,
                    &r.key(),
                    &n(inv.total)?,
                    &n(inv.reserved)?,
                    &inv.ratio,
                    &opt_n(inv.min_unit)?,
                    &opt_n(inv.max_unit)?,
                    &opt_n(inv.step)?,
                ],
            )?;
        }
        // Usable is computed by Inventory::usable, and only copied into SQL.
        let usable = |r: Resource| n(spec.inventory(r).usable());
        let limited = spec
            .inventories
            .iter()
            .any(|i| i.min_unit.is_some() || i.max_unit.is_some() || i.step.is_some());
        self.tx.execute(
            "UPDATE hosts SET usable_vcpus = $1, usable_memory_mib = $2, usable_disk_gib = $3,
             limited = $4 WHERE id = $5",
            &[
                &usable(Resource::Vcpus)?,
                &usable(Resource::MemoryMib)?,
                &usable(Resource::DiskGib)?,
                &limited,
                &id,
            ],
        )?;
        Ok(())
    }

    /// Adds (`sign` 1) or removes (`sign` -1) one allocation's amounts on a host.
    fn add_usage(&mut self, host_id: i64, a: &Amounts, sign: i64, g: u64) -> Result<(), PoolError> {
        let s = self.stmt(
            "UPDATE hosts SET used_vcpus = used_vcpus + $1, used_memory_mib = used_memory_mib + $2,
             used_disk_gib = used_disk_gib + $3, vms = vms + $4, generation = $5 WHERE id = $6",
        )?;
        self.tx.execute(
            &s,
            &[
                &(sign * n(a.vcpus)?),
                &(sign * n(a.memory_mib)?),
                &(sign * n(a.disk_gib)?),
                &sign,
                &n(g)?,
                &host_id,
            ],
        )?;
        Ok(())
    }

    /// Releases one allocation: deletes it and gives its amounts back to the host.
    fn release(&mut self, id: i64) -> Result<Allocation, PoolError> {
        let alloc = load_allocations(&mut *self.tx, Some(id))?
            .pop()
            .ok_or(PoolError::UnknownAllocation(id))?;
        let g = self.generation()?;
        let s = self.stmt("DELETE FROM allocations WHERE id = $1 RETURNING host_id")?;
        let host_id: i64 = self.tx.query_one(&s, &[&id])?.get(0);
        self.add_usage(host_id, &alloc.amounts, -1, g)?;
        Ok(alloc)
    }

    /// Releases the allocations of every owner on this machine that is gone, and
    /// forgets those owners. Owners on other machines are judged by their own
    /// machines: this one cannot see their processes.
    fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError> {
        let local_host = owner::hostname()?;
        let local_boot = owner::boot_id()?;
        let s =
            self.stmt("SELECT id, host, pid, start_time, boot_id FROM owners WHERE host = $1")?;
        let mut owners = Vec::new();
        for r in self.tx.query(&s, &[&local_host])? {
            let pid = u32::try_from(r.get::<_, i64>(2))
                .map_err(|_| PoolError::Local("an owner's pid is out of range".into()))?;
            let o = Owner {
                host: r.get(1),
                pid,
                start_time: u(&r, 3)?,
                boot_id: r.get(4),
            };
            owners.push((r.get::<_, i64>(0), o));
        }
        let mut released = Vec::new();
        for (owner_id, o) in owners {
            if !owner::is_stale(&o, &local_host, &local_boot) {
                continue;
            }
            let ids: Vec<i64> = self
                .tx
                .query(
                    "SELECT id FROM allocations WHERE owner_id = $1",
                    &[&owner_id],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
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
            self.tx
                .execute("DELETE FROM owners WHERE id = $1", &[&owner_id])?;
        }
        Ok(released)
    }

    /// Checks a claim in detail, returning the host name or the precise reason it fails.
    fn check(&mut self, req: &ClaimRequest) -> Result<String, PoolError> {
        let s = self.stmt(
            "SELECT h.name, h.enabled, h.max_vms, h.vms, h.used_vcpus, h.used_memory_mib,
                    h.used_disk_gib, i.resource, i.total, i.reserved, i.ratio, i.min_unit,
                    i.max_unit, i.step
             FROM hosts h JOIN inventories i ON i.host_id = h.id WHERE h.id = $1",
        )?;
        let rows = self.tx.query(&s, &[&req.host_id])?;
        let first = rows
            .first()
            .ok_or_else(|| PoolError::UnknownHost(format!("#{}", req.host_id)))?;
        let name: String = first.get(0);
        let used = Amounts::new(u(first, 4)?, u(first, 5)?, u(first, 6)?);
        let mut inventories: [Inventory; 3] = std::array::from_fn(|_| Inventory::new(0, 1.0));
        for r in &rows {
            let key: String = r.get(7);
            inventories[read::resource(&key)?.index()] = read::inventory_at(r, 8)?;
        }
        let group = match &req.group {
            None => None,
            Some(g) => {
                let s =
                    self.stmt("SELECT 1 FROM allocations WHERE host_id = $1 AND grp = $2 LIMIT 1")?;
                let held = self.tx.query_opt(&s, &[&req.host_id, g])?.is_some();
                Some((g.as_str(), held))
            }
        };
        let state = HostState {
            enabled: first.get(1),
            max_vms: read::opt_u(first, 2)?,
            vms: u(first, 3)?,
            inventories: &inventories,
            used,
        };
        fit(state, group, &req.amounts).map_err(|m| PoolError::misfit(m, name.clone()))?;
        Ok(name)
    }

    /// Records one allocation if it still fits; writes nothing when it does not.
    fn claim(&mut self, req: &ClaimRequest) -> Result<Allocation, PoolError> {
        let a = &req.amounts;
        // Checked before any write: a failed statement would abort the transaction.
        if req.vm_spec.is_some() {
            let s = self.stmt("SELECT 1 FROM vms WHERE name = $1")?;
            if self.tx.query_opt(&s, &[&req.vm_name])?.is_some() {
                return Err(PoolError::VmExists(req.vm_name.clone()));
            }
        }
        let g = self.generation()?;
        // The common case in one statement, as in the SQLite store.
        let fast = if req.group.is_some() {
            None
        } else {
            let s = self.stmt(
                "UPDATE hosts SET used_vcpus = used_vcpus + $1,
                   used_memory_mib = used_memory_mib + $2, used_disk_gib = used_disk_gib + $3,
                   vms = vms + 1, generation = $4
                 WHERE id = $5 AND enabled AND NOT limited
                   AND (max_vms IS NULL OR vms < max_vms)
                   AND used_vcpus + $1 <= usable_vcpus AND used_memory_mib + $2 <= usable_memory_mib
                   AND used_disk_gib + $3 <= usable_disk_gib
                 RETURNING name",
            )?;
            self.tx
                .query_opt(
                    &s,
                    &[
                        &n(a.vcpus)?,
                        &n(a.memory_mib)?,
                        &n(a.disk_gib)?,
                        &n(g)?,
                        &req.host_id,
                    ],
                )?
                .map(|r| r.get::<_, String>(0))
        };
        let name = match fast {
            Some(name) => name,
            None => {
                let name = self.check(req)?;
                self.add_usage(req.host_id, a, 1, g)?;
                name
            }
        };
        let owner_id: Option<i64> = match &req.owner {
            None => None,
            Some(o) => {
                let s = self.stmt(
                    "INSERT INTO owners(host, pid, start_time, boot_id) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (host, pid, start_time, boot_id) DO UPDATE SET pid = excluded.pid
                     RETURNING id",
                )?;
                let row = self.tx.query_one(
                    &s,
                    &[&o.host, &i64::from(o.pid), &n(o.start_time)?, &o.boot_id],
                )?;
                Some(row.get(0))
            }
        };
        let created = now();
        let s = self.stmt(
            "INSERT INTO allocations(host_id, vm_name, grp, vcpus, memory_mib, disk_gib, owner_id,
               created) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )?;
        let id: i64 = self
            .tx
            .query_one(
                &s,
                &[
                    &req.host_id,
                    &req.vm_name,
                    &req.group,
                    &n(a.vcpus)?,
                    &n(a.memory_mib)?,
                    &n(a.disk_gib)?,
                    &owner_id,
                    &created,
                ],
            )?
            .get(0);
        if let Some(spec) = &req.vm_spec {
            fleet::record(self.tx, req, id, spec, created)?;
        }
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

impl Writer<'_, '_> {
    /// Records each request in order, as [`Writer::claim`] one by one would, but with
    /// runs of plain requests (no group, no owner: what the scheduler sends) in two
    /// statements per run instead of two per request: one UPDATE adds each host's
    /// share of the run to its usage only where all of it fits, one INSERT records the
    /// run's allocations. When some host cannot take its whole share (the caller chose
    /// without knowing the latest state), the additions are taken back and that run
    /// goes one by one, so every request gets the answer a sequential claim gives.
    fn claim_all(
        &mut self,
        reqs: &[ClaimRequest],
    ) -> Result<Vec<Result<Allocation, PoolError>>, PoolError> {
        let mut out = Vec::with_capacity(reqs.len());
        let mut rest = reqs;
        while let Some(first) = rest.first() {
            let plain =
                |r: &ClaimRequest| r.group.is_none() && r.owner.is_none() && r.vm_spec.is_none();
            if !plain(first) {
                out.push(self.claim(first));
                rest = &rest[1..];
                continue;
            }
            let run = rest.iter().take_while(|r| plain(r)).count();
            let (now, later) = rest.split_at(run);
            rest = later;
            if run < 4 {
                out.extend(now.iter().map(|r| self.claim(r)));
                continue;
            }
            match self.claim_run(now)? {
                Some(done) => out.extend(done.into_iter().map(Ok)),
                None => out.extend(now.iter().map(|r| self.claim(r))),
            }
        }
        Ok(out)
    }

    /// The two-statement form of a run of plain requests; None (with nothing changed)
    /// when some host cannot take its whole share.
    fn claim_run(&mut self, reqs: &[ClaimRequest]) -> Result<Option<Vec<Allocation>>, PoolError> {
        let g = n(self.generation()?)?;
        let mut host_ids = Vec::with_capacity(reqs.len());
        let mut amounts: [Vec<i64>; 3] = Default::default();
        for r in reqs {
            host_ids.push(r.host_id);
            for (col, res) in amounts.iter_mut().zip(Resource::ALL) {
                col.push(n(r.amounts.get(res))?);
            }
        }
        let distinct = host_ids
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        // Each host's share in all; a host takes it only if it takes all of it, which
        // is exactly when each of its requests would fit in order.
        let s = self.stmt(
            "WITH share AS (
               SELECT host_id, sum(v)::BIGINT AS v, sum(m)::BIGINT AS m, sum(d)::BIGINT AS d,
                      count(*) AS c
               FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])
                 AS r(host_id, v, m, d) GROUP BY host_id)
             UPDATE hosts h SET used_vcpus = used_vcpus + share.v,
               used_memory_mib = used_memory_mib + share.m, used_disk_gib = used_disk_gib + share.d,
               vms = vms + share.c, generation = $5
             FROM share
             WHERE h.id = share.host_id AND enabled AND NOT limited
               AND (max_vms IS NULL OR vms + share.c <= max_vms)
               AND used_vcpus + share.v <= usable_vcpus
               AND used_memory_mib + share.m <= usable_memory_mib
               AND used_disk_gib + share.d <= usable_disk_gib
             RETURNING h.id, h.name",
        )?;
        let [v, m, d] = &amounts;
        let updated = self.tx.query(&s, &[&host_ids, v, m, d, &g])?;
        let names: HashMap<i64, String> = updated.iter().map(|r| (r.get(0), r.get(1))).collect();
        if names.len() != distinct {
            // Give back what the hosts that could take their share took.
            let s = self.stmt(
                "WITH share AS (
                   SELECT host_id, sum(v)::BIGINT AS v, sum(m)::BIGINT AS m, sum(d)::BIGINT AS d,
                          count(*) AS c
                   FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[])
                     AS r(host_id, v, m, d) GROUP BY host_id)
                 UPDATE hosts h SET used_vcpus = used_vcpus - share.v,
                   used_memory_mib = used_memory_mib - share.m,
                   used_disk_gib = used_disk_gib - share.d, vms = vms - share.c
                 FROM share WHERE h.id = share.host_id AND h.id = ANY($5)",
            )?;
            let took: Vec<i64> = names.keys().copied().collect();
            self.tx.execute(&s, &[&host_ids, v, m, d, &took])?;
            return Ok(None);
        }
        // Ids from the sequence first, so that each request knows its own: a sorted
        // batch of nextval values, given out in request order.
        let s = self.stmt(
            "SELECT nextval(pg_get_serial_sequence('allocations', 'id')) FROM generate_series(1, $1::BIGINT)",
        )?;
        let mut ids: Vec<i64> = self
            .tx
            .query(&s, &[&(reqs.len() as i64)])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ids.sort_unstable();
        let vm_names: Vec<&str> = reqs.iter().map(|r| r.vm_name.as_str()).collect();
        let created = now();
        let s = self.stmt(
            "INSERT INTO allocations(id, host_id, vm_name, vcpus, memory_mib, disk_gib, created)
             SELECT * , $7::BIGINT FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[],
               $4::BIGINT[], $5::BIGINT[], $6::BIGINT[])",
        )?;
        self.tx
            .execute(&s, &[&ids, &host_ids, &vm_names, v, m, d, &created])?;
        Ok(Some(
            reqs.iter()
                .zip(ids)
                .map(|(r, id)| Allocation {
                    id,
                    host: names[&r.host_id].clone(),
                    vm_name: r.vm_name.clone(),
                    group: None,
                    amounts: r.amounts,
                    owner: None,
                    created,
                })
                .collect(),
        ))
    }
}

/// What changed since generation `seen` (see [`Store::claim`]), read through `c`, the
/// pool being at generation `current`.
fn delta_since(
    c: &mut impl GenericClient,
    seen: Option<u64>,
    current: u64,
) -> Result<Delta, PoolError> {
    let removed_at = u(
        &c.query_one("SELECT value FROM meta WHERE key = 'removed_at'", &[])?,
        0,
    )?;
    Ok(match seen {
        None => Delta::Unchanged,
        Some(s) if s == current => Delta::Unchanged,
        Some(s) if s >= removed_at && s < current => Delta::Hosts(load_hosts(c, Which::Since(s))?),
        _ => Delta::Everything(load_hosts(c, Which::All)?),
    })
}

impl Store for PostgresStore {
    fn add_hosts(&mut self, specs: &[HostSpec]) -> Result<(), PoolError> {
        for spec in specs {
            spec.validate()?;
        }
        self.write(true, |w| {
            let g = w.generation()?;
            for spec in specs {
                let exists =
                    w.tx.query_opt("SELECT 1 FROM hosts WHERE name = $1", &[&spec.name])?
                        .is_some();
                if exists {
                    return Err(PoolError::DuplicateHost(spec.name.clone()));
                }
                let id: i64 = w
                    .tx
                    .query_one(
                        "INSERT INTO hosts(name, enabled, cost, hours, max_vms, generation, created)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                        &[
                            &spec.name,
                            &spec.enabled,
                            &spec.cost,
                            &spec.hours,
                            &opt_n(spec.max_vms)?,
                            &n(g)?,
                            &now(),
                        ],
                    )?
                    .get(0);
                w.write_spec(id, spec)?;
                log::info!("pool: added host {} (id {id})", spec.name);
            }
            Ok(())
        })
    }

    fn host(&mut self, name: &str) -> Result<Host, PoolError> {
        self.read(|tx| {
            load_hosts(tx, Which::Name(name))?
                .pop()
                .ok_or_else(|| PoolError::UnknownHost(name.to_string()))
        })
    }

    fn update_host(
        &mut self,
        name: &str,
        spec: &HostSpec,
        generation: u64,
    ) -> Result<Host, PoolError> {
        spec.validate()?;
        self.write(true, |w| {
            let id = w.host_id(name)?;
            let current = load_hosts(&mut *w.tx, Which::Id(id))?
                .pop()
                .ok_or_else(|| PoolError::UnknownHost(name.to_string()))?;
            if current.generation != generation {
                return Err(PoolError::Conflict(name.to_string()));
            }
            if spec.name != name
                && w.tx
                    .query_opt("SELECT 1 FROM hosts WHERE name = $1", &[&spec.name])?
                    .is_some()
            {
                return Err(PoolError::DuplicateHost(spec.name.clone()));
            }
            spec.holds(name, &current.used)?;
            let g = w.generation()?;
            w.tx.execute(
                "UPDATE hosts SET name = $1, enabled = $2, cost = $3, hours = $4, max_vms = $5,
                 generation = $6 WHERE id = $7",
                &[
                    &spec.name,
                    &spec.enabled,
                    &spec.cost,
                    &spec.hours,
                    &opt_n(spec.max_vms)?,
                    &n(g)?,
                    &id,
                ],
            )?;
            w.write_spec(id, spec)
        })?;
        self.host(&spec.name)
    }

    fn remove_host(&mut self, name: &str, force: bool) -> Result<usize, PoolError> {
        self.write(true, |w| {
            let id = w.host_id(name)?;
            let ids: Vec<i64> =
                w.tx.query("SELECT id FROM allocations WHERE host_id = $1", &[&id])?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
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
            w.tx.execute("DELETE FROM hosts WHERE id = $1", &[&id])?;
            // Schedulers that cached this host must reload everything.
            w.tx.execute(
                "UPDATE meta SET value = $1 WHERE key = 'removed_at'",
                &[&n(g)?],
            )?;
            Ok(ids.len())
        })
    }

    fn hosts(&mut self) -> Result<Vec<Host>, PoolError> {
        self.read(|tx| load_hosts(tx, Which::All))
    }

    fn allocations(&mut self) -> Result<Vec<Allocation>, PoolError> {
        self.read(|tx| load_allocations(tx, None))
    }

    fn release(&mut self, id: i64) -> Result<Allocation, PoolError> {
        self.write(true, |w| w.release(id))
    }

    fn release_claimed(&mut self, claimed: &Allocation) -> Result<Released, PoolError> {
        let pool = self.shown.clone();
        self.write(true, |w| {
            let now = match load_allocations(&mut *w.tx, Some(claimed.id))?.pop() {
                Some(a) if a.is_same_claim(claimed) => {
                    return Ok(Released {
                        allocation: w.release(claimed.id)?,
                        damage: None,
                    });
                }
                Some(other) => format!("is gone: id {} now names {}", other.id, other.describe()),
                None => "is no longer in the pool".to_string(),
            };
            Err(PoolError::ClaimLost {
                pool: pool.into(),
                claimed: Box::new(claimed.clone()),
                now,
                cause: String::new(),
            })
        })
    }

    fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError> {
        self.write(true, |w| w.release_stale())
    }

    fn recount(&mut self) -> Result<BTreeMap<String, (Amounts, u64)>, PoolError> {
        self.read(|tx| {
        let rows = tx.query(
            "SELECT h.name, COALESCE(SUM(a.vcpus), 0)::BIGINT, COALESCE(SUM(a.memory_mib), 0)::BIGINT,
                    COALESCE(SUM(a.disk_gib), 0)::BIGINT, COUNT(a.id)
             FROM hosts h LEFT JOIN allocations a ON a.host_id = h.id GROUP BY h.id",
            &[],
        )?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(
                r.get::<_, String>(0),
                (Amounts::new(u(&r, 1)?, u(&r, 2)?, u(&r, 3)?), u(&r, 4)?),
            );
        }
        Ok(out)
        })
    }

    fn changes(&mut self, seen: u64) -> Result<(u64, Delta), PoolError> {
        self.read(|tx| {
            let current = u(
                &tx.query_one("SELECT value FROM meta WHERE key = 'generation'", &[])?,
                0,
            )?;
            let delta = delta_since(tx, Some(seen), current)?;
            Ok((current, delta))
        })
    }

    fn claim(
        &mut self,
        seen: Option<u64>,
        choose: &mut Chooser<'_>,
        dry_run: bool,
    ) -> Result<Committed, PoolError> {
        self.write(!dry_run, |w| {
            let before = w.before;
            w.release_stale()?;
            let current = w.current();
            let delta = delta_since(&mut *w.tx, seen, current)?;
            let requests = choose(delta)?;
            let results = w.claim_all(&requests)?;
            let generation = if dry_run { before } else { w.current() };
            Ok(Committed {
                generation,
                results,
            })
        })
    }
}

/// PostgreSQL's errors become the ledger's backend-neutral [`PoolError::Database`].
impl From<postgres::Error> for PoolError {
    fn from(e: postgres::Error) -> PoolError {
        PoolError::Database(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://u:secret@db:5432/pool"),
            "postgres://u:***@db:5432/pool"
        );
        assert_eq!(redact("postgres://u@db/pool"), "postgres://u@db/pool");
        assert_eq!(
            redact("postgresql:///pool?host=/run/postgresql"),
            "postgresql:///pool?host=/run/postgresql"
        );
    }
}
