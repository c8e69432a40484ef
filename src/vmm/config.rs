//! `VmConfig`: everything needed to build one VM, validated before any KVM call.
//!
//! Validation happens here, up front, so that a bad flag is reported with a clear
//! message before /dev/kvm is even opened, and nothing has to be torn down.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The command line Linux gets when the user gives none: console on COM1, reboot
/// through the i8042 keyboard controller (which ends the VM), and reboot at once
/// on panic so a crashed guest ends the VM instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Smallest guest RAM accepted. Linux needs a few MiB for itself; 32 MiB leaves room
/// for a small initramfs.
pub const MIN_MEMORY_MIB: u64 = 32;

/// Largest guest RAM accepted: 1 TiB. Memory is mapped lazily (nothing is prefaulted),
/// so the real limit is what the guest touches; this bound only catches typos.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Highest vCPU count minivmm builds tables for. xAPIC IDs are 8 bits and 0xff is the
/// broadcast ID (Intel SDM vol. 3A, 10.6.2.1), so 254 vCPUs (IDs 0..=253) plus the
/// IOAPIC's ID fit. KVM's own limit (KVM_CAP_MAX_VCPUS) is checked when the VM is built.
pub const MAX_VCPUS: u32 = 254;

/// Errors in a VM configuration. Each names the bad value and how to fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The memory size string could not be parsed.
    #[error("memory size {0:?}: {1}; write e.g. 512M, 1.5G, 2G (a bare number is MiB)")]
    BadMemorySize(String, crate::units::SizeError),
    /// The memory size is outside the accepted range.
    #[error(
        "--memory {given} MiB is {which}: minivmm accepts {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB"
    )]
    MemoryOutOfRange {
        /// Requested size in MiB.
        given: u64,
        /// "too small" or "too large".
        which: &'static str,
    },
    /// The duration string could not be parsed.
    #[error(
        "cannot parse duration {0:?}: use e.g. 30s, 2m, 500ms or 1h (a bare number is seconds)"
    )]
    BadDuration(String),
    /// vCPU count is zero or too high.
    #[error("--vcpus {given} is out of range: give 1 to {max}")]
    VcpusOutOfRange {
        /// Requested count.
        given: u32,
        /// The highest count accepted.
        max: u32,
    },
    /// The command line contains a NUL byte, which would end it early in the guest.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A `--disk` value with an unknown option.
    #[error("--disk {0:?}: unknown option {1:?}; use FILE, FILE,ro or FILE,rw")]
    BadDisk(String, String),
    /// A `--share` value that cannot be parsed.
    #[error("--share {0:?}: {1}; use DIR, DIR,ro, DIR,tag=NAME or DIR,tag=NAME,ro")]
    BadShare(String, String),
    /// Two shares with one tag.
    #[error("two --share directories have the tag {0:?}; give each its own with ,tag=NAME")]
    DuplicateTag(String),
    /// More devices than there are interrupt lines for them.
    #[error(
        "{given} virtio devices asked for; minivmm gives a VM at most {max} (one interrupt line each)"
    )]
    TooManyDevices {
        /// Devices asked for.
        given: usize,
        /// The most that fit.
        max: usize,
    },
}

/// Where the guest's serial console (COM1) goes.
pub enum SerialOut {
    /// The process's standard output (and stdin feeds the guest).
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    None,
    /// Any writer, for library users and tests that want to read the console.
    Writer(Box<dyn Write + Send>),
}

impl fmt::Debug for SerialOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOut::Stdout => write!(f, "stdout"),
            SerialOut::File(p) => write!(f, "file {}", p.display()),
            SerialOut::None => write!(f, "none"),
            SerialOut::Writer(_) => write!(f, "writer"),
        }
    }
}

/// Where the guest's serial input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialIn {
    /// Nothing: the guest's receive FIFO stays empty.
    None,
    /// This process's standard input. On a terminal it is switched to raw mode while
    /// the VM runs, and Ctrl-A then `x` stops the VM (as in QEMU).
    Stdin,
}

