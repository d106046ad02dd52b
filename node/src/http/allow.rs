//! The target allowlist of one node (spec §8): which hosts and networks this node's
//! operator agreed to send load to. Loopback is allowed by default, nothing else unless
//! listed with `--allow-target`. Owns parsing entries and deciding; it is consulted only
//! when a new connection is about to be opened (after DNS, before connect), never per
//! request, and it must never be bypassed by redirects (each new origin is a new connection).

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

impl Allowlist {
    /// Loopback only (127.0.0.0/8, ::1, `localhost`): the default of every node.
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

    /// Loopback plus every entry.
    pub fn from_entries<I, S>(entries: I) -> Result<Self, AllowlistError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Allowlist::new();
        for e in entries {
            list.add(e.as_ref())?;
        }
        Ok(list)
    }

    /// Adds one entry: a host name (`api.example.com`), a wildcard (`*.example.com`),
    /// an IP address (`10.0.0.5`, `::1`, `[fd00::1]`) or a CIDR (`10.0.0.0/8`, `fd00::/8`).
    pub fn add(&mut self, entry: &str) -> Result<(), AllowlistError> {
        let err = |reason: &str| AllowlistError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let e = entry.trim();
        if e.is_empty() {
            return Err(err("it is empty"));
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
        if self.loopback && (ip.is_loopback() || host.eq_ignore_ascii_case("localhost")) {
            return true;
        }
        if self.nets.iter().any(|n| n.contains(ip)) {
            return true;
        }
        if self.hosts.is_empty() {
            return false;
        }
        let host = host.trim_end_matches('.');
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
        let who = if self.loopback {
            "only loopback and --allow-target entries"
        } else {
            "only --allow-target entries"
        };
        Err(HttpError::new(
            HttpErrorKind::Refused,
            format!(
                "target {target} is not allowed on this node: {who} may receive load, and \
                 nothing was sent to it. To allow it, start the node with {how}"
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
