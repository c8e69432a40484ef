//! The `minivmm` command: a thin layer over the library.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use minivmm::outln;
use minivmm::vmm::{config, hostfile, status};
use minivmm::{End, Outcome, SerialIn, SerialOut, StopReason, Vm, VmConfig};

/// minivmm: boot a kernel in a KVM virtual machine.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_STATUS_HELP, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXIT_STATUS_HELP: &str = "\
Exit status of `minivmm run`:
  0        the guest reset (reboot) or powered off
  (v<<1)|1 the guest wrote v to isa-debug-exit (port 0xf4), as QEMU does
  120      the guest triple-faulted
  122      KVM could not run the guest (entry failure, emulation failure)
  124      --timeout elapsed
  125      minivmm failed (bad input, no KVM, refused by the ledger)
  128+n    stopped by signal n (130 also for the Ctrl-A x escape)";

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and run it until it ends.
    Run(RunArgs),
    /// The host-pool ledger: hosts, inventories, allocations.
    Pool(minivmm::pool::cli::PoolArgs),
    /// Place a VM on the best host of the pool and claim its resources there.
    Schedule(minivmm::scheduler::cli::ScheduleArgs),
    /// Run a command in a fresh VM on this machine's files, as a CI step: its
    /// output, and its exit status, become this process's.
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// Check whether this host can run VMs, and which KVM it has.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

const EXEC_HELP: &str = "\
The guest boots the kernel (default: this machine's, /boot/vmlinuz-$(uname -r), with
its modules from /lib/modules) with minivmm's own init. Its root file system is this
host's /, shared read-only, under a tmpfs overlay: the command may write anywhere,
and the host keeps none of it, except in the current directory and each --rw DIR,
which are shared read-write at the same path. With --share, only the directories
given (and those two) are shared, not /. The command runs in the current directory,
with this process's environment (and --env), uid and gids; stdin is empty.

Example:
  minivmm exec --vcpus 4 --memory 2G --timeout 10m -- make -j4 test

Exit status of `minivmm exec`:
  the command's own, or 128+n when signal n killed it
  123      the guest ended without running the command to its end (kernel panic,
           init failure); the reason and the console's last lines are printed
  124      --timeout elapsed
  125      minivmm failed (bad input, no KVM, PVM, refused by the ledger)
  126      the command could not be executed
  127      the command was not found";

/// `minivmm exec` flags.
#[derive(clap::Args)]
#[command(args_override_self = true)]
struct ExecArgs {
    /// Kernel image (bzImage or ELF) [default: /boot/vmlinuz-$(uname -r)].
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The kernel's module tree (or a directory of .ko files), searched for
    /// virtio_mmio, virtio_console, fuse, virtiofs and overlay [default with the
    /// default kernel: /lib/modules/$(uname -r); with --kernel: none, the kernel
    /// must have them built in].
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// Number of vCPUs (what `nproc` says in the guest).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Guest memory: 512M, 2G; a bare number is MiB.
    #[arg(long, default_value = "1G", value_parser = parse_memory)]
    memory: u64,
    /// Stop the VM after this long (30s, 10m) and exit 124.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Share only this host directory (repeatable; `,ro` read-only) instead of
    /// the whole of /, at the same path.
    #[arg(long, value_name = "DIR[,ro]", value_parser = parse_share)]
    share: Vec<config::ShareSpec>,
    /// Share this directory read-write at the same path (repeatable), like the
    /// current directory.
    #[arg(long, value_name = "DIR")]
    rw: Vec<PathBuf>,
    /// Set an environment variable for the command (repeatable).
    #[arg(long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Show the guest kernel's console on stderr (by default it is kept and shown
    /// only when the guest fails).
    #[arg(long, conflicts_with = "console_file")]
    console: bool,
    /// Also write the guest kernel's console to FILE (named in the JSON summary).
    #[arg(long, value_name = "FILE")]
    console_file: Option<PathBuf>,
    /// Write a one-line JSON summary to FILE (stdout is the command's).
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Pool file for admission (see `minivmm run --help`).
    #[arg(long, value_name = "PATH", conflicts_with = "no_ledger")]
    pool: Option<PathBuf>,
    /// Run without claiming vCPUs and memory in the ledger.
    #[arg(long)]
    no_ledger: bool,
    #[command(flatten)]
    sandbox: Sandbox,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// The `--seccomp` flag of `run` and `exec`.
#[derive(clap::Args)]
struct Sandbox {
    /// What a forbidden system call does. Every thread of minivmm runs under a
    /// seccomp allow-list of its own (vCPUs, virtio, console, stdin, signals, and
    /// the main thread once the VM runs): strict (report the call and exit 125), log
    /// (allow it; the kernel logs it), off (no filters).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "strict",
        env = "MINIVMM_SECCOMP"
    )]
    seccomp: minivmm::vmm::seccomp::SeccompMode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SerialMode {
    /// Console on this terminal: guest output to stdout, stdin to the guest.
    Stdio,
    /// No console at all.
    None,
}

