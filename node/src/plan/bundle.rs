//! A run's plan bundle on this node: compiles the plan with data read only from the
//! bundle's own files, checks its targets against the node's allowlist, and keeps a
//! private copy of the bundle's files under `DATA_DIR/runs/<run id>` (0700 dirs, 0600
//! files, every path proven inside the runs dir), pruned by [`prune_runs`].
//! It must not talk to the mesh or keep run state (the coordinator does).
//!
//! Retention: when a run's directory is created, the runs dir keeps only the
//! [`RUNS_KEPT`] newest run directories and none older than [`RUN_DIR_MAX_AGE`]. A run
//! never reads its directory after its plan is compiled (data lives in memory), so
//! pruning cannot disturb a run in progress; the directory being created is never
//! removed.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stampede_protocol::plan::parse_plan;
use stampede_protocol::run::{validate_run_id, Bundle};

use crate::plan::compile::{CompiledPlan, DataFiles};

/// Run directories kept under `DATA_DIR/runs`, the newest first.
pub const RUNS_KEPT: usize = 20;
/// A run directory older than this is removed when the next one is created.
pub const RUN_DIR_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// `DATA_DIR/runs`.
pub fn runs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("runs")
}

/// Compiles a bundle's plan for run `run_id` (data only from the bundle's files), keeps
/// a copy of its files under the run's directory and checks every target host against
/// this node's allowlist: an error means the plan itself is unusable here;
/// `Some(reason)` beside the plan is this node's named refusal.
pub fn prepare_bundle(
    bundle: &Bundle,
    data_dir: &Path,
    run_id: &str,
    allow: &[String],
) -> Result<(Arc<CompiledPlan>, Option<String>), String> {
    bundle.validate()?;
    validate_run_id(run_id)?;
    let plan = parse_plan(&bundle.plan_name, &bundle.plan).map_err(|e| e.to_string())?;
    let mut plan = crate::plan::compile::compile_from(
        plan,
        &bundle.plan_name,
        DataFiles::Bundle(&bundle.files),
    )
    .map_err(|e| e.to_string())?;
    plan.source = bundle.plan.clone();
    let dir = create_run_dir(data_dir, run_id)?;
    for (name, data) in &bundle.files {
        write_confined(&dir, name, data)?;
    }
    if let Err(e) = prune_runs(data_dir, RUNS_KEPT, Some(run_id)) {
        tracing::warn!(error = %e, "cannot prune old run directories");
    }
    let refusal = check_targets(&plan, allow).err();
    Ok((Arc::new(plan), refusal))
}

/// Creates (or reuses) `DATA_DIR/runs/<run_id>`, both 0700, and returns its canonical
/// path after proving it is a directory right inside the canonical runs dir.
pub fn create_run_dir(data_dir: &Path, run_id: &str) -> Result<PathBuf, String> {
    validate_run_id(run_id)?;
    let runs = runs_dir(data_dir);
    private_dir(&runs, true)?;
    private_dir(&runs.join(run_id), false)?;
    let runs_real = canonical(&runs)?;
    let dir = canonical(&runs.join(run_id))?;
    if dir.parent() != Some(runs_real.as_path()) {
        return Err(format!(
            "run directory {} is not inside {}",
            dir.display(),
            runs_real.display()
        ));
    }
    Ok(dir)
}

/// Writes a bundle file at `name` (relative, as the plan names it) under `dir` (0600,
/// atomically), after proving that its parent resolves to a directory inside `dir`.
fn write_confined(dir: &Path, name: &str, data: &[u8]) -> Result<(), String> {
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\0')
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(format!(
            "plan bundle file name {name:?} is not a plain relative path"
        ));
    }
    let target = dir.join(rel);
    let Some(parent) = target.parent() else {
        return Err(format!("plan bundle file name {name:?} has no directory"));
    };
    // Each missing directory on the way is made 0700; an existing one that resolves
    // elsewhere (a symlink) is caught by the check below.
    let mut at = dir.to_path_buf();
    for part in parent
        .strip_prefix(dir)
        .unwrap_or(Path::new(""))
        .components()
    {
        at.push(part);
        private_dir(&at, false)?;
    }
    let parent_real = canonical(parent)?;
    if !parent_real.starts_with(dir) {
        return Err(format!(
            "plan bundle file {name:?} would be written outside the run directory"
        ));
    }
    let file = parent_real.join(target.file_name().unwrap_or_default());
    crate::mesh::key::write_private(&file, data)
        .map_err(|e| format!("cannot write {}: {e}", file.display()))
}

/// Creates `path` 0700 (its parents too when `parents`), or tightens an existing
/// directory to 0700: a run dir may hold credentials (CSV data).
fn private_dir(path: &Path, parents: bool) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let made = std::fs::DirBuilder::new()
        .recursive(parents)
        .mode(0o700)
        .create(path);
    match made {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    // Also an existing one (made 0755 by an older node, or by someone else): a link or
    // a file in its place is refused, a directory is tightened.
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} exists and is not a directory", path.display()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))
}

fn canonical(p: &Path) -> Result<PathBuf, String> {
    p.canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", p.display()))
}

