//! Real `nats-server` processes for the multi-node tests and the bench: one server or a
//! three-server JetStream cluster on loopback, each on ports it picks itself
//! and reports in its ports file (`--ports_file_dir`), with its own store
//! directory, killed (and the directory removed) on `Drop`; plus a
//! TCP proxy that cuts one node's NATS connection while the others keep theirs,
//! and a cluster whose routes all run through such proxies (one member cut
//! off from the others while its clients stay connected to it).
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on the PATH when it
//! is 2.10 or newer (scripts/test.sh installs one when it is not).
//! [`nats_server_bin`] checks the version once and says how to get one.
//!
//! Servers run with `jetstream { sync_interval: always }`, as docs/cluster.md
//! (Durability) requires of the multi-node tests: an acknowledged notify must
//! survive a server killed with SIGKILL. (The bench may ask for JetStream's
//! default instead, to measure what that costs.)

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
    time::Instant,
};

use crate::process::{ClosedPort, TempDir, log_tail};

/// JetStream acknowledges only what it has written to disk (docs/cluster.md, Durability).
const SYNC_ALWAYS: &str = "jetstream {\n  sync_interval: always\n}\n";

/// How long a server (or a cluster's JetStream) may take to become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// The nats-server binary to run: `$NATS_SERVER_BIN`, else `nats-server` on
/// the PATH if it is 2.10 or newer. Panics with a hint otherwise.
pub fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        match server_version(Path::new("nats-server")) {
            Some(version) if version >= (2, 10) => PathBuf::from("nats-server"),
            found => panic!(
                "the multi-node tests need nats-server 2.10 or newer (found: {}); \
                 run scripts/test.sh, which installs one, or set NATS_SERVER_BIN",
                match found {
                    Some((major, minor)) => format!("{major}.{minor} on the PATH"),
                    None => "none on the PATH".to_owned(),
                }
            ),
        }
    })
    .clone()
}

/// `(major, minor)` of `bin --version` ("nats-server: v2.15.1"), if it runs.
pub fn server_version(bin: &Path) -> Option<(u64, u64)> {
    let output = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().rsplit(' ').next()?.trim_start_matches('v');
    let mut parts = version.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The ports a server reported in its ports file (`--ports_file_dir`):
/// `0` for a listener it does not have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ports {
    client: u16,
    route: u16,
    monitor: u16,
}

impl Ports {
    /// Parses a ports file: `{"nats":["nats://127.0.0.1:4222"],
    /// "monitoring":["http://127.0.0.1:8222"],"cluster":["nats://…"]}`.
    fn parse(text: &str) -> Option<Ports> {
        let json: serde_json::Value = serde_json::from_str(text).ok()?;
        let port = |key: &str| -> Option<u16> {
            let url = json.get(key)?.as_array()?.first()?.as_str()?;
            url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
        };
        Some(Ports {
            client: port("nats")?,
            route: port("cluster").unwrap_or(0),
            monitor: port("monitoring").unwrap_or(0),
        })
    }
}

/// `port`, or `-1` (a random one) for 0, as nats-server takes it.
fn port_arg(port: u16) -> String {
    match port {
        0 => "-1".to_owned(),
        port => port.to_string(),
    }
}

