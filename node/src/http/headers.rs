//! The headers of a response as the engine sees them: read-only, looked up by name.
//!
//! Why not `http::HeaderMap`: building one costs an allocation, a hash and a shared-bytes
//! clone per header on every response, a fifth of the client's CPU on a small static
//! response — and most load steps never look at a response header. An HTTP/1.1 response
//! keeps its raw head (bytes httparse has already validated) and is scanned only when
//! someone asks. HTTP/2 heads are written by `http2` in the same `name: value` lines
//! (decoded and checked by then); a `HeaderMap` is kept only where one is given.
//! Lookups are ASCII case-insensitive; values are the bytes after the colon without the
//! surrounding spaces.

use bytes::Bytes;
use http::header::HeaderMap;

/// The headers of one response.
#[derive(Debug, Clone)]
pub struct ResponseHeaders {
    repr: Repr,
    set_cookie: bool,
}

#[derive(Debug, Clone)]
enum Repr {
    /// An HTTP/1.x head: the status line, then one `name: value` line per header.
    Head(Bytes),
    Map(HeaderMap),
}

impl Default for ResponseHeaders {
    fn default() -> Self {
        ResponseHeaders::from_map(HeaderMap::new())
    }
}

impl ResponseHeaders {
    /// Headers of a raw HTTP/1.x head that has already been parsed successfully.
    /// `set_cookie`: whether the parser saw a Set-Cookie among them.
    pub(super) fn from_head(head: Bytes, set_cookie: bool) -> Self {
        ResponseHeaders {
            repr: Repr::Head(head),
            set_cookie,
        }
    }

    pub(super) fn from_map(map: HeaderMap) -> Self {
        ResponseHeaders {
            set_cookie: map.contains_key(http::header::SET_COOKIE),
            repr: Repr::Map(map),
        }
    }

    /// Whether the response sets cookies (known without scanning the headers).
    pub fn has_set_cookie(&self) -> bool {
        self.set_cookie
    }

    /// Every header in order of arrival: (name as sent, value).
    pub fn iter(&self) -> Iter<'_> {
        match &self.repr {
            Repr::Head(head) => Iter::Head(head.split(is_newline as fn(&u8) -> bool).skip(1)),
            Repr::Map(map) => Iter::Map(map.iter()),
        }
    }

    /// Every value of the header `name`.
    pub fn get_all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name`, as text; `None` when absent or not valid UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get_all(name).next().is_some()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The lines of a raw head after its status line.
pub type HeadLines<'a> = std::iter::Skip<std::slice::Split<'a, u8, fn(&u8) -> bool>>;

/// Iterator over a response's headers (no allocation: lookups happen per response).
pub enum Iter<'a> {
    Head(HeadLines<'a>),
    Map(http::header::Iter<'a, http::HeaderValue>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Head(lines) => lines.find_map(field),
            Iter::Map(it) => it.next().map(|(n, v)| (n.as_str(), v.as_bytes())),
        }
    }
}

fn is_newline(b: &u8) -> bool {
    *b == b'\n'
}

/// One `name: value` line of a head httparse has validated (so the name is ASCII); the
/// blank line that ends the head yields nothing.
fn field(line: &[u8]) -> Option<(&str, &[u8])> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let colon = line.iter().position(|&b| b == b':')?;
    let name = std::str::from_utf8(&line[..colon]).ok()?;
    Some((name, line[colon + 1..].trim_ascii()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn raw_heads_are_looked_up_case_insensitively() {
        let h = ResponseHeaders::from_head(Bytes::from_static(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nset-cookie:b=2 \r\nX-Empty:\r\n\r\n",
        ), true);
        assert_eq!(h.get("content-type"), Some("text/plain"));
        assert_eq!(h.get("CONTENT-TYPE"), Some("text/plain"));
        let cookies: Vec<&[u8]> = h.get_all("Set-Cookie").collect();
        assert_eq!(cookies, vec![&b"a=1"[..], &b"b=2"[..]]);
        assert_eq!(h.get("x-empty"), Some(""));
        assert!(!h.contains("location"));
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn maps_answer_the_same_way() {
        let mut map = HeaderMap::new();
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        map.insert("location", HeaderValue::from_static("/next"));
        let h = ResponseHeaders::from_map(map);
        assert_eq!(h.get("Location"), Some("/next"));
        assert_eq!(h.get_all("set-cookie").count(), 2);
        assert!(h.has_set_cookie());
        assert_eq!(h.len(), 3);
    }
}
