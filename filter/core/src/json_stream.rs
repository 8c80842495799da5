//! Streams of JSON values, the framing beside [`crate::sse`]: JSON lines
//! (`application/x-ndjson`: one JSON object per line, Ollama's streamed
//! answers) and one JSON array sent element by element (Gemini's
//! `streamGenerateContent` without `alt=sse`). [`crate::framing`] cuts a
//! stream into units with this scanner, for the stream masker and the
//! recorder alike.
//!
//! A *unit* is one value with the bytes around it that belong to it: for
//! lines, the white space before the value and the line end after it; for
//! an array, the white space and the `[` or `,` before the element. What
//! follows the last unit (white space, an array's `]`) is the *tail*.
//! Strings are followed escape by escape, so a brace or a line break inside
//! a string never ends a value.

use std::ops::Range;

/// How the values of a stream are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One value per line (`\n` or `\r\n`).
    Lines,
    /// The elements of one JSON array.
    Array,
}

/// A complete unit, offsets from the start of the unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Where the value is.
    pub value: Range<usize>,
    /// Just past the unit's last byte.
    pub end: usize,
}

/// What the bytes of the current unit are so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// A complete unit.
    Unit(Found),
    /// Not complete yet (or only the tail so far).
    More,
    /// Not a stream in this layout.
    Bad(&'static str),
}

/// What the rest of a stream is at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A complete value without its line end: the last unit.
    Unit(Found),
    /// Separators only (white space, an array's `]`).
    Tail,
    /// A value cut short.
    Partial,
}

/// Finds units one after the other; resumable, so a unit arriving in many
/// chunks is scanned once. Feed it the bytes from the start of the current
/// unit; after a [`Scan::Unit`] the next unit starts just past it.
#[derive(Debug, Clone)]
pub struct Scanner {
    layout: Layout,
    /// Units found so far.
    values: usize,
    /// Next byte to look at, from the start of the unit.
    at: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    start: Option<usize>,
    end: Option<usize>,
    /// Array: the `[` or `,` before the next element was seen.
    separated: bool,
    /// Array: the closing `]` was seen.
    closed: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    /// A scanner for a stream in `layout`.
    pub fn new(layout: Layout) -> Scanner {
        Scanner {
            layout,
            values: 0,
            at: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            start: None,
            end: None,
            separated: false,
            closed: false,
        }
    }

    fn unit(&mut self, start: usize, end: usize) -> Found {
        let found = Found {
            value: start..end,
            end: self.at,
        };
        self.values += 1;
        self.at = 0;
        self.start = None;
        self.end = None;
        self.separated = false;
        found
    }