/// Waits until the server `child` wrote its ports file into `dir`
/// (`<executable>_<pid>.ports`, once every listener is up), then until its
/// client port accepts. An error with the logs if it exits first; panics
/// after `deadline`.
async fn wait_started(child: &mut Child, dir: &Path, deadline: Duration) -> Result<Ports, String> {
    let end = Instant::now() + deadline;
    let suffix = format!("_{}.ports", child.id());
    let exited = |status: std::process::ExitStatus| {
        format!(
            "nats-server in {} exited with {status} before it was up:\n{}\n{}",
            dir.display(),
            tail(&dir.join("nats.log"), 20),
            tail(&dir.join("stderr.log"), 20)
        )
    };
    // First the ports file, then the client port accepting.
    let mut reported: Option<Ports> = None;
    loop {
        if reported.is_none() {
            reported = fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .find(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))
                .and_then(|entry| fs::read_to_string(entry.path()).ok())
                .and_then(|text| Ports::parse(&text));
        }
        if let Some(ports) = reported {
            let addr = SocketAddr::from(([127, 0, 0, 1], ports.client));
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(ports);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(exited(status));
        }
        if Instant::now() >= end {
            let what = match reported {
                None => "reported no ports".to_owned(),
                Some(ports) => format!("did not accept on 127.0.0.1:{}", ports.client),
            };
            panic!(
                "nats-server in {} {what} within {deadline:?}:\n{}",
                dir.display(),
                tail(&dir.join("nats.log"), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// stderr of a server, kept in its directory (startup errors land there).
fn stderr_file(dir: &Path) -> Stdio {
    fs::File::create(dir.join("stderr.log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The last `lines` lines of a server log. Route reconnect attempts to a
/// killed member (or to a cluster's [`ClosedPort`]) are left out: they
/// would fill it.
fn tail(log: &Path, lines: usize) -> String {
    log_tail(log, lines, &["Error trying to connect to route"])
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        // SIGKILL: nothing is flushed on the way out, which is the point of
        // `sync_interval: always`.
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------
// One server
// ---------------------------------------------------------------------------

/// One real nats-server with JetStream, on a loopback port it picks itself
/// and reports in its ports file.
pub struct NatsServer {
    bin: PathBuf,
    /// What the server reported (zeros before it first started): a restart
    /// binds the same ports again.
    ports: Ports,
    dir: TempDir,
    /// Whether the server gets the config file with `sync_interval: always`
    /// (not given to a 2.9 server started only to be refused).
    with_config: bool,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a current nats-server (see [`nats_server_bin`]) with
    /// `sync_interval: always`, and waits until it accepts connections.
    pub async fn start() -> NatsServer {
        NatsServer::start_binary(&nats_server_bin(), Some(SYNC_ALWAYS)).await
    }

    /// Like [`start`](Self::start) with JetStream's default sync (every two
    /// minutes): faster, and what the bench compares against.
    pub async fn start_default_sync() -> NatsServer {
        NatsServer::start_binary(&nats_server_bin(), Some("jetstream {}\n")).await
    }

    /// Starts `bin` with `-js`, and `config` (a nats.conf text) if given: an
    /// old server started only to be refused gets none. The client port is
    /// random; a monitoring port the config asks for may be too
    /// (`http: 127.0.0.1:-1`): see [`monitor_addr`](Self::monitor_addr).
    pub async fn start_binary(bin: &Path, config: Option<&str>) -> NatsServer {
        let dir = TempDir::new("nats");
        if let Some(config) = config {
            fs::write(
                dir.path().join("nats.conf"),
                format!("# Written by entity-sync-testkit.\n{config}"),
            )
            .expect("write nats.conf");
        }
        let mut server = NatsServer {
            bin: bin.to_owned(),
            ports: Ports::default(),
            dir,
            with_config: config.is_some(),
            child: None,
        };
        if let Err(why) = server.spawn().await {
            panic!("{why}");
        }
        server
    }

    /// Starts the process on the known ports (random ones the first time)
    /// and records the ports it reports.
    async fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "nats-server already running");
        let mut command = Command::new(&self.bin);
        command
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port_arg(self.ports.client))
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.dir.path().join("nats.log"))
            .arg("--ports_file_dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file(self.dir.path()));
        if self.with_config {
            command.arg("-c").arg(self.dir.path().join("nats.conf"));
        }
        if self.ports.monitor != 0 {
            command.arg("-m").arg(self.ports.monitor.to_string());
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let child = self.child.insert(child);
        self.ports = wait_started(child, self.dir.path(), START_DEADLINE).await?;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.ports.client
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.client))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The monitoring endpoint (`/jsz`, `/varz`…), when the config asked for
    /// one (`http: 127.0.0.1:-1`).
    pub fn monitor_addr(&self) -> Option<SocketAddr> {
        (self.ports.monitor != 0).then(|| SocketAddr::from(([127, 0, 0, 1], self.ports.monitor)))
    }

    /// Kills the server (SIGKILL); the store directory is kept.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same ports with the same store.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn().await {
            panic!("restart on the same port failed: {why}");
        }
    }

    /// The server's log so far (last `lines` lines).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.path().join("nats.log"), lines)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- nats-server :{} log (last lines) ---\n{}",
                self.ports.client,
                self.log_tail(30)
            );
        }
        kill(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Three-server cluster
// ---------------------------------------------------------------------------

struct Member {
    name: String,
    /// What the member reported (zeros before it first started): a restart
    /// binds the same ports again.
    ports: Ports,
    dir: TempDir,
    child: Option<Child>,
}

/// A JetStream cluster of real nats-servers routed on loopback.
pub struct NatsCluster {
    bin: PathBuf,
    members: Vec<Member>,
    no_advertise: bool,
    /// The first member's configured route: clustered JetStream refuses to
    /// start without one, and no other member's route port is known yet.
    /// Nothing answers there, and no other server can take the port (and
    /// route member 0 into a cluster of its own) while the cluster lives.
    seed: ClosedPort,
    /// Routes through proxies ([`start_with_route_proxies`](Self::start_with_route_proxies)).
    proxied: Option<ProxiedRoutes>,
}

impl NatsCluster {
    /// Starts `n` servers (client, route and monitoring ports random, each
    /// reported by its server; one store dir each), routes each to those
    /// started before it, and waits until JetStream can place a stream with
    /// `n` replicas.
    pub async fn start(n: usize) -> NatsCluster {
        Self::start_with(n, false).await
    }

    /// Like [`start`](Self::start), with `no_advertise: true` in the cluster
    /// block when `no_advertise`: the servers then tell clients no other
    /// member's URL, so a client uses only the URLs it was given (a node
    /// behind a [`TcpProxy`] stays behind it when it reconnects).
    pub async fn start_with(n: usize, no_advertise: bool) -> NatsCluster {
        let bin = nats_server_bin();
        let members = (0..n)
            .map(|i| Member {
                name: format!("n{i}"),
                ports: Ports::default(),
                dir: TempDir::new(&format!("nats-cluster-{i}")),
                child: None,
            })
            .collect();
        let mut cluster = NatsCluster {
            bin,
            members,
            no_advertise,
            seed: ClosedPort::new(),
            proxied: None,
        };
        // One after the other: each needs the route ports of those before it.
        for i in 0..n {
            if let Err(why) = cluster.spawn_member(i).await {
                panic!("{why}");
            }
        }
        cluster.wait_jetstream(n).await;
        cluster
    }

    /// Writes member `i`'s config: its known ports (random ones the first
    /// time), and routes to every other member whose route port is known
    /// (none known: the [`seed`](Self::seed)), or to its route proxies.
    fn configure(&self, i: usize) {
        let member = &self.members[i];
        let mut routes: Vec<u16> = match &self.proxied {
            Some(proxied) => proxied.ports_from(i),
            None => (0..self.members.len())
                .filter(|&j| j != i)
                .map(|j| self.members[j].ports.route)
                .filter(|&port| port != 0)
                .collect(),
        };
        if routes.is_empty() {
            routes.push(self.seed.port());
        }
        let routes: Vec<String> = routes
            .iter()
            .map(|port| format!("    nats-route://127.0.0.1:{port}"))
            .collect();
        let config = format!(
            "# Written by entity-sync-testkit.\n\
             server_name: {name}\n\
             listen: 127.0.0.1:{client}\n\
             http: 127.0.0.1:{monitor}\n\
             ports_file_dir: {dir:?}\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n\
             cluster {{\n  name: es-test\n  listen: 127.0.0.1:{route}\n{advertise}  routes: [\n{routes}\n  ]\n}}\n",
            name = member.name,
            client = port_arg(member.ports.client),
            monitor = port_arg(member.ports.monitor),
            dir = member.dir.path().display().to_string(),
            store = member.dir.path().join("store").display().to_string(),
            route = port_arg(member.ports.route),
            routes = routes.join("\n"),
            advertise = match (&self.proxied, self.no_advertise) {
                (Some(proxied), _) => format!(
                    "  no_advertise: true\n  advertise: \"127.0.0.1:{}\"\n",
                    proxied.advertised[i].port()
                ),
                (None, true) => "  no_advertise: true\n".to_owned(),
                (None, false) => String::new(),
            },
        );
        fs::write(member.dir.path().join("nats.conf"), config).expect("write nats.conf");
    }

    /// Starts member `i` (configured anew) and records the ports it reports.
    async fn spawn_member(&mut self, i: usize) -> Result<(), String> {
        assert!(
            self.members[i].child.is_none(),
            "member {i} already running"
        );
        self.configure(i);
        let member = &mut self.members[i];
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(member.dir.path().join("nats.conf"))
            .arg("-l")
            .arg(member.dir.path().join("nats.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file(member.dir.path()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let child = member.child.insert(child);
        member.ports = wait_started(child, member.dir.path(), START_DEADLINE).await?;
        Ok(())
    }

    /// Polls until a stream with `replicas` replicas can be created (the
    /// meta group has a leader and enough peers), then deletes it.
    async fn wait_jetstream(&self, replicas: usize) {
        let client = async_nats::connect(self.url(0))
            .await
            .expect("connect to the cluster");
        let js = async_nats::jetstream::new(client);
        let name = format!("probe_{}", std::process::id());
        let end = Instant::now() + START_DEADLINE;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(3),
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    num_replicas: replicas,
                    ..Default::default()
                }),
            )
            .await;
            let last_error = match attempt {
                Ok(Ok(_)) => break,
                Ok(Err(err)) => err.to_string(),
                Err(_) => "create_stream timed out".to_owned(),
            };
            if Instant::now() >= end {
                panic!(
                    "JetStream cluster not ready within {START_DEADLINE:?}: {last_error}\n{}",
                    self.log_tail(0, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        js.delete_stream(&name).await.expect("delete probe stream");
    }

    /// `nats://127.0.0.1:PORT` of member `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[i].ports.client)
    }

    /// Every member's URL, comma-separated, starting with member `first`
    /// (nodes keep the order, so this picks the server a node connects to).
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.members.len();
        (0..n)
            .map(|k| self.url((first + k) % n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every member's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.urls_from(0)
    }

    /// The `server_name` of member `i` (`n{i}`), as stream info reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// The member whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    /// Kills member `i` (SIGKILL); its store is kept.
    pub fn kill(&mut self, i: usize) {
        kill(&mut self.members[i].child);
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The client address of member `i` (what a [`TcpProxy`] forwards to).
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].ports.client))
    }

    /// Starts member `i` again with the same ports and store, routed to
    /// every other member.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        if let Err(why) = self.spawn_member(i).await {
            panic!("restart of member {i} on the same ports failed: {why}");
        }
    }

    /// Member `i`'s log (last `lines` lines).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        tail(&self.members[i].dir.path().join("nats.log"), lines)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for member in &mut self.members {
            if panicking {
                eprintln!(
                    "--- nats-server {} (:{}) log (last lines) ---\n{}",
                    member.name,
                    member.ports.client,
                    tail(&member.dir.path().join("nats.log"), 30)
                );
            }
            kill(&mut member.child);
        }
    }
}

