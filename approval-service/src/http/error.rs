//! The one error type of every HTTP handler, and the one place where the
//! domain's errors become HTTP answers.
//!
//! Responses always carry [`countersign_core::wire::ServiceError`] so the
//! filter and the reviewer UI parse a single shape. Internal failures are
//! logged with their details and answered with a fixed message, so database
//! paths or SQL never reach a client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_core::wire::{ServiceError, ServiceErrorDetail};

use crate::approvals::DecisionRefused;
use crate::records::RecordError;
use crate::state::StorageError;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `bad_request`: the request is malformed; the message says how.
    BadRequest(String),
    /// 401 `unauthorized`: missing or wrong credentials.
    Unauthorized(String),
    /// 403 `forbidden`: authenticated but not allowed.
    Forbidden(String),
    /// 404 `not_found`.
    NotFound(String),
    /// 409 `conflict`: the review is no longer pending; the message says why.
    Conflict(String),
    /// 413 `payload_too_large`: the request body exceeds the limit.
    PayloadTooLarge(String),
    /// 500 `internal`: the detail is logged, never sent.
    Internal(String),
    /// A refusal with its own stable code, e.g. 403 `self_approval`,
    /// 403 `not_in_approver_group`, 409 `already_approved`.
    Coded {
        /// HTTP status.
        status: StatusCode,
        /// Stable machine-readable code.
        code: &'static str,
        /// Human-readable message.
        message: String,
    },
}

impl ApiError {
    /// A 500 whose `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(detail.to_string())
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Coded { status, .. } => *status,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Internal(_) => "internal",
            ApiError::Coded { code, .. } => code,
        }
    }

    /// The message sent to the client.
    pub fn public_message(&self) -> &str {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::Coded { message: m, .. } => m,
            ApiError::Internal(_) => "internal error",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Internal(detail) => write!(f, "internal: {detail}"),
            other => write!(f, "{}: {}", other.code(), other.public_message()),
        }
    }
}

impl std::error::Error for ApiError {}

/// A database call that failed: 500, the detail logged.
impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        ApiError::internal(e)
    }
}

/// A reviewer who may not take a decision: 403 (not theirs to take), 409
/// (they already approved) or 400 (an edit the filter would refuse, the
/// status of every invalid input), with the refusal's stable code.
impl From<DecisionRefused> for ApiError {
    fn from(refused: DecisionRefused) -> Self {
        let status = match refused {
            DecisionRefused::InvalidEdit(_) => StatusCode::BAD_REQUEST,
            DecisionRefused::SelfApproval
            | DecisionRefused::NotInApproverGroup(_)
            | DecisionRefused::AssessorNotAPerson => StatusCode::FORBIDDEN,
            DecisionRefused::AlreadyApproved
            | DecisionRefused::StandingTerms(_)
            | DecisionRefused::EditNotShown => StatusCode::CONFLICT,
        };
        ApiError::Coded {
            status,
            code: refused.code(),
            message: refused.to_string(),
        }
    }
}

/// A record write that was refused (400, 404, 409), or that the database
/// could not take: 503 `unavailable`, so the filter refuses the request
/// rather than forward it without a record.
impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::BadRequest(m) => ApiError::BadRequest(m),
            RecordError::NotFound => ApiError::NotFound("no such record".into()),
            RecordError::Conflict(m) => ApiError::Conflict(m),
            RecordError::Db(e) => {
                tracing::error!(error = %e, "record write failed");
                ApiError::Coded {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "unavailable",
                    message: "the record could not be stored".into(),
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let body = ServiceError {
            error: ServiceErrorDetail {
                code: self.code().to_string(),
                message: self.public_message().to_string(),
            },
        };
        let mut resp = (self.status(), Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
