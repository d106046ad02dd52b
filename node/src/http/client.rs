//! The per-VU HTTP client: one `VuClient` per VU, living inside the VU's task on one
//! worker thread. Owns the VU's open connections (one per origin: HTTP/1.1 kept alive, or
//! an HTTP/2 connection), the request/response exchange, redirects, timeouts and byte and
//! time accounting of each request.
//!
//! Thread-per-core, like wrk: each worker thread runs its own current-thread tokio
//! runtime, and a VU and its connections never leave that thread. So the request path
//! takes no lock, sends on no channel of ours and touches no shared state; node-wide
//! things (`Shared`: DNS cache, TLS config, allowlist) are read only when a connection is
//! opened. The task driving each connection is spawned on the current runtime, which is
//! the VU's worker. This module must not record metrics (the engine does, from
//! `Response`'s timestamps) and must not retry a request that may have reached the server.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, LOCATION,
    PROXY_AUTHORIZATION, SET_COOKIE, TRANSFER_ENCODING, USER_AGENT,
};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::allow::Allowlist;
use super::cookies::CookieJar;
use super::dns::{Addrs, Dns};
use super::error::{root_cause_text, HttpError, HttpErrorKind};
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
    /// Response bodies beyond this many bytes are read and counted but not kept.
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
            max_body_bytes: 64 << 20,
        }
    }
}

/// What every VU of a node shares, behind an `Arc`. Only read when a connection is opened.
pub struct Shared {
    settings: ClientSettings,
    dns: Dns,
    tls: TlsConnector,
    user_agent: Option<HeaderValue>,
}

impl Shared {
    pub fn new(settings: ClientSettings) -> Result<Arc<Shared>, HttpError> {
        let alpn: &[&[u8]] = match settings.http_version {
            HttpVersionPref::Http1 => &[b"http/1.1"],
            HttpVersionPref::Http2 => &[b"h2"],
            HttpVersionPref::Auto => &[b"h2", b"http/1.1"],
        };
        let tls = TlsConnector::from(Arc::new(client_config(settings.insecure_tls, alpn)?));
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
            user_agent,
        }))
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
        }
    }
}

/// A complete response (body fully read).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// True when the body exceeded `max_body_bytes` and only its start was kept.
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

