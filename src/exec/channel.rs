//! The host's end of the exec guest's channel: the virtio console's byte stream,
//! cut into frames by the guest's init (guest/exec-init.c):
//! one byte of type, a little-endian u32 length, then that many bytes.
//!
//! | type | payload                                   |
//! |------|-------------------------------------------|
//! | 1    | the command's stdout bytes                |
//! | 2    | the command's stderr bytes                |
//! | 3    | it exited: its status, u32                |
//! | 4    | a signal killed it: the signal, u32       |
//! | 5    | it could not be started: the errno, u32   |
//! | 6    | init failed: a one-line message           |
//!
//! stdout and stderr are written to this process's own as they arrive, so they
//! stay separate and in order. A reader that went away (a closed pipe) only makes
//! the bytes drop: the frames after it, and the status, are still read.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// How the command ended, as the guest reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// It exited with this status.
    Exited(u32),
    /// A signal killed it.
    Signaled(u32),
    /// It could not be started (exec(2) or chdir(2) failed with this errno).
    NotStarted(i32),
    /// The guest's init failed before the command, saying why.
    InitFailed(String),
}

/// Most payload bytes a frame may claim: the guest sends at most 64 KiB; a larger
/// length means the stream is corrupt.
const MAX_FRAME: u32 = 1 << 20;

/// Where the streams go and what the end was; shared with the caller.
pub struct Demux {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    pending: Vec<u8>,
    end: Arc<Mutex<Option<GuestEnd>>>,
    /// Set once the stream was not frames: the rest is ignored.
    corrupt: bool,
}

impl Demux {
    /// Writes the command's stdout to `out` and stderr to `err`; the end is stored
    /// in the returned cell when its frame arrives.
    pub fn new(
        out: Box<dyn Write + Send>,
        err: Box<dyn Write + Send>,
    ) -> (Demux, Arc<Mutex<Option<GuestEnd>>>) {
        let end = Arc::new(Mutex::new(None));
        (
            Demux {
                out,
                err,
                pending: Vec::new(),
                end: end.clone(),
                corrupt: false,
            },
            end,
        )
    }

    /// Handles every whole frame in `pending`.
    fn drain(&mut self) {
        let mut at = 0;
        while !self.corrupt && self.pending.len() - at >= 5 {
            let kind = self.pending[at];
            let len = u32::from_le_bytes([
                self.pending[at + 1],
                self.pending[at + 2],
                self.pending[at + 3],
                self.pending[at + 4],
            ]);
            if len > MAX_FRAME || !(1..=6).contains(&kind) {
                log::warn!("exec: the guest's channel is corrupt (frame type {kind}, {len} bytes)");
                self.corrupt = true;
                break;
            }
            let end = at + 5 + len as usize;
            if self.pending.len() < end {
                break;
            }
            let body = &self.pending[at + 5..end];
            let word = || {
                body.get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let ended = match kind {
                1 => {
                    // A reader that went away: drop the bytes, keep reading frames.
                    let _ = self.out.write_all(body).and_then(|()| self.out.flush());
                    None
                }
                2 => {
                    let _ = self.err.write_all(body).and_then(|()| self.err.flush());
                    None
                }
                // An exit status is 0-255 and a signal 1-64 (wait(2)); anything
                // else is a broken init or a guest's forgery, and must not turn
                // into this process's status (256 would exit 0).
                3 => word().map(|n| match n {
                    0..=255 => GuestEnd::Exited(n),
                    _ => GuestEnd::InitFailed(format!("the guest reported exit status {n}")),
                }),
                4 => word().map(|s| match s {
                    1..=64 => GuestEnd::Signaled(s),
                    _ => GuestEnd::InitFailed(format!("the guest reported signal {s}")),
                }),
                5 => word().map(|e| GuestEnd::NotStarted(e as i32)),
                _ => Some(GuestEnd::InitFailed(
                    String::from_utf8_lossy(body).trim().to_string(),
                )),
            };
            if let Some(e) = ended {
                let mut cell = self.end.lock().unwrap_or_else(|p| p.into_inner());
                cell.get_or_insert(e);
            }
            at = end;
        }
        self.pending.drain(..at);
    }
}

impl Write for Demux {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.corrupt {
            self.pending.extend_from_slice(buf);
            self.drain();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test reads afterwards.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_anywhere_reach_the_right_stream_and_the_end_is_kept() {
        let (out, err) = (Sink::default(), Sink::default());
        let (mut d, end) = Demux::new(Box::new(out.clone()), Box::new(err.clone()));
        let mut stream = frame(1, b"hello ");
        stream.extend(frame(2, b"oops"));
        stream.extend(frame(1, b"world"));
        stream.extend(frame(3, &42u32.to_le_bytes()));
        // One byte at a time: every split point.
        for b in &stream {
            d.write_all(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hello world");
        assert_eq!(&*err.0.lock().unwrap(), b"oops");
        assert_eq!(*end.lock().unwrap(), Some(GuestEnd::Exited(42)));
    }

    #[test]
    fn a_corrupt_stream_stops_being_read() {
        let out = Sink::default();
        let (mut d, end) = Demux::new(Box::new(out.clone()), Box::new(Sink::default()));
        d.write_all(&frame(9, b"x")).unwrap();
        d.write_all(&frame(3, &0u32.to_le_bytes())).unwrap();
        assert_eq!(*end.lock().unwrap(), None);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn init_failure_and_signal_and_not_started() {
        for (f, want) in [
            (frame(4, &9u32.to_le_bytes()), GuestEnd::Signaled(9)),
            (
                frame(3, &256u32.to_le_bytes()),
                GuestEnd::InitFailed("the guest reported exit status 256".into()),
            ),
            (
                frame(4, &0xffff_ff80u32.to_le_bytes()),
                GuestEnd::InitFailed("the guest reported signal 4294967168".into()),
            ),
            (frame(5, &2u32.to_le_bytes()), GuestEnd::NotStarted(2)),
            (
                frame(6, b"mount virtiofs: No such device\n"),
                GuestEnd::InitFailed("mount virtiofs: No such device".into()),
            ),
        ] {
            let (mut d, end) = Demux::new(Box::new(Sink::default()), Box::new(Sink::default()));
            d.write_all(&f).unwrap();
            assert_eq!(*end.lock().unwrap(), Some(want));
        }
    }
}
