//! The cookie jar of one VU (spec §3): stores what `Set-Cookie` says and sends back what
//! matches, so a flow that logs in stays logged in. Owns parsing `Set-Cookie` (name,
//! value, Domain, Path, Expires/Max-Age, Secure) and RFC 6265 domain/path matching. It is
//! per VU and lives in the VU's task, so it needs no lock; when it is empty the request
//! path pays nothing for it. It does not know the public-suffix list: a `Domain=com`
//! cookie is accepted for any host under `.com`. For a load generator talking to its own
//! targets that is harmless.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;

use super::url::{Scheme, Url};

/// Expiry cap, so an absurd Max-Age cannot overflow `Instant`.
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A `Set-Cookie` longer than this is ignored, as browsers do (RFC 6265 §6.1 asks for
/// at least 4096 bytes per cookie).
pub const MAX_COOKIE_BYTES: usize = 4096;
/// Cookies one VU keeps; past it the oldest is dropped (RFC 6265 §6.1: at least 50 per
/// domain). A target cannot grow a VU's jar, or its requests, without bound.
pub const MAX_COOKIES: usize = 50;
/// Name and value bytes one VU keeps over all its cookies; past it the oldest go.
pub const MAX_JAR_BYTES: usize = 32 * 1024;

/// One stored cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    /// Lower-case; the request host when `host_only`.
    pub domain: String,
    /// True when the server gave no Domain attribute: sent back only to that exact host.
    pub host_only: bool,
    pub path: String,
    pub secure: bool,
    /// `None` for a session cookie (lives as long as the VU).
    pub expires: Option<Instant>,
}

impl Cookie {
    /// What it costs the jar: its name, value, domain and path.
    fn size(&self) -> usize {
        self.name.len() + self.value.len() + self.domain.len() + self.path.len()
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    fn matches(&self, url: &Url, host: &str, now: Instant) -> bool {
        if self.secure && url.scheme() != Scheme::Https {
            return false;
        }
        if self.expired(now) {
            return false;
        }
        let domain_ok = if self.host_only {
            host.eq_ignore_ascii_case(&self.domain)
        } else {
            domain_match(host, &self.domain)
        };
        domain_ok && path_match(url.path(), &self.path)
    }
}

/// The cookies of one VU, at most `MAX_COOKIES` of them and `MAX_JAR_BYTES` in all
/// (oldest stored first, so eviction drops from the front).
#[derive(Debug, Clone, Default)]
pub struct CookieJar {
    cookies: Vec<Cookie>,
    bytes: usize,
}

impl CookieJar {
    pub fn new() -> Self {
        CookieJar::default()
    }

    pub fn is_empty(&self) -> bool {
        self.cookies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.cookies.len()
    }

    pub fn clear(&mut self) {
        self.cookies.clear();
        self.bytes = 0;
    }

    /// Name, value, domain and path bytes held (bounded by `MAX_JAR_BYTES`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// All stored cookies, including ones that may have expired since.
    pub fn iter(&self) -> impl Iterator<Item = &Cookie> {
        self.cookies.iter()
    }

    /// The value of the most recently stored live cookie called `name`, whatever its
    /// domain or path (for extraction by cookie name).
    pub fn get(&self, name: &str) -> Option<&str> {
        let now = Instant::now();
        self.cookies
            .iter()
            .rev()
            .find(|c| c.name == name && !c.expired(now))
            .map(|c| c.value.as_str())
    }

    /// Stores the `Set-Cookie` values of a response to `url`.
    pub fn store_response_cookies<'a>(
        &mut self,
        url: &Url,
        set_cookies: impl Iterator<Item = &'a [u8]>,
    ) {
        for value in set_cookies {
            if let Ok(text) = std::str::from_utf8(value) {
                self.store(url, text);
            }
        }
    }

