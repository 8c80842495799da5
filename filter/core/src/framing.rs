//! How a streamed answer is cut into units: server-sent events
//! ([`crate::sse`]), JSON lines or a JSON array sent element by element
//! ([`crate::json_stream`]). The [`Splitter`] is the one place that buffers
//! a stream and cuts it, used by the stream masker
//! ([`crate::mask::StreamMasker`]), the streamed tool-call hold
//! ([`crate::tool_stream`]) and the response recorder
//! ([`crate::record::ResponseRecorder`]), so they read the same units;
//! [`read`] is how each of them reads a unit.

use std::ops::Range;

use serde_json::Value;

use crate::json_stream::{End, Layout, Scan, Scanner};
use crate::sse;
use crate::wire::ApiKind;

/// UTF-8 byte-order mark.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// Whether the streamed answers of `api` come in a framing the splitter
/// reads. Bedrock's (`converse-stream`, `invoke-with-response-stream`) come
/// in AWS event-stream binary frames, which it does not: a request for one
/// is refused wherever its answer would be read (guarded or recorded).
pub fn streams_readable(api: ApiKind) -> bool {
    !matches!(api, ApiKind::BedrockConverse | ApiKind::BedrockInvoke)
}

/// How a streamed answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `text/event-stream`.
    Sse,
    /// A stream of JSON values.
    Json(Layout),
}

impl Framing {
    /// The framing of an answer from its `content-type`, or `None` for a
    /// plain body read whole. `array_stream`: a JSON body is one array sent
    /// element by element (a successful answer to Gemini's
    /// `streamGenerateContent` without `alt=sse`).
    pub fn of(content_type: Option<&str>, array_stream: bool) -> Option<Framing> {
        let media = content_type
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "text/event-stream" => Some(Framing::Sse),
            "application/x-ndjson" | "application/ndjson" => Some(Framing::Json(Layout::Lines)),
            "application/json" if array_stream => Some(Framing::Json(Layout::Array)),
            _ => None,
        }
    }

    /// An extra unit carrying `json` (an SSE event named `event`), to go
    /// out just before a unit (`at_end` false) or after the last one.
    pub fn extra(self, event: Option<&str>, json: &str, at_end: bool) -> Vec<u8> {
        match self {
            Framing::Sse => sse::event_bytes(event, json),
            Framing::Json(Layout::Lines) => format!("{json}\n").into_bytes(),
            Framing::Json(Layout::Array) if at_end => format!(",{json}").into_bytes(),
            Framing::Json(Layout::Array) => format!("{json},").into_bytes(),
        }
    }

    /// The last unit of a stream ended by an error: `sse_event` for SSE,
    /// else `json` as a value (closing an array; `first`: nothing of the
    /// array went out yet).
    pub fn error_end(self, sse_event: Vec<u8>, json: &str, first: bool) -> Vec<u8> {
        match self {
            Framing::Sse => sse_event,
            Framing::Json(Layout::Lines) => format!("{json}\n").into_bytes(),
            Framing::Json(Layout::Array) if first => format!("[{json}]").into_bytes(),
            Framing::Json(Layout::Array) => format!(",{json}]").into_bytes(),
        }
    }
}

/// One unit of a stream, with its bytes as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// An SSE event, through its blank line.
    Event(Vec<u8>),
    /// A JSON value and the separators that belong to it.
    Value {
        /// The unit's bytes.
        raw: Vec<u8>,
        /// Where the value is in `raw`.
        value: Range<usize>,
    },
}

impl Unit {
    /// The unit's bytes.
    pub fn raw(&self) -> &[u8] {
        match self {
            Unit::Event(raw) | Unit::Value { raw, .. } => raw,
        }
    }
}

/// What is left of a stream at its end, after its last unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rest {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// They are a JSON value cut short (not only separators).
    pub partial: bool,
}

/// What a unit carries, read the one way every reader of a stream reads it
/// ([`read`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// No data: an SSE event of comments and fields only, or whose data is
    /// empty or blank.
    Nothing,
    /// OpenAI's `data: [DONE]`.
    Done,
    /// A JSON object: an SSE event's data lines joined, or a value of a
    /// JSON stream.
    Json {
        /// The SSE `event` field.
        event: Option<String>,
        /// The JSON text (as text: bytes that are not UTF-8 as U+FFFD).
        data: String,
        /// The value, parsed strictly ([`crate::json::parse_strict`]).
        value: Value,
    },
}

