//! Checks shared by the agent and the control plane.
//!
//! - [`in_range`]: config validators, so that every out-of-range setting is reported in the
//!   same words: `must be between MIN and MAX[ UNIT], got V`. Callers wrap the message in their
//!   own error type with the field's name.
//! - [`pg_text`], [`pg_json`]: strings and JSON documents from outside (API bodies, query
//!   parameters, cursors, sync batches) before they reach PostgreSQL, which refuses NUL in
//!   `text` and `\0` in `jsonb` with an error that would otherwise surface as a 500. The
//!   [`TextError`] names the field (a JSON path for documents) so the API can answer 400 with
//!   it. Unpaired UTF-16 surrogates cannot reach these functions: a Rust `&str` cannot hold
//!   them and serde_json refuses them while parsing.

use std::fmt::{Display, Write as _};

/// `Ok(v)` when `min <= v <= max`; otherwise the message. `unit` follows the bounds
/// (`" ms"`, `" s"`, or `""`).
pub fn in_range<T: PartialOrd + Display>(v: T, min: T, max: T, unit: &str) -> Result<T, String> {
    if min <= v && v <= max {
        Ok(v)
    } else {
        Err(format!("must be between {min} and {max}{unit}, got {v}"))
    }
}

/// What is wrong with a string bound for PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextProblem {
    #[error("must not contain NUL characters")]
    Nul,
    #[error("must be at most {max} bytes, got {len}")]
    TooLong { max: usize, len: usize },
    #[error("must not be nested deeper than {max} levels")]
    TooDeep { max: usize },
}

/// A string or JSON document that PostgreSQL would refuse (or that is too large), with the
/// field it came from. Display: `{field} {problem}`, e.g. `labels.site must not contain NUL
/// characters`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct TextError {
    /// The field as the client named it (a JSON path inside a document: `metrics.rmse`,
    /// `labels["a b"]`, `tags[2]`).
    pub field: String,
    pub problem: TextProblem,
}

/// `Ok(value)` when `value` has no NUL and is at most `max_bytes` bytes long.
pub fn pg_text<'a>(field: &str, value: &'a str, max_bytes: usize) -> Result<&'a str, TextError> {
    let problem = if value.len() > max_bytes {
        TextProblem::TooLong {
            max: max_bytes,
            len: value.len(),
        }
    } else if value.contains('\0') {
        TextProblem::Nul
    } else {
        return Ok(value);
    };
    Err(TextError {
        field: field.to_owned(),
        problem,
    })
}

/// Deepest JSON document [`pg_json`] accepts (serde_json itself stops at 128).
pub const MAX_JSON_DEPTH: usize = 32;

/// Checks a JSON document bound for a `jsonb` column: no NUL in any string or key, at most
/// [`MAX_JSON_DEPTH`] levels, at most `max_bytes` bytes as compact JSON. The error names the
/// path of the first offending value under `field`.
pub fn pg_json(field: &str, value: &serde_json::Value, max_bytes: usize) -> Result<(), TextError> {
    let err = |field: String, problem| Err(TextError { field, problem });
    // An iterative walk: a hostile document cannot exhaust the stack.
    let mut stack: Vec<(String, &serde_json::Value, usize)> = vec![(field.to_owned(), value, 0)];
    while let Some((path, v, depth)) = stack.pop() {
        if depth > MAX_JSON_DEPTH {
            return err(
                path,
                TextProblem::TooDeep {
                    max: MAX_JSON_DEPTH,
                },
            );
        }
        match v {
            serde_json::Value::String(s) if s.contains('\0') => return err(path, TextProblem::Nul),
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push((format!("{path}[{i}]"), item, depth + 1));
                }
            }
            serde_json::Value::Object(map) => {
                for (k, item) in map.iter().rev() {
                    let child = json_path(&path, k);
                    if k.contains('\0') {
                        return err(child, TextProblem::Nul);
                    }
                    stack.push((child, item, depth + 1));
                }
            }
            _ => {}
        }
    }
    let len = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if len > max_bytes {
        return err(
            field.to_owned(),
            TextProblem::TooLong {
                max: max_bytes,
                len,
            },
        );
    }
    Ok(())
}

