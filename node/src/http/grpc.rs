//! gRPC calls of a VU: HTTP/2 (h2c by prior knowledge, or TLS with ALPN h2) through
//! hyper, gRPC's framing (a 1-byte compressed flag and a 4-byte big-endian length before
//! each protobuf message), `grpc-timeout`, and the status in the trailers (`grpc-status`,
//! `grpc-message`) — or in the headers of a trailers-only answer.
//!
//! Messages are dynamic (prost-reflect): the request arrives as the JSON the step
//! rendered (a client-streaming or bidirectional call: an array of messages, all sent in
//! order before the answer is read) and is encoded against the method's input type; each
//! response message is decoded against the output type and handed back as JSON (a unary
//! or client-streaming call: the message; a server-streaming or bidirectional call: an
//! array of them), so that the step's checks and extracts read it like any JSON body. Every message's size is bounded before it is buffered,
//! and the whole call by its deadline. Like `client`, this module measures but records
//! nothing and never connects to a host the node's allowlist refuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, TE, USER_AGENT};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions};

use super::client::{dial, tls_connect, OutRequest, Response, Shared};
use super::error::{root_cause_text, HttpError, HttpErrorKind};
use super::headers::ResponseHeaders;
use super::url::{Scheme, Url};

/// Largest message sent or received, gRPC's usual default: a hostile server cannot make
/// a VU buffer more than this at once.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Messages of a server-streaming call kept for checks and extracts; later ones are
/// decoded, counted and dropped.
pub const MAX_KEPT_MESSAGES: usize = 1000;
/// Origins a VU keeps gRPC connections to.
const MAX_ORIGINS: usize = 8;

/// `grpc-status` of an answer with none that could be read.
const INTERNAL: u32 = 13;

/// The method a gRPC step calls, resolved from the plan's .proto files.
#[derive(Debug, Clone)]
pub struct GrpcMethod {
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub server_streaming: bool,
    /// The request is a stream: the step's JSON is an array of messages, all sent in
    /// order before the answer is read (half-duplex).
    pub client_streaming: bool,
}

impl GrpcMethod {
    pub fn new(m: &MethodDescriptor) -> Self {
        GrpcMethod {
            input: m.input(),
            output: m.output(),
            server_streaming: m.is_server_streaming(),
            client_streaming: m.is_client_streaming(),
        }
    }
}

/// A finished call: the response as checks see it (body: the message(s) as JSON, headers:
/// the response headers and trailers together) and its gRPC status.
#[derive(Debug)]
pub struct GrpcReply {
    pub response: Response,
    pub status: u32,
    pub message: String,
    /// Response messages received (a server-streaming call may send any number).
    pub messages: u64,
}

/// The gRPC connections of one VU, one per origin.
pub struct GrpcClient {
    shared: Arc<Shared>,
    conns: Vec<(Scheme, Box<str>, u16, GrpcConn)>,
}

impl GrpcClient {
    pub fn new(shared: Arc<Shared>) -> Self {
        GrpcClient {
            shared,
            conns: Vec::new(),
        }
    }

