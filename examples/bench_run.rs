//! The measuring harness of scripts/bench-*.sh: runs a command (a VMM) and reports its
//! wall time, CPU time and peak RSS from the kernel's own accounting (wait4's rusage),
//! with microsecond resolution — /usr/bin/time rounds wall time to 10 ms, too coarse
//! for a VM that lives 20 ms.
//!
//! ```text
//! bench_run [--until FILE --pattern TEXT] [--timeout SECS] -- COMMAND ARGS...
//! bench_run --parallel N [--timeout SECS] -- COMMAND ARGS...
//! ```
//!
//! One run prints one line of `key=value` pairs:
//! `wall_ms user_ms sys_ms cpu_ms maxrss_kib status matched`.
//! With `--until`, the command is killed (SIGKILL) as soon as TEXT appears in FILE
//! (the guest's serial output), and wall_ms is the time to that line.
//! `status` is the exit status, or 128+signal, or `killed` when we killed it.
//!
//! `--parallel N` starts N copies at once (any `{}` in the arguments becomes the copy's
//! index), waits for all and prints `n spawn_ms all_done_ms vms_per_s ok failed
//! statuses sum_maxrss_kib max_maxrss_kib mem_used_kib`: spawn_ms is how long starting
//! all N took, all_done_ms until the last one ended, vms_per_s = N / all_done_ms,
//! mem_used_kib the largest drop of MemAvailable (/proc/meminfo, sampled every 2 ms)
//! below its value before the start — host memory the N VMs used, kernel side included.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

struct Usage {
    status: String,
    user_ms: f64,
    sys_ms: f64,
    maxrss_kib: i64,
}

fn tv_ms(t: libc::timeval) -> f64 {
    t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3
}

/// Waits for `child` with wait4 and returns its status and resource usage.
fn wait_usage(child: &Child, killed: bool) -> Usage {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waits for our own child; status and ru are valid out-pointers.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
        if r >= 0 {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            fail(&format!("wait4: {}", std::io::Error::last_os_error()));
        }
    }
    let status = if killed {
        "killed".to_string()
    } else if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status).to_string()
    } else {
        (128 + libc::WTERMSIG(status)).to_string()
    };
    Usage {
        status,
        user_ms: tv_ms(ru.ru_utime),
        sys_ms: tv_ms(ru.ru_stime),
        maxrss_kib: ru.ru_maxrss,
    }
}

/// True once the child has exited (without reaping it: wait4 does that).
fn exited(child: &Child) -> bool {
    // SAFETY: siginfo is plain data; WNOWAIT leaves the child waitable.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid for SIGCHLD-style siginfo filled by waitid.
    r == 0 && unsafe { info.si_pid() } != 0
}

fn spawn(argv: &[String], index: usize) -> Child {
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| a.replace("{}", &index.to_string()))
        .collect();
    Command::new(&argv[0])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", argv[0])))
}

