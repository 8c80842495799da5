//! Text as the model reads it, for the detectors: compatibility forms folded
//! (full-width `ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ`, non-breaking spaces),
//! invisible characters dropped (zero-width spaces and joiners, soft hyphens,
//! byte-order marks), and percent and HTML-entity escapes decoded
//! (`jane%40example.com`, `jane&#64;example.com`). Every byte of the
//! normalised text remembers the span of the original it came from, so a
//! match is masked in the original text and the request stays valid.

use unicode_normalization::char::decompose_compatible;

/// Normalised text and, per byte of it, the original span it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Normalized {
    pub text: String,
    /// Original start offset of the source of each byte of `text`.
    starts: Vec<usize>,
    /// Original end offset of the source of each byte of `text`.
    ends: Vec<usize>,
}

impl Normalized {
    /// The original span of the normalised span `start..end`.
    pub(crate) fn original(&self, start: usize, end: usize) -> (usize, usize) {
        let s = self
            .starts
            .get(start)
            .copied()
            .unwrap_or(self.original_len());
        let e = end
            .checked_sub(1)
            .and_then(|i| self.ends.get(i).copied())
            .unwrap_or(s);
        (s, e.max(s))
    }

    /// The normalised offset of the first byte at or after original `at`.
    pub(crate) fn position(&self, at: usize) -> usize {
        self.starts.partition_point(|&s| s < at)
    }

    fn original_len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    fn push(&mut self, c: char, start: usize, end: usize) {
        let mut buf = [0u8; 4];
        let n = c.encode_utf8(&mut buf).len();
        self.text.push(c);
        for _ in 0..n {
            self.starts.push(start);
            self.ends.push(end);
        }
    }
}

