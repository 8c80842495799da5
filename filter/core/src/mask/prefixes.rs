//! "Can this text still grow into a match?" — what lets a stream release
//! text as soon as it is safe instead of after a fixed window.
//!
//! Each pattern (a detector, the placeholder shape, a response rule) gets,
//! once at configuration time, a DFA of the *prefixes* of its matches: the
//! pattern with its look-around assertions (`\b`, `\B`, `^`, `$`, `\z`)
//! removed, which matches everything the pattern matches and more, searched
//! anchored and with every match kind kept. A run of that DFA from some
//! position that has not died when the text runs out means a match may
//! begin there: that position and everything after it wait. A run that died
//! can never match, whatever follows; one that passed a match state may have
//! matched, and the released text is then analysed in full.
//!
//! [`PrefixTracker`] runs these DFAs over one channel's held text as it
//! arrives: one thread per pattern and start position, where two threads of
//! one pattern in the same state are one (the earlier start is kept, their
//! futures are the same), so the work per byte is bounded by the number of
//! distinct live states, not by the length of the held text. Detectors read
//! the text as the model does ([`crate::normalize`]); response rules and
//! placeholders are matched on the text as written, so the tracker keeps one
//! lane of each. An escape cut short by the end of the text (`%4`, `&#6`)
//! waits whole, as it may still decode to anything.

use std::sync::Arc;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson::{self, WhichCaptures};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use regex_syntax::hir::{Hir, HirKind};

use super::detectors::REGEX_SIZE_LIMIT;
use crate::normalize::{self, Read};

/// Largest DFA kept for one pattern; a larger one is not built and the
/// pattern holds text back up to the window (see [`MatchPrefixes`]).
const MAX_DFA_BYTES: usize = 2 << 20;
/// Memory the determinisation of one pattern may use.
const MAX_DETERMINIZE_BYTES: usize = 8 << 20;

/// The prefixes of one pattern's matches, as a DFA. Built once per
/// configuration and shared.
#[derive(Debug)]
pub(crate) struct MatchPrefixes {
    /// `None` when the pattern's DFA would be too large: then any text may
    /// still grow into a match, and the stream falls back to its window.
    dfa: Option<(dense::DFA<Vec<u32>>, StateID)>,
}

impl MatchPrefixes {
    /// The prefixes of the matches of `pattern` (`regex` syntax, already
    /// known to compile).
    pub(crate) fn new(pattern: &str) -> MatchPrefixes {
        MatchPrefixes {
            dfa: build(pattern),
        }
    }

    /// Whether the DFA could not be built: nothing can be told apart.
    pub(crate) fn blind(&self) -> bool {
        self.dfa.is_none()
    }
}

fn build(pattern: &str) -> Option<(dense::DFA<Vec<u32>>, StateID)> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .ok()?;
    let nfa = thompson::Compiler::new()
        .configure(
            thompson::Config::new()
                .which_captures(WhichCaptures::None)
                .nfa_size_limit(Some(REGEX_SIZE_LIMIT)),
        )
        .build_from_hir(&without_assertions(hir))
        .ok()?;
    let dfa = dense::Builder::new()
        .configure(
            dense::Config::new()
                .match_kind(MatchKind::All)
                .start_kind(StartKind::Anchored)
                .dfa_size_limit(Some(MAX_DFA_BYTES))
                .determinize_size_limit(Some(MAX_DETERMINIZE_BYTES)),
        )
        .build_from_nfa(&nfa)
        .ok()?;
    let start = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .ok()?;
    Some((dfa, start))
}

