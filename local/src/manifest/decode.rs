//! A path-aware reader over one parsed YAML document. The object decoders walk the document with
//! it field by field, so every error carries the exact field path (`spec.containers[0].ports[1]`)
//! and every mapping can be checked for fields nobody read (typos, unsupported features).
//!
//! Kubernetes conventions it follows: `null` is the same as an absent field; strings, numbers and
//! booleans are not converted into one another (the API server refuses `value: 8080` for a string
//! field, so `kubectl apply` would too).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::{Mapping, Value};

/// What is wrong and where, before the object it belongs to is known to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, FieldError>;

/// One value in the document and the path that leads to it.
#[derive(Clone, Debug)]
pub struct Node<'a> {
    pub value: &'a Value,
    pub path: String,
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: String::new(),
        }
    }

    pub fn error(&self, message: impl Into<String>) -> FieldError {
        FieldError {
            field: self.path.clone(),
            message: message.into(),
        }
    }

    fn wrong_type(&self, expected: &str) -> FieldError {
        self.error(format!(
            "expected {expected}, found {}",
            describe(self.value)
        ))
    }

    fn with_value(&self, value: &'a Value, suffix: String) -> Node<'a> {
        Node {
            value,
            path: format!("{}{}", self.path, suffix),
        }
    }

    pub fn str(&self) -> Result<String> {
        match self.value {
            Value::String(s) => Ok(s.clone()),
            // Numbers and booleans are refused rather than stringified: Kubernetes refuses them
            // too, and `version: 1.10` silently becoming "1.1" is the classic YAML trap.
            Value::Number(_) | Value::Bool(_) => Err(self.error(format!(
                "expected a string, found {}; quote it",
                describe(self.value)
            ))),
            _ => Err(self.wrong_type("a string")),
        }
    }

    /// A string that must not be empty.
    pub fn non_empty_str(&self) -> Result<String> {
        let s = self.str()?;
        if s.is_empty() {
            return Err(self.error("must not be empty"));
        }
        Ok(s)
    }

    pub fn bool(&self) -> Result<bool> {
        match self.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.wrong_type("true or false")),
        }
    }

    pub fn i64(&self) -> Result<i64> {
        match self.value {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| self.error(format!("expected an integer, found {n}"))),
            _ => Err(self.wrong_type("an integer")),
        }
    }

    /// A TCP/UDP port number, 1-65535.
    pub fn port(&self) -> Result<u16> {
        let n = self.i64()?;
        port_in_range(n).ok_or_else(|| self.error(format!("{n} is out of range (1-65535)")))
    }

    /// A list; absent-as-null is the caller's business (see [`Fields::get`]).
    pub fn list(&self) -> Result<Vec<Node<'a>>> {
        match self.value {
            Value::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| self.with_value(v, format!("[{i}]")))
                .collect()),
            _ => Err(self.wrong_type("a list")),
        }
    }

    pub fn string_list(&self) -> Result<Vec<String>> {
        self.list()?.iter().map(Node::str).collect()
    }

    pub fn fields(&self) -> Result<Fields<'a>> {
        match self.value {
            Value::Mapping(map) => Ok(Fields {
                map,
                node: self.clone(),
                seen: RefCell::new(BTreeSet::new()),
            }),
            _ => Err(self.wrong_type("a mapping")),
        }
    }

    /// A string → string mapping (labels, annotations, selectors). Keys come out in the path as
    /// `[key]`, since label keys contain dots and slashes.
    pub fn string_map(&self) -> Result<BTreeMap<String, String>> {
        let Value::Mapping(map) = self.value else {
            return Err(self.wrong_type("a mapping"));
        };
        let mut out = BTreeMap::new();
        for (key, value) in map {
            let Value::String(key) = key else {
                return Err(self.error(format!("keys must be strings, found {}", describe(key))));
            };
            let node = self.with_value(value, format!("[{key}]"));
            out.insert(key.clone(), node.str()?);
        }
        Ok(out)
    }

    /// Any JSON-compatible value, for parts kept opaque (HTTPRoute rules, plugin configuration).
    pub fn json(&self) -> Result<serde_json::Value> {
        to_json(self.value).map_err(|message| self.error(message))
    }
}

/// `n` as a port if it is one.
pub fn port_in_range(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

fn to_json(value: &Value) -> std::result::Result<serde_json::Value, String> {
    Ok(match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(serde_json::Value::Number)
                    .ok_or_else(|| format!("{n} cannot be represented in JSON"))?
            }
        }
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Sequence(items) => serde_json::Value::Array(
            items
                .iter()
                .map(to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        Value::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "mapping keys must be scalars, found {}",
                            describe(other)
                        ))
                    }
                };
                out.insert(key, to_json(v)?);
            }
            serde_json::Value::Object(out)
        }
        Value::Tagged(t) => return Err(format!("YAML tags ({}) are not supported", t.tag)),
    })
}