/// A unit that cannot be read as its clients read it: an SSE line that is
/// no field the format defines ([`sse::ParsedEvent::unknown`]), or data
/// that is not one JSON object, parsed strictly (text, a bare string, a
/// duplicate key that one reader takes first and another last). Every reader fails closed on it:
/// the masker blocks the stream, the tool-call hold ends it with an error,
/// the recorder marks the record incomplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// Reads one unit (see [`Read`], [`Unreadable`]); one strict parse.
pub fn read(unit: &Unit) -> Result<Read, Unreadable> {
    let (event, data) = match unit {
        Unit::Event(raw) => {
            let ev = sse::parse_event(raw);
            if ev.unknown {
                return Err(Unreadable);
            }
            match ev.data {
                Some(d) if d.trim() == "[DONE]" => return Ok(Read::Done),
                Some(d) if !d.trim().is_empty() => (ev.event, d),
                _ => return Ok(Read::Nothing),
            }
        }
        Unit::Value { raw, value } => (
            None,
            String::from_utf8_lossy(raw.get(value.clone()).unwrap_or_default()).into_owned(),
        ),
    };
    // Every API streams objects: a string or a number is text no field of
    // the answer holds, which could only be masked one unit at a time.
    match crate::json::parse_strict_str(&data) {
        Ok(value) if value.is_object() => Ok(Read::Json { event, data, value }),
        _ => Err(Unreadable),
    }
}

/// Buffers a stream and cuts it into units.
#[derive(Debug)]
pub struct Splitter {
    framing: Framing,
    buf: Vec<u8>,
    /// Start of the bytes not yet cut.
    pos: usize,
    /// SSE: where to resume looking for the end of the current event.
    scan: usize,
    json: Scanner,
    /// SSE: the start of the stream was passed (a byte-order mark there
    /// dropped).
    started: bool,
}

impl Splitter {
    /// A splitter for a stream framed as `framing`.
    pub fn new(framing: Framing) -> Splitter {
        let layout = match framing {
            Framing::Json(layout) => layout,
            Framing::Sse => Layout::Lines,
        };
        Splitter {
            framing,
            buf: Vec::new(),
            pos: 0,
            scan: 0,
            json: Scanner::new(layout),
            started: false,
        }
    }

    /// The framing.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Takes the next chunk of the stream (split anywhere).
    pub fn push(&mut self, chunk: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received and not yet cut into a unit.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The bytes received and not yet cut into a unit, as they came;
    /// forgets them.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.get(self.pos..).unwrap_or_default().to_vec();
        self.clear();
        rest
    }

