//! The in-memory index of the pool that makes a decision cost microseconds.
//!
//! Hosts sit in name order in blocks of 8, each block holding one small array per
//! quantity (free amount and 1/usable per resource, 1/cost, a gate), so one decision is
//! a single branch-free pass that the compiler vectorises: no allocation, no database
//! query, under 2 ns per host. Required labels add a cached per-label-set gate and an
//! anti-affinity group closes its few hosts for the pass; only hosts with per-request
//! limits take the slower exact path. Both paths keep, among equal scores, the host
//! whose name sorts first: the deterministic tie-break. The index follows the store by
//! pool generation: [`Index::apply`] takes the [`Delta`] the store hands over inside the
//! claim transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::Request;
use super::explain::{Rejection, Summary};
use crate::pool::model::{HostState, Misfit, fit};
use crate::pool::{Amounts, Delta, Host, Resource};

/// One host's score, and the weighers' parts of it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Score {
    /// The weighted sum the scheduler maximises.
    pub total: f64,
    /// Spread: mean free fraction after placement, in [0, 1].
    pub spread: f64,
    /// Pack: 1 − spread, in [0, 1].
    pub pack: f64,
    /// Cost: D·R/C scaled into [0, 1] (see [`super::Weights`]).
    pub cost: f64,
}

/// A request compiled against the index: numbers the hot loop needs, nothing else.
struct Query<'a> {
    need_f: [f64; 3],
    labels: &'a [(String, String)],
    group: Option<&'a HashSet<usize>>,
    /// Per resource: (d_r / U_r) / Σ(d / U) / U_r, so Σ cost_w · free = D·R normalised.
    cost_w: [f64; 3],
    /// The weighted total folded into one linear form per host (see [`total`]).
    coef: Coef,
}

/// total = a · Σ (free_r − d_r) · iu_r + b + inv_cost · Σ c_r · free_r, which is
/// w_spread · spread + w_pack · (1 − spread) + w_cost · cost with the constants folded.
#[derive(Clone, Copy)]
struct Coef {
    d: [f64; 3],
    a: f64,
    b: f64,
    c: [f64; 3],
}

/// Hosts per block: one AVX-512 register of f64, two AVX2 ones.
const LANES: usize = 8;

/// The hot data of LANES consecutive hosts, one array per quantity, so the pass over a
/// block has constant bounds and compiles to vector instructions.
#[derive(Clone)]
struct Block {
    /// Free amount per resource.
    free: [[f64; LANES]; 3],
    /// 1 / usable per resource.
    iu: [[f64; LANES]; 3],
    /// 1 / cost.
    inv_cost: [f64; LANES],
    /// 0 for a host the pass may choose; −∞ for one it must not (closed, with
    /// per-request limits, or padding past the last host).
    gate: [f64; LANES],
}

impl Default for Block {
    fn default() -> Block {
        Block {
            free: [[0.0; LANES]; 3],
            iu: [[0.0; LANES]; 3],
            inv_cost: [0.0; LANES],
            gate: [f64::NEG_INFINITY; LANES],
        }
    }
}

/// A gate per host, by block: 0 lets the host through, −∞ keeps it out.
type Gate = Arc<Vec<[f64; LANES]>>;

/// The pool as the scheduler sees it.
#[derive(Default)]
pub struct Index {
    /// Pool generation the index reflects; None until loaded (or after a failed write).
    pub generation: Option<u64>,
    hosts: Vec<Host>,
    pos: HashMap<i64, usize>,
    free: Vec<[u64; 3]>,
    /// The vectorised pass's data, LANES hosts per block.
    blocks: Vec<Block>,
    /// Enabled and below its VM limit.
    open: Vec<bool>,
    /// Has per-request min/max/step on some resource: checked on the exact path only.
    limited: Vec<bool>,
    /// The hosts with `limited` set.
    limited_list: Vec<usize>,
    /// Per set of required labels, a gate per host (0 or −∞), built on first use and
    /// dropped when any host's labels change.
    label_gates: HashMap<Vec<(String, String)>, Gate>,
    groups: HashMap<String, HashSet<usize>>,
    max_usable: [f64; 3],
    min_cost: f64,
}

