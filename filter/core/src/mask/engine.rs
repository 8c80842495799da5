//! From detector matches to masked text: overlap resolution, placeholders,
//! counting.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::detectors::Detector;
use super::prefixes::MatchPrefixes;
use super::{Hit, MaskAction, RestoreMap};

/// A detector switched on in a profile, with its action.
#[derive(Debug, Clone)]
pub(crate) struct Active {
    pub det: Arc<Detector>,
    pub action: MaskAction,
}

/// The compiled form of one masking profile.
#[derive(Debug)]
pub(crate) struct PolicyInner {
    pub name: String,
    /// In priority order: custom detectors first, then the built-ins.
    pub active: Vec<Active>,
    pub salt: Vec<u8>,
    pub restore: bool,
    pub responses: bool,
    pub window: usize,
    /// Prefixes of [`PLACEHOLDER_SHAPE`], for streams.
    pub placeholders: Arc<MatchPrefixes>,
}

/// A run of overlapping detections, replaced by one placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub start: usize,
    pub end: usize,
    /// Index (into `active`) of the detection that names the placeholder:
    /// the longest, then the highest priority.
    pub best: usize,
    /// Every detection merged into the group, for counting.
    pub members: Vec<usize>,
}

/// What the detectors found in one text.
#[derive(Debug, Clone, Default)]
pub(crate) struct Found {
    /// Acting detections (redact, pseudonymize, block), sorted, disjoint.
    pub groups: Vec<Group>,
    /// `monitor` detections: `(active index, start, end)`.
    pub monitors: Vec<(usize, usize, usize)>,
    /// Every candidate the detectors' scans read as one piece, accepted or
    /// not ([`Detection::read`]): a stream must not release one in part.
    pub read: Vec<(usize, usize)>,
}

/// Runs every active detector over `hay[from..]` (earlier text is context
/// only) and resolves overlaps: a detection inside another is dropped (the
/// earliest, then longest, then highest-priority one wins), partially
/// overlapping ones are merged so that no part of either leaks.
///
/// Detectors read the text as the model does ([`crate::normalize`]): a
/// full-width, zero-width-split or escaped value is found, and its span in
/// `hay` is what gets masked.
pub(crate) fn find(active: &[Active], hay: &str, from: usize) -> Found {
    let Some(n) = crate::normalize::normalize(hay) else {
        return find_plain(active, hay, from);
    };
    let mut found = find_plain(active, &n.text, n.position(from));
    for g in &mut found.groups {
        (g.start, g.end) = n.original(g.start, g.end);
    }
    for (_, s, e) in &mut found.monitors {
        (*s, *e) = n.original(*s, *e);
    }
    for (s, e) in &mut found.read {
        (*s, *e) = n.original(*s, *e);
    }
    found
}

