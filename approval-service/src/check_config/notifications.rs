//! What a service configuration's notifications (webhooks, the Slack app)
//! leave open: unsigned webhooks, a Slack app nobody can decide from, and
//! links and an interactivity URL without a public address.

use std::path::Path;

use countersign_approval::Config as ServiceConfig;

use super::Checker;

impl Checker {
    /// Warns about `config`'s webhooks and Slack app; `at` says where the
    /// configuration was found.
    pub(super) fn notification_warnings(&mut self, file: &Path, config: &ServiceConfig, at: &str) {
        for (i, hook) in config.webhooks.iter().enumerate() {
            if hook.secret.is_none() {
                self.report.warning(
                    file,
                    format!("webhooks[{i}] has no secret: its receiver cannot tell our calls from forgeries{at}"),
                );
            }
        }
        let Some(slack) = &config.slack else { return };
        if !config.reviewers.iter().any(|r| r.slack_user_id.is_some()) {
            self.report.warning(
                file,
                format!("[slack] is set but no reviewer has a slack_user_id: nobody can decide from Slack{at}"),
            );
        }
        if config.public_url.is_none() {
            self.report.warning(
                file,
                format!(
                    "[slack] without public_url: the Open links point at http://{}, and Slack must reach /slack/interactivity at a public https:// address{at}",
                    config.listen
                ),
            );
        }
        if slack.team_id.is_none() {
            self.report.note(
                file,
                format!("[slack] has no team_id: a click signed with the app's secret is taken from any workspace{at}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::testing::{check_texts, messages};
    use super::super::Level;

    #[test]
    fn unsigned_webhooks_and_an_undecidable_slack_app_are_warned_of() {
        let r = check_texts(&[(
            "s.toml",
            "[[webhooks]]\nurl = \"https://hooks.example/x\"\n\
             [slack]\nchannel = \"C1\"\nbot_token_env = \"PATH\"\nsigning_secret_env = \"PATH\"\n",
        )]);
        let warnings = messages(&r, Level::Warning).join("\n");
        assert!(warnings.contains("webhooks[0] has no secret"), "{warnings}");
        assert!(
            warnings.contains("no reviewer has a slack_user_id"),
            "{warnings}"
        );
        assert!(
            warnings.contains("[slack] without public_url"),
            "{warnings}"
        );
        let r = check_texts(&[(
            "s.toml",
            "public_url = \"https://cs.example\"\n\
             [[webhooks]]\nurl = \"https://hooks.example/x\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
        )]);
        let warnings = messages(&r, Level::Warning).join("\n");
        assert!(!warnings.contains("webhooks[0]"), "{warnings}");
    }
}
