//! The load engine: worker threads that run this node's execution segment of a plan.
//!
//! Thread-per-core, like wrk: each worker owns a single-threaded tokio runtime, its
//! VUs and their connections, and its own [`Metrics`]; nothing is shared per request.
//! Once a second (aligned to the run's start) each worker hands its metrics for that
//! second to the collector — one channel send per worker per second. The engine runs on
//! its own threads so that a node's mesh event loop is never starved by load.
//!
//! Executors decide *when* iterations start:
//! - closed model (constant-vus, ramping-vus, per-vu-iterations, shared-iterations):
//!   a VU iterates back to back while its global index is below the scenario's current
//!   VU target;
//! - open model (constant/ramping-arrival-rate): event k of the global schedule fires at
//!   its intended instant whether or not earlier responses came back; latency counts
//!   from that instant, and an event that finds no free VU is counted as dropped.
//!
//! Work is split by global index (VUs and arrival events) through the run's
//! [`Assignment`], first across nodes, then round-robin across this node's workers, so
//! the union over the mesh is exactly the single-machine schedule. The engine must not
//! know about the mesh, output formats or the terminal.

pub mod cpu;
pub mod fds;
pub mod pacing;
pub mod vu;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede_protocol::executor::{ArrivalSchedule, Executor};
use stampede_protocol::machine::version::{Counted, MAX_COUNTED};
use stampede_protocol::segment::Assignment;
use stampede_protocol::snapshot::Metrics;
use tokio::sync::{mpsc, watch};

use crate::http::Shared;
use crate::plan::compile::CompiledPlan;
use crate::plan::data::SharedCursor;
use pacing::Pacer;
use vu::{micros, IterationEnd, Parked, Vu, WorkerCtx};

/// How the run's global indices are split over the nodes right now: VU indices and
/// arrival events have their own [`Assignment`] (same base, their own failover
/// points). Failover replaces it while the run goes; workers notice through a
/// generation number checked once per scheduling decision, never per request.
pub use stampede_protocol::machine::version::Split;

/// Whether this node may start iterations now: the run protocol's lease (see
/// `protocol::machine`), kept as a monotonic deadline in µs since `base`. Checked
/// before every iteration starts — one clock read and one atomic load — so a node that
/// resumes from a pause, or is cut off from the majority of its run, starts nothing
/// even before its event loop has caught up. An embedded run holds it for ever.
pub struct Lease {
    base: Instant,
    until_us: AtomicU64,
    changed: watch::Sender<u64>,
    /// Counted scenarios (by ordinal, see [`counted_of`]): how far the protocol lets
    /// this node go (confirmed claims) and how far it has gone. A lost node's counted
    /// work moves from its confirmed claims on, so nothing beyond them may start.
    allowed: [AtomicU64; MAX_COUNTED],
    claimed: [AtomicU64; MAX_COUNTED],
    /// The least a claim runs ahead of what is claimed (this node's VUs of the
    /// scenario, or one iteration), and the claims a second ago, for the pace.
    ahead: [AtomicU64; MAX_COUNTED],
    pace: std::sync::Mutex<Pace>,
}

/// Claims a second ago, and how many were made in the last whole second.
struct Pace {
    at: Instant,
    claimed: Vec<u64>,
    per_second: Vec<u64>,
}

/// How late an iteration held up by a lapsed lease may still start: later ones are
/// counted as dropped, never started in a burst (the start-boundary tolerance of
/// "never more load than planned", docs/protocol.md).
pub const LEASE_LATE_LIMIT: Duration = Duration::from_millis(100);

impl Lease {
    /// A lease that never lapses (a run on one node).
    pub fn always() -> Arc<Lease> {
        let l = Lease::none(Instant::now());
        l.set(Some(u64::MAX));
        l.allow(&[u64::MAX; MAX_COUNTED]);
        l
    }

    /// No lease yet; `base` is the instant the run protocol's monotonic µs count from.
    pub fn none(base: Instant) -> Arc<Lease> {
        Arc::new(Lease {
            base,
            until_us: AtomicU64::new(0),
            changed: watch::channel(0).0,
            allowed: std::array::from_fn(|_| AtomicU64::new(0)),
            claimed: std::array::from_fn(|_| AtomicU64::new(0)),
            ahead: std::array::from_fn(|_| AtomicU64::new(1)),
            pace: std::sync::Mutex::new(Pace {
                at: base,
                claimed: Vec::new(),
                per_second: Vec::new(),
            }),
        })
    }

    /// The claims the protocol confirmed (one per counted scenario).
    pub fn allow(&self, claims: &[u64]) {
        for (a, c) in self.allowed.iter().zip(claims) {
            a.store(*c, Ordering::Release);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// The claims to ask for: what is claimed, plus what was claimed over the last
    /// second (at least `ahead`): confirmation takes a heartbeat round trip, so a
    /// second ahead rarely holds an iteration up, and at most about a second of a
    /// lost node's counted work is lost with it.
    pub fn wanted(&self, counted: usize) -> Vec<u64> {
        let counted = counted.min(MAX_COUNTED);
        let now: Vec<u64> = (self.claimed.iter().take(counted))
            .map(|c| c.load(Ordering::Acquire))
            .collect();
        let mut pace = match self.pace.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if pace.claimed.len() != counted {
            pace.at = Instant::now();
            pace.claimed = now.clone();
            pace.per_second = vec![0; counted];
        } else if pace.at.elapsed() >= Duration::from_secs(1) {
            pace.per_second = (now.iter().zip(&pace.claimed))
                .map(|(n, p)| n.saturating_sub(*p))
                .collect();
            pace.at = Instant::now();
            pace.claimed = now.clone();
        }
        (now.iter().zip(&pace.per_second).zip(&self.ahead))
            .map(|((n, rate), a)| n.saturating_add((*rate).max(a.load(Ordering::Relaxed))))
            .collect()
    }

    /// Takes pool slot `k` of counted scenario `c` if it is below `size` and the
    /// protocol's confirmed claim: Ok(k), or Err(claimed so far).
    fn claim_slot(&self, c: usize, size: u64) -> Result<u64, u64> {
        let allowed = self.allowed[c].load(Ordering::Acquire);
        self.claimed[c].fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
            (k < size && k < allowed).then_some(k + 1)
        })
    }

    /// Whether iteration `i` of a per-vu-iterations scenario may start; notes it.
    fn claim_round(&self, c: usize, i: u64) -> bool {
        if i >= self.allowed[c].load(Ordering::Acquire) {
            return false;
        }
        self.claimed[c].fetch_max(i + 1, Ordering::AcqRel);
        true
    }

    /// Waits until `ok` holds (re-checked at every lease or claims change), the run
    /// stops or `give_up` passes; true if it holds.
    async fn wait_for(
        &self,
        mut ok: impl FnMut() -> bool,
        stop: &mut watch::Receiver<Stop>,
        give_up: Instant,
    ) -> bool {
        let mut rx = self.subscribe();
        loop {
            if ok() {
                return true;
            }
            if *stop.borrow() != Stop::Running || Instant::now() >= give_up {
                return false;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep_until(give_up.into()) => {}
            }
        }
    }

    /// The protocol's new lease deadline (`None`: none).
    pub fn set(&self, until_us: Option<u64>) {
        self.until_us
            .store(until_us.unwrap_or(0), Ordering::Release);
        self.changed.send_modify(|g| *g += 1);
    }

