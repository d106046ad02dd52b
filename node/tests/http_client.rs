//! The per-VU HTTP client against real servers on 127.0.0.1: keep-alive reuse, h2c,
//! redirects, cookies, timeouts, error classes and the allowlist.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use stampede::http::{
    Allowlist, ClientSettings, CookieJar, HttpErrorKind, HttpVersionPref, OutRequest, Response,
    Shared, Url, VuClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BIG: usize = 100_000;

struct TestServer {
    scheme: &'static str,
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl TestServer {
    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("{}://{}{}", self.scheme, self.addr, path)).unwrap()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn route(req: hyper::Request<hyper::body::Incoming>) -> http::Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let cookie = req
        .headers()
        .get("cookie")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let host = req
        .headers()
        .get("host")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut resp = http::Response::builder().status(200);
    let out: Bytes = match path.as_str() {
        "/hang" => std::future::pending().await,
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "slow".into()
        }
        "/method" => method.as_str().to_owned().into(),
        "/echo" => body,
        "/host" => host.unwrap_or_else(|| "no host header".into()).into(),
        "/cookie" => cookie.into(),
        "/set" => {
            resp = resp.header("set-cookie", "sid=abc; Path=/; HttpOnly");
            "set".into()
        }
        "/login" => {
            resp = resp
                .status(302)
                .header("set-cookie", "sid=xyz; Path=/")
                .header("location", "/cookie");
            Bytes::new()
        }
        "/see-other" => {
            resp = resp.status(303).header("location", "/method");
            Bytes::new()
        }
        "/keep-method" => {
            resp = resp.status(307).header("location", "/echo");
            Bytes::new()
        }
        "/away" => {
            resp = resp.status(302).header("location", "http://10.1.2.3:9/");
            Bytes::new()
        }
        "/close" => {
            resp = resp.header("connection", "close");
            "bye".into()
        }
        "/big" => vec![b'x'; BIG].into(),
        p if p.starts_with("/p/") => format!("{method} {p}").into(),
        p if p.starts_with("/r/") => {
            let n: u32 = p[3..].parse().unwrap();
            if n == 0 {
                "landed".into()
            } else {
                resp = resp.status(302).header("location", format!("/r/{}", n - 1));
                Bytes::new()
            }
        }
        _ => "ok".into(),
    };
    resp.body(Full::new(out)).unwrap()
}

/// A hyper server speaking HTTP/1.1 and h2c (prior knowledge), counting connections.
async fn start_server() -> TestServer {
    start_server_with(None).await
}

/// The same server behind TLS (self-signed certificate for localhost and 127.0.0.1),
/// offering the given ALPN protocols.
async fn start_tls_server(alpn: &[&[u8]]) -> TestServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(unhex(TEST_CERT_DER_HEX))],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(unhex(TEST_KEY_DER_HEX))),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    start_server_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
}

async fn start_server_with(tls: Option<tokio_rustls::TlsAcceptor>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let service =
                    service_fn(|req| async move { Ok::<_, Infallible>(route(req).await) });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        // A client that rejects the certificate ends the handshake here.
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    TestServer {
        scheme,
        addr,
        connections,
    }
}

