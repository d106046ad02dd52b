//! The HTTP/2 path of the per-VU client against real servers on 127.0.0.1: VUs sharing
//! connections (`http2_streams_per_connection`) against hyper's h2c and TLS servers,
//! with the server's stream limit respected, and hostile servers written frame by frame
//! (GOAWAY, stream resets, a CONTINUATION flood, a SETTINGS flood): one clear error or
//! a correct answer each, never a panic or a hang.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stampede::http::{
    ClientSettings, CookieJar, HttpErrorKind, HttpVersionPref, OutRequest, Shared, Url, VuClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the hyper server saw: connections, and the most streams in flight at once.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    requests: AtomicUsize,
}

/// hyper's HTTP/2 server (h2c prior knowledge), allowing `max_streams` concurrent
/// streams per connection. Each request stays in flight for a few scheduler turns so
/// that streams of one connection overlap; `/echo` answers with the request's body.
async fn start_h2c_server(max_streams: u32) -> (SocketAddr, Arc<Seen>) {
    start_h2c_server_with(max_streams, 1 << 20).await
}

/// The same server with `window` as its stream and connection receive windows (small
/// ones make the client wait for WINDOW_UPDATEs). `/hang` never answers.
async fn start_h2c_server_with(max_streams: u32, window: u32) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let counts = counts.clone();
                    async move {
                        let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        counts.most_in_flight.fetch_max(now, Ordering::SeqCst);
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                        let echo = req.uri().path() == "/echo";
                        if req.uri().path() == "/hang" {
                            std::future::pending::<()>().await;
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let out = if echo {
                            body
                        } else {
                            Bytes::from_static(b"ok")
                        };
                        Ok::<_, Infallible>(http::Response::new(Full::new(out)))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .initial_stream_window_size(window)
                    .initial_connection_window_size(window)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn h2_shared() -> Arc<Shared> {
    Shared::new(ClientSettings {
        http_version: HttpVersionPref::Http2,
        ..ClientSettings::default()
    })
    .unwrap()
}

fn get(url: &str) -> OutRequest {
    let mut r = OutRequest::new(Method::GET, Url::parse(url).unwrap());
    r.timeout = Duration::from_secs(10);
    r
}

/// `vus` VUs on this (current-thread) runtime, each sending `requests` requests with
/// `streams` VUs per connection; every answer must be right.
async fn run_vus(shared: &Arc<Shared>, base: &str, vus: usize, requests: usize, streams: usize) {
    let mut tasks = Vec::new();
    for v in 0..vus {
        let shared = shared.clone();
        let base = base.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = VuClient::new(shared);
            c.share_http2_connections(streams);
            let mut jar = CookieJar::new();
            for i in 0..requests {
                let mut post = get(&format!("{base}/echo"));
                post.method = Method::POST;
                post.body = Bytes::from(format!("vu {v} request {i}"));
                let r = c.send(post, &mut jar).await.unwrap();
                assert_eq!(r.version, Version::HTTP_2);
                assert_eq!(r.body, format!("vu {v} request {i}").as_bytes());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn vus_of_a_worker_share_connections_up_to_the_streams_per_connection() {
    let (addr, seen) = start_h2c_server(100).await;
    let shared = h2_shared();
    run_vus(&shared, &format!("http://{addr}"), 40, 25, 10).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 40 * 25);
    // 40 VUs, 10 per connection.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 4);
    assert!(
        seen.most_in_flight.load(Ordering::SeqCst) > 1,
        "streams of a shared connection never overlapped"
    );
}

#[tokio::test]
async fn a_server_s_max_concurrent_streams_is_respected() {
    let (addr, seen) = start_h2c_server(3).await;
    let shared = h2_shared();
    run_vus(&shared, &format!("http://{addr}"), 20, 10, 20).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20 * 10);
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    assert!(seen.most_in_flight.load(Ordering::SeqCst) <= 3);
}

#[tokio::test]
async fn without_sharing_each_vu_has_its_own_connection() {
    let (addr, seen) = start_h2c_server(100).await;
    let shared = h2_shared();
    run_vus(&shared, &format!("http://{addr}"), 6, 5, 1).await;
    assert_eq!(seen.connections.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn bodies_larger_than_every_window_flow_both_ways() {
    // The server grants 16 KiB windows: 3 MB up waits for its WINDOW_UPDATEs; 3 MB back
    // is more than our stream (1 MiB) and connection (2 MiB) windows, so ours go out too.
    let (addr, _) = start_h2c_server_with(10, 16 * 1024).await;
    let shared = Shared::new(ClientSettings {
        http_version: HttpVersionPref::Http2,
        max_body_bytes: 4 << 20,
        ..ClientSettings::default()
    })
    .unwrap();
    let mut c = VuClient::new(shared);
    let mut jar = CookieJar::new();
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for _ in 0..2 {
        let mut post = get(&format!("http://{addr}/echo"));
        post.method = Method::POST;
        post.body = Bytes::from(body.clone());
        let r = c.send(post, &mut jar).await.unwrap();
        assert_eq!(r.body.len(), body.len());
        assert!(r.body == body, "the echoed body differs");
    }
}

#[tokio::test]
async fn a_request_timing_out_on_a_shared_connection_leaves_the_others_working() {
    let (addr, seen) = start_h2c_server(100).await;
    let shared = h2_shared();
    let base = format!("http://{addr}");
    // The hanging request opens the connection; the others then share it.
    let mut hung = VuClient::new(shared.clone());
    hung.share_http2_connections(10);
    let mut jar = CookieJar::new();
    let mut hang = get(&format!("{base}/hang"));
    hang.timeout = Duration::from_millis(300);
    let others = run_vus(&shared, &base, 5, 40, 10);
    let (err, ()) = tokio::join!(
        async { hung.send(hang, &mut jar).await.unwrap_err() },
        others
    );
    assert_eq!(err.kind(), HttpErrorKind::Timeout, "{err}");
    // And the VU whose request timed out goes on.
    let r = hung.send(get(&format!("{base}/")), &mut jar).await.unwrap();
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1 + 5 * 40 + 1);
}

// --- hostile servers, frame by frame ----------------------------------------------

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const PADDED: u8 = 8;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), first byte's high bits 0.
fn hpack_int(mut v: usize, n: u32, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(v as u8);
        return;
    }
    out.push(max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field as an HPACK literal without indexing, with a new name.
fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    hpack_int(name.len(), 7, &mut out);
    out.extend_from_slice(name.as_bytes());
    hpack_int(value.len(), 7, &mut out);
    out.extend_from_slice(value);
    out
}

/// `:status: 200` from HPACK's static table.
const STATUS_200: u8 = 0x88;

/// Reads the client preface and frames until a request's HEADERS; answers the client's
/// SETTINGS. The request's stream id, or `None` at end of stream.
async fn read_until_request(s: &mut TcpStream) -> Option<u32> {
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.ok()?;
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match head[3] {
            SETTINGS if head[4] & ACK == 0 => {
                s.write_all(&frame(SETTINGS, ACK, 0, &[])).await.ok()?;
            }
            HEADERS => return Some(stream),
            _ => {}
        }
    }
}

/// What a hostile server writes, given the request's stream id: frames, in order.
type Script = fn(u32) -> Vec<Vec<u8>>;

/// A raw h2c server that plays `scripts[i]` on its i-th connection after reading the
/// first request (the script gets the socket and the request's stream id), then reads
/// and discards what the client sends until it closes. Counts connections.
async fn hostile_server(scripts: Vec<Script>) -> (SocketAddr, Arc<AtomicUsize>) {
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
            tokio::spawn(async move {
                let _ = s.write_all(&frame(SETTINGS, 0, 0, &[])).await;
                let Some(stream) = read_until_request(&mut s).await else {
                    return;
                };
                let (mut rd, mut wr) = s.into_split();
                // Whatever the client says from now on (ACKs, resets) is read and dropped,
                // so that it never blocks on a full socket.
                let drain = tokio::spawn(async move {
                    let mut sink = vec![0u8; 64 * 1024];
                    while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
                });
                for piece in script(stream) {
                    if wr.write_all(&piece).await.is_err() {
                        break;
                    }
                }
                let _ = drain.await;
            });
        }
    });
    (addr, accepted)
}