/// Later flags override earlier ones (`--vcpus 2 ... --vcpus 4` gives 4), so wrapper
/// scripts can set defaults that the user's own flags replace.
#[derive(clap::Args)]
#[command(args_override_self = true)]
struct RunArgs {
    /// Kernel image: bzImage, ELF vmlinux with a PVH note, or x86-64 ELF.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk (e.g. a gzipped cpio initramfs).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory: 512M, 2G, 1536M; a bare number is MiB.
    #[arg(long, default_value = "128M", value_parser = parse_memory)]
    memory: u64,
    /// Stop the VM after this long (30s, 2m, 500ms; more than zero) and exit 124.
    /// Without it the VM runs until it ends.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Write the guest console to FILE instead of the terminal.
    #[arg(long, value_name = "FILE", conflicts_with = "serial")]
    serial_out: Option<PathBuf>,
    /// Console mode when no --serial-out is given.
    #[arg(long, value_enum, default_value_t = SerialMode::Stdio)]
    serial: SerialMode,
    /// After the VM ends, print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Write the JSON summary to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Log every VM exit as it happens, and a table of exits at the end.
    #[arg(long)]
    trace_exits: bool,
    /// Leave out the in-kernel PIT timer: quicker start and end for tiny guests that
    /// never use it (Linux needs it).
    #[arg(long)]
    no_pit: bool,
    /// A raw disk image as a virtio-blk disk (repeatable; the guest sees them as
    /// /dev/vda, /dev/vdb, ... in this order). `,ro` makes it read-only. The image is
    /// locked while the VM runs, and its size is claimed in the ledger as disk.
    #[arg(long, value_name = "FILE[,ro]", value_parser = parse_disk)]
    disk: Vec<config::DiskSpec>,
    /// Share a host directory with the guest over virtio-fs (repeatable); the guest
    /// mounts it with `mount -t virtiofs TAG /mnt`. TAG defaults to share0, share1,
    /// ...; `,ro` refuses every change from the guest.
    #[arg(long, value_name = "DIR[,tag=TAG][,ro]", value_parser = parse_share)]
    share: Vec<config::ShareSpec>,
    /// Give the guest a virtio-rng entropy device (fed by the host's getrandom).
    #[arg(long)]
    rng: bool,
    #[command(flatten)]
    sandbox: Sandbox,
    /// Name of the VM in the ledger [default: KERNEL-FILE-NAME-PID].
    #[arg(long)]
    name: Option<String>,
    /// Pool file for admission [default: $MINIVMM_POOL, else
    /// $XDG_STATE_HOME/minivmm/pool.db, else ~/.local/state/minivmm/pool.db].
    #[arg(long, value_name = "PATH", conflicts_with = "no_ledger")]
    pool: Option<PathBuf>,
    /// Run without claiming vCPUs and memory in the ledger.
    #[arg(long)]
    no_ledger: bool,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    config::parse_memory_mib(s).map_err(|e| e.to_string())
}

