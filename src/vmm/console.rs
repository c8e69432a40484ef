//! The host side of the serial console: standard input fed to COM1's receive FIFO,
//! and the terminal put in raw mode while the VM runs (and restored afterwards, on
//! every path, by a guard's Drop).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::devices::{Devices, lock};

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
        on_escape: impl Fn() + Send + 'static,
    ) -> io::Result<StdinPump> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake2 = wake.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || pump(devices, wake2, interactive, on_escape))?;
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
            let mut com1 = lock(&devices.serial);
            if let Ok(n) = com1.enqueue_raw_bytes(&pending) {
                pending.drain(..n);
            }
        }
        if eof && pending.is_empty() {
            return; // nothing more will come
        }
    }
}