    pub fn holds(&self) -> bool {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_micros() as u64;
        now < self.until_us.load(Ordering::Acquire)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until the lease holds, the run stops or `give_up` passes; true if held.
    async fn wait(&self, stop: &mut watch::Receiver<Stop>, give_up: Instant) -> bool {
        self.wait_for(|| self.holds(), stop, give_up).await
    }
}

pub struct LiveAssignment {
    current: std::sync::RwLock<Arc<Split>>,
    generation: watch::Sender<u64>,
}

impl LiveAssignment {
    pub fn new(split: Split) -> Arc<LiveAssignment> {
        Arc::new(LiveAssignment {
            current: std::sync::RwLock::new(Arc::new(split)),
            generation: watch::channel(0).0,
        })
    }
    /// A run on one node of this plan.
    pub fn single(plan: &CompiledPlan) -> Arc<LiveAssignment> {
        Self::new(Split::single(&counted_of(plan)))
    }
    pub fn get(&self) -> Arc<Split> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn replace(&self, split: Split) {
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(split),
            Err(p) => *p.into_inner() = Arc::new(split),
        }
        self.generation.send_modify(|g| *g += 1);
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// What this node runs.
pub struct RunSpec {
    pub plan: Arc<CompiledPlan>,
    pub assignment: Arc<LiveAssignment>,
    /// The run protocol's lease: no iteration starts without it.
    pub lease: Arc<Lease>,
    /// This node's index in `assignment`.
    pub node: usize,
    pub node_name: String,
    pub workers: usize,
    pub http: Arc<Shared>,
    /// The common start instant (in this process's clock).
    pub start_at: Instant,
    /// How long in-flight iterations may finish after their scenario ends or a stop.
    pub graceful_stop: Duration,
}

/// One worker's measurements for one second of the run.
pub struct WorkerReport {
    pub worker: usize,
    /// The second since the start this covers: [second, second + 1).
    pub second: u64,
    pub metrics: Metrics,
    /// VUs alive on this worker when the second ended.
    pub vus: u64,
    /// This is the worker's last report.
    pub last: bool,
}

/// Stops a run from outside (Ctrl-C, `stampede stop`, a mesh decision).
#[derive(Clone)]
pub struct StopHandle {
    graceful: Arc<AtomicBool>,
    tx: Arc<watch::Sender<Stop>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Running,
    /// Start no new iteration; let in-flight ones finish within the graceful window.
    Graceful,
    /// Abandon in-flight iterations now.
    Hard,
}

impl StopHandle {
    fn new() -> StopHandle {
        StopHandle {
            graceful: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(watch::channel(Stop::Running).0),
        }
    }
    pub fn stop(&self, how: Stop) {
        if how >= Stop::Graceful {
            self.graceful.store(true, Ordering::Relaxed);
        }
        self.tx.send_if_modified(|s| {
            if how > *s {
                *s = how;
                true
            } else {
                false
            }
        });
    }
    fn stopping(&self) -> bool {
        self.graceful.load(Ordering::Relaxed)
    }
}

pub struct Engine {
    threads: Vec<std::thread::JoinHandle<()>>,
    pub stop: StopHandle,
    /// When this node actually started: see [`StartMark`].
    pub started: watch::Receiver<Option<u64>>,
}

/// When the node's workers actually passed the run's start instant, for the start
/// skew across the mesh. Each worker stamps the wall clock (Unix µs) right after its
/// own wait for the instant returned; the node's start is its latest worker's, so a
/// worker that woke late makes the node late. Published once every worker stamped (a
/// worker that cannot run, or a run stopped before its start, stamps when it gives up).
struct StartMark {
    left: AtomicUsize,
    latest_unix_us: AtomicU64,
    tx: watch::Sender<Option<u64>>,
}

impl StartMark {
    fn new(workers: usize) -> (Arc<StartMark>, watch::Receiver<Option<u64>>) {
        let (tx, rx) = watch::channel(None);
        let mark = StartMark {
            left: AtomicUsize::new(workers),
            latest_unix_us: AtomicU64::new(0),
            tx,
        };
        (Arc::new(mark), rx)
    }

    fn stamp(&self) {
        let now = stampede_protocol::run::unix_us();
        let latest = self
            .latest_unix_us
            .fetch_max(now, Ordering::AcqRel)
            .max(now);
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.tx.send(Some(latest));
        }
    }
}

impl Engine {
    /// Starts the workers; reports arrive on `reports` until every worker sent `last`.
    pub fn start(
        spec: RunSpec,
        reports: mpsc::UnboundedSender<WorkerReport>,
    ) -> std::io::Result<Engine> {
        let stop = StopHandle::new();
        let spec = Arc::new(spec);
        // Every VU may hold a connection: grow the descriptor table now, before the
        // start, rather than stall a worker in socket() mid-run (see `fds`).
        // Twice this node's share: a failover can hand it a lost node's VUs.
        let split = spec.assignment.get();
        let vus: u64 = (spec.plan.scenarios.iter())
            .map(|s| split.vus.scale(spec.node, s.vu_slots))
            .sum();
        let needed = vus.saturating_add(crate::engine::fds::OWN);
        crate::engine::fds::reserve(needed.saturating_mul(2));
        let limit = crate::engine::fds::limit();
        if limit < needed {
            tracing::warn!(
                vus,
                limit,
                "the open-files limit is below the run's VUs: connections beyond it fail \
                 with `too many open files` (raise the hard limit: ulimit -Hn)"
            );
        }
        let counted: Arc<Vec<CountedWork>> = Arc::new(CountedWork::for_plan(&spec));
        let n = spec.assignment.get().vus.nodes() as u64;
        let cursors: Arc<Vec<SharedCursor>> = Arc::new(
            spec.plan
                .feeders
                .iter()
                .map(|_| SharedCursor::new(spec.node as u64, n))
                .collect(),
        );
        let claims: Arc<Vec<std::sync::Mutex<VuSlots>>> = Arc::new(
            spec.plan
                .scenarios
                .iter()
                .map(|_| std::sync::Mutex::new(VuSlots::default()))
                .collect(),
        );
        let (mark, started) = StartMark::new(spec.workers.max(1));
        let mut threads = Vec::new();
        for w in 0..spec.workers.max(1) {
            let (spec, reports, stop, counted, cursors) = (
                spec.clone(),
                reports.clone(),
                stop.clone(),
                counted.clone(),
                cursors.clone(),
            );
            let (claims, mark) = (claims.clone(), mark.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("stampede-worker-{w}"))
                    .spawn(move || {
                        worker_main(w, spec, reports, stop, counted, cursors, claims, mark)
                    })?,
            );
        }
        Ok(Engine {
            threads,
            stop,
            started,
        })
    }

