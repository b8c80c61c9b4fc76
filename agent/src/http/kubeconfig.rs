//! The kubeconfig `jitgate run` gives gated workloads (`KUBECONFIG`): one cluster and context
//! per `flavor = "kubernetes"` resource, naming the real server URL (the gate is transparent,
//! so the workload uses the address it always used), the host CA as the authority (the gate
//! presents host-CA certificates), and no credential (a placeholder token that keeps kubectl
//! from prompting; the gate replaces it with the real one).
//!
//! Published beside the host CA's certificate at start and after each reload; removed when
//! no resource is a Kubernetes one. JSON, which kubectl and client libraries read as YAML.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::json;

use super::config::{Flavor, HttpResource};
use crate::config::{Config, Target};

/// Where the kubeconfig is published for a host CA certificate at `ca`.
pub fn path(ca: &Path) -> PathBuf {
    ca.with_file_name("kubeconfig")
}

/// The server URL of a resource, as its clients write it.
fn server(target: &Target) -> Option<String> {
    match target {
        Target::Host { name, ports } => Some(format!("https://{name}:{}", ports.lo)),
        Target::Net { net, ports } if net.prefix_len() == net.max_prefix_len() => {
            Some(match net.addr() {
                std::net::IpAddr::V4(ip) => format!("https://{ip}:{}", ports.lo),
                std::net::IpAddr::V6(ip) => format!("https://[{ip}]:{}", ports.lo),
            })
        }
        Target::Net { .. } => None,
    }
}

/// The kubeconfig for `config`'s Kubernetes resources (`None`: there are none).
pub fn render(config: &Config) -> Option<String> {
    let ca = config.daemon.ca_cert.display().to_string();
    let mut clusters = Vec::new();
    let mut contexts = Vec::new();
    for r in &config.resources {
        let Some(settings) = r.settings.get::<HttpResource>() else {
            continue;
        };
        if settings.flavor != Flavor::Kubernetes {
            continue;
        }
        let Some(server) = server(&r.target) else {
            continue;
        };
        clusters.push(json!({
            "name": r.name,
            "cluster": {"server": server, "certificate-authority": ca},
        }));
        contexts.push(json!({
            "name": r.name,
            "context": {"cluster": r.name, "user": "jitgate"},
        }));
    }
    let current = contexts.first()?["name"].clone();
    Some(
        serde_json::to_string_pretty(&json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": clusters,
            "contexts": contexts,
            "current-context": current,
            // A placeholder, not a credential: kubectl prompts for a password when the user
            // has none, and the gate replaces whatever Authorization the workload sends.
            "users": [{"name": "jitgate", "user": {"token": "injected-by-jitgate"}}],
            "preferences": {},
        }))
        .unwrap_or_default(),
    )
}

/// Writes (or removes) the published kubeconfig.
pub fn publish(config: &Config) -> std::io::Result<()> {
    let target = path(&config.daemon.ca_cert);
    match render(config) {
        None => match fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(text) => {
            let tmp = target.with_extension("tmp");
            fs::write(&tmp, text)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
            fs::rename(&tmp, &target)
        }
    }
}