// ---------------------------------------------------------------------------
// A cluster whose routes run through proxies
// ---------------------------------------------------------------------------

/// The routes of a [`NatsCluster`] started with
/// [`start_with_route_proxies`](NatsCluster::start_with_route_proxies): one
/// [`TcpProxy`] per (member, member started before it), the only route
/// address either knows of the other.
struct ProxiedRoutes {
    /// `(from, to, proxy)`: member `from` routes to member `to` through `proxy`.
    proxies: Vec<(usize, usize, TcpProxy)>,
    /// Each member's advertised route address: a port nothing listens on. A
    /// server tells the others the route URLs of its peers (so that they
    /// route to them too); with these, such a gossiped route leads nowhere
    /// and every route stays on a proxy.
    advertised: Vec<ClosedPort>,
}

impl ProxiedRoutes {
    /// The proxy ports member `from` routes to.
    fn ports_from(&self, from: usize) -> Vec<u16> {
        self.proxies
            .iter()
            .filter(|(f, _, _)| *f == from)
            .map(|(_, _, proxy)| proxy.addr.port())
            .collect()
    }

    /// The proxies of every route from or to member `i`.
    fn of(&self, i: usize) -> impl Iterator<Item = &TcpProxy> {
        self.proxies
            .iter()
            .filter(move |(from, to, _)| *from == i || *to == i)
            .map(|(_, _, proxy)| proxy)
    }
}

