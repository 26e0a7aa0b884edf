//! containerd's filter expressions, as `List` receives them.
//!
//! A filter is a comma-separated conjunction of `selector`, `selector==value`,
//! `selector!=value` or `selector~=regexp`; a selector is a dot-separated field path whose
//! parts may be double-quoted (`labels."containerd.io/gc.root"`); values may be quoted too.
//! Several filters are alternatives. Snapshot fields: `name`, `parent`, `kind`,
//! `labels.KEY`.

use regex_lite::Regex;

use crate::store::Snapshot;
use crate::Error;

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Clause {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter (one alternative).
#[derive(Debug)]
pub struct Filter(Vec<Clause>);

fn bad(expr: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("filter {expr:?}: {why}"))
}

/// Reads a possibly quoted token from `s`, stopping at any of `stops` outside quotes.
fn token<'a>(expr: &str, s: &'a str, stops: &[&str]) -> Result<(String, &'a str), Error> {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                '"' => return Ok((out, &rest[i + 1..])),
                c => out.push(c),
            }
        }
        return Err(bad(expr, "unterminated quote"));
    }
    let end = stops
        .iter()
        .filter_map(|st| s.find(st))
        .min()
        .unwrap_or(s.len());
    Ok((s[..end].trim_end().to_string(), &s[end..]))
}

impl Filter {
    /// Parses one filter expression.
    pub fn parse(expr: &str) -> Result<Filter, Error> {
        let mut clauses = Vec::new();
        let mut rest = expr;
        loop {
            let mut path = Vec::new();
            loop {
                let (part, r) = token(expr, rest, &[".", "==", "!=", "~=", ","])?;
                if part.is_empty() {
                    return Err(bad(expr, "empty field name"));
                }
                path.push(part);
                rest = r;
                match rest.strip_prefix('.') {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            let op = if let Some(r) = rest.strip_prefix("==") {
                let (v, r) = token(expr, r, &[","])?;
                rest = r;
                Op::Eq(v)
            } else if let Some(r) = rest.strip_prefix("!=") {
                let (v, r) = token(expr, r, &[","])?;
                rest = r;
                Op::Ne(v)
            } else if let Some(r) = rest.strip_prefix("~=") {
                let (v, r) = token(expr, r, &[","])?;
                rest = r;
                Op::Matches(Regex::new(&v).map_err(|e| bad(expr, &e.to_string()))?)
            } else {
                Op::Present
            };
            clauses.push(Clause { path, op });
            rest = rest.trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r,
                None if rest.is_empty() => break,
                None => return Err(bad(expr, &format!("unexpected {rest:?}"))),
            }
        }
        Ok(Filter(clauses))
    }

    /// Whether the snapshot `key` matches every clause.
    pub fn matches(&self, key: &str, s: &Snapshot) -> bool {
        self.0.iter().all(|c| {
            let value: Option<&str> = match c.path.iter().map(String::as_str).collect::<Vec<_>>()[..] {
                ["name"] => Some(key),
                ["parent"] => Some(&s.parent),
                ["kind"] => Some(s.kind.as_str()),
                ["labels", ref rest @ ..] if !rest.is_empty() => {
                    s.labels.get(&rest.join(".")).map(String::as_str)
                }
                _ => None,
            };
            match (&c.op, value) {
                (Op::Present, v) => v.is_some(),
                (Op::Eq(want), Some(v)) => v == want,
                (Op::Ne(want), Some(v)) => v != want,
                (Op::Ne(_), None) => true,
                (Op::Matches(re), Some(v)) => re.is_match(v),
                (_, None) => false,
            }
        })
    }
}

/// Whether a snapshot matches any of `filters` (all, when there are none).
pub fn matches_any(filters: &[Filter], key: &str, s: &Snapshot) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(key, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Kind, Time};
    use std::collections::BTreeMap;

    fn snap() -> Snapshot {
        Snapshot {
            id: 1,
            kind: Kind::Committed,
            parent: "p1".into(),
            labels: BTreeMap::from([
                ("containerd.io/gc.root".into(), "2024".into()),
                ("plain".into(), "x y".into()),
            ]),
            created: Time::now(),
            updated: Time::now(),
            usage: None,
            remote: None,
        }
    }

    fn m(expr: &str) -> bool {
        Filter::parse(expr)
            .unwrap()
            .matches("default/1/sha256:abc", &snap())
    }

    #[test]
    fn containerd_filter_syntax() {
        assert!(m("kind==committed"));
        assert!(!m("kind==active"));
        assert!(m("parent==p1,kind!=view"));
        assert!(m(r#"labels."containerd.io/gc.root""#));
        assert!(m(r#"labels."containerd.io/gc.root"==2024"#));
        assert!(!m("labels.absent"));
        assert!(m("labels.absent!=1"));
        assert!(m(r#"labels.plain=="x y""#));
        assert!(m("name~=^default/[0-9]+/sha256"));
        assert!(!m("name~=^k8s"));
        assert!(Filter::parse("labels.\"open").is_err());
        assert!(Filter::parse("name~=(").is_err());
        assert!(Filter::parse("").is_err());
    }
}