impl Index {
    /// Hosts in the index, by name.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Follows the store's changes.
    pub fn apply(&mut self, delta: Delta) {
        match delta {
            Delta::Unchanged => {}
            Delta::Everything(hosts) => self.rebuild(hosts),
            Delta::Hosts(changed) => {
                if changed.iter().any(|h| !self.pos.contains_key(&h.id)) {
                    let mut all: HashMap<i64, Host> = std::mem::take(&mut self.hosts)
                        .into_iter()
                        .map(|h| (h.id, h))
                        .collect();
                    all.extend(changed.into_iter().map(|h| (h.id, h)));
                    self.rebuild(all.into_values().collect());
                } else {
                    for h in changed {
                        let i = self.pos[&h.id];
                        if self.hosts[i].spec.labels != h.spec.labels {
                            self.label_gates.clear();
                        }
                        for g in &self.hosts[i].groups {
                            if let Some(set) = self.groups.get_mut(g) {
                                set.remove(&i);
                            }
                        }
                        self.hosts[i] = h;
                        self.refresh(i);
                    }
                    self.pool_constants();
                }
            }
        }
    }

    /// Rebuilds every array from `hosts`.
    fn rebuild(&mut self, mut hosts: Vec<Host>) {
        hosts.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let n = hosts.len();
        self.hosts = hosts;
        self.pos = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id, i))
            .collect();
        self.free = vec![[0; 3]; n];
        self.blocks = vec![Block::default(); n.div_ceil(LANES)];
        self.open = vec![false; n];
        self.limited = vec![false; n];
        self.groups.clear();
        self.label_gates.clear();
        for i in 0..n {
            self.refresh(i);
        }
        self.pool_constants();
    }

    /// Recomputes host `i`'s hot data from its record.
    fn refresh(&mut self, i: usize) {
        let h = &self.hosts[i];
        let (b, l) = (&mut self.blocks[i / LANES], i % LANES);
        for r in Resource::ALL {
            self.free[i][r.index()] = h.free(r);
            b.free[r.index()][l] = h.free(r) as f64;
            b.iu[r.index()][l] = 1.0 / h.usable(r).max(1) as f64;
        }
        b.inv_cost[l] = 1.0 / h.spec.cost;
        self.open[i] = h.spec.enabled && h.spec.max_vms.is_none_or(|m| h.vms < m);
        self.limited[i] = h
            .spec
            .inventories
            .iter()
            .any(|inv| inv.min_unit.is_some() || inv.max_unit.is_some() || inv.step.is_some());
        b.gate[l] = if self.open[i] && !self.limited[i] {
            0.0
        } else {
            f64::NEG_INFINITY
        };
        for g in &h.groups {
            self.groups.entry(g.clone()).or_default().insert(i);
        }
    }

    /// The largest usable per resource and the lowest cost, which normalise the cost rule.
    fn pool_constants(&mut self) {
        self.limited_list = (0..self.hosts.len()).filter(|&i| self.limited[i]).collect();
        self.max_usable = [1.0; 3];
        self.min_cost = f64::INFINITY;
        for h in &self.hosts {
            for r in Resource::ALL {
                let u = h.usable(r) as f64;
                self.max_usable[r.index()] = self.max_usable[r.index()].max(u);
            }
            self.min_cost = self.min_cost.min(h.spec.cost);
        }
    }

    /// Compiles a request.
    fn query<'a>(&'a self, req: &'a Request) -> Query<'a> {
        let need = [
            req.amounts.vcpus,
            req.amounts.memory_mib,
            req.amounts.disk_gib,
        ];
        let share: [f64; 3] = std::array::from_fn(|r| need[r] as f64 / self.max_usable[r]);
        let total: f64 = share.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let mut cost_w = [0.0; 3];
        for r in 0..3 {
            cost_w[r] = share[r] / total / self.max_usable[r];
        }
        let [ws, wp, wc] = [req.weights.spread, req.weights.pack, req.weights.cost];
        let coef = Coef {
            d: need.map(|d| d as f64),
            a: (ws - wp) / 3.0,
            b: wp,
            c: cost_w.map(|c| wc * self.min_cost * c),
        };
        Query {
            coef,
            need_f: need.map(|d| d as f64),
            labels: &req.labels,
            group: req.group.as_ref().and_then(|g| self.groups.get(g)),
            cost_w,
        }
    }

    /// The score of host `i` for `q`; the host must fit. The same arithmetic, in the
    /// same order, as [`Index::best_fast`], so both paths rank ties alike.
    fn score(&self, i: usize, q: &Query<'_>) -> Score {
        let (b, l) = (&self.blocks[i / LANES], i % LANES);
        let (spread, cost) = spread_cost(
            [b.free[0][l], b.free[1][l], b.free[2][l]],
            [b.iu[0][l], b.iu[1][l], b.iu[2][l]],
            b.inv_cost[l],
            q,
            self.min_cost,
        );
        Score {
            total: total(
                [b.free[0][l], b.free[1][l], b.free[2][l]],
                [b.iu[0][l], b.iu[1][l], b.iu[2][l]],
                b.inv_cost[l],
                &q.coef,
            ),
            spread,
            pack: 1.0 - spread,
            cost,
        }
    }

    /// Whether host `i` carries every required label.
    fn labels_match(&self, i: usize, labels: &[(String, String)]) -> bool {
        let have = &self.hosts[i].spec.labels;
        labels.iter().all(|(k, v)| have.get(k) == Some(v))
    }

    /// The gate of each host for a set of required labels: 0 if it has them all.
    fn label_gate(&mut self, labels: &[(String, String)]) -> Gate {
        if let Some(g) = self.label_gates.get(labels) {
            return g.clone();
        }
        let mut gate = vec![[0.0; LANES]; self.blocks.len()];
        for i in 0..self.hosts.len() {
            if !self.labels_match(i, labels) {
                gate[i / LANES][i % LANES] = f64::NEG_INFINITY;
            }
        }
        // Label sets are few in practice; a flood of distinct ones only costs rebuilds.
        if self.label_gates.len() >= 64 {
            self.label_gates.clear();
        }
        let gate = Arc::new(gate);
        self.label_gates.insert(labels.to_vec(), gate.clone());
        gate
    }

    /// The best host for `req` and its score.
    pub fn best(&mut self, req: &Request) -> Option<(usize, Score)> {
        let labels = self.label_gate(&req.labels);
        // Hosts holding the request's group are closed for this pass only: a group has
        // few members, so this is cheaper than any per-request array.
        let members: Vec<usize> = req
            .group
            .as_ref()
            .and_then(|g| self.groups.get(g))
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        let saved: Vec<f64> = members
            .iter()
            .map(|&i| {
                std::mem::replace(
                    &mut self.blocks[i / LANES].gate[i % LANES],
                    f64::NEG_INFINITY,
                )
            })
            .collect();
        let q = self.query(req);
        let mut best = self.best_fast(&q, &labels).map(|i| (i, self.score(i, &q)));
        // The exact path for the hosts the pass leaves out: those with per-request limits.
        for &i in &self.limited_list {
            if self.verdict_of(i, &q, req).is_err() {
                continue;
            }
            let s = self.score(i, &q);
            let better = match best {
                None => true,
                Some((j, b)) => s.total > b.total || (s.total == b.total && i < j),
            };
            if better {
                best = Some((i, s));
            }
        }
        for (&i, g) in members.iter().zip(saved) {
            self.blocks[i / LANES].gate[i % LANES] = g;
        }
        best
    }

    /// The vectorised pass over open hosts without limits: the best index, lowest on ties.
    fn best_fast(&self, q: &Query<'_>, labels: &[[f64; LANES]]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above; that is all the function needs.
            return unsafe { self.best_fast_avx2(&q.coef, labels) };
        }
        self.best_fast_any(&q.coef, labels)
    }

    /// [`Index::best_fast_any`] compiled for AVX2 (4 f64 per instruction instead of 2).
    /// FMA stays off so every result is bit-identical to the scalar [`Index::score`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn best_fast_avx2(&self, k: &Coef, labels: &[[f64; LANES]]) -> Option<usize> {
        self.best_fast_any(k, labels)
    }

    /// The pass itself, for whatever vector width it is compiled with.
    #[inline(always)]
    fn best_fast_any(&self, k: &Coef, labels: &[[f64; LANES]]) -> Option<usize> {
        let mut best_val = [f64::NEG_INFINITY; LANES];
        let mut best_idx = [usize::MAX; LANES];
        for (n, (b, lg)) in self.blocks.iter().zip(labels).enumerate() {
            for l in 0..LANES {
                let free = [b.free[0][l], b.free[1][l], b.free[2][l]];
                let fits = (free[0] >= k.d[0]) & (free[1] >= k.d[1]) & (free[2] >= k.d[2]);
                let iu = [b.iu[0][l], b.iu[1][l], b.iu[2][l]];
                let s = total(free, iu, b.inv_cost[l], k) + b.gate[l] + lg[l];
                // Per lane, strictly greater keeps the lowest index on ties.
                let take = fits & (s > best_val[l]);
                best_val[l] = if take { s } else { best_val[l] };
                best_idx[l] = if take { n * LANES + l } else { best_idx[l] };
            }
        }
        (0..LANES)
            .filter(|&l| best_idx[l] != usize::MAX)
            .max_by(|&a, &b| {
                best_val[a]
                    .total_cmp(&best_val[b])
                    .then(best_idx[b].cmp(&best_idx[a]))
            })
            .map(|l| best_idx[l])
    }

    /// Host `i`'s verdict on `req`: its score, or the first filter it fails. Agrees with
    /// [`Index::best`]; slower, for explanations.
    pub fn verdict(&self, i: usize, req: &Request) -> Result<Score, Rejection> {
        let q = self.query(req);
        self.verdict_of(i, &q, req)?;
        Ok(self.score(i, &q))
    }

    /// The first filter host `i` fails for the compiled request `q`: the request's
    /// labels (the scheduler's own filter), then the ledger's one fit rule
    /// ([`crate::pool::model::fit`]), so a host's reason here is the reason its
    /// claim would give.
    fn verdict_of(&self, i: usize, q: &Query<'_>, req: &Request) -> Result<(), Rejection> {
        let h = &self.hosts[i];
        if let Some((k, v)) = q
            .labels
            .iter()
            .find(|(k, v)| h.spec.labels.get(k) != Some(v))
        {
            return Err(Rejection::Label {
                key: k.clone(),
                want: v.clone(),
            });
        }
        let state = HostState {
            enabled: h.spec.enabled,
            max_vms: h.spec.max_vms,
            vms: h.vms,
            inventories: &h.spec.inventories,
            used: h.used,
        };
        let group = req
            .group
            .as_deref()
            .map(|g| (g, q.group.is_some_and(|members| members.contains(&i))));
        fit(state, group, &req.amounts).map_err(|m| match m {
            Misfit::Disabled => Rejection::Disabled,
            Misfit::MaxVms(max) => Rejection::MaxVms { max },
            Misfit::Group(group) => Rejection::Group { group },
            Misfit::Limit {
                resource,
                need,
                reason,
            } => Rejection::Limit {
                resource,
                reason: format!("{need} is {reason}"),
            },
            Misfit::Lacks {
                resource,
                need,
                free,
            } => Rejection::Lacks {
                resource,
                need,
                free,
            },
        })
    }

    /// Why no host takes `req`, over the whole pool.
    pub fn summary(&self, req: &Request) -> Summary {
        let mut s = Summary::new(self.hosts.len() as u64);
        for i in 0..self.hosts.len() {
            if let Err(r) = self.verdict(i, req) {
                s.add(&r);
            }
        }
        s
    }

    /// Records a placement on host `i` in the index (the store records it in the same
    /// transaction).
    pub fn take(&mut self, i: usize, amounts: &Amounts, group: Option<&str>) {
        let h = &mut self.hosts[i];
        for r in Resource::ALL {
            *h.used.get_mut(r) += amounts.get(r);
        }
        h.vms += 1;
        if let Some(g) = group {
            h.groups.insert(g.to_string());
        }
        self.refresh(i);
    }
}

