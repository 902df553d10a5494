//! The subscribers of one key: each by connection, with its state (pending
//! or active) and what was last queued to it, and the active ones grouped by
//! the secret they were activated with.

use std::{collections::HashMap, sync::Arc};

use crate::dispatcher::registry::connection::{ConnId, Connection};

#[cfg(test)]
thread_local! {
    /// Work done by fan-outs on this thread: subscribers looked at and
    /// secrets compared (unit tests assert on it, not on time).
    pub(super) static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts one unit of fan-out work (tests only).
#[inline]
fn work() {
    #[cfg(test)]
    WORK.with(|w| w.set(w.get() + 1));
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// Snapshot resolve under way; `missed` records a change seen meanwhile.
    Pending { missed: bool },
    /// Active since a snapshot resolved with `secret`, the connection's own
    /// `Arc` of that epoch: it names the subscriber's group in [`Groups`],
    /// and a fan-out for that secret reaches the subscriber only while its
    /// connection still holds this very `Arc` (see
    /// [`Connection::holds_secret`]).
    Active { secret: Arc<str> },
}

impl State {
    pub(super) fn is_active(&self) -> bool {
        matches!(self, State::Active { .. })
    }
}

pub(super) struct Subscriber {
    pub(super) conn: Arc<Connection>,
    pub(super) state: State,
    /// Highest version queued to this subscriber; older pushes are skipped.
    pub(super) delivered: u64,
    /// `PushFrame::rows_digest` of the last push queued to this subscriber.
    pub(super) rows_digest: u64,
}

/// A key's subscribers: every one by connection, the active ones also by secret.
pub(super) struct KeySubscribers {
    pub(super) by_conn: HashMap<ConnId, Subscriber>,
    pub(super) groups: Groups,
}

/// A key's active subscribers by the secret they were activated with (the
/// secret's text; each subscriber keeps its connection's own `Arc`).
///
/// Invariant: the subscribers in the groups are exactly the active ones in
/// [`KeySubscribers::by_conn`]; only [`KeySubscribers`]'s methods (and
/// `Registry::revoke`, which empties whole groups) change either.
pub(super) enum Groups {
    /// No active subscriber.
    None,
    /// `count` active subscribers, all of one secret: the common case (one
    /// subscriber, or one secret for all), with no map and no list.
    One { secret: Arc<str>, count: usize },
    /// Active subscribers of two or more secrets. It stays a map until the
    /// key has no active subscriber left: a client coming and going with a
    /// second secret adds and removes one entry, it does not regroup the rest.
    ///
    /// Boxed: every key carries a `Groups`, and an inline map (48 bytes)
    /// would make each 16 bytes larger for the rare key with several secrets.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Arc<str>, Vec<ConnId>>>),
}

impl Groups {
    /// Adds `id`, now active with `secret`. `by_conn` (where it is already
    /// marked active) is what a second secret groups, once.
    fn join(&mut self, secret: &Arc<str>, id: ConnId, by_conn: &HashMap<ConnId, Subscriber>) {
        match self {
            Groups::None => {
                *self = Groups::One {
                    secret: secret.clone(),
                    count: 1,
                }
            }
            Groups::One { secret: one, count } if **one == **secret => *count += 1,
            Groups::One { .. } => {
                let mut groups: HashMap<Arc<str>, Vec<ConnId>> = HashMap::new();
                for (id, sub) in by_conn {
                    if let State::Active { secret } = &sub.state {
                        Self::add(&mut groups, secret, *id);
                    }
                }
                *self = Groups::Many(Box::new(groups));
            }
            Groups::Many(groups) => Self::add(groups, secret, id),
        }
    }

    fn add(groups: &mut HashMap<Arc<str>, Vec<ConnId>>, secret: &Arc<str>, id: ConnId) {
        match groups.get_mut(&**secret) {
            Some(ids) => ids.push(id),
            None => {
                groups.insert(secret.clone(), vec![id]);
            }
        }
    }

    /// Removes `id`, active with `secret` until now. A scan of its group:
    /// linear in the subscribers sharing its secret on this key.
    fn leave(&mut self, secret: &str, id: ConnId) {
        match self {
            Groups::None => debug_assert!(false, "an active subscriber has a group"),
            Groups::One { count, .. } => {
                *count -= 1;
                if *count == 0 {
                    *self = Groups::None;
                }
            }
            Groups::Many(groups) => {
                if let Some(ids) = groups.get_mut(secret) {
                    if let Some(at) = ids.iter().position(|i| *i == id) {
                        ids.swap_remove(at);
                    }
                    if ids.is_empty() {
                        groups.remove(secret);
                    }
                }
                if groups.is_empty() {
                    *self = Groups::None;
                }
            }
        }
    }

    /// Removes `ids`, all of them active with `secret` until now (a whole
    /// revocation at once: one pass over the group, not one per subscriber).
    pub(super) fn leave_all(&mut self, secret: &str, ids: &[ConnId]) {
        match self {
            Groups::None => debug_assert!(ids.is_empty(), "an active subscriber has a group"),
            Groups::One { count, .. } => {
                *count -= ids.len();
                if *count == 0 {
                    *self = Groups::None;
                }
            }
            Groups::Many(groups) => {
                if let Some(group) = groups.get_mut(secret) {
                    if group.len() == ids.len() {
                        groups.remove(secret);
                    } else {
                        let gone: std::collections::HashSet<&ConnId> = ids.iter().collect();
                        group.retain(|id| !gone.contains(id));
                    }
                }
                if groups.is_empty() {
                    *self = Groups::None;
                }
            }
        }
    }
}

impl KeySubscribers {
    pub(super) fn new() -> Self {
        Self {
            by_conn: HashMap::new(),
            groups: Groups::None,
        }
    }

    /// Makes `id` active with `secret` (moving it out of its group first if
    /// it was active already).
    pub(super) fn set_active(&mut self, id: ConnId, secret: &Arc<str>) {
        let Some(sub) = self.by_conn.get_mut(&id) else {
            return;
        };
        let was = std::mem::replace(
            &mut sub.state,
            State::Active {
                secret: secret.clone(),
            },
        );
        if let State::Active { secret: old } = was {
            self.groups.leave(&old, id);
        }
        self.groups.join(secret, id, &self.by_conn);
    }

    /// Makes `id` pending (out of its group if it was active).
    pub(super) fn set_pending(&mut self, id: ConnId, missed: bool) {
        let Some(sub) = self.by_conn.get_mut(&id) else {
            return;
        };
        if let State::Active { secret } =
            std::mem::replace(&mut sub.state, State::Pending { missed })
        {
            self.groups.leave(&secret, id);
        }
    }

    /// Removes `id` (out of its group if it was active).
    pub(super) fn remove(&mut self, id: ConnId) -> Option<Subscriber> {
        let sub = self.by_conn.remove(&id)?;
        if let State::Active { secret } = &sub.state {
            self.groups.leave(secret, id);
        }
        Some(sub)
    }

    pub(super) fn has_active(&self) -> bool {
        !matches!(self.groups, Groups::None)
    }

    /// Calls `f` with every active subscriber in `audience`. For a secret,
    /// only its group is looked at (one hash of the secret, one comparison),
    /// and of it the subscribers whose connection still holds the secret.
    pub(super) fn for_each_in(
        &mut self,
        audience: Audience<'_>,
        mut f: impl FnMut(ConnId, &mut Subscriber),
    ) {
        let wanted = match audience {
            Audience::All => {
                for (id, sub) in &mut self.by_conn {
                    work();
                    if sub.state.is_active() {
                        f(*id, sub);
                    }
                }
                return;
            }
            Audience::Secret(wanted) => wanted,
        };
        let still_holds = |sub: &Subscriber| match &sub.state {
            State::Active { secret } => sub.conn.holds_secret(secret),
            State::Pending { .. } => false,
        };
        match &self.groups {
            Groups::None => {}
            Groups::One { secret, .. } => {
                work();
                if **secret != *wanted {
                    return;
                }
                for (id, sub) in &mut self.by_conn {
                    work();
                    if still_holds(sub) {
                        f(*id, sub);
                    }
                }
            }
            Groups::Many(groups) => {
                work();
                let Some(ids) = groups.get(wanted) else {
                    return;
                };
                for id in ids {
                    work();
                    if let Some(sub) = self.by_conn.get_mut(id)
                        && still_holds(sub)
                    {
                        f(*id, sub);
                    }
                }
            }
        }
    }

    /// Checks the invariant of [`Groups`] (tests).
    #[cfg(test)]
    pub(super) fn check(&self) {
        let mut active: Vec<(String, ConnId)> = self
            .by_conn
            .iter()
            .filter_map(|(id, sub)| match &sub.state {
                State::Active { secret } => Some((secret.to_string(), *id)),
                State::Pending { .. } => None,
            })
            .collect();
        active.sort();
        let mut grouped: Vec<(String, ConnId)> = match &self.groups {
            Groups::None => Vec::new(),
            Groups::One { secret, count } => {
                assert_eq!(*count, active.len());
                assert!(active.iter().all(|(s, _)| **s == **secret));
                active.clone()
            }
            Groups::Many(groups) => groups
                .iter()
                .flat_map(|(secret, ids)| {
                    assert!(!ids.is_empty());
                    ids.iter().map(|id| (secret.to_string(), *id))
                })
                .collect(),
        };
        grouped.sort();
        assert_eq!(grouped, active);
    }
}

/// Which subscribers of a key a change resolve result is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Audience<'a> {
    /// Every active subscriber (SHARED fetch mode).
    All,
    /// Active subscribers activated with this secret whose connection still
    /// holds it (PER_SUBSCRIBER): one group, whatever the key's other secrets.
    Secret(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per subscription and per key, what grouping by secret costs: the
    /// state holds its secret's `Arc` (a subscriber 32 → 40 bytes), a key
    /// its groups (a map of subscribers 48 → 80 bytes), and a key with one
    /// secret allocates nothing more.
    #[test]
    fn entry_sizes() {
        assert_eq!(std::mem::size_of::<Subscriber>(), 40);
        assert_eq!(std::mem::size_of::<Groups>(), 32);
        assert_eq!(std::mem::size_of::<KeySubscribers>(), 80);
    }
}
