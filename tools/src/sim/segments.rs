//! The seed's five million users split over a large roster (`stampede-sim --segments`):
//! how long the real split takes ([`Version::split`] over the roster's weights, then
//! every member's share of the VUs and arrival events) and how large the real run
//! messages that carry it are on the wire (the roster, the `assign` version, a
//! heartbeat that repeats the version), CBOR-encoded exactly as gossiped.
//!
//! Checks what it measures: every index is owned exactly once (shares sum to the
//! plan's count, with and without moves), and every message fits gossipsub's limit.
//! Must not contain split rules of its own: ownership is the protocol crate's.

use std::time::Instant;

use stampede_protocol::machine::events::Barrier;
use stampede_protocol::machine::version::{member_set, Counted, Move, Version, VersionId};
use stampede_protocol::mesh::{Envelope, GossipBody, MAX_GOSSIP_BYTES, PROTOCOL_VERSION};
use stampede_protocol::run::{BarrierDetail, RosterEntry, RunMessage};

/// What to split.
#[derive(Debug, Clone)]
pub struct SegmentsSetup {
    pub nodes: usize,
    /// VUs of the closed-model plan and arrival events of the open-model plan.
    pub vus: u64,
    pub arrivals: u64,
    /// Moves (lost members) in the failover version.
    pub moves: usize,
}

/// One measured figure: a name, a value and whether it met its bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub name: String,
    pub value: String,
    pub ok: bool,
}

fn peer_id(i: usize) -> String {
    format!("12D3KooW{}", format!("{i:044}").replace('0', "B"))
}

/// A roster of `n` members with capacities 1..=8 (a mixed fleet).
pub fn roster(n: usize) -> Vec<RosterEntry> {
    (0..n)
        .map(|i| RosterEntry {
            id: peer_id(i),
            name: format!("node-{i}"),
            labels: [("region".to_string(), format!("region-{}", i % 8))].into(),
            weight: 1 + (i as u32 * 7) % 8,
        })
        .collect()
}

/// A version moving `moves` members (the first of every stretch of the roster), each
/// with one claim per counted scenario and, every other move, an explicit takers set of
/// all members still there (the largest a move gets).
pub fn version(n: usize, moves: usize, counted: usize) -> Version {
    let lost: Vec<usize> = (0..moves).map(|k| 1 + k * (n - 1) / moves.max(1)).collect();
    let moves = lost
        .iter()
        .enumerate()
        .map(|(k, &l)| Move {
            lost: l as u32,
            from_event: 1_000_000 + k as u64 * 10_000,
            at_us: 60_000_000 + k as u64 * 1_000_000,
            claims: vec![12_345; counted],
            takers: if k % 2 == 1 {
                member_set((0..n).filter(|i| !lost[..=k].contains(i)))
            } else {
                Vec::new()
            },
        })
        .collect();
    Version {
        id: VersionId {
            term: 1,
            seq: 1 + lost.len() as u64,
        },
        start_unix_us: 1_780_000_000_000_000,
        moves,
    }
}

