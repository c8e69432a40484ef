//! virtio-blk (virtio 1.2, §5.2): a raw disk image file as the guest's disk.
//!
//! A request is one descriptor chain: a 16-byte header the device reads
//! (`type`, reserved, `sector`), then the data (device-readable for a write,
//! device-writable for a read), then one status byte the device writes (§5.2.6).
//! Sectors are always 512 bytes, whatever the image's block size. Data moves with
//! pread/pwrite straight between the image file and guest RAM, no copy in between.
//!
//! The image is locked with flock(2) when opened — exclusively for a read-write
//! disk, shared for a read-only one — so that two VMs can never write one image,
//! and a read-only disk is opened O_RDONLY: the guest's writes fail with
//! VIRTIO_BLK_S_IOERR and cannot reach the file whatever the driver does.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::vmm::memory::GuestRam;
use virtio_queue::Queue;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::{
    Chain, Counters, VirtioDevice, VirtioError, complete, pop_chain, read_config_bytes,
    read_from_segments, write_to_segments,
};

/// virtio device ID of a block device.
const DEVICE_ID: u32 = 2;
/// A sector, the unit of every address and length in the protocol.
pub const SECTOR: u64 = 512;
/// Entries of the one request queue.
const QUEUE_SIZE: u16 = 256;

/// Feature bits (§5.2.3).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types (§5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Length of the serial GET_ID returns (VIRTIO_BLK_ID_BYTES).
const ID_BYTES: usize = 20;
/// Most data segments per request the device accepts (config `seg_max`): the
/// queue's size less the header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most sectors one discard or write-zeroes segment may cover, and segments per
/// request for them.
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR as u32;
const MAX_DISCARD_SEG: u32 = 1;

/// Errors opening a disk image; each says which file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("--disk {path}: cannot open it: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a regular file (a directory, FIFO, device...).
    #[error(
        "--disk {path}: not a regular file; give a raw disk image (e.g. made with `truncate -s 1G disk.img`)"
    )]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The size is not whole sectors.
    #[error(
        "--disk {path}: its size, {size} bytes, is not a multiple of 512; virtio-blk disks are whole 512-byte sectors (resize it, e.g. `truncate -s 1G`)"
    )]
    NotSectors {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process holds a lock on the image.
    #[error(
        "--disk {path}: the image is in use by another VM (it holds a lock on the file); two VMs must never write one image. Stop the other VM, or give both `,ro`"
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
}

/// A disk's image file, opened and locked, with its size.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl DiskImage {
    /// Opens and locks the raw image at `path`. Done before the VM is built, so a
    /// bad disk is refused before anything starts.
    pub fn open(path: &Path, read_only: bool) -> Result<DiskImage, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        // O_NONBLOCK: opening a FIFO must not wait for a writer; the type check
        // below then refuses it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags_nonblock()
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let size = meta.len();
        if size % SECTOR != 0 {
            return Err(DiskError::NotSectors {
                path: path.to_path_buf(),
                size,
            });
        }
        let how = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked {
                    path: path.to_path_buf(),
                }
            } else {
                open_err(e)
            });
        }
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            sectors: size / SECTOR,
            read_only,
        })
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR
    }
}

/// Opening with O_NONBLOCK, spelled for `OpenOptions`.
trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// The block device: one queue of requests against one image.
pub struct Block {
    disk: DiskImage,
    /// The serial GET_ID returns: the image's file name, cut to 20 bytes.
    serial: [u8; ID_BYTES],
    config: [u8; 60],
    counters: std::sync::Arc<Counters>,
    discard: bool,
}

impl Block {
    /// A block device serving `disk`.
    pub fn new(disk: DiskImage) -> Block {
        let mut serial = [0u8; ID_BYTES];
        let name = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        // Discard punches holes (FALLOC_FL_PUNCH_HOLE); offer it only where the
        // file system can (probed past the end, where a hole changes nothing),
        // and never on a read-only disk.
        let discard = !disk.read_only && punch_hole(&disk.file, disk.size(), SECTOR).is_ok();
        let mut b = Block {
            disk,
            serial,
            config: [0; 60],
            counters: std::sync::Arc::default(),
            discard,
        };
        b.config = b.build_config();
        b
    }

