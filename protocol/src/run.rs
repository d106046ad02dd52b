//! The messages of a distributed run (spec §6): proposal, join, roster and leader,
//! clock samples, assignment, barriers, per-second metric snapshots, failover,
//! stop — and the plan bundle that travels with a run.
//!
//! Every message names its run, and those that the leader sends carry the leader's
//! term, so that a message from a deposed leader, or one for another run, is ignored
//! rather than mixed in. This module only defines shapes, limits and validation; the
//! state machine that uses them is the node's `coordinator`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::machine::events::Barrier;
use crate::machine::version::Version;

/// Limits on what a peer may send, checked before anything else is done with it.
/// (The CLI hands the bundle to its node as JSON, about 3.5 bytes per data byte, under
/// the control endpoint's 32 MiB body line limit.)
pub const MAX_BUNDLE_BYTES: usize = 8 * 1024 * 1024;
pub const MAX_BUNDLE_FILES: usize = 64;
pub const MAX_MEMBERS: usize = 1024;
pub const MAX_REASON: usize = 1024;

/// Checks a run id against the one format nodes make (`embedded::new_run_id`): the
/// run's start in Unix seconds as lowercase hex, `-`, four lowercase hex digits. A run
/// id becomes a directory name under a node's runs dir, so nothing else passes: no
/// `/`, no `..`, no empty or overlong id.
pub fn validate_run_id(id: &str) -> Result<(), String> {
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = match id.split_once('-') {
        Some((secs, rand)) => {
            (1..=16).contains(&secs.len()) && hex(secs) && rand.len() == 4 && hex(rand)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        // Cut, so that a hostile id does not fill the log line that reports it.
        let shown: String = id.chars().take(40).collect();
        Err(format!(
            "run id {shown:?} is not of the form SECONDS-XXXX (lowercase hex)"
        ))
    }
}

/// The largest capacity (worker threads) a member may claim in a `Join` or a roster
/// entry: its weight in the split of the work. The coordinator must also hold a claim to
/// what that node announced (`Announce::capacity`), which is bounded the same way.
pub const MAX_WEIGHT: u32 = 1024;

/// The most seconds (snapshots) one node may report for a run: a week. Anything that
/// iterates over a node's seconds is bounded by it.
pub const MAX_RUN_SECONDS: u64 = 7 * 24 * 3600;

/// A plan with the data files it names: what every node of a run needs, verified by
/// its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The plan's file name, for errors ("retail.toml:12: ...").
    pub plan_name: String,
    pub plan: String,
    /// Data files by their path relative to the plan, as the plan names them.
    /// (Byte strings on the wire: an integer array would double a CSV's size.)
    #[serde(with = "file_bytes")]
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Hex SHA-256 over the plan and every file (names and contents, length-prefixed,
    /// in name order), so that no two different bundles share a hash.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut part = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        part(self.plan_name.as_bytes());
        part(self.plan.as_bytes());
        for (name, data) in &self.files {
            part(name.as_bytes());
            part(data);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn size(&self) -> usize {
        self.plan.len() + self.files.values().map(Vec::len).sum::<usize>()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.size() > MAX_BUNDLE_BYTES {
            return Err(format!(
                "plan bundle of {} bytes exceeds {MAX_BUNDLE_BYTES}",
                self.size()
            ));
        }
        if self.files.len() > MAX_BUNDLE_FILES {
            return Err(format!(
                "plan bundle has {} files, limit {MAX_BUNDLE_FILES}",
                self.files.len()
            ));
        }
        for name in self.files.keys() {
            // Files are materialised under a run directory: no escaping it.
            if name.is_empty()
                || name.starts_with('/')
                || name.split(['/', '\\']).any(|p| p == "..")
            {
                return Err(format!(
                    "plan bundle file name \"{name}\" is not a relative path"
                ));
            }
        }
        Ok(())
    }
}

mod file_bytes {
    use std::collections::BTreeMap;

    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::snapshot::serde_bytes_compat::ByteBuf;

    struct AsBytes<'a>(&'a [u8]);

    impl Serialize for AsBytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn serialize<S: Serializer>(
        files: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(files.len()))?;
        for (name, data) in files {
            map.serialize_entry(name, &AsBytes(data))?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw: BTreeMap<String, ByteBuf> = BTreeMap::deserialize(d)?;
        Ok(raw.into_iter().map(|(k, v)| (k, v.0)).collect())
    }
}

/// What a run asks of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Requirements {
    /// Refuse the whole run unless at least this many nodes accept.
    pub min_nodes: u32,
    /// Refuse the whole run if any member refuses.
    pub require_all: bool,
    /// Only nodes with all these labels take part.
    pub labels: BTreeMap<String, String>,
}

/// A member of a run as the roster lists it: its index in the run's assignment is its
/// position in the roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Relative capacity (worker threads): the weight of its execution segment.
    pub weight: u32,
}