/// Spread (mean free fraction after placement) and cost (D·R/C, normalised) of a host
/// with free amounts `free`, 1/usable `iu` and 1/cost `inv_cost`.
#[inline(always)]
fn spread_cost(
    free: [f64; 3],
    iu: [f64; 3],
    inv_cost: f64,
    q: &Query<'_>,
    min_cost: f64,
) -> (f64, f64) {
    let d = &q.need_f;
    let spread =
        ((free[0] - d[0]) * iu[0] + (free[1] - d[1]) * iu[1] + (free[2] - d[2]) * iu[2]) / 3.0;
    let dr = q.cost_w[0] * free[0] + q.cost_w[1] * free[1] + q.cost_w[2] * free[2];
    (spread, dr * min_cost * inv_cost)
}

/// The weighted total of a host (see [`Coef`]): the one formula both paths rank by.
#[inline(always)]
fn total(free: [f64; 3], iu: [f64; 3], inv_cost: f64, k: &Coef) -> f64 {
    let spread3 =
        (free[0] - k.d[0]) * iu[0] + (free[1] - k.d[1]) * iu[1] + (free[2] - k.d[2]) * iu[2];
    let cost = k.c[0] * free[0] + k.c[1] * free[1] + k.c[2] * free[2];
    k.a * spread3 + k.b + inv_cost * cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::HostSpec;
    use crate::scheduler::Weights;

    /// The fast path and the exact path must choose exactly what a brute-force argmax of
    /// the verdicts chooses, lowest name on ties, on pools with every kind of host.
    #[test]
    fn best_agrees_with_brute_force() {
        let mut seed = 42u64;
        let mut next = move |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        let mut hosts = Vec::new();
        for i in 0..203 {
            // Few distinct sizes so that exact ties are common.
            let mut spec =
                HostSpec::new(&format!("h{i:03}"), 1 + next(4), 1024 * (1 + next(4)), 10);
            spec.enabled = next(10) != 0;
            spec.cost = [1.0, 2.0][next(2) as usize];
            spec.max_vms = (next(5) == 0).then_some(1 + next(3));
            if next(8) == 0 {
                spec.inventories[0].step = Some(2);
            }
            spec.labels
                .insert("zone".into(), ["a", "b"][next(2) as usize].into());
            let mut h = Host {
                id: i,
                spec,
                generation: 1,
                used: Amounts::new(next(3), 256 * next(3), 0),
                vms: next(3),
                groups: Default::default(),
            };
            if next(6) == 0 {
                h.groups.insert("g".into());
            }
            hosts.push(h);
        }
        let mut index = Index::default();
        index.apply(Delta::Everything(hosts));
        let mut placed = 0;
        for k in 0..600 {
            let w = [Weights::SPREAD, Weights::PACK, Weights::COST][k % 3];
            let mut req = Request::new("vm", Amounts::new(1 + next(4), 256 * (1 + next(6)), 0))
                .with_weights(w);
            if next(3) == 0 {
                req.labels.push(("zone".into(), "b".into()));
            }
            if next(3) == 0 {
                req.group = Some("g".into());
            }
            let mut want: Option<(usize, f64)> = None;
            for i in 0..index.hosts().len() {
                if let Ok(s) = index.verdict(i, &req)
                    && want.is_none_or(|(_, b)| s.total > b)
                {
                    want = Some((i, s.total));
                }
            }
            let got = index.best(&req).map(|(i, s)| (i, s.total));
            assert_eq!(got, want, "request {k}: {req:?}");
            if let Some((i, _)) = got {
                index.take(i, &req.amounts, req.group.as_deref());
                placed += 1;
            }
        }
        // The pool fills up part way: both placements and refusals were compared.
        assert!(placed > 100 && placed < 600, "placed {placed}");
    }
}
