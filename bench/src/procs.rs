//! What the bench reads of processes: CPU time and RSS from `/proc`, and the open-file limit.
//! (Starting nodes and nats-servers is the testkit's.)

use std::fs;

/// Raises RLIMIT_NOFILE as far as allowed, before any child is spawned so they
/// inherit it: first soft = hard = 1,048,576 (needs CAP_SYS_RESOURCE), else
/// soft = the hard limit. Returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    const WANT: libc::rlim_t = 1 << 20;
    // SAFETY: plain syscalls on a stack struct we own.
    unsafe {
        let want = libc::rlimit {
            rlim_cur: WANT,
            rlim_max: WANT,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return WANT;
        }
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) != 0 {
            return 0;
        }
        cur.rlim_cur = cur.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        cur.rlim_cur
    }
}

/// User + system CPU seconds of a process (`None` = this process).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// User and system CPU seconds of a process (`None` = this process).
pub fn cpu_split(pid: Option<u32>) -> (f64, f64) {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let Ok(stat) = fs::read_to_string(path) else {
        return (0.0, 0.0);
    };
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
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

/// VmRSS of a process in kB.
pub fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        assert!(cpu_seconds(None) >= 0.0);
        assert!(rss_kb(std::process::id()) > 0);
    }
}
