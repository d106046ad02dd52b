//! Run coordination across the mesh (spec §6): one actor per node that takes a run from
//! proposal to report — join, roster and leader, clock offsets, assignment and a common
//! start, per-second snapshots from every node to every node, barriers, failover when
//! a member is lost, stop, and the merged summary for the CLI that started it.
//!
//! Why it survives loss: every node merges every node's snapshots, so no single node
//! holds the only copy; barriers complete over the *live* members, so a lost member is
//! dropped, never waited for; the leader is the lowest live member id, so survivors
//! agree on a new one without a vote, and terms order its messages; the lost member's
//! share (VU indices and arrival events from a point in the near future) is
//! re-striped over the survivors, so the global load shape continues.
//!
//! The actor owns all run state and is fed by one channel; slow work (fetching a
//! bundle, clock samples, re-fetching snapshots) runs in tasks that report back. It
//! must not touch the swarm (it sends [`MeshCommand`]s) or the load itself (the engine
//! runs on its own threads).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use stampede_protocol::mesh::{GossipBody, MeshRequest, MeshResponse, NodeState};
use stampede_protocol::run::{
    clip_reason, clock_offset, BarrierDetail, Bundle, Requirements, RosterEntry, RunMessage,
    RunRequest, RunResponse, SnapshotMessage, SNAPSHOTS_PER_REQUEST, SNAPSHOT_ANSWER_BYTES,
};
use stampede_protocol::segment::{Assignment, Reassignment, Striping};
use stampede_protocol::snapshot::Metrics;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::aggregate::{NodeCollector, NodeSecond, RunAggregate};
use crate::compile::CompiledPlan;
use crate::cpu::CpuSampler;
use crate::embedded::{client_settings, plan_duration, unix_ms};
use crate::engine::{Engine, LiveAssignment, RunSpec, Split, Stop, StopHandle, WorkerReport};
use crate::http::Shared;
use crate::mesh::behaviour::{control_topic, metrics_topic};
use crate::mesh::membership::MemberState;
use crate::mesh::{MeshCommand, MeshEvent, SharedView};
use crate::report::{self, Event, NodeInfo, Summary, SummaryInput};

/// How long the origin waits for members to answer a proposal.
const JOIN_WINDOW: Duration = Duration::from_secs(3);
/// How far ahead of "now" the leader sets the common start.
const START_LEAD: Duration = Duration::from_millis(600);
/// How far ahead of "now" a failover takes over the lost member's arrival events.
const FAILOVER_LEAD: Duration = Duration::from_millis(300);
/// Barrier and roster messages are republished this often until they complete.
const REPUBLISH: Duration = Duration::from_millis(400);
/// How long the origin keeps asking for seconds it is missing once every member
/// finished; then it reports without them and names them in the run's events.
const FINISH_WAIT: Duration = Duration::from_secs(20);
/// Clock samples per member; the one with the smallest round trip is kept.
const CLOCK_SAMPLES: usize = 8;

/// How long after the start instant a node takes up its workers' start stamp and
/// reports it: long enough that nothing but the workers runs at the instant itself.
const START_SETTLE: Duration = Duration::from_millis(20);

pub use stampede_protocol::run::unix_us;

/// Bundles and own snapshots, shared with the mesh event loop so that it can answer
/// peers' requests without a round trip through the actor.
#[derive(Default)]
pub struct RunStore {
    bundles: Mutex<HashMap<String, Bundle>>,
    snapshots: Mutex<HashMap<(String, u64), SnapshotMessage>>,
}

impl RunStore {
    /// Answers a peer's run request (called on the event loop: must be quick).
    pub fn respond(&self, req: RunRequest) -> RunResponse {
        match req {
            RunRequest::Clock { t1_us } => {
                let t = unix_us();
                RunResponse::Clock {
                    t1_us,
                    t2_us: t,
                    t3_us: t,
                    received_us: None,
                }
            }
            RunRequest::Bundle { hash, .. } => {
                match self.bundles.lock().ok().and_then(|b| b.get(&hash).cloned()) {
                    Some(bundle) => RunResponse::Bundle { bundle },
                    None => RunResponse::Refused {
                        reason: format!("no bundle with hash {hash}"),
                    },
                }
            }
            RunRequest::Snapshots { run_id, seqs, .. } => {
                let store = match self.snapshots.lock() {
                    Ok(s) => s,
                    Err(p) => p.into_inner(),
                };
                let (mut snapshots, mut missing, mut bytes) = (Vec::new(), Vec::new(), 0);
                for seq in seqs.iter().take(SNAPSHOTS_PER_REQUEST) {
                    match store.get(&(run_id.clone(), *seq)) {
                        // The rest is asked for again.
                        Some(_) if bytes >= SNAPSHOT_ANSWER_BYTES => break,
                        Some(s) => {
                            bytes += s.metrics.len();
                            snapshots.push(s.clone());
                        }
                        None => missing.push(*seq),
                    }
                }
                RunResponse::Snapshots { snapshots, missing }
            }
        }
    }
}

/// What the CLI asks of the coordinator through the control endpoint.
pub enum CoordCommand {
    Start {
        bundle: Bundle,
        requirements: Requirements,
        client: ClientLink,
    },
    Stop {
        run_id: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: oneshot::Sender<serde_json::Value>,
    },
}

/// The CLI that started a run: progress lines while it goes, the summary at the end.
pub struct ClientLink {
    pub progress: mpsc::UnboundedSender<serde_json::Value>,
    pub done: oneshot::Sender<Result<Summary, String>>,
}

