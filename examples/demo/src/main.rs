//! A runnable tour of entity-sync: `cargo run --release -p entity-sync-demo`, then open
//! <http://127.0.0.1:8090/>.
//!
//! One process plays every role of a real deployment, talking over real sockets:
//!
//! - **the node**: an entity-sync node started in-process on the embedded bus
//!   (websocket on 127.0.0.1:8080, gRPC on 127.0.0.1:50051) through the
//!   library, as the `entity-sync` binary does. `--node URL` skips this and uses
//!   a node that is already running.
//! - **an example backend**: a grocery list in SQLite. It keeps a gRPC `Resolve`
//!   stream open to the node and answers its requests with rows from SQLite; when
//!   it changes an item it calls `Notify`, and the node pushes the fresh rows to
//!   every browser that subscribed. Every few seconds it edits a random item so
//!   that the page visibly moves.
//! - **the demo page** (served by the backend on 127.0.0.1:8090), which uses the
//!   client package `clients/js` (its committed build, served at
//!   `/entity-sync.js`) to show a list live, and edits items through the
//!   backend's small REST API.
//!
//! The two entities show the two fetch modes:
//!
//! - `items/{id}`: one item row, `FETCH_MODE_SHARED`: one resolve per change,
//!   fanned out to every subscriber; access is checked only at subscribe: by
//!   `/api/token`, which signs the page a subscribe token for the item that
//!   the node verifies (no backend call), or by the resolver with the secret
//!   (a node given with `--node`, which does not know the demo's key).
//! - `lists/{id}`: the list row followed by its item rows,
//!   `FETCH_MODE_PER_SUBSCRIBER`: resolved once per distinct secret, so a private
//!   list is `FORBIDDEN` unless the subscriber's secret is `demo-secret`.
//!
//! # Layout
//!
//! - `main`: flags, tracing, starts the node (unless `--node`), the backend's
//!   tasks and the page server; one cancellation token stops them all.
//! - `db`: the grocery database and the queries that read and change it.
//! - `backend`: the resolver on `entity-sync-backend` (one handler per
//!   entity), item edits (SQLite update, then `Notify`) and the periodic random edit.
//! - `web`: the demo page, the JS client and the REST API the page edits through.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use entity_sync::{
    config::Config,
    node::{Listeners, Node},
};
use entity_sync_backend::{Notifier, Tls};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, info, info_span, warn};
use tracing_subscriber::EnvFilter;

/// The secret that opens private lists. A real backend would check a session
/// token or a signed JWT here; the node only carries the secret through.
const DEMO_SECRET: &str = "demo-secret";

/// How long Ctrl-C waits for the backend's tasks before it stops the node anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// entity-sync demo: a node, an example SQLite backend and a live web page, in one process.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Websocket address of the node: where the in-process node listens, or
    /// where the page finds the node given with `--node`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    ws_addr: SocketAddr,

    /// Websocket path of the node.
    #[arg(long, default_value = "/ws/entity-sync/")]
    ws_path: String,

    /// The websocket URL the page connects to, when it is not `ws://` on
    /// `--ws-addr` (a node behind a TLS proxy: `wss://sync.example.com/ws/entity-sync/`).
    #[arg(long, value_name = "URL", value_parser = parse_ws_url)]
    ws_url: Option<String>,

    /// gRPC address of the in-process node.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,

    /// Address of the demo page and its REST API.
    #[arg(long, default_value = "127.0.0.1:8090")]
    http_addr: SocketAddr,

    /// SQLite file to keep the grocery list in (created and seeded when new).
    /// Without it the list lives in memory and every run starts afresh.
    #[arg(long)]
    db: Option<PathBuf>,

    /// gRPC URL of a running node (e.g. http://127.0.0.1:50051): use it instead
    /// of starting one in-process. Give its websocket address with `--ws-addr`.
    #[arg(long, value_name = "URL")]
    node: Option<String>,

    /// CA certificate (PEM) to verify the gRPC certificate of the `--node`
    /// with (an `https://` URL: a node with --grpc-tls-cert).
    #[arg(long, env = "DEMO_NODE_CA", value_name = "PATH")]
    node_ca: Option<PathBuf>,

    /// Resolver token of the node's --grpc-tokens-file (for `--node` with credentials).
    #[arg(long, env = "DEMO_RESOLVER_TOKEN", hide_env_values = true)]
    resolver_token: Option<String>,

    /// Notifier token of the node's --grpc-tokens-file.
    #[arg(long, env = "DEMO_NOTIFIER_TOKEN", hide_env_values = true)]
    notifier_token: Option<String>,

    /// With `--node`: the JWKS file that node verifies subscribe tokens with
    /// (its --subscribe-token-jwks); the page's tokens are signed with its
    /// first HS256 (`oct`) key. Without it, a `--node` page subscribes with
    /// its secret alone. (The in-process node gets a key made for the run.)
    #[arg(long, value_name = "PATH", requires = "node")]
    subscribe_token_jwks: Option<PathBuf>,

    /// Edit a random item every SECONDS so the page visibly changes; 0 turns it off.
    #[arg(long, value_name = "SECONDS", default_value = "3", value_parser = parse_seconds)]
    auto_edit: Duration,
}