    /// Scans `unit`, the bytes from the start of the current unit (the same
    /// bytes again, with more at the end, until it returns a unit).
    pub fn scan(&mut self, unit: &[u8]) -> Scan {
        while let Some(&b) = unit.get(self.at) {
            let here = self.at;
            self.at += 1;
            if let (Some(start), Some(end)) = (self.start, self.end) {
                // Lines: a complete value, up to its line end.
                match b {
                    b'\n' => return Scan::Unit(self.unit(start, end)),
                    b' ' | b'\t' | b'\r' => continue,
                    _ => return Scan::Bad("two JSON values on one line"),
                }
            }
            if self.start.is_some() {
                if self.in_string {
                    if self.escaped {
                        self.escaped = false;
                    } else if b == b'\\' {
                        self.escaped = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                    continue;
                }
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 0 {
                            self.end = Some(self.at);
                            if let (Layout::Array, Some(start)) = (self.layout, self.start) {
                                return Scan::Unit(self.unit(start, self.at));
                            }
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if is_space(b) {
                continue;
            }
            if self.closed {
                return Scan::Bad("data after the end of the JSON array");
            }
            let first = self.values == 0;
            match (self.layout, b) {
                (Layout::Array, b'[') if first && !self.separated => self.separated = true,
                (Layout::Array, b',') if !first && !self.separated => self.separated = true,
                // `[]`, or the end after an element (not after a comma).
                (Layout::Array, b']') if first == self.separated => self.closed = true,
                (Layout::Lines, b'{' | b'[') | (Layout::Array, b'{' | b'[')
                    if self.layout == Layout::Lines || self.separated =>
                {
                    self.start = Some(here);
                    self.depth = 1;
                }
                _ => return Scan::Bad("no JSON object or array where a value should start"),
            }
        }
        Scan::More
    }

    /// At the end of the stream, after [`Scanner::scan`] returned
    /// [`Scan::More`] for `unit`: what it is.
    pub fn finish(&mut self, unit: &[u8]) -> End {
        match (self.start, self.end) {
            (Some(start), Some(end)) => {
                self.at = unit.len();
                End::Unit(self.unit(start, end))
            }
            (Some(_), None) => End::Partial,
            (None, _) => End::Tail,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// Every unit of `input` fed in two pieces split at `split`: the values,
    /// and what is left at the end.
    fn units(layout: Layout, input: &[u8], split: usize) -> (Vec<String>, End, Vec<u8>) {
        let mut s = Scanner::new(layout);
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        for piece in [&input[..split], &input[split..]] {
            buf.extend_from_slice(piece);
            loop {
                match s.scan(&buf) {
                    Scan::Unit(f) => {
                        out.push(String::from_utf8(buf[f.value.clone()].to_vec()).unwrap());
                        buf.drain(..f.end);
                    }
                    Scan::More => break,
                    Scan::Bad(m) => panic!("{m}"),
                }
            }
        }
        let end = s.finish(&buf);
        (out, end, buf)
    }

    #[test]
    fn lines_at_every_split() {
        let input = b"{\"a\":\"}\\\"\\n{\"}\r\n\n  {\"b\":[1,{\"c\":2}]}\n{\"d\":3}";
        for split in 0..=input.len() {
            let (values, end, rest) = units(Layout::Lines, input, split);
            assert_eq!(
                values,
                vec![r#"{"a":"}\"\n{"}"#, r#"{"b":[1,{"c":2}]}"#],
                "{split}"
            );
            // The last value has no line end: it is completed at the end.
            match end {
                End::Unit(f) => assert_eq!(&rest[f.value], b"{\"d\":3}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_array_element_by_element() {
        let input = b" [{\"x\":\"],\"}\r\n,\r\n{\"y\":[]}\n]\n";
        for split in 0..=input.len() {
            let (values, end, rest) = units(Layout::Array, input, split);
            assert_eq!(values, vec![r#"{"x":"],"}"#, r#"{"y":[]}"#], "{split}");
            assert_eq!(end, End::Tail);
            assert_eq!(rest, b"\n]\n");
        }
        let (values, end, _) = units(Layout::Array, b"[]", 1);
        assert!(values.is_empty());
        assert_eq!(end, End::Tail);
    }

    #[test]
    fn what_is_not_such_a_stream_is_bad_and_a_cut_value_partial() {
        for (layout, input) in [
            (Layout::Lines, &b"{\"a\":1} {\"b\":2}\n"[..]),
            (Layout::Lines, b"\"text\"\n"),
            (Layout::Lines, b"data: {}\n"),
            (Layout::Array, b"{\"a\":1}"),
            (Layout::Array, b"[{\"a\":1}{\"b\":2}]"),
            (Layout::Array, b"[{\"a\":1},]"),
            (Layout::Array, b"[1,2]"),
            (Layout::Array, b"[{\"a\":1}] {"),
        ] {
            let mut s = Scanner::new(layout);
            let mut buf = input.to_vec();
            let bad = loop {
                match s.scan(&buf) {
                    Scan::Unit(f) => {
                        buf.drain(..f.end);
                    }
                    Scan::More => break false,
                    Scan::Bad(_) => break true,
                }
            };
            assert!(bad, "{}", String::from_utf8_lossy(input));
        }
        let mut s = Scanner::new(Layout::Lines);
        assert_eq!(s.scan(b"{\"a\":\"b"), Scan::More);
        assert_eq!(s.finish(b"{\"a\":\"b"), End::Partial);
    }
}
