//! What tests read of a process from `/proc`: resident memory and open file
//! descriptors; and the open-file limit of the test process itself.

use std::fs;

/// VmRSS of process `pid` in KiB (`None` once it is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        line.strip_prefix("VmRSS:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// How many file descriptors process `pid` has open (`None` once it is gone).
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (thousands of
/// websocket clients need more than the usual 1,024), before children are
/// spawned so that they inherit it. The soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let pid = std::process::id();
        let rss = rss_kib(pid).expect("VmRSS of this process");
        assert!(rss > 0);
        // stdin, stdout, stderr at least (other test threads open more).
        assert!(fd_count(pid).expect("fds of this process") >= 3);
        assert!(raise_nofile() >= 1024);
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
