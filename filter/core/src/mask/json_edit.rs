//! Surgical JSON edits: replace the values at given paths in the original
//! bytes, so that everything else (key order, number spelling, whitespace,
//! escapes) stays byte for byte as the client sent it.

use std::collections::BTreeMap;

/// One step of a path into a JSON document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Seg {
    Key(String),
    Idx(usize),
}

/// Path → replacement JSON text.
pub(crate) type Edits = BTreeMap<Vec<Seg>, String>;

const MAX_DEPTH: usize = 256;

/// Applies `edits` to the JSON document `src`. Every path must exist (a path
/// present twice through a duplicate key is replaced at both places).
pub(crate) fn apply(src: &[u8], edits: &Edits) -> Result<Vec<u8>, String> {
    if edits.is_empty() {
        return Ok(src.to_vec());
    }
    let mut s = Scanner {
        b: src,
        i: 0,
        path: Vec::new(),
        edits,
        ranges: Vec::new(),
    };
    s.value(0)?;
    s.ws();
    if s.i != src.len() {
        return Err("trailing bytes after the JSON document".into());
    }
    let mut hit: Vec<&Vec<Seg>> = s.ranges.iter().map(|(_, _, p)| *p).collect();
    hit.sort();
    hit.dedup();
    if hit.len() != edits.len() {
        return Err("an edited value was not found in the document".into());
    }
    let mut out = Vec::with_capacity(src.len() + 64);
    let mut at = 0;
    for (start, end, path) in &s.ranges {
        if *start < at {
            return Err("nested edits".into());
        }
        out.extend_from_slice(src.get(at..*start).ok_or("bad edit range")?);
        out.extend_from_slice(edits.get(*path).ok_or("bad edit path")?.as_bytes());
        at = *end;
    }
    out.extend_from_slice(src.get(at..).ok_or("bad edit range")?);
    Ok(out)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    path: Vec<Seg>,
    edits: &'a Edits,
    ranges: Vec<(usize, usize, &'a Vec<Seg>)>,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("JSON nested too deeply".into());
        }
        self.ws();
        let start = self.i;
        let edit = self.edits.get_key_value(&self.path).map(|(k, _)| k);
        match self.peek() {
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => {
                self.string()?;
            }
            Some(_) => self.scalar()?,
            None => return Err("unexpected end of JSON".into()),
        }
        if let Some(path) = edit {
            self.ranges.push((start, self.i, path));
        }
        Ok(())
    }

    fn object(&mut self, depth: usize) -> Result<(), String> {
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let (ks, ke) = self.string()?;
            let raw = self.b.get(ks..ke).ok_or("bad key")?;
            let key = if raw.contains(&b'\\') {
                serde_json::from_slice::<String>(raw).map_err(|e| e.to_string())?
            } else {
                String::from_utf8(
                    raw.get(1..raw.len().saturating_sub(1))
                        .unwrap_or_default()
                        .to_vec(),
                )
                .map_err(|e| e.to_string())?
            };
            self.expect(b':')?;
            self.path.push(Seg::Key(key));
            self.value(depth + 1)?;
            self.path.pop();
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(format!("expected `,` or `}}` at byte {}", self.i)),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), String> {
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        let mut n = 0;
        loop {
            self.path.push(Seg::Idx(n));
            self.value(depth + 1)?;
            self.path.pop();
            n += 1;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(format!("expected `,` or `]` at byte {}", self.i)),
            }
        }
    }

    /// Skips a string; returns its byte range including the quotes.
    fn string(&mut self) -> Result<(usize, usize), String> {
        let start = self.i;
        if self.peek() != Some(b'"') {
            return Err(format!("expected a string at byte {}", self.i));
        }
        self.i += 1;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok((start, self.i));
                }
                Some(b'\\') => self.i += 2,
                Some(_) => self.i += 1,
                None => return Err("unterminated string".into()),
            }
        }
    }

    fn scalar(&mut self) -> Result<(), String> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.i += 1;
        }
        if self.i == start {
            return Err(format!("unexpected byte at {}", self.i));
        }
        Ok(())
    }
}

/// JSON text of a string value.
pub(crate) fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(k: &str) -> Seg {
        Seg::Key(k.into())
    }

    #[test]
    fn replaces_only_the_edited_values() {
        let src = br#" {"z": 1.50, "a\u0062": [ "x", {"t":"old"} ], "n": null } "#;
        let mut e = Edits::new();
        e.insert(
            vec![key("ab"), Seg::Idx(1), key("t")],
            json_string("new \"q\""),
        );
        e.insert(vec![key("n")], "\"s\"".into());
        let out = apply(src, &e).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#" {"z": 1.50, "a\u0062": [ "x", {"t":"new \"q\""} ], "n": "s" } "#
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let mut e = Edits::new();
        e.insert(vec![key("missing")], "1".into());
        assert!(apply(br#"{"a":1}"#, &e).is_err());
        assert!(apply(br#"{"a":"#, &e).is_err());
    }
}
