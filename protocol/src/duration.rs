//! TEMPORARY stub — replaced by the segments branch.
use std::time::Duration;
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("ms") {
        return v
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| e.to_string());
    }
    if let Some(v) = s.strip_suffix('s') {
        return v
            .parse::<f64>()
            .map(Duration::from_secs_f64)
            .map_err(|e| e.to_string());
    }
    if let Some(v) = s.strip_suffix('m') {
        return v
            .parse::<u64>()
            .map(|m| Duration::from_secs(m * 60))
            .map_err(|e| e.to_string());
    }
    Err(format!("bad duration {s}"))
}
pub fn format_duration(d: Duration) -> String {
    format!("{d:?}")
}