fn find_plain(active: &[Active], hay: &str, from: usize) -> Found {
    let mut found = Found::default();
    if active.is_empty() {
        return found;
    }
    // Only the filter's own placeholders are kept as they are: a span
    // shaped like one but with another label (`[AKIAIOSFODNN7EXAMPLE]`,
    // `[DE89370400440532013000]`) is text like any other.
    let protected: Vec<(usize, usize)> = placeholder_spans(hay, from)
        .into_iter()
        .filter_map(|(s, e)| {
            let p = hay.get(s..e)?;
            let label = placeholder_label(p);
            if !active.iter().any(|a| a.det.label == label) {
                return None;
            }
            Some(match digest_of(p) {
                // A pseudonym's digest part is anyone's to write: one of
                // decimal digits only (`<EMAIL_4111111111111111>`) is how a
                // card, phone or account number would pass as one, so only
                // its label is kept. The filter's own digests always have a
                // letter ([`replacement`]).
                Some(digest) if digest.bytes().all(|c| c.is_ascii_digit()) => {
                    (s, s + 1 + label.len())
                }
                _ => (s, e),
            })
        })
        .collect();
    let mut acting: Vec<(usize, usize, usize)> = Vec::new();
    let mut buf = Vec::new();
    for (i, a) in active.iter().enumerate() {
        if a.action == MaskAction::Off {
            continue;
        }
        buf.clear();
        a.det.find(hay, from, &mut buf);
        for d in &buf {
            found.read.push(d.read);
            let Some((s, e)) = d.value else {
                continue;
            };
            if protected.iter().any(|&(ps, pe)| ps <= s && e <= pe) {
                continue;
            }
            if a.action == MaskAction::Monitor {
                found.monitors.push((i, s, e));
            } else {
                acting.push((s, e, i));
            }
        }
    }
    acting.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut best_len = 0;
    for (s, e, i) in acting {
        if let Some(g) = found.groups.last_mut() {
            if e <= g.end {
                continue;
            }
            if s < g.end {
                g.end = e;
                g.members.push(i);
                if e - s > best_len {
                    best_len = e - s;
                    g.best = i;
                }
                continue;
            }
        }
        best_len = e - s;
        found.groups.push(Group {
            start: s,
            end: e,
            best: i,
            members: vec![i],
        });
    }
    found
}

/// Spans of placeholders already present in `hay[from..]` (`[EMAIL]`,
/// `<EMAIL_3f2a9c1b>`): never masked again.
pub(crate) fn placeholder_spans(hay: &str, from: usize) -> Vec<(usize, usize)> {
    let b = hay.as_bytes();
    let mut out = Vec::new();
    let mut i = from;
    // Every text of every request is scanned: jump from one `[` or `<` to
    // the next (a word at a time) rather than reading each byte.
    while let Some(at) = b
        .get(i..)
        .and_then(|rest| memchr::memchr2(b'[', b'<', rest))
    {
        let start = i + at;
        match placeholder_at(b, start) {
            Some(end) => {
                out.push((start, end));
                i = end;
            }
            None => i = start + 1,
        }
    }
    out
}

/// The label of a placeholder-shaped span: `EMAIL` for `[EMAIL]` and
/// `<EMAIL_3f2a9c1b>`.
fn placeholder_label(p: &str) -> &str {
    let inner = p.get(1..p.len().saturating_sub(1)).unwrap_or("");
    if p.starts_with('<') {
        inner.rsplit_once('_').map_or(inner, |(label, _)| label)
    } else {
        inner
    }
}

/// The digest of a pseudonym (`3f2a9c1b` of `<EMAIL_3f2a9c1b>`); `None`
/// for a `[LABEL]` placeholder.
fn digest_of(p: &str) -> Option<&str> {
    let inner = p.strip_prefix('<')?.strip_suffix('>')?;
    inner.rsplit_once('_').map(|(_, digest)| digest)
}

/// A pattern matching every placeholder [`placeholder_at`] accepts (and
/// more): what a stream holds back so that a placeholder split across
/// events is still kept (or restored) whole.
pub(crate) const PLACEHOLDER_SHAPE: &str = r"\[[A-Z][A-Z0-9_]*\]|<[A-Z][A-Za-z0-9_]*>";

/// If a placeholder starts at `i`, its end.
pub(crate) fn placeholder_at(b: &[u8], i: usize) -> Option<usize> {
    let open = *b.get(i)?;
    let close = match open {
        b'[' => b']',
        b'<' => b'>',
        _ => return None,
    };
    let label = |c: &u8| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_';
    let mut j = i + 1;
    while b
        .get(j)
        .is_some_and(|c| label(c) || (open == b'<' && c.is_ascii_lowercase()))
    {
        j += 1;
    }
    if b.get(j) != Some(&close) || !b.get(i + 1).is_some_and(u8::is_ascii_uppercase) {
        return None;
    }
    let inner = b.get(i + 1..j)?;
    if open == b'<' {
        // <LABEL_hex> with 8, 16 or 64 lower-case hex digits.
        let us = inner.iter().rposition(|&c| c == b'_')?;
        let (name, hex) = (inner.get(..us)?, inner.get(us + 1..)?);
        if name.is_empty()
            || !name.iter().all(label)
            || !matches!(hex.len(), 8 | 16 | 64)
            || !hex
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        {
            return None;
        }
    }
    Some(j + 1)
}

