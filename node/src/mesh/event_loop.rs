//! The mesh event loop: one task owns the Swarm and reacts to its events, to commands
//! from the rest of the node, and to two timers (announce, check).
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
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use stampede_protocol::mesh::{
    Envelope, GossipBody, MeshRequest, MeshResponse, NodeState, MAX_GOSSIP_BYTES,
    MAX_MEMBERS_IN_RESPONSE,
};
use stampede_protocol::run::{unix_us, RunRequest, RunResponse};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::behaviour::{
    announce_topic, control_topic, metrics_topic, parse_identify_protocol, MeshBehaviour,
    MeshBehaviourEvent,
};
use super::discovery::{dialable, Bootstrap, Redial};
use super::membership::MemberState;
use super::{MeshCommand, MeshConfig, MeshEvent, MeshTiming, SharedView, DIRECT};

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
        Ok(EventLoop {
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
        })
    }

    pub async fn run(mut self) {
        let mut announce = tokio::time::interval(self.timing.announce_interval);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let check_every = (self.timing.lost_after / 8)
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut check = tokio::time::interval(check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    self.on_swarm_event(ev);
                    self.refresh();
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(MeshCommand::Shutdown) => break,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = announce.tick() => self.announce(),
                _ = check.tick() => self.check(),
            }
        }
        self.leave().await;
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
        if let Err(e) = self.publish(topic, env.encode()) {
            tracing::debug!(error = %e, "announcement not sent");
        }
    }

    fn publish(&mut self, topic: IdentTopic, bytes: Vec<u8>) -> Result<(), String> {
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
                let bytes = env.encode();
                let res = if bytes.len() > MAX_GOSSIP_BYTES {
                    Err(format!("message of {} bytes exceeds the gossip limit of {MAX_GOSSIP_BYTES} bytes; use a request instead", bytes.len()))
                } else {
                    self.publish(topic, bytes)
                };
                let _ = reply.send(res);
            }
            MeshCommand::Request {
                peer,
                mut request,
                reply,
            } => {
                stamp_clock_request(&mut request);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .request_response
                    .send_request(&peer, request);
                self.pending.insert(id, Pending::Command(reply));
            }
            MeshCommand::Send { peer, mut request } => {
                if let MeshRequest::Run(RunRequest::Message {
                    protocol_version, ..
                }) = &mut request
                {
                    *protocol_version = self.protocol_version;
                }
                // Fire and forget: the answer (`Received`) matches no pending entry
                // and is dropped; a failure is only logged.
                self.swarm
                    .behaviour_mut()
                    .request_response
                    .send_request(&peer, request);
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
                let _ = self.swarm.disconnect_peer_id(t.peer);
            }
            let _ = self.events.send(MeshEvent::Member(t));
        }
    }

    /// Periodic: refresh states, dial members we know but are not connected to, and
    /// retry bootstrap peers while alone.
    fn check(&mut self) {
        self.refresh();
        let now = Instant::now();
        let targets: Vec<(PeerId, Vec<Multiaddr>)> = match self.view.read() {
            Ok(v) => v
                .members()
                .filter(|(_, m)| m.connections == 0)
                .filter_map(|(p, m)| m.announce.as_ref().map(|a| (*p, dialable(&a.addrs))))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (peer, addrs) in targets {
            if !self.swarm.is_connected(&peer) && !addrs.is_empty() && self.redial.due(peer, now) {
                self.dial(peer, addrs);
            }
        }
        let alone = self.swarm.connected_peers().next().is_none();
        let due = !matches!(self.last_bootstrap, Some(t) if now.saturating_duration_since(t) < self.timing.bootstrap_retry);
        if alone && due && !self.bootstrap.is_empty() {
            self.dial_bootstrap(now);
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
                num_established,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.redial.connected(&peer_id);
                if let Ok(mut v) = self.view.write() {
                    v.connected(peer_id, Instant::now());
                }
                if num_established.get() == 1 {
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .request_response
                        .send_request(&peer_id, MeshRequest::Members);
                    self.pending.insert(id, Pending::Members);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, remaining = num_established, cause = ?cause, "connection closed");
                if let Ok(mut v) = self.view.write() {
                    v.disconnected(peer_id, num_established as usize);
                }
                if num_established == 0 {
                    self.announce_subscribers.remove(&peer_id);
                }
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
                // Ping failures do not close connections by themselves; a dead peer must
                // be noticed in seconds, so close it and let membership judge.
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
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
                let acceptance = match self.accept_gossip(&message) {
                    Ok(()) => MessageAcceptance::Accept,
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
            // A newcomer should not wait a full interval to learn about us.
            gossipsub::Event::Subscribed { peer_id, topic }
                if topic == self.announce_topic.hash()
                    && self.announce_subscribers.insert(peer_id) =>
            {
                self.announce();
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                tracing::debug!(peer = %peer_id, "peer does not speak gossipsub");
            }
            _ => {}
        }
    }

    fn accept_gossip(&mut self, message: &gossipsub::Message) -> Result<(), String> {
        let source = message.source.ok_or("unsigned message")?;
        let now = Instant::now();
        let env = match Envelope::decode(&message.data) {
            Ok(env) => env,
            Err(e) => {
                // Another protocol version may have a body we cannot read; its header
                // is stable, so it can still be shown as incompatible.
                let header = Envelope::decode_header(&message.data).map_err(|_| e.to_string())?;
                if header.protocol_version == self.protocol_version
                    || header.sender != source.to_string()
                {
                    return Err(e.to_string());
                }
                if let Ok(mut v) = self.view.write() {
                    v.heard_version(source, header.protocol_version, now);
                }
                return Ok(());
            }
        };
        if env.sender != source.to_string() {
            return Err(format!(
                "envelope sender {} is not the signer {source}",
                env.sender
            ));
        }
        match env.body {
            GossipBody::Announce(a) => {
                if a.id != env.sender {
                    return Err(format!("announcement of {} sent by {}", a.id, env.sender));
                }
                let addrs = dialable(&a.addrs);
                if let Ok(mut v) = self.view.write() {
                    v.heard_announce(source, a, now);
                }
                if !self.swarm.is_connected(&source)
                    && !addrs.is_empty()
                    && self.redial.due(source, now)
                {
                    self.dial(source, addrs);
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

    fn on_request_response(&mut self, ev: request_response::Event<MeshRequest, MeshResponse>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let response = match request {
                        MeshRequest::Run(RunRequest::Message {
                            protocol_version,
                            msg,
                        }) => {
                            if protocol_version == self.protocol_version {
                                let _ = self.events.send(MeshEvent::Gossip {
                                    from: peer,
                                    topic: DIRECT.into(),
                                    body: GossipBody::Run(msg),
                                });
                                MeshResponse::Run(RunResponse::Received)
                            } else {
                                MeshResponse::Refused {
                                    reason: format!(
                                        "protocol version {protocol_version}, this node speaks {}",
                                        self.protocol_version
                                    ),
                                }
                            }
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
                                MeshResponse::Members {
                                    protocol_version: self.protocol_version,
                                    members,
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
                        let mut response = response;
                        stamp_clock_response(&mut response);
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
        } = response
        else {
            return;
        };
        if protocol_version != self.protocol_version {
            return;
        }
        let now = Instant::now();
        let mut to_dial = Vec::new();
        if let Ok(mut v) = self.view.write() {
            for a in members.into_iter().take(MAX_MEMBERS_IN_RESPONSE) {
                if a.validate().is_err() {
                    continue;
                }
                let addrs = dialable(&a.addrs);
                let is_sender = a.id == from.to_string();
                if let Some(p) = v.learned_announce(a, now) {
                    if !is_sender {
                        to_dial.push((p, addrs));
                    }
                }
            }
        }
        for (p, addrs) in to_dial {
            if !self.swarm.is_connected(&p) && !addrs.is_empty() && self.redial.due(p, now) {
                self.dial(p, addrs);
            }
        }
    }
}

/// A clock sample's send time, taken here as the request goes to the wire rather than
/// where it was asked for: the channel to this loop and the wait for its turn are not
/// network delay, and only the outbound leg would have them.
fn stamp_clock_request(request: &mut MeshRequest) {
    if let MeshRequest::Run(RunRequest::Clock { t1_us }) = request {
        *t1_us = unix_us();
    }
}

/// A clock sample's receive time, taken as the response comes off the wire: the same
/// point of the path as its send time, so the two legs are measured alike.
fn stamp_clock_response(response: &mut MeshResponse) {
    if let MeshResponse::Run(RunResponse::Clock { received_us, .. }) = response {
        *received_us = Some(unix_us());
    }
}