    /// Waits for every worker to finish.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

struct Worker {
    index: usize,
    count: usize,
    spec: Arc<RunSpec>,
    ctx: WorkerCtx,
    stop: StopHandle,
    stop_rx: watch::Receiver<Stop>,
    /// Per scenario: its counted work on this node (see `closed_counted`).
    counted: Arc<Vec<CountedWork>>,
    /// Scenarios of this worker still at work (a counted one waiting for a hand-over
    /// is not), and a wake-up when that changes: a counted scenario whose work is
    /// done stays ready to take over a lost node's while the others work on.
    working: Cell<usize>,
    scenario_ended: tokio::sync::Notify,
    /// Per open-model scenario: the node's VU slots and how many of them the node's
    /// workers have claimed, so that max_vus holds for the node, not per worker.
    vu_claims: Arc<Vec<std::sync::Mutex<VuSlots>>>,
    /// VUs alive on this worker.
    vus: Cell<u64>,
}

#[allow(clippy::too_many_arguments)]
fn worker_main(
    index: usize,
    spec: Arc<RunSpec>,
    reports: mpsc::UnboundedSender<WorkerReport>,
    stop: StopHandle,
    counted: Arc<Vec<CountedWork>>,
    cursors: Arc<Vec<SharedCursor>>,
    vu_claims: Arc<Vec<std::sync::Mutex<VuSlots>>>,
    mark: Arc<StartMark>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, "cannot start a worker runtime: {e}");
            mark.stamp();
            let _ = reports.send(WorkerReport {
                worker: index,
                second: 0,
                metrics: Metrics::new(&spec.plan.layout),
                vus: 0,
                last: true,
            });
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let spec_scenarios = spec.plan.scenarios.len();
    let worker = Rc::new(Worker {
        index,
        count: spec.workers.max(1),
        ctx: WorkerCtx {
            plan: spec.plan.clone(),
            http: spec.http.clone(),
            node_name: Arc::from(spec.node_name.as_str()),
            recorder: RefCell::new(Metrics::new(&spec.plan.layout)),
            cursors,
        },
        stop_rx: stop.tx.subscribe(),
        spec,
        stop,
        counted,
        working: Cell::new(spec_scenarios),
        scenario_ended: tokio::sync::Notify::new(),
        vu_claims,
        vus: Cell::new(0),
    });
    local.block_on(&rt, async move {
        let start = tokio::time::Instant::from_std(worker.spec.start_at);
        // Wait for the agreed instant precisely here, once, so that the stamp says
        // when this worker really started; scenarios starting at 0 then go at once.
        let mut stop_rx = worker.stop_rx.clone();
        tokio::select! {
            _ = pacing::wait_until(worker.spec.start_at) => {}
            _ = stop_rx.wait_for(|s| *s != Stop::Running) => {}
        }
        mark.stamp();
        tracing::debug!(
            worker = worker.index,
            late_us = micros(Instant::now().saturating_duration_since(worker.spec.start_at)),
            "worker passed the run's start instant"
        );
        // The scenarios run in this, the worker's main future, not as tasks of their
        // own: the LocalSet polls its main future before every batch of at most 31
        // tasks, so an open model's schedule is looked at every few dozen task polls
        // instead of waiting its turn behind every VU that a burst of responses woke.
        let scenarios = futures::future::join_all(
            (0..worker.spec.plan.scenarios.len()).map(|si| run_scenario(worker.clone(), si)),
        );
        let done = Rc::new(Cell::new(false));
        // The first second not yet reported. The final report takes it, never the
        // clock's second: a flusher whose timer fired but that was not polled before
        // the scenarios ended would otherwise leave a second that no report covers,
        // and the mesh would wait for that snapshot forever.
        let unreported = Rc::new(Cell::new(0u64));
        let flusher = {
            let (worker, done, reports) = (worker.clone(), done.clone(), reports.clone());
            let unreported = unreported.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let second = unreported.get();
                    tokio::time::sleep_until(start + Duration::from_secs(second.saturating_add(1)))
                        .await;
                    if done.get() {
                        return;
                    }
                    let metrics = take_metrics(&worker);
                    let report = WorkerReport {
                        worker: worker.index,
                        second,
                        metrics,
                        vus: worker.vus.get(),
                        last: false,
                    };
                    if reports.send(report).is_err() {
                        return;
                    }
                    unreported.set(second + 1);
                }
            })
        };
        scenarios.await;
        done.set(true);
        flusher.abort();
        // The final report covers whatever was measured since the last one.
        let metrics = take_metrics(&worker);
        let _ = reports.send(WorkerReport {
            worker: worker.index,
            second: unreported.get(),
            metrics,
            vus: 0,
            last: true,
        });
    });
}

/// The second's metrics, leaving fresh ones to record into: a recorder reset in place
/// would keep every histogram as long as the run's worst value needed (8 KB per
/// doubling, per histogram, per worker), and a copy of that every second.
fn take_metrics(w: &Worker) -> Metrics {
    let fresh = Metrics::new(&w.spec.plan.layout);
    std::mem::replace(&mut *w.ctx.recorder.borrow_mut(), fresh)
}

/// A well-mixed 64-bit hash of an index (splitmix64's finaliser), for dealing events
/// over workers evenly whatever pattern the striping leaves.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Which arrival events one worker of a node takes, under a split that failover may
/// change while the run goes.
///
/// The node's events are dealt over its `active` workers by `mix(event)`, so every
/// worker decides alike whenever it picks up a split. `next` is the first event not
/// yet taken that may still be this worker's: while the worker waits for an event,
/// the events between its last one and that event have been judged under the old
/// split. A takeover can hand it some of them (the lost node's events from
/// `from_event` on), so a new split rewinds `next` to the first event after the last
/// one taken — but never to an event whose intended time has already passed when the
/// split arrived: those were the lost node's while it was dying, and it may have run
/// them.
#[derive(Debug, Clone)]
struct EventDealer {
    node: usize,
    worker: u64,
    active: u64,
    total: u64,
    next: u64,
    /// The event after the last one this worker took (ran or counted as dropped).
    taken_to: u64,
}

impl EventDealer {
    fn new(node: usize, worker: usize, active: usize, total: u64) -> EventDealer {
        EventDealer {
            node,
            worker: worker as u64,
            active: active.max(1) as u64,
            total,
            next: 0,
            taken_to: 0,
        }
    }

    /// This worker's next event under `events`, from the cursor on; the cursor stays on
    /// it until it is `take`n, so a split change while waiting for it can rewind.
    fn next_mine(&mut self, events: &Assignment) -> Option<u64> {
        while self.next < self.total {
            let e = self.next;
            if events.owns(self.node, e) && mix(e) % self.active == self.worker {
                return Some(e);
            }
            self.next += 1;
        }
        None
    }

    fn take(&mut self, event: u64) {
        self.next = event + 1;
        self.taken_to = event + 1;
    }

    /// The split changed when the scenario had run for `elapsed`: re-decide the events
    /// skipped since the last one taken whose intended time is still ahead.
    fn split_changed(&mut self, schedule: &ArrivalSchedule, elapsed: Duration) {
        let (mut lo, mut hi) = (self.taken_to, self.next);
        // First event in [taken_to, next) whose intended time is not before `elapsed`
        // (or `next` itself): arrival times never decrease with the index.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match schedule.arrival_time(mid) {
                Some(t) if t < elapsed => lo = mid + 1,
                _ => hi = mid,
            }
        }
        self.next = lo;
    }
}

/// The node's VU slots of one open-model scenario, shared by its workers: they claim
/// slots one by one as they need a new VU, so max_vus holds for the node however the
/// arrivals fall on its workers. A failover appends the slots it hands the node, once
/// for the node, so the claimed ones keep their place and no VU index is used twice.
/// A VU retired for idling gives its slot back here, with its place in its data rows
/// and random sequence; a later claim takes such a slot before a fresh one, so the
/// node never holds more VUs than slots and no two live VUs share an index.
#[derive(Debug, Default)]
struct VuSlots {
    ids: Vec<u64>,
    claimed: usize,
    /// The assignment generation `ids` reflects (`None`: not filled yet).
    generation: Option<u64>,
    /// Slots whose VU retired, free to claim again.
    parked: Vec<Parked>,
}

