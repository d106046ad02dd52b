//! Node settings, layered with the `config` crate: defaults < config file (TOML) <
//! `STAMPEDE_*` environment variables < command-line flags.
//!
//! This module only gathers and checks settings; it must not start anything. List
//! settings (`listen`, `bootstrap`, `labels`, `allow_target`) are comma-separated in
//! the environment, and a list given by flags replaces the one from a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::cli::NodeArgs;

/// The mesh port nodes listen on when nothing else is said.
pub const DEFAULT_MESH_PORT: u16 = 7400;
/// The HTTP status/dashboard port when nothing else is said (loopback only).
pub const DEFAULT_HTTP: &str = "127.0.0.1:7401";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    /// Multiaddrs to listen on for the mesh.
    pub listen: Vec<String>,
    /// Multiaddrs of peers to join through.
    pub bootstrap: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub insecure_no_key: bool,
    /// `k=v` labels of this node.
    pub labels: Vec<String>,
    /// Hosts or CIDRs this node may send load to, besides loopback.
    pub allow_target: Vec<String>,
    /// Address of the status/dashboard HTTP server; empty turns it off.
    pub http: String,
    /// Address of the local control endpoint for the CLI (loopback by default).
    pub control: String,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub log_json: bool,
    /// Discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// Relative load capacity announced to the mesh (default: CPU count).
    pub capacity: Option<u32>,
    pub announce_interval_ms: u64,
    /// A member silent this long, with no live connection, is lost.
    pub lost_after_ms: u64,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub gossip_heartbeat_ms: u64,
    /// How often to retry bootstrap peers while this node knows no live member.
    pub bootstrap_retry_ms: u64,
    pub mdns_query_interval_ms: u64,
    /// Links this node chooses to hold (membership at scale: not one to every member).
    pub neighbours: usize,
    /// Connections past which this node closes links it did not choose.
    pub max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: vec![format!("/ip4/0.0.0.0/tcp/{DEFAULT_MESH_PORT}")],
            bootstrap: Vec::new(),
            key_file: None,
            insecure_no_key: false,
            labels: Vec::new(),
            allow_target: Vec::new(),
            http: DEFAULT_HTTP.to_string(),
            control: "127.0.0.1:0".to_string(),
            name: None,
            data_dir: None,
            log_json: false,
            mdns: true,
            capacity: None,
            announce_interval_ms: 1000,
            lost_after_ms: 3000,
            ping_interval_ms: 1000,
            ping_timeout_ms: 2000,
            gossip_heartbeat_ms: 1000,
            bootstrap_retry_ms: 2000,
            mdns_query_interval_ms: 5000,
            neighbours: crate::mesh::event_loop::NEIGHBOURS,
            max_connections: crate::mesh::event_loop::MAX_CONNECTIONS,
        }
    }
}

const LIST_KEYS: [&str; 4] = ["listen", "bootstrap", "labels", "allow_target"];

impl Settings {
    /// Layers defaults, the config file, the environment and the flags.
    pub fn load(args: &NodeArgs) -> Result<Settings, String> {
        Self::load_from(args, Environment::with_prefix("STAMPEDE"))
    }