fn answer_ok(stream: u32) -> Vec<Vec<u8>> {
    vec![
        frame(HEADERS, END_HEADERS, stream, &[STATUS_200]),
        frame(DATA, END_STREAM, stream, b"ok"),
    ]
}

async fn send_once(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<stampede::http::Response, stampede::http::HttpError> {
    let mut c = VuClient::new(h2_shared());
    let mut jar = CookieJar::new();
    let mut req = get(&format!("http://{addr}/"));
    req.timeout = timeout;
    c.send(req, &mut jar).await
}

#[tokio::test]
async fn goaway_before_the_request_is_processed_is_retried_on_a_new_connection() {
    // GOAWAY with last stream 0: the request was not processed (RFC 9113 §6.8).
    let (addr, accepted) = hostile_server(vec![
        |_| vec![frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0])],
        answer_ok,
    ])
    .await;
    let r = send_once(addr, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&r.body[..], b"ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_reset_stream_is_a_protocol_error() {
    // RST_STREAM with INTERNAL_ERROR (2).
    let (addr, _) = hostile_server(vec![|s| vec![frame(RST_STREAM, 0, s, &[0, 0, 0, 2])]]).await;
    let err = send_once(addr, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    assert!(err.message().contains("reset"), "{err}");
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_as_a_protocol_error() {
    // A header block that never ends: 16 KB fields, 200 CONTINUATION frames (3 MB).
    let (addr, _) = hostile_server(vec![|s| {
        let mut pieces = vec![frame(HEADERS, 0, s, &[STATUS_200])];
        let field = literal("x-flood", &[b'a'; 16_000]);
        for _ in 0..200 {
            pieces.push(frame(CONTINUATION, 0, s, &field));
        }
        pieces
    }])
    .await;
    let started = Instant::now();
    let err = send_once(addr, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut off only by the timeout"
    );
}

#[tokio::test]
async fn a_settings_flood_before_the_answer_still_gets_the_answer() {
    let (addr, _) = hostile_server(vec![|s| {
        let mut pieces: Vec<Vec<u8>> = (0..20_000).map(|_| frame(SETTINGS, 0, 0, &[])).collect();
        pieces.extend(answer_ok(s));
        pieces
    }])
    .await;
    let r = send_once(addr, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&r.body[..], b"ok");
}

#[tokio::test]
async fn a_huge_single_header_block_is_a_protocol_error() {
    // One HEADERS frame at the default maximum frame size, then CONTINUATIONs past the
    // client's 64 KiB header-list bound, ending properly this time.
    let (addr, _) = hostile_server(vec![|s| {
        let field = literal("x-big", &[b'b'; 16_000]);
        let mut pieces = vec![frame(HEADERS, 0, s, &[STATUS_200])];
        for i in 0..8 {
            let flags = if i == 7 { END_HEADERS } else { 0 };
            pieces.push(frame(CONTINUATION, flags, s, &field));
        }
        pieces.push(frame(DATA, END_STREAM, s, b"ok"));
        pieces
    }])
    .await;
    let err = send_once(addr, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
}

#[tokio::test]
async fn a_ping_is_answered_with_its_payload() {
    // The answer comes only after the client's PING ACK carrying the same 8 bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let stream = read_until_request(&mut s).await.unwrap();
        s.write_all(&frame(PING, 0, 0, b"stampede")).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.unwrap();
            let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            if head[3] == PING && head[4] & ACK != 0 {
                assert_eq!(&payload, b"stampede");
                break;
            }
        }
        for piece in answer_ok(stream) {
            s.write_all(&piece).await.unwrap();
        }
        // Until the client closes.
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let r = send_once(addr, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&r.body[..], b"ok");
    server.await.unwrap();
}

/// A raw h2c server for one connection that answers its i-th request with
/// `answers(stream, i)`; the client's other frames are read and dropped.
async fn answering_server(answers: fn(u32, usize) -> Vec<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let mut stream = read_until_request(&mut s).await;
        let mut i = 0;
        while let Some(id) = stream {
            for piece in answers(id, i) {
                if s.write_all(&piece).await.is_err() {
                    return;
                }
            }
            i += 1;
            stream = loop {
                let mut head = [0u8; 9];
                if s.read_exact(&mut head).await.is_err() {
                    break None;
                }
                let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).await.is_err() {
                    break None;
                }
                if head[3] == HEADERS {
                    break Some(u32::from_be_bytes([head[5], head[6], head[7], head[8]]));
                }
            };
        }
    });
    addr
}

