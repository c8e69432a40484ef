//! Standard output for the commands that print results (`check`, `pool`, `schedule`),
//! written so that a reader who leaves early cannot crash minivmm.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe fails with EPIPE, and `println!`
//! turns that failure into a panic (status 101) — after `pool claim` or `schedule` has
//! already committed its allocation. Everything these commands print goes through
//! [`print`] (or the [`outln!`](crate::outln) and [`out!`](crate::out) macros) instead:
//! a failed write is remembered, later output is dropped, the command finishes its
//! real work, and [`exit_status`] then turns the remembered failure into the status.
//!
//! SIGPIPE stays ignored on purpose: dying of it, as C programs do, would end the
//! process between committing a claim and reporting it, with nobody told its id.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// minivmm's status when stdout's reader left: 128 + SIGPIPE (13), what a shell reports
/// for `cat`, `ls` or `ps` in the same place. Scripts with `set -o pipefail` treat
/// `minivmm pool list | head -1` as they treat `ls | head -1`; without pipefail the
/// shell ignores it. 0 would hide that the output was cut short from a script that
/// needed all of it (`minivmm pool --json allocations | slow-consumer` dying early).
pub const READER_LEFT: i32 = 128 + libc::SIGPIPE;

/// How standard output failed, if it did: the first failure only, since later writes
/// are not attempted.
static FAILED: Mutex<Option<io::ErrorKind>> = Mutex::new(None);

/// The first failure of standard output so far, if any.
fn failed() -> Option<io::ErrorKind> {
    *FAILED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `args` to standard output and flushes it, so that a failure is seen now and
/// not in the flush at exit, where it would be lost. After a failure it does nothing:
/// the command goes on with its work and [`exit_status`] reports the failure.
pub fn print(args: fmt::Arguments<'_>) {
    let mut slot = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() != io::ErrorKind::BrokenPipe {
            // A full disk or an I/O error is a real failure, unlike a reader that left.
            let _ = writeln!(
                io::stderr(),
                "minivmm: cannot write to standard output: {e}"
            );
        }
        *slot = Some(e.kind());
    }
}

/// True when standard output failed and something printed since was lost.
pub fn lost() -> bool {
    failed().is_some()
}

/// Says on stderr what a command did but could not print, when stdout failed: `what`
/// describes the committed change and how to undo it. Does nothing otherwise. stderr
/// may be gone too; then there is no one left to tell, and that is not a panic either.
pub fn report_lost(what: fmt::Arguments<'_>) {
    if lost() {
        let _ = writeln!(
            io::stderr(),
            "minivmm: {what} (standard output was closed before this could be printed)"
        );
    }
}

/// The process's status once a command returned `status`: [`READER_LEFT`] if stdout's
/// reader left, 125 (minivmm failed) if stdout failed otherwise, else `status`. A
/// command's own failure (non-zero `status`) wins over an output failure.
pub fn exit_status(status: i32) -> i32 {
    match failed() {
        _ if status != 0 => status,
        None => status,
        Some(io::ErrorKind::BrokenPipe) => READER_LEFT,
        Some(_) => crate::vmm::status::VMM_ERROR,
    }
}

/// `println!` for command results, through [`print`]: never panics.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command results, through [`print`]: never panics.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::print(format_args!($($arg)*))
    };
}
