//! Node configuration: command-line flags, each with an `ENTITY_SYNC_*` environment variable.
//!
//! [`Config`] is made of one section per component ([`WsConfig`],
//! [`GrpcConfig`], [`NatsConfig`], [`ResolveConfig`]), each flattened into
//! the one command line, so a component is built from its own section.
//!
//! Each section lives in its own file; [`ConfigError`] and the shared value
//! types and parsers ([`Secret`], [`parse_duration`]) in leaf files the
//! sections use.

mod error;
mod grpc;
mod nats;
mod resolve;
mod values;
mod ws;

use std::time::Duration;

use clap::Args;

pub use error::ConfigError;
pub use grpc::GrpcConfig;
pub use nats::NatsConfig;
pub use resolve::ResolveConfig;
pub use values::{Secret, parse_duration};
pub use ws::WsConfig;

use values::defaults;

/// Everything a node needs to run. Every field has a flag and an
/// environment variable of the same name (`--ws-addr` ↔ `ENTITY_SYNC_WS_ADDR`);
/// [`Config::default`] gives the documented defaults.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub ws: WsConfig,

    #[command(flatten)]
    pub grpc: GrpcConfig,

    #[command(flatten)]
    pub nats: NatsConfig,

    #[command(flatten)]
    pub resolve: ResolveConfig,

    /// This node's id in logs and `Registered` messages (random when empty).
    #[arg(
        long,
        env = "ENTITY_SYNC_NODE_ID",
        default_value = "",
        help_heading = "Operations"
    )]
    pub node_id: String,

    /// Upper bound of the drain on shutdown.
    #[arg(long, env = "ENTITY_SYNC_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, help_heading = "Operations")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        defaults()
    }
}

impl Config {
    /// Cross-field checks clap can't express; the error names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (ws, grpc, nats, resolve) = (&self.ws, &self.grpc, &self.nats, &self.resolve);
        if grpc.tls_cert.is_some() != grpc.tls_key.is_some() {
            return Err(ConfigError::Together("--grpc-tls-cert", "--grpc-tls-key"));
        }
        if grpc.tls_client_ca.is_some() && grpc.tls_cert.is_none() {
            return Err(ConfigError::Needs {
                flag: "--grpc-tls-client-ca",
                needs: "--grpc-tls-cert and --grpc-tls-key (mutual TLS runs over the port's own TLS)",
            });
        }
        for (value, flag) in [
            (grpc.max_connections, "--grpc-max-connections"),
            (grpc.max_handshakes, "--grpc-max-handshakes"),
            (
                grpc.max_concurrent_streams as usize,
                "--grpc-max-concurrent-streams",
            ),
            (
                grpc.max_resolver_streams_per_credential,
                "--max-resolver-streams-per-credential",
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    flag,
                    rule: "must be at least 1",
                });
            }
        }
        for (value, flag) in [
            (grpc.handshake_timeout, "--grpc-handshake-timeout"),
            (grpc.keepalive_interval, "--grpc-keepalive-interval"),
            (grpc.keepalive_timeout, "--grpc-keepalive-timeout"),
            (grpc.max_connection_age, "--grpc-max-connection-age"),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    flag,
                    rule: "must be > 0",
                });
            }
        }
        if ws.tls_cert.is_some() != ws.tls_key.is_some() {
            return Err(ConfigError::Together("--ws-tls-cert", "--ws-tls-key"));
        }
        if ws.subscribe_token_audience.is_some() && ws.subscribe_token_jwks.is_none() {
            return Err(ConfigError::Needs {
                flag: "--subscribe-token-audience",
                needs: "--subscribe-token-jwks",
            });
        }
        if ws.max_message_bytes < 256 {
            return Err(ConfigError::Invalid {
                flag: "--max-message-bytes",
                rule: "must be at least 256",
            });
        }
        if ws.outbound_max_bytes < 1024 {
            return Err(ConfigError::Invalid {
                flag: "--outbound-max-bytes",
                rule: "must be at least 1024",
            });
        }
        if resolve.batch_size == 0 {
            return Err(ConfigError::Invalid {
                flag: "--resolve-batch-size",
                rule: "must be at least 1",
            });
        }
        if resolve.default_max_in_flight == 0 {
            return Err(ConfigError::Invalid {
                flag: "--default-max-in-flight",
                rule: "must be at least 1",
            });
        }
        if ws.max_subscriptions == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-subscriptions",
                rule: "must be at least 1",
            });
        }
        if ws.max_snapshot_resolves == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-snapshot-resolves",
                rule: "must be at least 1",
            });
        }
        if ws.ping_interval.is_zero() || ws.idle_timeout < ws.ping_interval {
            return Err(ConfigError::Invalid {
                flag: "--idle-timeout",
                rule: "must be at least --ping-interval, which must be > 0",
            });
        }
        if ws.write_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--write-timeout",
                rule: "must be > 0",
            });
        }
        if resolve.timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--resolve-timeout",
                rule: "must be > 0",
            });
        }
        if !(1..=5).contains(&nats.replicas) {
            return Err(ConfigError::Invalid {
                flag: "--nats-replicas",
                rule: "must be 1 to 5",
            });
        }
        if nats.prefix.is_empty()
            || !nats
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Invalid {
                flag: "--nats-prefix",
                rule: "must be non-empty and use only A-Z a-z 0-9 - _",
            });
        }
        Ok(())
    }
}

