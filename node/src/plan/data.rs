//! Data feeders (`[data.NAME]` in a plan): loading CSV / JSON-lines files into rows, and
//! choosing which row a VU uses for an iteration.
//!
//! A [`DataSet`] is parsed once per node and shared read-only (behind an `Arc`) by all of
//! the node's VUs. Row choice is a pure function of its inputs wherever possible so that a
//! mesh partitions data without talking: in `unique` mode global VU `g` (0-based across the
//! whole mesh) of `total_vus` owns the rows `r` with `r % total_vus == g`, so two VUs (and so
//! two nodes) never use the same row. This module must not read plan TOML, schedule VUs or
//! render templates; the caller maps plan keys to [`FeedMode`] / [`OnExhausted`].
//!
//! CSV is read by the `csv` crate (RFC 4180: fields may be quoted, `"a, b"`, `""` for a
//! quote, line breaks inside quotes; LF, CRLF or CR line ends); a UTF-8 BOM is skipped;
//! blank lines are skipped; the first row is the header, its names trimmed, values kept as
//! written; every row must have as many fields as the header. As in the crate (and
//! Python's `csv`), a `"` inside an unquoted field is a literal character and text after
//! a closing quote joins the field; a quote that is never closed is an error here, as it
//! would swallow the rest of the file.
//! JSON lines: one object per line; the first object's keys are the columns; a later line
//! lacking a key gives an empty value and keys the first object lacks are ignored; strings
//! are taken as is, `null` as empty, other values as compact JSON text.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Most bytes of one data file: every node holds all of its rows in memory.
pub const MAX_DATA_BYTES: u64 = 256 * 1024 * 1024;
/// Most rows of one data file (a row costs tens of bytes beyond its text).
pub const MAX_DATA_ROWS: usize = 10_000_000;
/// Most columns of one data file.
pub const MAX_DATA_COLUMNS: usize = 1024;

/// The file format of a data feeder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Csv,
    JsonLines,
}

impl FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(DataFormat::Csv),
            "jsonl" | "ndjson" | "json-lines" | "jsonlines" => Ok(DataFormat::JsonLines),
            other => Err(format!(
                "unknown data format `{other}` (expected csv or jsonl)"
            )),
        }
    }
}

impl DataFormat {
    /// The format named by `explicit` (a plan's `format` key), else by the file extension
    /// (`.csv`, `.jsonl`, `.ndjson`).
    pub fn detect(path: &Path, explicit: Option<DataFormat>) -> Option<DataFormat> {
        if explicit.is_some() {
            return explicit;
        }
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(DataFormat::Csv),
            "jsonl" | "ndjson" => Some(DataFormat::JsonLines),
            _ => None,
        }
    }
}

/// How VUs share a feeder's rows (`mode` in the plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedMode {
    /// Every row belongs to exactly one VU in the whole mesh.
    Unique,
    /// The node's VUs walk the rows in order through one shared cursor.
    SharedSequential,
    /// Each pick is a uniform draw with the VU's seeded generator.
    Random,
}

impl FromStr for FeedMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unique" => Ok(FeedMode::Unique),
            "shared-sequential" => Ok(FeedMode::SharedSequential),
            "random" => Ok(FeedMode::Random),
            other => Err(format!(
                "unknown data mode `{other}` (expected unique, shared-sequential or random)"
            )),
        }
    }
}

/// What happens when a VU (unique) or the node (shared-sequential) has used all its rows
/// (`on_exhausted` in the plan). Random mode never runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Start again from the first row it owns.
    #[default]
    Recycle,
    /// Report [`RowPick::Exhausted`]; the VU should stop iterating.
    Stop,
}

impl FromStr for OnExhausted {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "recycle" => Ok(OnExhausted::Recycle),
            "stop" => Ok(OnExhausted::Stop),
            other => Err(format!(
                "unknown on_exhausted `{other}` (expected recycle or stop)"
            )),
        }
    }
}

/// A data feeder that could not be loaded or cannot serve the plan.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data.{name}: cannot read {}: {source}", path.display())]
    Io {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data.{name}: {file} line {line}: {message}")]
    Parse {
        name: String,
        file: String,
        line: usize,
        message: String,
    },
    #[error("{message}")]
    Invalid { name: String, message: String },
}

/// The result of asking a feeder for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowPick<'a> {
    Row(&'a [String]),
    /// No row is left for this VU under `on_exhausted = "stop"` (or it owns none).
    Exhausted,
}