/// A claimed VU slot: never used yet (its index), or left by a retired VU.
#[derive(Debug)]
enum Claim {
    Fresh(u64),
    Parked(Parked),
}

impl VuSlots {
    /// Appends the VU indices of `0..limit` that `node` owns under `vus` and that are
    /// not listed yet, in ascending order.
    fn extend(&mut self, vus: &Assignment, node: usize, limit: u64, generation: u64) {
        if self.generation == Some(generation) {
            return;
        }
        let known: std::collections::HashSet<u64> = self.ids.iter().copied().collect();
        let more: Vec<u64> = (0..limit)
            .filter(|g| !known.contains(g) && vus.owns(node, *g))
            .collect();
        self.ids.extend(more);
        self.generation = Some(generation);
    }

    fn claim(&mut self) -> Option<Claim> {
        if let Some(p) = self.parked.pop() {
            return Some(Claim::Parked(p));
        }
        let g = self.ids.get(self.claimed).copied()?;
        self.claimed += 1;
        Some(Claim::Fresh(g))
    }
}

fn lock_slots(w: &Worker, si: usize) -> std::sync::MutexGuard<'_, VuSlots> {
    match w.vu_claims[si].lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Claims one of the node's VU slots of scenario `si` for a new VU.
fn claim_slot(w: &Worker, si: usize, limit: u64) -> Option<Claim> {
    let mut slots = lock_slots(w, si);
    // The generation first: a split read after it is at least as new, so a slot
    // list marked with it never misses a takeover.
    let generation = *w.spec.assignment.generation.borrow();
    let split = w.spec.assignment.get();
    slots.extend(&split.vus, w.spec.node, limit, generation);
    slots.claim()
}

/// The VU indices this worker runs out of `0..limit`: the node's owned indices under
/// the current split, dealt round-robin over the workers.
fn my_indices(w: &Worker, limit: u64) -> Vec<u64> {
    let split = w.spec.assignment.get();
    let mut out = Vec::new();
    let mut rank = 0usize;
    for g in 0..limit {
        if split.vus.owns(w.spec.node, g) {
            if rank % w.count == w.index {
                out.push(g);
            }
            rank += 1;
        }
    }
    out
}

/// `at + d` without the panic of `Instant + Duration` on overflow: plan durations are
/// bounded (30 days), but a sum of them must not be able to abort a worker; past the
/// end of `Instant` it is a year ahead, which no bounded run reaches.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(at)
}

async fn run_scenario(w: Rc<Worker>, si: usize) {
    scenario(w.clone(), si).await;
    w.working.set(w.working.get().saturating_sub(1));
    w.scenario_ended.notify_waiters();
}

async fn scenario(w: Rc<Worker>, si: usize) {
    let sc = &w.spec.plan.scenarios[si];
    let begin = later(w.spec.start_at, sc.start_after);
    let mut stop_rx = w.stop_rx.clone();
    tokio::select! {
        _ = pacing::wait_until(begin) => {}
        _ = stop_rx.wait_for(|s| *s != Stop::Running) => return,
    }
    match sc.executor.clone() {
        Executor::ConstantVus { .. } | Executor::RampingVus { .. } => {
            closed_ramping(w, si, begin).await
        }
        Executor::PerVuIterations {
            vus,
            iterations,
            max_duration,
        } => closed_counted(w, si, begin, vus, Some(iterations), max_duration).await,
        Executor::SharedIterations {
            vus, max_duration, ..
        } => closed_counted(w, si, begin, vus, None, max_duration).await,
        Executor::ConstantArrivalRate { .. } | Executor::RampingArrivalRate { .. } => {
            open_model(w, si, begin).await
        }
    }
}

/// Waits for the VU tasks of a scenario. A hard stop — the run's, or the
/// scenario's own once its graceful window has passed — aborts the tasks still running,
/// which cancels their in-flight iterations. Watching for it here, once, rather than
/// around every VU's loop keeps the request path free of it: a `select!` there would
/// poll two watch channels on every wake-up of every VU.
async fn join_or_abort(
    w: &Worker,
    scenario_hard: &watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    tokio::pin!(all);
    let mut run = w.stop_rx.clone();
    let mut local = scenario_hard.clone();
    tokio::select! {
        _ = &mut all => return,
        Ok(_) = run.wait_for(|s| *s == Stop::Hard) => {}
        Ok(_) = local.wait_for(|h| *h) => {}
    }
    for a in &aborts {
        a.abort();
    }
    all.await;
}

/// Runs a closure when dropped: bookkeeping that must happen however a task ends.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Stops the scenario's in-flight iterations hard once the graceful window after
/// `end` (or after a graceful stop of the run) has passed. Other scenarios go on.
fn arm_hard_stop(
    w: &Rc<Worker>,
    si: usize,
    end: Instant,
    hard: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    let grace = w.spec.plan.scenarios[si]
        .graceful_stop
        .unwrap_or(w.spec.graceful_stop);
    let w = w.clone();
    tokio::task::spawn_local(async move {
        let mut rx = w.stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(later(end, grace).into()) => {}
            _ = rx.wait_for(|s| *s == Stop::Graceful) => {
                tokio::time::sleep(grace).await;
            }
        }
        let _ = hard.send(true);
    })
}

/// constant-vus and ramping-vus: global VU g runs while g < the scenario's VU target.
async fn closed_ramping(w: Rc<Worker>, si: usize, begin: Instant) {
    let sc = &w.spec.plan.scenarios[si];
    let exec = sc.executor.clone();
    let total = exec.total_duration();
    let end = later(begin, total);
    let (hard_tx, hard_rx) = watch::channel(false);
    let mut mine = my_indices(&w, sc.vu_slots);
    let target = Rc::new(Cell::new(exec.vus_at(Duration::ZERO).unwrap_or(0)));
    // Indexed by VU index within the scenario: is that VU running here?
    let running: Rc<RefCell<Vec<bool>>> = Rc::new(RefCell::new(vec![false; sc.vu_slots as usize]));
    let mut tasks = Vec::new();
    let mut at = Duration::ZERO;
    let mut stop_rx = w.stop_rx.clone();
    let mut generation = w.spec.assignment.subscribe();
    let mut next_change = exec.next_vu_change(at);
    loop {
        // Start every VU of ours that the current target admits and is not running.
        for &g in mine.iter() {
            let i = g as usize;
            if g < target.get() && !running.borrow()[i] {
                running.borrow_mut()[i] = true;
                let (w2, target2, running2) = (w.clone(), target.clone(), running.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let sc = &w2.spec.plan.scenarios[si];
                    let mut vu = Vu::new(&w2.ctx, si, sc.vu_offset + g);
                    w2.vus.set(w2.vus.get() + 1);
                    // Also when a hard stop aborts this task mid-iteration.
                    let _alive = Defer(|| {
                        w2.vus.set(w2.vus.get() - 1);
                        running2.borrow_mut()[i] = false;
                    });
                    let mut stop = w2.stop_rx.clone();
                    while g < target2.get() && !w2.stop.stopping() && Instant::now() < end {
                        if !w2.spec.lease.holds() && !w2.spec.lease.wait(&mut stop, end).await {
                            continue;
                        }
                        if vu.iterate(&w2.ctx, None).await == IterationEnd::DataExhausted {
                            break;
                        }
                    }
                }));
            }
        }
        // Sleep until the VU target changes, the split changes (failover hands us
        // VUs of a lost node), the scenario ends or the run stops.
        let wake = match next_change {
            Some((next, _)) if next < total => later(begin, next),
            _ => end,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                match next_change {
                    Some((next, vus)) if next < total => {
                        at = next;
                        target.set(vus);
                        next_change = exec.next_vu_change(at);
                    }
                    _ => break,
                }
            }
            changed = generation.changed() => {
                if changed.is_err() {
                    break;
                }
                mine = my_indices(&w, sc.vu_slots);
            }
            _ = stop_rx.wait_for(|s| *s != Stop::Running) => break,
        }
    }
    target.set(0);
    let hard = arm_hard_stop(&w, si, end, hard_tx);
    join_or_abort(&w, &hard_rx, tasks).await;
    hard.abort();
}

