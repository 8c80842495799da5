//! The unified line diff of a reviewer's edit of a request body, kept in
//! its record (`edit_diff`).
//!
//! The diff itself is the `similar` crate's (Myers, with a time bound);
//! this module only renders it in the format the records have always had:
//! `--- original` / `+++ edited`, hunks with three lines of context whose
//! headers always give both start and length (`@@ -2,1 +2,1 @@`, where a
//! classic unified diff would write `@@ -2 +2 @@`), and no "no newline at
//! end of file" markers (the texts are compared line by line).

use std::ops::Range;
use std::time::Duration;

use similar::{Algorithm, ChangeTag, TextDiff};

/// Lines of context around each change.
const CONTEXT: usize = 3;

/// Longest the diff may take: it runs inside the record chain's
/// transaction. Past it the differing middle part is shown as removed then
/// added, which is still a correct diff.
const MAX_DIFF_TIME: Duration = Duration::from_millis(100);

/// A unified diff (`--- original` / `+++ edited`, hunks with three lines of
/// context) from `a` to `b`; empty when the texts have the same lines.
pub fn unified_diff(a: &str, b: &str) -> String {
    let old: Vec<&str> = a.lines().collect();
    let new: Vec<&str> = b.lines().collect();
    let diff = TextDiff::configure()
        .algorithm(Algorithm::Myers)
        .timeout(MAX_DIFF_TIME)
        .diff_slices(&old, &new);
    let hunks = diff.grouped_ops(CONTEXT);
    if hunks.is_empty() {
        return String::new();
    }
    let mut out = String::from("--- original\n+++ edited\n");
    for hunk in &hunks {
        let (Some(first), Some(last)) = (hunk.first(), hunk.last()) else {
            continue;
        };
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            hunk_range(first.old_range().start..last.old_range().end),
            hunk_range(first.new_range().start..last.new_range().end),
        ));
        for change in hunk.iter().flat_map(|op| diff.iter_changes(op)) {
            out.push(match change.tag() {
                ChangeTag::Equal => ' ',
                ChangeTag::Delete => '-',
                ChangeTag::Insert => '+',
            });
            out.push_str(change.value());
            out.push('\n');
        }
    }
    out
}

/// `start,length` of a hunk's lines (1-based; an empty range starts at the
/// line before it).
fn hunk_range(lines: Range<usize>) -> String {
    let len = lines.len();
    let start = if len == 0 {
        lines.start
    } else {
        lines.start + 1
    };
    format!("{start},{len}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn identical_is_empty() {
        assert_eq!(unified_diff("a\nb\n", "a\nb"), "");
        assert_eq!(unified_diff("", ""), "");
    }

    #[test]
    fn one_changed_line_with_context() {
        let a = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let b = "1\n2\n3\n4\nFIVE\n6\n7\n8\n9\n";
        assert_eq!(
            unified_diff(a, b),
            "--- original\n+++ edited\n@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+FIVE\n 6\n 7\n 8\n"
        );
    }

    #[test]
    fn separate_hunks_and_pure_insert() {
        let a: String = (1..=20).map(|n| format!("{n}\n")).collect();
        let b: String = (1..=20)
            .map(|n| match n {
                2 => "two\n".to_string(),
                18 => "18\nnew\n".to_string(),
                n => format!("{n}\n"),
            })
            .collect();
        let d = unified_diff(&a, &b);
        assert_eq!(d.matches("@@ -").count(), 2, "{d}");
        assert!(d.contains("-2\n+two\n"), "{d}");
        assert!(
            d.contains("@@ -16,5 +16,6 @@\n 16\n 17\n 18\n+new\n 19\n 20\n"),
            "{d}"
        );
        assert_eq!(
            unified_diff("", "x\n"),
            "--- original\n+++ edited\n@@ -0,0 +1,1 @@\n+x\n"
        );
    }

    #[test]
    fn hunks_merge_as_in_diff_u() {
        // As `diff -u`: changes at most six unchanged lines apart share a
        // hunk, seven apart do not.
        let a: String = (1..=20).map(|n| format!("{n}\n")).collect();
        let changed = |at: [u32; 2]| -> String {
            (1..=20)
                .map(|n| match n {
                    n if at.contains(&n) => format!("x{n}\n"),
                    n => format!("{n}\n"),
                })
                .collect()
        };
        let six_apart = unified_diff(&a, &changed([3, 10]));
        assert_eq!(six_apart.matches("@@ -").count(), 1, "{six_apart}");
        assert!(six_apart.contains("@@ -1,13 +1,13 @@\n"), "{six_apart}");
        let seven_apart = unified_diff(&a, &changed([3, 11]));
        assert!(
            seven_apart.contains("@@ -1,6 +1,6 @@\n") && seven_apart.contains("@@ -8,7 +8,7 @@\n"),
            "{seven_apart}"
        );
    }

    #[test]
    fn lcs_keeps_common_lines() {
        let d = unified_diff("a\nb\nc\nd\n", "b\nx\nd\ne\n");
        assert_eq!(
            d,
            "--- original\n+++ edited\n@@ -1,4 +1,4 @@\n-a\n b\n-c\n+x\n d\n+e\n"
        );
    }
}