type Body = Full<Bytes>;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// An open connection. Dropping it aborts its driver task, which closes the socket: a
/// connection abandoned mid-request (timeout, cancelled VU) is never reused.
struct Conn {
    sender: Sender,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Conn {
    fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match &mut self.sender {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    fn send(
        &mut self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<http::Response<Incoming>, TrySendError<Request<Body>>>> {
        match &mut self.sender {
            Sender::H1(s) => futures::future::Either::Left(s.try_send_request(req)),
            Sender::H2(s) => futures::future::Either::Right(s.try_send_request(req)),
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
    shared: Arc<Shared>,
    origins: Vec<Origin>,
    clock: u64,
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
    headers: HeaderMap,
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
            shared,
            origins: Vec::new(),
            clock: 0,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Number of origins with an open connection (for tests and diagnostics).
    pub fn open_connections(&self) -> usize {
        self.origins
            .iter()
            .filter(|o| o.conn.as_ref().is_some_and(|c| !c.is_closed()))
            .count()
    }

    /// Closes every connection of this VU (end of iteration with fresh connections, or
    /// end of run).
    pub fn close_all(&mut self) {
        self.origins.clear();
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
        } = req;
        let deadline = tokio::time::Instant::now() + timeout;
        let following = self.send_following(method, &mut url, headers, body, jar);
        let done = match tokio::time::timeout_at(deadline, following).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    format!("{url}: no complete response within {timeout:?}"),
                ))
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

    /// The redirect loop. `url` is updated in place so that a timeout can name the hop
    /// that was in flight.
    async fn send_following(
        &mut self,
        mut method: Method,
        url: &mut Url,
        mut headers: HeaderMap,
        mut body: Bytes,
        jar: &mut CookieJar,
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
            let hop = self
                .exchange(hop_method, url, hop_headers, hop_body, jar)
                .await?;
            bytes_received += hop.bytes_received;
            bytes_sent += hop.bytes_sent;
            connections_opened += u32::from(hop.opened);
            connecting += hop.connecting;
            let sent_at = *first_sent_at.get_or_insert(hop.sent_at);
            if hop.headers.contains_key(SET_COOKIE) {
                jar.store_response_cookies(url, &hop.headers);
            }
            let location = match hop.status.as_u16() {
                301 | 302 | 303 | 307 | 308 if may_follow => hop.headers.get(LOCATION),
                _ => None,
            };
            if let Some(location) = location {
                let location = location.to_str().map_err(|_| {
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
        let (scheme, port, host) = (url.scheme(), url.port(), url.host());
        if let Some(i) = self
            .origins
            .iter()
            .position(|o| o.scheme == scheme && o.port == port && o.host.eq_ignore_ascii_case(host))
        {
            self.origins[i].last_used = self.clock;
            return Ok(i);
        }
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
    /// still open. A request that the connection gave back unsent (the server closed an
    /// idle keep-alive connection) is retried once on a fresh connection; nothing else is.
    async fn exchange(
        &mut self,
        method: Method,
        url: &Url,
        mut headers: HeaderMap,
        body: Bytes,
        jar: &CookieJar,
    ) -> Result<Hop, HttpError> {
        let i = self.origin_index(url)?;
        let shared = &*self.shared;
        let origin = &mut self.origins[i];

        if let Some(cookies) = jar.header_for(url) {
            merge_cookie_header(&mut headers, cookies);
        }
        if let Some(ua) = &shared.user_agent {
            if !headers.contains_key(USER_AGENT) {
                headers.insert(USER_AGENT, ua.clone());
            }
        }

        let mut opened = false;
        let mut connecting = Duration::ZERO;
        let mut conn = match origin.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                opened = true;
                Box::pin(connect(shared, url, &mut connecting)).await?
            }
        };
        let body_len = body.len();
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.headers_mut() = headers;
        fit_to_connection(&mut request, url, conn.is_h2(), &origin.host_header);
        let bytes_sent = request_size(&request, body_len);

        let (response, sent_at) = loop {
            if let Err(e) = conn.ready().await {
                if !opened {
                    opened = true;
                    conn = Box::pin(connect(shared, url, &mut connecting)).await?;
                    fit_to_connection(&mut request, url, conn.is_h2(), &origin.host_header);
                    continue;
                }
                return Err(classify_hyper(&e, url));
            }
            let sent_at = Instant::now();
            match conn.send(request).await {
                Ok(resp) => break (resp, sent_at),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !opened => {
                        request = unsent;
                        opened = true;
                        conn = Box::pin(connect(shared, url, &mut connecting)).await?;
                        fit_to_connection(&mut request, url, conn.is_h2(), &origin.host_header);
                    }
                    _ => return Err(classify_hyper(e.error(), url)),
                },
            }
        };
        let first_byte_at = Instant::now();
        let (parts, mut incoming) = response.into_parts();
        let mut bytes_received = head_size(&parts.headers);
        let max_body = shared.settings.max_body_bytes;
        let mut single: Option<Bytes> = None;
        let mut joined: Option<BytesMut> = None;
        let mut kept = 0usize;
        let mut truncated = false;
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| classify_hyper(&e, url))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
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
        origin.conn = Some(conn);
        Ok(Hop {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
            truncated,
            sent_at,
            first_byte_at,
            done_at,
            bytes_received,
            bytes_sent,
            opened,
            connecting,
        })
    }
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

/// HTTP/1.1 wants an origin-form target and a Host header; HTTP/2 an absolute URI (hyper
/// turns it into :scheme/:authority/:path).
fn fit_to_connection(req: &mut Request<Body>, url: &Url, h2: bool, host: &HeaderValue) {
    if h2 {
        *req.uri_mut() = url.as_uri().clone();
    } else {
        *req.uri_mut() = url.origin_form();
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, host.clone());
        }
    }
}

/// Approximate bytes of a response head on the wire: status line, headers, blank line.
fn head_size(headers: &HeaderMap) -> u64 {
    let mut n = 17 + 2; // "HTTP/1.1 200 OK\r\n" and the final "\r\n"
    for (name, value) in headers {
        n += name.as_str().len() + 2 + value.len() + 2;
    }
    n as u64
}

/// Approximate bytes of a request on the wire: request line, headers, blank line, body.
fn request_size(req: &Request<Body>, body_len: usize) -> u64 {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let mut n = req.method().as_str().len() + 1 + target + 11 + 2 + body_len;
    for (name, value) in req.headers() {
        n += name.as_str().len() + 2 + value.len() + 2;
    }
    n as u64
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
        )),
    }
}