/// The plan's counted scenarios (per-vu-iterations, shared-iterations) in plan order:
/// their work moves by claims in a failover (see `protocol::machine::version`).
pub fn counted_of(plan: &CompiledPlan) -> Vec<Counted> {
    plan.scenarios
        .iter()
        .filter_map(|s| match s.executor {
            Executor::PerVuIterations { iterations, .. } => Some(Counted::PerVu { iterations }),
            Executor::SharedIterations { iterations, .. } => Some(Counted::Pool { iterations }),
            _ => None,
        })
        .take(MAX_COUNTED)
        .collect()
}

/// One scenario's counted work on this node, shared by its workers.
struct CountedWork {
    /// Its ordinal among the counted scenarios (the claims' index); None otherwise.
    ord: Option<usize>,
    /// VU indices one of this node's workers runs (a failover re-deals VUs over the
    /// workers, and a VU must never run twice), and for per-vu-iterations the next
    /// iteration of every VU that ran here (a VU that finished is not started again).
    running: std::sync::Mutex<RunningVus>,
}

/// VUs running here, and the next iteration of each VU that ran here.
type RunningVus = (
    std::collections::BTreeSet<u64>,
    std::collections::BTreeMap<u64, u64>,
);

impl CountedWork {
    fn for_plan(spec: &RunSpec) -> Vec<CountedWork> {
        let mut ord = 0usize;
        spec.plan
            .scenarios
            .iter()
            .map(|s| {
                let counted = matches!(
                    s.executor,
                    Executor::PerVuIterations { .. } | Executor::SharedIterations { .. }
                ) && ord < MAX_COUNTED;
                let mine = counted.then_some(ord);
                if counted {
                    // At least one iteration per VU of this node is asked for ahead.
                    let vus = spec
                        .assignment
                        .get()
                        .vus
                        .scale(spec.node, s.vu_slots)
                        .max(1);
                    spec.lease.ahead[ord].store(vus, Ordering::Relaxed);
                    ord += 1;
                }
                CountedWork {
                    ord: mine,
                    running: Default::default(),
                }
            })
            .collect()
    }

    /// Takes VU `g` for this worker, unless another runs it: Some(the iteration it
    /// goes on from, at least `first`).
    fn start(&self, g: u64, first: u64) -> Option<u64> {
        let mut r = self.lock();
        if !r.0.insert(g) {
            return None;
        }
        Some(r.1.get(&g).copied().unwrap_or(0).max(first))
    }

    /// VU `g` stopped here; `next` is the iteration it would have done next.
    fn end(&self, g: u64, next: u64) {
        let mut r = self.lock();
        r.0.remove(&g);
        let n = r.1.entry(g).or_insert(0);
        *n = (*n).max(next);
    }

    /// The iteration VU `g` would go on from here (0 if it never ran here).
    fn next_of(&self, g: u64) -> u64 {
        self.lock().1.get(&g).copied().unwrap_or(0)
    }

    /// The running set and progress; a worker that panicked holding it left them
    /// consistent (each update is one insert or remove).
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningVus> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// per-vu-iterations (`per_vu = Some(n)`: each VU does n) and shared-iterations
/// (`None`: the node's pool, claimed slot by slot across its workers).
///
/// Every iteration is claimed first — a pool slot, or the VU's iteration number —
/// within what the run protocol confirmed to this node, so that a failover can hand
/// a lost node's unclaimed work to the survivors without any of it running twice. A
/// survivor whose own work is done waits for such a hand-over while its other
/// scenarios go on; a taken-over VU goes on from the lost node's claim.
async fn closed_counted(
    w: Rc<Worker>,
    si: usize,
    begin: Instant,
    vus: u64,
    per_vu: Option<u64>,
    max_duration: Duration,
) {
    let end = later(begin, max_duration);
    let (hard_tx, hard_rx) = watch::channel(false);
    let Some(c) = w.counted[si].ord else {
        return;
    };
    let mut tasks = Vec::new();
    let alive = Rc::new(Cell::new(0usize));
    let idle = Rc::new(tokio::sync::Notify::new());
    let mut generation = w.spec.assignment.subscribe();
    let mut stop_rx = w.stop_rx.clone();
    let mut waiting = false;
    loop {
        let split = w.spec.assignment.get();
        let size = split.counted.get(c).map_or(0, |p| p.size(w.spec.node));
        let exhausted = per_vu.is_none() && w.spec.lease.claimed[c].load(Ordering::Acquire) >= size;
        for g in my_indices(&w, vus) {
            let first = match (per_vu, split.counted.get(c)) {
                (Some(_), Some(p)) => p.first_iteration(&split.vus, g),
                (Some(_), None) => u64::MAX,
                (None, _) => 0,
            };
            let first = first.max(w.counted[si].next_of(g));
            if exhausted || per_vu.is_some_and(|n| first >= n) {
                continue;
            }
            let Some(first) = w.counted[si].start(g, first) else {
                continue;
            };
            alive.set(alive.get() + 1);
            let (w2, alive2, idle2) = (w.clone(), alive.clone(), idle.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let sc = &w2.spec.plan.scenarios[si];
                let mut vu = Vu::new(&w2.ctx, si, sc.vu_offset + g);
                w2.vus.set(w2.vus.get() + 1);
                // Also when a hard stop aborts this task mid-iteration.
                let next = Rc::new(Cell::new(first));
                let next2 = next.clone();
                let _alive = Defer(|| {
                    w2.vus.set(w2.vus.get() - 1);
                    w2.counted[si].end(g, next2.get());
                    alive2.set(alive2.get() - 1);
                    if alive2.get() == 0 {
                        idle2.notify_waiters();
                    }
                });
                let lease = &w2.spec.lease;
                let mut stop = w2.stop_rx.clone();
                let mut i = first;
                while !w2.stop.stopping() && Instant::now() < end {
                    if !lease.holds() && !lease.wait(&mut stop, end).await {
                        continue;
                    }
                    let go = match per_vu {
                        Some(n) if i >= n => break,
                        Some(_) => {
                            lease.claim_round(c, i)
                                || lease
                                    .wait_for(|| lease.claim_round(c, i), &mut stop, end)
                                    .await
                        }
                        None => {
                            let size = || {
                                let s = w2.spec.assignment.get();
                                s.counted.get(c).map_or(0, |p| p.size(w2.spec.node))
                            };
                            let mut size_now = size();
                            let mut taken = None;
                            let claimed = |size_now: u64| lease.claim_slot(c, size_now);
                            match claimed(size_now) {
                                Ok(k) => taken = Some(k),
                                Err(k) if k >= size_now => break,
                                Err(_) => {
                                    let got = lease
                                        .wait_for(
                                            || {
                                                size_now = size();
                                                match claimed(size_now) {
                                                    Ok(k) => {
                                                        taken = Some(k);
                                                        true
                                                    }
                                                    // Exhausted: stop waiting.
                                                    Err(k) => k >= size_now,
                                                }
                                            },
                                            &mut stop,
                                            end,
                                        )
                                        .await;
                                    if got && taken.is_none() {
                                        break;
                                    }
                                }
                            }
                            taken.is_some()
                        }
                    };
                    if !go {
                        continue;
                    }
                    i += 1;
                    next.set(i);
                    if vu.iterate(&w2.ctx, None).await == IterationEnd::DataExhausted {
                        break;
                    }
                }
            }));
        }
        // Waiting for a hand-over is not work: two scenarios that both wait must
        // not keep each other (and the run) going until their max_duration.
        if alive.get() == 0 && !waiting {
            waiting = true;
            w.working.set(w.working.get().saturating_sub(1));
            w.scenario_ended.notify_waiters();
        } else if alive.get() > 0 && waiting {
            waiting = false;
            w.working.set(w.working.get() + 1);
        }
        if alive.get() == 0 && w.working.get() == 0 {
            // Nothing left here, and no other scenario at work that could keep this
            // node in the run long enough to be handed more.
            break;
        }
        tokio::select! {
            changed = generation.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = idle.notified(), if alive.get() > 0 => {}
            _ = w.scenario_ended.notified(), if alive.get() == 0 => {}
            _ = stop_rx.wait_for(|s| *s != Stop::Running) => break,
            _ = tokio::time::sleep_until(end.into()) => break,
        }
    }
    if waiting {
        // run_scenario takes this scenario off the count as it ends.
        w.working.set(w.working.get() + 1);
    }
    let hard = arm_hard_stop(&w, si, end, hard_tx);
    join_or_abort(&w, &hard_rx, tasks).await;
    hard.abort();
}