/// Counts of detections per active detector, and the first `block` one.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    counts: Vec<usize>,
    pub first_block: Option<usize>,
}

impl Tally {
    pub(crate) fn count(&mut self, active: &[Active], i: usize) {
        if self.counts.len() < active.len() {
            self.counts.resize(active.len(), 0);
        }
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        if self.first_block.is_none()
            && active.get(i).is_some_and(|a| a.action == MaskAction::Block)
        {
            self.first_block = Some(i);
        }
    }

    pub(crate) fn count_found(&mut self, active: &[Active], found: &Found) {
        for g in &found.groups {
            for &m in &g.members {
                self.count(active, m);
            }
        }
        for &(i, _, _) in &found.monitors {
            self.count(active, i);
        }
    }

    pub(crate) fn hits(&self, active: &[Active]) -> Vec<Hit> {
        self.counts
            .iter()
            .zip(active)
            .filter(|(c, _)| **c > 0)
            .map(|(c, a)| Hit {
                detector: a.det.name.clone(),
                action: a.action,
                count: *c,
            })
            .collect()
    }
}

/// The placeholder for a group's text.
pub(crate) fn replacement(
    policy: &PolicyInner,
    g: &Group,
    value: &str,
    restore: Option<&mut RestoreMap>,
) -> String {
    let Some(a) = policy.active.get(g.best) else {
        return "[REDACTED]".into();
    };
    if a.action != MaskAction::Pseudonymize {
        return format!("[{}]", a.det.label);
    }
    let digest = Sha256::new()
        .chain_update(&policy.salt)
        .chain_update([0u8])
        .chain_update(a.det.name.as_bytes())
        .chain_update([0u8])
        .chain_update(value.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // A digest of decimal digits only is how a number dressed as a
    // pseudonym looks, and is masked again ([`find_plain`]): the filter's
    // own are never such, the shortest with a letter being used.
    let digests = [8, 16, 64]
        .into_iter()
        .filter_map(|len| hex.get(..len))
        .filter(|d| d.len() == 64 || !d.bytes().all(|c| c.is_ascii_digit()));
    let Some(map) = restore else {
        let digest = digests.clone().next().unwrap_or(&hex);
        return format!("<{}_{}>", a.det.label, digest);
    };
    // 32 bits can collide within one request: lengthen rather than restore
    // the wrong value.
    for digest in digests {
        let p = format!("<{}_{}>", a.det.label, digest);
        match map.get(&p) {
            None => {
                map.insert(p.clone(), value.to_string());
                return p;
            }
            Some(v) if v == value => return p,
            Some(_) => {}
        }
    }
    format!("[{}]", a.det.label)
}

/// Masks a complete text. `None` when nothing changed (monitor-only hits are
/// still counted).
pub(crate) fn mask_full(
    policy: &PolicyInner,
    text: &str,
    tally: &mut Tally,
    mut restore: Option<&mut RestoreMap>,
    mut written: Option<&mut Vec<String>>,
) -> Option<String> {
    let found = find(&policy.active, text, 0);
    tally.count_found(&policy.active, &found);
    if found.groups.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for g in &found.groups {
        out.push_str(text.get(at..g.start).unwrap_or(""));
        let value = text.get(g.start..g.end).unwrap_or("");
        let r = replacement(policy, g, value, restore.as_deref_mut());
        if let Some(w) = written.as_deref_mut() {
            if !w.contains(&r) {
                w.push(r.clone());
            }
        }
        out.push_str(&r);
        at = g.end;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    Some(out)
}
