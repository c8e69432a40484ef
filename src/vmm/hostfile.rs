//! Opening the host files a user names (kernel, initrd, console and summary outputs)
//! without ever blocking.
//!
//! `open(2)` of a FIFO waits for the other end: for reading until a writer comes, for
//! writing until a reader does. minivmm opens these files while SIGINT and SIGTERM are
//! blocked for its signal thread, so such a wait could only be ended by SIGKILL (and
//! would hold a ledger claim meanwhile). Every open here is O_NONBLOCK, which never
//! waits; the file's type is then checked on the open descriptor, not on the path, so
//! nothing can swap the file in between.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a file is, in words, for a message that says why it was refused.
fn kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Turns O_NONBLOCK off again, so that later reads and writes behave as usual (the
/// console's writer thread may wait for a slow reader; that is its job).
fn make_blocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL only read and set the open file's status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file. Anything else (a FIFO, whose
/// reads could wait forever; a device, whose size says nothing; a directory) is an
/// [`io::ErrorKind::InvalidInput`] error that says what the file is and what to do.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is {}, not a regular file; minivmm reads kernels and initrds from regular files only: save the data to a file and give that",
                kind(t)
            ),
        ));
    }
    make_blocking(&f)?;
    Ok(f)
}

/// Creates (or truncates) `path` for writing, as `File::create` does, but without
/// waiting: a FIFO that no process reads is refused with an error that says so and
/// what to do; a FIFO with a reader, a terminal or a regular file are fine.
pub fn create_output(path: &Path) -> io::Result<File> {
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    let f = match opened {
        // open(2): O_NONBLOCK | O_WRONLY on a FIFO with no reader fails with ENXIO.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "it is a FIFO (named pipe) and no process has it open for reading: start its reader first, or give a regular file",
            ));
        }
        other => other?,
    };
    make_blocking(&f)?;
    Ok(f)
}
