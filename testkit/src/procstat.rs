//! What tests and the bench read of a process from `/proc`: resident memory,
//! CPU time and open file descriptors; and the open-file limit of the test
//! process itself.

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

/// User and system CPU seconds of a process (`None`: this process; zeros
/// once it is gone).
pub fn cpu_split(pid: Option<u32>) -> (f64, f64) {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    stat_cpu(&path)
}

/// User + system CPU seconds of this process's threads named `name` (as
/// `/proc/self/task/*/comm` has it: at most 15 bytes).
pub fn threads_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|task| {
            fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim_end() == name)
        })
        .map(|task| {
            let (user, sys) = stat_cpu(&task.path().join("stat").to_string_lossy());
            user + sys
        })
        .sum()
}

/// User and system CPU seconds from a `stat` file of `/proc`.
fn stat_cpu(path: &str) -> (f64, f64) {
    let Ok(stat) = fs::read_to_string(path) else {
        return (0.0, 0.0);
    };
    // The command name (field 2) is parenthesised and may hold spaces and
    // parentheses: fields are counted from after its last `)`, where field
    // 3 (state) is index 0; utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) as f64 / hz, ticks(12) as f64 / hz)
}

/// User + system CPU seconds of a process (`None`: this process).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// The machine's 1-minute load average (`None` if `/proc` cannot tell).
pub fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How many file descriptors process `pid` has open (`None` once it is gone).
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Raises this process's RLIMIT_NOFILE (thousands of websocket clients
/// need more than the usual 1,024), before children are spawned so that they
/// inherit it: a hard limit below 1,048,576 is first raised to it (which
/// needs CAP_SYS_RESOURCE; without it the hard limit stays), then the soft
/// limit goes up to the hard one. The soft limit now in force.
pub fn raise_nofile() -> u64 {
    const WANT: libc::rlim_t = 1 << 20;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_max < WANT {
            let want = libc::rlimit {
                rlim_cur: WANT,
                rlim_max: WANT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return WANT;
            }
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
        let (user, sys) = cpu_split(None);
        assert!(user >= 0.0 && sys >= 0.0);
        assert!(cpu_seconds(Some(pid)) >= 0.0);
        assert_eq!(cpu_split(Some(u32::MAX)), (0.0, 0.0));
        assert_eq!(rss_kib(u32::MAX), None);
    }
}
