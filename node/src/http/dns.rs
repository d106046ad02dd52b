//! Name resolution for new connections, one cache per node (spec §4: each node resolves
//! the target the way users near it would). Owns the TTL-respecting cache, static
//! overrides (like curl's `--resolve`) and the bypass for IP literals and `localhost`.
//! It is touched only when a VU opens a new connection, never per request.
//!
//! Thread-per-core: every worker thread runs its own tokio runtime. A hickory `Resolver`
//! spawns its name-server connections on the runtime that first uses it, so one shared
//! resolver would tie every worker to one worker's runtime (and break when that runtime
//! ends). Instead the cache is shared and a short-lived resolver is built on the calling
//! worker for each cache miss; misses are rare (once per host per TTL per node) and
//! concurrent misses for one host wait for a single lookup rather than each querying.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;

use super::error::{HttpError, HttpErrorKind};

/// How long a failed lookup is remembered, so thousands of VUs hitting a dead name do
/// not each send a query.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Bound on remembered names; a plan touches a handful of hosts, so this only guards
/// against a run that redirects to endless distinct names.
const MAX_CACHED_NAMES: usize = 4096;

/// Resolved addresses of one host, in the order to try them.
pub type Addrs = Arc<[IpAddr]>;

struct Cached {
    result: Result<Addrs, HttpError>,
    valid_until: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

pub(crate) struct Dns {
    overrides: HashMap<String, Addrs>,
    servers: Vec<SocketAddr>,
    system: OnceLock<Result<(ResolverConfig, ResolverOpts), String>>,
    cache: Mutex<HashMap<Box<str>, Slot>>,
}

impl Dns {
    /// `servers` replaces the system's name servers when not empty.
    pub(crate) fn new(overrides: &HashMap<String, Vec<IpAddr>>, servers: &[SocketAddr]) -> Self {
        Dns {
            servers: servers.to_vec(),
            overrides: overrides
                .iter()
                .map(|(h, ips)| (normalise(h), Addrs::from(ips.as_slice())))
                .collect(),
            system: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Addresses for `host` (IPv6 literals without brackets).
    pub(crate) async fn resolve(&self, host: &str) -> Result<Addrs, HttpError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Addrs::from([ip]));
        }
        let name = normalise(host);
        if name == "localhost" {
            return Ok(Addrs::from([
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]));
        }
        if let Some(addrs) = self.overrides.get(&name) {
            return Ok(addrs.clone());
        }
        let slot = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= MAX_CACHED_NAMES && !cache.contains_key(name.as_str()) {
                cache.clear();
            }
            cache
                .entry(name.clone().into_boxed_str())
                .or_default()
                .clone()
        };
        let mut entry = slot.lock().await;
        if let Some(c) = entry.as_ref() {
            if Instant::now() < c.valid_until {
                return c.result.clone();
            }
        }
        let fresh = self.lookup(&name).await;
        let result = fresh.as_ref().map(|(a, _)| a.clone()).map_err(Clone::clone);
        let valid_until = match &fresh {
            Ok((_, until)) => *until,
            Err(_) => Instant::now() + NEGATIVE_TTL,
        };
        *entry = Some(Cached {
            result: result.clone(),
            valid_until,
        });
        result
    }

    async fn lookup(&self, name: &str) -> Result<(Addrs, Instant), HttpError> {
        let (config, opts) = self
            .system
            .get_or_init(|| self.config())
            .clone()
            .map_err(|e| {
                HttpError::new(
                    HttpErrorKind::Dns,
                    format!(
                        "cannot resolve '{name}': the system DNS configuration \
                         (/etc/resolv.conf) could not be read: {e}"
                    ),
                )
            })?;
        let resolver = Resolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        let lookup = resolver.lookup_ip(name).await.map_err(|e| {
            HttpError::new(
                HttpErrorKind::Dns,
                format!("DNS lookup of '{name}' failed: {e}"),
            )
        })?;
        let valid_until = lookup.valid_until();
        let addrs: Addrs = lookup.iter().collect();
        if addrs.is_empty() {
            return Err(HttpError::new(
                HttpErrorKind::Dns,
                format!("DNS lookup of '{name}' returned no addresses"),
            ));
        }
        Ok((addrs, valid_until))
    }
}

impl Dns {
    fn config(&self) -> Result<(ResolverConfig, ResolverOpts), String> {
        if self.servers.is_empty() {
            return hickory_resolver::system_conf::read_system_conf().map_err(|e| e.to_string());
        }
        let servers: Vec<NameServerConfig> = self
            .servers
            .iter()
            .flat_map(|&a| {
                [
                    NameServerConfig::new(a, Protocol::Udp),
                    NameServerConfig::new(a, Protocol::Tcp),
                ]
            })
            .collect();
        Ok((
            ResolverConfig::from_parts(None, Vec::new(), servers),
            ResolverOpts::default(),
        ))
    }
}

fn normalise(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_localhost_and_overrides_skip_dns() {
        let mut o = HashMap::new();
        o.insert("Shop.Test".to_string(), vec!["127.0.0.7".parse().unwrap()]);
        let dns = Dns::new(&o, &[]);
        assert_eq!(
            &*dns.resolve("10.1.2.3").await.unwrap(),
            &["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            &*dns.resolve("::1").await.unwrap(),
            &[IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        let l = dns.resolve("LOCALHOST.").await.unwrap();
        assert_eq!(l[0], IpAddr::V4(Ipv4Addr::LOCALHOST));
        let s = dns.resolve("shop.test").await.unwrap();
        assert_eq!(&*s, &["127.0.0.7".parse::<IpAddr>().unwrap()]);
    }
}
