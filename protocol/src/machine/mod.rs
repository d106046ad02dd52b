//! The run protocol as a sans-I/O state machine (spec §6): one [`RunMachine`] per run
//! on every node, fed typed [`Input`]s with the time they happen at and answering with
//! typed [`Effect`]s — publish a message, ask a peer, start or change the engine, set
//! the lease, record an event, build the report. No sockets, no clock reads, no tasks:
//! the node's driver does the I/O, the simulator (`stampede-sim`) runs hundreds of
//! these against a virtual network and clock and checks the invariants.
//!
//! Why it is safe (docs/protocol.md has the full argument):
//! - **Leases.** A member may start load only while it holds a lease: a majority of
//!   the roster (itself included) has echoed one of its heartbeats *with the same
//!   assignment version*, and the oldest echo of that majority is younger than the
//!   lease time. The echo carries the member's own send stamp, so a paused or
//!   partitioned member cannot renew it with stale messages.
//! - **Fencing.** A member that has not heard another for the failure timeout fences
//!   it for good (stops echoing it). Failure timeout > lease + margin, so once a
//!   majority has fenced a member, that member's lease has certainly expired.
//! - **Quorum.** Terms advance, and shares move, only when a majority fenced the
//!   member concerned; the leader of a term is named by the roster alone
//!   (`roster[(term − 1) mod n]`), adopts the newest version held by a majority at its
//!   term before it issues anything, and needs a lease itself to issue.
//! - **Versions.** Ownership is a short description ([`version::Version`]) every
//!   member expands the same way; members on different branches never echo each
//!   other, so no two members can hold a lease that lets them start the same index.
//!
//! What this module must not do: read a clock, touch the network or the disk, merge
//! measurements (it only decides *which* snapshots go into the report).

mod barriers;
pub mod events;
mod joining;
mod leading;
pub mod ledger;
mod liveness;
pub mod tree;
pub mod version;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::run::{BarrierDetail, Requirements, RosterEntry, RunMessage};
use events::{Barrier, MemberStatus, RunEvent};
pub use liveness::{choose_witnesses, MAX_WITNESSES};
pub use tree::{Aggregation, FAN_IN};
use version::{Counted, Split, Version};

/// The protocol's clocks, in µs. The values of a real mesh are [`Timing::mesh`]; the
/// rules between them (`fail ≥ lease + margin`) are what the safety argument needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often a member sends its heartbeat.
    pub beat_us: u64,
    /// How long a lease lasts after the majority's oldest echoed heartbeat was sent.
    pub lease_us: u64,
    /// Silence after which a member is fenced. Must be ≥ `lease_us + margin`.
    pub fail_us: u64,
    /// How long the origin waits for members to answer a proposal.
    pub join_window_us: u64,
    /// Joins, the roster, versions, arrivals and stops are sent again this often.
    pub republish_us: u64,
    /// How far ahead of "now" the leader sets the common start.
    pub start_lead_us: u64,
    /// How far ahead of "now" a move takes over a lost member's arrival events.
    pub failover_lead_us: u64,
    /// How long a reporter keeps asking for seconds it lacks before it reports
    /// without them (and names them).
    pub finish_wait_us: u64,
    /// How often a reporter asks again for missing seconds.
    pub fetch_every_us: u64,
    /// A gap this long between two inputs means this node itself was paused: its
    /// peers' silence during the gap is not theirs.
    pub pause_gap_us: u64,
    /// How long past the plan's end (and its graceful stop) a run may go before every
    /// node closes it with what it has.
    pub overrun_us: u64,
}

/// The margin between lease expiry and fencing: drift of monotonic clocks and the
/// time between a heartbeat's stamp and its sending.
pub const LEASE_MARGIN_US: u64 = 500_000;