/// Headings of the node's flags in `--help` (and `--print-config`), in order.
pub const HELP_HEADINGS: [&str; 6] = [
    "WebSocket",
    "gRPC",
    "Security/TLS",
    "NATS",
    "Resolve",
    "Operations",
];

/// The effective configuration as `matches` resolved it from the command
/// line, `ENTITY_SYNC_*` variables and defaults: one `--flag=value  # source`
/// line per flag of `cmd`, grouped under its help heading. Values of flags
/// whose environment values are hidden (tokens) are never shown, and
/// credentials in URLs are masked.
pub fn describe(cmd: &clap::Command, matches: &clap::ArgMatches) -> String {
    use clap::parser::ValueSource;
    use std::fmt::Write;
    let shown: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|arg| {
            arg.get_long()
                .is_some_and(|long| !matches!(long, "help" | "version" | "print-config"))
        })
        .collect();
    fn heading_of(arg: &clap::Arg) -> &str {
        arg.get_help_heading().unwrap_or("Other")
    }
    let mut headings: Vec<&str> = HELP_HEADINGS.to_vec();
    for arg in &shown {
        if !headings.contains(&heading_of(arg)) {
            headings.push(heading_of(arg));
        }
    }
    let mut out = String::new();
    for heading in headings {
        let args: Vec<&&clap::Arg> = shown.iter().filter(|a| heading_of(a) == heading).collect();
        if args.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# {heading}");
        for arg in args {
            let id = arg.get_id().as_str();
            let raw = matches.try_get_raw(id).ok().flatten().map(|values| {
                values
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let value = match raw {
                None => "(unset)".to_string(),
                // The URLs hide their environment value in `--help` (they
                // may carry `user:password@`); here they show without it.
                Some(v) if id == "nats_url" => scrub_urls(&v),
                Some(v) if arg.is_hide_env_values_set() && !v.is_empty() => "***".to_string(),
                Some(v) if v.contains('@') => scrub_urls(&v),
                Some(v) => v,
            };
            let source = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "command line".to_string(),
                Some(ValueSource::EnvVariable) => {
                    arg.get_env().map_or("environment".to_string(), |env| {
                        format!("env {}", env.to_string_lossy())
                    })
                }
                Some(ValueSource::DefaultValue) => "default".to_string(),
                _ => "default".to_string(),
            };
            let long = arg.get_long().unwrap_or_default();
            let _ = writeln!(out, "--{long}={value}  # {source}");
        }
    }
    out
}