/// Characters the model does not see as text: Unicode's default-ignorable
/// code points (DerivedCoreProperties.txt, `Default_Ignorable_Code_Point`)
/// other than the tag characters that spell ASCII ([`tag_ascii`]): soft
/// hyphen, combining grapheme joiner, zero-width characters and joiners,
/// directional marks and controls (embeddings, overrides, isolates, the
/// Arabic letter mark), Hangul fillers, Mongolian and other variation
/// selectors, byte-order mark, musical and shorthand format controls, the
/// begin and cancel of a tag sequence, and the code points Unicode reserves
/// as default-ignorable. A renderer shows none of them, so any of them can
/// split a word a detector or a deny phrase looks for.
fn invisible(c: char) -> bool {
    // Sorted and apart, so a binary search finds the one range that may
    // hold `c`.
    INVISIBLE
        .binary_search_by(|&(first, last)| {
            if last < c {
                std::cmp::Ordering::Less
            } else if first > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// The [`invisible`] characters, as sorted ranges that do not touch: the
/// one list both [`invisible`] and [`invisible_class`] read.
const INVISIBLE: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{061C}', '\u{061C}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{FFF0}', '\u{FFF8}'),
    ('\u{1BCA0}', '\u{1BCA3}'),
    ('\u{1D173}', '\u{1D17A}'),
    ('\u{E0000}', '\u{E001F}'),
    ('\u{E007F}', '\u{E0FFF}'),
];

/// Whether a renderer shows nothing for `c` although the model reads it:
/// an [`invisible`] character or a tag character. The review page marks
/// exactly these (approval-service/ui/app.js, `HIDDEN_RE`; a test of the
/// service holds the two together).
pub fn renders_as_nothing(c: char) -> bool {
    invisible(c) || tag_ascii(c).is_some()
}

/// The ASCII character a Unicode tag character (U+E0020 to U+E007E)
/// spells. Tags render as nothing, but models read them as the ASCII text
/// they shadow ("ASCII smuggling"), so the detectors and content policy
/// read them so too.
fn tag_ascii(c: char) -> Option<char> {
    let code = u32::from(c);
    (0xE0020..=0xE007E)
        .contains(&code)
        .then(|| char::from_u32(code - 0xE0000))
        .flatten()
}

/// `s` as the detectors should read it, or `None` when that is `s` itself.
pub(crate) fn normalize(s: &str) -> Option<Normalized> {
    // Folding leaves ASCII as it is, so an ASCII text reads differently
    // only where an escape decodes: most texts have none, and need no copy.
    if s.is_ascii() && !has_decoded_escape(s) {
        return None;
    }
    let out = read_whole(s);
    (out.text != s).then_some(out)
}

/// `s` read character by character as the model reads it.
fn read_whole(s: &str) -> Normalized {
    let mut out = Normalized {
        text: String::with_capacity(s.len()),
        starts: Vec::with_capacity(s.len()),
        ends: Vec::with_capacity(s.len()),
    };
    let mut i = 0;
    while let Read::At(c, len) = read_at(s, i, false) {
        fold(c, |d| out.push(d, i, i + len));
        i += len;
    }
    out
}

/// Whether an escape the model decodes (`%41`, `&#65;`, `\\u0041`)
/// starts anywhere in `s`: only `%`, `&` and `\\` can start one, found a
/// word at a time.
fn has_decoded_escape(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(at) = b
        .get(i..)
        .and_then(|r| memchr::memchr3(b'%', b'&', b'\\', r))
    {
        let p = i + at;
        if matches!(read_at(s, p, false), Read::At(_, len) if len > 1) {
            return true;
        }
        i = p + 1;
    }
    false
}

/// What the model reads at one byte offset of a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// This character (a percent or entity escape decoded, not yet
    /// [`fold`]ed), spelled with this many bytes.
    At(char, usize),
    /// An escape that more text could still complete (`%4`, `&#6`).
    Unfinished,
    /// The end of the text.
    End,
}

/// The character at byte `i` of `s` as the model reads it. With `more`
/// (the text may still continue), an escape cut short by the end of `s`
/// is [`Read::Unfinished`]; without it, it is read as written.
pub(crate) fn read_at(s: &str, i: usize, more: bool) -> Read {
    let b = s.as_bytes();
    match b.get(i) {
        None => return Read::End,
        Some(b'%') => {
            if let Some(c) = percent_at(b, i) {
                return Read::At(c, 3);
            }
            if more && percent_may_follow(b.get(i + 1..).unwrap_or_default()) {
                return Read::Unfinished;
            }
        }
        Some(b'&') => {
            if let Some((c, len)) = entity_at(s, i) {
                return Read::At(c, len);
            }
            if more && entity_may_follow(b.get(i + 1..).unwrap_or_default()) {
                return Read::Unfinished;
            }
        }
        Some(b'\\') => {
            if let Some(c) = json_escape_at(b, i) {
                return Read::At(c, 6);
            }
            if more && json_escape_may_follow(b.get(i + 1..).unwrap_or_default()) {
                return Read::Unfinished;
            }
        }
        Some(_) => {}
    }
    match s.get(i..).and_then(|r| r.chars().next()) {
        Some(c) => Read::At(c, c.len_utf8()),
        None => Read::End,
    }
}

/// Whether `s`, which may still continue, already reads as at least `n`
/// bytes: invisible characters read as nothing, and an escape more text
/// could complete as not yet known.
pub(crate) fn reads_at_least(s: &str, n: usize) -> bool {
    let mut seen = 0;
    let mut i = 0;
    while let Read::At(c, len) = read_at(s, i, true) {
        fold(c, |d| seen += d.len_utf8());
        if seen >= n {
            return true;
        }
        i += len;
    }
    n == 0
}

/// Whether `rest`, all that follows a `%` so far, can still become the two
/// hex digits of an escape.
fn percent_may_follow(rest: &[u8]) -> bool {
    rest.len() < 2 && rest.iter().all(u8::is_ascii_hexdigit)
}

/// Whether `rest`, all that follows a `&` so far, can still become an
/// entity: shorter than [`entity_at`] looks, no `;` yet, and only
/// characters an entity name or number is spelled with.
fn entity_may_follow(rest: &[u8]) -> bool {
    rest.len() < ENTITY_MAX_BYTES
        && rest
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'#' || *c == b'+')
}

