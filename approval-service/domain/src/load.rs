//! Reviewer load over a period, read from the reviews table: what the
//! reviewer UI's *Load* page plots (`GET /api/stats/load`).
//!
//! One query reads, for each review alive in the period (created before its
//! end, and pending or decided after its start), its creation, decision,
//! status, decider and rule and caller; everything else is counted here,
//! the same on SQLite and PostgreSQL (neither dialect's percentile or time
//! functions are needed). The period is cut into buckets of `bucket_ms`,
//! aligned to multiples of it since the Unix epoch (hours and days in UTC).
//!
//! - decisions per bucket by who took them: people, or automatically (an
//!   assessor or a standing approval, see [`Decider`]), expiries, and
//!   reviews the caller ended (went away, or abandoned);
//! - time to decision (creation to decision) of people's decisions per
//!   bucket, and of people's and automatic decisions over the period, as
//!   nearest-rank percentiles (p50, p90, p99);
//! - the queue: reviews pending at the end of each bucket;
//! - the rules and callers that sent most work to people: reviews created
//!   in the period that no assessor or standing approval decided.

use std::collections::HashMap;

use serde::Serialize;

use crate::db::DbResult;
use crate::metrics::Decider;
use crate::params;
use crate::store::{parse_status, Store};

/// Shortest bucket: one minute.
pub const MIN_BUCKET_MS: u64 = 60_000;
/// Most buckets in one answer.
pub const MAX_BUCKETS: u64 = 1000;
/// How many rules and callers are ranked.
pub const TOP_N: usize = 10;

/// A checked period: `[since_ms, until_ms)` cut into buckets of `bucket_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadQuery {
    since_ms: u64,
    until_ms: u64,
    bucket_ms: u64,
}

/// A period that cannot be read, naming the query field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadQueryError {
    /// `since_ms`, `until_ms` or `bucket_ms`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for LoadQueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for LoadQueryError {}

impl LoadQuery {
    /// The period from `since_ms` (moved back to the start of its bucket)
    /// to `until_ms`, in buckets of `bucket_ms` (at least
    /// [`MIN_BUCKET_MS`], at most [`MAX_BUCKETS`] of them).
    pub fn new(since_ms: u64, until_ms: u64, bucket_ms: u64) -> Result<Self, LoadQueryError> {
        let fail = |field, message: String| Err(LoadQueryError { field, message });
        if bucket_ms < MIN_BUCKET_MS {
            return fail(
                "bucket_ms",
                format!("must be at least {MIN_BUCKET_MS} (one minute)"),
            );
        }
        if since_ms >= until_ms {
            return fail("until_ms", "must be after since_ms".into());
        }
        let since_ms = since_ms - since_ms % bucket_ms;
        let load = LoadQuery {
            since_ms,
            until_ms,
            bucket_ms,
        };
        if load.bucket_count() > MAX_BUCKETS {
            return fail(
                "bucket_ms",
                format!("the period would have more than {MAX_BUCKETS} buckets"),
            );
        }
        Ok(load)
    }

    /// Start of the first bucket.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// End of the period (exclusive).
    pub fn until_ms(&self) -> u64 {
        self.until_ms
    }

    /// Length of a bucket.
    pub fn bucket_ms(&self) -> u64 {
        self.bucket_ms
    }

    fn bucket_count(&self) -> u64 {
        (self.until_ms - self.since_ms).div_ceil(self.bucket_ms)
    }

    /// The buckets `first..end` (of `n`) at whose end a review created at
    /// `created` and decided at `decided` (`None`: still pending) was
    /// pending. A bucket ends at its start plus `bucket_ms`, the last one
    /// at `until_ms`.
    fn pending_at_ends(&self, created: u64, decided: Option<u64>, n: usize) -> (usize, usize) {
        let index = |t: u64| {
            usize::try_from(t.saturating_sub(self.since_ms) / self.bucket_ms).unwrap_or(usize::MAX)
        };
        // Pending at the end of bucket i when created before it ...
        let first = index(created).min(n);
        // ... and decided at or after it.
        let end = match decided {
            None => n,
            Some(d) if d >= self.until_ms => n,
            Some(d) if d < self.since_ms => 0,
            Some(d) => index(d).min(n),
        };
        (first, end)
    }

    /// The bucket of `t`, when it is in the period.
    fn bucket_of(&self, t: u64) -> Option<usize> {
        if t < self.since_ms || t >= self.until_ms {
            return None;
        }
        usize::try_from((t - self.since_ms) / self.bucket_ms).ok()
    }
}

