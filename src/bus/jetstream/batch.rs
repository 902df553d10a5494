//! Atomic batch publish (nats-server 2.12+): up to [`MAX_BATCH`] messages
//! stored by the stream all together or not at all, in one commit.
//!
//! Every message carries `Nats-Batch-Id` (one per batch) and
//! `Nats-Batch-Sequence` (1, 2, ...); the last one also
//! `Nats-Batch-Commit: 1`. All but the last are sent without a reply
//! subject (the server answers nothing for them); the last is a request,
//! answered with one PubAck for the whole batch: the sequence of its last
//! message, the batch id and the count of messages stored. A batch's
//! messages take consecutive sequences, so the PubAck gives each of them.
//! A batch with a gap, a message the stream does not take, or one that
//! breaks a limit is refused as a whole; one never committed is dropped
//! by the server after 10 s. Either way nothing of it is stored.
//!
//! `Nats-Msg-Id` works inside a batch, but a batch holding an id the stream
//! has already seen is refused whole ([`ERR_DUPLICATE_MSG_ID`]) rather
//! than answered as a duplicate: the caller then publishes that batch's
//! messages one by one, which answers the stored ones' sequences as
//! duplicates (no write) and stores any missing one.

use std::{sync::atomic::AtomicU64, time::Duration};

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Deserialize;

use crate::bus::error::{BusError, PublishError};

/// Most messages a batch may hold (the server's limit).
pub(crate) const MAX_BATCH: usize = 1000;
/// Batches this node has open at once. JetStream allows 50 per stream (and
/// 1,000 per server) and refuses more with [`ERR_TOO_MANY_INFLIGHT`];
/// this keeps a few nodes under that.
pub(super) const BATCHES_IN_FLIGHT: usize = 16;
/// JetStream's "atomic publish batch contains duplicate message id".
pub(super) const ERR_DUPLICATE_MSG_ID: u64 = 10201;
/// JetStream's "atomic publish too many inflight".
pub(super) const ERR_TOO_MANY_INFLIGHT: u64 = 10210;
/// Attempts of a batch JetStream refused only for
/// [`ERR_TOO_MANY_INFLIGHT`], and the pause before the first retry (doubled
/// each time).
pub(super) const INFLIGHT_ATTEMPTS: u32 = 6;
pub(super) const INFLIGHT_PAUSE: Duration = Duration::from_millis(5);

const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// One message of a batch: its subject and its own headers (the batch
/// headers are added when it is sent).
pub(super) struct Message {
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
}

/// What a committed batch reports.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Stored {
    /// Sequence of the batch's first message; the others follow it.
    pub(super) first: u64,
}

/// The commit's answer: a PubAck with the batch's fields, or an error.
#[derive(Debug, Deserialize)]
struct BatchAck {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A batch id: 64 random bits and this node's count of batches (short:
/// every stored message of the batch keeps it in its headers).
pub(super) fn new_batch_id(counter: &AtomicU64) -> String {
    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:016x}{n:x}", fastrand::u64(..))
}

/// Sends `messages` (1 to [`MAX_BATCH`]) as the atomic batch `id` and
/// waits for its commit's answer.
pub(super) async fn publish(
    client: &Client,
    id: &str,
    messages: Vec<Message>,
) -> Result<Stored, BusError> {
    debug_assert!(!messages.is_empty() && messages.len() <= MAX_BATCH);
    let expected = messages.len();
    let mut commit = None;
    for (
        i,
        Message {
            subject,
            mut headers,
        },
    ) in messages.into_iter().enumerate()
    {
        headers.insert(BATCH_ID, id);
        headers.insert(BATCH_SEQUENCE, (i + 1).to_string().as_str());
        if i + 1 == expected {
            headers.insert(BATCH_COMMIT, "1");
            commit = Some((subject, headers));
        } else {
            client
                .publish_with_headers(subject, headers, Bytes::new())
                .await
                .map_err(|err| unavailable(PublishError::BatchSend(err)))?;
        }
    }
    let (subject, headers) = commit.expect("a batch has a last message");
    let answer = client
        .request_with_headers(subject, headers, Bytes::new())
        .await
        .map_err(|err| unavailable(PublishError::BatchCommit(err)))?;
    read_ack(&answer.payload, id, expected)
}

/// The sequences of a batch of `expected` messages from its commit's answer.
fn read_ack(payload: &[u8], id: &str, expected: usize) -> Result<Stored, BusError> {
    let ack: BatchAck =
        serde_json::from_slice(payload).map_err(|err| unavailable(PublishError::BadAck(err)))?;
    if let Some(error) = ack.error {
        return Err(unavailable(PublishError::BatchRefused {
            code: error.err_code,
            description: error.description,
        }));
    }
    if ack.batch.as_deref() != Some(id) || ack.count != Some(expected as u64) || ack.seq == 0 {
        return Err(unavailable(PublishError::NotAtomic {
            count: ack.count,
            expected,
        }));
    }
    Ok(Stored {
        first: ack.seq + 1 - expected as u64,
    })
}

/// The JetStream error code of a refused batch, if that is what `err` is.
pub(super) fn refusal_code(err: &BusError) -> Option<u64> {
    match err {
        BusError::Unavailable {
            source: PublishError::BatchRefused { code, .. },
        } => Some(*code),
        _ => None,
    }
}

fn unavailable(source: PublishError) -> BusError {
    BusError::Unavailable { source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_ack_gives_every_sequence_of_the_batch() {
        let ack = br#"{"stream":"es_changes","seq":1006,"batch":"b1","count":1000}"#;
        assert_eq!(read_ack(ack, "b1", 1000).unwrap(), Stored { first: 7 });
        let one = br#"{"stream":"es_changes","seq":6,"batch":"b2","count":1}"#;
        assert_eq!(read_ack(one, "b2", 1).unwrap(), Stored { first: 6 });
    }

    #[test]
    fn refusals_and_plain_acks_are_errors() {
        let refused = br#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"},"stream":"S","seq":0}"#;
        let err = read_ack(refused, "b1", 5).unwrap_err();
        assert_eq!(refusal_code(&err), Some(ERR_DUPLICATE_MSG_ID));
        assert_eq!(
            err.to_string(),
            "NATS did not acknowledge the publish: JetStream refused the batch: atomic publish batch contains duplicate message id (error 10201)"
        );
        // A leader that ignores the batch headers acks the last message alone.
        let plain = br#"{"stream":"S","seq":9}"#;
        let err = read_ack(plain, "b1", 5).unwrap_err();
        assert_eq!(refusal_code(&err), None);
        assert!(err.to_string().contains("not stored atomically"), "{err}");
        assert!(read_ack(b"junk", "b1", 5).is_err());
    }

    #[test]
    fn batch_ids_are_short_and_distinct() {
        let counter = AtomicU64::new(0);
        let a = new_batch_id(&counter);
        let b = new_batch_id(&counter);
        assert_ne!(a, b);
        assert_eq!(a.len(), 17, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert!(new_batch_id(&AtomicU64::new(0xabc)).ends_with("abc"));
    }
}
