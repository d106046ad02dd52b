//! The target URL of one request: scheme, host, port, path and query, parsed once with
//! errors that name the offending text. Owns parsing and reference resolution (for
//! redirects); must not do DNS or any I/O. Built on `http::Uri`, so a parsed URL is
//! reference-counted bytes and cloning it per request costs no allocation.

use std::fmt;
use std::str::FromStr;

use http::uri::{Authority, PathAndQuery, Scheme as UriScheme, Uri};

use super::error::{HttpError, HttpErrorKind};

/// The two schemes a load target can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An absolute `http://` or `https://` URL without fragment or credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    scheme: Scheme,
    port: u16,
    uri: Uri,
}

fn invalid(text: &str, why: impl fmt::Display) -> HttpError {
    HttpError::new(
        HttpErrorKind::InvalidRequest,
        format!("URL '{text}' is not valid: {why}"),
    )
}

impl Url {
    /// Parses an absolute URL. The fragment (`#...`) is dropped, since it never travels
    /// to the server.
    pub fn parse(text: &str) -> Result<Url, HttpError> {
        let no_fragment = text.split('#').next().unwrap_or("");
        let Some(sep) = no_fragment.find("://") else {
            return Err(invalid(
                text,
                "it must start with http:// or https:// (relative URLs need a base_url)",
            ));
        };
        let scheme = match &no_fragment[..sep] {
            s if s.eq_ignore_ascii_case("http") => Scheme::Http,
            s if s.eq_ignore_ascii_case("https") => Scheme::Https,
            other => {
                return Err(invalid(
                    text,
                    format!("scheme '{other}' is not supported (use http or https)"),
                ))
            }
        };
        let uri = Uri::try_from(no_fragment).map_err(|e| invalid(text, e))?;
        let Some(authority) = uri.authority() else {
            return Err(invalid(text, "it has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid(
                text,
                "credentials in the URL are not supported; send an authorization header instead",
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid(text, "the host is empty"));
        }
        let port_text = &authority.as_str()[host.len()..];
        let port = match port_text.strip_prefix(':') {
            None | Some("") => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(invalid(text, format!("port '{p}' is not in 1..=65535")))
                }
                Ok(n) => n,
            },
        };
        // Normalise so the stored URI always has a standard scheme and a path.
        // Normalise so the stored URI always has a standard scheme and a path starting
        // with '/' (`http://h?x` has none, and would make an invalid request line).
        let needs_rebuild = uri.scheme() != Some(&scheme_of(scheme))
            || !matches!(uri.path_and_query(), Some(pq) if pq.as_str().starts_with('/'));
        let uri = if needs_rebuild {
            let authority = authority.clone();
            let pq = match uri.path_and_query().map(PathAndQuery::as_str) {
                Some(pq) if pq.starts_with('/') => PathAndQuery::try_from(pq),
                Some(pq) => PathAndQuery::try_from(format!("/{pq}")),
                None => Ok(PathAndQuery::from_static("/")),
            }
            .map_err(|e| invalid(text, e))?;
            build_uri(scheme, authority, pq).map_err(|e| invalid(text, e))?
        } else {
            uri
        };
        Ok(Url { scheme, port, uri })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host as used for DNS, the allowlist and TLS: IPv6 literals without brackets.
    pub fn host(&self) -> &str {
        let h = self.authority().host();
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
    }

    /// The port, with the scheme's default filled in.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host[:port]` exactly as written, which is what the Host header carries.
    pub fn authority(&self) -> &Authority {
        self.uri
            .authority()
            .expect("Url::parse guarantees an authority")
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    pub fn path_and_query(&self) -> &PathAndQuery {
        self.uri
            .path_and_query()
            .expect("Url::parse guarantees a path")
    }

    /// The absolute URI (what HTTP/2 sends as :scheme/:authority/:path).
    pub fn as_uri(&self) -> &Uri {
        &self.uri
    }

    /// Resolves a reference (e.g. a redirect's Location) against this URL, RFC 3986 style:
    /// absolute URLs, `//host/...`, `/path`, `?query` and relative paths with `.`/`..`.
    pub fn resolve(&self, reference: &str) -> Result<Url, HttpError> {
        let reference = reference.split('#').next().unwrap_or("");
        if has_scheme(reference) {
            return Url::parse(reference);
        }
        if reference.starts_with("//") {
            return Url::parse(&format!("{}:{}", self.scheme.as_str(), reference));
        }
        if reference.is_empty() {
            return Ok(self.clone());
        }
        let (ref_path, ref_query) = match reference.find('?') {
            Some(i) => (&reference[..i], Some(&reference[i..])),
            None => (reference, None),
        };
        let path = if ref_path.is_empty() {
            self.path().to_owned()
        } else if ref_path.starts_with('/') {
            remove_dot_segments(ref_path)
        } else {
            let base = self.path();
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            remove_dot_segments(&format!("{dir}{ref_path}"))
        };
        let query = match ref_query {
            Some(q) => q.to_owned(),
            None if ref_path.is_empty() => {
                self.query().map(|q| format!("?{q}")).unwrap_or_default()
            }
            None => String::new(),
        };
        Url::parse(&format!(
            "{}://{}{}{}",
            self.scheme.as_str(),
            self.authority().as_str(),
            path,
            query
        ))
    }
}

fn scheme_of(s: Scheme) -> UriScheme {
    match s {
        Scheme::Http => UriScheme::HTTP,
        Scheme::Https => UriScheme::HTTPS,
    }
}

fn build_uri(s: Scheme, authority: Authority, pq: PathAndQuery) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(scheme_of(s))
        .authority(authority)
        .path_and_query(pq)
        .build()
}