// A throwaway self-signed P-256 certificate (CN and SAN localhost, 127.0.0.1; valid until
// 2126) and its key, generated for these loopback tests only.
const TEST_CERT_DER_HEX: &str = concat!(
    "3082019b30820141a003020102021405534c1d2ca49aa6c51324d4cd956cf8e413c7cc300a06082a8648ce3d",
    "04030230143112301006035504030c096c6f63616c686f73743020170d3236313132363231323632325a180f",
    "32313236313130323231323632325a30143112301006035504030c096c6f63616c686f73743059301306072a",
    "8648ce3d020106082a8648ce3d03010703420004d02a692fe580a844a4faf24ad5031107ec0999523b23ec75",
    "ae469539d15ade2e67daf7dc40078b8e51a50c606ff212bed63ff568df9578966004e1f5834f8058a36f306d",
    "301d0603551d0e04160414b6405add21ba4c91d4408410e10eaaa24fd698fd301f0603551d23041830168014",
    "b6405add21ba4c91d4408410e10eaaa24fd698fd300f0603551d130101ff040530030101ff301a0603551d11",
    "0413301182096c6f63616c686f737487047f000001300a06082a8648ce3d0403020348003045022100cfb8d1",
    "dca5848271e22b73a385586b1b8cbfe4bdabf2248886deb35f8cb4e2b70220108e8d3b5bebfeb30eba91cec2",
    "47b16ebb1cda5aec8ba2a6817fe0d26064223a",
);
const TEST_KEY_DER_HEX: &str = concat!(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420a80cba14d7dea490",
    "d65841c13b38daa4fe6f1863f9886dc93039a1633c562c26a14403420004d02a692fe580a844a4faf24ad503",
    "1107ec0999523b23ec75ae469539d15ade2e67daf7dc40078b8e51a50c606ff212bed63ff568df9578966004",
    "e1f5834f8058",
);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn client_with(settings: ClientSettings) -> VuClient {
    VuClient::new(Shared::new(settings).unwrap())
}

fn client() -> VuClient {
    client_with(ClientSettings::default())
}

fn get(url: Url) -> OutRequest {
    let mut r = OutRequest::new(Method::GET, url);
    r.timeout = Duration::from_secs(10);
    r
}

async fn send(c: &mut VuClient, req: OutRequest) -> Response {
    let mut jar = CookieJar::new();
    c.send(req, &mut jar).await.unwrap()
}

#[tokio::test]
async fn keep_alive_reuses_one_connection_for_100_requests() {
    let server = start_server().await;
    let mut c = client();
    let mut jar = CookieJar::new();
    for i in 0..100 {
        let r = c.send(get(server.url("/")), &mut jar).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.version, Version::HTTP_11);
        assert_eq!(&r.body[..], b"ok");
        assert_eq!(r.connections_opened, u32::from(i == 0), "request {i}");
        assert_eq!(r.connecting.is_zero(), i != 0, "request {i}");
        assert!(r.sent_at <= r.first_byte_at && r.first_byte_at <= r.done_at);
        assert!(r.bytes_received > 2 && r.bytes_sent > 10);
    }
    assert_eq!(server.connections(), 1);
    assert_eq!(c.open_connections(), 1);
    c.close_all();
    assert_eq!(c.open_connections(), 0);
    send(&mut c, get(server.url("/"))).await;
    assert_eq!(server.connections(), 2);
}

