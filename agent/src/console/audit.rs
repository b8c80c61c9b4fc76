//! The console's audit page: the host's status (as `jitgate status` reports it: the gate
//! attached, health, kernel counters), whether the audit log's hash chain verifies (as
//! `jitgate audit verify` checks it), and the newest audit records. Rendering only: who may
//! see it was decided by the control service.

use std::fmt::Write as _;

use super::pages::{Section, esc, layout_in, show};
use crate::{
    control::api::StatusReport, identity::Person, model::AuditEvent, store::audit::VerifyReport,
};

/// Records listed by default, and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 2000;

fn when(t: crate::model::Timestamp) -> String {
    let s = t.to_string();
    s.get(..23).map_or(s.clone(), |x| x.replace('T', " "))
}

fn verification(b: &mut String, verify: &VerifyReport) {
    if verify.problems.is_empty() && !verify.lost.is_empty() {
        let _ = write!(
            b,
            r#"<section class="card error" id="verify" data-verified="false"><p class="bad" role="alert">RECORDS LOST: the hash chain is intact ({} records), but this host lost records before they reached it:</p><ul>"#,
            verify.records
        );
        for p in &verify.lost {
            let _ = write!(b, "<li>{}</li>", show(p));
        }
        b.push_str("</ul></section>");
    } else if verify.ok {
        let _ = write!(
            b,
            r#"<section class="card" id="verify" data-verified="true"><p class="ok">Audit log verified: {} records, hash chain intact.</p></section>"#,
            verify.records
        );
    } else {
        let _ = write!(
            b,
            r#"<section class="card error" id="verify" data-verified="false"><p class="bad" role="alert">AUDIT LOG TAMPERED WITH ({} records checked):</p><ul>"#,
            verify.records
        );
        for p in verify.problems.iter().chain(&verify.lost) {
            let _ = write!(b, "<li>{}</li>", show(p));
        }
        b.push_str("</ul></section>");
    }
}

