//! Which subscribe requests in flight a local subscribe may join.

use std::{collections::HashMap, sync::Arc};

use crate::key::Key;

/// Subscribe requests in flight that a local subscribe of the same key and
/// secret may join: per key, `(secret, request id)`. A key's entries go
/// when a change of it is seen, so a joiner never gets rows read before a
/// change it would otherwise miss.
#[derive(Debug, Default)]
pub(super) struct Joinable {
    /// Per key: (secret, shared, request).
    requests: HashMap<Key, Vec<(Arc<str>, bool, u64)>>,
}

impl Joinable {
    /// Request `request` resolves `key` for `secret` (or, `shared`, for
    /// every subscriber a token authorized) and may be joined.
    pub(super) fn add(&mut self, key: Key, secret: Arc<str>, shared: bool, request: u64) {
        self.requests
            .entry(key)
            .or_default()
            .push((secret, shared, request));
    }

    /// A joinable request of `key` for `secret` and `shared` alike: a
    /// shared request never answers a subscribe the resolver must
    /// authorize, nor the other way round.
    pub(super) fn find(&self, key: &Key, secret: &str, shared: bool) -> Option<u64> {
        self.requests
            .get(key)
            .and_then(|requests| {
                requests
                    .iter()
                    .find(|(s, sh, _)| **s == *secret && *sh == shared)
            })
            .map(|(_, _, request)| *request)
    }

    /// Request `request` of `entity`, for `ids`, leaves the flight.
    pub(super) fn forget<'a>(
        &mut self,
        entity: &Arc<str>,
        ids: impl Iterator<Item = &'a Arc<str>>,
        request: u64,
    ) {
        for id in ids {
            let key = Key {
                entity: entity.clone(),
                id: id.clone(),
            };
            if let Some(requests) = self.requests.get_mut(&key) {
                requests.retain(|(_, _, r)| *r != request);
                if requests.is_empty() {
                    self.requests.remove(&key);
                }
            }
        }
    }

    /// A change of `key` was seen: none of its requests may be joined.
    pub(super) fn changed(&mut self, key: &Key) {
        self.requests.remove(key);
    }

    /// Any key may have changed.
    pub(super) fn clear(&mut self) {
        self.requests.clear();
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}