fn parse_disk(s: &str) -> Result<config::DiskSpec, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

fn parse_share(s: &str) -> Result<config::ShareSpec, String> {
    s.parse().map_err(|e: config::ConfigError| e.to_string())
}

/// Parses --timeout. Zero is refused as such, not as "cannot parse": timeout(1) reads
/// 0 as "no time limit", but a CI job whose computed limit came out as 0 must not run
/// a VM for ever, and a VM cannot usefully be stopped before it starts. No limit is
/// written by leaving the flag out.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s).map_err(|e| {
        if is_zero_duration(s) {
            "the timeout must be positive: leave --timeout out to run without a time limit"
                .to_string()
        } else {
            e.to_string()
        }
    })
}

/// True for a duration written as zero in any unit `config::parse_duration` takes
/// ("0", "0s", "0.0ms", "0m"...).
fn is_zero_duration(s: &str) -> bool {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    matches!(unit.trim(), "" | "s" | "sec" | "ms" | "m" | "min" | "h")
        && num.parse::<f64>().is_ok_and(|n| n == 0.0)
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::USAGE as u8
            } else {
                0
            });
        }
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    logger.format_timestamp_micros();
    if matches!(&cli.command, Command::Run(a) if a.trace_exits) {
        // --trace-exits asks for the per-exit lines, which are logged at info level.
        logger.filter_module("minivmm::vmm::vcpu", log::LevelFilter::Info);
    }
    logger.init();
    let code = match cli.command {
        Command::Check { json } => check(json),
        Command::Run(args) => run(args, started),
        Command::Exec(args) => exec(args, started),
        Command::Pool(args) => minivmm::pool::cli::run(args).unwrap_or_else(|e| {
            eprintln!("minivmm: {e}");
            status::VMM_ERROR
        }),
        Command::Schedule(args) => minivmm::scheduler::cli::run(args).unwrap_or_else(|e| {
            eprintln!("minivmm: {e}");
            status::VMM_ERROR
        }),
    };
    // A reader that left stdout early (`minivmm pool list | head -1`) or a full disk
    // behind it decides the status now that the command's work is done.
    ExitCode::from(minivmm::output::exit_status(code) as u8)
}

fn check(json: bool) -> i32 {
    let report = minivmm::check::run();
    if json {
        outln!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        for i in &report.items {
            outln!(
                "{} {:<24} {}",
                if i.ok { "ok  " } else { "FAIL" },
                i.name,
                i.detail
            );
        }
        outln!(
            "\n{}",
            if report.ok {
                "This host can run minivmm VMs."
            } else {
                "This host cannot run minivmm VMs: fix the FAIL lines above."
            }
        );
    }
    if report.ok { 0 } else { 1 }
}

fn run(args: RunArgs, started: Instant) -> i32 {
    let Ok(json_file) = open_json_out(args.json_out.as_deref(), "minivmm") else {
        return status::VMM_ERROR;
    };
    let json_file = json_file.as_ref();
    let json_to_stdout = args.json && args.json_out.is_none();
    let serial_out = match (&args.serial_out, args.serial) {
        (Some(p), _) => SerialOut::File(p.clone()),
        (None, SerialMode::None) => SerialOut::None,
        // With the JSON summary on stdout, keep the console off it so the summary
        // stays machine-readable; it goes to stderr instead.
        (None, SerialMode::Stdio) if json_to_stdout => {
            SerialOut::Writer(Box::new(std::io::stderr()))
        }
        (None, SerialMode::Stdio) => SerialOut::Stdout,
    };
    let serial_in = if args.serial == SerialMode::Stdio {
        SerialIn::Stdin
    } else {
        SerialIn::None
    };
    let config = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        timeout: args.timeout,
        serial_out,
        serial_in,
        trace_exits: args.trace_exits,
        pit: !args.no_pit,
        disks: args.disk.clone(),
        shares: args.share.clone(),
        rng: args.rng,
        virtio_console: None,
        seccomp: args.sandbox.seccomp,
    };
    match admit_and_run(config, || admit(&args)) {
        Ok(outcome) => {
            report(&args, json_file, &outcome, started);
            outcome.exit_status()
        }
        Err(RunError::Stopped(n)) => {
            eprintln!("minivmm: stopped by signal {n} before the VM started");
            let status = 128 + n;
            if args.json || args.json_out.is_some() {
                let line = serde_json::json!({
                    "reason": "stopped",
                    "error": null,
                    "exit_code": status,
                });
                emit_json(&args, json_file, &line.to_string());
            }
            status
        }
        Err(RunError::Failed(e)) => {
            eprintln!("minivmm: {e}");
            if args.json || args.json_out.is_some() {
                let line = serde_json::json!({
                    "reason": "vmm-error",
                    "error": e,
                    "exit_code": status::VMM_ERROR,
                });
                emit_json(&args, json_file, &line.to_string());
            }
            status::VMM_ERROR
        }
    }
}

