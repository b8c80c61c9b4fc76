//! How the CLI prints: aligned tables for people, JSON for scripts.

use std::io::Write as _;

use crate::model::{Timestamp, human_duration};

/// Prints rows under upper-case headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
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

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 + 1), "5.0 MiB");
    }
}
