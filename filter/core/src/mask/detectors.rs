//! Detectors: a regex proposes candidates, a validator keeps only the real
//! thing (Luhn for cards, mod-97 for IBANs, ranges for SSNs, ...), so random
//! numbers are not flagged.
//!
//! Patterns are written for the `regex` crate with only the `std`, `perf`
//! and `unicode-perl` features: no `(?i)` on Unicode text (ASCII-only
//! `(?i-u:..)` is used instead), `[0-9]` rather than `\d`.

use std::net::Ipv6Addr;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, Input as AcInput, MatchKind};
use regex::{Regex, RegexBuilder};

use super::prefixes::MatchPrefixes;

/// The built-in detector names, in priority order (when two detections cover
/// the same text, the earlier detector names the placeholder).
pub const BUILTIN_DETECTORS: &[&str] = &[
    "pem_private_key",
    "jwt",
    "aws_access_key",
    "aws_secret_key",
    "openai_key",
    "github_token",
    "slack_token",
    "password_assignment",
    "email",
    "iban",
    "credit_card",
    "us_ssn",
    "phone",
    "ipv6",
    "ipv4",
];

/// Largest compiled size accepted for a configured regex.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// A failed candidate no longer than this is retried one character later, so
/// that a longer false candidate cannot hide a real value inside it. It is
/// the longest candidate of a built-in detector that retries ([`IBAN_MAX`]):
/// none of them skips a failed candidate, so where the IBAN detector
/// begins to read is a matter of the text there only ([`iban_at`]).
const RETRY_INSIDE_MAX: usize = IBAN_MAX;
/// The longest match of the built-in IBAN pattern: country, check digits,
/// then 32 characters each after a space.
pub(crate) const IBAN_MAX: usize = 4 + 2 * 32;

/// The check a candidate must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    None,
    Luhn,
    IbanAny,
    Email,
    Phone,
    Card,
    Iban,
    Ssn,
    AwsKeyId,
    Ipv4,
    Ipv6,
    SkKey,
    Slack,
    Jwt,
    Password,
    AwsSecret,
}

/// Where a detector's regex needs to run: small windows found by a plain
/// byte scan, so that the (slow, NFA-simulating) regex never walks prose.
#[derive(Debug, Clone, Copy)]
enum Cand {
    /// Everywhere (custom detectors).
    Whole,
    /// Maximal runs of ASCII bytes in `set` that satisfy `need`, plus one
    /// character of context after them; with `extend`, runs followed by an
    /// assignment (`:` or `=`), plus `extend` bytes for the value.
    Run { set: u16, need: Need, extend: usize },
    /// From each occurrence of the literal to the end of the text.
    Open(&'static str),
    /// From the start of the token (alphanumerics, `_`, `-`) holding an
    /// occurrence of one of `words` (ASCII case ignored with `no_case`),
    /// plus `extend` bytes: a key name or a word that gives a value away
    /// (`password is …`, an AWS key id before its secret).
    Near {
        words: &'static [&'static str],
        no_case: bool,
        extend: usize,
    },
}

/// What a run must contain to be worth a regex search. Every value a
/// detector accepts contains what its run needs, so a run cut short where
/// a stream released text finds the same values as the whole run would.
#[derive(Debug, Clone, Copy)]
enum Need {
    Digits(usize),
    Byte(u8),
    Colons(usize),
    Literal(&'static [&'static str]),
}

impl Need {
    fn met(self, run: &[u8]) -> bool {
        match self {
            Need::Digits(n) => run.iter().filter(|b| b.is_ascii_digit()).count() >= n,
            Need::Byte(c) => run.contains(&c),
            Need::Colons(n) => run.iter().filter(|&&b| b == b':').count() >= n,
            Need::Literal(l) => l.iter().any(|x| contains(run, x.as_bytes())),
        }
    }

    /// What finds the runs worth a look without testing every run: every
    /// run that meets the need holds a seed (a digit, the byte, a colon, the
    /// start of a literal), so only the runs around seeds are read. `None`
    /// when every run may meet it (zero digits or colons), or when a
    /// literal need has no automaton (then every run is read: slower, the
    /// same windows).
    fn seeds<'a>(self, hay: &'a str, literals: Option<&'a LiteralStarts>) -> Option<Seeds<'a>> {
        let find: SeedFind<'a> = match self {
            Need::Digits(0) | Need::Colons(0) => return None,
            Need::Digits(_) => SeedFind::Digit,
            Need::Byte(c) => SeedFind::Exact(c),
            Need::Colons(_) => SeedFind::Exact(b':'),
            Need::Literal(_) => SeedFind::Literal(literals?),
        };
        Some(Seeds { hay, find })
    }
}

/// How [`Seeds`] finds the next seed.
#[derive(Clone, Copy)]
enum SeedFind<'a> {
    Digit,
    Exact(u8),
    Literal(&'a LiteralStarts),
}

/// Positions of a [`Need`]'s seeds, found in increasing order.
struct Seeds<'a> {
    hay: &'a str,
    find: SeedFind<'a>,
}

impl Seeds<'_> {
    /// The first seed at or after `pos`.
    fn at_or_after(&mut self, pos: usize) -> Option<usize> {
        let b = self.hay.as_bytes();
        let rest = b.get(pos..)?;
        match self.find {
            SeedFind::Digit => next_where(
                rest,
                |w| has_less(w ^ splat(b'0'), 10),
                |x| x.is_ascii_digit(),
            )
            .map(|i| pos + i),
            SeedFind::Exact(c) => {
                next_where(rest, |w| has_less(w ^ splat(c), 1), |x| x == c).map(|i| pos + i)
            }
            SeedFind::Literal(l) => l.first_at_or_after(b, pos),
        }
    }
}

/// Where a detector's literals (key words, token prefixes) start: one
/// Aho-Corasick automaton over all of them, built with the detector. Its
/// scan skips ahead with a rare byte of the literals where it can; the
/// byte-at-a-time scans it replaced stopped at every `e` for `eyJ` and at
/// every `p`, `s`, `k`, `t`, `m` and `c` for the password words, and were
/// half of masking a prompt without secrets.
#[derive(Debug)]
struct LiteralStarts(AhoCorasick);

impl LiteralStarts {
    /// An automaton over `words` (empty ones dropped: an empty literal is
    /// in no run, and no built-in word list has one), ASCII case ignored
    /// with `no_case`.
    fn new(words: &[&str], no_case: bool) -> Result<LiteralStarts, String> {
        AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .ascii_case_insensitive(no_case)
            .build(words.iter().filter(|w| !w.is_empty()))
            .map(LiteralStarts)
            .map_err(|e| one_line(&e.to_string()))
    }

    /// The first position at or after `pos` where one of the literals
    /// starts: leftmost-first semantics report the match that starts
    /// earliest.
    fn first_at_or_after(&self, b: &[u8], pos: usize) -> Option<usize> {
        if pos > b.len() {
            return None;
        }
        self.0.find(AcInput::new(b).range(pos..)).map(|m| m.start())
    }

    /// Every position at or after `from` where one of the literals starts,
    /// in order.
    fn all_from(&self, b: &[u8], from: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = from;
        while let Some(at) = self.first_at_or_after(b, pos) {
            out.push(at);
            pos = at + 1;
        }
        out
    }
}

/// The index of the first byte of `b` for which `byte` holds, skipping
/// eight bytes at a time while `word` (given them as a little-endian `u64`)
/// says none of them can: the scans for seeds run over every byte of every
/// text for several detectors, and a byte at a time was most of their cost.
fn next_where(b: &[u8], word: impl Fn(u64) -> bool, byte: impl Fn(u8) -> bool) -> Option<usize> {
    let mut i = 0;
    while let Some(chunk) = b.get(i..i + 8).and_then(|c| <[u8; 8]>::try_from(c).ok()) {
        if word(u64::from_le_bytes(chunk)) {
            break;
        }
        i += 8;
    }
    b.get(i..)?.iter().position(|&x| byte(x)).map(|j| i + j)
}

/// `c` in every byte of a `u64`.
const fn splat(c: u8) -> u64 {
    u64::from_ne_bytes([c; 8])
}

/// Whether some byte of `w` is less than `n` (`n` at most 128; exact).
const fn has_less(w: u64, n: u8) -> bool {
    w.wrapping_sub(splat(n)) & !w & splat(0x80) != 0
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return false;
    };
    hay.windows(needle.len())
        .any(|w| w.first() == Some(&first) && w == needle)
}

// Byte classes for candidate runs, one bit each, looked up in `CLASSES`.
const CARD: u16 = 1; // digits, space, hyphen, dot (also SSNs)
const PHONE: u16 = 1 << 1; // digits, space, . - ( ) +
const IPV4: u16 = 1 << 2; // digits, dot
const IPV6: u16 = 1 << 3; // hex digits, colon, dot
const IBAN: u16 = 1 << 4; // upper-case letters, digits, space
const EMAIL: u16 = 1 << 5; // alphanumerics, . _ % + - @
const UPPER_ALNUM: u16 = 1 << 6; // upper-case letters, digits
const TOKEN: u16 = 1 << 7; // alphanumerics, _ -
const JWT: u16 = 1 << 8; // token characters and dot
const URL: u16 = 1 << 9; // token characters and . / :

const fn class_of(b: u8) -> u16 {
    let digit = b.is_ascii_digit();
    let upper = b.is_ascii_uppercase();
    let alnum = b.is_ascii_alphanumeric();
    let mut c = 0;
    if digit || b == b' ' || b == b'-' || b == b'.' {
        c |= CARD;
    }
    if digit || matches!(b, b' ' | b'.' | b'-' | b'(' | b')' | b'+') {
        c |= PHONE;
    }
    if digit || b == b'.' {
        c |= IPV4;
    }
    if b.is_ascii_hexdigit() || b == b':' || b == b'.' {
        c |= IPV6;
    }
    if upper || digit || b == b' ' {
        c |= IBAN;
    }
    if alnum || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'@') {
        c |= EMAIL;
    }
    if upper || digit {
        c |= UPPER_ALNUM;
    }
    if alnum || b == b'_' || b == b'-' {
        c |= TOKEN | JWT | URL;
    }
    if b == b'.' {
        c |= JWT | URL;
    }
    if b == b'/' || b == b':' {
        c |= URL;
    }
    c
}

