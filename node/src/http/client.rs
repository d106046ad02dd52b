//! The per-VU HTTP client: one `VuClient` per VU, living inside the VU's task on one
//! worker thread. Owns the VU's open connections (one per origin: HTTP/1.1 kept alive, or
//! an HTTP/2 connection), the request/response exchange, redirects, timeouts and byte and
//! time accounting of each request.
//!
//! Thread-per-core, like wrk: each worker thread runs its own current-thread tokio
//! runtime, and a VU and its connections never leave that thread. So the request path
//! takes no lock, sends on no channel of ours and touches no shared state; node-wide
//! things (`Shared`: DNS cache, TLS config, allowlist) are read only when a connection is
//! opened. Each connection is driven by the VU's task itself while it awaits a response
//! (HTTP/1.1 in `h1`, HTTP/2 in `http2`). This module must not record metrics (the engine does, from
//! `Response`'s timestamps) and must not retry a request that may have reached the server.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE,
    PROXY_AUTHORIZATION, TRANSFER_ENCODING, USER_AGENT,
};
use http::{Method, Request, StatusCode, Version};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_rustls::TlsConnector;

use super::allow::Allowlist;
use super::cookies::CookieJar;
use super::dns::{Addrs, Dns};
use super::error::{HttpError, HttpErrorKind};
use super::h1::{H1Conn, H1Error, H1Request, Io};
use super::headers::ResponseHeaders;
use super::http2::{H2Conn, H2Error, Pool, PoolKey};
use super::tls::client_config;
use super::url::{Scheme, Url};

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersionPref {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only: negotiated by ALPN over TLS, prior knowledge (h2c) over plain TCP.
    Http2,
    /// HTTP/2 when TLS ALPN agrees, HTTP/1.1 otherwise (plain `http://` is always 1.1).
    #[default]
    Auto,
}

/// The default bound on what is kept of one response body: a check or an extraction
/// sees at most this much (docs/plan-reference.md). One response is kept per VU at a
/// time, so this bounds a VU's memory for bodies.
pub const MAX_KEPT_BODY: usize = 1 << 20;

/// Node-wide client settings, fixed for a run.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Skip certificate verification (test environments only; spec §3).
    pub insecure_tls: bool,
    pub http_version: HttpVersionPref,
    /// Redirects followed per request; 0 returns 3xx responses as they are.
    pub max_redirects: u32,
    /// Bound on DNS + TCP connect + TLS handshake of one new connection.
    pub connect_timeout: Duration,
    pub allow: Allowlist,
    /// Static host-name overrides, like curl's `--resolve` (still subject to `allow`).
    pub resolve: HashMap<String, Vec<IpAddr>>,
    /// Name servers to ask instead of the system's (`/etc/resolv.conf`); empty = system.
    pub dns_servers: Vec<SocketAddr>,
    /// Sent when the request has no User-Agent of its own.
    pub user_agent: Option<String>,
    /// Of a body that is kept (see `OutRequest::keep_body`), at most this many bytes
    /// are; the rest is read and counted but not kept. Bounds a VU's memory whatever
    /// the target sends.
    pub max_body_bytes: usize,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            insecure_tls: false,
            http_version: HttpVersionPref::Auto,
            max_redirects: 10,
            connect_timeout: Duration::from_secs(10),
            allow: Allowlist::new(),
            resolve: HashMap::new(),
            dns_servers: Vec::new(),
            user_agent: Some(concat!("stampede/", env!("CARGO_PKG_VERSION")).to_owned()),
            max_body_bytes: MAX_KEPT_BODY,
        }
    }
}

/// What every VU of a node shares, behind an `Arc`. Only read when a connection is
/// opened, and written only when a VU meets a diagnosis it has not just noted.
pub struct Shared {
    settings: ClientSettings,
    dns: Dns,
    tls: TlsConnector,
    /// ALPN h2 only, whatever `http_version` says: gRPC speaks nothing else.
    tls_h2: TlsConnector,
    /// For upgrades from HTTP/1.1 (WebSocket): offers only `http/1.1`.
    tls_h1: TlsConnector,
    user_agent: Option<HeaderValue>,
    diagnoses: std::sync::Mutex<Vec<Diagnosis>>,
    h2_pool: Arc<Pool>,
}

