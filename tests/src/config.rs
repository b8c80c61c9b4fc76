//! The one builder for what a test's `jitgated` is configured with (the harness writes the
//! `[daemon]` table; this writes the rest): workloads, resources, policies, in the config's
//! own vocabulary, so a test says what differs and nothing else.

use std::fmt::Write as _;

/// A config body under construction.
#[derive(Clone, Debug, Default)]
pub struct Body {
    text: String,
}

impl Body {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `[[workload]]` that these principals may launch with `jitgate run`.
    #[must_use]
    pub fn workload(self, identity: &str, launchers: &[&str]) -> Self {
        self.table(
            "workload",
            &format!(
                "identity = \"{identity}\"\nlaunchers = {}\n",
                list(launchers)
            ),
        )
    }

    /// A `[[workload]]` gated by uid, wherever its processes run.
    #[must_use]
    pub fn uid_workload(self, identity: &str, uid: u32) -> Self {
        self.table(
            "workload",
            &format!("identity = \"{identity}\"\nuid = {uid}\n"),
        )
    }

    /// A `[[workload]]` gated by a service cgroup, in place.
    #[must_use]
    pub fn cgroup_workload(self, identity: &str, cgroup: &str) -> Self {
        self.table(
            "workload",
            &format!("identity = \"{identity}\"\ncgroup = \"{cgroup}\"\n"),
        )
    }

    /// A `tcp` `[[resource]]`.
    #[must_use]
    pub fn resource(self, name: &str, address: &str) -> Self {
        self.resource_with(name, address, "")
    }

    /// A `[[resource]]` with more keys (`protocol = ...`, `on_missing_grant = ...`).
    #[must_use]
    pub fn resource_with(self, name: &str, address: &str, keys: &str) -> Self {
        let keys = if keys.is_empty() || keys.ends_with('\n') {
            keys.to_owned()
        } else {
            format!("{keys}\n")
        };
        self.table(
            "resource",
            &format!("name = \"{name}\"\naddress = \"{address}\"\n{keys}"),
        )
    }

    /// A `[[policy]]` that grants `identities` these access levels on `resources` at once,
    /// for up to an hour.
    #[must_use]
    pub fn auto(self, identities: &[&str], resources: &[&str], access: &[&str]) -> Self {
        self.policy(
            identities,
            resources,
            access,
            "max_ttl = \"1h\"\napproval = \"auto\"",
        )
    }

    /// A `[[policy]]` with its other keys (`name`, `max_ttl`, `approval`, `approvers`).
    #[must_use]
    pub fn policy(
        self,
        identities: &[&str],
        resources: &[&str],
        access: &[&str],
        keys: &str,
    ) -> Self {
        self.table(
            "policy",
            &format!(
                "identities = {}\nresources = {}\naccess = {}\n{keys}\n",
                list(identities),
                list(resources),
                list(access)
            ),
        )
    }

    /// Anything else, as TOML.
    #[must_use]
    pub fn raw(mut self, toml: &str) -> Self {
        self.text.push('\n');
        self.text.push_str(toml);
        self
    }

    fn table(mut self, kind: &str, keys: &str) -> Self {
        let _ = write!(self.text, "\n[[{kind}]]\n{keys}");
        self
    }

    pub fn build(&self) -> String {
        self.text.clone()
    }
}

impl std::fmt::Display for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `["a", "b"]`.
fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_what_the_agent_reads() {
        let body = Body::new()
            .workload("bot", &["root"])
            .resource_with("db", "127.0.0.1:5432", "protocol = \"postgres\"")
            .auto(&["bot"], &["db"], &["read", "write"])
            .build();
        assert_eq!(
            body,
            "\n[[workload]]\nidentity = \"bot\"\nlaunchers = [\"root\"]\n\
             \n[[resource]]\nname = \"db\"\naddress = \"127.0.0.1:5432\"\nprotocol = \"postgres\"\n\
             \n[[policy]]\nidentities = [\"bot\"]\nresources = [\"db\"]\naccess = [\"read\", \"write\"]\nmax_ttl = \"1h\"\napproval = \"auto\"\n"
        );
        let parsed: toml::Table = toml::from_str(&body).expect("valid TOML");
        assert_eq!(parsed["resource"][0]["protocol"].as_str(), Some("postgres"));
    }
}
