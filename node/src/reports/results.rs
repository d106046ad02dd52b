//! The node's durable run results, in its data dir: a per-run log of every snapshot
//! this node published or merged (kept until the run's report is built), and the
//! summaries of finished runs this node built (kept across restarts, the newest
//! [`KEEP_RUNS`] within [`KEEP_SUMMARY_BYTES`]).
//!
//! Layout (see docs/operations.md §3):
//!
//! ```text
//! DATA_DIR/runs/<run_id>/summary.json    the summary (0600, dir 0700), written atomically
//! DATA_DIR/runs/<run_id>/finished.json   its row for `stampede status` (small)
//! DATA_DIR/snapshots/<run_id>.log        length-prefixed, checksummed snapshot records
//! ```
//!
//! Why a log per run and no fsync per record: a record is one `write` to a file opened
//! for appending, so once `append` returns it is in the kernel's page cache and survives
//! the node process being killed; only a machine crash can lose the last records, and
//! [`SnapshotLog`] stops cleanly at a torn or corrupt record. A summary is the one thing
//! that must survive a machine crash too, so it is written to a temporary file, fsynced,
//! renamed, and its directory fsynced.
//!
//! Every run id is checked against the format the node makes ([`valid_run_id`]) before
//! it becomes a path, so nothing a peer or a client names reaches outside `runs/` and
//! `snapshots/`; everything read back is bounded before it is allocated. This module
//! must not talk to the network, decide when a run is finished, or build summaries.

use std::fs;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stampede_protocol::mesh::MAX_GOSSIP_BYTES;
use stampede_protocol::run::{RunResponse, SnapshotMessage, MAX_SUMMARY_BYTES};

use crate::reports::summary::Summary;

/// Finished runs kept in the data dir; saving one more removes the oldest.
pub const KEEP_RUNS: usize = 50;
/// The summaries kept may take at most this much (the newest is always kept).
pub const KEEP_SUMMARY_BYTES: u64 = 512 * 1024 * 1024;
/// The largest summary saved or read back here (JSON bytes): about 260 bytes per second
/// of the run and of each node, so some 70 node-hours. Only those up to
/// [`MAX_SUMMARY_BYTES`] can also be sent to another node.
pub const MAX_SAVED_SUMMARY_BYTES: usize = 64 * 1024 * 1024;
/// Snapshot logs kept of runs that never got their report here (a node that crashed
/// mid-run, a member whose run was never forgotten): the oldest beyond it go.
pub const KEEP_LOGS: usize = 20;
/// The largest snapshot record accepted back: a snapshot is one gossip message at most.
pub const MAX_RECORD_BYTES: usize = MAX_GOSSIP_BYTES + 64 * 1024;
/// The largest `finished.json` read back.
const MAX_ROW_BYTES: u64 = 64 * 1024;

const RUNS_DIR: &str = "results";
const LOGS_DIR: &str = "snapshots";
const SUMMARY_FILE: &str = "summary.json";
const ROW_FILE: &str = "finished.json";
/// Record header: payload length (u32 LE), then the first 4 bytes of its SHA-256.
const HEADER: usize = 8;

/// Whether `id` has the shape `embedded::new_run_id` makes: up to 16 lowercase hex
/// digits (Unix seconds), `-`, 4 lowercase hex digits. Nothing else can be a path
/// component here. (Helper H1 adds `stampede_protocol::run::validate_run_id`; once it
/// is merged this defers to it.)
pub fn valid_run_id(id: &str) -> bool {
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match id.split_once('-') {
        Some((secs, rand)) => {
            (1..=16).contains(&secs.len()) && rand.len() == 4 && hex(secs) && hex(rand)
        }
        None => false,
    }
}

/// [`valid_run_id`], as the one-sentence error a user or a peer gets.
pub fn check_run_id(id: &str) -> Result<(), String> {
    if valid_run_id(id) {
        Ok(())
    } else {
        let shown: String = id.chars().take(40).collect();
        Err(format!(
            "\"{shown}\" is not a run id (like 6931f0a2-1b2c, as `stampede status` shows)"
        ))
    }
}

