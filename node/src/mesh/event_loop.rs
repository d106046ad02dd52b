//! The mesh event loop: one task owns the Swarm and reacts to its events, to commands
//! from the rest of the node, and to one timer (check: every 250 ms while something
//! waits on a deadline, every [`SETTLED_CHECK`] when nothing does).
//!
//! It holds a bounded set of connections: [`NEIGHBOURS`] links it chose at random among
//! the members it knows alive, the links others chose to it, and short-lived ones (a
//! request to a member it is not connected to dials it on demand; a probe of a lost
//! neighbour). Past [`MAX_CONNECTIONS`] it closes links it did not choose. Membership
//! news travels by gossip over these links (see `membership.rs`).
//!
//! It must stay quick: no blocking work and no awaiting on other tasks inside an
//! event handler, so pings and gossip are never starved. Heavy work (load generation,
//! report merging) happens elsewhere and talks to the loop through `MeshCommand`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, PublishError};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use rand::Rng;
use stampede_protocol::membership::{must_refute, pick_neighbours, refresh_interval_ms};
use stampede_protocol::mesh::{
    Envelope, GossipBody, MeshRequest, MeshResponse, NodeState, SignedEnvelope, Suspicion,
    MAX_GOSSIP_BYTES, MAX_MEMBERS_IN_RESPONSE,
};
use stampede_protocol::run::{unix_us, RunRequest, RunResponse};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::behaviour::{
    announce_topic, control_topic, metrics_topic, parse_identify_protocol, MeshBehaviour,
    MeshBehaviourEvent,
};
use super::discovery::{dialable, Bootstrap, Redial};
use super::membership::{MemberState, REFRESH_PER_SECOND};
use super::{MeshCommand, MeshConfig, MeshEvent, MeshTiming, SharedView, DIRECT};

/// Links a node chooses itself (the default of the `neighbours` setting). With every node choosing 4 at random, each holds about
/// 8 (its own and others' choices), the graph is connected with high probability, and
/// gossipsub's mesh (`mesh_n` 4) can be formed from them.
pub const NEIGHBOURS: usize = 4;

/// Connections past which a node closes links it did not choose (the default of the
/// `max_connections` setting; a bootstrap peer is
/// dialed by every newcomer). Requests in flight, and links younger than
/// [`PRUNE_GRACE`], are kept.
pub const MAX_CONNECTIONS: usize = 12;

/// How long a link stays before it may be pruned: time for a newcomer to fetch the
/// members list and choose its own neighbours.
const PRUNE_GRACE: Duration = Duration::from_secs(10);

/// How long a connection opened for a request, and not chosen, stays after its last use.
const ON_DEMAND_IDLE: Duration = Duration::from_secs(15);

/// A peer is probed (re-dialed after its link closed) at most once per this long: a
/// probe's own link closes at once, and the other side, seeing that, probes back once;
/// this ends the exchange there.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// At most one re-announcement a second in answer to suspicions of this node (a hostile
/// member could otherwise make it announce at gossip speed).
const REFUTE_EVERY: Duration = Duration::from_secs(1);

/// At most one re-announcement per this long on reconnecting to a member we had lost
/// (a healed partition: the other side may hold us lost too).
const REJOIN_EVERY: Duration = Duration::from_secs(10);

/// Quick re-announcements of a joining node (see schedule_refresh).
const JOIN_ANNOUNCES: u32 = 3;

/// Lost members probed (dialed) per check, to notice a healed partition.
const LOST_PROBE_EVERY: Duration = Duration::from_secs(5);

/// The check's period when nothing waits on a short deadline (see [`check_every`]).
/// An idle node's wake-ups are its cost (docs/benchmarks.md, membership at scale: a
/// node's idle CPU is the scheduler's work of waking it, not the work done awake):
/// checking four times a second a view in which nothing can change with time alone
/// was four wake-ups a second for nothing. 1 s keeps the slow timers on time (the
/// slow refresh, join re-announcements at 2/4/8 s, lost-member probes every 5 s, the
/// prune grace of 10 s, the bootstrap retry of 2 s) to within a second.
const SETTLED_CHECK: Duration = Duration::from_secs(1);

/// The check's period: `fast` (lost_after / 8, at most 250 ms) while anything waits on
/// a deadline of the order of `lost_after` — a suspicion running out, a neighbour's
/// pings unanswered, a probe not yet connected, neighbours still to choose, no link at
/// all — so that a lost member is declared within a quarter second of its deadline, as
/// before; [`SETTLED_CHECK`] otherwise. A change of any of these comes with a swarm
/// event or a command, after which the loop asks again, so a settled node never sleeps
/// through one.
pub(crate) fn check_every(settled: bool, fast: Duration) -> Duration {
    if settled {
        SETTLED_CHECK.max(fast)
    } else {
        fast
    }
}

/// A gap between two turns of the loop past which this node counts itself paused (the
/// loop turns at least every [`SETTLED_CHECK`]).
const PAUSED_AFTER: Duration = Duration::from_millis(1500);

/// The reason `accept_gossip` gives for a message that is fine but not worth relaying.
const IGNORE: &str = "stale suspicion";

enum Pending {
    /// Our own "whom do you know?" on a new connection.
    Members,
    /// A request from a `MeshCommand::Request`.
    Command(oneshot::Sender<Result<MeshResponse, String>>),
}

