//! `POST /slack/interactivity`: the Slack app's button clicks and modal
//! submissions. Each request must carry Slack's signature over its exact
//! body, sent within five minutes, and be the first with that signature
//! (a replay is refused); then the Slack user must be a reviewer (by
//! `reviewers[].slack_user_id`), and the decision goes through
//! [`crate::http::reviews::decide`], the function of the reviewer API, so
//! separation of duties, approver groups, quorum, expiry and the one
//! winner of a race apply as there.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use countersign_core::wire::ReviewStatus;
use serde::Deserialize;
use serde_json::json;

use super::message::{
    self, APPROVE_ACTION, FORMER_APPROVE_ACTION, REASON_INPUT, REJECT_ACTION, REJECT_CALLBACK,
};
use super::signature;
use super::SlackApi;
use crate::approvals::Approver;
use crate::config::ReviewerConfig;
use crate::http::error::ApiError;
use crate::http::reviews::{decide, rejection_reason};
use crate::state::AppState;

/// Largest interactivity body taken (Slack's payloads are a few KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The HTTP client for Slack calls made while answering (views.open,
/// chat.postEphemeral); `None` when it could not be set up.
#[derive(Clone)]
pub struct OutboundClient(pub Option<reqwest::Client>);

#[derive(Deserialize)]
struct Form {
    payload: String,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: Id,
    #[serde(default)]
    team: Option<Id>,
    #[serde(default)]
    channel: Option<Id>,
    #[serde(default)]
    trigger_id: Option<String>,
    #[serde(default)]
    actions: Vec<Action>,
    #[serde(default)]
    view: Option<View>,
}

#[derive(Deserialize)]
struct Id {
    id: String,
}