/// One member's routes as its `/routez` lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// `server_name` of the member at the other end of each route
    /// connection (a route is a pool of connections: names repeat).
    pub remotes: Vec<String>,
    /// The remote ports of the connections this member opened itself.
    pub solicited_ports: Vec<u16>,
    /// How many connections the other end opened.
    pub accepted: usize,
}

impl Routes {
    /// Parses a `/routez` answer.
    fn parse(text: &str) -> Option<Routes> {
        let json: serde_json::Value = serde_json::from_str(text).ok()?;
        json.get("num_routes")?;
        let mut routes = Routes::default();
        let listed = json.get("routes").and_then(|r| r.as_array());
        for route in listed.into_iter().flatten() {
            routes
                .remotes
                .push(route.get("remote_name")?.as_str()?.to_owned());
            if route.get("did_solicit")?.as_bool()? {
                routes
                    .solicited_ports
                    .push(u16::try_from(route.get("port")?.as_u64()?).ok()?);
            } else {
                routes.accepted += 1;
            }
        }
        Some(routes)
    }

    /// Whether some route connection leads to the member named `name`.
    pub fn reaches(&self, name: &str) -> bool {
        self.remotes.iter().any(|remote| remote == name)
    }
}

impl NatsCluster {
    /// Starts `n` servers like [`start_with`](Self::start_with) (with
    /// `no_advertise: true`), except that every route runs through a
    /// [`TcpProxy`] of its own: member `i` knows member `j < i` only as the
    /// proxy `i → j`, and each member advertises a closed port as its route
    /// address, so no server ever learns another's real route port. Checks
    /// with every member's `/routez` that each route connection goes through
    /// a proxy, then that JetStream can place a stream with `n` replicas.
    /// [`cut_routes`](Self::cut_routes) then isolates one member from the
    /// others while clients stay connected to it.
    pub async fn start_with_route_proxies(n: usize) -> NatsCluster {
        let mut cluster = NatsCluster {
            bin: nats_server_bin(),
            members: (0..n)
                .map(|i| Member {
                    name: format!("n{i}"),
                    ports: Ports::default(),
                    dir: TempDir::new(&format!("nats-cluster-{i}")),
                    child: None,
                })
                .collect(),
            no_advertise: true,
            seed: ClosedPort::new(),
            proxied: Some(ProxiedRoutes {
                proxies: Vec::new(),
                advertised: (0..n).map(|_| ClosedPort::new()).collect(),
            }),
        };
        for i in 0..n {
            // Member i's routes: to every member already started, each
            // through its own proxy.
            for j in 0..i {
                let route = SocketAddr::from(([127, 0, 0, 1], cluster.members[j].ports.route));
                let proxy = TcpProxy::start(route).await;
                if let Some(proxied) = &mut cluster.proxied {
                    proxied.proxies.push((i, j, proxy));
                }
            }
            if let Err(why) = cluster.spawn_member(i).await {
                panic!("{why}");
            }
        }
        cluster.wait_routes_proxied().await;
        cluster.wait_jetstream(n).await;
        cluster
    }