/// Distinct diagnoses kept per run: a plan reaches a handful of origins.
const MAX_DIAGNOSES: usize = 16;

/// Why requests to a target could not even be sent, said once per target: the first
/// time a VU met it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub kind: HttpErrorKind,
    pub line: String,
}

impl Shared {
    /// The TLS connector that offers only ALPN h2 (gRPC).
    pub(super) fn tls_h2(&self) -> &TlsConnector {
        &self.tls_h2
    }

    pub(super) fn connect_timeout(&self) -> Duration {
        self.settings.connect_timeout
    }
}

impl Shared {
    pub fn new(settings: ClientSettings) -> Result<Arc<Shared>, HttpError> {
        let alpn: &[&[u8]] = match settings.http_version {
            HttpVersionPref::Http1 => &[b"http/1.1"],
            HttpVersionPref::Http2 => &[b"h2"],
            HttpVersionPref::Auto => &[b"h2", b"http/1.1"],
        };
        let tls = TlsConnector::from(Arc::new(client_config(settings.insecure_tls, alpn)?));
        let tls_h2 = TlsConnector::from(Arc::new(client_config(settings.insecure_tls, &[b"h2"])?));
        let tls_h1 = TlsConnector::from(Arc::new(client_config(
            settings.insecure_tls,
            &[b"http/1.1"],
        )?));
        let user_agent = match &settings.user_agent {
            None => None,
            Some(ua) => Some(HeaderValue::from_str(ua).map_err(|_| {
                HttpError::new(
                    HttpErrorKind::InvalidRequest,
                    format!("user agent '{ua}' is not a valid header value"),
                )
            })?),
        };
        Ok(Arc::new(Shared {
            dns: Dns::new(&settings.resolve, &settings.dns_servers),
            settings,
            tls,
            tls_h2,
            tls_h1,
            user_agent,
            diagnoses: std::sync::Mutex::new(Vec::new()),
            h2_pool: Arc::default(),
        }))
    }

    /// The distinct diagnoses of this run's failures to reach a target, first seen
    /// first (at most 16).
    pub fn diagnoses(&self) -> Vec<Diagnosis> {
        self.diagnoses.lock().map(|d| d.clone()).unwrap_or_default()
    }

    pub(super) fn note(&self, kind: HttpErrorKind, line: &str) {
        let Ok(mut d) = self.diagnoses.lock() else {
            return;
        };
        if d.len() < MAX_DIAGNOSES && !d.iter().any(|x| x.line == line) {
            // Said once per target in the node's log; the CLI shows them too.
            tracing::warn!(kind = kind.as_str(), "{line}");
            d.push(Diagnosis {
                kind,
                line: line.to_string(),
            });
        }
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// Resolves a host through the node's cache (IP literals and `localhost` skip DNS).
    pub async fn resolve(&self, host: &str) -> Result<Arc<[IpAddr]>, HttpError> {
        self.dns.resolve(host).await
    }
}

/// One request as the engine hands it over: everything already rendered.
#[derive(Debug, Clone)]
pub struct OutRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whole-request bound: connecting, sending, redirects and reading the body.
    pub timeout: Duration,
    /// Whether anything will read the body (a check or an extraction). When not, the
    /// body is read and counted as received but none of it is kept.
    pub keep_body: bool,
}

impl OutRequest {
    /// A request with no headers, no body and a 60 s timeout.
    pub fn new(method: Method, url: Url) -> Self {
        OutRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: Duration::from_secs(60),
            keep_body: true,
        }
    }
}

/// A complete response (body fully read; kept only as far as asked, see `body_truncated`).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: ResponseHeaders,
    pub body: Bytes,
    /// True when the body is not all here: it exceeded `max_body_bytes`, or was not
    /// kept at all (`OutRequest::keep_body` false).
    pub body_truncated: bool,
    /// The URL that produced this response (differs from the request's after redirects).
    pub url: Url,
    /// When the first hop's request was handed to the connection (after connecting).
    pub sent_at: Instant,
    /// When the final response's head arrived.
    pub first_byte_at: Instant,
    /// When the final response's body was fully read.
    pub done_at: Instant,
    /// Body plus approximate head bytes, over all hops.
    pub bytes_received: u64,
    /// Body plus approximate head bytes, over all hops.
    pub bytes_sent: u64,
    pub redirects: u32,
    /// New connections opened for this request (0 when every hop reused one).
    pub connections_opened: u32,
    /// Time spent opening them (DNS, TCP connect, TLS handshake), over all hops.
    pub connecting: Duration,
}

