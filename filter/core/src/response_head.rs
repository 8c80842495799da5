//! The answer's head: whether the filter reads the answer, and what becomes
//! of an answer it cannot read.
//!
//! Every forwarded inference request asks the model for an uncompressed
//! answer ([`UPSTREAM_ACCEPT_ENCODING`]): masking, restore, response rules
//! and the record all read the answer's text, and a compressed body would
//! pass them unread. A backend that compresses anyway gets its answer
//! withheld: the caller receives a 502 error in its API's format instead,
//! with headers that describe that body (no `content-encoding`). Callers that
//! want compression toward them put Envoy's compressor filter before
//! countersign in the filter chain: it compresses what countersign let out.

use crate::framing::Framing;
use crate::host::Headers;
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::ApiKind;

/// The `accept-encoding` sent upstream with every inspected request.
pub const UPSTREAM_ACCEPT_ENCODING: &str = "identity";

/// The response headers in which the gateway tells the caller what it did.
/// Only the filter may set them: an upstream's copies (a backend claiming
/// `x-countersign-answer-outcome: approved` on an answer nobody reviewed,
/// or an outcome on a request that passed untouched) are removed.
pub const OUTCOME_HEADERS: [&str; 4] = [
    "x-countersign-outcome",
    "x-countersign-review-id",
    "x-countersign-answer-outcome",
    "x-countersign-answer-review-id",
];

/// The [`OUTCOME_HEADERS`] an upstream's `head` carries that the filter
/// did not set itself (`set`): to be removed before the head goes on.
pub fn forged_outcome_headers(head: &Headers, set: &[&str]) -> Vec<&'static str> {
    OUTCOME_HEADERS
        .into_iter()
        .filter(|name| !set.contains(name) && head.contains(name))
        .collect()
}

/// `blocked_by` in the record of an answer withheld because it was encoded.
pub const ENCODED_RESPONSE: &str = "encoded_response";

/// `blocked_by` in the record of an answer withheld because it came with
/// more than one `content-type`.
pub const AMBIGUOUS_CONTENT_TYPE: &str = "ambiguous_content_type";

/// What the filter knows of an answer when its headers arrive.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead<'a> {
    /// `content-type` (the first).
    pub content_type: Option<&'a str>,
    /// How many `content-type` headers came: with more than one, which of
    /// them the caller goes by (event stream or plain body) is not known.
    pub content_types: usize,
    /// Every `content-encoding` value, in order: a caller decodes them all
    /// (`identity` then a second `gzip` header is a gzip body).
    pub content_encodings: Vec<&'a str>,
    /// A JSON body is one array sent element by element (a successful
    /// answer to Gemini's `streamGenerateContent` without `alt=sse`).
    pub array_stream: bool,
}

