//! The console's pages: server-rendered HTML, no script at all, one stylesheet served by the
//! daemon itself (no CDN). Every value that came from outside (request reasons, command
//! lines, names from the ID token) goes through [`esc`].

use std::fmt::Write as _;

use crate::{
    identity::Person,
    model::{Grant, Request, Task, Timestamp},
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
"#;

/// HTML escaping for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
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
    out
}

fn layout(title: &str, who: Option<(&Person, &str)>, body: &str) -> String {
    let mut top = String::new();
    if let Some((person, csrf)) = who {
        let _ = write!(
            top,
            r#"<form class="inline" method="post" action="/logout"><span>{}</span><input type="hidden" name="csrf" value="{}"><button type="submit">Sign out</button></form>"#,
            esc(&person.id),
            esc(csrf)
        );
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{} · jitgate</title><link rel="stylesheet" href="/static/console.css"></head><body><header><h1>jitgate</h1>{top}</header><main>{body}</main></body></html>"#,
        esc(title)
    )
}

fn age(since: Timestamp, now: Timestamp) -> String {
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
            resource = esc(&q.resource),
            access = esc(q.access.as_str()),
            identity = esc(&q.identity),
            by = esc(&q.requested_by.to_string()),
            why = if q.reason.is_empty() {
                "(none given)".into()
            } else {
                esc(&q.reason)
            },
            task = esc(task.unwrap_or("-")),
            command = esc(command.unwrap_or("-")),
            statement = q
                .statement
                .as_deref()
                .map(|s| format!("<dt>Statement</dt><dd><code>{}</code></dd>", esc(s)))
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
            r#"<section class="card grant" id="{id}" data-grant="{id}"><dl><dt>Grant</dt><dd><code>{id}</code></dd><dt>Resource</dt><dd>{resource}</dd><dt>Access</dt><dd>{access}</dd><dt>Identity</dt><dd>{identity}</dd><dt>Task</dt><dd>{task}</dd><dt>Approved by</dt><dd>{by}</dd><dt>Expires in</dt><dd>{left}</dd></dl><form class="inline" method="post" action="/revoke">{csrf_field}<input type="hidden" name="id" value="{id}"><input type="text" name="reason" placeholder="reason (optional)" aria-label="Reason"><button class="deny" type="submit">Revoke</button></form></section>"#,
            id = esc(&g.id),
            resource = esc(&g.resource),
            access = esc(g.access.as_str()),
            identity = esc(&g.identity),
            task = esc(g.task.as_deref().unwrap_or("-")),
            by = esc(&g.approved_by),
            left = age(now, g.expires_at),
        );
    }
    layout("Requests", Some((person, csrf)), &b)
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
}