impl Response {
    /// Time from sending to the last body byte (service time, excluding connecting).
    pub fn duration(&self) -> Duration {
        self.done_at.saturating_duration_since(self.sent_at)
    }

    /// Time from sending to the response head (time to first byte).
    pub fn waiting(&self) -> Duration {
        self.first_byte_at.saturating_duration_since(self.sent_at)
    }
}

/// An open connection. A connection abandoned mid-request (timeout, cancelled VU) is
/// dropped with the request's future and so never reused.
enum Conn {
    /// Our own HTTP/1.1 framing, driven by the VU's task itself (see `h1`).
    H1(H1Conn),
    H2(H2Conn),
}

impl Conn {
    /// Whether a new request may be sent on it.
    fn can_send(&self) -> bool {
        match self {
            Conn::H1(c) => c.can_send(),
            Conn::H2(c) => c.can_send(),
        }
    }

    /// Whether it goes back to its origin after an exchange: the framing of HTTP/1.1's
    /// last exchange allows another, or HTTP/2's connection is still open. Cheaper than
    /// `can_send`, which is asked when the connection is next taken.
    fn is_reusable(&self) -> bool {
        match self {
            Conn::H1(c) => c.is_reusable(),
            Conn::H2(c) => c.can_send(),
        }
    }
}

/// The connection slot of one origin (scheme, host, port).
struct Origin {
    scheme: Scheme,
    port: u16,
    host: Box<str>,
    host_header: HeaderValue,
    conn: Option<Conn>,
    last_used: u64,
}

/// Origins a VU keeps connections to; a flow touches one or two, this bounds redirect
/// chains across many hosts.
const MAX_ORIGINS: usize = 8;