/// How many due events the open model hands out before it gives the runtime back when
/// it is behind: one yield per event would cost an epoll poll per event exactly when
/// the worker is short of time; a small batch keeps in-flight iterations served.
const DUE_BATCH: u32 = 16;

/// Waits for an arrival event up to this long watch only the clock (see `open_model`).
const SHORT_WAIT: Duration = Duration::from_millis(2);

/// constant-arrival-rate and ramping-arrival-rate.
async fn open_model(w: Rc<Worker>, si: usize, begin: Instant) {
    let sc = &w.spec.plan.scenarios[si];
    let exec = sc.executor.clone();
    let end = later(begin, exec.total_duration());
    let schedule = match exec.arrival_schedule() {
        Ok(Some(s)) => s,
        // Validated plans always have a schedule for arrival-rate executors.
        _ => return,
    };
    // With fewer VU slots than workers, only as many workers as slots take arrivals:
    // an idle VU on one worker cannot serve an arrival on another. Counted on the base
    // split, so that every worker deals alike even if a failover lands as they start.
    let base_slots = w
        .spec
        .assignment
        .get()
        .vus
        .base()
        .scale(w.spec.node, sc.vu_slots);
    let active = w.count.min(base_slots.max(1) as usize);
    if w.index >= active {
        return;
    }
    let (hard_tx, hard_rx) = watch::channel(false);
    let mut generation = w.spec.assignment.subscribe();
    let mut split = w.spec.assignment.get();
    // The VUs of this worker wait in their own tasks, idle ones in this pool; an event
    // goes to an idle VU's mailbox. No task is spawned per iteration.
    // Last in, first out: the VUs at the front are the ones the load has not needed
    // for longest, and are retired from there.
    let idle: IdlePool = Rc::new(RefCell::new(VecDeque::new()));
    let mut vus: Vec<(Rc<Mailbox>, tokio::task::JoinHandle<()>)> = Vec::new();
    let mut retired = 0usize;
    let mut stop_rx = w.stop_rx.clone();
    let mut dealer = EventDealer::new(w.spec.node, w.index, active, schedule.total_arrivals());
    // A split change seen while waiting for an event (the wait consumed the change).
    let mut split_stale = false;
    let mut pacer = Pacer::for_events();
    // Events handed out since this loop last gave the runtime back.
    let mut since_yield = 0u32;
    // The lease lapsed while events came due: the overdue ones are dropped, not
    // started in a burst.
    let mut held_up = false;
    loop {
        if split_stale || generation.has_changed().unwrap_or(false) {
            split_stale = false;
            generation.borrow_and_update();
            split = w.spec.assignment.get();
            dealer.split_changed(&schedule, Instant::now().saturating_duration_since(begin));
        }
        let Some(event) = dealer.next_mine(&split.events) else {
            break;
        };
        let Some(t) = schedule.arrival_time(event) else {
            break;
        };
        let intended = later(begin, t);
        if intended >= end {
            break;
        }
        let now = Instant::now();
        if intended > now && intended - now <= SHORT_WAIT {
            // A short wait skips the watch channels: registering with two of them for
            // every event costs more than the wait itself at high rates. A stop or a
            // takeover is seen at the next event, at most this much later.
            pacer.until(intended).await;
            if w.stop.stopping() {
                break;
            }
            since_yield = 0;
        } else if intended > now {
            // The pacer gives the runtime back while it waits: in-flight iterations
            // run, and the event still goes within microseconds of its instant.
            tokio::select! {
                _ = pacer.until(intended) => {}
                // A takeover may hand this worker events before the one it waits for.
                Ok(()) = generation.changed() => {
                    split_stale = true;
                    continue;
                }
                _ = stop_rx.wait_for(|s| *s != Stop::Running) => break,
            }
            since_yield = 0;
        } else if w.stop.stopping() {
            break;
        } else if since_yield >= DUE_BATCH {
            // Behind schedule: hand out due events in batches, then let the
            // iterations in flight (and the ones just handed out) run.
            tokio::task::yield_now().await;
            since_yield = 0;
        }
        if !w.spec.lease.holds() {
            // No lease (paused, cut off from the run's majority, or between two
            // versions): start nothing. The event is looked at again when the lease
            // or the split changes; if it is then past LEASE_LATE_LIMIT it is dropped.
            held_up = true;
            let mut lease_rx = w.spec.lease.subscribe();
            tokio::select! {
                _ = lease_rx.changed() => {}
                Ok(()) = generation.changed() => split_stale = true,
                _ = stop_rx.wait_for(|s| *s != Stop::Running) => break,
                _ = tokio::time::sleep_until(end.into()) => break,
            }
            continue;
        }
        if held_up {
            if Instant::now().saturating_duration_since(intended) > LEASE_LATE_LIMIT {
                dealer.take(event);
                w.ctx.recorder.borrow_mut().scenarios[si].dropped += 1;
                continue;
            }
            held_up = false;
        }
        dealer.take(event);
        retired += retire_idle(&idle, Instant::now());
        if retired * 2 > vus.len() {
            // A retired VU's task ends on its own (its mailbox is closed): forget it.
            vus.retain(|(m, _)| !m.retired.get());
            retired = 0;
        }
        let mut mailbox = idle.borrow_mut().pop_back();
        if mailbox.is_none() && since_yield > 0 && !vus.is_empty() {
            // Every VU is busy. Before a new one (and its new connection) is made, the
            // busy ones whose responses are already in get a turn to finish: after a
            // stall (the VM descheduled us, a burst of events came due at once) most
            // of them are, and making a VU per due event instead had a run at 80k/s
            // climb from ~400 to 2 000 VUs and connections, each making every later
            // request dearer. Costs this event one runtime tick.
            tokio::task::yield_now().await;
            since_yield = 0;
            mailbox = idle.borrow_mut().pop_back();
        }
        since_yield += 1;
        match mailbox {
            Some(m) => m.post(intended),
            None => match claim_slot(&w, si, sc.vu_slots) {
                Some(claim) => {
                    let m = Rc::new(Mailbox::default());
                    m.post(intended);
                    let task = spawn_open_vu(&w, si, claim, m.clone(), idle.clone());
                    vus.push((m, task));
                }
                None => {
                    w.ctx.recorder.borrow_mut().scenarios[si].dropped += 1;
                    // Out of VUs: let the iterations in flight free some before the
                    // next due event.
                    since_yield = DUE_BATCH;
                }
            },
        }
    }
    // No more events: idle VUs end now, busy ones after their iteration.
    let tasks = vus
        .into_iter()
        .map(|(m, task)| {
            m.close();
            task
        })
        .collect();
    let hard = arm_hard_stop(&w, si, end, hard_tx);
    join_or_abort(&w, &hard_rx, tasks).await;
    hard.abort();
}