/// The rows of one feeder, shared read-only by the node's VUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSet {
    pub name: String,
    pub columns: Vec<String>,
    rows: Vec<Box<[String]>>,
}

/// Reads and parses the feeder file at `path` (the caller resolves it relative to the
/// plan). The format is `format` if given, else taken from the extension.
pub fn load(name: &str, path: &Path, format: Option<DataFormat>) -> Result<DataSet, DataError> {
    let Some(format) = DataFormat::detect(path, format) else {
        return Err(DataError::Invalid {
            name: name.to_string(),
            message: format!(
                "data.{name}: cannot tell the format of {} from its extension; name it .csv, .jsonl or .ndjson, or set format = \"csv\" | \"jsonl\"",
                path.display()
            ),
        });
    };
    let io = |source| DataError::Io {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    // Read at most one byte past the limit: a bigger file is refused without being
    // read whole (it may also be growing, or not a regular file).
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open(path).map_err(io)?, MAX_DATA_BYTES + 1),
        &mut bytes,
    )
    .map_err(io)?;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    parse(name, &file, &bytes, format)
}

/// Parses feeder contents already in memory (e.g. from a plan bundle); `file` is the name
/// used in error messages.
pub fn parse(
    name: &str,
    file: &str,
    bytes: &[u8],
    format: DataFormat,
) -> Result<DataSet, DataError> {
    let err = |line: usize, message: String| DataError::Parse {
        name: name.to_string(),
        file: file.to_string(),
        line,
        message,
    };
    if bytes.len() as u64 > MAX_DATA_BYTES {
        return Err(DataError::Invalid {
            name: name.to_string(),
            message: format!(
                "data.{name}: {file} is larger than the limit of {MAX_DATA_BYTES} bytes"
            ),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        err(line, "not valid UTF-8".to_string())
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (columns, rows) = match format {
        DataFormat::Csv => parse_csv(text).map_err(|(l, m)| err(l, m))?,
        DataFormat::JsonLines => parse_jsonl(text).map_err(|(l, m)| err(l, m))?,
    };
    if rows.is_empty() {
        return Err(DataError::Invalid {
            name: name.to_string(),
            message: format!("data.{name}: {file} has no data rows"),
        });
    }
    Ok(DataSet {
        name: name.to_string(),
        columns,
        rows,
    })
}

type Parsed = (Vec<String>, Vec<Box<[String]>>);

/// True when `raw` (one record's bytes as written) ends inside a quoted field. The `csv`
/// crate reads such a field to the end of the file without complaint, which would
/// silently swallow every row after a missing `"`.
fn ends_in_open_quote(raw: &[u8]) -> bool {
    let raw = skip_line_ends(raw);
    let mut quoted = false;
    let mut field_start = true;
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if quoted {
            if c == b'"' {
                if raw.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if field_start && c == b'"' {
            quoted = true;
        }
        field_start = !quoted && c == b',';
        i += 1;
    }
    quoted
}

/// `raw` without the line ends before it: the crate may place a record's start on the `\n`
/// of the CRLF before it.
fn skip_line_ends(raw: &[u8]) -> &[u8] {
    let n = raw
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    &raw[n..]
}

fn parse_csv(text: &str) -> Result<Parsed, (usize, String)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        // Rows of the wrong width get our own message naming both counts.
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut record = csv::StringRecord::new();
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    let mut last_start = 0;
    // The crate's own line count misses line breaks inside quotes, so a line is counted
    // from the record's byte offset, and only when an error needs it.
    let line_at = |byte: usize| {
        let start = text.len() - skip_line_ends(&text.as_bytes()[byte.min(text.len())..]).len();
        // LF, CRLF and a lone CR each end a line.
        let b = &text.as_bytes()[..start];
        b.iter()
            .enumerate()
            .filter(|&(i, &c)| c == b'\n' || (c == b'\r' && b.get(i + 1) != Some(&b'\n')))
            .count()
            + 1
    };
    loop {
        let at = reader.position().byte() as usize;
        let more = reader.read_record(&mut record).map_err(|e| {
            let at = e.position().map_or(at, |p| p.byte() as usize);
            (line_at(at), e.to_string())
        })?;
        if !more {
            break;
        }
        let start = record.position().map_or(at, |p| p.byte() as usize);
        last_start = start;
        let line = || line_at(start);
        let raw = skip_line_ends(&text.as_bytes()[start..]);
        if record.len() == 1 && record[0].trim().is_empty() && !raw.starts_with(b"\"") {
            continue;
        }
        let Some(columns) = &header else {
            if record.len() > MAX_DATA_COLUMNS {
                return Err((
                    line(),
                    format!(
                        "the header has {} columns, limit {MAX_DATA_COLUMNS}",
                        record.len()
                    ),
                ));
            }
            let columns: Vec<String> = record.iter().map(|c| c.trim().to_string()).collect();
            for (i, c) in columns.iter().enumerate() {
                if c.is_empty() {
                    return Err((line(), format!("header column {} has no name", i + 1)));
                }
                if columns[..i].contains(c) {
                    return Err((line(), format!("header names column `{c}` twice")));
                }
            }
            header = Some(columns);
            continue;
        };
        if rows.len() == MAX_DATA_ROWS {
            return Err((line(), format!("more than {MAX_DATA_ROWS} rows")));
        }
        if record.len() != columns.len() {
            if ends_in_open_quote(raw) {
                return Err((
                    line(),
                    "quoted field is never closed (a `\"` is missing)".to_string(),
                ));
            }
            return Err((
                line(),
                format!(
                    "row has {} field{} but the header has {} column{}",
                    record.len(),
                    if record.len() == 1 { "" } else { "s" },
                    columns.len(),
                    if columns.len() == 1 { "" } else { "s" },
                ),
            ));
        }
        rows.push(record.iter().map(str::to_string).collect());
    }
    if ends_in_open_quote(&text.as_bytes()[last_start..]) {
        return Err((
            line_at(last_start),
            "quoted field is never closed (a `\"` is missing)".to_string(),
        ));
    }
    match header {
        Some(columns) => Ok((columns, rows)),
        None => Err((
            1,
            "the file is empty; a CSV feeder needs a header row".to_string(),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_jsonl(text: &str) -> Result<Parsed, (usize, String)> {
    let mut columns: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        let l = raw.trim();
        if l.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l).map_err(|e| (line, format!("invalid JSON: {e}")))?;
        let Value::Object(map) = v else {
            return Err((
                line,
                format!("expected a JSON object, found {}", json_kind(&v)),
            ));
        };
        if rows.len() == MAX_DATA_ROWS {
            return Err((line, format!("more than {MAX_DATA_ROWS} rows")));
        }
        let cols = columns.get_or_insert_with(|| map.keys().cloned().collect());
        if cols.len() > MAX_DATA_COLUMNS {
            return Err((
                line,
                format!(
                    "the first object has {} keys, limit {MAX_DATA_COLUMNS}",
                    cols.len()
                ),
            ));
        }
        if cols.is_empty() {
            return Err((
                line,
                "the first object has no keys, so there are no columns".to_string(),
            ));
        }
        let row: Vec<String> = cols
            .iter()
            .map(|c| match map.get(c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            })
            .collect();
        rows.push(row.into_boxed_slice());
    }
    match columns {
        Some(c) => Ok((c, rows)),
        None => Err((
            1,
            "the file is empty; a JSON-lines feeder needs at least one object".to_string(),
        )),
    }
}

/// Picks the `k`-th row of the stripe `owner` (of `owners`) over `n` rows: the rows `r` with
/// `r % owners == owner`, in order.
fn stripe_pick(n: usize, owner: u64, owners: u64, k: u64, on: OnExhausted) -> Option<usize> {
    let n = n as u64;
    if owners == 0 || owner >= owners || owner >= n {
        return None;
    }
    let owned = (n - 1 - owner) / owners + 1;
    let j = match on {
        OnExhausted::Recycle => k % owned,
        OnExhausted::Stop if k < owned => k,
        OnExhausted::Stop => return None,
    };
    usize::try_from(owner + j * owners).ok()
}

impl DataSet {
    /// Builds a data set from rows already in memory (every row must have one value per
    /// column).
    pub fn from_rows(
        name: &str,
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
    ) -> Result<DataSet, DataError> {
        if let Some((i, r)) = rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != columns.len())
        {
            return Err(DataError::Invalid {
                name: name.to_string(),
                message: format!(
                    "data.{name}: row {} has {} values but there are {} columns",
                    i + 1,
                    r.len(),
                    columns.len()
                ),
            });
        }
        Ok(DataSet {
            name: name.to_string(),
            columns,
            rows: rows.into_iter().map(Vec::into_boxed_slice).collect(),
        })
    }

    /// Number of data rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row at `index`, if it exists.
    pub fn row(&self, index: usize) -> Option<&[String]> {
        self.rows.get(index).map(|r| &r[..])
    }

    /// The index of a column by name.
    pub fn column_index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }

    /// Unique mode: the row for global VU `global_vu` (0-based across the mesh, of
    /// `total_vus` VU slots in the plan) on its 0-based `iteration`. The VU owns rows
    /// `global_vu`, `global_vu + total_vus`, …; it cycles over them (recycle) or gets
    /// `Exhausted` after the last (stop). A VU that owns no row always gets `Exhausted`.
    pub fn unique_row(
        &self,
        global_vu: u64,
        total_vus: u64,
        iteration: u64,
        on_exhausted: OnExhausted,
    ) -> RowPick<'_> {
        self.pick_index(stripe_pick(
            self.rows.len(),
            global_vu,
            total_vus,
            iteration,
            on_exhausted,
        ))
    }

    /// Shared-sequential mode: the next row of the node's stripe, advancing `cursor`.
    pub fn shared_row(&self, cursor: &SharedCursor, on_exhausted: OnExhausted) -> RowPick<'_> {
        let k = cursor.next.fetch_add(1, Ordering::Relaxed);
        self.pick_index(stripe_pick(
            self.rows.len(),
            cursor.node_offset,
            cursor.node_stride,
            k,
            on_exhausted,
        ))
    }

    /// Random mode: a uniform draw with the VU's generator (see [`vu_rng`]).
    pub fn random_row(&self, rng: &mut SmallRng) -> RowPick<'_> {
        if self.rows.is_empty() {
            return RowPick::Exhausted;
        }
        RowPick::Row(&self.rows[rng.random_range(0..self.rows.len())])
    }

    /// Refuses unique mode when some VU would own no row.
    pub fn check_unique(&self, total_vus: u64) -> Result<(), DataError> {
        if (self.rows.len() as u64) < total_vus {
            return Err(DataError::Invalid {
                name: self.name.clone(),
                message: format!(
                    "data.{} has {} rows but the plan runs up to {} VUs; unique mode needs one row per VU at least",
                    self.name,
                    self.rows.len(),
                    total_vus
                ),
            });
        }
        Ok(())
    }

    fn pick_index(&self, index: Option<usize>) -> RowPick<'_> {
        match index.and_then(|i| self.rows.get(i)) {
            Some(r) => RowPick::Row(r),
            None => RowPick::Exhausted,
        }
    }
}