    /// Stores one `Set-Cookie` header value received from `url`. Malformed cookies and
    /// cookies for a domain the URL's host does not belong to are ignored, as browsers do.
    /// Cookies beyond `MAX_COOKIE_BYTES` are ignored; when the jar is full, the oldest
    /// cookies are dropped to make room.
    pub fn store(&mut self, url: &Url, set_cookie: &str) {
        if set_cookie.len() > MAX_COOKIE_BYTES {
            return;
        }
        let host = url.host().to_ascii_lowercase();
        let Some(cookie) = parse_set_cookie(set_cookie, &host, url.path()) else {
            return;
        };
        let now = Instant::now();
        let existing = self.cookies.iter().position(|c| {
            c.name == cookie.name && c.domain == cookie.domain && c.path == cookie.path
        });
        if let Some(i) = existing {
            self.cookies.remove(i);
        }
        if !cookie.expired(now) {
            self.cookies.push(cookie);
        }
        self.cookies.retain(|c| !c.expired(now));
        self.bytes = self.cookies.iter().map(Cookie::size).sum();
        let mut drop = 0;
        while self.cookies.len() - drop > MAX_COOKIES || self.bytes > MAX_JAR_BYTES {
            self.bytes -= self.cookies[drop].size();
            drop += 1;
        }
        self.cookies.drain(..drop);
    }

    /// The `Cookie` header to send to `url`, or `None` when no cookie matches. Longer
    /// paths first, as RFC 6265 §5.4 asks.
    pub fn header_for(&self, url: &Url) -> Option<HeaderValue> {
        if self.cookies.is_empty() {
            return None;
        }
        let now = Instant::now();
        let host = url.host();
        let mut matching: Vec<&Cookie> = self
            .cookies
            .iter()
            .filter(|c| c.matches(url, host, now))
            .collect();
        if matching.is_empty() {
            return None;
        }
        matching.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
        let mut header = String::new();
        for c in matching {
            if !header.is_empty() {
                header.push_str("; ");
            }
            header.push_str(&c.name);
            header.push('=');
            header.push_str(&c.value);
        }
        HeaderValue::from_str(&header).ok()
    }
}

fn domain_match(host: &str, domain: &str) -> bool {
    if host.eq_ignore_ascii_case(domain) {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_err()
        && host.len() > domain.len()
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
        && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
}

fn path_match(request_path: &str, cookie_path: &str) -> bool {
    request_path == cookie_path
        || (request_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/')
                || request_path.as_bytes().get(cookie_path.len()) == Some(&b'/')))
}

/// RFC 6265 §5.1.4: the directory of the request path.
fn default_path(request_path: &str) -> String {
    match request_path.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => request_path[..i].to_owned(),
    }
}

fn parse_set_cookie(text: &str, host: &str, request_path: &str) -> Option<Cookie> {
    let mut parts = text.split(';');
    let (name, value) = parts.next()?.split_once('=')?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let mut cookie = Cookie {
        name: name.to_owned(),
        value: value.trim().to_owned(),
        domain: host.to_owned(),
        host_only: true,
        path: default_path(request_path),
        secure: false,
        expires: None,
    };
    let mut max_age: Option<i64> = None;
    let mut expires: Option<i64> = None;
    for attr in parts {
        let (key, val) = match attr.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => (attr.trim(), ""),
        };
        if key.eq_ignore_ascii_case("max-age") {
            let digits_ok = !val.is_empty()
                && val
                    .strip_prefix('-')
                    .unwrap_or(val)
                    .bytes()
                    .all(|b| b.is_ascii_digit());
            if digits_ok {
                max_age = Some(val.parse::<i64>().unwrap_or(if val.starts_with('-') {
                    i64::MIN
                } else {
                    i64::MAX
                }));
            }
        } else if key.eq_ignore_ascii_case("expires") {
            if let Some(t) = parse_cookie_date(val) {
                expires = Some(t);
            }
        } else if key.eq_ignore_ascii_case("domain") {
            let d = val.trim_start_matches('.').to_ascii_lowercase();
            if !d.is_empty() {
                if !domain_match(host, &d) {
                    return None;
                }
                cookie.host_only = false;
                cookie.domain = d;
            }
        } else if key.eq_ignore_ascii_case("path") {
            if val.starts_with('/') {
                cookie.path = val.to_owned();
            }
        } else if key.eq_ignore_ascii_case("secure") {
            cookie.secure = true;
        }
    }
    let now = Instant::now();
    cookie.expires = match (max_age, expires) {
        (Some(secs), _) if secs <= 0 => Some(now),
        (Some(secs), _) => Some(now + Duration::from_secs(secs.unsigned_abs()).min(MAX_LIFETIME)),
        (None, Some(unix)) => {
            let now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let left = unix.saturating_sub(now_unix);
            if left <= 0 {
                Some(now)
            } else {
                Some(now + Duration::from_secs(left as u64).min(MAX_LIFETIME))
            }
        }
        (None, None) => None,
    };
    Some(cookie)
}

