//! The membership view: who is in the mesh as this node sees it, and in which state
//! (alive, lost, incompatible).
//!
//! The event loop feeds it facts (announcements heard, connections opened and closed,
//! protocol versions seen); readers (control endpoint, HTTP status) take snapshots. It
//! must not do I/O: every method is a quick in-memory update, because it runs under a
//! lock shared with the HTTP and control handlers.
//!
//! Liveness has two sources. A neighbour (a member we hold a connection to) is judged
//! by what we see ourselves: answered pings, or `lost_after` of silence. Every other
//! member is judged by rumor ([`stampede_protocol::membership::Liveness`]): alive from
//! its record until a suspicion of that record, raised by one of its neighbours, goes
//! unrefuted for the suspicion timeout. Nothing periodic is needed from non-neighbours,
//! so a node's idle traffic does not grow with the mesh.
//!
//! An announcement that reaches us from a third party (a members list) is installed
//! only when its subject signed it ([`verify`]): no member can make up or alter another
//! node's name, labels, state or sequence number. Sequence numbers start at the
//! subject's clock (Unix µs) and are refused past [`MAX_SEQ_AHEAD_US`] ahead of ours, so
//! no announcement can pin a node's record for ever.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use stampede_protocol::membership::{Liveness, Rumor};
use stampede_protocol::mesh::{Announce, Envelope, NodeState, SignedEnvelope, MAX_SEQ_AHEAD_US};

/// Most members the view takes in from third parties' lists (a run has at most as
/// many members): past it, a list can no longer add ids, only update known ones.
pub const MAX_VIEW_MEMBERS: usize = stampede_protocol::run::MAX_MEMBERS;

/// Signs `announce` as its subject, with the subject's identity key.
pub fn sign(announce: &mut Announce, keypair: &Keypair) {
    match keypair.sign(&announce.signed_bytes()) {
        Ok(sig) => announce.signature = sig,
        // Every key type we make (ed25519) signs; an unsigned record is only refused by
        // third parties, never by the peers that hear it from us.
        Err(e) => tracing::warn!(error = %e, "cannot sign this node's announcement"),
    }
}

/// The subject of an announcement, if the announcement is signed by the identity key its
/// peer id names and its sequence number is not from the future.
pub fn verify(announce: &Announce, now_unix_us: u64) -> Result<PeerId, String> {
    let peer: PeerId = announce
        .id
        .parse()
        .map_err(|_| format!("announcement id {} is not a peer id", announce.id))?;
    check_seq(announce, now_unix_us)?;
    let key = public_key(&peer)?;
    if !key.verify(&announce.signed_bytes(), &announce.signature) {
        return Err(format!("announcement of {peer} is not signed by {peer}"));
    }
    Ok(peer)
}

/// The public key a peer id names: ed25519 peer ids hold the key itself (an identity
/// multihash); other ids are hashes, and no key can be checked against them.
fn public_key(peer: &PeerId) -> Result<PublicKey, String> {
    let hash = peer.as_ref();
    (hash.code() == 0)
        .then(|| PublicKey::try_decode_protobuf(hash.digest()).ok())
        .flatten()
        .ok_or_else(|| format!("peer id {peer} does not carry its public key"))
}

/// The gossip wire form of `env`, signed with this node's identity key (`nonce`: a
/// number this node never used before, see [`SignedEnvelope::nonce`]).
pub fn seal(env: &Envelope, nonce: u64, keypair: &Keypair) -> Result<Vec<u8>, String> {
    let mut signed = SignedEnvelope::new(env, nonce);
    signed.signature = keypair
        .sign(&signed.signed_bytes())
        .map_err(|e| format!("cannot sign a gossip message: {e}"))?;
    Ok(signed.encode())
}

