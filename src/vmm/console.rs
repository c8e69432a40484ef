//! The host side of the serial console: guest output handed to a writer thread through
//! a bounded buffer ([`OutputPump`]), standard input fed to COM1's receive FIFO, and
//! the terminal put in raw mode while the VM runs (and restored afterwards, on every
//! path, by a guard's Drop).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::devices::Devices;
use super::seccomp::{Filters, ThreadKind};

/// Ctrl-A, the escape key on a terminal: Ctrl-A `x` stops the VM (as in QEMU);
/// Ctrl-A Ctrl-A sends one Ctrl-A to the guest.
const ESCAPE: u8 = 0x01;

/// Puts a terminal in raw mode and restores its settings when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` otherwise.
    pub fn enable(fd: i32) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side log lines still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid fd and termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// A thread copying standard input into COM1, stopped through an eventfd.
pub struct StdinPump {
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl StdinPump {
    /// Starts the thread. `on_escape` is called when the user types Ctrl-A `x` on a
    /// terminal.
    pub fn start(
        devices: Arc<Devices>,
        interactive: bool,
        filters: Filters,
        on_escape: impl Fn() + Send + 'static,
    ) -> io::Result<StdinPump> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake2 = wake.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                if let Err(e) = filters.enter(ThreadKind::Stdin) {
                    log::error!("stdin: {e}; the guest gets no input");
                    return;
                }
                pump(devices, wake2, interactive, on_escape)
            })?;
        Ok(StdinPump {
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for StdinPump {
    fn drop(&mut self) {
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pump(devices: Arc<Devices>, wake: EventFd, interactive: bool, on_escape: impl Fn()) {
    let stdin = io::stdin();
    let fd = stdin.as_raw_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut escape = false;
    let mut eof = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if eof || !pending.is_empty() { -1 } else { fd },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // While bytes wait for room in the guest's FIFO, poll briefly and retry.
        let timeout = if pending.is_empty() { -1 } else { 5 };
        // SAFETY: fds is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let mut buf = [0u8; 256];
            // SAFETY: reading into a local buffer of the given length.
            let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if got <= 0 {
                eof = true;
            }
            for &b in &buf[..got.max(0) as usize] {
                if interactive && escape {
                    escape = false;
                    match b {
                        b'x' | b'X' => {
                            on_escape();
                            return;
                        }
                        ESCAPE => pending.push(ESCAPE),
                        _ => {}
                    }
                } else if interactive && b == ESCAPE {
                    escape = true;
                } else {
                    pending.push(b);
                }
            }
        }
        if !pending.is_empty() {
            let (mut com1, _) = devices.com1();
            if let Ok(n) = com1.enqueue_raw_bytes(&pending) {
                pending.drain(..n);
            }
        }
        if eof && pending.is_empty() {
            return; // nothing more will come
        }
    }
}

/// Most guest output held for a slow console before further bytes are dropped: 1 MiB,
/// several seconds of a Linux boot log on a terminal, and far more than a healthy
/// reader ever falls behind.
pub const OUTPUT_BUFFER: usize = 1 << 20;

/// Most bytes handed to the sink in one write: big writes keep the syscall count low
/// when the guest prints a lot, small enough that progress is seen often.
const CHUNK: usize = 64 << 10;

/// How long the writer lets a burst of output gather before writing it. A UART
/// hands over one byte per VM exit, and waking the writer for each would cost a
/// futex wake, a thread switch and a write(2) per byte; 1 ms is far below what a
/// person at a terminal notices.
const GATHER: Duration = Duration::from_millis(1);

/// What [`OutputPump::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Everything the guest wrote has reached the sink, or been dropped.
    Done,
    /// The sink took bytes, but some are still waiting.
    Progress,
    /// The sink took nothing within the wait.
    Stalled,
}

/// The state the vCPUs, the writer thread and the VM's end share.
#[derive(Default)]
struct Queue {
    /// Guest bytes not yet handed to the sink.
    buf: VecDeque<u8>,
    /// Bytes the writer has taken and is writing now.
    writing: usize,
    /// Bytes that never reached the sink: buffer full, sink failed, or left behind.
    dropped: u64,
    /// No more bytes will come: the writer ends once the buffer is empty.
    closed: bool,
    /// The sink failed; later bytes are counted and discarded.
    broken: bool,
    /// The VM's end gave up on the sink and counted what was left as dropped.
    abandoned: bool,
    /// Whether the "buffer full" warning was logged (once per VM: a guest must not be
    /// able to flood the host's log).
    warned_full: bool,
    /// The writer sleeps on `filled` until bytes come: only then does a push wake it.
    writer_idle: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive or the queue closes (the writer waits on it).
    filled: Condvar,
    /// Signalled when the writer finished a write (the VM's end waits on it).
    emptied: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is plain data, consistent between statements: a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Guest console output on its way to a sink (a terminal, pipe or file) through a
/// bounded buffer and a writer thread, so that a sink that blocks (a pipe nobody
/// reads, a stopped terminal) never blocks a vCPU, and with it the VM's stop: the
/// vCPU only appends to the buffer, and drops bytes, counted, when it is full.
///
/// The writer thread is never joined: it ends by itself once the queue is closed and
/// written out, or, if its sink blocks for good, with the process.
pub struct OutputPump {
    shared: Arc<Shared>,
}

impl OutputPump {
    /// Starts the writer thread for `sink`; it installs its seccomp filter first.
    pub fn start(sink: Box<dyn Write + Send>, filters: Filters) -> io::Result<OutputPump> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                if let Err(e) = filters.enter(ThreadKind::ConsoleOut) {
                    // Fail closed: no unfiltered thread handles guest bytes.
                    log::error!("console: {e}; the guest's console output is dropped");
                    theirs.lock().broken = true;
                    return;
                }
                write_out(&theirs, sink)
            })?;
        Ok(OutputPump { shared })
    }

    /// Queues guest bytes for the sink without ever waiting for it; bytes that do not
    /// fit in [`OUTPUT_BUFFER`] are dropped and counted.
    pub fn push(&self, bytes: &[u8]) {
        let mut q = self.shared.lock();
        if q.broken || q.closed {
            q.dropped += bytes.len() as u64;
            return;
        }
        let room = OUTPUT_BUFFER.saturating_sub(q.buf.len() + q.writing);
        let (kept, lost) = bytes.split_at(bytes.len().min(room));
        q.buf.extend(kept);
        if !lost.is_empty() {
            q.dropped += lost.len() as u64;
            if !q.warned_full {
                q.warned_full = true;
                log::warn!(
                    "the serial console is not being read fast enough: {} KiB are waiting, guest output is dropped until there is room (counted in console_dropped_bytes)",
                    OUTPUT_BUFFER >> 10
                );
            }
        }
        let wake = !kept.is_empty() && std::mem::take(&mut q.writer_idle);
        drop(q);
        if wake {
            self.shared.filled.notify_one();
        }
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Says no more bytes will come; the writer thread ends once it has written the rest.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.filled.notify_one();
    }

    /// Waits at most `max` for the writer: returns as soon as everything is out
    /// ([`Drain::Done`]) or a write completed ([`Drain::Progress`]).
    pub fn wait(&self, max: Duration) -> Drain {
        let q = self.shared.lock();
        if q.buf.is_empty() && q.writing == 0 {
            return Drain::Done;
        }
        let (q, timeout) = self
            .shared
            .emptied
            .wait_timeout(q, max)
            .unwrap_or_else(|p| p.into_inner());
        if q.buf.is_empty() && q.writing == 0 {
            Drain::Done
        } else if timeout.timed_out() {
            Drain::Stalled
        } else {
            Drain::Progress
        }
    }

    /// Gives up on what the sink has not taken: it counts as dropped (the write in
    /// flight too: a blocked write may never finish), and the writer thread is left to
    /// end when its write returns, or with the process.
    pub fn abandon(&self) {
        let mut q = self.shared.lock();
        if q.abandoned {
            return;
        }
        q.dropped += (q.buf.len() + q.writing) as u64;
        q.buf.clear();
        q.writing = 0;
        q.abandoned = true;
        q.closed = true;
        drop(q);
        self.shared.filled.notify_one();
    }
}

