//! `Notify` for tests, through the SDK's [`Notifier`] with retries off, so a
//! test sees exactly what the node answered.

use entity_sync_backend::{Error, Key, Notifier, Receipt};
use std::time::Duration;
use tokio::time::timeout;

use crate::DEADLINE;

/// A notifier of `grpc` that does not retry.
pub async fn notifier(grpc: &str) -> Notifier {
    notifier_with(grpc, None).await
}

/// A notifier of `grpc` that does not retry, sending `token` if given.
pub async fn notifier_with(grpc: &str, token: Option<&str>) -> Notifier {
    let mut builder = Notifier::builder(grpc)
        .retry_for(Duration::ZERO)
        .call_timeout(DEADLINE);
    if let Some(token) = token {
        builder = builder.bearer_token(token);
    }
    builder
        .connect()
        .await
        .unwrap_or_else(|err| panic!("notifier of {grpc}: {err}"))
}

fn keys(keys: &[(&str, &str)]) -> Vec<Key> {
    keys.iter().map(|&k| Key::from(k)).collect()
}

/// Calls `Notify` with `keys`; panics unless OK.
pub async fn notify(grpc: &str, keys: &[(&str, &str)]) -> Receipt {
    try_notify(grpc, keys, "")
        .await
        .unwrap_or_else(|err| panic!("notify {keys:?} failed: {err}"))
}

/// Calls `Notify` once with `keys` and an idempotency key ("" for none).
pub async fn try_notify(
    grpc: &str,
    keys: &[(&str, &str)],
    idempotency_key: &str,
) -> Result<Receipt, Error> {
    let notifier = notifier(grpc).await;
    timeout(
        DEADLINE,
        notifier.notify_with_key(self::keys(keys), idempotency_key),
    )
    .await
    .expect("notify timed out")
}

/// The single sequence of a one-key notify.
pub async fn notify_one(grpc: &str, entity: &str, id: &str) -> u64 {
    let receipt = notify(grpc, &[(entity, id)]).await;
    assert_eq!(
        receipt.sequences.len(),
        1,
        "one sequence per key: {receipt:?}"
    );
    receipt.sequences[0]
}
