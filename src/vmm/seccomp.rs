//! seccomp-BPF allow-lists for the threads that run guest-driven code.
//!
//! A guest reaches minivmm's code through VM exits (handled on its vCPU threads), its
//! virtio queues (the `virtio` worker thread) and its console bytes (the `console`
//! writer and the `stdin` reader). Each of these threads installs, before it runs any
//! of that code, a filter (seccomp(2), SECCOMP_SET_MODE_FILTER, after
//! PR_SET_NO_NEW_PRIVS) that lets through only the system calls that kind of thread
//! makes. A bug in device code that a guest exploits is then confined to those: a vCPU
//! thread cannot open a file, fork or connect anywhere, and the only ioctls it may
//! issue are KVM's. The filters are built with rust-vmm's seccompiler, as
//! Firecracker's and Cloud Hypervisor's are.
//!
//! What happens on a call outside the list is the mode's ([`SeccompMode`]):
//! - `strict` (the default): the kernel sends SIGSYS to the thread; minivmm's handler
//!   prints the thread kind and the call's number and ends the process with status
//!   125 (a filter is only ever wrong because minivmm is);
//! - `log`: the call is allowed and the kernel logs it (an `audit: type=1326` line in
//!   the kernel log with `syscall=N`), which is how the lists below were checked;
//! - `off`: no filter.
//!
//! The `minivmm` binary filters its own two threads as well: the signal thread from
//! its start, and the main thread once the VM is built (it then only waits, tears
//! down, releases the ledger's claim and reports). Building the VM, reading the
//! kernel and admission happen before, unfiltered, as no guest runs yet.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in the lists below).
    #[error("building the seccomp filter for the {kind} thread: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// What seccompiler said.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no CONFIG_SECCOMP_FILTER, or a seccomp
    /// policy of the container forbids stacking one).
    #[error(
        "installing the seccomp filter of the {kind} thread: {source}; if this kernel or container does not allow seccomp filters, run with --seccomp off"
    )]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What seccomp(2) said.
        source: seccompiler::Error,
    },
}

/// What a filtered thread's forbidden system call does. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// SIGSYS: report and end the process (status 125).
    #[default]
    Strict,
    /// Allow and log to the kernel log (audit type 1326).
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(SeccompMode::Strict),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!(
                "unknown seccomp mode '{s}': use strict (the default), log or off"
            )),
        }
    }
}

/// The kinds of thread that get a filter, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and handles port I/O and MMIO exits.
    Vcpu = 1,
    /// The virtio event loop: disk images, the shared directory, console output.
    Virtio = 2,
    /// Writes the serial console's output to its sink.
    ConsoleOut = 3,
    /// Feeds standard input to COM1.
    Stdin = 4,
    /// The `minivmm` process's signal thread (sigwait, then stop the VM).
    Signals = 5,
    /// The `minivmm` process's main thread once its VM is built: it waits for the
    /// end, tears the VM down, releases the ledger's claim (SQLite) and reports.
    Main = 6,
    /// The userspace PIT's timer (`--irqchip split`): sleeps, then writes its irqfd.
    Timer = 7,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Virtio => "virtio",
            ThreadKind::ConsoleOut => "console",
            ThreadKind::Stdin => "stdin",
            ThreadKind::Signals => "signal",
            ThreadKind::Main => "main",
            ThreadKind::Timer => "timer",
        }
    }

    /// Every kind, for tests and reports.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vcpu,
        ThreadKind::Virtio,
        ThreadKind::ConsoleOut,
        ThreadKind::Stdin,
        ThreadKind::Signals,
        ThreadKind::Main,
        ThreadKind::Timer,
    ];
}

/// What every filtered thread needs: memory (Rust's and glibc's allocators), locks
/// (futex), time (the vDSO's fallbacks), the kick signal's return, logging to
/// stderr, panics and thread exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
];

/// The virtio worker: epoll, block I/O on the images, and the passthrough file
/// system of a share (every call fuse-backend-rs makes on the guest's behalf).
const VIRTIO: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_readv,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fsetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_setxattr,
    libc::SYS_getxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_flock,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// The console writer: its sink is a file, a pipe or a terminal.
const CONSOLE_OUT: &[i64] = &[libc::SYS_fsync, libc::SYS_fdatasync];

/// The stdin reader: poll on standard input and its wake-up eventfd.
const STDIN: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll];

/// The signal thread: sigwait(3) is rt_sigtimedwait.
const SIGNALS: &[i64] = &[libc::SYS_rt_sigtimedwait];