impl Drop for OutputPump {
    /// Lets the writer finish what is queued and end, without waiting for it: a VM
    /// dropped unrun must not hang on its console.
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: hands queued bytes to `sink` in chunks until the queue closes.
fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut q = shared.lock();
            while q.buf.is_empty() && !q.closed {
                q.writer_idle = true;
                q = shared.filled.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.writer_idle = false;
            if !q.closed && q.buf.len() < CHUNK {
                // Let the rest of the burst come; only close() or abandon() cut this short.
                q = shared
                    .filled
                    .wait_timeout(q, GATHER)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if q.buf.is_empty() {
                if q.closed {
                    return; // closed and written out
                }
                continue;
            }
            let n = q.buf.len().min(CHUNK);
            chunk.clear();
            chunk.extend(q.buf.drain(..n));
            q.writing = n;
        }
        let written = sink.write_all(&chunk).and_then(|()| sink.flush());
        let mut q = shared.lock();
        if q.abandoned {
            return; // counted already; nobody waits for the rest
        }
        q.writing = 0;
        if let Err(e) = written {
            // A console that went away (closed pipe, full disk) must not stop the
            // guest: say so once and count the rest as dropped.
            if !q.broken {
                log::warn!("serial console output failed, discarding from now on: {e}");
            }
            q.broken = true;
            q.dropped += (chunk.len() + q.buf.len()) as u64;
            q.buf.clear();
        }
        drop(q);
        shared.emptied.notify_all();
    }
}

/// A console destination that keeps the last `capacity` bytes the guest wrote in
/// memory, for a caller that shows a VM's recent output on request (an agent's
/// console endpoint, a test) rather than streaming it. Clones share one buffer: hand
/// one to [`crate::SerialOut::Writer`] and read the other with
/// [`ConsoleRing::contents`].
#[derive(Clone)]
pub struct ConsoleRing {
    buf: Arc<Mutex<RingBuf>>,
}

struct RingBuf {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Every byte ever written, including those pushed out since.
    total: u64,
}

impl ConsoleRing {
    /// A ring that keeps at most `capacity` bytes (the oldest go first).
    pub fn new(capacity: usize) -> ConsoleRing {
        ConsoleRing {
            buf: Arc::new(Mutex::new(RingBuf {
                bytes: Default::default(),
                capacity,
                total: 0,
            })),
        }
    }

    /// The bytes kept, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.bytes.iter().copied().collect()
    }

    /// How many bytes were ever written, kept or not.
    pub fn total(&self) -> u64 {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Write for ConsoleRing {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.total += data.len() as u64;
        let keep = &data[data.len().saturating_sub(b.capacity)..];
        let over = (b.bytes.len() + keep.len()).saturating_sub(b.capacity);
        b.bytes.drain(..over);
        b.bytes.extend(keep);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