fn parse_ws_url(value: &str) -> Result<String, String> {
    match value.split_once("://") {
        Some(("ws" | "wss", rest)) if !rest.is_empty() => Ok(value.to_owned()),
        _ => Err(format!("{value:?} is not a ws:// or wss:// URL")),
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{value:?} is not a number of seconds, 0 or more"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let auto_edit = args.auto_edit;

    let db = db::Db::open(args.db.as_deref()).context("opening the demo database")?;
    let http = bind(args.http_addr, "--http-addr").await?;
    let http_addr = http.local_addr()?;

    // Subscribe tokens: the page asks `/api/token` for one per key it
    // subscribes to, signed with a key made for this run, and the
    // in-process node verifies them (no backend call to authorize a
    // subscribe). A node given with --node does not know the key: the page
    // then subscribes with its secret alone.
    let token_keys = tokens::TokenKeys::new().context("making the subscribe-token key")?;
    let signer = match (&args.node, &args.subscribe_token_jwks) {
        (None, _) => Some(token_keys.signer()),
        (Some(_), Some(path)) => Some(
            tokens::signer_of_jwks(path)
                .with_context(|| format!("--subscribe-token-jwks {}", path.display()))?,
        ),
        (Some(_), None) => None,
    };

    // The node: in-process unless --node names a running one. Its listeners are
    // bound here, before anything connects, so there is no readiness race.
    let (node, grpc_url, ws_addr) = match &args.node {
        Some(url) => (None, url.clone(), args.ws_addr),
        None => {
            let ws = bind(args.ws_addr, "--ws-addr").await?;
            let grpc = bind(args.grpc_addr, "--grpc-addr").await?;
            let mut config = Config::default();
            config.ws.addr = ws.local_addr()?;
            config.ws.path = args.ws_path.clone();
            config.grpc.addr = grpc.local_addr()?;
            config.ws.subscribe_token_jwks = Some(token_keys.path().to_owned());
            let node = Node::start(Listeners { ws, grpc }, config)
                .await
                .context("starting the entity-sync node")?;
            let grpc_url = format!("http://{}", node.grpc_addr());
            let ws_addr = node.ws_addr();
            (Some(node), grpc_url, ws_addr)
        }
    };

    let tls = match &args.node_ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --node-ca {}", path.display()))?;
            Some(Tls::new().ca_certificate(pem))
        }
        None => None,
    };
    // The notifier connects on first use and again after the node comes back.
    let mut notifier = Notifier::builder(grpc_url.clone());
    if let Some(token) = &args.notifier_token {
        notifier = notifier.bearer_token(token.clone());
    }
    if let Some(tls) = &tls {
        notifier = notifier.tls(tls.clone());
    }
    let notifier = notifier
        .connect_lazy()
        .with_context(|| format!("invalid gRPC URL {grpc_url:?}"))?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let resolver = backend::resolver(&grpc_url, args.resolver_token.clone(), tls, db.clone())?;
    let resolver_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(err) = resolver
            .serve(resolver_shutdown.clone().cancelled_owned())
            .await
        {
            tracing::error!(%err, "the node refused the demo backend");
            resolver_shutdown.cancel();
        }
    });
    if !auto_edit.is_zero() {
        tasks.spawn(
            backend::run_auto_edit(notifier.clone(), db.clone(), auto_edit, shutdown.clone())
                .instrument(info_span!("auto_edit")),
        );
    }
    let router = web::router(web::AppState {
        db: db.clone(),
        notifier,
        ws_addr,
        ws_path: args.ws_path.clone(),
        ws_url: args.ws_url.clone(),
        signer,
    });
    let page_shutdown = shutdown.clone();
    tasks.spawn(
        async move {
            let served = axum::serve(http, router)
                .with_graceful_shutdown(page_shutdown.clone().cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "demo page server failed");
            }
            // Without its page the demo has no purpose: stop everything.
            page_shutdown.cancel();
        }
        .instrument(info_span!("page_server", http.addr = %http_addr)),
    );
    tasks.close();

    print_instructions(&args, http_addr, ws_addr, &grpc_url, auto_edit);

    tokio::select! {
        () = shutdown_signal() => info!("shutdown requested"),
        () = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "backend tasks did not stop in time");
    }
    // Last, so the node's own drain (close 1001 to browsers) is what they see.
    if let Some(node) = node {
        node.shutdown().await;
    }
    info!("demo stopped");
    Ok(())
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (busy? pick another with {flag})"))
}

/// Resolves on Ctrl-C, or SIGTERM where there is one.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

