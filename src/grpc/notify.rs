//! `Notify`: a backend's change keys, checked and stored on the bus before
//! the call answers; the limits of its message and its deadline.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::{
    bus::BusError,
    grpc::{
        auth::{Role, scoped_idempotency_key},
        service::EntitySyncService,
    },
    key::{Key, MAX_KEY_PART_BYTES},
    ops::metrics::Metrics,
    ops::trace::{ChangeMeta, TRACE_ID_HEADER, TraceId},
    proto::v1::{NotifyRequest, NotifyResponse},
};

/// Longest idempotency key accepted, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Most of a caller's deadline a `Notify` keeps for its answer's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);
/// Room in a `Notify` bound for fields a newer client may add.
const NOTIFY_SLACK_BYTES: usize = 1024;

/// Largest `NotifyRequest` that can be valid with `max_notify_keys` keys:
/// each key at most two parts of [`MAX_KEY_PART_BYTES`] with their protobuf
/// tags and lengths (3 bytes each, and 3 for the key itself), the
/// idempotency key the same way. tonic refuses a larger message from its
/// length prefix (RESOURCE_EXHAUSTED), before reading it.
pub(super) fn notify_message_limit(max_notify_keys: usize) -> usize {
    let per_key = 3 + 2 * (3 + MAX_KEY_PART_BYTES);
    max_notify_keys
        .saturating_mul(per_key)
        .saturating_add(3 + MAX_IDEMPOTENCY_KEY_BYTES + NOTIFY_SLACK_BYTES)
}

/// The deadline a caller sent with its call (`grpc-timeout`: at most 8
/// digits and a unit), if any.
fn call_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a `Notify` under `deadline` may wait for the bus: a tenth less
/// (at most [`DEADLINE_MARGIN`]), so that DEADLINE_EXCEEDED reaches the
/// caller before its own timer, and before the gRPC server's own end of the
/// call at that deadline (CANCELLED "Timeout expired", which says less).
fn bus_budget(deadline: Duration) -> Duration {
    deadline - (deadline / 10).min(DEADLINE_MARGIN)
}

impl From<BusError> for Status {
    fn from(err: BusError) -> Self {
        Status::unavailable(format!("the bus did not store the keys: {err}"))
    }
}

impl EntitySyncService {
    /// `Notify`: checks the keys against the call's credential, stores them
    /// on the bus within the caller's deadline, and answers their sequences.
    pub(super) async fn handle_notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let granted = self.granted(&request, Role::Notifier)?;
        let (trace, junk) = TraceId::from_metadata(request.metadata());
        let deadline = call_deadline(request.metadata());
        if junk {
            // The header's text is the caller's: never logged.
            tracing::debug!(trace_id = %trace, "Notify: unusable trace id header ignored");
        }
        // Accepted now: the notify-to-push latency starts here.
        let meta = ChangeMeta::accepted_now(trace);
        // Without a token, a verified client certificate scopes the key (a
        // reference-counted handle: nothing is copied unless it is used).
        let peer_certs = request.peer_certs();
        let request = request.into_inner();
        if request.keys.is_empty() {
            return Err(Status::invalid_argument("keys must not be empty"));
        }
        if request.keys.len() > self.config.max_notify_keys {
            return Err(Status::invalid_argument(format!(
                "{} keys in one call; the limit is {}",
                request.keys.len(),
                self.config.max_notify_keys
            )));
        }
        if request.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
        let keys = request
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Key::new(&k.entity, &k.id)
                    .map_err(|err| Status::invalid_argument(format!("keys[{i}]: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A notifier scoped to entities: the whole call is refused if any key
        // is outside its list, before anything is stored.
        if let Some(credential) = &granted
            && let Some(key) = keys.iter().find(|k| !credential.entities.allows(&k.entity))
        {
            tracing::info!(token.id = %credential.id, entity = %key.entity, "Notify refused: entity not allowed for the token");
            return Err(Status::permission_denied(format!(
                "this token may not notify entity {:?}",
                &*key.entity
            )));
        }
        let count = keys.len() as u64;
        let idempotency_key = scoped_idempotency_key(
            &granted,
            peer_certs
                .as_ref()
                .and_then(|certs| certs.first())
                .map(|c| c.as_ref()),
            &request.idempotency_key,
        );
        let publish = self.bus.publish(keys, &idempotency_key, meta);
        let published = match deadline {
            // A publish cut short may have stored some keys: the caller's
            // retry under the same idempotency key stores the rest once.
            Some(deadline) => tokio::time::timeout(bus_budget(deadline), publish)
                .await
                .map_err(|_| {
                    tracing::debug!(trace_id = %trace, ?deadline, "Notify: the bus did not answer within the call's deadline");
                    Status::deadline_exceeded(
                        "the bus did not store the keys within the call's deadline; retry with the same idempotency key",
                    )
                })?,
            None => publish.await,
        };
        let receipt = published
            .inspect_err(|err| tracing::debug!(trace_id = %trace, %err, "Notify failed"))?;
        tracing::debug!(
            trace_id = %trace,
            keys = count,
            first_version = receipt.sequences.first().copied().unwrap_or(0),
            duplicate = receipt.duplicate,
            "notify accepted"
        );
        if receipt.duplicate {
            Metrics::inc(&self.metrics.notify_duplicates_total);
        } else {
            self.metrics
                .notify_keys_total
                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
        let mut response = Response::new(NotifyResponse {
            accepted: receipt.sequences.len() as u32,
            sequences: receipt.sequences,
            duplicate: receipt.duplicate,
        });
        if let Ok(value) = trace.to_string().parse() {
            response.metadata_mut().insert(TRACE_ID_HEADER, value);
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline_of(value: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        call_deadline(&metadata)
    }

    #[test]
    fn call_deadlines_are_read_in_every_unit_and_junk_is_none() {
        assert_eq!(deadline_of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(deadline_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(deadline_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(deadline_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(deadline_of("250u"), Some(Duration::from_micros(250)));
        assert_eq!(
            deadline_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for junk in ["", "S", "123456789S", "12x", "-1S", "1.5S", "+5S"] {
            assert_eq!(deadline_of(junk), None, "{junk:?}");
        }
        assert_eq!(call_deadline(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn the_largest_valid_notify_fits_its_bound() {
        use crate::proto::v1::EntityKey;
        use prost::Message;
        let part = "x".repeat(MAX_KEY_PART_BYTES);
        for keys in [1, 10, 10_000] {
            let request = NotifyRequest {
                keys: vec![
                    EntityKey {
                        entity: part.clone(),
                        id: part.clone(),
                    };
                    keys
                ],
                idempotency_key: "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES),
            };
            let limit = notify_message_limit(keys);
            assert!(request.encoded_len() <= limit, "{keys} keys");
            // And not much more: the slack only.
            assert!(
                limit - request.encoded_len() <= NOTIFY_SLACK_BYTES,
                "{keys} keys"
            );
        }
        // The default --max-notify-keys: well below tonic's 4 MiB.
        assert_eq!(notify_message_limit(10_000), 2_651_283);
    }

    #[test]
    fn the_bus_gets_the_deadline_less_a_margin_for_the_answer() {
        assert_eq!(
            bus_budget(Duration::from_secs(2)),
            Duration::from_millis(1900)
        );
        assert_eq!(
            bus_budget(Duration::from_millis(300)),
            Duration::from_millis(270)
        );
        assert_eq!(bus_budget(Duration::ZERO), Duration::ZERO);
    }
}