    fn load_from(args: &NodeArgs, env: Environment) -> Result<Settings, String> {
        // Defaults come from `#[serde(default)]`, so a file or variable may set any subset.
        let mut b = Config::builder();
        if let Some(path) = &args.config {
            if !path.is_file() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            check_file_keys(path)?;
            b = b.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        let mut env = env.try_parsing(true).list_separator(",");
        for k in LIST_KEYS {
            env = env.with_list_parse_key(k);
        }
        b = b.add_source(env);
        let set =
            |b: config::ConfigBuilder<config::builder::DefaultState>, k: &str, v: config::Value| {
                b.set_override(k, v)
                    .map_err(|e| format!("flag for `{k}`: {e}"))
            };
        if !args.listen.is_empty() {
            b = set(b, "listen", args.listen.clone().into())?;
        }
        if !args.bootstrap.is_empty() {
            b = set(b, "bootstrap", args.bootstrap.clone().into())?;
        }
        if !args.label.is_empty() {
            b = set(b, "labels", args.label.clone().into())?;
        }
        if !args.allow_target.is_empty() {
            b = set(b, "allow_target", args.allow_target.clone().into())?;
        }
        if let Some(p) = &args.key_file {
            b = set(b, "key_file", p.display().to_string().into())?;
        }
        if args.insecure_no_key {
            b = set(b, "insecure_no_key", true.into())?;
        }
        if let Some(h) = &args.http {
            b = set(b, "http", h.clone().into())?;
        }
        if let Some(n) = &args.name {
            b = set(b, "name", n.clone().into())?;
        }
        if let Some(d) = &args.data_dir {
            b = set(b, "data_dir", d.display().to_string().into())?;
        }
        if args.log_json {
            b = set(b, "log_json", true.into())?;
        }
        let origin = args
            .config
            .as_ref()
            .map(|p| format!("config file {}", p.display()))
            .unwrap_or_else(|| "settings".into());
        let cfg = b.build().map_err(|e| format!("{origin}: {e}"))?;
        let s: Settings = cfg
            .try_deserialize()
            .map_err(|e| format!("{origin} (or STAMPEDE_* environment): {e}"))?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        self.label_map()?;
        // The allowlist's own parser: a bad entry stops the node before it joins.
        crate::http::Allowlist::from_entries(&self.allow_target).map_err(|e| e.to_string())?;
        let ms = |name: &str, v: u64, min: u64| {
            if v < min {
                Err(format!(
                    "setting `{name}` = {v} is below the minimum of {min} ms"
                ))
            } else {
                Ok(())
            }
        };
        ms("announce_interval_ms", self.announce_interval_ms, 50)?;
        ms(
            "lost_after_ms",
            self.lost_after_ms,
            2 * self.announce_interval_ms.max(50),
        )?;
        ms("ping_interval_ms", self.ping_interval_ms, 50)?;
        ms("ping_timeout_ms", self.ping_timeout_ms, 50)?;
        ms("gossip_heartbeat_ms", self.gossip_heartbeat_ms, 50)?;
        ms("bootstrap_retry_ms", self.bootstrap_retry_ms, 100)?;
        ms("mdns_query_interval_ms", self.mdns_query_interval_ms, 100)?;
        if !(1..=64).contains(&self.neighbours) {
            return Err(format!(
                "setting `neighbours` = {} is outside 1..=64",
                self.neighbours
            ));
        }
        if self.max_connections < self.neighbours + 2 || self.max_connections > 1024 {
            return Err(format!(
                "setting `max_connections` = {} must be between `neighbours` + 2 ({}) and 1024",
                self.max_connections,
                self.neighbours + 2
            ));
        }
        if self.listen.is_empty() {
            return Err(
                "setting `listen` is empty: the node needs at least one address to listen on"
                    .into(),
            );
        }
        Ok(())
    }

    /// Labels as a map; `k=v` each.
    pub fn label_map(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for l in &self.labels {
            match l.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    out.insert(k.trim().to_string(), v.trim().to_string());
                }
                _ => return Err(format!("label `{l}` is not of the form key=value")),
            }
        }
        Ok(out)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    pub fn node_name(&self) -> String {
        self.name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(host_name)
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

/// A misspelt key in a config file would silently do nothing; name it instead. (The
/// environment cannot be checked this way: other `STAMPEDE_*` variables live there.)
fn check_file_keys(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let known = serde_json::to_value(Settings::default()).unwrap_or_default();
    for key in table.keys() {
        if known.get(key).is_none() {
            return Err(format!(
                "config file {}: unknown setting `{key}`",
                path.display()
            ));
        }
    }
    Ok(())
}

/// The data dir used when none is given: `$XDG_DATA_HOME/stampede`, else
/// `~/.local/share/stampede`, else `./stampede-data`. The CLI uses the same rule
/// (plus `STAMPEDE_DATA_DIR`) to find the node.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Path::new(&x).join("stampede");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return Path::new(&h).join(".local/share/stampede");
    }
    PathBuf::from("stampede-data")
}

/// The machine's host name, or "node" if it cannot be read.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "node".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    if name.is_empty() {
        "node".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Environment {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Environment::with_prefix("STAMPEDE").source(Some(map))
    }

    #[test]
    fn layers_defaults_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "name = \"from-file\"\nlabels = [\"region=eu\"]\nhttp = \"127.0.0.1:9\"\nannounce_interval_ms = 500\n").unwrap();
        let mut args = NodeArgs {
            config: Some(file),
            ..Default::default()
        };
        let s = Settings::load_from(&args, env(&[])).unwrap();
        assert_eq!(s.name.as_deref(), Some("from-file"));
        assert_eq!(s.label_map().unwrap()["region"], "eu");
        assert_eq!(s.announce_interval_ms, 500);
        assert_eq!(s.lost_after_ms, 3000);

        let s = Settings::load_from(
            &args,
            env(&[
                ("STAMPEDE_NAME", "from-env"),
                ("STAMPEDE_BOOTSTRAP", "/ip4/1.2.3.4/tcp/1,/dns4/a.b/tcp/2"),
                ("STAMPEDE_MDNS", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("from-env"));
        assert_eq!(s.bootstrap.len(), 2);
        assert!(!s.mdns);

        args.name = Some("from-flag".into());
        args.label = vec!["region=us".into(), "tier=a".into()];
        let s = Settings::load_from(&args, env(&[("STAMPEDE_NAME", "from-env")])).unwrap();
        assert_eq!(s.name.as_deref(), Some("from-flag"));
        assert_eq!(s.label_map().unwrap().len(), 2);
        assert_eq!(s.http, "127.0.0.1:9");
    }

    #[test]
    fn bad_settings_are_named() {
        let args = NodeArgs {
            label: vec!["noequals".into()],
            ..Default::default()
        };
        assert!(Settings::load_from(&args, env(&[]))
            .unwrap_err()
            .contains("noequals"));
        let args = NodeArgs::default();
        let e = Settings::load_from(&args, env(&[("STAMPEDE_LOST_AFTER_MS", "10")])).unwrap_err();
        assert!(e.contains("lost_after_ms"), "{e}");
        let args = NodeArgs {
            config: Some("/nonexistent/x.toml".into()),
            ..Default::default()
        };
        assert!(Settings::load_from(&args, env(&[]))
            .unwrap_err()
            .contains("/nonexistent/x.toml"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("typo.toml");
        std::fs::write(&file, "bootstrapp = []\nname = 3\n").unwrap();
        let args = NodeArgs {
            config: Some(file),
            ..Default::default()
        };
        let e = Settings::load_from(&args, env(&[])).unwrap_err();
        assert!(e.contains("unknown setting `bootstrapp`"), "{e}");
    }
}
