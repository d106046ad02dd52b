//! WebSocket client of the load engine: one socket of a VU, opened through the node's
//! DNS cache, allowlist and TLS config like every HTTP connection (`ws://` and `wss://`),
//! then sending, receiving, pinging and closing with a timeout on every wait.
//!
//! Framing and the upgrade handshake are tokio-tungstenite's; this module bounds what a
//! target can make it hold (a frame, a message, messages kept while waiting for a pong)
//! and turns every failure into one [`WsError`] with the error class the reports count.
//! It measures (timestamps) but records nothing: the VU records.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use stampede_protocol::snapshot::ErrorClass;
use tokio_tungstenite::tungstenite::client::ClientRequestBuilder;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as TError, Message};
use tokio_tungstenite::WebSocketStream;

use super::client::{open_h1_io, Shared};
use super::h1::Io;
use super::{HttpError, Url};

/// The largest message a target may send (and a plan may send): 16 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;
/// The largest frame a target may send: 4 MiB (a message may span frames).
pub const MAX_FRAME: usize = 4 << 20;
/// Messages kept for later `receive` steps while a ping waits for its pong.
pub const MAX_HELD: usize = 64;

/// Why a WebSocket action failed: the class the reports count, and one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsError {
    pub class: ErrorClass,
    pub message: String,
}

impl WsError {
    fn new(class: ErrorClass, message: impl Into<String>) -> WsError {
        WsError {
            class,
            message: message.into(),
        }
    }

    /// The socket is gone (closed by the server, reset, cut mid-message).
    pub fn is_lost(&self) -> bool {
        self.class == ErrorClass::Connect
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.class.name())
    }
}

fn from_http(e: HttpError) -> WsError {
    WsError::new(e.kind().class(), e.message())
}

/// A tungstenite error as a WebSocket failure of `what` (e.g. "receive").
fn from_ws(what: &str, url: &str, e: TError) -> WsError {
    match e {
        TError::ConnectionClosed | TError::AlreadyClosed => WsError::new(
            ErrorClass::Connect,
            format!("{url}: {what}: the WebSocket is closed"),
        ),
        TError::Io(io) => WsError::new(
            ErrorClass::Connect,
            format!("{url}: {what}: the connection was lost: {io}"),
        ),
        TError::Protocol(p) => {
            // A server that hangs up inside a frame or message: the socket is lost.
            let lost = matches!(
                p,
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
            );
            WsError::new(
                if lost {
                    ErrorClass::Connect
                } else {
                    ErrorClass::Other
                },
                format!("{url}: {what}: {p}"),
            )
        }
        TError::Capacity(c) => WsError::new(
            ErrorClass::Other,
            format!("{url}: {what}: the server sent too much: {c}"),
        ),
        TError::Http(resp) => {
            let status = resp.status().as_u16();
            WsError::new(
                match status {
                    400..=499 => ErrorClass::Http4xx,
                    500..=599 => ErrorClass::Http5xx,
                    _ => ErrorClass::Other,
                },
                format!(
                    "{url}: {what}: the server answered {status} instead of upgrading to WebSocket"
                ),
            )
        }
        other => WsError::new(ErrorClass::Other, format!("{url}: {what}: {other}")),
    }
}

/// A received data message.
#[derive(Debug, Clone)]
pub struct Received {
    pub binary: bool,
    pub data: bytes::Bytes,
    pub at: Instant,
}

/// One open WebSocket of a VU.
pub struct WsConn {
    stream: WebSocketStream<Io>,
    url: String,
    pub opened_at: Instant,
    /// When the VU last sent a data message on it (the start of a round trip).
    pub last_sent: Option<Instant>,
    /// Data messages that arrived while a ping waited for its pong.
    held: VecDeque<Received>,
}

/// What an open measured.
pub struct Opened {
    pub conn: WsConn,
    /// TCP, TLS and the upgrade handshake.
    pub connecting: Duration,
    /// The subprotocol the server chose, if any.
    pub subprotocol: Option<String>,
}

