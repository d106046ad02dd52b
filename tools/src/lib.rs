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

mod knobs;
mod service;
mod shop;
mod stats;

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
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, shared.clone(), builder.clone()));
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
) {
    shared.stats.connection_opened();
    let stats_shared = shared.clone();
    let _closed = service::OnDrop(move || stats_shared.stats.connection_closed());
    let svc = service_fn(move |req| service::handle(shared.clone(), req));
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
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
