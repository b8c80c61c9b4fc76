//! Which requests may be filed, which are approved on the spot, and who may approve the rest.
//! Pure functions of the config, so every rule is unit-tested.

use std::time::Duration;

use crate::{
    config::{Access, Approval, Config, HostsSpec, Policy, Principal},
    model::human_duration,
};

/// What policy says about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An `approval = "auto"` policy covers it: grant at once.
    Auto { policy: String },
    /// Only `manual` policies cover it: file it for these approvers.
    Manual {
        policy: String,
        approvers: Vec<Principal>,
    },
    /// Nothing allows it; the message says why and what would.
    Refused { reason: String },
}

/// Evaluates a request for `access` to `resource` by `identity` for `ttl`.
pub fn evaluate(
    config: &Config,
    identity: &str,
    resource: &str,
    access: Access,
    ttl: Duration,
) -> Verdict {
    if config.workload(identity).is_none() {
        return Verdict::Refused {
            reason: format!("`{identity}` is not a configured workload identity"),
        };
    }
    if config.resource(resource).is_none() {
        let known: Vec<&str> = config.resources.iter().map(|r| r.name.as_str()).collect();
        return Verdict::Refused {
            reason: format!(
                "`{resource}` is not a configured resource (known: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        };
    }
    let covering: Vec<&Policy> = config
        .policies
        .iter()
        .filter(|p| p.covers(identity, resource, access))
        .collect();
    if covering.is_empty() {
        let offered: Vec<String> = config
            .policies
            .iter()
            .filter(|p| {
                p.identities.iter().any(|i| i == "*" || i == identity)
                    && p.resources.iter().any(|r| r == "*" || r == resource)
            })
            .flat_map(|p| p.access.iter().map(|a| a.to_string()))
            .collect();
        let hint = if offered.is_empty() {
            format!("no policy mentions {identity} and {resource}")
        } else {
            format!("policies allow {identity} only: {}", offered.join(", "))
        };
        return Verdict::Refused {
            reason: format!(
                "no policy lets {identity} have {access} access to {resource} ({hint})"
            ),
        };
    }
    let fitting: Vec<&&Policy> = covering.iter().filter(|p| ttl <= p.max_ttl).collect();
    if fitting.is_empty() {
        let longest = covering.iter().map(|p| p.max_ttl).max().unwrap_or_default();
        return Verdict::Refused {
            reason: format!(
                "a ttl of {} is longer than policy allows for {identity} on {resource} ({}); ask for --ttl {} or less",
                human_duration(ttl),
                human_duration(longest),
                human_duration(longest)
            ),
        };
    }
    // A covering policy that asks more of approving (several approvers, a step-up sign-in)
    // is not waived by another that would grant at once: "reads are automatic everywhere"
    // beside "reads of prod need MFA" means prod reads need MFA.
    let strict: Vec<&&Policy> = covering
        .iter()
        .filter(|p| p.approvals > 1 || !p.approvals_from.is_empty() || p.step_up.is_required())
        .collect();
    if strict.is_empty()
        && let Some(auto) = fitting.iter().find(|p| p.approval == Approval::Auto)
    {
        return Verdict::Auto {
            policy: auto.name.clone(),
        };
    }
    let fitting: Vec<&&Policy> = if strict.is_empty() { fitting } else { strict };
    let mut approvers = Vec::new();
    for p in &fitting {
        for a in &p.approvers {
            if !approvers.contains(a) {
                approvers.push(a.clone());
            }
        }
    }
    Verdict::Manual {
        policy: fitting[0].name.clone(),
        approvers,
    }
}

/// Where grants under policy `name` for this request may be used: its `hosts`, when a policy
/// of that name covers the request; else (the policy was renamed or removed, or another
/// host's policy filed it) the narrowest scope, the requesting host.
pub fn hosts_of<'a>(
    config: &'a Config,
    name: &str,
    identity: &str,
    resource: &str,
    access: Access,
) -> &'a HostsSpec {
    static REQUESTING: HostsSpec = HostsSpec::Requesting;
    config
        .policies
        .iter()
        .find(|p| p.name == name && p.covers(identity, resource, access))
        .map_or(&REQUESTING, |p| &p.hosts)
}

