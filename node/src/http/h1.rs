//! HTTP/1.1 on one keep-alive connection, written for the load engine's hot path: the
//! VU's own task writes the request and reads the response on the socket it owns.
//!
//! Why not hyper here: hyper drives each HTTP/1 connection from a task of its own and
//! hands requests and responses across a channel, so every request costs two task
//! wake-ups, a channel round trip and a rebuilt `http::Request` — about as much CPU as
//! the loopback TCP itself, which made stampede slower than wrk per core (spec §4,
//! docs/benchmarks.md). Here a request is one `write` of bytes encoded into a buffer the
//! connection keeps, and the response is parsed (httparse) out of a read buffer the
//! connection keeps; header values and a body that arrived whole are slices of that
//! buffer, not copies. HTTP/2 stays on hyper (see `client`).
//!
//! This module owns framing only: encoding a request, reading one response (length,
//! chunked or close-delimited body; 1xx skipped), and knowing whether the connection can
//! carry another request. It must not follow redirects, touch cookies, time out (the
//! caller bounds the whole exchange) or retry; it reports when a reused connection was
//! found closed before any byte of the response arrived, so the caller can decide.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, USER_AGENT,
};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::headers::ResponseHeaders;
use super::url::Url;

/// A response head larger than this is refused: no real service sends one, and a
/// misbehaving target must not make a VU buffer without bound.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header slots tried on the stack before parsing again with room for `MAX_HEADERS`.
const FEW_HEADERS: usize = 32;
const MAX_HEADERS: usize = 256;
/// A chunk-size line (with extensions) longer than this is a protocol error.
const MAX_CHUNK_LINE: usize = 4096;
/// Read buffer granted per read; grows only while a head or body needs more.
const READ_CHUNK: usize = 4096;
/// Bodies up to this size are copied into the write buffer and sent in one write.
const INLINE_BODY: usize = 16 * 1024;

/// The byte stream under a connection: plain TCP or TLS over TCP.
pub(super) enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Tcp(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub(super) enum H1Error {
    /// The connection was closed (or reset) before a single byte of the response
    /// arrived. On a reused keep-alive connection this is the server having closed it
    /// while idle, the one case where a fresh connection may be tried.
    ClosedBeforeResponse(String),
    /// The connection broke while the response was arriving.
    Io(String),
    /// The server's bytes are not a valid HTTP/1.x response.
    Protocol(String),
}

/// One response read off the connection.
pub(super) struct H1Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: ResponseHeaders,
    pub body: Bytes,
    /// The body exceeded the caller's limit; `body` holds its start.
    pub truncated: bool,
    pub first_byte_at: Instant,
    /// When the last body byte was read (`first_byte_at` when the body came with the head).
    pub done_at: Instant,
    /// Response bytes on the wire: head (and skipped 1xx heads), body with its framing.
    pub wire_bytes: u64,
}

/// What the caller asks to be sent.
pub(super) struct H1Request<'a> {
    pub method: &'a Method,
    pub url: &'a Url,
    /// `host[:port]` of the URL, used unless `headers` has a Host of its own.
    pub host: &'a HeaderValue,
    /// Sent unless `headers` has a User-Agent of its own.
    pub user_agent: Option<&'a HeaderValue>,
    /// An extra Cookie header (the jar's), merged with one in `headers`.
    pub cookies: Option<&'a HeaderValue>,
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

/// An HTTP/1.1 connection owned by one VU.
pub(super) struct H1Conn {
    io: Io,
    read: BytesMut,
    write: Vec<u8>,
    /// False once either side said `Connection: close`, a body was close-delimited, or an
    /// exchange failed half-way: such a connection must not carry another request.
    reusable: bool,
    /// Whether an exchange has completed on it (it is then a reused connection).
    reused: bool,
    /// The method and target of the request `write` holds, when that request had no
    /// headers, cookies or body of its own: the next identical request (a load step
    /// repeated by one VU) is sent from the buffer as it is, without encoding it again.
    encoded: Option<(Method, Vec<u8>)>,
}