/// A VU repeating a plain request sends it from the bytes it encoded the first time;
/// any difference (target, method, headers, body) must be encoded afresh.
#[tokio::test]
async fn repeated_and_changed_requests_on_one_connection_go_out_as_asked() {
    let server = start_server().await;
    let mut c = client();
    let mut seen = Vec::new();
    for (method, path, header) in [
        (Method::GET, "/p/1", false),
        (Method::GET, "/p/1", false),
        (Method::GET, "/p/2", false),
        (Method::DELETE, "/p/2", false),
        (Method::DELETE, "/p/2", true),
        (Method::GET, "/p/1", false),
    ] {
        let mut req = get(server.url(path));
        req.method = method;
        if header {
            req.headers
                .insert("x-extra", http::HeaderValue::from_static("1"));
        }
        let r = send(&mut c, req).await;
        seen.push(String::from_utf8(r.body.to_vec()).unwrap());
    }
    assert_eq!(
        seen,
        [
            "GET /p/1",
            "GET /p/1",
            "GET /p/2",
            "DELETE /p/2",
            "DELETE /p/2",
            "GET /p/1"
        ]
    );
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn http1_sends_host_header_and_bodies() {
    let server = start_server().await;
    let mut c = client();
    let r = send(&mut c, get(server.url("/host"))).await;
    assert_eq!(r.body, server.addr.to_string().as_bytes());

    let mut post = OutRequest::new(Method::POST, server.url("/echo"));
    post.body = Bytes::from_static(b"{\"user\":\"u1\"}");
    post.headers
        .insert("content-type", "application/json".parse().unwrap());
    let r = send(&mut c, post).await;
    assert_eq!(&r.body[..], b"{\"user\":\"u1\"}");
}

#[tokio::test]
async fn h2c_prior_knowledge_multiplexes_on_one_connection() {
    let server = start_server().await;
    let mut c = client_with(ClientSettings {
        http_version: HttpVersionPref::Http2,
        ..ClientSettings::default()
    });
    for _ in 0..20 {
        let r = send(&mut c, get(server.url("/"))).await;
        assert_eq!(r.version, Version::HTTP_2);
        assert_eq!(&r.body[..], b"ok");
    }
    let mut post = OutRequest::new(Method::POST, server.url("/echo"));
    post.body = Bytes::from_static(b"over h2");
    let r = send(&mut c, post).await;
    assert_eq!(&r.body[..], b"over h2");
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn auto_speaks_http1_to_plain_http() {
    let server = start_server().await;
    let mut c = client();
    let r = send(&mut c, get(server.url("/"))).await;
    assert_eq!(r.version, Version::HTTP_11);
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let server = start_server().await;
    let mut c = client_with(ClientSettings {
        max_redirects: 5,
        ..ClientSettings::default()
    });
    let r = send(&mut c, get(server.url("/r/3"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"landed");
    assert_eq!(r.redirects, 3);
    assert_eq!(r.url.path(), "/r/0");

    let r = send(&mut c, get(server.url("/r/10"))).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.redirects, 5);
    assert_eq!(r.url.path(), "/r/5");
    assert_eq!(
        server.connections(),
        1,
        "redirects on one origin reuse the connection"
    );

    let mut none = client_with(ClientSettings {
        max_redirects: 0,
        ..ClientSettings::default()
    });
    let r = send(&mut none, get(server.url("/r/1"))).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.redirects, 0);
}

#[tokio::test]
async fn see_other_turns_post_into_get_and_307_keeps_it() {
    let server = start_server().await;
    let mut c = client();
    let mut post = OutRequest::new(Method::POST, server.url("/see-other"));
    post.body = Bytes::from_static(b"form");
    let r = send(&mut c, post).await;
    assert_eq!(&r.body[..], b"GET");
    assert_eq!(r.redirects, 1);

    let mut post = OutRequest::new(Method::POST, server.url("/keep-method"));
    post.body = Bytes::from_static(b"still here");
    let r = send(&mut c, post).await;
    assert_eq!(&r.body[..], b"still here");
}

#[tokio::test]
async fn cookies_round_trip_and_apply_on_redirect_hops() {
    let server = start_server().await;
    let mut c = client();
    let mut jar = CookieJar::new();
    c.send(get(server.url("/set")), &mut jar).await.unwrap();
    assert_eq!(jar.get("sid"), Some("abc"));
    let r = c.send(get(server.url("/cookie")), &mut jar).await.unwrap();
    assert_eq!(&r.body[..], b"sid=abc");

    let mut jar = CookieJar::new();
    let r = c.send(get(server.url("/login")), &mut jar).await.unwrap();
    assert_eq!(r.redirects, 1);
    assert_eq!(&r.body[..], b"sid=xyz");
    assert_eq!(jar.get("sid"), Some("xyz"));

    // A Cookie header of the step's own is kept and the jar's cookies are added to it.
    let mut req = get(server.url("/cookie"));
    req.headers.insert("cookie", "own=1".parse().unwrap());
    let r = c.send(req, &mut jar).await.unwrap();
    assert_eq!(&r.body[..], b"own=1; sid=xyz");
}

#[tokio::test]
async fn timeout_is_classified_and_its_connection_not_reused() {
    let server = start_server().await;
    let mut c = client();
    let mut jar = CookieJar::new();
    c.send(get(server.url("/")), &mut jar).await.unwrap();
    assert_eq!(server.connections(), 1);

    let mut hang = get(server.url("/hang"));
    hang.timeout = Duration::from_millis(300);
    let err = c.send(hang, &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Timeout);
    assert_eq!(err.kind().spec_class(), "timeout");
    assert!(err.message().contains("/hang"), "{err}");
    assert_eq!(c.open_connections(), 0);

    let r = c.send(get(server.url("/")), &mut jar).await.unwrap();
    assert_eq!(r.connections_opened, 1);
    assert_eq!(server.connections(), 2);
}

/// Each request gets its own timeout, whatever the one before it had: a short one after
/// a long one fires, a long one after a short one does not fire early.
#[tokio::test]
async fn every_request_is_bounded_by_its_own_timeout() {
    let server = start_server().await;
    let mut c = client();
    let mut jar = CookieJar::new();
    let mut quick = get(server.url("/"));
    quick.timeout = Duration::from_millis(100);
    c.send(quick, &mut jar).await.unwrap();
    let mut slow = get(server.url("/slow"));
    slow.timeout = Duration::from_secs(20);
    let r = c.send(slow, &mut jar).await.unwrap();
    assert_eq!(&r.body[..], b"slow");

    let mut long = get(server.url("/"));
    long.timeout = Duration::from_secs(60);
    c.send(long, &mut jar).await.unwrap();
    let mut hang = get(server.url("/hang"));
    hang.timeout = Duration::from_millis(200);
    let bounded = tokio::time::timeout(Duration::from_secs(10), c.send(hang, &mut jar)).await;
    let err = bounded.expect("the 200 ms timeout fired").unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Timeout);
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut c = client();
    let mut jar = CookieJar::new();
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    let err = c.send(get(url), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Connect, "{err}");
    assert!(err.message().contains(&addr.port().to_string()), "{err}");
}

#[tokio::test]
async fn disallowed_targets_are_refused_before_any_connection() {
    let mut jar = CookieJar::new();

    // An IP literal outside loopback, with the default allowlist.
    let mut c = client();
    let err = c
        .send(get(Url::parse("http://10.1.2.3:9/").unwrap()), &mut jar)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Refused);
    assert!(err.message().contains("--allow-target 10.1.2.3"), "{err}");

    // A name that resolves (only here) to a non-allowed address.
    let mut settings = ClientSettings::default();
    settings
        .resolve
        .insert("internal.test".into(), vec!["10.1.2.3".parse().unwrap()]);
    let mut c = client_with(settings);
    let err = c
        .send(
            get(Url::parse("http://internal.test:9/").unwrap()),
            &mut jar,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Refused);
    assert!(
        err.message()
            .contains("'internal.test' (resolved to 10.1.2.3)"),
        "{err}"
    );

    // With nothing allowed, a live loopback server sees no connection at all.
    let server = start_server().await;
    let mut c = client_with(ClientSettings {
        allow: Allowlist::deny_all(),
        ..ClientSettings::default()
    });
    let err = c.send(get(server.url("/")), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Refused);
    assert_eq!(server.connections(), 0);

    // A redirect to a disallowed host is refused too.
    let mut c = client();
    let err = c
        .send(get(server.url("/away")), &mut jar)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Refused, "{err}");
}