/// `hir` with every look-around assertion replaced by the empty string: it
/// matches a superset of what `hir` matches, and needs no context around
/// the text, which a stream does not have yet.
fn without_assertions(hir: Hir) -> Hir {
    match hir.into_kind() {
        HirKind::Look(_) | HirKind::Empty => Hir::empty(),
        HirKind::Literal(l) => Hir::literal(l.0),
        HirKind::Class(c) => Hir::class(c),
        HirKind::Repetition(mut r) => {
            r.sub = Box::new(without_assertions(*r.sub));
            Hir::repetition(r)
        }
        HirKind::Capture(mut c) => {
            c.sub = Box::new(without_assertions(*c.sub));
            Hir::capture(c)
        }
        HirKind::Concat(v) => Hir::concat(v.into_iter().map(without_assertions).collect()),
        HirKind::Alternation(v) => {
            Hir::alternation(v.into_iter().map(without_assertions).collect())
        }
    }
}

/// The patterns a stream's held text is checked against: those read on the
/// text as the model reads it (detectors, placeholders) and those read on
/// the text as written (response rules).
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamPatterns {
    pub read: Vec<Arc<MatchPrefixes>>,
    pub written: Vec<Arc<MatchPrefixes>>,
}

/// Where one channel's held text may still grow into a match.
#[derive(Debug, Default)]
pub(crate) struct PrefixTracker {
    read: Lane,
    written: Lane,
}

impl PrefixTracker {
    /// Reads what was appended to `pending` since the last call.
    pub(crate) fn advance(&mut self, patterns: &StreamPatterns, pending: &str) {
        self.read.advance(&patterns.read, pending, true);
        self.written.advance(&patterns.written, pending, false);
    }

    /// The byte offset in the held text from which it must keep waiting:
    /// the earliest position where a match may begin (or an unfinished
    /// escape). Everything before it can be released.
    pub(crate) fn hold(&self) -> usize {
        self.read.hold().min(self.written.hold())
    }

    /// Whether a match may have begun before `cut`: the text up to there
    /// must then be analysed, not released as it is.
    pub(crate) fn matched_before(&self, cut: usize) -> bool {
        self.read.matched_before(cut) || self.written.matched_before(cut)
    }

    /// The first `cut` bytes of the held text were released. A thread that
    /// began before them (a forced release) now counts from `cut`, so that
    /// what it may still match keeps waiting.
    pub(crate) fn released(&mut self, cut: usize) {
        self.read.released(cut);
        self.written.released(cut);
    }

    /// Forgets everything (the channel's held text was dropped or flushed).
    pub(crate) fn reset(&mut self) {
        *self = PrefixTracker::default();
    }
}

/// A run of one pattern's DFA: its state, and the earliest and latest of
/// the start positions it stands for (threads that reached one state were
/// merged into it).
#[derive(Debug, Clone, Copy)]
struct Thread {
    first: usize,
    last: usize,
    state: StateID,
}

/// One text form's threads.
#[derive(Debug, Default)]
struct Lane {
    /// Bytes of the held text read so far (the rest is an unfinished escape).
    read: usize,
    /// Per pattern, the live threads, earliest first.
    threads: Vec<Vec<Thread>>,
    /// `(first, last)` starts of threads that passed a match state: a match
    /// began somewhere in there. Kept until released.
    matched: Vec<(usize, usize)>,
    /// A pattern without a DFA: nothing can be released early.
    blind: bool,
}

impl Lane {
    fn advance(&mut self, patterns: &[Arc<MatchPrefixes>], pending: &str, as_model_reads: bool) {
        if patterns.is_empty() {
            self.read = pending.len();
            return;
        }
        if self.threads.len() != patterns.len() {
            self.threads.resize_with(patterns.len(), Vec::new);
            self.blind = patterns.iter().any(|p| p.blind());
        }
        if self.blind {
            self.read = pending.len();
            return;
        }
        while self.read < pending.len() {
            let at = self.read;
            if !as_model_reads {
                let Some(c) = pending.get(at..).and_then(|r| r.chars().next()) else {
                    break;
                };
                self.char(patterns, c, at);
                self.read += c.len_utf8();
                continue;
            }
            match normalize::read_at(pending, at, true) {
                Read::At(c, len) => {
                    normalize::fold(c, |d| self.char(patterns, d, at));
                    self.read += len;
                }
                Read::Unfinished | Read::End => break,
            }
        }
    }