fn print_instructions(
    args: &Args,
    http_addr: SocketAddr,
    ws_addr: SocketAddr,
    grpc_url: &str,
    auto_edit: Duration,
) {
    let node = match &args.node {
        Some(_) => "an already running node",
        None => "in-process, embedded bus",
    };
    let database = match &args.db {
        Some(path) => format!("SQLite file {}", path.display()),
        None => "SQLite in memory (--db FILE keeps it)".to_owned(),
    };
    let websocket = args
        .ws_url
        .clone()
        .unwrap_or_else(|| format!("ws://{ws_addr}{}", args.ws_path));
    let edits = if auto_edit.is_zero() {
        "off".to_owned()
    } else {
        format!("a random item changes every {auto_edit:?} (--auto-edit 0 turns it off)")
    };
    let tokens = match (&args.node, &args.subscribe_token_jwks) {
        (Some(_), None) => "off (give --subscribe-token-jwks: the --node's JWKS file)",
        _ => "the page subscribes with tokens from /api/token, verified by the node",
    };
    println!(
        "
  entity-sync demo is running.

    Open the demo page:  http://{http_addr}/

    node         {node}
    websocket    {websocket}
    gRPC         {grpc_url}   (Notify, Resolve)
    database     {database}
    auto-edit    {edits}
    tokens       {tokens}

  The page shows the grocery list live. Edit a cell and press Enter, or change
  an item from a shell and watch the page follow:

    curl -X POST http://{http_addr}/api/items/101 \\
         -H 'content-type: application/json' -d '{{\"qty\": 7, \"price\": 2.49}}'

  The list is private: its secret is \"{DEMO_SECRET}\" (clear it on the page to see
  FORBIDDEN). The hardware list is public. Ctrl-C stops everything.
"
    );
}

/// The grocery database and the queries that read and change it.
mod db {
    use std::{
        path::Path,
        sync::{Arc, Mutex, PoisonError},
    };

    use rusqlite::{Connection, OptionalExtension as _, params};
    use serde::Serialize;

    /// Handle to the demo database; cheap to clone.
    #[derive(Clone)]
    pub struct Db {
        // One connection behind a std Mutex: an in-memory database exists only
        // on its connection, SQLite serialises writers anyway, and the lock is
        // taken only inside `spawn_blocking`, never held across an `.await`.
        conn: Arc<Mutex<Connection>>,
    }