fn host(b: &mut String, s: &StatusReport) {
    let health = if s.problems.is_empty() {
        r#"<span class="ok">healthy</span>"#.to_owned()
    } else {
        format!(
            r#"<span class="bad">UNHEALTHY</span><ul>{}</ul>"#,
            s.problems
                .iter()
                .map(|p| format!("<li>{}</li>", show(p)))
                .collect::<String>()
        )
    };
    let attached = if s.attached.is_empty() {
        r#"<span class="bad">nothing attached: the gate is open</span>"#.to_owned()
    } else {
        show(&s.attached.join(", "))
    };
    let _ = write!(
        b,
        r#"<section class="card" id="host"><dl><dt>Agent</dt><dd>jitgated {version} (pid {pid}), up since {started}</dd><dt>Health</dt><dd>{health}</dd><dt>Gate cgroup</dt><dd><code>{cgroup}</code></dd><dt>Attached</dt><dd>{attached}</dd><dt>Kernel rules</dt><dd>{prefixes} destination prefixes</dd><dt>Proxy</dt><dd>{proxy}</dd><dt>Egress</dt><dd>{egress}</dd><dt>Now</dt><dd>{grants} live grants, {pending} requests pending, {open} sessions open</dd><dt>Identities</dt><dd>{identities}</dd><dt>Resources</dt><dd>{resources}</dd></dl>"#,
        version = esc(&s.version),
        pid = s.pid,
        started = when(s.started_at),
        cgroup = show(&s.gate_cgroup),
        prefixes = s.destination_prefixes,
        proxy = show(&s.proxy_listen.join(", ")),
        egress = show(&s.egress),
        grants = s.live_grants,
        pending = s.pending_requests,
        open = s.open_sessions,
        identities = show(&s.identities.join(", ")),
        resources = show(&s.resources.join(", ")),
    );
    if let Some(store) = &s.store {
        // Fleet mode: whether this host can confirm its grants with the shared store.
        let state = if store.available {
            format!(r#"<span class="ok">{}</span>"#, store.state.as_str())
        } else {
            format!(
                r#"<span class="bad">{}: no new grants or sessions</span>"#,
                store.state.as_str()
            )
        };
        let _ = write!(
            b,
            r#"<dl><dt>Shared store</dt><dd>{state} since {since}{error}; lease {lease} s</dd></dl>"#,
            since = when(store.since),
            error = store
                .error
                .as_deref()
                .map(|e| format!(" ({})", show(e)))
                .unwrap_or_default(),
            lease = store.lease_secs,
        );
    }
    if let Some(f) = &s.store_writes {
        let _ = write!(
            b,
            r#"<dl><dt>Store writes</dt><dd><span class="bad">failing since {since}: gate closed to every session</span> ({failed} failures; {error})</dd></dl>"#,
            since = when(f.since),
            failed = f.failed,
            error = show(&f.error),
        );
    }
    if !s.kernel_counters.is_empty() {
        b.push_str(r#"<div class="scroll"><table class="counters"><thead><tr><th>Kernel counter</th><th>Value</th></tr></thead><tbody>"#);
        for (name, value) in &s.kernel_counters {
            let _ = write!(
                b,
                r#"<tr><td><code>{}</code></td><td class="num">{value}</td></tr>"#,
                show(name)
            );
        }
        b.push_str("</tbody></table></div>");
    }
    b.push_str("</section>");
}

/// `/audit`.
pub fn page(
    person: &Person,
    csrf: &str,
    status: &StatusReport,
    verify: &VerifyReport,
    events: &[AuditEvent],
    limit: usize,
) -> String {
    let mut b = String::new();
    b.push_str("<h2>Host</h2>");
    host(&mut b, status);
    b.push_str("<h2>Audit log</h2>");
    verification(&mut b, verify);
    let _ = write!(b, "<p>The newest {} records:</p>", events.len());
    if !events.is_empty() {
        b.push_str(r#"<div class="scroll"><table class="audit"><thead><tr><th>#</th><th>At</th><th>Event</th><th>By</th><th>Detail</th></tr></thead><tbody>"#);
        for e in events {
            let _ = write!(
                b,
                r#"<tr data-seq="{seq}"><td class="num">{seq}</td><td class="when">{at}</td><td><code>{kind}</code></td><td>{actor}</td><td class="facts"><code>{detail}</code></td></tr>"#,
                seq = e.seq,
                at = when(e.at),
                kind = show(&e.kind),
                actor = show(&e.actor),
                detail = show(&e.detail.to_string()),
            );
        }
        b.push_str("</tbody></table></div>");
    }
    super::pages::more(
        &mut b,
        events.len(),
        limit,
        MAX_LIMIT,
        ("/audit?", ""),
        "records",
        "jitgate audit --limit N",
    );
    layout_in(
        "Audit and status",
        Some(Section::Audit),
        Some((person, csrf)),
        &b,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    fn person() -> Person {
        Person {
            id: "ann@example.com".into(),
            groups: vec![],
            unix_uid: None,
            unix_account: None,
            ..Default::default()
        }
    }

    fn status(attached: &[&str], problems: &[&str]) -> StatusReport {
        StatusReport {
            version: "1.0".into(),
            pid: 7,
            started_at: Timestamp(1_795_000_000_000),
            config: "/etc/jitgate/jitgate.toml".into(),
            gate_cgroup: "/sys/fs/cgroup/jitgate".into(),
            pin_dir: "/sys/fs/bpf/jitgate".into(),
            attached: attached.iter().map(|s| (*s).to_owned()).collect(),
            problems: problems.iter().map(|s| (*s).to_owned()).collect(),
            egress: "deny".into(),
            proxy_listen: vec!["127.0.0.1:15432".into()],
            destination_prefixes: 3,
            kernel_counters: [("redirected".to_owned(), 12u64), ("refused".into(), 2)].into(),
            live_grants: 1,
            pending_requests: 0,
            open_sessions: 2,
            resources: vec!["orders-db".into()],
            identities: vec!["bot".into()],
            caller: "oidc ann@example.com".into(),
            store: None,
            store_writes: None,
            store_backlog: 0,
        }
    }

    fn event(seq: i64, actor: &str) -> AuditEvent {
        AuditEvent {
            seq,
            at: Timestamp(1_795_000_000_000 + seq),
            kind: "request.filed".into(),
            actor: actor.into(),
            detail: serde_json::json!({"reason": "why\u{202e}gnp.exe <b>"}),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn verified_healthy_and_attached() {
        let ok = VerifyReport {
            records: 12,
            ok: true,
            problems: vec![],
            lost: vec![],
        };
        let page = page(
            &person(),
            "c",
            &status(&["connect4", "connect6"], &[]),
            &ok,
            &[event(2, "workload bot"), event(1, "user root")],
            100,
        );
        for needle in [
            "Audit log verified: 12 records",
            "data-verified=\"true\"",
            "healthy",
            "connect4, connect6",
            "redirected",
            ">12<",
            "2 sessions open",
        ] {
            assert!(page.contains(needle), "{needle}: {page}");
        }
        assert!(page.find("data-seq=\"2\"") < page.find("data-seq=\"1\""));
        assert!(!page.contains('\u{202e}') && page.contains("\\u{202e}"));
        assert!(!page.contains("<b>"));
    }

    #[test]
    fn tampering_and_an_open_gate_are_plain_to_see() {
        let bad = VerifyReport {
            records: 5,
            ok: false,
            problems: vec!["record 3: hash mismatch".into()],
            lost: vec![],
        };
        let page = page(
            &person(),
            "c",
            &status(&[], &["the proxy is not accepting"]),
            &bad,
            &[],
            100,
        );
        for needle in [
            "AUDIT LOG TAMPERED WITH (5 records checked)",
            "record 3: hash mismatch",
            "data-verified=\"false\"",
            "UNHEALTHY",
            "the proxy is not accepting",
            "the gate is open",
        ] {
            assert!(page.contains(needle), "{needle}: {page}");
        }
        assert!(!page.contains("verified:"));
    }
}