/// RFC 6265 §5.1.1 date parsing (accepts IMF-fixdate, RFC 850 and asctime forms and the
/// usual variations), as Unix seconds.
fn parse_cookie_date(text: &str) -> Option<i64> {
    let is_delim = |c: char| matches!(c, '\x09' | '\x20'..='\x2F' | '\x3B'..='\x40' | '\x5B'..='\x60' | '\x7B'..='\x7E');
    let (mut time, mut day, mut month, mut year) = (None, None, None, None);
    for token in text.split(is_delim).filter(|t| !t.is_empty()) {
        if time.is_none() {
            if let Some(t) = parse_time(token) {
                time = Some(t);
                continue;
            }
        }
        if day.is_none() {
            if let Some(d) = leading_digits(token, 1, 2) {
                day = Some(d);
                continue;
            }
        }
        if month.is_none() && token.len() >= 3 {
            const MONTHS: [&str; 12] = [
                "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
            ];
            let prefix = token.get(..3).map(str::to_ascii_lowercase);
            if let Some(m) = MONTHS.iter().position(|m| Some(*m) == prefix.as_deref()) {
                month = Some(m as u32 + 1);
                continue;
            }
        }
        if year.is_none() {
            if let Some(y) = leading_digits(token, 2, 4) {
                year = Some(y);
                continue;
            }
        }
    }
    let (h, mi, s) = time?;
    let day = day?;
    let month = month?;
    let mut year = year?;
    if (70..=99).contains(&year) {
        year += 1900;
    } else if year <= 69 {
        year += 2000;
    }
    if !(1..=31).contains(&day) || year < 1601 || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    Some(days * 86400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s))
}

/// `min..=max` leading digits, optionally followed by non-digits.
fn leading_digits(token: &str, min: usize, max: usize) -> Option<u32> {
    let n = token.bytes().take_while(u8::is_ascii_digit).count();
    if n < min || n > max {
        return None;
    }
    token[..n].parse().ok()
}