    /// Why a database call failed.
    #[derive(Debug, thiserror::Error)]
    pub enum DbError {
        #[error(transparent)]
        Sqlite(#[from] rusqlite::Error),
        #[error("database task failed")]
        Task(#[from] tokio::task::JoinError),
    }

    /// A row of `lists`; serialised as `{"type":"list",...}` so that a client
    /// can tell it from the item rows that follow it in `lists/{id}`.
    #[derive(Debug, Serialize)]
    #[serde(tag = "type", rename = "list")]
    pub struct List {
        pub id: i64,
        pub name: String,
        pub public: bool,
    }

    /// A row of `items`; serialised as `{"type":"item",...}`.
    #[derive(Debug, Serialize)]
    #[serde(tag = "type", rename = "item")]
    pub struct Item {
        pub id: i64,
        pub list_id: i64,
        pub name: String,
        pub qty: i64,
        pub price: f64,
        /// Unix milliseconds.
        pub updated_at: i64,
    }

    /// A list with its items, by id.
    pub struct ListWithItems {
        pub list: List,
        pub items: Vec<Item>,
    }

    /// An item and whether its list is public.
    pub struct ItemWithAccess {
        pub item: Item,
        pub list_public: bool,
    }

    /// A validated change to an item; `None` fields stay as they are.
    #[derive(Debug, Default)]
    pub struct ItemChange {
        pub name: Option<String>,
        pub qty: Option<i64>,
        pub price: Option<f64>,
    }

    const SCHEMA: &str = "
        CREATE TABLE IF NOT EXISTS lists (
            id     INTEGER PRIMARY KEY,
            name   TEXT NOT NULL,
            -- a public list needs no secret (see backend::may_read)
            public INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS items (
            id         INTEGER PRIMARY KEY,
            list_id    INTEGER NOT NULL REFERENCES lists(id),
            name       TEXT NOT NULL,
            qty        INTEGER NOT NULL,
            price      REAL NOT NULL,
            updated_at INTEGER NOT NULL -- unix milliseconds
        );
        CREATE INDEX IF NOT EXISTS items_by_list ON items(list_id, id);
    ";

    const SEED_LISTS: &[(i64, &str, bool)] =
        &[(1, "Groceries", false), (2, "Hardware store", true)];

    const SEED_ITEMS: &[(i64, i64, &str, i64, f64)] = &[
        (101, 1, "Milk", 2, 1.19),
        (102, 1, "Eggs (dozen)", 1, 3.49),
        (103, 1, "Sourdough bread", 1, 4.20),
        (104, 1, "Apples", 6, 0.45),
        (105, 1, "Coffee beans", 1, 11.90),
        (106, 1, "Tomatoes", 4, 0.60),
        (107, 1, "Cheddar", 1, 5.75),
        (108, 1, "Olive oil", 1, 8.99),
        (201, 2, "Wood screws", 50, 0.08),
        (202, 2, "Sandpaper", 3, 0.99),
        (203, 2, "Light bulbs", 4, 2.49),
        (204, 2, "Duct tape", 1, 6.30),
    ];

    impl Db {
        /// Opens (or creates) the database; seeds it when it has no lists yet.
        pub fn open(path: Option<&Path>) -> rusqlite::Result<Self> {
            let mut conn = match path {
                Some(path) => Connection::open(path)?,
                None => Connection::open_in_memory()?,
            };
            conn.execute_batch(SCHEMA)?;
            let lists: i64 = conn.query_row("SELECT count(*) FROM lists", [], |r| r.get(0))?;
            if lists == 0 {
                let now = super::backend::now_millis();
                let tx = conn.transaction()?;
                for (id, name, public) in SEED_LISTS {
                    tx.execute(
                        "INSERT INTO lists (id, name, public) VALUES (?1, ?2, ?3)",
                        params![id, name, public],
                    )?;
                }
                for (id, list_id, name, qty, price) in SEED_ITEMS {
                    tx.execute(
                        "INSERT INTO items (id, list_id, name, qty, price, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, list_id, name, qty, price, now],
                    )?;
                }
                tx.commit()?;
            }
            Ok(Self {
                conn: Arc::new(Mutex::new(conn)),
            })
        }

        /// Runs `f` on the connection on the blocking pool, so SQLite's file
        /// I/O never stalls the async workers.
        pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
        where
            F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
            T: Send + 'static,
        {
            let conn = Arc::clone(&self.conn);
            let result = tokio::task::spawn_blocking(move || {
                // A panic while holding the lock leaves nothing half-done that
                // matters: every statement is atomic in SQLite.
                let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
                f(&conn)
            })
            .await?;
            Ok(result?)
        }
    }

    const ITEM_COLUMNS: &str = "id, list_id, name, qty, price, updated_at";

    fn item(row: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
        Ok(Item {
            id: row.get("id")?,
            list_id: row.get("list_id")?,
            name: row.get("name")?,
            qty: row.get("qty")?,
            price: row.get("price")?,
            updated_at: row.get("updated_at")?,
        })
    }

    fn list(row: &rusqlite::Row<'_>) -> rusqlite::Result<List> {
        Ok(List {
            id: row.get("id")?,
            name: row.get("name")?,
            public: row.get("public")?,
        })
    }

    /// List `id` with its items. `None` if no such list.
    pub fn list_with_items(conn: &Connection, id: i64) -> rusqlite::Result<Option<ListWithItems>> {
        let Some(list) = conn
            .query_row(
                "SELECT id, name, public FROM lists WHERE id = ?1",
                [id],
                list,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ITEM_COLUMNS} FROM items WHERE list_id = ?1 ORDER BY id"
        ))?;
        let items = stmt
            .query_map([id], item)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(ListWithItems { list, items }))
    }

    /// Item `id` and whether its list is public. `None` if no such item.
    pub fn item_with_access(
        conn: &Connection,
        id: i64,
    ) -> rusqlite::Result<Option<ItemWithAccess>> {
        conn.query_row(
            "SELECT i.id, i.list_id, i.name, i.qty, i.price, i.updated_at, l.public
             FROM items i JOIN lists l ON l.id = i.list_id WHERE i.id = ?1",
            [id],
            |r| {
                Ok(ItemWithAccess {
                    item: item(r)?,
                    list_public: r.get("public")?,
                })
            },
        )
        .optional()
    }

    /// Applies `change` to item `id` and returns the new row. `None` if no such item.
    pub fn update_item(
        conn: &Connection,
        id: i64,
        change: &ItemChange,
        now_millis: i64,
    ) -> rusqlite::Result<Option<Item>> {
        conn.query_row(
            &format!(
                "UPDATE items SET name = coalesce(?1, name), qty = coalesce(?2, qty),
                                  price = coalesce(?3, price), updated_at = ?4
                 WHERE id = ?5 RETURNING {ITEM_COLUMNS}"
            ),
            params![change.name, change.qty, change.price, now_millis, id],
            item,
        )
        .optional()
    }

    /// Every list, for the page's list picker.
    pub fn lists(conn: &Connection) -> rusqlite::Result<Vec<List>> {
        let mut stmt = conn.prepare_cached("SELECT id, name, public FROM lists ORDER BY id")?;
        stmt.query_map([], list)?.collect()
    }

    /// Every item id, for the random edits.
    pub fn item_ids(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
        let mut stmt = conn.prepare_cached("SELECT id FROM items ORDER BY id")?;
        stmt.query_map([], |r| r.get(0))?.collect()
    }
}