impl Timing {
    /// The timing of a real mesh.
    pub const fn mesh() -> Timing {
        Timing {
            beat_us: 200_000,
            lease_us: 1_500_000,
            fail_us: 2_000_000,
            join_window_us: 3_000_000,
            republish_us: 400_000,
            start_lead_us: 600_000,
            failover_lead_us: 300_000,
            finish_wait_us: 20_000_000,
            fetch_every_us: 800_000,
            pause_gap_us: 1_000_000,
            overrun_us: 60_000_000,
        }
    }

    /// Whether the rules the safety argument needs hold.
    pub fn is_safe(&self) -> bool {
        self.fail_us >= self.lease_us + LEASE_MARGIN_US && self.beat_us < self.lease_us
    }
}

/// A deliberate flaw, for the simulator's mutation check only: it shows that the
/// invariants catch what the lease and the authority rule prevent. A real node
/// always runs with [`Flaw::None`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flaw {
    #[default]
    None,
    /// The engine is told it always holds a lease (no fencing of paused or
    /// partitioned members).
    NoLease,
    /// Versions are taken from any member, for any term at least this node's own.
    NoAuthority,
    /// A lost member's counted work moves from the start, as if it had claimed
    /// nothing.
    NoClaims,
    /// A merged second is taken even when it overlaps what this node has of that
    /// second (so a member's second can be counted twice).
    OverlappingBatches,
}

/// The time of an input: the node's monotonic clock (leases, silences) and its wall
/// clock (start instants, offsets), both µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_us: u64,
    pub wall_us: u64,
}

/// This node as it takes part in runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Capacity (worker threads): the weight of its execution segment.
    pub weight: u32,
}

/// What the machine needs to know of the plan: when arrival events happen, and how
/// long the plan runs. The node implements it from the compiled plan, the simulator
/// from its own schedule.
pub trait RunSchedule: Send + Sync {
    /// The first arrival event (over all arrival-rate scenarios) at or after run time
    /// `t_us`.
    fn first_event_at(&self, t_us: u64) -> u64;
    /// How long the plan runs, graceful stop included (µs).
    fn duration_us(&self) -> u64;
    /// The plan's counted scenarios (shared-iterations, per-vu-iterations), in plan
    /// order: their work moves by claims, not by time.
    fn counted(&self) -> Vec<Counted> {
        Vec::new()
    }
}

/// Commands from this node's operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Stop { reason: String },
}

/// Everything that can happen to a run on a node.
#[derive(Clone)]
pub enum Input {
    /// Time passed (the driver ticks at least every `beat_us / 2`).
    Tick,
    /// A run message from a peer (already size-checked and validated), or this
    /// node's own message looped back.
    Message {
        from: String,
        msg: Arc<RunMessage>,
    },
    /// Merged measurements of second `seq` over the members `covers` (roster indices,
    /// ascending) arrived from `from`: gossiped by the root (`published`), or sent
    /// directly up the aggregation tree (tree aggregation only).
    Batch {
        from: String,
        seq: u64,
        covers: Vec<u32>,
        published: bool,
    },
    /// A peer's (or this node's) snapshot of one second arrived: `node` is the
    /// snapshot's author, `from` who signed it.
    Snapshot {
        from: String,
        node: String,
        seq: u64,
    },
    /// The mesh's membership saw a peer go (only used while joining, before the run
    /// has heartbeats of its own).
    PeerGone {
        peer: String,
    },
    /// The plan bundle was fetched and compiled: the schedule, or why this node
    /// refuses (`Err`).
    Prepared(Result<Arc<dyn RunSchedule>, String>),
    /// This node's clock offset to the run clock (µs, run clock − local), the
    /// origin's wall clock. The first one counts.
    ClockSynced {
        offset_us: i64,
    },
    /// This node's engine passed the start instant (its local wall clock, µs).
    EngineStarted {
        at_wall_us: u64,
    },
    /// This node's engine produced the snapshot of second `seq` (seconds are
    /// contiguous from 0).
    OwnSecond {
        seq: u64,
    },
    /// This node's engine ended, or could not start (`error`).
    EngineFinished {
        error: Option<String>,
    },
    /// A member answered a request for missed seconds: `missing` it does not have.
    Fetched {
        node: String,
        got: Vec<u64>,
        missing: Vec<u64>,
    },
    /// What came of asking `node` for its own totals ([`Effect::FetchOwn`]).
    OwnFetched {
        node: String,
        outcome: OwnOutcome,
    },
    Command(Command),
    /// How far into each counted scenario this node's engine wants to be allowed
    /// (see [`Effect::Claims`]): what it has claimed plus what it expects to claim
    /// within a lease time. Announced in the next heartbeat.
    Claims(Vec<u64>),
}