#[tokio::test]
async fn huffman_values_the_dynamic_table_padding_and_early_hints_are_decoded() {
    let addr = answering_server(|s, i| match i {
        // 103, then 200 with "x-trace: www.example.com" (Huffman, RFC 7541 C.4.1's
        // bytes) added to the table; both frames padded.
        0 => {
            let mut head = vec![3, STATUS_200, 0x40, 7];
            head.extend_from_slice(b"x-trace");
            head.extend_from_slice(&[
                0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
            ]);
            head.extend_from_slice(&[0, 0, 0]);
            let mut early = vec![0x08];
            early.extend_from_slice(&[0x03, b'1', b'0', b'3']);
            vec![
                frame(HEADERS, END_HEADERS, s, &early),
                frame(HEADERS, END_HEADERS | PADDED, s, &head),
                frame(DATA, END_STREAM | PADDED, s, &[2, b'o', b'n', b'e', 0, 0]),
            ]
        }
        // The same field again, by its dynamic index (62).
        _ => vec![
            frame(HEADERS, END_HEADERS, s, &[STATUS_200, 0xbe]),
            frame(DATA, END_STREAM, s, b"two"),
        ],
    })
    .await;
    let mut c = VuClient::new(h2_shared());
    let mut jar = CookieJar::new();
    for body in [&b"one"[..], b"two"] {
        let r = c
            .send(get(&format!("http://{addr}/")), &mut jar)
            .await
            .unwrap();
        assert_eq!(r.status.as_u16(), 200);
        assert_eq!(r.headers.get("x-trace"), Some("www.example.com"));
        assert_eq!(&r.body[..], body);
    }
}

