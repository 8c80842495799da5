//! What the Slack app keeps in the database: the message posted for each
//! review (so any replica can update it when the review is decided), and
//! the signatures of the interactivity requests already taken (so a
//! replayed request is refused on every replica). The Slack calls and the
//! signature check are in the HTTP crate's `slack` module.

use crate::db::DbResult;
use crate::params;
use crate::store::Store;
use crate::token::TokenHash;

/// How long a request's signature is remembered: past this its timestamp
/// is refused as stale anyway (5 minutes), with a margin for clock steps.
pub const SEEN_REQUEST_KEEP_MS: u64 = 15 * 60 * 1000;

/// Where a review's Slack message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackMessage {
    /// Channel id.
    pub channel: String,
    /// The message's timestamp, its id within the channel.
    pub ts: String,
}

impl Store {
    /// The Slack message of review `id`, if one was posted.
    pub fn slack_message(&self, id: &str) -> DbResult<Option<SlackMessage>> {
        let row = self.conn().query_opt(
            "SELECT channel, ts FROM slack_messages WHERE review_id = ?1",
            params![id],
        )?;
        row.map(|r| {
            Ok(SlackMessage {
                channel: r.get(0)?,
                ts: r.get(1)?,
            })
        })
        .transpose()
    }

    /// Stores where review `id`'s message was posted (the first one stays).
    pub fn set_slack_message(&self, id: &str, message: &SlackMessage) -> DbResult<()> {
        self.conn().execute(
            "INSERT INTO slack_messages (review_id, channel, ts) VALUES (?1, ?2, ?3)
             ON CONFLICT (review_id) DO NOTHING",
            params![id, &message.channel, &message.ts],
        )?;
        Ok(())
    }

    /// Remembers an interactivity request by its signature; false when it
    /// was taken before (a replay). Forgets signatures older than
    /// [`SEEN_REQUEST_KEEP_MS`].
    pub fn first_slack_request(&self, signature: &str, now_ms: u64) -> DbResult<bool> {
        let mut conn = self.conn();
        conn.execute(
            "DELETE FROM slack_requests_seen WHERE seen_at_ms < ?1",
            params![now_ms.saturating_sub(SEEN_REQUEST_KEEP_MS)],
        )?;
        let hash = TokenHash::of_token(signature).to_hex();
        let inserted = conn.execute(
            "INSERT INTO slack_requests_seen (signature_sha256, seen_at_ms) VALUES (?1, ?2)
             ON CONFLICT (signature_sha256) DO NOTHING",
            params![&hash, now_ms],
        )?;
        Ok(inserted == 1)
    }
}