/// Gossip of a run, on the control topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "run_kind", rename_all = "snake_case")]
pub enum RunMessage {
    /// The node whose CLI started the run offers it to the mesh.
    Propose {
        run_id: String,
        origin: String,
        bundle_hash: String,
        plan: String,
        requirements: Requirements,
    },
    /// A member's answer to a proposal.
    Join {
        run_id: String,
        accept: bool,
        reason: Option<String>,
        name: String,
        labels: BTreeMap<String, String>,
        weight: u32,
    },
    /// The origin closes the join phase: these members run it; the first is the
    /// leader of term 1 (the lowest id: every member can recompute it).
    Roster {
        run_id: String,
        members: Vec<RosterEntry>,
        refused: Vec<(String, String)>,
        /// The fan-in of the run's snapshot aggregation tree, chosen by the origin;
        /// 0 (or absent): every member's snapshots go all to all.
        #[serde(default, skip_serializing_if = "is_zero")]
        fan_in: u32,
    },
    /// The run will not happen (refusals, too few nodes).
    Abort { run_id: String, reason: String },
    /// A barrier arrival, republished until the barrier is complete.
    Arrive {
        run_id: String,
        barrier: Barrier,
        detail: BarrierDetail,
    },
    /// The leader of `term` (the member the election rule names for it) issues an
    /// assignment version: the common start and every move of a lost member's share.
    Assign {
        run_id: String,
        term: u64,
        version: Version,
    },
    /// Every member's heartbeat within a run, several times a second: its term, its
    /// assignment version, and the latest heartbeat stamp of every member it heard
    /// with the same version (`echoes`) — the acknowledgements that make up the
    /// others' leases — and the members it has fenced (stopped answering).
    ///
    /// On the wire its fields have one- to four-letter names and its barrier sets are
    /// bits: a heartbeat goes 2.5 times a second between every member and every
    /// witness, so at a witness of a large run its bytes are most of the traffic.
    Beat {
        #[serde(rename = "id")]
        run_id: String,
        #[serde(rename = "t")]
        term: u64,
        /// The sender's monotonic clock (µs) when it sent this beat.
        #[serde(rename = "s")]
        sent_us: u64,
        #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
        version: Option<Version>,
        /// (roster index, that member's `sent_us` as last heard here).
        #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
        echoes: Vec<(u32, u64)>,
        /// Roster indices this member has fenced.
        #[serde(rename = "f", default, skip_serializing_if = "Vec::is_empty")]
        fenced: Vec<u32>,
        /// This member's claims on the counted scenarios (see `machine::version`).
        #[serde(rename = "c", default, skip_serializing_if = "Vec::is_empty")]
        claims: Vec<u64>,
        /// For each fenced member (same order): the highest claims heard from it.
        #[serde(rename = "fc", default, skip_serializing_if = "Vec::is_empty")]
        fenced_claims: Vec<Vec<u64>>,
        /// Every barrier this member has arrived at: arrivals ride on heartbeats, so
        /// a member that missed one hears it again within a beat, whatever the
        /// sender believes of the barrier.
        #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
        arrived: Vec<(Barrier, BarrierDetail)>,
        /// The sender holds no lease now (it just took up a version): members at its
        /// version answer at once instead of at their next beat.
        #[serde(rename = "w", default, skip_serializing_if = "std::ops::Not::not")]
        wants_echo: bool,
        /// The sender's version digest, for a beat that carries no `version`:
        /// heartbeats carry the whole version only to witnesses (who adopt versions
        /// on a leader change); every other member takes versions from `assign`.
        #[serde(rename = "d", default)]
        digest: u64,
        /// Barriers a witness sees complete: members that are not witnesses hear
        /// only the witnesses, so they learn completion from them.
        #[serde(
            rename = "done",
            default,
            skip_serializing_if = "Vec::is_empty",
            with = "barrier_set"
        )]
        complete: Vec<Barrier>,
        /// The recipient's own arrivals the sender holds: the recipient stops
        /// repeating those to it (they would be most of a heartbeat's bytes).
        #[serde(
            rename = "got",
            default,
            skip_serializing_if = "Vec::is_empty",
            with = "barrier_set"
        )]
        received: Vec<Barrier>,
    },
    /// Stop the run everywhere, gracefully.
    Stop { run_id: String, reason: String },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A member's name and labels are held to what an announcement may carry.
fn member_text(name: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    use crate::mesh::{MAX_LABELS, MAX_TEXT};
    if name.len() > MAX_TEXT {
        return Err(format!("name of {} bytes exceeds {MAX_TEXT}", name.len()));
    }
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels, limit {MAX_LABELS}", labels.len()));
    }
    if labels
        .iter()
        .any(|(k, v)| k.len() > MAX_TEXT || v.len() > MAX_TEXT)
    {
        return Err(format!("a label longer than {MAX_TEXT} bytes"));
    }
    Ok(())
}

