//! The mesh transport: DNS → TCP → pnet (when a key is set) → noise → yamux.
//!
//! QUIC is deliberately not compiled in: pnet wraps the raw byte stream before noise,
//! which QUIC (encrypted at the packet level) cannot offer (libp2p#3275), and a node
//! must never join a mesh without the key. Leaving QUIC out also keeps the build lean.
//! This module builds the transport; it must not know about behaviours or members.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{dns, noise, tcp, yamux, PeerId};

/// How long a connection may take to become usable (pnet + noise + yamux). A peer with
/// another key never completes the handshake (its bytes decrypt to noise), so this is
/// also how long such an attempt occupies a connection slot.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the transport. With `psk = None` the node runs in insecure local mode: noise
/// still authenticates and encrypts, but anyone can connect.
pub fn build(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, String> {
    let noise = noise::Config::new(keypair).map_err(|e| format!("cannot set up noise: {e}"))?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let base = dns::tokio::Transport::system(tcp)
        .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?;
    let transport = match psk {
        Some(psk) => base
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
        None => base
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
    };
    Ok(transport)
}
