//! One VU's HTTP/2 connection, driven by the VU's own task: the `h2` crate does the
//! framing, HPACK, flow control and the protocol's rules; this module polls its
//! connection only while the VU awaits a response, so a request costs no channel send
//! and no wake-up of another task (hyper's client spawns a task per connection and
//! hands it every request over a channel: a third of the time of a tiny request).
//!
//! Everything a server sends is bounded here by `h2`'s limits, set in `handshake`:
//! header lists, frame sizes, windows, reset streams, the send buffer. A server that
//! breaks them gets the connection closed and the request a `Protocol` error. This
//! module must not record metrics or retry anything; it says whether a failed request
//! surely never reached the server (`H2Error::Unsent`) and leaves the choice to the
//! caller.
//!
//! With `http2_streams_per_connection` above 1, the VUs of one worker thread share
//! connections ([`Pool`]): each shared connection is then driven by a task of its own on
//! that worker (several VUs' tasks await it), and a VU takes the pool's lock only when
//! it needs a connection, never per request. `h2` queues streams beyond the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` until one ends.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use h2::client::{Connection, SendRequest};
use h2::Reason;
use http::{Request, StatusCode};

use super::error::root_cause_text;
use super::h1::{Io, MAX_HEAD_BYTES};
use super::headers::ResponseHeaders;

/// Receive window of each stream: large enough that a response of a few hundred KiB
/// never waits for a window update on loopback.
const STREAM_WINDOW: u32 = 1 << 20;
/// Receive window of the connection (all its streams together).
const CONN_WINDOW: u32 = 2 << 20;
/// Request bytes `h2` may hold for one stream before the server's window opens.
const MAX_SEND_BUFFER: usize = 1 << 20;
/// Streams a server may reset before the connection counts as abusive (h2's default is
/// 10 for a client: one VU has one stream at a time).
const MAX_RESET_STREAMS: usize = 16;

/// Why an HTTP/2 request failed.
#[derive(Debug)]
pub(super) enum H2Error {
    /// Nothing of the request can have been processed: the connection was closed or
    /// going away before it was sent.
    Unsent(String),
    /// The server refused the stream (`REFUSED_STREAM`), unprocessed; the connection
    /// itself may be fine.
    Refused(String),
    /// The server said GOAWAY while the request was on its way: a stream beyond its
    /// last processed one was not processed (RFC 9113 §6.8), but `h2` reports the same
    /// error for every later read, so only an idempotent request may be sent again.
    GoneAway(String),
    /// The socket failed or closed mid-exchange.
    Io(String),
    /// The server broke the protocol or one of our bounds, or reset the stream.
    Protocol(String),
}

impl H2Error {
    fn from_h2(e: h2::Error, sent: bool) -> H2Error {
        let text = describe(&e);
        if !sent {
            H2Error::Unsent(text)
        } else if e.reason() == Some(Reason::REFUSED_STREAM) && !e.is_go_away() {
            H2Error::Refused(text)
        } else if e.is_go_away() && e.is_remote() {
            H2Error::GoneAway(text)
        } else if e.is_io() {
            H2Error::Io(text)
        } else {
            H2Error::Protocol(text)
        }
    }
}

fn describe(e: &h2::Error) -> String {
    if let Some(io) = e.get_io() {
        return format!("HTTP/2 connection failed: {io}");
    }
    match (e.reason(), e.is_go_away(), e.is_remote()) {
        (Some(r), true, true) => format!("the server closed the HTTP/2 connection ({r:?})"),
        (Some(r), true, false) => {
            format!("HTTP/2 connection closed: the server broke the protocol ({r:?})")
        }
        (Some(r), false, true) => format!("the server reset the HTTP/2 stream ({r:?})"),
        (Some(r), false, false) => format!("HTTP/2 stream reset: {e} ({r:?})"),
        (None, _, _) => format!("HTTP/2: {}", root_cause_text(e)),
    }
}

/// A response read to its end.
pub(super) struct H2Response {
    pub status: StatusCode,
    pub headers: ResponseHeaders,
    pub body: Bytes,
    pub truncated: bool,
    pub sent_at: Instant,
    pub first_byte_at: Instant,
    pub done_at: Instant,
    /// Body bytes plus an HTTP/1.1-equivalent size of the head, comparable to h1's.
    pub bytes_received: u64,
}

