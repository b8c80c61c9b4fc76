//! Kubernetes awareness for `http` resources with `flavor = "kubernetes"`: each request read
//! as the API server reads it (verb, API group, version, resource, subresource, namespace,
//! name), so rules are written in those terms, and refusals answered as a `Status` object
//! that kubectl prints as a normal error.
//!
//! The parsing follows the API server's own `RequestInfoFactory` (k8s.io/apiserver
//! `pkg/endpoints/request/requestinfo.go`): `/api/v1/...` is the core group, `/apis/G/V/...`
//! a named group; `namespaces/NS/` scopes what follows; `resource/name/subresource`; a `GET`
//! without a name is `list` (or `watch` with `?watch=true`), a `DELETE` without one
//! `deletecollection`. Beyond RBAC's verbs, the `exec`, `attach` and `portforward`
//! subresources and `proxy` are verbs of their own, so a rule can hold them for a human
//! whatever method the client used (kubectl uses POST or a WebSocket GET).

use serde_json::{Value, json};

/// One request as the API server understands it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubeRequest {
    /// `false` for non-resource URLs (`/version`, `/healthz`, `/openapi/v3`).
    pub resource_request: bool,
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl KubeRequest {
    /// `pods`, or `pods/exec` with a subresource: how rules name resources.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// Whether the verb only reads (the default level for `get`, `list`, `watch`).
    pub fn reads(&self) -> bool {
        matches!(self.verb.as_str(), "get" | "list" | "watch")
    }

    /// Whether responses can carry Secret values: any request on core `secrets`.
    pub fn touches_secrets(&self) -> bool {
        self.resource_request && self.group.is_empty() && self.resource == "secrets"
    }

    /// For records and refusals: `list secrets in prod`, `exec pods/web-1 in default`.
    pub fn describe(&self) -> String {
        if !self.resource_request {
            return self.verb.clone();
        }
        let mut s = format!("{} {}", self.verb, self.resource);
        if !self.name.is_empty() {
            s.push('/');
            s.push_str(&self.name);
        }
        if !self.subresource.is_empty() {
            s.push('/');
            s.push_str(&self.subresource);
        }
        if !self.group.is_empty() {
            s.push_str(&format!(" ({})", self.group));
        }
        if !self.namespace.is_empty() {
            s.push_str(&format!(" in {}", self.namespace));
        }
        s
    }
}

/// Parses a (normalised) path, query and method; `None` when the path is malformed for the
/// API server (it would answer 404), which the gate refuses rather than guesses.
pub fn parse(method: &str, path: &str, query: Option<&str>) -> Option<KubeRequest> {
    let method_verb = match method {
        "POST" => "create",
        "GET" | "HEAD" => "get",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "",
    };
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let mut r = KubeRequest::default();
    let mut rest: &[&str] = match parts.first() {
        Some(&"api") if parts.len() >= 2 => {
            r.version = parts[1].to_owned();
            &parts[2..]
        }
        Some(&"apis") if parts.len() >= 3 => {
            r.group = parts[1].to_owned();
            r.version = parts[2].to_owned();
            &parts[3..]
        }
        _ => {
            r.verb = method.to_ascii_lowercase();
            return Some(r);
        }
    };
    r.resource_request = true;
    if rest.is_empty() {
        // `/api/v1`, `/apis/apps/v1`: discovery of one group version.
        r.resource_request = false;
        r.verb = method.to_ascii_lowercase();
        return Some(r);
    }
    if matches!(rest[0], "watch" | "proxy") {
        if rest.len() < 2 {
            return None;
        }
        r.verb = rest[0].to_owned();
        rest = &rest[1..];
    } else {
        r.verb = method_verb.to_owned();
    }
    if rest[0] == "namespaces" && rest.len() > 1 {
        r.namespace = rest[1].to_owned();
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    }
    if rest.len() >= 3 && r.verb != "proxy" {
        r.subresource = rest[2].to_owned();
    }
    if rest.len() >= 2 {
        r.name = rest[1].to_owned();
    }
    r.resource = rest[0].to_owned();
    let watch = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    });
    if r.name.is_empty() && r.verb == "get" {
        r.verb = if watch { "watch" } else { "list" }.to_owned();
    }
    if r.name.is_empty() && r.verb == "delete" {
        r.verb = "deletecollection".to_owned();
    }
    match r.subresource.as_str() {
        "exec" | "attach" | "portforward" => r.verb = r.subresource.clone(),
        "proxy" => r.verb = "proxy".to_owned(),
        _ => {}
    }
    Some(r)
}

