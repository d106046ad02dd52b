//! Runs across the mesh on this node: the thin async driver around the run protocol's
//! state machine ([`stampede_protocol::machine::RunMachine`], one per run).
//!
//! The driver turns what happens — a gossip message, a member lost, the control
//! endpoint's command, a tick, the engine's seconds, a task's answer — into the
//! machine's typed inputs, and carries out the effects it answers with: publish,
//! fetch, start or swap the engine, set the lease, merge a snapshot into the run's
//! aggregate, record an event, build and keep the report. Every decision is the
//! machine's; the driver owns the I/O and the measurements (aggregate, collector,
//! snapshot bytes), which the machine never sees.
//!
//! Must not decide anything about a run (no protocol rules here) and must not touch
//! the swarm directly (it sends [`MeshCommand`]s) or the load (the engine runs on its
//! own threads).

pub mod embedded;
mod execute;
pub mod store;
mod tasks;
mod timeline;
mod tree;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use stampede_protocol::machine::{self, Command, Input, Me, Now, Phase, RunMachine};
use stampede_protocol::mesh::GossipBody;
use stampede_protocol::run::{Bundle, Requirements, RunMessage, SnapshotMessage};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::engine::cpu::CpuSampler;
use crate::engine::{Lease, LiveAssignment, StopHandle, WorkerReport};
use crate::mesh::membership::MemberState;
use crate::mesh::{MeshCommand, MeshEvent, SharedView};
use crate::plan::compile::CompiledPlan;
use crate::reports::aggregate::{NodeCollector, RunAggregate};
use crate::reports::summary::{Event, Summary};

pub use stampede_protocol::run::unix_us;
pub use store::RunStore;

/// How often the driver ticks every machine (the machine asks for at least every
/// half heartbeat).
const TICK: Duration = Duration::from_millis(50);
/// How long a finished run stays in memory (for `status` and late re-fetches).
const KEEP_DONE: Duration = Duration::from_secs(600);
/// Most runs held in memory at once; the oldest finished ones go first, and a
/// proposal beyond it is ignored (a key holder cannot grow this without bound).
const MAX_RUNS: usize = 64;

/// What the CLI asks of the driver through the control endpoint.
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

/// Things the engine reports back.
enum EngineNews {
    Started {
        run_id: String,
        at_wall_us: u64,
    },
    Report {
        run_id: String,
        report: WorkerReport,
    },
    Failed {
        run_id: String,
        error: String,
    },
}

/// One run on this node: its machine and what the driver keeps for it.
struct Run {
    machine: RunMachine,
    client: Option<ClientLink>,
    plan: Option<Arc<CompiledPlan>>,
    agg: Option<RunAggregate>,
    collector: Option<NodeCollector>,
    cpu: CpuSampler,
    workers: usize,
    engine: Option<StopHandle>,
    live_split: Option<Arc<LiveAssignment>>,
    lease: Arc<Lease>,
    /// How many counted scenarios the running engine has (None before it starts or
    /// without any), and the claims last asked of the machine.
    counted: Option<usize>,
    claims_sent: Vec<u64>,
    events: Vec<Event>,
    cpu_max: BTreeMap<String, f64>,
    started_unix_ms: u64,
    finished_at: Option<Instant>,
    ended_s: Option<f64>,
    /// The minute of run time the live view's coarse history was last rebuilt at.
    history_minute: u64,
    /// This node's own seconds, summed (tree aggregation only: all to all, every
    /// node's aggregate has them per node already), for a reporter's `own` request.
    own: Option<tree::OwnPart>,
}

pub struct Driver {
    me: NodeIdentity,
    base: Instant,
    live: Arc<crate::reports::live::LiveRuns>,
    mesh: mpsc::Sender<MeshCommand>,
    view: SharedView,
    store: Arc<RunStore>,
    results: crate::reports::results::Results,
    runs: HashMap<String, Run>,
    tasks_tx: mpsc::UnboundedSender<tasks::Done>,
    engine_tx: mpsc::UnboundedSender<EngineNews>,
    /// The snapshot whose bytes a `Merge` or `PublishSnapshot` effect refers to.
    current: Option<SnapshotMessage>,
    /// The batch whose bytes a `Hold` or `MergeBatch` effect refers to.
    current_batch: Option<stampede_protocol::run::BatchMessage>,
    /// What this node holds as an aggregator, by run and second (tree aggregation).
    buckets: HashMap<(String, u64), tree::Bucket>,
}

