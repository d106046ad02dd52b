//! `stampede-target`: command-line wiring for the demo shop in `stampede_tools`. Parses
//! flags, builds the runtime, prints the listening address, waits for Ctrl-C or SIGTERM.
//! All behaviour lives in the library.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use stampede_tools::latency::parse_duration;
use stampede_tools::{Latency, TargetConfig, DEFAULT_ACCOUNTS};

/// A realistic demo shop for stampede to load: login, product search, cart, checkout.
///
/// Endpoints: POST /login {"user","password"} -> {"token"}; GET /products?q=;
/// GET /products/{id} (1..1000); with "Authorization: Bearer TOKEN": POST /cart
/// {"product","qty"}, POST /checkout, GET /account. Accounts are user1..userN with
/// passwords pass1..passN; a new login ends the account's earlier session (its token then
/// gets 409).
///
/// Admin (never delayed, failed or queued, not counted as load): GET /_stats (request
/// counts, per endpoint, per status, per second), POST /_stats/reset, GET /_control, and
/// POST /_control {"latency": "5ms", "error_rate": 0.01, "stall_ms": 500,
/// "concurrency_limit": 8} to change knobs while running (absent fields keep their value;
/// 0 removes a stall or limit).
#[derive(Parser, Debug)]
#[command(name = "stampede-target", version)]
struct Cli {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: String,

    /// Number of accounts (user1..userN).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ACCOUNTS,
          value_parser = clap::value_parser!(u64).range(1..))]
    accounts: u64,

    /// Delay added to every request: "5ms" (fixed), "uniform:5ms..20ms",
    /// "normal:20ms,5ms" (mean,stddev), "exp:10ms" (mean), or "0". Units: us, ms, s, m.
    #[arg(long, value_name = "SPEC", default_value = "0", value_parser = parse_latency)]
    latency: Latency,

    /// Fraction of requests answered 500, 0.0..=1.0 (e.g. 0.01 for 1%).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0, value_parser = parse_rate)]
    error_rate: f64,

    /// At most N requests in service at once; the rest queue (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    concurrency_limit: usize,

    /// Extra delay for every request from the start (normally set later via /_control).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration)]
    stall: Duration,

    /// Extra delay for load requests from a source network, e.g. 10.77.0.3/32=150ms
    /// (a far-away region, where the kernel has no netem). Repeatable.
    #[arg(long = "delay-from", value_name = "CIDR=DURATION", value_parser = parse_source_delay)]
    delay_from: Vec<stampede_tools::SourceDelay>,

    /// Runtime worker threads.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: u64,
}

fn parse_source_delay(s: &str) -> Result<stampede_tools::SourceDelay, String> {
    s.parse()
}

fn parse_latency(s: &str) -> Result<Latency, String> {
    s.parse::<Latency>().map_err(|e| e.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{s} is outside 0.0..=1.0"))
    }
}

fn resolve(listen: &str) -> Result<SocketAddr, String> {
    listen
        .to_socket_addrs()
        .map_err(|e| format!("--listen {listen:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen {listen:?}: resolves to no address"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let listen = match resolve(&cli.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stampede-target: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = usize::try_from(cli.threads).unwrap_or(1);
    let cfg = TargetConfig {
        listen,
        accounts: cli.accounts,
        latency: cli.latency,
        error_rate: cli.error_rate,
        concurrency_limit: (cli.concurrency_limit > 0).then_some(cli.concurrency_limit),
        stall: cli.stall,
        threads,
        delay_from: cli.delay_from,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stampede-target: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let target = match stampede_tools::start(cfg).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        println!("stampede-target listening on {}", target.url());
        let _ = std::io::stdout().flush();
        wait_for_signal().await;
        target.stop().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