/// What came of asking a member for its own totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnOutcome {
    /// They came, and check out: in the report's per-member section.
    Got,
    /// The member answered it has none (it restarted, or is of an older version):
    /// not asked again.
    Refused,
    /// No answer (a timeout, a broken connection) or one that did not check out:
    /// asked again while the reporter waits.
    Failed,
}

/// How the engine is to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Start nothing new; let iterations in flight finish.
    Graceful,
}

/// Facts about one member for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberFact {
    pub index: usize,
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub status: MemberStatus,
    pub start_late_us: Option<i64>,
    pub clock_offset_us: Option<i64>,
}

/// What the report needs from the protocol (the measurements are the node's).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFacts {
    pub members: Vec<MemberFact>,
    pub start_unix_us: Option<u64>,
    pub start_skew_us: u64,
    /// Run time at the end (seconds).
    pub duration_s: f64,
    /// The (node, second) pairs the report contains, for the node to check against
    /// what it merged.
    pub seconds: usize,
}

/// A line for the CLI that started the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Proposed {
        asked: usize,
    },
    Refused {
        node: String,
        reason: String,
    },
    Roster {
        members: Vec<String>,
        leader: String,
        refused: Vec<(String, String)>,
    },
    Assigned {
        index: usize,
        duration_s: f64,
    },
    Started {
        nodes: usize,
        start_skew_us: u64,
        start_late_us: Option<i64>,
    },
}

/// What the machine asks the node to do.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Gossip on the control topic (the machine has already applied it to itself).
    Publish(Arc<RunMessage>),
    /// Send to one node directly (heartbeats: each goes to the nodes that need it,
    /// never to the whole mesh). `to` is a peer id.
    Send {
        to: String,
        msg: Arc<RunMessage>,
    },
    /// Fetch the bundle from the origin, check it and compile it; answer `Prepared`.
    FetchBundle {
        origin: String,
    },
    /// Take clock samples of `peer` (the origin, whose wall clock is the run
    /// clock), while the run joins; answer `ClockSynced`.
    SyncClock {
        peer: String,
    },
    /// Start the engine for this split at the local wall instant.
    StartEngine {
        split: Split,
        start_local_wall_us: u64,
        index: usize,
    },
    /// Swap the running engine's split (a failover).
    SwapSplit(Split),
    /// The engine may start iterations until this monotonic instant (µs); `None`:
    /// not at all.
    Lease(Option<u64>),
    StopEngine(StopKind),
    /// How far into each counted scenario the engine may go: the claims a majority
    /// has confirmed (heartbeats echoed). Nothing beyond may start, so a lost node's
    /// counted work can move from its claims on without being done twice.
    Claims(Vec<u64>),
    /// Publish this node's snapshot of second `seq` on the metrics topic (all-to-all
    /// aggregation).
    PublishSnapshot {
        seq: u64,
    },
    /// Send this node's snapshot of second `seq`, as a batch covering this node
    /// alone, directly to `to` (its group's aggregator; tree aggregation).
    SendSnapshot {
        seq: u64,
        to: String,
    },
    /// Add to what this node holds of second `seq` as an aggregator: this node's own
    /// snapshot of it (`own`, from its store: it may be sent again after a failover),
    /// or else the batch just handed in.
    Hold {
        seq: u64,
        own: bool,
    },
    /// Send what this node holds of second `seq` (exactly the members `covers`) to
    /// `to` directly, or gossip it to every node when `None` (this node is the root),
    /// and hold it no longer. At the root a `MergeBatch` of it may follow.
    Forward {
        seq: u64,
        to: Option<String>,
        covers: Vec<u32>,
    },
    /// Put the batch just handed in (or just forwarded by this node as the root) into
    /// the run's aggregate: it covers exactly these members' second `seq`, none of
    /// which the aggregate has yet.
    MergeBatch {
        seq: u64,
        covers: Vec<u32>,
    },
    /// Put this snapshot into the run's aggregate (accepted once per node and second).
    Merge {
        node: String,
        seq: u64,
    },
    /// Ask `node` for these seconds it published; answer `Fetched`.
    Fetch {
        node: String,
        seqs: Vec<u64>,
    },
    /// Ask `node` for its own totals and timeline cut at the run's second `end`
    /// (tree aggregation: the report's per-member section), with a timeout of
    /// [`ledger::OWN_TIMEOUT_US`]; answer `OwnFetched`. The node adds what it gets to
    /// the run's per-member figures, never to the run's totals.
    FetchOwn {
        node: String,
        end: u64,
    },
    /// Something the report and the CLI should show, at run time `t` (s).
    Event {
        t: f64,
        event: RunEvent,
    },
    Progress(Progress),
    /// Build the summary from the aggregate and these facts, keep it, and hand it to
    /// the CLI if one waits.
    Report(ReportFacts),
    /// The run will not happen (the CLI gets the reason).
    Aborted(String),
    /// The node's announced state: busy running, or idle again.
    Busy(bool),
    /// This node is done with the run (its state may be dropped once it has no more
    /// effects to carry out).
    Done,
}

