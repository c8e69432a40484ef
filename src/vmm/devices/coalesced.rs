//! KVM's coalesced I/O ring: writes to a registered port that KVM keeps instead of
//! exiting to userspace for each one.
//!
//! Linux prints its console a byte at a time (the 8250 driver's polled console:
//! read LSR until THRE, write THR), and each IN or OUT is a VM exit; nested, each
//! costs about 100 µs, so a boot's few thousand console bytes took about half its
//! time. With KVM_REGISTER_COALESCED_MMIO (`pio = 1`, KVM_CAP_COALESCED_PIO, Linux
//! 4.21+) on COM1's data port, KVM appends each OUT there to a ring in a page it
//! shares with userspace (mmap of a vCPU fd at page KVM_COALESCED_MMIO_PAGE_OFFSET)
//! and resumes the guest at once; the LSR read still exits, so the byte count of
//! exits halves. When the ring is full the write exits as usual.
//!
//! What the ring costs is ordering: a write sits in the ring until someone drains
//! it. So every access to the UART drains the ring first (the guest cannot see a
//! register before its earlier writes took effect), the VM's end drains it (a
//! guest's last bytes before its debug-exit), and so does a slow tick (a guest that
//! writes THR and never looks at the UART again). It is the same page for every
//! vCPU: KVM fills it, the one consumer (whoever holds COM1's lock) empties it.
//!
//! Layout (`struct kvm_coalesced_mmio_ring`, include/uapi/linux/kvm.h): `u32 first`
//! (the consumer's index, ours), `u32 last` (KVM's), then entries of 24 bytes:
//! `u64 phys_addr` (the port), `u32 len`, `u32 pio`, `u8 data[8]`. It holds
//! `(PAGE_SIZE - 8) / 24` entries (170 with 4 KiB pages); KVM leaves one free to tell
//! full from empty.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes before the first entry: `first` and `last`.
const HEADER: usize = 8;
/// One `struct kvm_coalesced_mmio`.
const ENTRY: usize = 24;

/// The shared ring page of one VM.
pub struct Ring {
    page: NonNull<u8>,
    page_size: usize,
    /// Entries in the page, as KVM computes it (KVM_COALESCED_MMIO_MAX).
    capacity: u32,
    /// Whether this struct mapped the page (and so unmaps it).
    mapped: bool,
}

// SAFETY: the page is plain shared memory. KVM writes entries and `last`; this side
// writes only `first`, through `drain`, whose callers hold the one lock of the
// device the ring belongs to (see `Devices::com1`), so there is one consumer.
unsafe impl Send for Ring {}
// SAFETY: as above; `&Ring` methods touch the page only through atomics and
// volatile reads.
unsafe impl Sync for Ring {}