/// The fields of one mapping, remembering which were read so [`Fields::finish`] can refuse the
/// rest.
pub struct Fields<'a> {
    map: &'a Mapping,
    node: Node<'a>,
    seen: RefCell<BTreeSet<String>>,
}

impl<'a> Fields<'a> {
    fn path_of(&self, key: &str) -> String {
        if self.node.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.node.path)
        }
    }

    /// The field `key`, or `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        self.seen.borrow_mut().insert(key.to_owned());
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node {
                value,
                path: self.path_of(key),
            }),
        }
    }

    /// The field `key`, which must be present.
    pub fn require(&self, key: &str) -> Result<Node<'a>> {
        self.get(key).ok_or_else(|| FieldError {
            field: self.path_of(key),
            message: "required field is missing".into(),
        })
    }

    /// The error for a field of this mapping.
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: self.path_of(key),
            message: message.into(),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|n| n.str()).transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|n| n.bool()).transpose()
    }

    pub fn string_list(&self, key: &str) -> Result<Vec<String>> {
        Ok(self
            .get(key)
            .map(|n| n.string_list())
            .transpose()?
            .unwrap_or_default())
    }

    pub fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>> {
        Ok(self
            .get(key)
            .map(|n| n.string_map())
            .transpose()?
            .unwrap_or_default())
    }

    /// The list under `key` (empty when absent), each item decoded by `f`.
    pub fn list_of<T>(&self, key: &str, f: impl Fn(&Node<'a>) -> Result<T>) -> Result<Vec<T>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(node) => node.list()?.iter().map(f).collect(),
        }
    }

    /// Accepts `keys` without interpreting them: Kubernetes fields that have no effect on the
    /// local mesh (resources, probes, scheduling hints...).
    pub fn ignore(&self, keys: &[&str]) {
        let mut seen = self.seen.borrow_mut();
        for key in keys {
            seen.insert((*key).to_owned());
        }
    }

    /// Refuses any field that was neither read nor ignored, like `kubectl apply`'s default strict
    /// field validation: a misspelt field is an error, not a silent no-op.
    pub fn finish(&self) -> Result<()> {
        let seen = self.seen.borrow();
        for key in self.map.keys() {
            match key {
                Value::String(k) if seen.contains(k) => {}
                Value::String(k) => {
                    return Err(FieldError {
                        field: self.path_of(k),
                        message: "unknown field (misspelt, or not supported by the local mesh)"
                            .into(),
                    })
                }
                other => {
                    return Err(self
                        .node
                        .error(format!("keys must be strings, found {}", describe(other))))
                }
            }
        }
        Ok(())
    }

    /// Integer-keyed entries (PeerAuthentication `portLevelMtls`), in document order.
    pub fn entries(&self) -> Vec<(&'a Value, Node<'a>)> {
        self.map
            .iter()
            .map(|(k, v)| {
                let label = match k {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => describe(other).to_owned(),
                };
                (k, self.node.with_value(v, format!("[{label}]")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn paths_follow_the_walk() {
        let v = doc("spec: {containers: [{name: a, ports: [{containerPort: 70000}]}]}");
        let root = Node::root(&v).fields().unwrap();
        let spec = root.require("spec").unwrap().fields().unwrap();
        let containers = spec.require("containers").unwrap().list().unwrap();
        let c = containers[0].fields().unwrap();
        let ports = c.require("ports").unwrap().list().unwrap();
        let err = ports[0]
            .fields()
            .unwrap()
            .require("containerPort")
            .unwrap()
            .port()
            .unwrap_err();
        assert_eq!(err.field, "spec.containers[0].ports[0].containerPort");
        assert!(err.message.contains("70000 is out of range (1-65535)"));
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let v = doc("a: 1\nb: 2\nc: null");
        let f = Node::root(&v).fields().unwrap();
        f.get("a");
        assert_eq!(f.finish().unwrap_err().field, "b");
        f.ignore(&["b"]);
        // Unknown even when null.
        assert_eq!(f.finish().unwrap_err().field, "c");
        // null reads as absent.
        assert!(f.get("c").is_none());
        f.finish().unwrap();
        assert_eq!(f.require("d").unwrap_err().field, "d");
    }

    #[test]
    fn scalars_are_not_coerced() {
        let v = doc("s: 8080\nb: 'true'\nm: {version: 1}");
        let f = Node::root(&v).fields().unwrap();
        assert!(f.str("s").unwrap_err().message.contains("quote it"));
        assert!(f.bool("b").is_err());
        let err = f.string_map("m").unwrap_err();
        assert_eq!(err.field, "m[version]");
    }

    #[test]
    fn json_conversion() {
        let v = doc("a: [1, 2.5, x, true, null, {8080: y}]");
        let j = Node::root(&v).json().unwrap();
        assert_eq!(
            j,
            serde_json::json!({"a": [1, 2.5, "x", true, null, {"8080": "y"}]})
        );
    }
}