/// Things the actor's own tasks and the engine report back.
enum Internal {
    Prepared {
        run_id: String,
        /// The plan, compiled, and this node's refusal to send its load, if it refuses.
        result: Result<(Arc<CompiledPlan>, Option<String>), String>,
    },
    Clock {
        run_id: String,
        offset_us: i64,
    },
    Report {
        run_id: String,
        report: WorkerReport,
    },
    Started {
        run_id: String,
        started_unix_us: u64,
    },
    /// A member's answer to a request for seconds it published.
    Fetched {
        run_id: String,
        node: String,
        snapshots: Vec<SnapshotMessage>,
        /// Seconds it answered it does not have.
        missing: Vec<u64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Joining,
    Ready,
    Running,
    Finishing,
    Done,
}

struct Join {
    accept: bool,
    reason: Option<String>,
    name: String,
    labels: BTreeMap<String, String>,
    weight: u32,
}

struct Run {
    id: String,
    origin: String,
    hash: String,
    plan_name: String,
    requirements: Requirements,
    phase: Phase,
    plan: Option<Arc<CompiledPlan>>,
    prepared_error: Option<String>,
    // Join phase (origin).
    joins: BTreeMap<String, Join>,
    expected: BTreeSet<String>,
    join_deadline: Instant,
    my_join: Option<RunMessage>,
    // Roster and leadership.
    roster: Vec<RosterEntry>,
    roster_msg: Option<RunMessage>,
    my_index: Option<usize>,
    term: u64,
    leader: String,
    lost: BTreeSet<String>,
    /// Lost members whose share has been moved (each reassignment applies once).
    reassigned: BTreeSet<String>,
    /// What this node published as leader, republished until the run ends: gossip is
    /// best-effort, and a member that missed a reassignment would keep a dead share.
    leader_msgs: Vec<RunMessage>,
    // Barriers: name → member → detail.
    barriers: BTreeMap<String, BTreeMap<String, BarrierDetail>>,
    my_arrivals: BTreeMap<String, BarrierDetail>,
    clock_offset_us: i64,
    assign_msg: Option<RunMessage>,
    live: Option<Arc<LiveAssignment>>,
    split: Option<Split>,
    start_unix_us: Option<u64>,
    // Running.
    engine: Option<StopHandle>,
    collector: Option<NodeCollector>,
    cpu: CpuSampler,
    workers: usize,
    agg: Option<RunAggregate>,
    seen: BTreeMap<String, BTreeSet<u64>>,
    /// Seconds a member answered that it does not have: not asked for again.
    absent: BTreeMap<String, BTreeSet<u64>>,
    /// When every member had finished and the origin began collecting what it missed.
    finishing_since: Option<Instant>,
    cpu_max: BTreeMap<String, f64>,
    published: u64,
    fetch_asked: Instant,
    events: Vec<Event>,
    started_unix_ms: u64,
    client: Option<ClientLink>,
    stop_reason: Option<String>,
    /// The stop this node asked for: republished until every member finished, since a
    /// member that missed it would run its whole schedule.
    stop_msg: Option<RunMessage>,
    finished_at: Option<Instant>,
    /// How long the run lasted, once it is done (for `status`).
    ended_s: Option<f64>,
}

impl Run {
    fn new(id: &str, origin: &str, hash: &str, plan_name: &str, requirements: Requirements) -> Run {
        Run {
            id: id.into(),
            origin: origin.into(),
            hash: hash.into(),
            plan_name: plan_name.into(),
            requirements,
            phase: Phase::Joining,
            plan: None,
            prepared_error: None,
            joins: BTreeMap::new(),
            expected: BTreeSet::new(),
            join_deadline: Instant::now() + JOIN_WINDOW,
            my_join: None,
            roster: Vec::new(),
            roster_msg: None,
            my_index: None,
            term: 0,
            leader: String::new(),
            lost: BTreeSet::new(),
            reassigned: BTreeSet::new(),
            leader_msgs: Vec::new(),
            barriers: BTreeMap::new(),
            my_arrivals: BTreeMap::new(),
            clock_offset_us: 0,
            assign_msg: None,
            live: None,
            split: None,
            start_unix_us: None,
            engine: None,
            collector: None,
            cpu: CpuSampler::default(),
            workers: 1,
            agg: None,
            seen: BTreeMap::new(),
            absent: BTreeMap::new(),
            finishing_since: None,
            cpu_max: BTreeMap::new(),
            published: 0,
            fetch_asked: Instant::now(),
            events: Vec::new(),
            started_unix_ms: unix_ms(),
            client: None,
            stop_reason: None,
            stop_msg: None,
            finished_at: None,
            ended_s: None,
        }
    }

    fn live_members(&self) -> impl Iterator<Item = &RosterEntry> {
        self.roster.iter().filter(|m| !self.lost.contains(&m.id))
    }

    /// A barrier is complete when every live member has arrived.
    fn barrier_complete(&self, name: &str) -> bool {
        let arrived = self.barriers.get(name);
        !self.roster.is_empty()
            && self
                .live_members()
                .all(|m| arrived.is_some_and(|a| a.contains_key(&m.id)))
    }

    fn run_time_s(&self) -> f64 {
        match self.start_unix_us {
            Some(s) => (unix_us() as i64 + self.clock_offset_us - s as i64) as f64 / 1e6,
            None => 0.0,
        }
    }

