//! Per-connection outbound queue: at most the latest push per key, bounded in bytes.
//!
//! Producers (the dispatcher, subscribe completions, the session itself) put
//! frames in; the connection's session takes everything queued in one go and
//! writes it in one vectored write. A newer push for a key replaces the
//! queued one in place, so a slow reader never sees intermediate states pile
//! up; a reader so slow that the queue still passes its byte bound is closed.
//!
//! When the session allows it (`write_directly_to`: plain TCP only, a TLS
//! session's state belongs to its task), a frame for a connection with
//! nothing queued and no write under way is written by its producer straight
//! to the socket, without waking the session: the
//! usual case of a push to a reader that keeps up costs one `send` and no
//! task switch. Only a socket that takes part of it, or none, hands the
//! rest to the queue and the session.

use std::{
    collections::{HashMap, VecDeque},
    future::poll_fn,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

use crate::{
    key::Key,
    websocket::protocol::{FrameText, Payload, PushFrame},
};

/// Why a queue stopped accepting frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The client did not read fast enough: the queue passed its byte bound.
    Overflow,
    /// The node is shutting down: the session closes with "going away".
    Shutdown,
}

/// What [`Outbox::ready`] woke for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Woken {
    /// The node's ping timer ticked since the session last looked.
    pub(crate) ping: bool,
}

/// What [`Outbox::take_queued`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Taken {
    /// The first frame taken is the rest of one a producer began writing
    /// to the socket: the peer has its start, so it must go out whole,
    /// even when the session then ends with a close frame.
    pub(crate) begun: bool,
}

/// Result of queueing a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Queued {
    /// Appended to the queue.
    Appended,
    /// Replaced a queued push of the same key.
    Replaced,
    /// A newer push of the key is already queued; nothing changed.
    Stale,
    /// The queue passed its bound and is now closed.
    Overflow,
    /// The queue was already closed.
    Closed,
    /// Written to the socket at once (all of it, or its start with the rest
    /// queued first in line).
    Written,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A push; with `key: None` it was forgotten (unsubscribe) and is skipped.
    Push,
    /// A control frame; its key (if any) fences earlier pushes of that key
    /// from being replaced by later ones.
    Control,
    /// The rest of a frame the socket took only part of: first in line,
    /// and kept when the queue closes (the close frame must follow it).
    Rest,
}

struct Entry {
    key: Option<Key>,
    kind: Kind,
    version: u64,
    payload: Payload,
}

/// Queues longer than this get a key index; shorter ones are scanned, which
/// is faster for the usual handful of entries and costs no memory when idle.
const INDEX_AT: usize = 32;

#[derive(Default)]
struct State {
    queue: VecDeque<Entry>,
    /// Absolute position of `queue[0]`.
    head: u64,
    /// Key -> absolute position of its replaceable push, for long queues
    /// only (boxed: 8 bytes instead of 48 in every idle connection).
    #[allow(
        clippy::box_collection,
        reason = "the box is what keeps an idle queue small"
    )]
    index: Option<Box<HashMap<Key, u64>>>,
    bytes: usize,
    closed: Option<CloseReason>,
    /// The socket, while producers may write to it themselves.
    direct: Option<Arc<TcpStream>>,
    /// The session took frames and writes them: nothing may be written
    /// directly until it is done.
    writing: bool,
}

fn same_key(a: &Key, b: &Key) -> bool {
    (Arc::ptr_eq(&a.entity, &b.entity) && Arc::ptr_eq(&a.id, &b.id)) || a == b
}

impl State {
    /// Position in `queue` of the queued push of `key` that a newer push may
    /// replace, if any.
    fn replaceable(&self, key: &Key) -> Option<usize> {
        if let Some(index) = &self.index {
            return index.get(key).map(|pos| (pos - self.head) as usize);
        }
        for (i, entry) in self.queue.iter().enumerate().rev() {
            if let Some(k) = &entry.key
                && same_key(k, key)
            {
                return (entry.kind == Kind::Push).then_some(i);
            }
        }
        None
    }