    /// Member `i`'s routes, from its `/routez`.
    pub async fn routes(&self, i: usize) -> Result<Routes, String> {
        let monitor = SocketAddr::from(([127, 0, 0, 1], self.members[i].ports.monitor));
        let (status, body) = crate::http::http_get(monitor, "/routez").await?;
        if status != 200 {
            return Err(format!("/routez of member {i} answered {status}"));
        }
        Routes::parse(&body).ok_or_else(|| format!("/routez of member {i} unreadable: {body}"))
    }

    /// Polls until every member routes to every other one, and checks that
    /// every route connection runs through a proxy: each is listed by the
    /// member that opened it with a proxy's port as its remote port, and as
    /// many are listed as opened as accepted. Panics otherwise.
    async fn wait_routes_proxied(&self) {
        let proxy_ports: Vec<u16> = (0..self.len())
            .flat_map(|i| self.proxy_ports_of(i))
            .collect();
        let end = Instant::now() + START_DEADLINE;
        loop {
            let mut all = Vec::new();
            for i in 0..self.len() {
                all.push(self.routes(i).await);
            }
            let meshed = all.iter().enumerate().all(|(i, routes)| {
                routes.as_ref().is_ok_and(|routes| {
                    (0..self.len()).all(|j| j == i || routes.reaches(self.name(j)))
                })
            });
            if meshed {
                let listed: Vec<&Routes> = all.iter().flatten().collect();
                let opened: usize = listed.iter().map(|r| r.solicited_ports.len()).sum();
                let accepted: usize = listed.iter().map(|r| r.accepted).sum();
                let direct: Vec<u16> = listed
                    .iter()
                    .flat_map(|r| r.solicited_ports.iter().copied())
                    .filter(|port| !proxy_ports.contains(port))
                    .collect();
                if direct.is_empty() && opened == accepted {
                    return;
                }
                assert!(
                    Instant::now() < end,
                    "routes around the proxies: {opened} route connections opened, \
                     {accepted} accepted, to non-proxy ports {direct:?}: {all:?}"
                );
            }
            assert!(
                Instant::now() < end,
                "the cluster's routes never meshed within {START_DEADLINE:?}: {all:?}\n{}",
                self.log_tail(0, 30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The listening ports of the proxies of member `i`'s own routes.
    fn proxy_ports_of(&self, i: usize) -> Vec<u16> {
        self.proxied
            .as_ref()
            .map(|proxied| proxied.ports_from(i))
            .unwrap_or_default()
    }

    /// Cuts every route between member `i` and the others (their proxies
    /// drop the connections and refuse new ones): member `i` keeps running,
    /// and its clients stay connected to it, cut off from the cluster.
    /// Panics unless the cluster was started with
    /// [`start_with_route_proxies`](Self::start_with_route_proxies).
    pub fn cut_routes(&self, i: usize) {
        for proxy in self.route_proxies(i) {
            proxy.cut();
        }
    }

    /// Lets member `i`'s routes connect again (the servers retry every
    /// second or so).
    pub fn heal_routes(&self, i: usize) {
        for proxy in self.route_proxies(i) {
            proxy.restore();
        }
    }

    /// Polls until member `i` has routes to every other member (`true`) or
    /// to none (`false`); how long it took. Panics after `wait`.
    pub async fn wait_routed(&self, i: usize, routed: bool, wait: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let routes = self.routes(i).await;
            let now = routes.as_ref().is_ok_and(|routes| {
                if routed {
                    (0..self.len()).all(|j| j == i || routes.reaches(self.name(j)))
                } else {
                    routes.remotes.is_empty()
                }
            });
            if now {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < wait,
                "member {i} {} within {wait:?}: {routes:?}",
                if routed {
                    "not routed to every other member"
                } else {
                    "still routed"
                }
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn route_proxies(&self, i: usize) -> impl Iterator<Item = &TcpProxy> {
        self.proxied
            .as_ref()
            .expect("a cluster started with start_with_route_proxies")
            .of(i)
    }
}

// ---------------------------------------------------------------------------
// A TCP proxy the test controls
// ---------------------------------------------------------------------------

/// A loopback TCP proxy in front of a NATS server, whose faults the test
/// chooses: [`cut`](TcpProxy::cut) (live connections dropped, new ones
/// refused), [`drop_all`](TcpProxy::drop_all) (live connections dropped, new
/// ones accepted), [`set_latency`](TcpProxy::set_latency) (every chunk
/// delivered that much later, both ways), [`stall`](TcpProxy::stall) (the
/// live connections stop forwarding without closing: a half-open link that
/// only the peers' own pings can notice) and
/// [`swallow`](TcpProxy::swallow) (a client's next publishes to a subject
/// never reach the server: a request lost with a cluster member). A node
/// connected through it has the fault while nodes connected directly keep
/// their links.
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: AbortHandle,
}

/// One proxied connection: its task and whether it is stalled.
struct Link {
    task: AbortHandle,
    stalled: Arc<AtomicBool>,
}

#[derive(Default)]
struct ProxyState {
    cut: AtomicBool,
    /// Added one-way delay, in microseconds.
    latency_us: AtomicU64,
    // std Mutex: only pushed to / drained, never held across `.await`.
    links: Mutex<Vec<Link>>,
    /// Subject prefixes whose next client publishes are dropped, each with
    /// how many are left to drop.
    swallow: Mutex<Vec<(String, usize)>>,
    /// Client publishes dropped so far.
    swallowed: AtomicU64,
}

impl ProxyState {
    fn drop_connections(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.task.abort();
        }
    }

    fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// Whether a client publish to `subject` is to be dropped (and counts it).
    fn swallows(&self, subject: &[u8]) -> bool {
        let mut swallow = self.swallow.lock().unwrap();
        let Some(entry) = swallow
            .iter_mut()
            .find(|(prefix, left)| *left > 0 && subject.starts_with(prefix.as_bytes()))
        else {
            return false;
        };
        entry.1 -= 1;
        self.swallowed.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// The length of the first complete operation of the NATS client protocol
/// in `buf`, and its subject when it is a `PUB` or `HPUB`; `None` while the
/// operation is incomplete. A line that doesn't parse counts as an
/// operation of its own (forwarded as it is: the server answers it).
fn client_op(buf: &[u8]) -> Option<(usize, Option<&[u8]>)> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[..line_end];
    let mut words = line
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty());
    let op = words.next().unwrap_or_default();
    if !(op.eq_ignore_ascii_case(b"PUB") || op.eq_ignore_ascii_case(b"HPUB")) {
        return Some((line_end + 2, None));
    }
    let args: Vec<&[u8]> = words.collect();
    // PUB subject [reply] size; HPUB subject [reply] header-size total-size.
    let payload = args
        .last()
        .and_then(|w| std::str::from_utf8(w).ok())
        .and_then(|w| w.parse::<usize>().ok());
    let (Some(subject), Some(payload)) = (args.first(), payload) else {
        return Some((line_end + 2, None));
    };
    let len = line_end + 2 + payload + 2;
    (buf.len() >= len).then_some((len, Some(*subject)))
}

/// How often a stalled direction looks again whether it may go on.
const STALL_POLL: Duration = Duration::from_millis(20);

/// Forwards `from` to `to`, each chunk no earlier than the proxy's latency
/// after it was read; stops forwarding (reading and writing) while `stalled`.
/// A reader and a writer, so that added latency delays bytes without
/// limiting the throughput to one chunk per delay. From a client
/// (`from_client`) it forwards whole protocol operations, less the
/// publishes [`swallow`](TcpProxy::swallow) drops.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<ProxyState>,
    stalled: Arc<AtomicBool>,
    from_client: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunks, mut queued) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = {
        let stalled = stalled.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            // Client bytes not yet forming a whole operation.
            let mut pending: Vec<u8> = Vec::new();
            loop {
                while stalled.load(Ordering::Acquire) {
                    tokio::time::sleep(STALL_POLL).await;
                }
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = if from_client {
                    pending.extend_from_slice(&buf[..n]);
                    let mut chunk = Vec::with_capacity(pending.len());
                    let mut at = 0;
                    while let Some((len, subject)) = client_op(&pending[at..]) {
                        if !subject.is_some_and(|subject| state.swallows(subject)) {
                            chunk.extend_from_slice(&pending[at..at + len]);
                        }
                        at += len;
                    }
                    pending.drain(..at);
                    chunk
                } else {
                    buf[..n].to_vec()
                };
                if chunk.is_empty() {
                    continue;
                }
                let due = Instant::now() + state.latency();
                if chunks.send((due, chunk)).await.is_err() {
                    return;
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            while stalled.load(Ordering::Acquire) {
                tokio::time::sleep(STALL_POLL).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl TcpProxy {
    /// Listens on a dynamic loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(ProxyState::default());
        let accept = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    // Checked and registered under the lock, so a concurrent
                    // `cut` either refuses this connection or drops it.
                    let mut links = state.links.lock().unwrap();
                    if state.cut.load(Ordering::Acquire) {
                        drop(inbound);
                        continue;
                    }
                    let stalled = Arc::new(AtomicBool::new(false));
                    let task = {
                        let (state, stalled) = (state.clone(), stalled.clone());
                        tokio::spawn(async move {
                            let Ok(outbound) = TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let (in_read, in_write) = inbound.into_split();
                            let (out_read, out_write) = outbound.into_split();
                            // Either direction ending ends the link (a real
                            // TCP peer would see the close either way).
                            tokio::select! {
                                () = pump(in_read, out_write, state.clone(), stalled.clone(), true) => {}
                                () = pump(out_read, in_write, state, stalled, false) => {}
                            }
                        })
                    };
                    links.retain(|l| !l.task.is_finished());
                    links.push(Link {
                        task: task.abort_handle(),
                        stalled,
                    });
                }
            })
            .abort_handle()
        };
        TcpProxy {
            addr,
            state,
            accept,
        }
    }

    /// `nats://127.0.0.1:PROXYPORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every proxied connection and refuses new ones until [`restore`](TcpProxy::restore).
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::Release);
        self.state.drop_connections();
    }