    /// struct virtio_blk_config (§5.2.4), little endian.
    fn build_config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.disk.sectors.to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        if self.discard {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
            c[56] = 1; // write_zeroes_may_unmap
        }
        c
    }

    /// Serves one request; returns the status byte and the bytes written into the
    /// guest's data buffers.
    fn serve(&mut self, mem: &GuestRam, chain: &Chain) -> (u8, u64) {
        let mut header = [0u8; 16];
        if !read_from_segments(mem, &chain.readable, 0, &mut header) {
            log::debug!("virtio-blk: request without a 16-byte header");
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        // The status byte is the last writable byte; the data is everything between.
        let data_in = chain.writable_len().saturating_sub(1);
        let data_out = chain.readable_len().saturating_sub(16);
        match kind {
            T_IN => {
                let r = self.transfer(mem, &chain.writable, sector, data_in, false);
                (r, if r == S_OK { data_in } else { 0 })
            }
            T_OUT if self.disk.read_only => (S_IOERR, 0),
            T_OUT => (
                self.transfer(mem, &chain.readable, sector, data_out, true),
                0,
            ),
            T_FLUSH if self.disk.read_only => (S_OK, 0),
            // A flush returns only once the data is on the file (§5.2.6.1).
            T_FLUSH => match self.disk.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    crate::vmm::ratelimit::warn_limited!(
                        "virtio-blk {}: fdatasync: {e}",
                        self.disk.path.display()
                    );
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = write_to_segments(
                    mem,
                    &chain.writable,
                    0,
                    &self.serial[..(data_in as usize).min(ID_BYTES)],
                );
                (S_OK, n as u64)
            }
            T_DISCARD | T_WRITE_ZEROES if !self.discard => (S_UNSUPP, 0),
            T_DISCARD | T_WRITE_ZEROES => (self.discard(mem, chain, kind == T_WRITE_ZEROES), 0),
            _ => (S_UNSUPP, 0),
        }
    }

    /// Moves `len` bytes between the image at `sector` and the guest buffers
    /// `segs` (after the 16-byte header when writing).
    fn transfer(
        &self,
        mem: &GuestRam,
        segs: &[(GuestAddress, u32)],
        sector: u64,
        len: u64,
        to_disk: bool,
    ) -> u8 {
        let Some(start) = sector.checked_mul(SECTOR) else {
            return S_IOERR;
        };
        if !len.is_multiple_of(SECTOR)
            || start
                .checked_add(len)
                .is_none_or(|end| end > self.disk.size())
        {
            log::debug!(
                "virtio-blk: request past the end or not whole sectors: sector {sector}, {len} bytes"
            );
            return S_IOERR;
        }
        // The request's buffers, as one list for a single preadv/pwritev: a 1 MiB
        // O_DIRECT request comes as up to 254 page-sized segments, and a system
        // call per segment made sequential I/O 1.2-1.5x slower than QEMU's (one
        // vectored call per request) in the nested benchmark. Neighbours that are
        // contiguous in our mapping of guest RAM are merged.
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(segs.len());
        let mut skip = if to_disk { 16u64 } else { 0 };
        let mut left = len;
        for &(addr, seg_len) in segs {
            if left == 0 {
                break;
            }
            let seg_len = u64::from(seg_len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            let Ok(slice) = mem.get_slice(addr.unchecked_add(skip), n as usize) else {
                return S_IOERR;
            };
            // The guest may change this memory while the host reads or writes it,
            // so it is never made a Rust slice: the kernel copies it.
            let ptr = slice.ptr_guard_mut().as_ptr();
            match iov.last_mut() {
                Some(last)
                    if (last.iov_base as usize).wrapping_add(last.iov_len) == ptr as usize =>
                {
                    last.iov_len += n as usize;
                }
                _ => iov.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: n as usize,
                }),
            }
            left -= n;
            skip = 0;
        }
        if left != 0 {
            log::debug!("virtio-blk: buffers shorter than the request ({left} bytes missing)");
            return S_IOERR;
        }
        if let Err(e) = transfer_all(&self.disk.file, &mut iov, start, to_disk) {
            crate::vmm::ratelimit::warn_limited!(
                "virtio-blk {}: I/O of {len} bytes at byte {start}: {e}",
                self.disk.path.display()
            );
            return S_IOERR;
        }
        let counter = if to_disk {
            &self.counters.write_bytes
        } else {
            &self.counters.read_bytes
        };
        counter.fetch_add(len, Ordering::Relaxed);
        S_OK
    }

    /// DISCARD or WRITE_ZEROES: one segment {sector u64, num_sectors u32, flags u32}.
    fn discard(&self, mem: &GuestRam, chain: &Chain, zeroes: bool) -> u8 {
        let mut seg = [0u8; 16];
        if !read_from_segments(mem, &chain.readable, 16, &mut seg) {
            return S_IOERR;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
        let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4])));
        let (Some(start), Some(len)) = (sector.checked_mul(SECTOR), count.checked_mul(SECTOR))
        else {
            return S_IOERR;
        };
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.disk.size())
        {
            return S_IOERR;
        }
        // A punched hole reads back as zeroes, so one call serves both requests.
        let _ = zeroes;
        match punch_hole(&self.disk.file, start, len) {
            Ok(()) => S_OK,
            Err(e) => {
                crate::vmm::ratelimit::warn_limited!(
                    "virtio-blk {}: punching a hole: {e}",
                    self.disk.path.display()
                );
                S_IOERR
            }
        }
    }
}

