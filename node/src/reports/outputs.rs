//! Result files: `--out FORMAT=FILE` for json (the summary of spec §7), csv (the
//! timeline) and junit (thresholds as test cases), written once the run has ended.
//!
//! Parsing of the `--out` flags happens before the run starts, so a typo is a usage
//! error and never costs an hour of load. Writing attempts every file, each one
//! atomically (a temp file in the same directory, then a rename: a reader never sees
//! half a report, and a failed write leaves the old file), and reports every failure.
//! This module must not compute results.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use stampede_protocol::named::{Kind, Named};

use crate::reports::summary::Summary;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Html,
    Junit,
    Csv,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub format: Format,
    pub path: PathBuf,
    /// For html: a baseline run's summary, as script-safe JSON, drawn beside this run.
    pub baseline: Option<std::sync::Arc<String>>,
}

/// Parses `json=FILE` and friends.
pub fn parse(spec: &str) -> Result<Output, String> {
    let (f, path) = spec
        .split_once('=')
        .ok_or_else(|| format!("--out \"{spec}\": expected FORMAT=FILE, e.g. json=summary.json"))?;
    let format = match f {
        "json" => Format::Json,
        "html" => Format::Html,
        "junit" => Format::Junit,
        "csv" => Format::Csv,
        _ => {
            return Err(format!(
                "--out \"{spec}\": unknown format \"{f}\" (json, html, junit or csv)"
            ))
        }
    };
    if path.is_empty() {
        return Err(format!("--out \"{spec}\": the file name is missing"));
    }
    Ok(Output {
        format,
        path: PathBuf::from(path),
        baseline: None,
    })
}

pub fn write(out: &Output, s: &Summary) -> Result<(), String> {
    let text = match out.format {
        Format::Json => serde_json::to_string_pretty(s).map_err(|e| e.to_string())?,
        Format::Csv => csv(s),
        Format::Junit => junit(s),
        Format::Html => crate::reports::html::render_with_baseline(
            s,
            out.baseline.as_deref().map(String::as_str),
        ),
    };
    write_file(&out.path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", out.path.display()))
}

/// Writes every output, whatever fails before it; says `wrote FILE` for each one
/// written, and returns every failure, one per line.
pub fn write_all(outs: &[Output], s: &Summary) -> Result<(), String> {
    let mut failed = Vec::new();
    for o in outs {
        match write(o, s) {
            Ok(()) => eprintln!("wrote {}", o.path.display()),
            Err(e) => failed.push(e),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

/// A regular file (or a new one) is replaced atomically: temp file beside it, then
/// rename. Anything else that exists — `/dev/stdout`, a FIFO, `/dev/full` — is written
/// in place: renaming over it would replace the device or pipe the user named.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.write_all(bytes)?;
            return f.flush();
        }
        _ => {}
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// One row per timeline bucket; `width_s` (last, so older readers keep their columns)
/// says how many seconds a row spans: `rps` is per second, the counts are the bucket's.
pub fn csv(s: &Summary) -> String {
    // Named metrics (WebSocket, gRPC, ...) come after `width_s`, one fixed column each:
    // a counter's count, a duration's p99 in µs; 0 where a second recorded none.
    let named: Vec<String> = Named::ALL
        .iter()
        .map(|n| match n.kind() {
            Kind::Counter => n.name().to_string(),
            Kind::Duration => format!("{}_p99_us", n.name()),
        })
        .collect();
    let mut o = String::from(
        "t,requests,rps,p50_us,p90_us,p99_us,max_us,errors,iterations,dropped_iterations,bytes_received,vus,schedule_lag_p99_us,nodes,width_s",
    );
    for c in &named {
        o.push(',');
        o.push_str(c);
    }
    o.push('\n');
    for p in &s.timeline {
        let _ = write!(
            o,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            p.t,
            p.requests,
            p.rps,
            p.p50_us,
            p.p90_us,
            p.p99_us,
            p.max_us,
            p.errors,
            p.iterations,
            p.dropped_iterations,
            p.bytes_received,
            p.vus,
            p.schedule_lag_p99_us,
            p.nodes,
            p.width_s
        );
        for c in &named {
            let _ = write!(o, ",{}", p.named.get(c).copied().unwrap_or(0));
        }
        o.push('\n');
    }
    o
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn junit(s: &Summary) -> String {
    let failures = s.thresholds.iter().filter(|t| !t.passed).count();
    let mut o = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        o,
        "<testsuites name=\"stampede\" tests=\"{}\" failures=\"{failures}\">",
        s.thresholds.len()
    );
    let _ = writeln!(
        o,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" time=\"{}\" timestamp=\"{}\">",
        xml_escape(&s.plan),
        s.thresholds.len(),
        s.duration_s,
        xml_escape(&s.started_at)
    );
    for t in &s.thresholds {
        let name = xml_escape(&format!("{}: {}", t.metric, t.expr));
        if t.passed {
            let _ = writeln!(
                o,
                "    <testcase classname=\"thresholds\" name=\"{name}\"/>"
            );
        } else {
            let _ = writeln!(o, "    <testcase classname=\"thresholds\" name=\"{name}\">");
            let _ = writeln!(
                o,
                "      <failure message=\"{}\"/>",
                xml_escape(&format!("measured {} does not satisfy {}", t.value, t.expr))
            );
            let _ = writeln!(o, "    </testcase>");
        }
    }
    o.push_str("  </testsuite>\n</testsuites>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_out_flags() {
        assert_eq!(
            parse("json=a.json").unwrap(),
            Output {
                format: Format::Json,
                path: "a.json".into(),
                baseline: None,
            }
        );
        assert!(parse("xml=a")
            .unwrap_err()
            .contains("unknown format \"xml\""));
        assert!(parse("json").is_err());
        assert!(parse("json=").is_err());
    }

    #[test]
    fn a_file_is_replaced_whole_and_no_temp_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, "old").unwrap();
        write_file(&p, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        let err = write_file(&dir.path().join("no/such/r.json"), b"x");
        assert!(err.is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