/// `path.key` for plain keys, `path["key"]` (JSON-escaped) for any other.
fn json_path(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let mut out = String::with_capacity(path.len() + key.len() + 4);
    out.push_str(path);
    if plain {
        let _ = write!(out, ".{key}");
    } else {
        let shown: String = key.chars().take(64).collect();
        let quoted = serde_json::to_string(&shown).unwrap_or_default();
        let _ = write!(out, "[{quoted}]");
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn pg_text_refuses_nul_and_over_long_strings_naming_the_field() {
        assert_eq!(pg_text("display_name", "Acme", 8), Ok("Acme"));
        assert_eq!(pg_text("display_name", "", 8), Ok(""));
        let e = pg_text("display_name", "Ac\0me", 64).unwrap_err();
        assert_eq!(e.field, "display_name");
        assert_eq!(
            e.to_string(),
            "display_name must not contain NUL characters"
        );
        let e = pg_text("cursor", "123456789", 8).unwrap_err();
        assert_eq!(e.to_string(), "cursor must be at most 8 bytes, got 9");
        // Length counts bytes, not characters.
        assert!(pg_text("m", "ééé", 5).is_err());
    }

    #[test]
    fn pg_json_names_the_path_of_the_first_nul() {
        assert_eq!(
            pg_json("labels", &json!({"site": "a", "n": [1, "b"]}), 1024),
            Ok(())
        );
        let e = pg_json("labels", &json!({"site": "a\0"}), 1024).unwrap_err();
        assert_eq!(e.to_string(), "labels.site must not contain NUL characters");
        let e = pg_json("metrics", &json!({"a b": {"x": ["ok", "\0"]}}), 1024).unwrap_err();
        assert_eq!(e.field, "metrics[\"a b\"].x[1]");
        let e = pg_json("labels", &json!({"k\0": 1}), 1024).unwrap_err();
        assert_eq!(e.problem, TextProblem::Nul);
        assert!(e.field.starts_with("labels["), "{}", e.field);
        let e = pg_json("labels", &json!({"k": "x".repeat(100)}), 50).unwrap_err();
        assert!(
            matches!(e.problem, TextProblem::TooLong { max: 50, .. }),
            "{e}"
        );
    }

    #[test]
    fn pg_json_refuses_deep_documents_without_recursion() {
        let mut v = json!("leaf");
        for _ in 0..MAX_JSON_DEPTH + 1 {
            v = json!([v]);
        }
        let e = pg_json("doc", &v, usize::MAX).unwrap_err();
        assert_eq!(
            e.problem,
            TextProblem::TooDeep {
                max: MAX_JSON_DEPTH
            }
        );
    }

    /// Any JSON value: the shapes a client can send, strings with NUL among them.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "\\PC{0,8}".prop_map(serde_json::Value::from),
            ".{0,3}\u{0}.{0,3}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().any(has_nul),
            serde_json::Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(crate::test_support::proptest_config(2000))]

        #[test]
        fn pg_text_accepts_exactly_the_short_nul_free_strings(s in "\\PC{0,40}|.{0,5}\u{0}.{0,5}", max in 0usize..48) {
            let ok = !s.contains('\0') && s.len() <= max;
            prop_assert_eq!(pg_text("f", &s, max).is_ok(), ok);
        }

        #[test]
        fn pg_json_refuses_exactly_the_documents_postgres_would(v in json_value()) {
            let r = pg_json("doc", &v, usize::MAX);
            prop_assert_eq!(r.is_err(), has_nul(&v), "{:?}", r);
            if let Err(e) = r {
                prop_assert!(e.field.starts_with("doc"));
                prop_assert_eq!(e.problem, TextProblem::Nul);
            }
        }
    }

    #[test]
    fn bounds_are_inclusive_and_the_message_names_them() {
        assert_eq!(in_range(1u64, 1, 10, ""), Ok(1));
        assert_eq!(in_range(10u64, 1, 10, ""), Ok(10));
        assert_eq!(
            in_range(0u64, 1, 10, " ms"),
            Err("must be between 1 and 10 ms, got 0".to_owned())
        );
        assert_eq!(
            in_range(11usize, 1, 10, ""),
            Err("must be between 1 and 10, got 11".to_owned())
        );
    }
}
