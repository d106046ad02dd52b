//! A run's timeline at debug level (`STAMPEDE_LOG=info,stampede::run::timeline=debug`):
//! one line per step that decides when the load starts and when the report goes out —
//! the proposal, the bundle, each join, the roster, the clock sync, every `ready`
//! arrival the node learns of, the assignment and its start instant, the engine's
//! start, the `finished` barrier, the re-fetches and the report. Heartbeats and
//! per-second traffic are left out (they are most of the inputs).
//!
//! Must not change anything: it reads inputs, effects and the machine's state only,
//! and costs nothing when the target is off.

use stampede_protocol::machine::events::Barrier;
use stampede_protocol::machine::{Effect, Input, RunMachine};
use stampede_protocol::run::RunMessage;

pub(super) const TARGET: &str = "stampede::run::timeline";

pub(super) fn on() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// What the machine holds before an input, to tell what the input changed.
pub(super) struct Before {
    phase: &'static str,
    ready: usize,
    finished: usize,
    lease: bool,
}

pub(super) fn before(m: &RunMachine) -> Before {
    Before {
        phase: m.phase().name(),
        ready: m.arrived(Barrier::Ready).len(),
        finished: m.arrived(Barrier::Finished).len(),
        lease: m.lease().is_some(),
    }
}

pub(super) fn input(run: &str, input: &Input) {
    let name = match input {
        Input::Message { msg, .. } if matches!(msg.as_ref(), RunMessage::Beat { .. }) => return,
        Input::Message { from, msg } => {
            tracing::debug!(target: TARGET, run, from = %short(from), "in {}", msg.kind());
            return;
        }
        Input::Batch {
            from,
            seq,
            covers,
            published,
        } => {
            if *published {
                tracing::debug!(target: TARGET, run, from = %short(from), seq, covers = covers.len(), "in root merge");
            }
            return;
        }
        Input::Prepared(r) => {
            tracing::debug!(target: TARGET, run, ok = r.is_ok(), "in prepared");
            return;
        }
        Input::ClockSynced { offset_us } => {
            tracing::debug!(target: TARGET, run, offset_us, "in clock synced");
            return;
        }
        Input::EngineStarted { at_wall_us } => {
            tracing::debug!(target: TARGET, run, at_wall_us, "in engine started");
            return;
        }
        Input::EngineFinished { error } => {
            tracing::debug!(target: TARGET, run, error = ?error, "in engine finished");
            return;
        }
        Input::Fetched { node, missing, .. } => {
            tracing::debug!(target: TARGET, run, node = %short(node), missing = missing.len(), "in fetched");
            return;
        }
        Input::OwnFetched { node, outcome } => {
            tracing::debug!(target: TARGET, run, node = %short(node), ?outcome, "in own fetched");
            return;
        }
        Input::PeerGone { peer } => {
            tracing::debug!(target: TARGET, run, peer = %short(peer), "in peer gone");
            return;
        }
        Input::OwnSecond { seq } => {
            tracing::debug!(target: TARGET, run, seq, "in own second");
            return;
        }
        Input::Command(_) => "command",
        Input::Tick | Input::Snapshot { .. } | Input::Claims(_) => return,
    };
    tracing::debug!(target: TARGET, run, "in {name}");
}

pub(super) fn after(run: &str, b: &Before, m: &RunMachine) {
    let now = before(m);
    if now.phase != b.phase {
        tracing::debug!(target: TARGET, run, from = b.phase, to = now.phase, "phase");
    }
    if now.ready != b.ready {
        tracing::debug!(target: TARGET, run, arrived = now.ready, of = m.roster().len(), "ready arrivals");
    }
    if now.finished != b.finished {
        tracing::debug!(target: TARGET, run, arrived = now.finished, of = m.roster().len(), "finished arrivals");
    }
    if now.lease != b.lease {
        tracing::debug!(target: TARGET, run, lease = now.lease, "lease");
    }
}

pub(super) fn effect(run: &str, e: &Effect, now_wall_us: u64) {
    match e {
        Effect::Publish(m) if !matches!(m.as_ref(), RunMessage::Beat { .. }) => {
            if let RunMessage::Assign { term, version, .. } = m.as_ref() {
                let lead_ms = (version.start_unix_us as i64 - now_wall_us as i64) / 1000;
                tracing::debug!(target: TARGET, run, term, seq = version.id.seq, moves = version.moves.len(), start_unix_us = version.start_unix_us, lead_ms, "out publish assign");
            } else {
                tracing::debug!(target: TARGET, run, "out publish {}", m.kind());
            }
        }
        Effect::Send { to, msg } if !matches!(msg.as_ref(), RunMessage::Beat { .. }) => {
            tracing::debug!(target: TARGET, run, to = %short(to), "out send {}", msg.kind());
        }
        Effect::FetchBundle { origin } => {
            tracing::debug!(target: TARGET, run, origin = %short(origin), "out fetch bundle");
        }
        Effect::SyncClock { peer } => {
            tracing::debug!(target: TARGET, run, peer = %short(peer), "out sync clock");
        }
        Effect::StartEngine {
            start_local_wall_us,
            index,
            ..
        } => {
            let lead_ms = (*start_local_wall_us as i64 - now_wall_us as i64) / 1000;
            tracing::debug!(target: TARGET, run, index, start_local_wall_us, lead_ms, "out start engine");
        }
        Effect::Fetch { node, seqs } => {
            tracing::debug!(target: TARGET, run, node = %short(node), seqs = ?seqs, "out fetch seconds");
        }
        Effect::FetchOwn { node, .. } => {
            tracing::debug!(target: TARGET, run, node = %short(node), "out fetch own");
        }
        Effect::Forward { seq, to, covers } => {
            tracing::debug!(target: TARGET, run, seq, to = ?to.as_deref().map(short), covers = covers.len(), "out forward");
        }
        Effect::Report(_) => tracing::debug!(target: TARGET, run, "out report"),
        Effect::Done => tracing::debug!(target: TARGET, run, "out done"),
        Effect::Event { t, event } => {
            tracing::debug!(target: TARGET, run, t, event = ?event, "out event");
        }
        _ => {}
    }
}

/// The tail of a peer id: enough to tell members apart in a log.
fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}