/// Where a run stands on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Joining,
    Ready,
    Running,
    Finishing,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Joining => "joining",
            Phase::Ready => "ready",
            Phase::Running => "running",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
        }
    }
}

/// What this node knows of another member (or of itself, at its own index).
#[derive(Debug, Clone, Default)]
struct Peer {
    /// When its last heartbeat arrived (mono µs).
    last_heard: u64,
    /// Its newest heartbeat: term, version and fenced set.
    beat_sent: u64,
    term: u64,
    version: Option<Version>,
    digest: u64,
    fenced: BTreeSet<u32>,
    /// The highest claims it announced (one per counted scenario).
    claims: Vec<u64>,
    /// The claims it last reported for the members it fenced.
    fenced_claims: BTreeMap<u32, Vec<u64>>,
    /// The newest of this node's heartbeat stamps it echoed, and the version digest
    /// this node had when it sent that heartbeat.
    echo_of_me: u64,
    echo_digest: u64,
    /// When this node last answered its heartbeat at once (mono µs).
    replied_at: u64,
    /// This node fenced it: no echo, and it counts towards moving its share. A fence
    /// holds while this node stays at the version it was set at (`fenced_digest`);
    /// once the member is heard again and this node has moved to another version (or
    /// there was none yet), it is lifted — the fenced member can then only hold a
    /// lease at the new version, where its old share is no longer its own.
    fenced_by_me: bool,
    fenced_digest: u64,
    /// Silent now: left out of barriers (cleared when heard again).
    gone: bool,
    /// This node's arrivals it said it holds (bit per `Barrier::ALL` position).
    holds_mine: u8,
}

/// Joins collected by the origin.
#[derive(Debug, Clone)]
struct JoinInfo {
    accept: bool,
    reason: Option<String>,
    name: String,
    labels: BTreeMap<String, String>,
    weight: u32,
}

/// The engine as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineState {
    Idle,
    Running,
    Finished,
}