/// Opens a WebSocket. `url` is `ws://` or `wss://`; headers and subprotocols go on the
/// upgrade request. Every step (connect, TLS, handshake) is inside `timeout`.
pub async fn open(
    shared: &Shared,
    url: &str,
    headers: &[(String, String)],
    subprotocols: &[String],
    timeout: Duration,
) -> Result<Opened, WsError> {
    let started = Instant::now();
    let http_url = if let Some(rest) = url.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = url.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        return Err(WsError::new(
            ErrorClass::Other,
            format!("\"{url}\" is not a ws:// or wss:// URL"),
        ));
    };
    let target = Url::parse(&http_url).map_err(from_http)?;
    let uri: http::Uri = url.parse().map_err(|e| {
        WsError::new(
            ErrorClass::Other,
            format!("\"{url}\" is not a valid URL: {e}"),
        )
    })?;
    let mut request = ClientRequestBuilder::new(uri);
    for (k, v) in headers {
        request = request.with_header(k.clone(), v.clone());
    }
    for p in subprotocols {
        request = request.with_sub_protocol(p.clone());
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_FRAME));
    let handshake = async {
        let io = match open_h1_io(shared, &target).await {
            Ok(io) => io,
            Err(e) => {
                if let Some(line) = e.diagnosis() {
                    shared.note(e.kind(), line);
                }
                return Err(from_http(e));
            }
        };
        tokio_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map_err(|e| from_ws("open", url, e))
    };
    let (stream, resp) = match tokio::time::timeout(timeout, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(WsError::new(
                ErrorClass::Timeout,
                format!("{url}: open: no WebSocket within {timeout:?}"),
            ))
        }
    };
    let subprotocol = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !subprotocols.is_empty() && subprotocol.is_none() {
        return Err(WsError::new(
            ErrorClass::CheckFailed,
            format!("{url}: open: the server agreed to none of the subprotocols {subprotocols:?}"),
        ));
    }
    let now = Instant::now();
    Ok(Opened {
        conn: WsConn {
            stream,
            url: url.to_string(),
            opened_at: now,
            last_sent: None,
            held: VecDeque::new(),
        },
        connecting: now.saturating_duration_since(started),
        subprotocol,
    })
}

impl WsConn {
    /// Sends one data message (text or binary) and flushes it.
    pub async fn send(
        &mut self,
        data: Vec<u8>,
        binary: bool,
        timeout: Duration,
    ) -> Result<(), WsError> {
        if data.len() > MAX_MESSAGE {
            return Err(WsError::new(
                ErrorClass::Other,
                format!(
                    "{}: send: the message is {} bytes, more than the limit of {MAX_MESSAGE}",
                    self.url,
                    data.len()
                ),
            ));
        }
        let msg = if binary {
            Message::Binary(data.into())
        } else {
            match String::from_utf8(data) {
                Ok(s) => Message::Text(s.into()),
                Err(_) => {
                    return Err(WsError::new(
                        ErrorClass::Other,
                        format!("{}: send: a text message must be UTF-8", self.url),
                    ))
                }
            }
        };
        let deadline = tokio::time::Instant::now() + timeout;
        self.write("send", msg, deadline, timeout).await?;
        self.last_sent = Some(Instant::now());
        Ok(())
    }

    /// Writes and flushes one frame by `deadline` (`timeout` names it in the error).
    async fn write(
        &mut self,
        what: &str,
        msg: Message,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), WsError> {
        match tokio::time::timeout_at(deadline, self.stream.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(from_ws(what, &self.url, e)),
            Err(_) => Err(WsError::new(
                ErrorClass::Timeout,
                format!("{}: {what}: not written within {timeout:?}", self.url),
            )),
        }
    }

    /// The next data message, waiting at most until `deadline`. Pings are answered
    /// (by tungstenite) and pongs skipped; a close from the server is an error.
    pub async fn next(&mut self, deadline: tokio::time::Instant) -> Result<Received, WsError> {
        if let Some(m) = self.held.pop_front() {
            return Ok(m);
        }
        loop {
            match self.read_frame(deadline).await? {
                Frame::Data(r) => return Ok(r),
                Frame::Pong => continue,
            }
        }
    }

