//! The thread that does every virtio device's work for one VM.
//!
//! It sleeps in epoll_wait(2) on the queues' notify eventfds (which KVM signals on
//! the guest's write to QueueNotify, see KVM_IOEVENTFD) and on a stop eventfd.
//! When a queue's eventfd fires it is read (resetting its counter) and the queue is
//! served to its end; the device then raises its interrupt through its irqfd. One
//! thread is enough for a VM's few devices, and keeps device work off the vCPUs.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioMmio;

/// The epoll token of the stop eventfd; a queue's token is its index in `queues`.
const STOP: u64 = u64::MAX;
/// How long the end of a VM waits for the worker to finish the request in hand.
/// A request can block for long or for good (a share or a disk image on a hung
/// network file system); the VM must still end, so past this the thread is left
/// behind, blocked in the kernel, and ends with the process.
const JOIN_GRACE: Duration = Duration::from_secs(5);

/// A running worker; dropping it stops and joins the thread.
pub struct Worker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread returns (it owns the only sender).
    ended: Receiver<()>,
}

impl Worker {
    /// Starts the thread serving `devices`.
    pub fn start(
        devices: Vec<Arc<VirtioMmio>>,
        filters: crate::vmm::seccomp::Filters,
    ) -> std::io::Result<Worker> {
        let epoll = Epoll::new()?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let mut queues: Vec<(Arc<VirtioMmio>, usize)> = Vec::new();
        for d in &devices {
            let (_, fds) = d.notify_fds();
            for (i, fd) in fds.iter().enumerate() {
                let token = queues.len() as u64;
                epoll.ctl(
                    ControlOperation::Add,
                    fd_of(fd),
                    EpollEvent::new(EventSet::IN, token),
                )?;
                queues.push((d.clone(), i));
            }
        }
        epoll.ctl(
            ControlOperation::Add,
            fd_of(&stop),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let (alive, ended) = sync_channel::<()>(0);
        let thread = std::thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                let _alive = alive;
                run(epoll, queues, filters)
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
            ended,
        })
    }
}

fn fd_of(fd: &EventFd) -> i32 {
    use std::os::unix::io::AsRawFd;
    fd.as_raw_fd()
}

fn run(epoll: Epoll, queues: Vec<(Arc<VirtioMmio>, usize)>, filters: crate::vmm::seccomp::Filters) {
    // A umask (and working directory) of this thread's own: virtio-fs's FUSE server
    // sets the umask to 0 on FUSE_INIT (and needs it so, to give files the modes the
    // guest asks for), which must not change the mode of files the rest of the
    // process creates.
    // SAFETY: unshare(2) with CLONE_FS only copies this thread's file system
    // attributes; umask(2) only sets this thread's (now private) mask.
    if unsafe { libc::unshare(libc::CLONE_FS) } == 0 {
        unsafe { libc::umask(0) };
    } else {
        log::warn!(
            "virtio worker: unshare(CLONE_FS): {}; FUSE_INIT will clear the whole process's umask",
            std::io::Error::last_os_error()
        );
    }
    // After the set-up above (unshare is not on the list), before any guest request.
    if let Err(e) = filters.enter(crate::vmm::seccomp::ThreadKind::Virtio) {
        log::error!("virtio worker: {e}; devices stop serving");
        return;
    }
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio worker: epoll_wait: {e}; devices stop serving");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP {
                return;
            }
            let Some((dev, q)) = queues.get(token as usize) else {
                continue;
            };
            let (_, fds) = dev.notify_fds();
            // Reading resets the counter: many notifies, one pass over the queue.
            let _ = fds[*q].read();
            dev.process_queue(*q);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("virtio worker: cannot signal stop: {e}");
            return;
        }
        if let Err(RecvTimeoutError::Timeout) = self.ended.recv_timeout(JOIN_GRACE) {
            log::error!(
                "the virtio worker is still in a device request {JOIN_GRACE:?} after the VM \
                 stopped (is a share or disk on a hung file system?); leaving it behind"
            );
            return;
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("the virtio worker thread panicked (a minivmm bug: please report it)");
        }
    }
}