/// `urls` (comma-separated) with any `user:password@` or `token@` removed.
pub fn scrub_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let rest = match rest.find(['/', '?']) {
                Some(end) => rest[..end]
                    .rsplit_once('@')
                    .map_or(rest.to_owned(), |(_, host)| {
                        format!("***@{host}{}", &rest[end..])
                    }),
                None => rest
                    .rsplit_once('@')
                    .map_or(rest.to_owned(), |(_, host)| format!("***@{host}")),
            };
            if scheme.is_empty() {
                rest
            } else {
                format!("{scheme}://{rest}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let mut config = Config::default();
        config.nats.token = Some("nats-token-value".parse().unwrap());
        let printed = format!("{config:?}");
        assert!(!printed.contains("nats-token-value"), "{printed}");
        assert!(printed.contains("Secret(redacted)"));
    }

    use clap::{CommandFactory, Parser};

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.ws.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.ws.path, "/ws/entity-sync/");
        assert_eq!(c.grpc.addr.to_string(), "0.0.0.0:50051");
        assert_eq!(c.nats.url, None);
        assert_eq!(c.nats.prefix, "es");
        assert_eq!(c.resolve.timeout, Duration::from_secs(5));
        assert!(c.validate().is_ok());
        assert_eq!(WsConfig::default().addr, c.ws.addr);
        assert_eq!(NatsConfig::default().prefix, c.nats.prefix);
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flags_keep_their_public_names() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "entity-sync",
            "--ws-addr=127.0.0.1:1",
            "--grpc-addr=127.0.0.1:2",
            "--nats-url=nats://a:4222",
            "--nats-prefix=p",
            "--resolve-timeout=2s",
            "--resolve-batch-size=3",
            "--default-max-in-flight=4",
            "--max-subscriptions=5",
        ])
        .unwrap();
        let c = cli.config;
        assert_eq!(c.ws.addr.port(), 1);
        assert_eq!(c.grpc.addr.port(), 2);
        assert_eq!(c.nats.url.as_deref(), Some("nats://a:4222"));
        assert_eq!(c.nats.prefix, "p");
        assert_eq!(c.resolve.timeout, Duration::from_secs(2));
        assert_eq!(c.resolve.batch_size, 3);
        assert_eq!(c.resolve.default_max_in_flight, 4);
        assert_eq!(c.ws.max_subscriptions, 5);
    }

    #[test]
    fn tls_flags_and_their_combinations() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["entity-sync"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().config
        };
        let c = parse(&[
            "--grpc-tls-cert=/c.pem",
            "--grpc-tls-key=/k.pem",
            "--grpc-tls-client-ca=/ca.pem",
            "--ws-tls-cert=/wc.pem",
            "--ws-tls-key=/wk.pem",
        ]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.grpc.tls_identity(),
            Some((Path::new("/c.pem"), Path::new("/k.pem")))
        );
        assert!(c.grpc.verifies_client_certs());
        assert_eq!(
            c.ws.tls_identity(),
            Some((Path::new("/wc.pem"), Path::new("/wk.pem")))
        );
        let plain = Config::default();
        assert!(!plain.grpc.verifies_client_certs());
        assert_eq!(plain.grpc.tls_identity(), None);
        assert_eq!(plain.ws.tls_identity(), None);
        let tls_only = parse(&["--grpc-tls-cert=/c.pem", "--grpc-tls-key=/k.pem"]);
        assert!(!tls_only.grpc.verifies_client_certs());

        let refused = |args: &[&str]| parse(args).validate().unwrap_err();
        let grpc_pair = ConfigError::Together("--grpc-tls-cert", "--grpc-tls-key");
        assert_eq!(refused(&["--grpc-tls-cert=/c.pem"]), grpc_pair);
        assert_eq!(refused(&["--grpc-tls-key=/k.pem"]), grpc_pair);
        assert_eq!(
            grpc_pair.to_string(),
            "--grpc-tls-cert and --grpc-tls-key go together: give both, or neither"
        );
        let needs = refused(&["--grpc-tls-client-ca=/ca.pem"]);
        assert!(
            matches!(
                needs,
                ConfigError::Needs {
                    flag: "--grpc-tls-client-ca",
                    ..
                }
            ),
            "{needs:?}"
        );
        assert!(
            needs
                .to_string()
                .starts_with("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        );
        assert_eq!(
            refused(&["--ws-tls-key=/k.pem"]),
            ConfigError::Together("--ws-tls-cert", "--ws-tls-key")
        );
        let invalid = refused(&["--nats-replicas=7"]);
        assert_eq!(invalid.flag(), "--nats-replicas");
        assert_eq!(invalid.to_string(), "--nats-replicas must be 1 to 5");
    }

    #[test]
    fn the_description_masks_secrets_and_names_sources() {
        let cmd = Cli::command();
        let matches = cmd
            .clone()
            .try_get_matches_from([
                "entity-sync",
                "--nats-url=nats://alice:pa55word@127.0.0.1:4222",
                "--nats-token=tok-value-1234",
                "--ws-path=/sync/",
            ])
            .unwrap();
        let text = describe(&cmd, &matches);
        assert!(!text.contains("pa55word"), "{text}");
        assert!(!text.contains("tok-value-1234"), "{text}");
        assert!(
            text.contains("--nats-url=nats://***@127.0.0.1:4222  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--nats-token=***  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--ws-path=/sync/  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--grpc-addr=0.0.0.0:50051  # default\n"),
            "{text}"
        );
        assert!(text.contains("--nats-creds=(unset)  # default\n"), "{text}");
        let order: Vec<usize> = HELP_HEADINGS
            .iter()
            .map(|h| text.find(&format!("# {h}\n")).expect(h))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    /// `--help` prints each flag's environment value unless it is hidden:
    /// every flag that can carry a credential (or names the file holding
    /// one) hides it.
    #[test]
    fn credential_flags_hide_their_environment_values() {
        let cmd = Cli::command();
        // `--grpc-allow-cleartext-tokens` is a switch about tokens, not one.
        let credential = |id: &str| {
            id != "grpc_allow_cleartext_tokens"
                && ["token", "creds", "password", "secret", "nats_url"]
                    .iter()
                    .any(|word| id.contains(word))
        };
        let flags: Vec<&clap::Arg> = cmd
            .get_arguments()
            .filter(|arg| credential(arg.get_id().as_str()))
            .collect();
        let ids: Vec<&str> = flags.iter().map(|a| a.get_id().as_str()).collect();
        assert_eq!(
            ids,
            [
                "subscribe_token_jwks",
                "subscribe_token_audience",
                "grpc_tokens_file",
                "nats_url",
                "nats_creds",
                "nats_token"
            ]
        );
        for arg in flags {
            assert!(arg.get_env().is_some(), "{}", arg.get_id());
            assert!(arg.is_hide_env_values_set(), "{}", arg.get_id());
        }
    }
}