/// The HTTP client of one VU.
pub struct VuClient {
    conns: Conns,
    /// The diagnosis this VU noted last: a VU failing the same way again and again
    /// takes the shared lock once, not per request.
    noted: Option<Box<str>>,
    /// Bounds each request's exchange (see `send`): armed once, re-armed only when it
    /// fires before the request in flight is due, so a request costs no timer operation.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The VU's connections, one slot per origin.
struct Conns {
    shared: Arc<Shared>,
    origins: Vec<Origin>,
    clock: u64,
    /// See `VuClient::share_http2_connections`.
    h2_streams: usize,
}

/// The outcome of a redirect chain: its last hop and totals over all hops.
struct Followed {
    hop: Hop,
    sent_at: Instant,
    bytes_received: u64,
    bytes_sent: u64,
    redirects: u32,
    connections_opened: u32,
    connecting: Duration,
}

/// The outcome of one hop (one request/response on the wire).
struct Hop {
    status: StatusCode,
    version: Version,
    headers: ResponseHeaders,
    body: Bytes,
    truncated: bool,
    sent_at: Instant,
    first_byte_at: Instant,
    done_at: Instant,
    bytes_received: u64,
    bytes_sent: u64,
    opened: bool,
    connecting: Duration,
}

impl VuClient {
    pub fn new(shared: Arc<Shared>) -> Self {
        VuClient {
            conns: Conns {
                shared,
                origins: Vec::new(),
                clock: 0,
                h2_streams: 1,
            },
            noted: None,
            timer: None,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.conns.shared
    }

    /// Lets this VU share HTTP/2 connections with the other VUs of its worker thread,
    /// `streams` VUs at most per connection (`defaults.http2_streams_per_connection`);
    /// 1, the default, gives it connections of its own.
    pub fn share_http2_connections(&mut self, streams: usize) {
        self.conns.h2_streams = streams.max(1);
    }

    /// Number of origins with an open connection (for tests and diagnostics).
    pub fn open_connections(&self) -> usize {
        self.conns
            .origins
            .iter()
            .filter(|o| o.conn.as_ref().is_some_and(|c| c.can_send()))
            .count()
    }

    /// Closes every connection of this VU (end of iteration with fresh connections, or
    /// end of run).
    pub fn close_all(&mut self) {
        self.conns.origins.clear();
    }

    /// Sends `req`, following redirects, applying and updating `jar`. The whole exchange
    /// is bounded by `req.timeout`; on timeout the connection in use is dropped.
    pub async fn send(
        &mut self,
        req: OutRequest,
        jar: &mut CookieJar,
    ) -> Result<Response, HttpError> {
        let OutRequest {
            method,
            mut url,
            headers,
            body,
            timeout,
            keep_body,
        } = req;
        let started = Instant::now();
        let deadline = started + timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if timer.deadline().into_std() > deadline {
            // A shorter timeout than the one the timer was last armed for.
            timer.as_mut().reset(deadline.into());
        }
        let outcome = {
            let following = self
                .conns
                .send_following(method, &mut url, headers, body, jar, started, keep_body);
            let mut following = std::pin::pin!(following);
            // The timer may still be armed for an earlier request's deadline: when it fires
            // before this request is due, it is moved on to this request's deadline.
            // It is polled first: a target that streams a body as fast as loopback
            // carries it keeps the exchange busy until tokio's cooperative budget runs
            // out, and a timer polled after that would never see its deadline.
            std::future::poll_fn(move |cx| {
                while timer.as_mut().poll(cx).is_ready() {
                    if Instant::now() >= deadline {
                        return Poll::Ready(None);
                    }
                    timer.as_mut().reset(deadline.into());
                }
                following.as_mut().poll(cx).map(Some)
            })
            .await
        };
        let done = match outcome {
            Some(Err(e)) => {
                if let Some(line) = e.diagnosis() {
                    if self.noted.as_deref() != Some(line) {
                        self.conns.shared.note(e.kind(), line);
                        self.noted = Some(line.into());
                    }
                }
                return Err(e);
            }
            Some(Ok(done)) => done,
            None => {
                // The exchange's future (and with it the connection in use) is dropped.
                return Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    format!("{url}: no complete response within {timeout:?}"),
                ));
            }
        };
        let Followed {
            hop,
            sent_at,
            bytes_received,
            bytes_sent,
            redirects,
            connections_opened,
            connecting,
        } = done;
        Ok(Response {
            status: hop.status,
            version: hop.version,
            headers: hop.headers,
            body: hop.body,
            body_truncated: hop.truncated,
            url,
            sent_at,
            first_byte_at: hop.first_byte_at,
            done_at: hop.done_at,
            bytes_received,
            bytes_sent,
            redirects,
            connections_opened,
            connecting,
        })
    }
}

