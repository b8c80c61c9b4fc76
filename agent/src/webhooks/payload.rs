//! What a webhook's body says: the audit record itself (`json`), or a message a person reads
//! in Slack (`slack`). Both are built from the committed record only, so a notification never
//! says more than the audit log does, and never anything the log does not.

use serde_json::{Value, json};

use crate::{config::WebhookFormat, model::AuditEvent, model::human_duration};

/// What a body is built from beside the record.
pub struct Context<'a> {
    /// This host's name (several agents may post to one channel).
    pub host: &'a str,
    /// The console's base URL, for a link to the thing the event names.
    pub console_url: Option<&'a str>,
}

/// The body for `format`.
pub fn body(format: WebhookFormat, record: &AuditEvent, cx: &Context<'_>) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => generic(record, cx),
        WebhookFormat::Slack => json!({ "text": slack_text(record, cx) }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The generic body: the record as the audit log holds it. `id` (its hash) is unique per
/// event and the same on every retry, so a receiver can drop duplicates.
fn generic(record: &AuditEvent, cx: &Context<'_>) -> Value {
    let mut v = json!({
        "id": record.hash,
        "event": record.kind,
        "at": record.at,
        "host": cx.host,
        "actor": record.actor,
        "seq": record.seq,
        "detail": record.detail,
    });
    if let Some(link) = console_link(record, cx) {
        v["console_url"] = Value::String(link);
    }
    v
}

/// Where the console shows what the record is about: its request, else its grant (each a
/// card on the console's overview, anchored by its id). Only ids the agent made (letters,
/// digits, `_`, `-`) are put in a URL.
fn console_link(record: &AuditEvent, cx: &Context<'_>) -> Option<String> {
    let base = cx.console_url?;
    for key in ["request", "grant"] {
        if let Some(id) = record.detail.get(key).and_then(Value::as_str)
            && !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Some(format!("{base}/#{id}"));
        }
    }
    None
}

/// Slack's mrkdwn gives `<`, `>` and `&` meaning (links, mentions such as `<!channel>`):
/// escape them in everything that came from a workload or a person. Line breaks, other
/// control and bidi characters become spaces and backticks quotes, so that text a workload
/// wrote cannot start a line of its own that looks like the agent's (a forged "approved by"
/// or a `jitgate approve` for another request) or leave its code span.
fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '`' => '\'',
            c if c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}') =>
            {
                ' '
            }
            c => c,
        })
        .collect::<String>()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters of `s`, escaped.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() > max {
        let kept: String = s.chars().take(max).collect();
        format!("{}…", esc(&kept))
    } else {
        esc(s)
    }
}

fn field<'a>(record: &'a AuditEvent, key: &str) -> &'a str {
    record
        .detail
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or("?")
}

fn text_of(record: &AuditEvent, key: &str, max: usize) -> String {
    cut(field(record, key), max)
}

