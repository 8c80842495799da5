//! Minimal `*` wildcard patterns for rule matchers (model names, paths,
//! route names). No regex: patterns come from operators and must be obvious.

/// A pattern where `*` matches any run of characters (including none) and
/// every other character matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    parts: Vec<String>,
    anchored_start: bool,
    anchored_end: bool,
}

impl Glob {
    /// Compiles a pattern. Any string is a valid pattern.
    pub fn new(pattern: &str) -> Glob {
        Glob {
            parts: pattern
                .split('*')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            anchored_start: !pattern.starts_with('*'),
            anchored_end: !pattern.ends_with('*'),
        }
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        if self.parts.is_empty() {
            // "" matches only "", "*" (or "**") matches anything.
            return !(self.anchored_start && self.anchored_end) || text.is_empty();
        }
        let mut rest = text;
        let last = self.parts.len() - 1;
        for (i, part) in self.parts.iter().enumerate() {
            if i == 0 && self.anchored_start {
                match rest.strip_prefix(part.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                }
                if i == last && self.anchored_end {
                    return rest.is_empty();
                }
                continue;
            }
            if i == last && self.anchored_end {
                return rest.ends_with(part.as_str());
            }
            match rest.find(part.as_str()) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
        !self.anchored_end || rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let cases: &[(&str, &str, bool)] = &[
            ("gpt-4o", "gpt-4o", true),
            ("gpt-4o", "gpt-4o-mini", false),
            ("gpt-*", "gpt-4o-mini", true),
            ("gpt-*", "xgpt-4", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "gpt-4o-mini-x", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "a", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("/v1/models/*", "/v1/models/demo", true),
            ("/v1/models/*", "/v1/models", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                Glob::new(pattern).matches(text),
                *want,
                "{pattern} vs {text}"
            );
        }
    }
}
