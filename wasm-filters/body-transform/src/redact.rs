//! JSON field redaction: pure functions over `serde_json::Value`.
//!
//! A field path is dot-separated object keys (`card.number`); `*` matches every key of an
//! object; arrays are walked element by element at any level, so `items.price` reaches the
//! `price` of every element of `items`.

use serde::Deserialize;
use serde_json::Value;

/// What happens to a matched field.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The value becomes the replacement string.
    #[default]
    Replace,
    /// The field is deleted.
    Remove,
}

/// Applies one path; returns how many fields were changed.
pub fn redact_path(value: &mut Value, path: &[&str], mode: Mode, replacement: &str) -> usize {
    let Some((first, rest)) = path.split_first() else {
        return 0;
    };
    match value {
        Value::Array(items) => items
            .iter_mut()
            .map(|item| redact_path(item, path, mode, replacement))
            .sum(),
        Value::Object(map) => {
            let keys: Vec<String> = if *first == "*" {
                map.keys().cloned().collect()
            } else if map.contains_key(*first) {
                vec![first.to_string()]
            } else {
                Vec::new()
            };
            let mut changed = 0;
            for key in keys {
                if rest.is_empty() {
                    match mode {
                        Mode::Replace => {
                            map.insert(key, Value::String(replacement.to_string()));
                        }
                        Mode::Remove => {
                            map.remove(&key);
                        }
                    }
                    changed += 1;
                } else if let Some(child) = map.get_mut(&key) {
                    changed += redact_path(child, rest, mode, replacement);
                }
            }
            changed
        }
        _ => 0,
    }
}

/// Redacts every path in a JSON body. `None` when the body is not JSON or nothing matched
/// (the body is then left byte-for-byte as it was).
pub fn redact_body(
    body: &[u8],
    paths: &[String],
    mode: Mode,
    replacement: &str,
) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let mut changed = 0;
    for path in paths {
        let parts: Vec<&str> = path.split('.').collect();
        changed += redact_path(&mut value, &parts, mode, replacement);
    }
    if changed == 0 {
        return None;
    }
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(body: Value, paths: &[&str], mode: Mode) -> Option<Value> {
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        redact_body(body.to_string().as_bytes(), &paths, mode, "[REDACTED]")
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn replaces_nested_and_array_fields() {
        let body = json!({"user": "a", "password": "p", "card": {"number": "4111", "exp": "12/30"},
                          "items": [{"price": 1, "sku": "x"}, {"price": 2}, "scalar"]});
        let out = run(
            body,
            &["password", "card.number", "items.price", "missing.field"],
            Mode::Replace,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"user": "a", "password": "[REDACTED]", "card": {"number": "[REDACTED]", "exp": "12/30"},
                   "items": [{"price": "[REDACTED]", "sku": "x"}, {"price": "[REDACTED]"}, "scalar"]})
        );
    }

    #[test]
    fn removes_and_wildcards() {
        let body = json!([{"secrets": {"a": 1, "b": 2}, "keep": true}]);
        let out = run(body, &["secrets.*"], Mode::Remove).unwrap();
        assert_eq!(out, json!([{"secrets": {}, "keep": true}]));
    }

    #[test]
    fn untouched_bodies_are_none() {
        assert_eq!(run(json!({"a": 1}), &["b"], Mode::Replace), None);
        assert_eq!(
            redact_body(b"not json", &["a".into()], Mode::Replace, "x"),
            None
        );
        assert_eq!(redact_body(b"", &["a".into()], Mode::Replace, "x"), None);
    }
}