// Evaluated at compile time: an index out of range fails the build.
#[allow(clippy::indexing_slicing)]
const CLASSES: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = class_of(i as u8);
        i += 1;
    }
    t
};

/// Whether `b[i..]` starts with an optional quote, blanks and `:` or `=`.
fn assignment_follows(b: &[u8], mut i: usize) -> bool {
    if matches!(b.get(i), Some(b'"' | b'\'')) {
        i += 1;
    }
    while matches!(b.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    matches!(b.get(i), Some(b':' | b'='))
}

fn in_class(b: &[u8], i: usize, set: u16) -> bool {
    b.get(i)
        .and_then(|&c| CLASSES.get(usize::from(c)))
        .is_some_and(|class| class & set != 0)
}

/// Which part of a match is the value to mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueGroup {
    /// The whole match.
    Whole,
    /// The first capture group that took part in the match.
    FirstParticipating,
    /// This capture group (custom detectors with a group named `value`).
    Index(usize),
}

/// One candidate a detector's scan read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Detection {
    /// The text the scan read as one piece: its regex match (which may
    /// begin before the value, `password=`) through the value's end. What
    /// is found after it depends on it, even when it was rejected, since
    /// the scan goes on after its end, so a stream releases none of it
    /// before all of it is known. (A rejected candidate the scan retries
    /// inside is not reported: it decides nothing.)
    pub read: (usize, usize),
    /// The validated value; `None` when the check rejected the candidate.
    pub value: Option<(usize, usize)>,
}

/// One compiled detector.
#[derive(Debug)]
pub(crate) struct Detector {
    /// Configuration name, e.g. `credit_card`.
    pub name: String,
    /// Placeholder label, e.g. `CREDIT_CARD`.
    pub label: String,
    regex: Regex,
    check: Check,
    cand: Cand,
    /// The automaton over the literals of a `Near` or literal `Run`
    /// candidate.
    literals: Option<LiteralStarts>,
    value: ValueGroup,
    /// Matches may run to the end of the text while unterminated (PEM).
    pub open_ended: bool,
    /// What a stream holds back for this detector: the prefixes of its
    /// matches (of an open-ended detector, of its opening line; the rest
    /// is held while the analysis finds it unterminated).
    pub prefixes: Arc<MatchPrefixes>,
    /// A card inside an IBAN the IBAN detector masks is that IBAN's groups,
    /// not a card ([`in_masked_iban`]). Only true where that detector runs
    /// beside this one and masks (or blocks): with it off or monitoring,
    /// excusing the card would let it through unmasked. Off unless the
    /// profile asks for it ([`Detector::with_iban_excuse`]).
    iban_masked_alongside: bool,
}

/// Key names whose value is a secret, anywhere in a longer name
/// (`DB_PASSWORD`, `aws_secret_access_key`).
const PASSWORD_KEYWORDS: &str = r"password|passwd|passwort|kennwort|passphrase|secret|api_?key|apikey|access_?key|private_?key|client_?secret|auth_?token|access_?token|refresh_?token|bearer_?token|[_\-]token";
/// Short key names, only whole or after `_`, `-`, `.` (`pwd`, `DB_PASS`),
/// since inside a word they are other words (`bypass`, `compass`).
const PASSWORD_SHORT_KEYS: &str = r"pass|pwd|pw|mdp|clave|contrasena";
/// Words for a password in prose, before `is`/`ist`/`est`/`es` and the
/// value: `the wifi password is …`, `das Passwort lautet …`, `le mot de
/// passe du wifi est …`, `la contraseña es …`.
const PASSWORD_WORDS: &str = r"(?:(?i-u:password|passwort|kennwort|passcode|passphrase|mot de passe|mdp|pw|clave|contrasena)|(?i-u:contrase)[\x{F1}\x{D1}](?i-u:a))";
/// The verbs between them and the value.
const PASSWORD_VERBS: &str =
    r"(?:(?i-u:is|was|lautet|ist|war|est|c'est|es|era|sera)|c\x{2019}est|\x{E9}tait)";

/// The opening line of a PEM private key.
const PEM_BEGIN: &str = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----";

/// Pattern, check, candidates, value group and, for a detector whose
/// matches may stay open to the end of the text, the pattern of its
/// opening.
type Spec = (String, Check, Cand, ValueGroup, Option<&'static str>);

fn builtin_spec(name: &str) -> Option<Spec> {
    let whole = ValueGroup::Whole;
    Some(match name {
        "email" => (
            r"[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b".into(),
            Check::Email,
            Cand::Run { set: EMAIL, need: Need::Byte(b'@'), extend: 0 },
            whole,
            None,
        ),
        "phone" => (
            concat!(
                // International: +CC then digit groups, optionally parenthesised.
                r"\B\+[1-9](?:[ .\-]?(?:\([0-9]{1,5}\)|[0-9]{1,5})){1,7}",
                // North American: (415) 555-0132, 415-555-0132, 415.555.0132.
                r"|(?:\B\(|\b)[2-9][0-9]{2}(?:\)[ .\-]?|[.\-])[2-9][0-9]{2}[ .\-][0-9]{4}\b",
                // National with a trunk 0: 020 7946 0958, 06 12 34 56 78, 030-1234567.
                r"|\b0[1-9][0-9]{0,4}(?:[ .\-][0-9]{2,8}){1,4}\b",
                // Spanish mobiles, written without a trunk prefix: 612 345 678, 612 34 56 78.
                r"|\b[67][0-9]{2}(?: [0-9]{3} [0-9]{3}| [0-9]{2} [0-9]{2} [0-9]{2})\b",
            )
            .into(),
            Check::Phone,
            Cand::Run { set: PHONE, need: Need::Digits(8), extend: 0 },
            whole,
            None,
        ),
        // No `\b` around it: `_` and letters are word characters, so
        // `card_4111…` or `…1111exp` never matched; which digits may stand
        // next to a card is [`card_end`]'s to say.
        "credit_card" => (r"[0-9](?:[ .\-]?[0-9]){12,18}".into(), Check::Card, Cand::Run { set: CARD, need: Need::Digits(13), extend: 0 }, whole, None),
        "iban" => (
            // No `\b`: glued to a word (`iban_DE89…_old`) it is still one;
            // [`iban_shaped_end`] keeps the country's length, not followed
            // by a letter or digit.
            r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,32}".into(),
            Check::Iban,
            // Two: the check digits are all an IBAN is sure to have.
            Cand::Run { set: IBAN, need: Need::Digits(2), extend: 0 },
            whole,
            None,
        ),
        "us_ssn" => (
            r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|\b[0-9]{3} [0-9]{2} [0-9]{4}\b".into(),
            Check::Ssn,
            Cand::Run { set: CARD, need: Need::Digits(9), extend: 0 },
            whole,
            None,
        ),
        "ipv4" => (
            r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b".into(),
            Check::Ipv4,
            Cand::Run { set: IPV4, need: Need::Digits(4), extend: 0 },
            whole,
            None,
        ),
        "ipv6" => (
            r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.[0-9]{1,3}){0,3}".into(),
            Check::Ipv6,
            Cand::Run { set: IPV6, need: Need::Colons(2), extend: 0 },
            whole,
            None,
        ),
        "aws_access_key" => (
            // Its ends are [`Check::AwsKeyId`]'s: a word glued to it
            // (`keyAKIA…`, `…EXAMPLE_old`) is no boundary for `\b`.
            r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}".into(),
            Check::AwsKeyId,
            Cand::Run { set: UPPER_ALNUM, need: Need::Literal(&["AKIA", "ASIA", "ABIA", "ACCA"]), extend: 0 },
            whole,
            None,
        ),
        "aws_secret_key" => (
            // A 40-character secret access key within a few lines after its
            // key id, whatever (if anything) names it: a CSV export, `aws
            // configure`'s prompts, positional arguments.
            r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b(?s:.){0,80}?[^A-Za-z0-9/+=]([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|\z)".into(),
            Check::AwsSecret,
            Cand::Near { words: &["AKIA", "ASIA"], no_case: false, extend: 200 },
            ValueGroup::FirstParticipating,
            None,
        ),
        "openai_key" => (
            // Glued to a word (`keysk-proj-…`) only with a prefix no word
            // ends in; a bare `sk-` inside one is `risk-`, `task-`, `desk-`.
            r"\bsk-[A-Za-z0-9_\-]{20,}|sk-(?:proj|ant|svcacct|admin)-[A-Za-z0-9_\-]{16,}".into(),
            Check::SkKey,
            Cand::Run { set: TOKEN, need: Need::Literal(&["sk-"]), extend: 0 },
            whole,
            None,
        ),
        "github_token" => (
            // No `\b`: the prefixes are distinctive enough to be found glued
            // to a word (`tokenghp_…`, `…_old`).
            r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{30,}".into(),
            Check::None,
            Cand::Run { set: TOKEN, need: Need::Literal(&["gh", "github_pat_"]), extend: 0 },
            whole,
            None,
        ),
        "slack_token" => (
            r"xox[abeprs]-[A-Za-z0-9\-]{10,}|xapp-[0-9]-[A-Za-z0-9\-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/_\-]{20,}".into(),
            Check::Slack,
            Cand::Run { set: URL, need: Need::Literal(&["xox", "xapp-", "hooks.slack.com"]), extend: 0 },
            whole,
            None,
        ),
        "jwt" => (
            // No `\b`: the header must decode to JSON naming `alg`, glued to
            // a word (`tokeneyJ…`) or not.
            r"eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*".into(),
            Check::Jwt,
            Cand::Run { set: JWT, need: Need::Literal(&["eyJ"]), extend: 0 },
            whole,
            None,
        ),
        "pem_private_key" => (
            format!(r"{PEM_BEGIN}(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\z)"),
            Check::None,
            Cand::Open("-----BEGIN"),
            whole,
            Some(PEM_BEGIN),
        ),
        "password_assignment" => (
            format!(
                concat!(
                    // A key and its value: `DB_PASS=…`, `"pwd": "…"`,
                    // `'db_pass' => '…'`, `Kennwort: …`.
                    r#"\b(?i-u:[a-z0-9_\-]*(?:{kw})|(?:[a-z0-9_\-]*[_\-])?(?:{short}))["']?[ \t]*(?:[:=]|=>)[ \t]*"#,
                    r#"(?:"([^"\r\n]+)"|'([^'\r\n]+)'|([^\s"',;\\<>|]+))"#,
                    // Prose: a password word, a few words, a verb, the value.
                    r#"|{words}(?:[ \t]+[^\s:=.!?,;]+){{0,4}}?(?:[ \t]+{verbs}[ \t]*:?|[ \t]*:)[ \t]+"#,
                    r#"(?:"([^"\r\n]+)"|'([^'\r\n]+)'|\x{{AB}}[ \t]?([^\x{{BB}}\r\n]+?)[ \t]?\x{{BB}}|([^\s"'<>|]+))"#,
                ),
                kw = PASSWORD_KEYWORDS,
                short = PASSWORD_SHORT_KEYS,
                words = PASSWORD_WORDS,
                verbs = PASSWORD_VERBS,
            ),
            Check::Password,
            Cand::Near {
                words: &["pass", "secret", "key", "token", "pwd", "pw", "kennwort", "mdp", "clave", "contrase", "mot de passe"],
                no_case: true,
                extend: 300,
            },
            ValueGroup::FirstParticipating,
            None,
        ),
        _ => return None,
    })
}

