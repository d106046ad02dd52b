//! A small JSON path subset for checks and extraction, compiled once at plan load.
//!
//! Supported: `$` (the whole document), `.key`, `['key']` / `["key"]` (any key, with `\'`,
//! `\"` and `\\` escapes), `[N]` and `[-N]` (array index, negative from the end), and a final
//! `.length()` (length of an array, object or string, in characters). No wildcards, filters
//! or recursive descent: a path names at most one value. This module must not know about
//! HTTP or VUs; it only walks a parsed `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(i64),
}

/// A compiled JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    src: String,
    segments: Vec<Segment>,
    length: bool,
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.src)
    }
}

fn fail(src: &str, pos: usize, what: &str) -> String {
    let column = src[..pos].chars().count() + 1;
    format!("invalid JSON path `{src}`: {what} at column {column}")
}

impl JsonPath {
    /// Parses `src`; the error is one sentence naming the path, what is wrong and where.
    pub fn compile(src: &str) -> Result<JsonPath, String> {
        let mut chars = src.char_indices().peekable();
        match chars.next() {
            Some((_, '$')) => {}
            _ => return Err(fail(src, 0, "a path starts with `$`")),
        }
        let mut segments = Vec::new();
        let mut length = false;
        while let Some((at, c)) = chars.next() {
            if length {
                return Err(fail(src, at, "`.length()` must come last"));
            }
            match c {
                '.' => {
                    let start = at + 1;
                    let mut end = start;
                    while let Some(&(i, ch)) = chars.peek() {
                        if ch == '.' || ch == '[' {
                            break;
                        }
                        end = i + ch.len_utf8();
                        chars.next();
                    }
                    let key = &src[start..end];
                    if key.is_empty() {
                        return Err(fail(src, start, "expected a key after `.`"));
                    }
                    if key == "length()" {
                        length = true;
                    } else {
                        segments.push(Segment::Key(key.to_string()));
                    }
                }
                '[' => match chars.peek().map(|&(_, ch)| ch) {
                    Some(q @ ('\'' | '"')) => {
                        chars.next();
                        let mut key = String::new();
                        let mut closed = false;
                        while let Some((_, ch)) = chars.next() {
                            match ch {
                                '\\' => match chars.next() {
                                    Some((_, e)) => key.push(e),
                                    None => break,
                                },
                                ch if ch == q => {
                                    closed = true;
                                    break;
                                }
                                ch => key.push(ch),
                            }
                        }
                        if !closed {
                            return Err(fail(src, at, "unterminated quoted key"));
                        }
                        match chars.next() {
                            Some((_, ']')) => {}
                            Some((i, _)) => return Err(fail(src, i, "expected `]`")),
                            None => return Err(fail(src, src.len(), "expected `]`")),
                        }
                        segments.push(Segment::Key(key));
                    }
                    _ => {
                        let start = at + 1;
                        let mut end = None;
                        for (i, ch) in chars.by_ref() {
                            if ch == ']' {
                                end = Some(i);
                                break;
                            }
                        }
                        let Some(end) = end else {
                            return Err(fail(src, at, "unclosed `[`"));
                        };
                        let text = src[start..end].trim();
                        let index: i64 = text.parse().map_err(|_| {
                            fail(
                                src,
                                start,
                                &format!("`{text}` is not an array index (use ['key'] for keys)"),
                            )
                        })?;
                        segments.push(Segment::Index(index));
                    }
                },
                _ => return Err(fail(src, at, &format!("unexpected `{c}`"))),
            }
        }
        Ok(JsonPath {
            src: src.to_string(),
            segments,
            length,
        })
    }

    /// The text the path was compiled from.
    pub fn as_str(&self) -> &str {
        &self.src
    }

    /// True when the path ends in `.length()`, whose result [`JsonPath::find`] cannot borrow.
    pub fn is_length(&self) -> bool {
        self.length
    }

    /// The value the path names, or `None` if it does not exist. Always `None` for a
    /// `.length()` path: use [`JsonPath::eval`] where such paths may occur.
    pub fn find<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        if self.length {
            return None;
        }
        self.walk(v)
    }

    /// Like [`JsonPath::find`], and also evaluates `.length()`.
    pub fn eval<'v>(&self, v: &'v Value) -> Option<Cow<'v, Value>> {
        let target = self.walk(v)?;
        if !self.length {
            return Some(Cow::Borrowed(target));
        }
        let n = match target {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            Value::String(s) => s.chars().count(),
            _ => return None,
        };
        Some(Cow::Owned(Value::from(n)))
    }

    fn walk<'v>(&self, mut v: &'v Value) -> Option<&'v Value> {
        for seg in &self.segments {
            v = match (seg, v) {
                (Segment::Key(k), Value::Object(map)) => map.get(k)?,
                (Segment::Index(i), Value::Array(items)) => {
                    let idx = if *i < 0 {
                        let back = usize::try_from(i.unsigned_abs()).ok()?;
                        items.len().checked_sub(back)?
                    } else {
                        usize::try_from(*i).ok()?
                    };
                    items.get(idx)?
                }
                _ => return None,
            };
        }
        Some(v)
    }
}

