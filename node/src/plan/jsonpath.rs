//! JSON paths for checks and extraction, compiled once at plan load.
//!
//! The language is RFC 9535 JSONPath (the `serde_json_path` crate: names, indices,
//! slices, wildcards, unions, recursive descent `..`, filters `[?@.price < 10]` and the
//! RFC's functions `length`, `count`, `match`, `search`, `value`). A query selects a
//! list of values; checks and extraction use the first one, in document order.
//! stampede's extra on top is a final `.length()`: the length of the first value (array,
//! object or string in characters). This module must not know about HTTP or VUs; it only
//! evaluates a compiled query against a parsed `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

const LENGTH_SUFFIX: &str = ".length()";

/// A compiled JSON path.
#[derive(Debug, Clone)]
pub struct JsonPath {
    src: String,
    query: serde_json_path::JsonPath,
    length: bool,
}

impl PartialEq for JsonPath {
    fn eq(&self, other: &Self) -> bool {
        self.src == other.src
    }
}

impl Eq for JsonPath {}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.src)
    }
}

impl JsonPath {
    /// Parses `src`; the error is one sentence naming the path, what is wrong and where.
    pub fn compile(src: &str) -> Result<JsonPath, String> {
        let (query_src, length) = match src.strip_suffix(LENGTH_SUFFIX) {
            Some(q) => (q, true),
            None => (src, false),
        };
        let query = serde_json_path::JsonPath::parse(query_src)
            .map_err(|e| parse_error(src, query_src, e.position(), e.message()))?;
        Ok(JsonPath {
            src: src.to_string(),
            query,
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

    /// The first value the path selects, or `None` if it selects none. Always `None` for a
    /// `.length()` path: use [`JsonPath::eval`] where such paths may occur.
    pub fn find<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        if self.length {
            return None;
        }
        self.query.query(v).first()
    }

    /// Like [`JsonPath::find`], and also evaluates `.length()`.
    pub fn eval<'v>(&self, v: &'v Value) -> Option<Cow<'v, Value>> {
        let target = self.query.query(v).first()?;
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
}

/// One sentence for a path the crate refused: its message (its catch-all "parser error"
/// says where parsing stopped instead) and a hint for the mistakes people make.
fn parse_error(src: &str, query_src: &str, position: usize, message: &str) -> String {
    // The crate gives a 0-based byte offset of where it stopped.
    let at = (0..=position.min(query_src.len()))
        .rev()
        .find(|&i| query_src.is_char_boundary(i))
        .unwrap_or(0);
    let column = query_src[..at].chars().count() + 1;
    let before = &query_src[..at];
    let what = if message == "parser error" {
        match query_src[at..].chars().next() {
            Some(c) => format!("unexpected `{c}`"),
            None => "unexpected end".to_string(),
        }
    } else {
        message.to_string()
    };
    let in_dot_name = before.rfind('.').is_some_and(|dot| {
        before[dot + 1..]
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_')
    });
    let bare_bracket = query_src.split('[').skip(1).any(|rest| {
        rest.trim_start()
            .starts_with(|c: char| c.is_alphabetic() || c == '_')
    });
    let hint = if src.contains(LENGTH_SUFFIX) {
        " (`.length()` must come last)"
    } else if !query_src.starts_with('$') {
        " (a path starts with `$`)"
    } else if bare_bracket {
        " (a name in brackets is quoted: `['key']`)"
    } else if in_dot_name && !query_src[at..].starts_with(['[', '.']) {
        " (a `.name` is letters, digits and `_`; write other names as `['a-b']`)"
    } else {
        ""
    };
    format!("invalid JSON path `{src}`: {what} at column {column}{hint}")
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
    fn rfc9535_selectors_and_filters() {
        let v = json!({
            "products": [
                {"id": 1, "name": "mug", "price": 8, "stock": 0},
                {"id": 2, "name": "tea", "price": 12, "stock": 5},
                {"id": 3, "name": "pot", "price": 30, "stock": 2, "tags": ["new"]}
            ],
            "meta": {"next": {"cursor": "c2"}}
        });
        let first = |p: &str| JsonPath::compile(p).unwrap().eval(&v).map(Cow::into_owned);
        assert_eq!(first("$.products[?@.stock > 0].id"), Some(json!(2)));
        assert_eq!(
            first("$.products[?@.price >= 30 && @.stock > 0].name"),
            Some(json!("pot"))
        );
        assert_eq!(first("$.products[?@.tags].id"), Some(json!(3)));
        assert_eq!(first("$.products[?@.name == 'tea'].price"), Some(json!(12)));
        assert_eq!(
            first("$.products[?match(@.name, 'p.t')].id"),
            Some(json!(3))
        );
        assert_eq!(first("$.products[?@.price > 100].id"), None);
        assert_eq!(first("$.products[*].id"), Some(json!(1)));
        assert_eq!(first("$.products[1:].id"), Some(json!(2)));
        assert_eq!(first("$.products[-1:].name"), Some(json!("pot")));
        assert_eq!(first("$..cursor"), Some(json!("c2")));
        assert_eq!(first("$.products[1,0].id"), Some(json!(2)));
        // stampede's `.length()` is the length of the first value selected.
        assert_eq!(first("$.products[?@.stock > 0].length()"), Some(json!(4)));
        assert_eq!(first("$.products[0].name.length()"), Some(json!(3)));
        assert_eq!(first("$.products.length()"), Some(json!(3)));
    }

    #[test]
    fn compile_errors() {
        let e = |p: &str| JsonPath::compile(p).unwrap_err();
        assert_eq!(
            e("token"),
            "invalid JSON path `token`: unexpected `t` at column 1 (a path starts with `$`)"
        );
        assert_eq!(
            e(""),
            "invalid JSON path ``: unexpected end at column 1 (a path starts with `$`)"
        );
        assert_eq!(
            e("$."),
            "invalid JSON path `$.`: in dot member name, must start with lowercase alpha or '_' at column 3 (a `.name` is letters, digits and `_`; write other names as `['a-b']`)"
        );
        assert_eq!(
            e("$.a[0"),
            "invalid JSON path `$.a[0`: in long-hand segment, expected closing ']' at column 6"
        );
        assert_eq!(
            e("$.a[x]"),
            "invalid JSON path `$.a[x]`: unexpected `[` at column 4 (a name in brackets is quoted: `['key']`)"
        );
        assert_eq!(
            e("$['a"),
            "invalid JSON path `$['a`: in long-hand segment, expected an ending quote at column 5"
        );
        assert_eq!(
            e("$['a'x"),
            "invalid JSON path `$['a'x`: in long-hand segment, expected closing ']' at column 6"
        );
        assert_eq!(
            e("$x"),
            "invalid JSON path `$x`: unexpected `x` at column 2"
        );
        assert_eq!(
            e("$.a.length().b"),
            "invalid JSON path `$.a.length().b`: unexpected `(` at column 11 (`.length()` must come last)"
        );
        assert_eq!(
            e("$.content-type"),
            "invalid JSON path `$.content-type`: unexpected `-` at column 10 (a `.name` is letters, digits and `_`; write other names as `['a-b']`)"
        );
        assert_eq!(
            e("$.items[-9223372036854775808]"),
            "invalid JSON path `$.items[-9223372036854775808]`: unexpected `[` at column 8"
        );
        assert_eq!(
            e("$.é[?@.id > ]"),
            "invalid JSON path `$.é[?@.id > ]`: in long-hand segment, expected closing ']' at column 11"
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
