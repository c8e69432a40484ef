//! The `minivmm` command: a thin layer over the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use minivmm::vmm::{config, status};
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
    /// Check whether this host can run VMs, and which KVM it has.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
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
    /// Stop the VM after this long (30s, 2m, 500ms) and exit 124.
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

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s).map_err(|e| e.to_string())
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
        Command::Pool(args) => minivmm::pool::cli::run(args).unwrap_or_else(|e| {
            eprintln!("minivmm: {e}");
            status::VMM_ERROR
        }),
        Command::Schedule(args) => minivmm::scheduler::cli::run(args).unwrap_or_else(|e| {
            eprintln!("minivmm: {e}");
            status::VMM_ERROR
        }),
    };
    ExitCode::from(code as u8)
}

fn check(json: bool) -> i32 {
    let report = minivmm::check::run();
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        for i in &report.items {
            println!(
                "{} {:<24} {}",
                if i.ok { "ok  " } else { "FAIL" },
                i.name,
                i.detail
            );
        }
        println!(
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
    };
    let result = signals::block().and_then(|()| {
        config.validate().map_err(|e| e.to_string())?;
        // Admission: the VM's vCPUs and memory are claimed on this host before the VM
        // exists, and released when `_claim` drops, however the VM ends.
        let _claim = admit(&args).map_err(|e| e.to_string())?;
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        signals::forward_to(vm.stop_handle());
        vm.run().map_err(|e| e.to_string())
    });
    match result {
        Ok(outcome) => {
            report(&args, &outcome, started);
            outcome.exit_status()
        }
        Err(e) => {
            eprintln!("minivmm: {e}");
            if args.json || args.json_out.is_some() {
                let line = serde_json::json!({
                    "reason": "vmm-error",
                    "error": e,
                    "exit_code": status::VMM_ERROR,
                });
                emit_json(&args, &line.to_string());
            }
            status::VMM_ERROR
        }
    }
}

fn admit(args: &RunArgs) -> Result<Option<minivmm::pool::Claim>, String> {
    if args.no_ledger {
        return Ok(None);
    }
    let name = args.name.clone().unwrap_or_else(|| {
        let stem = args
            .kernel
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
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
    let ledger = minivmm::pool::Ledger::open(args.pool.as_deref()).map_err(|e| {
        format!("cannot open the pool ledger: {e} (give --pool PATH, or run with --no-ledger)")
    })?;
    ledger.claim_local(&name, args.vcpus, args.memory).map(Some).map_err(|e| {
        format!(
            "the ledger refused the VM: {e}. See `minivmm pool status`; raise this host's capacity with `minivmm pool set-host`, or run with --no-ledger (pool: {})",
            ledger.path().display()
        )
    })
}

/// Prints what the user needs after the VM ended: a failure report on stderr, the
/// exit table with --trace-exits, the JSON line with --json.
fn report(args: &RunArgs, o: &Outcome, started: Instant) {
    match &o.end {
        End::GuestError(f) => eprintln!("minivmm: KVM could not run the guest any further:\n{f}"),
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
        emit_json(args, &summary(o, started).to_string());
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
        "vcpus": o.vcpus,
        "memory_mib": o.memory_mib,
        "kernel_format": o.format,
        "exits": exits,
        "exits_total": o.exits.total(),
        "error": match &o.end { End::GuestError(f) => Some(f.to_string()), _ => None },
    })
}

fn emit_json(args: &RunArgs, line: &str) {
    match &args.json_out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, format!("{line}\n")) {
                eprintln!("minivmm: cannot write {}: {e}", path.display());
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP stop the VM cleanly (the terminal is restored and the
/// ledger claim released) instead of killing the process: they are blocked in every
/// thread and received by one thread with sigwait.
mod signals {
    use minivmm::{StopHandle, StopReason};

    fn set() -> libc::sigset_t {
        // SAFETY: sigset_t is plain data initialised by sigemptyset.
        unsafe {
            let mut s: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut s);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut s, sig);
            }
            s
        }
    }

    /// Blocks the signals in this thread and every thread it starts later.
    pub fn block() -> Result<(), String> {
        let s = set();
        // SAFETY: valid signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("cannot block signals: errno {rc}"))
        }
    }

    /// Starts the thread that turns a signal into a stop request.
    pub fn forward_to(stop: StopHandle) {
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let s = set();
                let mut sig = 0;
                // SAFETY: valid set and out-pointer.
                if unsafe { libc::sigwait(&s, &mut sig) } == 0 {
                    stop.stop(StopReason::Signal(sig));
                }
            });
    }
}
