//! The agent's side of a shared pool: start what the scheduler placed on this host,
//! write back what became of it, heartbeat, and mark silent hosts down.
//!
//! Two threads, each with its own connection. The heartbeat thread records that this
//! agent lives and marks down the hosts whose agents have been silent past the
//! deadline (any agent does it for all). The follower reads this host's VMs from the
//! pool and, for each, brings the agent's own records in line (start a pending one,
//! stop and forget a deleted one, report a state that changed); then waits for a
//! NOTIFY or the next period, whichever comes first. Each step is idempotent, so a pass that fails half-way (the database
//! went away) is simply done again by the next one, and a restarted agent, which has
//! adopted its running VM processes from its state directory, starts nothing twice.

use std::sync::Arc;
use std::time::Duration;

use super::spec::VmSpec;
use super::supervisor::{Fleet, State, Supervisor};
use crate::pool::PostgresStore;
use crate::pool::postgres::fleet::{Listener, VmRecord};

/// Starts the follower thread of agent `sup` for host `fleet.host`.
pub fn follow(sup: Arc<Supervisor>, fleet: Fleet) -> std::io::Result<()> {
    let beat = fleet.clone();
    std::thread::Builder::new()
        .name("pool-heartbeat".into())
        .spawn(move || heartbeat(&beat))?;
    std::thread::Builder::new()
        .name("pool-follower".into())
        .spawn(move || run(&sup, &fleet))
        .map(drop)
}

/// How often the agent heartbeats (and looks at the pool without a NOTIFY): often
/// enough that a live agent is never taken for a dead one.
fn period(f: &Fleet) -> Duration {
    (f.down_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
}

fn run(sup: &Arc<Supervisor>, f: &Fleet) {
    let mut listener = Listener::new(&f.url);
    let mut store: Option<PostgresStore> = None;
    loop {
        if store.is_none() {
            match PostgresStore::open(&f.url) {
                Ok(s) => store = Some(s),
                Err(e) => log::warn!("pool: {e}; VMs keep running, retrying"),
            }
        }
        if let Some(s) = store.as_mut()
            && let Err(e) = pass(sup, f, s)
        {
            log::warn!("pool: {e}; VMs keep running, retrying");
        }
        listener.wait(period(f));
    }
}

/// The heartbeat, on a thread and connection of its own: starting many VMs keeps the
/// follower busy for a while, and a busy agent is not a dead one.
fn heartbeat(f: &Fleet) {
    let mut store: Option<PostgresStore> = None;
    loop {
        if store.is_none() {
            store = PostgresStore::open(&f.url)
                .map_err(|e| log::warn!("pool: {e}; retrying the heartbeat"))
                .ok();
        }
        if let Some(s) = store.as_mut() {
            let beat = s
                .heartbeat(&f.host)
                .and_then(|()| s.mark_down(f.down_after));
            match beat {
                Ok(down) => {
                    for host in down {
                        log::warn!(
                            "pool: host {host} is down: its agent was silent for over {:?}",
                            f.down_after
                        );
                    }
                }
                Err(e) => log::warn!("pool: heartbeat: {e}"),
            }
        }
        std::thread::sleep(period(f));
    }
}

/// One reconciliation pass.
fn pass(
    sup: &Arc<Supervisor>,
    f: &Fleet,
    store: &mut PostgresStore,
) -> Result<(), crate::pool::PoolError> {
    for vm in store.vms(Some(&f.host))? {
        reconcile(sup, store, &vm)?;
    }
    Ok(())
}

/// Brings one VM's local record in line with the pool's.
fn reconcile(
    sup: &Arc<Supervisor>,
    store: &mut PostgresStore,
    vm: &VmRecord,
) -> Result<(), crate::pool::PoolError> {
    let local = sup.brief(&vm.name);
    if vm.desired == "deleted" {
        if local.is_some()
            && let Err(e) = sup.remove(&vm.name)
        {
            log::warn!("pool: cannot remove VM {}: {e}", vm.name);
            return Ok(());
        }
        if store.forget(&vm.name)? {
            log::info!("pool: VM {} deleted", vm.name);
        }
        return Ok(());
    }
    match local {
        // Never started here: placed (pending), or placed and then its host was
        // marked down before the agent got to it (lost).
        None if vm.state == "pending" || vm.state == "lost" => {
            let started = serde_json::from_str::<VmSpec>(&vm.spec)
                .map_err(|e| format!("its spec is not valid: {e}"))
                .and_then(|spec| sup.start_new(spec).map_err(|e| e.to_string()));
            match started {
                Ok(_) => {
                    log::info!("pool: started VM {}", vm.name);
                    store.report(&vm.name, "running", None, None)?;
                }
                Err(e) => {
                    log::warn!("pool: VM {} failed to start: {e}", vm.name);
                    store.report(&vm.name, "failed", None, Some(&e))?;
                }
            }
        }
        // Started before, and the agent has no record of it now: its state
        // directory was lost with it.
        None => {
            if vm.state != "failed" {
                store.report(
                    &vm.name,
                    "failed",
                    None,
                    Some("the host's agent has no record of it"),
                )?;
            }
        }
        Some((state, code, reason)) => {
            let (name, code, reason) = match state {
                State::Starting | State::Running | State::Stopping => ("running", None, None),
                State::Exited => ("exited", code, None),
                State::Failed => ("failed", code, reason),
            };
            store.report(&vm.name, name, code, reason.as_deref())?;
        }
    }
    Ok(())
}
