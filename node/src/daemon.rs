//! The long-running node (`stampede node`) and the CLI commands that talk to one
//! (`peers`, `status`, `stop`) or prepare one (`keygen`).
//!
//! This module wires settings, the mesh, the control endpoint and the HTTP status
//! server together and owns the node's runtime; it must not implement any of them.

use std::sync::Arc;
use std::time::Duration;

use stampede_protocol::mesh::PROTOCOL_VERSION;
use tokio::net::TcpListener;

use crate::cli::{
    KeygenArgs, NodeArgs, NodeClientArgs, PeersArgs, ReportArgs, StatusArgs, StopArgs,
};
use crate::exit::{Failure, Outcome};
use crate::mesh::discovery::{parse_bootstrap, parse_listen};
use crate::mesh::membership::MemberRow;
use crate::mesh::{self, key, MeshConfig, MeshTiming};
use crate::serve::control::{self, ControlInfo, ControlRequest, ControlState};
use crate::settings::{Settings, DEFAULT_HTTP};

/// Hidden: advertise another protocol version (for testing incompatibility only).
pub const TEST_PROTOCOL_VERSION_ENV: &str = "STAMPEDE_TEST_PROTOCOL_VERSION";

/// Worker threads of the node's runtime. The swarm and the small servers need little;
/// load generation runs on its own threads.
const NODE_RUNTIME_THREADS: usize = 2;

pub fn node(args: NodeArgs) -> Result<Outcome, Failure> {
    let settings = Settings::load(&args).map_err(Failure::usage)?;
    init_logging(settings.log_json);
    let psk = match (&settings.key_file, settings.insecure_no_key) {
        (Some(path), _) => Some(key::read_key_file(path).map_err(Failure::usage)?),
        (None, true) => None,
        (None, false) => {
            return Err(Failure::usage(
                "no mesh key: pass --key-file FILE (create one with `stampede keygen --out FILE`), or --insecure-no-key on a trusted local machine",
            ))
        }
    };
    one_malloc_arena();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(NODE_RUNTIME_THREADS)
        .thread_name("stampede-node")
        .enable_all()
        .build()
        .map_err(|e| Failure::run(format!("cannot start the node runtime: {e}")))?;
    runtime
        .block_on(run_node(settings, psk))
        .map_err(Failure::run)?;
    Ok(Outcome::Success)
}

/// A node runs for days, and glibc's malloc gives each thread that allocates its own
/// arena: a snapshot decoded on one runtime thread and freed on another leaves free
/// chunks scattered over several arenas that none of them gives back, so RSS wandered
/// up by megabytes in a soak while the heap in use did not (docs/benchmarks.md, soak:
/// flat with one arena, ±1.5 MB and rising with the default). Per-thread caches still
/// serve small allocations without the arena lock. `MALLOC_ARENA_MAX` in the
/// environment wins, for experiments.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before the runtime's
        // threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// glibc's malloc returns memory to the system only from the top of the heap: after a
/// stall (more VUs, bigger buffers for a while) the freed pages below a chunk still in
/// use stay resident, and a soak's RSS rose in steps at each new worst moment although
/// the heap in use went back down (docs/benchmarks.md, soak). `malloc_trim(0)` releases
/// every whole free page, wherever it lies. Every 10 s: a run's per-second churn
/// (snapshots encoded, merged and sent) leaves about 1 MB a minute of freed pages that
/// glibc keeps, and a trim once a minute showed as a ±0.7 MB sawtooth in a soak's RSS
/// samples although the heap in use did not grow (heaptrack, docs/benchmarks.md). A
/// trim walks the free lists of a heap of a few MB: well under a millisecond, and one
/// wake-up in ten seconds for an idle node.
async fn trim_heap_often() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // SAFETY: malloc_trim takes the arena's lock itself; it frees nothing in use.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STAMPEDE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            EnvFilter::new("info,libp2p_gossipsub=warn,libp2p_mdns=warn,libp2p_swarm=warn")
        });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

