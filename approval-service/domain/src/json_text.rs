//! JSON text laid out anew without being re-parsed: only white space
//! outside strings changes, so numbers, strings, the order of keys and a
//! key given twice stay exactly as written (a `serde_json::Value` rounds
//! big numbers, sorts keys and keeps one of two). The edit API stores an
//! edited body compact ([`minify`]); the record's diff of an edit lays
//! both bodies out one member per line ([`pretty`]).

/// JSON's white space.
fn is_space(c: &char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The characters of `text`, each with whether it lies inside a string
/// (its quotes included), the one place that tracks strings and escapes.
fn with_string_state(text: &str) -> impl Iterator<Item = (char, bool)> + '_ {
    let (mut in_string, mut escaped) = (false, false);
    text.chars().map(move |c| {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            (c, true)
        } else {
            in_string = c == '"';
            (c, in_string)
        }
    })
}

/// Valid JSON `text` without insignificant white space.
pub fn minify(text: &str) -> String {
    with_string_state(text)
        .filter(|(c, in_string)| *in_string || !is_space(c))
        .map(|(c, _)| c)
        .collect()
}

/// `text` laid out as pretty-printed JSON (two-space indent, a member or
/// an element per line) when it is JSON, or `text` itself; two texts lay
/// out alike only when they differ by layout alone.
pub fn pretty(text: &str) -> String {
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return text.to_string();
    }
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut chars = with_string_state(text).peekable();
    let outside_space = |&(c, in_string): &(char, bool)| !in_string && is_space(&c);
    while let Some((c, in_string)) = chars.next() {
        if in_string {
            out.push(c);
            continue;
        }
        match c {
            c if is_space(&c) => {}
            '{' | '[' => {
                out.push(c);
                while chars.next_if(outside_space).is_some() {}
                // An empty one stays on its line: `[]`, `{}`.
                if let Some((close, _)) = chars.next_if(|&(n, s)| !s && matches!(n, '}' | ']')) {
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_white_space_outside_strings_changes() {
        let text = "{ \"a\" : [ 1 , 12345678901234567890123 ] ,\n \"b\\\" c\" : \"x  y\\\\\" , \"a\": {} }";
        assert_eq!(
            minify(text),
            "{\"a\":[1,12345678901234567890123],\"b\\\" c\":\"x  y\\\\\",\"a\":{}}"
        );
        assert_eq!(
            pretty(text),
            "{\n  \"a\": [\n    1,\n    12345678901234567890123\n  ],\n  \"b\\\" c\": \"x  y\\\\\",\n  \"a\": {}\n}"
        );
        assert_eq!(pretty(&minify(text)), pretty(text));
        assert_eq!(pretty("not json {"), "not json {");
        let s = "{ \"b\" : 1,\n \"a\": \"x y \\\" z\" , \"c\":[1, 2] }";
        assert_eq!(minify(s), "{\"b\":1,\"a\":\"x y \\\" z\",\"c\":[1,2]}");
    }
}
