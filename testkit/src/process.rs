//! Child processes killed on drop, temp dirs, closed ports, log tails.
//!
//! A child that serves on a port binds port 0 itself and reports the port it
//! got (the node in its log, nats-server in its ports file): a port picked
//! here and released for the child to bind could be taken in between.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A loopback port that refuses connections and that nothing else can bind
/// while this value lives: a socket bound to it that never listens. For
/// "nothing answers there" without a port that another process could take.
#[derive(Debug)]
pub struct ClosedPort {
    socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    /// Binds 127.0.0.1:0 without listening; panics if it cannot.
    pub fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind 127.0.0.1:0");
        ClosedPort { socket }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }
}

impl Default for ClosedPort {
    fn default() -> ClosedPort {
        ClosedPort::new()
    }
}

/// A fresh directory under the system temp dir (`entity-sync-{tag}-…`, the
/// tag telling whose it is when a test leaves one behind), removed with
/// everything in it when dropped: a [`tempfile::TempDir`] named for the
/// project.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates the directory; panics if it cannot (a test cannot go on).
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("entity-sync-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        TempDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The last `lines` lines of a log file (for failure messages). Lines
/// containing any of `skip` are left out (noise like route reconnects).
pub fn log_tail(log: &Path, lines: usize, skip: &[&str]) -> String {
    let Ok(file) = fs::File::open(log) else {
        return format!("(no log at {})", log.display());
    };
    let all: Vec<String> = BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|line| !skip.iter().any(|s| line.contains(s)))
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process with its output in a log file, stopped when dropped (also
/// on panic): SIGTERM, then SIGKILL after a grace of two seconds.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> std::io::Result<ChildGuard> {
        Self::spawn_inner(name, cmd, log, false)
    }

    /// Like [`spawn`](Self::spawn), and the kernel kills the child with
    /// SIGKILL if the *thread* that spawned it exits first, so even a parent
    /// killed without unwinding leaves nothing behind. Call it from a thread
    /// that lives as long as the child should (the main thread).
    pub fn spawn_tied(name: &str, cmd: Command, log: &Path) -> std::io::Result<ChildGuard> {
        Self::spawn_inner(name, cmd, log, true)
    }

    fn spawn_inner(
        name: &str,
        mut cmd: Command,
        log: &Path,
        tied: bool,
    ) -> std::io::Result<ChildGuard> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        if tied {
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("spawning {name} ({:?}): {err}", cmd.get_program()),
            )
        })?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// `Err` with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                log_tail(&self.log, 20, &[])
            )),
            Ok(None) => Ok(()),
            Err(err) => Err(format!("{}: {err}", self.name)),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, signal);
            }
        }
    }

    /// SIGKILL, and reap it: nothing is flushed on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, at most `wait`; its exit code.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let end = std::time::Instant::now() + wait;
        while std::time::Instant::now() < end {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}