/// One run on one node. See the module documentation.
pub struct RunMachine {
    run_id: String,
    me: Me,
    origin: String,
    bundle_hash: String,
    plan_name: String,
    requirements: Requirements,
    timing: Timing,
    phase: Phase,
    schedule: Option<Arc<dyn RunSchedule>>,
    /// Whether this node accepted (prepared without refusal).
    accepted: bool,
    out: Vec<Effect>,
    last_input_mono: u64,
    // Joining.
    joins: BTreeMap<String, JoinInfo>,
    expected: BTreeSet<String>,
    join_deadline: u64,
    my_join: Option<Arc<RunMessage>>,
    join_sent: u64,
    roster_msg: Option<Arc<RunMessage>>,
    propose_msg: Option<Arc<RunMessage>>,
    // Roster, liveness and leases.
    roster: Vec<RosterEntry>,
    /// Roster index by peer id.
    index: std::collections::HashMap<String, usize>,
    my_index: Option<usize>,
    peers: Vec<Peer>,
    /// How many witnesses (this one included, if it is one) have fenced each
    /// member, by this node's latest knowledge of their heartbeats.
    fence_count: Vec<usize>,
    /// The run's witnesses (roster indices, ascending): the members whose echoes
    /// make leases, whose fences move shares and whose terms elect. Every member
    /// while the roster is small; a fixed few of a large roster (see `witness`).
    witnesses: Vec<usize>,
    /// Barriers the witnesses say are complete (what a non-witness goes by).
    told_complete: BTreeSet<Barrier>,
    /// The barriers complete here, as a witness's heartbeats tell them; worked out
    /// again only after an arrival or a member going or coming back (a witness
    /// answers a hundred members a second, and each check walks the roster).
    complete_here: Option<Vec<Barrier>>,
    /// This node's own heartbeats: (stamp, digest, claims), newest last, the last
    /// few seconds.
    my_beats: std::collections::VecDeque<(u64, u64, Arc<Vec<u64>>)>,
    /// The plan's counted scenarios, this node's claims announced on them, and the
    /// part a majority confirmed.
    counted: Vec<Counted>,
    my_claims: Arc<Vec<u64>>,
    confirmed: Vec<u64>,
    beat_sent: u64,
    /// When this node last sent its heartbeat to all it goes to (mono µs).
    round_sent: u64,
    lease: Option<u64>,
    lease_lost_noted: bool,
    lease_lapsed_since: Option<u64>,
    // Leadership and versions.
    term: u64,
    version: Option<Version>,
    digest: u64,
    split: Option<Split>,
    adopted: bool,
    next_seq: u64,
    assign_msg: Option<Arc<RunMessage>>,
    assign_sent: u64,
    // Barriers and the engine.
    arrivals: BTreeMap<Barrier, BTreeMap<usize, BarrierDetail>>,
    my_arrivals: BTreeMap<Barrier, BarrierDetail>,
    clock_offset_us: i64,
    /// This node has its offset to the run clock (the origin's wall clock): its own
    /// at the origin, else from samples taken while the run is joining.
    clock_synced: bool,
    engine: EngineState,
    published: u64,
    started_told: bool,
    // Ledger.
    aggregation: Aggregation,
    trees: tree::TreeState,
    seen: Vec<ledger::Seconds>,
    absent: Vec<BTreeSet<u64>>,
    /// A reporter's fetch of each member's own totals (tree aggregation).
    own: Vec<ledger::OwnFetch>,
    finishing_since: Option<u64>,
    fetch_asked: u64,
    // Stop.
    stop: Option<String>,
    stop_msg: Option<Arc<RunMessage>>,
    stop_sent: u64,
    /// Run end by the monotonic clock, once the start is known: the termination bound.
    deadline: Option<u64>,
    reported: bool,
    flaw: Flaw,
    /// An origin outside the roster was reported gone by the mesh's membership.
    origin_silent: bool,
    /// The members whose heartbeat is to be answered at once (see
    /// `liveness::answer_if_due`), and when the last such answer went out.
    answer_to: BTreeSet<usize>,
    answered_at: u64,
    /// The last heartbeat changed an echo of this node, a fence or a term.
    beat_news: bool,
}