/// Where the open model hands a VU its next iteration: the intended start, or the news
/// that there will be none. Single-threaded (the worker's); a post wakes the VU's task.
#[derive(Default)]
struct Mailbox {
    event: Cell<Option<Instant>>,
    closed: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
    /// When the VU last went back to the idle pool.
    idle_since: Cell<Option<Instant>>,
    /// Closed for idling, not because the scenario ended: the VU gives its slot back.
    retired: Cell<bool>,
}

/// A worker's idle open-model VUs of one scenario, most recently used at the back.
type IdlePool = Rc<RefCell<VecDeque<Rc<Mailbox>>>>;

/// An open-model VU idle this long at the front of the pool is retired: a spike (or a
/// stall of the target or the machine) that needed many VUs must not leave their
/// connections and buffers for the rest of a run that may last days. Long enough that
/// a load that merely wavers keeps its VUs and connections.
const RETIRE_IDLE_AFTER: Duration = Duration::from_secs(10);

/// Retires the VUs idle for longer than [`RETIRE_IDLE_AFTER`] at `now`, from the front
/// of the pool, always keeping the most recently used one (a low rate must not pay a
/// new connection per event). Returns how many it retired.
fn retire_idle(idle: &IdlePool, now: Instant) -> usize {
    let mut pool = idle.borrow_mut();
    let mut n = 0;
    while pool.len() > 1 {
        let since = pool.front().and_then(|m| m.idle_since.get());
        if since.is_none_or(|t| now.saturating_duration_since(t) <= RETIRE_IDLE_AFTER) {
            break;
        }
        if let Some(m) = pool.pop_front() {
            m.retired.set(true);
            m.close();
            n += 1;
        }
    }
    n
}

impl Mailbox {
    fn post(&self, intended: Instant) {
        self.event.set(Some(intended));
        self.wake();
    }