fn wire(msg: RunMessage) -> usize {
    Envelope {
        protocol_version: PROTOCOL_VERSION,
        sender: peer_id(0),
        body: GossipBody::Run(Box::new(msg)),
    }
    .encode()
    .len()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Splits the plans and measures; one figure per line.
pub fn measure(s: &SegmentsSetup) -> Result<Vec<Figure>, String> {
    if !(1..=stampede_protocol::run::MAX_MEMBERS).contains(&s.nodes) {
        return Err(format!(
            "--nodes {}: must be 1 to {}",
            s.nodes,
            stampede_protocol::run::MAX_MEMBERS
        ));
    }
    if s.moves >= s.nodes || s.vus == 0 || s.arrivals == 0 {
        return Err(format!(
            "--moves {} must be fewer than --nodes {}, and the plans non-empty",
            s.moves, s.nodes
        ));
    }
    let n = s.nodes;
    let roster = roster(n);
    let mut out = Vec::new();
    let mut fig = |name: String, value: String, ok: bool| out.push(Figure { name, value, ok });
    let counted = [Counted::Pool { iterations: s.vus }];
    for (label, moves) in [("no moves", 0), ("moves", s.moves)] {
        let v = version(n, moves, counted.len());
        let label = if moves == 0 {
            label.to_string()
        } else {
            format!("{moves} {label}")
        };
        // What every member does when a version arrives: the whole split, then its
        // own share.
        let t = Instant::now();
        let split = v.split(&roster, &[]).map_err(|e| e.to_string())?;
        let split_ms = ms(t);
        let t = Instant::now();
        let pooled = v.split(&roster, &counted).map_err(|e| e.to_string())?;
        let pooled_ms = ms(t);
        let t = Instant::now();
        let vus: u64 = (0..n).map(|i| split.vus.scale(i, s.vus)).sum();
        let vus_ms = ms(t);
        let t = Instant::now();
        let mut events = 0u64;
        for i in 0..n {
            events += split
                .events
                .owned_from(i, 0)
                .take_while(|&e| e < s.arrivals)
                .count() as u64;
        }
        let events_ms = ms(t);
        let pool: u64 = (0..n).map(|i| pooled.counted[0].size(i)).sum();
        fig(
            format!("split of {n} members ({label})"),
            format!(
                "{split_ms:.1} ms; with a shared-iterations pool of {}: {pooled_ms:.1} ms",
                s.vus
            ),
            true,
        );
        fig(
            format!("{} VUs over {n} members ({label})", s.vus),
            format!("every member's share in {vus_ms:.2} ms in all; shares sum to {vus}"),
            vus == s.vus,
        );
        fig(
            format!("{} arrivals over {n} members ({label})", s.arrivals),
            format!(
                "every member's events listed in {events_ms:.0} ms in all ({:.2} ms per member); {events} listed",
                events_ms / n as f64
            ),
            events == s.arrivals,
        );
        fig(
            format!(
                "shared-iterations pool of {} over {n} members ({label})",
                s.vus
            ),
            format!("pools sum to {pool}"),
            moves > 0 || pool == s.vus,
        );
        let assign = wire(RunMessage::Assign {
            run_id: "r-5m".into(),
            term: 1,
            version: v.clone(),
        });
        fig(
            format!("assign message ({label})"),
            format!("{assign} bytes (limit {MAX_GOSSIP_BYTES})"),
            assign <= MAX_GOSSIP_BYTES,
        );
        let beat = wire(RunMessage::Beat {
            run_id: "r-5m".into(),
            term: 1,
            sent_us: 123_456_789,
            version: Some(v),
            // A witness's beat to another witness: the only copy that carries the
            // whole version (a member's copy carries none), with its one echo.
            echoes: vec![(1, 123_456_789)],
            fenced: Vec::new(),
            claims: vec![12_345; counted.len()],
            fenced_claims: Vec::new(),
            arrived: vec![(Barrier::Ready, BarrierDetail::default())],
            wants_echo: false,
            digest: u64::MAX,
            complete: Vec::new(),
            received: Vec::new(),
        });
        fig(
            format!("heartbeat of a witness to a witness, with the version ({label})"),
            format!("{beat} bytes (limit {MAX_GOSSIP_BYTES})"),
            beat <= MAX_GOSSIP_BYTES,
        );
    }
    let roster_bytes = wire(RunMessage::Roster {
        run_id: "r-5m".into(),
        members: roster,
        refused: Vec::new(),
        fan_in: stampede_protocol::machine::FAN_IN as u32,
    });
    fig(
        format!("roster message of {n} members"),
        format!("{roster_bytes} bytes (limit {MAX_GOSSIP_BYTES})"),
        roster_bytes <= MAX_GOSSIP_BYTES,
    );
    Ok(out)
}