impl RunMachine {
    #[allow(clippy::too_many_arguments)]
    fn blank(
        me: Me,
        run_id: &str,
        origin: &str,
        bundle_hash: &str,
        plan_name: &str,
        requirements: Requirements,
        timing: Timing,
        now: Now,
    ) -> RunMachine {
        RunMachine {
            run_id: run_id.into(),
            me,
            origin: origin.into(),
            bundle_hash: bundle_hash.into(),
            plan_name: plan_name.into(),
            requirements,
            timing,
            phase: Phase::Joining,
            schedule: None,
            accepted: false,
            out: Vec::new(),
            last_input_mono: now.mono_us,
            joins: BTreeMap::new(),
            expected: BTreeSet::new(),
            join_deadline: now.mono_us + timing.join_window_us,
            my_join: None,
            join_sent: 0,
            roster_msg: None,
            propose_msg: None,
            roster: Vec::new(),
            index: Default::default(),
            my_index: None,
            peers: Vec::new(),
            fence_count: Vec::new(),
            witnesses: Vec::new(),
            told_complete: BTreeSet::new(),
            complete_here: None,
            my_beats: Default::default(),
            counted: Vec::new(),
            my_claims: Arc::new(Vec::new()),
            confirmed: Vec::new(),
            beat_sent: 0,
            round_sent: 0,
            lease: None,
            lease_lost_noted: false,
            lease_lapsed_since: None,
            term: 0,
            version: None,
            digest: 0,
            split: None,
            adopted: false,
            next_seq: 0,
            assign_msg: None,
            assign_sent: 0,
            arrivals: BTreeMap::new(),
            my_arrivals: BTreeMap::new(),
            clock_offset_us: 0,
            clock_synced: false,
            engine: EngineState::Idle,
            published: 0,
            started_told: false,
            aggregation: Aggregation::AllToAll,
            trees: Default::default(),
            seen: Vec::new(),
            absent: Vec::new(),
            own: Vec::new(),
            finishing_since: None,
            fetch_asked: 0,
            stop: None,
            stop_msg: None,
            stop_sent: 0,
            deadline: None,
            reported: false,
            flaw: Flaw::None,
            origin_silent: false,
            answer_to: BTreeSet::new(),
            answered_at: 0,
            beat_news: false,
        }
    }

