//! What a client asks for in `POST /v1/vms`, and how the agent checks it: every
//! field typed (unknown fields are refused, so a typo is an error, not a default),
//! the name safe as a directory name, and every file the VM will open resolved
//! inside one of the agent's `--images` directories, so that a client of the socket
//! can run VMs but never make minivmm read the host's other files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vmm::config;

/// What to do when a VM's process ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it ended.
    #[default]
    Never,
    /// Start it again when it ended with a non-zero status.
    OnFailure,
    /// Start it again however it ended (but not after a stop or delete).
    Always,
}

/// Guest memory: a number of MiB (`512`) or a size with a unit (`"1.5G"`, `"512M"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Memory {
    /// MiB.
    Mib(u64),
    /// A size as `minivmm run --memory` takes it.
    Text(String),
}

/// A disk in a request: an image inside `--images`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRequest {
    /// The raw image, relative to an `--images` directory (or absolute inside one).
    pub path: String,
    /// The guest cannot write it.
    #[serde(default)]
    pub read_only: bool,
}

/// A shared directory in a request: a directory inside `--images`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// The directory, relative to an `--images` directory (or absolute inside one).
    pub path: String,
    /// The virtio-fs tag the guest mounts (default share0, share1, ...).
    #[serde(default)]
    pub tag: Option<String>,
    /// The guest cannot change anything in it.
    #[serde(default)]
    pub read_only: bool,
}

/// The body of `POST /v1/vms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on this host: 1-63 of `A-Za-z0-9._-`, not starting with `.` or `-`.
    pub name: String,
    /// Kernel image, relative to an `--images` directory.
    pub kernel: String,
    /// Initial ramdisk, relative to an `--images` directory.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line (default: `minivmm run`'s).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// vCPUs (default 1).
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest memory (default 128 MiB).
    #[serde(default = "default_memory")]
    pub memory: Memory,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    /// virtio-fs shares.
    #[serde(default)]
    pub shares: Vec<ShareRequest>,
    /// Free-form labels, kept and shown.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Anti-affinity group: refused (422) when a VM of the group holds resources on
    /// this host already.
    #[serde(default)]
    pub group: Option<String>,
    /// What to do when the VM's process ends.
    #[serde(default)]
    pub restart: RestartPolicy,
}

fn one() -> u32 {
    1
}

fn default_memory() -> Memory {
    Memory::Mib(128)
}

/// Why a request was refused before anything started (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The name cannot be used.
    #[error(
        "bad VM name {0:?}: use 1-63 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    Name(String),
    /// A path is not inside any --images directory.
    #[error("{what} {path:?} is not inside any of the agent's --images directories ({dirs})")]
    OutsideImages {
        /// kernel, initrd, disk or share.
        what: &'static str,
        /// As given.
        path: String,
        /// The directories.
        dirs: String,
    },
    /// A size or count is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

/// A request with every path resolved: what the VM process is started with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolved {
    /// Canonical kernel path.
    pub kernel: PathBuf,
    /// Canonical initrd path.
    pub initrd: Option<PathBuf>,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks with canonical paths.
    pub disks: Vec<config::DiskSpec>,
    /// Shares with canonical paths.
    pub shares: Vec<config::ShareSpec>,
}

