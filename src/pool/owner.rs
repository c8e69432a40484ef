//! Who holds an allocation, and whether that holder is still alive.
//!
//! A pid alone is not an identity: pids are reused. A process is named by its pid, its
//! start time (/proc/PID/stat field 22, clock ticks since boot) and the boot id, so a
//! reused pid or a reboot both show the old owner as gone.

use std::sync::OnceLock;

use super::PoolError;
use super::model::Owner;

/// Reads a small /proc file.
fn read_proc(path: &str) -> Result<String, PoolError> {
    std::fs::read_to_string(path).map_err(|source| PoolError::Io {
        what: path.to_string(),
        source,
    })
}

/// Start time of `pid` in clock ticks since boot, or None if no such process exists.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself hold spaces or ')':
    // the fields after the last ')' start at field 3, so field 22 is the 20th of them.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// This boot's id (changes on every reboot).
pub fn boot_id() -> Result<String, PoolError> {
    Ok(read_proc("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// This machine's host name.
pub fn hostname() -> Result<String, PoolError> {
    static NAME: OnceLock<String> = OnceLock::new();
    if let Some(n) = NAME.get() {
        return Ok(n.clone());
    }
    let name = read_proc("/proc/sys/kernel/hostname")?.trim().to_string();
    if name.is_empty() {
        return Err(PoolError::Local("this machine has no host name".into()));
    }
    Ok(NAME.get_or_init(|| name).clone())
}

/// The identity of the calling process.
pub fn current() -> Result<Owner, PoolError> {
    let pid = std::process::id();
    let start_time = process_start_time(pid)
        .ok_or_else(|| PoolError::Local("cannot read /proc/self/stat".into()))?;
    Ok(Owner {
        host: hostname()?,
        pid,
        start_time,
        boot_id: boot_id()?,
    })
}

/// Whether `owner` is certainly gone: it ran on this machine and its pid is free, reused
/// by another process, or from an earlier boot. Owners on other machines are never judged
/// from here: only their own machine can tell.
pub fn is_stale(owner: &Owner, local_host: &str, local_boot: &str) -> bool {
    if owner.host != local_host {
        return false;
    }
    if owner.boot_id != local_boot {
        return true;
    }
    !process_alive(owner.pid, owner.start_time)
}

/// Whether the process `pid` that started at `start_time` (clock ticks since boot)
/// still runs. A zombie does not: it has ended and only waits for its parent to reap
/// it, which for an orphan (a VM process whose agent was restarted) is init, at a time
/// of its choosing. (A process whose main thread alone exited also shows "Z", while
/// its other threads run on: that one counts as running.)
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    if process_start_time(pid) != Some(start_time) {
        return false;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    !(field("State:").starts_with('Z') && field("Threads:") == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive() {
        let me = current().expect("identity");
        assert!(!is_stale(&me, &me.host, &me.boot_id));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("run true");
        let pid = child.id();
        let start = process_start_time(pid).expect("a child that is not reaped has a stat");
        // Until it is reaped, `true` is a zombie: ended, and seen so.
        let t0 = std::time::Instant::now();
        while process_alive(pid, start) {
            assert!(t0.elapsed().as_secs() < 10, "`true` never became a zombie");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(process_start_time(pid), Some(start), "still unreaped");
        child.wait().unwrap();
        assert!(process_alive(
            std::process::id(),
            process_start_time(std::process::id()).unwrap()
        ));
    }

    #[test]
    fn reused_pid_or_reboot_is_stale() {
        let me = current().expect("identity");
        let reused = Owner {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(is_stale(&reused, &me.host, &me.boot_id));
        let rebooted = Owner {
            boot_id: "another-boot".into(),
            ..me.clone()
        };
        assert!(is_stale(&rebooted, &me.host, &me.boot_id));
        let elsewhere = Owner {
            host: "another-machine".into(),
            pid: u32::MAX,
            ..me.clone()
        };
        assert!(!is_stale(&elsewhere, &me.host, &me.boot_id));
    }
}
