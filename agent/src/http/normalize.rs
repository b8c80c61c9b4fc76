//! Request-path normalisation: the one canonical form that policy rules are matched against
//! and that is forwarded upstream.
//!
//! Why: a rule denying `/admin*` is worthless if `/public/../admin`, `//admin` or `/%61dmin`
//! reach the same handler upstream under a spelling the rule does not see. The gate therefore
//! matches rules against a canonical path and forwards exactly that path, so what was checked
//! is what the upstream receives.
//!
//! Decisions (documented in the README):
//! * percent-encoded *unreserved* characters (`A-Z a-z 0-9 - _ ~`) are decoded (`/%61dmin` is
//!   `/admin`); other percent-encodings are kept, with upper-case hex digits;
//! * encodings whose meaning differs between servers are refused as malformed (HTTP 400)
//!   rather than guessed: an encoded dot (`%2e`, so `%2e%2e` can never become a dot segment),
//!   an encoded slash (`%2F`), an encoded backslash (`%5C`), an encoded percent (`%25`, which
//!   a double-decoding upstream would turn into a second encoding), NUL and control
//!   characters raw or encoded, a raw backslash, a `;` (path parameters, which Java servers
//!   strip before routing), raw non-ASCII bytes and broken `%` escapes;
//! * repeated slashes collapse to one (`//admin` is `/admin`);
//! * `.` segments are dropped and `..` removes the previous segment; a `..` that would climb
//!   above the root is refused (malformed), not clamped;
//! * a trailing slash is kept (`/a/` and `/a` stay distinct, as servers treat them).

use std::fmt;

/// Why a path was refused as malformed; the text goes into the 400 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the request path must start with '/'")]
    NotAbsolute,
    #[error("the request path contains a broken percent-encoding")]
    BadEscape,
    #[error("the request path contains an ambiguous encoding ({0})")]
    Ambiguous(&'static str),
    #[error("the request path contains a forbidden character ({0})")]
    Forbidden(&'static str),
    #[error("the request path climbs above the root with '..'")]
    AboveRoot,
}

/// A normalised request path: starts with `/`, no empty, `.` or `..` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath(String);

impl NormalPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A spelling of an already normalised path (another case, without its trailing slash),
    /// for matching rules against it.
    pub(crate) fn from_normalised(path: String) -> Self {
        Self(path)
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Every `%XX` decoded (lossy UTF-8), for showing a target to people through the detectors:
/// `boss%40example.com` must be recognised as the address it is. Never for judging or
/// forwarding (see [`normalize`] for that).
pub fn decoded_for_display(target: &str) -> String {
    let b = target.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex_value),
                b.get(i + 2).copied().and_then(hex_value),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_unreserved_kept(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~')
}

/// Decodes what is safe to decode and refuses what is ambiguous; see the module docs.
fn decode(path: &str) -> Result<String, Malformed> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(Malformed::BadEscape);
                };
                let (Some(h), Some(l)) = (hex_value(h), hex_value(l)) else {
                    return Err(Malformed::BadEscape);
                };
                let v = h * 16 + l;
                match v {
                    b'.' => return Err(Malformed::Ambiguous("encoded '.'")),
                    b'/' => return Err(Malformed::Ambiguous("encoded '/'")),
                    b'\\' => return Err(Malformed::Ambiguous("encoded '\\'")),
                    b'%' => return Err(Malformed::Ambiguous("encoded '%'")),
                    0 => return Err(Malformed::Forbidden("NUL")),
                    v if v < 0x20 || v == 0x7f => {
                        return Err(Malformed::Forbidden("control character"));
                    }
                    v if is_unreserved_kept(v) => out.push(char::from(v)),
                    v => {
                        out.push('%');
                        out.push_str(&format!("{v:02X}"));
                    }
                }
                i += 3;
            }
            0 => return Err(Malformed::Forbidden("NUL")),
            b'\\' => return Err(Malformed::Forbidden("backslash")),
            b if b < 0x20 || b == 0x7f => return Err(Malformed::Forbidden("control character")),
            b if b >= 0x80 => return Err(Malformed::Forbidden("non-ASCII byte")),
            b'?' | b'#' => return Err(Malformed::Forbidden("query or fragment in the path")),
            // Path parameters (`/admin;x=1`, `/..;/admin`): Java servers strip them before
            // routing, so the rules would judge another path than the one served.
            b';' => return Err(Malformed::Forbidden("a `;` path parameter")),
            b => {
                out.push(char::from(b));
                i += 1;
                continue;
            }
        }
    }
    Ok(out)
}

