//! The scheduler: chooses a host for a VM and claims it there, in one transaction.
//!
//! A [`Scheduler`] wraps a [`Ledger`] and an in-memory [`index::Index`] of the pool.
//! Each placement runs inside the store's claim transaction (BEGIN IMMEDIATE on SQLite):
//! the store first hands over what other processes changed since the index last looked,
//! the index decides, and the store checks and records the allocation before commit. So
//! two schedulers, in threads or processes, can never both take the last slot.
//!
//! Filters, in order: host enabled, required labels, anti-affinity group, max VMs per
//! host, per-request min/max/step, and free capacity of every resource (with reserved
//! capacity and allocation ratios). Weighers, combined by [`Weights`]:
//! - **spread**: mean over resources of the free fraction left after placement;
//! - **pack**: 1 − spread, so the fullest host that still fits wins;
//! - **cost**: the seeds' scheduling rule S = argmax over hosts of D·R/C: demand ×
//!   free resource ÷ host cost. D·R is the dot product of the request and the host's
//!   free capacity, each resource taken as a fraction of the pool's largest host so that
//!   vCPUs and MiB weigh alike; the score shown is D·R/C scaled by constants of the
//!   request and pool (Σ D, and the cheapest cost) into [0, 1], which keeps the argmax.
//!
//! Ties go to the host whose name sorts first.
//!
//! ```no_run
//! use minivmm::pool::{Amounts, Ledger};
//! use minivmm::scheduler::{Request, Scheduler, Weights};
//!
//! let mut s = Scheduler::new(Ledger::open(None)?);
//! let req = Request::new("web-1", Amounts::new(2, 4096, 20)).with_weights(Weights::COST);
//! let placed = s.place(&req)?;
//! println!("{} on {} (allocation {})", req.name, placed.host, placed.allocation_id);
//! # Ok::<(), minivmm::scheduler::ScheduleError>(())
//! ```

pub mod cli;
pub mod explain;
pub mod index;

use std::time::{Duration, Instant};

use crate::pool::model::{parse_label, validate_name};
use crate::pool::{Amounts, ClaimRequest, Ledger, PoolError};
pub use explain::{Rejection, Summary};
pub use index::Score;

/// Everything that can go wrong while scheduling.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The request itself is wrong; nothing was changed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No host passes the filters; the summary says why, pool-wide.
    #[error("{0}")]
    NoHost(Summary),
    /// The ledger failed.
    #[error(transparent)]
    Pool(PoolError),
}

impl From<PoolError> for ScheduleError {
    fn from(e: PoolError) -> Self {
        match e {
            // Bad input found by the ledger's checks is still the request's fault.
            PoolError::Invalid(m) => ScheduleError::Invalid(m),
            other => ScheduleError::Pool(other),
        }
    }
}

/// How much each weigher counts. Scores are each in [0, 1] before weighting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Weight of spread (most free after placement).
    pub spread: f64,
    /// Weight of pack (fullest host that fits).
    pub pack: f64,
    /// Weight of the cost rule D·R/C.
    pub cost: f64,
}

impl Weights {
    /// Spread only (the default).
    pub const SPREAD: Weights = Weights {
        spread: 1.0,
        pack: 0.0,
        cost: 0.0,
    };
    /// Pack only.
    pub const PACK: Weights = Weights {
        spread: 0.0,
        pack: 1.0,
        cost: 0.0,
    };
    /// The cost rule only.
    pub const COST: Weights = Weights {
        spread: 0.0,
        pack: 0.0,
        cost: 1.0,
    };