/// A finished run as `stampede status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinishedRun {
    pub run_id: String,
    pub plan: String,
    pub started_at: String,
    pub duration_s: f64,
    pub requests: u64,
    pub failed: u64,
    /// Node names of the run, in roster order.
    pub members: Vec<String>,
    pub lost: Vec<String>,
    /// When this node saved it (Unix ms): the order of the list and of retention.
    pub saved_unix_ms: u64,
}

impl FinishedRun {
    fn of(s: &Summary, saved_unix_ms: u64) -> FinishedRun {
        FinishedRun {
            run_id: s.run_id.clone(),
            plan: s.plan.clone(),
            started_at: s.started_at.clone(),
            duration_s: s.duration_s,
            requests: s.totals.requests,
            failed: s.totals.failed,
            members: s.nodes.iter().map(|n| n.name.clone()).collect(),
            lost: s
                .nodes
                .iter()
                .filter(|n| n.status == "lost")
                .map(|n| n.name.clone())
                .collect(),
            saved_unix_ms,
        }
    }
}

/// One record of a snapshot log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub node: String,
    pub seq: u64,
    /// What was appended: for the coordinator, a [`SnapshotMessage`] as CBOR.
    pub bytes: Vec<u8>,
}

impl LogRecord {
    /// The snapshot this record holds, when it was appended by [`Results::append_snapshot`].
    pub fn snapshot(&self) -> Result<SnapshotMessage, String> {
        stampede_protocol::mesh::from_cbor(&self.bytes, MAX_RECORD_BYTES, "a logged snapshot")
            .map_err(|e| e.to_string())
    }
}

/// The node's results store: a data dir and its retention bounds.
#[derive(Debug, Clone)]
pub struct Results {
    data_dir: PathBuf,
    keep_runs: usize,
    keep_summary_bytes: u64,
}

impl Results {
    /// The store in `data_dir`; directories are made when first written.
    pub fn new(data_dir: &Path) -> Results {
        Results {
            data_dir: data_dir.to_path_buf(),
            keep_runs: KEEP_RUNS,
            keep_summary_bytes: KEEP_SUMMARY_BYTES,
        }
    }

    /// The same store with other retention bounds (tests).
    pub fn with_retention(mut self, runs: usize, summary_bytes: u64) -> Results {
        self.keep_runs = runs.max(1);
        self.keep_summary_bytes = summary_bytes;
        self
    }

    fn runs_dir(&self) -> PathBuf {
        self.data_dir.join(RUNS_DIR)
    }

    fn logs_dir(&self) -> PathBuf {
        self.data_dir.join(LOGS_DIR)
    }