/// `minivmm exec`: plans the VM (minivmm::exec), admits and runs it like `run`,
/// and exits with the command's status.
fn exec(args: ExecArgs, started: Instant) -> i32 {
    let Ok(json_file) = open_json_out(args.json_out.as_deref(), "minivmm exec") else {
        return status::VMM_ERROR;
    };
    let req = minivmm::exec::Request {
        kernel: args.kernel.clone(),
        modules: args.modules.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory,
        timeout: args.timeout,
        shares: args.share.clone(),
        rw: args.rw.clone(),
        env: args.env.clone(),
        console_to_stderr: args.console,
        console_file: args.console_file.clone(),
        command: args.command.clone(),
    };
    let (mut config, pending) = match minivmm::exec::plan(&req) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("minivmm exec: {e}");
            return status::VMM_ERROR;
        }
    };
    config.seccomp = args.sandbox.seccomp;
    if pending.built_initramfs {
        log::info!("exec: built the initramfs for this kernel (cached for the next runs)");
    }
    let kernel = config.kernel.clone();
    let admit = || {
        if args.no_ledger {
            return Ok(None);
        }
        let pool = args.pool.as_deref();
        admit_vm(None, Path::new("exec"), args.vcpus, args.memory, &[], pool)
    };
    let (status, json) = match admit_and_run(config, admit) {
        Ok(outcome) => {
            let f = pending.finish(&outcome);
            if let Some(r) = &f.reason {
                eprintln!("minivmm exec: {r}");
            }
            if let Some(t) = &f.console_tail {
                eprintln!("--- the guest's console, last lines ---\n{t}\n---");
            }
            let mut j = summary(&outcome, started);
            j["exit_code"] = f.status.into();
            j["vm_exit_code"] = outcome.exit_status().into();
            j["reason"] = f.reason.clone().unwrap_or_else(|| "exited".into()).into();
            j["console_file"] = args
                .console_file
                .as_ref()
                .map(|p| p.display().to_string())
                .into();
            (f.status, j)
        }
        Err(RunError::Stopped(n)) => {
            eprintln!("minivmm exec: stopped by signal {n} before the VM started");
            (
                128 + n,
                serde_json::json!({"reason": "stopped", "exit_code": 128 + n}),
            )
        }
        Err(RunError::Failed(e)) => {
            eprintln!("minivmm exec: {e} (kernel {})", kernel.display());
            (
                status::VMM_ERROR,
                serde_json::json!({"reason": "vmm-error", "error": e, "exit_code": status::VMM_ERROR}),
            )
        }
    };
    if let Some(mut f) = json_file.as_ref()
        && let Err(e) = writeln!(f, "{json}")
    {
        eprintln!("minivmm exec: cannot write the JSON summary: {e}");
    }
    status
}