impl Ring {
    /// Maps the VM's ring page through `vcpu` (any vCPU fd gives the same page).
    pub fn map(vcpu: &impl std::os::fd::AsRawFd) -> io::Result<Ring> {
        // SAFETY: sysconf has no preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let offset = kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size;
        // SAFETY: a new shared mapping of one page of the vCPU fd, at the offset
        // where KVM serves the coalesced ring; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Ring {
            page,
            page_size,
            capacity: ((page_size - HEADER) / ENTRY) as u32,
            mapped: true,
        })
    }

    /// The ring in memory the caller owns, 8-aligned, of `page_size` bytes, for tests
    /// that play KVM's part.
    #[cfg(test)]
    fn in_memory(page: &mut [u64]) -> Ring {
        let page_size = std::mem::size_of_val(page);
        Ring {
            page: NonNull::new(page.as_mut_ptr().cast()).unwrap(),
            page_size,
            capacity: ((page_size - HEADER) / ENTRY) as u32,
            mapped: false,
        }
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offsets 0 and 4 are the page's two u32 indices, 4-aligned in a
        // page-aligned mapping that lives as long as `self`.
        unsafe { &*self.page.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// Whether KVM has appended anything not yet drained.
    pub fn is_empty(&self) -> bool {
        self.index(0).load(Ordering::Relaxed) == self.index(4).load(Ordering::Acquire)
    }

    /// Hands every entry, oldest first, to `each` as (port or address, data), and
    /// frees it for KVM. Returns how many there were. The caller must be the only
    /// consumer (see the type's doc).
    pub fn drain(&self, mut each: impl FnMut(u64, &[u8])) -> usize {
        let first = self.index(0);
        let mut at = first.load(Ordering::Relaxed);
        // Acquire: the entries KVM wrote before it moved `last` are visible.
        let last = self.index(4).load(Ordering::Acquire);
        if last >= self.capacity {
            // Not something KVM writes; nothing sane to read.
            return 0;
        }
        let mut n = 0;
        while at != last {
            if at >= self.capacity {
                at = 0;
                continue;
            }
            let base = HEADER + at as usize * ENTRY;
            // SAFETY: `at < capacity`, so the entry lies inside the page (a byte
            // array needs no alignment); volatile because KVM shares the page.
            let entry = unsafe {
                self.page
                    .as_ptr()
                    .add(base)
                    .cast::<[u8; ENTRY]>()
                    .read_volatile()
            };
            let addr = u64::from_ne_bytes(entry[0..8].try_into().unwrap_or_default());
            let len = u32::from_ne_bytes(entry[8..12].try_into().unwrap_or_default());
            each(addr, &entry[16..16 + (len as usize).min(8)]);
            at = (at + 1) % self.capacity;
            n += 1;
            // Release: KVM may reuse the entry only after we read it.
            first.store(at, Ordering::Release);
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: the mapping made in `map`, unmapped once.
            unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends as KVM's coalesced_mmio_write does: entry at `last`, then `last`.
    /// Through the ring's own pointer, as KVM writes the page behind our back.
    fn push(ring: &Ring, port: u64, data: &[u8]) {
        let last = ring.index(4).load(Ordering::Relaxed);
        let base = HEADER + last as usize * ENTRY;
        let mut entry = [0u8; ENTRY];
        entry[0..8].copy_from_slice(&port.to_ne_bytes());
        entry[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        entry[12..16].copy_from_slice(&1u32.to_ne_bytes());
        entry[16..16 + data.len()].copy_from_slice(data);
        // SAFETY: `last < capacity`, so the entry lies inside the page.
        unsafe {
            std::ptr::copy_nonoverlapping(entry.as_ptr(), ring.page.as_ptr().add(base), ENTRY)
        };
        ring.index(4)
            .store((last + 1) % ring.capacity, Ordering::Release);
    }

    #[test]
    fn drains_in_order_across_the_wrap_and_frees_the_entries() {
        let mut page = vec![0u64; 512]; // 4 KiB
        let ring = Ring::in_memory(&mut page);
        assert_eq!(ring.capacity, 170);
        assert!(ring.is_empty());
        let mut seen = Vec::new();
        // 400 bytes through a ring of 170: it wraps twice.
        for chunk in (0..400u32).collect::<Vec<_>>().chunks(100) {
            for &i in chunk {
                push(&ring, 0x3f8, &[i as u8]);
            }
            assert!(!ring.is_empty());
            let n = ring.drain(|port, data| {
                assert_eq!(port, 0x3f8);
                seen.extend_from_slice(data);
            });
            assert_eq!(n, chunk.len());
            assert!(ring.is_empty());
        }
        let want: Vec<u8> = (0..400u32).map(|i| i as u8).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn an_index_out_of_the_ring_reads_nothing() {
        let mut page = vec![0u64; 512];
        let ring = Ring::in_memory(&mut page);
        ring.index(4).store(999, Ordering::Release);
        assert_eq!(ring.drain(|_, _| panic!("read past the ring")), 0);
    }
}
