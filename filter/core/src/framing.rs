//! How a streamed answer is cut into units: server-sent events
//! ([`crate::sse`]), JSON lines or a JSON array sent element by element
//! ([`crate::json_stream`]). The [`Splitter`] is the one place that buffers
//! a stream and cuts it, used by the stream masker
//! ([`crate::mask::StreamMasker`]) and the response recorder
//! ([`crate::record::ResponseRecorder`]), so the two read the same units.

use std::ops::Range;

use crate::json_stream::{End, Layout, Scan, Scanner};
use crate::sse;
use crate::wire::ApiKind;

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

/// What is left of a stream at its end, after its last unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rest {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// They are a JSON value cut short (not only separators).
    pub partial: bool,
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

    fn next_unit(&mut self, at_end: bool) -> Result<Option<Unit>, &'static str> {
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