impl Conns {
    /// The redirect loop. `url` is updated in place so that a timeout can name the hop
    /// that was in flight. `started` is when the request was handed over.
    #[allow(clippy::too_many_arguments)]
    async fn send_following(
        &mut self,
        mut method: Method,
        url: &mut Url,
        mut headers: HeaderMap,
        mut body: Bytes,
        jar: &mut CookieJar,
        started: Instant,
        keep_body: bool,
    ) -> Result<Followed, HttpError> {
        let max = self.shared.settings.max_redirects;
        let mut redirects = 0u32;
        let mut bytes_received = 0u64;
        let mut bytes_sent = 0u64;
        let mut connections_opened = 0u32;
        let mut connecting = Duration::ZERO;
        let mut first_sent_at: Option<Instant> = None;
        loop {
            // Only a request that may still be redirected needs its parts kept.
            let may_follow = redirects < max;
            let (hop_method, hop_headers, hop_body) = if may_follow {
                (method.clone(), headers.clone(), body.clone())
            } else {
                (
                    std::mem::replace(&mut method, Method::GET),
                    std::mem::take(&mut headers),
                    std::mem::take(&mut body),
                )
            };
            // The first hop on a kept connection starts when the request was handed over;
            // any other takes its own time after connecting.
            let hop_start = (redirects == 0).then_some(started);
            let hop = self
                .exchange(
                    hop_method,
                    url,
                    hop_headers,
                    hop_body,
                    jar,
                    hop_start,
                    keep_body,
                )
                .await?;
            bytes_received += hop.bytes_received;
            bytes_sent += hop.bytes_sent;
            connections_opened += u32::from(hop.opened);
            connecting += hop.connecting;
            let sent_at = *first_sent_at.get_or_insert(hop.sent_at);
            if hop.headers.has_set_cookie() {
                jar.store_response_cookies(url, hop.headers.get_all("set-cookie"));
            }
            let location = match hop.status.as_u16() {
                301 | 302 | 303 | 307 | 308 if may_follow => hop.headers.get_all("location").next(),
                _ => None,
            };
            if let Some(location) = location {
                let location = std::str::from_utf8(location).map_err(|_| {
                    HttpError::new(
                        HttpErrorKind::Protocol,
                        format!("{url}: redirect Location header is not valid text"),
                    )
                })?;
                let next = url.resolve(location).map_err(|e| {
                    HttpError::new(
                        HttpErrorKind::Protocol,
                        format!(
                            "{url}: redirect to '{location}' cannot be followed: {}",
                            e.message()
                        ),
                    )
                })?;
                let status = hop.status.as_u16();
                // Browsers' behaviour: 303 always becomes GET, 301/302 turn a POST into GET.
                if (status == 303 && method != Method::HEAD)
                    || ((status == 301 || status == 302) && method == Method::POST)
                {
                    method = Method::GET;
                    body = Bytes::new();
                    headers.remove(CONTENT_TYPE);
                    headers.remove(CONTENT_LENGTH);
                    headers.remove(TRANSFER_ENCODING);
                }
                if !same_origin(url, &next) {
                    // Credentials the user meant for one origin must not leak to another;
                    // the jar adds the cookies that belong to the new origin.
                    headers.remove(AUTHORIZATION);
                    headers.remove(PROXY_AUTHORIZATION);
                    headers.remove(COOKIE);
                }
                *url = next;
                redirects += 1;
                continue;
            }
            return Ok(Followed {
                hop,
                sent_at,
                bytes_received,
                bytes_sent,
                redirects,
                connections_opened,
                connecting,
            });
        }
    }

    fn origin_index(&mut self, url: &Url) -> Result<usize, HttpError> {
        self.clock += 1;
        let scheme = url.scheme();
        // The same authority as written before is a byte comparison; only an origin
        // written differently takes the host apart (`Authority::host` parses each call).
        let written = url.authority().as_str().as_bytes();
        if let Some(i) = self.origins.iter().position(|o| {
            o.scheme == scheme
                && (o.host_header.as_bytes() == written
                    || (o.port == url.port() && o.host.eq_ignore_ascii_case(url.host())))
        }) {
            self.origins[i].last_used = self.clock;
            return Ok(i);
        }
        let (port, host) = (url.port(), url.host());
        if self.origins.len() >= MAX_ORIGINS {
            if let Some((lru, _)) = self
                .origins
                .iter()
                .enumerate()
                .min_by_key(|(_, o)| o.last_used)
            {
                self.origins.swap_remove(lru);
            }
        }
        let host_header = HeaderValue::from_str(url.authority().as_str()).map_err(|_| {
            HttpError::new(
                HttpErrorKind::InvalidRequest,
                format!("{url}: host is not a valid Host header"),
            )
        })?;
        self.origins.push(Origin {
            scheme,
            port,
            host: host.into(),
            host_header,
            conn: None,
            last_used: self.clock,
        });
        Ok(self.origins.len() - 1)
    }