async fn connect_inner(shared: &Shared, url: &Url) -> Result<Conn, HttpError> {
    let host = url.host();
    let port = url.port();
    let addrs: Addrs = shared.dns.resolve(host).await?;
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
            return Err(HttpError::new(
                HttpErrorKind::Connect,
                if host.parse::<IpAddr>().is_ok() {
                    format!("{url}: cannot connect to {host}:{port}: {e}")
                } else {
                    format!("{url}: cannot connect to {host}:{port} ({ip}): {e}")
                },
            ))
        }
        (None, None, Some(refusal)) => return Err(refusal),
        (None, None, None) => {
            return Err(HttpError::new(
                HttpErrorKind::Dns,
                format!("{url}: '{host}' resolved to no address"),
            ))
        }
    };
    // Requests are small and latency is the measurement: never wait for Nagle.
    let _ = stream.set_nodelay(true);
    let pref = shared.settings.http_version;
    match url.scheme() {
        Scheme::Http => {
            if pref == HttpVersionPref::Http2 {
                handshake_h2(stream, url).await
            } else {
                handshake_h1(stream, url).await
            }
        }
        Scheme::Https => {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
                HttpError::new(
                    HttpErrorKind::Tls,
                    format!("{url}: '{host}' is not a valid TLS server name"),
                )
            })?;
            let tls = shared.tls.connect(name, stream).await.map_err(|e| {
                HttpError::new(
                    HttpErrorKind::Tls,
                    format!("{url}: TLS handshake with {host}:{port} failed: {e}"),
                )
            })?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if h2 {
                handshake_h2(tls, url).await
            } else if pref == HttpVersionPref::Http2 {
                Err(HttpError::new(
                    HttpErrorKind::Tls,
                    format!("{url}: {host}:{port} did not agree to HTTP/2 (ALPN)"),
                ))
            } else {
                handshake_h1(tls, url).await
            }
        }
    }
}

async fn handshake_h1<T>(io: T, url: &Url) -> Result<Conn, HttpError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| classify_hyper(&e, url))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn {
        sender: Sender::H1(sender),
        driver,
    })
}

async fn handshake_h2<T>(io: T, url: &Url) -> Result<Conn, HttpError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| classify_hyper(&e, url))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn {
        sender: Sender::H2(sender),
        driver,
    })
}

fn classify_hyper(err: &hyper::Error, url: &Url) -> HttpError {
    let kind = if err.is_timeout() {
        HttpErrorKind::Timeout
    } else if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        HttpErrorKind::Protocol
    } else if err.is_incomplete_message()
        || err.is_canceled()
        || err.is_closed()
        || has_source::<std::io::Error>(err)
    {
        HttpErrorKind::Io
    } else {
        HttpErrorKind::Protocol
    };
    HttpError::new(kind, format!("{url}: {}", root_cause_text(err)))
}

fn has_source<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}
