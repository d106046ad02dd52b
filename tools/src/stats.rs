//! Request accounting for stampede-target: what `/_stats` and [`crate::TargetHandle::stats`]
//! report. Counters are sharded per thread into cache-line-padded atomics so counting never
//! takes a lock and threads do not fight over one cache line; a read sums the shards.
//! It must not decide anything about requests (routing and knobs live elsewhere).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

const SHARDS: usize = 16;
/// Slots in each per-second ring; more than [`PER_SECOND_WINDOW`] so the oldest reported
/// second is never being overwritten by the current one.
const RING: usize = 128;
/// How many recent seconds `per_second` covers.
pub const PER_SECOND_WINDOW: u64 = 120;

/// The load-bearing routes, in the order they appear in the stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Login,
    Search,
    Product,
    Cart,
    Checkout,
    Account,
    /// gRPC `shop.Inventory/GetStock` (unary).
    GrpcGetStock,
    /// gRPC `shop.Inventory/WatchStock` (server-streaming).
    GrpcWatchStock,
    /// `GET /ws/orders`: WebSocket upgrades (its messages are counted apart).
    OrdersWs,
    /// gRPC `shop.Inventory/TotalStock` (client-streaming).
    GrpcTotalStock,
    /// gRPC `shop.Inventory/StockFeed` (bidirectional streaming).
    GrpcStockFeed,
    /// Anything that matches no route (404) or a route with the wrong method (405).
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 12] = [
        Endpoint::Login,
        Endpoint::Search,
        Endpoint::Product,
        Endpoint::Cart,
        Endpoint::Checkout,
        Endpoint::Account,
        Endpoint::GrpcGetStock,
        Endpoint::GrpcWatchStock,
        Endpoint::OrdersWs,
        Endpoint::GrpcTotalStock,
        Endpoint::GrpcStockFeed,
        Endpoint::Other,
    ];

    /// The key used in the `endpoints` map of `/_stats`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Login => "POST /login",
            Endpoint::Search => "GET /products",
            Endpoint::Product => "GET /products/{id}",
            Endpoint::Cart => "POST /cart",
            Endpoint::Checkout => "POST /checkout",
            Endpoint::Account => "GET /account",
            Endpoint::GrpcGetStock => "gRPC shop.Inventory/GetStock",
            Endpoint::GrpcWatchStock => "gRPC shop.Inventory/WatchStock",
            Endpoint::OrdersWs => "GET /ws/orders",
            Endpoint::GrpcTotalStock => "gRPC shop.Inventory/TotalStock",
            Endpoint::GrpcStockFeed => "gRPC shop.Inventory/StockFeed",
            Endpoint::Other => "other",
        }
    }
}

/// Status codes the target can answer with get their own counter; the rest share one.
const STATUS_CODES: [u16; 11] = [101, 200, 400, 401, 404, 405, 409, 413, 500, 503, 0];

fn status_slot(code: u16) -> usize {
    STATUS_CODES
        .iter()
        .position(|&c| c == code)
        .unwrap_or(STATUS_CODES.len() - 1)
}

#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    admin: AtomicU64,
    endpoints: [AtomicU64; Endpoint::ALL.len()],
    statuses: [AtomicU64; STATUS_CODES.len()],
    /// Each slot packs `(unix_second << 32) | count` so a second boundary is one CAS,
    /// with no window where a count could land on the wrong second.
    ring: [AtomicU64; RING],
}