    /// One request/response on one connection, reusing the origin's connection when it is
    /// still open. Retried once on a fresh connection, and only when nothing can have
    /// been processed: an HTTP/2 request was never sent, the server refused its stream or
    /// its GOAWAY names a last stream below the request's, or a reused HTTP/1.1
    /// connection turned out closed before any byte of an idempotent request's response
    /// (the server closed it while idle, a race every keep-alive client has).
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &mut self,
        method: Method,
        url: &Url,
        headers: HeaderMap,
        body: Bytes,
        jar: &CookieJar,
        hop_start: Option<Instant>,
        keep_body: bool,
    ) -> Result<Hop, HttpError> {
        let i = self.origin_index(url)?;
        let shared = &*self.shared;
        let origin = &mut self.origins[i];
        let cookies = jar.header_for(url);

        let mut opened = false;
        let mut retried = false;
        let mut connecting = Duration::ZERO;
        let mut conn = match origin.conn.take() {
            Some(c) if c.can_send() => c,
            _ => {
                let (c, new) =
                    Box::pin(open(shared, url, self.h2_streams, &mut connecting)).await?;
                opened = new;
                c
            }
        };
        let max_body = if keep_body {
            shared.settings.max_body_bytes
        } else {
            0
        };
        let hop = loop {
            let Conn::H1(h1) = &mut conn else {
                break None;
            };
            let request = H1Request {
                method: &method,
                url,
                host: &origin.host_header,
                user_agent: shared.user_agent.as_ref(),
                cookies: cookies.as_ref(),
                headers: &headers,
                body: &body,
            };
            let sent_at = match hop_start {
                Some(t) if !opened => t,
                _ => Instant::now(),
            };
            match h1.exchange(&request, max_body).await {
                Ok((r, bytes_sent)) => {
                    break Some(Hop {
                        status: r.status,
                        version: r.version,
                        headers: r.headers,
                        body: r.body,
                        truncated: r.truncated,
                        sent_at,
                        first_byte_at: r.first_byte_at,
                        done_at: r.done_at,
                        bytes_received: r.wire_bytes,
                        bytes_sent,
                        opened,
                        connecting,
                    })
                }
                Err(H1Error::ClosedBeforeResponse(_))
                    if h1.is_reused() && !opened && method.is_idempotent() =>
                {
                    let (c, new) =
                        Box::pin(open(shared, url, self.h2_streams, &mut connecting)).await?;
                    (conn, opened) = (c, new);
                }
                Err(e) => return Err(classify_h1(e, url)),
            }
        };
        let hop = match hop {
            Some(hop) => hop,
            None => {
                let mut headers = headers;
                if let Some(cookies) = cookies {
                    merge_cookie_header(&mut headers, cookies);
                }
                if let Some(ua) = &shared.user_agent {
                    if !headers.contains_key(USER_AGENT) {
                        headers.insert(USER_AGENT, ua.clone());
                    }
                }
                let bytes_sent = request_size(&method, url, &headers, body.len());
                let mut request = Request::new(());
                *request.method_mut() = method.clone();
                *request.headers_mut() = headers;
                *request.uri_mut() = url.as_uri().clone();
                loop {
                    let Conn::H2(h2) = &mut conn else {
                        unreachable!("the HTTP/1.1 loop only ends without a hop on HTTP/2")
                    };
                    // Boxed: the exchange's future is large, and inline it would be moved
                    // on every HTTP/1.1 request too.
                    let outcome =
                        Box::pin(h2.exchange(clone_head(&request), body.clone(), max_body)).await;
                    match outcome {
                        Ok(r) => {
                            break Hop {
                                status: r.status,
                                version: Version::HTTP_2,
                                headers: r.headers,
                                body: r.body,
                                truncated: r.truncated,
                                sent_at: r.sent_at,
                                first_byte_at: r.first_byte_at,
                                done_at: r.done_at,
                                bytes_received: r.bytes_received,
                                bytes_sent,
                                opened,
                                connecting,
                            }
                        }
                        // Once only: a connection that refuses again is an answer.
                        Err(H2Error::Refused(_)) if !retried && h2.can_send() => {
                            retried = true;
                            continue;
                        }
                        Err(H2Error::Unsent(_) | H2Error::Refused(_)) if !retried => {}
                        Err(e) => return Err(classify_h2(e, url)),
                    }
                    retried = true;
                    h2.retire();
                    let (c, new) =
                        Box::pin(open(shared, url, self.h2_streams, &mut connecting)).await?;
                    (conn, opened) = (c, new);
                }
            }
        };
        if conn.is_reusable() {
            origin.conn = Some(conn);
        }
        Ok(hop)
    }
}

fn classify_h1(err: H1Error, url: &Url) -> HttpError {
    let (kind, text) = match err {
        H1Error::ClosedBeforeResponse(t) | H1Error::Io(t) => (HttpErrorKind::Io, t),
        H1Error::Protocol(t) => (HttpErrorKind::Protocol, t),
    };
    HttpError::new(kind, format!("{url}: {text}"))
}