#[tokio::test]
async fn resolve_override_to_loopback_is_allowed_and_keeps_the_host_header() {
    let server = start_server().await;
    let mut settings = ClientSettings::default();
    settings
        .resolve
        .insert("shop.test".into(), vec!["127.0.0.1".parse().unwrap()]);
    let mut c = client_with(settings);
    let url = Url::parse(&format!("http://shop.test:{}/host", server.addr.port())).unwrap();
    let r = send(&mut c, get(url)).await;
    assert_eq!(
        r.body,
        format!("shop.test:{}", server.addr.port()).as_bytes()
    );
}

#[tokio::test]
async fn localhost_resolves_without_dns() {
    let server = start_server().await;
    let shared = Shared::new(ClientSettings::default()).unwrap();
    let addrs = shared.resolve("localhost").await.unwrap();
    assert!(addrs.iter().all(|a| a.is_loopback()));
    let mut c = VuClient::new(shared);
    let url = Url::parse(&format!("http://localhost:{}/", server.addr.port())).unwrap();
    let r = send(&mut c, get(url)).await;
    assert_eq!(&r.body[..], b"ok");
}

#[tokio::test]
async fn connection_close_responses_are_followed_by_a_fresh_connection() {
    let server = start_server().await;
    let mut c = client();
    for _ in 0..5 {
        let r = send(&mut c, get(server.url("/close"))).await;
        assert_eq!(&r.body[..], b"bye");
    }
    assert_eq!(server.connections(), 5);
}

