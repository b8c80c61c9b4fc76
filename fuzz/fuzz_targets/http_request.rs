//! The `http` protocol's request-side decisions and response-side scrubbing, fed hostile
//! input: path normalisation, Kubernetes request parsing, rule decisions, JSON path parsing and
//! masking, and the scrubber under any chunking. Oracles: normalisation is idempotent and
//! never yields a dot segment or an empty segment; a decision never allows a method above the
//! grant's level; the scrubber never lets the secret through and keeps the length.
#![no_main]

use jitgate::{
    config::Access,
    http::{kube, normalize::normalize, policy, scrub::Scrubber},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (target, tail) = text.split_at(
        text.char_indices()
            .nth(usize::from(split) % (text.chars().count() + 1))
            .map_or(text.len(), |(i, _)| i),
    );
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    if let Ok(normal) = normalize(path) {
        let s = normal.as_str();
        assert!(s.starts_with('/'));
        assert!(
            !s.split('/').skip(1).any(|seg| seg == "." || seg == ".."),
            "{s}"
        );
        assert!(!s.contains("//"), "{s}");
        assert_eq!(
            normalize(s).map(|n| n.as_str().to_owned()).ok().as_deref(),
            Some(s),
            "idempotent"
        );
        for method in ["GET", "DELETE", "POST"] {
            let k = kube::parse(method, s, query);
            for granted in [Access::Read, Access::Write] {
                let d = policy::decide_kube(
                    &[],
                    granted,
                    method,
                    &normal,
                    k.as_ref(),
                    &policy::RequestParts::default(),
                );
                if granted == Access::Read
                    && (method != "GET"
                        || k.as_ref().is_some_and(|k| k.resource_request && !k.reads()))
                {
                    assert!(
                        !matches!(d, policy::Decision::Allow { .. }),
                        "{method} {s} allowed under read"
                    );
                }
            }
        }
    }
    // Rule conditions: whatever a query says, an allow rule's exact match implies the same
    // condition's loose match under deny (no spelling is allowed that a deny would miss).
    if let Ok(normal) = normalize("/x") {
        let rule = |action| {
            vec![policy::Rule {
                index: 1,
                methods: vec![],
                paths: vec![],
                levels: vec![],
                kube: policy::KubeMatch::default(),
                request: policy::RequestMatch {
                    query: vec![("force".into(), policy::Wild::new("t*e"))],
                    ..policy::RequestMatch::default()
                },
                action,
            }]
        };
        let parts = policy::RequestParts {
            query,
            ..policy::RequestParts::default()
        };
        let decide = |rules: &[policy::Rule]| {
            policy::decide_kube(rules, Access::Read, "GET", &normal, None, &parts)
        };
        if decide(&rule(policy::Action::Allow)) != (policy::Decision::Allow { rule: None }) {
            assert!(
                matches!(
                    decide(&rule(policy::Action::Deny)),
                    policy::Decision::Deny { .. }
                ),
                "{query:?}"
            );
        }
    }
    let _ = jitgate::http::jsonmask::JsonPath::parse(tail.as_ref());
    if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(tail) {
        let _ = kube::mask_secret_fields(&mut value);
        let _ = kube::mask_secrets(&mut value);
    }
    // The scrubber: the secret is the first 3..=12 bytes of the input, the body the rest,
    // split at every byte given by `split`.
    let secret_len = 3 + usize::from(split) % 10;
    if rest.len() > secret_len {
        let (secret, body) = rest.split_at(secret_len);
        let mut s = Scrubber::new(secret).expect("non-empty");
        let step = 1 + usize::from(split) % 7;
        let mut out = Vec::new();
        for chunk in body.chunks(step) {
            out.extend_from_slice(&s.push(chunk));
        }
        out.extend_from_slice(&s.finish());
        assert_eq!(out.len(), body.len());
        // (A secret with `*` in it can be re-formed from the stars that mask it.)
        if !secret.contains(&b'*') {
            assert!(
                !out.windows(secret.len()).any(|w| w == secret),
                "the secret got through"
            );
        }
    }
});
