//! A deterministic simulation of the run protocol (`stampede-sim`): N real
//! [`RunMachine`]s exchange real protocol messages over a simulated network with a
//! virtual clock, seeded faults (loss, duplication, delay and reordering, partitions
//! that heal, crashes, pauses longer or shorter than the failure timeout, clock
//! offsets, a member forging leader messages), and a simulated engine per node that
//! starts arrival events the way the real one does. Every schedule is then checked
//! against the protocol's invariants (`check`).
//!
//! The same seed always gives the same run: one RNG, one event queue ordered by
//! (time, sequence), no threads, no wall clock.
//!
//! Must not contain protocol logic of its own: every decision is the machine's.

pub mod check;
pub mod engine;
pub mod failover;
pub mod faults;
pub mod membership;
pub mod segments;
pub mod sizes;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stampede_protocol::machine::events::RunEvent;
use stampede_protocol::machine::version::{Move, Version, VersionId};
pub use stampede_protocol::machine::Aggregation;
pub use stampede_protocol::machine::Flaw;
use stampede_protocol::machine::{
    Effect, Input, Me, Now, OwnOutcome, Phase, ReportFacts, RunMachine, RunSchedule, Timing,
};
use stampede_protocol::mesh::{to_cbor, MeshRequest, PROTOCOL_VERSION};
use stampede_protocol::run::{Requirements, RunMessage, RunRequest};

use engine::{Engine, Plan};
use faults::{Fault, Schedule};

/// A marker no honest leader ever puts in a version: forged versions carry it.
pub const FORGED_EVENT: u64 = 4_242_424_242;

/// How often a node's driver ticks its machine (virtual µs).
const TICK_US: u64 = 50_000;
/// How often the engines step.
const ENGINE_STEP_US: u64 = 5_000;

/// What a simulated run is asked to do.
#[derive(Debug, Clone)]
pub struct Setup {
    pub nodes: usize,
    pub plan: Plan,
    pub timing: Timing,
    /// How long after the plan's end the simulation gives the nodes to finish.
    pub tail_us: u64,
    /// A deliberate flaw in every machine, for the mutation check.
    pub flaw: Flaw,
    /// Count every run message's encoded size (see [`Traffic`]); costs an encoding
    /// per message, so only when the figures are asked for.
    pub measure_traffic: bool,
    /// How the per-second snapshots travel (all-to-all gossip, or up a tree).
    pub aggregation: Aggregation,
}

/// What one node sent and received of the run's control traffic (run messages,
/// their real CBOR encoding plus the framing below), over the whole simulation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub messages_in: u64,
}

/// Framing a direct message pays on the wire besides its CBOR (counted as the whole
/// `MeshRequest` the node sends): it rides a standing stream to its peer
/// (node/src/mesh/direct.rs), so its 4-byte length, a yamux frame header (12) and a
/// noise frame's length and tag (18), and no answer. (Each went as a request-response
/// request until protocol version 5: a substream with its negotiation each way, and
/// an answer — ~150 bytes more per message, most of a witness's traffic.)
pub const DIRECT_FRAMING_BYTES: u64 = 34;
/// A gossiped message's envelope (protocol version, sender id) and gossipsub's
/// (source, sequence number, topic, 64-byte signature), with yamux and noise.
pub const GOSSIP_FRAMING_BYTES: u64 = 220;
/// How many times each node receives (and sends) a gossiped message, on average:
/// gossipsub's mesh of degree 6 carries it once over each of a node's ~6 mesh
/// links, in one direction or the other.
pub const GOSSIP_COPIES: u64 = 3;

/// Runs one seeded schedule and checks it.
pub fn run_one(
    setup: &Setup,
    kinds: &[faults::FaultKind],
    seed: u64,
) -> (World, Vec<check::Violation>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let schedule = Schedule::draw(
        &mut rng,
        setup.nodes,
        kinds,
        3_000_000,
        setup
            .plan
            .duration_us
            .saturating_sub(2_000_000)
            .max(3_000_001),
    );
    let mut w = World::new(setup.clone(), schedule, seed);
    w.run();
    let v = check::check(&w);
    (w, v)
}