/// Whether `name` can name a VM (and its directory under the agent's state).
pub fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl VmSpec {
    /// Checks the request and resolves its files inside `images` (each one
    /// canonicalized, so `..` and symbolic links are followed first and the real
    /// file must lie inside a canonical images directory).
    pub fn resolve(&self, images: &[PathBuf]) -> Result<Resolved, SpecError> {
        if !valid_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        let memory_mib = match &self.memory {
            Memory::Mib(n) => *n,
            Memory::Text(s) => config::parse_memory_mib(s)?,
        };
        let find = |what, p: &str| inside(images, p).ok_or_else(|| outside(what, p, images));
        let kernel = find("kernel", &self.kernel)?;
        let initrd = self
            .initrd
            .as_deref()
            .map(|p| find("initrd", p))
            .transpose()?;
        let disks = self
            .disks
            .iter()
            .map(|d| {
                Ok(config::DiskSpec {
                    path: find("disk", &d.path)?,
                    read_only: d.read_only,
                })
            })
            .collect::<Result<_, SpecError>>()?;
        let shares = self
            .shares
            .iter()
            .map(|s| {
                Ok(config::ShareSpec {
                    path: find("share", &s.path)?,
                    tag: s.tag.clone(),
                    read_only: s.read_only,
                    keep_cache: false,
                })
            })
            .collect::<Result<_, SpecError>>()?;
        let r = Resolved {
            kernel,
            initrd,
            memory_mib,
            disks,
            shares,
        };
        // The VM process would refuse these too, but later and less clearly.
        let mut c = crate::VmConfig::new(&r.kernel);
        c.vcpus = self.vcpus;
        c.memory_mib = memory_mib;
        c.cmdline = self.cmdline.clone().unwrap_or(c.cmdline);
        c.disks = r.disks.clone();
        c.shares = r.shares.clone();
        c.validate()?;
        Ok(r)
    }
}

/// `p` (relative to each directory in turn, or absolute), canonicalized, if it
/// exists and lies inside one of `images` (canonicalized too).
fn inside(images: &[PathBuf], p: &str) -> Option<PathBuf> {
    images.iter().find_map(|dir| {
        let dir = dir.canonicalize().ok()?;
        let real = dir.join(p).canonicalize().ok()?;
        (real.starts_with(&dir) && real != dir).then_some(real)
    })
}

fn outside(what: &'static str, p: &str, images: &[PathBuf]) -> SpecError {
    SpecError::OutsideImages {
        what,
        path: p.to_string(),
        dirs: images
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<VmSpec, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn requests_are_typed_and_strict() {
        let s =
            spec(r#"{"name":"a","kernel":"k","memory":"1.5G","restart":"on-failure"}"#).unwrap();
        assert_eq!((s.vcpus, s.restart), (1, RestartPolicy::OnFailure));
        assert!(
            spec(r#"{"name":"a","kernel":"k","vcpu":2}"#).is_err(),
            "unknown field"
        );
        assert!(
            spec(r#"{"name":"a","kernel":"k","memory":-5}"#).is_err(),
            "negative"
        );
        assert!(
            spec(r#"{"name":"a","kernel":"k","vcpus":-1}"#).is_err(),
            "negative"
        );
        assert!(spec(r#"{"name":"a"}"#).is_err(), "no kernel");
    }

    #[test]
    fn names_are_safe_directory_names() {
        for ok in ["a", "vm-1", "web_2.prod", &"x".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn files_must_resolve_inside_the_images_directories() {
        let root = std::env::temp_dir().join(format!("minivmm-spec-{}", std::process::id()));
        let images = root.join("images");
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::write(images.join("k"), b"x").unwrap();
        std::fs::write(images.join("sub/k2"), b"x").unwrap();
        std::fs::write(root.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), images.join("link")).unwrap();
        std::os::unix::fs::symlink("sub/k2", images.join("inner-link")).unwrap();
        let dirs = [images.clone()];
        assert_eq!(
            inside(&dirs, "k"),
            Some(images.join("k").canonicalize().unwrap())
        );
        assert!(inside(&dirs, "sub/../k").is_some());
        assert!(
            inside(&dirs, "inner-link").is_some(),
            "a link that stays inside"
        );
        assert_eq!(inside(&dirs, "../secret"), None, "..");
        assert_eq!(inside(&dirs, "link"), None, "a symbolic link out");
        let abs = root.join("secret").display().to_string();
        assert_eq!(inside(&dirs, &abs), None, "an absolute path outside");
        assert_eq!(inside(&dirs, "/etc/passwd"), None);
        assert_eq!(inside(&dirs, "."), None, "the directory itself");
        assert_eq!(inside(&dirs, "missing"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