    /// Makes the call `req` describes (POST to `URL/package.Service/Method`, metadata
    /// in its headers, the request message as JSON in its body), bounded as a whole by
    /// `req.timeout`, which is also sent as the call's deadline.
    pub async fn call(
        &mut self,
        method: &GrpcMethod,
        req: OutRequest,
    ) -> Result<GrpcReply, HttpError> {
        let url = req.url.clone();
        let timeout = req.timeout;
        match tokio::time::timeout(timeout, self.call_inner(method, req)).await {
            Ok(r) => r,
            Err(_) => {
                // The connection may be in any state: a fresh one next time.
                self.drop_conn(&url);
                Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    format!("{url}: no complete gRPC answer within {timeout:?}"),
                ))
            }
        }
    }

    fn drop_conn(&mut self, url: &Url) {
        self.conns
            .retain(|(s, h, p, _)| !(*s == url.scheme() && **h == *url.host() && *p == url.port()));
    }

    async fn call_inner(
        &mut self,
        method: &GrpcMethod,
        req: OutRequest,
    ) -> Result<GrpcReply, HttpError> {
        let OutRequest {
            url,
            headers: metadata,
            body,
            timeout,
            ..
        } = req;
        let frame = if method.client_streaming {
            encode_stream(&method.input, &body)
        } else {
            encode_request(&method.input, &body)
        }
        .map_err(|e| HttpError::new(HttpErrorKind::InvalidRequest, format!("{url}: {e}")))?;

        let mut opened = 0;
        let mut connecting = Duration::ZERO;
        let i = match self.conns.iter().position(|(s, h, p, c)| {
            *s == url.scheme() && **h == *url.host() && *p == url.port() && !c.sender.is_closed()
        }) {
            Some(i) => i,
            None => {
                self.drop_conn(&url);
                if self.conns.len() >= MAX_ORIGINS {
                    self.conns.remove(0);
                }
                let conn = Box::pin(connect_h2(&self.shared, &url, &mut connecting)).await?;
                opened = 1;
                self.conns
                    .push((url.scheme(), url.host().into(), url.port(), conn));
                self.conns.len() - 1
            }
        };
        let conn = &mut self.conns[i].3;

        let frame_len = frame.len() as u64;
        let mut request = Request::new(Full::new(frame));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = url.as_uri().clone();
        let h = request.headers_mut();
        *h = metadata;
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(
            HeaderName::from_static("grpc-timeout"),
            grpc_timeout(timeout),
        );
        if let Some(ua) = &self.shared.settings().user_agent {
            if let Ok(v) = HeaderValue::from_str(ua) {
                h.entry(USER_AGENT).or_insert(v);
            }
        }
        let bytes_sent = wire_size(request.headers(), url.path().len()) + frame_len;

        if let Err(e) = conn.sender.ready().await {
            return Err(hyper_error(&e, &url));
        }
        let sent_at = Instant::now();
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| hyper_error(&e, &url))?;
        let first_byte_at = Instant::now();
        let (parts, mut incoming) = response.into_parts();
        let mut headers = parts.headers;
        let mut bytes_received = 19 + header_bytes(&headers);

        // An answer that is not gRPC (a proxy's or a plain HTTP server's error page) is
        // received and counted but not parsed: its HTTP status says what happened.
        let is_grpc = parts.status == StatusCode::OK
            && headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let mut reader = FrameReader::default();
        let mut kept: Vec<serde_json::Value> = Vec::new();
        let mut messages = 0u64;
        let mut trailers: Option<HeaderMap> = None;
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| hyper_error(&e, &url))?;
            let frame = match frame.into_data() {
                Ok(data) => {
                    bytes_received += data.len() as u64;
                    if !is_grpc {
                        continue;
                    }
                    reader.push(&data);
                    while let Some(msg) = reader.next().map_err(|e| protocol(&url, e))? {
                        messages += 1;
                        let decoded =
                            DynamicMessage::decode(method.output.clone(), msg).map_err(|e| {
                                protocol(
                                    &url,
                                    format!(
                                        "response message is not a {}: {e}",
                                        method.output.full_name()
                                    ),
                                )
                            })?;
                        if kept.len() < MAX_KEPT_MESSAGES {
                            kept.push(to_json(&decoded));
                        }
                    }
                    continue;
                }
                Err(f) => f,
            };
            if let Ok(t) = frame.into_trailers() {
                bytes_received += header_bytes(&t);
                trailers = Some(t);
            }
        }
        let done_at = Instant::now();
        if reader.buffered() > 0 {
            return Err(protocol(
                &url,
                format!(
                    "the stream ended inside a message ({} bytes of it received)",
                    reader.buffered()
                ),
            ));
        }
        if let Some(t) = trailers {
            headers.extend(t);
        }
        let (status, message) = if is_grpc {
            status_of(parts.status, &headers)
        } else {
            status_of(parts.status, &HeaderMap::new())
        };
        if !method.server_streaming && status == 0 && messages != 1 {
            return Err(protocol(
                &url,
                format!("a unary call answered OK with {messages} messages"),
            ));
        }
        let json = if method.server_streaming {
            serde_json::Value::Array(kept)
        } else {
            kept.pop().unwrap_or(serde_json::Value::Null)
        };
        let body = Bytes::from(serde_json::to_vec(&json).unwrap_or_default());
        Ok(GrpcReply {
            response: Response {
                status: parts.status,
                version: Version::HTTP_2,
                headers: ResponseHeaders::from_map(headers),
                body,
                body_truncated: messages > MAX_KEPT_MESSAGES as u64,
                url,
                sent_at,
                first_byte_at,
                done_at,
                bytes_received,
                bytes_sent,
                redirects: 0,
                connections_opened: opened,
                connecting,
            },
            status,
            message,
            messages,
        })
    }
}

