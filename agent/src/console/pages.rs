//! The console's pages: server-rendered HTML, no script at all, one stylesheet served by the
//! daemon itself (no CDN). Every value that came from outside (request reasons, command
//! lines, statements, URLs, names from the ID token) goes through [`esc`] (attributes) or
//! [`show`] (text): both escape markup and show every hidden character (direction overrides,
//! zero-width and control characters, [`crate::neutral`]) as a visible `\u{…}` escape, so
//! that what an approver reads is what is there.

use std::fmt::Write as _;

use crate::{
    identity::Person,
    model::{Grant, Request, Task, Timestamp},
    neutral::{self, Piece},
};

/// The stylesheet (`/static/console.css`): readable on a phone (one column, large targets).
pub const CSS: &str = r#":root{color-scheme:light dark;--b:#8884;--accent:#2563eb;--bad:#b91c1c}
*{box-sizing:border-box}
body{font:16px/1.45 system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:0 1rem 3rem}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;justify-content:space-between;border-bottom:1px solid var(--b);padding:.75rem 0}
h1{font-size:1.25rem;margin:0}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
.card{border:1px solid var(--b);border-radius:.5rem;padding:.75rem;margin:.75rem 0}
.card dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem .75rem;margin:0 0 .5rem}
dt{opacity:.7}dd{margin:0;overflow-wrap:anywhere}
code{font-size:.9em;overflow-wrap:anywhere}
form.inline{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin:.5rem 0 0}
input[type=text]{font:inherit;padding:.45rem;min-width:10rem;flex:1;border:1px solid var(--b);border-radius:.35rem}
button,.button{font:inherit;padding:.5rem 1rem;border-radius:.35rem;border:1px solid var(--b);cursor:pointer;text-decoration:none;display:inline-block}
button.approve{background:var(--accent);color:#fff;border-color:var(--accent)}
button.deny{background:var(--bad);color:#fff;border-color:var(--bad)}
.notice{padding:.6rem .8rem;border-radius:.35rem;border:1px solid var(--b);margin:.75rem 0}
.error{border-color:var(--bad)}
.empty{opacity:.7}
nav{display:flex;flex-wrap:wrap;gap:.25rem 1rem}
nav a{text-decoration:none}nav a[aria-current]{font-weight:600;text-decoration:underline}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid var(--b)}
th{font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}td.when{white-space:nowrap}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:.9em}
pre.io{border-left:3px solid var(--b);padding-left:.5rem}pre.input{border-left-color:var(--accent)}
.hidden-char{background:#f59e0b;color:#000;border-radius:.2rem;padding:0 .15rem;font-family:monospace}
.decision-denied,.decision-refused,.bad{color:var(--bad);font-weight:600}
.decision-approved{color:var(--accent);font-weight:600}
.ok{color:#15803d;font-weight:600}
.facts{opacity:.8;font-size:.9em}
.more{margin:1rem 0}
"#;

fn push_markup_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// HTML escaping for attribute values (and text that needs no marking): markup escaped, every
/// hidden character replaced by its `\u{…}` escape.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for piece in neutral::pieces(s, false) {
        match piece {
            Piece::Plain(p) => push_markup_escaped(&mut out, p),
            Piece::Hidden(c) => out.push_str(&neutral::escape(c)),
        }
    }
    out
}

fn render(s: &str, keep_layout: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for piece in neutral::pieces(s, keep_layout) {
        match piece {
            Piece::Plain(p) => push_markup_escaped(&mut out, p),
            Piece::Hidden(c) => {
                let _ = write!(
                    out,
                    r#"<span class="hidden-char" title="a hidden character, shown escaped">{}</span>"#,
                    neutral::escape(c)
                );
            }
        }
    }
    out
}

/// Text someone else wrote, as page text: like [`esc`], with each hidden character marked so
/// that it stands out from the same characters typed literally.
pub fn show(s: &str) -> String {
    render(s, false)
}

/// Like [`show`], keeping line breaks and tabs (for a `<pre>` block: multi-line SQL, terminal
/// output); a carriage return is still shown escaped.
pub fn show_block(s: &str) -> String {
    render(s, true)
}

/// The console's sections, in the header of every signed-in page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Requests,
    Sessions,
    Audit,
}

pub(super) fn layout(title: &str, who: Option<(&Person, &str)>, body: &str) -> String {
    layout_in(title, None, who, body)
}