    /// Builds in a flaw (simulator mutation checks only).
    pub fn set_flaw(&mut self, flaw: Flaw) {
        self.flaw = flaw;
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn origin(&self) -> &str {
        &self.origin
    }
    pub fn plan_name(&self) -> &str {
        &self.plan_name
    }
    pub fn bundle_hash(&self) -> &str {
        &self.bundle_hash
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn roster(&self) -> &[RosterEntry] {
        &self.roster
    }
    pub fn my_index(&self) -> Option<usize> {
        self.my_index
    }
    pub fn version(&self) -> Option<&Version> {
        self.version.as_ref()
    }
    pub fn lease(&self) -> Option<u64> {
        self.lease
    }
    /// The members that arrived at a barrier, as this node knows (for traces).
    pub fn arrived(&self, barrier: Barrier) -> Vec<usize> {
        self.arrivals
            .get(&barrier)
            .map(|a| a.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn stopped(&self) -> Option<&str> {
        self.stop.as_deref()
    }

    /// Whether this node is committed to the run (and so refuses others): it is in
    /// its roster, or accepted and waits for the roster, or started it.
    pub fn is_busy(&self) -> bool {
        // A member that only stays the tree's grace to pass up the last seconds (not
        // a reporter; its engine is done) is committed to nothing: the report may
        // already be out, and a next run may be proposed to it at once.
        let lingering = self.phase == Phase::Finishing
            && self.tree().is_some()
            && self.engine != EngineState::Running
            && !self.is_reporter();
        self.phase < Phase::Done
            && !lingering
            && (self.my_index.is_some()
                || (self.roster.is_empty() && self.accepted)
                || self.origin == self.me.id)
    }

    /// The current leader's peer id (empty before the roster).
    pub fn leader(&self) -> &str {
        self.leader_index(self.term)
            .map(|i| self.roster[i].id.as_str())
            .unwrap_or("")
    }

    /// A member's name by peer id (the id itself when unknown).
    pub fn name_of(&self, id: &str) -> String {
        self.roster
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.name.clone())
            .or_else(|| self.joins.get(id).map(|j| j.name.clone()))
            .unwrap_or_else(|| id.to_string())
    }

    /// How each member stands, as this node sees it.
    pub fn member_status(&self, i: usize) -> MemberStatus {
        let Some(p) = self.peers.get(i) else {
            return MemberStatus::Running;
        };
        let moved = self.version.as_ref().is_some_and(|v| v.is_moved(i));
        if p.gone {
            MemberStatus::Lost
        } else if moved || (p.fenced_by_me && Some(i) != self.my_index) {
            MemberStatus::Observer
        } else if self.phase >= Phase::Done {
            MemberStatus::Completed
        } else {
            MemberStatus::Running
        }
    }

    /// Takes one input at `now` and returns what the node must do, in order.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Effect> {
        let gap = now.mono_us.saturating_sub(self.last_input_mono);
        if gap > self.timing.pause_gap_us {
            // This node was paused (or starved): its peers' silence during the gap is
            // not theirs, so they get a fresh failure window. Its own lease is not
            // renewed by this: leases rest on echoes of its own stamps only.
            for p in &mut self.peers {
                if !p.fenced_by_me {
                    p.last_heard = p.last_heard.max(now.mono_us);
                }
            }
        }
        self.last_input_mono = self.last_input_mono.max(now.mono_us);
        if self.phase == Phase::Done {
            // A done run still answers nothing and changes nothing.
            return Vec::new();
        }
        // Heartbeats are most of the traffic: after one, only what a heartbeat can
        // change at once (terms, the lease); the rest follows at the next tick.
        // New claims only ride on the next heartbeat: nothing else follows from them.
        // A snapshot only matters to the ledger, and to the phase only at the end.
        let light = matches!(&input, Input::Claims(_))
            || (matches!(&input, Input::Snapshot { .. } | Input::Batch { .. })
                && self.phase != Phase::Finishing)
            || matches!(&input, Input::Message { msg, .. } if matches!(msg.as_ref(), RunMessage::Beat { .. }));
        match input {
            Input::Tick => {
                self.on_tick(now);
                self.tree_tick(now);
            }
            Input::Batch {
                from,
                seq,
                covers,
                published,
            } => self.on_batch(&from, seq, &covers, published, now),
            Input::Message { from, msg } => self.on_message(&from, &msg, now),
            Input::Snapshot { from, node, seq } => self.on_snapshot(&from, &node, seq, now),
            Input::PeerGone { peer } => self.on_peer_gone(&peer, now),
            Input::Prepared(result) => self.on_prepared(result, now),
            Input::ClockSynced { offset_us } => {
                // Samples are taken while the run joins: the offset may come before
                // the roster, and `ready` is arrived at once both are here.
                if !self.clock_synced {
                    self.clock_offset_us = offset_us;
                    self.clock_synced = true;
                    let _ = self.arrive_ready(now);
                }
            }
            Input::EngineStarted { at_wall_us } => {
                let started = (at_wall_us as i64 + self.clock_offset_us).max(0) as u64;
                self.arrive(
                    Barrier::Started,
                    BarrierDetail {
                        started_unix_us: Some(started),
                        ..Default::default()
                    },
                    now,
                );
            }
            Input::OwnSecond { seq } => self.on_own_second(seq, now),
            Input::EngineFinished { error } => self.on_engine_finished(error, now),
            Input::Fetched { node, got, missing } => self.on_fetched(&node, got, missing, now),
            Input::OwnFetched { node, outcome } => self.on_own_fetched(&node, outcome, now),
            Input::Command(Command::Stop { reason }) => self.on_stop_command(reason, now),
            Input::Claims(wanted) => self.on_claims(&wanted),
        }
        if light {
            if std::mem::take(&mut self.beat_news)
                && !self.roster.is_empty()
                && self.phase != Phase::Done
            {
                self.bump_terms(now);
                self.update_lease(now);
            }
        } else {
            self.advance(now);
        }
        std::mem::take(&mut self.out)
    }

    /// Everything that may follow from any input: terms, leadership, leases,
    /// barriers, the report.
    fn advance(&mut self, now: Now) {
        if self.roster.is_empty() || self.phase == Phase::Done {
            return;
        }
        self.bump_terms(now);
        self.lead(now);
        self.update_lease(now);
        self.maybe_start_engine(now);
        self.check_barriers(now);
        if self.phase == Phase::Finishing {
            self.finish(now);
        }
        if let Some(d) = self.deadline {
            if now.mono_us > d && self.phase < Phase::Finishing {
                // Nothing may keep a node in a run for ever: past the plan's end and
                // the overrun, it closes with what it has.
                self.phase = Phase::Finishing;
                self.finishing_since = Some(now.mono_us.saturating_sub(self.timing.finish_wait_us));
                self.finish(now);
            }
        }
    }

    /// Run time now (µs since the common start, in the run clock), if started.
    fn run_time_us(&self, now: Now) -> Option<u64> {
        let start = self.version.as_ref()?.start_unix_us;
        let run_clock = now.wall_us as i64 + self.clock_offset_us;
        Some((run_clock - start as i64).max(0) as u64)
    }

    fn event(&mut self, now: Now, event: RunEvent) {
        let t = self.run_time_us(now).unwrap_or(0) as f64 / 1e6;
        let t = (t * 1000.0).round() / 1000.0;
        self.out.push(Effect::Event { t, event });
    }

    fn publish(&mut self, msg: RunMessage) -> Arc<RunMessage> {
        let msg = Arc::new(msg);
        self.out.push(Effect::Publish(msg.clone()));
        msg
    }

    /// A majority of the witnesses: what a lease, a fence that moves a share and a
    /// term change each need. Any two such majorities share a witness.
    fn majority(&self) -> usize {
        self.witnesses.len() / 2 + 1
    }

    /// The run's witnesses, as roster indices.
    pub fn witnesses(&self) -> &[usize] {
        &self.witnesses
    }

    fn witness(&self, j: usize) -> bool {
        // At most MAX_WITNESSES entries: a scan is as cheap as a lookup table.
        self.witnesses.contains(&j)
    }

    fn i_witness(&self) -> bool {
        self.my_index.is_some_and(|me| self.witness(me))
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// The election rule: the leader of `term` is `witnesses[(term − 1) mod w]`
    /// (with every member a witness, `roster[(term − 1) mod n]`).
    fn leader_index(&self, term: u64) -> Option<usize> {
        if self.witnesses.is_empty() || term == 0 {
            return None;
        }
        Some(self.witnesses[((term - 1) % self.witnesses.len() as u64) as usize])
    }

    fn am_leader(&self) -> bool {
        self.my_index.is_some() && self.leader_index(self.term) == self.my_index
    }

    fn on_message(&mut self, from: &str, msg: &RunMessage, now: Now) {
        if msg.run_id() != self.run_id {
            return;
        }
        match msg {
            RunMessage::Propose { .. } => {}
            RunMessage::Join { .. } => self.on_join(from, msg, now),
            RunMessage::Roster { .. } => self.on_roster(from, msg, now),
            RunMessage::Abort { reason, .. } => self.on_abort(from, reason),
            RunMessage::Arrive { .. } => self.on_arrive(from, msg, now),
            RunMessage::Assign { .. } => self.on_assign(from, msg, now),
            RunMessage::Beat { .. } => self.on_beat(from, msg, now),
            RunMessage::Stop { .. } => self.on_stop(from, msg, now),
        }
    }

    fn set_done(&mut self) {
        if self.phase != Phase::Done {
            self.phase = Phase::Done;
            if self.engine == EngineState::Running {
                self.out.push(Effect::StopEngine(StopKind::Graceful));
            }
            self.out.push(Effect::Lease(None));
            self.out.push(Effect::Done);
        }
    }
}