/// Nearest-rank percentiles of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// How many durations.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
}

impl Percentiles {
    /// The percentiles of `durations` (sorted here); `None` when empty.
    fn of(durations: &mut [u64]) -> Option<Percentiles> {
        durations.sort_unstable();
        let n = durations.len();
        // Nearest rank: the smallest value with at least p% at or below it.
        let at = |p: usize| durations[(p * n).div_ceil(100).clamp(1, n) - 1];
        (n > 0).then(|| Percentiles {
            count: n as u64,
            p50_ms: at(50),
            p90_ms: at(90),
            p99_ms: at(99),
        })
    }
}

/// One bucket of the period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadBucket {
    /// Its start, Unix ms.
    pub start_ms: u64,
    /// Reviews created in it.
    pub created: u64,
    /// Reviews people decided (approved or rejected) in it.
    pub human: u64,
    /// Reviews decided automatically in it (assessors, standing approvals).
    pub automatic: u64,
    /// Reviews that expired in it (nobody decided in time).
    pub expired: u64,
    /// Reviews ended by their caller in it (went away, or abandoned).
    pub ended_by_caller: u64,
    /// Reviews pending at its end (or at the end of the period).
    pub pending_at_end: u64,
    /// Time to decision of people's decisions in it.
    pub human_decision_ms: Option<Percentiles>,
}

/// Reviews counted over the whole period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadTotals {
    /// Created in the period.
    pub created: u64,
    /// Of those, not decided by an assessor or standing approval: the work
    /// the period sent to people.
    pub to_people: u64,
    /// Decided by people in the period.
    pub human: u64,
    /// Decided automatically in the period.
    pub automatic: u64,
    /// Expired in the period.
    pub expired: u64,
    /// Ended by their caller in the period.
    pub ended_by_caller: u64,
}

/// Time to decision over the whole period, by who decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DecisionTimes {
    /// People's decisions.
    pub human: Option<Percentiles>,
    /// Automatic decisions.
    pub automatic: Option<Percentiles>,
}

/// A rule or caller, with the reviews it sent to people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ranked {
    /// The rule or caller (`None`: the review named none).
    pub name: Option<String>,
    /// Reviews it sent to people in the period.
    pub count: u64,
}

/// The reviewer load over a period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// Start of the first bucket, Unix ms.
    pub since_ms: u64,
    /// End of the period, Unix ms (exclusive).
    pub until_ms: u64,
    /// Length of a bucket.
    pub bucket_ms: u64,
    /// The buckets, oldest first.
    pub buckets: Vec<LoadBucket>,
    /// Reviews pending at the end of the period.
    pub pending_at_end: u64,
    /// Counts over the period.
    pub totals: LoadTotals,
    /// Time to decision over the period.
    pub decision_ms: DecisionTimes,
    /// The rules that sent most reviews to people, most first (at most
    /// [`TOP_N`]).
    pub top_rules: Vec<Ranked>,
    /// The callers that sent most reviews to people, most first.
    pub top_callers: Vec<Ranked>,
}

/// What one review contributes.
struct Alive {
    created_at_ms: u64,
    decided_at_ms: Option<u64>,
    decider: Option<Decider>,
    rule: Option<String>,
    caller: Option<String>,
}

impl Store {
    /// The reviewer load over `q`'s period (see the module's description).
    pub fn load(&self, q: &LoadQuery) -> DbResult<LoadReport> {
        let rows = self.conn().query(
            "SELECT created_at_ms, decided_at_ms, status, automatic, reviewer, rule, caller
             FROM reviews
             WHERE created_at_ms < ?2 AND (decided_at_ms IS NULL OR decided_at_ms >= ?1)",
            params![q.since_ms, q.until_ms],
        )?;
        let alive = rows
            .iter()
            .map(|r| {
                let status = parse_status(&r.get::<String>(2)?)?;
                let reviewer: Option<String> = r.get(4)?;
                Ok(Alive {
                    created_at_ms: r.get(0)?,
                    decided_at_ms: r.get::<Option<u64>>(1)?,
                    decider: Decider::from_parts(status, r.get(3)?, reviewer.as_deref()),
                    rule: r.get(5)?,
                    caller: r.get(6)?,
                })
            })
            .collect::<DbResult<Vec<Alive>>>()?;
        Ok(report(q, &alive))
    }
}