    /// Writes `frame` straight to the socket if nothing is queued or being
    /// written (so order holds); the rest of it, if the socket took only
    /// part, is queued first in line. `false`: nothing was written, it must
    /// be queued.
    fn write_direct(&mut self, frame: &FrameText) -> bool {
        if self.writing || !self.queue.is_empty() {
            return false;
        }
        let Some(socket) = self.direct.as_ref() else {
            return false;
        };
        let wire = frame.wire();
        match socket.try_write(wire) {
            Ok(n) if n == wire.len() => true,
            Ok(n) if n > 0 => {
                let rest = wire.slice(n..);
                self.bytes += rest.len();
                self.queue.push_back(Entry {
                    key: None,
                    kind: Kind::Rest,
                    version: 0,
                    payload: Payload::One(FrameText::raw(rest)),
                });
                true
            }
            // Full (or broken: the session's write finds out).
            _ => false,
        }
    }

    fn build_index(&mut self) {
        let mut index = HashMap::with_capacity(self.queue.len());
        for (i, entry) in self.queue.iter().enumerate() {
            if let Some(key) = &entry.key {
                match entry.kind {
                    Kind::Push => index.insert(key.clone(), self.head + i as u64),
                    Kind::Control | Kind::Rest => index.remove(key),
                };
            }
        }
        self.index = Some(Box::new(index));
    }
}

