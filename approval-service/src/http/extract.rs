//! Request bodies and query strings, read with the service's own errors
//! (axum's `Json` and `Query` would answer in plain text). The filter API's
//! POSTs must say `application/json` (`http::json_only`, a guard against
//! cross-site forms); the reviewers' API reads JSON whatever it is labelled.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body (its content type is checked where it matters,
/// see the module). A blank body reads as `{}`,
/// so a call whose fields are all optional (an approval without a reason)
/// needs no body.
pub struct JsonBody<T>(pub T);

/// A JSON request body that must not be blank (a
/// session record is never empty).
pub struct StrictJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(Bytes::from_request(req, state).await)?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        json_from_slice(text).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for StrictJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read_body(Bytes::from_request(req, state).await)?;
        json_from_slice(&bytes).map(StrictJsonBody)
    }
}

/// The request body, or our error for one too large or unreadable.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("request body too large".into())
        } else {
            ApiError::BadRequest("cannot read request body".into())
        }
    })
}

/// Deserialises JSON text, answering 400 with serde's message.
fn json_from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// The query string, deserialised into `T` (unknown parameters are
/// ignored).
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(params)) => Ok(QueryParams(params)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "invalid query string: {}",
                e.body_text()
            ))),
        }
    }
}

/// Longest accepted text filter of a query string, in characters.
const MAX_FILTER_CHARS: usize = 500;

/// Cleans the text filters of a query string in place, in order: each is
/// trimmed, a blank one counts as absent, and one longer than
/// `MAX_FILTER_CHARS` is refused, naming its parameter.
pub fn clean_text_filters<'a>(
    filters: impl IntoIterator<Item = (&'static str, &'a mut Option<String>)>,
) -> Result<(), ApiError> {
    for (name, value) in filters {
        *value = match value.take() {
            Some(t) if t.chars().count() > MAX_FILTER_CHARS => {
                return Err(ApiError::BadRequest(format!(
                    "{name} is longer than {MAX_FILTER_CHARS} characters"
                )))
            }
            Some(t) if t.trim().is_empty() => None,
            Some(t) => Some(t.trim().to_string()),
            None => None,
        };
    }
    Ok(())
}