/// Opens --json-out now, without waiting, and not when the VM has ended: a FIFO
/// nobody reads would block that open for good, with the signals blocked. Err
/// (after saying why) when it cannot be opened.
fn open_json_out(path: Option<&Path>, who: &str) -> Result<Option<File>, ()> {
    match path.map(hostfile::create_output) {
        None => Ok(None),
        Some(Ok(f)) => Ok(Some(f)),
        Some(Err(e)) => {
            let path = path.unwrap_or(Path::new("")).display();
            eprintln!("{who}: cannot write the JSON summary to {path}: {e}");
            Err(())
        }
    }
}

/// Validates `config`, claims its resources with `admit`, builds the VM and runs
/// it, with every catchable signal stopping it cleanly (see [`signals`]).
fn admit_and_run(
    config: VmConfig,
    admit: impl FnOnce() -> Result<Option<minivmm::pool::Claim>, String>,
) -> Result<Outcome, RunError> {
    let signals = signals::watch(config.seccomp).map_err(RunError::Failed)?;
    let stopped = || signals.received().map(RunError::Stopped);
    config
        .validate()
        .map_err(|e| RunError::Failed(e.to_string()))?;
    // Admission: the VM's vCPUs and memory are claimed on this host before the VM
    // exists, and released when `_claim` drops, however the VM ends. A signal makes
    // a wait for a locked pool give up: it is the reason then, not the lock.
    let _claim = admit().map_err(|e| stopped().unwrap_or(RunError::Failed(e)))?;
    if let Some(e) = stopped() {
        return Err(e);
    }
    let mut vm = Vm::new(config).map_err(|e| RunError::Failed(e.to_string()))?;
    // Once the VM's threads run, this one only waits, tears down, releases, reports.
    vm.confine_caller();
    // A signal that came while the VM was being built stops it at once.
    signals.attach(vm.stop_handle());
    vm.run().map_err(|e| RunError::Failed(e.to_string()))
}

/// Why `run` ended without an [`Outcome`].
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// minivmm could not build or run the VM (status 125), with the message.
    #[error("{0}")]
    Failed(String),
    /// A signal (its number) stopped minivmm before the VM ran (status 128 + n).
    #[error("stopped by signal {0} before the VM started")]
    Stopped(i32),
}

fn admit(args: &RunArgs) -> Result<Option<minivmm::pool::Claim>, String> {
    if args.no_ledger {
        return Ok(None);
    }
    admit_vm(
        args.name.as_deref(),
        &args.kernel,
        args.vcpus,
        args.memory,
        &args.disk,
        args.pool.as_deref(),
    )
}

/// Claims a VM's vCPUs, memory and disks on this host in the ledger; the claim is
/// released when it drops.
fn admit_vm(
    name: Option<&str>,
    kernel: &Path,
    vcpus: u32,
    memory: u64,
    disks: &[config::DiskSpec],
    pool: Option<&Path>,
) -> Result<Option<minivmm::pool::Claim>, String> {
    let name = name.map(str::to_string).unwrap_or_else(|| {
        let stem = kernel.file_name().unwrap_or_default().to_string_lossy();
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{stem}-{}", std::process::id())
    });
    let ledger = minivmm::pool::Ledger::open(pool).map_err(|e| {
        format!("cannot open the pool ledger: {e} (give --pool PATH, or run with --no-ledger)")
    })?;
    // The disks' sizes, rounded up to whole GiB. An image that cannot be read is
    // counted as 0 here and refused, with the reason, when the VM is built.
    let disk_bytes: u64 = disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .sum();
    let disk_gib = disk_bytes.div_ceil(1 << 30);
    ledger.claim_local(&name, vcpus, memory, disk_gib).map(Some).map_err(|e| {
        // A pool this run created and could not use is not left behind, empty.
        ledger.discard_if_unused();
        format!(
            "the ledger refused the VM: {e}. See `minivmm pool status`; raise this host's capacity with `minivmm pool set-host`, or run with --no-ledger (pool: {})",
            ledger.path().display()
        )
    })
}

