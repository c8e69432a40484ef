//! Each strategy and filter on small hand-built pools whose right answer is known.

mod pool_util;

use minivmm::pool::{Amounts, HostSpec, Ledger};
use minivmm::scheduler::{Rejection, Request, ScheduleError, Scheduler, Weights};
use pool_util::{Backend, Scratch};

/// Hosts and allocations as stored. (One lock at a time: a store guard is held until
/// the end of the statement that takes it.)
fn snapshot(ledger: &Ledger) -> (Vec<minivmm::pool::Host>, Vec<minivmm::pool::Allocation>) {
    let hosts = ledger.store().hosts().expect("hosts");
    let allocs = ledger.store().allocations().expect("allocations");
    (hosts, allocs)
}

/// A pool of hosts (name, vcpus, memory MiB, cost, zone) with default ratios.
fn pool(s: &Scratch, hosts: &[(&str, u64, u64, f64, &str)]) -> Ledger {
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    for (name, vcpus, mem, cost, zone) in hosts {
        let mut spec = HostSpec::new(name, *vcpus, *mem, 100);
        spec.cost = *cost;
        spec.labels.insert("zone".into(), zone.to_string());
        ledger.add_host(&spec).expect("add");
    }
    ledger
}

fn req(vcpus: u64, mem: u64, w: Weights) -> Request {
    Request::new("vm", Amounts::new(vcpus, mem, 0)).with_weights(w)
}

/// a: 8 vCPUs/16 GiB, b: 16/32 GiB (cost 3), c: 4/8 GiB (cost 0.5).
const ABC: &[(&str, u64, u64, f64, &str)] = &[
    ("a", 8, 16384, 1.0, "a"),
    ("b", 16, 32768, 3.0, "b"),
    ("c", 4, 8192, 0.5, "b"),
];

fn spread_picks_the_most_free_after_placement(b: Backend) {
    let s = Scratch::with("spread", b);
    let mut sched = Scheduler::new(pool(&s, ABC));
    let p = sched.place(&req(2, 2048, Weights::SPREAD)).expect("place");
    assert_eq!(p.host, "b");
    // b keeps 62/64 vCPUs, 30/32 GiB, 100/100 disk: mean free fraction 0.96875.
    assert!((p.score.spread - (62.0 / 64.0 + 30.0 / 32.0 + 1.0) / 3.0).abs() < 1e-12);
}

fn pack_picks_the_fullest_host_that_fits(b: Backend) {
    let s = Scratch::with("pack", b);
    let mut sched = Scheduler::new(pool(&s, ABC));
    assert_eq!(
        sched
            .place(&req(2, 2048, Weights::PACK))
            .expect("place")
            .host,
        "c"
    );
    // c has 6 GiB left: a 7 GiB VM no longer fits there, a is the next fullest.
    assert_eq!(
        sched
            .place(&req(2, 7168, Weights::PACK))
            .expect("place")
            .host,
        "a"
    );
}

fn cost_rule_is_argmax_of_demand_times_free_over_cost(b: Backend) {
    let s = Scratch::with("cost", b);
    // x and y are the same size; y costs twice as much: x wins.
    // z is twice as big as x at 1.5× the price: D·R/C = 2/1.5 > 1, so z wins over x.
    let ledger = pool(
        &s,
        &[
            ("x", 8, 16384, 1.0, "a"),
            ("y", 8, 16384, 2.0, "a"),
            ("z", 16, 32768, 1.5, "a"),
        ],
    );
    let mut sched = Scheduler::new(ledger.clone());
    let p = sched.place(&req(1, 1024, Weights::COST)).expect("place");
    assert_eq!(p.host, "z");
    let explained = sched
        .explain(&req(1, 1024, Weights::COST))
        .expect("explain");
    let cost_of = |h: &str| {
        explained
            .iter()
            .find(|(n, _)| n == h)
            .expect("host")
            .1
            .clone()
    };
    let (x, y) = (
        cost_of("x").expect("x fits").cost,
        cost_of("y").expect("y fits").cost,
    );
    assert!(
        (x / y - 2.0).abs() < 1e-9,
        "y costs twice x: half the score ({x} vs {y})"
    );
    // Make z expensive: now x is the best value.
    ledger
        .set_host("z", |spec| {
            spec.cost = 4.0;
            Ok(())
        })
        .expect("set");
    assert_eq!(
        sched
            .place(&req(1, 1024, Weights::COST))
            .expect("place")
            .host,
        "x"
    );
}

