//! Property tests (a fuzz pass on stable Rust) of what the target under test controls
//! and a VU parses: HTTP/1.1 response heads and bodies, read by the real client from a
//! real loopback socket that answers with arbitrary bytes or valid responses mutated
//! byte by byte, and `Set-Cookie` values stored in and served from the cookie jar.
//! The properties: nothing panics, every exchange ends within its timeout (as a response
//! or an error), and the jar's `Cookie` header never carries CR, LF or NUL.
//!
//! Cases per target: `STAMPEDE_FUZZ_CASES` (default 256, the CI pass); `tools/fuzz.sh
//! DURATION` runs these targets again and again with larger counts and fresh seeds.

use std::time::Duration;

use http::Method;
use proptest::prelude::*;
use proptest::test_runner::Config;
use stampede::http::{ClientSettings, CookieJar, OutRequest, Shared, Url, VuClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn cases() -> u32 {
    std::env::var("STAMPEDE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    Config {
        cases: cases(),
        max_shrink_iters: 512,
        ..Config::default()
    }
}

/// Valid responses of every framing the client reads.
const RESPONSES: [&[u8]; 7] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited body",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nSet-Cookie: sid=abc; Path=/; Max-Age=60\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nno",
    b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nshort",
];

/// Byte edits: (kind, position, value); applied modulo the response's length.
fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, pos, value) in edits {
        if bytes.is_empty() {
            bytes.push(value);
            continue;
        }
        let at = pos % bytes.len();
        match kind % 5 {
            0 => bytes[at] = value,
            1 => bytes[at] ^= 1 << (value % 8),
            2 => bytes.insert(at, value),
            3 => {
                bytes.remove(at);
            }
            _ => bytes.splice(at..at, *b"ffffffff\r\n").for_each(drop),
        }
    }
    bytes
}

/// Serves `answer` to one connection on 127.0.0.1, then closes it; a GET through the
/// real client must end (response or error) within its 2 s timeout.
fn exchange(answer: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 4096];
            let _ = s.read(&mut request).await;
            let _ = s.write_all(&answer).await;
            let _ = s.shutdown().await;
            // Drain until the client goes, so it sees our close and not a reset.
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut request)).await;
        });
        let mut client =
            VuClient::new(Shared::new(ClientSettings::default()).expect("client settings"));
        let mut req = OutRequest::new(
            Method::GET,
            Url::parse(&format!("http://{addr}/fuzz")).expect("url"),
        );
        req.timeout = Duration::from_secs(2);
        let mut jar = CookieJar::new();
        let done = tokio::time::timeout(Duration::from_secs(10), client.send(req, &mut jar)).await;
        assert!(done.is_ok(), "the exchange outlived its timeout by 8 s");
        if let Ok(Ok(r)) = done {
            assert!((100..1000).contains(&r.status.as_u16()));
        }
        server.abort();
    });
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_http_response_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        exchange(bytes);
    }

    #[test]
    fn fuzz_http_response_mutations(
        pick in 0usize..RESPONSES.len(),
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        exchange(mutate(RESPONSES[pick].to_vec(), &edits));
    }

    #[test]
    fn fuzz_set_cookie(
        values in proptest::collection::vec(
            prop_oneof![
                any::<String>(),
                "[a-z]{1,8}=[ -~]{0,20}(; ?(Path=/[a-z/]{0,8}|Domain=\\.?[a-z.]{0,12}|Max-Age=-?[0-9]{1,25}|Expires=[ -~]{0,30}|Secure|HttpOnly|SameSite=Lax)){0,5}",
            ],
            1..20,
        ),
    ) {
        let url = Url::parse("http://shop.127.0.0.1.example:8080/a/b").expect("url");
        let mut jar = CookieJar::new();
        for v in &values {
            jar.store(&url, v);
        }
        for u in ["http://shop.127.0.0.1.example:8080/a/b/c", "http://other.example/", "https://shop.127.0.0.1.example/"] {
            let u = Url::parse(u).expect("url");
            if let Some(h) = jar.header_for(&u) {
                // UTF-8 in a cookie goes back as the server sent it (as browsers do);
                // what must never appear is a byte that ends or splits the header.
                prop_assert!(!h.as_bytes().iter().any(|&b| b == b'\r' || b == b'\n' || b == 0), "{:?}", h);
            }
        }
    }
}