pub struct EventLoop {
    swarm: Swarm<MeshBehaviour>,
    view: SharedView,
    commands: mpsc::Receiver<MeshCommand>,
    events: broadcast::Sender<MeshEvent>,
    timing: MeshTiming,
    protocol_version: u32,
    announce_topic: IdentTopic,
    listen_addrs: Vec<Multiaddr>,
    bootstrap: Vec<Bootstrap>,
    last_bootstrap: Option<Instant>,
    redial: Redial,
    pending: HashMap<OutboundRequestId, Pending>,
    announce_subscribers: HashSet<PeerId>,
    run_responder: super::RunResponder,
    /// Where peers' requests for a finished run's summary are answered from.
    results: Option<crate::reports::results::Results>,
    /// Signs this node's announcements, so that others can relay them.
    keypair: libp2p::identity::Keypair,
    /// The links this node chose, with when it chose them.
    chosen: HashMap<PeerId, Instant>,
    /// When each open connection was established (for pruning and short-link checks).
    opened: HashMap<ConnectionId, Instant>,
    /// When the current run of connections to each peer began.
    opened_by_peer: HashMap<PeerId, Instant>,
    /// Peers whose connection we close on purpose: their closing is no failure.
    closing: HashSet<PeerId>,
    /// Lost-looking neighbours being re-dialed, since when.
    probing: HashMap<PeerId, Instant>,
    /// When each peer was last probed.
    probed: HashMap<PeerId, Instant>,
    /// Peers dialed for a request, with their last use.
    on_demand: HashMap<PeerId, Instant>,
    /// Peers that closed a link we chose although alive (they are full): not chosen again
    /// for a while.
    cooldown: HashMap<PeerId, Instant>,
    last_announce: Option<Instant>,
    /// Announcements made so far (the first few come quickly: see schedule_refresh).
    announces: u32,
    last_refute: Option<Instant>,
    last_rejoin: Option<Instant>,
    last_lost_probe: Option<Instant>,
    next_refresh: Instant,
    /// Direct run messages out, one stream per peer.
    direct: super::direct::DirectLinks,
    /// Until `run` starts its reader.
    direct_inbound: Option<super::direct::Inbound>,
    /// The last nonce this node's gossip used (see `SignedEnvelope::nonce`).
    nonce: u64,
    /// When the loop last turned (see [`EventLoop::turn`]).
    last_turn: Instant,
}

