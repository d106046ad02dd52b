//! stampede-target as a library: a small, fast demo shop over HTTP/1.1 and h2c that
//! stampede's examples, integration tests and benchmarks aim at. Tests in any crate can
//! start one in-process ([`start`] on the caller's runtime, or [`spawn`] on its own
//! threads), read exact counts ([`TargetHandle::requests`], [`TargetHandle::stats`]) and
//! turn its knobs while it runs. The binary `stampede-target` is thin wiring around this.
//!
//! The HTTP contract (SPEC §10):
//! - `POST /login` `{"user","password"}` → 200 `{"token"}`; 401 bad user/password; 400 bad
//!   JSON. A new login of an account ends its earlier session: that token then gets 409.
//! - `GET /products?q=` (≤ 20 matches) and `GET /products/{id}` (1..=1000, else 404).
//! - With `Authorization: Bearer TOKEN`: `POST /cart` `{"product","qty"}` (qty defaults to
//!   1), `POST /checkout` (200 and empties the cart; 400 `cart empty`), `GET /account`.
//!   Missing or unknown token → 401, ended session → 409.
//! - `GET /` and its files: a web storefront over this API (`storefront`); counted like
//!   the admin endpoints below.
//! - `GET /_stats`, `POST /_stats/reset`, `GET|POST /_control` (admin: never delayed,
//!   failed or queued, and not counted in `requests`).
//!
//! From a test in another crate:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use stampede_tools::{start, TargetConfig};
//! let target = start(TargetConfig::default()).await?; // 127.0.0.1, free port
//! let base_url = target.url();
//! // ... drive load at base_url ...
//! target.set_stall(std::time::Duration::from_millis(500)); // stall it mid-run
//! let served = target.requests();
//! target.stop().await;
//! # let _ = (base_url, served); Ok(()) }
//! ```
//!
//! This module owns start-up, the accept loop and shutdown; it must not hold shop rules.

pub mod latency;
pub mod sim;

mod grpc;
mod knobs;
mod live;
mod service;
mod shop;
mod stats;
mod storefront;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use knobs::{ControlError, ControlState, ControlUpdate, MAX_STALL};
pub use latency::Latency;
pub use service::MAX_BODY;
pub use shop::{PRODUCTS, SEARCH_LIMIT};
pub use stats::{StatsSnapshot, PER_SECOND_WINDOW};

use service::Shared;

/// Concurrent h2 streams allowed per connection.
pub const H2_MAX_STREAMS: u32 = 1024;

/// Default number of accounts (`user1` … `user10000`).
pub const DEFAULT_ACCOUNTS: u64 = 10_000;

/// How a target starts; every knob except `listen`, `accounts` and `threads` can be changed
/// later through [`TargetHandle`] or `POST /_control`.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetConfig {
    /// Where to listen; port 0 picks a free port (read it from [`TargetHandle::addr`]).
    pub listen: SocketAddr,
    /// Accounts `user1..=userN` with passwords `pass1..=passN`.
    pub accounts: u64,
    /// Delay drawn for every load request.
    pub latency: Latency,
    /// Fraction of load requests answered 500, 0.0 ..= 1.0.
    pub error_rate: f64,
    /// At most this many load requests in service at once; the rest queue in arrival order.
    pub concurrency_limit: Option<usize>,
    /// Extra delay for every load request while non-zero.
    pub stall: Duration,
    /// Runtime worker threads, used by [`spawn`] and the binary (not by [`start`], which
    /// runs on the caller's runtime).
    pub threads: usize,
    /// Extra delay for load requests from these source networks: a region far from the
    /// service, simulated at the service where the kernel has no netem.
    pub delay_from: Vec<SourceDelay>,
}

/// `CIDR=DURATION`: load requests whose connection comes from inside `CIDR` wait
/// `DURATION` more before they are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceDelay {
    pub net: std::net::IpAddr,
    pub prefix: u8,
    pub delay: Duration,
}

impl SourceDelay {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for SourceDelay {
    type Err = String;
    fn from_str(s: &str) -> Result<SourceDelay, String> {
        let (net, delay) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected CIDR=DURATION, e.g. 10.77.0.3/32=150ms"))?;
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (net, None),
        };
        let net: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length {p:?}"))?,
        };
        let delay = latency::parse_duration(delay).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(SourceDelay { net, prefix, delay })
    }
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            accounts: DEFAULT_ACCOUNTS,
            latency: Latency::None,
            error_rate: 0.0,
            concurrency_limit: None,
            stall: Duration::ZERO,
            threads: 1,
            delay_from: Vec::new(),
        }
    }
}

/// A running target. Dropping it stops the target (without waiting); [`TargetHandle::stop`]
/// or [`TargetHandle::shutdown`] also wait until its sockets are closed.
pub struct TargetHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn shared_for(cfg: &TargetConfig) -> Result<Arc<Shared>, ControlError> {
    if cfg.accounts == 0 {
        return Err(ControlError("accounts must be at least 1".into()));
    }
    let shared = Shared {
        shop: shop::Shop::new(cfg.accounts),
        stats: stats::Stats::new(),
        knobs: knobs::Knobs::new(),
        delay_from: cfg.delay_from.clone(),
    };
    shared.knobs.set_latency(cfg.latency);
    shared.knobs.set_error_rate(cfg.error_rate)?;
    shared.knobs.set_concurrency_limit(cfg.concurrency_limit);
    shared.knobs.set_stall(cfg.stall);
    Ok(Arc::new(shared))
}

