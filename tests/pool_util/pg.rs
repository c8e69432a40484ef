//! A real PostgreSQL server for the tests, from Debian's postgresql package: initdb in
//! a temporary directory, listening on a Unix socket only, started once per test
//! process and stopped (its directory removed) when the process exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The server of this test process.
pub struct Server {
    /// Its directory: data/ and the socket directory.
    pub dir: PathBuf,
    /// The directory holding its Unix socket.
    pub socket_dir: PathBuf,
    /// The postmaster's pid (changes with [`Server::restart`]).
    pub pid: std::sync::atomic::AtomicU32,
    /// The binaries.
    bin: PathBuf,
}

/// The PostgreSQL binaries directory of the newest installed version.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// The uid and gid to run the server as: PostgreSQL refuses to run as root, so as
/// root the package's `postgres` user.
fn server_ids() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = c"postgres";
    // SAFETY: a NUL-terminated name; the result is read at once, before any other
    // getpw* call in this process could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        panic!("running as root, and there is no postgres user to run PostgreSQL as");
    }
    // SAFETY: non-null, points to a passwd record.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A command that runs as the server's user and is killed (SIGINT: PostgreSQL's
/// "fast shutdown") when the thread that spawned it ends.
fn server_command(program: PathBuf) -> Command {
    let mut c = Command::new(program);
    let ids = server_ids();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if let Some((uid, gid)) = ids
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid, which clears the parent-death signal.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
    c
}

/// Stops the server at process exit: the test harness ends with exit(), which runs
/// atexit handlers.
extern "C" fn stop_at_exit() {
    if let Some(Some(s)) = SERVER.get() {
        s.stop();
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();

/// The server, started on first use; None (after a recorded skip, or a panic in CI)
/// when PostgreSQL is not installed.
pub fn server(test: &str) -> Option<&'static Server> {
    SERVER
        .get_or_init(|| {
            let Some(bin) = bin_dir() else {
                super::common::skip(
                    test,
                    "MINIVMM_REQUIRE_POSTGRES",
                    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres)",
                    "apt-get install postgresql, or run scripts/test.sh, which does",
                );
                return None;
            };
            // The spawning thread must outlive the server (the parent-death signal
            // follows the thread): a thread of its own that never ends.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(start(&bin));
                loop {
                    std::thread::park();
                }
            });
            let server = rx.recv().expect("postgres starter thread");
            // SAFETY: registers a plain extern "C" function.
            unsafe { libc::atexit(stop_at_exit) };
            Some(server)
        })
        .as_ref()
}

/// initdb and start a server in a new temporary directory; wait until it answers.
fn start(bin: &Path) -> Server {
    let dir = std::env::temp_dir().join(format!("minivmm-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let socket_dir = dir.join("run");
    std::fs::create_dir_all(&socket_dir).expect("postgres dirs");
    if let Some((uid, gid)) = server_ids() {
        for d in [&dir, &socket_dir] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).expect("chown postgres dir");
        }
    }
    let out = server_command(bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        .stdin(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = Server {
        dir,
        socket_dir,
        pid: AtomicU32::new(0),
        bin: bin.to_path_buf(),
    };
    server.launch();
    server
}

impl Server {
    /// Starts the postmaster on the data directory and waits until it answers.
    fn launch(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        #[allow(clippy::zombie_processes)]
        let child = server_command(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        // Reaped by stop() (waitpid): the Child is not kept across threads.
        self.pid.store(child.id(), Ordering::SeqCst);
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start in 60 s; see {}",
                self.dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the postmaster ("fast" shutdown: open transactions are rolled back,
    /// sessions ended) and waits for it to exit.
    fn stop(&self) {
        let pid = self.pid.load(Ordering::SeqCst) as i32;
        // SAFETY: plain syscalls on a pid we started.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            // Reap it: a zombie would keep /proc/PID.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server and starts it again on the same data, as an operator's
    /// restart (or a failover to the same address) would: every connection breaks.
    /// The new postmaster lives as long as the calling thread (its parent-death
    /// signal): for a test binary whose one test restarts the server.
    pub fn restart(&self) {
        self.stop();
        self.launch();
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@/{db}?host={}",
            self.socket_dir.display()
        )
    }

    /// A new empty database; returns its name.
    pub fn create_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connect to the test server");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        name
    }

    /// Drops a database made by [`Server::create_database`], closing its connections.
    pub fn drop_database(&self, name: &str) {
        if let Ok(mut c) = postgres::Client::connect(&self.url("postgres"), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}
