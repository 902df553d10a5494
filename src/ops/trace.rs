//! Trace ids: one per `Notify` call (the caller's, from gRPC metadata, or a fresh one), carried with each change over the bus to the resolve and the push, and logged as `trace_id`.
//!
//! A trace id is 128 bits written as 32 lowercase hex digits, the trace-id
//! of W3C Trace Context, so a caller that already has a trace can pass it
//! through (`traceparent`) and find it in the node's logs. Anything else in
//! those headers is ignored (and never logged): the node makes its own.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tonic::metadata::MetadataMap;

/// gRPC metadata (and response metadata) carrying a trace id as 32 hex digits.
pub const TRACE_ID_HEADER: &str = "x-trace-id";
/// W3C Trace Context header; its trace-id field is used when `x-trace-id` is absent.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// JetStream message header carrying the trace id of the change.
pub(crate) const BUS_TRACE_HEADER: &str = "Es-Trace-Id";
/// JetStream message header carrying the `Notify` accept time (Unix microseconds).
pub(crate) const BUS_NOTIFIED_HEADER: &str = "Es-Notified-At";

/// A 128-bit trace id; zero means none.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TraceId(u128);

impl TraceId {
    /// No trace (a resync, a subscribe's follow-up).
    pub const NONE: TraceId = TraceId(0);

    /// A fresh random id.
    pub fn generate() -> TraceId {
        // 128 bits from fastrand's per-thread generator, seeded randomly per
        // thread: collisions are out of reach and ids cannot be guessed
        // without effort, which is all tracing needs. A trace id is not a
        // secret (it is logged and returned to callers); the generator is
        // not cryptographic and must not be used for one. Zero means none,
        // so it is never drawn.
        TraceId(fastrand::u128(1..))
    }

    /// Parses 32 hex digits (either case), not all zero.
    pub fn parse(s: &str) -> Option<TraceId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(s, 16)
            .ok()
            .filter(|&n| n != 0)
            .map(TraceId)
    }

    /// The trace-id of a W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`).
    pub fn from_traceparent(s: &str) -> Option<TraceId> {
        let mut parts = s.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(version, 2) || version == "ff" || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        TraceId::parse(trace)
    }

    /// The caller's trace id from `x-trace-id` or `traceparent`, else a
    /// fresh one. The second value says whether a header was given but
    /// unusable (so the caller can be told in a log line, without its text).
    pub fn from_metadata(metadata: &MetadataMap) -> (TraceId, bool) {
        let given = |name: &str| metadata.get(name).map(|v| v.to_str().ok());
        let parsed = match (given(TRACE_ID_HEADER), given(TRACEPARENT_HEADER)) {
            (Some(value), _) => Some(value.and_then(TraceId::parse)),
            (None, Some(value)) => Some(value.and_then(TraceId::from_traceparent)),
            (None, None) => None,
        };
        match parsed {
            Some(Some(id)) => (id, false),
            Some(None) => (TraceId::generate(), true),
            None => (TraceId::generate(), false),
        }
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            f.write_str("-")
        } else {
            write!(f, "{:032x}", self.0)
        }
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What travels with each change key besides its sequence: who to follow it
/// by, and when it was accepted (for the notify-to-push latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ChangeMeta {
    pub(crate) trace: TraceId,
    /// Unix time in microseconds at which `Notify` accepted the change, on
    /// the accepting node's clock; 0 when unknown.
    pub(crate) notified_at_us: u64,
}

impl ChangeMeta {
    /// A change accepted now under `trace`.
    pub(crate) fn accepted_now(trace: TraceId) -> ChangeMeta {
        ChangeMeta {
            trace,
            notified_at_us: unix_micros(),
        }
    }

    /// Reads the bus headers' values (absent or malformed: none).
    pub(crate) fn from_bus_headers(trace: Option<&str>, notified_at: Option<&str>) -> ChangeMeta {
        ChangeMeta {
            trace: trace.and_then(TraceId::parse).unwrap_or(TraceId::NONE),
            notified_at_us: notified_at.and_then(|v| v.parse().ok()).unwrap_or(0),
        }
    }

    /// Time since the change was accepted, if known (zero if the accepting
    /// node's clock is ahead of this one's).
    pub(crate) fn since_notified(&self) -> Option<std::time::Duration> {
        (self.notified_at_us != 0).then(|| {
            std::time::Duration::from_micros(unix_micros().saturating_sub(self.notified_at_us))
        })
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print_as_32_hex_digits() {
        let id = TraceId::parse("4BF92F3577B34DA6A3CE929D0E0E4736").unwrap();
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "4bf92f3577b34da6a3ce929d0e0e473",
            "4bf92f3577b34da6a3ce929d0e0e47366",
            "4bf92f3577b34da6a3ce929d0e0e473g",
            "00000000000000000000000000000000",
            "+bf92f3577b34da6a3ce929d0e0e4736",
        ] {
            assert_eq!(TraceId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(TraceId::NONE.to_string(), "-");
        let (a, b) = (TraceId::generate(), TraceId::generate());
        assert_ne!(a, b);
        assert_eq!(TraceId::parse(&a.to_string()), Some(a));
    }

    #[test]
    fn traceparent_gives_its_trace_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceId::from_traceparent(tp)
                .map(|t| t.to_string())
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceId::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn metadata_prefers_x_trace_id_and_replaces_junk() {
        let mut md = MetadataMap::new();
        md.insert(
            TRACEPARENT_HEADER,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let (id, junk) = TraceId::from_metadata(&md);
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!junk);
        md.insert(TRACE_ID_HEADER, "not-a-trace-id".parse().unwrap());
        let (id, junk) = TraceId::from_metadata(&md);
        assert!(junk);
        assert_ne!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!id.is_none());
    }

    #[test]
    fn bus_headers_round_trip() {
        let id = TraceId::generate();
        let meta = ChangeMeta::from_bus_headers(Some(&id.to_string()), Some("123"));
        assert_eq!(meta.trace, id);
        assert_eq!(meta.notified_at_us, 123);
        let junk = ChangeMeta::from_bus_headers(Some("zz"), Some("-1"));
        assert_eq!(junk, ChangeMeta::default());
    }
}