    /// Parses `spread`, `pack`, `cost`, or weighted combinations like `cost=2,spread=1`.
    pub fn parse(text: &str) -> Result<Weights, ScheduleError> {
        let mut w = Weights {
            spread: 0.0,
            pack: 0.0,
            cost: 0.0,
        };
        for part in text.split(',') {
            let (name, weight) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), v.trim().parse::<f64>().ok()),
                None => (part.trim(), Some(1.0)),
            };
            let weight = weight
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| {
                    ScheduleError::Invalid(format!("weight in {part:?} must be a number ≥ 0"))
                })?;
            let slot = match name {
                "spread" => &mut w.spread,
                "pack" => &mut w.pack,
                "cost" => &mut w.cost,
                _ => {
                    return Err(ScheduleError::Invalid(format!(
                        "unknown strategy {name:?}: use spread, pack or cost (or e.g. cost=2,spread=1)"
                    )));
                }
            };
            *slot += weight;
        }
        if w.spread + w.pack + w.cost <= 0.0 {
            return Err(ScheduleError::Invalid(
                "strategy weights are all zero".into(),
            ));
        }
        Ok(w)
    }
}

/// What a VM needs from its host.
#[derive(Clone, Debug)]
pub struct Request {
    /// VM name, recorded in the allocation.
    pub name: String,
    /// What to claim.
    pub amounts: Amounts,
    /// Labels the host must carry (key, value).
    pub labels: Vec<(String, String)>,
    /// Anti-affinity group: no two VMs of a group on one host.
    pub group: Option<String>,
    /// How to rank hosts that pass the filters.
    pub weights: Weights,
    /// The VM's spec (JSON) to record with the allocation for the host's agent to
    /// start; a shared (PostgreSQL) pool only.
    pub vm_spec: Option<String>,
}

impl Request {
    /// A request with no labels, no group and the spread strategy.
    pub fn new(name: &str, amounts: Amounts) -> Request {
        Request {
            name: name.to_string(),
            amounts,
            labels: Vec::new(),
            group: None,
            weights: Weights::SPREAD,
            vm_spec: None,
        }
    }

    /// Requires a label given as `key=value`.
    pub fn with_label(mut self, label: &str) -> Result<Request, ScheduleError> {
        self.labels.push(parse_label(label)?);
        Ok(self)
    }

    /// Sets the anti-affinity group.
    pub fn with_group(mut self, group: &str) -> Request {
        self.group = Some(group.to_string());
        self
    }

    /// Sets the weights.
    pub fn with_weights(mut self, weights: Weights) -> Request {
        self.weights = weights;
        self
    }

    /// Refuses a request no pool could ever take, before anything is touched.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        validate_name("VM name", &self.name)?;
        self.amounts.validate_request()?;
        if let Some(g) = &self.group {
            validate_name("group", g)?;
        }
        Ok(())
    }
}

/// One host's answer to a request: its score, or the filter that refused it.
pub type Verdict = Result<Score, Rejection>;

/// Where a VM went.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Placement {
    /// Host name.
    pub host: String,
    /// The allocation's id; 0 for a dry run.
    pub allocation_id: i64,
    /// The host's score.
    pub score: Score,
}

/// A scheduler over one ledger. Keep it for many placements: its index survives between
/// them and only follows changes.
pub struct Scheduler {
    ledger: Ledger,
    index: index::Index,
    timings: Option<Vec<Duration>>,
}

impl Scheduler {
    /// A scheduler over `ledger`; the index loads on first use.
    pub fn new(ledger: Ledger) -> Scheduler {
        Scheduler {
            ledger,
            index: index::Index::default(),
            timings: None,
        }
    }

    /// Starts recording how long each decision takes (index work only, not the commit).
    pub fn record_timings(&mut self) {
        self.timings = Some(Vec::new());
    }