fn report(q: &LoadQuery, alive: &[Alive]) -> LoadReport {
    let n = usize::try_from(q.bucket_count()).unwrap_or(0);
    let mut buckets: Vec<LoadBucket> = (0..n)
        .map(|i| LoadBucket {
            start_ms: q.since_ms + i as u64 * q.bucket_ms,
            ..LoadBucket::default()
        })
        .collect();
    let mut human_ms: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut automatic_ms = Vec::new();
    // The queue: +1 at the first bucket a review is pending at the end of,
    // -1 after the last.
    let mut queue_steps = vec![0i64; n + 1];
    let mut totals = LoadTotals::default();
    let mut rules: HashMap<Option<&str>, u64> = HashMap::new();
    let mut callers: HashMap<Option<&str>, u64> = HashMap::new();
    for r in alive {
        let automatic = r.decider.is_some_and(Decider::is_automatic);
        if let Some(b) = q
            .bucket_of(r.created_at_ms)
            .and_then(|i| buckets.get_mut(i))
        {
            b.created += 1;
            totals.created += 1;
            if !automatic {
                totals.to_people += 1;
                *rules.entry(r.rule.as_deref()).or_default() += 1;
                *callers.entry(r.caller.as_deref()).or_default() += 1;
            }
        }
        let (first, end) = q.pending_at_ends(r.created_at_ms, r.decided_at_ms, n);
        if first < end {
            queue_steps[first] += 1;
            queue_steps[end] -= 1;
        }
        let (Some(decided), Some(decider)) = (r.decided_at_ms, r.decider) else {
            continue;
        };
        let Some(i) = q.bucket_of(decided).filter(|i| *i < n) else {
            continue;
        };
        let took = decided.saturating_sub(r.created_at_ms);
        let b = &mut buckets[i];
        match decider {
            Decider::Human => {
                b.human += 1;
                totals.human += 1;
                human_ms[i].push(took);
            }
            Decider::Assessor | Decider::Standing => {
                b.automatic += 1;
                totals.automatic += 1;
                automatic_ms.push(took);
            }
            Decider::Expiry => {
                b.expired += 1;
                totals.expired += 1;
            }
            Decider::Caller => {
                b.ended_by_caller += 1;
                totals.ended_by_caller += 1;
            }
        }
    }
    let mut queue = 0i64;
    let mut all_human = Vec::new();
    for ((b, ms), step) in buckets.iter_mut().zip(&mut human_ms).zip(&queue_steps) {
        queue += step;
        b.pending_at_end = u64::try_from(queue).unwrap_or(0);
        b.human_decision_ms = Percentiles::of(ms);
        all_human.extend_from_slice(ms);
    }
    LoadReport {
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        bucket_ms: q.bucket_ms,
        pending_at_end: buckets.last().map_or(0, |b| b.pending_at_end),
        buckets,
        totals,
        decision_ms: DecisionTimes {
            human: Percentiles::of(&mut all_human),
            automatic: Percentiles::of(&mut automatic_ms),
        },
        top_rules: ranked(rules),
        top_callers: ranked(callers),
    }
}