/// An HTTP/2 connection of one VU, its own or a share of a pooled one. Dropping its own
/// closes the socket; dropping a share closes the socket with the last share.
pub(super) struct H2Conn {
    send: SendRequest<Bytes>,
    /// The VU's own connection, driven while it awaits a response; `None` once it has
    /// ended (GOAWAY, error, socket closed), and for a share (its task drives it).
    /// Boxed: `h2`'s connection state is over a kilobyte, kept out of every `Conn`.
    conn: Option<Box<Connection<Io, Bytes>>>,
    share: Option<Share>,
}

impl H2Conn {
    /// Sends the connection preface and our settings; the server's come with the first
    /// exchange.
    pub async fn handshake(io: Io) -> Result<H2Conn, H2Error> {
        let (send, conn) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_concurrent_reset_streams(MAX_RESET_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            // Until the server's SETTINGS say how many streams it allows, one: VUs
            // sharing a new connection must not open streams the server will refuse.
            .initial_max_send_streams(1)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| H2Error::Io(describe(&e)))?;
        Ok(H2Conn {
            send,
            conn: Some(Box::new(conn)),
            share: None,
        })
    }

    /// Takes a shared connection out of the pool for new claims: it refused a stream or
    /// went away, so the next claimant opens a fresh one.
    pub fn retire(&self) {
        if let Some(share) = &self.share {
            share.slot.closed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a new request may be sent on it (as far as is known without polling).
    pub fn can_send(&self) -> bool {
        match &self.share {
            Some(share) => !share.slot.closed.load(Ordering::Relaxed),
            None => self.conn.is_some(),
        }
    }

    /// One request and its whole response. At most `max_body` bytes of the body are
    /// kept; the rest is read, counted and released.
    pub async fn exchange(
        &mut self,
        request: Request<()>,
        body: Bytes,
        max_body: usize,
    ) -> Result<H2Response, H2Error> {
        let send = &mut self.send;
        let exchange = async move {
            poll_fn(|cx| send.poll_ready(cx))
                .await
                .map_err(|e| H2Error::from_h2(e, false))?;
            let sent_at = Instant::now();
            let end = body.is_empty();
            let (response, mut stream) = send
                .send_request(request, end)
                .map_err(|e| H2Error::from_h2(e, false))?;
            if !end {
                // Queued whole; h2 sends it as the server's windows allow.
                stream
                    .send_data(body, true)
                    .map_err(|e| H2Error::from_h2(e, true))?;
            }
            let response = response.await.map_err(|e| H2Error::from_h2(e, true))?;
            let first_byte_at = Instant::now();
            let (parts, mut incoming) = response.into_parts();
            let headers = ResponseHeaders::from_map(parts.headers);
            let mut bytes_received = 19 + headers.wire_len(); // status line and final CRLF
            let mut single: Option<Bytes> = None;
            let mut joined: Option<BytesMut> = None;
            let mut kept = 0usize;
            let mut truncated = false;
            while let Some(data) = incoming.data().await {
                let data = data.map_err(|e| H2Error::from_h2(e, true))?;
                let _ = incoming.flow_control().release_capacity(data.len());
                bytes_received += data.len() as u64;
                if truncated || kept + data.len() > max_body {
                    truncated = true;
                    continue;
                }
                kept += data.len();
                // The common single-chunk body is kept without copying.
                match (&mut single, &mut joined) {
                    (None, None) => single = Some(data),
                    (Some(first), None) => {
                        let mut buf = BytesMut::with_capacity(first.len() + data.len());
                        buf.extend_from_slice(first);
                        buf.extend_from_slice(&data);
                        single = None;
                        joined = Some(buf);
                    }
                    (_, Some(buf)) => buf.extend_from_slice(&data),
                }
            }
            let done_at = Instant::now();
            let body = match (single, joined) {
                (Some(b), _) => b,
                (None, Some(buf)) => buf.freeze(),
                (None, None) => Bytes::new(),
            };
            Ok(H2Response {
                status: parts.status,
                headers,
                body,
                truncated,
                sent_at,
                first_byte_at,
                done_at,
                bytes_received,
            })
        };
        drive(&mut self.conn, exchange).await
    }
}

/// Polls `work` and the connection together on the calling task until `work` is done.
/// The connection is polled after `work` so that what `work` just queued is written in
/// the same turn. Once the connection has ended, `work` alone is polled: `h2` fails its
/// streams with the connection's error.
async fn drive<T>(
    conn: &mut Option<Box<Connection<Io, Bytes>>>,
    work: impl Future<Output = Result<T, H2Error>>,
) -> Result<T, H2Error> {
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Some(c) = conn.as_mut() {
            if Pin::new(&mut **c).poll(cx).is_ready() {
                *conn = None;
            }
            // The connection's progress (a response, an error) is seen by `work` now,
            // not after another trip through the scheduler.
            return work.as_mut().poll(cx);
        }
        Poll::Pending
    })
    .await
}