    fn close(&self) {
        self.closed.set(true);
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// The next intended start, or `None` once closed and empty.
    async fn next(&self) -> Option<Instant> {
        std::future::poll_fn(|cx| {
            if let Some(at) = self.event.take() {
                return std::task::Poll::Ready(Some(at));
            }
            if self.closed.get() {
                return std::task::Poll::Ready(None);
            }
            self.waker.set(Some(cx.waker().clone()));
            std::task::Poll::Pending
        })
        .await
    }
}

/// One open-model VU: runs an iteration per event posted to its mailbox, going back
/// to the idle pool between them, until the mailbox closes or its data runs out.
fn spawn_open_vu(
    w: &Rc<Worker>,
    si: usize,
    claim: Claim,
    mailbox: Rc<Mailbox>,
    idle: IdlePool,
) -> tokio::task::JoinHandle<()> {
    let w = w.clone();
    tokio::task::spawn_local(async move {
        let mut vu = match claim {
            Claim::Fresh(g) => Vu::new(&w.ctx, si, w.spec.plan.scenarios[si].vu_offset + g),
            Claim::Parked(p) => Vu::resume(&w.ctx, si, p),
        };
        w.vus.set(w.vus.get() + 1);
        // Also when a hard stop aborts this task mid-iteration.
        let _alive = Defer(|| w.vus.set(w.vus.get() - 1));
        while let Some(intended) = mailbox.next().await {
            // The lag is taken when the iteration really begins, so the time the event
            // spent queued behind other work on this worker counts.
            let lag = micros(Instant::now().saturating_duration_since(intended));
            w.ctx.recorder.borrow_mut().scenarios[si]
                .schedule_lag
                .record(lag);
            if vu.iterate(&w.ctx, Some(intended)).await == IterationEnd::DataExhausted {
                // A VU whose data ran out leaves the pool for good.
                return;
            }
            mailbox.idle_since.set(Some(Instant::now()));
            idle.borrow_mut().push_back(mailbox.clone());
        }
        if mailbox.retired.get() {
            // Only now, with this VU gone, may another take its slot.
            lock_slots(&w, si).parked.push(vu.park());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_protocol::segment::{Reassignment, Striping};
    use std::collections::BTreeSet;

    fn three_nodes() -> Assignment {
        Assignment::new(Striping::from_weights(&[1, 1, 1]).unwrap())
    }

    /// Node `lost` taken over from event `from` by the other two, equally.
    fn after_loss(lost: usize, from: u64) -> Assignment {
        let mut a = three_nodes();
        let survivors: Vec<(usize, u64)> = (0..3).filter(|n| *n != lost).map(|n| (n, 1)).collect();
        a.reassign(Reassignment::new(lost, from, &survivors).unwrap())
            .unwrap();
        a
    }

    /// One worker following the open-model loop's decisions: the split changes to
    /// `after` while it waits for an event due after `change_at`; a worker that dies
    /// at `dies_at` takes nothing due from then on.
    fn worker_events(
        schedule: &ArrivalSchedule,
        (node, worker, active): (usize, usize, usize),
        before: &Assignment,
        after: &Assignment,
        change_at: Duration,
        dies_at: Option<Duration>,
    ) -> Vec<u64> {
        let mut d = EventDealer::new(node, worker, active, schedule.total_arrivals());
        let mut changed = false;
        let mut taken = Vec::new();
        for _ in 0..=schedule.total_arrivals() * 2 {
            let split = if changed { after } else { before };
            let Some(e) = d.next_mine(split) else {
                break;
            };
            let t = schedule.arrival_time(e).unwrap();
            if dies_at.is_some_and(|death| t >= death) {
                break;
            }
            if !changed && t > change_at {
                changed = true;
                d.split_changed(schedule, change_at);
                continue;
            }
            d.take(e);
            taken.push(e);
        }
        taken
    }

    /// Kills node 2 at `death`, the survivors learn of it at `change_at`, taking over
    /// from event `from`: every event is run at most once, and exactly the events the
    /// takeover could not save are missing.
    fn takeover(rate: f64, workers: usize, death: Duration, change_at: Duration, from: u64) {
        let schedule = ArrivalSchedule::constant(rate, Duration::from_secs(20)).unwrap();
        let (before, after) = (three_nodes(), after_loss(2, from));
        let mut seen = BTreeSet::new();
        for node in 0..3 {
            for worker in 0..workers {
                let dies_at = (node == 2).then_some(death);
                let got = worker_events(
                    &schedule,
                    (node, worker, workers),
                    &before,
                    &after,
                    change_at,
                    dies_at,
                );
                for e in got {
                    assert!(seen.insert(e), "event {e} ran twice");
                    // The lost node ran its own events until it died.
                    let owner = if node == 2 { &before } else { &after };
                    assert!(owner.owns(node, e), "event {e} ran on node {node}");
                }
            }
        }
        // Lost: node 2's events due from its death until the takeover took effect
        // (from event `from`, and never earlier than the moment the split arrived).
        let due = |e: u64| schedule.arrival_time(e).unwrap();
        let missing: Vec<u64> = (0..schedule.total_arrivals())
            .filter(|e| !seen.contains(e))
            .collect();
        let expected: Vec<u64> = (0..schedule.total_arrivals())
            .filter(|&e| before.owns(2, e) && due(e) >= death && (e < from || due(e) < change_at))
            .collect();
        assert_eq!(
            missing, expected,
            "rate {rate}/s, {workers} workers per node"
        );
    }

    /// The first event due at or after `at`, as the leader picks `from_event`.
    fn first_due(schedule: &ArrivalSchedule, at: Duration) -> u64 {
        (0..schedule.total_arrivals())
            .find(|&e| schedule.arrival_time(e).unwrap() >= at)
            .unwrap_or(schedule.total_arrivals())
    }

    #[test]
    fn a_takeover_hands_survivors_the_events_before_the_one_they_wait_for() {
        // At low rates a worker's next own event is seconds away when the split
        // changes: the lost node's events from `from` on before it must still run.
        let lead = Duration::from_millis(300);
        for rate in [3.0, 300.0] {
            let schedule = ArrivalSchedule::constant(rate, Duration::from_secs(20)).unwrap();
            for workers in [1, 2, 4] {
                for ms in (4_500..7_000).step_by(250) {
                    let change_at = Duration::from_millis(ms);
                    let from = first_due(&schedule, change_at + lead);
                    takeover(rate, workers, Duration::from_secs(4), change_at, from);
                }
            }
        }
    }

    #[test]
    fn a_takeover_from_an_event_already_due_never_reruns_the_lost_nodes_past() {
        // With several scenarios the takeover point is the slowest one's: for a faster
        // one it lies in the past. Events due before the split arrived stay lost
        // (the dying node may have run them); those still ahead run.
        for workers in [1, 2] {
            takeover(
                50.0,
                workers,
                Duration::from_secs(4),
                Duration::from_secs(6),
                10,
            );
        }
    }

    #[test]
    fn a_worker_behind_schedule_keeps_its_place_when_the_split_changes() {
        let schedule = ArrivalSchedule::constant(100.0, Duration::from_secs(10)).unwrap();
        let after = after_loss(2, 500);
        let mut d = EventDealer::new(0, 0, 2, schedule.total_arrivals());
        let first = d.next_mine(&three_nodes()).unwrap();
        d.take(first);
        let pending = d.next_mine(&three_nodes()).unwrap();
        // The change is seen 3 s late, after `pending` was due: it is not skipped.
        d.split_changed(&schedule, Duration::from_secs(3));
        assert_eq!(d.next_mine(&after), Some(pending));
    }

    #[test]
    fn vu_slots_taken_over_are_appended_once_and_never_handed_out_twice() {
        let limit = 30;
        let mut slots = VuSlots::default();
        let base = three_nodes();
        slots.extend(&base, 0, limit, 0);
        let mut claimed: Vec<u64> = (0..4).map(|_| fresh(slots.claim())).collect();
        // A second call for the same generation changes nothing.
        slots.extend(&base, 0, limit, 0);
        let mut a = after_loss(2, 0);
        slots.extend(&a, 0, limit, 1);
        a.reassign(Reassignment::new(1, 0, &[(0, 1)]).unwrap())
            .unwrap();
        slots.extend(&a, 0, limit, 2);
        while let Some(c) = slots.claim() {
            claimed.push(fresh(Some(c)));
        }
        let distinct: BTreeSet<u64> = claimed.iter().copied().collect();
        assert_eq!(distinct.len(), claimed.len(), "{claimed:?}");
        assert_eq!(distinct, (0..limit).collect::<BTreeSet<u64>>());
        // The first claims keep the base slots, in order.
        assert_eq!(&claimed[..4], &[0, 3, 6, 9]);
    }

    fn fresh(c: Option<Claim>) -> u64 {
        match c {
            Some(Claim::Fresh(g)) => g,
            other => panic!("expected a fresh slot, got {other:?}"),
        }
    }

    #[test]
    fn a_retired_vus_slot_is_claimed_again_before_a_fresh_one_and_goes_on_from_its_place() {
        let mut slots = VuSlots::default();
        slots.extend(&three_nodes(), 0, 9, 0);
        assert_eq!(fresh(slots.claim()), 0);
        assert_eq!(fresh(slots.claim()), 3);
        slots.parked.push(Parked {
            global_id: 100,
            iteration: 7,
            rng: crate::plan::data::vu_rng(1, 100),
        });
        match slots.claim() {
            Some(Claim::Parked(p)) => assert_eq!((p.global_id, p.iteration), (100, 7)),
            other => panic!("expected the parked slot, got {other:?}"),
        }
        assert_eq!(fresh(slots.claim()), 6);
        // The node's three slots are all in use: max_vus holds.
        assert!(slots.claim().is_none());
    }

    #[test]
    fn only_vus_idle_too_long_at_the_front_of_the_pool_retire_and_the_last_one_stays() {
        let now = Instant::now();
        let idle: IdlePool = Rc::new(RefCell::new(VecDeque::new()));
        let ago = |s: u64| {
            let m = Rc::new(Mailbox::default());
            m.idle_since.set(Some(now - Duration::from_secs(s)));
            m
        };
        let (a, b, c, d) = (ago(30), ago(20), ago(1), ago(25));
        for m in [&a, &b, &c, &d] {
            idle.borrow_mut().push_back(m.clone());
        }
        // d idles at the back, behind a recently used VU: it is not looked at yet.
        assert_eq!(retire_idle(&idle, now), 2);
        assert!(a.retired.get() && a.closed.get() && b.retired.get());
        assert!(!c.retired.get() && !d.retired.get());
        assert_eq!(idle.borrow().len(), 2);
        // Alone in the pool, even a long-idle VU stays for the next event.
        let idle: IdlePool = Rc::new(RefCell::new(VecDeque::from([ago(60)])));
        assert_eq!(retire_idle(&idle, now), 0);
    }
}
