//! The upgraded connection, owned by its session: client frames are read
//! through the websocket layer (tungstenite: masks, fragments, size limits,
//! UTF-8, the close handshake); every byte the node sends is written here,
//! frames made once and written as they are (see `protocol::FrameText`).
//!
//! Over plain TCP the socket is shared: the session reads and writes it, and
//! producers write a frame to it themselves when nothing is queued (see
//! `outbox`). Over TLS the stream is split, and only the session writes.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::{Message, protocol::WebSocketConfig};

use crate::websocket::{
    admission::{ConnState, Deadlined},
    outbox::{CloseReason, Outbox},
};

/// A TLS connection of the websocket port.
pub(crate) type TlsIo = TlsStream<Deadlined<TcpStream>>;

/// Read buffer of each websocket, in bytes. tungstenite allocates it up front
/// and zero-fills it on every read, so it is small on purpose: client messages
/// are small (a subscribe is about 70 bytes with its frame header), and idle
/// connections should cost little memory (512 bytes cost 0.36 kB more per
/// idle connection). Larger messages still arrive (the buffer grows to the
/// frame's length once its header is read).
const READ_BUFFER_BYTES: usize = 128;
/// Hard cap on one client frame, as a multiple of `max_message_bytes`; above
/// it the connection is closed with 1009 instead of getting an error frame
/// (tungstenite holds a frame whole while it arrives: this is what one
/// connection can make the node buffer).
const HARD_CAP_FACTOR: usize = 2;
/// Frames one vectored write takes at most.
const MAX_IOVECS: usize = 16;

/// The websocket layer's settings for reading a connection's frames.
pub(crate) fn read_config(max_message_bytes: usize) -> WebSocketConfig {
    let hard_cap = max_message_bytes.saturating_mul(HARD_CAP_FACTOR);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        // Its only writes are pongs and the close echo, handed on at once.
        .write_buffer_size(0)
        .max_message_size(Some(hard_cap))
        .max_frame_size(Some(hard_cap))
}

/// A connection the HTTP upgrade handed over, with the bytes its HTTP
/// layer read past the request (the client's first frames, if it sent
/// them at once).
pub(crate) enum Upgraded {
    Tcp {
        socket: TcpStream,
        read_ahead: Bytes,
    },
    Tls {
        stream: Box<TlsIo>,
        read_ahead: Bytes,
    },
}

/// The bytes read past the request, in a buffer of their own: the one
/// they came in is the HTTP layer's (8 kB or more), which a slice would
/// keep alive for the whole connection.
pub(crate) fn own_read_ahead(read_buf: &Bytes) -> Bytes {
    if read_buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(read_buf)
    }
}

impl Upgraded {
    /// The connection's two sides; over plain TCP, producers may write to
    /// the socket through `outbox`.
    pub(crate) fn split(self, state: Arc<ConnState>, outbox: &Outbox) -> (ReadSide, WriteTo) {
        match self {
            Upgraded::Tcp { socket, read_ahead } => {
                let socket = Arc::new(socket);
                // Producers write to it while the session does not (see
                // `outbox`); what a client that stops reading holds in the
                // kernel meanwhile is bounded by the socket's send buffer
                // (see `http::send_buffer_bytes`).
                outbox.write_directly_to(socket.clone());
                let read = ReadSide {
                    read_ahead,
                    from: ReadFrom::Tcp {
                        socket: socket.clone(),
                        state,
                    },
                    replies: Vec::new(),
                };
                (read, WriteTo::Tcp(socket))
            }
            Upgraded::Tls { stream, read_ahead } => {
                let (reader, writer) = tokio::io::split(*stream);
                let read = ReadSide {
                    read_ahead,
                    from: ReadFrom::Tls(reader),
                    replies: Vec::new(),
                };
                (read, WriteTo::Tls(writer))
            }
        }
    }
}

enum ReadFrom {
    /// Reads are charged to the port's read budget here (over TLS, by
    /// the `Deadlined` under the TLS layer).
    Tcp {
        socket: Arc<TcpStream>,
        state: Arc<ConnState>,
    },
    Tls(ReadHalf<TlsIo>),
}

/// What the websocket layer reads from. What it writes (a pong, the echo
/// of a client's close) is kept for the session to send: nothing but the
/// session and the outbox writes to the socket.
pub(crate) struct ReadSide {
    read_ahead: Bytes,
    from: ReadFrom,
    replies: Vec<u8>,
}

impl ReadSide {
    /// The socket, over plain TCP.
    fn tcp(&self) -> Option<&TcpStream> {
        match &self.from {
            ReadFrom::Tcp { socket, .. } => Some(socket),
            ReadFrom::Tls(_) => None,
        }
    }

