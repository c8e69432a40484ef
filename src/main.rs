//! The `minivmm` command: a thin layer over the library.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use minivmm::launch;
use minivmm::outln;
use minivmm::vmm::{config, hostfile, status};
use minivmm::{End, Outcome, SerialIn, SerialOut, StopReason, VmConfig};

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
    /// The host agent: run VMs on request, behind an HTTP/JSON API on a Unix socket.
    #[command(after_help = SERVE_HELP)]
    Serve(minivmm::api::cli::ServeArgs),
    /// Create, list, show, stop and delete the agent's VMs, and read their consoles.
    Vm(minivmm::api::cli::VmArgs),
    /// Check whether this host can run VMs, and which KVM it has.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

const SERVE_HELP: &str = "\
Each VM runs in a `minivmm run` process of its own (its own session: it outlives
the agent), which claims its resources in the pool's ledger and releases them when
it ends. Killed or restarted, the agent adopts the VMs still running from
--state-dir. Whoever can connect to the socket (mode 0600) can run VMs with the
files in the --images directories, and nothing else.

Example:
  minivmm serve --images ~/images &
  minivmm vm create web --kernel bzImage --initrd initrd.cpio.gz --vcpus 2 --memory 1G
  minivmm vm list
  curl --unix-socket ~/.local/state/minivmm/agent.sock http://x/v1/vms";

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
    /// Guest memory: 512M, 1.5G, 2G; a bare number is MiB.
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
    chip: Chip,
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

/// The `--irqchip` flag of `run` and `exec`.
#[derive(clap::Args)]
struct Chip {
    /// Where the interrupt controllers and the PIT live: `split` (the LAPICs in KVM;
    /// the IOAPIC and the PIT in minivmm, no 8259 PICs: faster to create and to tear
    /// down) or `kernel` (KVM's PICs, IOAPIC, LAPICs and PIT).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "split",
        env = "MINIVMM_IRQCHIP"
    )]
    irqchip: minivmm::vmm::IrqChip,
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
    /// Guest memory: 512M, 1.5G, 2G; a bare number is MiB.
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
    /// Log every VM exit as it happens, and a table of exits at the end. Console
    /// writes then exit one by one instead of going through KVM's coalesced ring.
    #[arg(long)]
    trace_exits: bool,
    /// Leave out the 8254 PIT timer (ports 0x40-0x43 and 0x61 then read as nothing
    /// there): for guests that never use it. Quicker with `--irqchip kernel`, where
    /// KVM's PIT has a kernel thread to start and stop.
    #[arg(long)]
    no_pit: bool,
    #[command(flatten)]
    chip: Chip,
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
    /// Anti-affinity group: the ledger refuses the VM on a host that already holds
    /// a VM of this group.
    #[arg(long, value_name = "GROUP", conflicts_with = "no_ledger")]
    group: Option<String>,
    /// Pool for admission: an SQLite file or a postgres:// URL [default: $MINIVMM_POOL,
    /// else $XDG_STATE_HOME/minivmm/pool.db, else ~/.local/state/minivmm/pool.db].
    #[arg(long, value_name = "PATH", conflicts_with = "no_ledger")]
    pool: Option<PathBuf>,
    /// Run without claiming vCPUs and memory in the ledger.
    #[arg(long)]
    no_ledger: bool,
    /// For `minivmm serve`: write "running" to this open file descriptor (a pipe)
    /// once the vCPUs run, then close it.
    #[arg(long, value_name = "FD", hide = true)]
    ready_fd: Option<i32>,
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
        Command::Serve(args) => minivmm::api::cli::serve(args),
        Command::Vm(args) => minivmm::api::cli::vm(args),
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
                match (i.ok, i.warn) {
                    (false, _) => "FAIL",
                    (true, true) => "warn",
                    (true, false) => "ok  ",
                },
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
        irqchip: args.chip.irqchip,
        disks: args.disk.clone(),
        shares: args.share.clone(),
        rng: args.rng,
        virtio_console: None,
        seccomp: args.sandbox.seccomp,
    };
    let ready = match args.ready_fd.map(ready_pipe).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("minivmm: {e}");
            return status::VMM_ERROR;
        }
    };
    let on_start = move || {
        if let Some(mut f) = ready
            && let Err(e) = f.write_all(b"running\n")
        {
            log::warn!("--ready-fd: {e}");
        }
    };
    match launch::admit_and_run(config, || admit(&args), on_start) {
        Ok(outcome) => {
            report(&args, json_file, &outcome, started);
            outcome.exit_status()
        }
        Err(e) => {
            eprintln!("minivmm: {e}");
            if args.json || args.json_out.is_some() {
                emit_json(&args, json_file, &e.summary().to_string());
            }
            e.exit_status()
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
    config.irqchip = args.chip.irqchip;
    if pending.built_initramfs {
        log::info!("exec: built the initramfs for this kernel (cached for the next runs)");
    }
    let kernel = config.kernel.clone();
    let admit = || {
        if args.no_ledger {
            return Ok(None);
        }
        launch::admit(&launch::Admission {
            name: None,
            kernel: Path::new("exec"),
            vcpus: args.vcpus,
            memory_mib: args.memory,
            disks: &[],
            pool: args.pool.as_deref(),
            group: None,
        })
        .map(Some)
    };
    let (status, json) = match launch::admit_and_run(config, admit, || ()) {
        Ok(outcome) => {
            let f = pending.finish(&outcome);
            if let Some(r) = &f.reason {
                eprintln!("minivmm exec: {r}");
            }
            if let Some(t) = &f.console_tail {
                eprintln!("--- the guest's console, last lines ---\n{t}\n---");
            }
            let mut j = launch::summary(&outcome, started);
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
        Err(e @ launch::LaunchError::Stopped(_)) => {
            eprintln!("minivmm exec: {e}");
            (e.exit_status(), e.summary())
        }
        Err(e) => {
            eprintln!("minivmm exec: {e} (kernel {})", kernel.display());
            (e.exit_status(), e.summary())
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

/// The --ready-fd descriptor as a file, if it is an open one (it is closed when
/// the file drops).
fn ready_pipe(fd: i32) -> Result<File, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!(
            "--ready-fd {fd}: not an open file descriptor above 2"
        ));
    }
    // SAFETY: open (checked above), and handed to minivmm for its own use by the
    // agent that started it; nothing else in this process uses it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `run`'s admission: the VM's vCPUs, memory and disks, unless --no-ledger.
fn admit(args: &RunArgs) -> Result<Option<minivmm::pool::Claim>, launch::LaunchError> {
    if args.no_ledger {
        return Ok(None);
    }
    launch::admit(&launch::Admission {
        name: args.name.as_deref(),
        kernel: &args.kernel,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        disks: &args.disk,
        pool: args.pool.as_deref(),
        group: args.group.as_deref(),
    })
    .map(Some)
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
                    t.div_f64(n as f64)
                );
            }
        }
    }
    if args.json || args.json_out.is_some() {
        emit_json(args, json_file, &launch::summary(o, started).to_string());
    }
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