/// The example backend: serves rows to the node and tells it about changes.
mod backend {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use entity_sync_backend::{
        Answer, Answers, Backend, FetchMode, Notifier, Reason, ResolveRequest,
    };
    use rusqlite::Connection;
    use serde::Serialize;
    use tokio_util::sync::CancellationToken;
    use tracing::{info, warn};

    use super::{DEMO_SECRET, db};

    /// The name this backend registers under (its replicas would share it).
    pub const RESOLVER_NAME: &str = "grocery-backend";
    /// One item: SHARED, see [`resolve_item`].
    pub const ITEMS: &str = "items";
    /// One list with its items: PER_SUBSCRIBER, see [`resolve_list`].
    pub const LISTS: &str = "lists";

    /// Requests the node may keep outstanding on our stream. The SDK answers
    /// them concurrently; the single SQLite connection serialises the
    /// queries, and the node batches several ids into one request under load.
    const MAX_IN_FLIGHT: u32 = 16;

    pub fn now_millis() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    /// Who may read a list. Deliberately simple: public lists are open to
    /// everyone, private ones to whoever sent the demo secret.
    pub fn may_read(list_public: bool, secret: &str) -> bool {
        list_public || secret == DEMO_SECRET
    }

    /// The resolver: both entities, one handler each. `serve` keeps the
    /// stream open, registering again after the node restarts.
    pub fn resolver(
        grpc_url: &str,
        token: Option<String>,
        tls: Option<entity_sync_backend::Tls>,
        db: db::Db,
    ) -> Result<Backend, entity_sync_backend::Error> {
        let items = {
            let db = db.clone();
            move |request: ResolveRequest| answer(db.clone(), request, resolve_item)
        };
        let lists = move |request: ResolveRequest| answer(db.clone(), request, resolve_list);
        let mut builder = Backend::builder(grpc_url)
            .name(RESOLVER_NAME)
            .entity(ITEMS, FetchMode::Shared, items)
            .entity(LISTS, FetchMode::PerSubscriber, lists)
            .max_in_flight(MAX_IN_FLIGHT);
        if let Some(token) = token {
            builder = builder.bearer_token(token);
        }
        if let Some(tls) = tls {
            builder = builder.tls(tls);
        }
        builder.build()
    }

    /// Answers every id of `request` with `resolve` on the database.
    async fn answer(
        db: db::Db,
        request: ResolveRequest,
        resolve: fn(&Connection, i64, &ResolveRequest) -> rusqlite::Result<Answer>,
    ) -> Result<Answers, db::DbError> {
        db.call(move |conn| {
            request
                .ids()
                .iter()
                .map(|id| {
                    // Ids are strings on the wire; ours are integers, so
                    // anything else names nothing.
                    let answer = match id.parse::<i64>() {
                        Ok(number) => resolve(conn, number, &request)?,
                        Err(_) => Answer::not_found(),
                    };
                    Ok((id.clone(), answer))
                })
                .collect()
        })
        .await
        // An `Err` answers every id with an error; the SDK logs the detail
        // and the browser gets a plain message.
    }

    /// `items/{id}`, FETCH_MODE_SHARED. The node asks once per change, with no
    /// secret, and fans the row out to every subscriber, so access is checked
    /// only when a browser subscribes. The price: someone whose access is
    /// revoked keeps getting the item until they resubscribe. Where that
    /// matters, use PER_SUBSCRIBER, as `lists` does.
    fn resolve_item(
        conn: &Connection,
        id: i64,
        request: &ResolveRequest,
    ) -> rusqlite::Result<Answer> {
        let Some(found) = db::item_with_access(conn, id)? else {
            return Ok(Answer::not_found());
        };
        // On a change (the subscribers were checked when they subscribed) and
        // on a shared subscribe (the node verified the page's subscribe
        // token, which `/api/token` only signs for readers) there is no
        // secret to check.
        let checked_already = request.reason() != Reason::Subscribe || request.is_shared();
        if !checked_already && !may_read(found.list_public, request.secret()) {
            return Ok(Answer::forbidden("this item is on a private list"));
        }
        // Version 0: let the node version pushes by its bus sequence, which
        // orders changes across nodes without any clock of ours.
        Ok(Answer::row(&found.item))
    }

    /// `lists/{id}`, FETCH_MODE_PER_SUBSCRIBER: the node asks once per distinct
    /// secret among the subscribers, on subscribe and on every change, so a
    /// FORBIDDEN on a change ends that subscriber's subscription (revocation).
    /// The rows are the list, then each of its items: several rows per key.
    fn resolve_list(
        conn: &Connection,
        id: i64,
        request: &ResolveRequest,
    ) -> rusqlite::Result<Answer> {
        let Some(found) = db::list_with_items(conn, id)? else {
            return Ok(Answer::not_found());
        };
        if !may_read(found.list.public, request.secret()) {
            return Ok(Answer::forbidden(
                "this list is private: send the secret \"demo-secret\"",
            ));
        }
        let rows = std::iter::once(Row::List(&found.list)).chain(found.items.iter().map(Row::Item));
        Ok(Answer::rows(rows))
    }