/// Compiles a regex with the limits used for every pattern.
pub(crate) fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| one_line(&e.to_string()))
}

/// regex errors are multi-line with a caret diagram; configuration errors
/// are one log line.
pub(crate) fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' '))
        .collect();
    lines.join(" ")
}

impl Detector {
    /// A built-in detector by name.
    pub(crate) fn builtin(name: &str) -> Result<Option<Detector>, String> {
        let Some((pattern, check, cand, value, opening)) = builtin_spec(name) else {
            return Ok(None);
        };
        let literals = match cand {
            Cand::Near { words, no_case, .. } => Some(LiteralStarts::new(words, no_case)?),
            Cand::Run {
                need: Need::Literal(words),
                ..
            } => Some(LiteralStarts::new(words, false)?),
            Cand::Whole | Cand::Open(_) | Cand::Run { .. } => None,
        };
        Ok(Some(Detector {
            name: name.to_string(),
            label: name.to_ascii_uppercase(),
            regex: compile(&pattern)?,
            check,
            cand,
            literals,
            value,
            open_ended: opening.is_some(),
            prefixes: Arc::new(MatchPrefixes::new(opening.unwrap_or(&pattern))),
            iban_masked_alongside: false,
        }))
    }

    /// This detector for a profile whose IBAN detector masks or blocks: a
    /// card inside an IBAN that detector finds is that IBAN's digits
    /// ([`in_masked_iban`]), masked with it.
    pub(crate) fn with_iban_excuse(mut self) -> Detector {
        self.iban_masked_alongside = true;
        self
    }

    /// A configured detector. The caller has checked the name.
    pub(crate) fn custom(name: &str, pattern: &str, check: Check) -> Result<Detector, String> {
        let regex = compile(pattern)?;
        if regex.is_match("") {
            return Err("must not match the empty string".into());
        }
        let value = match regex.capture_names().position(|n| n == Some("value")) {
            Some(i) => ValueGroup::Index(i),
            None => ValueGroup::Whole,
        };
        Ok(Detector {
            name: name.to_string(),
            label: name.to_ascii_uppercase(),
            prefixes: Arc::new(MatchPrefixes::new(pattern)),
            iban_masked_alongside: false,
            regex,
            check,
            cand: Cand::Whole,
            literals: None,
            value,
            open_ended: false,
        })
    }

    /// Byte windows of `hay[from..]` where the regex must run, each with
    /// one character of context after it.
    fn windows(&self, hay: &str, from: usize) -> Vec<(usize, usize)> {
        let b = hay.as_bytes();
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut push = |s: usize, e: usize| match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        };
        match self.cand {
            Cand::Whole => push(from, hay.len()),
            Cand::Open(lit) => {
                if let Some(i) = hay.get(from..).and_then(|r| r.find(lit)) {
                    push(from + i, hay.len());
                }
            }
            Cand::Near { extend, .. } => {
                let starts = match &self.literals {
                    Some(l) => l.all_from(b, from),
                    // Not built (cannot happen for a built-in detector):
                    // the whole text is the window.
                    None => {
                        push(from, hay.len());
                        Vec::new()
                    }
                };
                for at in starts {
                    let mut start = at;
                    while start > from && in_class(b, start - 1, TOKEN) {
                        start -= 1;
                    }
                    let mut end = (at + extend).min(b.len());
                    while !hay.is_char_boundary(end) {
                        end -= 1;
                    }
                    push(start, end);
                }
            }
            Cand::Run { set, need, extend } => {
                // The maximal run `b[start..i]`: a window if it meets the need.
                let mut run = |start: usize, i: usize| {
                    if need.met(b.get(start..i).unwrap_or_default())
                        && (extend == 0 || assignment_follows(b, i))
                    {
                        let mut end = if extend > 0 {
                            (i + extend).min(b.len())
                        } else {
                            next_char(hay, i).min(b.len())
                        };
                        while !hay.is_char_boundary(end) {
                            end -= 1;
                        }
                        push(start, end);
                    }
                };
                match need.seeds(hay, self.literals.as_ref()) {
                    // Only the runs around seeds: the same runs, in the same
                    // order, as reading every run would find meeting the need.
                    Some(mut seeds) => {
                        let mut pos = from;
                        while let Some(p) = seeds.at_or_after(pos) {
                            if !in_class(b, p, set) {
                                // No run holds it.
                                pos = p + 1;
                                continue;
                            }
                            let mut start = p;
                            while start > from && in_class(b, start - 1, set) {
                                start -= 1;
                            }
                            let mut i = p + 1;
                            while in_class(b, i, set) {
                                i += 1;
                            }
                            run(start, i);
                            pos = i;
                        }
                    }
                    None => {
                        let mut i = from;
                        while i < b.len() {
                            if !in_class(b, i, set) {
                                i += 1;
                                continue;
                            }
                            let start = i;
                            while in_class(b, i, set) {
                                i += 1;
                            }
                            run(start, i);
                        }
                    }
                }
            }
        }
        out
    }

    /// Appends every candidate in `hay[from..]` and, when it passed the
    /// check, its value. Text before `from` is context only (word
    /// boundaries).
    pub(crate) fn find(&self, hay: &str, from: usize, out: &mut Vec<Detection>) {
        if hay.len() <= from {
            return;
        }
        // Made on the first search that needs it: most texts give most
        // detectors no window at all.
        let mut locs = None;
        for (ws, we) in self.windows(hay, from) {
            let Some(sub) = hay.get(..we) else { continue };
            let mut pos = ws;
            while pos <= sub.len() {
                let (ms, me, vs, ve) = match self.value {
                    ValueGroup::Whole => match self.regex.find_at(sub, pos) {
                        Some(m) => (m.start(), m.end(), m.start(), m.end()),
                        None => break,
                    },
                    ValueGroup::FirstParticipating | ValueGroup::Index(_) => {
                        let locs = locs.get_or_insert_with(|| self.regex.capture_locations());
                        let Some(m) = self.regex.captures_read_at(locs, sub, pos) else {
                            break;
                        };
                        let group = match self.value {
                            ValueGroup::Index(i) => locs.get(i),
                            _ => (1..locs.len()).find_map(|i| locs.get(i)),
                        };
                        match group {
                            Some((s, e)) => (m.start(), m.end(), s, e),
                            None => (m.start(), m.end(), m.start(), m.end()),
                        }
                    }
                };
                if me <= ms {
                    pos = next_char(hay, ms);
                    continue;
                }
                match self.validate(hay, from, vs, ve) {
                    Some(end) if end > vs => {
                        out.push(Detection {
                            read: (ms.min(vs), me.max(self.read_to(hay, end))),
                            value: Some((vs, end)),
                        });
                        let resume = if self.check == Check::Iban {
                            // An IBAN may begin inside this one and end
                            // after it (both are masked, as one): a card
                            // in its tail is excused as its groups
                            // ([`in_masked_iban`]), so it must be found.
                            ms
                        } else if self.value == ValueGroup::Whole {
                            end
                        } else {
                            me
                        };
                        pos = if resume > ms {
                            resume
                        } else {
                            next_char(hay, ms)
                        };
                    }
                    _ => {
                        if self.retry_inside() && me - ms <= RETRY_INSIDE_MAX {
                            pos = self.retry_at(hay, ms);
                        } else {
                            // The scan goes on after it: nothing found
                            // starts inside it.
                            out.push(Detection {
                                read: (ms, me),
                                value: None,
                            });
                            pos = me;
                        }
                    }
                }
            }
        }
    }

    /// Where to search again after a rejected candidate at `ms`: the next
    /// character; for a card, past the digits right after it, since no
    /// card begins after a digit ([`card_end`]) and a search from each of
    /// them (the regex has no `\b` to skip them) is wasted work on every
    /// run of digit groups.
    fn retry_at(&self, hay: &str, ms: usize) -> usize {
        let mut pos = next_char(hay, ms);
        if self.check == Check::Card {
            while hay.as_bytes().get(pos).is_some_and(u8::is_ascii_digit) {
                pos += 1;
            }
        }
        pos
    }

    /// Where what decided an accepted value ending at `end` ends: beyond
    /// the two bytes a stream always waits for, a card glued to a
    /// hexadecimal letter was checked against the [`HEX_GLUE`] bytes after
    /// it ([`hex_glued`]), which a stream must then see before it decides.
    fn read_to(&self, hay: &str, end: usize) -> usize {
        let hex_letter = |c: &u8| matches!(c, b'a'..=b'f' | b'A'..=b'F');
        if self.check != Check::Card || !hay.as_bytes().get(end).is_some_and(hex_letter) {
            return end;
        }
        let mut to = (end + HEX_GLUE).min(hay.len());
        while !hay.is_char_boundary(to) {
            to += 1;
        }
        to
    }

    /// Whether a rejected candidate may hide a real value starting inside it
    /// (digit runs: `12345 4111 1111 1111 1111`).
    fn retry_inside(&self) -> bool {
        matches!(
            self.check,
            Check::Luhn
                | Check::IbanAny
                | Check::Phone
                | Check::Card
                | Check::Iban
                | Check::Ssn
                | Check::Ipv4
                | Check::Ipv6
        )
    }

    /// The accepted end of the value `hay[s..e]`, or `None` to reject it
    /// (`hay[..from]` is context, as in [`Detector::find`]).
    fn validate(&self, hay: &str, from: usize, s: usize, e: usize) -> Option<usize> {
        let v = hay.get(s..e)?;
        let ok = match self.check {
            Check::None => true,
            Check::Luhn => {
                let d = digits(v);
                d.len() >= 2 && luhn(&d)
            }
            Check::IbanAny | Check::Iban => return iban_end(hay, s, e),
            Check::Email => email_ok(v),
            Check::Phone => {
                phone_ok(v)
                    && !alnum(next_of(hay, e))
                    && !glued_group(hay, s, e)
                    && !digit_group_context(hay, s)
            }
            Check::Card => return card_end(hay, from, s, e, self.iban_masked_alongside),
            Check::Ssn => ssn_ok(v) && !glued(hay, s, e, b'-') && !glued(hay, s, e, b' '),
            Check::Ipv4 => ipv4_ok(v) && !glued(hay, s, e, b'.') && !version_context(hay, s),
            Check::Ipv6 => return ipv6_end(hay, s, e),
            Check::AwsKeyId => {
                // Not inside a longer run of upper-case letters and digits
                // (`EURASIAPACIFIC…`); a lower-case word or `_` glued to it
                // is no part of it.
                let key_char = |c: Option<char>| {
                    c.is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
                };
                !key_char(prev_of(hay, s)) && !key_char(next_of(hay, e))
            }
            Check::SkKey => sk_ok(v),
            Check::Slack => !v.starts_with("xox") || v.bytes().any(|b| b.is_ascii_digit()),
            Check::Jwt => jwt_ok(v),
            Check::Password => return password_end(hay, s, e),
            Check::AwsSecret => {
                v.bytes().any(|b| b.is_ascii_digit())
                    && v.bytes().any(|b| b.is_ascii_uppercase())
                    && v.bytes().any(|b| b.is_ascii_lowercase())
            }
        };
        ok.then_some(e)
    }
}

