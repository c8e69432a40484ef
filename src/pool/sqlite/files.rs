//! Which files an open pool connection uses, and whether they are still the ones on disk.
//!
//! In WAL mode a committed transaction lives in `POOL-wal` until a checkpoint copies it
//! into `POOL`, and `POOL-shm` is the index every connection reads to find it there.
//! SQLite opens both once per connection and keeps the descriptors: delete either
//! under a running process and that process goes on with the unlinked inodes while
//! every process that opens the pool later gets new, empty ones. The two then see two
//! different pools, and a connection that closes last copies its own into `POOL`
//! (checkpoint on close) and unlinks whatever `POOL-wal` is then on disk. Comparing the
//! files' device and inode numbers with those seen at open time tells which happened.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file's identity: device and inode number (stat(2)'s st_dev and st_ino). A deleted
/// file that a process still holds open keeps its inode, so a new file at its path
/// always has another number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// `path` with `suffix` appended to its last component ("-wal", "-shm").
pub(super) fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The identities of a pool file and its WAL and shared-memory index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PoolFiles {
    /// The path SQLite derives the companions' names from: the pool's, with symbolic
    /// links resolved as SQLite resolves them.
    real: PathBuf,
    db: Option<FileId>,
    wal: Option<FileId>,
    shm: Option<FileId>,
}

/// How the files on disk differ from those a connection opened.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Damage {
    /// Only `-wal` was deleted (or replaced by an empty file a later opener created).
    /// The index (`-shm`) is still shared, so no other process could read the pool
    /// meanwhile (SQLite reports "disk I/O error" when the WAL it indexes is gone), let
    /// alone write it: this connection still holds the only current state.
    WalOnly,
    /// `-shm` (or the pool file itself) was deleted or replaced: other processes may
    /// have built and written a different pool from what the pool file held at the
    /// last checkpoint. This connection must never write or checkpoint again.
    Diverged,
}

impl PoolFiles {
    /// The files now at the pool's path.
    pub(super) fn at(path: &Path) -> PoolFiles {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        PoolFiles {
            db: file_id(&real),
            wal: file_id(&companion(&real, "-wal")),
            shm: file_id(&companion(&real, "-shm")),
            real,
        }
    }

    /// The files now on disk where these were.
    pub(super) fn now(&self) -> PoolFiles {
        PoolFiles {
            real: self.real.clone(),
            db: file_id(&self.real),
            wal: file_id(&companion(&self.real, "-wal")),
            shm: file_id(&companion(&self.real, "-shm")),
        }
    }

    /// What happened to these files, judged from the files on disk `now`. Files this
    /// connection did not have (no WAL yet) cannot have been taken from it.
    pub(super) fn damage(&self, now: &PoolFiles) -> Option<Damage> {
        let kept = |was: Option<FileId>, is: Option<FileId>| was.is_none() || was == is;
        if !kept(self.db, now.db) || !kept(self.shm, now.shm) {
            Some(Damage::Diverged)
        } else if !kept(self.wal, now.wal) {
            Some(Damage::WalOnly)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_or_replaced_companions_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("minivmm-poolfiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("p.db");
        // Held open as SQLite holds them: an open inode's number is never reused.
        let _held: Vec<std::fs::File> =
            [db.clone(), companion(&db, "-wal"), companion(&db, "-shm")]
                .into_iter()
                .map(|p| {
                    std::fs::write(&p, b"x").unwrap();
                    std::fs::File::open(p).unwrap()
                })
                .collect();
        let opened = PoolFiles::at(&db);
        assert_eq!(opened.damage(&opened.now()), None);
        // A new empty -wal, as a later opener creates it: a different inode.
        std::fs::remove_file(companion(&db, "-wal")).unwrap();
        assert_eq!(opened.damage(&opened.now()), Some(Damage::WalOnly));
        std::fs::write(companion(&db, "-wal"), b"").unwrap();
        assert_eq!(opened.damage(&opened.now()), Some(Damage::WalOnly));
        std::fs::remove_file(companion(&db, "-shm")).unwrap();
        assert_eq!(opened.damage(&opened.now()), Some(Damage::Diverged));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