/// A virtual machine's description: the kernel and what the guest gets.
#[derive(Debug)]
pub struct VmConfig {
    /// Kernel image: bzImage, or ELF vmlinux (with or without a PVH note).
    pub kernel: PathBuf,
    /// Optional initial ramdisk, handed to the kernel as-is.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Stop the VM after this long (the outcome is then a timeout).
    pub timeout: Option<Duration>,
    /// Where COM1's output goes.
    pub serial_out: SerialOut,
    /// Where COM1's input comes from.
    pub serial_in: SerialIn,
    /// Log every VM exit as it happens (for learners; at `info` level).
    pub trace_exits: bool,
    /// Give the VM an 8254 PIT: KVM's (KVM_CREATE_PIT2) with [`IrqChip::Kernel`],
    /// minivmm's (`devices::pit`) with [`IrqChip::Split`]. Linux calibrates its
    /// clocks with it, so it is on by default; a tiny guest that never programs the
    /// timer can go without. With KVM's PIT that saves its kernel thread start-up and
    /// its SRCU waits at teardown, and lets minivmm cut short the irqchip's own wait
    /// (see `delete_memory_slots` in vmm/mod.rs): a VM that lives a few ms ends ~8 ms
    /// sooner. Without it, ports 0x40-0x43 behave like any unclaimed port.
    pub pit: bool,
    /// Where the IOAPIC, the PICs and the PIT are: in KVM, or (split) the IOAPIC and
    /// PIT in minivmm with only the LAPICs in KVM.
    pub irqchip: IrqChip,
    /// Raw disk images, each a virtio-blk device, in this order.
    pub disks: Vec<DiskSpec>,
    /// Host directories shared with the guest, each a virtio-fs device.
    pub shares: Vec<ShareSpec>,
    /// Give the VM a virtio-rng entropy device.
    pub rng: bool,
    /// Give the VM a virtio console (Linux's /dev/hvc0) whose output goes here:
    /// `minivmm exec`'s channel for the command's output and status.
    pub virtio_console: Option<ConsoleOut>,
    /// What a thread's forbidden system call does (`--seccomp`; strict by default).
    pub seccomp: super::seccomp::SeccompMode,
}

/// Where a virtio console's bytes go (any writer; it may block, which holds the
/// guest back rather than losing bytes).
pub struct ConsoleOut(pub Box<dyn Write + Send>);

impl fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a writer")
    }
}

/// One `--share DIR[,tag=T][,ro]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShareSpec {
    /// The host directory.
    pub path: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`); `None`: `shareN`,
    /// N counting the shares from 0.
    pub tag: Option<String>,
    /// The guest cannot change anything in it.
    pub read_only: bool,
    /// The host leaves the tree alone while the VM runs, so the guest may keep file
    /// data, attributes and names cached for as long as it likes: FUSE's KEEP_CACHE
    /// on every open and day-long attribute and entry timeouts (virtiofsd's
    /// `cache=always`). Without it, each open drops the file's cached pages
    /// (close-to-open consistency) and names are looked up again after 5 s: right
    /// for a tree the host edits, dear for a compiler run from the share (cc1 read
    /// again at each exec). `exec` sets it for the host's root.
    pub keep_cache: bool,
}

impl std::str::FromStr for ShareSpec {
    type Err = ConfigError;

    /// Parses `DIR`, `DIR,ro`, `DIR,tag=T` or `DIR,tag=T,ro` (options in any order).
    fn from_str(s: &str) -> Result<ShareSpec, ConfigError> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(ConfigError::BadShare(s.into(), "no directory given".into()));
        }
        let mut spec = ShareSpec {
            path: PathBuf::from(path),
            tag: None,
            read_only: false,
            keep_cache: false,
        };
        for opt in parts {
            match opt {
                "ro" => spec.read_only = true,
                "rw" => spec.read_only = false,
                o => match o.strip_prefix("tag=") {
                    Some(t) if !t.is_empty() && t.len() <= 36 => spec.tag = Some(t.into()),
                    Some(_) => {
                        return Err(ConfigError::BadShare(
                            s.into(),
                            "a tag is 1 to 36 bytes".into(),
                        ));
                    }
                    None => {
                        return Err(ConfigError::BadShare(
                            s.into(),
                            format!("unknown option {o:?}"),
                        ));
                    }
                },
            }
        }
        Ok(spec)
    }
}

/// One `--disk FILE[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// The raw image file.
    pub path: PathBuf,
    /// Opened read-only; the guest's writes fail.
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = ConfigError;

    /// Parses `FILE`, `FILE,ro` or `FILE,rw`.
    fn from_str(s: &str) -> Result<DiskSpec, ConfigError> {
        let (path, opts) = match s.rsplit_once(',') {
            Some((p, o)) if matches!(o, "ro" | "rw") => (p, o),
            Some((_, o)) => return Err(ConfigError::BadDisk(s.to_string(), o.to_string())),
            None => (s, "rw"),
        };
        if path.is_empty() {
            return Err(ConfigError::BadDisk(s.to_string(), String::new()));
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only: opts == "ro",
        })
    }
}

