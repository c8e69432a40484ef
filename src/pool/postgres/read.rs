//! Reading rows into the model, and u64 as PostgreSQL stores it (BIGINT, an i64).

use std::collections::{BTreeSet, HashMap};

use postgres::{GenericClient, Row};

use crate::pool::PoolError;
use crate::pool::model::{Allocation, Amounts, Host, HostSpec, Inventory, Owner, Resource};

/// A u64 for a BIGINT column. Every amount was validated to fit in i64 before it got here.
pub(super) fn n(v: u64) -> Result<i64, PoolError> {
    i64::try_from(v).map_err(|_| PoolError::Invalid(format!("{v} is too large for the pool")))
}

/// An optional u64 for a BIGINT column.
pub(super) fn opt_n(v: Option<u64>) -> Result<Option<i64>, PoolError> {
    v.map(n).transpose()
}

/// A BIGINT as a u64; a negative value means the database was edited by hand.
fn nonneg(v: i64) -> Result<u64, PoolError> {
    u64::try_from(v).map_err(|_| PoolError::Local(format!("negative amount {v} in the pool")))
}

/// Column `i` as a u64.
pub(super) fn u(row: &Row, i: usize) -> Result<u64, PoolError> {
    nonneg(row.try_get::<_, i64>(i)?)
}

/// Column `i` as an optional u64.
pub(super) fn opt_u(row: &Row, i: usize) -> Result<Option<u64>, PoolError> {
    row.try_get::<_, Option<i64>>(i)?.map(nonneg).transpose()
}

/// Parses a resource key read from the database.
pub(super) fn resource(key: &str) -> Result<Resource, PoolError> {
    Resource::from_key(key)
        .ok_or_else(|| PoolError::Local(format!("unknown resource {key:?} in the pool")))
}

/// An inventory from columns total, reserved, ratio, min, max, step starting at `k`.
pub(super) fn inventory_at(r: &Row, k: usize) -> Result<Inventory, PoolError> {
    Ok(Inventory {
        total: u(r, k)?,
        reserved: u(r, k + 1)?,
        ratio: r.try_get(k + 2)?,
        min_unit: opt_u(r, k + 3)?,
        max_unit: opt_u(r, k + 4)?,
        step: opt_u(r, k + 5)?,
    })
}

/// Which hosts to load.
#[derive(Clone, Copy)]
pub(super) enum Which<'a> {
    /// Every host.
    All,
    /// Hosts changed after this pool generation.
    Since(u64),
    /// One host by id.
    Id(i64),
    /// One host by name.
    Name(&'a str),
}

/// Hosts selected by `which`, sorted by name, with usage, inventories, labels and groups.
pub(super) fn load_hosts(
    c: &mut impl GenericClient,
    which: Which<'_>,
) -> Result<Vec<Host>, PoolError> {
    // Every query takes one parameter, as text so one shape serves all four filters.
    let (filter, param) = match which {
        Which::All => ("generation > $1::TEXT::BIGINT", "-1".to_string()),
        Which::Since(g) => ("generation > $1::TEXT::BIGINT", g.to_string()),
        Which::Id(id) => ("id = $1::TEXT::BIGINT", id.to_string()),
        Which::Name(name) => ("name = $1", name.to_string()),
    };
    let in_changed = format!("host_id IN (SELECT id FROM hosts WHERE {filter})");
    let rows = c.query(
        &format!(
            "SELECT id, name, enabled, cost, hours, max_vms, generation, vms,
                    used_vcpus, used_memory_mib, used_disk_gib
             FROM hosts WHERE {filter} ORDER BY name COLLATE \"C\""
        ),
        &[&param],
    )?;
    let mut hosts = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut spec = HostSpec::new(r.try_get(1)?, 0, 0, 0);
        spec.enabled = r.try_get(2)?;
        spec.cost = r.try_get(3)?;
        spec.hours = r.try_get(4)?;
        spec.max_vms = opt_u(r, 5)?;
        hosts.push(Host {
            id: r.try_get(0)?,
            spec,
            generation: u(r, 6)?,
            used: Amounts::new(u(r, 8)?, u(r, 9)?, u(r, 10)?),
            vms: u(r, 7)?,
            groups: BTreeSet::new(),
        });
    }
    let pos: HashMap<i64, usize> = hosts.iter().enumerate().map(|(i, h)| (h.id, i)).collect();
    let rows = c.query(
        &format!(
            "SELECT host_id, resource, total, reserved, ratio, min_unit, max_unit, step
             FROM inventories WHERE {in_changed}"
        ),
        &[&param],
    )?;
    for r in &rows {
        let key: String = r.try_get(1)?;
        if let Some(&i) = pos.get(&r.try_get::<_, i64>(0)?) {
            hosts[i].spec.inventories[resource(&key)?.index()] = inventory_at(r, 2)?;
        }
    }
    let rows = c.query(
        &format!(
            "SELECT host_id, key, value, false FROM labels WHERE {in_changed}
             UNION ALL SELECT DISTINCT host_id, grp, '', true FROM allocations
             WHERE grp IS NOT NULL AND {in_changed}"
        ),
        &[&param],
    )?;
    for r in &rows {
        if let Some(&i) = pos.get(&r.try_get::<_, i64>(0)?) {
            let key: String = r.try_get(1)?;
            if r.try_get::<_, bool>(3)? {
                hosts[i].groups.insert(key);
            } else {
                hosts[i].spec.labels.insert(key, r.try_get(2)?);
            }
        }
    }
    Ok(hosts)
}

/// Allocations (one by id, or all), by id.
pub(super) fn load_allocations(
    c: &mut impl GenericClient,
    id: Option<i64>,
) -> Result<Vec<Allocation>, PoolError> {
    const COLUMNS: &str = "SELECT a.id, h.name, a.vm_name, a.grp, a.vcpus, a.memory_mib,
        a.disk_gib, a.created, o.host, o.pid, o.start_time, o.boot_id
        FROM allocations a JOIN hosts h ON h.id = a.host_id LEFT JOIN owners o ON o.id = a.owner_id";
    let rows = match id {
        Some(id) => c.query(&format!("{COLUMNS} WHERE a.id = $1"), &[&id])?,
        None => c.query(&format!("{COLUMNS} ORDER BY a.id"), &[])?,
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let owner = match r.try_get::<_, Option<String>>(8)? {
            None => None,
            Some(host) => Some(Owner {
                host,
                pid: u32::try_from(r.try_get::<_, i64>(9)?)
                    .map_err(|_| PoolError::Local("an owner's pid is out of range".into()))?,
                start_time: u(r, 10)?,
                boot_id: r.try_get(11)?,
            }),
        };
        out.push(Allocation {
            id: r.try_get(0)?,
            host: r.try_get(1)?,
            vm_name: r.try_get(2)?,
            group: r.try_get(3)?,
            amounts: Amounts::new(u(r, 4)?, u(r, 5)?, u(r, 6)?),
            owner,
            created: r.try_get(7)?,
        });
    }
    Ok(out)
}
