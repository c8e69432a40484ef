//! The storage boundary: everything the ledger and the scheduler need from a database.
//!
//! SQLite ([`super::sqlite::SqliteStore`]) is the embedded default. A shared database
//! (PostgreSQL is the plan) implements the same trait: the one subtle method is
//! [`Store::claim`], which must run the caller's choice and the writes in one
//! serialisable transaction.

use std::collections::BTreeMap;

use super::PoolError;
use super::model::{Allocation, Amounts, Host, HostSpec, Owner};

/// What changed in the pool since a caller's last look, by pool generation.
#[derive(Debug)]
pub enum Delta {
    /// Nothing changed.
    Unchanged,
    /// These hosts were added or changed (their state is current); none was removed.
    Hosts(Vec<Host>),
    /// A host was removed since the caller looked: this is the whole pool.
    Everything(Vec<Host>),
}

/// One allocation to record, on a host chosen by the caller.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// Database id of the chosen host.
    pub host_id: i64,
    /// VM name.
    pub vm_name: String,
    /// Anti-affinity group: refused if the host already holds one of the group.
    pub group: Option<String>,
    /// What to hold.
    pub amounts: Amounts,
    /// The holding process; None to hold until released explicitly.
    pub owner: Option<Owner>,
    /// The VM's spec (JSON), recorded with the allocation in the same transaction
    /// for the chosen host's agent to start (see [`super::postgres::fleet`]). Only
    /// a shared (PostgreSQL) pool keeps VM records; SQLite refuses the request.
    pub vm_spec: Option<String>,
}

/// The result of one claim transaction.
#[derive(Debug)]
pub struct Committed {
    /// Pool generation after the transaction; the caller is now up to date with it.
    pub generation: u64,
    /// One result per request, in order. A refused request changed nothing.
    pub results: Vec<Result<Allocation, PoolError>>,
}

/// What [`Store::release_claimed`] did.
#[derive(Debug)]
pub struct Released {
    /// The allocation released.
    pub allocation: Allocation,
    /// Damage to the pool found on the way that did not cost this claim (the pool's
    /// -wal file deleted while this process still had its contents), for the caller to
    /// report loudly.
    pub damage: Option<String>,
}

/// Chooses allocations inside a claim transaction, given what changed since it last looked.
pub type Chooser<'a> = dyn FnMut(Delta) -> Result<Vec<ClaimRequest>, PoolError> + 'a;

/// A ledger's storage.
pub trait Store: Send {
    /// Records new hosts, all or none; refuses a duplicate name.
    fn add_hosts(&mut self, specs: &[HostSpec]) -> Result<(), PoolError>;
    /// One host by name.
    fn host(&mut self, name: &str) -> Result<Host, PoolError>;
    /// The database id of a host, by name: all a claim needs, in one lookup.
    fn host_id(&mut self, name: &str) -> Result<i64, PoolError> {
        self.host(name).map(|h| h.id)
    }
    /// Replaces a host's spec if its generation is still `generation` (compare-and-swap).
    fn update_host(
        &mut self,
        name: &str,
        spec: &HostSpec,
        generation: u64,
    ) -> Result<Host, PoolError>;
    /// Removes a host; with allocations, refused unless `force` (which drops them).
    /// Returns how many allocations were dropped.
    fn remove_host(&mut self, name: &str, force: bool) -> Result<usize, PoolError>;
    /// Every host, by name.
    fn hosts(&mut self) -> Result<Vec<Host>, PoolError>;
    /// Every live allocation, by id.
    fn allocations(&mut self) -> Result<Vec<Allocation>, PoolError>;
    /// Releases one allocation.
    fn release(&mut self, id: i64) -> Result<Allocation, PoolError>;
    /// Releases the allocation `claimed`, which this process claimed, only if the pool
    /// still holds it exactly as claimed ([`Allocation::is_same_claim`]); otherwise
    /// changes nothing and returns [`PoolError::ClaimLost`], so that a pool that lost
    /// writes never has another VM's allocation (given the same id) erased.
    fn release_claimed(&mut self, claimed: &Allocation) -> Result<Released, PoolError>;
    /// Releases every allocation whose owner is gone; returns them.
    fn release_stale(&mut self) -> Result<Vec<Allocation>, PoolError>;
    /// Reads, writing nothing, the pool's generation and what changed since
    /// generation `seen` (0: never looked), for a caller that keeps its own view of
    /// the hosts (the scheduler's index).
    fn changes(&mut self, seen: u64) -> Result<(u64, Delta), PoolError>;
    /// In one write transaction: releases stale allocations, tells `choose` what changed
    /// since generation `seen` (Some(0): never looked; None: not interested, always
    /// [`Delta::Unchanged`]), then records each request it returns
    /// if it still fits, all or nothing per request. With `dry_run`, rolls everything back.
    fn claim(
        &mut self,
        seen: Option<u64>,
        choose: &mut Chooser<'_>,
        dry_run: bool,
    ) -> Result<Committed, PoolError>;
    /// Per host name, the sums of its live allocations and their count, computed from
    /// the allocations themselves: a consistency check of the usage the store keeps.
    fn recount(&mut self) -> Result<BTreeMap<String, (Amounts, u64)>, PoolError>;
    /// Deletes the store if this process created it and nothing was ever written to it,
    /// so that a command that failed leaves no empty pool behind. Returns whether it
    /// did. A store this process did not create is never touched; the default (a
    /// shared database) does nothing.
    fn discard_if_unused(&mut self) -> Result<bool, PoolError> {
        Ok(false)
    }
    /// For a connection that only records claims owned by its own process (and
    /// their release): lets its commits go without waiting for the disk. See
    /// [`crate::pool::Ledger::relax_durability`] for why that loses nothing. The
    /// default (a shared database, whose durability is the server's) does nothing.
    fn relax_durability(&mut self) -> Result<(), PoolError> {
        Ok(())
    }
}