    /// A row of `lists/{id}`: the list, then its items (each serialises
    /// with its own `type` tag).
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Row<'a> {
        List(&'a db::List),
        Item(&'a db::Item),
    }

    /// Why an edit did not go through.
    #[derive(Debug, thiserror::Error)]
    pub enum EditError {
        #[error("no such item")]
        NotFound,
        #[error("database error")]
        Database(#[source] db::DbError),
        /// The item was saved but the node did not take the notify, so no
        /// browser hears of it until the next change of that key.
        #[error("saved, but the node did not accept the change notification ({})", .0.message())]
        Notify(#[source] entity_sync_backend::Error),
    }

    /// A saved edit and the bus sequences of its change keys.
    #[derive(Serialize)]
    pub struct Edited {
        pub item: db::Item,
        pub sequences: Vec<u64>,
    }

    /// Saves the change in SQLite, then tells the node which keys changed.
    pub async fn edit_item(
        notifier: &Notifier,
        db: &db::Db,
        id: i64,
        change: db::ItemChange,
    ) -> Result<Edited, EditError> {
        let now = now_millis();
        let item = db
            .call(move |conn| db::update_item(conn, id, &change, now))
            .await
            .map_err(EditError::Database)?
            .ok_or(EditError::NotFound)?;
        // The backend knows which keys a row feeds: the item itself, and the
        // list whose rows include it.
        let keys = [(ITEMS, id), (LISTS, item.list_id)];
        // OK means the bus stored the keys: every subscriber will be pushed.
        // While the node is away the notifier retries (for 30 s) under one
        // idempotency key.
        let notified = notifier.notify(keys).await.map_err(EditError::Notify)?;
        info!(item.id = id, list.id = item.list_id, sequences = ?notified.sequences, "item edited, change notified");
        Ok(Edited {
            item,
            sequences: notified.sequences,
        })
    }

    /// Every `period`, sets a random item's quantity or price, through the same
    /// path as an edit from the page.
    pub async fn run_auto_edit(
        notifier: Notifier,
        db: db::Db,
        period: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate: let the page load first
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let ids = match db.call(db::item_ids).await {
                Ok(ids) => ids,
                Err(err) => {
                    warn!(%err, "cannot list items");
                    continue;
                }
            };
            let Some(&id) = ids.get(fastrand::usize(..ids.len().max(1))) else {
                continue;
            };
            let change = if fastrand::bool() {
                db::ItemChange {
                    qty: Some(fastrand::i64(1..=12)),
                    ..Default::default()
                }
            } else {
                db::ItemChange {
                    price: Some(f64::from(fastrand::u32(25..=1500)) / 100.0),
                    ..Default::default()
                }
            };
            if let Err(err) = edit_item(&notifier, &db, id, change).await {
                warn!(%err, item.id = id, "auto-edit failed");
            }
        }
    }
}

/// The subscribe-token key of this run: an HS256 secret from the system's
/// random source, the signer the page's tokens come from, and the JWKS file
/// the in-process node verifies them with (owner-only, removed on exit).
mod tokens {
    use std::{
        path::{Path, PathBuf},
        sync::Arc,
        time::Duration,
    };

    use entity_sync_backend::{SubscribeTokenSigner, jwks};

    /// How long a page's token opens its key: short, so that the page's
    /// client visibly refreshes it (with its version: no resolve, no push).
    pub const TOKEN_TTL: Duration = Duration::from_secs(120);

    pub struct TokenKeys {
        signer: Arc<SubscribeTokenSigner>,
        path: PathBuf,
    }

    impl TokenKeys {
        pub fn new() -> anyhow::Result<Self> {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret)
                .map_err(|err| anyhow::anyhow!("no system random source: {err}"))?;
            let signer = SubscribeTokenSigner::hs256("demo", &secret)?;
            let path = std::env::temp_dir().join(format!(
                "entity-sync-demo-jwks-{}-{:016x}.json",
                std::process::id(),
                fastrand::u64(..)
            ));
            write_private(&path, jwks(&[&signer]).as_bytes())?;
            Ok(Self {
                signer: Arc::new(signer),
                path,
            })
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        pub fn signer(&self) -> Arc<SubscribeTokenSigner> {
            self.signer.clone()
        }
    }

    impl Drop for TokenKeys {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// A signer with the first `oct` (HS256) key of the JWKS file at `path`:
    /// the key a node given with `--node` verifies the page's tokens with.
    pub fn signer_of_jwks(path: &Path) -> anyhow::Result<Arc<SubscribeTokenSigner>> {
        use base64::Engine as _;
        let text = std::fs::read(path)?;
        let jwks: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|err| anyhow::anyhow!("not JSON (line {})", err.line()))?;
        let key = jwks["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|key| key["kty"] == "oct"))
            .ok_or_else(|| anyhow::anyhow!("no oct (HS256) key"))?;
        let (Some(kid), Some(k)) = (key["kid"].as_str(), key["k"].as_str()) else {
            return Err(anyhow::anyhow!("its oct key has no kid or no k"));
        };
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.trim_end_matches('='))
            .map_err(|_| anyhow::anyhow!("its oct key's k is not base64url"))?;
        Ok(Arc::new(SubscribeTokenSigner::hs256(kid, &secret)?))
    }

    /// Creates `path` readable by this user only (it holds the HS256 secret).
    fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(path)?.write_all(contents)
    }
}

/// The demo page, the JS client and the REST API the page edits through.
mod web {
    use std::net::SocketAddr;