impl EventLoop {
    pub fn new(
        mut swarm: Swarm<MeshBehaviour>,
        view: SharedView,
        cfg: MeshConfig,
        commands: mpsc::Receiver<MeshCommand>,
        events: broadcast::Sender<MeshEvent>,
        listen_addrs: Vec<Multiaddr>,
    ) -> Result<Self, String> {
        let announce_topic = announce_topic();
        for t in [
            announce_topic.clone(),
            control_topic(cfg.protocol_version),
            metrics_topic(cfg.protocol_version),
        ] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&t)
                .map_err(|e| format!("cannot subscribe to {t}: {e}"))?;
        }
        let control = swarm.behaviour().direct.new_control();
        let (direct, direct_inbound) = super::direct::DirectLinks::new(control)?;
        Ok(EventLoop {
            direct,
            direct_inbound: Some(direct_inbound),
            swarm,
            view,
            commands,
            events,
            timing: cfg.timing,
            protocol_version: cfg.protocol_version,
            announce_topic,
            listen_addrs,
            bootstrap: cfg.bootstrap,
            last_bootstrap: None,
            redial: Redial::default(),
            pending: HashMap::new(),
            announce_subscribers: HashSet::new(),
            run_responder: cfg.run_responder,
            results: cfg.results,
            keypair: cfg.keypair,
            chosen: HashMap::new(),
            opened: HashMap::new(),
            opened_by_peer: HashMap::new(),
            closing: HashSet::new(),
            probing: HashMap::new(),
            probed: HashMap::new(),
            on_demand: HashMap::new(),
            cooldown: HashMap::new(),
            last_announce: None,
            announces: 0,
            last_refute: None,
            last_rejoin: None,
            last_lost_probe: None,
            next_refresh: Instant::now(),
            // Above any number a previous run of this node used (its clock, in µs).
            nonce: unix_us(),
            last_turn: Instant::now(),
        })
    }

    pub async fn run(mut self) {
        let fast = (self.timing.lost_after / 8)
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut next_check = tokio::time::Instant::now() + fast;
        let mut direct_in = match self.direct_inbound.take() {
            Some(inbound) => inbound.spawn(),
            None => tokio::sync::mpsc::channel(1).1,
        };
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    self.turn();
                    self.on_swarm_event(ev);
                    self.refresh();
                }
                Some((peer, request)) = direct_in.recv() => {
                    // Answered nowhere: a direct stream carries no answers.
                    let _ = self.on_run_request(peer, request);
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(MeshCommand::Shutdown) => break,
                    Some(cmd) => {
                        self.turn();
                        self.on_command(cmd)
                    }
                },
                _ = tokio::time::sleep_until(next_check) => {
                    self.turn();
                    self.check();
                    next_check = tokio::time::Instant::now() + check_every(self.settled(), fast);
                    continue;
                }
            }
            // An event may have started a deadline (a link closed, a suspicion heard):
            // check again within `fast` of it, not only at the settled pace.
            if !self.settled() {
                next_check = next_check.min(tokio::time::Instant::now() + fast);
            }
        }
        self.leave().await;
    }

    /// Called first on every turn of the loop. The loop turns at least every
    /// [`SETTLED_CHECK`]; a longer gap means this process got no CPU (a starved or
    /// suspended machine), and whatever its neighbours sent meanwhile still waits in its
    /// sockets: their silence in that gap is this node's own, so it is not counted
    /// against them (as the run machine does with its peers), else a node waking from a
    /// stall would suspect its neighbours before reading what they sent.
    fn turn(&mut self) {
        let now = Instant::now();
        let gap = now.saturating_duration_since(self.last_turn);
        self.last_turn = now;
        if gap > PAUSED_AFTER {
            tracing::info!(gap_ms = gap.as_millis() as u64, "this node did not run for a while; its neighbours' silence in that gap is not held against them");
            if let Ok(mut v) = self.view.write() {
                v.paused(gap, now);
            }
        }
    }

    /// Nothing waits on a short deadline (see [`check_every`]).
    fn settled(&self) -> bool {
        self.probing.is_empty()
            && self.announces > JOIN_ANNOUNCES
            && self.chosen.len() >= self.timing.neighbours
            && self.swarm.connected_peers().next().is_some()
            && self.view.read().map(|v| v.settled()).unwrap_or(false)
    }

    async fn leave(&mut self) {
        self.set_state(NodeState::Leaving);
        self.announce();
        // Give the swarm a moment to flush the last announcement.
        let flush = async {
            loop {
                self.swarm.select_next_some().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(300), flush).await;
    }

    fn set_state(&mut self, state: NodeState) {
        if let Ok(mut v) = self.view.write() {
            v.self_announce.state = state;
            super::membership::sign(&mut v.self_announce, &self.keypair);
        }
    }

    fn announce(&mut self) {
        let now = Instant::now();
        self.last_announce = Some(now);
        self.announces = self.announces.saturating_add(1);
        self.schedule_refresh(now);
        let env = {
            let Ok(mut v) = self.view.write() else { return };
            v.self_announce.seq += 1;
            v.self_announce.addrs = self.listen_addrs.iter().map(|a| a.to_string()).collect();
            super::membership::sign(&mut v.self_announce, &self.keypair);
            Envelope {
                protocol_version: self.protocol_version,
                sender: v.self_id.to_string(),
                body: GossipBody::Announce(v.self_announce.clone()),
            }
        };
        let topic = self.announce_topic.clone();
        if let Err(e) = self.publish(topic, &env) {
            tracing::debug!(error = %e, "announcement not sent");
        }
    }

    /// The next unprompted re-announcement: slower in a larger mesh, jittered so the
    /// mesh's refreshes do not fall together.
    /// A joining node's first records go out again after 2, 4 and 8 s: its first one
    /// may meet a gossipsub mesh not yet grafted, and the slow refresh is a minute or more.
    fn schedule_refresh(&mut self, now: Instant) {
        if self.announces <= JOIN_ANNOUNCES {
            self.next_refresh = now + Duration::from_secs(1 << self.announces);
            return;
        }
        let (members, floor) = self
            .view
            .read()
            .map(|v| (v.members().count() + 1, v.refresh_floor_ms))
            .unwrap_or((1, 60_000));
        let every = refresh_interval_ms(members, floor, REFRESH_PER_SECOND);
        let jitter = rand::rng().random_range(0..=every / 4);
        self.next_refresh = now + Duration::from_millis(every - every / 8 + jitter);
    }

    /// Tells the mesh that `subject`'s record `seq` failed (our own evidence).
    fn publish_suspicion(&mut self, subject: PeerId, seq: u64) {
        tracing::info!(peer = %subject, seq, "neighbour failed; suspecting it");
        let env = Envelope {
            protocol_version: self.protocol_version,
            sender: self.swarm.local_peer_id().to_string(),
            body: GossipBody::Suspect(Suspicion {
                subject: subject.to_string(),
                seq,
            }),
        };
        let topic = self.announce_topic.clone();
        if let Err(e) = self.publish(topic, &env) {
            tracing::debug!(error = %e, "suspicion not sent");
        }
    }

    /// Our own evidence that `peer` failed: suspect it and say so.
    fn neighbour_failed(&mut self, peer: PeerId) {
        let seq = self
            .view
            .write()
            .ok()
            .and_then(|mut v| v.neighbour_failed(peer, Instant::now()));
        if let Some(seq) = seq {
            self.publish_suspicion(peer, seq);
        }
    }

    /// A suspicion of this node: refute it with a newer record (rate-limited).
    fn refute(&mut self, seq: u64) {
        let own = self.view.read().map(|v| v.self_announce.seq).unwrap_or(0);
        let now = Instant::now();
        let recent =
            matches!(self.last_refute, Some(t) if now.saturating_duration_since(t) < REFUTE_EVERY);
        if must_refute(own, seq) && !recent {
            self.last_refute = Some(now);
            tracing::info!(seq, "suspected by a member; refuting with a newer record");
            self.announce();
        }
    }

    /// Signs `env` (see `membership::seal`) and publishes it on `topic`.
    fn publish(&mut self, topic: IdentTopic, env: &Envelope) -> Result<(), String> {
        self.nonce = self.nonce.wrapping_add(1);
        let bytes = super::membership::seal(env, self.nonce, &self.keypair)?;
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(format!("message of {} bytes exceeds the gossip limit of {MAX_GOSSIP_BYTES} bytes; use a request instead", bytes.len()));
        }
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), bytes)
        {
            Ok(_) => Ok(()),
            // Nobody to tell yet (no subscription arrived): normal while joining.
            Err(PublishError::NoPeersSubscribedToTopic) => {
                Err(format!("no peer subscribed to {topic} yet"))
            }
            Err(e) => Err(format!("cannot publish on {topic}: {e}")),
        }
    }

    fn on_command(&mut self, cmd: MeshCommand) {
        match cmd {
            MeshCommand::Publish { topic, body, reply } => {
                let sender = self.swarm.local_peer_id().to_string();
                let env = Envelope {
                    protocol_version: self.protocol_version,
                    sender,
                    body,
                };
                let res = self.publish(topic, &env);
                let _ = reply.send(res);
            }
            MeshCommand::Request {
                peer,
                request,
                reply,
            } => {
                let addrs = self.request_addrs(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .request_response
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending.insert(id, Pending::Command(reply));
            }
            MeshCommand::Send { peer, mut request } => {
                if let MeshRequest::Run(RunRequest::Message {
                    protocol_version, ..
                }) = &mut request
                {
                    *protocol_version = self.protocol_version;
                }
                // The stream's writer opens it on the link this dial makes (or one
                // already open); the link closes once idle like any on-demand one.
                let addrs = self.request_addrs(&peer);
                if !addrs.is_empty() {
                    self.dial(peer, addrs);
                }
                if let Err(e) = self.direct.send(peer, &request) {
                    tracing::debug!(%peer, error = %e, "direct run message dropped");
                }
            }
            MeshCommand::Connect { peer } => {
                let addrs = self.request_addrs(&peer);
                if !addrs.is_empty() {
                    self.dial(peer, addrs);
                }
            }
            MeshCommand::SetState(s) => {
                self.set_state(s);
                self.announce();
            }
            MeshCommand::Shutdown => {}
        }
    }

    pub fn dial_bootstrap(&mut self, now: Instant) {
        self.last_bootstrap = Some(now);
        for b in self.bootstrap.clone() {
            if let Err(e) = self.swarm.dial(b.dial_opts()) {
                tracing::debug!(addr = %b.addr, error = %e, "bootstrap dial not started");
            }
        }
    }

    fn refresh(&mut self) {
        let changes = match self.view.write() {
            Ok(mut v) => v.refresh(Instant::now()),
            Err(_) => return,
        };
        for t in changes {
            let id = t.peer.to_string();
            match t.to {
                MemberState::Lost => tracing::warn!(peer = %id, name = %t.name, "member lost"),
                MemberState::Alive => tracing::info!(peer = %id, name = %t.name, "member alive"),
                MemberState::Incompatible => {
                    tracing::warn!(peer = %id, name = %t.name, "member speaks another protocol version: incompatible, it will not take part in runs")
                }
            }
            // A member silent this long on an open connection sits behind a dead link
            // (libp2p's ping reports the second failure only after a substream
            // negotiation timeout); drop the connection so a redial can take over.
            if t.to == MemberState::Lost && self.swarm.is_connected(&t.peer) {
                self.closing.insert(t.peer);
                let _ = self.swarm.disconnect_peer_id(t.peer);
                self.neighbour_failed(t.peer);
            }
            let _ = self.events.send(MeshEvent::Member(t));
        }
    }

    /// Where to reach `peer` for a request or a direct message: nothing when a link is
    /// open, else the addresses of its signed record (a member we hold no link to is
    /// dialed on demand, and the link closes once idle, see [`ON_DEMAND_IDLE`]).
    fn request_addrs(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        let addrs = if self.swarm.is_connected(peer) {
            Vec::new()
        } else {
            self.on_demand.insert(*peer, Instant::now());
            self.addrs_of(peer)
        };
        if let Some(t) = self.on_demand.get_mut(peer) {
            *t = Instant::now();
        }
        addrs
    }

    fn addrs_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.view
            .read()
            .ok()
            .and_then(|v| {
                v.member(peer)?
                    .announce
                    .as_ref()
                    .map(|a| dialable(&a.addrs))
            })
            .unwrap_or_default()
    }

    /// Periodic: refresh states, keep the chosen links, prune, probe, re-announce, and
    /// retry bootstrap peers while alone.
    fn check(&mut self) {
        self.refresh();
        let now = Instant::now();
        // A probe that has not connected within lost_after is a failure too (a stopped
        // process accepts TCP but never completes the handshake).
        let lost_after = self.timing.lost_after;
        let overdue: Vec<PeerId> = self
            .probing
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) > lost_after)
            .map(|(p, _)| *p)
            .collect();
        for p in overdue {
            self.probing.remove(&p);
            self.neighbour_failed(p);
        }
        self.probed
            .retain(|_, t| now.saturating_duration_since(*t) < PROBE_EVERY);
        self.keep_neighbours(now);
        self.prune(now);
        self.probe_lost(now);
        if now >= self.next_refresh && self.last_announce.is_some() {
            self.announce();
        }
        let alone = self.swarm.connected_peers().next().is_none();
        let due = !matches!(self.last_bootstrap, Some(t) if now.saturating_duration_since(t) < self.timing.bootstrap_retry);
        if alone && due && !self.bootstrap.is_empty() {
            self.dial_bootstrap(now);
        }
    }

    /// Holds `neighbours` chosen links: promotes links others opened to us first (no dial),
    /// then dials members at random.
    fn keep_neighbours(&mut self, now: Instant) {
        let lost_after = self.timing.lost_after;
        let swarm = &self.swarm;
        self.chosen.retain(|p, since| {
            swarm.is_connected(p) || now.saturating_duration_since(*since) < lost_after * 2
        });
        self.cooldown
            .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(60));
        let want = self.timing.neighbours;
        if self.chosen.len() >= want {
            return;
        }
        let alive: HashSet<PeerId> = match self.view.read() {
            Ok(v) => v.alive_peers().into_iter().collect(),
            Err(_) => return,
        };
        let mut rng = rand::rng();
        let connected: Vec<(u64, PeerId)> = self
            .swarm
            .connected_peers()
            .filter(|p| alive.contains(p) && !self.chosen.contains_key(p))
            .filter(|p| !self.probing.contains_key(p) && !self.closing.contains(p))
            .map(|p| (rng.random(), *p))
            .collect();
        for p in pick_neighbours(self.chosen.len(), want, connected) {
            self.chosen.insert(p, now);
            self.on_demand.remove(&p);
        }
        if self.chosen.len() >= want {
            return;
        }
        let candidates: Vec<(u64, PeerId, Vec<Multiaddr>)> = match self.view.read() {
            Ok(v) => v
                .neighbour_candidates()
                .filter(|(p, _)| !self.chosen.contains_key(p) && !self.cooldown.contains_key(p))
                .filter_map(|(p, m)| {
                    let addrs = dialable(&m.announce.as_ref()?.addrs);
                    (!addrs.is_empty()).then(|| (rng.random(), *p, addrs))
                })
                .collect(),
            Err(_) => return,
        };
        let ranked: Vec<(u64, PeerId)> = candidates.iter().map(|(r, p, _)| (*r, *p)).collect();
        for p in pick_neighbours(self.chosen.len(), want, ranked) {
            if !self.redial.due(p, now) {
                continue;
            }
            if let Some((_, _, addrs)) = candidates.iter().find(|(_, q, _)| *q == p) {
                self.chosen.insert(p, now);
                self.dial(p, addrs.clone());
            }
        }
    }

    /// Closes links this node did not choose: on-demand ones once idle, and, past
    /// `max_connections`, the newest others (old links are the stable part of the graph).
    fn prune(&mut self, now: Instant) {
        let idle: Vec<PeerId> = self
            .on_demand
            .iter()
            .filter(|(p, t)| {
                !self.chosen.contains_key(p) && now.saturating_duration_since(**t) > ON_DEMAND_IDLE
            })
            .map(|(p, _)| *p)
            .collect();
        for p in idle {
            self.on_demand.remove(&p);
            self.close_peer(p);
        }
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        // Links opened for requests close on their own once idle; they do not push
        // links of the graph out (a run's bundle and clock requests would churn it).
        let standing = connected
            .iter()
            .filter(|p| !self.on_demand.contains_key(p))
            .count();
        let mut excess = standing.saturating_sub(self.timing.max_connections);
        if excess == 0 {
            return;
        }
        let mut others: Vec<(Instant, PeerId)> = connected
            .iter()
            .filter(|p| !self.chosen.contains_key(p) && !self.on_demand.contains_key(p))
            .filter_map(|p| self.oldest_link(p).map(|t| (t, *p)))
            .filter(|(t, _)| now.saturating_duration_since(*t) >= PRUNE_GRACE)
            .collect();
        others.sort_by_key(|o| std::cmp::Reverse(o.0));
        for (_, p) in others {
            if excess == 0 {
                break;
            }
            excess -= 1;
            self.close_peer(p);
        }
    }

    fn oldest_link(&self, peer: &PeerId) -> Option<Instant> {
        self.opened_by_peer.get(peer).copied()
    }

    fn close_peer(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            tracing::debug!(%peer, "closing a link this node did not choose");
            self.closing.insert(peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Now and then dials one member we hold lost: after a healed partition, the two
    /// sides find each other again this way.
    fn probe_lost(&mut self, now: Instant) {
        if matches!(self.last_lost_probe, Some(t) if now.saturating_duration_since(t) < LOST_PROBE_EVERY)
        {
            return;
        }
        self.last_lost_probe = Some(now);
        let lost: Vec<(PeerId, Vec<Multiaddr>)> = match self.view.read() {
            Ok(v) => v
                .members()
                .filter(|(_, m)| m.state == MemberState::Lost && m.connections == 0)
                .filter(|(_, m)| !matches!(&m.announce, Some(a) if a.state == NodeState::Leaving))
                .filter_map(|(p, m)| Some((*p, dialable(&m.announce.as_ref()?.addrs))))
                .filter(|(_, a)| !a.is_empty())
                .collect(),
            Err(_) => return,
        };
        if lost.is_empty() {
            return;
        }
        let (p, addrs) = lost[rand::rng().random_range(0..lost.len())].clone();
        if self.redial.due(p, now) {
            self.on_demand.insert(p, now);
            self.dial(p, addrs);
        }
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial not started");
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<MeshBehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address)
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                let now = Instant::now();
                self.redial.connected(&peer_id);
                self.opened.insert(connection_id, now);
                self.opened_by_peer.entry(peer_id).or_insert(now);
                // What we knew of it before this link (unknown, alive, lost).
                let before = match self.view.write() {
                    Ok(mut v) => {
                        let before = v
                            .member(&peer_id)
                            .filter(|m| m.announce.is_some())
                            .map(|m| m.state);
                        v.connected(peer_id, now);
                        before
                    }
                    Err(_) => None,
                };
                if self.probing.remove(&peer_id).is_some() {
                    // It answered: alive. It had closed the link we chose, so it is
                    // full; choose someone else and close this probe.
                    tracing::debug!(peer = %peer_id, "probe connected; the member is alive");
                    self.chosen.remove(&peer_id);
                    self.cooldown.insert(peer_id, now);
                    self.close_peer(peer_id);
                    return;
                }
                if num_established.get() != 1 {
                    return;
                }
                let alone = self.swarm.connected_peers().nth(1).is_none();
                let lost = before == Some(MemberState::Lost);
                // The members list is O(members): asked when joining (our first link),
                // of a member we do not know, or of one we had lost (a healed
                // partition: either side may have missed the other's news).
                if alone || before.is_none() || lost {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .request_response
                        .send_request(&peer_id, MeshRequest::Members);
                    self.pending.insert(id, Pending::Members);
                }
                let rejoin_due = !matches!(self.last_rejoin, Some(t) if now.saturating_duration_since(t) < REJOIN_EVERY);
                if lost && rejoin_due && self.last_announce.is_some() {
                    self.last_rejoin = Some(now);
                    self.announce();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, remaining = num_established, cause = ?cause, "connection closed");
                let now = Instant::now();
                self.opened.remove(&connection_id);
                let leaving = match self.view.write() {
                    Ok(mut v) => {
                        v.disconnected(peer_id, num_established as usize);
                        matches!(v.member(&peer_id).and_then(|m| m.announce.as_ref()), Some(a) if a.state == NodeState::Leaving)
                    }
                    Err(_) => false,
                };
                if num_established > 0 {
                    return;
                }
                self.announce_subscribers.remove(&peer_id);
                self.opened_by_peer.remove(&peer_id);
                let ours = self.closing.remove(&peer_id);
                let on_demand = self.on_demand.remove(&peer_id).is_some();
                // A link we closed, or a leaving member's, is no failure; a peer probed
                // lately (this may be its probe's link closing) is not probed again.
                let probed_lately = matches!(self.probed.get(&peer_id), Some(t) if now.saturating_duration_since(*t) < PROBE_EVERY);
                if ours || leaving || on_demand || probed_lately {
                    return;
                }
                // Dead, or closing a link it did not want: re-dial to tell which.
                let addrs = self.addrs_of(&peer_id);
                if addrs.is_empty() {
                    return;
                }
                self.probing.insert(peer_id, now);
                self.probed.insert(peer_id, now);
                self.dial(peer_id, addrs);
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // A peer without our key fails here (pnet scrambles its noise handshake).
                tracing::info!(from = %send_back_addr, error = %error, "refused an incoming connection (another mesh key, or not a stampede node?)");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
                if let Some(p) = peer_id {
                    if self.probing.remove(&p).is_some() {
                        self.neighbour_failed(p);
                    }
                    self.chosen.remove(&p);
                }
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: MeshBehaviourEvent) {
        match ev {
            MeshBehaviourEvent::Gossipsub(ev) => self.on_gossip(ev),
            MeshBehaviourEvent::RequestResponse(ev) => self.on_request_response(ev),
            MeshBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                match parse_identify_protocol(&info.protocol_version) {
                    Some(v) => {
                        if let Ok(mut view) = self.view.write() {
                            view.identified(peer_id, v, Instant::now());
                        }
                        for a in info
                            .listen_addrs
                            .iter()
                            .take(stampede_protocol::mesh::MAX_ADDRS)
                        {
                            self.swarm.add_peer_address(peer_id, a.clone());
                        }
                    }
                    None => {
                        tracing::debug!(peer = %peer_id, protocol = %info.protocol_version, "peer is not a stampede node")
                    }
                }
            }
            MeshBehaviourEvent::Identify(_) => {}
            MeshBehaviourEvent::Direct(()) => {}
            // A peer without ping (not a stampede node) is judged by its announcements.
            MeshBehaviourEvent::Ping(ping::Event {
                result: Err(ping::Failure::Unsupported),
                ..
            }) => {}
            MeshBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                // A neighbour that still delivers other messages (gossip it relays,
                // requests, answers) within lost_after is starved or busy, not gone: the
                // silence rule (`View::refresh`: nothing at all from it for lost_after)
                // judges it. Closing and suspecting at a ping's 2 s timeout made every
                // node of a starved machine drop, redial and suspect its neighbours at
                // the same instant — more work exactly when there is no CPU
                // (docs/benchmarks.md, 100 real nodes). A dead or stopped peer sends
                // nothing, so it is still lost at most lost_after after its last message.
                let now = Instant::now();
                if self
                    .view
                    .read()
                    .map(|v| v.heard_lately(&peer, now))
                    .unwrap_or(false)
                {
                    tracing::debug!(%peer, error = %e, "ping failed, but the neighbour still delivers messages; its silence will judge it");
                    return;
                }
                // Ping failures do not close connections by themselves; a dead peer must
                // be noticed in seconds, so close it and let membership judge.
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
                self.neighbour_failed(peer);
            }
            MeshBehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(_),
                ..
            }) => {
                if let Ok(mut v) = self.view.write() {
                    v.heard(peer, Instant::now());
                }
            }
            MeshBehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (p, a) in found {
                    // mDNS also advertises loopback addresses (libp2p#5995); on another
                    // host they would reach the wrong machine.
                    let loopback = a.iter().any(|p| match p {
                        libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
                        libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
                        _ => false,
                    });
                    if !loopback {
                        by_peer.entry(p).or_default().push(a);
                    }
                }
                for (peer, addrs) in by_peer {
                    if peer != *self.swarm.local_peer_id() && !self.swarm.is_connected(&peer) {
                        tracing::debug!(%peer, "discovered by mDNS");
                        self.dial(peer, addrs);
                    }
                }
            }
            MeshBehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
        }
    }

    fn on_gossip(&mut self, ev: gossipsub::Event) {
        match ev {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                // The neighbour that relayed it is alive and its link works.
                self.heard_from(propagation_source);
                let acceptance = match self.accept_gossip(&message, propagation_source) {
                    Ok(()) => MessageAcceptance::Accept,
                    Err(reason) if reason == IGNORE => MessageAcceptance::Ignore,
                    Err(reason) => {
                        tracing::debug!(from = %propagation_source, %reason, "dropped a gossip message");
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            // Our record goes out once we have someone to tell; after that only on a
            // change, a refutation, a rejoin or the slow refresh (members joining later
            // get it in a members list).
            gossipsub::Event::Subscribed { peer_id, topic }
                if topic == self.announce_topic.hash()
                    && self.announce_subscribers.insert(peer_id)
                    && self.last_announce.is_none() =>
            {
                self.announce();
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                tracing::debug!(peer = %peer_id, "peer does not speak gossipsub");
            }
            _ => {}
        }
    }

    /// Checks a gossip message (once: gossipsub hands over only the first copy of each
    /// id) and acts on it. Nothing reads a message before its signature is checked, and
    /// an error keeps it from being relayed.
    fn accept_gossip(&mut self, message: &gossipsub::Message, via: PeerId) -> Result<(), String> {
        let now = Instant::now();
        let signed = match SignedEnvelope::decode(&message.data) {
            Ok(signed) => signed,
            Err(e) => {
                // Another protocol version's wire form: only its header is readable, and
                // no signature of ours vouches for it, so it is believed only from the
                // neighbour it names (the link's handshake authenticated that one).
                let header = Envelope::decode_header(&message.data).map_err(|_| e.to_string())?;
                if header.protocol_version == self.protocol_version
                    || header.sender != via.to_string()
                {
                    return Err(e.to_string());
                }
                if let Ok(mut v) = self.view.write() {
                    v.heard_version(via, header.protocol_version, now);
                }
                return Ok(());
            }
        };
        let source = super::membership::open_sender(&signed)?;
        let env = match signed.open() {
            Ok(env) => env,
            Err(e) => {
                // Another protocol version may have a body we cannot read; it is signed,
                // so its sender can still be shown as incompatible.
                if signed.protocol_version == self.protocol_version {
                    return Err(e.to_string());
                }
                if let Ok(mut v) = self.view.write() {
                    v.heard_version(source, signed.protocol_version, now);
                }
                return Ok(());
            }
        };
        match env.body {
            GossipBody::Announce(a) => {
                if a.id != env.sender {
                    return Err(format!("announcement of {} sent by {}", a.id, env.sender));
                }
                // Remembered, not dialed: links are chosen (keep_neighbours), not made
                // to everyone heard of.
                if let Ok(mut v) = self.view.write() {
                    v.heard_announce(source, a, now);
                }
            }
            GossipBody::Suspect(s) => {
                let subject: PeerId = s
                    .subject
                    .parse()
                    .map_err(|_| format!("suspicion of {} names no peer id", s.subject))?;
                if subject == *self.swarm.local_peer_id() {
                    self.refute(s.seq);
                    return Ok(());
                }
                let news = self
                    .view
                    .write()
                    .map(|mut v| v.suspected(subject, s.seq, now))
                    .unwrap_or(false);
                if !news {
                    // Stale or already known: not worth passing on.
                    return Err(IGNORE.into());
                }
            }
            // Run coordination's kinds go to its subscriber (the coordinator).
            body => {
                if env.protocol_version == self.protocol_version {
                    let _ = self.events.send(MeshEvent::Gossip {
                        from: source,
                        topic: message.topic.to_string(),
                        body,
                    });
                }
            }
        }
        Ok(())
    }

    /// A direct run message or a second going up the aggregation tree, from `peer`
    /// (by its stream, or as a request): to the run driver, like gossip (validated
    /// there). Other requests are not run messages.
    fn on_run_request(&mut self, peer: PeerId, request: MeshRequest) -> MeshResponse {
        // A link that carries a run's messages to this node is in use, like one this
        // node dialed for a request: it closes once idle, and it is no standing link
        // for `prune` to cut past `max_connections` — a witness holds a link to every
        // member of a large run, and cutting them made every member re-dial (a noise
        // handshake, a heartbeat or two lost) every `PRUNE_GRACE`.
        if !self.chosen.contains_key(&peer) {
            self.on_demand.insert(peer, Instant::now());
        }
        self.heard_from(peer);
        let body = match request {
            MeshRequest::Run(RunRequest::Batch(b)) => GossipBody::Batch(b),
            MeshRequest::Run(RunRequest::Message {
                protocol_version,
                msg,
            }) => {
                if protocol_version != self.protocol_version {
                    return MeshResponse::Refused {
                        reason: format!(
                            "protocol version {protocol_version}, this node speaks {}",
                            self.protocol_version
                        ),
                    };
                }
                GossipBody::Run(msg)
            }
            _ => {
                return MeshResponse::Refused {
                    reason: "not a run message".into(),
                }
            }
        };
        let _ = self.events.send(MeshEvent::Gossip {
            from: peer,
            topic: DIRECT.into(),
            body,
        });
        MeshResponse::Run(RunResponse::Received)
    }

    /// A message arrived from `peer` over its link: a sign of life, like an answered ping.
    fn heard_from(&mut self, peer: PeerId) {
        if let Ok(mut v) = self.view.write() {
            v.heard(peer, Instant::now());
        }
    }

    fn on_request_response(&mut self, ev: request_response::Event<MeshRequest, MeshResponse>) {
        if let request_response::Event::Message { peer, .. } = &ev {
            self.heard_from(*peer);
        }
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let response = match request {
                        // Direct run messages from a node that still sends them as
                        // requests; today's nodes use a direct stream.
                        r @ MeshRequest::Run(RunRequest::Batch(_) | RunRequest::Message { .. }) => {
                            self.on_run_request(peer, r)
                        }
                        // One bounded file read (a few MiB at most), from the data dir.
                        MeshRequest::Run(RunRequest::Summary { run_id }) => {
                            MeshResponse::Run(match &self.results {
                                Some(r) => r.summary_answer(&run_id),
                                None => RunResponse::Refused {
                                    reason: "this node keeps no run results".into(),
                                },
                            })
                        }
                        MeshRequest::Run(req) => match &self.run_responder.0 {
                            Some(answer) => MeshResponse::Run(answer(req)),
                            None => MeshResponse::Refused {
                                reason: "this node takes no part in runs".into(),
                            },
                        },
                        MeshRequest::Members => match self.view.read() {
                            Ok(v) => {
                                let mut members = v.known_announces();
                                members.truncate(MAX_MEMBERS_IN_RESPONSE);
                                let mut lost = v.known_lost();
                                lost.truncate(MAX_MEMBERS_IN_RESPONSE);
                                MeshResponse::Members {
                                    protocol_version: self.protocol_version,
                                    members,
                                    lost,
                                }
                            }
                            Err(_) => MeshResponse::Refused {
                                reason: "membership view unavailable".into(),
                            },
                        },
                    };
                    if self
                        .swarm
                        .behaviour_mut()
                        .request_response
                        .send_response(channel, response)
                        .is_err()
                    {
                        tracing::debug!(%peer, "response not sent: the requester went away");
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => match self.pending.remove(&request_id) {
                    Some(Pending::Members) => self.learn_members(peer, response),
                    Some(Pending::Command(reply)) => {
                        let _ = reply.send(Ok(response));
                    }
                    None => {}
                },
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, error = %error, "request failed");
                if let Some(Pending::Command(reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(format!("request to {peer} failed: {error}")));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn learn_members(&mut self, from: PeerId, response: MeshResponse) {
        let MeshResponse::Members {
            protocol_version,
            members,
            lost,
        } = response
        else {
            return;
        };
        if protocol_version != self.protocol_version {
            return;
        }
        let now = Instant::now();
        let me = *self.swarm.local_peer_id();
        let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        let mut refute = None;
        if let Ok(mut v) = self.view.write() {
            for a in members.into_iter().take(MAX_MEMBERS_IN_RESPONSE) {
                if a.validate().is_err() {
                    continue;
                }
                // Links are chosen later (keep_neighbours), not made to every member.
                v.learned_announce(a, now);
            }
            // What the peer holds lost: a suspicion of that record here too (its
            // subject, if alive, refutes), and news to us if it is us.
            for s in lost.into_iter().take(MAX_MEMBERS_IN_RESPONSE) {
                let Ok(subject) = s.subject.parse::<PeerId>() else {
                    continue;
                };
                if subject == me {
                    refute = Some(s.seq);
                } else if subject != from && !connected.contains(&subject) {
                    // (A neighbour we hear ourselves is judged by its pings.)
                    v.suspected(subject, s.seq, now);
                }
            }
        }
        if let Some(seq) = refute {
            self.refute(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_is_fast_only_while_something_waits_on_a_deadline() {
        let fast = Duration::from_millis(250);
        assert_eq!(check_every(false, fast), fast);
        assert_eq!(check_every(true, fast), SETTLED_CHECK);
        // A lost_after so long that its fast check is slower than the settled one
        // never makes a settled node check more often than an unsettled one.
        let slow = Duration::from_secs(2);
        assert_eq!(check_every(true, slow), slow);
    }
}