/// The sender of a gossip message, if the identity key its `sender` names signed it.
/// This is what stops one holder of the mesh key from speaking as another member
/// (announcing for it, proposing or stopping runs in its name, sending its seconds):
/// gossipsub itself no longer signs (see `behaviour::gossipsub_config`).
pub fn open_sender(signed: &SignedEnvelope) -> Result<PeerId, String> {
    let peer: PeerId = signed
        .sender
        .parse()
        .map_err(|_| format!("gossip sender {} is not a peer id", signed.sender))?;
    if !public_key(&peer)?.verify(&signed.signed_bytes(), &signed.signature) {
        return Err(format!(
            "gossip message claiming to be from {peer} is not signed by it"
        ));
    }
    Ok(peer)
}

fn check_seq(announce: &Announce, now_unix_us: u64) -> Result<(), String> {
    if announce.seq > now_unix_us.saturating_add(MAX_SEQ_AHEAD_US) {
        return Err(format!(
            "announcement of {} has seq {}, more than an hour ahead of this clock",
            announce.id, announce.seq
        ));
    }
    Ok(())
}

/// A member's state as the user sees it (spec §10: `alive` | `lost` | `incompatible`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Alive,
    Lost,
    Incompatible,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Lost => "lost",
            MemberState::Incompatible => "incompatible",
        }
    }
}

/// What this node knows about one other node.
#[derive(Debug, Clone)]
pub struct Member {
    pub announce: Option<Announce>,
    /// The protocol version seen (identify or announcement), even if its messages
    /// could not be decoded.
    pub protocol_version: Option<u32>,
    /// Last direct sign of life: an announcement (also relayed) or a new connection.
    pub last_heard: Instant,
    pub connections: usize,
    pub state: MemberState,
    /// When the member was last marked lost, for the log and for forgetting it.
    pub lost_since: Option<Instant>,
    /// Whether the member's state has been reported (logged) at least once.
    reported: bool,
}

/// One row of `stampede peers --json` (spec §10; fields only ever added).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberRow {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub protocol_version: Option<u32>,
    pub state: MemberState,
    /// What the node says it is doing (idle, running, leaving).
    pub node_state: Option<String>,
    pub capacity: Option<u32>,
    pub allow_targets: Vec<String>,
    pub addrs: Vec<String>,
    pub connected: bool,
    /// Milliseconds since this node last heard from the member (0 for itself).
    pub last_heard_ms: u64,
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// A change worth logging or reacting to.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub peer: PeerId,
    pub name: String,
    pub from: Option<MemberState>,
    pub to: MemberState,
}

/// The view. `lost_after` is how long a neighbour may be silent (no announcement, no
/// answered ping on a connection, no new connection) before it counts as lost, and how
/// long a suspicion of any member may go unrefuted.
#[derive(Debug)]
pub struct View {
    pub self_id: PeerId,
    pub self_announce: Announce,
    pub protocol_version: u32,
    pub lost_after: Duration,
    /// Lost members are forgotten after this long.
    pub forget_after: Duration,
    members: HashMap<PeerId, Member>,
    /// Rumors about every member's current record (for the members we are not connected to).
    liveness: Liveness<PeerId>,
    /// The origin of the liveness clock (it counts milliseconds).
    epoch: Instant,
    /// The shortest interval of members' slow refresh (60 × announce_interval).
    pub refresh_floor_ms: u64,
    /// Whether the last `refresh` found nothing about to change with time alone: no
    /// suspicion running out, no neighbour past half of `lost_after` without a ping
    /// answered, no record-less connection timing out. See [`View::settled`].
    settled: bool,
}

/// Records the mesh re-announces per second when nothing changes (each node's refresh
/// interval is members / this, at least `refresh_floor_ms`): each node receives about
/// this many a second at any mesh size.
pub const REFRESH_PER_SECOND: f64 = 1.0;

impl View {
    pub fn new(self_id: PeerId, self_announce: Announce, lost_after: Duration) -> Self {
        let protocol_version = self_announce.protocol_version;
        View {
            self_id,
            self_announce,
            protocol_version,
            lost_after,
            forget_after: Duration::from_secs(600),
            members: HashMap::new(),
            liveness: Liveness::new(lost_after.as_millis() as u64),
            epoch: Instant::now(),
            refresh_floor_ms: 60_000,
            settled: true,
        }
    }