impl RunMessage {
    /// The message's kind in one word, for logs and traffic figures.
    pub fn kind(&self) -> &'static str {
        match self {
            RunMessage::Propose { .. } => "propose",
            RunMessage::Join { .. } => "join",
            RunMessage::Roster { .. } => "roster",
            RunMessage::Abort { .. } => "abort",
            RunMessage::Arrive { .. } => "arrive",
            RunMessage::Assign { .. } => "assign",
            RunMessage::Beat { .. } => "beat",
            RunMessage::Stop { .. } => "stop",
        }
    }

    pub fn run_id(&self) -> &str {
        match self {
            RunMessage::Propose { run_id, .. }
            | RunMessage::Join { run_id, .. }
            | RunMessage::Roster { run_id, .. }
            | RunMessage::Abort { run_id, .. }
            | RunMessage::Arrive { run_id, .. }
            | RunMessage::Assign { run_id, .. }
            | RunMessage::Beat { run_id, .. }
            | RunMessage::Stop { run_id, .. } => run_id,
        }
    }

    /// Bounds on sizes that a peer controls.
    pub fn validate(&self) -> Result<(), String> {
        let short = |what: &str, s: &str| {
            if s.len() > MAX_REASON {
                Err(format!("{what} of {} bytes exceeds {MAX_REASON}", s.len()))
            } else {
                Ok(())
            }
        };
        validate_run_id(self.run_id())?;
        match self {
            RunMessage::Roster {
                members,
                refused,
                fan_in,
                ..
            } => {
                if members.len() > MAX_MEMBERS || refused.len() > MAX_MEMBERS {
                    return Err("roster too large".into());
                }
                if *fan_in as usize > MAX_MEMBERS {
                    return Err(format!("fan-in {fan_in} exceeds {MAX_MEMBERS}"));
                }
                if members.is_empty() {
                    return Err("empty roster".into());
                }
                if members.iter().any(|m| m.weight == 0) {
                    return Err("roster member with weight 0".into());
                }
                for m in members {
                    member_text(&m.name, &m.labels)?;
                }
                if let Some(m) = members.iter().find(|m| m.weight > MAX_WEIGHT) {
                    return Err(format!(
                        "roster member {} has weight {}, limit {MAX_WEIGHT}",
                        m.id, m.weight
                    ));
                }
            }
            RunMessage::Join {
                weight,
                reason,
                name,
                labels,
                ..
            } => {
                if *weight > MAX_WEIGHT {
                    return Err(format!("join weight {weight} exceeds {MAX_WEIGHT}"));
                }
                if let Some(r) = reason {
                    short("reason", r)?;
                }
                // The roster repeats every member's name and labels: a member that
                // could claim a megabyte of them would make a roster too large to
                // publish, and the run would wait for ever.
                member_text(name, labels)?;
            }
            RunMessage::Propose {
                plan, requirements, ..
            } => {
                if plan.len() > crate::mesh::MAX_TEXT {
                    return Err(format!(
                        "plan name of {} bytes exceeds {}",
                        plan.len(),
                        crate::mesh::MAX_TEXT
                    ));
                }
                member_text("", &requirements.labels)?;
            }
            RunMessage::Abort { reason, .. } | RunMessage::Stop { reason, .. } => {
                short("reason", reason)?
            }
            RunMessage::Arrive { detail, .. } => {
                if let Some(e) = &detail.error {
                    short("error", e)?;
                }
                if let Some(n) = detail.snapshots.filter(|&n| n > MAX_RUN_SECONDS) {
                    return Err(format!(
                        "arrival reports {n} snapshots, more than {MAX_RUN_SECONDS} (a week of seconds)"
                    ));
                }
            }
            RunMessage::Assign { version, .. } if oversized(version) => {
                return Err("assignment version with too many moves, claims or takers".into());
            }
            RunMessage::Beat {
                version,
                echoes,
                fenced,
                arrived,
                claims,
                fenced_claims,
                complete,
                received,
                ..
            } => {
                use crate::machine::version::MAX_COUNTED;
                if echoes.len() > MAX_MEMBERS
                    || fenced.len() > MAX_MEMBERS
                    || arrived.len() > Barrier::ALL.len()
                    || complete.len() > Barrier::ALL.len()
                    || received.len() > Barrier::ALL.len()
                    || claims.len() > MAX_COUNTED
                    || fenced_claims.len() > fenced.len()
                    || fenced_claims.iter().any(|c| c.len() > MAX_COUNTED)
                {
                    return Err("heartbeat too large".into());
                }
                for (_, d) in arrived {
                    if let Some(e) = &d.error {
                        short("error", e)?;
                    }
                    if d.snapshots.is_some_and(|n| n > MAX_RUN_SECONDS) {
                        return Err("heartbeat reports more snapshots than a run can have".into());
                    }
                }
                if version.as_ref().is_some_and(oversized) {
                    return Err("assignment version with too many moves, claims or takers".into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What a barrier arrival reports besides "I am here".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BarrierDetail {
    /// `started`: when this node actually started, in the run clock (the origin's, µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix_us: Option<u64>,
    /// `finished`: the number of snapshots this node published (seq 0..count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u64>,
    /// `ready`: this node's clock offset to the run clock, the origin's (µs, origin − local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_us: Option<i64>,
    /// `finished` without running: why this node could not send its share (its
    /// engine or HTTP set-up failed). Absent from older nodes' arrivals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One node's measurements for one second of a run, on the metrics topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMessage {
    pub run_id: String,
    pub node: String,
    /// The second of the run it covers (its sequence number).
    pub seq: u64,
    /// VUs alive on the node at the end of that second.
    pub vus: u64,
    /// Process CPU of the node in that second, as a fraction of its worker cores.
    pub cpu: f64,
    /// [`crate::snapshot::Metrics`] as CBOR, carried as a byte string (an array of
    /// integers, as builds before protocol 4 sent it, is still read).
    #[serde(with = "byte_string")]
    pub metrics: Vec<u8>,
}

/// Merged measurements of one second of a run over a set of its members (snapshot
/// aggregation in a tree, docs/protocol.md §10): a member's own second (`covers` is
/// itself), a group aggregator's merge of its group, or the root's merge of the whole
/// run. Sent directly (`RunRequest::Batch`) up the tree, and gossiped on the metrics
/// topic by the root. Its size does not grow with the run's members beyond the
/// `covers` bitmap (128 bytes at [`MAX_MEMBERS`]): per-member figures stay with the
/// member and reach the report at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchMessage {
    pub run_id: String,
    /// The second of the run it covers.
    pub seq: u64,
    /// The roster indices whose second `seq` it holds, as a bitmap: bit `i % 8` of
    /// byte `i / 8`. At most `MAX_MEMBERS / 8` bytes and at least one bit set.
    #[serde(with = "byte_string")]
    pub covers: Vec<u8>,
    /// VUs alive at the end of the second, summed over the covered members.
    pub vus: u64,
    /// The highest process CPU among the covered members (fraction of worker cores).
    pub cpu: f64,
    /// [`crate::snapshot::Metrics`] as CBOR, carried as a byte string.
    #[serde(with = "byte_string")]
    pub metrics: Vec<u8>,
}

/// The largest `covers` bitmap: one bit per possible roster member.
pub const MAX_COVERS_BYTES: usize = MAX_MEMBERS / 8;

/// Roster indices as a `covers` bitmap.
pub fn covers_bitmap(indices: &[u32]) -> Vec<u8> {
    let len = indices
        .iter()
        .map(|&i| i as usize / 8 + 1)
        .max()
        .unwrap_or(0);
    let mut out = vec![0u8; len.min(MAX_COVERS_BYTES)];
    for &i in indices {
        if let Some(b) = out.get_mut(i as usize / 8) {
            *b |= 1 << (i % 8);
        }
    }
    out
}

/// A `covers` bitmap's indices, ascending; refused when empty or naming a member
/// outside a roster of `members`.
pub fn covers_indices(bits: &[u8], members: usize) -> Result<Vec<u32>, String> {
    if bits.len() > MAX_COVERS_BYTES {
        return Err(format!(
            "covers bitmap of {} bytes exceeds {MAX_COVERS_BYTES}",
            bits.len()
        ));
    }
    let mut out = Vec::new();
    for (byte, b) in bits.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                let i = byte * 8 + bit;
                if i >= members {
                    return Err(format!("covers member {i} of a roster of {members}"));
                }
                out.push(i as u32);
            }
        }
    }
    if out.is_empty() {
        return Err("covers no member".into());
    }
    Ok(out)
}

impl BatchMessage {
    /// Bounds a peer controls: the run id, the bitmap's length, a second within a
    /// run's bounds, a finite CPU figure. (The metrics are bounded by the frame or
    /// gossip limit and decoded with `Metrics::decode`'s memory budget.)
    pub fn validate(&self) -> Result<(), String> {
        validate_run_id(&self.run_id)?;
        if self.covers.len() > MAX_COVERS_BYTES || self.covers.iter().all(|&b| b == 0) {
            return Err(format!(
                "covers bitmap of {} bytes: empty or over {MAX_COVERS_BYTES}",
                self.covers.len()
            ));
        }
        if self.seq >= MAX_RUN_SECONDS {
            return Err(format!(
                "second {} beyond a run's {MAX_RUN_SECONDS}",
                self.seq
            ));
        }
        if !self.cpu.is_finite() || self.cpu < 0.0 {
            return Err("cpu not a finite fraction".into());
        }
        Ok(())
    }
}

/// One bucket of a timeline (one second, or a merge of `width_s` seconds further back
/// in a long run), as charts draw it and the report writes it: counts and a few
/// percentiles, no histograms. On the wire in a member's [`OwnTotals`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TimelinePoint {
    /// The bucket's first second since the run's start.
    pub t: u64,
    /// Seconds the bucket spans (1 for the recent part of every run).
    #[serde(default = "one")]
    pub width_s: u64,
    pub requests: u64,
    /// Requests per second over the bucket.
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub errors: u64,
    pub errors_by_class: BTreeMap<String, u64>,
    pub iterations: u64,
    pub dropped_iterations: u64,
    pub bytes_received: u64,
    /// Active VUs (the highest second of a wider bucket).
    pub vus: u64,
    pub schedule_lag_p99_us: u64,
    /// Nodes that reported this second (the most in any second of a wider bucket).
    pub nodes: usize,
    /// Named metrics (WebSocket, gRPC, ...) of the bucket, only those recorded: a
    /// counter's count as `NAME`, a duration's p99 as `NAME_p99_us`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub named: BTreeMap<String, u64>,
}

