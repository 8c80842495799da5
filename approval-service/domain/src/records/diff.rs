//! A small unified line diff (longest common subsequence), for recording a
//! reviewer's edit of a request body.

/// Lines of context around each change.
const CONTEXT: usize = 3;

/// Largest LCS table (cells) computed; beyond it the differing middle part
/// is shown as removed then added, which is still a correct diff.
const MAX_CELLS: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Equal,
    Delete,
    Insert,
}

/// The edit script turning `a` into `b`: `(op, line index in a or b)`.
fn script<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(Op, usize)> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops: Vec<(Op, usize)> = (0..prefix).map(|k| (Op::Equal, k)).collect();
    let (n, m) = (am.len(), bm.len());
    if n.saturating_mul(m) <= MAX_CELLS {
        // lcs[i][j]: length of the LCS of am[i..] and bm[j..].
        let width = m + 1;
        let mut lcs = vec![0u32; (n + 1) * width];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * width + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * width + j + 1] + 1
                } else {
                    lcs[(i + 1) * width + j].max(lcs[i * width + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && am[i] == bm[j] {
                ops.push((Op::Equal, prefix + i));
                i += 1;
                j += 1;
            } else if j == m || (i < n && lcs[(i + 1) * width + j] >= lcs[i * width + j + 1]) {
                ops.push((Op::Delete, prefix + i));
                i += 1;
            } else {
                ops.push((Op::Insert, prefix + j));
                j += 1;
            }
        }
    } else {
        ops.extend((0..n).map(|k| (Op::Delete, prefix + k)));
        ops.extend((0..m).map(|k| (Op::Insert, prefix + k)));
    }
    ops.extend((0..suffix).map(|k| (Op::Equal, a.len() - suffix + k)));
    ops
}

/// A unified diff (`--- original` / `+++ edited`, hunks with three lines of
/// context) from `a` to `b`; empty when the texts have the same lines.
pub fn unified_diff(a: &str, b: &str) -> String {
    let al: Vec<&str> = a.lines().collect();
    let bl: Vec<&str> = b.lines().collect();
    let ops = script(&al, &bl);
    // Position in a and b before each op.
    let mut pos = Vec::with_capacity(ops.len() + 1);
    let (mut pa, mut pb) = (0usize, 0usize);
    for (op, _) in &ops {
        pos.push((pa, pb));
        match op {
            Op::Equal => {
                pa += 1;
                pb += 1;
            }
            Op::Delete => pa += 1,
            Op::Insert => pb += 1,
        }
    }
    pos.push((pa, pb));

    let changes: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != Op::Equal).collect();
    if changes.is_empty() {
        return String::new();
    }
    let mut out = String::from("--- original\n+++ edited\n");
    let mut k = 0;
    while k < changes.len() {
        let start = changes[k].saturating_sub(CONTEXT);
        let mut last = changes[k];
        while k + 1 < changes.len() && changes[k + 1] - last <= 2 * CONTEXT {
            k += 1;
            last = changes[k];
        }
        let end = (last + CONTEXT + 1).min(ops.len());
        let (a0, b0) = pos[start];
        let (a1, b1) = pos[end];
        let (alen, blen) = (a1 - a0, b1 - b0);
        let astart = if alen == 0 { a0 } else { a0 + 1 };
        let bstart = if blen == 0 { b0 } else { b0 + 1 };
        out.push_str(&format!("@@ -{astart},{alen} +{bstart},{blen} @@\n"));
        for (op, idx) in &ops[start..end] {
            let (mark, line) = match op {
                Op::Equal => (' ', al[*idx]),
                Op::Delete => ('-', al[*idx]),
                Op::Insert => ('+', bl[*idx]),
            };
            out.push(mark);
            out.push_str(line);
            out.push('\n');
        }
        k += 1;
    }
    out
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
    fn lcs_keeps_common_lines() {
        let d = unified_diff("a\nb\nc\nd\n", "b\nx\nd\ne\n");
        assert_eq!(
            d,
            "--- original\n+++ edited\n@@ -1,4 +1,4 @@\n-a\n b\n-c\n+x\n d\n+e\n"
        );
    }
}
