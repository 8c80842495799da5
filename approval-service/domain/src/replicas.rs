//! Several replicas on one PostgreSQL database: review changes made on one
//! replica reach the long polls and live feeds of the others at once.
//!
//! Every change a replica announces locally (a review created, an approval
//! that still needs more, a decision, an expiry, a cancellation) is also
//! sent as `NOTIFY countersign_reviews, '<json>'` after its transaction
//! committed. Each replica keeps one extra connection that `LISTEN`s on
//! that channel, on a thread of its own, and turns every notification from
//! another replica into the same local wake-up and live-feed event.
//!
//! A notification can be missed only while the listening connection is
//! down; after it reconnects the replica wakes every local long poll, which
//! re-reads its review from the database, so no decision is lost (it is in
//! the database; the notification only saves the wait).

use std::time::Duration;

use countersign_core::wire::ReviewStatus;
use postgres::fallible_iterator::FallibleIterator;
use serde::{Deserialize, Serialize};

use crate::db::Conn;

/// The `NOTIFY` channel.
pub const CHANNEL: &str = "countersign_reviews";

/// How often the listener checks whether the service is shutting down.
const POLL: Duration = Duration::from_millis(500);

/// Wait before reconnecting a lost listening connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How often an idle listening connection is checked with a query: a
/// connection can die without closing (a failover behind a virtual IP),
/// and waiting only for notifications would never notice.
const PING_EVERY: Duration = Duration::from_secs(5);

/// One review change, as sent between replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The replica that made the change (it ignores its own notifications).
    pub origin: String,
    /// The live-feed event kind (`created`, `approval`, `decided`, ...).
    pub kind: String,
    /// Review id.
    pub id: String,
    /// Status after the change.
    pub status: ReviewStatus,
    /// For `created`: the filter worker that watches the review
    /// (`POST /v1/watch`). Every replica remembers it, so a decision through
    /// any of them reaches the worker's watch wherever it waits, even one
    /// that began before the worker learnt of the review (and so could not
    /// list it in its `check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watcher: Option<String>,
}

/// What the listener thread asks of the service it belongs to.
pub trait Replica: Send + 'static {
    /// Applies a change made by another replica. Returns `false` once the
    /// service is gone (the thread then ends).
    fn apply(&self, change: Change) -> bool;
    /// Wakes every local long poll (after the listener reconnected).
    /// Returns `false` once the service is gone.
    fn wake_all(&self) -> bool;
    /// Whether the service still runs.
    fn alive(&self) -> bool;
    /// This replica's id.
    fn origin(&self) -> &str;
}

/// How long start-up waits for the listener's first `LISTEN`.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Starts the listening thread for `url` and waits (briefly) until it
/// listens, so a replica that reports ready also hears the others.
pub fn spawn_listener<R: Replica>(url: String, replica: R) -> std::io::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("countersign-listen".into())
        .spawn(move || listen_loop(&url, &replica, ready_tx))?;
    if ready_rx.recv_timeout(READY_WAIT).is_err() {
        tracing::warn!("not yet listening for other replicas' changes; retrying in the background");
    }
    Ok(())
}

fn listen_loop<R: Replica>(url: &str, replica: &R, ready: std::sync::mpsc::Sender<()>) {
    let mut first = true;
    while replica.alive() {
        let mut conn = match Conn::connect_postgres(url, RECONNECT_DELAY).and_then(|mut c| {
            c.batch(&format!("LISTEN {CHANNEL}"))?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' changes; retrying");
                std::thread::sleep(RECONNECT_DELAY);
                continue;
            }
        };
        if !first {
            tracing::info!("listening for other replicas' changes again");
            // Changes made while we were not listening: let every long poll
            // re-read its review.
            if !replica.wake_all() {
                return;
            }
        }
        first = false;
        let _ = ready.send(());
        let Some(client) = conn.postgres_client() else {
            return;
        };
        let mut last_ping = std::time::Instant::now();
        loop {
            if !replica.alive() {
                return;
            }
            let next = {
                let mut batch = client.notifications();
                let mut iter = batch.timeout_iter(POLL);
                loop {
                    match iter.next() {
                        Ok(Some(n)) => {
                            let Ok(change) = serde_json::from_str::<Change>(n.payload()) else {
                                tracing::warn!(
                                    payload = n.payload(),
                                    "ignored malformed notification"
                                );
                                continue;
                            };
                            if change.origin != replica.origin() && !replica.apply(change) {
                                return;
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
            };
            if let Err(e) = next {
                tracing::warn!(error = %e, "lost the connection that listens for other replicas");
                break;
            }
            if client.is_closed() {
                tracing::warn!("lost the connection that listens for other replicas");
                break;
            }
            if last_ping.elapsed() >= PING_EVERY {
                last_ping = std::time::Instant::now();
                if let Err(e) = client.batch_execute("SELECT 1") {
                    tracing::warn!(error = %e, "the connection that listens for other replicas stopped answering");
                    break;
                }
            }
        }
        std::thread::sleep(RECONNECT_DELAY);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn change_round_trips_as_json() {
        let c = Change {
            origin: "r1".into(),
            kind: "decided".into(),
            id: "rev_1".into(),
            status: ReviewStatus::Approved,
            watcher: Some("0123456789abcdef0123456789abcdef".into()),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&text).unwrap(), c);
        // NOTIFY payloads must stay under 8000 bytes; ours are tiny.
        assert!(text.len() < 200, "{text}");
    }
}