fn invalid(e: ControlError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

/// Binds `cfg.listen` and serves on the current tokio runtime.
pub async fn start(cfg: TargetConfig) -> io::Result<TargetHandle> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("stampede-target: binding {}: {e}", cfg.listen),
        )
    })?;
    serve(listener, cfg).await
}

/// Serves on an already bound listener on the current tokio runtime (`cfg.listen` unused).
pub async fn serve(listener: TcpListener, cfg: TargetConfig) -> io::Result<TargetHandle> {
    let shared = shared_for(&cfg).map_err(invalid)?;
    let addr = listener.local_addr()?;
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, shared.clone(), rx));
    Ok(TargetHandle {
        addr,
        shared,
        shutdown: tx,
        task: Some(task),
        thread: None,
    })
}

/// Starts a target on its own thread with its own runtime of `cfg.threads` workers.
/// Usable from plain `#[test]`s and from async code alike; binding errors are returned here.
pub fn spawn(cfg: TargetConfig) -> io::Result<TargetHandle> {
    let shared = shared_for(&cfg).map_err(invalid)?;
    let std_listener = std::net::TcpListener::bind(cfg.listen).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("stampede-target: binding {}: {e}", cfg.listen),
        )
    })?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .thread_name("stampede-target")
        .enable_all()
        .build()?;
    let (tx, rx) = watch::channel(false);
    let task_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("stampede-target-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(listener) => accept_loop(listener, task_shared, rx).await,
                    Err(e) => tracing::error!("stampede-target: listener: {e}"),
                }
            });
        })?;
    Ok(TargetHandle {
        addr,
        shared,
        shutdown: tx,
        task: None,
        thread: Some(thread),
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Benchmarks may pipeline HTTP/1.1 and run many VUs over one h2 connection.
    builder.http1().pipeline_flush(true);
    builder.http2().max_concurrent_streams(H2_MAX_STREAMS);
    let builder = Arc::new(builder);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let delay = shared
                        .delay_from
                        .iter()
                        .find(|d| d.contains(peer.ip()))
                        .map(|d| d.delay)
                        .unwrap_or_default();
                    connections.spawn(serve_connection(stream, shared.clone(), builder.clone(), delay));
                }
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!("stampede-target: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    source_delay: Duration,
) {
    shared.stats.connection_opened();
    let stats_shared = shared.clone();
    let _closed = service::OnDrop(move || stats_shared.stats.connection_closed());
    let svc = service_fn(move |req| service::handle(shared.clone(), req, source_delay));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!("stampede-target: connection: {e}");
    }
}

impl TargetHandle {
    /// The address the target listens on (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, ready to be a plan's `base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Load requests received so far (what `/_stats` reports as `requests`).
    pub fn requests(&self) -> u64 {
        self.shared.stats.requests()
    }

    /// Everything `GET /_stats` reports.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Zeroes the counters, like `POST /_stats/reset`.
    pub fn reset_stats(&self) {
        self.shared.stats.reset()
    }

    /// Adds `stall` to every load request from now on; `Duration::ZERO` lifts it and
    /// releases requests already waiting on it.
    pub fn set_stall(&self, stall: Duration) {
        self.shared.knobs.set_stall(stall)
    }

    pub fn set_latency(&self, latency: Latency) {
        self.shared.knobs.set_latency(latency)
    }

    /// Fails (500) this fraction of load requests; rejects values outside 0.0 ..= 1.0.
    pub fn set_error_rate(&self, rate: f64) -> Result<(), ControlError> {
        self.shared.knobs.set_error_rate(rate)
    }

    /// `None` (or `Some(0)`) removes the limit.
    pub fn set_concurrency_limit(&self, limit: Option<usize>) {
        self.shared.knobs.set_concurrency_limit(limit)
    }

    /// Applies a `/_control` update in-process.
    pub fn control(&self, update: &ControlUpdate) -> Result<ControlState, ControlError> {
        self.shared.knobs.apply(update)
    }

    /// The current knob values.
    pub fn control_state(&self) -> ControlState {
        self.shared.knobs.state()
    }

    /// Stops accepting, closes every connection and waits for that to finish.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Blocking form of [`TargetHandle::stop`]. For a target from [`start`], this only
    /// signals (the caller's runtime finishes the work); for one from [`spawn`] it waits
    /// until the target's thread has ended and its sockets are closed.
    pub fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

#[cfg(test)]
mod source_delay_tests {
    use super::SourceDelay;
    use std::time::Duration;

    #[test]
    fn parses_and_matches() {
        let d: SourceDelay = "10.77.0.0/24=150ms".parse().unwrap();
        assert_eq!(d.delay, Duration::from_millis(150));
        assert!(d.contains("10.77.0.3".parse().unwrap()));
        assert!(!d.contains("10.77.1.3".parse().unwrap()));
        assert!(!d.contains("::1".parse().unwrap()));
        let one: SourceDelay = "::1=1s".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!("10.77.0.0/33=1s".parse::<SourceDelay>().is_err());
        assert!("nothing".parse::<SourceDelay>().is_err());
        assert!("10.0.0.1=soon".parse::<SourceDelay>().is_err());
    }
}
