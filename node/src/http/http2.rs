//! HTTP/2 for the load path, our own framing (RFC 9113): a connection is driven by the
//! tasks of the VUs that await a response on it, never by a task of its own. The VU
//! whose poll finds bytes on the socket reads them, decodes every frame and hands each
//! stream its response, waking only the VUs whose responses are complete. A request
//! costs no channel, no lock taken by another thread and no wake-up but the VU's own
//! (the `h2` crate, used here before, paid for a shared stream store, a connection task
//! and a request conversion on every request: about half of our CPU against h2load).
//!
//! Bounds on what a server may make us do, each a protocol error naming it: frames at
//! most 16 KiB (our SETTINGS_MAX_FRAME_SIZE), a header block at most `MAX_HEAD_BYTES`
//! raw and decoded and at most `MAX_CONTINUATIONS` CONTINUATION frames, windows that
//! overflow 2^31-1, HPACK's own bounds (`hpack`). Control frames that need an answer
//! (SETTINGS, PING) are answered in order; while more than `MAX_QUEUED_WRITES` of
//! answers wait for the socket, nothing more is read, so a flood costs bounded memory.
//! Streams beyond the server's SETTINGS_MAX_CONCURRENT_STREAMS wait for one to end.
//!
//! This module must not record metrics or retry anything; it says whether a failed
//! request surely never reached the server (`H2Error::Unsent`) and leaves the choice to
//! the caller. With `http2_streams_per_connection` above 1, the VUs of one worker thread
//! share connections ([`Pool`]); a VU takes the pool's lock only when it needs a
//! connection, never per request.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::h1::{Io, MAX_HEAD_BYTES};
use super::headers::ResponseHeaders;
use super::hpack::{encode_field, encode_indexed, Decoder};

/// Receive window of each stream: large enough that a response of a few hundred KiB
/// never waits for a window update on loopback.
const STREAM_WINDOW: u32 = 1 << 20;
/// Receive window of the connection (all its streams together).
const CONN_WINDOW: u32 = 2 << 20;
/// Our SETTINGS_MAX_FRAME_SIZE: the protocol's default (so never sent).
const MAX_FRAME: usize = 16_384;
/// CONTINUATION frames one header block may take (a real server needs one or two).
const MAX_CONTINUATIONS: u32 = 64;
/// Read buffer: room for a whole frame after compacting (see `drive`), and for several
/// small ones per read.
const READ_BUF: usize = 32 * 1024;
/// Bytes waiting for the socket beyond which nothing more is read (see module doc).
const MAX_QUEUED_WRITES: usize = 64 * 1024;
/// Largest window a peer may grant (RFC 9113 §6.9.1).
const MAX_WINDOW: i64 = (1 << 31) - 1;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

/// The name of an HTTP/2 error code, for messages.
fn reason(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("error code {code:#x}"), |n| (*n).to_string())
}

/// Why an HTTP/2 request failed.
#[derive(Debug, Clone)]
pub(super) enum H2Error {
    /// Nothing of the request can have been processed: the connection was closed or
    /// going away before it was sent, or the server's GOAWAY names a last stream below
    /// it (RFC 9113 §6.8).
    Unsent(String),
    /// The server refused the stream (`REFUSED_STREAM`), unprocessed; the connection
    /// itself may be fine.
    Refused(String),
    /// The socket failed or closed mid-exchange.
    Io(String),
    /// The server broke the protocol or one of our bounds, or reset the stream.
    Protocol(String),
}

