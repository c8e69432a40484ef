//! Linux drives minivmm's virtio devices: an ext4 disk written from both sides, a
//! read-only disk, a shared directory written from both sides that the guest cannot
//! leave, a read-only share, and the entropy device.
//!
//! The guest's script comes on its first disk (/dev/vda, the script's text padded
//! with NULs): the initramfs built for these tests runs whatever it finds there. On
//! hardware KVM (scripts/test-nested-kvm.sh runs this file in its outer VM) the
//! kernel reaches /init, mounts the ext4 image on /dev/vdb, checksums a 64 MiB file
//! the host wrote, writes a 64 MiB file of its own, and the host then reads that
//! file back out of the image with debugfs and checks the file system with e2fsck.
//! Under PVM the kernel stops long before userspace, so there the test can show
//! only that the devices reach the kernel's command line.
//!
//! Three kernels: the MP-table one finds the devices on its command line
//! (`virtio_mmio.device=`), the ACPI one only in the DSDT (`LNRO0005`), as
//! distribution kernels do, and Debian's cloud kernel, with its modules.

mod common;
use common::linux::*;
use common::scratch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1";
const LIMIT: Duration = Duration::from_secs(300);
/// Size of the file written from each side, as the issue asks: big enough that it
/// cannot all sit in one request or one cache.
const FILE_MIB: u32 = 64;

/// The guest's side, run by /init from /dev/vda.
const SCRIPT: &str = r#"set -e
mkdir -p /mnt
echo "virtio-test: block $(ls /sys/block | tr '\n' ' ')"
mount -t ext4 /dev/vdb /mnt
echo "virtio-test: host.bin $(sha256sum /mnt/host.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/mnt/guest.bin bs=1M count=64 2>/dev/null
echo "virtio-test: guest.bin $(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
umount /mnt
sync
echo "virtio-test: vdc ro=$(cat /sys/block/vdc/ro)"
if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync 2>/dev/null; then
    echo "virtio-test: read-only disk written"
else
    echo "virtio-test: read-only disk refused the write"
fi
mount -o ro -t ext4 /dev/vdc /mnt
echo "virtio-test: ro file $(cat /mnt/hello.txt)"
umount /mnt
mkdir -p /share /ro
mount -t virtiofs hostdir /share
echo "virtio-test: share host.txt $(cat /share/host.txt)"
echo "virtio-test: share big.bin $(sha256sum /share/big.bin | cut -d' ' -f1)"
dd if=/dev/urandom of=/share/guest.bin bs=1M count=SHARE_MIB 2>/dev/null
echo "virtio-test: share guest.bin $(sha256sum /share/guest.bin | cut -d' ' -f1)"
mkdir /share/made-by-guest
echo "virtio-test: share .. is the guest's own: $(ls /share/.. | tr '\n' ' ')"
cat /share/../secret.txt 2>/dev/null && echo "virtio-test: ESCAPED through .." || true
cat /share/up/secret.txt 2>/dev/null && echo "virtio-test: ESCAPED through a relative link" || true
cat /share/abs/secret.txt 2>/dev/null && echo "virtio-test: ESCAPED through an absolute link" || true
ln /share/host.txt /share/hard.txt && echo "virtio-test: share hard link made"
ln /share/../init /share/outside.txt 2>/dev/null && echo "virtio-test: ESCAPED through a hard link" || true
umount /share
mount -t virtiofs rodir /ro
echo "virtio-test: ro share $(cat /ro/hello.txt)"
touch /ro/new 2>/dev/null && echo "virtio-test: ro share written" || echo "virtio-test: ro share refused a new file"
(echo x >> /ro/hello.txt) 2>/dev/null && echo "virtio-test: ro share appended" || echo "virtio-test: ro share refused an append"
rm /ro/hello.txt 2>/dev/null && echo "virtio-test: ro share lost a file" || echo "virtio-test: ro share refused a removal"
umount /ro
echo "virtio-test: rng $(cat /sys/class/misc/hw_random/rng_current)"
echo "virtio-test: rng bytes $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)"
echo "virtio-test: done"
"#;