/// An HTTP/2 connection whatever the node's `http_version` (gRPC): prior knowledge over
/// plain TCP, ALPN h2 over TLS; bounded by the connect timeout like every connection.
pub(super) async fn connect_h2(
    shared: &Shared,
    url: &Url,
    connecting: &mut Duration,
) -> Result<GrpcConn, HttpError> {
    let limit = shared.connect_timeout();
    let started = Instant::now();
    let outcome = tokio::time::timeout(limit, async {
        let stream = dial(shared, url).await?;
        match url.scheme() {
            Scheme::Http => handshake(stream, url).await,
            Scheme::Https => {
                let tls = tls_connect(shared.tls_h2(), stream, url).await?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(HttpError::new(
                        HttpErrorKind::Tls,
                        format!("{url}: the server did not agree to HTTP/2 (ALPN)"),
                    ));
                }
                handshake(tls, url).await
            }
        }
    })
    .await;
    *connecting += started.elapsed();
    match outcome {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HttpError::new(
            HttpErrorKind::Connect,
            format!("{url}: no HTTP/2 connection within the connect timeout of {limit:?}"),
        )),
    }
}

type Body = Full<Bytes>;

/// A gRPC connection: hyper's HTTP/2 sender and the task driving the connection
/// (gRPC needs trailers and streamed bodies, which hyper's client gives; the request
/// path of plain HTTP/2 steps has its own lean driver in `http2`). Dropping it aborts
/// the task, which closes the socket.
pub(super) struct GrpcConn {
    pub(super) sender: hyper::client::conn::http2::SendRequest<Body>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn handshake<T>(io: T, url: &Url) -> Result<GrpcConn, HttpError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Body>(hyper_util::rt::TokioIo::new(io))
            .await
            .map_err(|e| hyper_error(&e, url))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(GrpcConn { sender, driver })
}

/// The request message, from the step's rendered JSON, framed for the wire.
fn encode_request(desc: &MessageDescriptor, json: &[u8]) -> Result<Bytes, String> {
    let json: &[u8] = if json.is_empty() { b"{}" } else { json };
    let mut de = serde_json::Deserializer::from_slice(json);
    let msg = DynamicMessage::deserialize(desc.clone(), &mut de)
        .and_then(|m| de.end().map(|_| m))
        .map_err(|e| format!("the message does not fit {}: {e}", desc.full_name()))?;
    let mut out = BytesMut::new();
    frame_into(&mut out, &msg, "the request message")?;
    Ok(out.freeze())
}

/// The request messages of a client-streaming call, from the step's rendered JSON array,
/// framed one after the other; together at most [`MAX_MESSAGE_BYTES`].
fn encode_stream(desc: &MessageDescriptor, json: &[u8]) -> Result<Bytes, String> {
    let list: Vec<serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| format!("the messages are not a JSON array: {e}"))?;
    let mut out = BytesMut::new();
    for (i, one) in list.into_iter().enumerate() {
        let msg = DynamicMessage::deserialize(desc.clone(), one)
            .map_err(|e| format!("messages[{i}] does not fit {}: {e}", desc.full_name()))?;
        frame_into(&mut out, &msg, &format!("messages[{i}]"))?;
        if out.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "the request messages take more than {MAX_MESSAGE_BYTES} bytes"
            ));
        }
    }
    Ok(out.freeze())
}

