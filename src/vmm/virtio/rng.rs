//! virtio-rng, the entropy device (virtio 1.2, §5.4): one queue of device-writable
//! buffers, each given back filled with random bytes from the host's getrandom(2).
//! A guest kernel seeds its own random pool from it at boot instead of waiting for
//! enough interrupt timing noise.

use crate::vmm::memory::GuestRam;
use std::sync::atomic::Ordering;

use virtio_queue::Queue;

use super::{Counters, VirtioDevice, VirtioError, complete, pop_chain, write_to_segments};

/// virtio device ID of an entropy source.
const DEVICE_ID: u32 = 4;
/// Entries of the request queue.
const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request: a driver asking for more gets this much
/// (used.len says how many), so one request cannot make the host allocate at will.
const MAX_BYTES: usize = 64 * 1024;

/// The entropy device. It has no configuration and no feature bits of its own.
#[derive(Default)]
pub struct Rng {
    counters: std::sync::Arc<Counters>,
}

impl VirtioDevice for Rng {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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
        let mut used = false;
        while let Some(chain) = pop_chain(queue, index, mem)? {
            let want = (chain.writable_len() as usize).min(MAX_BYTES);
            let mut buf = vec![0u8; want];
            let n = match getrandom(&mut buf) {
                Ok(()) => write_to_segments(mem, &chain.writable, 0, &buf),
                Err(e) => {
                    crate::vmm::ratelimit::warn_limited!("virtio-rng: getrandom: {e}");
                    0
                }
            };
            self.counters
                .read_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            complete(queue, index, mem, chain.head, n as u32)?;
            used = true;
        }
        Ok(used)
    }

    fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.counters
    }

    fn report(&self) -> (&'static str, Option<String>) {
        ("virtio-rng", None)
    }
}

/// Fills `buf` from the kernel's random pool (getrandom(2), blocking only before
/// the host's pool is initialised, which is long past on a running host).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most rest.len() bytes into `rest`.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += r as usize;
        }
    }
    Ok(())
}
