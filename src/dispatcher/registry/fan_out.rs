//! The change flow's side of the registry: changes noted, the secrets to
//! resolve for, pushes fanned out to a key's subscribers, revocations.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use super::{FanOut, Registry};
use crate::dispatcher::registry::subscribers::{Audience, Groups, KeySubscribers, State};
use crate::{
    key::Key,
    websocket::{
        outbox::Queued,
        protocol::{FrameText, PushFrame},
    },
};

/// Subscribers a fan-out writes to itself (those whose socket is idle),
/// one `send` each; the rest are queued for their sessions, which every
/// worker thread runs. A fan-out to a key's few subscribers wakes no task;
/// one to a thousand is not held up by a thousand sends on one thread: the
/// next change of the key waits for the fan-out to end, and the sessions
/// spread the sends over the cores (measured: see docs/performance.md).
const DIRECT_PER_FAN_OUT: usize = 32;

impl Registry {
    /// Records a change of `key`: pending subscribers are marked as having
    /// missed it. Returns whether the key has active subscribers to resolve for.
    pub(crate) fn note_change(&self, key: &Key) -> bool {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return false;
        };
        for sub in subs.by_conn.values_mut() {
            if let State::Pending { missed } = &mut sub.state {
                *missed = true;
            }
        }
        subs.has_active()
    }

    /// Whether `key` has any active subscriber.
    pub(crate) fn has_active(&self, key: &Key) -> bool {
        let shard = self.shard(key).lock().unwrap();
        shard.get(key).is_some_and(KeySubscribers::has_active)
    }

    /// Distinct secrets among the active subscribers of `key` (the ones
    /// their subscriptions were activated with): its groups, no comparison.
    pub(crate) fn active_secrets(&self, key: &Key) -> Vec<Arc<str>> {
        let shard = self.shard(key).lock().unwrap();
        match shard.get(key).map(|subs| &subs.groups) {
            None | Some(Groups::None) => Vec::new(),
            Some(Groups::One { secret, .. }) => vec![secret.clone()],
            Some(Groups::Many(groups)) => groups.keys().cloned().collect(),
        }
    }

    /// Queues `frame` to the active subscribers of `key` in `audience`,
    /// skipping those that already hold a newer version, and (unless
    /// `--push-unchanged-rows`) those whose last push of the key had the same
    /// rows: their version is recorded, so a later, older push is still
    /// recognized as stale.
    pub(crate) fn fan_out(&self, key: &Key, frame: &PushFrame, audience: Audience<'_>) -> FanOut {
        self.fan_out_as(key, frame, audience, false)
    }

    /// [`Self::fan_out`] of a push already fanned out once (the relay's rows,
    /// again for subscribers that were pending when they came): only
    /// subscribers behind its version get it, whatever
    /// `--push-unchanged-rows` says.
    pub(crate) fn catch_up(&self, key: &Key, frame: &PushFrame, audience: Audience<'_>) -> FanOut {
        self.fan_out_as(key, frame, audience, true)
    }

    fn fan_out_as(
        &self,
        key: &Key,
        frame: &PushFrame,
        audience: Audience<'_>,
        catch_up: bool,
    ) -> FanOut {
        let mut result = FanOut::default();
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return result;
        };
        let push_unchanged = self.inner.push_unchanged_rows;
        let mut i = 0usize;
        subs.for_each_in(audience, |_, sub| {
            if frame.version < sub.delivered || (catch_up && frame.version == sub.delivered) {
                result.stale += 1;
                return;
            }
            sub.delivered = frame.version;
            if !push_unchanged && frame.rows_digest == sub.rows_digest {
                result.unchanged += 1;
                return;
            }
            sub.rows_digest = frame.rows_digest;
            let direct = i < DIRECT_PER_FAN_OUT;
            i += 1;
            match sub.conn.outbox.push_as(key, frame, direct) {
                Queued::Appended | Queued::Written => result.delivered += 1,
                Queued::Replaced => {
                    result.delivered += 1;
                    result.replaced += 1;
                }
                Queued::Stale => result.stale += 1,
                Queued::Overflow => result.overflowed += 1,
                Queued::Closed => {}
            }
        });
        result
    }

    /// Ends the active subscriptions of `key` in `audience` (revocation):
    /// each gets `error` queued and loses the key. Returns how many.
    pub(crate) fn revoke(&self, key: &Key, audience: Audience<'_>, error: &FrameText) -> usize {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return 0;
        };
        let mut ids = Vec::new();
        subs.for_each_in(audience, |id, _| ids.push(id));
        for id in &ids {
            // Out of `by_conn` here; out of the groups all at once below.
            let sub = subs.by_conn.remove(id).expect("found above");
            sub.conn.outbox.forget(key);
            sub.conn.outbox.control(Some(key), error.clone());
            // Lock order: shard, then the connection's key set.
            sub.conn.keys.lock().unwrap().retain(|k| k != key);
        }
        match audience {
            Audience::All => subs.groups = Groups::None,
            Audience::Secret(secret) => subs.groups.leave_all(secret, &ids),
        }
        let revoked = ids.len();
        self.inner.subscriptions.fetch_sub(revoked, Relaxed);
        if subs.by_conn.is_empty() {
            shard.remove(key);
            self.key_left(key);
        }
        revoked
    }
}