/// Most buffers one preadv/pwritev takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// preadv(2) (or pwritev(2) when `to_disk`) from `pos` until every buffer in
/// `iov` is done: short transfers go on where they stopped, EINTR retries, and a
/// transfer of nothing is an error (the image is never shorter than a request, so
/// it means the file was truncated, or the host disk is full).
fn transfer_all(
    f: &File,
    iov: &mut [libc::iovec],
    mut pos: u64,
    to_disk: bool,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let rest = &iov[first..];
        let count = rest.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: every iovec points into mapped guest RAM (checked by get_slice)
        // that outlives the call; the kernel reads (pwritev) or writes (preadv) at
        // most the lengths given.
        let r = unsafe {
            if to_disk {
                libc::pwritev(f.as_raw_fd(), rest.as_ptr(), count, pos as libc::off_t)
            } else {
                libc::preadv(f.as_raw_fd(), rest.as_ptr(), count, pos as libc::off_t)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::other(if to_disk {
                "the host wrote nothing (disk full?)"
            } else {
                "the image ended early (was it truncated?)"
            }));
        }
        pos += r as u64;
        // Step past what was done: whole buffers, then part of the next one.
        let mut done = r as usize;
        while done > 0 && first < iov.len() {
            let v = &mut iov[first];
            if done >= v.iov_len {
                done -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `done` < iov_len, so the new base stays inside the buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                v.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees the range; it then reads as zeroes.
fn punch_hole(f: &File, start: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        let mut f = F_SEG_MAX | F_FLUSH;
        if self.disk.read_only {
            f |= F_RO;
        }
        if self.discard {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
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
        let mut used = false;
        while let Some(chain) = pop_chain(queue, index, mem)? {
            let (status, written) = if chain.writable_len() == 0 {
                // No room for the status byte: nothing can be reported back.
                (S_IOERR, 0)
            } else {
                self.serve(mem, &chain)
            };
            // The status byte goes last, after the data.
            let status_at = chain.writable_len().saturating_sub(1);
            write_to_segments(mem, &chain.writable, status_at, &[status]);
            let len = u32::try_from(written + 1).unwrap_or(u32::MAX);
            complete(queue, index, mem, chain.head, len)?;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            used = true;
        }
        Ok(used)
    }

    fn counters(&self) -> &std::sync::Arc<Counters> {
        &self.counters
    }

    fn report(&self) -> (&'static str, Option<String>) {
        ("virtio-blk", Some(self.disk.path.display().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch(name: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("minivmm-blk-{}-{name}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        (path, f)
    }

    /// `n` buffers of `size` bytes each, side by side in `buf` but never merged
    /// (one byte of gap between them), so the loop must walk past IOV_MAX.
    fn iovecs(buf: &mut [u8], n: usize, size: usize) -> Vec<libc::iovec> {
        (0..n)
            .map(|i| libc::iovec {
                iov_base: buf[i * (size + 1)..].as_mut_ptr().cast(),
                iov_len: size,
            })
            .collect()
    }

    #[test]
    fn vectored_io_moves_every_buffer_past_iov_max() {
        let (n, size) = (IOV_MAX * 2 + 37, 5);
        let data: Vec<u8> = (0..n * size).map(|i| (i % 251) as u8).collect();
        let (path, f) = scratch("read", &data);
        let mut buf = vec![0u8; n * (size + 1)];
        let mut iov = iovecs(&mut buf, n, size);
        transfer_all(&f, &mut iov, 0, false).unwrap();
        let got: Vec<u8> = buf
            .chunks(size + 1)
            .flat_map(|c| c[..size].to_vec())
            .collect();
        assert_eq!(got, data);
        // And back out, at an offset, through pwritev.
        let mut iov = iovecs(&mut buf, n, size);
        transfer_all(&f, &mut iov, 3, true).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[3..], &data[..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_short_image_is_an_error_not_a_hang() {
        let (path, f) = scratch("short", &[7u8; 100]);
        let mut buf = vec![0u8; 4 * 65];
        let mut iov = iovecs(&mut buf, 4, 64);
        let e = transfer_all(&f, &mut iov, 0, false).unwrap_err();
        assert!(e.to_string().contains("ended early"), "{e}");
        std::fs::remove_file(path).unwrap();
    }
}