fn test_protocol_version() -> u32 {
    std::env::var(TEST_PROTOCOL_VERSION_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(PROTOCOL_VERSION)
}

async fn run_node(
    settings: Settings,
    psk: Option<libp2p::pnet::PreSharedKey>,
) -> Result<(), String> {
    let data_dir = settings.data_dir();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    refuse_second_node(&data_dir)?;
    tokio::spawn(trim_heap_often());
    let keypair = key::load_or_create_identity(&data_dir)?;
    let fingerprint = psk.as_ref().map(key::fingerprint);
    match &fingerprint {
        Some(f) => tracing::info!(key_fingerprint = %f, "mesh key loaded"),
        None => tracing::warn!("running WITHOUT a mesh key (--insecure-no-key): any host that can reach the mesh port can join"),
    }
    let mut bootstrap = Vec::new();
    for b in &settings.bootstrap {
        bootstrap.push(parse_bootstrap(b)?);
    }
    let mut listen = Vec::new();
    for l in &settings.listen {
        listen.push(parse_listen(l)?);
    }
    // Exactly what the operator listed: a long-running node reachable by every key
    // holder sends load to its own loopback only when told to (`--allow-target loopback`).
    let allow_targets = settings.allow_target.clone();
    let capacity = settings
        .capacity
        .unwrap_or_else(|| crate::engine::cpu::cores() as u32);
    let run_store = Arc::new(crate::run::RunStore::with_results(
        crate::reports::results::Results::new(&data_dir),
    ));
    let cfg = MeshConfig {
        keypair,
        psk,
        name: settings.node_name(),
        labels: settings.label_map()?,
        allow_targets,
        capacity,
        listen,
        bootstrap,
        mdns: settings.mdns,
        protocol_version: test_protocol_version(),
        timing: MeshTiming {
            announce_interval: Settings::ms(settings.announce_interval_ms),
            lost_after: Settings::ms(settings.lost_after_ms),
            ping_interval: Settings::ms(settings.ping_interval_ms),
            ping_timeout: Settings::ms(settings.ping_timeout_ms),
            gossip_heartbeat: Settings::ms(settings.gossip_heartbeat_ms),
            bootstrap_retry: Settings::ms(settings.bootstrap_retry_ms),
            mdns_query_interval: Settings::ms(settings.mdns_query_interval_ms),
            neighbours: settings.neighbours,
            max_connections: settings.max_connections,
        },
        run_responder: {
            let store = run_store.clone();
            crate::mesh::RunResponder(Some(Arc::new(move |req| store.respond(req))))
        },
        results: Some(crate::reports::results::Results::new(&data_dir)),
    };
    let name = cfg.name.clone();
    let labels = cfg.labels.clone();
    let run_allow = cfg.allow_targets.clone();
    let live = crate::reports::live::LiveRuns::new();
    let handle = mesh::start(cfg).await?;
    let coordinator = crate::run::spawn(
        crate::run::NodeIdentity {
            id: handle.peer_id.to_string(),
            name: name.clone(),
            labels,
            allow_targets: run_allow,
            workers: capacity as usize,
            data_dir: data_dir.clone(),
            graceful_stop: Duration::from_secs(30),
        },
        handle.commands(),
        handle.subscribe(),
        handle.view.clone(),
        run_store,
        live.clone(),
    );

    let http_addr = if settings.http.is_empty() {
        None
    } else {
        let listener = match TcpListener::bind(&settings.http).await {
            Ok(l) => l,
            // The default port may be taken by another node on this machine.
            Err(e) if settings.http == DEFAULT_HTTP => {
                tracing::warn!(addr = %settings.http, error = %e, "default HTTP port unavailable; using a free port");
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| format!("cannot bind the HTTP status server: {e}"))?
            }
            Err(e) => return Err(format!("cannot bind --http {}: {e}", settings.http)),
        };
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tokio::spawn(crate::serve::status_http::serve(
            listener,
            handle.view.clone(),
            live.clone(),
        ));
        Some(addr.to_string())
    };

    let control_listener = TcpListener::bind(&settings.control)
        .await
        .map_err(|e| format!("cannot bind the control endpoint {}: {e}", settings.control))?;
    let control_addr = control_listener.local_addr().map_err(|e| e.to_string())?;
    if !control_addr.ip().is_loopback() {
        tracing::warn!(addr = %control_addr, "the control endpoint is reachable from the network; only the token protects it");
    }
    let token = control::new_token();
    let info = ControlInfo {
        addr: control_addr.to_string(),
        token: token.clone(),
        pid: std::process::id(),
        peer_id: handle.peer_id.to_string(),
        listen_addrs: handle
            .listen_addrs
            .iter()
            .map(|a| format!("{a}/p2p/{}", handle.peer_id))
            .collect(),
        http: http_addr.clone(),
        key_fingerprint: fingerprint.clone(),
    };
    info.write(&data_dir)?;
    tokio::spawn(control::serve(
        control_listener,
        ControlState {
            token,
            view: handle.view.clone(),
            commands: handle.commands(),
            coordinator,
            results: crate::reports::results::Results::new(&data_dir),
        },
    ));
    tracing::info!(
        peer_id = %handle.peer_id,
        name = %name,
        key_fingerprint = fingerprint.as_deref().unwrap_or("none (insecure)"),
        listen = ?info.listen_addrs,
        control = %control_addr,
        http = http_addr.as_deref().unwrap_or("off"),
        data_dir = %data_dir.display(),
        "node started"
    );

    wait_for_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    let _ = std::fs::remove_file(ControlInfo::path(&data_dir));
    Ok(())
}

