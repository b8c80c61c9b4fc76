//! Refusals as HTTP responses the client understands: a status and a small JSON body naming
//! what refused the request and how to get access, e.g.
//! `{"error": "...", "rule": "rule 2", "hint": "jitgate request db --access write"}`.
//!
//! Why JSON: HTTP clients (and the agents driving them) show or parse the body of a 4xx; a
//! body that names the rule and the exact command to run turns a refusal into a next step.

use crate::config::Access;

use hyper::{
    Method, Response, StatusCode, Uri,
    header::{self, HeaderValue},
};

use super::{
    body::{self, Out},
    config::Flavor,
    kube,
    normalize::normalize,
};

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

/// How a refusal is worded for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wording {
    /// `{"error", "rule", "hint"}` JSON.
    Json,
    /// A Kubernetes `Status`, which clients decode and kubectl prints as
    /// `Error from server (Forbidden): <message>`.
    KubeStatus,
    /// The same message as plain text: client-go shows a discovery error's body only when it
    /// is text (for JSON it prints `unknown`), so refusals of `/api`, `/apis`, `/version` are.
    KubeText,
}

impl Wording {
    /// The wording for a request to `uri` on a resource of `flavor`.
    pub fn for_request(flavor: Flavor, method: &Method, uri: &Uri) -> Self {
        match flavor {
            Flavor::Http => Self::Json,
            Flavor::Kubernetes => {
                let resource = normalize(uri.path())
                    .ok()
                    .and_then(|p| kube::parse(method.as_str(), p.as_str(), uri.query()));
                if resource.is_some_and(|k| k.resource_request) {
                    Self::KubeStatus
                } else {
                    Self::KubeText
                }
            }
        }
    }
}

/// A refusal as the client receives it (see [`Wording`]).
pub fn refusal_response(wording: Wording, r: &Refusal) -> Response<Out> {
    let kube_message = || {
        let mut message = format!("jitgate: {}", r.error);
        if let Some(rule) = &r.rule {
            message.push_str(&format!(" ({rule})"));
        }
        if let Some(hint) = r.hint.as_deref().filter(|h| !r.error.contains(*h)) {
            message.push_str(&format!("; {hint}"));
        }
        message
    };
    let (text, content_type) = match wording {
        Wording::Json => (r.body(), "application/json"),
        Wording::KubeStatus => (kube::status(r.status, &kube_message()), "application/json"),
        Wording::KubeText => (format!("{}\n", kube_message()), "text/plain; charset=utf-8"),
    };
    let mut response = Response::new(body::full(text));
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if r.status == 429 {
        // Rate buckets refill every second.
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
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