/// Starts the driver; returns the channel the control endpoint uses.
pub fn spawn(
    me: NodeIdentity,
    mesh: mpsc::Sender<MeshCommand>,
    events: broadcast::Receiver<MeshEvent>,
    view: SharedView,
    store: Arc<RunStore>,
    live: Arc<crate::reports::live::LiveRuns>,
) -> mpsc::Sender<CoordCommand> {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (tasks_tx, tasks_rx) = mpsc::unbounded_channel();
    let (engine_tx, engine_rx) = mpsc::unbounded_channel();
    let results = crate::reports::results::Results::new(&me.data_dir);
    let d = Driver {
        me,
        base: Instant::now(),
        live,
        mesh,
        view,
        store,
        results,
        runs: HashMap::new(),
        tasks_tx,
        engine_tx,
        current: None,
        current_batch: None,
        buckets: HashMap::new(),
    };
    tokio::spawn(d.main(cmd_rx, events, tasks_rx, engine_rx));
    cmd_tx
}

impl Driver {
    async fn main(
        mut self,
        mut cmds: mpsc::Receiver<CoordCommand>,
        mut events: broadcast::Receiver<MeshEvent>,
        mut tasks: mpsc::UnboundedReceiver<tasks::Done>,
        mut engine: mpsc::UnboundedReceiver<EngineNews>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                e = events.recv() => match e {
                    Ok(MeshEvent::Gossip { from, body, topic }) => self.on_gossip(from, &topic, body),
                    Ok(MeshEvent::Member(t)) => {
                        if t.to == MemberState::Lost {
                            let peer = t.peer.to_string();
                            self.each(|| Input::PeerGone { peer: peer.clone() });
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "run driver fell behind the mesh; heartbeats and republishing repair what was missed");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(t) = tasks.recv() => self.on_task(t),
                Some(n) = engine.recv() => self.on_engine(n),
                // No run, nothing to tick: an idle node must not wake 20 times a
                // second (that was most of its idle CPU, docs/benchmarks.md). The first
                // tick after a run arrives fires at once, then every `TICK` again.
                _ = tick.tick(), if !self.runs.is_empty() => self.on_tick(),
            }
        }
    }

    fn now(&self) -> Now {
        Now {
            mono_us: self.base.elapsed().as_micros() as u64,
            wall_us: unix_us(),
        }
    }

    fn me(&self) -> Me {
        Me {
            id: self.me.id.clone(),
            name: self.me.name.clone(),
            labels: self.me.labels.clone(),
            weight: self.me.workers.max(1) as u32,
        }
    }

    /// Feeds one input to one run's machine and carries out its effects.
    fn input(&mut self, run_id: &str, input: Input) {
        let now = self.now();
        let Some(run) = self.runs.get_mut(run_id) else {
            return;
        };
        let traced = timeline::on().then(|| {
            timeline::input(run_id, &input);
            timeline::before(&run.machine)
        });
        let effects = run.machine.handle(input, now);
        if let Some(b) = traced {
            timeline::after(run_id, &b, &run.machine);
        }
        self.execute(run_id, effects);
    }

    /// The same input to every run.
    fn each(&mut self, make: impl Fn() -> Input) {
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        for id in ids {
            self.input(&id, make());
        }
    }

    /// The run this node is committed to, if any.
    fn busy(&self) -> Option<&str> {
        self.runs
            .values()
            .find(|r| r.machine.is_busy())
            .map(|r| r.machine.run_id())
    }