/// Two nodes sharing a data dir would share an identity; refuse the second.
fn refuse_second_node(data_dir: &std::path::Path) -> Result<(), String> {
    let Ok(info) = ControlInfo::read(data_dir) else {
        return Ok(());
    };
    let Ok(addr) = info.addr.parse::<std::net::SocketAddr>() else {
        return Ok(());
    };
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
        return Err(format!(
            "a node (pid {}) already runs with data dir {}",
            info.pid,
            data_dir.display()
        ));
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Writes to stdout; a closed pipe (`stampede peers | head`) is not an error.
fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|_| o.flush());
}

fn call(client: &NodeClientArgs, req: ControlRequest) -> Result<serde_json::Value, Failure> {
    let target = control::find_node(client.node.as_deref(), client.data_dir.as_deref())
        .map_err(Failure::run)?;
    control::call(&target, req).map_err(Failure::run)
}

pub fn peers(args: PeersArgs) -> Result<Outcome, Failure> {
    let data = call(&args.node_client, ControlRequest::Peers)?;
    if args.json {
        let json = serde_json::to_string_pretty(&data).map_err(|e| Failure::run(e.to_string()))?;
        out(&format!("{json}\n"));
        return Ok(Outcome::Success);
    }
    let rows: Vec<MemberRow> = serde_json::from_value(data)
        .map_err(|e| Failure::run(format!("the node sent an unreadable member list: {e}")))?;
    out(&peers_table(&rows));
    Ok(Outcome::Success)
}

/// The `stampede peers` table.
pub fn peers_table(rows: &[MemberRow]) -> String {
    let header = ["NAME", "ID", "STATE", "VERSION", "LABELS", "TARGETS"];
    let mut lines: Vec<[String; 6]> = vec![header.map(String::from)];
    for r in rows {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut version = r.version.clone();
        if let Some(pv) = r.protocol_version {
            version.push_str(&format!(" (p{pv})"));
        }
        lines.push([
            if r.is_self {
                format!("{} *", r.name)
            } else {
                r.name.clone()
            },
            r.id.clone(),
            r.state.as_str().to_string(),
            version,
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            if r.allow_targets.is_empty() {
                "-".into()
            } else {
                r.allow_targets.join(",")
            },
        ]);
    }
    let mut widths = [0usize; 6];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let alive = rows
        .iter()
        .filter(|r| r.state == mesh::membership::MemberState::Alive)
        .count();
    out.push_str(&format!(
        "{} member(s), {alive} alive; * = this node\n",
        rows.len()
    ));
    out
}