#[derive(Debug, Clone)]
enum Payload {
    Msg(Arc<RunMessage>),
    Snapshot {
        node: usize,
        seq: u64,
    },
    /// A merged second up the tree (`published`: the root's gossip).
    Batch {
        seq: u64,
        covers: Arc<Vec<u32>>,
        published: bool,
    },
    Prepared,
    Clock {
        peer: usize,
    },
    Fetched {
        from: usize,
        seqs: Vec<u64>,
    },
    /// A member's answer to a reporter's ask for its own totals.
    Own {
        from: usize,
    },
    /// That ask timed out (the member crashed, or a partition cut it off).
    OwnFailed {
        from: usize,
    },
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        payload: Payload,
    },
    Tick {
        node: usize,
    },
    EngineStep,
    Crash {
        node: usize,
    },
    Pause {
        node: usize,
    },
    Resume {
        node: usize,
    },
}

/// One simulated node.
pub struct Node {
    pub id: String,
    pub machine: Option<RunMachine>,
    pub mono_base: u64,
    pub wall_offset: i64,
    pub crashed: bool,
    pub paused: bool,
    inbox: VecDeque<(usize, Payload)>,
    pub engine: Engine,
    /// Seconds this node published (what a re-fetch can answer).
    pub published: BTreeSet<u64>,
    /// Seconds merged into this node's aggregate, by the node they are of (only
    /// kept for nodes that may report: see `World::may_report`).
    pub merged: Vec<BTreeSet<u64>>,
    pub events: Vec<RunEvent>,
    pub report: Option<ReportFacts>,
    pub done_at: Option<u64>,
    pub versions: Vec<Version>,
    pub term_at_done: u64,
    pub roster: Vec<String>,
    claims_sent: Vec<u64>,
    /// What this node holds as an aggregator, by second (the node's buckets).
    held: std::collections::BTreeMap<u64, BTreeSet<u32>>,
    /// The batch (second, covers) just handed to the machine: what `Hold` and
    /// `MergeBatch` refer to.
    current: Option<(u64, Arc<Vec<u32>>)>,
    /// (member, second) pairs merged a second time (a reporter's only).
    pub counted_twice: Vec<(usize, u64)>,
    /// Where the tree's effects disagreed with what the node held (a forward of
    /// other members than it held, a hold or merge of no batch).
    pub tree_errors: Vec<String>,
    /// (member, second) pairs merged from batches (its live view), and one by one
    /// (the end's re-fetch, or all-to-all snapshots).
    pub merged_live: u64,
    pub merged_single: u64,
    /// When this node's engine took up a new split (a version moving a lost member's
    /// share): what the failover figures read.
    pub swapped_at: Vec<u64>,
    /// Members whose own totals this node took in (a reporter's, tree aggregation),
    /// and the asks it made.
    pub own_got: BTreeSet<usize>,
    pub own_asks: u64,
}

/// A started event: who, when (virtual time), and the run time it happened at by the
/// true run clock.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    pub node: usize,
    pub at: u64,
    pub true_run_us: i64,
}

/// The simulated world of one schedule.
pub struct World {
    pub setup: Setup,
    pub schedule: Schedule,
    rng: SmallRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    /// Slots of `events` already dispatched, to be used again: a thousand-node run
    /// schedules tens of millions of events, but only a few thousand are pending.
    free: Vec<usize>,
    /// By node: whether it may ever build the report (the origin and the witnesses;
    /// empty until the roster is known).
    may_report: Vec<bool>,
    pub nodes: Vec<Node>,
    pub starts: Vec<Vec<Start>>,
    /// Counted iterations started: pool slots by (base member, rank), per-VU
    /// iterations by (VU, iteration).
    pub pool_starts: std::collections::BTreeMap<(usize, u64), Vec<Start>>,
    pub vu_starts: std::collections::BTreeMap<(u64, u64), Vec<Start>>,
    pub trace: VecDeque<String>,
    pub run_start_unix: Option<u64>,
    partitions: Vec<(Vec<usize>, u64, u64)>,
    /// Control traffic per node (when `Setup::measure_traffic`).
    pub traffic: Vec<Traffic>,
    /// Virtual time of the first iteration started anywhere (the trigger is at 0).
    pub first_start_at: Option<u64>,
    /// Control bytes mesh-wide by message kind (`beat`, `gossip assign`, ...).
    pub traffic_by_kind: std::collections::BTreeMap<String, u64>,
    /// Encoded sizes of the measurements (when traffic is measured).
    sizes: Option<sizes::Sizes>,
    /// Node 0's merges of root batches: (virtual time, second, members covered), for
    /// the failover figures (`failover`).
    pub observed: Vec<(u64, u64, Vec<u32>)>,
}

const TRACE_KEEP: usize = 400;

