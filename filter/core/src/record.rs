//! Session records, filter side: what goes into the record written before a
//! request is forwarded, and the assembly of the response part (a streamed
//! answer is put back together from its SSE events) within a size limit.

use serde_json::Value;

use crate::inspect::RequestInfo;
use crate::refusal::Refusal;
use crate::sse;
use crate::wire::{ApiKind, NewRecord, RecordResponse, RecordedRefusal};

/// The request part of a record, from what the filter knows.
pub fn new_record(info: &RequestInfo, api: Option<ApiKind>, decision: &str) -> NewRecord {
    NewRecord {
        request_id: info.request_id.clone(),
        received_at_ms: info.received_at_ms,
        caller: info.caller_name(),
        caller_groups: info.caller_groups(),
        source_address: info.source_address.clone(),
        route: info.route.clone(),
        method: info.method.clone(),
        path: info.path.clone(),
        api,
        model: info.model.clone(),
        stream: info.stream,
        decision: decision.to_string(),
        rule: None,
        review_id: None,
        body: None,
        body_sha256: None,
        hits: info.hits.clone(),
        refusal: None,
        held_ms: None,
        idempotency_key: (info.nonce != 0)
            .then(|| format!("{}:{:016x}", info.request_id, info.nonce)),
    }
}

/// The record of a refused inference request.
pub fn refusal_record(info: &RequestInfo, api: Option<ApiKind>, refusal: &Refusal) -> NewRecord {
    let mut r = new_record(info, api, refusal.kind.outcome());
    // A refusal is a different record from a (possibly written) pre-forward one.
    r.idempotency_key = r.idempotency_key.map(|k| k + ":refusal");
    r.review_id = refusal.review_id.clone();
    r.refusal = Some(RecordedRefusal {
        status: refusal.status(),
        code: refusal.kind.code().to_string(),
        message: refusal.message.clone(),
    });
    r
}

/// Largest response text kept in a record.
pub const MAX_RECORDED_RESPONSE: usize = 1024 * 1024;

/// Collects a response, chunk by chunk, without holding it back.
#[derive(Debug)]
pub struct ResponseRecorder {
    sse: bool,
    cap: usize,
    raw: Vec<u8>,
    pending: Vec<u8>,
    /// Where to resume looking for the end of the event in `pending`.
    scan: usize,
    /// Completion text per choice / content block index.
    parts: Vec<(u64, String)>,
    usage: Option<Value>,
    truncated: bool,
}