/// Appends `msg` with gRPC's 5-byte prefix (uncompressed, length).
fn frame_into(out: &mut BytesMut, msg: &DynamicMessage, what: &str) -> Result<(), String> {
    let len = msg.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(format!("{what} is {len} bytes, limit {MAX_MESSAGE_BYTES}"));
    }
    out.reserve(5 + len);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out).map_err(|e| e.to_string())
}

/// A decoded message as JSON: field names as the .proto writes them, fields at their
/// default value included, 64-bit integers as numbers — what a check compares against.
pub fn to_json(msg: &DynamicMessage) -> serde_json::Value {
    let options = SerializeOptions::new()
        .skip_default_fields(false)
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false);
    msg.serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap_or(serde_json::Value::Null)
}

/// gRPC messages out of the DATA frames of one response, as they arrive.
#[derive(Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received of a message not yet complete.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if there is one. The length is checked before the
    /// message is waited for, so at most one bounded message is ever buffered.
    pub fn next(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let compressed = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if compressed > 1 {
            return Err(format!("bad message flag {compressed}"));
        }
        if compressed == 1 {
            return Err("a compressed message, though none was accepted".into());
        }
        if len > MAX_MESSAGE_BYTES {
            return Err(format!(
                "a response message of {len} bytes, limit {MAX_MESSAGE_BYTES}"
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

/// The call's status: `grpc-status` from the trailers (or a trailers-only answer's
/// headers); without one, the HTTP status mapped as gRPC's HTTP mapping says.
fn status_of(http: StatusCode, headers: &HeaderMap) -> (u32, String) {
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some(s) => match s.trim().parse::<u32>() {
            Ok(code) if code <= 16 => (code, message),
            _ => (INTERNAL, format!("unreadable grpc-status \"{s}\"")),
        },
        None => {
            let code = match http.as_u16() {
                200 => 2,
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                429 | 502 | 503 | 504 => 14,
                _ => 2,
            };
            (code, format!("no grpc-status (HTTP {})", http.as_u16()))
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `grpc-timeout`: at most 8 digits, in the coarsest unit that keeps the value exact
/// enough (milliseconds up to ~27 hours, seconds beyond).
fn grpc_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis().max(1);
    let text = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("1m"))
}

fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>() as u64
}

fn wire_size(h: &HeaderMap, path_len: usize) -> u64 {
    (4 + 1 + path_len + 11) as u64 + header_bytes(h)
}

fn protocol(url: &Url, what: impl std::fmt::Display) -> HttpError {
    HttpError::new(HttpErrorKind::Protocol, format!("{url}: gRPC: {what}"))
}

fn hyper_error(e: &hyper::Error, url: &Url) -> HttpError {
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_parse() || e.is_user() {
        HttpErrorKind::Protocol
    } else {
        HttpErrorKind::Io
    };
    HttpError::new(kind, format!("{url}: {}", root_cause_text(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_at_their_length_and_bounded() {
        let mut r = FrameReader::default();
        r.push(&[0, 0, 0, 0, 3, 1, 2]);
        assert_eq!(r.next().unwrap(), None);
        r.push(&[3, 0, 0, 0, 0, 0]);
        assert_eq!(r.next().unwrap().as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(r.next().unwrap().as_deref(), Some(&[][..]));
        assert_eq!(r.buffered(), 0);
        let mut r = FrameReader::default();
        r.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(r.next().unwrap_err().contains("limit"));
        let mut r = FrameReader::default();
        r.push(&[1, 0, 0, 0, 1, 9]);
        assert!(r.next().unwrap_err().contains("compressed"));
    }

    #[test]
    fn status_comes_from_trailers_or_http() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("5"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("no%20such%20product"),
        );
        assert_eq!(status_of(StatusCode::OK, &h), (5, "no such product".into()));
        assert_eq!(status_of(StatusCode::NOT_FOUND, &HeaderMap::new()).0, 12);
        assert_eq!(status_of(StatusCode::OK, &HeaderMap::new()).0, 2);
        h.insert("grpc-status", HeaderValue::from_static("99"));
        assert_eq!(status_of(StatusCode::OK, &h).0, INTERNAL);
    }

    #[test]
    fn timeouts_fit_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
    }
}