/// The main thread after the VM is built: teardown (KVM ioctls, close), the
/// terminal's restore (an ioctl too), the ledger's release (SQLite opens, locks,
/// reads, writes, syncs and unlinks its journal files) and the reports. The
/// broadest list, with the file operations of the virtio worker's; still no
/// process creation, no execve, no sockets, no ptrace.
const MAIN: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_unlink,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_open,
    libc::SYS_rename,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_kill,
    libc::SYS_rt_sigaction,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_wait4,
    libc::SYS_sched_getaffinity,
    libc::SYS_memfd_create,
    libc::SYS_uname,
    libc::SYS_getrusage,
];

/// KVM's ioctl type byte (`KVMIO`, include/uapi/linux/kvm.h): every KVM ioctl's
/// request number has it in bits 8-15.
const KVMIO: u64 = 0xae;

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let extra: &[i64] = match kind {
        // The timer needs only the common list: a condition variable and a write.
        ThreadKind::Vcpu | ThreadKind::Timer => &[],
        ThreadKind::Virtio => VIRTIO,
        ThreadKind::ConsoleOut => CONSOLE_OUT,
        ThreadKind::Stdin => STDIN,
        ThreadKind::Signals => SIGNALS,
        // Its file operations are those of the virtio worker, and more.
        ThreadKind::Main => MAIN,
    };
    let shared: &[i64] = if kind == ThreadKind::Main {
        VIRTIO
    } else {
        &[]
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(extra)
        .chain(shared)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if kind == ThreadKind::Vcpu {
        // KVM_RUN, and KVM_GET_REGS/SREGS for a failure report: only KVM's ioctls.
        let kvm_only = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO << 8,
        )?;
        map.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![kvm_only])?]);
    }
    Ok(map)
}

/// Builds the filter of `kind` for `mode`; `None` when the mode is off.
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Strict => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let f = SeccompFilter::new(
        rules(kind).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    let prog: BpfProgram = f.try_into().map_err(build)?;
    if mode == SeccompMode::Strict {
        install_sigsys_handler();
    }
    Ok(Some(prog))
}

/// The filters of one VM's threads, built once when the VM is built and handed to
/// each thread as it starts.
#[derive(Clone)]
pub struct Filters {
    mode: SeccompMode,
    /// [`SELFTEST_ENV`]: the kind whose threads make one forbidden call.
    selftest: Option<ThreadKind>,
    vcpu: Option<std::sync::Arc<BpfProgram>>,
    virtio: Option<std::sync::Arc<BpfProgram>>,
    console_out: Option<std::sync::Arc<BpfProgram>>,
    stdin: Option<std::sync::Arc<BpfProgram>>,
    timer: Option<std::sync::Arc<BpfProgram>>,
}

impl Filters {
    /// Builds every kind's filter for `mode`, and proves this kernel takes one (on a
    /// short-lived thread of its own, the first time) so that a VM never starts only
    /// to lose a thread to a filter the kernel refuses.
    pub fn build(mode: SeccompMode) -> Result<Filters, SeccompError> {
        let arc = |kind| filter(kind, mode).map(|p| p.map(std::sync::Arc::new));
        let selftest = match std::env::var(SELFTEST_ENV).as_deref() {
            Ok("vcpu") => Some(ThreadKind::Vcpu),
            Ok("virtio") => Some(ThreadKind::Virtio),
            _ => None,
        };
        let f = Filters {
            mode,
            selftest,
            vcpu: arc(ThreadKind::Vcpu)?,
            virtio: arc(ThreadKind::Virtio)?,
            console_out: arc(ThreadKind::ConsoleOut)?,
            stdin: arc(ThreadKind::Stdin)?,
            timer: arc(ThreadKind::Timer)?,
        };
        // Once per process: a VM's build time matters for tiny guests.
        static PROBED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Some(probe) = f.vcpu.clone()
            && !PROBED.load(std::sync::atomic::Ordering::Relaxed)
        {
            std::thread::spawn(move || apply(ThreadKind::Vcpu, Some(&probe)))
                .join()
                .unwrap_or(Ok(()))?;
            PROBED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(f)
    }

    /// Installs `kind`'s filter on the calling thread (nothing when the mode is off).
    pub fn enter(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let prog = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Virtio => &self.virtio,
            ThreadKind::ConsoleOut => &self.console_out,
            ThreadKind::Stdin => &self.stdin,
            ThreadKind::Timer => &self.timer,
            // The process's own threads build theirs with `filter`.
            ThreadKind::Signals | ThreadKind::Main => {
                return apply(kind, filter(kind, self.mode)?.as_ref());
            }
        };
        apply(kind, prog.as_deref())?;
        if self.selftest == Some(kind) {
            // SAFETY: getppid(2) has no arguments and no side effects; it is on no
            // thread's list, so the filter's action follows.
            let ppid = unsafe { libc::getppid() };
            log::warn!(
                "seccomp self-test: the {} thread called getppid: {ppid}",
                kind.name()
            );
        }
        Ok(())
    }
}