fn ties_break_by_host_name(b: Backend) {
    let s = Scratch::with("ties", b);
    let ledger = pool(
        &s,
        &[
            ("m", 4, 4096, 1.0, "a"),
            ("k", 4, 4096, 1.0, "a"),
            ("z", 4, 4096, 1.0, "a"),
        ],
    );
    for w in [Weights::SPREAD, Weights::PACK, Weights::COST] {
        let mut sched = Scheduler::new(ledger.clone());
        assert_eq!(sched.dry_run(&req(1, 512, w)).expect("dry run").host, "k");
    }
}

fn weights_combine(b: Backend) {
    let s = Scratch::with("weights", b);
    let mut sched = Scheduler::new(pool(&s, ABC));
    let w = Weights::parse("cost=2,spread=1").expect("weights");
    assert_eq!((w.spread, w.pack, w.cost), (1.0, 0.0, 2.0));
    let v = sched.explain(&req(2, 2048, w)).expect("explain");
    for (_, verdict) in &v {
        let sc = verdict.as_ref().expect("all fit");
        assert!((sc.total - (sc.spread + 2.0 * sc.cost)).abs() < 1e-12);
    }
    for bad in ["fastest", "spread=-1", "cost=x", "pack=0"] {
        assert!(
            matches!(Weights::parse(bad), Err(ScheduleError::Invalid(_))),
            "{bad}"
        );
    }
}