fn classify_h2(err: H2Error, url: &Url) -> HttpError {
    let (kind, text) = match err {
        H2Error::Unsent(t) | H2Error::Refused(t) | H2Error::Io(t) => (HttpErrorKind::Io, t),
        H2Error::Protocol(t) => (HttpErrorKind::Protocol, t),
    };
    HttpError::new(kind, format!("{url}: {text}"))
}

/// The head of a request again, for a second attempt (the first one's was consumed).
fn clone_head(req: &Request<()>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    r
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme() && a.port() == b.port() && a.host().eq_ignore_ascii_case(b.host())
}

fn merge_cookie_header(headers: &mut HeaderMap, jar_cookies: HeaderValue) {
    match headers.get(COOKIE) {
        Some(own) => {
            let mut joined = Vec::with_capacity(own.len() + 2 + jar_cookies.len());
            joined.extend_from_slice(own.as_bytes());
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(jar_cookies.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(COOKIE, v);
            }
        }
        None => {
            headers.insert(COOKIE, jar_cookies);
        }
    }
}

/// Approximate bytes of a request on the wire, as HTTP/1.1 would send it: request line,
/// headers, blank line, body (comparable across versions; HPACK makes HTTP/2's smaller).
fn request_size(method: &Method, url: &Url, headers: &HeaderMap, body_len: usize) -> u64 {
    let target = url
        .as_uri()
        .path_and_query()
        .map_or(1, |pq| pq.as_str().len());
    let mut n = method.as_str().len() + 1 + target + 11 + 2 + body_len;
    for (name, value) in headers {
        n += name.as_str().len() + 2 + value.len() + 2;
    }
    n as u64
}

/// A connection for a request: a new one of the VU's own, or, when the plan lets VUs share
/// HTTP/2 connections, a share of one of this worker's (opened if none has room). True
/// when a connection was opened for it.
async fn open(
    shared: &Shared,
    url: &Url,
    limit: usize,
    connecting: &mut Duration,
) -> Result<(Conn, bool), HttpError> {
    if limit <= 1 || shared.settings.http_version == HttpVersionPref::Http1 {
        return Ok((connect(shared, url, connecting).await?, true));
    }
    let share = shared.h2_pool.claim(
        PoolKey {
            thread: std::thread::current().id(),
            https: url.scheme() == Scheme::Https,
            host: url.host().to_ascii_lowercase().into(),
            port: url.port(),
        },
        limit,
    );
    let joined = share.is_open();
    // An HTTP/1.1 connection (ALPN said so) is this VU's own; it comes back as `Err(Ok)`.
    let outcome = share
        .open(async {
            match connect(shared, url, connecting).await {
                Ok(Conn::H2(c)) => Ok(c),
                Ok(other) => Err(Ok(other)),
                Err(e) => Err(Err(e)),
            }
        })
        .await;
    match outcome {
        Ok(c) => Ok((Conn::H2(c), !joined)),
        Err(Ok(own)) => Ok((own, true)),
        Err(Err(e)) => Err(e),
    }
}

/// Opens a connection, adding the time it took to `connecting`.
/// Called boxed (`Box::pin(connect(..))`): DNS, TCP, TLS and the handshakes make a large
/// future, and inlined into every request's future it would be moved on each request.
async fn connect(shared: &Shared, url: &Url, connecting: &mut Duration) -> Result<Conn, HttpError> {
    let limit = shared.settings.connect_timeout;
    let started = Instant::now();
    let outcome = tokio::time::timeout(limit, connect_inner(shared, url)).await;
    *connecting += started.elapsed();
    match outcome {
        Ok(result) => result,
        Err(_) => Err(HttpError::new(
            HttpErrorKind::Connect,
            format!(
                "{url}: no connection to {}:{} within the connect timeout of {limit:?}",
                url.host(),
                url.port()
            ),
        )
        .with_diagnosis(format!(
            "{}:{}: no connection within {limit:?} — is the host reachable?",
            url.host(),
            url.port()
        ))),
    }
}

