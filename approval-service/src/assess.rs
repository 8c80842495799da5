//! The calls to the `[[assessors]]`: each is asked about a new review
//! concurrently with the others, within its own timeout, through the
//! service's one outbound HTTP client ([`crate::outbound`]). The request
//! bodies and the strict reading of the answers are the domain's
//! ([`crate::assessment`]); here is only HTTP. Whatever goes wrong (no
//! connection, an error status, a timeout, an answer too large or not in
//! the documented format) comes back as a failed [`Assessment`], never as
//! "nothing found".

use std::time::Instant;

use crate::assessment::{parse_answer, request_body, Assessment};
use crate::config::AssessorConfig;

/// Largest answer read from an assessor.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Asks every assessor about `text` at once; one assessment each, in
/// configuration order.
pub async fn assess_all(
    client: Option<&reqwest::Client>,
    assessors: &[&AssessorConfig],
    text: &str,
) -> Vec<Assessment> {
    futures_util::future::join_all(assessors.iter().map(|a| assess_one(client, a, text))).await
}

async fn assess_one(
    client: Option<&reqwest::Client>,
    a: &AssessorConfig,
    text: &str,
) -> Assessment {
    let started = Instant::now();
    let took = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let Some(client) = client else {
        return Assessment::failed(a, "the service has no outbound HTTP client", 0);
    };
    let chars = text.chars().count();
    if chars > a.max_prompt_chars {
        // Not sent: the assessor would judge part of it (a guard model
        // drops what exceeds its context without saying so).
        return Assessment::failed(
            a,
            format!(
                "the prompt has {chars} characters, more than this assessor's max_prompt_chars ({}): not assessed",
                a.max_prompt_chars
            ),
            0,
        );
    }
    let answer = tokio::time::timeout(a.timeout, call(client, a, text)).await;
    let result = match answer {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", a.timeout.as_millis())),
    };
    match result {
        Ok((flagged, labels)) => Assessment::answered(a, flagged, labels, took()),
        Err(error) => {
            tracing::warn!(assessor = %a.name, kind = a.kind.as_str(), error = %error,
                "assessor gave no usable answer; the review waits for people");
            Assessment::failed(a, error, took())
        }
    }
}

async fn call(
    client: &reqwest::Client,
    a: &AssessorConfig,
    text: &str,
) -> Result<(bool, Vec<crate::assessment::Label>), String> {
    let body = serde_json::to_vec(&request_body(a, text))
        .map_err(|e| format!("cannot write the request: {e}"))?;
    let mut request = client
        .post(&a.url)
        .timeout(a.timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(key) = &a.api_key {
        request = request.bearer_auth(&key.0);
    }
    let unreachable = |e: reqwest::Error| {
        if e.is_timeout() {
            format!("no answer within {} ms", a.timeout.as_millis())
        } else {
            crate::outbound::describe(&e.without_url())
        }
    };
    let mut response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("answered HTTP {}", status.as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("answer larger than {MAX_ANSWER_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    parse_answer(a.kind, &body)
}
