//! The mesh: a libp2p swarm (TCP + pnet + noise + yamux; gossipsub, request-response,
//! identify, ping, mDNS) run by one event loop task, plus the membership view it keeps.
//!
//! [`start`] is the in-process API: it builds the swarm, starts listening and returns a
//! [`MeshHandle`] to talk to the loop. This module must not know about the CLI, the
//! control endpoint or HTTP; they read the shared view and send [`MeshCommand`]s.

pub mod behaviour;
pub mod codec;
pub mod direct;
pub mod discovery;
pub mod event_loop;
pub mod key;
pub mod membership;
pub mod transport;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::gossipsub::IdentTopic;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use stampede_protocol::mesh::{Announce, GossipBody, MeshRequest, MeshResponse, NodeState};
use tokio::sync::{broadcast, mpsc, oneshot};

use self::behaviour::{MeshBehaviour, Timing};
use self::discovery::Bootstrap;
use self::membership::{Transition, View};

/// The membership view shared between the event loop (writer) and the control and
/// HTTP handlers (readers). Locks are held only for in-memory updates, never across
/// an await.
pub type SharedView = Arc<RwLock<View>>;

/// Intervals of the mesh (settings; tests shorten them).
#[derive(Debug, Clone)]
pub struct MeshTiming {
    pub announce_interval: Duration,
    pub lost_after: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub gossip_heartbeat: Duration,
    pub bootstrap_retry: Duration,
    pub mdns_query_interval: Duration,
    /// Links this node chooses (see `event_loop`'s NEIGHBOURS).
    pub neighbours: usize,
    /// Connections past which links not chosen are closed.
    pub max_connections: usize,
}

impl Default for MeshTiming {
    fn default() -> Self {
        MeshTiming {
            announce_interval: Duration::from_secs(1),
            lost_after: Duration::from_secs(3),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(2),
            // At idle a heartbeat sends nothing; 1 s bounds how fast a mesh link is
            // replaced (control messages are flood-published, not delayed by it).
            gossip_heartbeat: Duration::from_secs(1),
            bootstrap_retry: Duration::from_secs(2),
            mdns_query_interval: Duration::from_secs(5),
            neighbours: event_loop::NEIGHBOURS,
            max_connections: event_loop::MAX_CONNECTIONS,
        }
    }
}

/// Everything needed to start a node's mesh part.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub keypair: Keypair,
    /// The mesh key; `None` only in insecure local mode.
    pub psk: Option<PreSharedKey>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What the operator allowed as load targets (announced; loopback is implicit).
    pub allow_targets: Vec<String>,
    pub capacity: u32,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Bootstrap>,
    pub mdns: bool,
    /// The advertised protocol version (normally `PROTOCOL_VERSION`).
    pub protocol_version: u32,
    pub timing: MeshTiming,
    /// Answers peers' run requests (plan bundles, clock samples, missed snapshots).
    pub run_responder: RunResponder,
    /// Answers peers' requests for finished runs' summaries (`stampede report`).
    pub results: Option<crate::reports::results::Results>,
}

/// The run coordinator's answer to a peer's request, called on the event loop (it
/// must be quick: look-ups and timestamps only).
#[derive(Clone, Default)]
pub struct RunResponder(
    pub  Option<
        Arc<
            dyn Fn(stampede_protocol::run::RunRequest) -> stampede_protocol::run::RunResponse
                + Send
                + Sync,
        >,
    >,
);

impl std::fmt::Debug for RunResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RunResponder(set)"
        } else {
            "RunResponder(none)"
        })
    }
}

/// Requests to the event loop. Run coordination adds its kinds here.
#[derive(Debug)]
pub enum MeshCommand {
    /// Publish a gossip body on a topic (wrapped in an envelope by the loop).
    Publish {
        topic: IdentTopic,
        body: GossipBody,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Send a run message to one peer directly, without waiting for the answer
    /// (heartbeats: the next one repairs a lost one).
    Send { peer: PeerId, request: MeshRequest },
    /// Send a request-response request to a peer.
    Request {
        peer: PeerId,
        request: MeshRequest,
        reply: oneshot::Sender<Result<MeshResponse, String>>,
    },
    /// Open a link to a peer ahead of the run messages that will need it (dialed on
    /// demand, at the addresses of its signed record; it closes once idle like any
    /// on-demand link). Nothing when a link is open.
    Connect { peer: PeerId },
    /// Change the state this node announces.
    SetState(NodeState),
    /// Announce `leaving` and stop the loop.
    Shutdown,
}

/// Sends a request to a peer through the event loop and waits at most `limit` for its
/// answer. (The coordinator's `ask` is the same with its retry classes.)
pub async fn request(
    commands: &mpsc::Sender<MeshCommand>,
    peer: PeerId,
    request: MeshRequest,
    limit: Duration,
) -> Result<MeshResponse, String> {
    let (reply, rx) = oneshot::channel();
    commands
        .send(MeshCommand::Request {
            peer,
            request,
            reply,
        })
        .await
        .map_err(|_| "the mesh went away".to_string())?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err("the mesh went away".into()),
        Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
    }
}