/// Where a VM's interrupt controllers and timer live (`--irqchip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqChip {
    /// KVM_CREATE_IRQCHIP: the two 8259 PICs, the IOAPIC and the LAPICs in the host
    /// kernel, and with the PIT, KVM_CREATE_PIT2.
    Kernel,
    /// KVM_CAP_SPLIT_IRQCHIP: the LAPICs in the host kernel; the IOAPIC
    /// (`devices::ioapic`) and the PIT (`devices::pit`) in minivmm, no 8259s. Cheaper
    /// to create and to tear down: the host kernel has less to build and to wait for.
    /// The default (BENCHMARKS.md, "Split irqchip").
    #[default]
    Split,
}

impl IrqChip {
    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            IrqChip::Kernel => "kernel",
            IrqChip::Split => "split",
        }
    }
}

impl std::str::FromStr for IrqChip {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kernel" => Ok(IrqChip::Kernel),
            "split" => Ok(IrqChip::Split),
            _ => Err(format!("unknown irqchip '{s}': use kernel or split")),
        }
    }
}

impl VmConfig {
    /// A configuration with minivmm's defaults: 1 vCPU, 128 MiB, the default
    /// command line, console discarded, no timeout.
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            memory_mib: 128,
            timeout: None,
            serial_out: SerialOut::None,
            serial_in: SerialIn::None,
            trace_exits: false,
            pit: true,
            irqchip: IrqChip::default(),
            disks: Vec::new(),
            shares: Vec::new(),
            rng: false,
            virtio_console: None,
            seccomp: Default::default(),
        }
    }

    /// Checks the values that can be checked without opening files or /dev/kvm.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpusOutOfRange {
                given: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        check_memory(self.memory_mib)?;
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let tags = self.share_tags();
        for (i, t) in tags.iter().enumerate() {
            if tags[..i].contains(t) {
                return Err(ConfigError::DuplicateTag(t.clone()));
            }
        }
        let devices = self.disks.len()
            + self.shares.len()
            + usize::from(self.rng)
            + usize::from(self.virtio_console.is_some());
        let max = crate::vmm::devices::mmio::DEVICE_IRQS.len();
        if devices > max {
            return Err(ConfigError::TooManyDevices {
                given: devices,
                max,
            });
        }
        Ok(())
    }
}

impl VmConfig {
    /// The tag of each share, defaults filled in (`share0`, `share1`, ...).
    pub fn share_tags(&self) -> Vec<String> {
        self.shares
            .iter()
            .enumerate()
            .map(|(i, s)| s.tag.clone().unwrap_or_else(|| format!("share{i}")))
            .collect()
    }
}

fn check_memory(mib: u64) -> Result<(), ConfigError> {
    let which = if mib < MIN_MEMORY_MIB {
        "too small"
    } else if mib > MAX_MEMORY_MIB {
        "too large"
    } else {
        return Ok(());
    };
    Err(ConfigError::MemoryOutOfRange { given: mib, which })
}

/// Parses a memory size such as `512M`, `1.5G`, `1536MiB` or `64` (MiB) into MiB,
/// with the grammar of [`crate::units`], and checks it is one minivmm accepts. Sizes
/// that are not a whole number of MiB (e.g. `1500K`) are refused.
pub fn parse_memory_mib(s: &str) -> Result<u64, ConfigError> {
    let mib = crate::units::parse_size(s, 20)
        .map_err(|why| ConfigError::BadMemorySize(s.to_string(), why))?;
    check_memory(mib)?;
    Ok(mib)
}

/// Parses a duration such as `30s`, `2m`, `500ms`, `1h` or `10` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::BadDuration(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("1536M"), Ok(1536));
        assert_eq!(parse_memory_mib("64"), Ok(64));
        assert_eq!(parse_memory_mib("5GiB"), Ok(5120));
        assert_eq!(parse_memory_mib("65536k"), Ok(64));
        assert!(matches!(
            parse_memory_mib("1500k"),
            Err(ConfigError::BadMemorySize(..))
        ));
        assert!(matches!(
            parse_memory_mib("lots"),
            Err(ConfigError::BadMemorySize(..))
        ));
        assert!(matches!(
            parse_memory_mib("-5M"),
            Err(ConfigError::BadMemorySize(..))
        ));
        assert!(matches!(
            parse_memory_mib("99999999999999999999G"),
            Err(ConfigError::BadMemorySize(..))
        ));
        assert!(matches!(
            parse_memory_mib("16M"),
            Err(ConfigError::MemoryOutOfRange {
                which: "too small",
                ..
            })
        ));
        assert!(matches!(
            parse_memory_mib("2T"),
            Err(ConfigError::MemoryOutOfRange {
                which: "too large",
                ..
            })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn validate_vcpus() {
        let mut c = VmConfig::new("k");
        c.vcpus = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::VcpusOutOfRange { given: 0, .. })
        ));
        c.vcpus = 255;
        assert!(c.validate().is_err());
        c.vcpus = 4;
        assert!(c.validate().is_ok());
    }
}