impl H1Conn {
    pub fn new(io: Io) -> H1Conn {
        H1Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            reusable: true,
            reused: false,
            encoded: None,
        }
    }

    /// False once the last exchange said this connection must not carry another request.
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// True when this connection has already carried a request.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether another request may be sent on this connection. Besides the framing of
    /// the last exchange, this notices — without a system call in the common case — a
    /// server that closed the idle connection or sent bytes nobody asked for: the
    /// reactor marks the socket readable, and a readable idle socket is one not to use.
    pub fn can_send(&self) -> bool {
        if !self.reusable || !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        // Readiness may be stale (tokio clears it only on WouldBlock), so a ready socket
        // is asked with a peek, which leaves any bytes (a TLS record) where they are.
        // Ready means end of stream, an error, or bytes nobody asked for (a TLS
        // close_notify): in every case not a connection to send on.
        self.io.tcp().poll_peek(&mut cx, &mut probe).is_pending()
    }

    /// Sends one request and reads its response. `max_body` bounds what is kept of the
    /// body (the rest is read and counted). On any error the connection must be dropped.
    pub async fn exchange(
        &mut self,
        req: &H1Request<'_>,
        max_body: usize,
    ) -> Result<(H1Response, u64), H1Error> {
        let head_only = *req.method == Method::HEAD;
        let plain = req.headers.is_empty() && req.cookies.is_none() && req.body.is_empty();
        let target = req.url.path_and_query().as_str().as_bytes();
        let mut close_requested = false;
        let inline = req.body.len() <= INLINE_BODY;
        let same = matches!(&self.encoded, Some((m, t)) if plain && m == req.method && t == target);
        if !same {
            close_requested = encode_request(&mut self.write, req);
            if inline {
                self.write.extend_from_slice(req.body);
            }
            self.encoded = plain.then(|| (req.method.clone(), target.to_vec()));
        }
        let sent = self.write.len() as u64 + if inline { 0 } else { req.body.len() as u64 };
        // Until this exchange completes, nothing more may go on this connection.
        self.reusable = false;
        // A write that fails on a reused connection failed before the server could have
        // answered anything: the same case as a close before the response.
        let written = async {
            self.io.write_all(&self.write).await?;
            if !inline {
                self.io.write_all(req.body).await?;
            }
            self.io.flush().await
        }
        .await;
        if let Err(e) = written {
            return Err(H1Error::ClosedBeforeResponse(format!(
                "sending the request failed: {e}"
            )));
        }
        let response = self.read_response(head_only, max_body).await?;
        self.reusable = response.1 && !close_requested;
        self.reused = true;
        Ok((response.0, sent))
    }

    /// Reads until `self.read` holds at least one more byte; Ok(false) at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        Ok(self.io.read_buf(&mut self.read).await? > 0)
    }

    /// Reads one final response (skipping 1xx interim ones). Returns it and whether the
    /// connection may be kept alive.
    async fn read_response(
        &mut self,
        head_only: bool,
        max_body: usize,
    ) -> Result<(H1Response, bool), H1Error> {
        let mut wire = 0u64;
        let mut got_any = false;
        loop {
            let head = loop {
                match parse_head(&self.read)? {
                    Some(head) => break head,
                    None if self.read.len() >= MAX_HEAD_BYTES => {
                        return Err(H1Error::Protocol(format!(
                            "the response head is larger than {} KiB",
                            MAX_HEAD_BYTES / 1024
                        )))
                    }
                    None => {}
                }
                match self.fill().await {
                    Ok(true) => got_any = true,
                    Ok(false) if !got_any => {
                        return Err(H1Error::ClosedBeforeResponse(
                            "the server closed the connection without a response".into(),
                        ))
                    }
                    Ok(false) => {
                        return Err(H1Error::Io(
                            "the server closed the connection in the middle of the response head"
                                .into(),
                        ))
                    }
                    Err(e) if !got_any => {
                        return Err(H1Error::ClosedBeforeResponse(format!(
                            "reading the response failed: {e}"
                        )))
                    }
                    Err(e) => return Err(H1Error::Io(format!("reading the response failed: {e}"))),
                }
            };
            let first_byte_at = Instant::now();
            wire += head.len as u64;
            let status = StatusCode::from_u16(head.status).map_err(|_| {
                H1Error::Protocol(format!("status code {} is not valid", head.status))
            })?;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Protocol(
                        "the server switched protocols (101), which a load step cannot follow"
                            .into(),
                    ));
                }
                self.read.advance(head.len);
                continue; // 100 Continue, 103 Early Hints: the real answer follows.
            }
            let headers =
                ResponseHeaders::from_head(self.read.split_to(head.len).freeze(), head.set_cookie);
            let framing = body_framing(&head, status, head_only)?;
            let keep_alive = head.keeps_alive() && !matches!(framing, Framing::UntilClose);
            let ((body, truncated, body_wire), done_at) = match framing {
                Framing::None => ((Bytes::new(), false, 0), first_byte_at),
                // The usual case: the whole body came with the head. Keep what is asked
                // for without copying, and it was complete when the head was.
                Framing::Length(n) if self.read.len() as u64 >= n => {
                    let n = n as usize;
                    let keep = n.min(max_body);
                    let body = self.read.split_to(keep).freeze();
                    self.read.advance(n - keep);
                    ((body, keep < n, n as u64), first_byte_at)
                }
                Framing::Length(n) => (self.read_sized(n, max_body).await?, Instant::now()),
                Framing::Chunked => (self.read_chunked(max_body).await?, Instant::now()),
                Framing::UntilClose => (self.read_until_close(max_body).await?, Instant::now()),
            };
            wire += body_wire;
            return Ok((
                H1Response {
                    status,
                    version: head.version,
                    headers,
                    body,
                    truncated,
                    first_byte_at,
                    done_at,
                    wire_bytes: wire,
                },
                keep_alive,
            ));
        }
    }

    async fn read_sized(
        &mut self,
        len: u64,
        max_body: usize,
    ) -> Result<(Bytes, bool, u64), H1Error> {
        let mut sink = BodySink::new(max_body, len);
        let copied = self.copy_body(&mut sink, len).await?;
        if copied < len {
            return Err(H1Error::Io(format!(
                "the server closed the connection after {copied} of {len} body bytes"
            )));
        }
        let (body, truncated) = sink.finish();
        Ok((body, truncated, len))
    }

    async fn read_until_close(&mut self, max_body: usize) -> Result<(Bytes, bool, u64), H1Error> {
        let mut sink = BodySink::new(max_body, 0);
        let mut total = 0u64;
        loop {
            if !self.read.is_empty() {
                total += self.read.len() as u64;
                sink.push(&self.read);
                self.read.clear();
            }
            if !self.fill_body().await? {
                let (body, truncated) = sink.finish();
                return Ok((body, truncated, total));
            }
        }
    }

    async fn read_chunked(&mut self, max_body: usize) -> Result<(Bytes, bool, u64), H1Error> {
        let mut sink = BodySink::new(max_body, 0);
        let mut wire = 0u64;
        loop {
            let line = self.read_line("chunk size").await?;
            wire += line.consumed as u64;
            let size = parse_chunk_size(&line.text)?;
            if size == 0 {
                // Trailer fields until an empty line; they are read and dropped.
                loop {
                    let t = self.read_line("trailer").await?;
                    wire += t.consumed as u64;
                    if t.text.is_empty() {
                        let (body, truncated) = sink.finish();
                        return Ok((body, truncated, wire));
                    }
                }
            }
            if self.copy_body(&mut sink, size).await? < size {
                return Err(H1Error::Io(
                    "the server closed the connection in the middle of a chunk".into(),
                ));
            }
            wire += size;
            let end = self.read_line("chunk end").await?;
            wire += end.consumed as u64;
            if !end.text.is_empty() {
                return Err(H1Error::Protocol(
                    "a chunk is longer than its declared size".into(),
                ));
            }
        }
    }

    /// Moves the next `len` body bytes into `sink`, reading as needed. Returns how many
    /// it moved: fewer than `len` when the stream ended first.
    async fn copy_body(&mut self, sink: &mut BodySink, len: u64) -> Result<u64, H1Error> {
        let mut left = len;
        while left > 0 {
            if self.read.is_empty() && !self.fill_body().await? {
                break;
            }
            let take = left.min(self.read.len() as u64) as usize;
            sink.push(&self.read[..take]);
            self.read.advance(take);
            left -= take as u64;
        }
        Ok(len - left)
    }

    /// `fill` for body reads: an I/O error mid-body is an `Io` error.
    async fn fill_body(&mut self) -> Result<bool, H1Error> {
        self.fill()
            .await
            .map_err(|e| H1Error::Io(format!("reading the response body failed: {e}")))
    }

    /// Reads one CRLF- (or LF-) terminated line of chunk framing.
    async fn read_line(&mut self, what: &str) -> Result<Line, H1Error> {
        loop {
            if let Some(nl) = self.read.iter().position(|&b| b == b'\n') {
                let raw = self.read.split_to(nl + 1);
                let text = raw[..nl].strip_suffix(b"\r").unwrap_or(&raw[..nl]).to_vec();
                return Ok(Line {
                    text,
                    consumed: nl + 1,
                });
            }
            if self.read.len() > MAX_CHUNK_LINE {
                return Err(H1Error::Protocol(format!(
                    "a {what} line is longer than {MAX_CHUNK_LINE} bytes"
                )));
            }
            if !self.fill_body().await? {
                return Err(H1Error::Io(format!(
                    "the server closed the connection in the middle of a {what} line"
                )));
            }
        }
    }
}

