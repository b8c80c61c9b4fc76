//! Text that a workload (or a server, or an identity provider) could have written, made safe
//! to show a person who decides on it: on a terminal (`jitgate`) and in the web console.
//!
//! Escaping markup is not enough. A statement, URL, reason or command line can carry
//! characters that change what the reader sees without being seen themselves: Unicode
//! direction overrides and isolates (`U+202E` turns `DELETE … --\u{202e}txt.gol` into
//! something that reads innocently), zero-width characters (a `ro\u{200b}ot` that looks like
//! `root`), and control characters (ANSI escapes, carriage returns that overwrite a line,
//! backspaces). Each of these is shown as a visible `\u{…}` escape instead, so the reader sees
//! every character that is there and nothing that is not. One list, here, for every front end.

use std::borrow::Cow;

/// Whether `c` would change or hide what a reader sees rather than be seen itself: control
/// characters (C0, DEL, C1), direction marks, embeddings, overrides and isolates, zero-width
/// and other invisible format characters, line and paragraph separators, fillers, variation
/// selectors and tag characters.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'                      // soft hyphen
            | '\u{034f}'                    // combining grapheme joiner
            | '\u{061c}'                    // Arabic letter mark (a direction mark)
            | '\u{115f}' | '\u{1160}'       // Hangul fillers
            | '\u{17b4}' | '\u{17b5}'       // Khmer invisible vowels
            | '\u{180b}'..='\u{180f}'       // Mongolian selectors and vowel separator
            | '\u{200b}'..='\u{200f}'       // zero-width space, (non-)joiner, LRM, RLM
            | '\u{2028}'..='\u{202e}'       // line/paragraph separators, LRE RLE PDF LRO RLO
            | '\u{2060}'..='\u{206f}'       // word joiner, invisible operators, isolates, deprecated format
            | '\u{3164}'                    // Hangul filler
            | '\u{fe00}'..='\u{fe0f}'       // variation selectors
            | '\u{feff}'                    // zero-width no-break space (BOM)
            | '\u{ffa0}'                    // halfwidth Hangul filler
            | '\u{fff9}'..='\u{fffb}'       // interlinear annotation
            | '\u{1bca0}'..='\u{1bca3}'     // shorthand format controls
            | '\u{1d173}'..='\u{1d17a}'     // musical format controls
            | '\u{e0000}'..='\u{e007f}'     // tag characters
            | '\u{e0100}'..='\u{e01ef}' // variation selectors supplement
        )
}

/// How `c` is shown in its place: `\u{202e}`.
pub fn escape(c: char) -> String {
    format!("\\u{{{:x}}}", u32::from(c))
}

/// One piece of a text: what is shown as it is, or one hidden character to show escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    Plain(&'a str),
    Hidden(char),
}

/// Splits `text` into plain runs and hidden characters (see [`is_hidden`]). With
/// `keep_layout`, line feeds and tabs count as plain (for multi-line SQL shown as a block, where
/// a line break is layout, not forgery); a carriage return never does.
pub fn pieces(text: &str, keep_layout: bool) -> Vec<Piece<'_>> {
    let hidden = |c: char| is_hidden(c) && !(keep_layout && matches!(c, '\n' | '\t'));
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if hidden(c) {
            if start < i {
                out.push(Piece::Plain(&text[start..i]));
            }
            out.push(Piece::Hidden(c));
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        out.push(Piece::Plain(&text[start..]));
    }
    out
}

/// `text` with every hidden character (see [`is_hidden`]) replaced by its `\u{…}` escape, on
/// one line; borrowed when there is nothing to replace.
pub fn neutral(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for piece in pieces(text, false) {
        match piece {
            Piece::Plain(s) => out.push_str(s),
            Piece::Hidden(c) => out.push_str(&escape(c)),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_untouched_and_borrowed() {
        for s in [
            "SELECT * FROM users",
            "ünïcode, 日本語, emoji 🦀",
            "",
            "a b",
        ] {
            assert!(matches!(neutral(s), Cow::Borrowed(x) if x == s), "{s}");
        }
    }

    #[test]
    fn direction_overrides_and_isolates_are_shown() {
        // "approve.sql" that reads as something else once reordered.
        assert_eq!(neutral("x\u{202e}lqs.evorppa"), "x\\u{202e}lqs.evorppa");
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            let s = format!("a{c}b");
            assert_eq!(neutral(&s), format!("a\\u{{{:x}}}b", c as u32), "{c:?}");
        }
        assert_eq!(
            neutral("\u{200e}\u{200f}\u{61c}"),
            "\\u{200e}\\u{200f}\\u{61c}"
        );
    }

    #[test]
    fn zero_width_and_invisible_characters_are_shown() {
        assert_eq!(neutral("ro\u{200b}ot"), "ro\\u{200b}ot");
        assert_eq!(neutral("\u{feff}DROP"), "\\u{feff}DROP");
        assert_eq!(
            neutral("a\u{200c}b\u{200d}c\u{2060}d\u{ad}e"),
            "a\\u{200c}b\\u{200d}c\\u{2060}d\\u{ad}e"
        );
        assert_eq!(neutral("tag\u{e0041}"), "tag\\u{e0041}");
        assert_eq!(neutral("v\u{fe0f}"), "v\\u{fe0f}");
        assert_eq!(neutral("filler\u{3164}"), "filler\\u{3164}");
    }

    #[test]
    fn control_characters_are_shown() {
        assert_eq!(
            neutral("why\x1b[2K\rapproved by alice"),
            "why\\u{1b}[2K\\u{d}approved by alice"
        );
        assert_eq!(
            neutral("a\nb\tc\u{8}\u{7f}"),
            "a\\u{a}b\\u{9}c\\u{8}\\u{7f}"
        );
        assert_eq!(neutral("\u{9b}31m\0"), "\\u{9b}31m\\u{0}");
        assert_eq!(neutral("l1\u{2028}l2\u{2029}"), "l1\\u{2028}l2\\u{2029}");
    }

    #[test]
    fn layout_is_kept_only_when_asked_and_never_a_carriage_return() {
        let sql = "SELECT 1\n\tFROM t\r\n";
        assert_eq!(
            pieces(sql, true),
            vec![
                Piece::Plain("SELECT 1\n\tFROM t"),
                Piece::Hidden('\r'),
                Piece::Plain("\n")
            ]
        );
        assert!(pieces(sql, false).contains(&Piece::Hidden('\n')));
        assert_eq!(pieces("\u{202e}", true), vec![Piece::Hidden('\u{202e}')]);
    }

    #[test]
    fn every_character_survives_as_itself_or_its_escape() {
        let hostile = "a\u{202e}\u{2066}b\u{200b}\x1b[31mc\r\u{e0001}";
        let shown = neutral(hostile);
        assert!(!shown.chars().any(is_hidden), "{shown}");
        assert_eq!(
            shown,
            "a\\u{202e}\\u{2066}b\\u{200b}\\u{1b}[31mc\\u{d}\\u{e0001}"
        );
    }
}