pub fn status(args: StatusArgs) -> Result<Outcome, Failure> {
    let data = call(&args.node_client, ControlRequest::Status)?;
    let runs = data
        .get("runs")
        .and_then(|r| r.as_array())
        .cloned()
        .unwrap_or_default();
    if args.json {
        for r in &runs {
            out(&format!("{r}\n"));
        }
    } else if runs.is_empty() {
        out("no runs yet\n");
    } else {
        let mut t = format!(
            "{:<18} {:<16} {:<10} {:>8}  {:<10} {:<24} {}\n",
            "RUN", "PLAN", "PHASE", "ELAPSED", "LEADER", "MEMBERS", "LOST"
        );
        for r in &runs {
            let list = |k: &str| {
                r[k].as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            };
            let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
            t.push_str(&format!(
                "{:<18} {:<16} {:<10} {:>7.0}s  {:<10} {:<24} {}\n",
                s("run_id"),
                s("plan"),
                s("phase"),
                r["elapsed_s"].as_f64().unwrap_or(0.0),
                s("leader_name"),
                list("members"),
                list("lost")
            ));
        }
        out(&t);
    }
    Ok(Outcome::Success)
}

pub fn stop(args: StopArgs) -> Result<Outcome, Failure> {
    let data = call(
        &args.node_client,
        ControlRequest::Stop {
            run_id: args.run_id.clone(),
        },
    )?;
    let text = data
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| data.to_string());
    out(&format!("{text}\n"));
    Ok(Outcome::Success)
}

pub fn keygen(args: KeygenArgs) -> Result<Outcome, Failure> {
    let text = key::generate_key_text();
    let psk = key::parse_key(&text, "new key").map_err(Failure::run)?;
    match &args.out {
        Some(path) => {
            if path.exists() {
                return Err(Failure::usage(format!(
                    "{} already exists; refusing to overwrite a mesh key",
                    path.display()
                )));
            }
            key::write_private(path, text.as_bytes())
                .map_err(|e| Failure::run(format!("cannot write {}: {e}", path.display())))?;
            let note = format!(
                "wrote mesh key {} (fingerprint {}); copy it to every node, keep it secret\n",
                path.display(),
                key::fingerprint(&psk)
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
        }
        None => out(&text),
    }
    Ok(Outcome::Success)
}

// ---------------------------------------------------------------- `stampede report`

/// `stampede report RUN_ID`: the data dir first (no node needs to run for a run saved
/// there), then the node, which asks the mesh; the summary is printed as at a run's end
/// and the `--out` files are written.
pub fn report(args: ReportArgs) -> Result<Outcome, Failure> {
    let outs = crate::commands::parse_outputs(&args.outputs)?;
    crate::reports::results::check_run_id(&args.run_id).map_err(Failure::usage)?;
    if args.node_client.node.is_none() {
        let dir = control::client_data_dir(args.node_client.data_dir.as_deref());
        let saved = crate::reports::results::Results::new(&dir)
            .load_summary(&args.run_id)
            .map_err(Failure::run)?;
        if let Some(summary) = saved {
            crate::commands::print_and_write(&summary, &outs)?;
            return Ok(Outcome::Success);
        }
    }
    let data = call(
        &args.node_client,
        ControlRequest::Report {
            run_id: args.run_id.clone(),
        },
    )?;
    if data["found"] != true {
        let asked = data["asked"].as_u64().unwrap_or(0);
        return Err(Failure::NotFound(format!(
            "no node has run {}: it is not in this node's data dir, and none of the {asked} alive member(s) asked has it",
            args.run_id
        )));
    }
    let summary: crate::reports::summary::Summary = serde_json::from_value(data["summary"].clone())
        .map_err(|e| Failure::run(format!("the node sent an unreadable summary: {e}")))?;
    if summary.run_id != args.run_id {
        return Err(Failure::run(format!(
            "the node answered with run {} for run {}",
            summary.run_id, args.run_id
        )));
    }
    if let Some(from) = data["from"].as_str() {
        eprintln!("run {} found on {from}", args.run_id);
    }
    crate::commands::print_and_write(&summary, &outs)?;
    Ok(Outcome::Success)
}