    /// Accepts and forwards connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::Release);
    }

    /// Drops every proxied connection (both sockets closed at once) and
    /// keeps accepting new ones. The number dropped.
    pub fn drop_all(&self) -> usize {
        let mut links = self.state.links.lock().unwrap();
        links.retain(|l| !l.task.is_finished());
        let n = links.len();
        for link in links.drain(..) {
            link.task.abort();
        }
        n
    }

    /// Every byte, both ways, is delivered `latency` after it was read (zero:
    /// none added). Applies to live and new connections.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// The live connections stop forwarding, both ways, and stay open: the
    /// peers see silence, no close. New connections are forwarded normally,
    /// so a peer that gives up on its stalled link and reconnects recovers.
    /// The number stalled.
    pub fn stall(&self) -> usize {
        let mut links = self.state.links.lock().unwrap();
        links.retain(|l| !l.task.is_finished());
        for link in links.iter() {
            link.stalled.store(true, Ordering::Release);
        }
        links.len()
    }

    /// The next `count` publishes a client sends to a subject starting with
    /// `subject_prefix` are dropped (on live and new connections): a
    /// request that never reaches the server, so never gets an answer.
    pub fn swallow(&self, subject_prefix: &str, count: usize) {
        self.state
            .swallow
            .lock()
            .unwrap()
            .push((subject_prefix.to_owned(), count));
    }

    /// Client publishes dropped so far by [`swallow`](TcpProxy::swallow).
    pub fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::Relaxed)
    }

    /// Live (not yet closed) proxied connections.
    pub fn connections(&self) -> usize {
        let mut links = self.state.links.lock().unwrap();
        links.retain(|l| !l.task.is_finished());
        links.len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.state.drop_connections();
    }
}