pub(super) fn layout_in(
    title: &str,
    section: Option<Section>,
    who: Option<(&Person, &str)>,
    body: &str,
) -> String {
    let mut top = String::new();
    if let Some((person, csrf)) = who {
        top.push_str("<nav>");
        for (s, href, name) in [
            (Section::Requests, "/", "Requests"),
            (Section::Sessions, "/sessions", "Sessions"),
            (Section::Audit, "/audit", "Audit and status"),
        ] {
            let current = if section == Some(s) {
                r#" aria-current="page""#
            } else {
                ""
            };
            let _ = write!(top, r#"<a href="{href}"{current}>{name}</a>"#);
        }
        top.push_str("</nav>");
        let _ = write!(
            top,
            r#"<form class="inline" method="post" action="/logout"><span>{}</span><input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>"#,
            show(&person.id),
            esc(csrf)
        );
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{} · jitgate</title><link rel="stylesheet" href="/static/console.css"></head><body><header><h1>jitgate</h1>{top}</header><main>{body}</main></body></html>"#,
        esc(title)
    )
}

/// Below a bounded list: a link to twice as many (`href` ends where `limit=N` is appended),
/// or, at the page's most, the CLI command that lists more. Nothing when the list was short.
pub(super) fn more(
    b: &mut String,
    shown: usize,
    limit: usize,
    max: usize,
    (href, extra): (&str, &str),
    what: &str,
    cli: &str,
) {
    use std::fmt::Write as _;
    if shown < limit {
        return;
    }
    if limit < max {
        let _ = write!(
            b,
            r#"<p class="more"><a class="button" href="{href}limit={}{extra}">Show older {what}</a></p>"#,
            (limit * 2).min(max)
        );
    } else {
        let _ = write!(
            b,
            r#"<p class="empty">Only the newest {limit} are shown here; <code>{cli}</code> lists more.</p>"#
        );
    }
}

pub(super) fn age(since: Timestamp, now: Timestamp) -> String {
    let secs = (now.0.saturating_sub(since.0) / 1000).max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d", s / 86_400),
    }
}

