//! virtio-fs (virtio 1.2, §5.11): a host directory the guest mounts with
//! `mount -t virtiofs TAG /mnt`.
//!
//! The guest's FUSE client sends FUSE requests (the same messages /dev/fuse carries,
//! include/uapi/linux/fuse.h) as descriptor chains: the request readable, room for
//! the reply writable. Cloud Hypervisor's `fuse-backend-rs` decodes them (its
//! `Server`) and serves them from a directory of this host (its `PassthroughFs`),
//! inside this process: no daemon to start or stop. Every lookup is relative to
//! an open file descriptor of the shared directory, with O_NOFOLLOW, and `..` at
//! the root stays at the root, so the guest cannot reach outside it: symbolic links
//! are resolved by the guest in its own name space, never by the host.
//!
//! fuse-backend-rs is built on vm-memory 0.17 and virtio-queue 0.17, one version
//! behind the rest of minivmm, so this device keeps a second, 0.17 view of the same
//! guest RAM mappings, and for each request it follows the transport's queue with a
//! 0.17 queue set to the same rings and indices.
//!
//! A read-only share (`,ro`) is enforced between the server and the passthrough
//! (`fs_guard`), on the request as the server decoded it: every FUSE operation that
//! could change the directory gets EROFS, and so does an OPEN for writing or
//! truncation.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::vmm::memory::GuestRam;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};

use super::fs_guard::Guarded;
use virtio_queue::{Queue, QueueT};
use virtio_queue_fs::QueueT as _;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{
    Chain, Counters, VirtioDevice, VirtioError, complete, pop_chain, read_config_bytes,
    read_from_segments, write_to_segments,
};

/// virtio device ID of a file system device.
const DEVICE_ID: u32 = 26;
/// Entries of each queue. A FUSE request is one chain: its headers plus one
/// descriptor per page of data, and the server takes writes of up to 1 MiB (256
/// pages). Without indirect descriptors a chain must fit in the ring, and a driver
/// that cannot place one waits for room forever (seen: Linux 6.1's virtiofs hung
/// on a 1 MiB write with 256 entries), so the ring has room for the largest.
const QUEUE_SIZE: u16 = 1024;
/// Queues: 0 is the high-priority queue (FORGET, INTERRUPT), 1 the one request queue.
const QUEUES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
/// The tag is at most 36 bytes (config `tag[36]`, not NUL-terminated when full).
pub const TAG_MAX: usize = 36;

/// FUSE_INIT: its reply is widened to 1 MiB requests (`widen_init_reply`).
const INIT: u32 = 26;
/// `FUSE_MAX_PAGES` in `fuse_init_in.flags` / `fuse_init_out.flags`: the driver
/// takes `max_pages` from the reply instead of its default of 32 pages.
const FUSE_MAX_PAGES: u32 = 1 << 22;
/// `FUSE_BIG_WRITES`: without it Linux sends one page per WRITE whatever
/// `max_write` says (fuse_fill_write_pages stops after a page).
const FUSE_BIG_WRITES: u32 = 1 << 5;
/// Pages per request the server accepts (its `MAX_BUFFER_SIZE`, 1 MiB).
const MAX_PAGES: u16 = 256;
/// Bytes of `struct fuse_in_header`.
const IN_HEADER: usize = 40;

/// Errors setting up a share; each says which directory and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// Not a directory (or missing).
    #[error("--share {path}: not a directory ({why}); give a host directory to share")]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        why: String,
    },
    /// The tag is empty or too long.
    #[error(
        "--share tag {tag:?}: a tag is 1 to {TAG_MAX} bytes; the guest mounts it with `mount -t virtiofs TAG DIR`"
    )]
    BadTag {
        /// The tag.
        tag: String,
    },
    /// fuse-backend-rs refused the directory.
    #[error("--share {path}: cannot serve it: {source}")]
    Server {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Guest memory could not be described to the FUSE server.
    #[error("virtio-fs: cannot map guest memory for the FUSE server: {0}")]
    Memory(String),
}

/// The file system device.
pub struct Fs {
    server: Server<Guarded>,
    /// The same guest RAM, as vm-memory 0.17 sees it (fuse-backend-rs's version).
    mem: vm_memory_fs::GuestMemoryMmap,
    tag: String,
    dir: PathBuf,
    config: [u8; 40],
    counters: std::sync::Arc<Counters>,
}

