//! Connections of the gRPC port until tonic serves them: caps on open connections and on handshakes under way, and one deadline for the TLS handshake and the HTTP/2 preface.
//!
//! tonic accepts every TCP connection, runs each TLS handshake as a task of
//! its own without a bound on their number, and waits forever for a
//! plaintext client's first byte. [`incoming`] replaces its accept loop:
//! a connection beyond `--grpc-max-connections` or `--grpc-max-handshakes`
//! is closed as soon as it is accepted, and a connection gets
//! `--grpc-handshake-timeout` from its accept to finish TLS (when the port
//! speaks it) and send the 24 bytes of the HTTP/2 preface; then its reads
//! fail and hyper closes it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{config::GrpcConfig, ops::tasks::Tasks};

/// Length of the HTTP/2 connection preface (`PRI * HTTP/2.0...`).
const PREFACE_BYTES: usize = 24;

/// How long the accept loop pauses after an accept error other than a
/// connection's own (out of file descriptors, say), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The caps and the deadline of the port, from its config section.
#[derive(Clone)]
struct Limits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    timeout: Duration,
}

impl Limits {
    fn new(config: &GrpcConfig) -> Self {
        Limits {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            timeout: config.handshake_timeout,
        }
    }
}

/// A connection of the gRPC port: it holds one of `--grpc-max-connections`
/// until hyper drops it, and, until its HTTP/2 preface is in, one of
/// `--grpc-max-handshakes` and a deadline.
pub(crate) struct Guarded<IO> {
    io: IO,
    _open: OwnedSemaphorePermit,
    handshake: Option<Handshake>,
}

/// A connection's handshake under way.
struct Handshake {
    _slot: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
    /// Preface bytes read so far.
    seen: usize,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The deadline first: polling it registers its wakeup, so a client
        // that sends nothing at all is woken for and closed.
        if let Some(handshake) = &mut this.handshake
            && handshake.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within --grpc-handshake-timeout",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(handshake) = &mut this.handshake {
            handshake.seen += buf.filled().len() - before;
            if handshake.seen >= PREFACE_BYTES {
                // The preface is in: no deadline, and the handshake slot is free.
                this.handshake = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The connection's own address info, so that `Request::remote_addr` and
/// `Request::peer_certs` see through the wrapper.
impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Connections of a plaintext port.
pub(crate) type PlainIncoming = ReceiverStream<io::Result<Guarded<TcpStream>>>;
/// Connections of a TLS port, their handshakes done.
pub(crate) type TlsIncoming = ReceiverStream<io::Result<Guarded<TlsStream<TcpStream>>>>;

/// Accepts the plaintext port's connections from `listener` until the
/// stream is dropped or the node shuts down.
pub(crate) fn plaintext(
    listener: TcpListener,
    config: &GrpcConfig,
    tasks: &Tasks,
) -> PlainIncoming {
    accept_loop(listener, Limits::new(config), tasks, |stream| async move {
        Ok(stream)
    })
}

/// Accepts the TLS port's connections, each handshake a task of its own.
pub(crate) fn tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    config: &GrpcConfig,
    tasks: &Tasks,
) -> TlsIncoming {
    accept_loop(listener, Limits::new(config), tasks, move |stream| {
        let acceptor = acceptor.clone();
        async move { acceptor.accept(stream).await }
    })
}

fn accept_loop<IO, H, F>(
    listener: TcpListener,
    limits: Limits,
    tasks: &Tasks,
    handshake: H,
) -> ReceiverStream<io::Result<Guarded<IO>>>
where
    IO: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
{
    // Ready connections wait here for tonic; a few are enough, it takes
    // them as fast as it can.
    let (ready, incoming) = mpsc::channel(16);
    let stop = tasks.clone();
    tasks.spawn(async move {
        let mut handshakes: JoinSet<Option<Guarded<IO>>> = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ready.closed() => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            tracing::debug!(%err, "gRPC accept failed");
                            if !is_connection_error(&err) {
                                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                            }
                            continue;
                        }
                    };
                    if let Some(connection) = admit(&limits, stream, peer, &handshake) {
                        handshakes.spawn(connection);
                    }
                }
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done
                        && ready.send(Ok(connection)).await.is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    ReceiverStream::new(incoming)
}

/// A connection within both caps: its handshake under the deadline, to run
/// as a task. `None` (and the socket closed) beyond either cap.
fn admit<IO, H, F>(
    limits: &Limits,
    stream: TcpStream,
    peer: SocketAddr,
    handshake: &H,
) -> Option<impl Future<Output = Option<Guarded<IO>>> + Send + 'static>
where
    IO: Send + 'static,
    H: Fn(TcpStream) -> F,
    F: Future<Output = io::Result<IO>> + Send + 'static,
{
    let Ok(open) = limits.connections.clone().try_acquire_owned() else {
        tracing::debug!(%peer, "gRPC connection closed: --grpc-max-connections reached");
        return None;
    };
    let Ok(slot) = limits.handshakes.clone().try_acquire_owned() else {
        tracing::debug!(%peer, "gRPC connection closed: --grpc-max-handshakes reached");
        return None;
    };
    // Small messages, latency matters: no Nagle delay.
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + limits.timeout;
    let handshake = handshake(stream);
    Some(async move {
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(io)) => Some(Guarded {
                io,
                _open: open,
                handshake: Some(Handshake {
                    _slot: slot,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                    seen: 0,
                }),
            }),
            Ok(Err(err)) => {
                tracing::debug!(%peer, %err, "gRPC TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "gRPC TLS handshake timed out (--grpc-handshake-timeout)");
                None
            }
        }
    })
}

/// Errors of one connection (it went before it was accepted), as opposed
/// to the listener's.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
