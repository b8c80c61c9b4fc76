//! Refusals as HTTP responses the client understands: a status and a small JSON body naming
//! what refused the request and how to get access, e.g.
//! `{"error": "...", "rule": "rule 2", "hint": "jitgate request db --access write"}`.
//!
//! Why JSON: HTTP clients (and the agents driving them) show or parse the body of a 4xx; a
//! body that names the rule and the exact command to run turns a refusal into a next step.

use crate::config::Access;

/// A refusal, before it becomes a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 (malformed: nothing to grant) or 403 (refused by grant or policy).
    pub status: u16,
    pub error: String,
    /// The rule that decided, when one did.
    pub rule: Option<String>,
    /// The command that would grant access, when one would.
    pub hint: Option<String>,
}

impl Refusal {
    /// A malformed request: no grant changes that, so no hint.
    pub fn malformed(error: impl Into<String>) -> Self {
        Self {
            status: 400,
            error: error.into(),
            rule: None,
            hint: None,
        }
    }

    /// The grant's level is below what the request needs.
    pub fn needs_level(resource: &str, method: &str, needed: Access) -> Self {
        Self {
            status: 403,
            error: format!("{method} needs {} access to {resource}", needed.as_str()),
            rule: None,
            hint: Some(request_hint(resource, needed)),
        }
    }

    /// No grant at all.
    pub fn no_grant(resource: &str, needed: Access) -> Self {
        Self {
            status: 403,
            error: format!("no active grant for {resource}"),
            rule: None,
            hint: Some(request_hint(resource, needed)),
        }
    }

    /// A `deny` rule matched.
    /// `what`: the request as named to people (`GET /admin`, `delete pods/web-1 in prod`).
    pub fn denied(rule: &str, what: &str) -> Self {
        Self {
            status: 403,
            error: format!("{what} is denied by policy"),
            rule: Some(rule.to_owned()),
            hint: None,
        }
    }

    /// An `approve` rule held the request and nobody approved it in time (or it was denied).
    pub fn not_approved(rule: &str, what: &str, why: &str) -> Self {
        Self {
            status: 403,
            error: format!("{what} needs approval: {why}"),
            rule: Some(rule.to_owned()),
            hint: Some("ask an approver to run `jitgate approve <request>`, then retry".into()),
        }
    }

    /// The JSON body (always valid JSON: values go through serde_json's escaping).
    pub fn body(&self) -> String {
        serde_json::json!({
            "error": self.error,
            "rule": self.rule,
            "hint": self.hint,
        })
        .to_string()
    }
}

/// The exact command a workload's operator runs to get `level` on `resource`.
pub fn request_hint(resource: &str, level: Access) -> String {
    match level {
        Access::Read => format!("jitgate request {resource}"),
        level => format!("jitgate request {resource} --access {}", level.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_json_naming_level_and_command() {
        let r = Refusal::needs_level("api", "DELETE", Access::Write);
        assert_eq!(r.status, 403);
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["error"], "DELETE needs write access to api");
        assert_eq!(v["hint"], "jitgate request api --access write");
        assert!(v["rule"].is_null());
    }

    #[test]
    fn hostile_text_stays_valid_json() {
        let r = Refusal::denied("rule 1", "GET /a\"},{\"x\":\"\n");
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["rule"], "rule 1");
        assert!(v["error"].as_str().unwrap().contains("/a\"},{"));
    }

    #[test]
    fn malformed_is_400_without_hint() {
        let r = Refusal::malformed("bad");
        assert_eq!(r.status, 400);
        assert!(serde_json::from_str::<serde_json::Value>(&r.body()).unwrap()["hint"].is_null());
    }
}