/// Prints what the user needs after the VM ended: a failure report on stderr, the
/// exit table with --trace-exits, the JSON line with --json.
fn report(args: &RunArgs, json_file: Option<&File>, o: &Outcome, started: Instant) {
    match &o.end {
        End::GuestError(f) => eprintln!("minivmm: KVM could not run the guest any further:\n{f}"),
        End::VmmBug(what) => eprintln!(
            "minivmm: internal error, not the guest's: {what}. This is a minivmm bug; please report it with the command line and RUST_LOG=debug output"
        ),
        End::Timeout => eprintln!(
            "minivmm: timeout: the VM was stopped after {:?}",
            o.run_time
        ),
        End::TripleFault => eprintln!("minivmm: the guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
        End::Stopped(StopReason::Escape) => eprintln!("minivmm: stopped (Ctrl-A x)"),
        End::Stopped(StopReason::Signal(n)) => eprintln!("minivmm: stopped by signal {n}"),
        _ => log::info!("VM ended: {:?}", o.end),
    }
    if args.trace_exits {
        eprintln!(
            "{:<12} {:>10} {:>12} {:>10}",
            "exit", "count", "time", "avg"
        );
        for k in minivmm::vmm::ExitKind::ALL {
            let (n, t) = (o.exits.count[k as usize], o.exits.time[k as usize]);
            if n > 0 {
                eprintln!(
                    "{:<12} {n:>10} {t:>12.3?} {:>10.3?}",
                    k.name(),
                    t / n as u32
                );
            }
        }
    }
    if args.json || args.json_out.is_some() {
        emit_json(args, json_file, &summary(o, started).to_string());
    }
}

fn summary(o: &Outcome, started: Instant) -> serde_json::Value {
    let exits: serde_json::Map<String, serde_json::Value> = minivmm::vmm::ExitKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), o.exits.count[*k as usize].into()))
        .collect();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    serde_json::json!({
        "reason": o.end.name(),
        "exit_code": o.exit_status(),
        "debug_exit_value": match o.end { End::DebugExit(v) => Some(v), _ => None },
        "wall_ms": ms(started.elapsed()),
        "build_ms": ms(o.build_time),
        "run_ms": ms(o.run_time),
        "teardown_ms": ms(o.teardown_time),
        "first_output_ms": o.first_output.map(ms),
        "console_bytes": o.console_bytes,
        "console_dropped_bytes": o.console_dropped,
        "vcpus": o.vcpus,
        "memory_mib": o.memory_mib,
        "kernel_format": o.format,
        "exits": exits,
        "exits_total": o.exits.total(),
        "devices": o.devices,
        "error": match &o.end {
            End::GuestError(f) => Some(f.to_string()),
            End::VmmBug(what) => Some(what.clone()),
            _ => None,
        },
    })
}