/// The node's cursor for shared-sequential mode. With `(node_offset, node_stride) = (0, 1)`
/// the node walks every row from the first (nodes overlap); given `(i, n)` for node `i` of
/// `n`, nodes walk disjoint stripes (rows `r % n == i`), so the mesh never shares a row
/// until it recycles. A node whose offset is not below the row count gets no row.
#[derive(Debug)]
pub struct SharedCursor {
    next: AtomicU64,
    node_offset: u64,
    node_stride: u64,
}

impl SharedCursor {
    pub fn new(node_offset: u64, node_stride: u64) -> Self {
        SharedCursor {
            next: AtomicU64::new(0),
            node_offset,
            node_stride: node_stride.max(1),
        }
    }

    /// A cursor over all rows, for a node that takes no part in striping.
    pub fn per_node() -> Self {
        Self::new(0, 1)
    }
}

/// A VU's generator, derived from the plan seed and its global VU index so that runs with
/// one seed draw the same numbers whichever node hosts the VU. Use the same generator for
/// templates and random feeders.
pub fn vu_rng(seed: u64, global_vu: u64) -> SmallRng {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    SmallRng::seed_from_u64(splitmix(seed ^ splitmix(global_vu)))
}

/// A loaded feeder with its mode: the one object a node's VUs ask for rows.
#[derive(Debug)]
pub struct Feeder {
    pub data: Arc<DataSet>,
    pub mode: FeedMode,
    pub on_exhausted: OnExhausted,
    cursor: SharedCursor,
}