    /// Steps every thread over `c` and starts one per pattern at it; `at`
    /// is where `c` came from in the held text.
    fn char(&mut self, patterns: &[Arc<MatchPrefixes>], c: char, at: usize) {
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        let matched = &mut self.matched;
        let mut record = |first: usize, last: usize| {
            if matched.last() != Some(&(first, last)) {
                matched.push((first, last));
            }
        };
        for (pattern, threads) in patterns.iter().zip(self.threads.iter_mut()) {
            let Some((dfa, start)) = &pattern.dfa else {
                continue;
            };
            // The thread starting at `c`, kept only if `c` does not end it.
            let mut fresh = Some(*start);
            for &b in bytes {
                for t in threads.iter_mut() {
                    t.state = dfa.next_state(t.state, b);
                    if dfa.is_match_state(t.state) {
                        record(t.first, t.last);
                    }
                }
                fresh = fresh
                    .map(|s| dfa.next_state(s, b))
                    .filter(|&s| !dfa.is_dead_state(s));
                if fresh.is_some_and(|s| dfa.is_match_state(s)) {
                    record(at, at);
                }
            }
            if let Some(state) = fresh {
                threads.push(Thread {
                    first: at,
                    last: at,
                    state,
                });
            }
            if threads.is_empty() {
                continue;
            }
            // Dead threads go; threads in one state become one.
            let mut kept = 0;
            for i in 0..threads.len() {
                let Some(&t) = threads.get(i) else {
                    break;
                };
                if dfa.is_dead_state(t.state) {
                    continue;
                }
                let same = threads
                    .get_mut(..kept)
                    .and_then(|k| k.iter_mut().find(|k| k.state == t.state));
                if let Some(k) = same {
                    k.last = k.last.max(t.last);
                    continue;
                }
                if let Some(slot) = threads.get_mut(kept) {
                    *slot = t;
                }
                kept += 1;
            }
            threads.truncate(kept);
        }
    }

    fn hold(&self) -> usize {
        if self.blind {
            return 0;
        }
        self.threads
            .iter()
            .filter_map(|t| t.first().map(|t| t.first))
            .fold(self.read, usize::min)
    }

    fn matched_before(&self, cut: usize) -> bool {
        self.blind || self.matched.iter().any(|&(first, _)| first < cut)
    }

