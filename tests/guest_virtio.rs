//! The virtio guest under minivmm: virtio-blk disks (`--disk FILE[,ro]`) and the
//! virtio-rng device (`--rng`) on their virtio-mmio transports, driven by hand from a tiny
//! guest (guest/virtio.c): reads, writes that must reach the host file (or fail on a
//! read-only disk), flush, serial, multi-buffer requests, interrupts; illegal
//! descriptor chains that must leave a device DEVICE_NEEDS_RESET and not hurt
//! minivmm; and the `--disk` refusals (bad files, an image another VM holds).

mod common;
mod guest_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use guest_support::*;

const SECTOR: usize = 512;
const VMM_ERROR: i32 = 125;
const USAGE: i32 = 2;

/// 32-bit FNV-1a, as the guest sums sectors.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What the guest writes to sector `s` of the disk that is virtio device `dev`
/// (guest/virtio.c, blk_pattern).
fn pattern(dev: u32, s: u32) -> Vec<u8> {
    let mut p: Vec<u8> = (0..SECTOR as u32)
        .map(|j| (j * 7 + 3 + s * 13 + dev * 29) as u8)
        .collect();
    let text = format!("minivmm virtio-blk {dev} wrote sector {s}\n");
    p[..text.len()].copy_from_slice(text.as_bytes());
    p
}