fn fit_counts_reserved_and_ratios_exactly(b: Backend) {
    let s = Scratch::with("fit", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    let mut spec = HostSpec::new("h", 10, 10_000, 100);
    spec.inventories[0].reserved = 2; // (10 − 2) × 1.5 = 12 vCPUs usable
    spec.inventories[0].ratio = 1.5;
    spec.inventories[1].reserved = 1_000; // (10000 − 1000) × 1.0 = 9000 MiB usable
    ledger.add_host(&spec).expect("add");
    let mut sched = Scheduler::new(ledger);
    sched
        .place(&req(12, 9000, Weights::SPREAD))
        .expect("exactly usable fits");
    match sched.place(&req(1, 1, Weights::SPREAD)) {
        Err(ScheduleError::NoHost(sum)) => {
            assert_eq!(
                sum.to_string(),
                "no host fits: 1 lack vcpus (need 1, most free 0)"
            )
        }
        other => panic!("expected no host, got {other:?}"),
    }
}

fn filters_disabled_labels_group_max_vms_and_limits(b: Backend) {
    let s = Scratch::with("filters", b);
    let ledger = pool(
        &s,
        &[
            ("a", 8, 8192, 1.0, "a"),
            ("b", 8, 8192, 1.0, "b"),
            ("c", 8, 8192, 1.0, "b"),
        ],
    );
    let mut sched = Scheduler::new(ledger.clone());
    let zone_b = |g: &str| {
        req(1, 512, Weights::SPREAD)
            .with_label("zone=b")
            .expect("label")
            .with_group(g)
    };
    let first = sched.place(&zone_b("g")).expect("first").host;
    let second = sched.place(&zone_b("g")).expect("second").host;
    assert_eq!(
        {
            let mut v = vec![first, second];
            v.sort();
            v
        },
        ["b", "c"]
    );
    match sched.place(&zone_b("g")) {
        Err(ScheduleError::NoHost(sum)) => assert_eq!(
            sum.to_string(),
            "no host fits: 2 hold group g, 1 fail label zone=b"
        ),
        other => panic!("expected no host, got {other:?}"),
    }
    // Another group may share those hosts.
    sched.place(&zone_b("h")).expect("other group");

    ledger
        .set_host("b", |s| {
            s.enabled = false;
            Ok(())
        })
        .expect("disable");
    ledger
        .set_host("c", |s| {
            s.max_vms = Some(1);
            Ok(())
        })
        .expect("max");
    ledger
        .set_host("a", |s| {
            s.inventories[0].step = Some(2);
            Ok(())
        })
        .expect("step");
    let verdicts = sched
        .explain(&req(3, 512, Weights::SPREAD))
        .expect("explain");
    let reasons: Vec<String> = verdicts
        .iter()
        .map(|(h, v)| {
            format!(
                "{h}: {}",
                v.as_ref().err().map(|r| r.to_string()).unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "a: refuses this vcpus: 3 is not a multiple of 2",
            "b: disabled",
            "c: has its maximum of 1 VMs",
        ]
    );
    assert!(matches!(verdicts[1].1, Err(Rejection::Disabled)));
    assert_eq!(
        sched
            .place(&req(2, 512, Weights::SPREAD))
            .expect("even vcpus")
            .host,
        "a"
    );
}

fn bad_requests_are_refused_and_change_nothing(b: Backend) {
    let s = Scratch::with("badreq", b);
    let ledger = pool(&s, ABC);
    let mut sched = Scheduler::new(ledger.clone());
    sched.place(&req(1, 512, Weights::SPREAD)).expect("place");
    let before = snapshot(&ledger);
    for bad in [
        req(0, 512, Weights::SPREAD),
        req(1, 0, Weights::SPREAD),
        Request::new("has space", Amounts::new(1, 1, 0)),
        req(1, 512, Weights::SPREAD).with_group(""),
    ] {
        assert!(
            matches!(sched.place(&bad), Err(ScheduleError::Invalid(_))),
            "{bad:?}"
        );
    }
    assert!(req(1, 1, Weights::SPREAD).with_label("zone").is_err());
    // Impossible: no host has the label, or none is big enough.
    let nowhere = req(1, 512, Weights::SPREAD)
        .with_label("zone=mars")
        .expect("label");
    assert!(matches!(
        sched.place(&nowhere),
        Err(ScheduleError::NoHost(_))
    ));
    assert!(matches!(
        sched.place(&req(1, 1 << 30, Weights::PACK)),
        Err(ScheduleError::NoHost(_))
    ));
    let after = snapshot(&ledger);
    assert_eq!(before, after);

    let p = &s.pool();
    for (args, want) in [
        (
            vec!["schedule", "--vcpus", "0", "--memory", "1G"],
            "vcpus must be at least 1",
        ),
        (
            vec!["schedule", "--vcpus", "-2", "--memory", "1G"],
            "vcpus must be at least 1",
        ),
        (
            vec!["schedule", "--vcpus", "1", "--memory", "-1G"],
            "must be greater than zero",
        ),
        (
            vec![
                "schedule",
                "--vcpus",
                "1",
                "--memory",
                "1G",
                "--strategy",
                "best",
            ],
            "unknown strategy",
        ),
        (
            vec![
                "schedule", "--vcpus", "1", "--memory", "1G", "--label", "zone",
            ],
            "key=value",
        ),
        (
            vec![
                "schedule",
                "--vcpus",
                "1",
                "--memory",
                "1G",
                "--label",
                "zone=mars",
            ],
            "3 fail label zone=mars",
        ),
    ] {
        let out = pool_util::run(p, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    let after_cli = snapshot(&ledger);
    assert_eq!(before, after_cli);
}

fn index_follows_changes_from_other_connections(b: Backend) {
    let s = Scratch::with("follow", b);
    let ledger = pool(&s, &[("a", 1, 4096, 1.0, "a"), ("b", 1, 4096, 1.0, "a")]);
    let mut sched = Scheduler::new(ledger.clone());
    sched.refresh().expect("load");
    // Another connection (as another process would) fills a with a claim.
    let other = Ledger::open(Some(&s.pool())).expect("open");
    other
        .claim_on("a", "other", Amounts::new(4, 1, 0), None)
        .expect("claim");
    // Spread would prefer... either; only b can take 4 vCPUs now.
    assert_eq!(
        sched
            .place(&req(4, 1, Weights::SPREAD))
            .expect("place")
            .host,
        "b"
    );
    // A host added and one removed elsewhere are seen too.
    other
        .add_host(&HostSpec::new("c", 2, 4096, 10))
        .expect("add");
    other.store().remove_host("a", true).expect("remove");
    assert_eq!(
        sched
            .place(&req(4, 1, Weights::SPREAD))
            .expect("place")
            .host,
        "c"
    );
    let names: Vec<&str> = sched.hosts().iter().map(|h| h.spec.name.as_str()).collect();
    assert_eq!(names, ["b", "c"]);
    assert!(matches!(
        sched.place(&req(5, 1, Weights::SPREAD)),
        Err(ScheduleError::NoHost(_))
    ));
}

fn batches_are_durable_and_in_order(b: Backend) {
    let s = Scratch::with("batch", b);
    let ledger = pool(&s, &[("a", 2, 4096, 1.0, "a")]);
    let mut sched = Scheduler::new(ledger.clone());
    let reqs: Vec<Request> = (0..10)
        .map(|i| Request::new(&format!("v{i}"), Amounts::new(1, 1, 0)))
        .collect();
    let results = sched.place_batch(&reqs, false).expect("batch");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 8);
    assert!(results[8].is_err() && results[9].is_err());
    drop(sched);
    drop(ledger);
    let reopened = Ledger::open(Some(&s.pool())).expect("reopen");
    let names: Vec<String> = reopened
        .store()
        .allocations()
        .expect("a")
        .into_iter()
        .map(|a| a.vm_name)
        .collect();
    assert_eq!(names, (0..8).map(|i| format!("v{i}")).collect::<Vec<_>>());
}

/// Reading is not writing: `explain` (and the `refresh` under it) works while
/// another process holds the pool's write lock, follows a change made meanwhile by
/// someone else, and leaves the pool's generation where it was.
fn explain_reads_the_pool_without_writing_it(b: Backend) {
    let s = Scratch::with("explain-reads", b);
    let ledger = pool(&s, ABC);
    let mut sched = Scheduler::new(ledger.clone());
    sched.refresh().expect("first look");
    // Another process claims 31 of the 32 usable vCPUs (8 x 4.0) on a, then holds
    // the write lock.
    let other = Ledger::open(Some(&s.pool())).expect("open");
    other
        .claim_on("a", "theirs", Amounts::new(31, 1024, 0), None)
        .expect("claim");
    let generation = || {
        ledger
            .store()
            .hosts()
            .unwrap()
            .iter()
            .map(|h| h.generation)
            .max()
    };
    let before = generation();
    let holder = s.lock_writes();
    let t0 = std::time::Instant::now();
    let verdicts = sched
        .explain(&req(2, 2048, Weights::SPREAD))
        .expect("explain");
    // A write would have waited for the lock (up to 30 s) and then failed.
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    let a = &verdicts.iter().find(|(h, _)| h == "a").expect("a").1;
    assert!(format!("{a:?}").contains("Vcpus"), "a is full now: {a:?}");
    drop(holder);
    assert_eq!(generation(), before, "explain changed the pool");
}

/// One fit rule: for a host that fails several checks at once, the scheduler's
/// explanation and the ledger's refusal of a direct claim name the same one.
fn the_scheduler_and_the_ledger_give_the_same_reason(b: Backend) {
    use minivmm::pool::{PoolError, Resource};
    use minivmm::scheduler::Rejection;
    let s = Scratch::with("one-rule", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    // h: 4 vCPUs x 1.0, memory in steps of 512 MiB, at most 1 VM.
    let mut spec = HostSpec::new("h", 4, 8192, 100);
    spec.inventories[Resource::Vcpus.index()].ratio = 1.0;
    spec.inventories[Resource::MemoryMib.index()].step = Some(512);
    spec.max_vms = Some(1);
    ledger.add_host(&spec).expect("add");
    let mut sched = Scheduler::new(ledger.clone());
    // Empty host, 8 vCPUs (lacking) and 1000 MiB (not a step of 512): the limit.
    let r = Request::new("x", Amounts::new(8, 1000, 0));
    let verdict = sched.explain(&r).expect("explain").remove(0).1;
    assert!(
        matches!(
            verdict,
            Err(Rejection::Limit {
                resource: Resource::MemoryMib,
                ..
            })
        ),
        "{verdict:?}"
    );
    let claim = ledger
        .claim_on("h", "x", Amounts::new(8, 1000, 0), None)
        .unwrap_err();
    assert!(
        matches!(&claim, PoolError::Invalid(m) if m.contains("memory")),
        "{claim}"
    );
    // Full (1 VM, of group g), and the request is of group g: the VM count.
    ledger
        .claim_on_grouped("h", "first", Some("g"), Amounts::new(1, 512, 0), None)
        .expect("first");
    let r = Request::new("y", Amounts::new(1, 512, 0)).with_group("g");
    let verdict = sched.explain(&r).expect("explain").remove(0).1;
    assert!(
        matches!(verdict, Err(Rejection::MaxVms { max: 1 })),
        "{verdict:?}"
    );
    let claim = ledger
        .claim_on_grouped("h", "y", Some("g"), Amounts::new(1, 512, 0), None)
        .unwrap_err();
    assert!(
        matches!(claim, PoolError::HostFull { max: 1, .. }),
        "{claim}"
    );
}

crate::conformance!(
    spread_picks_the_most_free_after_placement,
    pack_picks_the_fullest_host_that_fits,
    cost_rule_is_argmax_of_demand_times_free_over_cost,
    ties_break_by_host_name,
    weights_combine,
    fit_counts_reserved_and_ratios_exactly,
    filters_disabled_labels_group_max_vms_and_limits,
    bad_requests_are_refused_and_change_nothing,
    index_follows_changes_from_other_connections,
    batches_are_durable_and_in_order,
    explain_reads_the_pool_without_writing_it,
    the_scheduler_and_the_ledger_give_the_same_reason,
);