/// `s` as the model reads it, for content-policy rules (no map back).
pub(crate) fn as_read(s: &str) -> String {
    normalize(s).map_or_else(|| s.to_string(), |n| n.text)
}

/// The confusable skeleton (Unicode TS #39) of `s` lower-cased: letters
/// that look alike (Cyrillic `о` and Latin `o`, `0` and `O`) fold to one,
/// so a phrase spelled with look-alikes is the same phrase. Lower-casing
/// first keeps phrases case-insensitive: the skeleton itself is not.
pub(crate) fn skeleton(s: &str) -> String {
    unicode_security::confusable_detection::skeleton(&s.to_lowercase()).collect()
}

/// Where [`reads_as`] looks for characters a reader takes for another:
/// ASCII and Latin, Greek and Cyrillic, phonetic letters, letterlike
/// symbols, full-width forms and mathematical alphanumerics.
const LOOK_ALIKE_RANGES: &[(u32, u32)] = &[
    (0x21, 0x24F),
    (0x370, 0x4FF),
    (0x1D00, 0x1DBF),
    (0x2100, 0x218F),
    (0xFF01, 0xFF5E),
    (0x1D400, 0x1D7FF),
];

/// The case-insensitive skeleton of what `c` reads as, or `None` when it
/// reads as nothing or as more than one character.
fn read_key(c: char) -> Option<String> {
    let mut folded = String::new();
    fold(c, |d| folded.push(d));
    let mut chars = folded.chars();
    match (chars.next(), chars.next()) {
        (Some(_), None) => Some(skeleton(&folded).to_lowercase()),
        _ => None,
    }
}

/// Every character (in [`LOOK_ALIKE_RANGES`]) that reads as `c`, in any
/// case: its compatibility form has `c`'s confusable skeleton (`o`: `O`,
/// `0`, Cyrillic `о`, Greek `ο`, full-width `ｏ`, mathematical `𝐨` ...),
/// `c` itself included. For patterns that find a phrase in text as it is
/// written, where [`as_read`] cannot be applied first (answers, whose
/// matches must be located in the original text).
pub(crate) fn reads_as(c: char) -> Vec<char> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<String, Vec<char>>> =
        std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t: std::collections::HashMap<String, Vec<char>> = std::collections::HashMap::new();
        for &(from, to) in LOOK_ALIKE_RANGES {
            for d in (from..=to).filter_map(char::from_u32) {
                if let Some(key) = read_key(d) {
                    t.entry(key).or_default().push(d);
                }
            }
        }
        t
    });
    let mut out: Vec<char> = read_key(c)
        .and_then(|key| table.get(&key).cloned())
        .unwrap_or_default();
    out.extend(c.to_lowercase().chain(c.to_uppercase()));
    out.push(c);
    out.sort_unstable();
    out.dedup();
    out
}

/// A regex class of the characters a reader does not see, those
/// [`invisible`] names: what may sit between the letters of a phrase as
/// written. The review page's `HIDDEN_RE` (approval-service/ui/app.js) marks
/// these and the tag characters ([`renders_as_nothing`]).
pub(crate) fn invisible_class() -> String {
    let ranges: String = INVISIBLE
        .iter()
        .map(|&(first, last)| match first == last {
            true => format!("\\x{{{:04X}}}", u32::from(first)),
            false => format!(
                "\\x{{{:04X}}}-\\x{{{:04X}}}",
                u32::from(first),
                u32::from(last)
            ),
        })
        .collect();
    format!("[{ranges}]")
}

/// Calls `emit` with `c` folded to its compatibility form (nothing when
/// invisible).
pub(crate) fn fold(c: char, mut emit: impl FnMut(char)) {
    if c.is_ascii() {
        emit(c);
    } else if let Some(ascii) = tag_ascii(c) {
        emit(ascii);
    } else if !invisible(c) {
        decompose_compatible(c, |d| {
            // Combining marks left by the decomposition are not text.
            if !('\u{0300}'..='\u{036F}').contains(&d) {
                emit(d);
            }
        });
    }
}