/// The outbound queue of one connection.
///
/// A std `Mutex`: every critical section is a few pointer moves, never
/// crosses an `.await`, and is contended only by the dispatcher and the
/// connection's own session.
///
/// The session is its only reader, so waking it is a flag and a waker slot
/// ([`AtomicWaker`]), not a tokio `Notify`: a push sets the flag and wakes
/// the session if it waits, with no lock and no waiter list (a `Notify`'s
/// waiter list is locked to add, wake and drop every wait, once per push).
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Something was queued (or the queue closed) since the session looked.
    queued: AtomicBool,
    /// The node's ping timer ticked since the session looked (the timer
    /// sets it in every connection: no timer or wait of its own per session).
    ping: AtomicBool,
    wake: AtomicWaker,
    /// Set once when the queue closes, so a session blocked writing to a
    /// slow socket learns it at once (its own waker: the session waits for
    /// this while it writes, and for `queued` between writes).
    closing: AtomicBool,
    closing_wake: AtomicWaker,
    max_bytes: usize,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            queued: AtomicBool::new(false),
            ping: AtomicBool::new(false),
            wake: AtomicWaker::new(),
            closing: AtomicBool::new(false),
            closing_wake: AtomicWaker::new(),
            max_bytes,
        }
    }

    /// Lets producers write to `socket` themselves while the session is
    /// not writing (see the module's docs).
    pub(crate) fn write_directly_to(&self, socket: Arc<TcpStream>) {
        let mut state = self.state.lock().unwrap();
        if state.closed.is_none() {
            state.direct = Some(socket);
        }
    }

    /// Tells the session that something is queued. A signal it has not
    /// taken yet needs no second wake: it sees the flag before it waits.
    fn signal(&self) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.wake.wake();
        }
    }

    /// Tells the session that the ping timer ticked.
    pub(crate) fn ping(&self) {
        if !self.ping.swap(true, Ordering::AcqRel) {
            self.wake.wake();
        }
    }

    /// Closes the queue for shutdown (the session closes with "going away");
    /// a queue already closed keeps its reason.
    pub(crate) fn shut_down(&self) {
        let state = self.state.lock().unwrap();
        if state.closed.is_none() {
            self.close(state, CloseReason::Shutdown);
        }
    }

    /// Queues a push for `key`, replacing a queued older push of that key.
    pub(crate) fn push(&self, key: &Key, frame: &PushFrame) -> Queued {
        self.push_as(key, frame, true)
    }

    /// [`Self::push`]; with `direct` false, never written to the socket by
    /// this call (the session writes it: a fan-out leaves some of its sends
    /// to the sessions, which other cores run).
    pub(crate) fn push_as(&self, key: &Key, frame: &PushFrame, direct: bool) -> Queued {
        let mut state = self.state.lock().unwrap();
        if state.closed.is_some() {
            return Queued::Closed;
        }
        if direct
            && let Payload::One(one) = &frame.payload
            && state.write_direct(one)
        {
            if state.queue.is_empty() {
                return Queued::Written;
            }
            // The socket took part: the session writes the rest.
            let result = self.check_bound(state, Queued::Written);
            self.signal();
            return result;
        }
        let new_len = frame.payload.len();
        if let Some(i) = state.replaceable(key) {
            let entry = &mut state.queue[i];
            if entry.version > frame.version {
                return Queued::Stale;
            }
            let old_len = entry.payload.len();
            entry.payload = frame.payload.clone();
            entry.version = frame.version;
            state.bytes = state.bytes - old_len + new_len;
            return self.check_bound(state, Queued::Replaced);
        }
        let pos = state.head + state.queue.len() as u64;
        state.queue.push_back(Entry {
            key: Some(key.clone()),
            kind: Kind::Push,
            version: frame.version,
            payload: frame.payload.clone(),
        });
        if let Some(index) = &mut state.index {
            index.insert(key.clone(), pos);
        } else if state.queue.len() > INDEX_AT {
            state.build_index();
        }
        state.bytes += new_len;
        let result = self.check_bound(state, Queued::Appended);
        self.signal();
        result
    }

    /// Queues a control frame (`subscribed`, `error`, …) in order. When it
    /// concerns a key, later pushes of that key queue behind it instead of
    /// replacing an earlier one.
    pub(crate) fn control(&self, key: Option<&Key>, frame: FrameText) -> Queued {
        let mut state = self.state.lock().unwrap();
        if state.closed.is_some() {
            return Queued::Closed;
        }
        if state.write_direct(&frame) {
            if state.queue.is_empty() {
                return Queued::Written;
            }
            let result = self.check_bound(state, Queued::Written);
            self.signal();
            return result;
        }
        if let (Some(key), Some(index)) = (key, &mut state.index) {
            index.remove(key);
        }
        state.bytes += frame.len();
        state.queue.push_back(Entry {
            key: key.cloned(),
            kind: Kind::Control,
            version: 0,
            payload: Payload::One(frame),
        });
        let result = self.check_bound(state, Queued::Appended);
        self.signal();
        result
    }

    /// Drops a queued push of `key` (after an unsubscribe).
    pub(crate) fn forget(&self, key: &Key) {
        let mut state = self.state.lock().unwrap();
        if let Some(i) = state.replaceable(key) {
            let entry = &mut state.queue[i];
            let len = entry.payload.len();
            entry.payload = Payload::Many(Arc::from([]));
            entry.key = None;
            state.bytes -= len;
            if let Some(index) = &mut state.index {
                index.remove(key);
            }
        }
    }

    /// Drops every queued push of `key`, also those fenced by a control
    /// frame (after a new secret: none of them may reach the client).
    /// Control frames stay. O(queue), once per held key and new secret.
    pub(crate) fn forget_all(&self, key: &Key) {
        let mut state = self.state.lock().unwrap();
        let mut freed = 0;
        for entry in state.queue.iter_mut() {
            if entry.kind == Kind::Push && entry.key.as_ref().is_some_and(|k| same_key(k, key)) {
                freed += entry.payload.len();
                entry.payload = Payload::Many(Arc::from([]));
                entry.key = None;
            }
        }
        state.bytes -= freed;
        if let Some(index) = &mut state.index {
            index.remove(key);
        }
    }

    fn check_bound(&self, state: std::sync::MutexGuard<'_, State>, ok: Queued) -> Queued {
        if state.bytes <= self.max_bytes {
            return ok;
        }
        self.close(state, CloseReason::Overflow);
        Queued::Overflow
    }

    fn close(&self, mut state: std::sync::MutexGuard<'_, State>, reason: CloseReason) {
        // Free the memory now; the session sends the close frame, after the
        // rest of a frame the socket took part of.
        let rest = state
            .queue
            .pop_front()
            .filter(|entry| entry.kind == Kind::Rest);
        *state = State {
            closed: Some(reason),
            writing: state.writing,
            ..State::default()
        };
        state.queue.extend(rest);
        drop(state);
        self.signal();
        self.closing.store(true, Ordering::Release);
        self.closing_wake.wake();
    }

    /// Moves every queued frame's wire bytes into `out` (in order); until
    /// [`Self::written`], nothing is written to the socket directly.
    /// Returns the close reason once the queue is closed.
    pub(crate) fn take_queued(&self, out: &mut Vec<Bytes>) -> Result<Taken, CloseReason> {
        let mut state = self.state.lock().unwrap();
        if let Some(reason) = state.closed {
            return Err(reason);
        }
        let taken = Taken {
            begun: state.queue.front().is_some_and(|e| e.kind == Kind::Rest),
        };
        let queued = state.queue.len() as u64;
        state.head += queued;
        state.index = None;
        state.bytes = 0;
        // Taken, not cleared: an idle connection keeps no queue memory.
        let queue = std::mem::take(&mut state.queue);
        state.writing = !queue.is_empty();
        drop(state);
        for entry in queue {
            match entry.payload {
                Payload::One(frame) => out.push(frame.into_wire()),
                Payload::Many(frames) => out.extend(frames.iter().map(|f| f.wire().clone())),
            }
        }
        Ok(taken)
    }

    /// The session wrote all it took: producers may write directly again.
    pub(crate) fn written(&self) {
        self.state.lock().unwrap().writing = false;
    }

    /// The session ends: nothing is written or queued any more. Returns
    /// the rest of a frame the socket took part of, which must go out
    /// before a close frame.
    pub(crate) fn end(&self) -> Option<Bytes> {
        let mut state = self.state.lock().unwrap();
        let rest = state
            .queue
            .pop_front()
            .filter(|entry| entry.kind == Kind::Rest);
        *state = State {
            closed: Some(state.closed.unwrap_or(CloseReason::Shutdown)),
            writing: true,
            ..State::default()
        };
        rest.map(|entry| match entry.payload {
            Payload::One(frame) => frame.into_wire(),
            Payload::Many(_) => Bytes::new(),
        })
    }

    /// Waits until something was queued, the queue closed or the ping timer
    /// ticked since the last wait ended. One waiter at a time: the
    /// connection's session.
    pub(crate) async fn ready(&self) -> Woken {
        let take = || {
            let queued = self.queued.swap(false, Ordering::AcqRel);
            let ping = self.ping.swap(false, Ordering::AcqRel);
            (queued || ping).then_some(Woken { ping })
        };
        poll_fn(|cx| {
            // Checked again after registering: a push between the first
            // check and the registration is not missed.
            if let Some(woken) = take() {
                return Poll::Ready(woken);
            }
            self.wake.register(cx.waker());
            match take() {
                Some(woken) => Poll::Ready(woken),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Waits until the queue is closed. One waiter at a time (the session).
    pub(crate) async fn closed(&self) -> CloseReason {
        poll_fn(|cx| {
            if !self.closing.load(Ordering::Acquire) {
                self.closing_wake.register(cx.waker());
                if !self.closing.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            Poll::Ready(
                self.state
                    .lock()
                    .unwrap()
                    .closed
                    .unwrap_or(CloseReason::Overflow),
            )
        })
        .await
    }

    /// The byte bound past which the queue closes.
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Bytes queued now.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.state.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::protocol::text_of_wire;

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    fn push(id: &str, version: u64) -> PushFrame {
        PushFrame::build(
            &key(id),
            version,
            &[Bytes::from_static(b"{\"v\":1}")],
            false,
        )
    }

    /// Whether `future` completes when polled once.
    fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(future).poll(&mut cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn the_session_is_woken_by_each_push_and_by_the_close() {
        let outbox = Arc::new(Outbox::new(100));
        assert!(ready_now(outbox.ready()).is_none(), "nothing queued");
        // A push before the session waits is not missed...
        outbox.push(&key("1"), &push("1", 1));
        assert!(ready_now(outbox.ready()).is_some());
        // ...and counts once.
        assert!(ready_now(outbox.ready()).is_none());
        // A push while it waits wakes it.
        let waiting = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.ready().await }
        });
        tokio::task::yield_now().await;
        outbox.control(None, FrameText::from_static("{}"));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(ready_now(outbox.closed()).is_none(), "not closed");
        let closing = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closed().await }
        });
        tokio::task::yield_now().await;
        let big = PushFrame::build(&key("2"), 1, &[Bytes::from(vec![b'1'; 200])], false);
        assert_eq!(outbox.push(&key("2"), &big), Queued::Overflow);
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), closing)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(reason, CloseReason::Overflow);
        assert!(
            ready_now(outbox.ready()).is_some(),
            "the close wakes the session too"
        );
    }

    fn taken(outbox: &Outbox) -> Vec<String> {
        let mut out = Vec::new();
        assert!(outbox.take_queued(&mut out).is_ok());
        out.iter().map(|wire| text_of_wire(wire)).collect()
    }

    #[test]
    fn keeps_only_the_latest_push_per_key_in_place() {
        let outbox = Outbox::new(1 << 20);
        assert_eq!(outbox.push(&key("1"), &push("1", 1)), Queued::Appended);
        assert_eq!(outbox.push(&key("2"), &push("2", 2)), Queued::Appended);
        assert_eq!(outbox.push(&key("1"), &push("1", 3)), Queued::Replaced);
        assert_eq!(outbox.push(&key("1"), &push("1", 2)), Queued::Stale);
        let frames = taken(&outbox);
        assert_eq!(frames.len(), 2);
        assert!(frames[0].contains("\"id\":\"1\",\"version\":3"));
        assert!(frames[1].contains("\"id\":\"2\",\"version\":2"));
        assert_eq!(outbox.queued_bytes(), 0);
        assert!(taken(&outbox).is_empty());
    }

    #[test]
    fn control_frames_keep_order_and_fence_replacement() {
        let outbox = Outbox::new(1 << 20);
        outbox.push(&key("1"), &push("1", 1));
        outbox.control(Some(&key("1")), FrameText::from_static("ack"));
        assert_eq!(outbox.push(&key("1"), &push("1", 2)), Queued::Appended);
        let frames = taken(&outbox);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[1], "ack");
        assert!(frames[2].contains("\"version\":2"));
    }

    #[test]
    fn forget_drops_a_queued_push() {
        let outbox = Outbox::new(1 << 20);
        outbox.push(&key("1"), &push("1", 1));
        outbox.push(&key("2"), &push("2", 1));
        outbox.forget(&key("1"));
        let frames = taken(&outbox);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"id\":\"2\""));
    }

    #[test]
    fn forget_all_drops_fenced_pushes_too_and_keeps_control_frames() {
        for filler in [0, 100] {
            let outbox = Outbox::new(1 << 20);
            // `filler` other keys first: 100 makes the queue use its index.
            for i in 0..filler {
                let id = format!("f{i}");
                outbox.push(&key(&id), &push(&id, 1));
            }
            outbox.push(&key("1"), &push("1", 1));
            outbox.control(Some(&key("1")), FrameText::from_static("ack"));
            outbox.push(&key("1"), &push("1", 2));
            outbox.push(&key("2"), &push("2", 1));
            let before = outbox.queued_bytes();
            outbox.forget_all(&key("1"));
            let one = push("1", 1).payload.len();
            assert_eq!(outbox.queued_bytes(), before - 2 * one);
            let frames = taken(&outbox);
            assert_eq!(frames.len(), filler + 2, "{frames:?}");
            assert_eq!(frames[filler], "ack");
            assert!(frames[filler + 1].contains("\"id\":\"2\""));
            // A push after it queues normally.
            assert_eq!(outbox.push(&key("1"), &push("1", 3)), Queued::Appended);
            assert_eq!(taken(&outbox).len(), 1);
        }
    }

    #[test]
    fn overflow_closes_and_frees() {
        let frame = push("1", 1);
        let outbox = Outbox::new(frame.payload.len() * 2);
        assert_eq!(outbox.push(&key("1"), &frame), Queued::Appended);
        assert_eq!(outbox.push(&key("2"), &push("2", 1)), Queued::Appended);
        assert_eq!(outbox.push(&key("3"), &push("3", 1)), Queued::Overflow);
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(outbox.push(&key("4"), &push("4", 1)), Queued::Closed);
        let mut out = Vec::new();
        assert_eq!(outbox.take_queued(&mut out), Err(CloseReason::Overflow));
    }

    #[test]
    fn long_queues_use_an_index_with_the_same_rules() {
        let outbox = Outbox::new(1 << 20);
        for i in 0..100 {
            let id = i.to_string();
            assert_eq!(outbox.push(&key(&id), &push(&id, 1)), Queued::Appended);
        }
        assert_eq!(outbox.push(&key("7"), &push("7", 2)), Queued::Replaced);
        assert_eq!(outbox.push(&key("7"), &push("7", 1)), Queued::Stale);
        outbox.control(Some(&key("8")), FrameText::from_static("ack"));
        assert_eq!(outbox.push(&key("8"), &push("8", 2)), Queued::Appended);
        outbox.forget(&key("9"));
        let frames = taken(&outbox);
        assert_eq!(frames.len(), 100 - 1 + 2);
        assert!(frames[7].contains("\"id\":\"7\",\"version\":2"));
        assert!(frames[8].contains("\"id\":\"8\",\"version\":1"));
        assert!(frames[9].contains("\"id\":\"10\""), "9 was forgotten");
        assert_eq!(frames[99], "ack");
        assert!(frames[100].contains("\"id\":\"8\",\"version\":2"));
    }

    #[test]
    fn replacing_does_not_grow_the_queue() {
        let frame = push("1", 1);
        let outbox = Outbox::new(frame.payload.len() * 2);
        for v in 1..1000 {
            assert_ne!(outbox.push(&key("1"), &push("1", v)), Queued::Overflow);
        }
        assert_eq!(taken(&outbox).len(), 1);
    }

    /// A connected loopback pair: the node's side and the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    /// With nothing queued and no write under way, a push goes straight to
    /// the socket, whole, and the session is not woken; while the session
    /// writes, pushes queue behind it, in order.
    #[tokio::test]
    async fn an_idle_connection_gets_its_push_written_at_once() {
        use tokio::io::AsyncReadExt;
        let (socket, mut client) = socket_pair().await;
        let outbox = Outbox::new(1 << 20);
        outbox.write_directly_to(socket);
        let first = push("1", 1);
        assert_eq!(outbox.push(&key("1"), &first), Queued::Written);
        assert!(ready_now(outbox.ready()).is_none(), "no wake-up");
        let Payload::One(frame) = &first.payload else {
            panic!("one frame")
        };
        let mut got = vec![0; frame.wire().len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &frame.wire()[..]);

        // The session takes a control frame and writes it: a push meanwhile
        // is queued, and goes direct again once the session is done.
        outbox.control(None, FrameText::from_static("{}"));
        let mut out = Vec::new();
        // Written directly too (nothing queued, no write under way).
        assert_eq!(outbox.take_queued(&mut out), Ok(Taken { begun: false }));
        assert!(out.is_empty());
        outbox.state.lock().unwrap().writing = true;
        assert_eq!(outbox.push(&key("2"), &push("2", 1)), Queued::Appended);
        outbox.written();
        assert_eq!(
            outbox.push(&key("3"), &push("3", 1)),
            Queued::Appended,
            "2 is still queued"
        );
        assert_eq!(taken(&outbox).len(), 2);
        outbox.written();
        assert_eq!(outbox.push(&key("4"), &push("4", 1)), Queued::Written);
    }

    /// A socket that takes part of a frame: the rest is first in line for
    /// the session, and it survives the queue's close (it must go out
    /// before the close frame); a socket that takes nothing queues.
    #[tokio::test]
    async fn the_rest_of_a_frame_the_socket_took_part_of_goes_first() {
        let (socket, client) = socket_pair().await;
        let outbox = Outbox::new(64 << 20);
        outbox.write_directly_to(socket);
        let big = Bytes::from(format!("\"{}\"", "x".repeat(32 << 20)));
        let frame = PushFrame::build(&key("1"), 1, &[big], false);
        assert_eq!(outbox.push(&key("1"), &frame), Queued::Written);
        let rest = outbox.queued_bytes();
        assert!(rest > 0, "32 MB do not fit a loopback socket's buffers");
        assert!(
            ready_now(outbox.ready()).is_some(),
            "the session is woken for the rest"
        );
        // The socket is full: the next push is queued behind the rest.
        assert_eq!(outbox.push(&key("2"), &push("2", 1)), Queued::Appended);
        outbox.shut_down();
        let end = outbox.end().expect("the rest is kept");
        assert_eq!(end.len(), rest);
        let Payload::One(whole) = &frame.payload else {
            panic!("one frame")
        };
        assert!(whole.wire().ends_with(&end));
        assert_eq!(outbox.push(&key("3"), &push("3", 1)), Queued::Closed);
        drop(client);
    }
}