    /// Forgets everything buffered.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.scan = 0;
    }

    fn compact(&mut self) {
        let n = self.pos.min(self.buf.len());
        self.buf.drain(..n);
        self.scan = self.scan.saturating_sub(n);
        self.pos = 0;
    }

    fn take(&mut self, end: usize) -> Vec<u8> {
        let bytes = self.buf.get(self.pos..end).unwrap_or_default().to_vec();
        self.pos = end;
        self.scan = end;
        bytes
    }

    /// The next complete unit, `Ok(None)` until more bytes arrive; `Err`
    /// when the stream is not framed as it should be.
    pub fn next_complete(&mut self) -> Result<Option<Unit>, &'static str> {
        self.next_unit(false)
    }

    /// SSE: drops a byte-order mark that begins the stream, as the format
    /// has clients do (and every client then reads the same first line);
    /// `false` while the bytes so far may still be one.
    fn skip_bom(&mut self, at_end: bool) -> bool {
        if self.started {
            return true;
        }
        let head = self.buf.get(self.pos..).unwrap_or_default();
        if head.starts_with(BOM) {
            self.pos += BOM.len();
            self.scan = self.scan.max(self.pos);
        } else if BOM.starts_with(head) && !at_end {
            return false;
        }
        self.started = true;
        true
    }

    fn next_unit(&mut self, at_end: bool) -> Result<Option<Unit>, &'static str> {
        if self.framing == Framing::Sse && !self.skip_bom(at_end) {
            return Ok(None);
        }
        match self.framing {
            Framing::Sse => match sse::event_end(&self.buf, self.scan.max(self.pos), at_end) {
                Ok(end) => Ok(Some(Unit::Event(self.take(end)))),
                Err(resume) => {
                    self.scan = resume;
                    Ok(None)
                }
            },
            Framing::Json(_) => {
                let unit = self.buf.get(self.pos..).unwrap_or_default();
                match self.json.scan(unit) {
                    Scan::Unit(found) => {
                        let end = self.pos + found.end;
                        Ok(Some(Unit::Value {
                            raw: self.take(end),
                            value: found.value,
                        }))
                    }
                    Scan::More => Ok(None),
                    Scan::Bad(why) => Err(why),
                }
            }
        }
    }

    /// The end of the stream: its last units (an event without its blank
    /// line, a value without its line end, completed as they would have
    /// been), and what is left.
    pub fn finish(&mut self) -> Result<(Vec<Unit>, Rest), &'static str> {
        let mut units = Vec::new();
        while let Some(u) = self.next_complete()? {
            units.push(u);
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default().to_vec();
        self.clear();
        let mut partial = false;
        let bytes = match self.framing {
            Framing::Sse if rest.iter().all(u8::is_ascii_whitespace) => rest,
            Framing::Sse => {
                self.buf = rest;
                self.buf.extend_from_slice(b"\n\n");
                while let Some(u) = self.next_unit(true)? {
                    units.push(u);
                }
                let left = self.buf.get(self.pos..).unwrap_or_default().to_vec();
                self.clear();
                left
            }
            Framing::Json(_) => match self.json.finish(&rest) {
                End::Unit(found) => {
                    let mut raw = rest;
                    raw.push(b'\n');
                    units.push(Unit::Value {
                        raw,
                        value: found.value,
                    });
                    Vec::new()
                }
                End::Partial => {
                    partial = true;
                    rest
                }
                End::Tail => rest,
            },
        };
        Ok((units, Rest { bytes, partial }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    /// Every unit's bytes and the rest, `input` pushed in two pieces.
    fn split(framing: Framing, input: &[u8], at: usize) -> (Vec<Unit>, Rest) {
        let mut s = Splitter::new(framing);
        let mut units = Vec::new();
        for piece in [&input[..at], &input[at..]] {
            s.push(piece);
            while let Some(u) = s.next_complete().unwrap() {
                units.push(u);
            }
        }
        let (last, rest) = s.finish().unwrap();
        units.extend(last);
        assert_eq!(s.buffered(), 0);
        (units, rest)
    }

    fn raw(u: &Unit) -> &[u8] {
        match u {
            Unit::Event(raw) | Unit::Value { raw, .. } => raw,
        }
    }

    #[test]
    fn the_framing_comes_from_the_content_type() {
        assert_eq!(
            Framing::of(Some(" Text/Event-Stream; charset=utf-8"), false),
            Some(Framing::Sse)
        );
        assert_eq!(
            Framing::of(Some("application/x-ndjson"), false),
            Some(Framing::Json(Layout::Lines))
        );
        assert_eq!(Framing::of(Some("application/json"), false), None);
        assert_eq!(
            Framing::of(Some("application/json; charset=UTF-8"), true),
            Some(Framing::Json(Layout::Array))
        );
        assert_eq!(Framing::of(None, true), None);
        assert_eq!(Framing::of(Some("text/plain"), false), None);
    }

    #[test]
    fn units_are_the_same_at_every_split_and_the_input_is_kept() {
        for (framing, input, count) in [
            (
                Framing::Sse,
                &b": c\n\ndata: {\"a\":1}\r\n\r\ndata: x"[..],
                3,
            ),
            (
                Framing::Json(Layout::Lines),
                b"{\"a\":\"\\n\"}\n\n{\"b\":2}\r\n{\"c\":3}",
                3,
            ),
            (
                Framing::Json(Layout::Array),
                b"[{\"a\":1}\n,\r\n{\"b\":\"]\"}\n]",
                2,
            ),
        ] {
            for at in 0..=input.len() {
                let (units, rest) = split(framing, input, at);
                assert_eq!(units.len(), count, "{framing:?} at {at}");
                let mut all: Vec<u8> = units.iter().flat_map(|u| raw(u).to_vec()).collect();
                all.extend(&rest.bytes);
                // Nothing is lost; a last unit without its end is completed.
                let completed = match framing {
                    Framing::Sse => [input, b"\n\n"].concat(),
                    Framing::Json(Layout::Lines) => [input, b"\n"].concat(),
                    Framing::Json(Layout::Array) => input.to_vec(),
                };
                assert_eq!(all, completed, "{framing:?} at {at}");
                assert!(!rest.partial);
            }
        }
    }

    #[test]
    fn a_byte_order_mark_begins_an_event_stream_only() {
        let input = b"\xef\xbb\xbfdata: {}\n\n\xef\xbb\xbfdata: {}\n\n";
        for at in 0..=input.len() {
            let (units, rest) = split(Framing::Sse, input, at);
            // The first is dropped; the second is a line of the event.
            assert_eq!(raw(&units[0]), b"data: {}\n\n", "at {at}");
            assert_eq!(raw(&units[1]), &input[13..], "at {at}");
            assert!(rest.bytes.is_empty());
        }
        // Part of a mark is no mark.
        let (units, _) = split(Framing::Sse, b"\xef\xbbdata: {}\n\n", 1);
        assert_eq!(raw(&units[0]), b"\xef\xbbdata: {}\n\n");
        let (units, rest) = split(Framing::Sse, b"\xef\xbb", 1);
        assert_eq!(raw(&units[0]), b"\xef\xbb\n\n");
        assert!(rest.bytes.is_empty());
    }

    #[test]
    fn units_are_read_strictly() {
        let event = |s: &str| read(&Unit::Event(s.as_bytes().to_vec()));
        assert_eq!(event(": c\nid: 1\n\n"), Ok(Read::Nothing));
        assert_eq!(event("data:\n\n"), Ok(Read::Nothing));
        assert_eq!(event("data:  [DONE] \n\n"), Ok(Read::Done));
        assert_eq!(
            event("event: e\ndata: {\"a\":\ndata: 1}\n\n"),
            Ok(Read::Json {
                event: Some("e".into()),
                data: "{\"a\":\n1}".into(),
                value: serde_json::json!({"a": 1}),
            })
        );
        for bad in [
            " data: {}\n\n",
            "data: x\n\n",
            "data: {\"a\":1,\"a\":1}\n\n",
            "data: {} {}\n\n",
        ] {
            assert_eq!(event(bad), Err(Unreadable), "{bad:?}");
        }
        let value = |s: &str| {
            read(&Unit::Value {
                raw: s.as_bytes().to_vec(),
                value: 0..s.len(),
            })
        };
        assert!(matches!(
            value("{\"a\":1}"),
            Ok(Read::Json { event: None, .. })
        ));
        assert_eq!(value("{\"a\":1,\"a\":2}"), Err(Unreadable));
    }

    #[test]
    fn values_and_what_is_left() {
        let (units, rest) = split(Framing::Json(Layout::Array), b" [{\"a\":1},{\"b\":2}]\n", 3);
        match &units[1] {
            Unit::Value { raw, value } => {
                assert_eq!(raw.as_slice(), b",{\"b\":2}");
                assert_eq!(&raw[value.clone()], b"{\"b\":2}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rest.bytes, b"]\n");
        // A value cut short is left over, marked partial.
        let (units, rest) = split(Framing::Json(Layout::Lines), b"{\"a\":1}\n{\"b\":\"x", 4);
        assert_eq!(units.len(), 1);
        assert!(rest.partial);
        assert_eq!(rest.bytes, b"{\"b\":\"x");
        // Not this framing at all.
        let mut s = Splitter::new(Framing::Json(Layout::Lines));
        s.push(b"data: {}\n\n");
        assert!(s.next_complete().is_err());
    }

    #[test]
    fn extra_and_error_units_keep_the_framing() {
        let lines = Framing::Json(Layout::Lines);
        let array = Framing::Json(Layout::Array);
        assert_eq!(
            Framing::Sse.extra(Some("e"), "{}", false),
            b"event: e\ndata: {}\n\n"
        );
        assert_eq!(lines.extra(None, "{}", true), b"{}\n");
        assert_eq!(array.extra(None, "{}", false), b"{},");
        assert_eq!(array.extra(None, "{}", true), b",{}");
        assert_eq!(array.error_end(Vec::new(), "{}", true), b"[{}]");
        assert_eq!(array.error_end(Vec::new(), "{}", false), b",{}]");
        assert_eq!(lines.error_end(Vec::new(), "{}", false), b"{}\n");
        assert_eq!(Framing::Sse.error_end(b"x".to_vec(), "{}", false), b"x");
    }
}