/// A refusal as the API server would word it: a `Status` kubectl prints as
/// `Error from server (Forbidden): ...`.
pub fn status(code: u16, message: &str) -> String {
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        429 => "TooManyRequests",
        501 => "MethodNotAllowed",
        502 | 503 => "ServiceUnavailable",
        _ => "Forbidden",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
    .to_string()
}

/// What a masked Secret `data` value becomes: base64 of `****`, so clients that decode it
/// still get a string.
pub const MASKED_DATA: &str = "KioqKg==";
/// What a masked `stringData` value or annotation becomes.
pub const MASKED_TEXT: &str = "****";
/// The annotation `kubectl apply` keeps the whole last-applied object in (values included).
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Masks every Secret in `value`, wherever it sits (an object, a list's items, a Table's rows,
/// a watch event): `data` and `stringData` values and the last-applied annotation. Returns how
/// many values were masked.
pub fn mask_secrets(value: &mut Value) -> u64 {
    let mut masked = 0;
    match value {
        Value::Object(map) => {
            if map.get("kind").and_then(Value::as_str) == Some("Secret") {
                for (field, replacement) in [("data", MASKED_DATA), ("stringData", MASKED_TEXT)] {
                    if let Some(Value::Object(values)) = map.get_mut(field) {
                        for v in values.values_mut() {
                            *v = Value::String(replacement.to_owned());
                            masked += 1;
                        }
                    }
                }
                if let Some(Value::Object(annotations)) = map
                    .get_mut("metadata")
                    .and_then(|m| m.get_mut("annotations"))
                    && let Some(v) = annotations.get_mut(LAST_APPLIED)
                {
                    *v = Value::String(MASKED_TEXT.to_owned());
                    masked += 1;
                }
            }
            for v in map.values_mut() {
                masked += mask_secrets(v);
            }
        }
        Value::Array(items) => {
            for v in items {
                masked += mask_secrets(v);
            }
        }
        _ => {}
    }
    masked
}

/// A Secret response body with no kind of its own to go by (a Table row's partial object, a
/// `PartialObjectMetadata`) still comes from `secrets`: everything under `data` and
/// `stringData` keys is masked too.
pub fn mask_secret_fields(value: &mut Value) -> u64 {
    let mut masked = 0;
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match (k.as_str(), &mut *v) {
                    ("data", Value::Object(values)) => {
                        for x in values.values_mut() {
                            *x = Value::String(MASKED_DATA.to_owned());
                            masked += 1;
                        }
                    }
                    ("stringData", Value::Object(values)) => {
                        for x in values.values_mut() {
                            *x = Value::String(MASKED_TEXT.to_owned());
                            masked += 1;
                        }
                    }
                    (LAST_APPLIED, Value::String(s)) => {
                        *s = MASKED_TEXT.to_owned();
                        masked += 1;
                    }
                    _ => masked += mask_secret_fields(v),
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                masked += mask_secret_fields(v);
            }
        }
        _ => {}
    }
    masked
}

/// Largest Secret response (or one watch event) the gate holds to mask it; bigger ones are
/// refused rather than passed unmasked.
pub const MAX_MASKED_BODY: usize = 64 << 20;