    async fn read_frame(&mut self, deadline: tokio::time::Instant) -> Result<Frame, WsError> {
        let item = match tokio::time::timeout_at(deadline, self.stream.next()).await {
            Ok(item) => item,
            Err(_) => {
                return Err(WsError::new(
                    ErrorClass::Timeout,
                    format!("{}: receive: no message in time", self.url),
                ))
            }
        };
        let at = Instant::now();
        match item {
            None => Err(WsError::new(
                ErrorClass::Connect,
                format!("{}: receive: the WebSocket is closed", self.url),
            )),
            Some(Err(e)) => Err(from_ws("receive", &self.url, e)),
            Some(Ok(Message::Text(t))) => Ok(Frame::Data(Received {
                binary: false,
                data: bytes::Bytes::from(t),
                at,
            })),
            Some(Ok(Message::Binary(b))) => Ok(Frame::Data(Received {
                binary: true,
                data: b,
                at,
            })),
            Some(Ok(Message::Pong(_))) => Ok(Frame::Pong),
            // Answered by tungstenite on the next read or write.
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Frame(_))) => Ok(Frame::Pong),
            Some(Ok(Message::Close(frame))) => Err(WsError::new(
                ErrorClass::Connect,
                format!(
                    "{}: receive: the server closed the WebSocket{}",
                    self.url,
                    frame
                        .map(|f| format!(
                            " (code {}{}{})",
                            u16::from(f.code),
                            if f.reason.is_empty() { "" } else { ": " },
                            f.reason
                        ))
                        .unwrap_or_default()
                ),
            )),
        }
    }

    /// Sends a ping and waits for its pong; returns the round trip and how many data
    /// messages arrived meanwhile (kept for later receives, at most [`MAX_HELD`]).
    pub async fn ping(&mut self, timeout: Duration) -> Result<(Duration, u64), WsError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let ping = Message::Ping(bytes::Bytes::from_static(b"stampede"));
        self.write("ping", ping, deadline, timeout).await?;
        let mut arrived = 0;
        loop {
            match self.read_frame(deadline).await {
                Ok(Frame::Pong) => return Ok((started.elapsed(), arrived)),
                Ok(Frame::Data(r)) => {
                    arrived += 1;
                    if self.held.len() >= MAX_HELD {
                        return Err(WsError::new(
                            ErrorClass::Other,
                            format!(
                                "{}: ping: more than {MAX_HELD} messages arrived before the pong",
                                self.url
                            ),
                        ));
                    }
                    self.held.push_back(r);
                }
                Err(mut e) => {
                    e.message = e.message.replace(": receive:", ": ping:");
                    if e.class == ErrorClass::Timeout {
                        e.message = format!("{}: ping: no pong within {timeout:?}", self.url);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Closes with `code` and `reason` and waits (at most `timeout`) for the server's
    /// close; data messages still arriving are counted and dropped.
    pub async fn close(
        mut self,
        code: u16,
        reason: &str,
        timeout: Duration,
    ) -> Result<u64, WsError> {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_string().into(),
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut dropped = self.held.len() as u64;
        // Sending a close frame starts the closing handshake (what `stream.close` does).
        self.write("close", Message::Close(Some(frame)), deadline, timeout)
            .await?;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => {
                    return Err(WsError::new(
                        ErrorClass::Timeout,
                        format!(
                            "{}: close: the server did not close within {timeout:?}",
                            self.url
                        ),
                    ))
                }
                Ok(None) | Ok(Some(Ok(Message::Close(_)))) => return Ok(dropped),
                Ok(Some(Ok(Message::Text(_)))) | Ok(Some(Ok(Message::Binary(_)))) => dropped += 1,
                Ok(Some(Ok(_))) => {}
                // The server hung up after our close without its own: closed all the same.
                Ok(Some(Err(TError::ConnectionClosed)))
                | Ok(Some(Err(TError::AlreadyClosed)))
                | Ok(Some(Err(TError::Protocol(_))))
                | Ok(Some(Err(TError::Io(_)))) => return Ok(dropped),
                Ok(Some(Err(e))) => return Err(from_ws("close", &self.url, e)),
            }
        }
    }
}

enum Frame {
    Data(Received),
    /// A pong, or a control frame that is not data.
    Pong,
}