    /// Decision times recorded since the last call.
    pub fn take_timings(&mut self) -> Vec<Duration> {
        self.timings
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Places one VM and claims its resources.
    pub fn place(&mut self, req: &Request) -> Result<Placement, ScheduleError> {
        self.place_batch(std::slice::from_ref(req), false)?
            .pop()
            .unwrap_or_else(|| Err(ScheduleError::Invalid("empty batch".into())))
    }

    /// Chooses a host for one VM without claiming anything.
    pub fn dry_run(&mut self, req: &Request) -> Result<Placement, ScheduleError> {
        self.place_batch(std::slice::from_ref(req), true)?
            .pop()
            .unwrap_or_else(|| Err(ScheduleError::Invalid("empty batch".into())))
    }

    /// Places several VMs in one transaction, in order, each all-or-nothing: one commit
    /// (one fsync) for the batch. Every placement returned is durable. The outer error
    /// means nothing was recorded.
    pub fn place_batch(
        &mut self,
        reqs: &[Request],
        dry_run: bool,
    ) -> Result<Vec<Result<Placement, ScheduleError>>, ScheduleError> {
        for r in reqs {
            r.validate()?;
        }
        let seen = Some(self.index.generation.unwrap_or(0));
        let mut picks: Vec<Option<(usize, Score)>> = Vec::with_capacity(reqs.len());
        let (index, timings) = (&mut self.index, &mut self.timings);
        let mut choose = |delta| {
            index.apply(delta);
            let mut claims = Vec::with_capacity(reqs.len());
            for r in reqs {
                let started = Instant::now();
                let pick = index.best(r);
                if let Some((i, _)) = pick {
                    index.take(i, &r.amounts, r.group.as_deref());
                    claims.push(ClaimRequest {
                        host_id: index.hosts()[i].id,
                        vm_name: r.name.clone(),
                        group: r.group.clone(),
                        amounts: r.amounts,
                        owner: None,
                        vm_spec: r.vm_spec.clone(),
                    });
                }
                if let Some(t) = timings.as_mut() {
                    t.push(started.elapsed());
                }
                picks.push(pick);
            }
            Ok(claims)
        };
        let result = self.ledger.store().claim(seen, &mut choose, dry_run);
        let committed = match result {
            Ok(c) => c,
            Err(e) => {
                // The index took placements that were rolled back: reload next time.
                self.index.generation = None;
                return Err(e.into());
            }
        };
        // A dry run's picks (and any stale release it saw) were rolled back.
        self.index.generation = if dry_run {
            None
        } else {
            Some(committed.generation)
        };
        let mut stored = committed.results.into_iter();
        let mut out = Vec::with_capacity(reqs.len());
        for (req, pick) in reqs.iter().zip(picks) {
            out.push(match pick {
                None => Err(ScheduleError::NoHost(self.index.summary(req))),
                Some((i, score)) => match stored.next() {
                    Some(Ok(a)) => Ok(Placement {
                        host: a.host,
                        allocation_id: if dry_run { 0 } else { a.id },
                        score,
                    }),
                    Some(Err(e)) => {
                        // The store disagreed with the index: never trust it again.
                        log::error!(
                            "scheduler: index out of step with the pool on host {}: {e}",
                            self.index.hosts()[i].spec.name
                        );
                        self.index.generation = None;
                        Err(e.into())
                    }
                    None => Err(ScheduleError::Invalid("the store lost a claim".into())),
                },
            });
        }
        Ok(out)
    }

    /// Every host's verdict on `req` — its score or the filter that refused it — by
    /// host name, against the pool as it is now. Claims nothing.
    pub fn explain(&mut self, req: &Request) -> Result<Vec<(String, Verdict)>, ScheduleError> {
        req.validate()?;
        self.refresh()?;
        let idx = &self.index;
        Ok((0..idx.hosts().len())
            .map(|i| (idx.hosts()[i].spec.name.clone(), idx.verdict(i, req)))
            .collect())
    }

    /// Brings the index up to date with the pool, reading only: it takes no write
    /// lock and releases nothing (stale owners' allocations go at the next claim).
    pub fn refresh(&mut self) -> Result<(), ScheduleError> {
        let seen = self.index.generation.unwrap_or(0);
        let (generation, delta) = self.ledger.store().changes(seen)?;
        self.index.apply(delta);
        self.index.generation = Some(generation);
        Ok(())
    }

    /// The host the index would choose now, and its score, without touching the store:
    /// the decision alone (call [`Scheduler::refresh`] first to follow the pool).
    pub fn decide(&mut self, req: &Request) -> Option<(&str, Score)> {
        let (i, score) = self.index.best(req)?;
        Some((self.index.hosts()[i].spec.name.as_str(), score))
    }

    /// The index's hosts (after [`Scheduler::refresh`] or a placement).
    pub fn hosts(&self) -> &[crate::pool::Host] {
        self.index.hosts()
    }
}
