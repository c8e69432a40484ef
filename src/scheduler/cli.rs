//! `minivmm schedule`: place one VM on the pool and claim it there.
//!
//! main.rs needs one variant `Schedule(minivmm::scheduler::cli::ScheduleArgs)` and one
//! arm calling [`run`], whose value is the process exit status.

use clap::Args;
use serde_json::json;

use super::{Request, ScheduleError, Scheduler, Weights};
use crate::pool::cli::{PoolLocation, print_json};
use crate::pool::table::Table;
use crate::pool::units::{parse_gib, parse_mib};
use crate::pool::{Amounts, Ledger};

/// `minivmm schedule`: choose a host for a VM and claim its resources there.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Where the pool is, and the output format.
    #[command(flatten)]
    pub location: PoolLocation,
    /// vCPUs
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub vcpus: i64,
    /// Memory (e.g. 4G; a bare number is MiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: String,
    /// Disk (e.g. 20G; a bare number is GiB)
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: Option<String>,
    /// spread, pack, cost, or weights like cost=2,spread=1
    #[arg(long, default_value = "spread")]
    pub strategy: String,
    /// Required host label key=value (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Anti-affinity group: no two of its VMs on one host
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// VM name recorded in the allocation
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// Choose, but claim nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Show every host's score or the filter that rejected it
    #[arg(long)]
    pub explain: bool,
}

/// Builds the request from the flags; every error is the user's to fix.
fn request(a: &ScheduleArgs) -> Result<Request, ScheduleError> {
    let vcpus = u64::try_from(a.vcpus)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            ScheduleError::Invalid(format!("vcpus must be at least 1, got {}", a.vcpus))
        })?;
    let disk = a.disk.as_deref().map(parse_gib).transpose()?.unwrap_or(0);
    let amounts = Amounts::new(vcpus, parse_mib(&a.memory)?, disk);
    let mut req = Request::new(&a.name, amounts).with_weights(Weights::parse(&a.strategy)?);
    for l in &a.labels {
        req = req.with_label(l)?;
    }
    if let Some(g) = &a.group {
        req = req.with_group(g);
    }
    req.validate()?;
    Ok(req)
}

/// Runs `schedule`; returns the exit status. "No host fits" is an error (status 1).
///
/// A failure on a pool this command created leaves no file behind.
pub fn run(args: ScheduleArgs) -> Result<i32, ScheduleError> {
    let req = request(&args)?;
    let ledger = args.location.open()?;
    let result = schedule(&args, &req, &ledger);
    if result.is_err() {
        ledger.discard_if_unused();
    }
    result
}

/// Places `req` on `ledger`'s pool and prints the outcome.
fn schedule(args: &ScheduleArgs, req: &Request, ledger: &Ledger) -> Result<i32, ScheduleError> {
    let json = args.location.json;
    let mut scheduler = Scheduler::new(ledger.clone());
    let verdicts = if args.explain {
        Some(scheduler.explain(req)?)
    } else {
        None
    };
    let placed = if args.dry_run {
        scheduler.dry_run(req)
    } else {
        scheduler.place(req)
    };
    if json {
        let explain = verdicts.as_ref().map(|v| {
            v.iter()
                .map(|(host, verdict)| match verdict {
                    Ok(score) => json!({"host": host, "score": score}),
                    Err(rej) => json!({"host": host, "rejected": rej, "reason": rej.to_string()}),
                })
                .collect::<Vec<_>>()
        });
        let mut out = json!({"vm": req.name, "dry_run": args.dry_run, "explain": explain});
        match &placed {
            Ok(p) => {
                out["host"] = json!(p.host);
                out["allocation"] = if args.dry_run {
                    json!(null)
                } else {
                    json!(p.allocation_id)
                };
                out["score"] = json!(p.score);
            }
            Err(e) => out["error"] = json!(e.to_string()),
        }
        print_json(&out);
    } else if let Some(v) = &verdicts {
        let mut t = Table::new(&["HOST", "SCORE", "SPREAD", "PACK", "COST", "VERDICT"]);
        for (host, verdict) in v {
            t.row(match verdict {
                Ok(s) => vec![
                    host.clone(),
                    format!("{:.4}", s.total),
                    format!("{:.4}", s.spread),
                    format!("{:.4}", s.pack),
                    format!("{:.4}", s.cost),
                    "fits".into(),
                ],
                Err(r) => vec![
                    host.clone(),
                    "-".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    r.to_string(),
                ],
            });
        }
        crate::out!("{}", t.render());
    }
    let p = placed?;
    if !json {
        if args.dry_run {
            crate::outln!(
                "would place VM {} on host {} (score {:.4})",
                req.name,
                p.host,
                p.score.total
            );
        } else {
            crate::outln!(
                "placed VM {} on host {} (allocation {}, score {:.4})",
                req.name,
                p.host,
                p.allocation_id,
                p.score.total
            );
        }
    }
    if !args.dry_run {
        crate::output::report_lost(format_args!(
            "placed VM {} on host {}: allocation {} stays claimed, `minivmm pool release {}` frees it",
            req.name, p.host, p.allocation_id, p.allocation_id
        ));
    }
    Ok(0)
}
