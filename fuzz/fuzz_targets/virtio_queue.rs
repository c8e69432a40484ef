//! What a guest driver controls in a virtio device: the transport's registers and
//! everything in its rings and buffers. Whatever it writes, the device serves valid
//! requests, refuses the rest (DEVICE_NEEDS_RESET) and never panics, loops or
//! touches memory outside guest RAM.
//!
//! Input: byte 0 picks the device (bits 0–1: virtio-blk, read-only virtio-blk, a
//! read-only virtio-fs share, virtio-console), the queue (bit 2) and the mode (bit 7 clear: a driver
//! that sets the queue up by the book, then the fuzzer's bytes are the guest RAM
//! holding the rings and requests; bit 7 set: the bytes are register accesses,
//! 7 bytes each, and a notify serves the queue). Byte 1 is log2 of the queue size.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use minivmm::vmm::devices::mmio::{MmioDevice, MmioSlot};
use minivmm::vmm::memory::create_guest_memory;
use minivmm::vmm::virtio::{VirtioDevice, VirtioMmio, block, console, fs};
use minivmm::vmm::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM the rings and buffers live in, from RAM_BASE.
const RAM_BASE: u64 = 0x1000;
const RAM_WINDOW: usize = 64 << 10;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x5000;

struct Setup {
    mem: GuestRam,
    disk_path: String,
    share: PathBuf,
    _disk: std::fs::File,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd was just created and is owned by nothing else.
        let disk = unsafe { std::fs::File::from_raw_fd(fd) };
        disk.set_len(64 << 10).expect("size the disk");
        // scripts/fuzz.sh gives a scratch directory it removes afterwards.
        let scratch =
            std::env::var_os("MINIVMM_FUZZ_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let share = scratch.join(format!("share-{}", std::process::id()));
        std::fs::create_dir_all(share.join("dir")).expect("share dir");
        std::fs::write(share.join("file"), b"hello from the host\n").expect("share file");
        std::fs::write(share.join("dir/inner"), vec![7u8; 9000]).expect("share file");
        Setup {
            mem: create_guest_memory(2).expect("guest memory"),
            disk_path: format!("/proc/self/fd/{}", disk.as_raw_fd()),
            share,
            _disk: disk,
        }
    })
}

fn device(kind: u8, s: &Setup) -> Option<Box<dyn VirtioDevice>> {
    Some(match kind & 3 {
        0 | 1 => {
            let img = block::DiskImage::open(s.disk_path.as_ref(), kind & 3 == 1).ok()?;
            Box::new(block::Block::new(img))
        }
        2 => Box::new(fs::Fs::new(&s.share, "fuzz", true, false, &s.mem).ok()?),
        _ => Box::new(console::Console::new(Box::new(std::io::sink()))),
    })
}

fn w(dev: &VirtioMmio, offset: u64, v: u32) {
    dev.write(offset, &v.to_le_bytes());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let s = setup();
    let Some(d) = device(data[0], s) else {
        return;
    };
    let slot = MmioSlot::nth(0).expect("slot 0");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let dev = VirtioMmio::new(d, s.mem.clone(), irq, slot).expect("transport");
    let window = vec![0u8; RAM_WINDOW];
    s.mem
        .write_slice(&window, GuestAddress(RAM_BASE))
        .expect("clear RAM");
    let body = &data[2..];

    if data[0] & 0x80 == 0 {
        // A driver that follows the spec (§3.1.1, §4.2.3.2) for queue q.
        let q = u32::from(data[0] >> 2 & 1);
        let size = 1u32 << (data[1] % 9);
        w(&dev, 0x070, 1); // ACKNOWLEDGE
        w(&dev, 0x070, 3); // DRIVER
        w(&dev, 0x024, 1); // DriverFeaturesSel: bits 32-63
        w(&dev, 0x020, 1); // VIRTIO_F_VERSION_1
        w(&dev, 0x070, 11); // FEATURES_OK
        w(&dev, 0x030, q);
        w(&dev, 0x038, size);
        w(&dev, 0x080, DESC as u32);
        w(&dev, 0x090, AVAIL as u32);
        w(&dev, 0x0a0, USED as u32);
        w(&dev, 0x044, 1);
        w(&dev, 0x070, 15); // DRIVER_OK
        let n = body.len().min(RAM_WINDOW);
        s.mem
            .write_slice(&body[..n], GuestAddress(RAM_BASE))
            .expect("fill RAM");
        dev.process_queue(q as usize);
        // The driver then acknowledges and the device is asked again.
        w(&dev, 0x064, 1);
        dev.process_queue(q as usize);
    } else {
        for op in body.chunks_exact(7) {
            let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
            let v = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
            let len = [1usize, 2, 4, 4][usize::from(op[2] & 3)];
            if op[2] & 0x80 != 0 {
                let mut buf = [0u8; 4];
                dev.read(offset, &mut buf[..len]);
            } else if offset == 0x050 {
                dev.process_queue(v as usize);
            } else {
                dev.write(offset, &v.to_le_bytes()[..len]);
            }
        }
    }
});