#[tokio::test]
async fn large_bodies_are_counted_and_truncated_at_the_limit() {
    let server = start_server().await;
    let mut c = client();
    let r = send(&mut c, get(server.url("/big"))).await;
    assert_eq!(r.body.len(), BIG);
    assert!(r.body.iter().all(|&b| b == b'x'));
    assert!(!r.body_truncated);
    assert!(r.bytes_received >= BIG as u64);

    let mut small = client_with(ClientSettings {
        max_body_bytes: 1000,
        ..ClientSettings::default()
    });
    let r = send(&mut small, get(server.url("/big"))).await;
    assert!(r.body_truncated);
    assert!(r.body.len() <= 1000);
    assert!(r.bytes_received >= BIG as u64);
    // The connection stays usable: the whole body was read.
    send(&mut small, get(server.url("/"))).await;
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn garbage_from_the_server_is_a_protocol_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"this is not http\r\n\r\n").await;
        let _ = s.shutdown().await;
    });
    let mut c = client();
    let mut jar = CookieJar::new();
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    let err = c.send(get(url), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
}

#[tokio::test]
async fn server_closing_mid_response_is_an_io_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            .await;
        let _ = s.shutdown().await;
    });
    let mut c = client();
    let mut jar = CookieJar::new();
    let url = Url::parse(&format!("http://{addr}/")).unwrap();
    let err = c.send(get(url), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Io, "{err}");
    assert_eq!(err.kind().spec_class(), "connect");
}

#[tokio::test]
async fn tls_with_verification_off_negotiates_h2_or_http1() {
    let server = start_tls_server(&[b"h2", b"http/1.1"]).await;
    let mut auto = client_with(ClientSettings {
        insecure_tls: true,
        ..ClientSettings::default()
    });
    for _ in 0..5 {
        let r = send(&mut auto, get(server.url("/"))).await;
        assert_eq!(r.version, Version::HTTP_2);
        assert_eq!(&r.body[..], b"ok");
    }
    assert_eq!(server.connections(), 1);

    let mut h1 = client_with(ClientSettings {
        insecure_tls: true,
        http_version: HttpVersionPref::Http1,
        ..ClientSettings::default()
    });
    for _ in 0..5 {
        let r = send(&mut h1, get(server.url("/host"))).await;
        assert_eq!(r.version, Version::HTTP_11);
        assert_eq!(r.body, server.addr.to_string().as_bytes());
    }
    assert_eq!(server.connections(), 2);

    // localhost is a DNS name in the certificate; SNI carries it.
    let url = Url::parse(&format!("https://localhost:{}/", server.addr.port())).unwrap();
    assert_eq!(&send(&mut auto, get(url)).await.body[..], b"ok");
}

#[tokio::test]
async fn tls_verification_rejects_a_self_signed_certificate() {
    let server = start_tls_server(&[b"http/1.1"]).await;
    let mut c = client();
    let mut jar = CookieJar::new();
    let err = c.send(get(server.url("/")), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Tls, "{err}");
    assert_eq!(err.kind().spec_class(), "tls");
    assert!(err.message().contains("certificate"), "{err}");
}

#[tokio::test]
async fn http2_only_against_an_http1_only_tls_server_is_a_tls_error() {
    let server = start_tls_server(&[b"http/1.1"]).await;
    let mut c = client_with(ClientSettings {
        insecure_tls: true,
        http_version: HttpVersionPref::Http2,
        ..ClientSettings::default()
    });
    let mut jar = CookieJar::new();
    let err = c.send(get(server.url("/")), &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Tls, "{err}");
}