    /// Whether, as of the last [`View::refresh`], no member's state is waiting on a
    /// deadline shorter than a few seconds (a suspicion's `lost_after`, a neighbour whose
    /// pings have gone unanswered for half of it, a record-less connection timing out).
    /// The mesh event loop checks the view often only while this is false: a settled
    /// view changes only on an event (a record, a suspicion, a link closing), and every
    /// event refreshes it at once.
    pub fn settled(&self) -> bool {
        self.settled
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A suspicion of `subject`'s record `seq` heard from another member. Returns
    /// whether it was news (it named the record we hold, which we thought alive).
    pub fn suspected(&mut self, subject: PeerId, seq: u64, now: Instant) -> bool {
        let ms = self.ms(now);
        self.liveness.suspect(&subject, seq, ms)
    }

    /// Our own evidence that neighbour `peer` failed (its connection is gone and could
    /// not be re-opened, or its pings went unanswered): suspect its record. Returns the
    /// suspected record's seq, to tell the mesh, when this was news.
    pub fn neighbour_failed(&mut self, peer: PeerId, now: Instant) -> Option<u64> {
        let seq = self.liveness.seq(&peer)?;
        let ms = self.ms(now);
        self.liveness.suspect(&peer, seq, ms).then_some(seq)
    }

    /// What the rumors say of `peer`.
    pub fn rumor(&self, peer: &PeerId) -> Option<Rumor> {
        self.liveness.rumor(peer)
    }

    /// Members we hold records of, neither lost nor suspected, that we are not
    /// connected to: the candidates for a new neighbour.
    pub fn neighbour_candidates(&self) -> impl Iterator<Item = (&PeerId, &Member)> {
        self.members.iter().filter(|(p, m)| {
            m.connections == 0
                && m.announce.is_some()
                && m.state == MemberState::Alive
                && self.liveness.rumor(p) == Some(Rumor::Alive)
        })
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> &mut Member {
        self.members.entry(peer).or_insert_with(|| Member {
            announce: None,
            protocol_version: None,
            last_heard: now,
            connections: 0,
            // Not shown until we know it speaks stampede (announce or identify).
            state: MemberState::Lost,
            lost_since: None,
            reported: false,
        })
    }

    pub fn member(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer)
    }

    pub fn members(&self) -> impl Iterator<Item = (&PeerId, &Member)> {
        self.members.iter()
    }

    /// An announcement heard from the member itself (directly or relayed by gossip).
    /// Returns false when it is older than one already seen.
    pub fn heard_announce(&mut self, peer: PeerId, announce: Announce, now: Instant) -> bool {
        if peer == self.self_id || check_seq(&announce, stampede_protocol::run::unix_us()).is_err()
        {
            return false;
        }
        let m = self.entry(peer, now);
        if let Some(old) = &m.announce {
            if old.seq > announce.seq {
                return false;
            }
        }
        m.protocol_version = Some(announce.protocol_version);
        let (seq, leaving) = (announce.seq, announce.state == NodeState::Leaving);
        m.announce = Some(announce);
        m.last_heard = now;
        let ms = self.ms(now);
        self.liveness.record(peer, seq, leaving, ms);
        true
    }

    /// A message of another protocol version whose body could not be read.
    pub fn heard_version(&mut self, peer: PeerId, protocol_version: u32, now: Instant) {
        if peer == self.self_id {
            return;
        }
        let m = self.entry(peer, now);
        m.protocol_version = Some(protocol_version);
        m.last_heard = now;
    }

    /// The peer identified itself as a stampede node of this protocol version.
    pub fn identified(&mut self, peer: PeerId, protocol_version: u32, now: Instant) {
        if peer == self.self_id {
            return;
        }
        self.entry(peer, now).protocol_version = Some(protocol_version);
    }

    /// An announcement relayed by another member (a members list). It teaches us a node
    /// and its addresses, but it is not a sign of life of that node: only a node we
    /// did not know yet gets one `lost_after` of grace to be reached. Installed only when
    /// signed by its subject ([`verify`]).
    pub fn learned_announce(&mut self, announce: Announce, now: Instant) -> Option<PeerId> {
        let peer = match verify(&announce, stampede_protocol::run::unix_us()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "relayed announcement refused");
                return None;
            }
        };
        if peer == self.self_id {
            return None;
        }
        let full = self.members.len() >= MAX_VIEW_MEMBERS;
        let (seq, leaving) = (announce.seq, announce.state == NodeState::Leaving);
        match self.members.get_mut(&peer) {
            Some(m) => {
                let newer = !matches!(&m.announce, Some(a) if a.seq >= announce.seq);
                if newer {
                    m.protocol_version = Some(announce.protocol_version);
                    m.announce = Some(announce);
                }
            }
            None if full => {
                tracing::debug!(%peer, "relayed announcement refused: the view is full");
                return None;
            }
            None => {
                let m = self.entry(peer, now);
                m.protocol_version = Some(announce.protocol_version);
                m.announce = Some(announce);
            }
        }
        let ms = self.ms(now);
        self.liveness.record(peer, seq, leaving, ms);
        Some(peer)
    }

    /// A sign of life on a connection (an answered ping).
    /// Whether `peer` gave a sign of life (a ping answered, a message received from it,
    /// its own record) less than `lost_after` ago.
    pub fn heard_lately(&self, peer: &PeerId, now: Instant) -> bool {
        self.members
            .get(peer)
            .is_some_and(|m| now.saturating_duration_since(m.last_heard) < self.lost_after)
    }

    /// This node did not run for `gap` (see the event loop's `turn`): its neighbours'
    /// silence in that gap is its own, so their last sign of life moves on by `gap`.
    pub fn paused(&mut self, gap: Duration, now: Instant) {
        for m in self.members.values_mut().filter(|m| m.connections > 0) {
            m.last_heard = (m.last_heard + gap).min(now);
        }
    }

    pub fn heard(&mut self, peer: PeerId, now: Instant) {
        if let Some(m) = self.members.get_mut(&peer) {
            m.last_heard = now;
        }
    }

    pub fn connected(&mut self, peer: PeerId, now: Instant) {
        let m = self.entry(peer, now);
        m.connections += 1;
        m.last_heard = now;
    }

    pub fn disconnected(&mut self, peer: PeerId, remaining: usize) {
        if let Some(m) = self.members.get_mut(&peer) {
            m.connections = remaining;
        }
    }

    /// Re-evaluates every member's state; returns the changes.
    pub fn refresh(&mut self, now: Instant) -> Vec<Transition> {
        let mut changes = Vec::new();
        let ours = self.protocol_version;
        let lost_after = self.lost_after;
        let ms = self.ms(now);
        // Three slow refreshes missed (see event_loop's schedule_refresh).
        let expire = 3 * stampede_protocol::membership::refresh_interval_ms(
            self.members.len() + 1,
            self.refresh_floor_ms,
            REFRESH_PER_SECOND,
        );
        self.liveness
            .tick(ms, expire.saturating_add(self.refresh_floor_ms));
        let mut settled = true;
        for (peer, m) in self.members.iter_mut() {
            if !Self::is_shown(m) {
                // A connection that never told us it is a stampede node: not a member.
                continue;
            }
            let quiet = now.saturating_duration_since(m.last_heard);
            let rumor = self.liveness.rumor(peer);
            let silent = if m.connections > 0 {
                // A neighbour: our own pings judge it. A connection alone is not a sign
                // of life: on a dead link it stays "open" until TCP gives up.
                // Waiting between half of lost_after and lost_after; past it, this
                // refresh makes the transition.
                settled &= quiet <= lost_after / 2 || quiet > lost_after;
                quiet > lost_after
            } else {
                match rumor {
                    Some(Rumor::Lost { .. }) => true,
                    Some(_) => false,
                    // Known only from identify, never from a record: nobody can
                    // vouch for it once its connection is gone.
                    None => {
                        settled &= quiet > lost_after / 2;
                        quiet > lost_after / 2
                    }
                }
            };
            settled &= !matches!(rumor, Some(Rumor::Suspect { .. }));
            // A node that said it is leaving is gone as soon as its connections are.
            let leaving = matches!(&m.announce, Some(a) if a.state == NodeState::Leaving);
            let new = if silent || (leaving && m.connections == 0) {
                MemberState::Lost
            } else if m.protocol_version.is_some_and(|v| v != ours) {
                MemberState::Incompatible
            } else {
                MemberState::Alive
            };
            if !m.reported || new != m.state {
                let from = if m.reported { Some(m.state) } else { None };
                changes.push(Transition {
                    peer: *peer,
                    name: name_of(m),
                    from,
                    to: new,
                });
                m.reported = true;
                m.state = new;
                m.lost_since = if new == MemberState::Lost {
                    Some(now)
                } else {
                    None
                };
            }
        }
        let forget = self.forget_after;
        let liveness = &mut self.liveness;
        self.members.retain(|p, m| {
            let keep =
                !matches!(m.lost_since, Some(t) if now.saturating_duration_since(t) >= forget);
            if !keep {
                liveness.forget(p);
            }
            keep
        });
        self.settled = settled;
        changes
    }

    /// Whether a member counts (has announced or identified as a stampede node).
    fn is_shown(m: &Member) -> bool {
        m.announce.is_some() || m.protocol_version.is_some()
    }

    /// Alive members (self excluded) that speak our protocol version.
    pub fn alive_peers(&self) -> Vec<PeerId> {
        self.members
            .iter()
            .filter(|(_, m)| Self::is_shown(m) && m.state == MemberState::Alive)
            .map(|(p, _)| *p)
            .collect()
    }

    /// The rows of `stampede peers`, this node first, then by name.
    pub fn rows(&self, now: Instant) -> Vec<MemberRow> {
        let mut rows = vec![row_of(
            &self.self_announce,
            MemberState::Alive,
            true,
            true,
            0,
            Some(self.protocol_version),
        )];
        let mut others: Vec<MemberRow> = self
            .members
            .iter()
            .filter(|(_, m)| Self::is_shown(m))
            .map(|(peer, m)| {
                let ms = now.saturating_duration_since(m.last_heard).as_millis() as u64;
                match &m.announce {
                    Some(a) => row_of(a, m.state, false, m.connections > 0, ms, m.protocol_version),
                    None => MemberRow {
                        id: peer.to_string(),
                        name: String::new(),
                        labels: BTreeMap::new(),
                        version: String::new(),
                        protocol_version: m.protocol_version,
                        state: m.state,
                        node_state: None,
                        capacity: None,
                        allow_targets: Vec::new(),
                        addrs: Vec::new(),
                        connected: m.connections > 0,
                        last_heard_ms: ms,
                        is_self: false,
                    },
                }
            })
            .collect();
        others.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        rows.extend(others);
        rows
    }

    /// The records we hold lost, as suspicions (the rest of a members answer).
    pub fn known_lost(&self) -> Vec<stampede_protocol::mesh::Suspicion> {
        self.members
            .iter()
            .filter(|(p, _)| matches!(self.liveness.rumor(p), Some(Rumor::Lost { .. })))
            .filter_map(|(p, m)| {
                let a = m.announce.as_ref()?;
                (a.state != NodeState::Leaving).then(|| stampede_protocol::mesh::Suspicion {
                    subject: p.to_string(),
                    seq: a.seq,
                })
            })
            .collect()
    }

    /// Announcements of members we consider alive, ourselves included (the answer to a
    /// members request), first.
    ///
    /// Then the records of members held lost (their suspicions go in the answer's `lost`
    /// list): a newcomer that knows them probes them now and then, and one that is in
    /// fact alive hears it is held lost and refutes. Without them, a member falsely
    /// suspected while a node joined stayed unknown to it until its slow refresh.
    pub fn known_announces(&self) -> Vec<Announce> {
        let mut out = vec![self.self_announce.clone()];
        let with_state = |state: MemberState| {
            self.members
                .values()
                .filter(move |m| m.state == state)
                .filter_map(|m| m.announce.clone())
        };
        out.extend(with_state(MemberState::Alive));
        out.extend(with_state(MemberState::Lost).filter(|a| a.state != NodeState::Leaving));
        out
    }
}