/// Runs one copy; with `until`, kills it once the pattern appears in the file.
fn single(argv: &[String], until: Option<(String, String)>, timeout: Duration) {
    if let Some((file, _)) = &until {
        let _ = std::fs::remove_file(file);
    }
    let t0 = Instant::now();
    // Reaped with wait4 in wait_usage, which std's clippy lint cannot see.
    #[allow(clippy::zombie_processes)]
    let mut child = spawn(argv, 0);
    let mut matched = false;
    let mut killed = false;
    let mut seen = Vec::new();
    let mut wall = None;
    let mut reader: Option<std::fs::File> = None;
    loop {
        if let Some((file, pattern)) = &until {
            if reader.is_none() {
                reader = std::fs::File::open(file).ok();
            }
            if let Some(f) = reader.as_mut() {
                let _ = f.read_to_end(&mut seen);
                if memfind(&seen, pattern.as_bytes()) {
                    wall = Some(t0.elapsed());
                    matched = true;
                    let _ = child.kill();
                    killed = true;
                    break;
                }
            }
        }
        if exited(&child) {
            wall = Some(t0.elapsed());
            break;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(if until.is_some() {
            1000
        } else {
            100
        }));
    }
    let u = wait_usage(&child, killed);
    let wall = wall.unwrap_or_else(|| t0.elapsed());
    let status = if killed && !matched {
        "timeout".to_string()
    } else {
        u.status
    };
    println!(
        "wall_ms={:.3} user_ms={:.1} sys_ms={:.1} cpu_ms={:.1} maxrss_kib={} status={status} matched={}",
        wall.as_secs_f64() * 1e3,
        u.user_ms,
        u.sys_ms,
        u.user_ms + u.sys_ms,
        u.maxrss_kib,
        u8::from(matched)
    );
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn mem_available_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Starts `n` copies at once and waits for all.
fn parallel(argv: &[String], n: usize, timeout: Duration) {
    let before = mem_available_kib();
    let lowest = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (lowest, done) = (lowest.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                lowest.fetch_min(mem_available_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let t0 = Instant::now();
    let mut children: Vec<Child> = (0..n).map(|i| spawn(argv, i)).collect();
    let spawn_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut usages: Vec<Option<Usage>> = (0..n).map(|_| None).collect();
    let mut left = n;
    while left > 0 {
        for (i, c) in children.iter_mut().enumerate() {
            if usages[i].is_none() && exited(c) {
                usages[i] = Some(wait_usage(c, false));
                left -= 1;
            }
        }
        if t0.elapsed() > timeout {
            for (i, c) in children.iter_mut().enumerate() {
                if usages[i].is_none() {
                    let _ = c.kill();
                    let mut u = wait_usage(c, true);
                    u.status = "timeout".into();
                    usages[i] = Some(u);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let all_done = t0.elapsed().as_secs_f64() * 1e3;
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let usages: Vec<Usage> = usages.into_iter().flatten().collect();
    let mut statuses = std::collections::BTreeMap::new();
    for u in &usages {
        *statuses.entry(u.status.clone()).or_insert(0) += 1;
    }
    let expected = std::env::var("BENCH_EXPECT_STATUS").unwrap_or_else(|_| "0".into());
    let ok = usages.iter().filter(|u| u.status == expected).count();
    let statuses: Vec<String> = statuses.iter().map(|(s, c)| format!("{s}:{c}")).collect();
    println!(
        "n={n} spawn_ms={spawn_ms:.1} all_done_ms={all_done:.1} vms_per_s={:.1} ok={ok} failed={} statuses={} sum_maxrss_kib={} max_maxrss_kib={} mem_used_kib={}",
        n as f64 / (all_done / 1e3),
        n - ok,
        statuses.join(","),
        usages.iter().map(|u| u.maxrss_kib).sum::<i64>(),
        usages.iter().map(|u| u.maxrss_kib).max().unwrap_or(0),
        before.saturating_sub(lowest.load(Ordering::Relaxed)),
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut file, mut pattern, mut par) = (None, None, None);
    let mut timeout = Duration::from_secs(600);
    let mut argv = Vec::new();
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--until" => file = Some(val("--until")),
            "--pattern" => pattern = Some(val("--pattern")),
            "--timeout" => {
                let v = val("--timeout");
                let s: f64 = v
                    .parse()
                    .unwrap_or_else(|_| fail("--timeout needs seconds"));
                timeout = Duration::from_secs_f64(s);
            }
            "--parallel" => {
                let v = val("--parallel");
                par = Some(
                    v.parse()
                        .unwrap_or_else(|_| fail("--parallel needs a count")),
                );
            }
            "--" => {
                argv = args.by_ref().collect();
                break;
            }
            other => fail(&format!(
                "unknown argument '{other}'; see the header of examples/bench_run.rs"
            )),
        }
    }
    if argv.is_empty() {
        fail("no command given after --");
    }
    let until = match (file, pattern) {
        (Some(f), Some(p)) => Some((f, p)),
        (None, None) => None,
        _ => fail("--until and --pattern go together"),
    };
    match par {
        Some(n) if until.is_none() => parallel(&argv, n, timeout),
        Some(_) => fail("--parallel does not combine with --until"),
        None => single(&argv, until, timeout),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench_run: error: {msg}");
    std::process::exit(1);
}