impl Shard {
    fn new() -> Shard {
        Shard {
            requests: AtomicU64::new(0),
            admin: AtomicU64::new(0),
            endpoints: std::array::from_fn(|_| AtomicU64::new(0)),
            statuses: std::array::from_fn(|_| AtomicU64::new(0)),
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// All counters of one running target.
pub(crate) struct Stats {
    shards: Box<[Shard]>,
    in_service: AtomicU64,
    max_in_service: AtomicU64,
    queued: AtomicU64,
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    /// Wall-clock µs of the first load request since start or the last reset; 0 before.
    first_load_unix_us: AtomicU64,
    ws_received: AtomicU64,
    ws_sent: AtomicU64,
    ws_open: AtomicU64,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn my_shard() -> usize {
    MY_SHARD.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS;
        s.set(v);
        v
    })
}

pub(crate) fn unix_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A point-in-time copy of the counters, as served by `GET /_stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Every request received, the `/_stats` request answering excluded (spec §10): load
    /// requests plus earlier admin requests. In-process snapshots count load requests only.
    pub requests: u64,
    /// Every load request received (any route, any outcome, including 404s and injected
    /// 500s); admin requests (`/_stats`, `/_stats/reset`, `/_control`) are not counted.
    pub load_requests: u64,
    /// Requests received per route, keyed like `"POST /login"`; every key always present.
    pub endpoints: BTreeMap<String, u64>,
    /// Responses sent per status code (`"other"` for codes without their own counter).
    pub statuses: BTreeMap<String, u64>,
    /// `[unix_second, requests]` for the last ~120 seconds, oldest first, gaps filled with
    /// zeros; the last entry is the current, still-growing second.
    pub per_second: Vec<(u64, u64)>,
    /// Requests inside the service right now (past the concurrency limit).
    pub in_service: u64,
    /// Highest `in_service` seen since start or the last reset.
    pub max_in_service: u64,
    /// Requests waiting for the concurrency limit right now.
    pub queued: u64,
    /// TCP connections accepted since start or the last reset.
    pub connections_accepted: u64,
    /// TCP connections open right now.
    pub connections_open: u64,
    /// Admin requests received (not part of `requests`).
    pub admin_requests: u64,
    /// When the first load request since start or the last reset arrived (Unix µs, this
    /// machine's wall clock): a load generator's time to first request, read afterwards
    /// instead of by polling while the generator starts.
    #[serde(default)]
    pub first_load_unix_us: Option<u64>,
    /// WebSocket data messages received and sent (`/ws/orders`), since start or reset.
    #[serde(default)]
    pub ws_messages_received: u64,
    #[serde(default)]
    pub ws_messages_sent: u64,
    /// WebSockets open right now.
    #[serde(default)]
    pub ws_sessions_open: u64,
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            in_service: AtomicU64::new(0),
            max_in_service: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            first_load_unix_us: AtomicU64::new(0),
            ws_received: AtomicU64::new(0),
            ws_sent: AtomicU64::new(0),
            ws_open: AtomicU64::new(0),
        }
    }

    pub(crate) fn ws_received(&self) {
        self.ws_received.fetch_add(1, Relaxed);
    }

    pub(crate) fn ws_sent(&self) {
        self.ws_sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn ws_session_opened(&self) {
        self.ws_open.fetch_add(1, Relaxed);
    }

    pub(crate) fn ws_session_closed(&self) {
        self.ws_open.fetch_sub(1, Relaxed);
    }

    /// Counts a load request at the moment it arrives, before any delay or queueing.
    pub(crate) fn received(&self, endpoint: Endpoint) {
        // One shared load per request; the clock and the exchange only for the first.
        if self.first_load_unix_us.load(Relaxed) == 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(1)
                .max(1);
            let _ = self
                .first_load_unix_us
                .compare_exchange(0, now, Relaxed, Relaxed);
        }
        let shard = &self.shards[my_shard()];
        shard.requests.fetch_add(1, Relaxed);
        shard.endpoints[endpoint as usize].fetch_add(1, Relaxed);
        let sec = unix_second();
        let slot = &shard.ring[(sec % RING as u64) as usize];
        let _ = slot.fetch_update(Relaxed, Relaxed, |packed| {
            Some(if packed >> 32 == sec {
                packed + 1
            } else {
                (sec << 32) | 1
            })
        });
    }

    pub(crate) fn admin(&self) {
        self.shards[my_shard()].admin.fetch_add(1, Relaxed);
    }

    pub(crate) fn responded(&self, status: u16) {
        self.shards[my_shard()].statuses[status_slot(status)].fetch_add(1, Relaxed);
    }

    pub(crate) fn requests(&self) -> u64 {
        self.shards.iter().map(|s| s.requests.load(Relaxed)).sum()
    }

    pub(crate) fn enter_service(&self) {
        let now = self.in_service.fetch_add(1, Relaxed) + 1;
        self.max_in_service.fetch_max(now, Relaxed);
    }

    pub(crate) fn leave_service(&self) {
        self.in_service.fetch_sub(1, Relaxed);
    }

    pub(crate) fn enter_queue(&self) {
        self.queued.fetch_add(1, Relaxed);
    }

    pub(crate) fn leave_queue(&self) {
        self.queued.fetch_sub(1, Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    /// Zeroes the counters; gauges (in service, queued, open connections) keep their value.
    pub(crate) fn reset(&self) {
        for s in self.shards.iter() {
            s.requests.store(0, Relaxed);
            s.admin.store(0, Relaxed);
            s.endpoints.iter().for_each(|c| c.store(0, Relaxed));
            s.statuses.iter().for_each(|c| c.store(0, Relaxed));
            s.ring.iter().for_each(|c| c.store(0, Relaxed));
        }
        self.max_in_service
            .store(self.in_service.load(Relaxed), Relaxed);
        self.connections_accepted.store(0, Relaxed);
        self.first_load_unix_us.store(0, Relaxed);
        self.ws_received.store(0, Relaxed);
        self.ws_sent.store(0, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let sum = |f: &dyn Fn(&Shard) -> u64| self.shards.iter().map(f).sum::<u64>();
        let endpoints = Endpoint::ALL
            .iter()
            .map(|&e| {
                let n = sum(&|s| s.endpoints[e as usize].load(Relaxed));
                (e.name().to_string(), n)
            })
            .collect();
        let statuses = STATUS_CODES
            .iter()
            .enumerate()
            .filter_map(|(i, &code)| {
                let n = sum(&|s| s.statuses[i].load(Relaxed));
                let key = if code == 0 {
                    "other".to_string()
                } else {
                    code.to_string()
                };
                (n > 0).then_some((key, n))
            })
            .collect();
        let load = sum(&|s| s.requests.load(Relaxed));
        StatsSnapshot {
            requests: load,
            load_requests: load,
            endpoints,
            statuses,
            per_second: self.per_second(unix_second()),
            in_service: self.in_service.load(Relaxed),
            max_in_service: self.max_in_service.load(Relaxed),
            queued: self.queued.load(Relaxed),
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            admin_requests: sum(&|s| s.admin.load(Relaxed)),
            first_load_unix_us: match self.first_load_unix_us.load(Relaxed) {
                0 => None,
                us => Some(us),
            },
            ws_messages_received: self.ws_received.load(Relaxed),
            ws_messages_sent: self.ws_sent.load(Relaxed),
            ws_sessions_open: self.ws_open.load(Relaxed),
        }
    }

    fn per_second(&self, now: u64) -> Vec<(u64, u64)> {
        let oldest = now.saturating_sub(PER_SECOND_WINDOW - 1);
        let mut by_second: BTreeMap<u64, u64> = BTreeMap::new();
        for shard in self.shards.iter() {
            for slot in shard.ring.iter() {
                let packed = slot.load(Relaxed);
                let (sec, count) = (packed >> 32, packed & 0xffff_ffff);
                if count > 0 && sec >= oldest && sec <= now {
                    *by_second.entry(sec).or_default() += count;
                }
            }
        }
        let Some((&first, _)) = by_second.iter().next() else {
            return Vec::new();
        };
        (first..=now)
            .map(|sec| (sec, by_second.get(&sec).copied().unwrap_or(0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_across_threads_exactly() {
        let stats = std::sync::Arc::new(Stats::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        stats.received(Endpoint::Search);
                        stats.responded(200);
                    }
                    stats.received(Endpoint::Other);
                    stats.responded(404);
                    stats.responded(418);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = stats.snapshot();
        assert_eq!(snap.requests, 4004);
        assert_eq!(snap.endpoints["GET /products"], 4000);
        assert_eq!(snap.endpoints["other"], 4);
        assert_eq!(snap.endpoints["POST /login"], 0);
        assert_eq!(snap.statuses["200"], 4000);
        assert_eq!(snap.statuses["404"], 4);
        assert_eq!(snap.statuses["other"], 4);
        let total: u64 = snap.per_second.iter().map(|&(_, n)| n).sum();
        assert_eq!(total, 4004);
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!(snap.requests, 0);
        assert!(snap.per_second.is_empty());
    }

    #[test]
    fn the_first_load_request_is_stamped_once_until_a_reset() {
        let stats = Stats::new();
        assert_eq!(stats.snapshot().first_load_unix_us, None);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        stats.received(Endpoint::Search);
        let first = stats.snapshot().first_load_unix_us.expect("stamped");
        assert!(first >= before, "{first} < {before}");
        stats.received(Endpoint::Cart);
        assert_eq!(stats.snapshot().first_load_unix_us, Some(first));
        stats.reset();
        assert_eq!(stats.snapshot().first_load_unix_us, None);
        stats.received(Endpoint::Other);
        assert!(stats.snapshot().first_load_unix_us.unwrap() >= first);
    }

    #[test]
    fn per_second_fills_gaps_and_drops_old_seconds() {
        let stats = Stats::new();
        let now = 1_000_000u64;
        let put = |sec: u64, n: u64| {
            stats.shards[0].ring[(sec % RING as u64) as usize].store((sec << 32) | n, Relaxed)
        };
        put(now - 500, 9); // far outside the window
        put(now - 3, 5);
        put(now - 1, 2);
        assert_eq!(
            stats.per_second(now),
            vec![(now - 3, 5), (now - 2, 0), (now - 1, 2), (now, 0)]
        );
    }
}