/// A minimal DNS server on 127.0.0.1 (UDP): answers A queries for `name` with 127.0.0.1
/// and the given TTL, NXDOMAIN for other names, empty answers for other types; counts A
/// queries for `name`.
async fn start_dns(name: &'static str, ttl: u32) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let q = &buf[..n];
            // Question: labels from offset 12, then QTYPE and QCLASS.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < q.len() && q[i] != 0 {
                let len = q[i] as usize;
                labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).to_lowercase());
                i += 1 + len;
            }
            let question_end = i + 5;
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let known = labels.join(".") == name;
            let answer = known && qtype == 1;
            if answer {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let mut r = Vec::new();
            r.extend_from_slice(&q[..2]); // id
            r.extend_from_slice(if known { &[0x81, 0x80] } else { &[0x81, 0x83] });
            r.extend_from_slice(&[0, 1, 0, u8::from(answer), 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..question_end]);
            if answer {
                r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4, 127, 0, 0, 1]);
            }
            let _ = socket.send_to(&r, peer).await;
        }
    });
    (addr, queries)
}

#[tokio::test]
async fn dns_answers_are_cached_per_node_for_their_ttl() {
    let server = start_server().await;
    let (dns, queries) = start_dns("shop.stampede.test", 3600).await;
    let shared = Shared::new(ClientSettings {
        dns_servers: vec![dns],
        ..ClientSettings::default()
    })
    .unwrap();
    let url = Url::parse(&format!(
        "http://shop.stampede.test:{}/",
        server.addr.port()
    ))
    .unwrap();
    // Ten VUs open their first connection at once: one query between them.
    let mut vus: Vec<VuClient> = (0..10).map(|_| VuClient::new(shared.clone())).collect();
    let results = futures::future::join_all(vus.iter_mut().map(|c| {
        let url = url.clone();
        async move {
            let mut jar = CookieJar::new();
            c.send(get(url), &mut jar).await
        }
    }))
    .await;
    for r in results {
        assert_eq!(&r.unwrap().body[..], b"ok");
    }
    assert_eq!(server.connections(), 10);
    assert_eq!(queries.load(Ordering::SeqCst), 1);

    let mut jar = CookieJar::new();
    let err = vus[0]
        .send(
            get(Url::parse("http://missing.stampede.test/").unwrap()),
            &mut jar,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Dns, "{err}");
    assert!(err.message().contains("missing.stampede.test"), "{err}");
}

#[tokio::test]
async fn dns_answers_with_zero_ttl_are_asked_again() {
    let server = start_server().await;
    let (dns, queries) = start_dns("short.stampede.test", 0).await;
    let shared = Shared::new(ClientSettings {
        dns_servers: vec![dns],
        ..ClientSettings::default()
    })
    .unwrap();
    let url = Url::parse(&format!(
        "http://short.stampede.test:{}/",
        server.addr.port()
    ))
    .unwrap();
    for _ in 0..2 {
        let mut c = VuClient::new(shared.clone());
        send(&mut c, get(url.clone())).await;
    }
    assert_eq!(queries.load(Ordering::SeqCst), 2);
}

#[test]
fn client_and_its_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let c = client();
    is_send(&c);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = client();
        let mut jar = CookieJar::new();
        let fut = c.send(get(Url::parse("http://127.0.0.1:1/").unwrap()), &mut jar);
        is_send(&fut);
    });
}

/// What a scripted HTTP/1.1 server does with one request on a connection.
enum Step {
    /// Read the request, then write these pieces one after another.
    Answer(Vec<&'static [u8]>),
    /// Read the request and close the connection without a word (a server that closed
    /// an idle keep-alive connection just as the request arrived).
    Swallow,
}

/// A raw TCP server that plays one script per accepted connection, in order, so tests
/// can send exactly the framing they are about. Returns its address and a counter of
/// accepted connections.
async fn scripted_server(scripts: Vec<Vec<Step>>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        for script in scripts {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_nodelay(true);
            for step in script {
                if !read_request(&mut s).await {
                    break;
                }
                match step {
                    Step::Answer(pieces) => {
                        for p in pieces {
                            let _ = s.write_all(p).await;
                            let _ = s.flush().await;
                            tokio::task::yield_now().await;
                        }
                    }
                    Step::Swallow => break,
                }
            }
            // The script is over: close (after the last answer, or without one).
            drop(s);
        }
    });
    (addr, accepted)
}

