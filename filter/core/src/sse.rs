//! Server-sent events syntax, read through [`crate::framing`] by the stream
//! masker ([`crate::mask::StreamMasker`]) and the response recorder
//! ([`crate::record::ResponseRecorder`]) alike.
//!
//! Per the WHATWG `text/event-stream` format, lines end with CRLF, LF or a
//! lone CR; an event ends at a blank line; a line starting with `:` is a
//! comment; a field is `name: value` (one optional space after the colon)
//! and the `data` lines of an event are joined with `\n`. The format
//! defines four fields (`data`, `event`, `id`, `retry`) and has clients
//! ignore any other line; lenient clients do not (an indented ` data:`
//! line, a JSON body sent without `data:`), so an event with such a line
//! is one the filter cannot read as every client does ([`ParsedEvent::
//! unknown`]). A byte-order mark that begins the stream is dropped by
//! [`crate::framing::Splitter`], as the format says.

/// Looks for the end of the event at the start of `buf[from..]` (`from` is
/// the start of a line: the event's start or a line already scanned).
/// Returns `Ok(end)`, the index just past the blank line that ends the
/// event, or `Err(resume)`, the start of the first incomplete line, where
/// to resume when more bytes arrive. A CR that is the last byte is only
/// taken as a line end `at_end` (an LF may follow it).
pub fn event_end(buf: &[u8], from: usize, at_end: bool) -> Result<usize, usize> {
    let mut i = from;
    loop {
        let rest = buf.get(i..).unwrap_or_default();
        let Some(j) = memchr::memchr2(b'\n', b'\r', rest).map(|k| i + k) else {
            return Err(i);
        };
        let end = match (buf.get(j), buf.get(j + 1)) {
            (Some(b'\r'), Some(b'\n')) => j + 2,
            (Some(b'\r'), None) if !at_end => return Err(i),
            _ => j + 1,
        };
        if j == i {
            return Ok(end);
        }
        i = end;
    }
}

/// Splits raw event bytes into lines (`\r\n`, `\n` or `\r`): each line
/// without its terminator, and the terminator (empty for a last line
/// without one).
pub fn lines(raw: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let rest = raw.get(i..).unwrap_or_default();
        let j = memchr::memchr2(b'\n', b'\r', rest).map_or(raw.len(), |k| i + k);
        let end = match (raw.get(j), raw.get(j + 1)) {
            (Some(b'\r'), Some(b'\n')) => j + 2,
            (Some(_), _) => j + 1,
            (None, _) => j,
        };
        out.push((
            raw.get(i..j).unwrap_or_default(),
            raw.get(j..end).unwrap_or_default(),
        ));
        i = end;
    }
    out
}

/// Whether a line is a comment (starts with `:`).
pub fn is_comment(line: &[u8]) -> bool {
    line.first() == Some(&b':')
}

/// A line's field name and value (one space after the colon is dropped; a
/// line without a colon is a name with an empty value).
pub fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b':') {
        Some(p) => {
            let name = line.get(..p).unwrap_or_default();
            let mut value = line.get(p + 1..).unwrap_or_default();
            if value.first() == Some(&b' ') {
                value = value.get(1..).unwrap_or_default();
            }
            (name, value)
        }
        None => (line, &[]),
    }
}

/// The fields the format defines: any other is ignored by its clients.
pub const FIELDS: [&[u8]; 4] = [b"data", b"event", b"id", b"retry"];

/// The fields of one event that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// The `event` field (the last one).
    pub event: Option<String>,
    /// The data lines joined with `\n`; `None` without any data line.
    pub data: Option<String>,
    /// A line that is not empty, not a comment and whose field is not
    /// exactly one of [`FIELDS`] (` data`, `Data`, a line of JSON):
    /// clients that follow the format ignore it, lenient ones read it as
    /// data, so the event cannot be read as every client reads it.
    pub unknown: bool,
}

/// Parses the raw bytes of one event.
pub fn parse_event(raw: &[u8]) -> ParsedEvent {
    let mut event = None;
    let mut has_data = false;
    let mut unknown = false;
    for (line, _) in lines(raw) {
        if line.is_empty() || is_comment(line) {
            continue;
        }
        match field(line).0 {
            b"event" => event = Some(String::from_utf8_lossy(field(line).1).into_owned()),
            b"data" => has_data = true,
            name => unknown |= !FIELDS.contains(&name),
        }
    }
    ParsedEvent {
        event,
        data: has_data.then(|| join_data(raw)),
        unknown,
    }
}

/// The data lines of an event joined with `\n`, as clients see them.
pub fn join_data(raw: &[u8]) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for (line, _) in lines(raw) {
        if is_comment(line) {
            continue;
        }
        let (name, value) = field(line);
        if name == b"data" {
            parts.push(value);
        }
    }
    // Nearly every event has one data line: no joined copy of it.
    match parts.as_slice() {
        [one] => text_of(one),
        _ => text_of(&parts.join(&b'\n')),
    }
}

