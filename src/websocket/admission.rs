//! Connections of the websocket port: counted from accept, capped per address, deadlined until they become websockets, their half-read frames budgeted.
//!
//! hyper (as axum serves it) has no timer, and a socket costs the node a
//! file descriptor and buffers from the moment it is accepted, so every
//! connection of the port goes through [`Admitting`], a listener wrapper:
//!
//! - **Counted from accept.** `--max-connections` counts every open
//!   connection of the port (handshaking, serving a plain HTTP request, or
//!   a websocket), taken by one atomic increment at accept, where a
//!   connection learns whether it is within the limit: an upgrade is
//!   admitted only then, so concurrent upgrades cannot pass the limit
//!   together. Connections beyond it still get their HTTP 503, but at most
//!   [`OVERFLOW`] of them at once; past that, new sockets are closed at once.
//! - **Per address.** Connections that are not websockets (yet) count
//!   against their address (IPv6: its /64), at most
//!   `--max-pending-per-address`: one host cannot fill the port's TLS
//!   handshakes or file descriptors with silent sockets.
//! - **Deadlined.** Until it becomes a websocket, a connection must be done
//!   within `--handshake-timeout`: its TLS handshake, its request and the
//!   answer (plain HTTP answers say `Connection: close`: no keep-alive).
//!   Then its reads and writes fail and hyper drops it.
//! - **Read budget.** Bytes a client has sent that are not yet a complete
//!   message (a large frame arriving, or stalled half-way) are counted
//!   node-wide; a connection holding more than [`FREE_PARTIAL_BYTES`] of them
//!   while the total is over `--max-reading-bytes` is closed, so a few
//!   hundred sockets each sending most of a large frame and stalling cannot
//!   take the node's memory.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream, serve::Listener};

use crate::ops::tls::TlsListener;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Connections accepted beyond `--max-connections` (to be answered 503) at
/// once; further sockets are closed without a word.
pub(crate) const OVERFLOW: usize = 1024;
/// Bytes of a partly read message a connection may hold whatever the
/// node-wide total: every ordinary client message fits.
pub(crate) const FREE_PARTIAL_BYTES: usize = 4 * 1024;

/// The limits of one port.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// `--max-connections` (0: none).
    pub(crate) max_connections: usize,
    /// `--max-pending-per-address` (0: none).
    pub(crate) max_pending_per_address: usize,
    /// `--handshake-timeout`.
    pub(crate) deadline: Duration,
    /// `--max-reading-bytes` (0: none).
    pub(crate) max_reading_bytes: usize,
}

/// One port's connections: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Admission {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    /// Open connections of the port, whatever their state.
    open: AtomicUsize,
    /// Connections that are not websockets, per address. A std `Mutex`:
    /// one map update per accept and per connection's end, never held
    /// across `.await`.
    pending: Mutex<HashMap<IpAddr, usize>>,
    /// Bytes of partly read messages, node-wide.
    reading: AtomicUsize,
    /// Refusals logged once per [`REFUSAL_LOG_EVERY`], with a count.
    refusals: LogLimiter,
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                open: AtomicUsize::new(0),
                pending: Mutex::new(HashMap::new()),
                reading: AtomicUsize::new(0),
                refusals: LogLimiter::default(),
            }),
        }
    }

    /// Open connections of the port (websockets included).
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Bytes of partly read client messages, node-wide.
    #[cfg(test)]
    pub(crate) fn reading(&self) -> usize {
        self.inner.reading.load(Ordering::Acquire)
    }

    /// Counts a connection just accepted from `peer`, or refuses it (`None`:
    /// close it at once) when its address or the port is over its bound.
    pub(crate) fn admit(&self, peer: SocketAddr) -> Option<Arc<ConnState>> {
        let limits = &self.inner.limits;
        let address = address_of(peer.ip());
        {
            let mut pending = self.inner.pending.lock().unwrap();
            let count = pending.entry(address).or_insert(0);
            if limits.max_pending_per_address > 0 && *count >= limits.max_pending_per_address {
                drop(pending);
                self.inner
                    .refusals
                    .note("connection closed: its address holds --max-pending-per-address connections that are not websockets");
                return None;
            }
            *count += 1;
        }
        // Counted first, then checked: of connections accepted together, the
        // ones within the limit are exactly the first ones.
        let open = self.inner.open.fetch_add(1, Ordering::AcqRel) + 1;
        let state = Arc::new(ConnState {
            admission: self.clone(),
            address,
            within_limit: limits.max_connections == 0 || open <= limits.max_connections,
            websocket: AtomicBool::new(false),
            partial: AtomicUsize::new(0),
        });
        if limits.max_connections > 0 && open > limits.max_connections + OVERFLOW {
            // Dropping the state uncounts it.
            self.inner
                .refusals
                .note("connection closed: the port is far over --max-connections");
            return None;
        }
        Some(state)
    }

    /// Logs a refused upgrade (at most once a second, with how many were
    /// refused since: a flood of them cannot flood the log).
    pub(crate) fn note_refusal(&self, what: &'static str) {
        self.inner.refusals.note(what);
    }
}