/// Applies the retention rule to `DATA_DIR/runs`: keeps the `keep` newest run
/// directories (by modification time) and removes the rest, and any older than
/// [`RUN_DIR_MAX_AGE`]. `current` (the run being prepared) is never removed, and
/// neither is anything that is not a real directory named like a run id. Returns how
/// many directories were removed.
pub fn prune_runs(data_dir: &Path, keep: usize, current: Option<&str>) -> Result<usize, String> {
    let runs = runs_dir(data_dir);
    let entries = match std::fs::read_dir(&runs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot list {}: {e}", runs.display())),
    };
    let now = SystemTime::now();
    let mut dirs: Vec<(SystemTime, String)> = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if validate_run_id(&name).is_err() || Some(name.as_str()) == current {
            continue;
        }
        // symlink_metadata: a link is never followed, so never removed through.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            dirs.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), name));
        }
    }
    // Newest first; the current run takes one of the `keep` places.
    dirs.sort_by(|a, b| b.cmp(a));
    let room = keep.saturating_sub(current.is_some() as usize);
    let mut removed = 0;
    for (i, (modified, name)) in dirs.iter().enumerate() {
        let old = now
            .duration_since(*modified)
            .is_ok_and(|age| age > RUN_DIR_MAX_AGE);
        if i >= room || old {
            let path = runs.join(name);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot remove an old run directory")
                }
            }
        }
    }
    Ok(removed)
}

/// Refuses a plan whose fixed target hosts this node's operator did not allow.
fn check_targets(plan: &CompiledPlan, allow: &[String]) -> Result<(), String> {
    let list = crate::http::Allowlist::from_entries(allow).map_err(|e| e.to_string())?;
    crate::run::embedded::refuse_unallowed_targets(plan, &list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    const PLAN: &str = r#"
[defaults]
base_url = "http://127.0.0.1:9"
[data.s]
file = "FILE"
format = "csv"
[scenarios.a]
executor = "shared-iterations"
vus = 1
iterations = 1
[flows.f]
steps = [{ request = { url = "/?u={{ s.user }}" } }]
"#;

    fn bundle(file: &str, files: &[(&str, &[u8])]) -> Bundle {
        Bundle {
            plan_name: "p.toml".into(),
            plan: PLAN.replace("FILE", file),
            files: files
                .iter()
                .map(|(n, d)| (n.to_string(), d.to_vec()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A plan naming a data file it did not ship is refused on the node, naming the
    /// field; nothing on the node's disk is read, so no content can leak.
    #[test]
    fn data_files_come_only_from_the_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let secret = tmp.path().join("secret.csv");
        std::fs::write(&secret, "SECRET_1,x\nhunter2,y\n").unwrap();
        let data_dir = tmp.path().join("a").join("b");
        let run = "6932a8b2-0f3c";
        for named in [
            "../../secret.csv".to_string(),
            secret.display().to_string(),
            "/etc/passwd".to_string(),
        ] {
            let err = prepare_bundle(&bundle(&named, &[]), &data_dir, run, &[]).unwrap_err();
            assert!(err.contains("data.s.file"), "{err}");
            assert!(err.contains("not a file of the plan bundle"), "{err}");
            assert!(!err.contains("SECRET") && !err.contains("hunter2"), "{err}");
        }
        // Shipped, it is used; the copy on disk is private.
        let b = bundle("users.csv", &[("users.csv", b"user\nann\n")]);
        let (plan, refusal) =
            prepare_bundle(&b, &data_dir, run, &["loopback".to_string()]).unwrap();
        assert!(refusal.is_none());
        assert_eq!(plan.feeders[0].data.columns, vec!["user"]);
        let dir = runs_dir(&data_dir).join(run);
        assert_eq!(mode(&runs_dir(&data_dir)), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("users.csv")), 0o600);
    }

    /// A hostile run id never becomes a path, even past the message checks.
    #[test]
    fn run_ids_that_are_paths_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle("users.csv", &[("users.csv", b"user\nann\n")]);
        for id in ["../../x", "/tmp/x", "..", "r"] {
            let err = prepare_bundle(&b, tmp.path(), id, &[]).unwrap_err();
            assert!(err.contains("run id"), "{err}");
        }
        assert!(!runs_dir(tmp.path()).exists());
    }

    /// A directory inside the run dir that is a symlink elsewhere is not written through.
    #[test]
    fn a_symlinked_directory_does_not_lead_a_file_outside_the_run_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let run = "6932a8b2-0f3c";
        let dir = create_run_dir(tmp.path(), run).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("d")).unwrap();
        let err = write_confined(&dir, "d/users.csv", b"user\nann\n").unwrap_err();
        assert!(err.contains("d exists and is not a directory"), "{err}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        // An existing runs dir made 0755 by an older node is tightened.
        std::fs::set_permissions(runs_dir(tmp.path()), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        create_run_dir(tmp.path(), run).unwrap();
        assert_eq!(mode(&runs_dir(tmp.path())), 0o700);
    }

    #[test]
    fn pruning_keeps_the_newest_runs_and_the_current_one() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = runs_dir(tmp.path());
        std::fs::create_dir_all(&runs).unwrap();
        let ids: Vec<String> = (0..6).map(|i| format!("6932a8b{i}-0000")).collect();
        for (i, id) in ids.iter().enumerate() {
            std::fs::create_dir(runs.join(id)).unwrap();
            let f = std::fs::File::open(runs.join(id)).unwrap();
            let t = SystemTime::now() - Duration::from_secs(600 - i as u64 * 60);
            f.set_modified(t).unwrap();
        }
        // Old beyond the age limit, and not a run dir at all: only the first goes.
        let ancient = "1-0000";
        std::fs::create_dir(runs.join(ancient)).unwrap();
        std::fs::File::open(runs.join(ancient))
            .unwrap()
            .set_modified(SystemTime::now() - RUN_DIR_MAX_AGE - Duration::from_secs(60))
            .unwrap();
        std::fs::create_dir(runs.join("notes")).unwrap();
        let removed = prune_runs(tmp.path(), 3, Some(&ids[0])).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&runs)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // ids[0] is the oldest but current; ids[4], ids[5] are the 2 newest others.
        assert_eq!(
            left,
            vec![
                ids[0].clone(),
                ids[4].clone(),
                ids[5].clone(),
                "notes".into()
            ]
        );
        assert_eq!(removed, 4);
    }
}