/// `bytes` as text; anything not UTF-8 as U+FFFD. (`from_utf8` first: its
/// check runs a word at a time over ASCII, where the lossy conversion
/// steps through every character.)
fn text_of(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Rewrites an event with new data: the data lines are replaced (at the
/// place of the first one), every other line is kept as it was.
pub fn rewrite_data(raw: &[u8], data: &str) -> Vec<u8> {
    let all = lines(raw);
    let nl: &[u8] = all
        .iter()
        .map(|(_, t)| *t)
        .find(|t| !t.is_empty())
        .unwrap_or(b"\n");
    let mut out = Vec::with_capacity(raw.len() + data.len());
    let mut wrote = false;
    for (line, term) in all {
        let is_data = !is_comment(line) && field(line).0 == b"data";
        if is_data {
            if !wrote {
                for (k, piece) in data.split('\n').enumerate() {
                    if k > 0 {
                        out.extend_from_slice(nl);
                    }
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(piece.as_bytes());
                }
                out.extend_from_slice(if term.is_empty() { nl } else { term });
                wrote = true;
            }
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(term);
    }
    out
}

/// A complete event: an optional `event` line and one data line (`data`
/// must not contain a line break), ending with a blank line.
pub fn event_bytes(event: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every event of `buf`, split the way a reader does it.
    fn split(buf: &[u8], at_end: bool) -> (Vec<&[u8]>, usize) {
        let mut out = Vec::new();
        let (mut pos, mut scan) = (0, 0);
        loop {
            match event_end(buf, scan.max(pos), at_end) {
                Ok(end) => {
                    out.push(&buf[pos..end]);
                    pos = end;
                    scan = end;
                }
                Err(resume) => return (out, resume.max(pos)),
            }
        }
    }

    #[test]
    fn events_end_at_blank_lines_with_any_line_end() {
        for (input, events) in [
            (
                &b"data: a\n\ndata: b\n\n"[..],
                &[&b"data: a\n\n"[..], b"data: b\n\n"][..],
            ),
            (b"data: a\r\n\r\ndata: b", &[b"data: a\r\n\r\n"]),
            (
                b"data: a\r\rdata: b\r\rx",
                &[b"data: a\r\r", b"data: b\r\r"],
            ),
            (
                b"event: x\r\ndata: a\n\r\n",
                &[b"event: x\r\ndata: a\n\r\n"],
            ),
            (b"\n", &[b"\n"]),
        ] {
            assert_eq!(split(input, false).0, events, "{input:?}");
        }
        // A lone CR at the end may be the first half of a CRLF.
        assert!(split(b"data: a\r\n\r", false).0.is_empty());
        assert_eq!(split(b"data: a\r\n\r", true).0, vec![&b"data: a\r\n\r"[..]]);
        // Resuming from the incomplete line finds the same end.
        let (none, resume) = split(b"data: a\ndata: b", false);
        assert!(none.is_empty());
        assert_eq!(resume, 8);
        assert_eq!(event_end(b"data: a\ndata: b\n\n", resume, false), Ok(17));
    }

    #[test]
    fn fields_comments_and_data() {
        let raw = b": comment\revent: delta\r\ndata:{\"a\":\ndata:  1}\nid: 7\nretry\n\n";
        let ev = parse_event(raw);
        assert_eq!(ev.event.as_deref(), Some("delta"));
        assert_eq!(ev.data.as_deref(), Some("{\"a\":\n 1}"));
        assert_eq!(field(b"retry"), (&b"retry"[..], &b""[..]));
        assert!(is_comment(b": x") && !is_comment(b"data: x"));
        assert_eq!(parse_event(b": only a comment\n\n").data, None);
        assert_eq!(parse_event(b"data\n\n").data.as_deref(), Some(""));
        assert!(!ev.unknown && !parse_event(b"id: 1\nretry: 5\n: c\n\n").unknown);
        for other in [
            &b" data: {}\n\n"[..],
            b"Data: {}\n\n",
            b"{\"choices\":[]}\n\n",
            b"data: {}\nx\n\n",
            b"\xef\xbb\xbfdata: {}\n\n",
        ] {
            assert!(
                parse_event(other).unknown,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(
            rewrite_data(raw, "X\nY"),
            b": comment\revent: delta\r\ndata: X\rdata: Y\nid: 7\nretry\n\n".to_vec()
        );
        assert_eq!(
            event_bytes(Some("e"), "{}"),
            b"event: e\ndata: {}\n\n".to_vec()
        );
        assert_eq!(event_bytes(None, "x"), b"data: x\n\n".to_vec());
    }
}
