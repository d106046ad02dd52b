//! The target allowlist of one node (spec §8): which hosts and networks this node's
//! operator agreed to send load to. An embedded `stampede run` allows loopback by
//! default; a long-running node allows nothing until its operator lists entries with
//! `--allow-target` (`loopback` names 127.0.0.0/8, ::1 and `localhost`). Owns parsing
//! entries and deciding. It is consulted when a plan is accepted (a host no entry can
//! match is refused before any DNS query) and when a new connection is about to be
//! opened (after DNS, before connect), never per request, and it must never be bypassed
//! by redirects (each new origin is a new connection).

use std::fmt;
use std::net::IpAddr;

use super::error::{HttpError, HttpErrorKind};

/// An `--allow-target` entry that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--allow-target entry '{entry}' is not valid: {reason}")]
pub struct AllowlistError {
    pub entry: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Exact(String),
    /// `*.example.com`: any name strictly below the suffix (stored as `.example.com`).
    Below(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Hosts (exact or `*.suffix`) and networks (CIDR, v4 or v6) this node may load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    loopback: bool,
    hosts: Vec<HostRule>,
    nets: Vec<IpNet>,
}

impl Default for Allowlist {
    fn default() -> Self {
        Allowlist::new()
    }
}

/// The entry that names loopback: 127.0.0.0/8, ::1 and `localhost`.
pub const LOOPBACK: &str = "loopback";

impl Allowlist {
    /// Loopback only (127.0.0.0/8, ::1, `localhost`): the default of an embedded run.
    pub fn new() -> Self {
        Allowlist {
            loopback: true,
            hosts: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Nothing at all, not even loopback. For nodes (and tests) that must send no load.
    pub fn deny_all() -> Self {
        Allowlist {
            loopback: false,
            hosts: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Exactly the entries: loopback only when one of them is `loopback`.
    pub fn from_entries<I, S>(entries: I) -> Result<Self, AllowlistError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Allowlist::deny_all();
        for e in entries {
            list.add(e.as_ref())?;
        }
        Ok(list)
    }

    /// Adds one entry: `loopback`, a host name (`api.example.com`), a wildcard
    /// (`*.example.com`), an IP address (`10.0.0.5`, `::1`, `[fd00::1]`) or a CIDR
    /// (`10.0.0.0/8`, `fd00::/8`).
    pub fn add(&mut self, entry: &str) -> Result<(), AllowlistError> {
        let err = |reason: &str| AllowlistError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let e = entry.trim();
        if e.is_empty() {
            return Err(err("it is empty"));
        }
        if e.eq_ignore_ascii_case(LOOPBACK) {
            self.loopback = true;
            return Ok(());
        }
        if e.contains("://") {
            return Err(err(
                "give a host name, IP address or CIDR, not a URL (drop the scheme and path)",
            ));
        }
        if let Some((addr, prefix)) = e.split_once('/') {
            let addr = parse_ip(addr).ok_or_else(|| {
                err("the part before '/' is not an IP address (expected e.g. 10.0.0.0/8)")
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
                err(&format!(
                    "the prefix length after '/' must be a number in 0..={max}"
                ))
            })?;
            self.nets.push(IpNet {
                addr: addr.to_canonical(),
                prefix,
            });
            return Ok(());
        }
        if let Some(ip) = parse_ip(e) {
            let ip = ip.to_canonical();
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            self.nets.push(IpNet { addr: ip, prefix });
            return Ok(());
        }
        let lower = e.trim_end_matches('.').to_ascii_lowercase();
        let (rule, name) = match lower.strip_prefix("*.") {
            Some(rest) => (HostRule::Below(format!(".{rest}")), rest),
            None => (HostRule::Exact(lower.clone()), lower.as_str()),
        };
        if name.contains(':') {
            return Err(err(
                "ports are not part of an allowlist entry; give only the host",
            ));
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(err(
                "it is not a host name (letters, digits, '-' and '.', optionally starting with '*.')",
            ));
        }
        self.hosts.push(rule);
        Ok(())
    }

    /// Whether loopback targets are allowed.
    pub fn allows_loopback(&self) -> bool {
        self.loopback
    }

    /// Whether a connection to `ip`, reached by the name `host`, is allowed. A listed host
    /// name is allowed whatever it resolves to; otherwise the address must be in a listed
    /// network (or loopback, when loopback is allowed).
    pub fn allows(&self, host: &str, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // By address only: a name that merely looks local may resolve anywhere.
        if self.loopback && ip.is_loopback() {
            return true;
        }
        if self.nets.iter().any(|n| n.contains(ip)) {
            return true;
        }
        !self.hosts.is_empty() && self.allows_name(host.trim_end_matches('.'))
    }

    /// Whether some entry could allow `host` once it is resolved: a listed name, an IP
    /// literal inside a listed network, `localhost` when loopback is allowed, or any name
    /// when a network is listed (only its addresses can tell). A host for which this is
    /// false is refused before any DNS query is made for it.
    pub fn could_allow(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        if let Some(ip) = parse_ip(host) {
            return self.allows(host, ip);
        }
        if self.loopback && is_localhost(host) {
            return true;
        }
        !self.nets.is_empty() || self.allows_name(host)
    }

    /// `could_allow`, as the one-line refusal of a plan whose target `host` no entry can
    /// match: it names the host and the flag that would allow it.
    pub fn refuse_unmatchable(&self, host: &str) -> Result<(), String> {
        if self.could_allow(host) {
            return Ok(());
        }
        let entry = parse_ip(host).map_or_else(|| host.to_string(), |ip| ip.to_string());
        Err(format!(
            "target {host} is not in this node's allowlist ({self}): it was not resolved \
             and nothing was sent to it; to allow it, add --allow-target {entry}"
        ))
    }

    fn allows_name(&self, host: &str) -> bool {
        self.hosts.iter().any(|rule| match rule {
            HostRule::Exact(h) => h.eq_ignore_ascii_case(host),
            HostRule::Below(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        })
    }

    /// `allows`, as an error that names the target and how to allow it.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), HttpError> {
        if self.allows(host, ip) {
            return Ok(());
        }
        let literal = parse_ip(host).is_some();
        let target = if literal {
            format!("'{host}'")
        } else {
            format!("'{host}' (resolved to {ip})")
        };
        let how = if literal {
            format!("--allow-target {ip}")
        } else {
            format!("--allow-target {host} (or its network, e.g. --allow-target {ip}/32)")
        };
        Err(HttpError::new(
            HttpErrorKind::Refused,
            format!(
                "target {target} is not allowed on this node (it allows: {self}), and \
                 nothing was sent to it. To allow it, add {how}"
            ),
        ))
    }
}

impl fmt::Display for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.loopback {
            parts.push("loopback".into());
        }
        for h in &self.hosts {
            parts.push(match h {
                HostRule::Exact(h) => h.clone(),
                HostRule::Below(s) => format!("*{s}"),
            });
        }
        for n in &self.nets {
            parts.push(n.to_string());
        }
        if parts.is_empty() {
            f.write_str("(nothing)")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// `localhost` and the names below it, which resolve to loopback (RFC 6761 §6.3).
fn is_localhost(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || (host.len() > 10
            && host.is_char_boundary(host.len() - 10)
            && host[host.len() - 10..].eq_ignore_ascii_case(".localhost"))
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    s.parse::<IpAddr>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_is_allowed_by_default_and_nothing_else() {
        let a = Allowlist::new();
        assert!(a.allows("127.0.0.1", ip("127.0.0.1")));
        assert!(a.allows("x", ip("127.9.9.9")));
        assert!(a.allows("::1", ip("::1")));
        assert!(a.allows("x", ip("::ffff:127.0.0.1")));
        assert!(a.allows("localhost", ip("127.0.0.1")));
        assert!(!a.allows("10.1.2.3", ip("10.1.2.3")));
        assert!(!a.allows("0.0.0.0", ip("0.0.0.0")));
        assert!(!a.allows("example.com", ip("93.184.216.34")));
        let none = Allowlist::deny_all();
        assert!(!none.allows("127.0.0.1", ip("127.0.0.1")));
        assert!(!none.allows("localhost", ip("127.0.0.1")));
    }

    #[test]
    fn cidrs_ips_and_hosts() {
        let a = Allowlist::from_entries([
            "10.0.0.0/8",
            "192.168.1.7",
            "fd00::/8",
            "[2001:db8::1]",
            "api.example.com.",
            "*.svc.internal",
            "172.16.5.5/12",
        ])
        .unwrap();
        assert!(a.allows("x", ip("10.255.0.1")));
        assert!(!a.allows("x", ip("11.0.0.1")));
        assert!(a.allows("x", ip("192.168.1.7")));
        assert!(!a.allows("x", ip("192.168.1.8")));
        assert!(a.allows("x", ip("fd12::5")));
        assert!(!a.allows("x", ip("fe80::1")));
        assert!(a.allows("x", ip("2001:db8::1")));
        assert!(a.allows("x", ip("::ffff:10.1.1.1")));
        assert!(a.allows("API.example.com", ip("8.8.8.8")));
        assert!(!a.allows("www.example.com", ip("8.8.8.8")));
        assert!(a.allows("a.b.svc.internal", ip("8.8.8.8")));
        assert!(!a.allows("svc.internal", ip("8.8.8.8")));
        assert!(a.allows("x", ip("172.31.0.1")));
        let all = Allowlist::from_entries(["0.0.0.0/0"]).unwrap();
        assert!(all.allows("x", ip("1.2.3.4")));
        assert!(!all.allows("x", ip("2001:db8::2")));
    }

    #[test]
    fn loopback_is_an_entry_and_not_implied_by_others() {
        let none = Allowlist::from_entries(["10.0.0.0/8"]).unwrap();
        assert!(!none.allows("127.0.0.1", ip("127.0.0.1")));
        assert!(!none.allows("localhost", ip("::1")));
        let lo = Allowlist::from_entries(["LOOPBACK"]).unwrap();
        assert!(lo.allows("127.0.0.1", ip("127.0.0.1")));
        assert!(lo.allows("x", ip("::1")));
        assert!(!lo.allows("x", ip("10.0.0.1")));
        assert_eq!(lo.to_string(), "loopback");
        assert_eq!(
            Allowlist::from_entries::<_, &str>([]).unwrap(),
            Allowlist::deny_all()
        );
        // A name that looks local is allowed only by where it resolves.
        assert!(!lo.allows("evil.localhost", ip("8.8.8.8")));
    }

    #[test]
    fn a_host_no_entry_can_match_is_refused_before_resolving() {
        let lo = Allowlist::new();
        let err = lo.refuse_unmatchable("example.com").unwrap_err();
        assert!(
            err.contains("target example.com is not in this node's allowlist (loopback)"),
            "{err}"
        );
        assert!(err.contains("--allow-target example.com"), "{err}");
        assert!(err.contains("not resolved"), "{err}");
        assert!(lo.refuse_unmatchable("localhost").is_ok());
        assert!(lo.refuse_unmatchable("app.localhost").is_ok());
        assert!(lo.refuse_unmatchable("127.0.0.1").is_ok());
        assert!(lo.refuse_unmatchable("[::1]").is_ok());
        let err = lo.refuse_unmatchable("10.1.2.3").unwrap_err();
        assert!(err.contains("--allow-target 10.1.2.3"), "{err}");
        let node = Allowlist::deny_all();
        let err = node.refuse_unmatchable("127.0.0.1").unwrap_err();
        assert!(err.contains("allowlist ((nothing))"), "{err}");
        assert!(err.contains("--allow-target 127.0.0.1"), "{err}");
        // Only a network can match a name it does not list: then the name is resolved.
        let net = Allowlist::from_entries(["10.0.0.0/8"]).unwrap();
        assert!(net.could_allow("db.internal"));
        assert!(!net.could_allow("11.0.0.1"));
        let named = Allowlist::from_entries(["*.svc.test", "api.test"]).unwrap();
        assert!(named.could_allow("a.svc.test"));
        assert!(named.could_allow("API.test."));
        assert!(!named.could_allow("web.test"));
        assert!(!named.could_allow("localhost"));
    }

    #[test]
    fn bad_entries_are_named() {
        for (e, want) in [
            ("", "empty"),
            ("10.0.0.0/33", "0..=32"),
            ("fd00::/129", "0..=128"),
            ("10.0.0/8", "not an IP address"),
            ("http://x.com/", "not a URL"),
            ("host:8080", "ports"),
            ("bad host", "not a host name"),
            ("a..b", "not a host name"),
        ] {
            let err = Allowlist::new().add(e).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&format!("'{e}'")), "{msg}");
            assert!(msg.contains(want), "{e}: {msg}");
        }
    }

    #[test]
    fn refusal_says_how_to_allow() {
        let a = Allowlist::new();
        let err = a.check("10.1.2.3", ip("10.1.2.3")).unwrap_err();
        assert_eq!(err.kind(), HttpErrorKind::Refused);
        assert!(err.message().contains("--allow-target 10.1.2.3"));
        let err = a.check("db.internal", ip("10.1.2.3")).unwrap_err();
        assert!(err
            .message()
            .contains("'db.internal' (resolved to 10.1.2.3)"));
        assert!(err.message().contains("--allow-target db.internal"));
        assert!(a.check("localhost", ip("127.0.0.1")).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_entries_and_hosts_never_panic(entry in "\\PC{0,40}", host in "\\PC{0,20}") {
            let mut a = Allowlist::new();
            let _ = a.add(&entry);
            let _ = a.add(&format!("*.{entry}"));
            let _ = a.check(&host, ip("10.0.0.1"));
        }
    }
}