/// The `topic` of a [`MeshEvent::Gossip`] that came directly from its sender
/// (`RunRequest::Message`), not over gossip.
pub const DIRECT: &str = "direct";

/// What the loop tells subscribers (run coordination, dashboard).
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// A decoded gossip message other than an announcement, or a run message sent
    /// to this node directly (topic [`DIRECT`]).
    Gossip {
        from: PeerId,
        topic: String,
        body: GossipBody,
    },
    /// A member changed state.
    Member(Transition),
}

/// A running mesh part of a node.
pub struct MeshHandle {
    pub peer_id: PeerId,
    pub view: SharedView,
    /// The addresses the swarm listens on (each with the port actually bound).
    pub listen_addrs: Vec<Multiaddr>,
    commands: mpsc::Sender<MeshCommand>,
    events: broadcast::Sender<MeshEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl MeshHandle {
    pub fn commands(&self) -> mpsc::Sender<MeshCommand> {
        self.commands.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<MeshEvent> {
        self.events.subscribe()
    }

    /// Announces `leaving` and waits (bounded) for the loop to end.
    pub async fn shutdown(self) {
        let _ = self.commands.send(MeshCommand::Shutdown).await;
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}

/// Builds the swarm, listens, dials the bootstrap peers and spawns the event loop.
pub async fn start(cfg: MeshConfig) -> Result<MeshHandle, String> {
    let peer_id = cfg.keypair.public().to_peer_id();
    let transport = transport::build(&cfg.keypair, cfg.psk)?;
    let timing = Timing {
        heartbeat: cfg.timing.gossip_heartbeat,
        ping_interval: cfg.timing.ping_interval,
        ping_timeout: cfg.timing.ping_timeout,
        // Identify is needed once per link (protocol version, addresses); a periodic
        // re-identify on every link would be idle traffic for nothing.
        identify_interval: Duration::from_secs(600),
        request_timeout: Duration::from_secs(30),
        mdns_query_interval: cfg.timing.mdns_query_interval,
    };
    let agent = format!("stampede/{}", env!("CARGO_PKG_VERSION"));
    let behaviour =
        MeshBehaviour::new(&cfg.keypair, &timing, cfg.protocol_version, agent, cfg.mdns)?;
    // Liveness is ours to judge (ping + announcements), so idle connections stay open.
    let swarm_cfg = libp2p::swarm::Config::with_tokio_executor()
        .with_idle_connection_timeout(Duration::from_secs(3600));
    let mut swarm = Swarm::new(transport, behaviour, peer_id, swarm_cfg);

    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(id);
    }
    // Wait until every listener has bound, so callers learn the real ports.
    let mut listen_addrs = Vec::new();
    let mut pending: Vec<_> = listeners.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        let ev =
            tokio::time::timeout_at(deadline, futures::StreamExt::select_next_some(&mut swarm))
                .await
                .map_err(|_| "timed out waiting for the mesh listeners to bind".to_string())?;
        match ev {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                listen_addrs.push(address);
                pending.retain(|l| *l != listener_id);
            }
            SwarmEvent::ListenerClosed { reason: Err(e), .. }
            | SwarmEvent::ListenerError { error: e, .. } => {
                return Err(format!("cannot listen: {e}"));
            }
            _ => {}
        }
    }

    let seq0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 * 1000)
        .unwrap_or(0);
    let mut self_announce = Announce {
        id: peer_id.to_string(),
        name: cfg.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol_version: cfg.protocol_version,
        labels: cfg.labels.clone(),
        // Peers refuse an announcement beyond MAX_WEIGHT; settings should refuse it first.
        capacity: cfg.capacity.clamp(1, stampede_protocol::run::MAX_WEIGHT),
        state: NodeState::Idle,
        allow_targets: cfg.allow_targets.clone(),
        addrs: listen_addrs.iter().map(|a| a.to_string()).collect(),
        seq: seq0,
        signature: Vec::new(),
    };
    membership::sign(&mut self_announce, &cfg.keypair);
    let mut view = View::new(peer_id, self_announce, cfg.timing.lost_after);
    view.refresh_floor_ms = cfg.timing.announce_interval.as_millis() as u64 * 60;
    let view: SharedView = Arc::new(RwLock::new(view));
    // Room for a witness's answers to every member of a large run at once.
    let (cmd_tx, cmd_rx) = mpsc::channel(2048);
    let (ev_tx, _) = broadcast::channel(1024);
    let mut lp = event_loop::EventLoop::new(
        swarm,
        view.clone(),
        cfg,
        cmd_rx,
        ev_tx.clone(),
        listen_addrs.clone(),
    )?;
    lp.dial_bootstrap(Instant::now());
    let task = tokio::spawn(lp.run());
    Ok(MeshHandle {
        peer_id,
        view,
        listen_addrs,
        commands: cmd_tx,
        events: ev_tx,
        task,
    })
}