/// The main page: requests waiting for a decision, then live grants.
pub fn overview(
    person: &Person,
    csrf: &str,
    notice: Option<&str>,
    pending: &[Request],
    tasks: &[Task],
    grants: &[Grant],
) -> String {
    let now = Timestamp::now();
    let csrf_field = format!(r#"<input type="hidden" name="csrf" value="{}">"#, esc(csrf));
    let mut b = String::new();
    if let Some(n) = notice {
        let _ = write!(b, r#"<p class="notice" role="status">{}</p>"#, esc(n));
    }
    let _ = write!(b, "<h2>Waiting for a decision ({})</h2>", pending.len());
    if pending.is_empty() {
        b.push_str(r#"<p class="empty">No request is waiting.</p>"#);
    }
    for q in pending {
        let task = q.task.as_deref();
        let command = task
            .and_then(|t| tasks.iter().find(|x| x.id == t))
            .map(|t| t.command.as_str());
        let _ = write!(
            b,
            r#"<section class="card request" id="{id}" data-request="{id}"><dl><dt>Request</dt><dd><code>{id}</code></dd><dt>Resource</dt><dd>{resource}</dd><dt>Access</dt><dd>{access}</dd><dt>Identity</dt><dd>{identity}</dd><dt>Asked by</dt><dd>{by}</dd><dt>Why</dt><dd>{why}</dd><dt>Task</dt><dd>{task}</dd><dt>Command</dt><dd><code>{command}</code></dd>{statement}<dt>Asked for</dt><dd>{ttl}</dd><dt>Age</dt><dd>{age}</dd></dl>"#,
            id = esc(&q.id),
            resource = show(&q.resource),
            access = esc(q.access.as_str()),
            identity = show(&q.identity),
            by = show(&q.requested_by.to_string()),
            why = if q.reason.is_empty() {
                "(none given)".into()
            } else {
                show(&q.reason)
            },
            task = show(task.unwrap_or("-")),
            command = show(command.unwrap_or("-")),
            statement = q
                .statement
                .as_deref()
                .map(|s| format!("<dt>Statement</dt><dd><pre>{}</pre></dd>", show_block(s)))
                .unwrap_or_default()
                + &q.needs
                    .as_ref()
                    .filter(|n| n.step_up.is_required())
                    .map(|n| {
                        format!(
                            "<dt>Approving needs</dt><dd>{} to the console</dd>",
                            esc(&n.step_up.to_string())
                        )
                    })
                    .unwrap_or_default()
                + &if q.approvals.is_empty() {
                    String::new()
                } else {
                    format!(
                        "<dt>Approved so far</dt><dd>{} (its policy needs more)</dd>",
                        esc(&q
                            .approvals
                            .iter()
                            .map(|a| a.by.as_str())
                            .collect::<Vec<_>>()
                            .join(", "))
                    )
                },
            ttl = esc(&humantime::format_duration(q.ttl).to_string()),
            age = age(q.created_at, now),
        );
        let _ = write!(
            b,
            r#"<form class="inline" method="post" action="/approve">{csrf_field}<input type="hidden" name="id" value="{id}"><input type="text" name="ttl" placeholder="shorter TTL, e.g. 10m (optional)" aria-label="TTL"><button class="approve" type="submit">Approve</button></form><form class="inline" method="post" action="/deny">{csrf_field}<input type="hidden" name="id" value="{id}"><input type="text" name="reason" placeholder="reason (optional)" aria-label="Reason"><button class="deny" type="submit">Deny</button></form></section>"#,
            id = esc(&q.id)
        );
    }
    let _ = write!(b, "<h2>Live grants ({})</h2>", grants.len());
    if grants.is_empty() {
        b.push_str(r#"<p class="empty">No grant is live.</p>"#);
    }
    for g in grants {
        let _ = write!(
            b,
            r#"<section class="card grant" id="{id}" data-grant="{id}"><dl><dt>Grant</dt><dd><code>{id}</code></dd><dt>Resource</dt><dd>{resource}</dd><dt>Access</dt><dd>{access}</dd><dt>Identity</dt><dd>{identity}</dd><dt>Task</dt><dd>{task}</dd><dt>Approved by</dt><dd>{by}</dd><dt>Hosts</dt><dd>{hosts}</dd><dt>Expires in</dt><dd>{left}</dd></dl><form class="inline" method="post" action="/revoke">{csrf_field}<input type="hidden" name="id" value="{id}"><input type="text" name="reason" placeholder="reason (optional)" aria-label="Reason"><button class="deny" type="submit">Revoke</button></form></section>"#,
            id = esc(&g.id),
            resource = show(&g.resource),
            access = esc(g.access.as_str()),
            identity = show(&g.identity),
            task = show(g.task.as_deref().unwrap_or("-")),
            by = show(&g.approved_by),
            hosts = show(&g.hosts.to_string()),
            left = age(now, g.expires_at),
        );
    }
    layout_in(
        "Requests",
        Some(Section::Requests),
        Some((person, csrf)),
        &b,
    )
}

/// A refusal or failure, with the way back.
pub fn problem(person: Option<(&Person, &str)>, title: &str, message: &str) -> String {
    layout(
        title,
        person,
        &format!(
            r#"<p class="notice error" role="alert">{}</p><p><a class="button" href="/">Back</a></p>"#,
            esc(message)
        ),
    )
}

/// An approval that needs a fresher or stronger sign-in: why, and the way to it (`login`:
/// the console's sign-in URL asking the provider for what policy wants).
pub fn sign_in_again(person: &Person, csrf: &str, message: &str, login: &str) -> String {
    layout(
        "Sign in again",
        Some((person, csrf)),
        &format!(
            r#"<p class="notice error" role="alert">{}</p><p><a class="button step-up" href="{}">Sign in again</a> <a class="button" href="/">Back</a></p>"#,
            esc(message),
            esc(login)
        ),
    )
}

/// After signing out (and for a sign-in that failed).
pub fn signed_out(message: &str) -> String {
    layout(
        "Signed out",
        None,
        &format!(
            r#"<p class="notice">{}</p><p><a class="button" href="/login">Sign in</a></p>"#,
            esc(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>'&"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#39;&amp;"
        );
        let page = problem(None, "t", "<img src=x onerror=alert(1)>");
        assert!(!page.contains("<img"));
        assert!(!page.contains("<script"));
    }

    #[test]
    fn hidden_characters_are_shown_wherever_a_workload_wrote() {
        // Each string a workload (or a signed-in name) controls, with a different disguise.
        let request: Request = serde_json::from_value(serde_json::json!({
            "id": "req_1",
            "identity": "bot",
            "resource": "orders-db",
            "access": "read",
            "ttl_secs": 600,
            "reason": "routine\u{202e}tropxe lla\u{202c} check",
            "task": "tsk_1",
            "requested_by": {"uid": 1000, "user": "ro\u{200b}ot"},
            "created_at": "2026-11-18T11:06:40.123Z",
            "status": "pending",
            "policy": "p",
            "decided_by": null,
            "decided_at": null,
            "decision_reason": null,
            "grant": null,
            "statement": "SELECT 1;\r\u{1b}[2K DROP TABLE users; -- \u{2066}x\u{2069}",
        }))
        .unwrap();
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "tsk_1",
            "identity": "bot",
            "cgroup": "/x",
            "launched_by": {"uid": 0, "user": "root"},
            "run_as_uid": 1000,
            "command": "backup.sh \u{feff}--dry-run\u{8}\u{8}\u{8}",
            "reason": "",
            "started_at": "2026-11-18T11:06:40.123Z",
            "ended_at": null,
        }))
        .unwrap();
        let person = Person {
            id: "ann\u{202e}@example.com".into(),
            groups: vec![],
            unix_uid: None,
            unix_account: None,
            ..Default::default()
        };
        let page = overview(&person, "csrf", None, &[request], &[task], &[]);
        for raw in [
            '\u{202e}', '\u{202c}', '\u{200b}', '\r', '\u{1b}', '\u{2066}', '\u{feff}', '\u{8}',
        ] {
            assert!(!page.contains(raw), "{raw:?} reached the page");
        }
        for shown in [
            r#"routine<span class="hidden-char" title="a hidden character, shown escaped">\u{202e}</span>tropxe"#,
            r#"ro<span class="hidden-char" title="a hidden character, shown escaped">\u{200b}</span>ot"#,
            r"\u{d}",
            r"\u{1b}",
            r"\u{2066}",
            r"\u{feff}",
            r"\u{8}",
            r#"ann<span class="hidden-char" title="a hidden character, shown escaped">\u{202e}</span>@example.com"#,
        ] {
            assert!(page.contains(shown), "{shown} not in {page}");
        }
        // In an attribute, no markup: the escape as plain text.
        assert_eq!(esc("a\u{202e}\"b"), r"a\u{202e}&quot;b");
    }
}