    fn event(&mut self, kind: &str, detail: serde_json::Value) {
        let t = (self.run_time_s().max(0.0) * 1000.0).round() / 1000.0;
        let detail: BTreeMap<String, serde_json::Value> = match detail {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        if let Some(c) = &self.client {
            let mut line = serde_json::json!({"event": kind, "t": t});
            for (k, v) in &detail {
                line[k] = v.clone();
            }
            let _ = c.progress.send(line);
        }
        self.events.push(Event {
            t,
            kind: kind.into(),
            detail,
        });
    }

    fn tell(&self, line: serde_json::Value) {
        if let Some(c) = &self.client {
            let _ = c.progress.send(line);
        }
    }

    /// Marks a roster member lost and records `node_lost` with the last second of it
    /// merged here; false if it was already lost.
    fn note_lost(&mut self, peer: &str) -> bool {
        if !self.lost.insert(peer.to_string()) {
            return false;
        }
        let name = self.name_of(peer);
        let last = self
            .seen
            .get(peer)
            .and_then(|s| s.iter().next_back().copied());
        self.event(
            "node_lost",
            serde_json::json!({"node": name, "id": peer, "last_snapshot": last}),
        );
        true
    }

    fn name_of(&self, id: &str) -> String {
        self.roster
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.name.clone())
            .or_else(|| self.joins.get(id).map(|j| j.name.clone()))
            .unwrap_or_else(|| id.to_string())
    }
}

/// This node as it takes part in runs.
pub struct NodeIdentity {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub allow_targets: Vec<String>,
    pub workers: usize,
    pub data_dir: PathBuf,
    pub graceful_stop: Duration,
}

pub struct Coordinator {
    me: NodeIdentity,
    live: Arc<crate::live::LiveRuns>,
    mesh: mpsc::Sender<MeshCommand>,
    view: SharedView,
    store: Arc<RunStore>,
    runs: HashMap<String, Run>,
    internal_tx: mpsc::UnboundedSender<Internal>,
}

/// Starts the coordinator actor; returns the channel the control endpoint uses.
pub fn spawn(
    me: NodeIdentity,
    mesh: mpsc::Sender<MeshCommand>,
    events: broadcast::Receiver<MeshEvent>,
    view: SharedView,
    store: Arc<RunStore>,
    live: Arc<crate::live::LiveRuns>,
) -> mpsc::Sender<CoordCommand> {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let c = Coordinator {
        me,
        live,
        mesh,
        view,
        store,
        runs: HashMap::new(),
        internal_tx,
    };
    tokio::spawn(c.main(cmd_rx, events, internal_rx));
    cmd_tx
}

impl Coordinator {
    async fn main(
        mut self,
        mut cmds: mpsc::Receiver<CoordCommand>,
        mut events: broadcast::Receiver<MeshEvent>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        let mut tick = tokio::time::interval(REPUBLISH);
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                e = events.recv() => match e {
                    Ok(MeshEvent::Gossip { from, body, .. }) => self.on_gossip(from, body),
                    Ok(MeshEvent::Member(t)) => {
                        if t.to == MemberState::Lost {
                            self.on_lost(&t.peer.to_string());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "run coordination fell behind the mesh; missed messages are re-fetched or republished");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(i) = internal.recv() => self.on_internal(i),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn publish(&self, msg: RunMessage) {
        self.publish_body(control_topic_body(msg), false);
    }

    fn publish_body(&self, body: GossipBody, metrics: bool) {
        let topic = if metrics {
            metrics_topic(stampede_protocol::mesh::PROTOCOL_VERSION)
        } else {
            control_topic(stampede_protocol::mesh::PROTOCOL_VERSION)
        };
        let (reply, _rx) = oneshot::channel();
        // Publishing fails only when no peer has subscribed yet (a mesh of one): the
        // message is for others, and we act on our own copy directly.
        let _ = self
            .mesh
            .try_send(MeshCommand::Publish { topic, body, reply });
    }

    /// The run this node is committed to, if any: one it runs, one it accepted and
    /// waits for the roster of, or one it started.
    fn busy(&self) -> Option<&str> {
        let me = &self.me.id;
        self.runs
            .values()
            .find(|r| {
                let accepted = matches!(r.my_join, Some(RunMessage::Join { accept: true, .. }));
                r.phase < Phase::Done
                    && (r.my_index.is_some()
                        || (r.roster.is_empty() && accepted)
                        || r.origin == *me)
            })
            .map(|r| r.id.as_str())
    }

    // ---------------------------------------------------------------- commands

    fn on_command(&mut self, c: CoordCommand) {
        match c {
            CoordCommand::Start {
                bundle,
                requirements,
                client,
            } => self.start(bundle, requirements, client),
            CoordCommand::Stop { run_id, reply } => {
                if self.runs.contains_key(&run_id) {
                    let msg = RunMessage::Stop {
                        run_id: run_id.clone(),
                        reason: "stopped by `stampede stop`".into(),
                    };
                    self.publish(msg.clone());
                    self.on_run_message(self.me.id.clone(), msg.clone());
                    if let Some(run) = self.runs.get_mut(&run_id) {
                        run.stop_msg = Some(msg);
                    }
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(format!("no such run: {run_id}")));
                }
            }
            CoordCommand::Status { reply } => {
                let runs: Vec<serde_json::Value> = self
                    .runs
                    .values()
                    .map(|r| {
                        serde_json::json!({
                            "run_id": r.id, "plan": r.plan_name, "bundle_hash": r.hash, "phase": r.phase,
                            "origin": r.origin, "leader": r.leader, "leader_name": r.name_of(&r.leader), "term": r.term,
                            "members": r.roster.iter().map(|m| &m.name).collect::<Vec<_>>(),
                            "lost": r.lost.iter().map(|l| r.name_of(l)).collect::<Vec<_>>(),
                            "elapsed_s": r.ended_s.unwrap_or_else(|| r.run_time_s().max(0.0)),
                        })
                    })
                    .collect();
                let _ = reply.send(serde_json::json!({ "runs": runs }));
            }
        }
    }

    fn start(&mut self, bundle: Bundle, requirements: Requirements, client: ClientLink) {
        if let Some(other) = self.busy() {
            let _ = client
                .done
                .send(Err(format!("this node is busy with run {other}")));
            return;
        }
        let run_id = crate::embedded::new_run_id();
        let hash = bundle.hash();
        let plan_name = bundle.plan_name.clone();
        let mut run = Run::new(
            &run_id,
            &self.me.id,
            &hash,
            &plan_name,
            requirements.clone(),
        );
        // Everyone alive and compatible is asked; the origin answers itself.
        if let Ok(v) = self.view.read() {
            run.expected = v.alive_peers().iter().map(|p| p.to_string()).collect();
        }
        run.expected.insert(self.me.id.clone());
        let _ = client.progress.send(
            serde_json::json!({"event": "proposed", "run_id": run_id, "asked": run.expected.len()}),
        );
        run.client = Some(client);
        if let Ok(mut b) = self.store.bundles.lock() {
            b.insert(hash.clone(), bundle.clone());
        }
        self.runs.insert(run_id.clone(), run);
        self.publish(RunMessage::Propose {
            run_id: run_id.clone(),
            origin: self.me.id.clone(),
            bundle_hash: hash,
            plan: plan_name,
            requirements,
        });
        self.prepare(run_id, Ok(bundle));
    }

    // ---------------------------------------------------------------- gossip

    fn on_gossip(&mut self, from: PeerId, body: GossipBody) {
        match body {
            GossipBody::Run(m) => {
                if let Err(e) = m.validate() {
                    tracing::warn!(peer = %from, error = %e, "run message refused");
                    return;
                }
                self.on_run_message(from.to_string(), *m)
            }
            GossipBody::Snapshot(s) => self.on_snapshot(&from.to_string(), *s),
            _ => {}
        }
    }

    fn on_run_message(&mut self, from: String, m: RunMessage) {
        let run_id = m.run_id().to_string();
        match m {
            RunMessage::Propose {
                run_id,
                origin,
                bundle_hash,
                plan,
                requirements,
            } => {
                if origin != from || self.runs.contains_key(&run_id) {
                    return;
                }
                let busy = self.busy().map(str::to_string);
                let mut run = Run::new(&run_id, &origin, &bundle_hash, &plan, requirements);
                if let Some(other) = busy {
                    let join =
                        self.join_msg(&run_id, false, Some(format!("busy with run {other}")));
                    run.my_join = Some(join.clone());
                    run.phase = Phase::Done;
                    self.runs.insert(run_id, run);
                    self.publish(join);
                    return;
                }
                self.runs.insert(run_id.clone(), run);
                self.fetch_bundle(run_id, origin, bundle_hash);
            }
            RunMessage::Join {
                accept,
                reason,
                name,
                labels,
                weight,
                ..
            } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if run.origin != self.me.id
                    || run.phase != Phase::Joining
                    || run.joins.contains_key(&from)
                {
                    return;
                }
                if !accept {
                    run.tell(
                        serde_json::json!({"event": "refused", "node": name, "reason": reason}),
                    );
                }
                run.joins.insert(
                    from,
                    Join {
                        accept,
                        reason,
                        name,
                        labels,
                        weight: weight.max(1),
                    },
                );
                self.maybe_close_joins(&run_id);
            }
            RunMessage::Roster {
                members, refused, ..
            } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if from != run.origin || !run.roster.is_empty() {
                    return;
                }
                run.roster = members;
                run.term = 1;
                run.leader = run.roster[0].id.clone();
                run.my_index = run.roster.iter().position(|m| m.id == self.me.id);
                run.phase = Phase::Ready;
                let names: Vec<String> = run.roster.iter().map(|m| m.name.clone()).collect();
                let leader = run.name_of(&run.leader.clone());
                run.tell(serde_json::json!({"event": "roster", "members": names, "leader": leader, "refused": refused}));
                run.agg = run
                    .plan
                    .as_ref()
                    .map(|p| RunAggregate::new(p.layout.clone()));
                if run.my_index.is_none() {
                    if run.origin != self.me.id {
                        // Not part of it: forget it (but stay busy-free).
                        run.phase = Phase::Done;
                    }
                    return;
                }
                let leader = run.leader.clone();
                if leader == self.me.id {
                    self.arrive(
                        &run_id,
                        "ready",
                        BarrierDetail {
                            clock_offset_us: Some(0),
                            ..Default::default()
                        },
                    );
                } else {
                    self.sync_clock(run_id, leader);
                }
            }
            RunMessage::Abort { reason, .. } => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    if from == run.origin && run.phase < Phase::Done {
                        run.phase = Phase::Done;
                        if let Some(c) = run.client.take() {
                            let _ = c.done.send(Err(reason));
                        }
                    }
                }
            }
            RunMessage::Leader { term, leader, .. } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if term > run.term && leader == from {
                    run.term = term;
                    run.leader = leader;
                    let name = run.name_of(&from);
                    run.event(
                        "leader_elected",
                        serde_json::json!({"leader": name, "term": term}),
                    );
                }
            }
            RunMessage::Arrive {
                barrier, detail, ..
            } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if !run.roster.iter().any(|m| m.id == from) {
                    return;
                }
                let error = detail.error.clone();
                let fresh = run
                    .barriers
                    .entry(barrier.clone())
                    .or_default()
                    .insert(from.clone(), detail)
                    .is_none();
                if let (true, Some(error)) = (fresh, error) {
                    let name = run.name_of(&from);
                    run.event(
                        "node_failed",
                        serde_json::json!({"node": name, "error": error}),
                    );
                }
                if fresh {
                    self.on_barrier_progress(&run_id, &barrier);
                }
            }
            RunMessage::Assign {
                term,
                vus,
                events,
                start_unix_us,
                ..
            } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if term < run.term || from != run.leader || run.start_unix_us.is_some() {
                    return;
                }
                run.start_unix_us = Some(start_unix_us);
                run.split = Some(Split { vus, events });
                self.start_engine(&run_id);
            }
            RunMessage::Reassign {
                term,
                lost,
                vus,
                events,
                at_s,
                moved,
                ..
            } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if term < run.term || from != run.leader || run.reassigned.contains(&lost) {
                    return;
                }
                // The leader may see the loss before this node's own membership does:
                // the report still gets its node_lost, and barriers stop waiting now.
                let newly_lost = run.note_lost(&lost);
                run.reassigned.insert(lost.clone());
                let split = Split { vus, events };
                if let Some(live) = &run.live {
                    live.replace(split.clone());
                }
                run.split = Some(split);
                if from != self.me.id {
                    let name = run.name_of(&lost);
                    run.event(
                        "reassigned",
                        serde_json::json!({"lost": name, "from_s": at_s, "moved": moved}),
                    );
                }
                if newly_lost {
                    self.recheck_barriers(&run_id);
                }
            }
            RunMessage::Stop { reason, .. } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                if run.stop_reason.is_none() {
                    run.stop_reason = Some(reason.clone());
                    run.event("stop", serde_json::json!({"reason": reason}));
                    if let Some(e) = &run.engine {
                        e.stop(Stop::Graceful);
                    }
                }
            }
        }
    }

    fn join_msg(&self, run_id: &str, accept: bool, reason: Option<String>) -> RunMessage {
        RunMessage::Join {
            run_id: run_id.into(),
            accept,
            // A plan error can be long; cut, it still names the problem.
            reason: reason.map(clip_reason),
            name: self.me.name.clone(),
            labels: self.me.labels.clone(),
            weight: self.me.workers as u32,
        }
    }

    /// Fetches the bundle from the origin, verifies its hash and prepares the plan.
    fn fetch_bundle(&self, run_id: String, origin: String, hash: String) {
        let mesh = self.mesh.clone();
        let tx = self.internal_tx.clone();
        let (dir, allow) = (
            self.me.data_dir.join("runs").join(&run_id),
            self.me.allow_targets.clone(),
        );
        tokio::spawn(async move {
            let request = RunRequest::Bundle {
                run_id: run_id.clone(),
                hash: hash.clone(),
            };
            // A member that learnt of the origin through gossip may have no connection
            // to it yet, and the first dial can fail (two nodes dialling each other at
            // once): a failed request is tried again, within the join window.
            let mut attempt = 0;
            let answer = loop {
                attempt += 1;
                match ask(&mesh, &origin, request.clone(), Duration::from_secs(10)).await {
                    Err(AskError::Transport(e)) if attempt < BUNDLE_ATTEMPTS => {
                        tracing::debug!(attempt, error = %e, "plan bundle request failed; trying again");
                        tokio::time::sleep(BUNDLE_RETRY_AFTER * attempt).await;
                    }
                    other => break other,
                }
            };
            let result = match answer {
                Ok(MeshResponse::Run(RunResponse::Bundle { bundle })) => {
                    if bundle.hash() != hash {
                        Err("the plan bundle does not match its hash".to_string())
                    } else {
                        prepare_bundle(&bundle, &dir, &allow)
                    }
                }
                Ok(MeshResponse::Run(RunResponse::Refused { reason })) => Err(reason),
                Ok(_) => Err("unexpected answer to a bundle request".into()),
                Err(AskError::Transport(e) | AskError::Other(e)) => {
                    Err(format!("cannot fetch the plan from the origin: {e}"))
                }
            };
            let _ = tx.send(Internal::Prepared { run_id, result });
        });
    }

    /// The origin prepares from its own bundle (no fetch).
    fn prepare(&mut self, run_id: String, bundle: Result<Bundle, String>) {
        let dir = self.me.data_dir.join("runs").join(&run_id);
        let result = bundle.and_then(|b| prepare_bundle(&b, &dir, &self.me.allow_targets));
        self.on_internal(Internal::Prepared { run_id, result });
    }

    fn maybe_close_joins(&mut self, run_id: &str) {
        let me = self.me.id.clone();
        let alive: BTreeSet<String> = self
            .view
            .read()
            .map(|v| v.alive_peers().iter().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.origin != me || run.phase != Phase::Joining {
            return;
        }
        let all_answered = run
            .expected
            .iter()
            .all(|p| run.joins.contains_key(p) || (*p != me && !alive.contains(p)));
        if !all_answered && Instant::now() < run.join_deadline {
            return;
        }
        let mut members = Vec::new();
        let mut refused = Vec::new();
        for (id, j) in &run.joins {
            let labels_ok = run
                .requirements
                .labels
                .iter()
                .all(|(k, v)| j.labels.get(k) == Some(v));
            if j.accept && labels_ok {
                members.push(RosterEntry {
                    id: id.clone(),
                    name: j.name.clone(),
                    labels: j.labels.clone(),
                    weight: j.weight,
                });
            } else {
                let why = if !labels_ok {
                    "labels do not match the run's selector".to_string()
                } else {
                    j.reason.clone().unwrap_or_default()
                };
                refused.push((j.name.clone(), why));
            }
        }
        for p in &run.expected {
            if !run.joins.contains_key(p) {
                refused.push((p.clone(), "did not answer in time".into()));
            }
        }
        let min = run.requirements.min_nodes.max(1) as usize;
        let abort = if run.requirements.require_all && !refused.is_empty() {
            Some(format!(
                "the plan requires all nodes, and {} refused: {}",
                refused.len(),
                refused
                    .iter()
                    .map(|(n, r)| format!("{n}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        } else if members.len() < min {
            Some(format!(
                "{} node(s) accepted, the run needs {min}{}",
                members.len(),
                if refused.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (refused: {})",
                        refused
                            .iter()
                            .map(|(n, r)| format!("{n}: {r}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                }
            ))
        } else {
            None
        };
        if let Some(reason) = abort {
            run.phase = Phase::Done;
            if let Some(c) = run.client.take() {
                let _ = c.done.send(Err(reason.clone()));
            }
            let msg = RunMessage::Abort {
                run_id: run_id.into(),
                reason,
            };
            self.publish(msg);
            return;
        }
        // The lowest id leads term 1: every member can recompute it.
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let msg = RunMessage::Roster {
            run_id: run_id.into(),
            members,
            refused,
        };
        run.roster_msg = Some(msg.clone());
        self.publish(msg.clone());
        self.on_run_message(me, msg);
    }

    fn sync_clock(&self, run_id: String, leader: String) {
        let tx = self.internal_tx.clone();
        let mesh = self.mesh.clone();
        tokio::spawn(async move {
            let mut best: Option<(u64, i64)> = None;
            for _ in 0..CLOCK_SAMPLES {
                // Re-stamped by the event loop as it sends the request.
                let req = RunRequest::Clock { t1_us: unix_us() };
                if let Ok(MeshResponse::Run(RunResponse::Clock {
                    t1_us,
                    t2_us,
                    t3_us,
                    received_us,
                })) = ask(&mesh, &leader, req, Duration::from_secs(2)).await
                {
                    // Both ends of the sample are the event loop's (the mesh's
                    // `stamp_clock_request` and `stamp_clock_response`), so the hops
                    // between it and this task count in neither direction.
                    let t4 = received_us.unwrap_or_else(unix_us);
                    let (off, rtt) = clock_offset(t1_us, t2_us, t3_us, t4);
                    if best.is_none_or(|(r, _)| rtt < r) {
                        best = Some((rtt, off));
                    }
                }
            }
            let offset_us = best.map(|(_, o)| o).unwrap_or(0);
            let _ = tx.send(Internal::Clock { run_id, offset_us });
        });
    }

    fn arrive(&mut self, run_id: &str, barrier: &str, detail: BarrierDetail) {
        let me = self.me.id.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.my_arrivals.insert(barrier.into(), detail.clone());
        let msg = RunMessage::Arrive {
            run_id: run_id.into(),
            barrier: barrier.into(),
            detail,
        };
        self.publish(msg.clone());
        self.on_run_message(me, msg);
    }

    /// After a member is lost: every barrier may now be complete without it.
    fn recheck_barriers(&mut self, run_id: &str) {
        for b in ["ready", "started", "finished"] {
            self.on_barrier_progress(run_id, b);
        }
    }

    fn on_barrier_progress(&mut self, run_id: &str, barrier: &str) {
        let me = self.me.id.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if !run.barrier_complete(barrier) {
            return;
        }
        match barrier {
            "ready" if run.leader == me && run.assign_msg.is_none() => {
                // Capacity-weighted execution segments; the roster order is the node index.
                let weights: Vec<u64> = run.roster.iter().map(|m| m.weight as u64).collect();
                let base = match Striping::from_weights(&weights) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot split the run");
                        return;
                    }
                };
                let start = unix_us() + START_LEAD.as_micros() as u64;
                let mut vus = Assignment::new(base.clone());
                let mut events = Assignment::new(base);
                // Members lost before the start: their shares go to the survivors from
                // the first index on, so nothing is planned on a dead node.
                let survivors: Vec<(usize, u64)> = run
                    .roster
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| !run.lost.contains(&m.id))
                    .map(|(i, m)| (i, m.weight as u64))
                    .collect();
                for (i, m) in run.roster.iter().enumerate() {
                    if run.lost.contains(&m.id) {
                        let moved = Reassignment::new(i, 0, &survivors)
                            .and_then(|r| vus.reassign(r))
                            .and_then(|_| Reassignment::new(i, 0, &survivors))
                            .and_then(|r| events.reassign(r));
                        if let Err(e) = moved {
                            tracing::error!(error = %e, "cannot move a lost member's share");
                            return;
                        }
                        run.reassigned.insert(m.id.clone());
                    }
                }
                let msg = RunMessage::Assign {
                    run_id: run_id.into(),
                    term: run.term,
                    vus,
                    events,
                    start_unix_us: start,
                };
                run.assign_msg = Some(msg.clone());
                self.publish(msg.clone());
                self.on_run_message(me, msg);
            }
            "started" => {
                let starts: Vec<u64> = run.barriers["started"]
                    .values()
                    .filter_map(|d| d.started_unix_us)
                    .collect();
                if let (Some(lo), Some(hi)) = (starts.iter().min(), starts.iter().max()) {
                    let skew = hi - lo;
                    // How far after the agreed instant the last node began (on the
                    // leader's clock; negative only through clock-offset error).
                    let late = run.start_unix_us.map(|at| *hi as i64 - at as i64);
                    run.tell(serde_json::json!({"event": "started", "nodes": starts.len(), "start_skew_us": skew, "start_late_us": late}));
                }
            }
            "finished" => self.maybe_report(run_id),
            _ => {}
        }
    }

    fn start_engine(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let (Some(index), Some(plan), Some(split), Some(start)) = (
            run.my_index,
            run.plan.clone(),
            run.split.clone(),
            run.start_unix_us,
        ) else {
            return;
        };
        if run.stop_reason.is_some() {
            // Stopped before it started: nothing to run, but the barriers still close.
            run.phase = Phase::Running;
            self.arrive(
                run_id,
                "finished",
                BarrierDetail {
                    snapshots: Some(0),
                    ..Default::default()
                },
            );
            return;
        }
        run.phase = Phase::Running;
        let _ = self
            .mesh
            .try_send(MeshCommand::SetState(NodeState::Running));
        let local_start_us = start as i64 - run.clock_offset_us;
        let now_us = unix_us() as i64;
        let start_at =
            Instant::now() + Duration::from_micros((local_start_us - now_us).max(0) as u64);
        let http = match client_settings(&plan, &self.me.allow_targets)
            .and_then(|s| Shared::new(s).map_err(|e| e.to_string()))
        {
            Ok(h) => h,
            Err(e) => {
                self.cannot_run(run_id, format!("cannot configure HTTP for the run: {e}"));
                return;
            }
        };
        let live = LiveAssignment::new(split);
        run.live = Some(live.clone());
        let workers = self.me.workers.max(1);
        run.workers = workers;
        let spec = RunSpec {
            plan: plan.clone(),
            assignment: live,
            node: index,
            node_name: self.me.name.clone(),
            workers,
            http,
            start_at,
            graceful_stop: self.me.graceful_stop,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let engine = match Engine::start(spec, tx) {
            Ok(e) => e,
            Err(e) => {
                self.cannot_run(run_id, format!("cannot start the engine: {e}"));
                return;
            }
        };
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        run.engine = Some(engine.stop.clone());
        run.collector = Some(NodeCollector::new(plan.layout.clone(), workers));
        run.cpu = CpuSampler::default();
        let internal = self.internal_tx.clone();
        let rid = run_id.to_string();
        let offset = run.clock_offset_us;
        let mut engine_started = engine.started.clone();
        let settled = tokio::time::Instant::from_std(start_at + START_SETTLE);
        tokio::spawn(async move {
            // Not woken by the stamp itself: this task, the actor and the mesh taking it
            // up at the start instant would compete with the workers (this node's, and
            // on a shared machine other nodes') that are waking for that same instant.
            tokio::time::sleep_until(settled).await;
            // The engine's own stamp of when its workers passed the start instant (on
            // this node's wall clock), not a wake-up of this task on tokio's 1 ms timer.
            let local = match engine_started.wait_for(Option::is_some).await {
                Ok(at) => at.unwrap_or_else(unix_us),
                Err(_) => unix_us(),
            };
            let started = (local as i64 + offset).max(0) as u64;
            let _ = internal.send(Internal::Started {
                run_id: rid.clone(),
                started_unix_us: started,
            });
            while let Some(report) = rx.recv().await {
                let _ = internal.send(Internal::Report {
                    run_id: rid.clone(),
                    report,
                });
            }
        });
        // The engine's threads end by themselves; join them off the actor.
        std::thread::spawn(move || engine.join());
        let duration = plan_duration(&plan);
        run.tell(serde_json::json!({"event": "assigned", "node": self.me.name, "index": index, "duration_s": duration.as_secs_f64()}));
    }

    /// This node cannot send its share: it says why and arrives at `finished` with no
    /// snapshots, so the run ends everywhere and the origin reports (without this
    /// node's share, which the report's `node_failed` event names) instead of waiting.
    fn cannot_run(&mut self, run_id: &str, error: String) {
        tracing::error!(run = run_id, %error, "this node cannot run its share");
        let _ = self.mesh.try_send(MeshCommand::SetState(NodeState::Idle));
        self.arrive(
            run_id,
            "finished",
            BarrierDetail {
                snapshots: Some(0),
                error: Some(clip_reason(error)),
                ..Default::default()
            },
        );
    }

    // ---------------------------------------------------------------- internal

    fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Prepared { run_id, result } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                let join = match result {
                    // A node that refuses to send the load still keeps the plan: as the
                    // origin it merges the others' measurements for its CLI.
                    Ok((plan, refusal)) => {
                        run.agg = Some(RunAggregate::new(plan.layout.clone()));
                        run.plan = Some(plan);
                        match refusal {
                            None => self.join_msg(&run_id, true, None),
                            Some(why) => self.join_msg(&run_id, false, Some(why)),
                        }
                    }
                    Err(e) => {
                        run.prepared_error = Some(e.clone());
                        self.join_msg(&run_id, false, Some(e))
                    }
                };
                let run = self.runs.get_mut(&run_id).expect("present");
                run.my_join = Some(join.clone());
                let me = self.me.id.clone();
                self.publish(join.clone());
                self.on_run_message(me, join);
            }
            Internal::Clock { run_id, offset_us } => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.clock_offset_us = offset_us;
                }
                self.arrive(
                    &run_id,
                    "ready",
                    BarrierDetail {
                        clock_offset_us: Some(offset_us),
                        ..Default::default()
                    },
                );
            }
            Internal::Started {
                run_id,
                started_unix_us,
            } => {
                self.arrive(
                    &run_id,
                    "started",
                    BarrierDetail {
                        started_unix_us: Some(started_unix_us),
                        ..Default::default()
                    },
                );
            }
            Internal::Report { run_id, report } => self.on_report(&run_id, report),
            Internal::Fetched {
                run_id,
                node,
                snapshots,
                missing,
            } => {
                for s in snapshots {
                    if s.run_id == run_id && s.node == node {
                        self.on_snapshot(&node, s);
                    }
                }
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.absent.entry(node).or_default().extend(missing);
                }
                self.maybe_report(&run_id);
            }
        }
    }

    fn on_report(&mut self, run_id: &str, report: WorkerReport) {
        let me = self.me.id.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(collector) = run.collector.as_mut() else {
            return;
        };
        let seconds = collector.add(report);
        let finished = collector.finished();
        let mut out = Vec::new();
        for s in seconds {
            let cpu = run.cpu.sample(run.workers);
            run.published = run.published.max(s.second + 1);
            out.push(SnapshotMessage {
                run_id: run_id.into(),
                node: me.clone(),
                seq: s.second,
                vus: s.vus,
                cpu,
                metrics: s.metrics.encode(),
            });
        }
        let count = run.published;
        if finished {
            run.collector = None;
        }
        for msg in out {
            if let Ok(mut st) = self.store.snapshots.lock() {
                st.insert((run_id.to_string(), msg.seq), msg.clone());
            }
            self.publish_body(GossipBody::Snapshot(Box::new(msg.clone())), true);
            self.on_snapshot(&me, msg);
        }
        if finished {
            let _ = self.mesh.try_send(MeshCommand::SetState(NodeState::Idle));
            self.arrive(
                run_id,
                "finished",
                BarrierDetail {
                    snapshots: Some(count),
                    ..Default::default()
                },
            );
        }
    }

    fn on_snapshot(&mut self, from: &str, s: SnapshotMessage) {
        let Some(run) = self.runs.get_mut(&s.run_id) else {
            return;
        };
        if s.node != from || !run.roster.iter().any(|m| m.id == s.node) {
            return;
        }
        let node_name = run.name_of(&s.node);
        let live_nodes = run.live_members().count();
        let Some(agg) = run.agg.as_mut() else { return };
        if !run.seen.entry(s.node.clone()).or_default().insert(s.seq) {
            return;
        }
        let metrics = match Metrics::decode(&s.metrics) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(node = %s.node, error = %e, "snapshot refused");
                return;
            }
        };
        let second = NodeSecond {
            second: s.seq,
            metrics,
            vus: s.vus,
        };
        if let Err(e) = agg.add(&s.node, &second) {
            tracing::warn!(node = %s.node, error = %e, "snapshot does not fit the plan");
            return;
        }
        let cpu = run.cpu_max.entry(s.node.clone()).or_insert(0.0);
        *cpu = cpu.max(s.cpu);
        let node_point = crate::aggregate::point(s.seq, &second.metrics, s.vus, 1);
        let latest = agg.latest_complete(live_nodes);
        let totals = agg.totals.clone();
        let node_totals = agg.nodes.get(&s.node).map(|n| n.totals.clone());
        self.live.update(&run.id, &run.plan_name, |l| {
            l.push_node_point(&node_name, node_point);
            if let Some(p) = latest {
                l.push_point(p);
            }
            l.totals = Some(totals);
            if let Some(nt) = node_totals {
                l.node_totals.insert(node_name.clone(), nt);
            }
        });
        if run.client.is_some() {
            let nodes = live_nodes;
            if let Some(p) = agg.latest_complete(nodes) {
                run.tell(serde_json::json!({"progress": p, "nodes": nodes}));
            }
        }
    }

    // ---------------------------------------------------------------- loss

    fn on_lost(&mut self, peer: &str) {
        let me = self.me.id.clone();
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        for run_id in ids {
            let Some(run) = self.runs.get_mut(&run_id) else {
                continue;
            };
            // A proposal whose origin died before its roster will never start.
            if run.origin == peer && run.roster.is_empty() && run.phase < Phase::Done {
                run.phase = Phase::Done;
                run.finished_at = Some(Instant::now());
                continue;
            }
            if run.phase >= Phase::Done
                || !run.roster.iter().any(|m| m.id == peer)
                || run.lost.contains(peer)
            {
                // The origin may still be waiting for joins.
                if run.phase == Phase::Joining {
                    self.maybe_close_joins(&run_id);
                }
                continue;
            }
            run.note_lost(peer);
            let was_leader = run.leader == peer;
            if was_leader {
                // The lowest live id leads the next term.
                if let Some(next) = run.live_members().map(|m| m.id.clone()).min() {
                    run.term += 1;
                    run.leader = next.clone();
                    let term = run.term;
                    let nname = run.name_of(&next);
                    run.event(
                        "leader_elected",
                        serde_json::json!({"leader": nname, "term": term}),
                    );
                    if next == me {
                        let msg = RunMessage::Leader {
                            run_id: run_id.clone(),
                            term,
                            leader: me.clone(),
                        };
                        run.leader_msgs.push(msg.clone());
                        self.publish(msg);
                    }
                }
            }
            let run = self.runs.get_mut(&run_id).expect("present");
            if run.leader == me {
                self.reassign(&run_id, peer);
            }
            self.recheck_barriers(&run_id);
        }
    }

    /// The leader moves a lost member's share to the survivors, by capacity.
    fn reassign(&mut self, run_id: &str, lost: &str) {
        let me = self.me.id.clone();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let (Some(split), Some(plan)) = (run.split.clone(), run.plan.clone()) else {
            // Not started yet: the assignment will only name live members.
            return;
        };
        let Some(lost_index) = run.roster.iter().position(|m| m.id == lost) else {
            return;
        };
        let survivors: Vec<(usize, u64)> = run
            .roster
            .iter()
            .enumerate()
            .filter(|(_, m)| !run.lost.contains(&m.id))
            .map(|(i, m)| (i, m.weight as u64))
            .collect();
        if survivors.is_empty() || split.vus.is_lost(lost_index) {
            return;
        }
        // Arrival events from a moment just ahead of now; every scenario's events
        // share the index space, so take the earliest of their next indices.
        let at = Duration::from_secs_f64((run.run_time_s() + FAILOVER_LEAD.as_secs_f64()).max(0.0));
        let from_event = plan
            .scenarios
            .iter()
            .filter_map(|s| {
                let sched = s.executor.arrival_schedule().ok()??;
                let t = at.checked_sub(s.start_after).unwrap_or_default();
                Some(first_event_at(&sched, t))
            })
            .min()
            .unwrap_or(0);
        let mut vus = split.vus.clone();
        let mut events = split.events.clone();
        let ok = Reassignment::new(lost_index, 0, &survivors)
            .and_then(|r| vus.reassign(r))
            .and_then(|_| Reassignment::new(lost_index, from_event, &survivors))
            .and_then(|r| events.reassign(r));
        if let Err(e) = ok {
            tracing::error!(error = %e, "cannot reassign the lost member's share");
            return;
        }
        let names: Vec<String> = survivors
            .iter()
            .map(|(i, _)| run.roster[*i].name.clone())
            .collect();
        let moved = format!(
            "VUs and arrival events from #{from_event} of {} to {}",
            run.name_of(lost),
            names.join(", ")
        );
        let term = run.term;
        let at_s = at.as_secs_f64();
        run.event(
            "reassigned",
            serde_json::json!({"lost": run.name_of(lost), "from_s": at_s, "moved": moved.clone()}),
        );
        let msg = RunMessage::Reassign {
            run_id: run_id.into(),
            term,
            lost: lost.into(),
            vus,
            events,
            at_s,
            moved,
        };
        run.leader_msgs.push(msg.clone());
        self.publish(msg.clone());
        self.on_run_message(me, msg);
    }

    // ---------------------------------------------------------------- ticks

    fn on_tick(&mut self) {
        let me = self.me.id.clone();
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        for run_id in ids {
            let Some(run) = self.runs.get(&run_id) else {
                continue;
            };
            if run.phase < Phase::Done
                || run.finished_at.is_some_and(|t| t.elapsed() < REPUBLISH * 3)
            {
                self.mirror_live(run);
            }
            // Best-effort gossip: republish what others may have missed.
            let mut again = Vec::new();
            if run.phase == Phase::Joining {
                if let Some(j) = &run.my_join {
                    again.push(j.clone());
                }
            }
            if run.phase < Phase::Done {
                if let Some(r) = &run.roster_msg {
                    if !run.barrier_complete("ready") {
                        again.push(r.clone());
                    }
                }
                if let Some(a) = &run.assign_msg {
                    if !run.barrier_complete("started") {
                        again.push(a.clone());
                    }
                }
                again.extend(run.leader_msgs.iter().cloned());
                if let Some(stop) = &run.stop_msg {
                    if !run.barrier_complete("finished") {
                        again.push(stop.clone());
                    }
                }
                for (b, d) in &run.my_arrivals {
                    if !run.barrier_complete(b) {
                        again.push(RunMessage::Arrive {
                            run_id: run_id.clone(),
                            barrier: b.clone(),
                            detail: d.clone(),
                        });
                    }
                }
            }
            let undated = run.phase == Phase::Done && run.finished_at.is_none();
            let joining_origin = run.phase == Phase::Joining && run.origin == me;
            // A member that never hears a roster or an abort gives up on the proposal
            // rather than stay committed to it.
            let stale_join = run.phase == Phase::Joining
                && run.origin != me
                && run.roster.is_empty()
                && run.join_deadline.elapsed() > JOIN_WINDOW * 3;
            let finishing = run.phase == Phase::Finishing;
            let done_long_ago = run
                .finished_at
                .is_some_and(|t| t.elapsed() > Duration::from_secs(600));
            for m in again {
                self.publish(m);
            }
            if joining_origin {
                self.maybe_close_joins(&run_id);
            }
            if stale_join || undated {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.phase = Phase::Done;
                    run.finished_at = Some(Instant::now());
                }
            }
            if finishing {
                self.maybe_report(&run_id);
            }
            if done_long_ago {
                self.runs.remove(&run_id);
                self.live.remove(&run_id);
                if let Ok(mut s) = self.store.snapshots.lock() {
                    s.retain(|(r, _), _| *r != run_id);
                }
            }
        }
    }

    /// Copies the run's phase, members and events into the live view.
    fn mirror_live(&self, run: &Run) {
        let phase = serde_json::to_value(run.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let members: Vec<crate::live::LiveMember> = run
            .roster
            .iter()
            .map(|m| crate::live::LiveMember {
                id: m.id.clone(),
                name: m.name.clone(),
                labels: m.labels.clone(),
                status: if run.lost.contains(&m.id) {
                    "lost".into()
                } else if run.phase >= Phase::Done {
                    "completed".into()
                } else {
                    "running".into()
                },
            })
            .collect();
        let leader = run.name_of(&run.leader);
        let started = run.start_unix_us.map(|u| u / 1000).unwrap_or(0);
        let layout = run.plan.as_ref().map(|p| p.layout.clone());
        let plan_name = run.plan.as_ref().map(|p| p.plan.name.clone());
        self.live.update(&run.id, &run.plan_name, |l| {
            if let Some(n) = plan_name {
                l.plan = n;
            }
            l.phase = phase;
            l.members = members;
            l.leader = leader;
            l.started_unix_ms = started;
            l.events = run.events.clone();
            if l.layout.is_none() {
                l.layout = layout;
            }
        });
    }

    /// Once every live member finished: re-fetch missing snapshots, then (on the
    /// origin) build the summary for the CLI.
    fn maybe_report(&mut self, run_id: &str) {
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        if run.phase >= Phase::Done || !run.barrier_complete("finished") {
            return;
        }
        run.phase = Phase::Finishing;
        let since = *run.finishing_since.get_or_insert_with(Instant::now);
        let mut missing: Vec<(String, Vec<u64>)> = Vec::new();
        let mut unavailable: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        if let Some(fin) = run.barriers.get("finished") {
            for (node, d) in fin {
                if run.lost.contains(node) {
                    continue;
                }
                let count = d.snapshots.unwrap_or(0);
                let seen = run.seen.get(node);
                let absent = run.absent.get(node);
                let (gone, gaps): (Vec<u64>, Vec<u64>) = (0..count)
                    .filter(|s| !seen.is_some_and(|x| x.contains(s)))
                    .partition(|s| absent.is_some_and(|x| x.contains(s)));
                if !gaps.is_empty() {
                    missing.push((node.clone(), gaps));
                }
                if !gone.is_empty() {
                    unavailable.insert(node.clone(), gone);
                }
            }
        }
        // Waiting on for what a member does not have, or cannot send, would leave the
        // CLI without any report: past FINISH_WAIT the report goes out without those
        // seconds, and its events say which ones.
        if !missing.is_empty() && since.elapsed() >= FINISH_WAIT {
            for (node, gaps) in missing.drain(..) {
                let all = unavailable.entry(node).or_default();
                all.extend(gaps);
                all.sort_unstable();
            }
        }
        if !missing.is_empty() {
            if run.fetch_asked.elapsed() < Duration::from_millis(800) {
                return;
            }
            run.fetch_asked = Instant::now();
            for (node, mut seqs) in missing {
                seqs.truncate(SNAPSHOTS_PER_REQUEST);
                let req = RunRequest::Snapshots {
                    run_id: run_id.into(),
                    node: node.clone(),
                    seqs,
                };
                let (tx, mesh) = (self.internal_tx.clone(), self.mesh.clone());
                let rid = run_id.to_string();
                tokio::spawn(async move {
                    if let Ok(MeshResponse::Run(RunResponse::Snapshots { snapshots, missing })) =
                        ask(&mesh, &node, req, Duration::from_secs(5)).await
                    {
                        let _ = tx.send(Internal::Fetched {
                            run_id: rid,
                            node,
                            snapshots,
                            missing,
                        });
                    }
                });
            }
            return;
        }
        for (node, seconds) in unavailable {
            let name = run.name_of(&node);
            let seconds = second_ranges(&seconds);
            tracing::warn!(node = %name, %seconds, "reporting without seconds a member could not send");
            run.event(
                "snapshots_missing",
                serde_json::json!({"node": name, "seconds": seconds}),
            );
        }
        run.phase = Phase::Done;
        run.finished_at = Some(Instant::now());
        run.ended_s = Some(run.run_time_s().max(0.0));
        let Some(client) = run.client.take() else {
            return;
        };
        let duration_s = run.run_time_s().max(0.0);
        let Some(agg) = run.agg.as_mut() else {
            let _ = client.done.send(Err("the run has no measurements".into()));
            return;
        };
        agg.finish();
        let nodes: Vec<NodeInfo> = run
            .roster
            .iter()
            .map(|m| NodeInfo {
                id: m.id.clone(),
                name: m.name.clone(),
                labels: m.labels.clone(),
                status: if run.lost.contains(&m.id) {
                    "lost".into()
                } else {
                    "completed".into()
                },
                cpu: run.cpu_max.get(&m.id).copied().unwrap_or(0.0),
                start_late_us: run
                    .barriers
                    .get("started")
                    .and_then(|b| b.get(&m.id))
                    .and_then(|d| d.started_unix_us)
                    .zip(run.start_unix_us)
                    .map(|(started, at)| started as i64 - at as i64),
                clock_offset_us: run
                    .barriers
                    .get("ready")
                    .and_then(|b| b.get(&m.id))
                    .and_then(|d| d.clock_offset_us),
            })
            .collect();
        let starts: Vec<u64> = run
            .barriers
            .get("started")
            .map(|b| b.values().filter_map(|d| d.started_unix_us).collect())
            .unwrap_or_default();
        let skew = match (starts.iter().min(), starts.iter().max()) {
            (Some(a), Some(b)) => b - a,
            _ => 0,
        };
        let Some(plan) = run.plan.clone() else {
            let _ = client.done.send(Err("the run's plan is missing".into()));
            return;
        };
        let summary = report::build(
            agg,
            SummaryInput {
                run_id: &run.id,
                plan: &plan.plan,
                started_at_unix_ms: run
                    .start_unix_us
                    .map(|u| u / 1000)
                    .unwrap_or(run.started_unix_ms),
                duration_s,
                nodes: &nodes,
                events: run.events.clone(),
                start_skew_us: skew,
                plan_source: &plan.source,
            },
        );
        self.live.finish(summary.clone());
        let _ = client.done.send(Ok(summary));
    }
}

