//! Connections of the websocket port until their first request is in: a deadline, and a count against `--max-connections`.
//!
//! hyper (as axum serves it) has no timer, so it would wait forever for a
//! request's headers: a client that opens sockets and sends nothing (or
//! trickles bytes) would hold them all. [`Handshaking`] wraps a listener: each
//! connection gets `--handshake-timeout` to deliver a complete request, after
//! which its reads fail and hyper closes it; until then it counts as pending,
//! and `--max-connections` counts pending connections with the open websockets.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{extract::connect_info::Connected, serve::IncomingStream, serve::Listener};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};

/// Connections accepted whose first request is not in yet; a cheap-clone handle.
#[derive(Clone, Default)]
pub(crate) struct Pending(Arc<AtomicUsize>);

impl Pending {
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Marks one connection's first request as in (once; dropping the
/// connection unclaimed does the same to the count).
pub(crate) struct Claim {
    claimed: AtomicBool,
    pending: Pending,
}

impl Claim {
    fn new(pending: &Pending) -> Arc<Self> {
        pending.0.fetch_add(1, Ordering::AcqRel);
        Arc::new(Claim {
            claimed: AtomicBool::new(false),
            pending: pending.clone(),
        })
    }

    /// The connection delivered a complete request: no deadline, not pending.
    pub(crate) fn claim(&self) {
        if !self.claimed.swap(true, Ordering::AcqRel) {
            self.pending.0.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }
}

/// A listener whose connections must deliver their first request in time.
pub(crate) struct Handshaking<L> {
    inner: L,
    pending: Pending,
    timeout: Duration,
}

impl<L> Handshaking<L> {
    pub(crate) fn new(inner: L, pending: Pending, timeout: Duration) -> Self {
        Handshaking {
            inner,
            pending,
            timeout,
        }
    }
}

impl<L> Listener for Handshaking<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = Deadlined<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let io = Deadlined {
            io,
            claim: Claim::new(&self.pending),
            deadline: Some(Box::pin(tokio::time::sleep(self.timeout))),
        };
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection whose reads fail once its deadline passed unclaimed.
pub(crate) struct Deadlined<IO> {
    io: IO,
    claim: Arc<Claim>,
    /// Dropped once claimed: an open websocket carries no timer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> Drop for Deadlined<IO> {
    fn drop(&mut self) {
        // Closed before its first request: no longer pending.
        self.claim.claim();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Deadlined<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut() {
            if this.claim.is_claimed() {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete request within the header timeout",
                )));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Deadlined<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What a handler learns of its connection: the peer, and the claim to
/// make once a request is in.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) claim: Arc<Claim>,
}

impl<L> Connected<IncomingStream<'_, Handshaking<L>>> for ConnInfo
where
    L: Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: IncomingStream<'_, Handshaking<L>>) -> Self {
        ConnInfo {
            peer: *stream.remote_addr(),
            claim: stream.io().claim.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_count_once_and_dropping_unclaimed_uncounts() {
        let pending = Pending::default();
        let a = Claim::new(&pending);
        let b = Claim::new(&pending);
        assert_eq!(pending.count(), 2);
        a.claim();
        a.claim();
        assert_eq!(pending.count(), 1);
        b.claim();
        assert_eq!(pending.count(), 0);
    }
}