/// An ASCII character written `%XX` at `i`.
fn percent_at(b: &[u8], i: usize) -> Option<char> {
    let hex = b.get(i + 1..i + 3)?;
    let s = std::str::from_utf8(hex).ok()?;
    let v = u8::from_str_radix(s, 16).ok()?;
    (v.is_ascii() && !v.is_ascii_control()).then_some(char::from(v))
}

/// A character written as a JSON escape `\\uXXXX` at `i`, as text carries
/// it when it holds JSON (tool-call arguments as they stream): the model
/// reads the character. Surrogates (half a pair) are read as written.
fn json_escape_at(b: &[u8], i: usize) -> Option<char> {
    if b.get(i + 1) != Some(&b'u') {
        return None;
    }
    let hex = std::str::from_utf8(b.get(i + 2..i + 6)?).ok()?;
    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
    (!c.is_control()).then_some(c)
}

/// Whether `rest`, all that follows a `\\` so far, can still become a
/// `\\uXXXX` escape.
fn json_escape_may_follow(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b'u', digits)) => digits.len() < 4 && digits.iter().all(u8::is_ascii_hexdigit),
        Some(_) => false,
    }
}

/// Named entities that spell characters detectors look for.
const ENTITIES: &[(&str, char)] = &[
    ("amp", '&'),
    ("commat", '@'),
    ("period", '.'),
    ("colon", ':'),
    ("sol", '/'),
    ("plus", '+'),
    ("hyphen", '-'),
    ("dash", '-'),
    ("lowbar", '_'),
    ("nbsp", ' '),
    ("num", '#'),
    ("lpar", '('),
    ("rpar", ')'),
    ("equals", '='),
    ("quot", '"'),
    ("apos", '\''),
    ("lt", '<'),
    ("gt", '>'),
];

/// Bytes after the `&` within which an entity's `;` must come.
const ENTITY_MAX_BYTES: usize = 12;

