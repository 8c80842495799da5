//! The answer's body as it flows: the guard that rewrites it (masking,
//! restore, response rules) and what the filter notes for the response part
//! of the record. Pure: [`crate::stream_filter::StreamFilter`] feeds the chunks. (Where
//! the text sits in each API's answer is [`crate::answer`].)

use crate::framing::Framing;
use crate::mask::{mask_response_body, Hit, ResponseGuard, StreamMasker, BLOCKED_STATUS};
use crate::record::ResponseRecorder;
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::{ApiKind, HitCount};

/// What guarding a response found, for the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardReport {
    /// The response rule or detector that blocked the answer.
    pub blocked_by: Option<String>,
    /// Detector and monitor-rule hits so far.
    pub hits: Vec<HitCount>,
    /// The status of the error that replaced a plain answer (blocked:
    /// [`BLOCKED_STATUS`]; unreadable: `response_uninspectable`'s), for a
    /// head that is still held. `None` for streams, whose head has gone.
    pub status: Option<u16>,
    /// A stream the guard stopped reading (it could not follow its
    /// channels, and only monitors): the rest passed unread, its hits
    /// uncounted ([`crate::mask::StreamReport::unscanned`]).
    pub unscanned: bool,
}

/// How a response is guarded.
pub enum ResponseFilter {
    /// A stream, rewritten event by event with a hold-back window.
    Stream(Box<StreamMasker>),
    /// A plain body, buffered whole and rewritten once.
    Plain(ResponseGuard, ApiKind),
}

impl ResponseFilter {
    /// A filter for an answer of API `api`: a stream framed as `framing`,
    /// or a plain body (`None`).
    pub fn new(guard: ResponseGuard, api: ApiKind, framing: Option<Framing>) -> ResponseFilter {
        match framing {
            Some(framing) => {
                ResponseFilter::Stream(Box::new(StreamMasker::new(api, guard, framing)))
            }
            None => ResponseFilter::Plain(guard, api),
        }
    }

    /// Whether the whole body is needed before anything can be let out.
    pub fn buffers(&self) -> bool {
        matches!(self, ResponseFilter::Plain(..))
    }

    /// Rewrites one chunk (a plain body: the whole body, at its end).
    pub fn apply(&mut self, chunk: &[u8], end_of_stream: bool) -> (Vec<u8>, GuardReport) {
        let mut unscanned = false;
        let (out, blocked_by, mut hits, monitored, status) = match self {
            ResponseFilter::Stream(masker) => {
                let mut out = masker.push(chunk);
                if end_of_stream {
                    out.extend(masker.finish());
                }
                let r = masker.report();
                unscanned = r.unscanned;
                (
                    out,
                    r.blocked.map(|b| b.name().to_string()),
                    hits_of(&r.hits),
                    r.monitored_rules,
                    None,
                )
            }
            ResponseFilter::Plain(guard, api) => match mask_response_body(guard, *api, chunk) {
                Ok(m) => match &m.blocked {
                    Some(b) => (
                        b.error_body(*api),
                        Some(b.name().to_string()),
                        hits_of(&m.hits),
                        m.monitored_rules,
                        Some(BLOCKED_STATUS),
                    ),
                    None => (
                        m.body.clone().unwrap_or_else(|| chunk.to_vec()),
                        None,
                        hits_of(&m.hits),
                        m.monitored_rules,
                        None,
                    ),
                },
                // Unreadable: nothing unchecked leaves (fail closed).
                Err(_) => {
                    let refusal = unreadable_response(*api);
                    (
                        refusal.body(),
                        Some("unreadable_response".to_string()),
                        Vec::new(),
                        Vec::new(),
                        Some(refusal.status()),
                    )
                }
            },
        };
        hits.extend(monitored.into_iter().map(|name| HitCount {
            name,
            action: "monitor".into(),
            count: 1,
        }));
        (
            out,
            GuardReport {
                blocked_by,
                hits,
                status,
                unscanned,
            },
        )
    }
}

/// What the filter notes about a response for its record.
pub struct ResponseCapture {
    /// The record the response part is appended to.
    pub record_id: String,
    /// The answer as recorded (masked, reassembled).
    pub recorder: ResponseRecorder,
    /// `:status` of the answer.
    pub status: u16,
    /// When the request was forwarded (ms).
    pub forwarded_at_ms: u64,
    /// Forward → response headers.
    pub ttfb_ms: Option<u64>,
    /// Set when the answer reached its end (not reset).
    pub complete: bool,
    /// What blocked or withheld the answer.
    pub blocked_by: Option<String>,
    /// Hits of the response guard.
    pub hits: Vec<HitCount>,
    /// The guard stopped reading the stream part way: `hits` count only
    /// what came before.
    pub unscanned: bool,
}

fn hits_of(hits: &[Hit]) -> Vec<HitCount> {
    hits.iter()
        .map(|h| HitCount {
            name: h.detector.clone(),
            action: h.action.as_str().to_string(),
            count: u32::try_from(h.count).unwrap_or(u32::MAX),
        })
        .collect()
}

/// The error replacing a response that could not be inspected.
fn unreadable_response(api: ApiKind) -> Refusal {
    Refusal::new(
        RefusalKind::ResponseUninspectable,
        Some(api),
        "the model's response could not be inspected, so it was withheld",
    )
}