impl<'a> ResponseHead<'a> {
    /// The head of an answer with these `headers`.
    pub fn of(headers: &'a Headers, array_stream: bool) -> ResponseHead<'a> {
        ResponseHead {
            content_type: headers.get("content-type"),
            content_types: headers.values("content-type").count(),
            content_encodings: headers.values("content-encoding").collect(),
            array_stream,
        }
    }
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponsePlan {
    /// Nothing reads this answer: it passes as it comes.
    Pass,
    /// The answer is read (guarded, recorded or both): a stream event by
    /// event, or a plain body whole.
    Read {
        /// How the stream is framed; `None` for a plain body.
        framing: Option<Framing>,
    },
    /// The answer cannot be read: it is replaced whole.
    Withhold(Withheld),
}

/// An answer replaced because it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// The status the caller gets.
    pub status: u16,
    /// Headers to remove from the answer.
    pub remove: Vec<&'static str>,
    /// Headers to set on the answer.
    pub set: Vec<(&'static str, String)>,
    /// The body the caller gets instead of the answer's.
    pub body: Vec<u8>,
    /// What the record names as the reason.
    pub blocked_by: &'static str,
}

/// Whether `content-encoding` values (every header, each a list) leave the
/// body readable as it is: each coding is `identity` (or empty).
pub(crate) fn readable_encoding<'e>(mut encodings: impl Iterator<Item = &'e str>) -> bool {
    encodings.all(|list| {
        list.split(',').all(|e| {
            let e = e.trim();
            e.is_empty() || e.eq_ignore_ascii_case("identity")
        })
    })
}

/// Decides on an answer of API `api` from its head. `read` says whether
/// anything needs the answer's text (a response guard, the record).
pub fn plan_response(api: ApiKind, head: &ResponseHead, read: bool) -> ResponsePlan {
    if !read {
        return ResponsePlan::Pass;
    }
    if !readable_encoding(head.content_encodings.iter().copied()) {
        let refusal = Refusal::new(
            RefusalKind::ResponseUninspectable,
            Some(api),
            "the model's answer was compressed, so it could not be inspected and was withheld; \
             the gateway asks for uncompressed answers, so the backend ignored `accept-encoding`",
        );
        return ResponsePlan::Withhold(Withheld {
            status: refusal.status(),
            // Every value of each goes (`content-type` too, before it
            // is set: a second one would stay otherwise).
            remove: vec!["content-encoding", "content-length", "etag", "content-type"],
            set: vec![("content-type", "application/json".to_string())],
            body: refusal.body(),
            blocked_by: ENCODED_RESPONSE,
        });
    }
    if head.content_types > 1 {
        let refusal = Refusal::new(
            RefusalKind::ResponseUninspectable,
            Some(api),
            "the model's answer came with more than one content-type, so how a client reads it \
             is not known; it could not be inspected and was withheld",
        );
        return ResponsePlan::Withhold(Withheld {
            status: refusal.status(),
            remove: vec!["content-encoding", "content-length", "etag", "content-type"],
            set: vec![("content-type", "application/json".to_string())],
            body: refusal.body(),
            blocked_by: AMBIGUOUS_CONTENT_TYPE,
        });
    }
    ResponsePlan::Read {
        framing: Framing::of(head.content_type, head.array_stream),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::json_stream::Layout;

    fn head<'a>(content_type: &'a str, encoding: Option<&'a str>) -> ResponseHead<'a> {
        ResponseHead {
            content_type: Some(content_type),
            content_types: 1,
            content_encodings: encoding.into_iter().collect(),
            array_stream: false,
        }
    }

    #[test]
    fn an_answer_nothing_reads_passes_even_compressed() {
        let h = head("application/json", Some("gzip"));
        assert_eq!(
            plan_response(ApiKind::OpenaiChat, &h, false),
            ResponsePlan::Pass
        );
    }

    #[test]
    fn plain_and_streamed_answers_are_read() {
        let lines = Some(Framing::Json(Layout::Lines));
        for (ct, framing) in [
            ("application/json", None),
            ("text/event-stream", Some(Framing::Sse)),
            ("Text/Event-Stream; charset=utf-8", Some(Framing::Sse)),
            ("text/plain", None),
            ("application/x-ndjson", lines),
            ("application/ndjson; charset=utf-8", lines),
        ] {
            for enc in [None, Some("identity"), Some(" IDENTITY "), Some("")] {
                assert_eq!(
                    plan_response(ApiKind::OpenaiChat, &head(ct, enc), true),
                    ResponsePlan::Read { framing },
                    "{ct} {enc:?}"
                );
            }
        }
        // A JSON body is an array stream only where the request asked for
        // one.
        let array = ResponseHead {
            array_stream: true,
            ..head("application/json; charset=UTF-8", None)
        };
        assert_eq!(
            plan_response(ApiKind::GeminiGenerateContent, &array, true),
            ResponsePlan::Read {
                framing: Some(Framing::Json(Layout::Array))
            }
        );
    }

    #[test]
    fn compressed_answers_are_withheld_in_the_callers_format() {
        for enc in [
            "gzip",
            "br",
            "deflate",
            "zstd",
            "gzip, identity",
            "x-custom",
        ] {
            for ct in ["application/json", "text/event-stream"] {
                let ResponsePlan::Withhold(w) =
                    plan_response(ApiKind::OpenaiChat, &head(ct, Some(enc)), true)
                else {
                    panic!("{enc} {ct} not withheld");
                };
                assert_eq!(w.status, 502);
                assert!(w.remove.contains(&"content-encoding"));
                assert!(w.remove.contains(&"content-length"));
                assert_eq!(
                    w.set,
                    vec![("content-type", "application/json".to_string())]
                );
                let v: serde_json::Value = serde_json::from_slice(&w.body).unwrap();
                assert_eq!(v["error"]["code"], "response_uninspectable");
                assert_eq!(w.blocked_by, "encoded_response");
            }
        }
        let ResponsePlan::Withhold(w) = plan_response(
            ApiKind::AnthropicMessages,
            &head("text/event-stream", Some("gzip")),
            true,
        ) else {
            panic!("not withheld");
        };
        let v: serde_json::Value = serde_json::from_slice(&w.body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "api_error");
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// A client decodes every `content-encoding` header, not only the
    /// first; and which of two `content-type`s it goes by is not known.
    #[test]
    fn every_encoding_header_counts_and_two_content_types_withhold() {
        let withheld = |h: &Headers| match plan_response(
            ApiKind::OpenaiChat,
            &ResponseHead::of(h, false),
            true,
        ) {
            ResponsePlan::Withhold(w) => Some(w.blocked_by),
            _ => None,
        };
        let h = headers(&[
            (":status", "200"),
            ("content-type", "text/event-stream"),
            ("content-encoding", "identity"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(withheld(&h), Some(ENCODED_RESPONSE));
        let h = headers(&[
            ("content-type", "application/json"),
            ("Content-Encoding", "identity"),
            ("content-encoding", " Identity, "),
        ]);
        assert_eq!(withheld(&h), None);
        let h = headers(&[
            ("content-type", "application/json"),
            ("content-type", "text/event-stream"),
        ]);
        assert_eq!(withheld(&h), Some(AMBIGUOUS_CONTENT_TYPE));
        // Nothing reads it: it passes as it comes.
        assert_eq!(
            plan_response(ApiKind::OpenaiChat, &ResponseHead::of(&h, false), false),
            ResponsePlan::Pass
        );
    }
}