#[cfg(test)]
mod tests {
    use super::{Ports, client_op};

    /// What nats-server 2.15 writes with `--ports_file_dir`.
    #[test]
    fn ports_files_are_read() {
        let file = r#"{"nats":["nats://127.0.0.1:36817"],"monitoring":["http://127.0.0.1:43041"],"cluster":["nats://127.0.0.1:32949"]}"#;
        let ports = Ports {
            client: 36817,
            route: 32949,
            monitor: 43041,
        };
        assert_eq!(Ports::parse(file), Some(ports));
        let single = r#"{"nats":["nats://127.0.0.1:36021"]}"#;
        let client_only = Ports {
            client: 36021,
            ..Ports::default()
        };
        assert_eq!(Ports::parse(single), Some(client_only));
        // Half written: not yet.
        assert_eq!(Ports::parse(r#"{"nats":["nats://127.0"#), None);
    }

    #[test]
    fn client_operations_are_split_whole() {
        assert_eq!(client_op(b"PING\r\nPUB a 2\r\nhi\r\n"), Some((6, None)));
        assert_eq!(
            client_op(b"PUB a.b _INBOX.1 2\r\nhi\r\nPING\r\n"),
            Some((24, Some(&b"a.b"[..])))
        );
        // HPUB: the last number is headers and payload together.
        let hpub = b"HPUB x r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        assert_eq!(client_op(hpub), Some((hpub.len(), Some(&b"x"[..]))));
        // Incomplete: nothing yet.
        assert_eq!(client_op(b"PUB a 5\r\nhel"), None);
        assert_eq!(client_op(b"PU"), None);
        // Unparseable sizes go through as a line of their own.
        assert_eq!(client_op(b"PUB a x\r\n"), Some((9, None)));
    }
}