/// Runs a host tool (from e2fsprogs, coreutils or busybox) and returns its stdout.
fn tool(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (e2fsprogs installed?)", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `mib` MiB of random bytes to `file` and returns their SHA-256.
fn random_file(file: &Path, mib: u32) -> String {
    tool(&[
        "dd",
        "if=/dev/urandom",
        &format!("of={}", file.display()),
        "bs=1M",
        &format!("count={mib}"),
    ]);
    sha256(file)
}

/// A script disk: the script's text, padded with NULs to 4 KiB (the initramfs
/// strips them before running it).
fn write_script(file: &Path, text: &str) {
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(4096, 0);
    std::fs::write(file, bytes).unwrap();
}

/// An ext4 image of `size` (mke2fs syntax), holding `tree` if given.
fn mkfs_ext4(image: &Path, size: &str, tree: Option<&Path>) {
    let mut args = vec![
        "mke2fs".to_string(),
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
    ];
    if let Some(t) = tree {
        args.extend(["-d".to_string(), t.display().to_string()]);
    }
    args.extend([image.display().to_string(), size.to_string()]);
    tool(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn sha256(file: &Path) -> String {
    let out = tool(&["sha256sum", &file.to_string_lossy()]);
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The three disks: the script, a 160 MiB ext4 image holding `host.bin`, and a
/// small ext4 image holding `hello.txt` for the read-only disk.
struct Disks {
    dir: PathBuf,
    script: PathBuf,
    data: PathBuf,
    ro: PathBuf,
    host_sha: String,
    share: PathBuf,
    share_ro: PathBuf,
    big_sha: String,
}

/// The disks, shares and script of one boot.
fn make_disks(name: &str) -> Disks {
    let dir = scratch(name);
    let script = dir.join("script.img");
    let script_text = SCRIPT.replace("SHARE_MIB", &FILE_MIB.to_string());
    write_script(&script, &script_text);

    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let host_bin = tree.join("host.bin");
    let host_sha = random_file(&host_bin, FILE_MIB);
    let data = dir.join("data.img");
    mkfs_ext4(&data, "160M", Some(&tree));
    std::fs::remove_file(&host_bin).unwrap();

    let ro_tree = dir.join("ro-tree");
    std::fs::create_dir_all(&ro_tree).unwrap();
    std::fs::write(ro_tree.join("hello.txt"), "from the host").unwrap();
    let ro = dir.join("ro.img");
    mkfs_ext4(&ro, "8M", Some(&ro_tree));
    // The shares live in dir/shares/; dir/shares/secret.txt is outside both.
    let shares = dir.join("shares");
    let share = shares.join("rw");
    let share_ro = shares.join("ro");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&share_ro).unwrap();
    std::fs::write(shares.join("secret.txt"), "host secret").unwrap();
    std::fs::write(share.join("host.txt"), "hello from the host").unwrap();
    std::os::unix::fs::symlink("..", share.join("up")).unwrap();
    std::os::unix::fs::symlink(&shares, share.join("abs")).unwrap();
    let big_sha = random_file(&share.join("big.bin"), FILE_MIB);
    std::fs::write(share_ro.join("hello.txt"), "read-only from the host").unwrap();
    Disks {
        dir,
        script,
        data,
        ro,
        host_sha,
        share,
        share_ro,
        big_sha,
    }
}

fn disk_args(d: &Disks) -> Vec<String> {
    vec![
        "--disk".into(),
        d.script.display().to_string(),
        "--disk".into(),
        d.data.display().to_string(),
        "--disk".into(),
        format!("{},ro", d.ro.display()),
        "--share".into(),
        format!("{},tag=hostdir", d.share.display()),
        "--share".into(),
        format!("{},tag=rodir,ro", d.share_ro.display()),
        "--rng".into(),
    ]
}

fn line_value(b: &Boot, prefix: &str) -> String {
    b.console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line: {}", b.ctx()))
        .trim()
        .to_string()
}

/// Boots `kernel` with the three disks and checks both sides.
fn disks_work(test: &str, kernel_var: &str, initrd_var: &str) {
    let Some(f) = files_or_skip(test, &[kernel_var, initrd_var]) else {
        return;
    };
    if !hardware_kvm() {
        // PVM: the kernel stops early, but its command line shows the devices.
        let dir = scratch(&format!("{test}-pvm"));
        let mut args = Vec::new();
        for name in ["a.img", "b.img", "c.img"] {
            let p = dir.join(name);
            std::fs::write(&p, vec![0u8; 4096]).unwrap();
            args.extend(["--disk".to_string(), p.display().to_string()]);
        }
        args.push("--rng".into());
        // Wait for the whole list, not just "Command line:": the serial port
        // prints a byte per exit, so the line arrives over many milliseconds.
        let want = vec![
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:10"
                .to_string(),
        ];
        let b = boot_with(
            &BootSpec {
                kernel: &f[0],
                initrd: &f[1],
                cmdline: CMDLINE,
                vcpus: 1,
                memory: "256M",
                want: &want,
                limit: LIMIT,
            },
            &args,
        );
        b.assert_console_has(&want);
        return;
    }
    let d = make_disks(test);
    let ro_before = std::fs::read(&d.ro).unwrap();
    let b = boot_with(
        &BootSpec {
            kernel: &f[0],
            initrd: &f[1],
            cmdline: CMDLINE,
            vcpus: 2,
            memory: "256M",
            want: &[],
            limit: LIMIT,
        },
        &disk_args(&d),
    );
    b.assert_full_boot(2, "reboot -f", "reset");
    // Debian's modules all loaded (build-initramfs.sh --insmod says when not).
    b.assert_console_lacks(&["minivmm-init: insmod"]);
    b.assert_console_has(&["virtio-test: done".to_string()]);
    assert_eq!(
        line_value(&b, "virtio-test: block "),
        "vda vdb vdc",
        "{}",
        b.ctx()
    );
    // The guest read exactly what the host wrote...
    assert_eq!(
        line_value(&b, "virtio-test: host.bin "),
        d.host_sha,
        "{}",
        b.ctx()
    );
    // ...and the host reads exactly what the guest wrote, in a file system e2fsck
    // finds clean after the guest's sync.
    let out = d.dir.join("guest.bin");
    tool(&[
        "debugfs",
        "-R",
        &format!("dump /guest.bin {}", out.display()),
        &d.data.to_string_lossy(),
    ]);
    assert_eq!(
        sha256(&out),
        line_value(&b, "virtio-test: guest.bin "),
        "{}",
        b.ctx()
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        u64::from(FILE_MIB) << 20
    );
    tool(&["e2fsck", "-f", "-n", &d.data.to_string_lossy()]);
    // The read-only disk: flagged, the write refused, the image untouched.
    assert_eq!(line_value(&b, "virtio-test: vdc ro="), "1", "{}", b.ctx());
    b.assert_console_has(&[
        "virtio-test: read-only disk refused the write".to_string(),
        "virtio-test: ro file from the host".to_string(),
        "virtio-test: rng virtio_rng.0".to_string(),
        "virtio-test: rng bytes 64".to_string(),
    ]);
    assert!(
        std::fs::read(&d.ro).unwrap() == ro_before,
        "the read-only image changed"
    );
    // The shared directory, both ways, and nothing outside it.
    b.assert_console_has(&[
        "virtio-test: share host.txt hello from the host".to_string(),
        "virtio-test: share hard link made".to_string(),
        "virtio-test: ro share read-only from the host".to_string(),
    ]);
    b.assert_console_has(&[
        "virtio-test: ro share refused a new file".to_string(),
        "virtio-test: ro share refused an append".to_string(),
        "virtio-test: ro share refused a removal".to_string(),
    ]);
    b.assert_console_lacks(&[
        "ESCAPED",
        "ro share written",
        "ro share appended",
        "ro share lost",
    ]);
    assert_eq!(
        line_value(&b, "virtio-test: share big.bin "),
        d.big_sha,
        "{}",
        b.ctx()
    );
    assert_eq!(
        sha256(&d.share.join("guest.bin")),
        line_value(&b, "virtio-test: share guest.bin "),
        "{}",
        b.ctx()
    );
    assert!(d.share.join("made-by-guest").is_dir());
    assert_eq!(
        std::fs::read_to_string(d.share.join("hard.txt")).unwrap(),
        "hello from the host"
    );
    assert!(!d.share.join("outside.txt").exists());
    assert_eq!(
        std::fs::read_to_string(d.share_ro.join("hello.txt")).unwrap(),
        "read-only from the host"
    );
    assert!(!d.share_ro.join("new").exists());
    // minivmm's own account of the traffic.
    let json: serde_json::Value = serde_json::from_str(
        b.stdout
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or("{}"),
    )
    .unwrap();
    let data = &json["devices"][1];
    assert_eq!(data["kind"], "virtio-blk", "{json}");
    assert!(
        data["read_bytes"].as_u64().unwrap_or(0) >= u64::from(FILE_MIB) << 20,
        "{json}"
    );
    assert!(
        data["write_bytes"].as_u64().unwrap_or(0) >= u64::from(FILE_MIB) << 20,
        "{json}"
    );
    assert_eq!(json["devices"][2]["write_bytes"], 0, "{json}");
    let share = &json["devices"][3];
    assert_eq!(share["kind"], "virtio-fs", "{json}");
    // The guest's 64 MiB went to the share in requests of up to 1 MiB (FUSE_INIT's
    // max_pages, fs.rs), not 4 KiB pages: 16,384 writes alone at 4 KiB.
    assert!(
        share["write_bytes"].as_u64().unwrap_or(0) >= u64::from(FILE_MIB) << 20,
        "{json}"
    );
    assert!(
        share["requests"].as_u64().unwrap_or(u64::MAX) < 4000,
        "{json}"
    );
    assert_eq!(json["devices"][5]["kind"], "virtio-rng", "{json}");
    for dev in json["devices"].as_array().unwrap() {
        assert_eq!(dev["broken"], false, "{json}");
    }
    let _ = std::fs::remove_dir_all(&d.dir);
}

#[test]
fn minimal_kernel_uses_cmdline_virtio_devices() {
    disks_work(
        "minimal_kernel_uses_cmdline_virtio_devices",
        "MINIVMM_LINUX_VMLINUX",
        "MINIVMM_INITRAMFS_DISK_SCRIPT",
    );
}

#[test]
fn acpi_kernel_finds_virtio_devices_in_the_dsdt() {
    disks_work(
        "acpi_kernel_finds_virtio_devices_in_the_dsdt",
        "MINIVMM_LINUX_ACPI_VMLINUX",
        "MINIVMM_INITRAMFS_DISK_SCRIPT",
    );
}

/// Debian's cloud kernel has virtio-mmio, virtio-blk, virtio-rng and virtio-fs as
/// modules (loaded by the initramfs, from the same package) and no command-line
/// devices: it finds every device in the DSDT.
#[test]
fn debian_kernel_finds_virtio_devices_in_the_dsdt() {
    disks_work(
        "debian_kernel_finds_virtio_devices_in_the_dsdt",
        "MINIVMM_DEBIAN_VMLINUX",
        "MINIVMM_INITRAMFS_DISK_SCRIPT_DEBIAN",
    );
}

/// What the guest wrote and flushed survives minivmm being killed mid-write: a
/// flush (fsync, sync) returns only once the data is in the image file
/// (fdatasync), so after SIGKILL e2fsck repairs nothing that was flushed and the
/// flushed file reads back whole.
#[test]
fn a_flush_survives_sigkill_mid_write() {
    let test = "a_flush_survives_sigkill_mid_write";
    let Some(f) = files_or_skip(
        test,
        &["MINIVMM_LINUX_VMLINUX", "MINIVMM_INITRAMFS_DISK_SCRIPT"],
    ) else {
        return;
    };
    if !hardware_kvm() {
        // Under PVM Linux never reaches the disk; tests/guest_virtio.rs covers
        // flush there.
        return;
    }
    let dir = scratch(test);
    let script = dir.join("script.img");
    let text = r#"mkdir -p /mnt
mount -t ext4 /dev/vdb /mnt
dd if=/dev/urandom of=/mnt/before.bin bs=1M count=8 2>/dev/null
sha=$(sha256sum /mnt/before.bin | cut -d' ' -f1)
sync
echo "virtio-test: synced $sha"
i=0
while true; do
    dd if=/dev/urandom of=/mnt/after$i.bin bs=1M count=4 2>/dev/null
    i=$((i + 1))
    [ $i != 2 ] || echo "virtio-test: still writing"
done
"#;
    write_script(&script, text);
    let data = dir.join("data.img");
    mkfs_ext4(&data, "128M", None);
    let d = data.to_string_lossy().into_owned();
    // Let it write for a while after the sync, then kill it.
    let want = vec![
        "virtio-test: synced".to_string(),
        "virtio-test: still writing".to_string(),
    ];
    let b = boot_until(
        &BootSpec {
            kernel: &f[0],
            initrd: &f[1],
            cmdline: CMDLINE,
            vcpus: 2,
            memory: "256M",
            want: &want,
            limit: LIMIT,
        },
        &[
            "--disk".into(),
            script.display().to_string(),
            "--disk".into(),
            d.clone(),
        ],
        9,
    );
    assert!(
        b.stopped_by_test,
        "the guest ended before the kill: {}",
        b.ctx()
    );
    let sha = line_value(&b, "virtio-test: synced ");
    // e2fsck replays the journal; 0 or 1 (replayed/corrected) is a sound file system.
    let out = Command::new("e2fsck")
        .args(["-f", "-y", &d])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "e2fsck after SIGKILL: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let before = dir.join("before.bin");
    tool(&[
        "debugfs",
        "-R",
        &format!("dump /before.bin {}", before.display()),
        &d,
    ]);
    assert_eq!(sha256(&before), sha, "the flushed file changed");
    let _ = std::fs::remove_dir_all(&dir);
}
