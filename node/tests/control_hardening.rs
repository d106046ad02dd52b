//! The control endpoint of a real `stampede node` under garbage clients: many
//! connections that each send 32 MiB of junk without a newline must not grow the node's
//! memory (peak RSS, `VmHWM` in /proc/PID/status) much, and `peers` and `status` still
//! answer afterwards. A mutating request without the token is refused before its body is
//! read.
//!
//! STAMPEDE_GARBAGE_CONNECTIONS=N changes the number of garbage connections (default 60)
//! and prints the node's RSS before and after: how docs/security.md's figures are made.

mod mesh_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use mesh_support::{Mesh, BIN};

/// Peak RSS the node may reach under the garbage (an idle debug node is ~30 MB; before
/// the fix 20 connections took it to ~415 MB).
const PEAK_RSS_LIMIT_KB: u64 = 160 * 1024;

const JUNK_PER_CONNECTION: usize = 32 * 1024 * 1024;

fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Sends 32 MiB of junk without a newline, stopping when the node closes the connection.
fn send_junk(addr: String) {
    let Ok(mut s) = TcpStream::connect(&addr) else {
        return;
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < JUNK_PER_CONNECTION {
        match s.write(&chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => sent += n,
        }
    }
    // Keep the connection open a moment, as a slow client would.
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.read(&mut [0u8; 64]);
}

#[test]
fn garbage_control_clients_do_not_grow_the_node_and_peers_still_answers() {
    let connections: usize = std::env::var("STAMPEDE_GARBAGE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mesh = Mesh::new();
    let node = mesh.node("n1", &[], &[]);
    let addr = node.control().expect("node up")["addr"]
        .as_str()
        .expect("control address")
        .to_string();
    let before = status_kb(node.pid(), "VmRSS:");
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || send_junk(addr))
        })
        .collect();
    for s in senders {
        s.join().expect("sender thread");
    }
    let peak = status_kb(node.pid(), "VmHWM:");
    let after = status_kb(node.pid(), "VmRSS:");
    eprintln!(
        "{connections} garbage connections of {} MiB: RSS {} MB before, peak {} MB, {} MB after",
        JUNK_PER_CONNECTION >> 20,
        before / 1024,
        peak / 1024,
        after / 1024
    );
    assert!(
        peak < PEAK_RSS_LIMIT_KB,
        "peak RSS {} MB under {connections} garbage connections, limit {} MB",
        peak / 1024,
        PEAK_RSS_LIMIT_KB / 1024
    );
    assert!(node.peers().is_some(), "`peers` fails after the garbage");
    let status = Command::new(BIN)
        .args(["status", "--json", "--data-dir"])
        .arg(&node.dir)
        .output()
        .expect("run stampede status");
    assert!(
        status.status.success(),
        "`status` fails after the garbage: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// One raw request: the lines sent, the lines answered (until the node closes).
fn exchange(addr: &str, lines: &[&str]) -> Vec<String> {
    let mut s = TcpStream::connect(addr).expect("connect to the control endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    for l in lines {
        // The node may close as soon as it has refused the first line.
        if s.write_all(l.as_bytes()).is_err() || s.write_all(b"\n").is_err() {
            break;
        }
    }
    BufReader::new(s).lines().map_while(Result::ok).collect()
}

#[test]
fn a_run_without_the_token_is_refused_before_its_body_is_read() {
    let mesh = Mesh::new();
    let node = mesh.node("n1", &[], &[]);
    let addr = node.control().expect("node up")["addr"]
        .as_str()
        .expect("control address")
        .to_string();
    // The head names the op; the body would follow. No token: refused, body never read.
    let answer = exchange(&addr, &[r#"{"op":"run"}"#, &"x".repeat(1 << 20)]);
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert!(
        answer[0].contains("needs the node's control token"),
        "{}",
        answer[0]
    );
    // A head line longer than the head limit is refused as such.
    let answer = exchange(
        &addr,
        &[&format!(r#"{{"op":"peers","x":"{}"}}"#, "y".repeat(8192))],
    );
    assert!(answer[0].contains("longer than 4096 bytes"), "{answer:?}");
    // A read-only request needs no token and no body.
    let answer = exchange(&addr, &[r#"{"op":"peers"}"#]);
    assert!(answer[0].starts_with(r#"{"ok":true"#), "{answer:?}");
}