/// An HTML entity (`&#64;`, `&#x40;`, `&commat;`) at `i`: the character
/// and the entity's length.
fn entity_at(s: &str, i: usize) -> Option<(char, usize)> {
    let rest = s.get(i + 1..)?;
    // By bytes: a character cut at the limit must not hide the `;` before it.
    let end = rest
        .bytes()
        .take(ENTITY_MAX_BYTES)
        .position(|b| b == b';')?;
    let name = rest.get(..end)?;
    let c = if let Some(num) = name.strip_prefix('#') {
        let v = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse::<u32>().ok()?,
        };
        char::from_u32(v)?
    } else {
        ENTITIES.iter().find(|(n, _)| *n == name)?.1
    };
    Some((c, end + 2))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_shortcut_for_plain_ascii_says_what_reading_every_character_says() {
        // Near misses of every escape, escapes that decode, and mixes: the
        // shortcut must answer `None` exactly when reading the whole text
        // leaves it as it is.
        let pieces = [
            "plain", "%", "%4", "%41", "%4g", "%7F", "%0a", "&", "&amp", "&amp;", "&#65;",
            "&#x41;", "&#xZZ;", "&nosuch;", "\\", "\\u", "\\u004", "\\u0041", "\\uD800", "\\n",
            " ", "AT&T", "100%", "C:\\dir", "é", "\u{200B}",
        ];
        let mut texts: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
        for a in pieces {
            for b in pieces {
                texts.push(format!("{a}{b}"));
                texts.push(format!("x{a} {b}y"));
            }
        }
        for t in texts {
            let whole = read_whole(&t);
            let expected = (whole.text != t).then_some(whole.text);
            assert_eq!(normalize(&t).map(|n| n.text), expected, "{t:?}");
        }
    }

    #[test]
    fn the_invisible_class_and_the_ranges_are_one_set_in_order() {
        let class = regex::Regex::new(&format!("^{}$", invisible_class())).unwrap();
        for c in (0..0x3_0000)
            .chain(0xE_0000..0xE_0200)
            .filter_map(char::from_u32)
        {
            assert_eq!(class.is_match(&c.to_string()), invisible(c), "{c:?}");
        }
        // The binary search needs the ranges sorted and apart.
        for pair in INVISIBLE.windows(2) {
            assert!(pair[0].0 <= pair[0].1 && pair[0].1 < pair[1].0, "{pair:?}");
        }
    }

    #[test]
    fn what_renders_as_nothing_is_unicodes_default_ignorable_set() {
        // Unicode's own list (the regex crate's tables), so a character a
        // later Unicode adds or this list forgot fails here.
        let ignorable = regex::Regex::new(r"^\p{Default_Ignorable_Code_Point}$").unwrap();
        for c in (0..=0x10_FFFF).filter_map(char::from_u32) {
            assert_eq!(
                ignorable.is_match(&c.to_string()),
                renders_as_nothing(c),
                "{c:?}"
            );
        }
    }

    #[test]
    fn look_alikes_read_as_the_letter() {
        let o = reads_as('o');
        for c in ['o', 'O', '0', '\u{43e}', '\u{3bf}', '\u{ff4f}', '\u{1d428}'] {
            assert!(o.contains(&c), "{c:?} in {o:?}");
        }
        assert!(!o.contains(&'a'));
        assert!(reads_as('a').contains(&'\u{430}'));
        // A character outside the tables still reads as itself.
        assert_eq!(reads_as('\u{4e2d}'), vec!['\u{4e2d}']);
    }

    fn norm(s: &str) -> String {
        normalize(s).map_or_else(|| s.to_string(), |n| n.text)
    }

    #[test]
    fn what_the_model_reads() {
        assert_eq!(norm("ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ"), "jane@example.com");
        assert_eq!(norm("ja\u{200B}ne@exa\u{00AD}mple.com"), "jane@example.com");
        assert_eq!(norm("jane%40example.com"), "jane@example.com");
        assert_eq!(norm("jane&#64;example&#x2E;com"), "jane@example.com");
        assert_eq!(norm("jane&commat;example&period;com"), "jane@example.com");
        // A character of several bytes after the entity is no reason to
        // leave it undecoded.
        assert_eq!(norm("jane&#64;example&#x2E;com😀"), "jane@example.com😀");
        assert_eq!(
            norm("4111\u{00A0}1111\u{202F}1111 1111"),
            "4111 1111 1111 1111"
        );
        // Nothing to do: no copy.
        assert!(normalize("plain text, 100% sure & fine").is_none());
        assert!(reads_at_least("a", 1) && !reads_at_least("a", 2));
        assert!(!reads_at_least("\u{200B}\u{00AD}%4", 1));
        assert!(reads_at_least("\u{200B}&#64;", 1));
        assert_eq!(norm("50%off &nbsp"), "50%off &nbsp");
        // JSON escapes as text carrying JSON writes them (tool arguments).
        assert_eq!(norm(r"jane\u0040example\u002Ecom"), "jane@example.com");
        assert_eq!(norm(r"C:\users\u12 \n \ud83d"), r"C:\users\u12 \n \ud83d");
        assert!(!reads_at_least(r"\u00", 1) && !reads_at_least("\\", 1));
        assert!(reads_at_least(r"\x", 1) && reads_at_least(r"\u0040", 1));
    }

    #[test]
    fn spans_map_back_to_the_original() {
        let s = "mail: ｊａｎｅ＠ｅｘ.com%21";
        let n = normalize(s).unwrap();
        let at = n.text.find("jane").unwrap();
        let end = n.text.find(".com").unwrap() + 4;
        let (os, oe) = n.original(at, end);
        assert_eq!(&s[os..oe], "ｊａｎｅ＠ｅｘ.com");
        let (os, oe) = n.original(end, n.text.len());
        assert_eq!(&s[os..oe], "%21");
        assert_eq!(n.position(0), 0);
        assert_eq!(n.position(os), end);
    }
}