/// A raw image of `size` bytes whose sector 0 starts with "disk-TAG sector 0 ",
/// and whose other bytes are a pattern with no zero runs. Returns its contents.
fn make_disk(path: &Path, size: usize, tag: u32) -> Vec<u8> {
    let mut d: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 | 1)
        .collect();
    let text = format!("disk-{tag} sector 0 of a minivmm test\n");
    d[..text.len()].copy_from_slice(text.as_bytes());
    std::fs::write(path, &d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the virtio guest with 64M, no PIT, a 20 s timeout and these extra flags.
fn run_virtio(kernel: &str, cmdline: &str, extra: &[&str]) -> Run {
    let mut flags = vec!["--no-pit", "--no-ledger"];
    flags.extend_from_slice(extra);
    run_with(kernel, cmdline, 1, "64M", "20s", Input::None, &flags)
}

/// Checks the line `virtio: dev N at ADDR irq IRQ id ID` and returns IRQ.
fn dev_line(r: &Run, n: u32, addr: u64, id: u32) -> u32 {
    let prefix = format!("virtio: dev {n} at {addr:#x} irq ");
    let line = r.line(&prefix);
    let rest = &line[prefix.len()..];
    let (irq, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    assert_eq!(tail, format!("id {id}"), "{line}\n{}", r.ctx());
    let irq: u32 = irq
        .parse()
        .unwrap_or_else(|_| panic!("{line}\n{}", r.ctx()));
    // The line really went up and reached the CPU: the device's vector, routed on the
    // IOAPIC, is pending in the LAPIC's IRR after the first request.
    r.assert_line(&format!("virtio: dev {n} irq {irq} lapic irr 0->1"));
    irq
}

/// Several requests made available with one notify, and enough requests that the
/// ring indexes wrap round the queue size.
fn check_queue_use(r: &Run, dev: u32) {
    r.assert_line(&format!("virtio-blk {dev}: 4 requests in one notify ok"));
    let prefix = format!("virtio-blk {dev}: ");
    assert!(
        r.console
            .lines()
            .any(|l| l.starts_with(&prefix) && l.ends_with(" reads ok (ring wrapped)")),
        "no ring wrap-round line for device {dev}\n{}",
        r.ctx()
    );
}

/// The lines every read-write disk `dev` gives, with `before` its contents at the
/// start; then the host file must hold the guest's sectors 1-5 and nothing else new.
fn check_rw_disk(r: &Run, dev: u32, cap: usize, before: &[u8], file: &Path) {
    let after = std::fs::read(file).unwrap();
    let b = |l: &str| format!("virtio-blk {dev}: {l}");
    r.assert_line(&b(&format!("capacity {cap} ro 0")));
    r.assert_line(&b(&format!(
        "sector 0 sum {:08x}",
        fnv1a(&before[..SECTOR])
    )));
    r.assert_line(&b(&format!(
        "sector 0 text \"{}\"",
        String::from_utf8_lossy(&before[..16])
    )));
    let serial = r.line(&b("serial "));
    assert!(
        !serial.contains("(none"),
        "GET_ID failed: {serial}\n{}",
        r.ctx()
    );
    r.assert_line(&b("write status 0"));
    r.assert_line(&b("flush status 0"));
    r.assert_line(&b("readback ok"));
    r.assert_line(&b("write 4 sectors in 2 buffers status 0"));
    r.assert_line(&b(&format!(
        "read 8 sectors in 2 buffers sum {:08x} ok",
        fnv1a(&after[..8 * SECTOR])
    )));
    check_queue_use(r, dev);
    r.assert_line(&b("read past end status 1"));
    r.assert_line(&b("unknown type status 2"));

    assert_eq!(after.len(), before.len(), "{} changed size", file.display());
    assert!(after[..SECTOR] == before[..SECTOR], "sector 0 changed");
    for sector in 1..6u32 {
        let at = sector as usize * SECTOR;
        assert!(
            after[at..at + SECTOR] == pattern(dev, sector)[..],
            "sector {sector} of {} is not what guest device {dev} wrote:\n{:?}\n{}",
            file.display(),
            String::from_utf8_lossy(&after[at..at + 48]),
            r.ctx()
        );
    }
    assert!(
        after[6 * SECTOR..] == before[6 * SECTOR..],
        "{} changed beyond sector 5",
        file.display()
    );
}

#[test]
fn one_disk_reads_writes_and_flushes_to_the_host_file() {
    if !common::kvm_or_skip("one_disk_reads_writes_and_flushes_to_the_host_file") {
        return;
    }
    for kernel in both("virtio") {
        let dir = common::scratch(&format!("virtio-one-disk-{kernel}"));
        let disk = dir.join("disk.img");
        let before = make_disk(&disk, 1 << 20, 0);
        let r = run_virtio(&kernel, "", &["--disk", s(&disk), "--rng"]);
        r.assert_end("debug-exit", 33);
        r.assert_line("virtio: found 2 devices");
        let irq_blk = dev_line(&r, 0, 0xd000_0000, 2);
        let irq_rng = dev_line(&r, 1, 0xd000_1000, 4);
        assert_ne!(irq_blk, irq_rng, "{}", r.ctx());
        check_rw_disk(&r, 0, 2048, &before, &disk);
        r.line("virtio-rng 1: got 64 bytes, ");
        r.assert_line("virtio: ok");
        assert!(!r.stderr.contains("panicked"), "{}", r.ctx());
    }
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    if !common::kvm_or_skip("read_only_disk_refuses_writes_and_stays_unchanged") {
        return;
    }
    for kernel in both("virtio") {
        let dir = common::scratch(&format!("virtio-ro-disk-{kernel}"));
        let disk = dir.join("disk.img");
        let before = make_disk(&disk, 1 << 20, 0);
        let arg = format!("{},ro", s(&disk));
        let r = run_virtio(&kernel, "", &["--disk", &arg]);
        r.assert_end("debug-exit", 33);
        dev_line(&r, 0, 0xd000_0000, 2);
        r.assert_line("virtio-blk 0: capacity 2048 ro 1");
        r.assert_line(&format!(
            "virtio-blk 0: sector 0 sum {:08x}",
            fnv1a(&before[..SECTOR])
        ));
        r.assert_line("virtio-blk 0: write status 1");
        r.assert_line("virtio-blk 0: ro sector 1 unchanged");
        assert!(
            !r.console.contains("virtio-blk 0: flush"),
            "no flush on a ro disk\n{}",
            r.ctx()
        );
        r.assert_line(&format!(
            "virtio-blk 0: read 8 sectors in 2 buffers sum {:08x} ok",
            fnv1a(&before[..8 * SECTOR])
        ));
        check_queue_use(&r, 0);
        r.assert_line("virtio-blk 0: read past end status 1");
        r.assert_line("virtio-blk 0: unknown type status 2");
        r.assert_line("virtio: ok");
        let after = std::fs::read(&disk).unwrap();
        assert!(after == before, "the read-only image changed\n{}", r.ctx());
    }
}

#[test]
fn two_disks_each_on_its_own_address_and_irq() {
    if !common::kvm_or_skip("two_disks_each_on_its_own_address_and_irq") {
        return;
    }
    for kernel in both("virtio") {
        let dir = common::scratch(&format!("virtio-two-disks-{kernel}"));
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        let before_a = make_disk(&a, 1 << 20, 0);
        let before_b = make_disk(&b, 256 << 10, 1);
        let r = run_virtio(&kernel, "", &["--disk", s(&a), "--disk", s(&b), "--rng"]);
        r.assert_end("debug-exit", 33);
        r.assert_line("virtio: found 3 devices");
        let irqs = [
            dev_line(&r, 0, 0xd000_0000, 2),
            dev_line(&r, 1, 0xd000_1000, 2),
            dev_line(&r, 2, 0xd000_2000, 4),
        ];
        assert!(
            irqs[0] != irqs[1] && irqs[1] != irqs[2] && irqs[0] != irqs[2],
            "irqs {irqs:?}\n{}",
            r.ctx()
        );
        // Each device is its own file: disk a is device 0, b device 1.
        check_rw_disk(&r, 0, 2048, &before_a, &a);
        check_rw_disk(&r, 1, 512, &before_b, &b);
        r.line("virtio-rng 2: got 64 bytes, ");
        r.assert_line("virtio: ok");
    }
}

#[test]
fn rng_gives_random_bytes_and_is_there_only_with_the_flag() {
    if !common::kvm_or_skip("rng_gives_random_bytes_and_is_there_only_with_the_flag") {
        return;
    }
    for kernel in both("virtio") {
        let r = run_virtio(&kernel, "", &["--rng"]);
        r.assert_end("debug-exit", 33);
        r.assert_line("virtio: found 1 devices");
        dev_line(&r, 0, 0xd000_0000, 4);
        let line = r.line("virtio-rng 0: got 64 bytes, ");
        // 64 random bytes have about 56 distinct values; 16 or fewer is not chance.
        let distinct: u32 = line
            .trim_start_matches("virtio-rng 0: got 64 bytes, ")
            .trim_end_matches(" distinct")
            .parse()
            .unwrap_or_else(|_| panic!("{line}\n{}", r.ctx()));
        assert!(distinct > 16, "{line}\n{}", r.ctx());
        r.assert_line("virtio: ok");

        let r = run_virtio(&kernel, "", &[]);
        r.assert_end("debug-exit", 33);
        r.assert_line("virtio: found 0 devices");
        assert!(!r.console.contains(" id 4"), "{}", r.ctx());
        r.assert_line("virtio: ok");
    }
    // A disk without --rng: the disk alone, at the first slot.
    let dir = common::scratch("virtio-no-rng-disk");
    let disk = dir.join("disk.img");
    make_disk(&disk, 64 << 10, 0);
    let r = run_virtio("virtio.elf", "", &["--disk", s(&disk)]);
    r.assert_end("debug-exit", 33);
    r.assert_line("virtio: found 1 devices");
    dev_line(&r, 0, 0xd000_0000, 2);
    r.assert_line("virtio-blk 0: capacity 128 ro 0");
    assert!(!r.console.contains("virtio-rng"), "{}", r.ctx());
}

#[test]
fn hostile_requests_need_a_reset_and_the_device_recovers() {
    if !common::kvm_or_skip("hostile_requests_need_a_reset_and_the_device_recovers") {
        return;
    }
    for kernel in both("virtio") {
        let dir = common::scratch(&format!("virtio-hostile-{kernel}"));
        let disk = dir.join("disk.img");
        let before = make_disk(&disk, 1 << 20, 0);
        let r = run_virtio(
            &kernel,
            "virtio.mode=hostile",
            &["--disk", s(&disk), "--rng"],
        );
        r.assert_end("debug-exit", 33);
        r.assert_line("virtio-hostile: queue 99 num-max 0 ready 0");
        r.assert_line("virtio-hostile: read-only registers unchanged");
        r.line("virtio-hostile: odd accesses survived");
        for case in [
            "loop",
            "read after write",
            "bad address",
            "bad next",
            "bad head",
            "rng loop",
        ] {
            r.assert_line(&format!("virtio-hostile: {case} -> needs-reset"));
            // §2.1.2: DEVICE_NEEDS_RESET with DRIVER_OK set comes with a
            // configuration change notification (InterruptStatus bit 1).
            let line = r.line(&format!("virtio-hostile: {case} interrupt-status 0x"));
            let isr = u32::from_str_radix(line.rsplit("0x").next().unwrap(), 16).unwrap();
            assert!(isr & 2 != 0, "{line}\n{}", r.ctx());
        }
        let huge = r.line("virtio-hostile: huge length -> ");
        assert!(
            huge.ends_with("needs-reset") || huge.ends_with("ioerr"),
            "{huge}\n{}",
            r.ctx()
        );
        // Each of these is judged in hostile_queue_set_up_is_never_run.
        for case in QUEUE_SET_UP_CASES {
            r.line(&format!("virtio-hostile: {case} -> "));
        }
        r.assert_line("virtio-hostile: no VERSION_1 -> features-ok 0");
        r.assert_line("virtio-hostile: unoffered feature -> features-ok 0");
        r.assert_line("virtio-hostile: recovered");
        r.assert_line("virtio: ok");
        assert!(!r.stderr.contains("panicked"), "{}", r.ctx());
        assert!(
            std::fs::read(&disk).unwrap() == before,
            "hostile reads changed the image\n{}",
            r.ctx()
        );
    }
}

/// Hostile mode's queues set up against §2.7 and §4.2.3.2.
const QUEUE_SET_UP_CASES: [&str; 5] = [
    "rings outside ram",
    "misaligned rings",
    "queue-num above max",
    "queue-num 3",
    "queue-num 0",
];

/// A queue the driver set up against the spec — rings outside RAM, a descriptor
/// table not 16-byte aligned, a size of 0, 3 or above QueueNumMax — must never be
/// served: either QueueReady does not stick or the first notify leaves the device
/// DEVICE_NEEDS_RESET. Serving it anyway means serving a ring at an address or with
/// a size the driver never gave (the refused value silently replaced by the old one).
#[test]
fn hostile_queue_set_up_is_never_run() {
    if !common::kvm_or_skip("hostile_queue_set_up_is_never_run") {
        return;
    }
    let dir = common::scratch("virtio-hostile-queue");
    let disk = dir.join("disk.img");
    make_disk(&disk, 64 << 10, 0);
    let r = run_virtio("virtio.elf", "virtio.mode=hostile", &["--disk", s(&disk)]);
    r.assert_end("debug-exit", 33);
    let wrong: Vec<&str> = QUEUE_SET_UP_CASES
        .iter()
        .map(|case| r.line(&format!("virtio-hostile: {case} -> ")))
        .filter(|l| !l.ends_with("-> needs-reset") && !l.ends_with("-> not ready"))
        .collect();
    assert!(
        wrong.is_empty(),
        "queues set up against the spec were served:\n{}\n{}",
        wrong.join("\n"),
        r.ctx()
    );
}

/// `run --disk ARG` with the hello guest: must fail before the VM runs.
fn refused(arg: &str, status: &[i32], needles: &[&str]) {
    let mut c = common::minivmm();
    c.args(["run", "--no-ledger", "--no-pit", "--timeout", "10s"])
        .arg("--kernel")
        .arg(guest("hello.elf"))
        .args(["--disk", arg])
        .args(["--serial", "none"]);
    let o = common::output(c);
    let err = common::stderr(&o);
    assert!(
        o.status.code().is_some_and(|c| status.contains(&c)),
        "--disk {arg}: status {:?}, expected one of {status:?}; stderr:\n{err}",
        o.status.code()
    );
    for n in needles {
        assert!(err.contains(n), "--disk {arg}: no {n:?} in stderr:\n{err}");
    }
    assert!(!err.contains("panicked"), "minivmm panicked: {err}");
}

#[test]
fn bad_disk_files_are_refused() {
    let dir = common::scratch("virtio-bad-disks");
    let missing = dir.join("missing.img");
    refused(s(&missing), &[VMM_ERROR], &[s(&missing)]);
    refused(s(&dir), &[VMM_ERROR], &[s(&dir)]);
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    refused(s(&odd), &[VMM_ERROR], &[s(&odd), "512"]);
    let good = dir.join("good.img");
    std::fs::write(&good, vec![1u8; 4096]).unwrap();
    refused(
        &format!("{},bogus", s(&good)),
        &[USAGE, VMM_ERROR],
        &["bogus"],
    );
    // Nothing was written to the refused files.
    assert_eq!(std::fs::read(&odd).unwrap(), vec![1u8; 1000]);
    assert_eq!(std::fs::read(&good).unwrap(), vec![1u8; 4096]);
}

/// A VM holding `disk` (the spin guest, up to 20 s), once its console shows it runs.
struct Holder(std::process::Child);

impl Holder {
    fn start(dir: &Path, disk_arg: &str) -> Holder {
        let console = dir.join("holder-console.txt");
        let _ = std::fs::remove_file(&console);
        let mut c = common::minivmm();
        c.args(["run", "--no-ledger", "--no-pit", "--timeout", "20s"])
            .arg("--kernel")
            .arg(guest("spin.elf"))
            .args(["--cmdline", "mode=hlt"])
            .args(["--disk", disk_arg])
            .arg("--serial-out")
            .arg(&console)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = Holder(c.spawn().expect("cannot start minivmm"));
        let start = Instant::now();
        loop {
            let seen = std::fs::read_to_string(&console).unwrap_or_default();
            if seen.contains("spin: spinning") {
                return child;
            }
            if let Ok(Some(st)) = child.0.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
                panic!("the VM holding {disk_arg} ended early ({st}): {err}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "the VM holding {disk_arg} did not start within 15 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `run --disk ARG` while another VM holds the image: the virtio guest's result.
fn second_vm(arg: &str) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let mut c = common::minivmm();
    c.args(["run", "--no-ledger", "--no-pit", "--timeout", "20s"])
        .arg("--kernel")
        .arg(guest("virtio.elf"))
        .args(["--disk", arg])
        .args(["--serial", "none"]);
    let o = common::output(c);
    (o.status.code(), common::stderr(&o), start.elapsed())
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused() {
    if !common::kvm_or_skip("a_disk_in_use_by_another_vm_is_refused") {
        return;
    }
    let dir: PathBuf = common::scratch("virtio-disk-in-use");
    let disk = dir.join("disk.img");
    let before = make_disk(&disk, 64 << 10, 0);
    let ro = format!("{},ro", s(&disk));

    // Read-write held: neither a read-write nor a read-only second VM.
    {
        let _holder = Holder::start(&dir, s(&disk));
        for arg in [s(&disk), ro.as_str()] {
            let (status, err, took) = second_vm(arg);
            assert_eq!(status, Some(VMM_ERROR), "--disk {arg}: {err}");
            assert!(
                err.contains(s(&disk)) && err.contains("lock"),
                "--disk {arg}: the error should name the image and its lock: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                took < Duration::from_secs(5),
                "--disk {arg}: refused only after {took:?}: it must not wait for the lock"
            );
        }
    }
    // Read-only held: another read-only VM shares it, a read-write one is refused.
    {
        let _holder = Holder::start(&dir, &ro);
        let (status, err, _) = second_vm(&ro);
        assert_eq!(status, Some(33), "a second ,ro VM: {err}");
        let (status, err, _) = second_vm(s(&disk));
        assert_eq!(status, Some(VMM_ERROR), "rw while held ro: {err}");
        assert!(err.contains("lock"), "{err}");
    }
    // Once the holder is gone the image is free again.
    let (status, err, _) = second_vm(s(&disk));
    assert_eq!(status, Some(33), "after the holder ended: {err}");
    let after = std::fs::read(&disk).unwrap();
    assert!(after[..SECTOR] == before[..SECTOR]);
    assert!(after[SECTOR..2 * SECTOR] == pattern(0, 1)[..]);
}