fn has_scheme(s: &str) -> bool {
    match s.find(':') {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// RFC 3986 §5.2.4 for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    result
}

impl FromStr for Url {
    type Err = HttpError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Url::parse(s)
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.uri, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts_and_default_ports() {
        let u = Url::parse("http://Example.com/a/b?x=1#frag").unwrap();
        assert_eq!(u.scheme(), Scheme::Http);
        assert_eq!(u.host(), "Example.com");
        assert_eq!(u.port(), 80);
        assert_eq!(u.path_and_query().as_str(), "/a/b?x=1");
        assert_eq!(u.path_and_query().as_str(), "/a/b?x=1");
        let u = Url::parse("HTTPS://h:8443").unwrap();
        assert_eq!((u.scheme(), u.port(), u.path()), (Scheme::Https, 8443, "/"));
        assert_eq!(u.to_string(), "https://h:8443/");
        assert_eq!(Url::parse("https://h").unwrap().port(), 443);
        let u = Url::parse("http://h?x=1").unwrap();
        assert_eq!(u.path_and_query().as_str(), "/?x=1");
        assert_eq!(u.query(), Some("x=1"));
    }

    #[test]
    fn ipv6_literal_host_has_no_brackets() {
        let u = Url::parse("http://[::1]:8080/x").unwrap();
        assert_eq!(u.host(), "::1");
        assert_eq!(u.authority().as_str(), "[::1]:8080");
        assert_eq!(u.port(), 8080);
    }

    #[test]
    fn errors_name_the_url_and_the_problem() {
        let cases = [
            ("/relative", "http:// or https://"),
            ("ftp://h/", "scheme 'ftp'"),
            ("http://user:pw@h/", "credentials"),
            ("http://h:99999/", "port '99999'"),
            ("http://h:0/", "port '0'"),
            ("http://h/a b", "not valid"),
            ("http:///path", "not valid"),
        ];
        for (text, want) in cases {
            let err = Url::parse(text).unwrap_err();
            assert_eq!(err.kind(), HttpErrorKind::InvalidRequest, "{text}");
            assert!(err.message().contains(text), "{text}: {}", err.message());
            assert!(err.message().contains(want), "{text}: {}", err.message());
        }
    }

    #[test]
    fn resolves_references() {
        let base = Url::parse("http://h:1/a/b/c?q=1").unwrap();
        let r = |s: &str| base.resolve(s).unwrap().to_string();
        assert_eq!(r("https://other/x"), "https://other/x");
        assert_eq!(r("//other:2/y"), "http://other:2/y");
        assert_eq!(r("/root?z=2"), "http://h:1/root?z=2");
        assert_eq!(r("d"), "http://h:1/a/b/d");
        assert_eq!(r("../d"), "http://h:1/a/d");
        assert_eq!(r("./"), "http://h:1/a/b/");
        assert_eq!(r("../../../../x"), "http://h:1/x");
        assert_eq!(r("?n=3"), "http://h:1/a/b/c?n=3");
        assert_eq!(r(""), "http://h:1/a/b/c?q=1");
        assert_eq!(r("#frag"), "http://h:1/a/b/c?q=1");
        assert!(base.resolve("mailto:x@y").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_and_resolve_never_panic(text in "\\PC{0,40}", reference in "\\PC{0,40}") {
            let _ = Url::parse(&text);
            let _ = Url::parse(&format!("http://{text}"));
            let base = Url::parse("http://h/a/b?q").unwrap();
            if let Ok(u) = base.resolve(&reference) {
                proptest::prop_assert!(u.path_and_query().as_str().starts_with('/'));
            }
            if let Ok(u) = Url::parse(&format!("http://h{text}")) {
                proptest::prop_assert!(u.path_and_query().as_str().starts_with('/'));
            }
        }
    }
}
