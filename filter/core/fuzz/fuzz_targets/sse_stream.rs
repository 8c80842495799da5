#![no_main]
//! `mask::StreamMasker` on server-sent events: arbitrary bytes split at arbitrary points never
//! panic; a valid stream built from arbitrary text, split arbitrarily,
//! yields only events whose JSON data parses, and (for a text no longer than
//! the window) the same text as the whole text sent in one event.
use libfuzzer_sys::fuzz_target;

include!("common.rs");

/// Splits `bytes` into chunks with a small xorshift generator.
fn split(bytes: &[u8], mut seed: u32) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let n = 1 + (seed as usize % 17);
        let end = (i + n).min(bytes.len());
        out.push(&bytes[i..end]);
        i = end;
    }
    out
}

fn run(api: ApiKind, stream: &[u8], seed: u32) -> Vec<u8> {
    let guard = countersign_core::mask::ResponseGuard::new(Some(policy()), Default::default(), rules());
    let mut m = countersign_core::mask::StreamMasker::new(api, guard, countersign_core::framing::Framing::Sse);
    let mut out = Vec::new();
    for c in split(stream, seed | 1) {
        out.extend(m.push(c));
    }
    out.extend(m.finish());
    let _ = m.report();
    out
}

fn check_events(out: &[u8]) {
    let text = String::from_utf8(out.to_vec()).expect("output of a valid stream is UTF-8").replace("\r\n", "\n");
    for block in text.split("\n\n") {
        let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).collect();
        if data.is_empty() || data == ["[DONE]"] {
            continue;
        }
        serde_json::from_str::<serde_json::Value>(&data.join("\n")).expect("event data must parse");
    }
}

/// The answer text a client assembles from `out`, `None` when the stream
/// ended with an error event.
fn text_of(api: ApiKind, out: &[u8]) -> Option<String> {
    let mut text = String::new();
    for block in String::from_utf8_lossy(out).replace("\r\n", "\n").split("\n\n") {
        let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        if v.get("error").is_some() || v["type"] == "error" {
            return None;
        }
        let piece = match api {
            ApiKind::AnthropicMessages => &v["delta"]["text"],
            ApiKind::GeminiGenerateContent => &v["candidates"][0]["content"]["parts"][0]["text"],
            ApiKind::OpenaiResponses => &v["delta"],
            ApiKind::OpenaiCompletions => &v["choices"][0]["text"],
            _ => &v["choices"][0]["delta"]["content"],
        };
        text.push_str(piece.as_str().unwrap_or(""));
    }
    Some(text)
}

/// A stream of `api` carrying `pieces`, one event each.
fn stream_of(api: ApiKind, pieces: &[String]) -> String {
    let mut stream = String::new();
    for t in pieces {
        let event = match api {
            ApiKind::AnthropicMessages => format!(
                "event: content_block_delta\ndata: {}\n\n",
                serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":t}})
            ),
            ApiKind::GeminiGenerateContent => {
                format!("data: {}\r\n\r\n", serde_json::json!({"candidates":[{"content":{"parts":[{"text":t}]},"index":0}]}))
            }
            ApiKind::OpenaiResponses => format!(
                "event: response.output_text.delta\ndata: {}\n\n",
                serde_json::json!({"type":"response.output_text.delta","output_index":0,"content_index":0,"delta":t})
            ),
            ApiKind::OpenaiCompletions => format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"text":t}]})),
            _ => format!("data: {}\n\n", serde_json::json!({"choices":[{"index":0,"delta":{"content":t}}]})),
        };
        stream.push_str(&event);
    }
    stream.push_str("data: [DONE]\n\n");
    stream
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let api = api(data[0]);
    let seed = u32::from(data[1]) << 8 | u32::from(data[2]);
    let rest = &data[3..];
    // Arbitrary bytes: no panic.
    let _ = run(api, rest, seed);
    // A valid stream carrying arbitrary text.
    let text = String::from_utf8_lossy(rest);
    let chars: Vec<char> = text.chars().collect();
    let pieces: Vec<String> = chars.chunks(1 + usize::from(data[1] % 7)).map(|p| p.iter().collect()).collect();
    let out = run(api, stream_of(api, &pieces).as_bytes(), seed);
    check_events(&out);
    // Within the window (128 characters here) nothing is released early by
    // force: any pieces give what the whole text in one event gives.
    if api != ApiKind::OpenaiEmbeddings && chars.len() <= 128 {
        let whole = run(api, stream_of(api, &[text.to_string()]).as_bytes(), seed);
        if let (Some(split), Some(one)) = (text_of(api, &out), text_of(api, &whole)) {
            assert_eq!(split, one, "pieces of {pieces:?}");
        }
    }
});