impl ResponseRecorder {
    /// A recorder for a response with this `content-type`.
    pub fn new(content_type: Option<&str>, cap: usize) -> ResponseRecorder {
        let sse = content_type.is_some_and(sse::is_event_stream);
        ResponseRecorder {
            sse,
            cap,
            raw: Vec::new(),
            pending: Vec::new(),
            scan: 0,
            parts: Vec::new(),
            usage: None,
            truncated: false,
        }
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            let room = self.cap.saturating_sub(self.raw.len());
            if chunk.len() > room {
                self.truncated = true;
            }
            self.raw.extend_from_slice(&chunk[..chunk.len().min(room)]);
            return;
        }
        self.pending.extend_from_slice(chunk);
        let pending = std::mem::take(&mut self.pending);
        let mut pos = 0;
        let mut scan = self.scan;
        loop {
            match sse::event_end(&pending, scan.max(pos), false) {
                Ok(end) => {
                    self.sse_event(pending.get(pos..end).unwrap_or_default());
                    pos = end;
                    scan = end;
                }
                Err(resume) => {
                    scan = resume;
                    break;
                }
            }
        }
        self.pending = pending;
        self.pending.drain(..pos);
        self.scan = scan - pos;
        if self.pending.len() > self.cap {
            // An event larger than the whole record budget: drop it.
            self.pending.clear();
            self.scan = 0;
            self.truncated = true;
        }
    }

    fn sse_event(&mut self, event: &[u8]) {
        let Some(data) = sse::parse_event(event).data else {
            return;
        };
        if data.trim() == "[DONE]" {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            return;
        };
        self.take_usage(&v);
        // OpenAI chat and completions chunks.
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for (i, c) in choices.iter().enumerate() {
                let idx = c.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
                if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                    self.push(idx, t);
                }
                if let Some(calls) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
                    for call in calls {
                        if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str)
                        {
                            self.push(idx, a);
                        }
                    }
                }
                if let Some(t) = c.get("text").and_then(Value::as_str) {
                    self.push(idx, t);
                }
            }
        }
        // Anthropic content block deltas.
        if v.get("type").and_then(Value::as_str) == Some("content_block_delta") {
            let idx = v.get("index").and_then(Value::as_u64).unwrap_or(0);
            for key in ["/delta/text", "/delta/partial_json"] {
                if let Some(t) = v.pointer(key).and_then(Value::as_str) {
                    self.push(idx, t);
                }
            }
        }
        // Gemini stream chunks.
        if let Some(cands) = v.get("candidates").and_then(Value::as_array) {
            for (i, c) in cands.iter().enumerate() {
                if let Some(parts) = c.pointer("/content/parts").and_then(Value::as_array) {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            self.push(i as u64, t);
                        }
                    }
                }
            }
        }
    }

    fn take_usage(&mut self, v: &Value) {
        for key in ["/usage", "/usageMetadata", "/message/usage"] {
            if let Some(u) = v.pointer(key).filter(|u| u.is_object()) {
                match &mut self.usage {
                    // Anthropic reports input tokens first, output tokens at the end.
                    Some(Value::Object(prev)) => {
                        if let Value::Object(new) = u {
                            for (k, val) in new {
                                prev.insert(k.clone(), val.clone());
                            }
                        }
                    }
                    _ => self.usage = Some(u.clone()),
                }
            }
        }
    }

    fn push(&mut self, idx: u64, text: &str) {
        let used: usize = self.parts.iter().map(|(_, t)| t.len()).sum();
        let room = self.cap.saturating_sub(used);
        let mut take = text.len().min(room);
        while take < text.len() && !text.is_char_boundary(take) {
            take -= 1;
        }
        if take < text.len() {
            self.truncated = true;
        }
        let piece = &text[..take];
        match self.parts.iter_mut().find(|(i, _)| *i == idx) {
            Some((_, t)) => t.push_str(piece),
            None => self.parts.push((idx, piece.to_string())),
        }
    }

    /// The response part of the record.
    pub fn finish(
        mut self,
        status: u16,
        ttfb_ms: Option<u64>,
        total_ms: Option<u64>,
        completion: &str,
    ) -> RecordResponse {
        if self.sse && !self.pending.is_empty() {
            // The unterminated last event, completed as the masker does.
            let mut rest = std::mem::take(&mut self.pending);
            rest.extend_from_slice(b"\n\n");
            let mut pos = 0;
            while let Ok(end) = sse::event_end(&rest, pos, true) {
                self.sse_event(rest.get(pos..end).unwrap_or_default());
                pos = end;
            }
        }
        let body = if self.sse {
            self.parts.sort_by_key(|(i, _)| *i);
            self.parts
                .into_iter()
                .map(|(_, t)| t)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.raw) {
                self.take_usage(&v);
            }
            String::from_utf8_lossy(&self.raw).into_owned()
        };
        RecordResponse {
            status,
            body,
            truncated: self.truncated,
            usage: self.usage,
            ttfb_ms,
            total_ms,
            blocked_by: None,
            hits: Vec::new(),
            completion: completion.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const OPENAI_STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn stream_reassembled_at_any_split() {
        let bytes = OPENAI_STREAM.as_bytes();
        for split in 0..bytes.len() {
            let mut r = ResponseRecorder::new(
                Some("text/event-stream; charset=utf-8"),
                MAX_RECORDED_RESPONSE,
            );
            r.feed(&bytes[..split]);
            r.feed(&bytes[split..]);
            let out = r.finish(200, Some(1), Some(2), "complete");
            assert_eq!(out.body, "Hello é", "split at {split}");
            assert_eq!(out.usage.as_ref().unwrap()["completion_tokens"], 2);
        }
    }

    #[test]
    fn anthropic_usage_is_merged() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4}}\n\n",
        );
        let mut r = ResponseRecorder::new(Some("text/event-stream"), MAX_RECORDED_RESPONSE);
        r.feed(s.as_bytes());
        let out = r.finish(200, None, None, "complete");
        assert_eq!(out.body, "Hi");
        assert_eq!(
            out.usage.unwrap(),
            serde_json::json!({"input_tokens": 7, "output_tokens": 4})
        );
    }

    #[test]
    fn plain_json_and_truncation() {
        let mut r = ResponseRecorder::new(Some("application/json"), MAX_RECORDED_RESPONSE);
        r.feed(br#"{"choices":[],"usage":{"total_tokens":9}}"#);
        assert_eq!(
            r.finish(200, None, None, "complete").usage.unwrap()["total_tokens"],
            9
        );
        let mut r = ResponseRecorder::new(None, 4);
        r.feed(b"abcdef");
        let out = r.finish(200, None, None, "complete");
        assert!(out.truncated);
        assert_eq!(out.body, "abcd");
    }
}