/// How often a member asks the origin for the plan bundle before it refuses the run,
/// and the pause before the next try (times the attempt): all within `JOIN_WINDOW`.
const BUNDLE_ATTEMPTS: u32 = 4;
const BUNDLE_RETRY_AFTER: Duration = Duration::from_millis(200);

/// Why a request to a peer got no answer.
enum AskError {
    /// The mesh could not carry it (no connection, a failed dial, a closed stream):
    /// worth trying again.
    Transport(String),
    /// Anything else (a timeout, the mesh gone, a bad peer id): not.
    Other(String),
}

/// Sends a run request to a peer from outside the actor and waits for the answer.
async fn ask(
    mesh: &mpsc::Sender<MeshCommand>,
    peer: &str,
    req: RunRequest,
    limit: Duration,
) -> Result<MeshResponse, AskError> {
    let peer: PeerId = peer
        .parse()
        .map_err(|_| AskError::Other(format!("`{peer}` is not a peer id")))?;
    let (reply, rx) = oneshot::channel();
    mesh.send(MeshCommand::Request {
        peer,
        request: MeshRequest::Run(req),
        reply,
    })
    .await
    .map_err(|_| AskError::Other("the mesh went away".into()))?;
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(answer))) => Ok(answer),
        Ok(Ok(Err(e))) => Err(AskError::Transport(e)),
        Ok(Err(_)) => Err(AskError::Other("the mesh went away".into())),
        Err(_) => Err(AskError::Other("timed out".into())),
    }
}