fn one() -> u64 {
    1
}

/// The most timeline points a member's [`OwnTotals`] may carry: its timeline at the
/// report's resolution over a week (`MAX_RUN_SECONDS`) is about 1,460 points (10 min
/// at 1 s, 50 min at 10 s, 5 h at 1 min, 18 h at 10 min, the rest at 1 h).
pub const MAX_OWN_POINTS: usize = 2048;
/// The most entries of a timeline point's `errors_by_class` or `named` map, and the
/// longest key, in a member's [`OwnTotals`].
pub const MAX_POINT_ENTRIES: usize = 64;
pub const MAX_POINT_KEY: usize = 64;
/// The largest encoded totals a member's [`OwnTotals`] may carry (a snapshot is at
/// most the 1 MiB gossip limit; totals of a long run hold more distinct values).
pub const MAX_OWN_METRICS_BYTES: usize = 8 * 1024 * 1024;
/// Timeline bucket widths a point may have (the report's tiers).
pub const POINT_WIDTHS: [u64; 5] = [1, 10, 60, 600, 3_600];

/// A member's own part of a run, for a reporter's per-member section (tree
/// aggregation, where the merged seconds carry no per-member figures): its totals and
/// its own timeline at the report's resolution, cut at the run's end the reporter
/// asked with. Answers [`RunRequest::Own`]; the asker takes it only from the member
/// it names (`node`), never one member's word for another's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnTotals {
    pub run_id: String,
    /// The member (peer id) these are the figures of: the one asked.
    pub node: String,
    /// Seconds the member produced.
    pub seconds: u64,
    /// Its VUs at its last second, and its highest process CPU of any second.
    pub vus: u64,
    pub cpu: f64,
    /// [`crate::snapshot::Metrics`] as CBOR (the member's totals), a byte string.
    #[serde(with = "byte_string")]
    pub metrics: Vec<u8>,
    /// Oldest first, at most [`MAX_OWN_POINTS`].
    pub timeline: Vec<TimelinePoint>,
}

