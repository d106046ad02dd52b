//! A timeline tier's older closed buckets on disk, so that what a node holds in memory
//! for a run does not grow with the run's length: one append-only file per tier that
//! spills, in the node's data dir, unlinked as soon as it is open (the kernel drops it
//! with the last handle: a crash leaves nothing behind, and there is no path to
//! confine), read back whole when a report or the live view asks for that tier.
//!
//! Owns the file and its record format. Must not decide what is spilled or when (the
//! [`crate::reports::aggregate::Timeline`] does), and must not hide a failure: every
//! error goes back to the caller, which keeps the buckets in memory instead.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use stampede_protocol::run::TimelinePoint;

/// One change to the tier's buckets, replayed in order when the file is read.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Record {
    /// A closed bucket leaving memory; a later one with the same start replaces it.
    Put(TimelinePoint),
    /// A late second for a bucket older than every one in memory: its counts are added
    /// to that bucket if the file holds it, or it is the bucket if not (as in memory).
    Late(TimelinePoint),
}

/// The longest record read back: a point with its two maps full (64 entries of 64-byte
/// keys each, `MAX_POINT_ENTRIES`) is ~10 KB; anything longer is not ours.
const MAX_RECORD: u32 = 64 << 10;

#[derive(Debug)]
pub(crate) struct SpillFile {
    file: File,
    /// Bytes of whole records written: reads stop here, so a write that failed half way
    /// leaves nothing half read.
    len: u64,
    records: usize,
}

impl SpillFile {
    /// A new, already unlinked file in `dir`.
    pub(crate) fn create(dir: &Path) -> io::Result<SpillFile> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = dir.join(format!(
            ".timeline-{}-{}.spill",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(SpillFile {
            file,
            len: 0,
            records: 0,
        })
    }

    pub(crate) fn records(&self) -> usize {
        self.records
    }

    pub(crate) fn append(&mut self, r: &Record) -> io::Result<()> {
        let mut buf = vec![0u8; 4];
        ciborium::into_writer(r, &mut buf).map_err(io::Error::other)?;
        let n = u32::try_from(buf.len() - 4)
            .ok()
            .filter(|n| *n <= MAX_RECORD)
            .ok_or_else(|| io::Error::other("timeline record too long to spill"))?;
        buf[..4].copy_from_slice(&n.to_le_bytes());
        self.file.write_all_at(&buf, self.len)?;
        self.len += buf.len() as u64;
        self.records += 1;
        Ok(())
    }

    /// The tier's spilled buckets by start second, every record replayed.
    pub(crate) fn read(&self) -> io::Result<BTreeMap<u64, TimelinePoint>> {
        let mut bytes = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        let mut out: BTreeMap<u64, TimelinePoint> = BTreeMap::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (head, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| io::Error::other("spilled timeline cut short"))?;
            let n = u32::from_le_bytes(*head);
            if n > MAX_RECORD || n as usize > tail.len() {
                return Err(io::Error::other("spilled timeline record out of bounds"));
            }
            let (body, tail) = tail.split_at(n as usize);
            match ciborium::from_reader::<Record, _>(body).map_err(io::Error::other)? {
                Record::Put(p) => {
                    out.insert(p.t, p);
                }
                Record::Late(p) => match out.get_mut(&p.t) {
                    Some(q) => add_point_counts(q, &p),
                    None => {
                        out.insert(p.t, p);
                    }
                },
            }
            rest = tail;
        }
        Ok(out)
    }
}

/// Adds a late second's counts to a bucket (its percentiles stay the bucket's: the
/// histogram is gone), as `aggregate::add_counts` does in memory.
pub(crate) fn add_point_counts(q: &mut TimelinePoint, p: &TimelinePoint) {
    q.requests += p.requests;
    q.rps = q.requests as f64 / q.width_s.max(1) as f64;
    q.errors += p.errors;
    for (class, n) in &p.errors_by_class {
        *q.errors_by_class.entry(class.clone()).or_default() += n;
    }
    q.iterations += p.iterations;
    q.dropped_iterations += p.dropped_iterations;
    q.bytes_received += p.bytes_received;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: u64, requests: u64) -> TimelinePoint {
        TimelinePoint {
            t,
            width_s: 10,
            requests,
            rps: requests as f64 / 10.0,
            p99_us: 700 + t,
            errors_by_class: BTreeMap::from([("http_5xx".to_string(), 1)]),
            ..Default::default()
        }
    }

    #[test]
    fn records_replay_in_order_and_the_file_leaves_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        f.append(&Record::Put(point(0, 5))).unwrap();
        f.append(&Record::Put(point(10, 7))).unwrap();
        // A late second for a bucket on file adds its counts; for one never seen it is
        // the bucket; a second Put replaces.
        f.append(&Record::Late(point(10, 2))).unwrap();
        f.append(&Record::Late(point(30, 1))).unwrap();
        f.append(&Record::Put(point(0, 6))).unwrap();
        let got = f.read().unwrap();
        assert_eq!(f.records(), 5);
        let summary: Vec<(u64, u64, u64, u64)> = got
            .values()
            .map(|p| (p.t, p.requests, p.p99_us, p.errors_by_class["http_5xx"]))
            .collect();
        assert_eq!(
            summary,
            vec![(0, 6, 700, 1), (10, 9, 710, 2), (30, 1, 730, 1)]
        );
    }

    #[test]
    fn a_record_out_of_bounds_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = SpillFile::create(dir.path()).unwrap();
        f.append(&Record::Put(point(0, 5))).unwrap();
        // Someone wrote a length far past the end (only a bug or a disk fault can).
        f.file.write_all_at(&u32::MAX.to_le_bytes(), f.len).unwrap();
        f.len += 4;
        let e = f.read().unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }
}