#[derive(Deserialize)]
struct Action {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct View {
    #[serde(default)]
    callback_id: String,
    #[serde(default)]
    private_metadata: String,
    #[serde(default)]
    state: ViewState,
}

#[derive(Deserialize, Default)]
struct ViewState {
    #[serde(default)]
    values: HashMap<String, HashMap<String, InputValue>>,
}

#[derive(Deserialize)]
struct InputValue {
    #[serde(default)]
    value: Option<String>,
}

/// `POST /slack/interactivity`.
pub async fn interactivity(
    State(state): State<AppState>,
    Extension(OutboundClient(client)): Extension<OutboundClient>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match handle(state, client, &headers, &body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    state: AppState,
    client: Option<reqwest::Client>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let Some(config) = state.config().slack.clone() else {
        return Err(ApiError::NotFound("the Slack app is not configured".into()));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now_ms = crate::now_ms();
    let signed = header("x-slack-signature");
    if let Err(refused) = signature::verify(
        config.signing_secret.0.as_bytes(),
        header("x-slack-request-timestamp"),
        signed,
        body,
        now_ms / 1000,
    ) {
        tracing::warn!(refused = %refused, "Slack request refused");
        return Err(ApiError::Unauthorized(refused.to_string()));
    }
    let signed = signed.unwrap_or_default().trim().to_string();
    if !state
        .db(move |s| s.first_slack_request(&signed, now_ms))
        .await?
    {
        tracing::warn!("Slack request refused: replayed");
        return Err(ApiError::Unauthorized(
            "this Slack request was already taken (replayed)".into(),
        ));
    }
    let form: Form = serde_urlencoded::from_bytes(body)
        .map_err(|_| ApiError::BadRequest("expected a form with a payload field".into()))?;
    let payload: Payload = serde_json::from_str(&form.payload)
        .map_err(|e| ApiError::BadRequest(format!("unreadable Slack payload: {e}")))?;
    if let Some(want) = &config.team_id {
        if payload.team.as_ref().map(|t| &t.id) != Some(want) {
            return Err(ApiError::Forbidden(
                "this Slack workspace is not ours".into(),
            ));
        }
    }
    let slack = client.map(|c| SlackApi::new(c, config));
    // The reviewers in force (reloaded on SIGHUP), not the start-up set.
    let reviewer = state
        .reviewers()
        .iter()
        .find(|r| r.slack_user_id.as_deref() == Some(payload.user.id.as_str()))
        .cloned();
    match payload.kind.as_str() {
        "block_actions" => Ok(block_actions(state, slack, reviewer, payload).await),
        "view_submission" => Ok(view_submission(state, reviewer, payload).await),
        _ => Ok(StatusCode::OK.into_response()),
    }
}

const NOT_A_REVIEWER: &str =
    "You are not a countersign reviewer: no reviewer has your Slack user id (slack_user_id).";

/// A click on a button of a review message.
async fn block_actions(
    state: AppState,
    slack: Option<SlackApi>,
    reviewer: Option<ReviewerConfig>,
    payload: Payload,
) -> Response {
    let Some(action) = payload.actions.first() else {
        return StatusCode::OK.into_response();
    };
    let review_id = action.value.clone().unwrap_or_default();
    let user = payload.user.id.clone();
    let channel = payload.channel.as_ref().map(|c| c.id.clone());
    // Tells the clicking user alone, in a task: Slack wants its answer
    // within 3 seconds.
    let tell = |text: String| {
        if let (Some(slack), Some(channel)) = (slack.clone(), channel.clone()) {
            let user = user.clone();
            tokio::spawn(async move {
                if let Err(e) = slack.post_ephemeral(&channel, &user, &text).await {
                    tracing::warn!(error = %e, "cannot tell a Slack user why their click did nothing");
                }
            });
        }
    };
    let is_ours =
        [APPROVE_ACTION, FORMER_APPROVE_ACTION, REJECT_ACTION].contains(&action.action_id.as_str());
    if !is_ours {
        return StatusCode::OK.into_response();
    }
    let Some(reviewer) = reviewer else {
        tracing::info!(review_id = %review_id, slack_user = %user, "Slack click by a user who is no reviewer");
        tell(NOT_A_REVIEWER.to_string());
        return StatusCode::OK.into_response();
    };
    if action.action_id == FORMER_APPROVE_ACTION {
        // A message posted before messages showed the whole prompt: its
        // reviewer saw only the start of the last user message.
        tracing::info!(review_id = %review_id, slack_user = %user,
            "Slack approval refused: the button is of a message that did not show the whole prompt");
        tell(message::FORMER_MESSAGE.to_string());
        return StatusCode::OK.into_response();
    }
    if action.action_id == APPROVE_ACTION {
        // A person approves only what the message showed them: the
        // prompt's every message, whole and as sent (`why_not_approvable`,
        // by which the message offers the button), checked again against
        // the review as it is now. A review that cannot be read approves
        // nothing: fail closed.
        let lookup = review_id.clone();
        let review = state.db(move |s| s.detail(&lookup)).await.ok().flatten();
        let Some(review) = review else {
            tracing::warn!(review_id = %review_id, slack_user = %user,
                "Slack approval refused: the review could not be read");
            tell("Not approved: the review could not be read; try again or open it.".to_string());
            return StatusCode::OK.into_response();
        };
        if let Some(why) = message::why_not_approvable(&review) {
            tracing::info!(review_id = %review_id, slack_user = %user, why,
                "Slack approval refused: the message does not show what would be approved");
            tell(why.to_string());
            return StatusCode::OK.into_response();
        }
        match decide(
            state,
            review_id,
            Approver::from(&reviewer),
            ReviewStatus::Approved,
            None,
            None,
            // The message shows the prompt as sent, never an edit.
            Some(0),
        )
        .await
        {
            Ok(_) => {}
            Err(e) => tell(format!("Not approved: {}", e.public_message())),
        }
        return StatusCode::OK.into_response();
    }
    match (slack.clone(), payload.trigger_id.clone()) {
        (Some(slack), Some(trigger)) => {
            tokio::spawn(async move {
                if let Err(e) = slack
                    .open_view(&trigger, message::reject_modal(&review_id))
                    .await
                {
                    tracing::warn!(error = %e, "cannot open the Slack rejection modal");
                }
            });
        }
        _ => tell("Cannot open the rejection form; reject in the web UI.".into()),
    }
    StatusCode::OK.into_response()
}

/// The rejection modal, submitted.
async fn view_submission(
    state: AppState,
    reviewer: Option<ReviewerConfig>,
    payload: Payload,
) -> Response {
    let Some(view) = payload.view.filter(|v| v.callback_id == REJECT_CALLBACK) else {
        return StatusCode::OK.into_response();
    };
    // Errors show under the reason field, and the modal stays open.
    let refuse = |text: &str| {
        Json(json!({"response_action": "errors", "errors": {REASON_INPUT: text}})).into_response()
    };
    let Some(reviewer) = reviewer else {
        return refuse(NOT_A_REVIEWER);
    };
    let reason = view
        .state
        .values
        .get(REASON_INPUT)
        .and_then(|block| block.get(REASON_INPUT))
        .and_then(|input| input.value.clone());
    let reason = match rejection_reason(reason) {
        Ok(r) => r,
        Err(e) => return refuse(e.public_message()),
    };
    match decide(
        state,
        view.private_metadata,
        Approver::from(&reviewer),
        ReviewStatus::Rejected,
        Some(reason),
        None,
        None,
    )
    .await
    {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => refuse(e.public_message()),
    }
}