impl Fs {
    /// Serves `dir` under `tag`; `mem` is the VM's guest memory. `keep_cache`: see
    /// [`crate::vmm::config::ShareSpec::keep_cache`].
    pub fn new(
        dir: &Path,
        tag: &str,
        read_only: bool,
        keep_cache: bool,
        mem: &GuestRam,
    ) -> Result<Fs, ShareError> {
        if tag.is_empty() || tag.len() > TAG_MAX {
            return Err(ShareError::BadTag { tag: tag.into() });
        }
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ShareError::NotADirectory {
                    path: dir.into(),
                    why: "it is a file".into(),
                });
            }
            Err(e) => {
                return Err(ShareError::NotADirectory {
                    path: dir.into(),
                    why: e.to_string(),
                });
            }
        }
        let server_err = |source| ShareError::Server {
            path: dir.into(),
            source,
        };
        let root = dir.canonicalize().map_err(server_err)?;
        // PassthroughFs wants the root as a string; a path that is not UTF-8
        // cannot be given to it.
        let root_str = root
            .to_str()
            .ok_or_else(|| server_err(std::io::Error::other("the path is not valid UTF-8")))?;
        let mut cfg = Config {
            root_dir: root_str.to_string(),
            do_import: true,
            ..Default::default()
        };
        if keep_cache {
            const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
            cfg.cache_policy = CachePolicy::Always;
            cfg.attr_timeout = DAY;
            cfg.entry_timeout = DAY;
        }
        raise_open_file_limit();
        let fs = PassthroughFs::<()>::new(cfg).map_err(server_err)?;
        import(&fs).map_err(server_err)?;
        let mut config = [0u8; 40];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[36..40].copy_from_slice(&1u32.to_le_bytes()); // num_request_queues
        Ok(Fs {
            server: Server::new(Guarded::new(fs, read_only)),
            mem: memory_view(mem)?,
            tag: tag.into(),
            dir: root,
            config,
            counters: std::sync::Arc::default(),
        })
    }
}

/// Opens the shared directory for `fs` (`PassthroughFs::import`), keeping the
/// process's umask. import() clears the umask (umask(0), so that the guest's modes
/// are applied as it gives them), and the umask belongs to the whole process: every
/// file minivmm (or a program embedding it) created afterwards, starting with the
/// --serial-out file, would be world-writable. So it is put back; the worker thread,
/// where FUSE_INIT imports again, has a umask of its own (worker.rs).
pub(super) fn import(fs: &PassthroughFs<()>) -> std::io::Result<()> {
    // SAFETY: umask(2) only swaps the process's file mode creation mask.
    let old = unsafe { libc::umask(0) };
    let imported = fs.import();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    imported
}

/// The passthrough file system keeps an open (O_PATH) descriptor for every file the
/// guest has looked up and not yet forgotten, and Linux forgets only when its inode
/// cache shrinks: reading a tree of 2,000 files took 2,000 descriptors, past the
/// usual soft limit of 1,024 (seen: EMFILE in the guest). So, as virtiofsd does, the
/// process's RLIMIT_NOFILE is raised once: the soft limit to the hard one, and both
/// to the kernel's `fs.nr_open` when the process may (CAP_SYS_RESOURCE).
fn raise_open_file_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit(2) fills the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
        if let Some(max) = nr_open.filter(|m| *m > lim.rlim_max) {
            let want = libc::rlimit {
                rlim_cur: max,
                rlim_max: max,
            };
            // SAFETY: setrlimit(2) with a valid struct; refused without the privilege.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
                log::debug!("virtio-fs: open file limit raised to {max}");
                return;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                ..lim
            };
            // SAFETY: as above; raising the soft limit up to the hard one is allowed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
                log::debug!("virtio-fs: open file limit raised to {}", lim.rlim_max);
            }
        }
    });
}

/// A vm-memory 0.17 `GuestMemoryMmap` over the same host mappings as `mem`. The
/// regions are borrowed (`build_raw` mappings are never unmapped by vm-memory). The
/// view is only read through while a request is served, by the `VirtioMmio` that
/// owns this device, and that transport also holds a clone of `mem` (whose regions
/// are reference-counted), declared after the device so that it drops after it: the
/// mappings outlive every use of the view. Dropping the view touches no memory.
fn memory_view(mem: &GuestRam) -> Result<vm_memory_fs::GuestMemoryMmap, ShareError> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        // SAFETY: `r.as_ptr()` is the start of a live mapping of `r.len()` bytes,
        // readable and writable, kept alive for every use of this view (see above).
        let mapping = unsafe {
            vm_memory_fs::MmapRegion::build_raw(
                r.as_ptr(),
                r.len() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|e| ShareError::Memory(e.to_string()))?;
        let region = vm_memory_fs::GuestRegionMmap::new(
            mapping,
            vm_memory_fs::GuestAddress(r.start_addr().0),
        )
        .ok_or_else(|| ShareError::Memory("a region wraps past 2^64".into()))?;
        regions.push(region);
    }
    vm_memory_fs::GuestMemoryMmap::from_regions(regions)
        .map_err(|e| ShareError::Memory(e.to_string()))
}

