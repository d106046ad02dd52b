//! A run's plan bundle on this node: writes the bundle's files under the run's
//! directory, compiles the plan there and checks its targets against the node's
//! allowlist. It must not talk to the mesh or keep run state (the coordinator does).

use std::collections::BTreeSet;
use std::sync::Arc;

use stampede_protocol::run::Bundle;

use crate::compile::CompiledPlan;

/// Writes a bundle's files under `dir`, compiles its plan there and checks every
/// target host against this node's allowlist: an error means the plan itself is
/// unusable here; `Some(reason)` beside the plan is this node's named refusal.
pub fn prepare_bundle(
    bundle: &Bundle,
    dir: &std::path::Path,
    allow: &[String],
) -> Result<(Arc<CompiledPlan>, Option<String>), String> {
    bundle.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, data) in &bundle.files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&p, data).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    let plan = crate::commands::compile_text(&bundle.plan_name, &bundle.plan, &[], dir)
        .map_err(|e| e.to_string())?;
    let refusal = check_targets(&plan, allow).err();
    Ok((Arc::new(plan), refusal))
}

/// Refuses a plan whose fixed target hosts this node's operator did not allow.
fn check_targets(plan: &CompiledPlan, allow: &[String]) -> Result<(), String> {
    let list = crate::http::Allowlist::from_entries(allow.iter().filter(|a| *a != "loopback"))
        .map_err(|e| e.to_string())?;
    let mut hosts = BTreeSet::new();
    if let Some(b) = &plan.plan.defaults.base_url {
        if let Ok(u) = crate::http::Url::parse(b) {
            hosts.insert(u.host().to_string());
        }
    }
    for f in &plan.flows {
        for s in &f.steps {
            if let crate::compile::UrlTemplate::Static(u) = &s.url {
                hosts.insert(u.host().to_string());
            }
        }
    }
    for h in hosts {
        let ip: Option<std::net::IpAddr> = h.parse().ok();
        let allowed = match ip {
            Some(ip) => list.allows(&h, ip),
            None => h == "localhost" || list.allows(&h, std::net::IpAddr::from([0, 0, 0, 0])),
        };
        if !allowed {
            return Err(format!("target {h} is not in this node's allowlist (start the node with --allow-target {h})"));
        }
    }
    Ok(())
}