/// The key a connection counts under for `--max-pending-per-address`: the
/// IPv4 address, or the /64 of an IPv6 one (one host usually holds a whole
/// /64).
fn address_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// One connection's standing; shared by its socket, its requests and its
/// websocket session. Dropped (with the last of them), it is uncounted.
pub(crate) struct ConnState {
    admission: Admission,
    address: IpAddr,
    /// It was within `--max-connections` when accepted: an upgrade may proceed.
    within_limit: bool,
    /// It became a websocket: no deadline, no longer pending for its address.
    websocket: AtomicBool,
    /// Bytes read since the last complete message.
    partial: AtomicUsize,
}

impl ConnState {
    /// Whether an upgrade of this connection stays within `--max-connections`.
    pub(crate) fn within_limit(&self) -> bool {
        self.within_limit
    }

    /// The connection became a websocket: it leaves the deadline and its
    /// address's pending count (the session's own timeouts take over).
    pub(crate) fn upgraded(&self) {
        if !self.websocket.swap(true, Ordering::AcqRel) {
            self.admission.unpend(self.address);
        }
    }

    fn is_websocket(&self) -> bool {
        self.websocket.load(Ordering::Acquire)
    }

    /// A complete message was read: what was read so far is no longer a
    /// partly read one.
    pub(crate) fn message_read(&self) {
        let partial = self.partial.swap(0, Ordering::AcqRel);
        if partial > 0 {
            self.admission
                .inner
                .reading
                .fetch_sub(partial, Ordering::AcqRel);
        }
    }

    /// Counts `n` bytes just read; false when the connection must be closed
    /// to keep the node within its read budget.
    pub(crate) fn read(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let inner = &self.admission.inner;
        let partial = self.partial.fetch_add(n, Ordering::AcqRel) + n;
        let reading = inner.reading.fetch_add(n, Ordering::AcqRel) + n;
        let budget = inner.limits.max_reading_bytes;
        !(budget > 0 && partial > FREE_PARTIAL_BYTES && reading > budget)
    }
}

impl Admission {
    fn unpend(&self, address: IpAddr) {
        let mut pending = self.inner.pending.lock().unwrap();
        if let Some(count) = pending.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&address);
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if !self.is_websocket() {
            self.admission.unpend(self.address);
        }
        self.message_read();
        self.admission.inner.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listener whose connections are counted, capped and deadlined (see the
/// module's doc). It wraps the TCP listener; TLS, when configured, runs on
/// top of it (so a TLS handshake is deadlined and counted like the rest).
pub(crate) struct Admitting<L> {
    inner: L,
    admission: Admission,
}

impl<L> Admitting<L> {
    pub(crate) fn new(inner: L, admission: Admission) -> Self {
        Admitting { inner, admission }
    }
}

impl<L> Listener for Admitting<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = Deadlined<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, peer) = self.inner.accept().await;
            let Some(state) = self.admission.admit(peer) else {
                continue;
            };
            let deadline = self.admission.inner.limits.deadline;
            let io = Deadlined {
                io,
                state,
                deadline: Some(Box::pin(tokio::time::sleep(deadline))),
            };
            return (io, peer);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of the port: reads and writes fail once its deadline passed
/// before it became a websocket, and reads are charged to the read budget.
pub(crate) struct Deadlined<IO> {
    io: IO,
    state: Arc<ConnState>,
    /// Dropped once a websocket: an open websocket carries no timer here.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> Deadlined<IO> {
    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// The connection itself (a websocket's session charges its reads).
    pub(crate) fn into_inner(self) -> IO {
        self.io
    }