/// What a pooled connection is known by: the worker thread whose VUs share it and its
/// origin.
#[derive(PartialEq, Eq)]
pub(super) struct PoolKey {
    pub thread: ThreadId,
    pub https: bool,
    pub host: Box<str>,
    pub port: u16,
}

/// One pooled connection. Its sender is set by the first VU that claimed the slot (the
/// others that claimed it meanwhile wait for that handshake instead of opening their own).
struct Slot {
    key: PoolKey,
    send: tokio::sync::OnceCell<SendRequest<Bytes>>,
    /// VUs holding a share of it (or waiting for it to open): at most the pool's limit.
    users: AtomicUsize,
    /// Set by the task driving the connection when it ends.
    closed: AtomicBool,
}

/// The shared HTTP/2 connections of a node's workers (see the module comment).
#[derive(Default)]
pub(super) struct Pool {
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// A claim on a pooled connection: counts as one of its users until dropped.
pub(super) struct Share {
    slot: Arc<Slot>,
    pool: Arc<Pool>,
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.slot.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last user: the pool lets go of the connection, which then closes.
            if let Ok(mut slots) = self.pool.slots.lock() {
                slots.retain(|s| {
                    !(Arc::ptr_eq(s, &self.slot) && s.users.load(Ordering::Acquire) == 0)
                });
            }
        }
    }
}

impl Share {
    /// Whether the claimed connection is open already (joining it opens nothing).
    pub fn is_open(&self) -> bool {
        self.slot.send.initialized()
    }

    /// Opens the claimed connection with `open` unless another claimant did or is doing
    /// so (then waits for it). `open` hands back the connection to share, or anything
    /// else (an error, an HTTP/1.1 connection) as `Err`, which leaves the slot unopened.
    pub async fn open<E, F>(self, open: F) -> Result<H2Conn, E>
    where
        F: Future<Output = Result<H2Conn, E>>,
    {
        let slot = self.slot.clone();
        let send = slot
            .send
            .get_or_try_init(|| async {
                let mut own = open.await?;
                let send = own.send.clone();
                if let Some(conn) = own.conn.take() {
                    let driven = slot.clone();
                    // On this worker's runtime, like the VUs that share it.
                    tokio::spawn(async move {
                        let _ = conn.await;
                        driven.closed.store(true, Ordering::Relaxed);
                    });
                } else {
                    slot.closed.store(true, Ordering::Relaxed);
                }
                Ok(send)
            })
            .await?
            .clone();
        Ok(H2Conn {
            send,
            conn: None,
            share: Some(self),
        })
    }
}

impl Pool {
    /// A claim on a connection of this worker to this origin with fewer than `limit`
    /// users, or on a new slot. Callers take a new claim only when they hold none that
    /// works, so slots are bounded by the worker's VUs over `limit` (times their origins).
    pub fn claim(self: &Arc<Pool>, key: PoolKey, limit: usize) -> Share {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| !s.closed.load(Ordering::Relaxed));
        let found = slots
            .iter()
            .find(|s| s.key == key && s.users.load(Ordering::Acquire) < limit);
        let slot = match found {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Slot {
                    key,
                    send: tokio::sync::OnceCell::new(),
                    users: AtomicUsize::new(0),
                    closed: AtomicBool::new(false),
                });
                slots.push(s.clone());
                s
            }
        };
        slot.users.fetch_add(1, Ordering::AcqRel);
        Share {
            slot,
            pool: self.clone(),
        }
    }
}
