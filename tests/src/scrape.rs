//! Reading the host agent's operations endpoint the way Prometheus and probes do.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use crate::Gate;

/// `GET path` over HTTP/1.1: (status code, body).
pub fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("reading the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// Parses the Prometheus text format into `name{k="v",...}` (labels sorted) -> value. Every
/// sample line must parse: a malformed exposition fails the test.
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample without a value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value: {line}"));
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unterminated labels: {line}"));
                let mut pairs: Vec<&str> = if labels.is_empty() {
                    Vec::new()
                } else {
                    labels
                        .split("\",")
                        .map(|p| p.trim_end_matches('"'))
                        .collect()
                };
                pairs.sort_unstable();
                let inner: Vec<String> = pairs
                    .iter()
                    .map(|p| {
                        let (k, v) = p
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label in: {line}"));
                        format!("{k}=\"{v}\"")
                    })
                    .collect();
                format!("{name}{{{}}}", inner.join(","))
            }
        };
        out.insert(key, value);
    }
    out
}

/// Scrapes `/metrics` (must answer 200) and parses it.
pub fn scrape(gate: &Gate, port: u16) -> BTreeMap<String, f64> {
    let (status, text) = get(port, "/metrics");
    assert_eq!(status, 200, "{text}\n{}", gate.log());
    parse_exposition(&text)
}
