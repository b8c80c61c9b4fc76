//! How the CLI prints: aligned tables for people, JSON for scripts.

use std::{borrow::Cow, io::Write as _};

use crate::model::{Timestamp, human_duration};

/// Text a workload (or a server) wrote, made safe to print on a terminal: control
/// characters (ANSI escapes, carriage returns, backspaces, newlines), the Unicode direction
/// overrides that reorder what follows and zero-width characters are shown as `\u{..}`
/// escapes ([`crate::neutral`]), so no row can rewrite, hide or forge another on the
/// approver's screen.
pub fn shown(text: &str) -> Cow<'_, str> {
    crate::neutral::neutral(text)
}

/// Prints rows under upper-case headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| shown(c).into_owned()).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |out: &mut std::io::StdoutLock<'_>, cells: &mut dyn Iterator<Item = String>| {
        let cells: Vec<String> = cells.collect();
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, &mut headers.iter().map(|h| h.to_uppercase()));
    for row in rows {
        line(&mut out, &mut row.iter().cloned());
    }
}

pub fn json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("jitgate: cannot encode output: {e}"),
    }
}

/// `2026-11-23 10:04:05` in UTC: short enough for tables.
pub fn when(t: Timestamp) -> String {
    let s = t.to_string();
    s.get(..19).map_or(s.clone(), |x| x.replace('T', " "))
}

/// `in 14m 3s` / `3m ago`.
pub fn relative(t: Timestamp) -> String {
    let now = Timestamp::now();
    if t > now {
        format!("in {}", human_duration(t.remaining()))
    } else {
        let ago = std::time::Duration::from_millis((now.millis() - t.millis()).max(0) as u64);
        format!("{} ago", human_duration(ago))
    }
}

pub use crate::model::human_bytes as bytes;

/// `jitgate sessions show`: the session, then its statements and events in time order.
pub fn timeline(d: &crate::control::api::SessionDetail) {
    let s = &d.session;
    println!(
        "session {}  {} -> {}{}{}",
        s.id,
        s.identity.as_deref().unwrap_or("?"),
        s.resource.as_deref().unwrap_or("?"),
        s.database
            .as_ref()
            .map(|db| format!(" (database {db})"))
            .unwrap_or_default(),
        s.access
            .map(|a| format!(", {a} access"))
            .unwrap_or_default(),
    );
    println!(
        "  client     pid {} uid {}{}: {}",
        s.pid,
        s.uid,
        s.task
            .as_ref()
            .map(|t| format!(", task {t}"))
            .unwrap_or_default(),
        shown(&s.command)
    );
    println!(
        "  grant      {}   destination {}",
        s.grant.as_deref().unwrap_or("-"),
        shown(&s.destination)
    );
    println!(
        "  started    {}   ended {}   {}{}",
        when(s.started_at),
        s.ended_at.map_or_else(|| "(open)".into(), when),
        s.outcome,
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", shown(&s.detail))
        }
    );
    println!(
        "  traffic    {} up, {} down",
        bytes(s.bytes_up),
        bytes(s.bytes_down)
    );
    use crate::control::api::TimelineItem as Item;
    let items = d.timeline();
    if items.is_empty() {
        return;
    }
    println!();
    for (at, item) in items {
        let time = at.to_string();
        let time = time.get(11..23).unwrap_or(&time).to_owned();
        match item {
            Item::Statement(st) => {
                // White space folded first (a statement's line breaks are not forgery), then
                // what is left escaped.
                let folded = st.text.split_whitespace().collect::<Vec<_>>().join(" ");
                let text = shown(&folded).into_owned();
                let text = if text.chars().count() > 100 {
                    format!("{}…", text.chars().take(100).collect::<String>())
                } else {
                    text
                };
                println!(
                    "  {time}  #{:<4} {:<9} {text}",
                    st.seq,
                    st.decision.as_str()
                );
                let mut facts = Vec::new();
                if let Some(rule) = &st.rule {
                    facts.push(format!("rule: {rule}"));
                }
                if st.held_ms > 0 {
                    facts.push(format!(
                        "held {}{}",
                        human_duration(std::time::Duration::from_millis(st.held_ms)),
                        st.approved_by
                            .as_ref()
                            .map(|b| format!(", approved by {b}"))
                            .unwrap_or_default()
                    ));
                }
                if !st.params.is_empty() {
                    facts.push(format!(
                        "params: {}",
                        st.params
                            .iter()
                            .map(|p| p.clone().unwrap_or_else(|| "NULL".into()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if let Some(tag) = &st.tag {
                    facts.push(tag.clone());
                }
                if let Some(ms) = st.duration_ms {
                    facts.push(format!("{ms:.1} ms"));
                }
                if st.masked > 0 {
                    facts.push(format!("{} values masked", st.masked));
                }
                if let Some(e) = &st.error {
                    facts.push(format!("error {e}"));
                }
                if !facts.is_empty() {
                    println!("  {:12}  {:<15}{}", "", "", shown(&facts.join(" · ")));
                }
            }
            Item::Event(e) => println!(
                "  {time}  {:<15}{} by {}",
                "event",
                shown(&e.kind),
                shown(&e.actor)
            ),
        }
    }
    if d.unreadable > 0 {
        println!();
        println!(
            "  warning: {} stored batch(es) of this session's statement records could not be read (damaged); the agent's log names them",
            d.unreadable
        );
    }
    if let Some(next) = d.more_from {
        println!();
        println!(
            "  more statements follow: jitgate sessions show {} --from {next}",
            s.id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_text_cannot_drive_the_terminal() {
        assert_eq!(shown("plain text, ünïcode ok"), "plain text, ünïcode ok");
        assert_eq!(
            shown("why\x1b[2K\rapproved by alice"),
            "why\\u{1b}[2K\\u{d}approved by alice"
        );
        assert_eq!(shown("a\nb\tc\u{8}"), "a\\u{a}b\\u{9}c\\u{8}");
        assert_eq!(shown("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(shown("\u{9b}31m"), "\\u{9b}31m");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 + 1), "5.0 MiB");
    }
}