    /// An error once the deadline passed while not a websocket; registers
    /// the timer's wake-up otherwise.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = self.deadline.as_mut() {
            if self.state.is_websocket() {
                self.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "not a websocket within the handshake timeout",
                ));
            }
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlined<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.check_deadline(cx)?;
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if !this.state.read(buf.filled().len() - before) {
            return Poll::Ready(Err(io::Error::other(
                "over the node's budget of partly read messages",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlined<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_deadline(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_deadline(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_deadline(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What a handler learns of its connection: the peer, and its standing.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) state: Arc<ConnState>,
}

impl<L> Connected<IncomingStream<'_, Admitting<L>>> for ConnInfo
where
    L: Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: IncomingStream<'_, Admitting<L>>) -> Self {
        ConnInfo {
            peer: *stream.remote_addr(),
            state: stream.io().state().clone(),
        }
    }
}

impl<L> Connected<IncomingStream<'_, TlsListener<Admitting<L>>>> for ConnInfo
where
    L: Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn connect_info(stream: IncomingStream<'_, TlsListener<Admitting<L>>>) -> Self {
        ConnInfo {
            peer: *stream.remote_addr(),
            state: stream.io().get_ref().0.state().clone(),
        }
    }
}

/// How often a kind of refusal may be logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Logs a line at most once per [`REFUSAL_LOG_EVERY`], saying how many
/// events it stands for.
struct LogLimiter {
    started: Instant,
    /// When the last line was logged, in ms after `started` (+1; 0: never).
    last_ms: AtomicU64,
    /// Events since the last line.
    unlogged: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }
}

impl LogLimiter {
    fn note(&self, what: &'static str) {
        self.unlogged.fetch_add(1, Ordering::AcqRel);
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Acquire);
        let every = REFUSAL_LOG_EVERY.as_millis() as u64;
        if (last == 0 || now >= last + every)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let refused = self.unlogged.swap(0, Ordering::AcqRel);
            tracing::warn!(refused, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_connections: usize, per_address: usize, budget: usize) -> Admission {
        Admission::new(Limits {
            max_connections,
            max_pending_per_address: per_address,
            deadline: Duration::from_secs(10),
            max_reading_bytes: budget,
        })
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn the_first_connections_are_within_the_limit_and_every_one_counts() {
        let port = admission(2, 0, 0);
        let a = port.admit(peer("10.0.0.1")).unwrap();
        let b = port.admit(peer("10.0.0.2")).unwrap();
        let c = port.admit(peer("10.0.0.3")).unwrap();
        assert!(a.within_limit() && b.within_limit() && !c.within_limit());
        assert_eq!(port.open(), 3);
        drop(a);
        assert_eq!(port.open(), 2);
        // Decided at accept: `c` stays over, a new one is within.
        assert!(!c.within_limit());
        drop(c);
        assert!(port.admit(peer("10.0.0.4")).unwrap().within_limit());
    }

    #[test]
    fn far_over_the_limit_sockets_are_refused_at_once() {
        let port = admission(1, 0, 0);
        let held: Vec<_> = (0..=OVERFLOW)
            .map(|_| port.admit(peer("10.0.0.1")).unwrap())
            .collect();
        assert!(port.admit(peer("10.0.0.1")).is_none());
        assert_eq!(port.open(), OVERFLOW + 1);
        drop(held);
        assert_eq!(port.open(), 0);
    }

    #[test]
    fn pending_connections_are_capped_per_address_until_they_are_websockets() {
        let port = admission(0, 2, 0);
        let a = port.admit(peer("10.0.0.1")).unwrap();
        let _b = port.admit(peer("10.0.0.1")).unwrap();
        assert!(port.admit(peer("10.0.0.1")).is_none());
        assert!(port.admit(peer("10.0.0.2")).is_some(), "another address");
        a.upgraded();
        let _c = port
            .admit(peer("10.0.0.1"))
            .expect("a websocket leaves the count");
        assert!(port.admit(peer("10.0.0.1")).is_none());
        drop(a);
        assert!(
            port.admit(peer("10.0.0.1")).is_none(),
            "a websocket's end frees nothing"
        );
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let port = admission(0, 1, 0);
        let _a = port.admit(peer("2001:db8:1:2::1")).unwrap();
        assert!(port.admit(peer("2001:db8:1:2:ffff::9")).is_none());
        assert!(port.admit(peer("2001:db8:1:3::1")).is_some());
        // v4-mapped addresses count as the v4 address.
        let _v4 = port.admit(peer("10.0.0.9")).unwrap();
        assert!(port.admit(peer("::ffff:10.0.0.9")).is_none());
    }

    #[test]
    fn the_read_budget_closes_large_partial_messages_only_when_over() {
        let port = admission(0, 0, 100_000);
        let big = port.admit(peer("10.0.0.1")).unwrap();
        let small = port.admit(peer("10.0.0.2")).unwrap();
        assert!(big.read(90_000), "under the node's budget");
        assert!(small.read(1_000));
        assert!(!big.read(20_000), "over it, with a large partial message");
        assert!(small.read(1_000), "a small message always passes");
        assert_eq!(port.reading(), 112_000);
        big.message_read();
        assert_eq!(port.reading(), 2_000);
        drop(small);
        assert_eq!(port.reading(), 0);
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let limiter = LogLimiter::default();
        for _ in 0..1000 {
            limiter.note("test refusal");
        }
        // One line logged; the rest wait to be counted in the next one.
        assert_eq!(limiter.unlogged.load(Ordering::Acquire), 999);
    }
}