fn name_of(m: &Member) -> String {
    m.announce
        .as_ref()
        .map(|a| a.name.clone())
        .unwrap_or_default()
}

fn row_of(
    a: &Announce,
    state: MemberState,
    is_self: bool,
    connected: bool,
    last_heard_ms: u64,
    pv: Option<u32>,
) -> MemberRow {
    MemberRow {
        id: a.id.clone(),
        name: a.name.clone(),
        labels: a.labels.clone(),
        version: a.version.clone(),
        protocol_version: pv,
        state,
        node_state: Some(a.state.as_str().to_string()),
        capacity: Some(a.capacity),
        allow_targets: a.allow_targets.clone(),
        addrs: a.addrs.clone(),
        connected,
        last_heard_ms,
        is_self,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::mesh::PROTOCOL_VERSION;

    fn ann(id: &PeerId, name: &str, seq: u64, pv: u32) -> Announce {
        Announce {
            id: id.to_string(),
            name: name.into(),
            version: "0.1.0".into(),
            protocol_version: pv,
            labels: BTreeMap::new(),
            capacity: 1,
            state: NodeState::Idle,
            allow_targets: vec![],
            addrs: vec![],
            seq,
            signature: vec![],
        }
    }

    #[test]
    fn silence_means_lost_and_an_announcement_brings_it_back() {
        let me = PeerId::random();
        let other = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        v.heard_announce(other, ann(&other, "o", 1, PROTOCOL_VERSION), t0);
        let ch = v.refresh(t0);
        assert_eq!(ch[0].to, MemberState::Alive);
        assert_eq!(v.alive_peers(), vec![other]);
        // Connected and answering pings: alive, even without announcements.
        v.connected(other, t0);
        v.heard(other, t0 + Duration::from_secs(9));
        assert!(v.refresh(t0 + Duration::from_secs(10)).is_empty());
        // Heard lately (a ping answered, a message from it) for lost_after: a ping that
        // times out meanwhile leaves it to this silence rule (event_loop).
        assert!(v.heard_lately(&other, t0 + Duration::from_millis(11_900)));
        assert!(!v.heard_lately(&other, t0 + Duration::from_secs(12)));
        assert!(!v.heard_lately(&PeerId::random(), t0));
        // This node paused 2 s: a neighbour's silence in that gap is not held against it.
        let mut p = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        p.heard_announce(other, ann(&other, "o", 1, PROTOCOL_VERSION), t0);
        p.connected(other, t0);
        p.refresh(t0);
        p.paused(Duration::from_secs(2), t0 + Duration::from_secs(4));
        assert!(p.heard_lately(&other, t0 + Duration::from_secs(4)));
        assert!(p.refresh(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(
            p.refresh(t0 + Duration::from_millis(5100))[0].to,
            MemberState::Lost
        );
        // A connection whose pings go unanswered does not keep it alive.
        let ch = v.refresh(t0 + Duration::from_secs(13));
        assert_eq!(
            ch,
            vec![Transition {
                peer: other,
                name: "o".into(),
                from: Some(MemberState::Alive),
                to: MemberState::Lost
            }]
        );
        assert!(v.heard_announce(
            other,
            ann(&other, "o", 2, PROTOCOL_VERSION),
            t0 + Duration::from_secs(14)
        ));
        assert_eq!(
            v.refresh(t0 + Duration::from_secs(14))[0].to,
            MemberState::Alive
        );
        // Stale relayed copy ignored.
        assert!(!v.heard_announce(
            other,
            ann(&other, "o", 1, PROTOCOL_VERSION),
            t0 + Duration::from_secs(14)
        ));
    }

    #[test]
    fn other_protocol_version_is_incompatible_and_rows_list_self_first() {
        let me = PeerId::random();
        let other = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        v.heard_version(other, PROTOCOL_VERSION + 1, t0);
        v.refresh(t0);
        let rows = v.rows(t0);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].is_self);
        assert_eq!(rows[1].state, MemberState::Incompatible);
        assert!(v.alive_peers().is_empty());
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["self"], true);
        assert_eq!(json[1]["state"], "incompatible");
    }

    #[test]
    fn a_relayed_announcement_is_installed_only_when_its_subject_signed_it() {
        let me = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        let now_us = stampede_protocol::run::unix_us();
        let real = Keypair::generate_ed25519();
        let real_id = real.public().to_peer_id();
        let mut signed = ann(&real_id, "real", now_us, PROTOCOL_VERSION);
        sign(&mut signed, &real);

        // A record for the real node forged by another key (name pinned, seq huge).
        let forger = Keypair::generate_ed25519();
        let mut forged = signed.clone();
        forged.name = "pinned".into();
        forged.seq = now_us + 1;
        sign(&mut forged, &forger);
        assert!(verify(&forged, now_us).is_err());
        assert_eq!(v.learned_announce(forged, t0), None);
        // The subject's own record, altered after signing: refused too.
        let mut altered = signed.clone();
        altered.labels.insert("region".into(), "evil".into());
        assert_eq!(v.learned_announce(altered, t0), None);
        // Unsigned (an older node's) records are not installed from third parties.
        let mut unsigned = signed.clone();
        unsigned.signature.clear();
        assert_eq!(v.learned_announce(unsigned, t0), None);
        assert!(v.member(&real_id).is_none(), "nothing was installed");

        // Signed by its subject: installed.
        assert_eq!(v.learned_announce(signed.clone(), t0), Some(real_id));
        assert_eq!(
            v.member(&real_id).unwrap().announce.as_ref().unwrap().name,
            "real"
        );

        // Signed but with a seq more than an hour ahead of our clock: refused, so no
        // record can outrank every later one the node sends.
        let mut ahead = signed;
        ahead.seq = now_us + MAX_SEQ_AHEAD_US + 10_000_000;
        sign(&mut ahead, &real);
        assert!(verify(&ahead, now_us).unwrap_err().contains("ahead"));
        assert!(!v.heard_announce(real_id, ahead, t0));
    }

    #[test]
    fn a_members_list_cannot_grow_the_view_past_its_bound() {
        let me = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        let now_us = stampede_protocol::run::unix_us();
        let signed = |name: &str| {
            let key = Keypair::generate_ed25519();
            let mut a = ann(&key.public().to_peer_id(), name, now_us, PROTOCOL_VERSION);
            sign(&mut a, &key);
            a
        };
        for i in 0..MAX_VIEW_MEMBERS {
            assert!(v.learned_announce(signed(&format!("n{i}")), t0).is_some());
        }
        assert_eq!(v.learned_announce(signed("one too many"), t0), None);
        assert_eq!(v.members().count(), MAX_VIEW_MEMBERS);
    }

    #[test]
    fn a_member_without_a_link_is_alive_by_its_record_until_a_suspicion_times_out() {
        let me = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        let now_us = stampede_protocol::run::unix_us();
        let key = Keypair::generate_ed25519();
        let other = key.public().to_peer_id();
        let mut rec = ann(&other, "o", now_us, PROTOCOL_VERSION);
        sign(&mut rec, &key);
        assert_eq!(v.learned_announce(rec.clone(), t0), Some(other));
        // Never linked, heard nothing for a minute: still alive (no periodic traffic
        // is needed from a member that is not a neighbour).
        v.refresh(t0);
        assert!(v.refresh(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(v.alive_peers(), vec![other]);
        // Forged or stale suspicions (a seq it never signed, an older one) do nothing.
        assert!(!v.suspected(other, u64::MAX, t0 + Duration::from_secs(60)));
        assert!(!v.suspected(other, now_us - 1, t0 + Duration::from_secs(60)));
        // A suspicion of its record: still alive until lost_after passes.
        assert!(v.suspected(other, now_us, t0 + Duration::from_secs(60)));
        assert!(v.refresh(t0 + Duration::from_millis(62_900)).is_empty());
        let ch = v.refresh(t0 + Duration::from_secs(63));
        assert_eq!(ch[0].to, MemberState::Lost);
        assert_eq!(v.known_lost().len(), 1);
        assert_eq!(v.known_lost()[0].seq, now_us);
        // The same record relayed again does not revive it; its refutation does.
        assert_eq!(
            v.learned_announce(rec.clone(), t0 + Duration::from_secs(64)),
            Some(other)
        );
        assert!(v.refresh(t0 + Duration::from_secs(64)).is_empty());
        let mut newer = rec;
        newer.seq += 1;
        sign(&mut newer, &key);
        assert!(v.heard_announce(other, newer, t0 + Duration::from_secs(65)));
        assert_eq!(
            v.refresh(t0 + Duration::from_secs(65))[0].to,
            MemberState::Alive
        );
        assert!(v.known_lost().is_empty());
    }

    /// The event loop checks the view four times a second only while it is not
    /// settled: a suspicion running out, a neighbour's pings unanswered past half of
    /// lost_after, a record-less connection about to time out each keep it unsettled,
    /// and each deadline is met by the refresh that follows.
    #[test]
    fn the_view_is_settled_only_while_no_member_waits_on_a_deadline() {
        let me = PeerId::random();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut v = View::new(me, ann(&me, "me", 1, PROTOCOL_VERSION), s(3));
        assert!(v.settled(), "an empty view waits on nothing");
        // A neighbour answering pings: settled; its pings unanswered for more than half
        // of lost_after: not settled, until it is lost (a lost neighbour waits on nothing).
        let n = PeerId::random();
        v.heard_announce(n, ann(&n, "n", 1, PROTOCOL_VERSION), t0);
        v.connected(n, t0);
        v.refresh(t0 + Duration::from_millis(1_400));
        assert!(v.settled());
        v.refresh(t0 + Duration::from_millis(1_600));
        assert!(!v.settled());
        v.heard(n, t0 + Duration::from_millis(1_700));
        v.refresh(t0 + Duration::from_millis(1_700));
        assert!(v.settled(), "an answered ping settles it again");
        assert!(v.refresh(t0 + Duration::from_millis(4_500)).is_empty());
        assert!(!v.settled());
        assert_eq!(v.refresh(t0 + s(5))[0].to, MemberState::Lost);
        assert!(v.settled(), "lost: nothing left to wait for");
        // A member known by its signed record only: settled while alive; a suspicion of
        // that record keeps the view unsettled until it is refuted or runs out.
        let key = Keypair::generate_ed25519();
        let o = key.public().to_peer_id();
        let now_us = stampede_protocol::run::unix_us();
        let mut rec = ann(&o, "o", now_us, PROTOCOL_VERSION);
        sign(&mut rec, &key);
        assert_eq!(v.learned_announce(rec, t0 + s(10)), Some(o));
        v.refresh(t0 + s(10));
        assert!(v.settled());
        assert!(v.suspected(o, now_us, t0 + s(11)));
        v.refresh(t0 + s(11));
        assert!(!v.settled(), "a suspicion runs out after lost_after");
        v.refresh(t0 + Duration::from_millis(13_900));
        assert!(!v.settled());
        let ch = v.refresh(t0 + s(14));
        assert_eq!((ch[0].peer, ch[0].to), (o, MemberState::Lost));
        assert!(v.settled());
        // A connection that identified but never announced times out at lost_after / 2
        // once closed: unsettled until then.
        let c = PeerId::random();
        v.identified(c, PROTOCOL_VERSION, t0 + s(20));
        v.connected(c, t0 + s(20));
        v.disconnected(c, 0);
        v.refresh(t0 + s(20));
        assert!(!v.settled());
        v.refresh(t0 + s(22));
        assert!(v.settled());
    }

    #[test]
    fn connection_without_identity_is_not_a_member() {
        let me = PeerId::random();
        let t0 = Instant::now();
        let mut v = View::new(
            me,
            ann(&me, "me", 1, PROTOCOL_VERSION),
            Duration::from_secs(3),
        );
        v.connected(PeerId::random(), t0);
        assert!(v.refresh(t0).is_empty());
        assert_eq!(v.rows(t0).len(), 1);
    }
}
