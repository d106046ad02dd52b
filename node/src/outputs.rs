//! Result files: `--out FORMAT=FILE` for json (the summary of spec §7), csv (the
//! timeline) and junit (thresholds as test cases), written once the run has ended.
//!
//! Parsing of the `--out` flags happens before the run starts, so a typo is a usage
//! error and never costs an hour of load. This module must not compute results.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::report::Summary;

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
    })
}

pub fn write(out: &Output, s: &Summary) -> Result<(), String> {
    let text = match out.format {
        Format::Json => serde_json::to_string_pretty(s).map_err(|e| e.to_string())?,
        Format::Csv => csv(s),
        Format::Junit => junit(s),
        Format::Html => crate::html::render(s),
    };
    std::fs::write(&out.path, text).map_err(|e| format!("cannot write {}: {e}", out.path.display()))
}

/// One row per timeline bucket; `width_s` (last, so older readers keep their columns)
/// says how many seconds a row spans: `rps` is per second, the counts are the bucket's.
pub fn csv(s: &Summary) -> String {
    let mut o = String::from(
        "t,requests,rps,p50_us,p90_us,p99_us,max_us,errors,iterations,dropped_iterations,bytes_received,vus,schedule_lag_p99_us,nodes,width_s\n",
    );
    for p in &s.timeline {
        let _ = writeln!(
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
                path: "a.json".into()
            }
        );
        assert!(parse("xml=a")
            .unwrap_err()
            .contains("unknown format \"xml\""));
        assert!(parse("json").is_err());
        assert!(parse("json=").is_err());
    }
}