impl H2Error {
    fn text(&self) -> &str {
        match self {
            H2Error::Unsent(t) | H2Error::Refused(t) | H2Error::Io(t) | H2Error::Protocol(t) => t,
        }
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

/// A connection and whether new streams may still be opened on it.
struct Link {
    conn: Mutex<Conn>,
    /// Set on GOAWAY, on any error that ends the connection, and by `retire`.
    closed: AtomicBool,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An HTTP/2 connection of one VU, its own or a share of a pooled one. Dropping its own
/// closes the socket; dropping a share closes the socket with the last share.
pub(super) struct H2Conn {
    link: Arc<Link>,
    /// Held so that the pool counts this VU among the connection's users.
    _share: Option<Share>,
    /// The request's header block, built here so that its buffer is reused.
    block: Vec<u8>,
}

impl H2Conn {
    /// Sends the connection preface, our settings and the connection window; the
    /// server's settings come with the first exchange.
    pub async fn handshake(mut io: Io) -> Result<H2Conn, H2Error> {
        let mut hello = Vec::with_capacity(64);
        hello.extend_from_slice(PREFACE);
        let settings: [(u16, u32); 3] = [
            (0x2, 0),                     // ENABLE_PUSH
            (0x4, STREAM_WINDOW),         // INITIAL_WINDOW_SIZE
            (0x6, MAX_HEAD_BYTES as u32), // MAX_HEADER_LIST_SIZE
        ];
        frame_head(&mut hello, settings.len() * 6, SETTINGS, 0, 0);
        for (id, value) in settings {
            hello.extend_from_slice(&id.to_be_bytes());
            hello.extend_from_slice(&value.to_be_bytes());
        }
        frame_head(&mut hello, 4, WINDOW_UPDATE, 0, 0);
        hello.extend_from_slice(&(CONN_WINDOW - 65_535).to_be_bytes());
        let sent = async {
            io.write_all(&hello).await?;
            io.flush().await
        };
        sent.await
            .map_err(|e| H2Error::Io(format!("HTTP/2 connection failed: {e}")))?;
        Ok(H2Conn {
            link: Arc::new(Link {
                conn: Mutex::new(Conn::new(io)),
                closed: AtomicBool::new(false),
            }),
            _share: None,
            block: Vec::new(),
        })
    }

    /// Takes a connection out of use for new requests (its pool's included): it
    /// refused a stream or went away, so the next request opens a fresh one.
    pub fn retire(&self) {
        self.link.closed.store(true, Ordering::Relaxed);
    }

    /// Whether a new request may be sent on it (as far as is known without reading).
    pub fn can_send(&self) -> bool {
        !self.link.closed.load(Ordering::Relaxed)
    }

    /// One request and its whole response. At most `max_body` bytes of the body are
    /// kept; the rest is read, counted and released.
    pub async fn exchange(
        &mut self,
        request: Request<()>,
        body: Bytes,
        max_body: usize,
    ) -> Result<H2Response, H2Error> {
        self.block.clear();
        encode_request(&request, &mut self.block);
        let link = &*self.link;
        let block = &self.block;
        let mut body = Some(body);
        let (id, batched) =
            poll_fn(|cx| link.lock().poll_open(cx, link, block, &mut body, max_body)).await?;
        // Dropped before the response is complete (a timeout, a cancelled VU): the
        // stream is reset and forgotten, and another VU takes over reading.
        let guard = Abandon { link, id };
        if batched {
            // The VUs that a read of several responses woke send their next requests in
            // one write (as h2load does with -m): each queues its frames; the first lets
            // the others run before it writes them all.
            tokio::task::yield_now().await;
        }
        let out = poll_fn(|cx| link.lock().poll_response(cx, link, id)).await;
        std::mem::forget(guard);
        out
    }
}

/// Resets and forgets a stream whose exchange was dropped mid-way.
struct Abandon<'a> {
    link: &'a Link,
    id: u32,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        self.link.lock().abandon(self.id);
    }
}

/// The HTTP/2 header block of a request: pseudo-headers first (static-table indices for
/// the common ones), then the request's headers less those HTTP/2 forbids.
fn encode_request(req: &Request<()>, out: &mut Vec<u8>) {
    match *req.method() {
        Method::GET => encode_indexed(out, 2),
        Method::POST => encode_indexed(out, 3),
        ref m => encode_field(out, b":method", m.as_str().as_bytes()),
    }
    encode_indexed(
        out,
        if req.uri().scheme_str() == Some("https") {
            7
        } else {
            6
        },
    );
    let authority = match req.headers().get(HOST) {
        Some(host) => host.as_bytes(),
        None => req
            .uri()
            .authority()
            .map_or(&b""[..], |a| a.as_str().as_bytes()),
    };
    encode_field(out, b":authority", authority);
    match req.uri().path_and_query().map_or("/", |p| p.as_str()) {
        "/" | "" => encode_indexed(out, 4),
        path => encode_field(out, b":path", path.as_bytes()),
    }
    for (name, value) in req.headers() {
        let forbidden = matches!(
            name.as_str(),
            "host"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
        ) || (name.as_str() == "te" && value.as_bytes() != b"trailers");
        if !forbidden {
            encode_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// A frame header (RFC 9113 §4.1).
fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

fn rst_stream(out: &mut Vec<u8>, stream: u32, code: u32) {
    frame_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&code.to_be_bytes());
}

fn window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    frame_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

/// One stream: the request's unsent body and the response as it arrives.
struct Stream {
    id: u32,
    max_body: usize,
    sent_at: Instant,
    /// The request body not yet sent (flow control).
    pending: Bytes,
    send_window: i64,
    /// Receive window left, and bytes consumed since our last WINDOW_UPDATE.
    recv_window: i64,
    recv_used: u32,
    /// The final response head, once it came: status and HTTP/1.1-style lines.
    status: u16,
    head: Option<Vec<u8>>,
    set_cookie: bool,
    first_byte_at: Option<Instant>,
    body: BytesMut,
    truncated: bool,
    body_bytes: u64,
    /// Set when the stream is over, with when.
    outcome: Option<(Result<(), H2Error>, Instant)>,
    waker: Option<Waker>,
}

/// A header block being assembled from HEADERS and CONTINUATION frames.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    continuations: u32,
}

/// The state of one connection, behind its `Link`'s lock.
struct Conn {
    io: Io,
    read: Vec<u8>,
    r_start: usize,
    r_end: usize,
    write: Vec<u8>,
    w_pos: usize,
    /// Bytes written but maybe held by TLS until flushed.
    unflushed: bool,
    decoder: Decoder,
    /// The server's settings.
    peer_frame: usize,
    peer_window: i64,
    peer_streams: usize,
    settings_known: bool,
    send_window: i64,
    recv_window: i64,
    recv_used: u32,
    next_id: u32,
    streams: Vec<Stream>,
    /// Streams not yet over (counted against the server's limit).
    open: usize,
    block: Option<OpenBlock>,
    block_bytes: Vec<u8>,
    /// The connection is over: why (every stream still open failed with it).
    failed: Option<H2Error>,
    /// The server's GOAWAY: its last processed stream.
    goaway: Option<u32>,
    /// VUs waiting for the server's stream limit to let them open one.
    waiting: Vec<Waker>,
    /// The stream whose task polled the socket last: its waker is the one the socket
    /// will wake, so it hands over to another stream's task when it leaves.
    reader: u32,
    /// The stream whose VU writes the frames queued since the last write (0: any VU
    /// may): the others leave them to it (see `exchange`).
    flusher: u32,
}

/// What ends the connection: our GOAWAY's code and the message streams fail with.
struct ConnError(u32, String);

impl Conn {
    fn new(io: Io) -> Conn {
        Conn {
            io,
            read: vec![0; READ_BUF],
            r_start: 0,
            r_end: 0,
            write: Vec::with_capacity(4096),
            w_pos: 0,
            unflushed: false,
            decoder: Decoder::default(),
            peer_frame: MAX_FRAME,
            peer_window: 65_535,
            peer_streams: usize::MAX,
            settings_known: false,
            send_window: 65_535,
            recv_window: CONN_WINDOW as i64,
            recv_used: 0,
            next_id: 1,
            streams: Vec::new(),
            open: 0,
            block: None,
            block_bytes: Vec::new(),
            failed: None,
            goaway: None,
            waiting: Vec::new(),
            reader: 0,
            flusher: 0,
        }
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// Opens a stream for a request once the server's limit allows, and queues its
    /// HEADERS (and as much of the body as the windows allow).
    fn poll_open(
        &mut self,
        cx: &mut Context<'_>,
        link: &Link,
        block: &[u8],
        body: &mut Option<Bytes>,
        max_body: usize,
    ) -> Poll<Result<(u32, bool), H2Error>> {
        // What arrived while the connection was idle (GOAWAY, SETTINGS, a close) first.
        // With streams open their VUs read; one waiting here must not take the socket's
        // wake-up from them.
        if self.open == 0 {
            self.drive(cx, link, 0);
        }
        if let Some(e) = &self.failed {
            return Poll::Ready(Err(H2Error::Unsent(e.text().to_string())));
        }
        if self.goaway.is_some() || self.next_id > MAX_WINDOW as u32 {
            link.closed.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(H2Error::Unsent(
                "the server is closing the HTTP/2 connection (GOAWAY)".into(),
            )));
        }
        if self.settings_known && self.peer_streams == 0 {
            return Poll::Ready(Err(H2Error::Refused(
                "the server allows no HTTP/2 streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)".into(),
            )));
        }
        // Until the server's SETTINGS say how many streams it allows, one: VUs sharing a
        // new connection must not open streams the server will refuse.
        let limit = if self.settings_known {
            self.peer_streams
        } else {
            1
        };
        if self.open >= limit {
            if !self.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                self.waiting.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let id = self.next_id;
        self.next_id += 2;
        let body = body.take().unwrap_or_default();
        let end = if body.is_empty() { END_STREAM } else { 0 };
        // The block in HEADERS and, past the server's frame size, CONTINUATIONs.
        let mut rest = block;
        let mut kind = HEADERS;
        let mut flags = end;
        loop {
            let n = rest.len().min(self.peer_frame);
            let last = n == rest.len();
            frame_head(
                &mut self.write,
                n,
                kind,
                flags | if last { END_HEADERS } else { 0 },
                id,
            );
            self.write.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if last {
                break;
            }
            (kind, flags) = (CONTINUATION, 0);
        }
        self.streams.push(Stream {
            id,
            max_body,
            sent_at: Instant::now(),
            pending: body,
            send_window: self.peer_window,
            recv_window: STREAM_WINDOW as i64,
            recv_used: 0,
            status: 0,
            head: None,
            set_cookie: false,
            first_byte_at: None,
            body: BytesMut::new(),
            truncated: false,
            body_bytes: 0,
            outcome: None,
            waker: None,
        });
        self.open += 1;
        self.queue_bodies();
        if self.open > 1 {
            // Written with the other streams' frames (see `exchange`) by the first VU
            // that queued since the last write.
            if self.flusher == 0 {
                self.flusher = id;
                return Poll::Ready(Ok((id, true)));
            }
            return Poll::Ready(Ok((id, false)));
        }
        if let Err(e) = self.flush(cx) {
            self.fail_io(link, &e);
        }
        Poll::Ready(Ok((id, false)))
    }

    /// Drives the connection until stream `id`'s response is complete.
    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
        link: &Link,
        id: u32,
    ) -> Poll<Result<H2Response, H2Error>> {
        // A stream another VU's read completed is collected without reading: the socket
        // stays with the VU that polled it last.
        if self
            .index(id)
            .is_some_and(|i| self.streams[i].outcome.is_none())
        {
            self.drive(cx, link, id);
        }
        let Some(i) = self.index(id) else {
            return Poll::Ready(Err(H2Error::Protocol("HTTP/2 stream lost".into())));
        };
        let s = &mut self.streams[i];
        if s.outcome.is_none() {
            if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let s = self.streams.swap_remove(i);
        self.hand_over(id);
        let (outcome, done_at) = s.outcome.expect("checked above");
        outcome?;
        let head = s.head.unwrap_or_default();
        // The head's first line ("HTTP/2\r\n") stands in for the status line; the rest
        // is what an HTTP/1.1 head would carry.
        let bytes_received = 19 + (head.len() as u64).saturating_sub(8) + s.body_bytes;
        Poll::Ready(Ok(H2Response {
            status: StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK),
            headers: ResponseHeaders::from_head(Bytes::from(head), s.set_cookie),
            body: s.body.freeze(),
            truncated: s.truncated,
            sent_at: s.sent_at,
            first_byte_at: s.first_byte_at.unwrap_or(done_at),
            done_at,
            bytes_received,
        }))
    }

    /// A stream whose exchange was dropped: reset it if still open, forget it.
    fn abandon(&mut self, id: u32) {
        if let Some(i) = self.index(id) {
            let s = self.streams.swap_remove(i);
            if s.outcome.is_none() {
                self.open -= 1;
                if self.failed.is_none() {
                    rst_stream(&mut self.write, id, CANCEL);
                }
            }
            self.hand_over(id);
        }
    }

    /// Called when stream `id`'s task stops polling: if the socket would wake it, the
    /// task of another open stream is woken to poll instead; VUs waiting for a free
    /// stream are woken when one is free.
    fn hand_over(&mut self, id: u32) {
        if self.flusher == id {
            self.flusher = 0;
        }
        if self.reader == id || self.w_pos < self.write.len() || self.r_start < self.r_end {
            self.reader = 0;
            if let Some(w) = self
                .streams
                .iter_mut()
                .find(|s| s.outcome.is_none())
                .and_then(|s| s.waker.take())
            {
                w.wake();
            }
        }
        self.wake_waiting();
    }

    /// Wakes every VU waiting for a stream when one may be free: all of them, since a
    /// woken one may be gone (its request timed out) and must not hold up the rest.
    fn wake_waiting(&mut self) {
        let limit = if self.settings_known {
            self.peer_streams
        } else {
            1
        };
        let over = self.failed.is_some() || self.goaway.is_some();
        if self.open < limit || over {
            for w in self.waiting.drain(..) {
                w.wake();
            }
        }
    }

    /// Reads and handles frames, writes what is queued, until the socket would block or
    /// stream `id` (0: none) is over and no other stream needs reading.
    fn drive(&mut self, cx: &mut Context<'_>, link: &Link, id: u32) {
        loop {
            if self.failed.is_some() {
                return;
            }
            if let Err(e) = self.handle_frames(link, id) {
                self.fail(link, e);
                // The GOAWAY goes out if the socket takes it at once.
                let _ = self.flush(cx);
                return;
            }
            self.queue_bodies();
            if self.flusher == 0 || self.flusher == id {
                self.flusher = 0;
                if let Err(e) = self.flush(cx) {
                    self.fail_io(link, &e);
                    return;
                }
            }
            let done = id != 0
                && self
                    .index(id)
                    .is_none_or(|i| self.streams[i].outcome.is_some());
            if done && self.open == 0 {
                return;
            }
            if self.write.len() - self.w_pos > MAX_QUEUED_WRITES {
                // The socket is full of our answers: read nothing more until it drains
                // (its writability wakes this task).
                return;
            }
            if self.r_start == self.r_end {
                (self.r_start, self.r_end) = (0, 0);
            } else if READ_BUF - self.r_end < MAX_FRAME + 9 {
                self.read.copy_within(self.r_start..self.r_end, 0);
                (self.r_start, self.r_end) = (0, self.r_end - self.r_start);
            }
            let mut buf = ReadBuf::new(&mut self.read[self.r_end..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    self.reader = id;
                    return;
                }
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    let text = "the server closed the HTTP/2 connection".to_string();
                    self.end(link, H2Error::Io(text));
                    return;
                }
                Poll::Ready(Ok(())) => self.r_end += buf.filled().len(),
                Poll::Ready(Err(e)) => {
                    self.fail_io(link, &e);
                    return;
                }
            }
        }
    }

    /// Writes what is queued, as far as the socket takes it.
    fn flush(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        while self.w_pos < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.w_pos..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.w_pos += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        self.write.clear();
        self.w_pos = 0;
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Queues DATA frames of request bodies as the windows allow.
    fn queue_bodies(&mut self) {
        for s in &mut self.streams {
            while !s.pending.is_empty() && s.outcome.is_none() {
                let n = (s.pending.len() as i64)
                    .min(s.send_window)
                    .min(self.send_window)
                    .min(self.peer_frame as i64);
                if n <= 0 || self.write.len() - self.w_pos > MAX_QUEUED_WRITES {
                    return;
                }
                let n = n as usize;
                let last = n == s.pending.len();
                frame_head(
                    &mut self.write,
                    n,
                    DATA,
                    if last { END_STREAM } else { 0 },
                    s.id,
                );
                self.write.extend_from_slice(&s.pending[..n]);
                s.pending = s.pending.slice(n..);
                s.send_window -= n as i64;
                self.send_window -= n as i64;
            }
        }
    }

    /// Handles every whole frame in the read buffer (stopping early once stream `id` is
    /// over and no other is open, so that its VU goes on at once).
    fn handle_frames(&mut self, link: &Link, id: u32) -> Result<(), ConnError> {
        let read = std::mem::take(&mut self.read);
        let out = (|| {
            while self.r_end - self.r_start >= 9 {
                let h = &read[self.r_start..self.r_start + 9];
                let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                if len > MAX_FRAME {
                    return Err(ConnError(
                        FRAME_SIZE_ERROR,
                        format!("a frame of {len} bytes (at most {MAX_FRAME})"),
                    ));
                }
                if self.r_end - self.r_start < 9 + len {
                    break;
                }
                let (kind, flags) = (h[3], h[4]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                let payload = &read[self.r_start + 9..self.r_start + 9 + len];
                self.r_start += 9 + len;
                self.frame(link, kind, flags, stream, payload)?;
                if id != 0
                    && self.open == 0
                    && self
                        .index(id)
                        .is_none_or(|i| self.streams[i].outcome.is_some())
                {
                    break;
                }
            }
            Ok(())
        })();
        self.read = read;
        out
    }

    fn frame(
        &mut self,
        link: &Link,
        kind: u8,
        flags: u8,
        id: u32,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        if let Some(b) = &self.block {
            if kind != CONTINUATION || id != b.stream {
                return Err(ConnError(
                    PROTOCOL_ERROR,
                    "a header block interrupted by another frame".into(),
                ));
            }
        }
        match kind {
            DATA => self.data(id, flags, payload),
            HEADERS => self.headers(id, flags, payload),
            CONTINUATION => self.continuation(id, flags, payload),
            RST_STREAM => {
                if id == 0 || payload.len() != 4 {
                    return Err(ConnError(PROTOCOL_ERROR, "a malformed RST_STREAM".into()));
                }
                self.known(id, "RST_STREAM")?;
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if let Some(i) = self.index(id) {
                    let text = format!("the server reset the HTTP/2 stream ({})", reason(code));
                    let e = if code == REFUSED_STREAM {
                        H2Error::Refused(text)
                    } else {
                        H2Error::Protocol(text)
                    };
                    self.finish(i, Err(e));
                }
                Ok(())
            }
            SETTINGS => self.settings(id, flags, payload),
            PING => {
                if id != 0 || payload.len() != 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, "a malformed PING".into()));
                }
                if flags & ACK == 0 {
                    frame_head(&mut self.write, 8, PING, ACK, 0);
                    self.write.extend_from_slice(payload);
                }
                Ok(())
            }
            GOAWAY => {
                if id != 0 || payload.len() < 8 {
                    return Err(ConnError(FRAME_SIZE_ERROR, "a malformed GOAWAY".into()));
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff;
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                let last = self.goaway.map_or(last, |l| l.min(last));
                self.goaway = Some(last);
                link.closed.store(true, Ordering::Relaxed);
                // Streams above the last one were not processed: safe to send again.
                for i in 0..self.streams.len() {
                    if self.streams[i].id > last && self.streams[i].outcome.is_none() {
                        let text = format!(
                            "the server closed the HTTP/2 connection ({}) before the request",
                            reason(code)
                        );
                        self.finish(i, Err(H2Error::Unsent(text)));
                    }
                }
                self.wake_waiting();
                Ok(())
            }
            WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err(ConnError(
                        FRAME_SIZE_ERROR,
                        "a malformed WINDOW_UPDATE".into(),
                    ));
                }
                let inc = (u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                    & 0x7fff_ffff) as i64;
                if id == 0 {
                    self.send_window += inc;
                    if inc == 0 || self.send_window > MAX_WINDOW {
                        return Err(ConnError(
                            FLOW_CONTROL_ERROR,
                            "a connection window update of 0 or past 2^31-1".into(),
                        ));
                    }
                    return Ok(());
                }
                self.known(id, "WINDOW_UPDATE")?;
                if let Some(i) = self.index(id) {
                    let s = &mut self.streams[i];
                    s.send_window += inc;
                    if inc == 0 || s.send_window > MAX_WINDOW {
                        self.reset(
                            i,
                            FLOW_CONTROL_ERROR,
                            "a stream window update of 0 or past 2^31-1",
                        );
                    }
                }
                Ok(())
            }
            PUSH_PROMISE => Err(ConnError(
                PROTOCOL_ERROR,
                "PUSH_PROMISE although push is disabled".into(),
            )),
            // PRIORITY and unknown types carry nothing for a client.
            _ => Ok(()),
        }
    }

    /// A frame on a stream we never opened (an even or not yet used id) is a connection
    /// error; one on a stream that ended is ignored.
    fn known(&self, id: u32, what: &str) -> Result<(), ConnError> {
        if id.is_multiple_of(2) || id >= self.next_id {
            return Err(ConnError(
                PROTOCOL_ERROR,
                format!("{what} on stream {id}, which was never opened"),
            ));
        }
        Ok(())
    }

    fn data(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        if id == 0 {
            return Err(ConnError(PROTOCOL_ERROR, "DATA on stream 0".into()));
        }
        self.known(id, "DATA")?;
        // Flow control counts the whole payload, padding included.
        let len = payload.len();
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err(ConnError(
                FLOW_CONTROL_ERROR,
                "DATA beyond the connection's window".into(),
            ));
        }
        self.recv_used += len as u32;
        if self.recv_used >= CONN_WINDOW / 2 {
            window_update(&mut self.write, 0, self.recv_used);
            self.recv_window += self.recv_used as i64;
            self.recv_used = 0;
        }
        let data = unpad(flags, payload)?;
        let Some(i) = self.index(id) else {
            return Ok(());
        };
        let s = &mut self.streams[i];
        if s.outcome.is_some() {
            return Ok(());
        }
        if s.head.is_none() {
            self.reset(i, PROTOCOL_ERROR, "DATA before the response's HEADERS");
            return Ok(());
        }
        s.recv_window -= len as i64;
        if s.recv_window < 0 {
            self.reset(i, FLOW_CONTROL_ERROR, "DATA beyond the stream's window");
            return Ok(());
        }
        s.body_bytes += data.len() as u64;
        if s.truncated || s.body.len() + data.len() > s.max_body {
            s.truncated = true;
        } else {
            s.body.extend_from_slice(data);
        }
        if flags & END_STREAM != 0 {
            self.finish(i, Ok(()));
            return Ok(());
        }
        s.recv_used += len as u32;
        if s.recv_used >= STREAM_WINDOW / 2 {
            window_update(&mut self.write, id, s.recv_used);
            s.recv_window += s.recv_used as i64;
            s.recv_used = 0;
        }
        Ok(())
    }

    fn headers(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        if id == 0 {
            return Err(ConnError(PROTOCOL_ERROR, "HEADERS on stream 0".into()));
        }
        self.known(id, "HEADERS")?;
        let mut fragment = unpad(flags, payload)?;
        if flags & PRIORITY_FLAG != 0 {
            fragment = fragment.get(5..).ok_or_else(|| {
                ConnError(
                    FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority".into(),
                )
            })?;
        }
        self.block_bytes.clear();
        self.block_bytes.extend_from_slice(fragment);
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS != 0 {
            return self.header_block(id, end_stream);
        }
        self.block = Some(OpenBlock {
            stream: id,
            end_stream,
            continuations: 0,
        });
        self.check_block_size()
    }

    fn continuation(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        let Some(block) = &mut self.block else {
            return Err(ConnError(
                PROTOCOL_ERROR,
                format!("CONTINUATION on stream {id} without HEADERS"),
            ));
        };
        block.continuations += 1;
        if block.continuations > MAX_CONTINUATIONS {
            return Err(ConnError(
                PROTOCOL_ERROR,
                format!("a header block of more than {MAX_CONTINUATIONS} CONTINUATION frames"),
            ));
        }
        let end_stream = block.end_stream;
        self.block_bytes.extend_from_slice(payload);
        self.check_block_size()?;
        if flags & END_HEADERS != 0 {
            self.block = None;
            return self.header_block(id, end_stream);
        }
        Ok(())
    }

    fn check_block_size(&self) -> Result<(), ConnError> {
        if self.block_bytes.len() > MAX_HEAD_BYTES {
            return Err(ConnError(
                PROTOCOL_ERROR,
                format!("a header block over {MAX_HEAD_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// A complete header block of stream `id`: decoded always (HPACK's table depends on
    /// it), kept when it is the response head of an open stream.
    fn header_block(&mut self, id: u32, end_stream: bool) -> Result<(), ConnError> {
        let mut status = 0u16;
        let mut head = Vec::with_capacity(self.block_bytes.len() * 2 + 16);
        head.extend_from_slice(b"HTTP/2\r\n");
        let mut set_cookie = false;
        let mut malformed: Option<String> = None;
        let mut regular = false;
        self.decoder
            .decode(&self.block_bytes, MAX_HEAD_BYTES, |name, value| {
                if malformed.is_some() {
                    return;
                }
                if name.first() == Some(&b':') {
                    let digits = value.len() == 3 && value.iter().all(u8::is_ascii_digit);
                    if name != b":status" || regular || status != 0 || !digits || value[0] == b'0' {
                        malformed = Some(format!(
                            "a response with pseudo-header '{}: {}' (one :status of 3 digits, first)",
                            String::from_utf8_lossy(name),
                            String::from_utf8_lossy(value)
                        ));
                        return;
                    }
                    status = value.iter().fold(0, |n, d| n * 10 + (d - b'0') as u16);
                    return;
                }
                regular = true;
                let bad_name = name.is_empty()
                    || name.iter().any(|&b| !(0x21..0x7f).contains(&b) || b == b':' || b.is_ascii_uppercase());
                if bad_name || value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
                    malformed = Some(format!(
                        "a response header '{}' that HTTP/2 does not allow",
                        String::from_utf8_lossy(name)
                    ));
                    return;
                }
                set_cookie |= name == b"set-cookie";
                head.extend_from_slice(name);
                head.extend_from_slice(b": ");
                head.extend_from_slice(value);
                head.extend_from_slice(b"\r\n");
            })
            .map_err(|e| ConnError(COMPRESSION_ERROR, e.to_string()))?;
        let Some(i) = self.index(id) else {
            return Ok(());
        };
        if self.streams[i].outcome.is_some() {
            return Ok(());
        }
        let trailers = self.streams[i].head.is_some();
        if let Some(why) = malformed {
            self.reset(i, PROTOCOL_ERROR, &why);
            return Ok(());
        }
        if trailers {
            if !end_stream {
                self.reset(i, PROTOCOL_ERROR, "trailers without END_STREAM");
                return Ok(());
            }
            self.finish(i, Ok(()));
            return Ok(());
        }
        if status == 0 {
            self.reset(i, PROTOCOL_ERROR, "a response without :status");
            return Ok(());
        }
        if status < 200 {
            // Informational (100, 103): the final head is still to come.
            if end_stream {
                self.reset(
                    i,
                    PROTOCOL_ERROR,
                    "an informational response that ends the stream",
                );
            }
            return Ok(());
        }
        let s = &mut self.streams[i];
        s.status = status;
        s.head = Some(head);
        s.set_cookie = set_cookie;
        s.first_byte_at = Some(Instant::now());
        if end_stream {
            self.finish(i, Ok(()));
        }
        Ok(())
    }

    fn settings(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        if id != 0 {
            return Err(ConnError(PROTOCOL_ERROR, "SETTINGS on a stream".into()));
        }
        if flags & ACK != 0 {
            if !payload.is_empty() {
                return Err(ConnError(
                    FRAME_SIZE_ERROR,
                    "a SETTINGS ACK with a payload".into(),
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnError(
                FRAME_SIZE_ERROR,
                "a SETTINGS frame not a multiple of 6 bytes".into(),
            ));
        }
        for p in payload.chunks_exact(6) {
            let key = u16::from_be_bytes([p[0], p[1]]);
            let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
            match key {
                0x2 if value > 1 => {
                    return Err(ConnError(
                        PROTOCOL_ERROR,
                        format!("SETTINGS_ENABLE_PUSH {value}"),
                    ))
                }
                0x3 => self.peer_streams = value as usize,
                0x4 => {
                    if value as i64 > MAX_WINDOW {
                        return Err(ConnError(
                            FLOW_CONTROL_ERROR,
                            format!("SETTINGS_INITIAL_WINDOW_SIZE {value}"),
                        ));
                    }
                    let delta = value as i64 - self.peer_window;
                    self.peer_window = value as i64;
                    for s in &mut self.streams {
                        s.send_window += delta;
                        if s.send_window > MAX_WINDOW {
                            return Err(ConnError(
                                FLOW_CONTROL_ERROR,
                                "a stream window past 2^31-1".into(),
                            ));
                        }
                    }
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(ConnError(
                            PROTOCOL_ERROR,
                            format!("SETTINGS_MAX_FRAME_SIZE {value}"),
                        ));
                    }
                    self.peer_frame = value as usize;
                }
                // The header table size concerns our encoder, which uses no table;
                // the rest are advisory or unknown.
                _ => {}
            }
        }
        frame_head(&mut self.write, 0, SETTINGS, ACK, 0);
        self.settings_known = true;
        self.wake_waiting();
        Ok(())
    }

    /// Ends stream `i` with `outcome` and wakes its VU.
    fn finish(&mut self, i: usize, outcome: Result<(), H2Error>) {
        let s = &mut self.streams[i];
        if s.outcome.is_some() {
            return;
        }
        if outcome.is_ok() && !s.pending.is_empty() {
            // Answered before the whole body was sent: the rest is not needed.
            rst_stream(&mut self.write, s.id, NO_ERROR);
        }
        s.pending = Bytes::new();
        s.outcome = Some((outcome, Instant::now()));
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        self.open -= 1;
        self.wake_waiting();
    }

    /// A stream error we detected: RST_STREAM to the server, a protocol error for the VU.
    fn reset(&mut self, i: usize, code: u32, why: &str) {
        rst_stream(&mut self.write, self.streams[i].id, code);
        let text = format!(
            "HTTP/2 stream reset: the server sent {why} ({})",
            reason(code)
        );
        self.finish(i, Err(H2Error::Protocol(text)));
    }

    /// A connection error we detected: GOAWAY to the server, every open stream fails.
    fn fail(&mut self, link: &Link, ConnError(code, why): ConnError) {
        // Last stream 0: a server opens none to a client that disabled push.
        frame_head(&mut self.write, 8, GOAWAY, 0, 0);
        self.write.extend_from_slice(&0u32.to_be_bytes());
        self.write.extend_from_slice(&code.to_be_bytes());
        let text = format!(
            "HTTP/2 connection closed: the server broke the protocol: {why} ({})",
            reason(code)
        );
        self.end(link, H2Error::Protocol(text));
    }

    fn fail_io(&mut self, link: &Link, e: &std::io::Error) {
        self.end(link, H2Error::Io(format!("HTTP/2 connection failed: {e}")));
    }

    /// The connection is over: every open stream fails with `e` (those GOAWAY said were
    /// not processed already failed as unsent).
    fn end(&mut self, link: &Link, e: H2Error) {
        link.closed.store(true, Ordering::Relaxed);
        self.block = None;
        self.failed = Some(e.clone());
        for i in 0..self.streams.len() {
            self.finish(i, Err(e.clone()));
        }
        self.wake_waiting();
    }
}

/// The data of a frame that may be padded (DATA, HEADERS).
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], ConnError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let pad = *payload.first().ok_or_else(|| {
        ConnError(
            FRAME_SIZE_ERROR,
            "a padded frame without its pad length".into(),
        )
    })? as usize;
    if pad >= payload.len() {
        return Err(ConnError(
            PROTOCOL_ERROR,
            "padding as long as the frame".into(),
        ));
    }
    Ok(&payload[1..payload.len() - pad])
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

/// One pooled connection. It is opened by the first VU that claimed the slot (the others
/// that claimed it meanwhile wait for that handshake instead of opening their own).
struct Slot {
    key: PoolKey,
    link: tokio::sync::OnceCell<Arc<Link>>,
    /// VUs holding a share of it (or waiting for it to open): at most the pool's limit.
    users: AtomicUsize,
}

impl Slot {
    fn closed(&self) -> bool {
        self.link
            .get()
            .is_some_and(|l| l.closed.load(Ordering::Relaxed))
    }
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
        self.slot.link.initialized()
    }

    /// Opens the claimed connection with `open` unless another claimant did or is doing
    /// so (then waits for it). `open` hands back the connection to share, or anything
    /// else (an error, an HTTP/1.1 connection) as `Err`, which leaves the slot unopened.
    pub async fn open<E, F>(self, open: F) -> Result<H2Conn, E>
    where
        F: Future<Output = Result<H2Conn, E>>,
    {
        let slot = self.slot.clone();
        let link = slot
            .link
            .get_or_try_init(|| async { Ok(open.await?.link) })
            .await?
            .clone();
        Ok(H2Conn {
            link,
            _share: Some(self),
            block: Vec::new(),
        })
    }
}

impl Pool {
    /// A claim on a connection of this worker to this origin with fewer than `limit`
    /// users, or on a new slot. Callers take a new claim only when they hold none that
    /// works, so slots are bounded by the worker's VUs over `limit` (times their origins).
    pub fn claim(self: &Arc<Pool>, key: PoolKey, limit: usize) -> Share {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| !s.closed());
        let found = slots
            .iter()
            .find(|s| s.key == key && s.users.load(Ordering::Acquire) < limit);
        let slot = match found {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Slot {
                    key,
                    link: tokio::sync::OnceCell::new(),
                    users: AtomicUsize::new(0),
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