/// Writes the JSON line to `json_file` (--json-out, opened by `run`) or stdout.
fn emit_json(args: &RunArgs, json_file: Option<&File>, line: &str) {
    match json_file {
        Some(mut f) => {
            if let Err(e) = writeln!(f, "{line}") {
                let path = args.json_out.as_deref().unwrap_or(Path::new("")).display();
                eprintln!("minivmm: cannot write {path}: {e}");
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

/// Every signal whose default action would end the process and that a process may
/// catch stops the VM cleanly instead (the terminal is restored and the ledger claim
/// released): they are blocked in every thread and received by one thread with
/// sigwait(2), and the VM ends with status 128 + the signal's number.
///
/// Left out, and why:
/// - SIGKILL and SIGSTOP cannot be caught or blocked;
/// - SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP and SIGSYS report a fault of the thread
///   that gets them (a blocked one is forced through by the kernel anyway), and
///   SIGABRT is abort(3)'s, which unblocks it: they must stay fatal;
/// - SIGPIPE is ignored by the Rust runtime from the start (SIG_IGN), so a write to a
///   closed pipe fails with EPIPE instead (`minivmm::output` turns that into 141 for
///   `pool` and `check`); it does not end minivmm;
/// - the real-time signal that kicks vCPU threads out of KVM_RUN
///   ([`minivmm::vmm::kick_signal`]), which must reach them.
///
/// SIGCHLD, SIGURG, SIGWINCH and SIGCONT are ignored by default; SIGTSTP, SIGTTIN and
/// SIGTTOU stop the process rather than end it: none of them is taken.
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::{Arc, Mutex};

    use minivmm::{StopHandle, StopReason};

    /// The standard signals whose default action is to terminate the process (with or
    /// without a core dump), per signal(7), less those explained above.
    const TERMINATING: [libc::c_int; 13] = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
    ];

    /// [`TERMINATING`], SIGPWR, and the real-time signals SIGRTMIN..=SIGRTMAX (which
    /// terminate by default too) but the vCPU kick.
    pub fn all() -> Vec<libc::c_int> {
        let kick = minivmm::vmm::kick_signal();
        let realtime = (libc::SIGRTMIN()..=libc::SIGRTMAX()).filter(|&s| s != kick);
        TERMINATING
            .into_iter()
            .chain([libc::SIGPWR])
            .chain(realtime)
            .collect()
    }

    fn set() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data initialised by sigemptyset; sigaddset only
        // sets bits in it (and refuses numbers glibc reserves for itself).
        unsafe {
            let mut s: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut s);
            for sig in all() {
                libc::sigaddset(&mut s, sig);
            }
            s
        }
    }

    /// Blocks the signals in this thread and every thread it starts later.
    fn block() -> Result<(), String> {
        let s = set();
        // SAFETY: valid signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("cannot block signals: errno {rc}"))
        }
    }

    /// What the signal thread shares with `run`.
    #[derive(Default)]
    struct Shared {
        /// The first signal received; 0 while none was.
        received: AtomicI32,
        /// The VM to stop, once there is one.
        vm: Mutex<Option<StopHandle>>,
    }

    /// The signal thread, from before admission to the end of the VM.
    pub struct Watcher(Arc<Shared>);

    /// Blocks the signals, in this thread and every thread started later, and starts
    /// the thread that receives them with sigwait(2). From then on a signal is never
    /// lost: before the VM exists it makes waits for a locked pool give up
    /// ([`minivmm::pool::interrupt_waits`]) and is remembered for [`Watcher::attach`];
    /// after, it stops the VM.
    pub fn watch(mode: minivmm::vmm::seccomp::SeccompMode) -> Result<Watcher, String> {
        use minivmm::vmm::seccomp::{ThreadKind, apply, filter};
        let prog = filter(ThreadKind::Signals, mode).map_err(|e| e.to_string())?;
        block()?;
        let shared = Arc::new(Shared::default());
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // This thread must receive signals whatever happens: a filter the
                // kernel refuses is reported, not fatal (it runs no guest code).
                if let Err(e) = apply(ThreadKind::Signals, prog.as_ref()) {
                    log::error!("signal thread: {e}");
                }
                let s = set();
                let mut sig = 0;
                // SAFETY: valid set and out-pointer.
                if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                    return;
                }
                thread.received.store(sig, Ordering::SeqCst);
                minivmm::pool::interrupt_waits();
                let vm = thread.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(vm) = vm {
                    vm.stop(StopReason::Signal(sig));
                }
            })
            .map(|_| Watcher(shared))
            .map_err(|e| format!("cannot start the signal thread: {e}"))
    }

    impl Watcher {
        /// The signal received so far, if any.
        pub fn received(&self) -> Option<i32> {
            Some(self.0.received.load(Ordering::SeqCst)).filter(|&n| n != 0)
        }

        /// Hands the VM to the signal thread; stops it at once if a signal came
        /// already. (The thread records the signal before it takes the lock, and this
        /// looks under the lock, so a signal is never missed between the two.)
        pub fn attach(&self, stop: StopHandle) {
            let mut vm = self.0.vm.lock().unwrap_or_else(|p| p.into_inner());
            match self.received() {
                Some(sig) => stop.stop(StopReason::Signal(sig)),
                None => *vm = Some(stop),
            }
        }
    }
}
