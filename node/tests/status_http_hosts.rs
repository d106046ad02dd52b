//! DNS rebinding against a real `stampede node`'s HTTP server: a request whose `Host`
//! is a name the node does not answer to gets 421, a foreign `Origin` gets 403, and the
//! dashboard's API still answers its own address and `localhost`.

mod mesh_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mesh_support::Mesh;

/// Status code and body of `GET path` sent to `addr` with these extra header lines.
fn get(addr: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the HTTP server");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn a_foreign_host_or_origin_is_refused_and_the_nodes_own_address_works() {
    let mesh = Mesh::new();
    let node = mesh.node("n1", &[], &[]);
    let addr = node.control().expect("node up")["http"]
        .as_str()
        .expect("the node serves HTTP")
        .to_string();
    let port = addr.rsplit_once(':').expect("host:port").1.to_string();

    let (status, body) = get(&addr, "/api/live", "Host: evil.example\r\n");
    assert_eq!(status, 421, "{body}");
    assert!(!body.contains("members"), "{body}");
    let (status, _) = get(
        &addr,
        "/runs/x/summary.json",
        &format!("Host: evil.example:{port}\r\n"),
    );
    assert_eq!(status, 421);
    let (status, _) = get(
        &addr,
        "/api/live",
        &format!("Host: {addr}\r\nOrigin: http://evil.example:{port}\r\n"),
    );
    assert_eq!(status, 403);

    for host in [addr.clone(), format!("localhost:{port}")] {
        let (status, body) = get(&addr, "/api/live", &format!("Host: {host}\r\n"));
        assert_eq!(status, 200, "Host {host}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/api/live is JSON");
        assert!(v.is_object(), "{body}");
    }
    let (status, _) = get(
        &addr,
        "/api/live",
        &format!("Host: {addr}\r\nOrigin: http://{addr}\r\n"),
    );
    assert_eq!(status, 200);
}