/// Byte index of the character after the one at `i` (or `i + 1` past the end).
pub(crate) fn next_char(s: &str, i: usize) -> usize {
    match s.get(i..).and_then(|r| r.chars().next()) {
        Some(c) => i + c.len_utf8(),
        None => i + 1,
    }
}

fn prev_of(hay: &str, s: usize) -> Option<char> {
    hay.get(..s).and_then(|h| h.chars().next_back())
}

fn next_of(hay: &str, e: usize) -> Option<char> {
    hay.get(e..).and_then(|t| t.chars().next())
}

fn alnum(c: Option<char>) -> bool {
    c.is_some_and(char::is_alphanumeric)
}

/// Whether the value continues with `sep` + digit on either side, i.e. it is
/// a piece of a longer number such as `1.2.3.4.5` or `123-45-6789-0`.
fn glued(hay: &str, s: usize, e: usize, sep: u8) -> bool {
    let b = hay.as_bytes();
    let before =
        s >= 2 && b.get(s - 1) == Some(&sep) && b.get(s - 2).is_some_and(u8::is_ascii_digit);
    let after = b.get(e) == Some(&sep) && b.get(e + 1).is_some_and(u8::is_ascii_digit);
    before || after
}

/// Characters of a hexadecimal string next to a run of digits that make
/// the run a piece of it (a hash, a UUID without dashes) rather than a
/// number of its own.
const HEX_GLUE: usize = 8;

/// The end of the card number that begins at `s`: the longest one the
/// candidate `hay[s..e]` begins with, or `None`. A card stands between
/// non-digits: a digit before it makes it a piece of a longer number,
/// while what follows a digit group it ends at (`4111111111111111.5`,
/// `…1111-0`, `… 1111 05/27`) is the next thing written, since a guard
/// that took such a tail as part of the number would let any card through
/// with one more group. Letters and `_` glued to it (`card4111…`,
/// `…1111_exp`) do not hide it either, unless they are a hexadecimal
/// string ([`hex_glued`]). Not after `+` (a phone number), nor inside an
/// IBAN that the IBAN detector masks ([`in_masked_iban`]; `iban_masked`:
/// it runs beside this one and masks).
///
/// What decides it lies at most [`HEX_GLUE`] characters before the card,
/// which a stream keeps as context, and as many after it, which are
/// reported as read with it ([`Detector::reads_after`]) so that a stream
/// waits for them.
fn card_end(hay: &str, from: usize, s: usize, e: usize, iban_masked: bool) -> Option<usize> {
    let b = hay.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    if (s > 0 && digit(s - 1)) || hay.get(..s).is_some_and(|h| h.ends_with('+')) {
        return None;
    }
    // Longest first: ends at a digit that no digit follows, with digits
    // enough for a card (counted before the full check, which most ends
    // of a run of digit groups fail).
    let enough = |end: usize| {
        b.get(s..end)
            .is_some_and(|v| v.iter().filter(|c| c.is_ascii_digit()).count() >= 13)
    };
    let end = (s + 1..=e)
        .rev()
        .filter(|&end| digit(end - 1) && !digit(end) && enough(end))
        .find(|&end| hay.get(s..end).is_some_and(card_ok) && !hex_glued(hay, s, end))?;
    // Last: only a valid card's place is looked at.
    (!(iban_masked && in_masked_iban(hay, from, s, end))).then_some(end)
}

/// Whether the digits `hay[s..e]` are glued to a hexadecimal string of at
/// least [`HEX_GLUE`] characters (digits and letters `a`-`f` of one case,
/// a letter among them) on either side: `sha 9af0c2de4111…`,
/// `4111…c0ffee12`. A shorter word (`card4111…`, `…1111exp`) is not one.
fn hex_glued(hay: &str, s: usize, e: usize) -> bool {
    let b = hay.as_bytes();
    let hex = |w: Option<&[u8]>| {
        w.is_some_and(|w| {
            let of = |letters: std::ops::RangeInclusive<u8>| {
                w.iter().all(|c| c.is_ascii_digit() || letters.contains(c))
            };
            (of(b'a'..=b'f') || of(b'A'..=b'F')) && w.iter().any(u8::is_ascii_alphabetic)
        })
    };
    hex(s.checked_sub(HEX_GLUE).and_then(|a| b.get(a..s))) || hex(b.get(e..e + HEX_GLUE))
}

/// Whether a phone-shaped group is a piece of a longer group of digits
/// (`4576-0220-5203-2916`, `12 0171 2345678`).
fn glued_group(hay: &str, s: usize, e: usize) -> bool {
    let b = hay.as_bytes();
    let sep = |c: Option<&u8>| matches!(c, Some(b' ' | b'-' | b'.' | b'/'));
    let digit = |c: Option<&u8>| c.is_some_and(u8::is_ascii_digit);
    let before = s >= 2 && sep(b.get(s - 1)) && digit(b.get(s - 2));
    let after = sep(b.get(e)) && digit(b.get(e + 1));
    before || after
}

/// Whether a group of digits is something other than a phone number by
/// where it stands: inside an IBAN-shaped value (`DE89 3704 0044 …` with
/// wrong check digits is still no phone number), or after a word naming an
/// order, invoice or reference number. (Neither excuses a card number:
/// [`in_masked_iban`].)
fn digit_group_context(hay: &str, s: usize) -> bool {
    in_iban_shape(hay, s) || previous_word_in(hay, s, 1, REFERENCE_WORDS)
}

/// Whether `s` lies inside an IBAN-shaped value that begins at a word
/// start (not after an upper-case letter or a digit): what the IBAN
/// detector would read there ([`iban_match_end`]) with its country's exact
/// length, its check digits not checked. It begins at most [`IBAN_MAX`]
/// bytes before `s`, within what a stream keeps as look-behind, so a
/// streamed answer reads the same as the whole.
fn in_iban_shape(hay: &str, s: usize) -> bool {
    let b = hay.as_bytes();
    let word_start = |t: usize| {
        t == 0
            || !b
                .get(t - 1)
                .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    };
    (s.saturating_sub(IBAN_MAX)..s).any(|t| {
        word_start(t)
            && iban_match_end(b, t)
                .and_then(|me| iban_shaped_end(hay, t, me))
                .is_some_and(|(end, _)| end > s)
    })
}