impl OwnTotals {
    /// Bounds a peer controls, before anything is done with it: the run id, the
    /// sizes ([`MAX_OWN_METRICS_BYTES`], [`MAX_OWN_POINTS`], [`MAX_POINT_ENTRIES`],
    /// [`MAX_POINT_KEY`]), seconds within a run, finite figures, and a timeline of
    /// whole buckets of the report's widths in ascending order without overlap.
    /// (The metrics are then decoded with `Metrics::decode`'s memory budget.)
    pub fn validate(&self) -> Result<(), String> {
        validate_run_id(&self.run_id)?;
        if self.node.is_empty() || self.node.len() > 128 {
            return Err("node id empty or over 128 bytes".into());
        }
        if self.seconds > MAX_RUN_SECONDS {
            return Err(format!(
                "{} seconds beyond a run's {MAX_RUN_SECONDS}",
                self.seconds
            ));
        }
        if !self.cpu.is_finite() || self.cpu < 0.0 {
            return Err("cpu not a finite fraction".into());
        }
        if self.metrics.len() > MAX_OWN_METRICS_BYTES {
            return Err(format!(
                "totals of {} bytes exceed {MAX_OWN_METRICS_BYTES}",
                self.metrics.len()
            ));
        }
        if self.timeline.len() > MAX_OWN_POINTS {
            return Err(format!(
                "{} timeline points exceed {MAX_OWN_POINTS}",
                self.timeline.len()
            ));
        }
        let mut next = 0u64;
        for p in &self.timeline {
            if !POINT_WIDTHS.contains(&p.width_s) || p.t % p.width_s != 0 {
                return Err(format!("a bucket of {} s at {} s", p.width_s, p.t));
            }
            if p.t < next || p.t.saturating_add(p.width_s) > MAX_RUN_SECONDS {
                return Err(format!("bucket at {} s out of order or range", p.t));
            }
            next = p.t + p.width_s;
            if !p.rps.is_finite() || p.rps < 0.0 {
                return Err("rps not finite".into());
            }
            for map in [&p.errors_by_class, &p.named] {
                if map.len() > MAX_POINT_ENTRIES || map.keys().any(|k| k.len() > MAX_POINT_KEY) {
                    return Err(format!(
                        "a bucket with over {MAX_POINT_ENTRIES} entries or a key over {MAX_POINT_KEY} bytes"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A `Vec<u8>` as one CBOR byte string (serde writes a `Vec<u8>` as an array of
/// integers, about 1.8 bytes per byte); reads either form.
/// A set of barriers as one small integer (bit 0 `ready`, 1 `started`, 2
/// `finished`), in barrier order: a heartbeat's `complete` and `received`.
mod barrier_set {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::machine::events::Barrier;

    const ALL: [Barrier; 3] = [Barrier::Ready, Barrier::Started, Barrier::Finished];

    pub fn serialize<S: Serializer>(set: &[Barrier], s: S) -> Result<S::Ok, S::Error> {
        let bits = ALL
            .iter()
            .enumerate()
            .filter(|(_, b)| set.contains(b))
            .fold(0u8, |acc, (i, _)| acc | 1 << i);
        s.serialize_u8(bits)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Barrier>, D::Error> {
        let bits = u8::deserialize(d)?;
        if bits >> ALL.len() != 0 {
            return Err(D::Error::custom(format!(
                "unknown barrier bits in {bits:#x}"
            )));
        }
        Ok(ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, b)| *b)
            .collect())
    }
}

mod byte_string {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::snapshot::serde_bytes_compat::ByteBuf;

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(ByteBuf::deserialize(d)?.0)
    }
}

/// Requests between the nodes of a run (request-response).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "run_req", rename_all = "snake_case")]
pub enum RunRequest {
    /// The plan bundle of a run, by hash.
    Bundle { run_id: String, hash: String },
    /// An NTP-style clock sample: the responder answers with its receive and send times.
    /// Every time of a sample is taken by the codec, as the frame is encoded onto or
    /// decoded off its stream (`t1_us` as the request goes out): a busy event loop at
    /// either end then delays the sample between the responder's two stamps or after
    /// the requester's last, never on one leg only (at 50 nodes on one machine, stamps
    /// taken in the event loops biased every offset by +0.1…+6 ms: the origin's loop is
    /// the busiest of the run).
    Clock {
        t1_us: u64,
        /// When the request came off the responder's wire (µs, its clock): its receive
        /// time, noted by its codec and never sent.
        #[serde(default, skip_serializing)]
        arrived_us: Option<u64>,
    },
    /// Snapshots a receiver missed, by sequence number. The answer holds at most
    /// [`SNAPSHOTS_PER_REQUEST`] of them and about [`SNAPSHOT_ANSWER_BYTES`]; the rest
    /// are asked for again.
    Snapshots {
        run_id: String,
        node: String,
        seqs: Vec<u64>,
    },
    /// A finished run's summary (JSON, as the responder saved it): how `stampede
    /// report` finds a run whose report another node built. Answered from the
    /// responder's data dir, or `Refused` when it does not have it.
    Summary { run_id: String },
    /// A run message for this node alone (heartbeats, joins, a roster sent again):
    /// answered `Received` at once and handed to the run like a gossiped one. The
    /// sender's protocol version travels with it, since request-response itself is
    /// not versioned: a message of another version is refused.
    Message {
        protocol_version: u32,
        msg: Box<RunMessage>,
    },
    /// A second of measurements going up the aggregation tree: a member's own
    /// snapshot to its group's aggregator, or a group's merge to the root. Answered
    /// `Received` at once.
    Batch(Box<BatchMessage>),
    /// A member's own totals and timeline (tree aggregation), cut at the run's end
    /// `end` (seconds) as the asker sees it so that its buckets line up with the
    /// run's: answered `Own`, or `Refused` by a node that has none for the run.
    Own { run_id: String, end: u64 },
}

impl RunRequest {
    /// The run id of a request that names one is of the one format.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            RunRequest::Bundle { run_id, .. }
            | RunRequest::Snapshots { run_id, .. }
            | RunRequest::Summary { run_id } => validate_run_id(run_id),
            RunRequest::Own { run_id, end } => {
                validate_run_id(run_id)?;
                if *end > MAX_RUN_SECONDS {
                    return Err(format!("end {end} beyond a run's {MAX_RUN_SECONDS}"));
                }
                Ok(())
            }
            RunRequest::Clock { .. } => Ok(()),
            RunRequest::Message { msg, .. } => msg.validate(),
            RunRequest::Batch(b) => b.validate(),
        }
    }
}

impl SnapshotMessage {
    /// The run id is of the one format.
    pub fn validate(&self) -> Result<(), String> {
        validate_run_id(&self.run_id)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "run_resp", rename_all = "snake_case")]
pub enum RunResponse {
    Bundle {
        bundle: Bundle,
    },
    Clock {
        t1_us: u64,
        t2_us: u64,
        t3_us: u64,
        /// When the response came off the requester's wire (µs, its clock). Noted by
        /// its codec on receipt and never sent: the requester's own hops after the
        /// wire (its event loop, a channel, a task wake-up) would otherwise count as
        /// network delay on the way back only, and bias the offset by half of them.
        #[serde(default, skip_serializing)]
        received_us: Option<u64>,
    },
    Snapshots {
        snapshots: Vec<SnapshotMessage>,
        /// Seconds asked for that the responder does not have (and never will): the
        /// asker stops asking for them. Absent from older nodes' answers.
        #[serde(default)]
        missing: Vec<u64>,
    },
    /// A saved summary, at most [`MAX_SUMMARY_BYTES`] of JSON; the asker checks the
    /// size and that it names the run asked for before it uses it.
    Summary {
        json: String,
    },
    Refused {
        reason: String,
    },
    /// A direct run message was taken (nothing more is said: its effects, if any,
    /// come as messages of their own).
    Received,
    /// A member's own part of a run ([`RunRequest::Own`]).
    Own(Box<OwnTotals>),
}

/// A reason or error cut to [`MAX_REASON`] bytes (at a character boundary), so that a
/// long one still goes out rather than being refused by every receiver.
pub fn clip_reason(mut s: String) -> String {
    if s.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The most snapshots one request is answered with (the rest are asked again).
pub const SNAPSHOTS_PER_REQUEST: usize = 256;

/// Snapshot bytes past which an answer stops taking more, well under
/// [`crate::mesh::MAX_RESPONSE_BYTES`]: a snapshot may be up to the 1 MiB gossip limit.
pub const SNAPSHOT_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// The largest run summary one node sends another (JSON bytes), just under
/// [`crate::mesh::MAX_RESPONSE_BYTES`]. A summary holds a timeline point (about 260
/// bytes) per second for the run and for each node: an hour on 3 nodes is about 4 MB,
/// so this carries about 16 node-hours. A larger one is read on the node that saved it.
pub const MAX_SUMMARY_BYTES: usize = 15 * 1024 * 1024;

/// This machine's wall clock in Unix µs: what every stamp in the run protocol is.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// NTP offset and round trip from one clock sample (all µs): offset = server − client.
pub fn clock_offset(t1: u64, t2: u64, t3: u64, t4: u64) -> (i64, u64) {
    let (t1, t2, t3, t4) = (t1 as i128, t2 as i128, t3 as i128, t4 as i128);
    let offset = ((t2 - t1) + (t3 - t4)) / 2;
    let rtt = (t4 - t1) - (t3 - t2);
    (offset as i64, rtt.max(0) as u64)
}

/// Whether a version lists more moves, claims or takers than a run can have.
fn oversized(v: &crate::machine::version::Version) -> bool {
    use crate::machine::version::MAX_COUNTED;
    v.moves.len() > MAX_MEMBERS
        || v.moves
            .iter()
            .any(|m| m.claims.len() > MAX_COUNTED || m.takers.len() > MAX_MEMBERS.div_ceil(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(points: Vec<TimelinePoint>) -> OwnTotals {
        OwnTotals {
            run_id: "6932a8b2-0f3c".into(),
            node: "12D3KooW".into(),
            seconds: 10,
            vus: 1,
            cpu: 0.5,
            metrics: vec![0; 16],
            timeline: points,
        }
    }

    fn point(t: u64, width_s: u64) -> TimelinePoint {
        TimelinePoint {
            t,
            width_s,
            ..Default::default()
        }
    }

    /// A member's own totals are held to every bound a peer controls before the
    /// reporter uses them: sizes, order, bucket shapes, finite figures.
    #[test]
    fn a_members_own_totals_are_bounded_and_well_formed() {
        // A week's worth at the report's resolution fits.
        let mut week = Vec::new();
        let mut t = 0;
        for (width, until) in [
            (3_600, MAX_RUN_SECONDS - 86_400),
            (600, MAX_RUN_SECONDS - 21_600),
            (60, MAX_RUN_SECONDS - 3_600),
            (10, MAX_RUN_SECONDS - 600),
            (1, MAX_RUN_SECONDS),
        ] {
            while t < until {
                week.push(point(t, width));
                t += width;
            }
        }
        assert!(week.len() <= MAX_OWN_POINTS, "{}", week.len());
        own(week).validate().unwrap();

        let refused = |o: OwnTotals, why: &str| {
            let e = o.validate().expect_err(why);
            eprintln!("{why}: {e}");
        };
        refused(
            own((0..=MAX_OWN_POINTS as u64).map(|t| point(t, 1)).collect()),
            "too many points",
        );
        refused(own(vec![point(5, 1), point(5, 1)]), "a bucket twice");
        refused(own(vec![point(10, 1), point(5, 1)]), "out of order");
        refused(own(vec![point(0, 10), point(5, 1)]), "overlapping buckets");
        refused(own(vec![point(5, 10)]), "a bucket not aligned to its width");
        refused(own(vec![point(0, 7)]), "a width the report does not use");
        refused(own(vec![point(MAX_RUN_SECONDS, 1)]), "past a week");
        let mut p = point(0, 1);
        p.rps = f64::NAN;
        refused(own(vec![p]), "a NaN rate");
        let mut p = point(0, 1);
        p.named.insert("x".repeat(MAX_POINT_KEY + 1), 1);
        refused(own(vec![p]), "a long key");
        let mut p = point(0, 1);
        for i in 0..=MAX_POINT_ENTRIES {
            p.errors_by_class.insert(format!("e{i}"), 1);
        }
        refused(own(vec![p]), "too many entries");
        let mut o = own(vec![]);
        o.metrics = vec![0; MAX_OWN_METRICS_BYTES + 1];
        refused(o, "oversized totals");
        let mut o = own(vec![]);
        o.run_id = "../etc".into();
        refused(o, "a bad run id");
        let mut o = own(vec![]);
        o.node = String::new();
        refused(o, "no node");
        let mut o = own(vec![]);
        o.cpu = f64::INFINITY;
        refused(o, "an infinite cpu");
        let mut o = own(vec![]);
        o.seconds = MAX_RUN_SECONDS + 1;
        refused(o, "more seconds than a run has");
        assert!(RunRequest::Own {
            run_id: "6932a8b2-0f3c".into(),
            end: MAX_RUN_SECONDS + 1
        }
        .validate()
        .is_err());
    }

    #[test]
    fn a_heartbeat_goes_in_short_names_and_barrier_bits_and_comes_back_the_same() {
        let beat = RunMessage::Beat {
            run_id: "6932a8b2-0f3c".into(),
            term: 2,
            sent_us: 693_919_356,
            version: None,
            echoes: vec![(25, 148_899_735)],
            fenced: vec![],
            claims: vec![],
            fenced_claims: vec![],
            arrived: vec![],
            wants_echo: false,
            digest: 15_086_950_585_397_241_385,
            complete: vec![Barrier::Ready, Barrier::Started],
            received: vec![Barrier::Ready, Barrier::Started, Barrier::Finished],
        };
        let wire = crate::mesh::to_cbor(&beat);
        // A witness's answer to a member: about 80 bytes (it was 135 with long field
        // names and barrier names), two of them every 400 ms per member.
        assert!(wire.len() <= 80, "{} bytes", wire.len());
        let back: RunMessage = ciborium::from_reader(&wire[..]).unwrap();
        assert_eq!(back, beat);
        // A set is a set: order and repeats do not survive, nor should they matter.
        let mut shuffled = beat.clone();
        if let RunMessage::Beat { complete, .. } = &mut shuffled {
            *complete = vec![Barrier::Started, Barrier::Ready, Barrier::Started];
        }
        let back: RunMessage = ciborium::from_reader(&crate::mesh::to_cbor(&shuffled)[..]).unwrap();
        assert_eq!(back, beat);
        // Bits no barrier has are refused, not ignored.
        let mut bad = wire.clone();
        let at = bad.windows(5).position(|w| w == b"\x64done").unwrap() + 5;
        bad[at] = 0x08;
        let err = ciborium::from_reader::<RunMessage, _>(&bad[..]).unwrap_err();
        assert!(format!("{err}").contains("unknown barrier bits"), "{err}");
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary_and_then_passes() {
        let long = "é".repeat(MAX_REASON); // 2 bytes each
        let cut = clip_reason(long);
        assert!(cut.len() <= MAX_REASON && cut.len() >= MAX_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(clip_reason("short".into()), "short");
        let arrive = RunMessage::Arrive {
            run_id: "6932a8b2-0f3c".into(),
            barrier: Barrier::Finished,
            detail: BarrierDetail {
                error: Some("x".repeat(MAX_REASON + 1)),
                ..Default::default()
            },
        };
        assert!(arrive.validate().is_err(), "an overlong error is refused");
        // An arrival from a node without the error field still reads.
        let old: BarrierDetail = serde_json::from_str(
            r#"{"started_unix_us":null,"snapshots":3,"clock_offset_us":null}"#,
        )
        .unwrap();
        assert_eq!(old.snapshots, Some(3));
        assert!(old.error.is_none());
    }

    #[test]
    fn an_arrival_claiming_more_snapshots_than_a_run_can_have_is_refused() {
        let arrive = |n| RunMessage::Arrive {
            run_id: "6932a8b2-0f3c".into(),
            barrier: Barrier::Finished,
            detail: BarrierDetail {
                snapshots: Some(n),
                ..Default::default()
            },
        };
        let err = arrive(1_000_000_000_000).validate().unwrap_err();
        assert!(err.contains("1000000000000 snapshots"), "{err}");
        assert!(arrive(MAX_RUN_SECONDS).validate().is_ok());
        assert!(arrive(MAX_RUN_SECONDS + 1).validate().is_err());
    }

    #[test]
    fn a_join_cannot_claim_labels_that_would_make_the_roster_unpublishable() {
        let join = |labels: BTreeMap<String, String>| RunMessage::Join {
            run_id: "6932a8b2-0f3c".into(),
            accept: true,
            reason: None,
            name: "n".into(),
            labels,
            weight: 1,
        };
        let big: BTreeMap<String, String> = (0..9)
            .map(|i| (format!("k{i}"), "x".repeat(100_000)))
            .collect();
        assert!(join(big).validate().unwrap_err().contains("label longer"));
        let many: BTreeMap<String, String> =
            (0..1000).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(join(many).validate().unwrap_err().contains("labels, limit"));
        let ok: BTreeMap<String, String> = [("region".to_string(), "eu".to_string())].into();
        assert!(join(ok).validate().is_ok());
    }

    #[test]
    fn a_claimed_weight_is_bounded() {
        let join = |weight| RunMessage::Join {
            run_id: "6932a8b2-0f3c".into(),
            accept: true,
            reason: None,
            name: "n".into(),
            labels: BTreeMap::new(),
            weight,
        };
        assert!(join(MAX_WEIGHT).validate().is_ok());
        let err = join(u32::MAX).validate().unwrap_err();
        assert!(err.contains("join weight 4294967295 exceeds 1024"), "{err}");
        let roster = |weight| RunMessage::Roster {
            run_id: "6932a8b2-0f3c".into(),
            members: vec![RosterEntry {
                id: "a".into(),
                name: "a".into(),
                labels: BTreeMap::new(),
                weight,
            }],
            refused: vec![],
            fan_in: 0,
        };
        assert!(roster(4).validate().is_ok());
        assert!(roster(MAX_WEIGHT + 1).validate().is_err());
    }

    #[test]
    fn the_receive_stamp_of_a_clock_sample_never_goes_on_the_wire() {
        let stamped = RunResponse::Clock {
            t1_us: 1,
            t2_us: 2,
            t3_us: 3,
            received_us: Some(4),
        };
        let wire = serde_json::to_string(&stamped).unwrap();
        assert!(!wire.contains("received_us"), "{wire}");
        // A peer's response arrives without it; the receiving event loop adds it.
        match serde_json::from_str::<RunResponse>(&wire).unwrap() {
            RunResponse::Clock {
                t1_us, received_us, ..
            } => assert_eq!((t1_us, received_us), (1, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bundle_hash_covers_names_and_contents() {
        let mut b = Bundle {
            plan_name: "p.toml".into(),
            plan: "name = \"x\"".into(),
            files: BTreeMap::new(),
        };
        let h0 = b.hash();
        b.files.insert("a.csv".into(), b"u\n1\n".to_vec());
        let h1 = b.hash();
        assert_ne!(h0, h1);
        let mut renamed = b.clone();
        let data = renamed.files.remove("a.csv").unwrap();
        renamed.files.insert("b.csv".into(), data);
        assert_ne!(renamed.hash(), h1);
        assert_eq!(h1.len(), 64);
        assert!(b.validate().is_ok());
        b.files.insert("../etc/passwd".into(), vec![]);
        assert!(b.validate().is_err());
    }

    #[test]
    fn bundle_files_are_byte_strings_in_cbor_and_json() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let b = Bundle {
            plan_name: "p".into(),
            plan: String::new(),
            files: [("d.csv".to_string(), data)].into(),
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&b, &mut cbor).unwrap();
        assert!(
            cbor.len() < 10_100,
            "CBOR of 10,000 data bytes is {} bytes",
            cbor.len()
        );
        let back: Bundle = ciborium::from_reader(&cbor[..]).unwrap();
        assert_eq!(back, b);
        let json = serde_json::to_string(&b).unwrap();
        let back: Bundle = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn a_snapshots_metrics_are_one_byte_string_and_the_older_array_form_still_reads() {
        let metrics: Vec<u8> = (0..=255u8).cycle().take(2_000).collect();
        let s = SnapshotMessage {
            run_id: "6932a8b2-0f3c".into(),
            node: "n1".into(),
            seq: 7,
            vus: 3,
            cpu: 0.25,
            metrics: metrics.clone(),
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&s, &mut cbor).unwrap();
        assert!(
            cbor.len() < 2_100,
            "CBOR of a snapshot with 2,000 metrics bytes is {} bytes",
            cbor.len()
        );
        let back: SnapshotMessage = ciborium::from_reader(&cbor[..]).unwrap();
        assert_eq!(back, s);

        // What builds before protocol 4 sent: the same fields, metrics as integers.
        #[derive(Serialize)]
        struct Older<'a> {
            run_id: &'a str,
            node: &'a str,
            seq: u64,
            vus: u64,
            cpu: f64,
            metrics: &'a Vec<u8>,
        }
        let mut older = Vec::new();
        let o = Older {
            run_id: &s.run_id,
            node: &s.node,
            seq: s.seq,
            vus: s.vus,
            cpu: s.cpu,
            metrics: &metrics,
        };
        ciborium::into_writer(&o, &mut older).unwrap();
        assert!(
            older.len() > cbor.len() + 1_000,
            "{} vs {}",
            older.len(),
            cbor.len()
        );
        let back: SnapshotMessage = ciborium::from_reader(&older[..]).unwrap();
        assert_eq!(back, s);
        let json = serde_json::to_string(&s).unwrap();
        let back: SnapshotMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn run_ids_have_one_format_and_never_name_a_path() {
        assert!(validate_run_id("6932a8b2-0f3c").is_ok());
        assert!(validate_run_id("0-0000").is_ok());
        for bad in [
            "",
            "r",
            "../../home/u/.ssh",
            "/etc/cron.d/x",
            "6932a8b2-0f3c/..",
            "6932a8b2-0f3",
            "6932a8b2-0f3cc",
            "6932A8B2-0f3c",
            "-0f3c",
            "11111111111111111-0f3c",
            "6932a8b2_0f3c",
            "6932a8b2-0f3c\n",
        ] {
            assert!(validate_run_id(bad).is_err(), "{bad:?} passed");
        }
        let long = "x".repeat(100_000);
        let e = validate_run_id(&long).unwrap_err();
        assert!(e.len() < 120, "the error quotes a cut id: {e}");
        // Every message and request that names a run checks it at decode.
        let stop = RunMessage::Stop {
            run_id: "../../etc".into(),
            reason: String::new(),
        };
        assert!(stop.validate().is_err());
        let ask = RunRequest::Bundle {
            run_id: "/tmp/x".into(),
            hash: String::new(),
        };
        assert!(ask.validate().is_err());
        assert!(RunRequest::Clock {
            t1_us: 0,
            arrived_us: None
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn a_batch_names_its_members_in_a_bounded_bitmap_checked_on_decode() {
        let covers = covers_bitmap(&[0, 3, 9, 1023]);
        assert_eq!(covers.len(), MAX_COVERS_BYTES);
        assert_eq!(covers_indices(&covers, 1024).unwrap(), vec![0, 3, 9, 1023]);
        let err = covers_indices(&covers, 1000).unwrap_err();
        assert!(err.contains("member 1023 of a roster of 1000"), "{err}");
        assert!(covers_indices(&[0, 0], 16).is_err(), "covers nobody");
        assert!(covers_indices(&[1; MAX_COVERS_BYTES + 1], 2000).is_err());
        let b = BatchMessage {
            run_id: "6932a8b2-0f3c".into(),
            seq: 7,
            covers: covers_bitmap(&[2, 5]),
            vus: 10,
            cpu: 0.5,
            metrics: vec![7; 5000],
        };
        assert!(b.validate().is_ok());
        // Metrics go as a byte string: a byte each, not an integer array.
        let wire = crate::mesh::to_cbor(&crate::mesh::GossipBody::Batch(Box::new(b.clone())));
        assert!(wire.len() < 5100, "{}", wire.len());
        let back: crate::mesh::GossipBody = ciborium::from_reader(&wire[..]).unwrap();
        assert_eq!(back, crate::mesh::GossipBody::Batch(Box::new(b.clone())));
        for bad in [
            BatchMessage {
                covers: vec![],
                ..b.clone()
            },
            BatchMessage {
                covers: vec![0, 0],
                ..b.clone()
            },
            BatchMessage {
                covers: vec![1; MAX_COVERS_BYTES + 1],
                ..b.clone()
            },
            BatchMessage {
                seq: MAX_RUN_SECONDS,
                ..b.clone()
            },
            BatchMessage {
                cpu: f64::NAN,
                ..b.clone()
            },
            BatchMessage {
                run_id: "../x".into(),
                ..b.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            let req = RunRequest::Batch(Box::new(bad));
            assert!(req.validate().is_err());
        }
    }

    #[test]
    fn ntp_offset() {
        // Server 1000 µs ahead, 200 µs each way.
        let (off, rtt) = clock_offset(10_000, 11_200, 11_250, 10_450);
        assert_eq!((off, rtt), (1000, 400));
    }

    #[test]
    fn messages_round_trip_cbor() {
        let m = RunMessage::Join {
            run_id: "6932a8b2-0f3c".into(),
            accept: false,
            reason: Some("target 10.0.0.1 not allowed".into()),
            name: "n".into(),
            labels: BTreeMap::new(),
            weight: 2,
        };
        let mut buf = Vec::new();
        ciborium::into_writer(&m, &mut buf).unwrap();
        let back: RunMessage = ciborium::from_reader(&buf[..]).unwrap();
        assert_eq!(back, m);
        assert!(back.validate().is_ok());
    }

    #[test]
    fn the_largest_summary_answer_fits_a_response() {
        let answer = crate::mesh::MeshResponse::Run(RunResponse::Summary {
            json: "x".repeat(MAX_SUMMARY_BYTES),
        });
        let mut buf = Vec::new();
        ciborium::into_writer(&answer, &mut buf).unwrap();
        assert!(
            buf.len() <= crate::mesh::MAX_RESPONSE_BYTES,
            "{}",
            buf.len()
        );
        let ask = crate::mesh::MeshRequest::Run(RunRequest::Summary {
            run_id: "6931f0a2-1b2c".into(),
        });
        let mut buf = Vec::new();
        ciborium::into_writer(&ask, &mut buf).unwrap();
        let back: crate::mesh::MeshRequest = ciborium::from_reader(&buf[..]).unwrap();
        assert_eq!(back, ask);
    }
}
