//! The initramfs `minivmm exec` boots: minivmm's own init (guest/exec-init.c,
//! built with the crate and embedded in the binary) and the kernel modules the
//! guest needs to reach its shares, in the "newc" cpio format Linux unpacks into
//! its root file system at boot (Documentation/driver-api/early-userspace/
//! buffer-format.rst).
//!
//! Linux accepts several archives one after another, so the initramfs is two: a
//! base (init and modules) that depends only on the kernel's module tree and is
//! cached by content, and a small per-run archive holding the command's spec.

use std::path::{Path, PathBuf};

use super::ExecError;

/// minivmm's init for exec guests (a static executable), built by build.rs.
pub const INIT: &[u8] = include_bytes!(concat!(env!("MINIVMM_GUEST_DIR"), "/exec-init"));

/// The modules a guest needs for exec, each after the ones it depends on (as the
/// kernel's modules.dep orders them): the virtio core and MMIO transport (the
/// devices are found in the ACPI DSDT), the console that carries the command's
/// output, FUSE and virtio-fs for the shares, overlayfs for the writable root.
/// A module the kernel has built in is simply not found, and not needed.
pub const MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_console",
    "fuse",
    "virtiofs",
    "overlay",
];

/// A newc cpio archive being written.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, b"");
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    /// One header (13 eight-digit hex fields after the magic "070701"), the
    /// NUL-terminated name and the data, each padded to 4 bytes.
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the same inputs give the same bytes
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0, // check: unused by "070701"
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Ends the archive (the "TRAILER!!!" entry) and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.buf
    }
}

/// Finds the exec modules in `dir` (a module tree such as /lib/modules/VERSION, or
/// a flat directory of .ko files), searching it recursively. Returns each found
/// module's name and path, in load order. Names match with `-` and `_` alike, as
/// modprobe does; compressed modules (.ko.xz, .ko.zst, .ko.gz) are kept as they are
/// (the guest kernel decompresses them, see exec-init.c).
pub fn find_modules(dir: &Path) -> Result<Vec<(String, PathBuf)>, ExecError> {
    let mut files = Vec::new();
    walk(dir, 0, &mut files).map_err(|source| ExecError::Modules {
        dir: dir.into(),
        source,
    })?;
    let norm = |s: &str| s.replace('-', "_");
    let mut found = Vec::new();
    for want in MODULES {
        let hit = files.iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(module_stem)
                .is_some_and(|stem| norm(stem) == want)
        });
        if let Some(p) = hit {
            found.push((want.to_string(), p.clone()));
        }
    }
    Ok(found)
}

/// `name` without its `.ko` (and compression) suffix, if it is a module.
fn module_stem(name: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| name.strip_suffix(ext))
}

/// Collects every file under `dir`, at most 8 levels deep (a module tree is 5).
fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() && depth < 8 {
            walk(&e.path(), depth + 1, out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(())
}

/// The base archive: /init and /lib/minivmm/modules/NN-NAME.ko[.xz...].
pub fn base_archive(modules: &[(String, PathBuf)]) -> Result<Vec<u8>, ExecError> {
    let mut c = Cpio::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "newroot",
        "minivmm",
        "lib",
        "lib/minivmm",
    ] {
        c.dir(d);
    }
    c.dir("lib/minivmm/modules");
    c.file("init", 0o755, INIT);
    for (i, (name, path)) in modules.iter().enumerate() {
        let data = std::fs::read(path).map_err(|source| ExecError::Modules {
            dir: path.clone(),
            source,
        })?;
        // newc's size field is 8 hex digits.
        if u32::try_from(data.len()).is_err() {
            return Err(ExecError::Modules {
                dir: path.clone(),
                source: std::io::Error::other("larger than 4 GiB, more than a cpio archive holds"),
            });
        }
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or(name);
        let ext = &file[module_stem(file).map_or(0, str::len)..];
        c.file(
            &format!("lib/minivmm/modules/{:02}-{name}{ext}", (i + 1) * 10),
            0o644,
            &data,
        );
    }
    Ok(c.finish())
}

/// The base archive for `modules`, from the cache (`cache_dir`) when it holds one
/// built from the same bytes, else built and stored there. The name is a hash of
/// init and every module's name and content.
pub fn cached_base(
    modules: &[(String, PathBuf)],
    cache_dir: &Path,
) -> Result<(PathBuf, bool), ExecError> {
    let mut h = Fnv::default();
    h.write(INIT);
    for (name, path) in modules {
        h.write(name.as_bytes());
        let data = std::fs::read(path).map_err(|source| ExecError::Modules {
            dir: path.clone(),
            source,
        })?;
        h.write(&(data.len() as u64).to_le_bytes());
        h.write(&data);
    }
    let file = cache_dir.join(format!("exec-initramfs-{:016x}.cpio", h.0));
    if file.is_file() {
        return Ok((file, false));
    }
    let cache_err = |source| ExecError::Cache {
        dir: cache_dir.into(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(cache_err)?;
    let bytes = base_archive(modules)?;
    // Written aside and renamed: a concurrent exec never reads half a file.
    let tmp = cache_dir.join(format!(".exec-initramfs-{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(cache_err)?;
    std::fs::rename(&tmp, &file).map_err(cache_err)?;
    Ok((file, true))
}

/// 64-bit FNV-1a: a stable content hash for cache names (not for security).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The per-run archive: /minivmm/spec, NUL-terminated `key=value` records.
pub fn spec_archive(records: &[Vec<u8>]) -> Vec<u8> {
    let mut spec = Vec::new();
    for r in records {
        spec.extend_from_slice(r);
        spec.push(0);
    }
    let mut c = Cpio::default();
    c.file("minivmm/spec", 0o644, &spec);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.dir("a");
        c.file("a/b", 0o644, b"xyz");
        let bytes = c.finish();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
        // The second header starts 4-aligned after "a\0" (110 + 2 -> 112).
        assert_eq!(&bytes[112..118], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("xyz"));
        assert!(text.contains("TRAILER!!!\0"));
        // File size field of a/b: 3 bytes.
        assert_eq!(&bytes[112 + 6 + 6 * 8..112 + 6 + 7 * 8], b"00000003");
    }

    #[test]
    fn modules_are_found_in_a_tree_in_load_order() {
        let dir = std::env::temp_dir().join(format!("minivmm-mods-{}", std::process::id()));
        let deep = dir.join("kernel/fs/fuse");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("virtiofs.ko.xz"), b"1").unwrap();
        std::fs::write(deep.join("fuse.ko"), b"2").unwrap();
        std::fs::write(dir.join("virtio-ring.ko"), b"3").unwrap();
        std::fs::write(dir.join("unrelated.ko"), b"4").unwrap();
        let found = find_modules(&dir).unwrap();
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "fuse", "virtiofs"]);
        let base = base_archive(&found).unwrap();
        let text = String::from_utf8_lossy(&base);
        assert!(text.contains("lib/minivmm/modules/30-virtiofs.ko.xz\0"));
        assert!(text.contains("lib/minivmm/modules/10-virtio_ring.ko\0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