/// Whether the card `hay[s..e]` lies inside an IBAN that the IBAN
/// detector finds in `hay[from..]`, and so masks whole with the card in it
/// (an IBAN's groups can hold a Luhn-valid number with a card's prefix,
/// which is no card). Only such an IBAN: one with wrong check digits
/// (`AT00 4111 1111 1111 1111`, where Austria's 20 characters are a country
/// code, two digits and a card), groups apart by more than one space, or
/// a card that runs past the IBAN's end would let the card through
/// unmasked, since nothing else masks it. A mistyped IBAN is therefore
/// masked where it holds a valid card: it cannot be told from a card
/// behind a made-up prefix. Nor does any other context excuse a card: a
/// word like `order` before it would let any card through.
///
/// An IBAN found is one that begins in `hay[from..]` ([`iban_at`]): in a
/// stream, one whose start went out earlier can no longer be masked, so it
/// excuses nothing, however much of the released text is kept as context.
/// It begins at most [`IBAN_MAX`] bytes before the card.
fn in_masked_iban(hay: &str, from: usize, s: usize, e: usize) -> bool {
    (s.saturating_sub(IBAN_MAX).max(from)..s).any(|t| iban_at(hay, t).is_some_and(|end| e <= end))
}

/// The end of the IBAN the IBAN detector accepts at `t`, if any: its
/// pattern's match there ([`iban_match_end`]) checked by [`iban_end`]. The
/// detector reads every start ([`RETRY_INSIDE_MAX`], and it looks inside
/// what it accepted), so this is what its scan finds, without running it.
fn iban_at(hay: &str, t: usize) -> Option<usize> {
    iban_end(hay, t, iban_match_end(hay.as_bytes(), t)?)
}

/// The end of the built-in IBAN pattern's match at `t`
/// (`[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,32}`, greedy, as the regex takes
/// it): groups apart by single spaces only.
fn iban_match_end(b: &[u8], t: usize) -> Option<usize> {
    let head = b.get(t..t + 4)?;
    if !(head.iter().take(2).all(u8::is_ascii_uppercase)
        && head.iter().skip(2).all(u8::is_ascii_digit))
    {
        return None;
    }
    let unit = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    let mut i = t + 4;
    let mut units = 0;
    while units < 32 {
        let j = if b.get(i) == Some(&b' ') { i + 1 } else { i };
        if !unit(b.get(j)) {
            break;
        }
        i = j + 1;
        units += 1;
    }
    (units >= 11).then_some(i)
}

/// Words after which a number is a reference, not a phone number.
const REFERENCE_WORDS: &[&str] = &[
    "order",
    "invoice",
    "ref",
    "reference",
    "ticket",
    "tracking",
    "bestellung",
    "bestellnummer",
    "rechnung",
    "rechnungsnummer",
    "auftrag",
    "auftragsnummer",
    "kundennummer",
    "commande",
    "facture",
    "devis",
    "dossier",
    "pedido",
    "factura",
    "referencia",
    "expediente",
];

/// Words after which four dotted numbers are a version, not an address.
const VERSION_WORDS: &[&str] = &[
    "version",
    "versión",
    "versão",
    "ver",
    "v",
    "build",
    "release",
    "firmware",
    "fw",
    "rev",
    "revision",
    "révision",
    "patch",
    "update",
    "mise",
    "jour",
    "actualización",
];

