//! The mesh's NetworkBehaviour, composed of named parts: gossipsub (control and
//! membership messages), request-response (bulk transfers), direct streams (run
//! messages for one peer, `mesh::direct`), identify, ping, and mDNS.
//!
//! This module only configures the parts; the event loop (`mesh::node`) decides what
//! to do with their events. Gossipsub parameters are chosen for meshes of 2 to 1,000
//! nodes where each node holds about 8 links (event_loop's NEIGHBOURS and
//! MAX_CONNECTIONS), not one to every member.

use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, mdns, ping, request_response};
use sha2::{Digest, Sha256};
use stampede_protocol::mesh::MAX_GOSSIP_BYTES;

use super::codec::{BulkCodec, BULK_PROTOCOL};

/// Membership announcements. Unversioned on purpose: nodes of different protocol
/// versions must still hear each other to show each other as incompatible.
pub const ANNOUNCE_TOPIC: &str = "stampede/announce";

/// Versioned control topic (run proposals, barriers, elections go here).
pub fn control_topic(protocol_version: u32) -> IdentTopic {
    IdentTopic::new(format!("stampede/control/{protocol_version}"))
}

/// Versioned metrics topic (per-second snapshots).
pub fn metrics_topic(protocol_version: u32) -> IdentTopic {
    IdentTopic::new(format!("stampede/metrics/{protocol_version}"))
}

pub fn announce_topic() -> IdentTopic {
    IdentTopic::new(ANNOUNCE_TOPIC)
}

/// Timings the behaviour needs (from the node settings, so tests can shorten them).
#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub identify_interval: Duration,
    pub request_timeout: Duration,
    pub mdns_query_interval: Duration,
}

#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    pub gossipsub: gossipsub::Behaviour,
    pub request_response: request_response::Behaviour<BulkCodec>,
    pub direct: libp2p_stream::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// The gossipsub configuration every node uses. `max_transmit_size` must match across
/// nodes, so it is the protocol constant.
pub fn gossipsub_config(
    heartbeat: Duration,
    max_transmit: usize,
) -> Result<gossipsub::Config, String> {
    gossipsub::ConfigBuilder::default()
        // A node holds ~8 links (4 chosen + others' choices, at most 12), so a message
        // reaches the mesh by relays along gossipsub's mesh: D of those links carry
        // every message, and each node receives and sends each message about D times
        // whatever the mesh's size (cost per node constant in N, but proportional to
        // D). In a run that is most of a member's control traffic: the root's merged
        // second and the leader's assignments crossed every mesh link both ways, ~8 KiB/s
        // per link at 50 real nodes, 6 links (docs/benchmarks.md). D = 4 (was 6) cuts
        // those copies by a third; a random mesh of degree 4 is still connected with
        // high probability at any size, flood publishing puts a message one hop from
        // all the publisher's links, and IHAVE to 3 non-mesh links repairs a missed
        // relay. The membership simulator at 1,000 nodes with 1 % segment loss (full
        // view, a killed node lost by every survivor within 3.7 s, no false suspicion)
        // holds at D = 4 as at 6. D_lo = 3 so a node with only its chosen links keeps
        // a spare; D_hi = 6 leaves the links a node holds room to stay out of its mesh.
        .mesh_n(4)
        .mesh_n_low(3)
        .mesh_n_high(6)
        .mesh_outbound_min(2)
        // IHAVE gossip goes to non-mesh links only, of which a node has few; 3 repairs a
        // missed relay within a heartbeat or two without an O(N) fan-out.
        .gossip_lazy(3)
        // Heartbeats send nothing at idle (no message ids to gossip, mesh stable), so
        // their interval only bounds how fast a lost mesh link is replaced.
        .heartbeat_interval(heartbeat)
        // The default first heartbeat comes after ~5 s; a joining node should be grafted
        // into the mesh at once.
        .heartbeat_initial_delay(Duration::from_millis(100))
        .history_length(5)
        .history_gossip(3)
        .max_transmit_size(max_transmit)
        // No gossipsub signatures: gossipsub verified every copy a node received (each
        // message comes from up to mesh_n neighbours) before dropping duplicates, and that
        // was the largest single cost of a node in a run (docs/benchmarks.md). Every
        // message is signed by its sender inside the data instead
        // (`stampede_protocol::mesh::SignedEnvelope`), and the event loop checks it once,
        // after the duplicate filter, before anything reads or relays the message.
        .validation_mode(ValidationMode::Anonymous)
        // Without an author and sequence number, the id is a hash of the whole message,
        // signature included: a forged copy has another id and cannot shadow the genuine
        // one; a publication differs from the last by its nonce.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(Sha256::digest(&m.data)[..20].to_vec())
        })
        // Tell the mesh at once not to send back a large message this node publishes (a
        // root's merged second): a copy saved per mesh link.
        .idontwant_on_publish(true)
        // We validate each message ourselves (decode + caps) before it is forwarded.
        .validate_messages()
        // Publish to every linked subscriber (≤ MAX_CONNECTIONS), not only the mesh:
        // control messages are few and must arrive fast; past the first hop the mesh
        // relays, so this costs a constant, not O(N).
        .flood_publish(true)
        // Long enough that a message relayed around the mesh (a few hops at most) is
        // never taken for new; the cache holds ids only, and idle traffic adds none.
        .duplicate_cache_time(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("invalid gossipsub configuration: {e}"))
}

impl MeshBehaviour {
    pub fn new(
        keypair: &Keypair,
        timing: &Timing,
        protocol_version: u32,
        agent: String,
        use_mdns: bool,
    ) -> Result<Self, String> {
        let peer_id = keypair.public().to_peer_id();
        let gossipsub = gossipsub::Behaviour::new(
            MessageAuthenticity::Anonymous,
            gossipsub_config(timing.heartbeat, MAX_GOSSIP_BYTES)?,
        )
        .map_err(|e| format!("cannot start gossipsub: {e}"))?;
        let request_response = request_response::Behaviour::with_codec(
            BulkCodec,
            [(BULK_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(timing.request_timeout)
                .with_max_concurrent_streams(64),
        );
        let identify = identify::Behaviour::new(
            identify::Config::new(identify_protocol(protocol_version), keypair.public())
                .with_agent_version(agent)
                .with_interval(timing.identify_interval),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(timing.ping_interval)
                .with_timeout(timing.ping_timeout),
        );
        let mdns = if use_mdns {
            let cfg = mdns::Config {
                ttl: Duration::from_secs(30),
                query_interval: timing.mdns_query_interval,
                enable_ipv6: false,
            };
            match mdns::tokio::Behaviour::new(cfg, peer_id) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "mDNS is unavailable; discovery uses bootstrap and address gossip only");
                    None
                }
            }
        } else {
            None
        };
        Ok(MeshBehaviour {
            gossipsub,
            request_response,
            direct: libp2p_stream::Behaviour::new(),
            identify,
            ping,
            mdns: Toggle::from(mdns),
        })
    }
}

/// The identify protocol string carries the stampede protocol version, so a version
/// mismatch is visible on connect, before any announcement.
pub fn identify_protocol(protocol_version: u32) -> String {
    format!("/stampede/mesh/{protocol_version}")
}

/// Parses the protocol version from an identify protocol string.
pub fn parse_identify_protocol(s: &str) -> Option<u32> {
    s.strip_prefix("/stampede/mesh/")?.parse().ok()
}