    use axum::{
        Router,
        body::Bytes,
        extract::{Path, State},
        http::{HeaderMap, StatusCode, header},
        response::{Html, IntoResponse, Response},
        routing::{get, post},
    };
    use std::sync::Arc;

    use axum::extract::Query;
    use entity_sync_backend::{Notifier, SubscribeTokenSigner};
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::{DEMO_SECRET, backend, db, tokens::TOKEN_TTL};

    const INDEX_HTML: &str = include_str!("../index.html");
    /// The client package's committed build (`clients/js/dist`), so the demo
    /// runs from a fresh clone without npm.
    const CLIENT_JS: &str = include_str!("../../../clients/js/dist/entity-sync.js");

    /// What the handlers share; cheap to clone.
    #[derive(Clone)]
    pub struct AppState {
        pub db: db::Db,
        pub notifier: Notifier,
        /// The node's websocket listener, as the page should reach it.
        pub ws_addr: SocketAddr,
        pub ws_path: String,
        /// `--ws-url`: the URL the page uses instead (a TLS proxy in front).
        pub ws_url: Option<String>,
        /// Signs the page's subscribe tokens (`None`: the node does not
        /// verify ours, the page uses its secret alone).
        pub signer: Option<Arc<SubscribeTokenSigner>>,
    }

    pub fn router(state: AppState) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/entity-sync.js", get(client_js))
            .route("/api/config", get(config))
            .route("/api/token", get(token))
            .route("/api/items/{id}", post(edit_item))
            .with_state(state)
    }

