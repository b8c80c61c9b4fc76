//! The console's session pages: the list of sessions (newest first, bounded), the replay view
//! of one session (its statements or HTTP requests in order with their timing, decision,
//! rule and result, as `jitgate sessions show` prints them) and a recorded exec stream played
//! back as text with its timing. Rendering only: what a person may see was decided by the
//! control service ([`crate::control::authz::sees_session`]).

use std::fmt::Write as _;

use super::pages::{Section, esc, layout_in, show, show_block};
use crate::{
    control::{api::SessionDetail, recording::Recording},
    identity::Person,
    model::{Session, SessionOutcome, StatementRecord, Timestamp},
};

/// Sessions listed by default, and at most.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 1000;

/// `2026-11-23 10:04:05` (UTC).
fn when(t: Timestamp) -> String {
    let s = t.to_string();
    s.get(..19).map_or(s.clone(), |x| x.replace('T', " "))
}

/// `10:04:05.123` (UTC).
fn clock(t: Timestamp) -> String {
    let s = t.to_string();
    s.get(11..23).unwrap_or(&s).to_owned()
}

/// `+1.234 s` after `start`.
fn offset(start: Timestamp, t: Timestamp) -> String {
    let ms = t.0.saturating_sub(start.0).max(0);
    format!("+{}.{:03} s", ms / 1000, ms % 1000)
}

use crate::model::human_bytes as bytes;

fn outcome_class(o: SessionOutcome) -> &'static str {
    match o {
        SessionOutcome::Open | SessionOutcome::Closed => "",
        _ => "bad",
    }
}