    fn released(&mut self, cut: usize) {
        self.read = self.read.saturating_sub(cut);
        let shift = |at: usize| at.saturating_sub(cut);
        for t in self.threads.iter_mut().flatten() {
            t.first = shift(t.first);
            t.last = shift(t.last);
        }
        // What began before `cut` was analysed; what may have begun after
        // it still counts.
        self.matched.retain(|&(_, last)| last >= cut);
        for m in &mut self.matched {
            *m = (shift(m.0), shift(m.1));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn patterns(read: &[&str], written: &[&str]) -> StreamPatterns {
        let all = |l: &[&str]| l.iter().map(|p| Arc::new(MatchPrefixes::new(p))).collect();
        StreamPatterns {
            read: all(read),
            written: all(written),
        }
    }

    /// Feeds `parts` one by one; returns the hold offset after the last.
    fn hold_after(p: &StreamPatterns, parts: &[&str]) -> (usize, PrefixTracker, String) {
        let mut t = PrefixTracker::default();
        let mut pending = String::new();
        for part in parts {
            pending.push_str(part);
            t.advance(p, &pending);
        }
        (t.hold(), t, pending)
    }

    #[test]
    fn only_what_may_still_match_waits() {
        let p = patterns(
            &[r"\b[a-z]+@[a-z]+\.[a-z]{2,}\b", r"\b[0-9]{3}-[0-9]{4}\b"],
            &[],
        );
        // Prose: the last word may still become an address.
        let (h, _, s) = hold_after(&p, &["Hello there, my ", "friend"]);
        assert_eq!(&s[h..], "friend");
        // After a space, nothing can: everything goes.
        let (h, _, s) = hold_after(&p, &["Hello there, my friend "]);
        assert_eq!(h, s.len());
        // A number that may become a phone number waits from its start.
        let (h, _, s) = hold_after(&p, &["call 555-", "01"]);
        assert_eq!(&s[h..], "555-01");
        // Once it cannot (too many digits), it goes.
        let (h, _, s) = hold_after(&p, &["call 555-012345 "]);
        assert_eq!(h, s.len());
    }

    #[test]
    fn matches_are_reported_for_analysis() {
        let p = patterns(&[r"\b[0-9]{3}-[0-9]{4}\b"], &[]);
        let (h, t, s) = hold_after(&p, &["call 555-0123 now"]);
        assert_eq!(h, s.len());
        assert!(t.matched_before(h));
        assert!(!t.matched_before(5));
        // Without its `\b` the pattern matches `555-0123` here: the text is
        // analysed rather than assumed clean.
        let (h, t, _) = hold_after(&p, &["call 555-01234 now"]);
        assert!(t.matched_before(h));
        let (h, t, _) = hold_after(&p, &["call 55-01234 now"]);
        assert!(!t.matched_before(h));
        let (_, mut t, _) = hold_after(&p, &["call 555-0123 now"]);
        t.released(5);
        assert!(t.matched_before(1) && !t.matched_before(0));
    }

    #[test]
    fn escapes_and_invisible_characters_are_read_as_the_model_reads_them() {
        let p = patterns(&[r"[a-z]+@[a-z]+\.com"], &[]);
        // `%4` may become `%40`, an `@`: it waits with the word before it.
        let (h, _, s) = hold_after(&p, &["write to jane%4"]);
        assert_eq!(&s[h..], "jane%4");
        let (h, _, s) = hold_after(&p, &["write to jane&#6"]);
        assert_eq!(&s[h..], "jane&#6");
        // A zero-width space does not end the word.
        let (h, _, s) = hold_after(&p, &["write to jane\u{200B}"]);
        assert_eq!(&s[h..], "jane\u{200B}");
        // A `%` that cannot start an escape is text.
        let (h, _, s) = hold_after(&p, &["100%! "]);
        assert_eq!(h, s.len());
    }

    #[test]
    fn written_text_lane_and_blind_patterns() {
        // Response rules read the text as written: `%20` is not a space.
        let p = patterns(&[], &[r"(?i-u:launch\s+code)"]);
        let (h, _, s) = hold_after(&p, &["the LAUNCH co"]);
        assert_eq!(&s[h..], "LAUNCH co");
        let (h, _, s) = hold_after(&p, &["the launch%20co"]);
        assert_eq!(h, s.len());
        // A pattern whose DFA is not built holds everything.
        let mut p = patterns(&[], &[]);
        p.read.push(Arc::new(MatchPrefixes { dfa: None }));
        let (h, t, _) = hold_after(&p, &["plain words "]);
        assert_eq!(h, 0);
        assert!(t.matched_before(1));
    }

    #[test]
    fn a_forced_release_keeps_what_is_still_open() {
        let p = patterns(&[r"[a-z]+@example\.com"], &[]);
        let (_, mut t, mut s) = hold_after(&p, &["abcdefgh"]);
        t.released(4);
        s.drain(..4);
        assert_eq!(t.hold(), 0);
        s.push_str("@example.com and");
        t.advance(&p, &s);
        assert!(t.matched_before(1));
    }

    #[test]
    fn threads_in_one_state_are_one() {
        let p = patterns(&[r"[a-z]+@x\.com"], &[]);
        let (_, t, _) = hold_after(&p, &[&"a".repeat(5000)]);
        assert_eq!(t.read.threads.first().map(Vec::len), Some(1));
        assert_eq!(t.hold(), 0);
        // A match that begins after a release point inside a merged thread
        // is still reported: `b@x.com` began at 4, merged into the thread
        // from 0.
        let (_, mut t, _) = hold_after(&p, &["aaa.b@x.com "]);
        t.released(4);
        assert!(t.matched_before(1));
    }
}
