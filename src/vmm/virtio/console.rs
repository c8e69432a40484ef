//! virtio-console (virtio 1.2, §5.3) with one port and no features: a byte stream
//! from the guest to a writer of the host. Linux binds it as /dev/hvc0.
//!
//! Queue 0 (receiveq) would carry bytes to the guest; nothing is ever sent, so its
//! buffers stay with the device. Queue 1 (transmitq) carries the guest's bytes: each
//! chain is readable buffers only, which are copied to the writer in order and
//! given back with a used length of 0 (the device wrote nothing). The writer may
//! block (a pipe the host's reader is slow to drain): the guest's driver then waits
//! for its buffers, which is back-pressure, not loss. Once the writer fails (a
//! closed pipe) the bytes are counted as dropped and the guest goes on.

use crate::vmm::memory::GuestRam;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::Queue;

use super::{Counters, VirtioDevice, VirtioError, complete, pop_chain, read_from_segments};

/// virtio device ID of a console.
const DEVICE_ID: u32 = 3;
/// Entries of each queue.
const QUEUE_SIZE: u16 = 128;
/// Bytes copied at a time from a chain to the writer.
const PIECE: usize = 64 * 1024;
/// The transmit queue's index.
const TRANSMITQ: usize = 1;

/// A console whose output goes to `out`.
pub struct Console {
    out: Box<dyn Write + Send>,
    /// Set once `out` failed; later bytes are dropped.
    failed: bool,
    counters: Arc<Counters>,
}

impl Console {
    /// A console writing what the guest sends to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Console {
        Console {
            out,
            failed: false,
            counters: Arc::default(),
        }
    }

    /// Copies the chain's readable bytes to the writer.
    fn forward(&mut self, mem: &GuestRam, chain: &super::Chain) {
        let total = chain.readable_len();
        let mut buf = vec![0u8; PIECE.min(total as usize)];
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(PIECE as u64) as usize;
            if !read_from_segments(mem, &chain.readable, done, &mut buf[..n]) {
                return; // pop_chain checked the buffers: cannot happen
            }
            done += n as u64;
            if self.failed {
                continue;
            }
            if let Err(e) = self
                .out
                .write_all(&buf[..n])
                .and_then(|()| self.out.flush())
            {
                log::warn!("virtio-console: the output failed ({e}); the rest is dropped");
                self.failed = true;
                continue;
            }
            self.counters
                .write_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl VirtioDevice for Console {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        0 // no F_SIZE, no F_MULTIPORT: one port, configuration unused
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, VirtioError> {
        if index != TRANSMITQ {
            return Ok(false); // receive buffers wait for input that never comes
        }
        let mut used = false;
        while let Some(chain) = pop_chain(queue, index, mem)? {
            self.forward(mem, &chain);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            complete(queue, index, mem, chain.head, 0)?;
            used = true;
        }
        Ok(used)
    }

    fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn report(&self) -> (&'static str, Option<String>) {
        ("virtio-console", None)
    }
}
