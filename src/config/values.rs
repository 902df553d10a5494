//! Value types and parsers the sections share: [`Secret`], durations, the
//! websocket path, and each section's defaults.

use std::time::Duration;

use clap::Args;

/// A credential given on the command line: its `Debug` output is redacted,
/// so a logged or printed configuration never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, to hand to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Parses an empty command line for `T`, ignoring the environment, so the
/// defaults live in one place (each section's attributes).
pub(super) fn defaults<T: Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("entity-sync").no_binary_name(true));
    let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    let cmd = ids
        .into_iter()
        .fold(cmd, |cmd, id| cmd.mut_arg(id, |arg| arg.env(None::<&str>)));
    let matches = cmd
        .try_get_matches_from(Vec::<String>::new())
        .expect("defaults parse");
    T::from_arg_matches(&matches).expect("defaults are valid")
}

pub(super) fn parse_ws_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if s.contains(['?', '#', ' ']) {
        return Err("must be a plain path".into());
    }
    Ok(s.to_string())
}

/// Parses a duration flag: `250ms`, `5s`, `2m`, `1h`, or anything else
/// [`humantime::parse_duration`] reads (`1h 30m`, `2min`).
///
/// A bare number is seconds: humantime wants a unit, but the flags took
/// `--shutdown-grace=7` before and deployments may still say so.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|err| format!("{s:?} is not a duration like 500ms, 5s, 2m or 1h ({err})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 30m "), Ok(Duration::from_secs(1800)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(
            err.starts_with(r#""5 parsecs" is not a duration like 500ms, 5s, 2m or 1h"#),
            "{err}"
        );
    }
}