    async fn index() -> Html<&'static str> {
        Html(INDEX_HTML)
    }

    async fn client_js() -> impl IntoResponse {
        (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            CLIENT_JS,
        )
    }

    /// What the page needs to start: where the node is, the secret to offer
    /// and the lists to pick from.
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct PageConfig {
        ws_url: String,
        secret: &'static str,
        lists: Vec<db::List>,
        /// Whether the page subscribes with tokens from `/api/token`.
        tokens: bool,
    }

    async fn config(State(state): State<AppState>, headers: HeaderMap) -> Response {
        let lists = match state.db.call(db::lists).await {
            Ok(lists) => lists,
            Err(err) => {
                tracing::warn!(%err, "cannot list lists");
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"error": "database error"}),
                );
            }
        };
        let config = PageConfig {
            ws_url: ws_url(&state, &headers),
            secret: DEMO_SECRET,
            lists,
            tokens: state.signer.is_some(),
        };
        json_response(StatusCode::OK, &config)
    }

    /// Query of `GET /api/token`.
    #[derive(Deserialize)]
    struct TokenQuery {
        entity: String,
        id: String,
    }

    /// `GET /api/token?entity=items&id=7`: a subscribe token for that one
    /// key, for a reader of it. The page's secret comes in the
    /// `x-demo-secret` header; for an item the rule is the resolver's
    /// (public lists are open to all, private ones to the demo secret),
    /// checked here once, when the token is asked for, instead of by a
    /// resolve at every subscribe.
    async fn token(
        State(state): State<AppState>,
        Query(query): Query<TokenQuery>,
        headers: HeaderMap,
    ) -> Response {
        let error =
            |status: StatusCode, message: &str| json_response(status, &json!({"error": message}));
        let Some(signer) = state.signer.clone() else {
            return error(
                StatusCode::NOT_FOUND,
                "this demo issues no tokens (its node is --node)",
            );
        };
        let Ok(id) = query.id.parse::<i64>() else {
            return error(StatusCode::NOT_FOUND, "no such key");
        };
        let secret = headers
            .get("x-demo-secret")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let entity = query.entity;
        let public = match entity.as_str() {
            backend::ITEMS => {
                state
                    .db
                    .call(move |conn| {
                        Ok(db::item_with_access(conn, id)?.map(|found| found.list_public))
                    })
                    .await
            }
            // A list's rows depend on the secret (PER_SUBSCRIBER): the node
            // resolves them with it after checking the token, and the
            // resolver refuses a private list to the wrong secret. The token
            // only has to name an existing list.
            backend::LISTS => {
                state
                    .db
                    .call(move |conn| Ok(db::list_with_items(conn, id)?.map(|_| true)))
                    .await
            }
            _ => return error(StatusCode::NOT_FOUND, "no such entity"),
        };
        match public {
            Ok(Some(public)) if backend::may_read(public, &secret) => {
                match signer.sign(&entity, &[id.to_string()], TOKEN_TTL) {
                    Ok(token) => json_response(StatusCode::OK, &json!({"token": token})),
                    Err(err) => {
                        tracing::warn!(%err, "cannot sign a subscribe token");
                        error(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign")
                    }
                }
            }
            Ok(Some(_)) => error(StatusCode::FORBIDDEN, "this is on a private list"),
            Ok(None) => error(StatusCode::NOT_FOUND, "no such key"),
            Err(err) => {
                tracing::warn!(%err, "cannot read access");
                error(StatusCode::INTERNAL_SERVER_ERROR, "database error")
            }
        }
    }

    /// The node's websocket URL. A node listening on every interface
    /// (0.0.0.0) is reached under the host name the browser used for this page.
    fn ws_url(state: &AppState, headers: &HeaderMap) -> String {
        if let Some(url) = &state.ws_url {
            return url.clone();
        }
        let port = state.ws_addr.port();
        let host = if state.ws_addr.ip().is_unspecified() {
            headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .map(|host| match host.rsplit_once(':') {
                    // Strip the page's port; "[::1]" alone has none to strip.
                    Some((name, port)) if !host.ends_with(']') && port.parse::<u16>().is_ok() => {
                        name.to_owned()
                    }
                    _ => host.to_owned(),
                })
                .unwrap_or_else(|| "127.0.0.1".to_owned())
        } else {
            match state.ws_addr {
                SocketAddr::V4(addr) => addr.ip().to_string(),
                SocketAddr::V6(addr) => format!("[{}]", addr.ip()),
            }
        };
        format!("ws://{host}:{port}{}", state.ws_path)
    }

    /// Body of `POST /api/items/{id}`: the fields to change.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ItemEdit {
        name: Option<String>,
        qty: Option<i64>,
        price: Option<f64>,
    }

    impl ItemEdit {
        fn validate(self) -> Result<db::ItemChange, String> {
            if self.name.is_none() && self.qty.is_none() && self.price.is_none() {
                return Err("nothing to change: send name, qty or price".to_owned());
            }
            let name = match self.name.map(|name| name.trim().to_owned()) {
                Some(name) if name.is_empty() || name.chars().count() > 60 => {
                    return Err("name must have 1 to 60 characters".to_owned());
                }
                name => name,
            };
            if let Some(qty) = self.qty
                && !(0..=999).contains(&qty)
            {
                return Err("qty must be between 0 and 999".to_owned());
            }
            let price = match self.price {
                Some(price) if !(0.0..=10_000.0).contains(&price) => {
                    return Err("price must be between 0 and 10000".to_owned());
                }
                // Stored as given, so keep it to whole cents.
                price => price.map(|price| (price * 100.0).round() / 100.0),
            };
            Ok(db::ItemChange {
                name,
                qty: self.qty,
                price,
            })
        }
    }

    async fn edit_item(
        State(state): State<AppState>,
        Path(id): Path<i64>,
        body: Bytes,
    ) -> Response {
        let change = match serde_json::from_slice::<ItemEdit>(&body)
            .map_err(|err| format!("invalid JSON body: {err}"))
            .and_then(ItemEdit::validate)
        {
            Ok(change) => change,
            Err(message) => {
                return json_response(StatusCode::BAD_REQUEST, &json!({"error": message}));
            }
        };
        match backend::edit_item(&state.notifier, &state.db, id, change).await {
            Ok(edited) => json_response(StatusCode::OK, &edited),
            Err(err) => {
                let status = match &err {
                    backend::EditError::NotFound => StatusCode::NOT_FOUND,
                    backend::EditError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    backend::EditError::Notify(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                if status.is_server_error() {
                    tracing::warn!(err = ?err, item.id = id, "edit failed");
                }
                json_response(status, &json!({"error": err.to_string()}))
            }
        }
    }

    fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
        match serde_json::to_string(body) {
            Ok(body) => {
                (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
            Err(err) => {
                tracing::warn!(%err, "cannot serialise a response");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_url_is_ws_on_the_node_address_unless_given() {
        assert_eq!(
            parse_ws_url("wss://sync.example.com/ws/entity-sync/").as_deref(),
            Ok("wss://sync.example.com/ws/entity-sync/")
        );
        assert!(parse_ws_url("https://sync.example.com/").is_err());
        assert!(parse_ws_url("wss://").is_err());
        let args = Args::try_parse_from(["demo", "--ws-url", "ws://10.0.0.5:9000/ws/"]).unwrap();
        assert_eq!(args.ws_url.as_deref(), Some("ws://10.0.0.5:9000/ws/"));
        assert!(Args::try_parse_from(["demo", "--ws-url", "http://x/"]).is_err());
    }
}