    /// What the websocket layer wrote since the last call.
    pub(crate) fn take_replies(&mut self) -> Option<Bytes> {
        (!self.replies.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.replies)))
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            if this.read_ahead.is_empty() {
                this.read_ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.from {
            ReadFrom::Tcp { socket, state } => loop {
                ready!(socket.poll_read_ready(cx))?;
                match socket.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        if !state.read(n) {
                            return Poll::Ready(Err(io::Error::other(
                                "over the node's budget of partly read messages",
                            )));
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
            },
            ReadFrom::Tls(reader) => Pin::new(reader).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().replies.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The connection's next client message. `more`: the last call found one
/// (more may be buffered already). Otherwise, over plain TCP, the websocket
/// layer is asked only once the socket has bytes to read: a session woken
/// to write makes no read attempt (one was a third of the instructions of a
/// push to a woken session).
pub(crate) fn next_message<'a>(
    ws: &'a mut WebSocketStream<ReadSide>,
    more: &'a mut bool,
) -> impl Future<Output = Option<Result<Message, tungstenite::Error>>> + 'a {
    std::future::poll_fn(move |cx| {
        if !*more
            && let Some(socket) = ws.get_ref().tcp()
            && socket.poll_read_ready(cx).is_pending()
        {
            return Poll::Pending;
        }
        let polled = ws.poll_next_unpin(cx);
        *more = polled.is_ready();
        polled
    })
}

/// The session's side of the socket.
pub(crate) enum WriteTo {
    Tcp(Arc<TcpStream>),
    Tls(WriteHalf<TlsIo>),
}

impl WriteTo {
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            WriteTo::Tcp(socket) => loop {
                ready!(socket.poll_write_ready(cx))?;
                // One frame (the usual case): a plain `send`, cheaper in
                // the kernel than a one-buffer `writev`.
                let written = match bufs {
                    [one] => socket.try_write(one),
                    _ => socket.try_write_vectored(bufs),
                };
                match written {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    done => return Poll::Ready(done),
                }
            },
            WriteTo::Tls(writer) => Pin::new(writer).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            WriteTo::Tcp(_) => Poll::Ready(Ok(())),
            WriteTo::Tls(writer) => Pin::new(writer).poll_flush(cx),
        }
    }
}

/// Frames the session took from its outbox, written in order in as few
/// vectored writes as the socket allows.
pub(crate) struct Out {
    to: WriteTo,
    frames: Vec<Bytes>,
    /// The first frame not wholly written, and how much of it was.
    next: usize,
    offset: usize,
    /// `frames[0]` is the rest of a frame a producer began writing: the
    /// peer has its start already.
    continues: bool,
}

impl Out {
    pub(crate) fn new(to: WriteTo) -> Self {
        Self {
            to,
            frames: Vec::new(),
            next: 0,
            offset: 0,
            continues: false,
        }
    }

    /// Takes what `outbox` holds, to write it (`Err`: it is closed).
    pub(crate) fn take_from(&mut self, outbox: &Outbox) -> Result<(), CloseReason> {
        let taken = outbox.take_queued(&mut self.frames)?;
        // Taken only when nothing is left to write: a taken rest is first.
        self.continues = taken.begun;
        Ok(())
    }

    /// Where frames to write go.
    pub(crate) fn frames(&mut self) -> &mut Vec<Bytes> {
        &mut self.frames
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.next == self.frames.len()
    }

    /// Before a close frame: keeps the rest of the frame under way (the
    /// peer must get it whole) and drops the frames not begun.
    pub(crate) fn keep_begun(&mut self) {
        let begun = self.offset > 0 || (self.next == 0 && self.continues);
        let keep = if begun { self.next + 1 } else { self.next };
        self.frames.truncate(keep);
    }

    /// Writes every frame (then flushes TLS); done when all are out.
    pub(crate) fn write(&mut self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| self.poll_write(cx))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.next < self.frames.len() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let pending = &self.frames[self.next..];
            let count = pending.len().min(MAX_IOVECS);
            slices[0] = IoSlice::new(&pending[0][self.offset..]);
            for (slice, frame) in slices[1..count].iter_mut().zip(&pending[1..]) {
                *slice = IoSlice::new(frame);
            }
            let mut n = ready!(self.to.poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            while n > 0 {
                let left = self.frames[self.next].len() - self.offset;
                if n >= left {
                    n -= left;
                    self.next += 1;
                    self.offset = 0;
                } else {
                    self.offset += n;
                    n = 0;
                }
            }
        }
        ready!(self.to.poll_flush(cx))?;
        self.next = 0;
        self.continues = false;
        // An idle connection keeps no frame list.
        self.frames = Vec::new();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::{
        key::Key,
        websocket::protocol::{FrameText, Payload, PushFrame},
    };

    /// A session that took the rest of a frame a producer began writing,
    /// and ends before it wrote any of that rest, still sends it before its
    /// close frame: the client gets the frame whole, then the close.
    #[tokio::test]
    async fn a_rest_taken_but_not_yet_written_goes_out_before_the_close_frame() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut client, socket) = (client.unwrap(), Arc::new(accepted.unwrap().0));
        let outbox = Outbox::new(64 << 20);
        outbox.write_directly_to(socket.clone());
        let key = Key::new("items", "1").unwrap();
        let big = Bytes::from(format!("\"{}\"", "x".repeat(32 << 20)));
        let frame = PushFrame::build(&key, 1, &[big], false);
        outbox.push(&key, &frame);
        assert!(
            outbox.queued_bytes() > 0,
            "32 MB do not fit a loopback socket's buffers"
        );

        let mut out = Out::new(WriteTo::Tcp(socket));
        out.take_from(&outbox).unwrap();
        // The queue closes before the session wrote anything: it ends.
        outbox.shut_down();
        out.keep_begun();
        out.frames().extend(outbox.end());
        let close = FrameText::close(1001, "bye");
        out.frames().push(close.wire().clone());

        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        out.write().await.unwrap();
        drop(out);
        let got = reader.await.unwrap();
        let Payload::One(whole) = &frame.payload else {
            panic!("one frame")
        };
        let mut want = whole.wire().to_vec();
        want.extend_from_slice(close.wire());
        assert_eq!(got.len(), want.len(), "the frame whole, then the close");
        assert!(got == want);
    }
}