/// Sorted seconds as short text: `3-7, 9`.
fn second_ranges(seconds: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seconds.len() {
        let start = seconds[i];
        let mut end = start;
        while i + 1 < seconds.len() && seconds[i + 1] == end + 1 {
            i += 1;
            end = seconds[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

fn control_topic_body(m: RunMessage) -> GossipBody {
    GossipBody::Run(Box::new(m))
}

/// The index of the first arrival at or after `t`.
fn first_event_at(s: &stampede_protocol::executor::ArrivalSchedule, t: Duration) -> u64 {
    let total = s.total_arrivals();
    let (mut lo, mut hi) = (0u64, total);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match s.arrival_time(mid) {
            Some(at) if at < t => lo = mid + 1,
            _ => hi = mid,
        }
    }
    lo
}

/// Writes a bundle's files under `dir`, compiles its plan there and checks every
/// target host against this node's allowlist: an error means the plan itself is
/// unusable here; `Some(reason)` beside the plan is this node's named refusal.
pub fn prepare_bundle(
    bundle: &Bundle,
    dir: &std::path::Path,
    allow: &[String],
) -> Result<(Arc<CompiledPlan>, Option<String>), String> {
    bundle.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, data) in &bundle.files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&p, data).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    let plan = crate::commands::compile_text(&bundle.plan_name, &bundle.plan, &[], dir)
        .map_err(|e| e.to_string())?;
    let refusal = check_targets(&plan, allow).err();
    Ok((Arc::new(plan), refusal))
}

/// Refuses a plan whose fixed target hosts this node's operator did not allow.
fn check_targets(plan: &CompiledPlan, allow: &[String]) -> Result<(), String> {
    let list = crate::http::Allowlist::from_entries(allow).map_err(|e| e.to_string())?;
    crate::embedded::refuse_unallowed_targets(plan, &list)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A re-fetch answer says which asked seconds the node does not have, and stops
    /// taking snapshots once its byte budget is spent (the rest are asked again).
    #[test]
    fn a_refetch_answer_names_what_it_lacks_and_keeps_to_its_byte_budget() {
        let store = RunStore::default();
        let third = vec![0u8; SNAPSHOT_ANSWER_BYTES / 3 + 1];
        {
            let mut stored = store.snapshots.lock().unwrap();
            for seq in [0u64, 1, 2, 3, 5] {
                let s = SnapshotMessage {
                    run_id: "r".into(),
                    node: "n".into(),
                    seq,
                    vus: 0,
                    cpu: 0.0,
                    metrics: third.clone(),
                };
                stored.insert(("r".into(), seq), s);
            }
        }
        let answer = store.respond(RunRequest::Snapshots {
            run_id: "r".into(),
            node: "n".into(),
            seqs: vec![4, 0, 1, 2, 3, 5],
        });
        let RunResponse::Snapshots { snapshots, missing } = answer else {
            panic!("not a snapshots answer: {answer:?}");
        };
        assert_eq!(missing, vec![4]);
        let seqs: Vec<u64> = snapshots.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2], "three thirds fill the budget");
    }

    #[test]
    fn missing_seconds_read_as_ranges() {
        assert_eq!(second_ranges(&[]), "");
        assert_eq!(second_ranges(&[4]), "4");
        assert_eq!(second_ranges(&[3, 4, 5, 6, 7, 9, 11, 12]), "3-7, 9, 11-12");
    }
}