/// The longest ttl any policy allows for this request (to cap an approver's `--ttl`).
pub fn max_ttl(
    config: &Config,
    identity: &str,
    resource: &str,
    access: Access,
) -> Option<Duration> {
    config
        .policies
        .iter()
        .filter(|p| p.covers(identity, resource, access))
        .map(|p| p.max_ttl)
        .max()
}

/// Everyone who may approve this request under the current config: the approvers of every
/// manual policy that covers it.
pub fn approvers_for(
    config: &Config,
    identity: &str,
    resource: &str,
    access: Access,
) -> Vec<Principal> {
    let mut out = Vec::new();
    for p in config
        .policies
        .iter()
        .filter(|p| p.covers(identity, resource, access))
    {
        for a in &p.approvers {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
    }
    out
}

/// What approving a request takes where several policies cover it: the most approvals any
/// of them asks for, and every principal any of them names in `approvals_from`.
pub fn approvals_needed(
    config: &Config,
    identity: &str,
    resource: &str,
    access: Access,
) -> (u32, Vec<Principal>) {
    let mut needed = 1;
    let mut from: Vec<Principal> = Vec::new();
    for p in config
        .policies
        .iter()
        .filter(|p| p.covers(identity, resource, access))
    {
        needed = needed.max(p.approvals);
        for a in &p.approvals_from {
            if !from.contains(a) {
                from.push(a.clone());
            }
        }
    }
    (
        needed.max(u32::try_from(from.len()).unwrap_or(u32::MAX)),
        from,
    )
}

/// What approving a request asks of the approver's sign-in where several policies cover
/// it: the strictest of them (see [`crate::config::StepUp::and`]).
pub fn step_up_needed(
    config: &Config,
    identity: &str,
    resource: &str,
    access: Access,
) -> crate::config::StepUp {
    config
        .policies
        .iter()
        .filter(|p| p.covers(identity, resource, access))
        .fold(crate::config::StepUp::default(), |acc, p| {
            acc.and(&p.step_up)
        })
}

/// Whether each of `from` (principal names) is covered by an approval of its own: one
/// person in two named groups does not count for both (a matching of principals to
/// distinct approvals, found by augmenting paths; both lists are short).
pub fn each_covered_by_a_different_approval(from: &[String], covers: &[Vec<String>]) -> bool {
    fn place(
        p: usize,
        from: &[String],
        covers: &[Vec<String>],
        owner: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for (a, c) in covers.iter().enumerate() {
            if seen[a] || !c.contains(&from[p]) {
                continue;
            }
            seen[a] = true;
            if owner[a].is_none_or(|q| place(q, from, covers, owner, seen)) {
                owner[a] = Some(p);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; covers.len()];
    (0..from.len()).all(|p| {
        let mut seen = vec![false; covers.len()];
        place(p, from, covers, &mut owner, &mut seen)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn named_principals_need_approvals_of_their_own() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let from = s(&["group:dba", "group:sec"]);
        // Alice is in both groups, Bob in neither: not one of each.
        assert!(!each_covered_by_a_different_approval(
            &from,
            &[s(&["group:dba", "group:sec"]), s(&[])]
        ));
        // Alice in both, Carol in dba: Alice counts for sec, Carol for dba.
        assert!(each_covered_by_a_different_approval(
            &from,
            &[s(&["group:dba", "group:sec"]), s(&["group:dba"])]
        ));
        assert!(each_covered_by_a_different_approval(&[], &[]));
    }

    fn config() -> Config {
        Config::from_toml(
            Path::new("t.toml"),
            r#"
[[workload]]
identity = "ci-bot"
[[workload]]
identity = "other"
[[resource]]
name = "db"
address = "10.0.0.5:5432"
[[resource]]
name = "web"
address = "10.0.0.6:443"
[[policy]]
name = "db-read"
identities = ["ci-bot"]
resources = ["db"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["alice", "group:dba"]
[[policy]]
name = "web-auto"
identities = ["*"]
resources = ["web"]
access = ["read", "write"]
max_ttl = "10m"
approval = "auto"
"#,
        )
        .unwrap()
    }

    const M15: Duration = Duration::from_secs(900);

    #[test]
    fn manual_policy_files_for_its_approvers() {
        let v = evaluate(&config(), "ci-bot", "db", Access::Read, M15);
        assert_eq!(
            v,
            Verdict::Manual {
                policy: "db-read".into(),
                approvers: vec![
                    Principal::User("alice".into()),
                    Principal::Group("dba".into())
                ]
            }
        );
    }

    /// Hostile: an automatic policy over everything does not waive what a stricter policy
    /// covering the same request asks (a step-up, several approvers).
    #[test]
    fn an_automatic_policy_does_not_waive_a_stricter_one() {
        let mut c = config();
        let mut auto_all = c.policies[1].clone();
        auto_all.name = "reads-auto".into();
        auto_all.identities = vec!["*".into()];
        auto_all.resources = vec!["*".into()];
        auto_all.max_ttl = Duration::from_secs(7200);
        c.policies.push(auto_all);
        assert!(matches!(
            evaluate(&c, "ci-bot", "db", Access::Read, M15),
            Verdict::Auto { .. }
        ));
        for strict in [
            crate::config::StepUp {
                max_age_secs: Some(300),
                acr: vec![],
            },
            crate::config::StepUp {
                max_age_secs: None,
                acr: vec!["mfa".into()],
            },
        ] {
            c.policies[0].step_up = strict;
            assert!(
                matches!(
                    evaluate(&c, "ci-bot", "db", Access::Read, M15),
                    Verdict::Manual { ref policy, .. } if policy == "db-read"
                ),
                "{:?}",
                c.policies[0].step_up
            );
        }
        c.policies[0].step_up = crate::config::StepUp::default();
        c.policies[0].approvals = 2;
        assert!(matches!(
            evaluate(&c, "ci-bot", "db", Access::Read, M15),
            Verdict::Manual { ref policy, .. } if policy == "db-read"
        ));
    }

    #[test]
    fn auto_policy_grants() {
        let v = evaluate(
            &config(),
            "other",
            "web",
            Access::Write,
            Duration::from_secs(60),
        );
        assert_eq!(
            v,
            Verdict::Auto {
                policy: "web-auto".into()
            }
        );
    }

    #[test]
    fn refusals_say_why() {
        let c = config();
        let Verdict::Refused { reason } = evaluate(&c, "ci-bot", "db", Access::Write, M15) else {
            panic!()
        };
        assert!(
            reason.contains("no policy lets ci-bot have write access to db"),
            "{reason}"
        );
        assert!(reason.contains("only: read"), "{reason}");

        let Verdict::Refused { reason } = evaluate(&c, "other", "db", Access::Read, M15) else {
            panic!()
        };
        assert!(
            reason.contains("no policy mentions other and db"),
            "{reason}"
        );

        let Verdict::Refused { reason } = evaluate(&c, "other", "web", Access::Read, M15) else {
            panic!()
        };
        assert!(reason.contains("--ttl 10m or less"), "{reason}");

        let Verdict::Refused { reason } = evaluate(&c, "ci-bot", "nope", Access::Read, M15) else {
            panic!()
        };
        assert!(reason.contains("known: db, web"), "{reason}");

        assert!(matches!(
            evaluate(&c, "ghost", "db", Access::Read, M15),
            Verdict::Refused { .. }
        ));
    }

    #[test]
    fn caps_and_approvers() {
        let c = config();
        assert_eq!(
            max_ttl(&c, "ci-bot", "db", Access::Read),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_ttl(&c, "ci-bot", "db", Access::Admin), None);
        assert_eq!(approvers_for(&c, "other", "web", Access::Read), vec![]);
    }
}
