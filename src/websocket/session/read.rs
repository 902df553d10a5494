//! Reading client messages: the message budget, and what each message does
//! (subscribe, unsubscribe, a new secret, a pass-through) and asks of the
//! session's snapshot resolves.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

use crate::websocket::session::context::SessionContext;
use crate::websocket::session::snapshots::{Waiting, waiting};
use crate::{
    dispatcher::registry::{AddPending, Connection},
    key::Key,
    ops::metrics::Metrics,
    websocket::{
        protocol::{
            self, ClientMessage, ErrorCode, ProtocolError, error_frame, pong_frame,
            subscribed_current_frame, unsubscribed_frame,
        },
        tokens::{Grant, Refused, Verified, unix_now},
    },
};

/// Token bucket for a connection's inbound messages: `rate` per second on
/// average, up to `burst` at once. `rate == 0` allows everything.
pub(super) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub(super) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub(super) fn allow(&mut self, now: Instant) -> bool {
        self.allow_n(1, now)
    }

    /// Takes `n` tokens if there are that many (a message that makes the
    /// node do `n` messages' worth of work).
    fn allow_n(&mut self, n: usize, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// Token verifications one connection may make per second on average, and
/// at once (a page subscribing to all its keys when it loads). A token the
/// connection verified last is not verified again (one token for many keys).
const TOKEN_CHECKS_PER_SECOND: u32 = 64;
const TOKEN_CHECKS_BURST: u32 = 512;

/// A connection's subscribe-token state: its verification budget and the
/// last token it verified, with the outcome. Created on its first token.
pub(super) struct TokenChecks {
    budget: RateLimit,
    last: Option<Checked>,
}

/// A token, the keys' generation it was verified with, and the outcome.
type Checked = (Box<str>, u64, Result<Arc<Verified>, Refused>);

/// Verifies `token` for `key` on `conn` (or takes the outcome of the same
/// token verified last). A refused token gets its error frame here (with
/// the key) and is never logged; `None` then.
fn check_token(
    ctx: &SessionContext,
    conn: &Connection,
    key: &Key,
    token: &str,
    checks: &mut Option<Box<TokenChecks>>,
) -> Option<Grant> {
    let refuse = |code: ErrorCode, message: &str| {
        ctx.metrics.client_error(code);
        conn.outbox
            .control(Some(key), error_frame(code, message, Some(key)));
    };
    let Some(tokens) = &ctx.tokens else {
        Metrics::inc(&ctx.metrics.tokens_invalid_total);
        refuse(
            ErrorCode::TokenInvalid,
            "this node accepts no subscribe tokens (it has no --subscribe-token-jwks)",
        );
        return None;
    };
    let now = Instant::now();
    let checks = checks.get_or_insert_with(|| {
        Box::new(TokenChecks {
            budget: RateLimit::new(TOKEN_CHECKS_PER_SECOND, TOKEN_CHECKS_BURST, now),
            last: None,
        })
    });
    let generation = tokens.generation();
    let verified = match &checks.last {
        Some((last, of, outcome)) if **last == *token && *of == generation => outcome.clone(),
        _ => {
            if !checks.budget.allow(now) {
                refuse(
                    ErrorCode::RateLimited,
                    &format!(
                        "subscribe dropped: over this connection's budget of \
                         {TOKEN_CHECKS_PER_SECOND} token verifications per second; subscribe again later"
                    ),
                );
                return None;
            }
            let outcome = tokens.verify(token).map(Arc::new);
            if outcome
                .as_ref()
                .err()
                .is_none_or(|refused| !refused.depends_on_time())
            {
                checks.last = Some((token.into(), generation, outcome.clone()));
            }
            outcome
        }
    };
    match verified.and_then(|verified| verified.grant(key, unix_now())) {
        Ok(grant) => {
            Metrics::inc(&ctx.metrics.tokens_valid_total);
            tracing::debug!(%key, sub = grant.sub.as_deref(), exp = grant.exp, "subscribe token accepted");
            Some(grant)
        }
        Err(refused) => {
            let (code, counter) = match refused {
                Refused::Expired => (ErrorCode::TokenExpired, &ctx.metrics.tokens_expired_total),
                Refused::Invalid(_) => (ErrorCode::TokenInvalid, &ctx.metrics.tokens_invalid_total),
            };
            Metrics::inc(counter);
            tracing::debug!(%key, reason = refused.message(), "subscribe token refused");
            refuse(code, refused.message());
            None
        }
    }
}

/// What a client message asks of the session's snapshot resolves.
pub(super) enum Work {
    Nothing,
    /// Start these (after the ones waiting); `replace`: a new secret, whose
    /// re-checks supersede everything still waiting.
    Snapshots {
        keys: Vec<Waiting>,
        replace: bool,
    },
    /// The client unsubscribed: a resolve of the key still waiting is moot.
    Forget(Key),
}

pub(super) fn reject(ctx: &SessionContext, conn: &Connection, err: ProtocolError) {
    ctx.metrics.client_error(err.code);
    conn.outbox
        .control(None, error_frame(err.code, &err.message, None));
}

/// Handles one text frame; returns the snapshot resolves it asks for (one
/// for a subscribe, one per held key for a new secret). `limiter` is the
/// connection's message budget, which already took this message's token.
pub(super) fn on_text(
    ctx: &Arc<SessionContext>,
    conn: &Arc<Connection>,
    text: Utf8Bytes,
    limiter: &mut RateLimit,
    checks: &mut Option<Box<TokenChecks>>,
) -> Work {
    if text.len() > ctx.config.max_message_bytes {
        reject(
            ctx,
            conn,
            ProtocolError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is {} bytes; the limit is {}",
                    text.len(),
                    ctx.config.max_message_bytes
                ),
            ),
        );
        return Work::Nothing;
    }
    let message = match protocol::decode(&text) {
        Ok(message) => message,
        Err(err) => {
            reject(ctx, conn, err);
            return Work::Nothing;
        }
    };
    match message {
        ClientMessage::Subscribe {
            key,
            version,
            token,
        } => {
            let grant = match token {
                None => None,
                Some(token) => match check_token(ctx, conn, &key, &token, checks) {
                    Some(grant) => Some(grant),
                    None => return Work::Nothing,
                },
            };
            // A refresh: a key held and active, a newer token, the version
            // the client holds. The subscription carries on; pushes after
            // that version are queued or on their way, so nothing is
            // resolved and nothing is pushed.
            if let Some(grant) = &grant
                && version.is_some()
                && ctx.registry.is_active(&key, conn.id)
            {
                ctx.grants.grant(conn, &key, grant.exp);
                Metrics::inc(&ctx.metrics.token_refreshes_total);
                if !ctx.config.compat_bare_rows {
                    conn.outbox
                        .control(Some(&key), subscribed_current_frame(&key));
                }
                return Work::Nothing;
            }
            let added = ctx
                .registry
                .add_pending(&key, conn, ctx.config.max_subscriptions);
            if added == AddPending::Full {
                ctx.metrics.client_error(ErrorCode::TooManySubscriptions);
                let message = format!(
                    "this connection already holds {} subscriptions, the limit",
                    ctx.config.max_subscriptions
                );
                conn.outbox.control(
                    Some(&key),
                    error_frame(ErrorCode::TooManySubscriptions, &message, Some(&key)),
                );
                return Work::Nothing;
            }
            // Held on the token from now on (its expiry ends it), or on the
            // secret again.
            match &grant {
                Some(grant) => ctx.grants.grant(conn, &key, grant.exp),
                None => ctx.grants.forget(conn.id, &key),
            }
            if added == AddPending::InFlight {
                return Work::Nothing;
            }
            let mut waiting = waiting(conn, key);
            waiting.resume = version;
            waiting.by_token = grant.is_some();
            Work::Snapshots {
                keys: vec![waiting],
                replace: false,
            }
        }
        ClientMessage::Unsubscribe(key) => {
            ctx.grants.forget(conn.id, &key);
            if ctx.registry.remove(&key, conn) {
                conn.outbox.forget(&key);
                if !ctx.config.compat_bare_rows {
                    conn.outbox.control(Some(&key), unsubscribed_frame(&key));
                }
                return Work::Forget(key);
            } else {
                ctx.metrics.client_error(ErrorCode::NotSubscribed);
                conn.outbox.control(
                    Some(&key),
                    error_frame(
                        ErrorCode::NotSubscribed,
                        "this connection is not subscribed to that key",
                        Some(&key),
                    ),
                );
            }
            Work::Nothing
        }
        ClientMessage::Secret(secret) => {
            // A new secret costs a re-check of every held key: the
            // connection's message budget pays for each (beyond this
            // message's own token), so a client cycling secrets costs the
            // backend what as many subscribes would. The same secret again
            // changes nothing and costs nothing.
            let held = conn.key_count();
            if *conn.secret() == *secret {
                return Work::Nothing;
            }
            if !limiter.allow_n(held, Instant::now()) {
                reject(
                    ctx,
                    conn,
                    ProtocolError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "secret dropped: it would re-check {held} keys, over this connection's \
                             budget of {} messages per second; send it again later",
                            ctx.config.max_message_rate
                        ),
                    ),
                );
                return Work::Nothing;
            }
            if !conn.set_secret(&secret) {
                return Work::Nothing;
            }
            // Every held key (at most `max_subscriptions`) is pending again
            // and re-resolved with the new secret, reason SUBSCRIBE, exactly
            // like a subscribe: `subscribed` (not in compat mode) and a fresh
            // snapshot, or an error frame that ends the subscription. The
            // resolves batch in the pool (same secret and reason).
            let keys = ctx.registry.recheck(conn);
            if !keys.is_empty() {
                ctx.metrics
                    .secret_rechecks_total
                    .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(keys = keys.len(), "new secret: re-checking held keys");
            }
            let (secret, epoch) = conn.secret_epoch();
            Work::Snapshots {
                keys: keys
                    .into_iter()
                    .map(|key| Waiting {
                        by_token: ctx.grants.holds(conn.id, &key),
                        key,
                        secret: secret.clone(),
                        epoch,
                        resume: None,
                    })
                    .collect(),
                replace: true,
            }
        }
        ClientMessage::Ping => {
            conn.outbox.control(None, pong_frame());
            Work::Nothing
        }
        ClientMessage::PassThrough => {
            let connection_id = format!("{}-{}", ctx.node_id, conn.id);
            let sent =
                ctx.resolvers
                    .pass_through(&connection_id, &conn.secret(), Bytes::from(text));
            if sent == 0 {
                let err = if ctx.resolvers.has_pass_through() {
                    ProtocolError::new(
                        ErrorCode::Overloaded,
                        "pass-through resolvers are not keeping up; message dropped",
                    )
                } else {
                    ProtocolError::new(
                        ErrorCode::NoPassThrough,
                        "no backend accepts messages without an action",
                    )
                };
                reject(ctx, conn, err);
            }
            Work::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(10, 3, start);
        assert!((0..3).all(|_| limit.allow(start)), "the burst passes");
        assert!(!limit.allow(start), "then nothing until tokens refill");
        assert!(
            limit.allow(start + Duration::from_millis(100)),
            "one per 100 ms"
        );
        assert!(!limit.allow(start + Duration::from_millis(150)));
        // Idle time refills up to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| limit.allow(later)));
        assert!(!limit.allow(later));
    }

    #[test]
    fn zero_rate_means_no_limit() {
        let start = Instant::now();
        let mut limit = RateLimit::new(0, 1, start);
        assert!((0..10_000).all(|_| limit.allow(start)));
    }
}