/// The message a person reads.
fn slack_text(record: &AuditEvent, cx: &Context<'_>) -> String {
    let f = |k: &str| text_of(record, k, 200);
    let actor = cut(&record.actor, 120);
    let mut text = match record.kind.as_str() {
        "request.filed" => {
            let ttl = record
                .detail
                .get("ttl_secs")
                .and_then(Value::as_u64)
                .map_or_else(String::new, |s| {
                    format!(" for {}", human_duration(std::time::Duration::from_secs(s)))
                });
            let task = record
                .detail
                .get("task")
                .and_then(Value::as_str)
                .map_or_else(String::new, |t| format!(" · task `{}`", cut(t, 40)));
            format!(
                ":raising_hand: *{}* asks for *{}* on *{}*{ttl}: “{}”\nRequest `{}`{task} · policy {} · `jitgate approve {}`",
                f("identity"),
                f("access"),
                f("resource"),
                text_of(record, "reason", 500),
                f("request"),
                f("policy"),
                f("request"),
            )
        }
        "statement.held" => format!(
            ":hourglass: A statement on *{}* is held for approval ({}):\n```{}```\nRequest `{}` · `jitgate approve {}`",
            f("resource"),
            f("rule"),
            text_of(record, "statement", 400),
            f("request"),
            f("request"),
        ),
        "request.approved" | "statement.approved" => {
            format!(
                ":white_check_mark: Request `{}` approved by {actor}",
                f("request")
            )
        }
        "request.denied" => {
            let reason = record
                .detail
                .get("reason")
                .and_then(Value::as_str)
                .map_or_else(String::new, |r| format!(": “{}”", cut(r, 300)));
            format!(
                ":no_entry: Request `{}` denied by {actor}{reason}",
                f("request")
            )
        }
        "request.expired" => format!(
            ":hourglass_flowing_sand: Request `{}` lapsed without a decision",
            f("request")
        ),
        "grant.revoked" => format!(
            ":scissors: Grant `{}` revoked by {actor}: “{}”",
            f("grant"),
            text_of(record, "reason", 300)
        ),
        "session.refused" => format!(
            ":octagonal_sign: A connection of *{}* to *{}* was refused: {} (command `{}`)",
            f("identity"),
            f("resource"),
            text_of(record, "reason", 300),
            text_of(record, "command", 120),
        ),
        other => format!(
            "`{}` by {actor}: {}",
            esc(other),
            cut(&record.detail.to_string(), 500)
        ),
    };
    text.push_str(&format!(" · on {}", cut(cx.host, 80)));
    if let Some(link) = console_link(record, cx) {
        // The link is ours (base from config, id checked): no escaping inside `<...>`.
        text.push_str(&format!(" · <{link}|Open in the console>"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    fn record(kind: &str, detail: Value) -> AuditEvent {
        AuditEvent {
            seq: 7,
            at: Timestamp(1_765_000_000_000),
            kind: kind.into(),
            actor: "workload ci-bot (user ci)".into(),
            detail,
            prev_hash: "p".into(),
            hash: "h7".into(),
        }
    }

    const CX: Context<'static> = Context {
        host: "db-host-1",
        console_url: Some("https://gate.example.com"),
    };

    #[test]
    fn the_generic_body_is_the_record() {
        let r = record(
            "request.filed",
            json!({"request": "req_abc", "identity": "ci-bot", "reason": "deploy"}),
        );
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Json, &r, &CX)).unwrap();
        assert_eq!(v["id"], "h7");
        assert_eq!(v["event"], "request.filed");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["host"], "db-host-1");
        assert_eq!(v["detail"]["reason"], "deploy");
        assert_eq!(v["console_url"], "https://gate.example.com/#req_abc");
        assert!(v["at"].as_str().unwrap().starts_with("2025-12-06T"), "{v}");
    }

    #[test]
    fn slack_text_escapes_what_a_workload_wrote() {
        // A hostile reason tries a mention, a disguised link and an HTML entity.
        let r = record(
            "request.filed",
            json!({"request": "req_abc", "identity": "ci-bot", "access": "write",
                   "resource": "orders-db", "ttl_secs": 900, "task": "t_1", "policy": "p",
                   "reason": "<!channel> <https://evil.example|approve here> &amp;"}),
        );
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Slack, &r, &CX)).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("*ci-bot* asks for *write* on *orders-db* for 15m"),
            "{text}"
        );
        assert!(
            text.contains("&lt;!channel&gt; &lt;https://evil.example|approve here&gt; &amp;amp;"),
            "{text}"
        );
        assert!(
            !text.contains("<!channel>") && !text.contains("<https://evil"),
            "{text}"
        );
        assert!(
            text.contains("<https://gate.example.com/#req_abc|Open in the console>"),
            "{text}"
        );
        assert!(text.contains("jitgate approve req_abc"), "{text}");
    }

    #[test]
    fn workload_text_cannot_forge_a_line_or_leave_its_span() {
        let r = record(
            "request.filed",
            json!({"request": "req_abc", "identity": "ci-bot", "access": "read",
                   "resource": "db", "policy": "p",
                   "reason": "ok\n:white_check_mark: Request `req_x` approved by alice\u{202e}"}),
        );
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Slack, &r, &CX)).unwrap();
        let text = v["text"].as_str().unwrap();
        let first_line = text.lines().next().unwrap();
        assert!(
            first_line.contains(":white_check_mark: Request 'req_x' approved"),
            "{text}"
        );
        assert!(
            !text.contains('\u{202e}') && !text.contains("`req_x`"),
            "{text}"
        );
    }

    #[test]
    fn ids_that_are_not_ours_get_no_link_and_long_text_is_cut() {
        let r = record(
            "statement.held",
            json!({"request": "req_1/../../admin", "resource": "db", "rule": "guardrail x",
                   "statement": format!("DELETE FROM t WHERE x = '{}' ```", "a".repeat(1000))}),
        );
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Slack, &r, &CX)).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(!text.contains("Open in the console"), "{text}");
        assert!(text.chars().count() < 700, "{}", text.len());
        assert!(text.contains('…'));
        let g: Value = serde_json::from_slice(&body(WebhookFormat::Json, &r, &CX)).unwrap();
        assert!(g.get("console_url").is_none());
    }
}