    fn new_run(&mut self, machine: RunMachine, client: Option<ClientLink>) {
        // Bounded: finished runs go first, oldest first.
        while self.runs.len() >= MAX_RUNS {
            let oldest = self
                .runs
                .iter()
                .filter(|(_, r)| r.machine.phase() == Phase::Done)
                .min_by_key(|(_, r)| r.finished_at)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.forget(&id),
                None => return,
            }
        }
        let id = machine.run_id().to_string();
        self.runs.insert(
            id,
            Run {
                machine,
                client,
                plan: None,
                agg: None,
                collector: None,
                cpu: CpuSampler::default(),
                workers: 1,
                engine: None,
                live_split: None,
                lease: Lease::none(self.base),
                counted: None,
                claims_sent: Vec::new(),
                events: Vec::new(),
                cpu_max: BTreeMap::new(),
                started_unix_ms: crate::run::embedded::unix_ms(),
                finished_at: None,
                ended_s: None,
                history_minute: 0,
                own: None,
            },
        );
    }

    fn forget(&mut self, run_id: &str) {
        // The bundle it offered goes with it: bundles are never kept in memory longer
        // than their run.
        if let Some(r) = self.runs.remove(run_id) {
            if let Ok(mut b) = self.store.bundles.lock() {
                b.remove(r.machine.bundle_hash());
            }
        }
        self.drop_buckets(run_id);
        self.live.remove(run_id);
        let _ = self.results.remove(run_id);
        self.store.forget(run_id);
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
                    self.input(
                        &run_id,
                        Input::Command(Command::Stop {
                            reason: "stopped by `stampede stop`".into(),
                        }),
                    );
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(format!("no such run: {run_id}")));
                }
            }
            CoordCommand::Status { reply } => {
                let runs: Vec<serde_json::Value> = self.runs.values().map(status_of).collect();
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
        let run_id = crate::run::embedded::new_run_id();
        tracing::debug!(target: timeline::TARGET, run = %run_id, "in trigger");
        let hash = bundle.hash();
        if let Ok(mut b) = self.store.bundles.lock() {
            b.insert(hash.clone(), bundle.clone());
        }
        let asked: BTreeSet<String> = self
            .view
            .read()
            .map(|v| v.alive_peers().iter().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        let now = self.now();
        let asked_count = asked.len();
        let (mut machine, effects) = RunMachine::new_origin(
            self.me(),
            &run_id,
            &hash,
            &bundle.plan_name,
            requirements,
            asked,
            machine::Timing::mesh(),
            now,
        );
        // Before the roster, which carries it to every member: by the nodes asked
        // (the roster has at most these and the origin).
        machine.set_aggregation(tree::aggregation(asked_count + 1));
        self.new_run(machine, Some(client));
        self.execute(&run_id, effects);
        // The origin prepares from its own bundle (no fetch).
        let result = crate::plan::bundle::prepare_bundle(
            &bundle,
            &self.me.data_dir,
            &run_id,
            &self.me.allow_targets,
        );
        self.on_task(tasks::Done::Prepared { run_id, result });
    }

    // ---------------------------------------------------------------- gossip

    fn on_gossip(&mut self, from: PeerId, topic: &str, body: GossipBody) {
        match body {
            GossipBody::Run(m) => {
                if let Err(e) = m.validate() {
                    tracing::warn!(peer = %from, error = %e, "run message refused");
                    return;
                }
                self.on_run_message(from.to_string(), *m)
            }
            GossipBody::Snapshot(s) => {
                if let Err(e) = s.validate() {
                    tracing::warn!(peer = %from, error = %e, "snapshot refused");
                    return;
                }
                self.on_snapshot(from.to_string(), *s)
            }
            GossipBody::Batch(b) => {
                if let Err(e) = b.validate() {
                    tracing::warn!(peer = %from, error = %e, "batch refused");
                    return;
                }
                // Gossiped: a root's merge; direct: a second going up the tree.
                let published = topic != crate::mesh::DIRECT;
                self.on_batch(from.to_string(), *b, published)
            }
            _ => {}
        }
    }

    fn on_batch(&mut self, from: String, b: stampede_protocol::run::BatchMessage, published: bool) {
        let Some(run) = self.runs.get(&b.run_id) else {
            return;
        };
        let n = run.machine.roster().len();
        let covers = match stampede_protocol::run::covers_indices(&b.covers, n) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "batch refused");
                return;
            }
        };
        let (run_id, seq) = (b.run_id.clone(), b.seq);
        self.current_batch = Some(b);
        self.input(
            &run_id,
            Input::Batch {
                from,
                seq,
                covers,
                published,
            },
        );
        self.current_batch = None;
    }

    fn on_run_message(&mut self, from: String, m: RunMessage) {
        let run_id = m.run_id().to_string();
        let announced = from.parse::<PeerId>().ok().and_then(|p| {
            self.view
                .read()
                .ok()?
                .member(&p)?
                .announce
                .as_ref()
                .map(|a| a.capacity)
        });
        let m = hold_claim(m, announced);
        if !self.runs.contains_key(&run_id) {
            if !matches!(m, RunMessage::Propose { .. }) || self.runs.len() >= MAX_RUNS * 2 {
                return;
            }
            let busy = self.busy().map(str::to_string);
            let now = self.now();
            if let Some((machine, effects)) = RunMachine::new_member(
                self.me(),
                &from,
                &m,
                busy.as_deref(),
                machine::Timing::mesh(),
                now,
            ) {
                self.new_run(machine, None);
                self.execute(&run_id, effects);
                if busy.is_none() {
                    self.link_likely_witnesses(&run_id, &from);
                }
            }
            return;
        }
        self.input(
            &run_id,
            Input::Message {
                from,
                msg: Arc::new(m),
            },
        );
    }

    /// Opens links, while the run joins, to the members likely to be its witnesses:
    /// they are chosen from the roster by a hash of the run id and each peer id
    /// (`machine::choose_witnesses`), so the mesh's live members give the same choice
    /// whenever they all join. Every member beats every witness from the roster on,
    /// and its `ready` arrival rides on those beats: at 50 real nodes, dialing them
    /// only then put 0.6–1.3 s between the roster and `ready` at the leader (seven
    /// nodes each taking 49 handshakes at once), and left leases at the start instant
    /// waiting on them. A wrong guess costs a link that closes once idle.
    fn link_likely_witnesses(&self, run_id: &str, origin: &str) {
        let mut ids: Vec<String> = match self.view.read() {
            Ok(v) => v.alive_peers().iter().map(|p| p.to_string()).collect(),
            Err(_) => return,
        };
        ids.push(self.me.id.clone());
        ids.sort();
        ids.dedup();
        if ids.len() > stampede_protocol::run::MAX_MEMBERS {
            return;
        }
        let roster: Vec<stampede_protocol::run::RosterEntry> = ids
            .into_iter()
            .map(|id| stampede_protocol::run::RosterEntry {
                id,
                name: String::new(),
                labels: Default::default(),
                weight: 1,
            })
            .collect();
        for j in machine::choose_witnesses(&roster, run_id, origin) {
            let id = &roster[j].id;
            if *id == self.me.id || id == origin {
                continue;
            }
            if let Ok(peer) = id.parse::<PeerId>() {
                let _ = self.mesh.try_send(MeshCommand::Connect { peer });
            }
        }
    }

    fn on_snapshot(&mut self, from: String, s: SnapshotMessage) {
        let (run_id, node, seq) = (s.run_id.clone(), s.node.clone(), s.seq);
        self.current = Some(s);
        self.input(&run_id, Input::Snapshot { from, node, seq });
        self.current = None;
    }

    // ---------------------------------------------------------------- tasks

    fn on_task(&mut self, t: tasks::Done) {
        match t {
            tasks::Done::Prepared { run_id, result } => {
                let Some(run) = self.runs.get_mut(&run_id) else {
                    return;
                };
                let input = match result {
                    // A node that refuses to send the load still keeps the plan: as the
                    // origin it merges the others' measurements for its CLI.
                    Ok((plan, refusal)) => {
                        run.agg = Some(RunAggregate::spilling_to(
                            plan.layout.clone(),
                            Some(self.me.data_dir.as_path().into()),
                        ));
                        run.plan = Some(plan.clone());
                        match refusal {
                            None => Input::Prepared(Ok(Arc::new(PlanSchedule(plan)))),
                            Some(why) => Input::Prepared(Err(why)),
                        }
                    }
                    Err(e) => Input::Prepared(Err(e)),
                };
                self.input(&run_id, input);
            }
            tasks::Done::Clock { run_id, offset_us } => {
                self.input(&run_id, Input::ClockSynced { offset_us })
            }
            tasks::Done::Own {
                run_id,
                node,
                answer,
            } => {
                let outcome = self.take_own(&run_id, &node, answer);
                self.input(&run_id, Input::OwnFetched { node, outcome });
            }
            tasks::Done::Fetched {
                run_id,
                node,
                snapshots,
                missing,
            } => {
                for s in snapshots {
                    if s.run_id == run_id && s.node == node && s.validate().is_ok() {
                        self.on_snapshot(node.clone(), s);
                    }
                }
                self.input(
                    &run_id,
                    Input::Fetched {
                        node,
                        got: Vec::new(),
                        missing,
                    },
                );
            }
        }
    }

    // ---------------------------------------------------------------- engine

    fn on_engine(&mut self, n: EngineNews) {
        match n {
            EngineNews::Started { run_id, at_wall_us } => {
                self.input(&run_id, Input::EngineStarted { at_wall_us })
            }
            EngineNews::Failed { run_id, error } => {
                tracing::error!(run = %run_id, %error, "this node cannot run its share");
                // It sent nothing: its own part is empty, and says so when asked.
                self.keep_own(&run_id);
                self.input(&run_id, Input::EngineFinished { error: Some(error) })
            }
            EngineNews::Report { run_id, report } => self.on_report(&run_id, report),
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
        if finished {
            run.collector = None;
        }
        let mut out = Vec::new();
        for s in seconds {
            let cpu = run.cpu.sample(run.workers);
            if let Some(own) = run.own.as_mut() {
                own.add(&s, cpu);
            }
            out.push(SnapshotMessage {
                run_id: run_id.into(),
                node: me.clone(),
                seq: s.second,
                vus: s.vus,
                cpu,
                metrics: s.metrics.encode(),
            });
        }
        if finished {
            // Before `finished` is announced: a reporter may ask for it from then on.
            self.keep_own(run_id);
        }
        for msg in out {
            self.store.keep(msg.clone());
            let seq = msg.seq;
            self.current = Some(msg);
            self.input(run_id, Input::OwnSecond { seq });
            self.current = None;
        }
        if finished {
            self.input(run_id, Input::EngineFinished { error: None });
        }
    }

    // ---------------------------------------------------------------- ticks

    fn on_tick(&mut self) {
        // How far the engines want into their counted scenarios: announced in the
        // next heartbeat, confirmed with the lease (see `protocol::machine`).
        let wanted: Vec<(String, Vec<u64>)> = self
            .runs
            .iter_mut()
            .filter_map(|(id, r)| {
                let counted = r.counted?;
                let w = r.lease.wanted(counted);
                (w != r.claims_sent).then(|| {
                    r.claims_sent = w.clone();
                    (id.clone(), w)
                })
            })
            .collect();
        for (id, w) in wanted {
            self.input(&id, Input::Claims(w));
        }
        self.each(|| Input::Tick);
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        for id in ids {
            let Some(run) = self.runs.get(&id) else {
                continue;
            };
            let recent = run.finished_at.is_none_or(|t| t.elapsed() < TICK * 10);
            if recent {
                self.mirror_live(&id);
            }
            if run.finished_at.is_some_and(|t| t.elapsed() > KEEP_DONE) {
                self.forget(&id);
            }
        }
    }

    /// Copies the run's phase, members and events into the live view.
    fn mirror_live(&self, run_id: &str) {
        let Some(run) = self.runs.get(run_id) else {
            return;
        };
        let m = &run.machine;
        let members: Vec<crate::reports::live::LiveMember> = m
            .roster()
            .iter()
            .enumerate()
            .map(|(i, r)| crate::reports::live::LiveMember {
                id: r.id.clone(),
                name: r.name.clone(),
                labels: r.labels.clone(),
                status: m.member_status(i).name().into(),
            })
            .collect();
        let leader = m.name_of(m.leader());
        let started = m.version().map(|v| v.start_unix_us / 1000).unwrap_or(0);
        let layout = run.plan.as_ref().map(|p| p.layout.clone());
        let plan_name = run.plan.as_ref().map(|p| p.plan.name.clone());
        let phase = m.phase().name().to_string();
        self.live.update(run_id, m.plan_name(), |l| {
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
}

/// A member's claimed capacity (a join's weight, its share of the work) is held to
/// what it announced to the mesh: a member cannot claim most of the events and then
/// not run them.
fn hold_claim(m: RunMessage, announced: Option<u32>) -> RunMessage {
    match m {
        RunMessage::Join {
            run_id,
            accept,
            reason,
            name,
            labels,
            weight,
        } => RunMessage::Join {
            run_id,
            accept,
            reason,
            name,
            labels,
            weight: weight.min(announced.unwrap_or(1)).max(1),
        },
        other => other,
    }
}

/// A run's row in `stampede status`.
fn status_of(r: &Run) -> serde_json::Value {
    let m = &r.machine;
    let lost: Vec<String> = (0..m.roster().len())
        .filter(|&i| m.member_status(i) == machine::events::MemberStatus::Lost)
        .map(|i| m.roster()[i].name.clone())
        .collect();
    let elapsed = r.ended_s.unwrap_or_else(|| {
        (crate::run::embedded::unix_ms().saturating_sub(r.started_unix_ms)) as f64 / 1000.0
    });
    serde_json::json!({
        "run_id": m.run_id(), "plan": m.plan_name(), "bundle_hash": m.bundle_hash(),
        "phase": m.phase().name(), "origin": m.origin(), "leader": m.leader(),
        "leader_name": m.name_of(m.leader()), "term": m.term(),
        "members": m.roster().iter().map(|x| &x.name).collect::<Vec<_>>(),
        "lost": lost,
        "elapsed_s": elapsed,
        // How its seconds are aggregated: the tree's fan-in, 0 for all to all.
        "fan_in": match m.aggregation() {
            machine::Aggregation::Tree { fan_in } => fan_in,
            machine::Aggregation::AllToAll => 0,
        },
    })
}

/// What the state machine needs of a compiled plan.
struct PlanSchedule(Arc<CompiledPlan>);

impl machine::RunSchedule for PlanSchedule {
    fn first_event_at(&self, t_us: u64) -> u64 {
        let at = Duration::from_micros(t_us);
        self.0
            .scenarios
            .iter()
            .filter_map(|s| {
                let sched = s.executor.arrival_schedule().ok()??;
                let t = at.checked_sub(s.start_after).unwrap_or_default();
                Some(first_event_at(&sched, t))
            })
            .min()
            .unwrap_or(0)
    }

    fn duration_us(&self) -> u64 {
        let d = crate::run::embedded::plan_duration(&self.0) + Duration::from_secs(30);
        d.as_micros().min(u64::MAX as u128) as u64
    }

    fn counted(&self) -> Vec<machine::version::Counted> {
        crate::engine::counted_of(&self.0)
    }
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

/// Effects not tied to a run's measurements go straight to the mesh.
fn publish(mesh: &mpsc::Sender<MeshCommand>, body: GossipBody, metrics: bool) {
    let topic = if metrics {
        crate::mesh::behaviour::metrics_topic(stampede_protocol::mesh::PROTOCOL_VERSION)
    } else {
        crate::mesh::behaviour::control_topic(stampede_protocol::mesh::PROTOCOL_VERSION)
    };
    let (reply, _rx) = oneshot::channel();
    // Publishing fails only when no peer has subscribed yet (a mesh of one): the
    // message is for others, and the machine has acted on its own copy.
    let _ = mesh.try_send(MeshCommand::Publish { topic, body, reply });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_claims_no_more_capacity_than_its_node_announced() {
        let join = |weight| RunMessage::Join {
            run_id: "6932a8b2-0f3c".into(),
            accept: true,
            reason: None,
            name: "n".into(),
            labels: Default::default(),
            weight,
        };
        let weight = |m: RunMessage| match m {
            RunMessage::Join { weight, .. } => weight,
            _ => unreachable!("a join stays a join"),
        };
        assert_eq!(weight(hold_claim(join(1024), Some(2))), 2);
        assert_eq!(weight(hold_claim(join(1), Some(8))), 1);
        // Never announced: the smallest share, not what it claims.
        assert_eq!(weight(hold_claim(join(1024), None)), 1);
    }
}
