//! Reading rows into the model, and u64 as SQLite stores it.

use std::collections::{BTreeSet, HashMap};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use crate::pool::PoolError;
use crate::pool::model::{Allocation, Amounts, Host, HostSpec, Inventory, Owner, Resource};

/// A u64 as SQLite stores it: an INTEGER, which is an i64. Every amount the ledger
/// writes was validated to fit in i64; a negative value read back means a damaged file.
#[derive(Clone, Copy)]
pub(super) struct N(pub(super) u64);

impl ToSql for N {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        i64::try_from(self.0)
            .map(ToSqlOutput::from)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    }
}

impl FromSql for N {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let v = i64::column_result(value)?;
        u64::try_from(v)
            .map(N)
            .map_err(|_| FromSqlError::OutOfRange(v))
    }
}

/// Reads column `i` as a u64.
pub(super) fn u(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    row.get::<_, N>(i).map(|n| n.0)
}

/// Reads column `i` as an optional u64.
pub(super) fn opt(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<u64>> {
    row.get::<_, Option<N>>(i).map(|n| n.map(|n| n.0))
}

/// Wraps an optional u64 for binding.
pub(super) fn bind(v: Option<u64>) -> Option<N> {
    v.map(N)
}

/// Parses a resource key read from the database.
pub(super) fn resource(key: &str) -> Result<Resource, PoolError> {
    Resource::from_key(key)
        .ok_or_else(|| PoolError::Local(format!("unknown resource {key:?} in the pool")))
}

/// Reads an inventory from columns total, reserved, ratio, min, max, step starting at `k`.
pub(super) fn inventory_at(r: &rusqlite::Row<'_>, k: usize) -> rusqlite::Result<Inventory> {
    Ok(Inventory {
        total: u(r, k)?,
        reserved: u(r, k + 1)?,
        ratio: r.get(k + 2)?,
        min_unit: opt(r, k + 3)?,
        max_unit: opt(r, k + 4)?,
        step: opt(r, k + 5)?,
    })
}

/// (host id, resource, inventory) rows matching `filter` (with one parameter).
pub(super) fn load_inventories(
    conn: &Connection,
    filter: &str,
    param: i64,
) -> Result<Vec<(i64, Resource, Inventory)>, PoolError> {
    let sql = format!(
        "SELECT host_id, resource, total, reserved, ratio, min_unit, max_unit, step
         FROM inventories {filter}"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([param], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            inventory_at(r, 2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, key, inv) = row?;
        out.push((id, resource(&key)?, inv));
    }
    Ok(out)
}

/// Which hosts to load.
#[derive(Clone, Copy)]
pub(super) enum Which {
    /// Every host.
    All,
    /// Hosts changed after this pool generation.
    Since(u64),
    /// One host by id.
    Id(i64),
}

/// Hosts selected by `which`, sorted by name, with usage, labels and groups.
pub(super) fn load_hosts(conn: &Connection, which: Which) -> Result<Vec<Host>, PoolError> {
    // Every query takes one parameter; generation > -1 selects every host.
    let (host_filter, param) = match which {
        Which::All => ("generation > ?1", -1),
        Which::Since(g) => ("generation > ?1", g as i64),
        Which::Id(id) => ("id = ?1", id),
    };
    let in_changed = format!("host_id IN (SELECT id FROM hosts WHERE {host_filter})");
    let mut hosts: Vec<Host> = conn
        .prepare_cached(&format!(
            "SELECT id, name, enabled, cost, hours, max_vms, generation, vms,
                    used_vcpus, used_memory_mib, used_disk_gib
             FROM hosts WHERE {host_filter} ORDER BY name"
        ))?
        .query_map([param], |r| {
            let mut spec = HostSpec::new(&r.get::<_, String>(1)?, 0, 0, 0);
            spec.enabled = r.get(2)?;
            spec.cost = r.get(3)?;
            spec.hours = r.get(4)?;
            spec.max_vms = opt(r, 5)?;
            Ok(Host {
                id: r.get(0)?,
                spec,
                generation: u(r, 6)?,
                used: Amounts::new(u(r, 8)?, u(r, 9)?, u(r, 10)?),
                vms: u(r, 7)?,
                groups: BTreeSet::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    let pos: HashMap<i64, usize> = hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
    for (id, r, inv) in load_inventories(conn, &format!("WHERE {in_changed}"), param)? {
        if let Some(h) = pos.get(&id).map(|&i| &mut hosts[i]) {
            h.spec.inventories[r.index()] = inv;
        }
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT host_id, key, value, 0 FROM labels WHERE {in_changed}
         UNION ALL SELECT DISTINCT host_id, grp, '', 1 FROM allocations
         WHERE grp IS NOT NULL AND {in_changed}"
    ))?;
    let rows = stmt.query_map([param], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (id, key, value, is_group) = row?;
        if let Some(h) = pos.get(&id).map(|&i| &mut hosts[i]) {
            if is_group == 1 {
                h.groups.insert(key);
            } else {
                h.spec.labels.insert(key, value);
            }
        }
    }
    Ok(hosts)
}

/// Allocations (one by id, or all), by id.
pub(super) fn load_allocations(
    conn: &Connection,
    id: Option<i64>,
) -> Result<Vec<Allocation>, PoolError> {
    // Two statements, not "?1 IS NULL OR a.id = ?1": that OR would hide the primary key
    // from the planner and make every release scan the table.
    let filter = if id.is_some() {
        "a.id = ?1"
    } else {
        "?1 IS NULL"
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT a.id, h.name, a.vm_name, a.grp, a.vcpus, a.memory_mib, a.disk_gib, a.created,
                o.host, o.pid, o.start_time, o.boot_id
         FROM allocations a JOIN hosts h ON h.id = a.host_id LEFT JOIN owners o ON o.id = a.owner_id
         WHERE {filter} ORDER BY a.id"
    ))?;
    let rows = stmt.query_map([id], |r| {
        let owner = match r.get::<_, Option<String>>(8)? {
            None => None,
            Some(host) => Some(Owner {
                host,
                pid: r.get(9)?,
                start_time: u(r, 10)?,
                boot_id: r.get(11)?,
            }),
        };
        Ok(Allocation {
            id: r.get(0)?,
            host: r.get(1)?,
            vm_name: r.get(2)?,
            group: r.get(3)?,
            amounts: Amounts::new(u(r, 4)?, u(r, 5)?, u(r, 6)?),
            owner,
            created: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One host by id.
pub(super) fn load_host_by_id(conn: &Connection, id: i64) -> Result<Host, PoolError> {
    load_hosts(conn, Which::Id(id))?
        .pop()
        .ok_or_else(|| PoolError::UnknownHost(format!("#{id}")))
}