impl World {
    pub fn new(setup: Setup, schedule: Schedule, seed: u64) -> World {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let nodes = (0..setup.nodes)
            .map(|i| Node {
                id: format!("p{i:04}"),
                machine: None,
                mono_base: rng.random_range(1_000_000..1_000_000_000),
                wall_offset: schedule.wall_offsets[i],
                crashed: false,
                paused: false,
                inbox: VecDeque::new(),
                engine: Engine::default(),
                published: BTreeSet::new(),
                merged: vec![BTreeSet::new(); setup.nodes],
                events: Vec::new(),
                report: None,
                done_at: None,
                versions: Vec::new(),
                term_at_done: 0,
                roster: Vec::new(),
                claims_sent: Vec::new(),
                held: Default::default(),
                current: None,
                counted_twice: Vec::new(),
                tree_errors: Vec::new(),
                merged_live: 0,
                merged_single: 0,
                swapped_at: Vec::new(),
                own_got: BTreeSet::new(),
                own_asks: 0,
            })
            .collect();
        let partitions = schedule
            .faults
            .iter()
            .filter_map(|f| match f {
                Fault::Partition { side, at, until } => Some((side.clone(), *at, *until)),
                _ => None,
            })
            .collect();
        let total = setup.plan.total() as usize;
        let sizes = setup.measure_traffic.then(sizes::Sizes::new);
        let setup_nodes = setup.nodes;
        World {
            setup,
            schedule,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free: Vec::new(),
            may_report: Vec::new(),
            nodes,
            starts: vec![Vec::new(); total],
            pool_starts: Default::default(),
            vu_starts: Default::default(),
            trace: VecDeque::new(),
            run_start_unix: None,
            partitions,
            traffic: vec![Traffic::default(); setup_nodes],
            first_start_at: None,
            traffic_by_kind: Default::default(),
            observed: Vec::new(),
            sizes,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.events[slot] = Some(ev);
                slot
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.queue.push(Reverse((t, self.seq, slot)));
    }

    fn note(&mut self, line: String) {
        if self.trace.len() >= TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("{:>10.3}s {line}", self.now as f64 / 1e6));
    }

    fn clocks(&self, i: usize) -> Now {
        let n = &self.nodes[i];
        Now {
            mono_us: self.now + n.mono_base,
            wall_us: (self.now as i64 + 1_000_000_000_000 + n.wall_offset) as u64,
        }
    }

    fn me(&self, i: usize) -> Me {
        Me {
            id: self.nodes[i].id.clone(),
            name: format!("n{i}"),
            labels: Default::default(),
            weight: 1,
        }
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.partitions.iter().any(|(side, from, until)| {
            self.now >= *from && self.now < *until && (side.contains(&a) != side.contains(&b))
        })
    }