impl VirtioDevice for Fs {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, VirtioError> {
        // A 0.17 queue on the same rings, at the same place, for fuse-backend-rs.
        let mut mirror = virtio_queue_fs::Queue::new(queue.max_size())
            .map_err(|_| VirtioError::BadRings(index))?;
        mirror.set_size(queue.size());
        let ok = mirror
            .try_set_desc_table_address(vm_memory_fs::GuestAddress(queue.desc_table()))
            .and_then(|()| {
                mirror.try_set_avail_ring_address(vm_memory_fs::GuestAddress(queue.avail_ring()))
            })
            .and_then(|()| {
                mirror.try_set_used_ring_address(vm_memory_fs::GuestAddress(queue.used_ring()))
            });
        if ok.is_err() {
            return Err(VirtioError::BadRings(index));
        }
        mirror.set_ready(true);
        mirror.set_next_avail(queue.next_avail());
        let mut used = false;
        // pop_chain checks the chain (no loop, every buffer in RAM) and advances the
        // transport's queue; the mirror then takes the same chain off its ring.
        while let Some(chain) = pop_chain(queue, index, mem)? {
            let Some(desc_chain) = mirror.pop_descriptor_chain(&self.mem) else {
                return Err(VirtioError::EndlessChain {
                    queue: index,
                    head: chain.head,
                });
            };
            let written = self.serve(desc_chain);
            widen_init_reply(mem, &chain, written);
            complete(queue, index, mem, chain.head, written)?;
            // For a share the counters are FUSE traffic: requests in, replies out.
            let c = &self.counters;
            c.write_bytes
                .fetch_add(chain.readable_len(), Ordering::Relaxed);
            c.read_bytes
                .fetch_add(u64::from(written), Ordering::Relaxed);
            c.requests.fetch_add(1, Ordering::Relaxed);
            used = true;
        }
        Ok(used)
    }

    fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.counters
    }

    fn report(&self) -> (&'static str, Option<String>) {
        (
            "virtio-fs",
            Some(format!("{} (tag {})", self.dir.display(), self.tag)),
        )
    }
}

impl Fs {
    /// Hands one request to the FUSE server; returns the bytes of its reply.
    fn serve(
        &self,
        desc_chain: virtio_queue_fs::DescriptorChain<&vm_memory_fs::GuestMemoryMmap>,
    ) -> u32 {
        let reader = match Reader::from_descriptor_chain(&self.mem, desc_chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("virtio-fs: request unreadable: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(&self.mem, desc_chain) {
            Ok(w) => w,
            Err(e) => {
                log::debug!("virtio-fs: reply buffers unusable: {e}");
                return 0;
            }
        };
        match self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            Ok(n) => n as u32,
            Err(e) => {
                // A malformed request: the server could not even answer it.
                log::debug!("virtio-fs: {e}");
                0
            }
        }
    }
}

/// fuse-backend-rs answers FUSE_INIT with `max_write` of 4 KiB and without
/// `FUSE_BIG_WRITES` unless the file system asks for them, which `PassthroughFs`
/// does not, so Linux would send every write of a share as 4 KiB requests. When the
/// driver offered MAX_PAGES and BIG_WRITES and the server accepted INIT, this turns
/// them on in the reply: `max_pages` becomes 256 and `max_write` 1 MiB, what the
/// server accepts for one WRITE. Offsets are `struct fuse_init_out`'s after the
/// 16-byte `fuse_out_header`: flags at 28, max_write at 36, max_pages at 44.
fn widen_init_reply(mem: &GuestRam, chain: &Chain, written: u32) {
    // fuse_in_header, then fuse_init_in { major, minor, max_readahead, flags }.
    let mut req = [0u8; IN_HEADER + 16];
    if written < 48 || !read_from_segments(mem, &chain.readable, 0, &mut req) {
        return;
    }
    let word = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let wanted = FUSE_MAX_PAGES | FUSE_BIG_WRITES;
    if word(&req, 4) != INIT || word(&req, IN_HEADER + 12) & wanted != wanted {
        return;
    }
    let mut reply = [0u8; 48];
    if !read_from_segments(mem, &chain.writable, 0, &mut reply) || word(&reply, 4) != 0 {
        return; // the server refused INIT: leave its error alone
    }
    let flags = word(&reply, 28) | wanted;
    reply[28..32].copy_from_slice(&flags.to_le_bytes());
    reply[36..40].copy_from_slice(&(u32::from(MAX_PAGES) * 4096).to_le_bytes());
    reply[44..46].copy_from_slice(&MAX_PAGES.to_le_bytes());
    write_to_segments(mem, &chain.writable, 0, &reply);
}