/// The [`TOP_N`] largest counts, most first (ties by name).
fn ranked(counts: HashMap<Option<&str>, u64>) -> Vec<Ranked> {
    let mut all: Vec<Ranked> = counts
        .into_iter()
        .map(|(name, count)| Ranked {
            name: name.map(str::to_string),
            count,
        })
        .collect();
    all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
    all.truncate(TOP_N);
    all
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const H: u64 = 3_600_000;

    fn alive(created: u64, decided: Option<u64>, decider: Option<Decider>, rule: &str) -> Alive {
        Alive {
            created_at_ms: created,
            decided_at_ms: decided,
            decider,
            rule: Some(rule.to_string()),
            caller: Some(format!("caller-{rule}")),
        }
    }

    #[test]
    fn periods_are_checked_naming_the_field() {
        let e = LoadQuery::new(0, 10 * H, 1000).unwrap_err();
        assert_eq!(e.field, "bucket_ms");
        assert_eq!(
            LoadQuery::new(5 * H, 5 * H, H).unwrap_err().field,
            "until_ms"
        );
        let e = LoadQuery::new(0, 2000 * H, H).unwrap_err();
        assert_eq!(e.field, "bucket_ms");
        assert!(e.to_string().starts_with("bucket_ms: "), "{e}");
        let q = LoadQuery::new(10 * H + 5, 12 * H, H).unwrap();
        assert_eq!((q.since_ms(), q.bucket_count()), (10 * H, 2));
    }

    #[test]
    fn a_review_is_in_the_queue_at_the_ends_of_buckets_it_spans() {
        let q = LoadQuery::new(H, 4 * H, H).unwrap();
        assert_eq!(q.pending_at_ends(0, None, 3), (0, 3));
        assert_eq!(q.pending_at_ends(H + H / 2, Some(2 * H + H / 2), 3), (0, 1));
        assert_eq!(q.pending_at_ends(H, Some(2 * H), 3), (0, 1));
        assert_eq!(q.pending_at_ends(2 * H, Some(2 * H + 1), 3), (1, 1));
        assert_eq!(q.pending_at_ends(3 * H, Some(9 * H), 3), (2, 3));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let p = Percentiles::of(&mut v).unwrap();
        assert_eq!((p.count, p.p50_ms, p.p90_ms, p.p99_ms), (100, 50, 90, 99));
        let p = Percentiles::of(&mut [7]).unwrap();
        assert_eq!((p.p50_ms, p.p99_ms), (7, 7));
        let p = Percentiles::of(&mut [1, 2, 3, 4]).unwrap();
        assert_eq!((p.p50_ms, p.p90_ms), (2, 4));
        assert_eq!(Percentiles::of(&mut []), None);
    }

    #[test]
    fn buckets_count_decisions_queue_and_work_for_people() {
        let q = LoadQuery::new(0, 3 * H, H).unwrap();
        let rows = [
            // Pending during all of the period.
            alive(0, None, None, "old"),
            // A person decides after 30 min (bucket 0 → 0).
            alive(H / 4, Some(H / 4 + H / 2), Some(Decider::Human), "chat"),
            // A person decides in the next bucket after 1 h.
            alive(H / 2, Some(H + H / 2), Some(Decider::Human), "chat"),
            // Assessor in 10 ms; standing approval in 20 ms.
            alive(H + 1, Some(H + 11), Some(Decider::Assessor), "auto"),
            alive(H + 2, Some(H + 22), Some(Decider::Standing), "auto"),
            // Expires in bucket 2; the caller goes away in bucket 2.
            alive(H + 3, Some(2 * H + 3), Some(Decider::Expiry), "tools"),
            alive(2 * H, Some(2 * H + 5), Some(Decider::Caller), "chat"),
        ];
        let r = report(&q, &rows);
        let created: Vec<u64> = r.buckets.iter().map(|b| b.created).collect();
        assert_eq!(created, [3, 3, 1]);
        let human: Vec<u64> = r.buckets.iter().map(|b| b.human).collect();
        assert_eq!(human, [1, 1, 0]);
        let auto: Vec<u64> = r.buckets.iter().map(|b| b.automatic).collect();
        assert_eq!(auto, [0, 2, 0]);
        assert_eq!(r.buckets[2].expired, 1);
        assert_eq!(r.buckets[2].ended_by_caller, 1);
        // End of bucket 0: old + the second; bucket 1: old + the expiring
        // one; bucket 2: old.
        let queue: Vec<u64> = r.buckets.iter().map(|b| b.pending_at_end).collect();
        assert_eq!(queue, [2, 2, 1]);
        assert_eq!(r.pending_at_end, 1);
        assert_eq!(r.buckets[0].human_decision_ms.unwrap().p50_ms, H / 2);
        assert_eq!(r.buckets[1].human_decision_ms.unwrap().p50_ms, H);
        assert_eq!(r.buckets[2].human_decision_ms, None);
        let human = r.decision_ms.human.unwrap();
        assert_eq!((human.count, human.p50_ms, human.p99_ms), (2, H / 2, H));
        let automatic = r.decision_ms.automatic.unwrap();
        assert_eq!(
            (automatic.count, automatic.p50_ms, automatic.p99_ms),
            (2, 10, 20)
        );
        assert_eq!(r.totals.created, 7);
        assert_eq!(r.totals.to_people, 5);
        assert_eq!(
            r.top_rules,
            vec![
                Ranked {
                    name: Some("chat".into()),
                    count: 3
                },
                Ranked {
                    name: Some("old".into()),
                    count: 1
                },
                Ranked {
                    name: Some("tools".into()),
                    count: 1
                },
            ]
        );
        assert_eq!(r.top_callers[0].name.as_deref(), Some("caller-chat"));
    }
}