/// Whether four dotted numbers at `s` are a version by context: one of
/// [`VERSION_WORDS`] among the three words before them (`version 1.2.3.4`,
/// `la versión actual es la 1.2.3.4`), or an image or package tag
/// (`registry/app:1.2.3.4`, `pkg@1.2.3.4`).
fn version_context(hay: &str, s: usize) -> bool {
    let before = hay.get(..s).unwrap_or("");
    if before.ends_with('@') {
        return true;
    }
    if let Some(tag) = before.strip_suffix(':') {
        let token = tag
            .rsplit(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .next()
            .unwrap_or("");
        if token.contains('/') {
            return true;
        }
    }
    previous_word_in(hay, s, 4, VERSION_WORDS)
}

/// Whether one of the `n` words before `s` (within one clause: no digits,
/// no sentence punctuation in between) is in `words`, ignoring case.
fn previous_word_in(hay: &str, s: usize, n: usize, words: &[&str]) -> bool {
    let before = hay.get(..s).unwrap_or("");
    let clause = before
        .rsplit(['.', ',', ';', '!', '?', '\n', '(', '['])
        .next()
        .unwrap_or("");
    clause
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .rev()
        .take(n)
        .take_while(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .any(|w| words.iter().any(|x| x.to_lowercase() == w.to_lowercase()))
}

fn digits(v: &str) -> Vec<u8> {
    v.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// The Luhn checksum over decimal digits (values 0..=9).
#[allow(clippy::manual_is_multiple_of)] // keeps the workspace MSRV (1.85)
pub(crate) fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut x = u32::from(x);
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum % 10 == 0
}

fn email_ok(v: &str) -> bool {
    let Some((local, domain)) = v.rsplit_once('@') else {
        return false;
    };
    // A long random user name is a token in a URL's user part
    // (`https://ghp_…@github.com`), not a mailbox.
    let token = local.len() >= 30
        && !local.contains('.')
        && local.bytes().any(|b| b.is_ascii_digit())
        && local.bytes().any(|b| b.is_ascii_uppercase())
        && local.bytes().any(|b| b.is_ascii_lowercase());
    // `logo@2x.png` is an image at double resolution.
    let image = domain.rsplit('.').next().is_some_and(|tld| {
        matches!(
            tld,
            "png" | "jpg" | "jpeg" | "gif" | "svg" | "webp" | "avif"
        )
    });
    !local.is_empty()
        && !token
        && !image
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && domain.len() <= 253
        && domain.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

fn separators(v: &str) -> impl Iterator<Item = char> + '_ {
    v.chars().filter(|c| !c.is_ascii_digit())
}

fn phone_ok(v: &str) -> bool {
    let n = v.bytes().filter(u8::is_ascii_digit).count();
    if v.starts_with('+') {
        return (8..=15).contains(&n) && v.matches('(').count() == v.matches(')').count();
    }
    if v.starts_with('0') {
        // Trunk-prefix national numbers: one kind of separator; dotted ones
        // only in pairs (06.12.34.56.78), so that dates are not phones.
        let mut seps = separators(v);
        let first = seps.next();
        if !(9..=12).contains(&n) || first.is_none() || !seps.all(|c| Some(c) == first) {
            return false;
        }
        if first == Some('.') {
            return v.split('.').all(|g| g.len() == 2);
        }
        // 123-45-6789 is the shape of a US social security number.
        if first == Some('-') && v.split('-').map(str::len).eq([3, 2, 4]) {
            return false;
        }
        return true;
    }
    if n == 9 {
        // Spanish mobile (the pattern allows only its two groupings).
        return v.starts_with(['6', '7']);
    }
    // North American: 10 digits; a separator other than the parenthesis
    // must be used consistently (415-555.0132 is not a phone number).
    let plain: Vec<char> = v
        .chars()
        .filter(|c| !c.is_ascii_digit() && *c != '(' && *c != ')' && *c != ' ')
        .collect();
    n == 10 && plain.windows(2).all(|w| w.first() == w.get(1))
}

fn card_ok(v: &str) -> bool {
    let d = digits(v);
    if !(13..=19).contains(&d.len()) || !luhn(&d) {
        return false;
    }
    let mut seps = separators(v);
    if let Some(first) = seps.next() {
        if !seps.all(|c| c == first) {
            return false;
        }
        // Cards are printed 4-4-4-4(-3), or 4-6-5 / 4-6-4 (Amex, Diners):
        // other groupings are order or reference numbers.
        let groups: Vec<usize> = v.split(first).map(str::len).collect();
        if !matches!(
            groups.as_slice(),
            [4, 4, 4, 4] | [4, 4, 4, 4, 3] | [4, 4, 4, 4, 2] | [4, 4, 4, 1] | [4, 6, 5] | [4, 6, 4]
        ) {
            return false;
        }
    }
    if d.iter().all(|&x| Some(&x) == d.first()) {
        return false;
    }
    let prefix = |n: usize| {
        d.iter()
            .take(n)
            .fold(0u32, |acc, &x| acc * 10 + u32::from(x))
    };
    match d.first() {
        Some(4) => true,
        Some(3) => matches!(prefix(2), 30 | 34 | 35 | 36 | 37 | 38 | 39),
        Some(5) => matches!(prefix(2), 50..=59),
        Some(6) => true,
        Some(2) => (2221..=2720).contains(&prefix(4)),
        _ => false,
    }
}

/// IBAN lengths by country (SWIFT IBAN registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HN", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// mod-97 over an IBAN given without spaces (country, check digits, BBAN).
pub(crate) fn iban_mod97(compact: &[u8]) -> bool {
    if compact.len() < 5 {
        return false;
    }
    let rotated = compact.iter().skip(4).chain(compact.iter().take(4));
    let mut rem: u32 = 0;
    for &b in rotated {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            b'a'..=b'z' => u32::from(b - b'a') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Validates an IBAN candidate, which the greedy regex may have extended into
/// following upper-case words: keeps exactly the country's length.
fn iban_end(hay: &str, s: usize, e: usize) -> Option<usize> {
    let (end, compact) = iban_shaped_end(hay, s, e)?;
    iban_mod97(&compact).then_some(end)
}

/// The end of an IBAN-shaped value at `hay[s..e]`: a known country and
/// exactly its length of letters and digits (spaces between them), not
/// followed by a letter or digit; with the value without its spaces. The
/// check digits are not checked.
fn iban_shaped_end(hay: &str, s: usize, e: usize) -> Option<(usize, Vec<u8>)> {
    let v = hay.get(s..e)?.as_bytes();
    let country = std::str::from_utf8(v.get(..2)?).ok()?;
    let want = IBAN_LENGTHS
        .iter()
        .find(|(c, _)| *c == country)
        .map(|(_, n)| *n)?;
    let mut compact = Vec::with_capacity(want);
    let mut end = None;
    for (i, &b) in v.iter().enumerate() {
        if b == b' ' {
            continue;
        }
        compact.push(b);
        if compact.len() == want {
            end = Some(s + i + 1);
            break;
        }
    }
    let end = end?;
    if hay
        .as_bytes()
        .get(end)
        .is_some_and(u8::is_ascii_alphanumeric)
    {
        return None;
    }
    Some((end, compact))
}

fn ssn_ok(v: &str) -> bool {
    let d = digits(v);
    if d.len() != 9 {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        d.get(r)
            .map_or(0u32, |x| x.iter().fold(0u32, |a, &b| a * 10 + u32::from(b)))
    };
    let (area, group, serial) = (num(0..3), num(3..5), num(5..9));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn ipv4_ok(v: &str) -> bool {
    let mut n = 0;
    for part in v.split('.') {
        n += 1;
        if part.is_empty() || part.len() > 3 || part.parse::<u16>().map_or(true, |x| x > 255) {
            return false;
        }
    }
    n == 4
}

/// Validates an IPv6 candidate with `std::net`, trimming trailing colons
/// (`fe80::1:` at the end of a sentence).
fn ipv6_end(hay: &str, s: usize, e: usize) -> Option<usize> {
    if prev_of(hay, s).is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '.' || c == '_') {
        return None;
    }
    let mut v = hay.get(s..e)?;
    while !v.is_empty() {
        if v.parse::<Ipv6Addr>().is_ok() {
            break;
        }
        v = v.strip_suffix(':')?;
    }
    let end = s + v.len();
    let hex = v.chars().filter(char::is_ascii_hexdigit).count();
    let groups = v.split(':').filter(|g| !g.is_empty()).count();
    let next = next_of(hay, end);
    if (hex < 2 || groups < 2) && v != "::1"
        || next.is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        return None;
    }
    Some(end)
}

fn sk_ok(v: &str) -> bool {
    let body = v.get(3..).unwrap_or("");
    body.bytes().any(|b| b.is_ascii_digit())
        && body.bytes().any(|b| b.is_ascii_uppercase())
        && body.bytes().any(|b| b.is_ascii_lowercase())
}

/// Decodes unpadded base64url; `None` on any other character.
fn b64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

/// A JWT's header must decode to a JSON object naming its algorithm.
fn jwt_ok(v: &str) -> bool {
    let Some(header) = v.split('.').next() else {
        return false;
    };
    let Some(bytes) = b64url(header) else {
        return false;
    };
    matches!(serde_json::from_slice::<serde_json::Value>(&bytes), Ok(serde_json::Value::Object(m)) if m.contains_key("alg"))
}

/// The end of a password value `hay[s..e]`, or `None`. A value written
/// after a key (`pwd=…`, `"pass": "…"`) or in quotes is taken as it is; one
/// written bare in prose (`the password is …`) loses the sentence's final
/// punctuation and must look like a password (a digit, a symbol or an inner
/// capital), since `the password is wrong` names no password.
fn password_end(hay: &str, s: usize, e: usize) -> Option<usize> {
    let before = hay.get(..s)?.trim_end_matches([' ', '\t']);
    let quoted = before.ends_with(['"', '\'', '\u{ab}']);
    let assigned = before.ends_with([':', '=', '>']);
    let mut v = hay.get(s..e)?;
    if !quoted {
        // In a query string `&` starts the next parameter (`pass=x&user=y`);
        // elsewhere it may be part of the value (`Tr0ub4dor&3`).
        let next_param = v.match_indices('&').find(|&(i, _)| {
            let rest = v.get(i + 1..).unwrap_or("");
            let key = rest.split('=').next().unwrap_or("");
            rest.len() > key.len()
                && !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
        if let Some((i, _)) = next_param {
            v = v.get(..i)?;
        }
        v = v.trim_end_matches(['.', ',', ';', ':', '?', ')', ']', '}']);
    }
    if !password_value_ok(v) || !(quoted || assigned || prose_password_ok(v)) {
        return None;
    }
    Some(s + v.len())
}

/// A bare word in prose that reads as a password rather than a word.
fn prose_password_ok(v: &str) -> bool {
    let symbol = |c: char| !c.is_alphanumeric() && c != '-';
    (v.chars().any(|c| c.is_ascii_digit() || symbol(c))
        || v.chars().skip(1).any(char::is_uppercase))
        && !v.contains("://")
}

/// Rejects template values and placeholders (`<your password>`, `${PASS}`,
/// `[REDACTED]`, `****`) that are not secrets.
fn password_value_ok(v: &str) -> bool {
    let Some(first) = v.chars().next() else {
        return false;
    };
    if v.chars().count() < 3
        || matches!(first, '<' | '[' | '{' | '$' | '%')
        || v.chars().all(|c| c == first)
    {
        return false;
    }
    let lower = v.to_ascii_lowercase();
    !matches!(
        lower.as_str(),
        "null"
            | "none"
            | "true"
            | "false"
            | "undefined"
            | "redacted"
            | "changeme"
            | "example"
            | "password"
            | "secret"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn found(name: &str, text: &str) -> Vec<String> {
        found_by(
            &Detector::builtin(name).unwrap().unwrap().with_iban_excuse(),
            text,
        )
    }

    /// [`iban_match_end`] is the built-in IBAN pattern's match written out
    /// by hand (the card and phone checks ask it at every start, without
    /// running the regex): it must end where the regex's anchored match
    /// ends, on random texts of IBAN characters, spaces and others.
    #[test]
    fn iban_match_end_agrees_with_the_iban_pattern() {
        let (pattern, ..) = builtin_spec("iban").unwrap();
        let anchored = regex::Regex::new(&format!("^(?:{pattern})")).unwrap();
        // Mostly IBAN characters, so that many texts match.
        let alphabet = b"AZDEGB01234567890123456789 x-";
        let mut state = 0x9e37_79b9_u32;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as usize % n
        };
        let mut matched = 0;
        for _ in 0..20_000 {
            let len = next(50);
            let head = ["", "DE89", "AT70 ", "G", "GB8", "de89"][next(6)];
            let text: String = head
                .chars()
                .chain((0..len).map(|_| alphabet[next(alphabet.len())] as char))
                .collect();
            let t = if next(2) == 0 {
                0
            } else {
                next(text.len().max(1))
            };
            let expected = text
                .get(t..)
                .and_then(|h| anchored.find(h))
                .map(|m| t + m.end());
            matched += usize::from(expected.is_some());
            assert_eq!(
                iban_match_end(text.as_bytes(), t),
                expected,
                "{text:?} at {t}"
            );
        }
        assert!(matched > 1_000, "only {matched} texts held a match");
    }

    fn found_by(d: &Detector, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        d.find(text, 0, &mut out);
        out.into_iter()
            .filter_map(|d| d.value)
            .map(|(s, e)| text[s..e].to_string())
            .collect()
    }

    #[test]
    fn literal_starts_are_every_position_where_a_word_starts() {
        // The automaton against a plain reading of each position, for every
        // built-in word list, on text full of near misses, overlaps
        // (`pwd` holds `pw`, `passpass`) and case variants.
        let lists: Vec<(&[&str], bool)> = BUILTIN_DETECTORS
            .iter()
            .filter_map(|n| match builtin_spec(n)?.2 {
                Cand::Near { words, no_case, .. } => Some((words, no_case)),
                Cand::Run {
                    need: Need::Literal(words),
                    ..
                } => Some((words, false)),
                _ => None,
            })
            .collect();
        assert!(lists.len() >= 6, "{}", lists.len());
        let text = "PassPWD pwdpw passpass SECRET sEcReT keytoken mot de passe MOT DE PASSE \
                    akiaAKIAASIA sk-sk- ghgithub_pat_ xoxb xapp-hooks.slack.com eyJeyj kennwort \
                    clave contrase mdp tok toke p pa pas é€ AKI eyJ";
        for (words, no_case) in lists {
            let starts = LiteralStarts::new(words, no_case).unwrap();
            let b = text.as_bytes();
            let plain: Vec<usize> = (0..b.len())
                .filter(|&i| {
                    words.iter().any(|w| {
                        b.get(i..i + w.len()).is_some_and(|t| match no_case {
                            true => t.eq_ignore_ascii_case(w.as_bytes()),
                            false => t == w.as_bytes(),
                        })
                    })
                })
                .collect();
            assert!(!plain.is_empty(), "{words:?}");
            for from in [0, 1, 5, 40] {
                let expected: Vec<usize> = plain.iter().copied().filter(|&i| i >= from).collect();
                assert_eq!(starts.all_from(b, from), expected, "{words:?} from {from}");
            }
            assert_eq!(starts.first_at_or_after(b, b.len() + 1), None);
        }
    }

    /// (detector, text, expected values). An empty list is a near miss.
    const CASES: &[(&str, &str, &[&str])] = &[
        // email
        ("email", "write to jane.doe+tag@example.co.uk today", &["jane.doe+tag@example.co.uk"]),
        ("email", "a@b.io, x_y@sub.domain.org.", &["a@b.io", "x_y@sub.domain.org"]),
        ("email", "user@localhost", &[]),
        ("email", "@example.com", &[]),
        ("email", "first..last@example.com", &[]),
        ("email", "a@b.c", &[]),
        ("email", "name@-bad.com", &[]),
        ("email", "see logo@2x.png", &[]),
        ("email", "https://ghp_MISDRFpYLgtkxNkHEwJ4Es98y4C2LVmhLb9z@github.com/a", &[]),
        // phone
        ("phone", "call +1 (415) 555-0132 now", &["+1 (415) 555-0132"]),
        ("phone", "+44 20 7946 0958", &["+44 20 7946 0958"]),
        ("phone", "+4915112345678", &["+4915112345678"]),
        ("phone", "(415) 555-0132", &["(415) 555-0132"]),
        ("phone", "415-555-0132 or 415.555.0132", &["415-555-0132", "415.555.0132"]),
        ("phone", "020 7946 0958", &["020 7946 0958"]),
        ("phone", "06 12 34 56 78", &["06 12 34 56 78"]),
        ("phone", "06.12.34.56.78", &["06.12.34.56.78"]),
        ("phone", "030-1234567", &["030-1234567"]),
        ("phone", "+1 2", &[]),
        ("phone", "+12345", &[]),
        ("phone", "4155550132", &[]),
        ("phone", "123-456-7890", &[]),
        ("phone", "415-555.0132", &[]),
        ("phone", "values 300 400 5000", &[]),
        ("phone", "on 01.02.2024 at noon", &[]),
        ("phone", "on 01/02/2024 12:30", &[]),
        ("phone", "order 0123", &[]),
        ("phone", "version 1.2.3", &[]),
        ("phone", "x+1234567890123456789", &[]),
        ("phone", "llámame al 612 345 678 hoy", &["612 345 678"]),
        ("phone", "IBAN DE89 3704 0044 0532 0130 01", &[]),
        ("phone", "card 4576-0220-5203-2916", &[]),
        ("phone", "Bestellung 0592 6273 2587", &[]),
        ("phone", "SSN 065-85-3585", &[]),
        // credit cards
        ("credit_card", "card 4111 1111 1111 1111 exp", &["4111 1111 1111 1111"]),
        ("credit_card", "4111-1111-1111-1111", &["4111-1111-1111-1111"]),
        ("credit_card", "5500005555555559", &["5500005555555559"]),
        ("credit_card", "amex 378282246310005.", &["378282246310005"]),
        ("credit_card", "12345 4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "4111 1111 1111 1112", &[]),
        ("credit_card", "1234567812345678", &[]),
        ("credit_card", "0000 0000 0000 0000", &[]),
        ("credit_card", "4111 1111-1111 1111", &[]),
        ("credit_card", "id 4111111111111111111111", &[]),
        ("credit_card", "id 41111111111111111111111 and 14111111111111111", &[]),
        // A digit group before or after the card is the next thing written,
        // not part of it: a guard that read `-0` or `.5` as part of the
        // number let any card through with one more group.
        ("credit_card", "4111111111111111.5 and 4111111111111111-0", &["4111111111111111", "4111111111111111"]),
        ("credit_card", "4111 1111 1111 1111.5 or 4111-1111-1111-1111-0", &["4111 1111 1111 1111", "4111-1111-1111-1111"]),
        ("credit_card", "card 4111111111111111 05/27 cvc 123", &["4111111111111111"]),
        ("credit_card", "card 4111 1111 1111 1111 05/27", &["4111 1111 1111 1111"]),
        ("credit_card", "ref 1111-4111-1111-1111-1111", &["4111-1111-1111-1111"]),
        ("credit_card", "0-4111111111111111 and 0.4111111111111111", &["4111111111111111", "4111111111111111"]),
        ("credit_card", "price 1234.5678, part 4111-2222-33, 12345678.9012345", &[]),
        // Glued to a word: letters and `_` are word characters, which
        // `\b` took for part of the number.
        ("credit_card", "card4111111111111111 card_4111111111111111", &["4111111111111111", "4111111111111111"]),
        ("credit_card", "4111111111111111card and 4111 1111 1111 1111_exp", &["4111111111111111", "4111 1111 1111 1111"]),
        ("credit_card", "x4111111111111111exp", &["4111111111111111"]),
        // Digits inside a hexadecimal string are part of it (a hash, a
        // UUID without dashes); a short word of hex letters is not one.
        ("credit_card", "sha 9af0c2de4111111111111111d2e4f6a8", &[]),
        ("credit_card", "4111111111111111c0ffee12 and deadbeef4111111111111111", &[]),
        ("credit_card", "cafe4111111111111111 and 4111111111111111abc", &["4111111111111111", "4111111111111111"]),
        ("credit_card", "order 638-3139819-0187709", &[]),
        ("credit_card", "tel +49 151 45930694", &[]),
        ("credit_card", "IBAN ES86 6934 4398 8366 9468 2997", &["4398 8366 9468 2997"]),
        // Neither a wrong IBAN's prefix nor a reference word hides a card;
        // nor do wrong check digits, so a mistyped IBAN holding a valid
        // card is masked there (see `in_masked_iban`).
        ("credit_card", "DE89 4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "IBAN DE89 3704 0044 0532 0130 01", &["3704 0044 0532 0130 01"]),
        // Letters where the check digits stand: no IBAN, however long.
        ("credit_card", "DEXX 4111 1111 1111 1111 00", &["4111 1111 1111 1111 00"]),
        ("credit_card", "card DE89 4111111111111111", &["4111111111111111"]),
        // A country's exact IBAN length around a card (Austria's is 20: a
        // country code, two digits, a card) excuses it only when the IBAN
        // detector masks that IBAN: its check digits right, its groups
        // apart by single spaces, the card inside it.
        ("credit_card", "AT00 4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "AT00 4111111111111111", &["4111111111111111"]),
        ("credit_card", "DE89 4111 1111 1111 1111 00", &["4111 1111 1111 1111 00"]),
        ("credit_card", "AT70 4111 1111 1111 1111, AT704111111111111111", &[]),
        ("credit_card", "AT70  4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "AT48 0000 4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "QAT70 4111 1111 1111 1111", &[]),
        ("credit_card", "order 4111 1111 1111 1111", &["4111 1111 1111 1111"]),
        ("credit_card", "ref 5500005555555559.", &["5500005555555559"]),
        // IBAN
        ("iban", "IBAN DE89 3704 0044 0532 0130 00 please", &["DE89 3704 0044 0532 0130 00"]),
        ("iban", "GB82WEST12345698765432", &["GB82WEST12345698765432"]),
        ("iban", "DE89 3704 0044 0532 0130 00 BIC COBADEFFXXX", &["DE89 3704 0044 0532 0130 00"]),
        ("iban", "iban_DE89370400440532013000_old, ibanDE89 3704 0044 0532 0130 00.", &["DE89370400440532013000", "DE89 3704 0044 0532 0130 00"]),
        ("iban", "DE89370400440532013000x", &[]),
        ("iban", "DE89 3704 0044 0532 0130 01", &[]),
        ("iban", "XX89370400440532013000", &[]),
        ("iban", "GB82WEST1234569876543", &[]),
        ("iban", "AT70 4111 1111 1111 1111, AT00 4111 1111 1111 1111", &["AT70 4111 1111 1111 1111"]),
        ("iban", "AT70  4111 1111 1111 1111", &[]),
        ("iban", "AT48 0000 4111 1111 1111 1111", &["AT48 0000 4111 1111 1111"]),
        // Glued to a letter it is still found (no `\b`).
        ("iban", "QAT70 4111 1111 1111 1111", &["AT70 4111 1111 1111 1111"]),
        // One IBAN beginning inside another: both are found (the masked
        // text is their union), or the second's tail, where a card can
        // stand, would be nobody's.
        ("iban", "NO79 RU03 1234 567 4111 1111 1111 1111 000000", &["NO79 RU03 1234 567", "RU03 1234 567 4111 1111 1111 1111 000000"]),
        // A failed candidate longer than most is still searched inside.
        ("iban", "GB00 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 AT70 4111 1111 1111 1111", &["AT70 4111 1111 1111 1111"]),
        // SSN
        ("us_ssn", "ssn 123-45-6789.", &["123-45-6789"]),
        ("us_ssn", "ssn 123 45 6789", &["123 45 6789"]),
        ("us_ssn", "000-12-3456", &[]),
        ("us_ssn", "666-12-3456", &[]),
        ("us_ssn", "912-12-3456", &[]),
        ("us_ssn", "123-00-4567", &[]),
        ("us_ssn", "123-45-0000", &[]),
        ("us_ssn", "123-45-67890", &[]),
        ("us_ssn", "123-45-6789-1", &[]),
        ("us_ssn", "123456789", &[]),
        // IPv4
        ("ipv4", "host 192.168.1.20:8080", &["192.168.1.20"]),
        ("ipv4", "10.0.0.1 and 8.8.8.8.", &["10.0.0.1", "8.8.8.8"]),
        ("ipv4", "256.1.1.1", &[]),
        ("ipv4", "1.2.3", &[]),
        ("ipv4", "1.2.3.4.5", &[]),
        ("ipv4", "v1.2.3.4", &[]),
        ("ipv4", "agent version 1.2.3.4 on 10.0.0.7", &["10.0.0.7"]),
        ("ipv4", "La versión actual es la 4.1.2.150", &[]),
        ("ipv4", "image: registry/app:2.0.1.7", &[]),
        // IPv6
        ("ipv6", "addr 2001:db8:85a3::8a2e:370:7334 ok", &["2001:db8:85a3::8a2e:370:7334"]),
        ("ipv6", "fe80::1: link", &["fe80::1"]),
        ("ipv6", "loopback ::1", &["::1"]),
        ("ipv6", "::ffff:192.0.2.1", &["::ffff:192.0.2.1"]),
        ("ipv6", "at 12:30:45", &[]),
        ("ipv6", "mac 00:1A:2B:3C:4D:5E", &[]),
        ("ipv6", "use std::net::Ipv6Addr", &[]),
        ("ipv6", "a :: b", &[]),
        ("ipv6", "ratio 3:4", &[]),
        // secrets
        ("aws_access_key", "key AKIAIOSFODNN7EXAMPLE", &["AKIAIOSFODNN7EXAMPLE"]),
        ("aws_access_key", "ASIAY34FZKBOKMUTVV7A", &["ASIAY34FZKBOKMUTVV7A"]),
        ("aws_access_key", "AKIAIOSFODNN7EXAMPLEX", &[]),
        ("aws_access_key", "akiaiosfodnn7example", &[]),
        ("aws_access_key", "AKIA1234", &[]),
        // Glued to a word: a lower-case word or `_` is no part of the id,
        // upper-case letters and digits are.
        ("aws_access_key", "keyAKIAIOSFODNN7EXAMPLE aws_key_AKIAIOSFODNN7EXAMPLE_old", &["AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"]),
        ("aws_access_key", "XAKIAIOSFODNN7EXAMPLE 1AKIAIOSFODNN7EXAMPLE", &[]),
        (
            "aws_secret_key",
            "Access key ID,Secret access key\nAKIAIOSFODNN7EXAMPLE,wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
            &["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ),
        (
            "aws_secret_key",
            "AWS Access Key ID [None]: AKIAIOSFODNN7EXAMPLE\nAWS Secret Access Key [None]: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            &["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ),
        // No id before it, a hash (no upper case), or part of a longer token.
        ("aws_secret_key", "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &[]),
        ("aws_secret_key", "AKIAIOSFODNN7EXAMPLE sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", &[]),
        ("aws_secret_key", "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYx9", &[]),
        ("openai_key", "OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", &["sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv"]),
        ("openai_key", "sk-ant-api03-AbCdEf0123456789_xyz-QWERTY", &["sk-ant-api03-AbCdEf0123456789_xyz-QWERTY"]),
        ("openai_key", "T3BlbkFJ sk-abcdefghijklmnopqrstuvwxyz", &[]),
        ("openai_key", "risk-Abcdefghijklmnopqrst1uvwxyz", &[]),
        // Glued to a word only with a prefix that no word ends in.
        ("openai_key", "keysk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", &["sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv"]),
        ("openai_key", "key_sk-ant-api03-AbCdEf0123456789_xyz-QWERTY", &["sk-ant-api03-AbCdEf0123456789_xyz-QWERTY"]),
        ("openai_key", "task-Abcdefghijklmnopqrst1uvwxyz", &[]),
        ("openai_key", "sk-short1A", &[]),
        ("github_token", "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB", &["ghp_1234567890abcdefghijklmnopqrstuvwxyzAB"]),
        ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", &["github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"]),
        ("github_token", "ghp_short", &[]),
        ("github_token", "tokenghp_1234567890abcdefghijklmnopqrstuvwxyzAB_old", &["ghp_1234567890abcdefghijklmnopqrstuvwxyzAB"]),
        ("github_token", "ghx_1234567890abcdefghijklmnopqrstuvwxyzAB", &[]),
        ("slack_token", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp", &["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp"]),
        ("slack_token", "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", &["https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"]),
        ("slack_token", "xoxo-hugs-and-kisses", &[]),
        ("slack_token", "SLACK_TOKENxoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp", &["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp"]),
        ("slack_token", "xoxb-abcdefghijklmnop", &[]),
        (
            "jwt",
            "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            &["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"],
        ),
        ("jwt", "eyJub3RhIjoiand0In0.eyJzdWIiOiIxIn0.abcdefgh", &[]),
        (
            "jwt",
            "tokeneyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            &["eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"],
        ),
        ("jwt", "eyJhbGciOiJIUzI1NiJ9.notpayload.sig", &[]),
        (
            "pem_private_key",
            "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA\n-----END RSA PRIVATE KEY-----\ndone",
            &["-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA\n-----END RSA PRIVATE KEY-----"],
        ),
        ("pem_private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn", &["-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn"]),
        ("pem_private_key", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", &[]),
        ("pem_private_key", "-----BEGIN PUBLIC KEY-----\nMIIB", &[]),
        ("password_assignment", "password=hunter2 and more", &["hunter2"]),
        ("password_assignment", "DB_PASSWORD: \"s3cr3t pass\"", &["s3cr3t pass"]),
        ("password_assignment", "{\"api_key\": \"abc123XYZ\"}", &["abc123XYZ"]),
        ("password_assignment", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", &["wJalrXUtnFEMI/K7MDENG"]),
        ("password_assignment", "url?user=a&password=p4ss&x=1", &["p4ss"]),
        ("password_assignment", "the password is strong", &[]),
        ("password_assignment", "password: <your password>", &[]),
        ("password_assignment", "password=${DB_PASS}", &[]),
        ("password_assignment", "password=****", &[]),
        ("password_assignment", "password=", &[]),
        ("password_assignment", r#"{"cmd":"login --password=abc123\"x"}"#, &["abc123"]),
        ("password_assignment", "max_tokens=500", &[]),
        ("password_assignment", "secretary: Jane", &[]),
        ("password_assignment", "the wifi password is Gr33nTea! and checkout is at 11", &["Gr33nTea!"]),
        ("password_assignment", "Das WLAN-Passwort lautet Sommer2024.", &["Sommer2024"]),
        ("password_assignment", "Le mot de passe du wifi est Soleil_2024, merci", &["Soleil_2024"]),
        ("password_assignment", "La contraseña de la alarma es Playa$2023.", &["Playa$2023"]),
        ("password_assignment", "le mot de passe c'est \u{ab} tournesol \u{bb}", &["tournesol"]),
        ("password_assignment", "Das Passwort ist falsch", &[]),
        ("password_assignment", "the password reset link is https://x.io/r?t=a1", &[]),
        ("password_assignment", "{'user': 'app', 'pwd': 'Tr0ub4dor&3'}", &["Tr0ub4dor&3"]),
        ("password_assignment", "DB_PASS=Tr0ub4dor&3 LOG=1", &["Tr0ub4dor&3"]),
        ("password_assignment", "$c = ['db_pass' => 'x9y8z7'];", &["x9y8z7"]),
        ("password_assignment", "mdp : Bienvenue2023", &["Bienvenue2023"]),
        ("password_assignment", "identifiant m.durand, mot de passe : Lune2024!", &["Lune2024!"]),
        ("password_assignment", "the local admin pw is Falcon#2291, thanks", &["Falcon#2291"]),
        ("password_assignment", "bypass: yes, compass = north", &[]),
    ];

    #[test]
    fn builtin_detector_table() {
        // One compiled detector per name: compiling its regexes for each
        // of the cases was most of this test's time.
        let mut compiled: std::collections::HashMap<&str, Detector> = Default::default();
        let mut failures = Vec::new();
        for (name, text, want) in CASES {
            let d = compiled
                .entry(name)
                // The card detector as it runs beside a masking `iban`.
                .or_insert_with(|| Detector::builtin(name).unwrap().unwrap().with_iban_excuse());
            let got = found_by(d, text);
            if got != want.iter().map(|s| s.to_string()).collect::<Vec<_>>() {
                failures.push(format!("{name}: {text:?} -> {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn every_builtin_compiles_and_has_cases() {
        for name in BUILTIN_DETECTORS {
            assert!(Detector::builtin(name).unwrap().is_some(), "{name}");
            assert!(
                CASES.iter().any(|(n, _, w)| n == name && !w.is_empty()),
                "{name} has no true positive"
            );
            assert!(
                CASES.iter().any(|(n, _, w)| n == name && w.is_empty()),
                "{name} has no near miss"
            );
        }
        assert!(Detector::builtin("nope").unwrap().is_none());
    }

    /// A detector without a DFA of its prefixes would make every stream
    /// wait for its window.
    #[test]
    fn every_builtin_has_a_prefix_dfa() {
        for name in BUILTIN_DETECTORS {
            let d = Detector::builtin(name).unwrap().unwrap();
            assert!(!d.prefixes.blind(), "{name}");
        }
    }

    #[test]
    fn validators() {
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("79927398710")));
        assert!(iban_mod97(b"GB82WEST12345698765432"));
        assert!(!iban_mod97(b"GB82WEST12345698765433"));
        assert!(ssn_ok("123-45-6789"));
        assert!(!ssn_ok("900-45-6789"));
        assert!(ipv4_ok("255.255.255.255"));
        assert!(!ipv4_ok("255.255.255.256"));
    }

    #[test]
    fn custom_detectors_and_value_group() {
        let d = Detector::custom("employee_id", "EMP-[0-9]{6}", Check::None).unwrap();
        let mut out = Vec::new();
        let t = "id EMP-123456 and EMP-12";
        d.find(t, 0, &mut out);
        type Span = (usize, usize);
        let spans = |out: &[Detection]| -> Vec<(Span, Option<Span>)> {
            out.iter().map(|d| (d.read, d.value)).collect()
        };
        assert_eq!(spans(&out), vec![((3, 13), Some((3, 13)))]);
        let d = Detector::custom("acct", r"acct#(?P<value>[0-9]{4,})", Check::Luhn).unwrap();
        let t = "acct#79927398713 acct#79927398710";
        let mut out = Vec::new();
        d.find(t, 0, &mut out);
        assert_eq!(spans(&out), vec![((0, 16), Some((5, 16)))]);
        // A rejected candidate the scan goes on after is reported, with no
        // value; one it retries inside (the Luhn failure above) is not.
        let d = Detector::builtin("email").unwrap().unwrap();
        let mut out = Vec::new();
        d.find("x .jane@example.com y", 0, &mut out);
        assert_eq!(spans(&out), vec![((2, 19), None)]);
        assert!(Detector::custom("e", "a*", Check::None).is_err());
        assert!(
            Detector::custom("e", "(", Check::None)
                .unwrap_err()
                .lines()
                .count()
                == 1
        );
    }

    #[test]
    fn unicode_text_does_not_panic() {
        let t = "é😀 4111 1111 1111 1111 ü@ü.de ééé password=ü😀ü ::1é";
        for name in BUILTIN_DETECTORS {
            let _ = found(name, t);
        }
    }
}
