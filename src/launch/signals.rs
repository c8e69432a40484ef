//! Every signal whose default action would end the process and that a process may
//! catch stops the VM cleanly instead (the terminal is restored and the ledger claim
//! released): they are blocked in every thread and received by one thread with
//! sigwait(2), and the VM ends with status 128 + the signal's number.
//!
//! Left out, and why:
//! - SIGKILL and SIGSTOP cannot be caught or blocked;
//! - SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP and SIGSYS report a fault of the thread
//!   that gets them (a blocked one is forced through by the kernel anyway), and
//!   SIGABRT is abort(3)'s, which unblocks it: they must stay fatal;
//! - SIGPIPE is ignored by the Rust runtime from the start (SIG_IGN), so a write to a
//!   closed pipe fails with EPIPE instead (`crate::output` turns that into 141 for
//!   `pool` and `check`); it does not end minivmm;
//! - the real-time signal that kicks vCPU threads out of KVM_RUN
//!   ([`crate::vmm::kick_signal`]), which must reach them.
//!
//! SIGPWR ("power failure") presses the guest's ACPI power button instead, when the
//! guest has enabled that event, so that it can shut down by itself (the agent's
//! stop sends it); otherwise it stops the VM like the others.
//!
//! SIGCHLD, SIGURG, SIGWINCH and SIGCONT are ignored by default; SIGTSTP, SIGTTIN and
//! SIGTTOU stop the process rather than end it: none of them is taken.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use crate::{StopHandle, StopReason};

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
    let kick = crate::vmm::kick_signal();
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
    /// Admission is over: a signal no longer makes waits for the pool give up, so
    /// that the claim's release at the VM's end waits its turn on a busy pool.
    admitted: AtomicBool,
    /// The VM to stop, once there is one.
    vm: Mutex<Option<StopHandle>>,
}

/// The signal thread, from before admission to the end of the VM.
pub struct Watcher(Arc<Shared>);

/// Blocks the signals, in this thread and every thread started later, and starts
/// the thread that receives them with sigwait(2). From then on a signal is never
/// lost: before the VM exists it makes waits for a locked pool give up
/// ([`crate::pool::interrupt_waits`]) and is remembered for [`Watcher::attach`];
/// after, it stops the VM.
pub fn watch(mode: crate::vmm::seccomp::SeccompMode) -> Result<Watcher, String> {
    use crate::vmm::seccomp::{ThreadKind, apply, filter};
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
            loop {
                let mut sig = 0;
                // SAFETY: valid set and out-pointer.
                if unsafe { libc::sigwait(&s, &mut sig) } != 0 {
                    return;
                }
                if sig == libc::SIGPWR {
                    let vm = thread.vm.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if vm.is_some_and(|vm| vm.power_button()) {
                        log::info!("SIGPWR: pressed the guest's power button");
                        continue;
                    }
                }
                // The first stop signal is the one reported.
                let _ =
                    thread
                        .received
                        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
                if !thread.admitted.load(Ordering::SeqCst) {
                    crate::pool::interrupt_waits();
                }
                let vm = thread.vm.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(vm) = vm {
                    vm.stop(StopReason::Signal(sig));
                }
            }
        })
        .map(|_| Watcher(shared))
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

impl Watcher {
    /// Says that admission is over (see `Shared::admitted`).
    pub fn admitted(&self) {
        self.0.admitted.store(true, Ordering::SeqCst);
    }

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