    /// `runs/<run_id>`, only for a valid run id, and proven to sit right under `runs/`.
    fn run_dir(&self, run_id: &str) -> Result<PathBuf, String> {
        check_run_id(run_id)?;
        let root = self.runs_dir();
        let dir = root.join(run_id);
        confined(&root, &dir)?;
        // Nothing here is written as a symlink; one would lead outside `runs/`.
        if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(format!("{} is not a directory", dir.display()));
        }
        Ok(dir)
    }

    fn log_path(&self, run_id: &str) -> Result<PathBuf, String> {
        check_run_id(run_id)?;
        let root = self.logs_dir();
        let path = root.join(format!("{run_id}.log"));
        confined(&root, &path)?;
        Ok(path)
    }

    // ------------------------------------------------------------ snapshot log

    /// Appends one record to the run's snapshot log (one `write`; no fsync: see the
    /// module doc). Records larger than [`MAX_RECORD_BYTES`] are refused.
    pub fn append(&self, run_id: &str, node: &str, seq: u64, bytes: &[u8]) -> Result<(), String> {
        let path = self.log_path(run_id)?;
        let node_len = u16::try_from(node.len())
            .map_err(|_| format!("node id of {} bytes is too long to log", node.len()))?;
        let payload_len = 2 + node.len() + 8 + bytes.len();
        if payload_len > MAX_RECORD_BYTES {
            return Err(format!(
                "snapshot record of {payload_len} bytes exceeds {MAX_RECORD_BYTES}"
            ));
        }
        let mut record = Vec::with_capacity(HEADER + payload_len);
        record.extend_from_slice(&(payload_len as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        record.extend_from_slice(&node_len.to_le_bytes());
        record.extend_from_slice(node.as_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(bytes);
        let sum = checksum(&record[HEADER..]);
        record[4..HEADER].copy_from_slice(&sum);
        private_dir(&self.logs_dir())?;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        f.write_all(&record)
            .map_err(|e| format!("cannot append to {}: {e}", path.display()))
    }

    /// Logs a snapshot this node published or merged.
    pub fn append_snapshot(&self, s: &SnapshotMessage) -> Result<(), String> {
        let mut bytes = Vec::new();
        ciborium::into_writer(s, &mut bytes).map_err(|e| format!("cannot encode: {e}"))?;
        self.append(&s.run_id, &s.node, s.seq, &bytes)
    }

    /// The run's snapshot log from the start; empty when there is none.
    pub fn read(&self, run_id: &str) -> Result<SnapshotLog, String> {
        let path = self.log_path(run_id)?;
        let file = match fs::File::open(&path) {
            Ok(f) => Some(BufReader::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(SnapshotLog {
            file,
            path,
            offset: 0,
            torn: None,
        })
    }

    /// Removes the run's snapshot log (its report is built, or the run is forgotten).
    pub fn remove(&self, run_id: &str) -> Result<(), String> {
        let path = self.log_path(run_id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
        }
    }

    // ------------------------------------------------------------ summaries

    /// Saves a finished run's summary atomically (temp file, fsync, rename, fsync of
    /// the directory) with its status row, then applies retention.
    pub fn save_summary(&self, s: &Summary) -> Result<(), String> {
        let dir = self.run_dir(&s.run_id)?;
        let json = serde_json::to_vec(s).map_err(|e| format!("cannot encode the summary: {e}"))?;
        if json.len() > MAX_SAVED_SUMMARY_BYTES {
            return Err(format!(
                "the summary of run {} is {} bytes, over the {MAX_SAVED_SUMMARY_BYTES} a node keeps",
                s.run_id,
                json.len()
            ));
        }
        private_dir(&self.runs_dir())?;
        private_dir(&dir)?;
        let row = FinishedRun::of(s, crate::run::embedded::unix_ms());
        let row = serde_json::to_vec(&row).map_err(|e| format!("cannot encode: {e}"))?;
        // The row goes last: a run is listed only once its summary is complete.
        for (name, bytes) in [(SUMMARY_FILE, &json), (ROW_FILE, &row)] {
            let path = dir.join(name);
            crate::mesh::key::write_private(&path, bytes)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        self.prune(&s.run_id);
        Ok(())
    }

    /// The saved summary's JSON, if this node has it (size-checked before reading).
    pub fn load_summary_json(&self, run_id: &str) -> Result<Option<String>, String> {
        let path = self.run_dir(run_id)?.join(SUMMARY_FILE);
        match read_bounded(&path, MAX_SAVED_SUMMARY_BYTES as u64)? {
            Some(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| format!("{} is not UTF-8", path.display())),
            None => Ok(None),
        }
    }

    /// The saved summary, if this node has it; it must name the run it is filed under.
    pub fn load_summary(&self, run_id: &str) -> Result<Option<Summary>, String> {
        let Some(json) = self.load_summary_json(run_id)? else {
            return Ok(None);
        };
        parse_summary(run_id, &json).map(Some)
    }

    /// The answer to a peer's `RunRequest::Summary`: quick (the size is looked at
    /// first, then one read of at most [`MAX_SUMMARY_BYTES`]).
    pub fn summary_answer(&self, run_id: &str) -> RunResponse {
        let refused = |reason: String| RunResponse::Refused {
            reason: stampede_protocol::run::clip_reason(reason),
        };
        let path = match self.run_dir(run_id) {
            Ok(dir) => dir.join(SUMMARY_FILE),
            Err(e) => return refused(e),
        };
        let size = fs::symlink_metadata(&path).map_or(0, |m| m.len());
        if size > MAX_SUMMARY_BYTES as u64 {
            return refused(format!(
                "the summary of run {run_id} is {size} bytes, more than the mesh carries ({MAX_SUMMARY_BYTES}): run `stampede report` on this node"
            ));
        }
        match read_bounded(&path, MAX_SUMMARY_BYTES as u64) {
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(json) => RunResponse::Summary { json },
                Err(_) => refused(format!("the summary of run {run_id} is not UTF-8")),
            },
            Ok(None) => refused(format!("no summary of run {run_id} here")),
            Err(_) => refused(format!("the summary of run {run_id} cannot be read here")),
        }
    }

    /// Finished runs saved here, newest first.
    pub fn list(&self) -> Vec<FinishedRun> {
        let Ok(entries) = fs::read_dir(self.runs_dir()) else {
            return Vec::new();
        };
        let mut runs: Vec<FinishedRun> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let id = e.file_name().into_string().ok()?;
                // Only real directories named like a run: no symlink is followed.
                if !valid_run_id(&id) || !e.file_type().ok()?.is_dir() {
                    return None;
                }
                let bytes = read_bounded(&e.path().join(ROW_FILE), MAX_ROW_BYTES).ok()??;
                let row: FinishedRun = serde_json::from_slice(&bytes).ok()?;
                (row.run_id == id).then_some(row)
            })
            .collect();
        runs.sort_by(|a, b| (b.saved_unix_ms, &b.run_id).cmp(&(a.saved_unix_ms, &a.run_id)));
        runs
    }

    /// Keeps the newest runs within the count and size bounds (never `just_saved`),
    /// and the newest snapshot logs of runs not reported here.
    fn prune(&self, just_saved: &str) {
        let (mut count, mut bytes) = (0usize, 0u64);
        for run in self.list() {
            let Ok(dir) = self.run_dir(&run.run_id) else {
                continue;
            };
            let size = fs::metadata(dir.join(SUMMARY_FILE)).map_or(0, |m| m.len());
            count += 1;
            bytes += size;
            let keep = run.run_id == just_saved
                || (count <= self.keep_runs && bytes <= self.keep_summary_bytes);
            if !keep {
                if let Err(e) = fs::remove_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an old run");
                }
            }
        }
        let _ = self.remove(just_saved);
        self.prune_logs();
    }

    fn prune_logs(&self) {
        let Ok(entries) = fs::read_dir(self.logs_dir()) else {
            return;
        };
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .is_some_and(valid_run_id)
                    && e.file_type().is_ok_and(|t| t.is_file())
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        logs.sort_by_key(|l| std::cmp::Reverse(l.0));
        for (_, path) in logs.into_iter().skip(KEEP_LOGS) {
            let _ = fs::remove_file(path);
        }
    }
}

/// A summary's JSON, checked to name `run_id`.
pub fn parse_summary(run_id: &str, json: &str) -> Result<Summary, String> {
    if json.len() > MAX_SAVED_SUMMARY_BYTES {
        return Err(format!(
            "a summary of {} bytes is over the {MAX_SAVED_SUMMARY_BYTES} limit",
            json.len()
        ));
    }
    let s: Summary = serde_json::from_str(json).map_err(|e| format!("not a run summary: {e}"))?;
    if s.run_id != run_id {
        return Err(format!(
            "the summary asked for as run {run_id} is of run {}",
            s.run_id
        ));
    }
    Ok(s)
}

/// The records of a run's snapshot log, oldest first. Iteration stops at the end of
/// the file or at the first record that is torn (cut short by a crash), corrupt
/// (checksum) or oversized; [`SnapshotLog::torn`] then says where and why.
pub struct SnapshotLog {
    file: Option<BufReader<fs::File>>,
    path: PathBuf,
    offset: u64,
    torn: Option<String>,
}

impl SnapshotLog {
    /// Why reading stopped before the end of the file, if it did.
    pub fn torn(&self) -> Option<&str> {
        self.torn.as_deref()
    }

    fn stop(&mut self, why: String) -> Option<LogRecord> {
        self.torn = Some(format!(
            "{}: record at byte {}: {why}; the rest is ignored",
            self.path.display(),
            self.offset
        ));
        self.file = None;
        None
    }
}

impl Iterator for SnapshotLog {
    type Item = LogRecord;

    fn next(&mut self) -> Option<LogRecord> {
        let file = self.file.as_mut()?;
        let mut header = [0u8; HEADER];
        match read_full(file, &mut header) {
            Ok(0) => {
                self.file = None;
                return None;
            }
            Ok(n) if n < HEADER => return self.stop(format!("header cut short at {n} bytes")),
            Ok(_) => {}
            Err(e) => return self.stop(e.to_string()),
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(10..=MAX_RECORD_BYTES).contains(&len) {
            return self.stop(format!("length {len} out of bounds"));
        }
        let mut payload = vec![0u8; len];
        match read_full(file, &mut payload) {
            Ok(n) if n < len => return self.stop(format!("{n} of {len} bytes")),
            Ok(_) => {}
            Err(e) => return self.stop(e.to_string()),
        }
        if checksum(&payload) != header[4..] {
            return self.stop("checksum mismatch".into());
        }
        let node_len = u16::from_le_bytes([payload[0], payload[1]]) as usize;
        if 2 + node_len + 8 > len {
            return self.stop(format!("node id of {node_len} bytes overruns the record"));
        }
        let Ok(node) = String::from_utf8(payload[2..2 + node_len].to_vec()) else {
            return self.stop("node id is not UTF-8".into());
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&payload[2 + node_len..2 + node_len + 8]);
        self.offset += (HEADER + len) as u64;
        Some(LogRecord {
            node,
            seq: u64::from_le_bytes(seq),
            bytes: payload[2 + node_len + 8..].to_vec(),
        })
    }
}

/// Reads until `buf` is full or the file ends; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn checksum(payload: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(payload);
    [d[0], d[1], d[2], d[3]]
}

/// A file's bytes if it exists, refused beyond `limit` before anything is allocated.
/// Symlinks are not followed: nothing in these directories is written as one.
fn read_bounded(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, String> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let len = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len > limit {
        return Err(format!(
            "{} is {len} bytes, over the {limit} allowed",
            path.display()
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{} grew past {limit} bytes", path.display()));
    }
    Ok(Some(bytes))
}

/// Makes `dir` (mode 0700), or narrows an existing one to 0700.
fn private_dir(dir: &Path) -> Result<(), String> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
        }
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// `path` is a direct child of `root` (a run id is one plain path component).
fn confined(root: &Path, path: &Path) -> Result<(), String> {
    if path.parent() == Some(root) && path.components().count() == root.components().count() + 1 {
        Ok(())
    } else {
        Err(format!("{} is outside {}", path.display(), root.display()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::reports::summary::{Generator, Stats};

    /// A summary with `requests` in its totals and `padding` bytes of plan source.
    pub(crate) fn summary(run_id: &str, requests: u64, padding: usize) -> Summary {
        Summary {
            schema_version: crate::reports::summary::SUMMARY_SCHEMA_VERSION,
            run_id: run_id.into(),
            plan: "shop".into(),
            started_at: "2026-12-05T19:00:00.000Z".into(),
            duration_s: 4.0,
            totals: Stats {
                requests,
                failed: 1,
                ..Stats::default()
            },
            requests: BTreeMap::new(),
            flows: BTreeMap::new(),
            scenarios: BTreeMap::new(),
            nodes: Vec::new(),
            by_label: BTreeMap::new(),
            timeline: Vec::new(),
            thresholds: Vec::new(),
            events: Vec::new(),
            generator: Generator::default(),
            start_skew_us: 0,
            plan_source: "x".repeat(padding),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_summary_is_saved_atomically_private_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        let s = summary("6931f0a2-1b2c", 540, 10);
        r.save_summary(&s).unwrap();
        let dir = tmp.path().join("results/6931f0a2-1b2c");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("summary.json")), 0o600);
        assert_eq!(mode(&tmp.path().join("results")), 0o700);
        // Nothing half-written is left beside it.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["finished.json", "summary.json"]);
        assert_eq!(r.load_summary("6931f0a2-1b2c").unwrap(), Some(s.clone()));
        assert_eq!(r.load_summary("6931f0a2-ffff").unwrap(), None);
        // A crash mid-write leaves only a temp file: the saved summary is untouched, and
        // the next save goes through.
        fs::write(dir.join("summary.tmp"), b"{\"half").unwrap();
        assert_eq!(r.load_summary("6931f0a2-1b2c").unwrap(), Some(s.clone()));
        let s2 = summary("6931f0a2-1b2c", 541, 10);
        r.save_summary(&s2).unwrap();
        assert_eq!(r.load_summary("6931f0a2-1b2c").unwrap(), Some(s2));
        let rows = r.list();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].requests, rows[0].failed), (541, 1));
        assert_eq!(rows[0].plan, "shop");
    }

    #[test]
    fn a_summary_filed_under_another_run_or_too_large_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        r.save_summary(&summary("6931f0a2-1b2c", 1, 0)).unwrap();
        let other = tmp.path().join("results/6931f0a2-0000");
        fs::create_dir_all(&other).unwrap();
        fs::copy(
            tmp.path().join("results/6931f0a2-1b2c/summary.json"),
            other.join("summary.json"),
        )
        .unwrap();
        let e = r.load_summary("6931f0a2-0000").unwrap_err();
        assert!(e.contains("is of run 6931f0a2-1b2c"), "{e}");
        let big = summary("6931f0a2-2222", 1, MAX_SAVED_SUMMARY_BYTES);
        let e = r.save_summary(&big).unwrap_err();
        assert!(e.contains("over the"), "{e}");
        // One the mesh cannot carry is kept here, and a peer is told where to read it.
        let large = summary("6931f0a2-3333", 1, MAX_SUMMARY_BYTES);
        r.save_summary(&large).unwrap();
        assert_eq!(r.load_summary("6931f0a2-3333").unwrap(), Some(large));
        match r.summary_answer("6931f0a2-3333") {
            RunResponse::Refused { reason } => assert!(reason.contains("on this node"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A file grown past the limit is refused before it is read.
        let f = fs::File::create(other.join("summary.json")).unwrap();
        f.set_len(MAX_SAVED_SUMMARY_BYTES as u64 + 1).unwrap();
        let e = r.load_summary("6931f0a2-0000").unwrap_err();
        assert!(e.contains("over the"), "{e}");
        assert!(matches!(
            r.summary_answer("6931f0a2-0000"),
            RunResponse::Refused { .. }
        ));
    }

    #[test]
    fn retention_keeps_the_newest_runs_within_count_and_size() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path()).with_retention(3, u64::MAX);
        for i in 0..5u64 {
            r.save_summary(&summary(&format!("{:x}-0001", 0x100 + i), i, 0))
                .unwrap();
            // saved_unix_ms orders the list; keep them a millisecond apart.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let ids: Vec<String> = r.list().into_iter().map(|x| x.run_id).collect();
        assert_eq!(ids, ["104-0001", "103-0001", "102-0001"]);
        assert!(!tmp.path().join("results/100-0001").exists());
        // By size: a cap of two and a half summaries keeps two.
        let one = fs::metadata(tmp.path().join("results/104-0001/summary.json"))
            .unwrap()
            .len()
            + 1000;
        let r = Results::new(tmp.path()).with_retention(50, one * 5 / 2);
        r.save_summary(&summary("105-0001", 0, 1000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        r.save_summary(&summary("106-0001", 0, 1000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        r.save_summary(&summary("107-0001", 0, 1000)).unwrap();
        let ids: Vec<String> = r.list().into_iter().map(|x| x.run_id).collect();
        assert_eq!(ids, ["107-0001", "106-0001"]);
        // The newest is kept even when it alone is over the cap.
        let r = Results::new(tmp.path()).with_retention(50, 10);
        r.save_summary(&summary("108-0001", 0, 1000)).unwrap();
        let ids: Vec<String> = r.list().into_iter().map(|x| x.run_id).collect();
        assert_eq!(ids, ["108-0001"]);
    }

    #[test]
    fn run_ids_that_are_not_run_ids_never_become_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        for bad in [
            "",
            "..",
            "../6931f0a2-1b2c",
            "6931f0a2-1b2c/..",
            "/etc/passwd",
            "6931f0a2-1B2C",
            "6931f0a2-1b2",
            "6931f0a2_1b2c",
            "0123456789abcdef0-1b2c",
            "-1b2c",
        ] {
            assert!(!valid_run_id(bad), "{bad}");
            let mut s = summary("6931f0a2-1b2c", 1, 0);
            s.run_id = bad.into();
            let e = r.save_summary(&s).unwrap_err();
            assert!(e.contains("is not a run id"), "{bad}: {e}");
            assert!(r.load_summary(bad).is_err());
            assert!(r.append(bad, "n", 0, b"x").is_err());
            assert!(r.read(bad).is_err());
            assert!(r.remove(bad).is_err());
            assert!(matches!(r.summary_answer(bad), RunResponse::Refused { .. }));
        }
        assert!(valid_run_id("6931f0a2-1b2c"));
        assert!(valid_run_id(&crate::run::embedded::new_run_id()));
        // Nothing was created outside the data dir, nor anything under it.
        assert!(!tmp.path().join("results").exists());
        // Foreign entries and symlinked runs are not listed.
        fs::create_dir_all(tmp.path().join("results/not-a-run")).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        Results::new(elsewhere.path())
            .save_summary(&summary("6931f0a2-1b2c", 1, 0))
            .unwrap();
        std::os::unix::fs::symlink(
            elsewhere.path().join("results/6931f0a2-1b2c"),
            tmp.path().join("results/6931f0a2-1b2c"),
        )
        .unwrap();
        assert!(r.list().is_empty());
        assert!(r.load_summary("6931f0a2-1b2c").is_err());
    }

    #[test]
    fn the_snapshot_log_reads_back_and_stops_at_a_torn_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        let run = "6931f0a2-1b2c";
        assert_eq!(r.read(run).unwrap().count(), 0);
        for seq in 0..3u64 {
            let s = SnapshotMessage {
                run_id: run.into(),
                node: "12D3KooWnode".into(),
                seq,
                vus: 2,
                cpu: 0.5,
                metrics: vec![seq as u8; 100],
            };
            r.append_snapshot(&s).unwrap();
        }
        let path = tmp.path().join("snapshots/6931f0a2-1b2c.log");
        assert_eq!(mode(&path), 0o600);
        let mut log = r.read(run).unwrap();
        let got: Vec<SnapshotMessage> = log.by_ref().map(|x| x.snapshot().unwrap()).collect();
        assert_eq!(got.iter().map(|s| s.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(got[2].metrics, vec![2u8; 100]);
        assert!(log.torn().is_none());
        // A crash mid-write: the last record cut short.
        let len = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 7).unwrap();
        let mut log = r.read(run).unwrap();
        assert_eq!(log.by_ref().map(|x| x.seq).collect::<Vec<_>>(), [0, 1]);
        assert!(log.torn().unwrap().contains("bytes"), "{:?}", log.torn());
        // Appending after the crash: the torn record still ends what is read.
        r.append(run, "n", 9, b"after").unwrap();
        assert_eq!(r.read(run).unwrap().count(), 2);
        // A flipped byte in a record is caught by its checksum.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 5] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let mut log = r.read(run).unwrap();
        assert_eq!(log.by_ref().count(), 0);
        assert!(log.torn().unwrap().contains("checksum"));
        r.remove(run).unwrap();
        assert!(!path.exists());
        r.remove(run).unwrap();
    }

    #[test]
    fn an_oversized_record_length_is_refused_before_allocating() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        let run = "6931f0a2-1b2c";
        let e = r
            .append(run, "n", 0, &vec![0u8; MAX_RECORD_BYTES])
            .unwrap_err();
        assert!(e.contains("exceeds"), "{e}");
        fs::create_dir_all(tmp.path().join("snapshots")).unwrap();
        let mut junk = u32::MAX.to_le_bytes().to_vec();
        junk.extend_from_slice(&[0; 12]);
        fs::write(tmp.path().join("snapshots/6931f0a2-1b2c.log"), junk).unwrap();
        let mut log = r.read(run).unwrap();
        assert!(log.next().is_none());
        assert!(log.torn().unwrap().contains("out of bounds"));
    }

    #[test]
    fn saving_a_summary_drops_its_snapshot_log_and_old_logs() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Results::new(tmp.path());
        for i in 0..(KEEP_LOGS as u64 + 3) {
            r.append(&format!("{:x}-0002", 0x200 + i), "n", 0, b"x")
                .unwrap();
        }
        r.append("6931f0a2-1b2c", "n", 0, b"x").unwrap();
        r.save_summary(&summary("6931f0a2-1b2c", 1, 0)).unwrap();
        let logs = fs::read_dir(tmp.path().join("snapshots")).unwrap().count();
        assert_eq!(logs, KEEP_LOGS);
        assert!(!tmp.path().join("snapshots/6931f0a2-1b2c.log").exists());
    }
}
