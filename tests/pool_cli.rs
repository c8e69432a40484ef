//! The `pool` and `schedule` argument definitions, as main.rs mounts them.

use clap::{CommandFactory, Parser, Subcommand};
use minivmm::pool::cli::{PoolArgs, PoolCommand};
use minivmm::scheduler::cli::ScheduleArgs;

/// The shape main.rs gives them: one variant each.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Pool(PoolArgs),
    Schedule(ScheduleArgs),
}

#[test]
fn definitions_are_valid() {
    Cli::command().debug_assert();
}

#[test]
fn pool_and_json_work_before_or_after_the_subcommand() {
    for args in [
        &["minivmm", "pool", "--pool", "/tmp/p.db", "--json", "list"][..],
        &["minivmm", "pool", "list", "--pool", "/tmp/p.db", "--json"][..],
    ] {
        let cli = Cli::try_parse_from(args).expect("parses");
        let Command::Pool(p) = cli.command else {
            panic!("not pool")
        };
        assert!(matches!(p.command, PoolCommand::List));
        assert_eq!(
            p.location.pool.as_deref(),
            Some(std::path::Path::new("/tmp/p.db"))
        );
        assert!(p.location.json);
    }
    let cli = Cli::try_parse_from([
        "minivmm", "schedule", "--vcpus", "2", "--memory", "4G", "--pool", "/x", "--json",
    ])
    .expect("parses");
    let Command::Schedule(s) = cli.command else {
        panic!("not schedule")
    };
    assert_eq!(
        (s.vcpus, s.memory.as_str(), s.location.json),
        (2, "4G", true)
    );
}