/// Set to `vcpu` or `virtio`, it makes every thread of that kind call getppid(2),
/// which no list allows, right after its filter is on: how the tests prove that a
/// forbidden call ends the VM with a report in `strict` mode (and is only logged in
/// `log` mode). A fault injection for tests; nothing else reads it.
pub const SELFTEST_ENV: &str = "MINIVMM_SECCOMP_SELFTEST";

thread_local! {
    /// The filtered thread's kind, for the SIGSYS report (0: none).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Installs `prog` (from [`filter`]) on the calling thread, for good.
pub fn apply(kind: ThreadKind, prog: Option<&BpfProgram>) -> Result<(), SeccompError> {
    let Some(prog) = prog else {
        return Ok(());
    };
    KIND.with(|k| k.set(kind as u8));
    seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// Installs the SIGSYS handler once per process.
fn install_sigsys_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO
        // signature and only makes async-signal-safe calls (write, _exit).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "seccomp: cannot install the SIGSYS handler: {}; a forbidden call will kill minivmm without a report",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Byte offset of `si_syscall` in siginfo_t for SIGSYS on x86-64: after si_signo,
/// si_errno, si_code (3 × 4 bytes, padded to 16) comes `_sigsys { void *_call_addr;
/// int _syscall; unsigned _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers, and for
    // SIGSYS from seccomp (si_code SYS_SECCOMP) the _sigsys member is the live one.
    let nr = unsafe { *(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let kind = KIND.with(|k| k.get());
    let name = match kind {
        1 => "vCPU",
        2 => "virtio",
        3 => "console",
        4 => "stdin",
        5 => "signal",
        6 => "main",
        _ => "unknown",
    };
    let mut msg = [0u8; 256];
    let mut len = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&b[..n]);
        len += n;
    };
    put(b"minivmm: seccomp: a ");
    put(name.as_bytes());
    put(b" thread made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b", which its filter forbids; minivmm stopped (a minivmm bug: please report it; --seccomp log lists every such call in the kernel log)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe, and both are allowed by
    // every filter; the buffer is local.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(crate::vmm::status::VMM_ERROR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_in_every_mode() {
        for kind in ThreadKind::ALL {
            assert!(filter(kind, SeccompMode::Off).unwrap().is_none());
            for mode in [SeccompMode::Strict, SeccompMode::Log] {
                let p = filter(kind, mode).unwrap().unwrap();
                assert!(p.len() > COMMON.len(), "{kind:?}: {} instructions", p.len());
            }
        }
    }

    #[test]
    fn modes_parse_and_unknown_ones_are_named() {
        assert_eq!("strict".parse(), Ok(SeccompMode::Strict));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        let e = "on".parse::<SeccompMode>().unwrap_err();
        assert!(e.contains("'on'") && e.contains("strict"), "{e}");
    }

    /// A filtered thread gets EPERM-free service for what its list allows and the
    /// filter's action for the rest: here with an Errno action in a thread of its
    /// own, so the test process is not killed.
    #[test]
    fn a_filtered_thread_is_refused_what_its_list_lacks() {
        let t = std::thread::spawn(|| {
            let f = SeccompFilter::new(
                rules(ThreadKind::Vcpu).unwrap(),
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let prog: BpfProgram = f.try_into().unwrap();
            seccompiler::apply_filter(&prog).unwrap();
            // Allowed: write to an fd (-EBADF proves it reached the kernel).
            let w = unsafe { libc::write(-1, std::ptr::null(), 0) };
            let w_err = std::io::Error::last_os_error().raw_os_error();
            // Not on a vCPU's list: openat, socket, and a non-KVM ioctl.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
            let open_err = std::io::Error::last_os_error().raw_os_error();
            let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            let sock_err = std::io::Error::last_os_error().raw_os_error();
            let i = unsafe { libc::ioctl(0, libc::TCGETS, std::ptr::null_mut::<u8>()) };
            let ioctl_err = std::io::Error::last_os_error().raw_os_error();
            (w, w_err, fd, open_err, s, sock_err, i, ioctl_err)
        });
        let (w, w_err, fd, open_err, s, sock_err, i, ioctl_err) = t.join().unwrap();
        assert_eq!((w, w_err), (-1, Some(libc::EBADF)));
        assert_eq!((fd, open_err), (-1, Some(libc::EPERM)));
        assert_eq!((s, sock_err), (-1, Some(libc::EPERM)));
        assert_eq!((i, ioctl_err), (-1, Some(libc::EPERM)));
    }
}