fn parse_time(token: &str) -> Option<(u32, u32, u32)> {
    let mut it = token.splitn(3, ':');
    let h = leading_digits(it.next()?, 1, 2)?;
    let m = leading_digits(it.next()?, 1, 2)?;
    let s = leading_digits(it.next()?, 1, 2)?;
    Some((h, m, s))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn dates_in_all_common_forms() {
        let want = 784_111_777; // 1994-11-06 08:49:37 UTC
        assert_eq!(
            parse_cookie_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(want)
        );
        assert_eq!(
            parse_cookie_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(want)
        );
        assert_eq!(parse_cookie_date("Sun Nov  6 08:49:37 1994"), Some(want));
        assert_eq!(
            parse_cookie_date("Wed, 21-Oct-2015 07:28:00 GMT"),
            Some(1_445_412_480)
        );
        assert_eq!(parse_cookie_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_cookie_date("not a date"), None);
        assert_eq!(parse_cookie_date("Sun, 32 Nov 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn host_only_domain_and_path_matching() {
        let mut jar = CookieJar::new();
        let u = url("http://shop.example.com/account/login");
        jar.store(&u, "sid=abc; Path=/; HttpOnly");
        jar.store(&u, "pref=1"); // default path /account
        jar.store(&u, "wide=w; Domain=.example.com; Path=/");
        jar.store(&u, "evil=x; Domain=other.com");
        assert_eq!(jar.len(), 3);
        assert_eq!(jar.get("sid"), Some("abc"));
        assert_eq!(jar.get("evil"), None);

        let h = |s: &str| {
            jar.header_for(&url(s))
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            h("http://shop.example.com/account/x").as_deref(),
            Some("pref=1; sid=abc; wide=w")
        );
        assert_eq!(
            h("http://shop.example.com/accounts").as_deref(),
            Some("sid=abc; wide=w")
        );
        assert_eq!(h("http://api.example.com/").as_deref(), Some("wide=w"));
        assert_eq!(h("http://other.com/"), None);
    }

    #[test]
    fn secure_replacement_and_expiry() {
        let mut jar = CookieJar::new();
        let http = url("http://h/");
        let https = url("https://h/");
        jar.store(&https, "s=1; Secure");
        assert!(jar.header_for(&http).is_none());
        assert_eq!(jar.header_for(&https).unwrap(), "s=1");
        jar.store(&https, "s=2; Secure");
        assert_eq!(jar.len(), 1);
        assert_eq!(jar.get("s"), Some("2"));
        jar.store(&https, "s=gone; Secure; Max-Age=0");
        assert!(jar.is_empty());
        jar.store(&http, "old=1; Expires=Thu, 01 Jan 1970 00:00:00 GMT");
        assert!(jar.is_empty());
        jar.store(&http, "future=1; Expires=Fri, 01 Jan 2100 00:00:00 GMT");
        jar.store(
            &http,
            "both=1; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=60",
        );
        assert_eq!(jar.get("future"), Some("1"));
        assert_eq!(jar.get("both"), Some("1"));
    }

    #[test]
    fn the_jar_is_bounded_in_count_and_bytes_keeping_the_newest() {
        let u = url("http://shop.test/");
        let mut jar = CookieJar::new();
        for i in 0..1000 {
            jar.store(&u, &format!("c{i}=v"));
        }
        assert_eq!(jar.len(), MAX_COOKIES);
        assert_eq!(jar.get("c999"), Some("v"));
        assert_eq!(jar.get("c0"), None);
        let mut jar = CookieJar::new();
        let big = "x".repeat(3000);
        for i in 0..100 {
            jar.store(&u, &format!("b{i}={big}"));
        }
        assert!(jar.bytes() <= MAX_JAR_BYTES, "{} bytes", jar.bytes());
        assert!(jar.len() >= MAX_JAR_BYTES / 3100, "{} cookies", jar.len());
        assert!(jar.get("b99").is_some());
        jar.store(&u, &format!("huge={}", "y".repeat(MAX_COOKIE_BYTES)));
        assert_eq!(jar.get("huge"), None, "a cookie over the per-cookie bound");
        let header = jar.header_for(&u).unwrap();
        assert!(header.len() <= MAX_JAR_BYTES + 2 * jar.len());
    }

    #[test]
    fn malformed_cookies_are_ignored() {
        let mut jar = CookieJar::new();
        let u = url("http://10.0.0.1/");
        for bad in ["", "novalue", "=x", "a=b; Domain=0.0.1"] {
            jar.store(&u, bad);
        }
        assert!(jar.is_empty());
        jar.store(&u, "ip=1; Domain=10.0.0.1");
        assert_eq!(jar.get("ip"), Some("1"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_set_cookie_never_panics(text in "\\PC{0,60}", date in "\\PC{0,40}") {
            let mut jar = CookieJar::new();
            let u = url("http://a.example.com/x/y");
            jar.store(&u, &text);
            jar.store(&u, &format!("n=v; Expires={date}; Domain=example.com"));
            let _ = jar.header_for(&u);
            let _ = parse_cookie_date(&date);
        }
    }
}