/// Reads one request (head and Content-Length body); false at end of stream.
async fn read_request(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return true;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A GET from a fresh client that must fail.
async fn send_expecting_error(url: Url) -> stampede::http::HttpError {
    let mut jar = CookieJar::new();
    client().send(get(url), &mut jar).await.unwrap_err()
}

fn addr_url(addr: SocketAddr, path: &str) -> Url {
    Url::parse(&format!("http://{addr}{path}")).unwrap()
}

#[tokio::test]
async fn chunked_bodies_are_decoded_and_the_connection_kept() {
    let (addr, accepted) = scripted_server(vec![vec![
        Step::Answer(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r\n",
            b"7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
        ]),
        Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
    ]])
    .await;
    let mut c = client();
    let r = send(&mut c, get(addr_url(addr, "/a"))).await;
    assert_eq!(&r.body[..], b"hello, world");
    assert_eq!(r.version, Version::HTTP_11);
    let r = send(&mut c, get(addr_url(addr, "/b"))).await;
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(
        r.connections_opened, 0,
        "the chunked response left the connection reusable"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_chunk_framing_is_a_protocol_error() {
    let (addr, _) = scripted_server(vec![vec![Step::Answer(vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ])]])
    .await;
    let err = send_expecting_error(addr_url(addr, "/")).await;
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    assert!(err.message().contains("chunk size 'zz'"), "{err}");
}

#[tokio::test]
async fn a_body_without_length_runs_until_close_and_the_next_request_reconnects() {
    let (addr, accepted) = scripted_server(vec![
        vec![Step::Answer(vec![
            b"HTTP/1.0 200 OK\r\n\r\nuntil ",
            b"the end",
        ])],
        vec![Step::Answer(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])],
    ])
    .await;
    let mut c = client();
    let r = send(&mut c, get(addr_url(addr, "/"))).await;
    assert_eq!(&r.body[..], b"until the end");
    assert_eq!(r.version, Version::HTTP_10);
    let r = send(&mut c, get(addr_url(addr, "/"))).await;
    assert_eq!(r.connections_opened, 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn interim_responses_are_skipped_and_head_has_no_body() {
    let (addr, accepted) = scripted_server(vec![vec![
        Step::Answer(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
            b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
        ]),
        // A HEAD response announces a length but carries no body.
        Step::Answer(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"]),
        Step::Answer(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]),
    ]])
    .await;
    let mut c = client();
    let r = send(&mut c, get(addr_url(addr, "/"))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(&r.body[..], b"done");
    let mut head = get(addr_url(addr, "/"));
    head.method = Method::HEAD;
    let r = send(&mut c, head).await;
    assert_eq!(r.headers.get("content-length"), Some("1000"));
    assert!(r.body.is_empty());
    let r = send(&mut c, get(addr_url(addr, "/"))).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_oversized_response_head_is_a_protocol_error() {
    static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let huge = HUGE.get_or_init(|| {
        let mut h = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 70 * 1024));
        h.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        h
    });
    let (addr, _) = scripted_server(vec![vec![Step::Answer(vec![huge.as_slice()])]]).await;
    let err = send_expecting_error(addr_url(addr, "/")).await;
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    assert!(err.message().contains("64 KiB"), "{err}");
}

/// A keep-alive connection the server drops just as the next request arrives: an
/// idempotent request is sent again on a fresh connection, a POST is not (it may have
/// been processed) and fails as an I/O error.
#[tokio::test]
async fn only_idempotent_requests_are_retried_after_a_keep_alive_race() {
    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (addr, accepted) = scripted_server(vec![
        vec![Step::Answer(vec![ok]), Step::Swallow],
        vec![Step::Answer(vec![ok]), Step::Swallow],
        vec![Step::Answer(vec![ok])],
    ])
    .await;
    let mut c = client();
    send(&mut c, get(addr_url(addr, "/"))).await;
    let r = send(&mut c, get(addr_url(addr, "/"))).await;
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(
        r.connections_opened, 1,
        "the GET went out again on a fresh connection"
    );

    let mut post = get(addr_url(addr, "/"));
    post.method = Method::POST;
    post.body = Bytes::from_static(b"order=1");
    let mut jar = CookieJar::new();
    let err = c.send(post, &mut jar).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Io, "{err}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the POST was not sent twice"
    );
}
