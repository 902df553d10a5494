//! The `entity-sync` binary: parses config, sets up logging, binds the ports and runs a node.
//! `entity-sync notify entity/id…` calls `Notify` on a running node.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use entity_sync::{
    config::Config,
    node::{self, Listeners},
};
use entity_sync_backend::{Key, Notifier, Tls};
use tokio::net::TcpListener;
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

#[derive(Parser)]
#[command(
    name = "entity-sync",
    version,
    about = "Keeps browsers in sync with server-side entities."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    config: Config,

    /// Log format (on stderr); the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "ENTITY_SYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = "Operations")]
    log_format: LogFormat,

    /// Print the effective configuration (flags, ENTITY_SYNC_* variables and
    /// defaults resolved; secrets masked) and exit.
    #[arg(long, help_heading = "Operations")]
    print_config: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Tell a running node that keys changed (calls gRPC Notify).
    Notify {
        /// gRPC address of the node.
        #[arg(
            long,
            env = "ENTITY_SYNC_SERVER",
            default_value = "http://127.0.0.1:50051"
        )]
        server: String,
        /// Optional idempotency key: a retry with the same key is applied once.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Trace id (32 hex digits) the nodes log this change under; without
        /// it the node makes one. Either way it is printed on stderr.
        #[arg(long, default_value = "")]
        trace_id: String,
        /// A notifier token of the node's --grpc-tokens-file.
        #[arg(long, env = "ENTITY_SYNC_NOTIFY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// CA certificate (PEM) to verify a TLS node with (`https://` server).
        #[arg(long, value_name = "PATH")]
        tls_ca: Option<PathBuf>,
        /// Client certificate (PEM) for a node with mutual TLS (with --tls-key).
        #[arg(long, value_name = "PATH", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Key (PEM) of --tls-cert.
        #[arg(long, value_name = "PATH", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Keys as entity/id, e.g. items/100.
        #[arg(required = true, value_parser = parse_key)]
        keys: Vec<Key>,
    },
}

fn parse_key(s: &str) -> Result<Key, String> {
    let (entity, id) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected entity/id, e.g. items/100"))?;
    Ok(Key::from((entity, id)))
}

fn main() -> ExitCode {
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    if cli.print_config {
        print!("{}", entity_sync::config::describe(&command, &matches));
        return match cli.config.validate() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Notify {
                server,
                idempotency_key,
                trace_id,
                token,
                tls_ca,
                tls_cert,
                tls_key,
                keys,
            }) => {
                let tls = NotifyTls {
                    ca: tls_ca,
                    identity: tls_cert.zip(tls_key),
                };
                notify(server, idempotency_key, trace_id, token, tls, keys).await
            }
            None => serve(cli.config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, `: `-separated, each cause said
/// once: a cause whose text an outer message already includes (many errors
/// quote their source in their own message) is not repeated.
fn report(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::{
        Layer,
        filter::{FilterExt, filter_fn},
        layer::SubscriberExt,
        util::SubscriberInitExt,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    // The combined filter must report its real maximum level: without the hint
    // on `filter_fn` the combination reports none, the global maximum becomes
    // TRACE and every dependency record (the `log` bridge included) is built
    // and then dropped by the filter, about a third of a push's instructions.
    let max_level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let no_dependency_trace = filter_fn(no_dependency_trace).with_max_level_hint(max_level);
    tracing_subscriber::registry()
        .with(layer.with_filter(filter.and(no_dependency_trace)))
        .init();
}

/// Trace output is ours only, whatever `RUST_LOG` says: at trace level the
/// websocket library logs every received message (a client's `secret`
/// included) and the HTTP/2 stack every header (bearer tokens included).
fn no_dependency_trace(event: &tracing::Metadata<'_>) -> bool {
    *event.level() != tracing::Level::TRACE || event.target().starts_with("entity_sync")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    // Before binding: a port that would be refused is never opened.
    config
        .grpc
        .check_exposure(config.grpc.addr)
        .map_err(anyhow::Error::msg)?;
    // Handlers first: a signal that arrives while the node starts must still
    // take the graceful path, not the default (immediate exit).
    let shutdown = shutdown_signal().context("installing signal handlers")?;
    let ws = TcpListener::bind(config.ws.addr)
        .await
        .with_context(|| format!("cannot listen on --ws-addr {}", config.ws.addr))?;
    let grpc = TcpListener::bind(config.grpc.addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", config.grpc.addr))?;
    node::run(Listeners { ws, grpc }, config, shutdown).await?;
    Ok(())
}

/// Installs SIGINT and SIGTERM handlers now; the future resolves on either.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Calls `Notify` through the backend SDK, which retries while the node is
/// unavailable; without `--idempotency-key` it sends a fresh one, so a retry
/// is applied once.
/// The notify subcommand's TLS files.
struct NotifyTls {
    ca: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl NotifyTls {
    fn load(&self) -> anyhow::Result<Option<Tls>> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let Some(ca) = &self.ca else {
            anyhow::ensure!(self.identity.is_none(), "--tls-cert needs --tls-ca");
            return Ok(None);
        };
        let mut tls = Tls::new().ca_certificate(read("--tls-ca", ca)?);
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(read("--tls-cert", cert)?, read("--tls-key", key)?);
        }
        Ok(Some(tls))
    }
}

async fn notify(
    server: String,
    idempotency_key: String,
    trace_id: String,
    token: Option<String>,
    tls: NotifyTls,
    keys: Vec<Key>,
) -> anyhow::Result<()> {
    let mut builder = Notifier::builder(server.clone());
    if let Some(token) = token {
        builder = builder.bearer_token(token);
    }
    if let Some(tls) = tls.load()? {
        builder = builder.tls(tls);
    }
    let notifier = builder
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    // Without --idempotency-key the SDK sends a fresh one.
    let idempotency_key = (!idempotency_key.is_empty()).then_some(idempotency_key.as_str());
    let receipt = notifier
        .notify_traced(keys.clone(), idempotency_key, &trace_id)
        .await
        .context("Notify failed")?;
    if !receipt.trace_id.is_empty() {
        eprintln!("trace id {}", receipt.trace_id);
    }
    for (key, seq) in keys.iter().zip(&receipt.sequences) {
        println!(
            "{}/{} sequence {seq}{}",
            key.entity,
            key.id,
            if receipt.duplicate {
                " (duplicate)"
            } else {
                ""
            }
        );
    }
    Ok(())
}
