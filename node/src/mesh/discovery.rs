//! Discovery helpers: bootstrap addresses (with or without `/p2p/ID`, `/dns4/` names
//! included), which announced addresses are worth dialing, and redial backoff.
//!
//! mDNS itself is a behaviour part (`behaviour.rs`); address gossip rides on the
//! announcements (`membership.rs`, `event_loop.rs`). This module decides nothing on
//! its own and does no I/O.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};

/// A peer to join through.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    /// The address without a trailing `/p2p/ID`.
    pub addr: Multiaddr,
    pub peer: Option<PeerId>,
}

/// Parses a `--bootstrap` multiaddr.
pub fn parse_bootstrap(s: &str) -> Result<Bootstrap, String> {
    let mut addr: Multiaddr = s
        .trim()
        .parse()
        .map_err(|e| format!("bootstrap address `{s}` is not a multiaddr: {e}"))?;
    let peer = match addr.iter().last() {
        Some(Protocol::P2p(id)) => {
            addr.pop();
            Some(id)
        }
        _ => None,
    };
    let has_transport = addr.iter().any(|p| matches!(p, Protocol::Tcp(_)));
    if !has_transport {
        return Err(format!("bootstrap address `{s}` has no /tcp/PORT part (e.g. /ip4/10.0.0.1/tcp/7400 or /dns4/host/tcp/7400)"));
    }
    Ok(Bootstrap { addr, peer })
}

impl Bootstrap {
    pub fn dial_opts(&self) -> DialOpts {
        match self.peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![self.addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id()
                .address(self.addr.clone())
                .build(),
        }
    }
}

/// Parses a listen multiaddr.
pub fn parse_listen(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s
        .trim()
        .parse()
        .map_err(|e| format!("listen address `{s}` is not a multiaddr: {e}"))?;
    if addr
        .iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic | Protocol::Udp(_)))
    {
        return Err(format!("listen address `{s}`: QUIC/UDP is not supported (the mesh key cannot protect it); use /ip4/ADDR/tcp/PORT"));
    }
    Ok(addr)
}

/// Announced addresses worth dialing: parsed, without `/p2p/`, never unspecified.
pub fn dialable(addrs: &[String]) -> Vec<Multiaddr> {
    addrs
        .iter()
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .map(|mut a| {
            if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                a.pop();
            }
            a
        })
        .filter(|a| {
            !a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_unspecified(),
                Protocol::Ip6(ip) => ip.is_unspecified(),
                _ => false,
            })
        })
        .collect()
}

/// Exponential backoff per peer so an unreachable member is not dialed in a hot loop.
#[derive(Debug, Default)]
pub struct Redial {
    attempts: HashMap<PeerId, (Instant, u32)>,
}

impl Redial {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    /// Whether `peer` may be dialed now; records the attempt if so.
    pub fn due(&mut self, peer: PeerId, now: Instant) -> bool {
        match self.attempts.get_mut(&peer) {
            None => {
                self.attempts.insert(peer, (now, 0));
                true
            }
            Some((last, n)) => {
                let wait = Self::FIRST
                    .saturating_mul(1u32 << (*n).min(10))
                    .min(Self::MAX);
                if now.saturating_duration_since(*last) >= wait {
                    *last = now;
                    *n += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    pub fn connected(&mut self, peer: &PeerId) {
        self.attempts.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_forms() {
        let id = PeerId::random();
        let b = parse_bootstrap(&format!("/ip4/127.0.0.1/tcp/7400/p2p/{id}")).unwrap();
        assert_eq!(b.peer, Some(id));
        assert_eq!(b.addr.to_string(), "/ip4/127.0.0.1/tcp/7400");
        let b = parse_bootstrap("/dns4/node1.example/tcp/7400").unwrap();
        assert_eq!(b.peer, None);
        assert!(parse_bootstrap("/ip4/127.0.0.1")
            .unwrap_err()
            .contains("/tcp/"));
        assert!(parse_bootstrap("127.0.0.1:7400").is_err());
        assert!(parse_listen("/ip4/0.0.0.0/udp/1/quic-v1").is_err());
    }

    #[test]
    fn dialable_drops_unspecified_and_p2p() {
        let id = PeerId::random();
        let v = dialable(&[
            format!("/ip4/10.0.0.1/tcp/1/p2p/{id}"),
            "/ip4/0.0.0.0/tcp/1".into(),
            "junk".into(),
        ]);
        assert_eq!(v, vec!["/ip4/10.0.0.1/tcp/1".parse::<Multiaddr>().unwrap()]);
    }

    #[test]
    fn redial_backs_off() {
        let mut r = Redial::default();
        let p = PeerId::random();
        let t = Instant::now();
        assert!(r.due(p, t));
        assert!(!r.due(p, t + Duration::from_millis(100)));
        assert!(r.due(p, t + Duration::from_millis(600)));
        assert!(!r.due(p, t + Duration::from_millis(1000)));
        r.connected(&p);
        assert!(r.due(p, t + Duration::from_millis(1000)));
    }
}