/// The text an extraction stores: strings unquoted, everything else as compact JSON.
pub fn value_to_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "token": "abc",
            "a": {"b": {"c": 5}},
            "items": [{"id": 1}, {"id": 2}, {"id": 3}],
            "key with space": true,
            "it's": "quoted",
            "dotted.key": null,
            "name": "héllo",
            "empty": []
        })
    }

    fn get(path: &str) -> Option<Value> {
        JsonPath::compile(path)
            .unwrap()
            .eval(&doc())
            .map(Cow::into_owned)
    }

    #[test]
    fn finds_values() {
        assert_eq!(get("$"), Some(doc()));
        assert_eq!(get("$.token"), Some(json!("abc")));
        assert_eq!(get("$.a.b.c"), Some(json!(5)));
        assert_eq!(get("$.items[0].id"), Some(json!(1)));
        assert_eq!(get("$.items[-1].id"), Some(json!(3)));
        assert_eq!(get("$.items[-3].id"), Some(json!(1)));
        assert_eq!(get("$['key with space']"), Some(json!(true)));
        assert_eq!(get("$[\"it's\"]"), Some(json!("quoted")));
        assert_eq!(get("$['it\\'s']"), Some(json!("quoted")));
        assert_eq!(get("$['dotted.key']"), Some(json!(null)));
        assert_eq!(get("$['a']['b'].c"), Some(json!(5)));
        assert_eq!(get("$.items[ 1 ]['id']"), Some(json!(2)));
    }

    #[test]
    fn missing_values_are_none() {
        assert_eq!(get("$.nope"), None);
        assert_eq!(get("$.items[3]"), None);
        assert_eq!(get("$.items[-4]"), None);
        assert_eq!(get("$.items[-9223372036854775808]"), None);
        assert_eq!(get("$.token.x"), None);
        assert_eq!(get("$.items.id"), None);
        assert_eq!(get("$.a[0]"), None);
        assert_eq!(get("$.empty[-1]"), None);
    }

    #[test]
    fn length() {
        assert_eq!(get("$.items.length()"), Some(json!(3)));
        assert_eq!(get("$.a.length()"), Some(json!(1)));
        assert_eq!(get("$.name.length()"), Some(json!(5)));
        assert_eq!(get("$.a.b.c.length()"), None);
        let p = JsonPath::compile("$.items.length()").unwrap();
        assert!(p.is_length());
        assert_eq!(p.find(&doc()), None);
        let q = JsonPath::compile("$.items").unwrap();
        assert_eq!(q.find(&doc()).unwrap().as_array().unwrap().len(), 3);
    }

    #[test]
    fn compile_errors() {
        let e = |p: &str| JsonPath::compile(p).unwrap_err();
        assert_eq!(
            e("token"),
            "invalid JSON path `token`: a path starts with `$` at column 1"
        );
        assert_eq!(
            e(""),
            "invalid JSON path ``: a path starts with `$` at column 1"
        );
        assert_eq!(
            e("$."),
            "invalid JSON path `$.`: expected a key after `.` at column 3"
        );
        assert_eq!(
            e("$.a..b"),
            "invalid JSON path `$.a..b`: expected a key after `.` at column 5"
        );
        assert_eq!(
            e("$.a[0"),
            "invalid JSON path `$.a[0`: unclosed `[` at column 4"
        );
        assert_eq!(
            e("$.a[x]"),
            "invalid JSON path `$.a[x]`: `x` is not an array index (use ['key'] for keys) at column 5"
        );
        assert_eq!(
            e("$['a"),
            "invalid JSON path `$['a`: unterminated quoted key at column 2"
        );
        assert_eq!(
            e("$['a'x"),
            "invalid JSON path `$['a'x`: expected `]` at column 6"
        );
        assert_eq!(
            e("$x"),
            "invalid JSON path `$x`: unexpected `x` at column 2"
        );
        assert_eq!(
            e("$.a.length().b"),
            "invalid JSON path `$.a.length().b`: `.length()` must come last at column 13"
        );
    }

    #[test]
    fn values_to_strings() {
        assert_eq!(value_to_string(&json!("a\"b")), "a\"b");
        assert_eq!(value_to_string(&json!(42)), "42");
        assert_eq!(value_to_string(&json!(1.5)), "1.5");
        assert_eq!(value_to_string(&json!(true)), "true");
        assert_eq!(value_to_string(&json!(null)), "null");
        assert_eq!(
            value_to_string(&json!({"a": [1, "x"]})),
            "{\"a\":[1,\"x\"]}"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn compile_never_panics(src in "\\PC{0,30}") {
                let _ = JsonPath::compile(&src);
            }

            #[test]
            fn compile_never_panics_on_path_chars(src in "\\$[a-z.\\[\\]'\"\\\\0-9-]{0,20}") {
                if let Ok(p) = JsonPath::compile(&src) {
                    let _ = p.eval(&doc());
                }
            }

            #[test]
            fn quoted_keys_round_trip(key in "\\PC{0,20}") {
                let escaped = key.replace('\\', "\\\\").replace('\'', "\\'");
                let p = JsonPath::compile(&format!("$['{escaped}']")).unwrap();
                let v = json!({ key.clone(): 7 });
                prop_assert_eq!(p.find(&v), Some(&json!(7)));
            }
        }
    }
}