/// Masks a whole Secret response body (JSON); `Err` when it is not JSON (fail closed).
pub fn mask_body(body: &[u8]) -> Result<(Vec<u8>, u64), String> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("a Secret response is not JSON the gate can mask ({e})"))?;
    let masked = mask_secret_fields(&mut value);
    let out = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    Ok((out, masked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: &str, target: &str) -> KubeRequest {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        parse(method, path, query).expect("parses")
    }

    #[test]
    fn requests_read_as_the_api_server_reads_them() {
        let r = p("GET", "/api/v1/namespaces/prod/pods");
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.namespace.as_str()),
            ("list", "pods", "prod")
        );
        let r = p(
            "GET",
            "/api/v1/namespaces/prod/pods?watch=true&resourceVersion=1",
        );
        assert_eq!(r.verb, "watch");
        let r = p("GET", "/api/v1/watch/namespaces/prod/secrets");
        assert_eq!((r.verb.as_str(), r.resource.as_str()), ("watch", "secrets"));
        let r = p("GET", "/api/v1/namespaces/prod/secrets/db");
        assert_eq!((r.verb.as_str(), r.name.as_str()), ("get", "db"));
        assert!(r.touches_secrets());
        let r = p("DELETE", "/apis/apps/v1/namespaces/prod/deployments/web");
        assert_eq!(
            (
                r.verb.as_str(),
                r.group.as_str(),
                r.resource.as_str(),
                r.name.as_str()
            ),
            ("delete", "apps", "deployments", "web")
        );
        let r = p("DELETE", "/api/v1/namespaces/prod/pods");
        assert_eq!(r.verb, "deletecollection");
        let r = p("POST", "/api/v1/namespaces/prod/pods/web-1/exec?command=sh");
        assert_eq!(
            (r.verb.as_str(), r.resource_path().as_str()),
            ("exec", "pods/exec")
        );
        let r = p("GET", "/api/v1/namespaces/prod/pods/web-1/exec?command=sh");
        assert_eq!(r.verb, "exec", "the WebSocket form of exec is exec too");
        let r = p("POST", "/api/v1/namespaces/prod/pods/web-1/portforward");
        assert_eq!(r.verb, "portforward");
        let r = p("GET", "/api/v1/namespaces/prod/services/web:80/proxy/admin");
        assert_eq!(
            (r.verb.as_str(), r.subresource.as_str()),
            ("proxy", "proxy")
        );
        let r = p("GET", "/api/v1/proxy/namespaces/prod/pods/web/x/y");
        assert_eq!(
            (r.verb.as_str(), r.name.as_str(), r.subresource.as_str()),
            ("proxy", "web", "")
        );
        // Namespaces themselves, and their status subresource.
        let r = p("GET", "/api/v1/namespaces/prod");
        assert_eq!(
            (r.verb.as_str(), r.resource.as_str(), r.name.as_str()),
            ("get", "namespaces", "prod")
        );
        let r = p("PUT", "/api/v1/namespaces/prod/finalize");
        assert_eq!(
            (r.resource.as_str(), r.subresource.as_str()),
            ("namespaces", "finalize")
        );
        // Non-resource URLs.
        let r = p("GET", "/version");
        assert!(!r.resource_request);
        let r = p("GET", "/apis/apps/v1");
        assert!(!r.resource_request);
        assert!(parse("GET", "/api/v1/watch", None).is_none());
    }

    #[test]
    fn secrets_are_masked_wherever_they_sit() {
        let mut list = json!({
            "kind": "SecretList",
            "items": [{
                "kind": "Secret",
                "metadata": {"name": "db", "annotations": {LAST_APPLIED: "{\"data\":{\"password\":\"aHVudGVyMg==\"}}"}},
                "data": {"password": "aHVudGVyMg==", "user": "YWRtaW4="},
                "stringData": {"token": "plain"}
            }]
        });
        // A list's items carry no kind of their own on the wire; fields are masked anyway.
        assert_eq!(mask_secrets(&mut list), 4);
        let text = list.to_string();
        assert!(
            !text.contains("aHVudGVyMg") && !text.contains("plain"),
            "{text}"
        );
        let mut items_without_kind =
            json!({"kind": "SecretList", "items": [{"data": {"k": "c2VjcmV0"}}]});
        assert_eq!(mask_secret_fields(&mut items_without_kind), 1);
        assert!(!items_without_kind.to_string().contains("c2VjcmV0"));
        let mut event =
            json!({"type": "ADDED", "object": {"kind": "Secret", "data": {"k": "c2VjcmV0"}}});
        assert_eq!(mask_secrets(&mut event), 1);
    }

    #[test]
    fn status_is_what_kubectl_prints() {
        let v: Value = serde_json::from_str(&status(403, "jitgate: no grant")).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["code"], 403);
    }
}