impl Feeder {
    /// A feeder whose shared-sequential cursor walks all rows (see [`SharedCursor`]).
    pub fn new(data: Arc<DataSet>, mode: FeedMode, on_exhausted: OnExhausted) -> Self {
        Feeder {
            data,
            mode,
            on_exhausted,
            cursor: SharedCursor::per_node(),
        }
    }

    /// Gives this node stripe `node_offset` of `node_stride` in shared-sequential mode.
    pub fn with_stripe(mut self, node_offset: u64, node_stride: u64) -> Self {
        self.cursor = SharedCursor::new(node_offset, node_stride);
        self
    }

    /// The row for one iteration of a VU. `global_vu` is 0-based across the mesh,
    /// `total_vus` the plan's VU slot count, `iteration` the VU's 0-based iteration and
    /// `rng` its generator (used by random mode only).
    pub fn pick(
        &self,
        global_vu: u64,
        total_vus: u64,
        iteration: u64,
        rng: &mut SmallRng,
    ) -> RowPick<'_> {
        match self.mode {
            FeedMode::Unique => {
                self.data
                    .unique_row(global_vu, total_vus, iteration, self.on_exhausted)
            }
            FeedMode::SharedSequential => self.data.shared_row(&self.cursor, self.on_exhausted),
            FeedMode::Random => self.data.random_row(rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn csv(text: &str) -> Result<DataSet, DataError> {
        parse("accounts", "accounts.csv", text.as_bytes(), DataFormat::Csv)
    }

    fn jsonl(text: &str) -> Result<DataSet, DataError> {
        parse(
            "users",
            "users.jsonl",
            text.as_bytes(),
            DataFormat::JsonLines,
        )
    }

    fn rows(d: &DataSet) -> Vec<Vec<&str>> {
        (0..d.len())
            .map(|i| d.row(i).unwrap().iter().map(String::as_str).collect())
            .collect()
    }

    fn numbered(n: usize) -> DataSet {
        DataSet::from_rows(
            "n",
            vec!["i".into()],
            (0..n).map(|i| vec![i.to_string()]).collect(),
        )
        .unwrap()
    }

    fn index_of(p: RowPick<'_>) -> Option<usize> {
        match p {
            RowPick::Row(r) => Some(r[0].parse().unwrap()),
            RowPick::Exhausted => None,
        }
    }

    #[test]
    fn csv_basic_and_quoting() {
        let d = csv("user, password\nuser1,pass1\n\"smith, john\",\"say \"\"hi\"\"\"\n\"\",x\n")
            .unwrap();
        assert_eq!(d.columns, vec!["user", "password"]);
        assert_eq!(
            rows(&d),
            vec![
                vec!["user1", "pass1"],
                vec!["smith, john", "say \"hi\""],
                vec!["", "x"]
            ]
        );
        assert_eq!(d.column_index("password"), Some(1));
        assert_eq!(d.column_index("nope"), None);
    }

    #[test]
    fn csv_crlf_bom_blank_lines_and_no_final_newline() {
        let d = csv("\u{feff}a,b\r\n1,2\r\n\r\n\"x\r\ny\",3\r\n4, 5 ").unwrap();
        assert_eq!(d.columns, vec!["a", "b"]);
        assert_eq!(
            rows(&d),
            vec![vec!["1", "2"], vec!["x\r\ny", "3"], vec!["4", " 5 "]]
        );
        let d = csv("a\n1\n\n2\r").unwrap();
        assert_eq!(rows(&d), vec![vec!["1"], vec!["2"]]);
        let d = csv("a,b\n,\n").unwrap();
        assert_eq!(rows(&d), vec![vec!["", ""]]);
        let d = csv("a\n\"\"\n").unwrap();
        assert_eq!(rows(&d), vec![vec![""]], "a quoted empty field is a row");
        let d = csv("a,b\n5'11\",x\"y\n").unwrap();
        assert_eq!(rows(&d), vec![vec!["5'11\"", "x\"y"]]);
        let d = csv("a,b\né,\"ü\nß\"").unwrap();
        assert_eq!(rows(&d), vec![vec!["é", "ü\nß"]]);
    }

    #[test]
    fn csv_crate_rules_for_odd_input() {
        // CR alone ends a line too (old Mac files), also in error positions.
        let d = csv("a,b\r1,2\r3,4").unwrap();
        assert_eq!(rows(&d), vec![vec!["1", "2"], vec!["3", "4"]]);
        assert_eq!(
            csv("a,b\r1,2\r\n3\r").unwrap_err().to_string(),
            "data.accounts: accounts.csv line 3: row has 1 field but the header has 2 columns"
        );
        // A quoted header behind a BOM, and a line of spaces, which is blank.
        let d = csv("\u{feff}\"user id\",pw\n   \n\"u,1\",\"p\"\"1\"\n").unwrap();
        assert_eq!(d.columns, vec!["user id", "pw"]);
        assert_eq!(rows(&d), vec![vec!["u,1", "p\"1"]]);
        // Text after a closing quote joins the field, as in Python's csv.
        let d = csv("a,b\n\"x\"y,2\n").unwrap();
        assert_eq!(rows(&d), vec![vec!["xy", "2"]]);
    }

    #[test]
    fn csv_errors_name_file_and_line() {
        let e = |t: &str| csv(t).unwrap_err().to_string();
        assert_eq!(
            e("a,b\n1,2\n3\n"),
            "data.accounts: accounts.csv line 3: row has 1 field but the header has 2 columns"
        );
        assert_eq!(
            e("a,b\n\"multi\nline\",2\n1,2,3\n"),
            "data.accounts: accounts.csv line 4: row has 3 fields but the header has 2 columns"
        );
        assert_eq!(
            e("a,b\n1,2\n\"open,2\n3,4\n"),
            "data.accounts: accounts.csv line 3: quoted field is never closed (a `\"` is missing)"
        );
        assert_eq!(
            e("a,b\r\n\"x\r\ny\",2\r\n3,4\r\n5\r\n"),
            "data.accounts: accounts.csv line 5: row has 1 field but the header has 2 columns",
            "lines count from the file's start across CRLF and quoted line breaks"
        );
        assert_eq!(
            e("a,b\n1,2\n3,\"open\n4,5\n"),
            "data.accounts: accounts.csv line 3: quoted field is never closed (a `\"` is missing)"
        );
        assert_eq!(
            e("a,a\n1,2\n"),
            "data.accounts: accounts.csv line 1: header names column `a` twice"
        );
        assert_eq!(
            e("a,,b\n1,2,3\n"),
            "data.accounts: accounts.csv line 1: header column 2 has no name"
        );
        assert_eq!(
            e(""),
            "data.accounts: accounts.csv line 1: the file is empty; a CSV feeder needs a header row"
        );
        assert_eq!(
            e("\n\na,b\n"),
            "data.accounts: accounts.csv has no data rows"
        );
        let bad = parse(
            "accounts",
            "accounts.csv",
            b"a\nok\n\xff\n",
            DataFormat::Csv,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(bad, "data.accounts: accounts.csv line 3: not valid UTF-8");
    }

    #[test]
    fn jsonl_values_and_missing_keys() {
        let d = jsonl(
            "{\"user\":\"u1\",\"id\":1,\"vip\":true,\"tags\":[\"a\"],\"note\":null}\r\n\n{\"user\":\"u2\",\"extra\":5}\n",
        )
        .unwrap();
        let mut cols = d.columns.clone();
        cols.sort();
        assert_eq!(cols, vec!["id", "note", "tags", "user", "vip"]);
        let get = |r: usize, c: &str| d.row(r).unwrap()[d.column_index(c).unwrap()].clone();
        assert_eq!(get(0, "user"), "u1");
        assert_eq!(get(0, "id"), "1");
        assert_eq!(get(0, "vip"), "true");
        assert_eq!(get(0, "tags"), "[\"a\"]");
        assert_eq!(get(0, "note"), "");
        assert_eq!(get(1, "user"), "u2");
        assert_eq!(get(1, "id"), "");
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let e = |t: &str| jsonl(t).unwrap_err().to_string();
        let msg = e("{\"a\":1}\n\n{\"a\":2,}\n");
        assert!(
            msg.starts_with("data.users: users.jsonl line 3: invalid JSON: "),
            "{msg}"
        );
        assert_eq!(
            e("{\"a\":1}\n[1,2]\n"),
            "data.users: users.jsonl line 2: expected a JSON object, found an array"
        );
        assert_eq!(
            e("\"x\"\n"),
            "data.users: users.jsonl line 1: expected a JSON object, found a string"
        );
        assert_eq!(
            e("{}\n"),
            "data.users: users.jsonl line 1: the first object has no keys, so there are no columns"
        );
        assert_eq!(
            e("\n  \n"),
            "data.users: users.jsonl line 1: the file is empty; a JSON-lines feeder needs at least one object"
        );
    }

    #[test]
    fn load_detects_format_and_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("a.CSV");
        std::fs::write(&c, "x\n1\n").unwrap();
        assert_eq!(rows(&load("a", &c, None).unwrap()), vec![vec!["1"]]);
        let j = dir.path().join("b.ndjson");
        std::fs::write(&j, "{\"x\":\"2\"}\n").unwrap();
        assert_eq!(rows(&load("b", &j, None).unwrap()), vec![vec!["2"]]);
        let t = dir.path().join("c.txt");
        std::fs::write(&t, "{\"x\":3}\n").unwrap();
        let e = load("c", &t, None).unwrap_err().to_string();
        assert!(
            e.contains("data.c: cannot tell the format of") && e.contains("c.txt"),
            "{e}"
        );
        let d = load("c", &t, Some("jsonl".parse().unwrap())).unwrap();
        assert_eq!(rows(&d), vec![vec!["3"]]);
        let missing = dir.path().join("missing.csv");
        let e = load("m", &missing, None).unwrap_err().to_string();
        assert!(
            e.starts_with("data.m: cannot read ") && e.contains("missing.csv"),
            "{e}"
        );
        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "x,y\n1\n").unwrap();
        let e = load("bad", &bad, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "data.bad: bad.csv line 2: row has 1 field but the header has 2 columns"
        );
    }

    #[test]
    fn plan_words_parse() {
        assert_eq!("unique".parse(), Ok(FeedMode::Unique));
        assert_eq!("shared-sequential".parse(), Ok(FeedMode::SharedSequential));
        assert_eq!("random".parse(), Ok(FeedMode::Random));
        assert!("sequential"
            .parse::<FeedMode>()
            .unwrap_err()
            .contains("`sequential`"));
        assert_eq!("stop".parse(), Ok(OnExhausted::Stop));
        assert_eq!(OnExhausted::default(), OnExhausted::Recycle);
        assert!("loop".parse::<OnExhausted>().is_err());
        assert_eq!("CSV".parse(), Ok(DataFormat::Csv));
        assert!("xml".parse::<DataFormat>().is_err());
    }

    #[test]
    fn unique_capacity_check() {
        let d = numbered(50);
        assert_eq!(
            DataSet { name: "accounts".into(), ..d.clone() }
                .check_unique(200)
                .unwrap_err()
                .to_string(),
            "data.accounts has 50 rows but the plan runs up to 200 VUs; unique mode needs one row per VU at least"
        );
        assert!(d.check_unique(50).is_ok());
    }

    #[test]
    fn unique_recycle_and_stop() {
        let d = numbered(10);
        // VU 1 of 4 owns rows 1, 5, 9.
        let recycle: Vec<_> = (0..7)
            .map(|k| index_of(d.unique_row(1, 4, k, OnExhausted::Recycle)))
            .collect();
        assert_eq!(
            recycle,
            vec![
                Some(1),
                Some(5),
                Some(9),
                Some(1),
                Some(5),
                Some(9),
                Some(1)
            ]
        );
        let stop: Vec<_> = (0..4)
            .map(|k| index_of(d.unique_row(3, 4, k, OnExhausted::Stop)))
            .collect();
        assert_eq!(stop, vec![Some(3), Some(7), None, None]);
        assert_eq!(
            d.unique_row(10, 12, 0, OnExhausted::Recycle),
            RowPick::Exhausted
        );
        assert_eq!(
            d.unique_row(4, 4, 0, OnExhausted::Recycle),
            RowPick::Exhausted
        );
        assert_eq!(
            d.unique_row(0, 0, 0, OnExhausted::Recycle),
            RowPick::Exhausted
        );
        assert_eq!(
            index_of(d.unique_row(0, 1, u64::MAX, OnExhausted::Recycle)),
            Some((u64::MAX % 10) as usize)
        );
    }

    #[test]
    fn shared_cursor_is_disjoint_across_threads() {
        let d = Arc::new(numbered(1000));
        let f = Arc::new(Feeder::new(
            d,
            FeedMode::SharedSequential,
            OnExhausted::Stop,
        ));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut rng = vu_rng(1, t);
                    let mut got = Vec::new();
                    for _ in 0..400 {
                        match f.pick(t, 4, 0, &mut rng) {
                            RowPick::Row(r) => got.push(r[0].parse::<usize>().unwrap()),
                            RowPick::Exhausted => break,
                        }
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<usize> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn shared_stripes_split_rows_between_nodes() {
        let d = Arc::new(numbered(10));
        let mut seen = Vec::new();
        for node in 0..3 {
            let f = Feeder::new(d.clone(), FeedMode::SharedSequential, OnExhausted::Stop)
                .with_stripe(node, 3);
            let mut rng = vu_rng(0, 0);
            for _ in 0..10 {
                if let Some(i) = index_of(f.pick(0, 1, 0, &mut rng)) {
                    assert_eq!(i as u64 % 3, node);
                    seen.push(i);
                }
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let f = Feeder::new(d, FeedMode::SharedSequential, OnExhausted::Recycle);
        let mut rng = vu_rng(0, 0);
        let walk: Vec<_> = (0..12)
            .map(|_| index_of(f.pick(0, 1, 0, &mut rng)).unwrap())
            .collect();
        assert_eq!(walk, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn random_is_seeded_and_in_range() {
        let d = Arc::new(numbered(7));
        let f = Feeder::new(d, FeedMode::Random, OnExhausted::Stop);
        let draw = |seed, vu| {
            let mut rng = vu_rng(seed, vu);
            (0..200)
                .map(|k| index_of(f.pick(vu, 10, k, &mut rng)).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(42, 3);
        assert_eq!(a, draw(42, 3));
        assert_ne!(a, draw(42, 4));
        assert_ne!(a, draw(43, 3));
        assert_eq!(a.iter().copied().collect::<HashSet<_>>().len(), 7);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn unique_partitions_rows(n in 1usize..300, extra in 0u64..50, pick in 0u64..1000) {
                // Plans that pass check_unique (total <= n), and plans that would not.
                let total = if pick % 2 == 0 { 1 + pick % n as u64 } else { n as u64 + extra };
                let d = numbered(n);
                let mut owner = vec![None; n];
                for g in 0..total {
                    let mut mine = Vec::new();
                    for k in 0..(n as u64 + 2) {
                        match index_of(d.unique_row(g, total, k, OnExhausted::Stop)) {
                            Some(i) => mine.push(i),
                            None => break,
                        }
                    }
                    for &i in &mine {
                        prop_assert_eq!(owner[i], None, "row {} picked by two VUs", i);
                        owner[i] = Some(g);
                    }
                    // Recycling stays within the VU's own rows.
                    for k in 0..(2 * mine.len() as u64 + 3) {
                        let r = index_of(d.unique_row(g, total, k, OnExhausted::Recycle));
                        match r {
                            Some(i) => prop_assert_eq!(owner[i], Some(g)),
                            None => prop_assert!(mine.is_empty()),
                        }
                    }
                }
                prop_assert!(owner.iter().all(Option::is_some), "every row has an owner");
                prop_assert_eq!(d.check_unique(total).is_ok(), total <= n as u64);
            }

            #[test]
            fn csv_round_trips(cells in proptest::collection::vec(
                proptest::collection::vec("[a-z,\" \r\né]{0,6}", 3), 1..8)) {
                let mut text = String::from("c1,c2,c3\r\n");
                for row in &cells {
                    let quoted: Vec<String> = row
                        .iter()
                        .map(|c| format!("\"{}\"", c.replace('"', "\"\"")))
                        .collect();
                    text.push_str(&quoted.join(","));
                    text.push_str("\r\n");
                }
                let d = csv(&text).unwrap();
                let got: Vec<Vec<String>> = (0..d.len()).map(|i| d.row(i).unwrap().to_vec()).collect();
                prop_assert_eq!(got, cells);
            }

            #[test]
            fn csv_never_panics(text in "[a-z,\"\r\n ]{0,60}") {
                let _ = csv(&text);
            }

            #[test]
            fn jsonl_never_panics(text in "\\PC{0,60}") {
                let _ = jsonl(&text);
            }
        }
    }

    #[test]
    fn too_many_columns_are_refused_by_count_not_by_content() {
        let header: Vec<String> = (0..=MAX_DATA_COLUMNS).map(|i| format!("c{i}")).collect();
        let csv = format!("{}\n", header.join(","));
        let e = parse("d", "d.csv", csv.as_bytes(), DataFormat::Csv).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data.d: d.csv line 1: the header has 1025 columns, limit 1024"
        );
    }
}