struct Line {
    text: Vec<u8>,
    consumed: usize,
}

/// Collects a body that did not arrive in one piece, keeping at most `max` bytes.
struct BodySink {
    kept: BytesMut,
    max: usize,
    truncated: bool,
}

impl BodySink {
    fn new(max: usize, expected: u64) -> BodySink {
        BodySink {
            kept: BytesMut::with_capacity(expected.min(max as u64).min(1 << 20) as usize),
            max,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.max - self.kept.len();
        if data.len() > room {
            self.truncated = true;
        }
        let take = data.len().min(room);
        if take == 0 {
            return;
        }
        // Grow by doubling, but never past `max`: BytesMut's own growth could double
        // a nearly full buffer to twice the bound.
        if take > self.kept.capacity() - self.kept.len() {
            let want = (self.kept.capacity() * 2).max(self.kept.len() + take);
            let mut grown = BytesMut::with_capacity(want.min(self.max));
            grown.extend_from_slice(&self.kept);
            self.kept = grown;
        }
        self.kept.extend_from_slice(&data[..take]);
    }

    fn finish(self) -> (Bytes, bool) {
        (self.kept.freeze(), self.truncated)
    }
}

/// A parsed response head: its length and what the framing and keep-alive decisions
/// need, read from the headers while httparse had them in hand.
struct Head {
    len: usize,
    status: u16,
    version: Version,
    /// Content-Length: absent, one value (repeats agreeing), or unusable (with why).
    content_length: Option<Result<u64, String>>,
    /// Transfer-Encoding present, and whether its last coding is `chunked`.
    transfer_encoding: Option<bool>,
    /// Connection tokens.
    close: bool,
    keep_alive: bool,
    /// Whether any Set-Cookie came: most responses have none, and then the cookie jar
    /// need not scan the head.
    set_cookie: bool,
}

impl Head {
    fn read_fields(&mut self, fields: &[httparse::Header<'_>]) {
        for f in fields {
            let name = f.name.as_bytes();
            // Dispatch on length first: most headers are none of these four.
            match name.len() {
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    let parsed = parse_length(f.value).ok_or_else(|| {
                        format!(
                            "Content-Length '{}' is not a number",
                            String::from_utf8_lossy(f.value)
                        )
                    });
                    self.content_length = Some(match (self.content_length.take(), parsed) {
                        (None, p) => p,
                        (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                        (Some(Err(e)), _) | (_, Err(e)) => Err(e),
                        (Some(Ok(_)), Ok(_)) => {
                            Err("the response has conflicting Content-Length headers".into())
                        }
                    });
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    let last = f.value.rsplit(|&b| b == b',').next().unwrap_or(&[]);
                    self.transfer_encoding =
                        Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
                10 if name.eq_ignore_ascii_case(b"set-cookie") => self.set_cookie = true,
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in f.value.split(|&b| b == b',') {
                        let token = token.trim_ascii();
                        self.close |= token.eq_ignore_ascii_case(b"close");
                        self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether the server lets the connection carry another request.
    fn keeps_alive(&self) -> bool {
        match self.version {
            Version::HTTP_11 => !self.close,
            _ => self.keep_alive && !self.close,
        }
    }
}

/// Parses a response head at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, H1Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised slots: zeroing them would cost more than parsing a small head.
    let mut few = [const { MaybeUninit::uninit() }; FEW_HEADERS];
    match parse_with(buf, &mut few) {
        Err(httparse::Error::TooManyHeaders) => {
            let mut many = Vec::with_capacity(MAX_HEADERS);
            many.resize_with(MAX_HEADERS, MaybeUninit::uninit);
            match parse_with(buf, &mut many) {
                Err(httparse::Error::TooManyHeaders) => Err(H1Error::Protocol(format!(
                    "the response has more than {MAX_HEADERS} headers"
                ))),
                other => other.map_err(|e| not_http(buf, e)),
            }
        }
        other => other.map_err(|e| not_http(buf, e)),
    }
}

fn not_http(buf: &[u8], e: httparse::Error) -> H1Error {
    let start = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
    H1Error::Protocol(format!(
        "the server's answer is not an HTTP/1.x response ({e}); it starts with {start:?}"
    ))
}

fn parse_with<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Head>, httparse::Error> {
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, slots)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut head = Head {
        len,
        status: resp.code.unwrap_or(0),
        version,
        content_length: None,
        transfer_encoding: None,
        close: false,
        keep_alive: false,
        set_cookie: false,
    };
    head.read_fields(resp.headers);
    Ok(Some(head))
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// RFC 9112 §6.3: how the body of this response is delimited.
fn body_framing(head: &Head, status: StatusCode, head_only: bool) -> Result<Framing, H1Error> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::None);
    }
    match (head.transfer_encoding, &head.content_length) {
        (Some(true), _) => Ok(Framing::Chunked),
        (Some(false), _) | (None, None) => Ok(Framing::UntilClose),
        (None, Some(Ok(n))) => Ok(Framing::Length(*n)),
        (None, Some(Err(why))) => Err(H1Error::Protocol(why.clone())),
    }
}

/// A Content-Length value: decimal digits only (no sign, no spaces inside).
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
    let digits = digits.trim_ascii();
    let bad = || {
        H1Error::Protocol(format!(
            "chunk size '{}' is not a hexadecimal number",
            String::from_utf8_lossy(line)
        ))
    };
    if digits.is_empty() || digits.len() > 15 {
        return Err(bad());
    }
    let mut n = 0u64;
    for &b in digits {
        let d = (b as char).to_digit(16).ok_or_else(bad)?;
        n = n * 16 + u64::from(d);
    }
    Ok(n)
}

/// Encodes the request line and headers into `out` (cleared first). Returns whether the
/// request asks the server to close the connection.
fn encode_request(out: &mut Vec<u8>, req: &H1Request<'_>) -> bool {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.url.path_and_query().as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut close = false;
    if !req.headers.contains_key(HOST) {
        field(out, b"host", req.host.as_bytes());
    }
    let mut cookie_merged = false;
    for (name, value) in req.headers {
        // The framing is ours: the body we send decides its length.
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        if name == CONNECTION {
            close |= value
                .to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
                .unwrap_or(false);
        }
        if name == http::header::COOKIE {
            if let (Some(jar), false) = (req.cookies, cookie_merged) {
                cookie_merged = true;
                out.extend_from_slice(b"cookie: ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"; ");
                out.extend_from_slice(jar.as_bytes());
                out.extend_from_slice(b"\r\n");
                continue;
            }
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let (Some(jar), false) = (req.cookies, cookie_merged) {
        field(out, b"cookie", jar.as_bytes());
    }
    if let Some(ua) = req.user_agent {
        if !req.headers.contains_key(USER_AGENT) {
            field(out, b"user-agent", ua.as_bytes());
        }
    }
    let body_expected = matches!(*req.method, Method::POST | Method::PUT | Method::PATCH);
    if !req.body.is_empty() || body_expected {
        out.extend_from_slice(b"content-length: ");
        let mut digits = itoa_buf(req.body.len() as u64);
        out.extend_from_slice(digits.as_bytes_mut());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    close
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n` without going through `fmt`.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes_mut(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Digits {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Digits { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes()).unwrap().expect("complete head")
    }

    #[test]
    fn parses_a_head_and_what_framing_needs() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\nConnection: Keep-Alive, close\r\n\r\nok";
        let h = head(raw);
        assert_eq!(h.status, 200);
        assert_eq!(h.len, raw.len() - 2);
        assert!(matches!(h.content_length, Some(Ok(2))));
        assert!(h.close && h.keep_alive && !h.keeps_alive());
        let h10 = head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n");
        assert!(h10.keeps_alive());
        assert!(!head("HTTP/1.0 200 OK\r\n\r\n").keeps_alive());
    }

    #[test]
    fn a_partial_head_waits_and_garbage_is_a_protocol_error() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(matches!(
            parse_head(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(H1Error::Protocol(_))
        ));
    }

    #[test]
    fn many_headers_parse_and_too_many_is_an_error() {
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..100 {
            raw.push_str(&format!("x-{i}: {i}\r\n"));
        }
        raw.push_str("content-length: 7\r\n\r\n");
        assert!(matches!(head(&raw).content_length, Some(Ok(7))));
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..300 {
            raw.push_str(&format!("x-{i}: {i}\r\n"));
        }
        raw.push_str("\r\n");
        assert!(
            matches!(parse_head(raw.as_bytes()), Err(H1Error::Protocol(m)) if m.contains("256"))
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let frame = |fields: &str, status: u16, head_only: bool| {
            let h = head(&format!("HTTP/1.1 {status} X\r\n{fields}\r\n"));
            body_framing(&h, StatusCode::from_u16(status).unwrap(), head_only)
        };
        assert!(matches!(
            frame("content-length: 5\r\n", 200, false),
            Ok(Framing::Length(5))
        ));
        assert!(matches!(
            frame("content-length: 5\r\n", 200, true),
            Ok(Framing::None)
        ));
        assert!(matches!(frame("", 204, false), Ok(Framing::None)));
        assert!(matches!(frame("", 304, false), Ok(Framing::None)));
        assert!(matches!(
            frame(
                "transfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n",
                200,
                false
            ),
            Ok(Framing::Chunked)
        ));
        assert!(matches!(
            frame("transfer-encoding: gzip\r\n", 200, false),
            Ok(Framing::UntilClose)
        ));
        assert!(matches!(frame("", 200, false), Ok(Framing::UntilClose)));
        assert!(matches!(
            frame("content-length: x\r\n", 200, false),
            Err(H1Error::Protocol(_))
        ));
        assert!(matches!(
            frame("content-length: 5\r\ncontent-length: 6\r\n", 200, false),
            Err(H1Error::Protocol(m)) if m.contains("conflicting")
        ));
        assert!(matches!(
            frame("content-length: 5\r\ncontent-length: 5\r\n", 200, false),
            Ok(Framing::Length(5))
        ));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"FF;name=value").unwrap(), 255);
        assert_eq!(parse_chunk_size(b"0").unwrap(), 0);
        assert!(parse_chunk_size(b"").is_err());
        assert!(parse_chunk_size(b"zz").is_err());
        assert!(parse_chunk_size(b"1234567890abcdef0").is_err());
    }

    #[test]
    fn requests_are_encoded_with_host_agent_cookies_and_length() {
        let url = Url::parse("http://example.test:8080/a/b?c=d").unwrap();
        let host = HeaderValue::from_static("example.test:8080");
        let ua = HeaderValue::from_static("stampede/test");
        let jar = HeaderValue::from_static("sid=1");
        let mut headers = HeaderMap::new();
        headers.insert("x-token", HeaderValue::from_static("t"));
        headers.insert("cookie", HeaderValue::from_static("own=2"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let body = Bytes::from_static(b"hello");
        let req = H1Request {
            method: &Method::POST,
            url: &url,
            host: &host,
            user_agent: Some(&ua),
            cookies: Some(&jar),
            headers: &headers,
            body: &body,
        };
        let mut out = Vec::new();
        assert!(!encode_request(&mut out, &req));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "POST /a/b?c=d HTTP/1.1\r\nhost: example.test:8080\r\nx-token: t\r\n\
             cookie: own=2; sid=1\r\nuser-agent: stampede/test\r\ncontent-length: 5\r\n\r\n"
        );

        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close"));
        let empty = Bytes::new();
        let req = H1Request {
            method: &Method::GET,
            url: &url,
            host: &host,
            user_agent: None,
            cookies: None,
            headers: &headers,
            body: &empty,
        };
        let mut out = Vec::new();
        assert!(encode_request(&mut out, &req));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: example.test:8080\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn a_body_sink_never_holds_more_than_its_bound() {
        let mut sink = BodySink::new(1000, 0);
        for _ in 0..100 {
            sink.push(&[7u8; 333]);
            assert!(sink.kept.capacity() <= 1000, "{}", sink.kept.capacity());
        }
        let (body, truncated) = sink.finish();
        assert_eq!(body.len(), 1000);
        assert!(truncated);
        let mut nothing = BodySink::new(0, 1 << 30);
        nothing.push(&[1u8; 4096]);
        assert_eq!(nothing.kept.capacity(), 0);
    }

    #[test]
    fn digits() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            assert_eq!(itoa_buf(n).as_bytes_mut(), n.to_string().as_bytes());
        }
    }
}