#[tokio::test]
async fn goaway_after_the_request_was_processed_keeps_its_answer() {
    // GOAWAY naming the request's stream as processed: its answer counts, and the
    // next request goes to a new connection.
    let (addr, accepted) = hostile_server(vec![
        |s| {
            let mut last = s.to_be_bytes().to_vec();
            last.extend_from_slice(&[0, 0, 0, 0]);
            vec![frame(GOAWAY, 0, 0, &last), answer_ok(s).concat()]
        },
        answer_ok,
    ])
    .await;
    let mut c = VuClient::new(h2_shared());
    let mut jar = CookieJar::new();
    for _ in 0..2 {
        let r = c
            .send(get(&format!("http://{addr}/")), &mut jar)
            .await
            .unwrap();
        assert_eq!(&r.body[..], b"ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// One request against a server that plays `script`; the error it must end in.
async fn protocol_error_from(script: Script) -> stampede::http::HttpError {
    let (addr, _) = hostile_server(vec![script]).await;
    let err = send_once(addr, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Protocol, "{err}");
    err
}

#[tokio::test]
async fn frames_breaking_the_protocol_are_one_clear_error_each() {
    // A frame over our 16 KiB maximum.
    let err = protocol_error_from(|s| {
        vec![
            frame(HEADERS, END_HEADERS, s, &[STATUS_200]),
            frame(DATA, END_STREAM, s, &[b'x'; 20_000]),
        ]
    })
    .await;
    assert!(err.message().contains("a frame of 20000 bytes"), "{err}");
    // A connection window pushed past 2^31-1.
    let err =
        protocol_error_from(|_| vec![frame(WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff])]).await;
    assert!(err.message().contains("FLOW_CONTROL_ERROR"), "{err}");
    // A push although the client disabled it.
    let err = protocol_error_from(|s| {
        vec![frame(
            PUSH_PROMISE,
            END_HEADERS,
            s,
            &[0, 0, 0, 2, STATUS_200],
        )]
    })
    .await;
    assert!(err.message().contains("PUSH_PROMISE"), "{err}");
    // A header name with capitals (HTTP/2 names are lowercase).
    let err = protocol_error_from(|s| {
        let mut head = vec![STATUS_200];
        head.extend(literal("X-Upper", b"1"));
        vec![frame(HEADERS, END_HEADERS | END_STREAM, s, &head)]
    })
    .await;
    assert!(err.message().contains("'X-Upper'"), "{err}");
    // A header block that is not valid HPACK (index 70 with an empty table).
    let err = protocol_error_from(|s| vec![frame(HEADERS, END_HEADERS, s, &[0x80 | 70])]).await;
    assert!(err.message().contains("COMPRESSION_ERROR"), "{err}");
    // DATA for a stream the client never opened.
    let err = protocol_error_from(|s| vec![frame(DATA, 0, s + 2, b"x")]).await;
    assert!(err.message().contains("never opened"), "{err}");
}