    /// Sends over the simulated network: loss, duplication, delay (so reordering),
    /// partitions.
    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        if self.cut(from, to) || self.rng.random_bool(self.schedule.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.schedule.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut d = self
                .rng
                .random_range(self.schedule.delay_min..=self.schedule.delay_max);
            if self.schedule.spike > 0.0 && self.rng.random_bool(self.schedule.spike) {
                d += self.schedule.spike_us;
            }
            let t = self.now + d;
            if matches!(payload, Payload::Snapshot { .. }) && !self.hears_snapshots(to) {
                // A node that can never report merges a second for its dashboard
                // only, which nothing checks: all-to-all snapshots are N² machine
                // inputs a second, most of a thousand-node run's cost. The random
                // draws above are made all the same, so every seed runs as before.
                continue;
            }
            self.at(
                t,
                Ev::Deliver {
                    to,
                    from,
                    payload: payload.clone(),
                },
            );
        }
    }

    /// Whether node `to` is given the snapshots it is sent: the origin and the
    /// witnesses (the only nodes that may build the report), or everyone while the
    /// roster is not known yet.
    fn hears_snapshots(&self, to: usize) -> bool {
        self.may_report.get(to).copied().unwrap_or(true)
    }

    fn broadcast(&mut self, from: usize, payload: Payload) {
        for to in 0..self.nodes.len() {
            if to != from {
                self.send(from, to, payload.clone());
            }
        }
    }

    /// Runs the whole schedule; returns once every node is done or the time is up.
    pub fn run(&mut self) {
        let end = self.setup.plan.duration_us + 5_000_000 + self.setup.tail_us;
        for f in self.schedule.faults.clone() {
            match f {
                Fault::Crash { node, at } => self.at(at, Ev::Crash { node }),
                Fault::Pause { node, at, until } => {
                    self.at(at, Ev::Pause { node });
                    self.at(until, Ev::Resume { node });
                }
                Fault::Partition { .. } => {}
            }
        }
        for i in 0..self.nodes.len() {
            let jitter = self.rng.random_range(0..TICK_US);
            self.at(jitter, Ev::Tick { node: i });
        }
        self.at(ENGINE_STEP_US, Ev::EngineStep);
        // The CLI of node 0 starts the run.
        let now = self.clocks(0);
        let asked: BTreeSet<String> = self.nodes.iter().skip(1).map(|n| n.id.clone()).collect();
        let (m, effects) = RunMachine::new_origin(
            self.me(0),
            "sim-run",
            "hash",
            "sim.toml",
            Requirements::default(),
            asked,
            self.setup.timing,
            now,
        );
        self.nodes[0].machine = Some(m);
        if let Some(m) = self.nodes[0].machine.as_mut() {
            m.set_flaw(self.setup.flaw);
            m.set_aggregation(self.setup.aggregation);
        }
        self.apply(0, effects);
        self.deliver_local(0, Payload::Prepared);
        while let Some(Reverse((t, _, slot))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = t;
            let Some(ev) = self.events[slot].take() else {
                continue;
            };
            self.free.push(slot);
            self.dispatch(ev);
            if self.all_done() {
                break;
            }
        }
        for i in 0..self.nodes.len() {
            let line = match &self.nodes[i].machine {
                Some(m) => format!(
                    "n{i} at the end: {} term {} roster {} index {:?} version {:?} lease {:?} (mono now {}) ready {:?}",
                    m.phase().name(),
                    m.term(),
                    m.roster().len(),
                    m.my_index(),
                    m.version().map(|v| v.id),
                    m.lease(),
                    self.clocks(i).mono_us,
                    m.arrived(stampede_protocol::machine::events::Barrier::Ready)
                ),
                None => format!("n{i} at the end: never heard of the run"),
            };
            self.note(line);
        }
    }

    fn all_done(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.crashed || (n.machine.is_some() && n.done_at.is_some()))
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, payload } => {
                if self.nodes[to].crashed {
                    return;
                }
                if self.nodes[to].paused {
                    self.nodes[to].inbox.push_back((from, payload));
                    return;
                }
                self.deliver(to, from, payload);
            }
            Ev::Tick { node } => {
                if self.nodes[node].crashed {
                    return;
                }
                let next = self.now + TICK_US + self.rng.random_range(0..TICK_US / 5);
                self.at(next, Ev::Tick { node });
                if self.nodes[node].paused {
                    return;
                }
                // As the node's driver does: the engine's wanted claims, then the tick.
                let plan = self.setup.plan;
                let e = &self.nodes[node].engine;
                if e.running && !e.finished {
                    let wanted = e.wanted(&plan);
                    if wanted != self.nodes[node].claims_sent {
                        self.nodes[node].claims_sent = wanted.clone();
                        self.input(node, Input::Claims(wanted));
                    }
                }
                self.input(node, Input::Tick);
                self.forge(node);
            }
            Ev::EngineStep => {
                self.at(self.now + ENGINE_STEP_US, Ev::EngineStep);
                for i in 0..self.nodes.len() {
                    if !self.nodes[i].crashed && !self.nodes[i].paused {
                        self.step_engine(i);
                    }
                }
            }
            Ev::Crash { node } => {
                self.note(format!("n{node} crashes"));
                self.nodes[node].crashed = true;
            }
            Ev::Pause { node } => {
                if !self.nodes[node].crashed {
                    self.note(format!("n{node} paused"));
                    self.nodes[node].paused = true;
                }
            }
            Ev::Resume { node } => {
                if self.nodes[node].crashed {
                    return;
                }
                self.note(format!("n{node} resumed"));
                self.nodes[node].paused = false;
                // The engine's threads may run before the event loop catches up.
                self.step_engine(node);
                while let Some((from, p)) = self.nodes[node].inbox.pop_front() {
                    self.deliver(node, from, p);
                }
            }
        }
    }

    fn deliver_local(&mut self, to: usize, payload: Payload) {
        let d = self.rng.random_range(1_000..20_000);
        self.at(
            self.now + d,
            Ev::Deliver {
                to,
                from: to,
                payload,
            },
        );
    }

    fn deliver(&mut self, to: usize, from: usize, payload: Payload) {
        match payload {
            Payload::Msg(msg) => {
                if self.nodes[to].machine.is_none() {
                    if let RunMessage::Propose { .. } = msg.as_ref() {
                        let now = self.clocks(to);
                        let from_id = self.nodes[from].id.clone();
                        if let Some((m, effects)) = RunMachine::new_member(
                            self.me(to),
                            &from_id,
                            &msg,
                            None,
                            self.setup.timing,
                            now,
                        ) {
                            self.nodes[to].machine = Some(m);
                            if let Some(m) = self.nodes[to].machine.as_mut() {
                                m.set_flaw(self.setup.flaw);
                                m.set_aggregation(self.setup.aggregation);
                            }
                            self.apply(to, effects);
                        }
                    }
                    return;
                }
                let from_id = self.nodes[from].id.clone();
                self.input(to, Input::Message { from: from_id, msg });
            }
            Payload::Snapshot { node, seq } => {
                let id = self.nodes[node].id.clone();
                let from_id = self.nodes[from].id.clone();
                self.input(
                    to,
                    Input::Snapshot {
                        from: from_id,
                        node: id,
                        seq,
                    },
                );
            }
            Payload::Batch {
                seq,
                covers,
                published,
            } => {
                let from_id = self.nodes[from].id.clone();
                self.nodes[to].current = Some((seq, covers.clone()));
                self.input(
                    to,
                    Input::Batch {
                        from: from_id,
                        seq,
                        covers: covers.to_vec(),
                        published,
                    },
                );
                self.nodes[to].current = None;
            }
            Payload::Prepared => {
                let plan: Arc<dyn RunSchedule> = Arc::new(self.setup.plan);
                self.input(to, Input::Prepared(Ok(plan)));
            }
            Payload::Clock { peer } => {
                // The true offset to the peer sampled (the origin, whose wall clock is
                // the run clock), give or take the sync's error.
                let err = if self.schedule.offset_error_us > 0 {
                    self.rng.random_range(
                        -self.schedule.offset_error_us..=self.schedule.offset_error_us,
                    )
                } else {
                    0
                };
                let offset = self.nodes[peer].wall_offset - self.nodes[to].wall_offset + err;
                self.input(to, Input::ClockSynced { offset_us: offset });
            }
            Payload::Own { from: node } => {
                // As a node answers: its own totals once its engine is done (they are
                // kept before it arrives at `finished`), none before.
                let outcome = if self.nodes[node].engine.finished {
                    self.nodes[to].own_got.insert(node);
                    OwnOutcome::Got
                } else {
                    OwnOutcome::Refused
                };
                let id = self.nodes[node].id.clone();
                self.input(to, Input::OwnFetched { node: id, outcome });
            }
            Payload::OwnFailed { from: node } => {
                let id = self.nodes[node].id.clone();
                self.input(
                    to,
                    Input::OwnFetched {
                        node: id,
                        outcome: OwnOutcome::Failed,
                    },
                );
            }
            Payload::Fetched { from: node, seqs } => {
                let have = &self.nodes[node].published;
                let (got, missing): (Vec<u64>, Vec<u64>) =
                    seqs.iter().partition(|s| have.contains(s));
                let id = self.nodes[node].id.clone();
                self.input(
                    to,
                    Input::Fetched {
                        node: id,
                        got,
                        missing,
                    },
                );
            }
        }
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.clocks(i);
        let Some(m) = self.nodes[i].machine.as_mut() else {
            return;
        };
        let effects = m.handle(input, now);
        self.apply(i, effects);
    }

    fn apply(&mut self, i: usize, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Publish(msg) => {
                    if let RunMessage::Assign { version, term, .. } = msg.as_ref() {
                        self.note(format!("n{i} issues {:?} (term {term})", version.id));
                    }
                    if self.setup.measure_traffic {
                        let size = to_cbor(msg.as_ref()).len() as u64 + GOSSIP_FRAMING_BYTES;
                        self.count_gossip(&format!("gossip {}", msg.kind()), size);
                    }
                    self.broadcast(i, Payload::Msg(msg));
                }
                Effect::Send { to, msg } => {
                    let Some(j) = self.index(&to) else { continue };
                    if self.setup.measure_traffic {
                        let size = to_cbor(&MeshRequest::Run(RunRequest::Message {
                            protocol_version: PROTOCOL_VERSION,
                            msg: Box::new(msg.as_ref().clone()),
                        }))
                        .len() as u64
                            + DIRECT_FRAMING_BYTES;
                        self.count_direct(&format!("direct {}", msg.kind()), i, j, size);
                    }
                    self.send(i, j, Payload::Msg(msg));
                }
                Effect::FetchBundle { origin } => {
                    let o = self.index(&origin);
                    if o.is_some_and(|o| !self.cut(i, o) && !self.nodes[o].crashed) {
                        self.deliver_local(i, Payload::Prepared);
                    }
                }
                Effect::SyncClock { peer } => {
                    if let Some(peer) = self.index(&peer) {
                        self.deliver_local(i, Payload::Clock { peer });
                    }
                }
                Effect::StartEngine {
                    split,
                    start_local_wall_us,
                    index,
                } => {
                    self.note(format!("n{i} starts its engine as member {index}"));
                    let e = &mut self.nodes[i].engine;
                    e.running = true;
                    e.index = index;
                    e.set_split(split);
                    e.start_local_wall = start_local_wall_us;
                }
                Effect::SwapSplit(split) => {
                    self.nodes[i].engine.set_split(split);
                    self.nodes[i].swapped_at.push(self.now);
                }
                Effect::Lease(l) => self.nodes[i].engine.lease = l,
                Effect::Claims(c) => self.nodes[i].engine.allowed = c,
                Effect::StopEngine(_) => self.nodes[i].engine.stopped = true,
                Effect::PublishSnapshot { seq } => {
                    if let Some(sizes) = &self.sizes {
                        let size =
                            sizes.snapshot(self.requests_per_member(1)) + GOSSIP_FRAMING_BYTES;
                        self.count_gossip("gossip snapshot", size);
                    }
                    self.broadcast(i, Payload::Snapshot { node: i, seq });
                }
                Effect::Merge { node, seq } => {
                    if let Some(j) = self.index(&node) {
                        self.nodes[i].merged_single += 1;
                        self.merged(i, j, seq);
                    }
                }
                Effect::SendSnapshot { seq, to } => {
                    let Some(j) = self.index(&to) else { continue };
                    if let Some(sizes) = &self.sizes {
                        let size = sizes.batch(self.requests_per_member(1), i as u32)
                            + DIRECT_FRAMING_BYTES;
                        self.count_direct("direct snapshot", i, j, size);
                    }
                    let covers = Arc::new(vec![i as u32]);
                    self.send(
                        i,
                        j,
                        Payload::Batch {
                            seq,
                            covers,
                            published: false,
                        },
                    );
                }
                Effect::Hold { seq, own } => {
                    let n = &mut self.nodes[i];
                    let at_hand = if own {
                        n.published
                            .contains(&seq)
                            .then(|| (seq, Arc::new(vec![i as u32])))
                    } else {
                        n.current.clone()
                    };
                    match at_hand {
                        Some((s, covers)) if s == seq => {
                            n.held
                                .entry(seq)
                                .or_default()
                                .extend(covers.iter().copied());
                        }
                        other => n
                            .tree_errors
                            .push(format!("held second {seq} with {other:?} at hand")),
                    }
                }
                Effect::Forward { seq, to, covers } => {
                    let held = self.nodes[i].held.remove(&seq).unwrap_or_default();
                    if held.iter().copied().ne(covers.iter().copied()) {
                        self.nodes[i].tree_errors.push(format!(
                            "forwarded second {seq} as {covers:?} but held {held:?}"
                        ));
                    }
                    let highest = covers.last().copied().unwrap_or(0);
                    let requests = self.requests_per_member(covers.len() as u64);
                    let covers = Arc::new(covers);
                    match to {
                        Some(to) => {
                            let Some(j) = self.index(&to) else { continue };
                            if let Some(sizes) = &self.sizes {
                                let size = sizes.batch(requests, highest) + DIRECT_FRAMING_BYTES;
                                self.count_direct("direct group batch", i, j, size);
                            }
                            self.send(
                                i,
                                j,
                                Payload::Batch {
                                    seq,
                                    covers,
                                    published: false,
                                },
                            );
                        }
                        None => {
                            if let Some(sizes) = &self.sizes {
                                let size = sizes.batch(requests, highest) + GOSSIP_FRAMING_BYTES;
                                self.count_gossip("gossip root batch", size);
                            }
                            self.nodes[i].current = Some((seq, covers.clone()));
                            self.broadcast(
                                i,
                                Payload::Batch {
                                    seq,
                                    covers,
                                    published: true,
                                },
                            );
                        }
                    }
                }
                Effect::MergeBatch { seq, covers } => {
                    let at_hand = self.nodes[i].current.clone();
                    if at_hand
                        .as_ref()
                        .is_none_or(|(s, c)| *s != seq || **c != covers)
                    {
                        self.nodes[i].tree_errors.push(format!(
                            "merged second {seq} of {covers:?} with {at_hand:?} at hand"
                        ));
                    }
                    self.nodes[i].merged_live += covers.len() as u64;
                    if i == 0 {
                        self.observed.push((self.now, seq, covers.clone()));
                    }
                    for c in covers {
                        self.merged(i, c as usize, seq);
                    }
                }
                Effect::Fetch { node, seqs } => {
                    if let Some(j) = self.index(&node) {
                        self.answer_later(i, j, Payload::Fetched { from: j, seqs });
                    }
                }
                Effect::FetchOwn { node, .. } => {
                    self.nodes[i].own_asks += 1;
                    if let Some(j) = self.index(&node) {
                        if !self.answer_later(i, j, Payload::Own { from: j }) {
                            // The request times out (the machine asks again later).
                            self.at(
                                self.now + stampede_protocol::machine::ledger::OWN_TIMEOUT_US,
                                Ev::Deliver {
                                    to: i,
                                    from: j,
                                    payload: Payload::OwnFailed { from: j },
                                },
                            );
                        }
                    }
                }
                Effect::Event { event, .. } => {
                    self.note(format!("n{i} event {event:?}"));
                    self.nodes[i].events.push(event);
                }
                Effect::Report(facts) => {
                    self.note(format!("n{i} reports"));
                    self.nodes[i].report = Some(facts);
                }
                Effect::Aborted(why) => self.note(format!("n{i} aborted: {why}")),
                Effect::Done => {
                    let (term, version, roster) = match &self.nodes[i].machine {
                        Some(m) => (
                            m.term(),
                            m.version().cloned(),
                            m.roster().iter().map(|r| r.id.clone()).collect(),
                        ),
                        None => (0, None, Vec::new()),
                    };
                    let n = &mut self.nodes[i];
                    n.done_at = Some(self.now);
                    n.term_at_done = term;
                    n.roster = roster;
                    if let Some(v) = version {
                        n.versions.push(v);
                    }
                }
                Effect::Progress(_) | Effect::Busy(_) => {}
            }
        }
        if self.may_report.is_empty() {
            if let Some(m) = self.nodes[i]
                .machine
                .as_ref()
                .filter(|m| !m.roster().is_empty())
            {
                let mut may = vec![false; self.nodes.len()];
                may[0] = true;
                for &r in m.witnesses() {
                    if let Some(j) = m.roster().get(r).and_then(|e| self.index(&e.id)) {
                        may[j] = true;
                    }
                }
                self.may_report = may;
            }
        }
        // Every version a node holds is kept for the forgery check.
        if let Some(v) = self.nodes[i].machine.as_ref().and_then(|m| m.version()) {
            // Id and length tell a new version from the last one without comparing
            // every move on every input (a hundred-node run holds ~100 moves).
            let last = self.nodes[i].versions.last();
            if last.is_none_or(|l| l.id != v.id || l.moves.len() != v.moves.len()) {
                let v = v.clone();
                self.nodes[i].versions.push(v);
            }
        }
        if self.run_start_unix.is_none() {
            if let Some(v) = self.nodes[i].machine.as_ref().and_then(|m| m.version()) {
                self.run_start_unix = Some(v.start_unix_us);
            }
        }
    }

    /// A direct message of `size` bytes from `i` to `j`, and its empty answer.
    fn count_direct(&mut self, kind: &str, i: usize, j: usize, size: u64) {
        *self.traffic_by_kind.entry(kind.to_string()).or_default() += 2 * size;
        self.traffic[i].bytes_out += size;
        self.traffic[i].messages_out += 1;
        if !self.nodes[j].crashed {
            self.traffic[j].bytes_in += size;
            self.traffic[j].messages_in += 1;
        }
    }

    /// Node `j`'s answer to a request of node `i`, 1–30 ms later, if `j` is up and
    /// reachable; false when the request can get no answer.
    fn answer_later(&mut self, i: usize, j: usize, payload: Payload) -> bool {
        if self.nodes[j].crashed || self.cut(i, j) {
            return false;
        }
        let d = self.rng.random_range(1_000..30_000);
        self.at(
            self.now + d,
            Ev::Deliver {
                to: i,
                from: j,
                payload,
            },
        );
        true
    }

    /// A gossiped message of `size` bytes: every node receives and sends it about
    /// `GOSSIP_COPIES` times.
    fn count_gossip(&mut self, kind: &str, size: u64) {
        *self.traffic_by_kind.entry(kind.to_string()).or_default() +=
            2 * GOSSIP_COPIES * size * self.nodes.len() as u64;
        for t in &mut self.traffic {
            t.bytes_out += GOSSIP_COPIES * size;
            t.bytes_in += GOSSIP_COPIES * size;
            t.messages_out += GOSSIP_COPIES;
            t.messages_in += GOSSIP_COPIES;
        }
    }

    /// Requests in one second of `members` members (the plan's rate spread evenly).
    fn requests_per_member(&self, members: u64) -> u64 {
        self.setup.plan.rate * members / self.nodes.len().max(1) as u64
    }

    /// Member `j`'s second `seq` went into node `i`'s aggregate (kept for the nodes
    /// that may report; a second time is noted).
    fn merged(&mut self, i: usize, j: usize, seq: u64) {
        if !self.hears_snapshots(i) {
            return;
        }
        if !self.nodes[i].merged[j].insert(seq) {
            self.nodes[i].counted_twice.push((j, seq));
        }
    }

    pub(crate) fn index(&self, id: &str) -> Option<usize> {
        // Ids are `p` and the node's number.
        id.strip_prefix('p')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| i < self.nodes.len())
    }

    fn step_engine(&mut self, i: usize) {
        let now = self.clocks(i);
        let plan = self.setup.plan;
        let step = self.nodes[i].engine.step(&plan, now.wall_us, now.mono_us);
        let start = self.run_start_unix.unwrap_or(0) as i64;
        // The true run clock is node 0's wall clock.
        let true_run = (self.now as i64 + 1_000_000_000_000 + self.nodes[0].wall_offset) - start;
        let here = Start {
            node: i,
            at: self.now,
            true_run_us: true_run,
        };
        if self.first_start_at.is_none() && !step.started.is_empty() {
            self.first_start_at = Some(self.now);
        }
        for (k, _) in &step.started {
            self.starts[*k as usize].push(here);
        }
        for slot in &step.pool {
            self.pool_starts.entry(*slot).or_default().push(here);
        }
        for slot in &step.per_vu {
            self.vu_starts.entry(*slot).or_default().push(here);
        }

        if step.told_started {
            self.input(
                i,
                Input::EngineStarted {
                    at_wall_us: now.wall_us,
                },
            );
        }
        for s in step.seconds {
            // Kept in the node's store (what a re-fetch answers) as soon as made.
            self.nodes[i].published.insert(s);
            self.nodes[i].current = Some((s, Arc::new(vec![i as u32])));
            self.input(i, Input::OwnSecond { seq: s });
            self.nodes[i].current = None;
        }
        if step.finished {
            self.input(i, Input::EngineFinished { error: None });
        }
    }

    /// The hostile member's forgeries: versions for terms it does not lead, rosters
    /// it may not send, and terms at the end of the number range.
    fn forge(&mut self, i: usize) {
        if self.schedule.hostile != Some(i) || self.rng.random_bool(0.5) {
            return;
        }
        let Some(m) = self.nodes[i].machine.as_ref() else {
            return;
        };
        let n = m.roster().len() as u64;
        if n == 0 {
            return;
        }
        let term = m.term();
        let victim = self.rng.random_range(0..n) as u32;
        let version = Version {
            id: VersionId {
                term: 0,
                seq: u64::MAX,
            },
            start_unix_us: m.version().map_or(0, |v| v.start_unix_us),
            moves: vec![Move {
                lost: victim,
                from_event: FORGED_EVENT,
                at_us: 0,
                claims: vec![0, 0],
                takers: Vec::new(),
            }],
        };
        let mut forged = Vec::new();
        for t in [
            term,
            term.saturating_add(1),
            term.saturating_add(2),
            u64::MAX,
        ] {
            // Only terms this member is not entitled to lead (the election rule:
            // witnesses[(t − 1) mod w]).
            let w = m.witnesses();
            if t == 0 || w.is_empty() || w[((t - 1) % w.len() as u64) as usize] == i {
                continue;
            }
            let mut v = version.clone();
            v.id.term = t;
            forged.push(RunMessage::Assign {
                run_id: "sim-run".into(),
                term: t,
                version: v,
            });
        }
        forged.push(RunMessage::Roster {
            run_id: "sim-run".into(),
            members: m.roster().iter().rev().cloned().collect(),
            refused: vec![],
            fan_in: 2,
        });
        forged.push(RunMessage::Stop {
            run_id: "other-run".into(),
            reason: "forged".into(),
        });
        for msg in forged {
            self.broadcast(i, Payload::Msg(Arc::new(msg)));
        }
    }

    /// The phase each node's machine is in (for traces).
    pub fn phases(&self) -> Vec<Option<Phase>> {
        self.nodes
            .iter()
            .map(|n| n.machine.as_ref().map(|m| m.phase()))
            .collect()
    }
}