/// Normalises the path part of a request target (without the query).
pub fn normalize(path: &str) -> Result<NormalPath, Malformed> {
    if !path.starts_with('/') {
        return Err(Malformed::NotAbsolute);
    }
    let decoded = decode(path)?;
    let trailing = decoded.len() > 1 && decoded.ends_with('/');
    let mut segments: Vec<&str> = Vec::new();
    let mut ends_in_dir = trailing;
    for seg in decoded.split('/') {
        match seg {
            "" => {}
            "." => ends_in_dir = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(Malformed::AboveRoot);
                }
                ends_in_dir = true;
            }
            s => {
                segments.push(s);
                ends_in_dir = trailing;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || ends_in_dir {
        out.push('/');
    }
    Ok(NormalPath(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, Malformed> {
        normalize(p).map(|p| p.as_str().to_owned())
    }

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b",
            "/a/b/",
            "/api/v1/pods",
            "/a-b_c~d.txt",
            "/a%20b",
        ] {
            assert_eq!(n(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes_resolve() {
        assert_eq!(n("/public/../admin").as_deref(), Ok("/admin"));
        assert_eq!(n("//admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/a//b///c").as_deref(), Ok("/a/b/c"));
        assert_eq!(n("/a/./b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/.").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/b/../../admin/x").as_deref(), Ok("/admin/x"));
        assert_eq!(n("/..."), Ok("/...".to_owned()), "three dots is a name");
    }

    #[test]
    fn targets_are_decoded_for_display_only() {
        assert_eq!(
            decoded_for_display("/a?cc=boss%40example.com&x=%2"),
            "/a?cc=boss@example.com&x=%2"
        );
        assert_eq!(decoded_for_display("/%E2%80%AE%zz"), "/\u{202e}%zz");
    }

    #[test]
    fn unreserved_escapes_decode() {
        assert_eq!(n("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(n("/%41%44MIN").as_deref(), Ok("/ADMIN"));
        assert_eq!(n("/a%7eb%2D").as_deref(), Ok("/a~b-"));
        assert_eq!(
            n("/a%3fb").as_deref(),
            Ok("/a%3Fb"),
            "reserved stays encoded"
        );
    }

    #[test]
    fn hostile_encodings_are_refused() {
        for p in [
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/public/.%2e/admin",
            "/%2e/admin",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\..\\admin",
            "/a%00b",
            "/a\0b",
            "/a%2561dmin",
            "/a%",
            "/a%6",
            "/a%zz",
            "/a%0d%0aX-Evil: 1",
            "/a\r\nb",
            "/ünicode",
            "/..",
            "/a/../..",
            "/../admin",
            "admin",
            "",
            "/a#frag",
        ] {
            assert!(n(p).is_err(), "{p:?} should be refused, got {:?}", n(p));
        }
    }

    #[test]
    fn refusal_kinds_are_specific() {
        assert_eq!(n("/%2e%2e"), Err(Malformed::Ambiguous("encoded '.'")));
        assert_eq!(n("/../x"), Err(Malformed::AboveRoot));
        assert_eq!(n("x"), Err(Malformed::NotAbsolute));
        assert_eq!(n("/%0"), Err(Malformed::BadEscape));
    }
}