async fn connect_inner(shared: &Shared, url: &Url) -> Result<Conn, HttpError> {
    let stream = dial(shared, url).await?;
    let pref = shared.settings.http_version;
    match url.scheme() {
        Scheme::Http => {
            if pref == HttpVersionPref::Http2 {
                handshake_h2(Io::Tcp(stream), url).await
            } else {
                Ok(Conn::H1(H1Conn::new(Io::Tcp(stream))))
            }
        }
        Scheme::Https => {
            let tls = tls_connect(&shared.tls, stream, url).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                handshake_h2(Io::Tls(Box::new(tls)), url).await
            } else if pref == HttpVersionPref::Http2 {
                Err(HttpError::new(
                    HttpErrorKind::Tls,
                    format!(
                        "{url}: {}:{} did not agree to HTTP/2 (ALPN)",
                        url.host(),
                        url.port()
                    ),
                ))
            } else {
                Ok(Conn::H1(H1Conn::new(Io::Tls(Box::new(tls)))))
            }
        }
    }
}

pub(super) async fn tls_connect(
    connector: &TlsConnector,
    stream: TcpStream,
    url: &Url,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
    let (host, port) = (url.host(), url.port());
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
        HttpError::new(
            HttpErrorKind::Tls,
            format!("{url}: '{host}' is not a valid TLS server name"),
        )
    })?;
    connector.connect(name, stream).await.map_err(|e| {
        HttpError::new(
            HttpErrorKind::Tls,
            format!("{url}: TLS handshake with {host}:{port} failed: {e}"),
        )
        .with_diagnosis(format!(
            "{host}:{port}: TLS handshake failed ({e}) — does it speak TLS here, \
             with a certificate this machine trusts?"
        ))
    })
}

/// A TCP connection to the URL's host, to the first of its addresses that the node's
/// allowlist allows and that answers.
pub(super) async fn dial(shared: &Shared, url: &Url) -> Result<TcpStream, HttpError> {
    let host = url.host();
    let port = url.port();
    let addrs: Addrs = shared.dns.resolve(host).await.map_err(|e| {
        let line = format!("{host}: the name does not resolve — is it spelled right?");
        e.with_diagnosis(line)
    })?;
    let mut refused: Option<HttpError> = None;
    let mut failed: Option<(IpAddr, std::io::Error)> = None;
    let mut stream = None;
    for &ip in addrs.iter() {
        // The allowlist is checked for each address before anything is sent to it.
        if let Err(e) = shared.settings.allow.check(host, ip) {
            refused.get_or_insert(e);
            continue;
        }
        match TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => failed = Some((ip, e)),
        }
    }
    let stream = match (stream, failed, refused) {
        (Some(s), _, _) => s,
        (None, Some((ip, e)), _) => {
            let why = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                _ => e.to_string(),
            };
            return Err(HttpError::new(
                HttpErrorKind::Connect,
                if host.parse::<IpAddr>().is_ok() {
                    format!("{url}: cannot connect to {host}:{port}: {e}")
                } else {
                    format!("{url}: cannot connect to {host}:{port} ({ip}): {e}")
                },
            )
            .with_diagnosis(format!("{host}:{port}: {why} — is the service up?")));
        }
        (None, None, Some(refusal)) => {
            let line = refusal.message().to_string();
            return Err(refusal.with_diagnosis(line));
        }
        (None, None, None) => {
            return Err(HttpError::new(
                HttpErrorKind::Dns,
                format!("{url}: '{host}' resolved to no address"),
            ))
        }
    };
    // Requests are small and latency is the measurement: never wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A byte stream to `url` for a protocol that upgrades from HTTP/1.1 (WebSocket): TCP,
/// and TLS offering only `http/1.1` for `https`, within the connect timeout.
pub(super) async fn open_h1_io(shared: &Shared, url: &Url) -> Result<Io, HttpError> {
    let limit = shared.settings.connect_timeout;
    let open = async {
        let stream = dial(shared, url).await?;
        Ok(match url.scheme() {
            Scheme::Http => Io::Tcp(stream),
            Scheme::Https => Io::Tls(Box::new(tls_connect(&shared.tls_h1, stream, url).await?)),
        })
    };
    match tokio::time::timeout(limit, open).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::new(
            HttpErrorKind::Connect,
            format!("{url}: no connection within the connect timeout of {limit:?}"),
        )),
    }
}

async fn handshake_h2(io: Io, url: &Url) -> Result<Conn, HttpError> {
    let conn = H2Conn::handshake(io)
        .await
        .map_err(|e| classify_h2(e, url))?;
    Ok(Conn::H2(conn))
}