/// `/sessions`: live and finished sessions, newest first, at most `limit`.
pub fn list(
    person: &Person,
    csrf: &str,
    sessions: &[Session],
    open_only: bool,
    limit: usize,
) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<h2>{} ({})</h2><p><a href="/sessions{}">{}</a></p>"#,
        if open_only {
            "Open sessions"
        } else {
            "Sessions, newest first"
        },
        sessions.len(),
        if open_only { "" } else { "?open=1" },
        if open_only {
            "Show finished sessions too"
        } else {
            "Show open sessions only"
        },
    );
    if sessions.is_empty() {
        b.push_str(r#"<p class="empty">No session to show.</p>"#);
    } else {
        b.push_str(r#"<div class="scroll"><table class="sessions"><thead><tr><th>Started</th><th>Session</th><th>Identity</th><th>Resource</th><th>Access</th><th>State</th><th>Up</th><th>Down</th><th>Client</th></tr></thead><tbody>"#);
        for s in sessions {
            let _ = write!(
                b,
                r#"<tr data-session="{id}"><td class="when">{started}</td><td><a href="/sessions/{id}"><code>{id}</code></a></td><td>{identity}</td><td>{resource}{database}</td><td>{access}</td><td class="{class}">{outcome}</td><td class="num">{up}</td><td class="num">{down}</td><td><code>{pid} {command}</code></td></tr>"#,
                id = esc(&s.id),
                started = when(s.started_at),
                identity = show(s.identity.as_deref().unwrap_or("?")),
                resource = show(s.resource.as_deref().unwrap_or("-")),
                database = s
                    .database
                    .as_deref()
                    .map(|d| format!(" ({})", show(d)))
                    .unwrap_or_default(),
                access = s.access.map_or("-", |a| a.as_str()),
                class = outcome_class(s.outcome),
                outcome = esc(&s.outcome.to_string()),
                up = bytes(s.bytes_up),
                down = bytes(s.bytes_down),
                pid = s.pid,
                command = show(&s.command),
            );
        }
        b.push_str("</tbody></table></div>");
    }
    super::pages::more(
        &mut b,
        sessions.len(),
        limit,
        MAX_LIMIT,
        ("/sessions?", if open_only { "&open=1" } else { "" }),
        "sessions",
        "jitgate sessions --all --limit N",
    );
    layout_in(
        "Sessions",
        Some(Section::Sessions),
        Some((person, csrf)),
        &b,
    )
}

use crate::control::api::TimelineItem as Item;

fn statement_facts(st: &StatementRecord) -> Vec<String> {
    let mut facts = Vec::new();
    if let Some(tag) = &st.tag {
        facts.push(show(tag));
    }
    if let Some(rows) = st.rows {
        facts.push(format!("{rows} rows"));
    }
    if let Some(ms) = st.duration_ms {
        facts.push(format!("{ms:.1} ms"));
    }
    if st.held_ms > 0 {
        facts.push(format!(
            "held {}{}",
            esc(&crate::model::human_duration(
                std::time::Duration::from_millis(st.held_ms)
            )),
            st.approved_by
                .as_deref()
                .map(|by| format!(", approved by {}", show(by)))
                .unwrap_or_default()
        ));
    }
    if !st.params.is_empty() {
        facts.push(format!(
            "params: {}",
            st.params
                .iter()
                .map(|p| p.as_deref().map_or_else(|| "NULL".to_owned(), show))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if st.masked > 0 {
        facts.push(format!("{} values masked", st.masked));
    }
    if let Some(e) = &st.error {
        facts.push(format!(r#"<span class="bad">error {}</span>"#, show(e)));
    }
    facts
}

/// `/sessions/ID`: the session, then its statements (or requests) and events in time order.
pub fn replay(person: &Person, csrf: &str, d: &SessionDetail) -> String {
    let s = &d.session;
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<p><a href="/sessions">All sessions</a></p><section class="card" data-session="{id}"><dl><dt>Session</dt><dd><code>{id}</code></dd><dt>Identity</dt><dd>{identity}</dd><dt>Resource</dt><dd>{resource}{database}</dd><dt>Access</dt><dd>{access}</dd><dt>Grant</dt><dd><code>{grant}</code></dd><dt>Destination</dt><dd><code>{destination}</code></dd><dt>Client</dt><dd>pid {pid}, uid {uid}{task}: <code>{command}</code></dd><dt>Started</dt><dd>{started}</dd><dt>Ended</dt><dd>{ended}</dd><dt>State</dt><dd class="{class}">{outcome}{detail}</dd><dt>Traffic</dt><dd>{up} up, {down} down</dd></dl></section>"#,
        id = esc(&s.id),
        identity = show(s.identity.as_deref().unwrap_or("?")),
        resource = show(s.resource.as_deref().unwrap_or("-")),
        database = s
            .database
            .as_deref()
            .map(|db| format!(" (database {})", show(db)))
            .unwrap_or_default(),
        access = s.access.map_or("-", |a| a.as_str()),
        grant = show(s.grant.as_deref().unwrap_or("-")),
        destination = show(&s.destination),
        pid = s.pid,
        uid = s.uid,
        task = s
            .task
            .as_deref()
            .map(|t| format!(", task {}", show(t)))
            .unwrap_or_default(),
        command = show(&s.command),
        started = when(s.started_at),
        ended = s.ended_at.map_or_else(|| "(open)".into(), when),
        class = outcome_class(s.outcome),
        outcome = esc(&s.outcome.to_string()),
        detail = if s.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", show(&s.detail))
        },
        up = bytes(s.bytes_up),
        down = bytes(s.bytes_down),
    );
    let items = d.timeline();
    let _ = write!(
        b,
        "<h2>Replay: {} statements or requests, {} events</h2>",
        d.statements.len(),
        items.len() - d.statements.len()
    );
    if items.is_empty() {
        b.push_str(r#"<p class="empty">Nothing was recorded in this session.</p>"#);
    } else {
        b.push_str(r#"<div class="scroll"><table class="replay"><thead><tr><th>When</th><th>#</th><th>Decision</th><th>Rule</th><th>Statement or request</th><th>Result</th></tr></thead><tbody>"#);
        for (at, item) in items {
            let when = format!(
                r#"<td class="when">{}<br><span class="facts">{}</span></td>"#,
                offset(s.started_at, at),
                clock(at)
            );
            match item {
                Item::Statement(st) => {
                    let replay = if d.recordings.contains(&st.seq) {
                        format!(
                            r#"<p><a class="button" href="/sessions/{}/recordings/{}">Play the recorded exec stream</a></p>"#,
                            esc(&s.id),
                            st.seq
                        )
                    } else {
                        String::new()
                    };
                    let _ = write!(
                        b,
                        r#"<tr class="statement" data-seq="{seq}">{when}<td class="num">{seq}</td><td class="decision-{decision}">{decision}</td><td>{rule}</td><td><pre>{text}</pre>{replay}</td><td class="facts">{facts}</td></tr>"#,
                        seq = st.seq,
                        decision = st.decision.as_str(),
                        rule = show(st.rule.as_deref().unwrap_or("-")),
                        text = show_block(&st.text),
                        facts = statement_facts(st).join("<br>"),
                    );
                }
                Item::Event(e) => {
                    let _ = write!(
                        b,
                        r#"<tr class="event">{when}<td></td><td>event</td><td></td><td><code>{kind}</code> by {actor}</td><td class="facts"><code>{detail}</code></td></tr>"#,
                        kind = show(&e.kind),
                        actor = show(&e.actor),
                        detail = show(&e.detail.to_string()),
                    );
                }
            }
        }
        b.push_str("</tbody></table></div>");
    }
    if d.unreadable > 0 {
        let _ = write!(
            b,
            r#"<p class="warning">{n} stored batch(es) of this session's statement records could not be read (damaged); the host agent's log names them.</p>"#,
            n = d.unreadable,
        );
    }
    if let Some(next) = d.more_from {
        let _ = write!(
            b,
            r#"<p><a class="button" href="/sessions/{id}?from={next}">Later statements, from #{next}</a></p>"#,
            id = esc(&s.id),
        );
    }
    layout_in(
        &format!("Session {}", s.id),
        Some(Section::Sessions),
        Some((person, csrf)),
        &b,
    )
}

/// Terminal output made readable as text: `\r\n` becomes a line break and colour (SGR)
/// sequences are dropped; every other control sequence stays, shown escaped by [`show_block`].
pub fn terminal_text(data: &str) -> String {
    let mut out = String::with_capacity(data.len());
    let mut rest = data;
    while let Some(i) = rest.find(['\x1b', '\r']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("\r\n") {
            out.push('\n');
            rest = after;
            continue;
        }
        if let Some(after) = rest.strip_prefix("\x1b[") {
            let params = after
                .find(|c: char| !(c.is_ascii_digit() || c == ';'))
                .unwrap_or(after.len());
            if after[params..].starts_with('m') {
                rest = &after[params + 1..];
                continue;
            }
        }
        // Kept, to be shown escaped.
        let c = rest.chars().next().unwrap_or('\r');
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.push_str(rest);
    out
}

/// `/sessions/ID/recordings/SEQ`: a recorded exec stream, event by event with its time.
pub fn recording(person: &Person, csrf: &str, r: &Recording) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<p><a href="/sessions/{id}">Back to session <code>{id}</code></a></p><section class="card"><dl><dt>Stream</dt><dd>{title}</dd><dt>Request</dt><dd>#{seq}</dd><dt>Started</dt><dd>{started}</dd><dt>Events</dt><dd>{n}{cut}</dd></dl></section>"#,
        id = esc(&r.session),
        title = show(&r.title),
        seq = r.seq,
        started = r
            .started
            .map_or_else(|| "?".into(), |t| when(Timestamp(t.saturating_mul(1000)))),
        n = r.events.len(),
        cut = if r.truncated {
            r#" <span class="bad">(cut: the recording is longer than the console shows; <code>jitgate sessions replay</code> plays all of it)</span>"#
        } else {
            ""
        },
    );
    if r.events.is_empty() {
        b.push_str(r#"<p class="empty">The stream carried nothing.</p>"#);
    } else {
        b.push_str(r#"<div class="scroll"><table class="recording"><thead><tr><th>At</th><th>Who</th><th>Text</th></tr></thead><tbody>"#);
        for e in &r.events {
            let (who, class) = if e.input {
                ("typed", "io input")
            } else {
                ("output", "io")
            };
            let _ = write!(
                b,
                r#"<tr><td class="when">+{:.3} s</td><td>{who}</td><td><pre class="{class}">{}</pre></td></tr>"#,
                e.at,
                show_block(&terminal_text(&e.data))
            );
        }
        b.push_str("</tbody></table></div>");
    }
    layout_in(
        &format!("Recording {}-{}", r.session, r.seq),
        Some(Section::Sessions),
        Some((person, csrf)),
        &b,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::recording::CastEvent,
        model::{Decision, StatementRecord},
    };

    fn person() -> Person {
        Person {
            id: "ann@example.com".into(),
            groups: vec![],
            unix_uid: None,
            unix_account: None,
            ..Default::default()
        }
    }

    fn session(id: &str, command: &str) -> Session {
        Session {
            id: id.into(),
            identity: Some("bot".into()),
            task: None,
            pid: 42,
            uid: 1000,
            command: command.into(),
            resource: Some("orders-db".into()),
            grant: Some("grt_1".into()),
            destination: "127.0.0.1:5432".into(),
            started_at: Timestamp(1_795_000_000_000),
            ended_at: Some(Timestamp(1_795_000_002_000)),
            bytes_up: 2048,
            bytes_down: 12,
            outcome: SessionOutcome::Closed,
            detail: String::new(),
            database: Some("orders".into()),
            access: Some(crate::config::Access::Read),
        }
    }

    fn statement(seq: u32, at: i64, text: &str) -> StatementRecord {
        StatementRecord {
            session: "ses_1".into(),
            seq,
            at: Timestamp(at),
            text: text.into(),
            params: vec![Some("p\u{202e}1".into()), None],
            decision: if seq == 2 {
                Decision::Denied
            } else {
                Decision::Allowed
            },
            rule: Some(format!("rule {seq}")),
            approved_by: None,
            held_ms: 0,
            duration_ms: Some(1.5),
            rows: Some(3),
            tag: Some("SELECT 3".into()),
            error: None,
            masked: 1,
        }
    }

    fn detail(statements: Vec<StatementRecord>) -> SessionDetail {
        SessionDetail {
            session: session("ses_1", "psql"),
            statements,
            events: vec![],
            recordings: vec![],
            more_from: None,
            unreadable: 0,
        }
    }

    #[test]
    fn statements_in_order_with_timing_decision_rule_and_rows() {
        // Given out of order; shown by time.
        let d = detail(vec![
            statement(2, 1_795_000_001_500, "DELETE FROM users"),
            statement(1, 1_795_000_000_250, "SELECT name\n  FROM users"),
        ]);
        let page = replay(&person(), "csrf", &d);
        let first = page.find("SELECT name").expect("first statement");
        let second = page.find("DELETE FROM users").expect("second statement");
        assert!(first < second, "in time order");
        assert!(
            page.contains("SELECT name\n  FROM users"),
            "line breaks kept"
        );
        for needle in [
            "+0.250 s",
            "+1.500 s",
            "decision-denied",
            "rule 2",
            "3 rows",
            "1.5 ms",
            "SELECT 3",
            "1 values masked",
            "2.0 KiB up, 12 B down",
            "params: p<span class=\"hidden-char\"",
        ] {
            assert!(page.contains(needle), "{needle} in {page}");
        }
        assert!(!page.contains("/recordings/"), "no recording, no link");
    }

    #[test]
    fn unreadable_records_are_said_not_hidden() {
        let d = SessionDetail {
            unreadable: 2,
            ..detail(vec![statement(1, 1_795_000_000_000, "SELECT 1")])
        };
        let page = replay(&person(), "csrf", &d);
        assert!(page.contains("2 stored batch(es)"), "{page}");
        let d = detail(vec![statement(1, 1_795_000_000_000, "SELECT 1")]);
        assert!(!replay(&person(), "csrf", &d).contains("could not be read"));
    }

    #[test]
    fn hostile_statements_and_commands_cannot_disguise_themselves() {
        let d = SessionDetail {
            session: session("ses_1", "psql \u{202e}--help\u{202c} <script>"),
            ..detail(vec![statement(
                1,
                1_795_000_000_000,
                "SELECT 1 /*\u{2066}*/; DROP TABLE users; --\u{200b}\r\x1b[2K</pre><script>alert(1)</script>",
            )])
        };
        let page = replay(&person(), "csrf", &d);
        for raw in ['\u{202e}', '\u{202c}', '\u{2066}', '\u{200b}', '\r', '\x1b'] {
            assert!(!page.contains(raw), "{raw:?} reached the page");
        }
        for shown in [
            "\\u{202e}",
            "\\u{202c}",
            "\\u{2066}",
            "\\u{200b}",
            "\\u{d}",
            "\\u{1b}",
        ] {
            assert!(page.contains(shown), "{shown}");
        }
        assert!(!page.contains("<script>"));
        assert_eq!(
            page.matches("</pre>").count(),
            1,
            "the block cannot be closed early"
        );
    }

    #[test]
    fn recordings_are_linked_by_sequence_and_played_as_text() {
        let mut d = detail(vec![statement(4, 1_795_000_000_000, "POST /exec")]);
        d.recordings = vec![4];
        let page = replay(&person(), "csrf", &d);
        assert!(
            page.contains(r#"href="/sessions/ses_1/recordings/4""#),
            "{page}"
        );

        let r = Recording {
            session: "ses_1".into(),
            seq: 4,
            title: "exec \u{202e}ls".into(),
            started: Some(1_795_000_000),
            events: vec![
                CastEvent {
                    at: 0.1,
                    input: true,
                    data: "ls\r".into(),
                },
                CastEvent {
                    at: 0.25,
                    input: false,
                    data: "\x1b[1;32ma.txt\x1b[0m\r\nb\u{200b}.txt\x1b[2J\r\n".into(),
                },
            ],
            truncated: true,
        };
        let page = recording(&person(), "csrf", &r);
        assert!(
            page.contains("+0.100 s") && page.contains("+0.250 s"),
            "{page}"
        );
        assert!(
            page.contains("a.txt\nb"),
            "colours dropped, lines kept: {page}"
        );
        assert!(
            page.contains("\\u{1b}</span>[2J"),
            "other sequences shown: {page}"
        );
        assert!(page.contains("\\u{200b}") && page.contains("\\u{202e}"));
        assert!(
            page.contains("ls<span class=\"hidden-char\""),
            "a typed CR shown"
        );
        assert!(page.contains("(cut:"));
        assert!(!page.contains('\x1b') && !page.contains('\r'));
    }

    #[test]
    fn terminal_text_keeps_everything_but_colour() {
        assert_eq!(terminal_text("a\r\nb"), "a\nb");
        assert_eq!(terminal_text("\x1b[31mred\x1b[m"), "red");
        assert_eq!(terminal_text("x\x1b[2Ky"), "x\x1b[2Ky");
        assert_eq!(terminal_text("over\rwrite"), "over\rwrite");
        assert_eq!(terminal_text("\x1b"), "\x1b");
        assert_eq!(terminal_text("\x1b["), "\x1b[");
        assert_eq!(terminal_text("ü\r"), "ü\r");
    }

    #[test]
    fn the_list_is_bounded_and_links_each_session() {
        let sessions: Vec<Session> = (0..3)
            .map(|i| session(&format!("ses_{i}"), "psql"))
            .collect();
        let page = list(&person(), "c", &sessions, false, 3);
        assert!(page.contains(r#"href="/sessions/ses_2""#));
        assert!(
            page.contains("/sessions?limit=6"),
            "older ones one click away"
        );
        let page = list(&person(), "c", &sessions, true, 50);
        assert!(!page.contains("limit="));
        let page = list(&person(), "c", &sessions, false, 3.max(MAX_LIMIT));
        assert!(!page.contains("Show older"));
    }
}
