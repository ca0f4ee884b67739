//! Header helpers: case-insensitive lookup, repeated headers, get/set/remove many, and
//! declarative mutations from configuration.
//!
//! Header names are compared ASCII case-insensitively. Names passed to the host are lowercased
//! first: HTTP/2 and Envoy store them lowercase, and a host that compares bytes would otherwise
//! miss `Content-Type`. `proxy_get_header_map_value` returns only the *first* value of a repeated
//! header (an ABI 0.2.1 limit), so [`HeadersExt::header_values`] reads the whole map instead.

use std::collections::BTreeMap;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::{LogLevel, MapType, Status};
use serde::Deserialize;

/// Which side of the stream a header operation targets.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The header map of this direction.
    pub fn headers_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestHeaders,
            Direction::Response => MapType::HttpResponseHeaders,
        }
    }

    /// The trailer map of this direction.
    pub fn trailers_map(self) -> MapType {
        match self {
            Direction::Request => MapType::HttpRequestTrailers,
            Direction::Response => MapType::HttpResponseTrailers,
        }
    }
}

/// An ordered header list (repeats allowed) with case-insensitive access. Pure Rust: build one
/// from the host's pairs with [`HeadersExt::headers`] or from a test's literals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pairs: Vec<(String, String)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pairs in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.pairs
    }

    /// The pairs borrowed in the shape the host calls take.
    pub fn as_host_pairs(&self) -> Vec<(&str, &str)> {
        self.pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of `name` joined with `", "`, as RFC 9110 §5.3 allows for list-valued
    /// fields (not for `set-cookie`).
    pub fn get_joined(&self, name: &str) -> Option<String> {
        let all = self.get_all(name);
        (!all.is_empty()).then(|| all.join(", "))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Replaces every value of `name` with one value, kept where the first one was.
    pub fn set(&mut self, name: &str, value: &str) {
        match self
            .pairs
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(first) => {
                self.pairs[first].1 = value.to_string();
                let mut i = 0;
                self.pairs.retain(|(k, _)| {
                    i += 1;
                    i - 1 == first || !k.eq_ignore_ascii_case(name)
                });
            }
            None => self.add(name, value),
        }
    }

    /// Appends a value (the name lowercased).
    pub fn add(&mut self, name: &str, value: &str) {
        self.pairs
            .push((name.to_ascii_lowercase(), value.to_string()));
    }

    /// Removes every value of `name`; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.pairs.len();
        self.pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        before - self.pairs.len()
    }

    /// Iterates over `(name, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl From<Vec<(String, String)>> for Headers {
    fn from(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        Self {
            pairs: iter
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// Is `name` a valid header name (an RFC 9110 token), optionally a `:pseudo` header?
pub fn is_valid_name(name: &str, allow_pseudo: bool) -> bool {
    let token = match name.strip_prefix(':') {
        Some(rest) if allow_pseudo => rest,
        Some(_) => return false,
        None => name,
    };
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Is `value` safe to put in a header (no CR, LF or NUL, which would split or end it)?
pub fn is_valid_value(value: &str) -> bool {
    !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// The values of [`HeaderMutations::add`]: a JSON object (`{"name": "value"}`) or, to add the
/// same name twice, a list of `{"name": .., "value": ..}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum HeaderList {
    Map(BTreeMap<String, String>),
    List(Vec<NameValue>),
}

impl Default for HeaderList {
    fn default() -> Self {
        HeaderList::List(Vec::new())
    }
}

impl HeaderList {
    /// The pairs in order (maps are sorted by name).
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        match self {
            HeaderList::Map(m) => m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            HeaderList::List(l) => l
                .iter()
                .map(|nv| (nv.name.as_str(), nv.value.as_str()))
                .collect(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            HeaderList::Map(m) => m.is_empty(),
            HeaderList::List(l) => l.is_empty(),
        }
    }

    fn lowercase(&mut self) {
        match self {
            HeaderList::Map(m) => {
                *m = std::mem::take(m)
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect()
            }
            HeaderList::List(l) => l
                .iter_mut()
                .for_each(|nv| nv.name = nv.name.to_ascii_lowercase()),
        }
    }
}

/// One header in a list.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

/// Header edits from configuration, applied in a fixed order: `remove`, then `rename`, then
/// `set`, then `add`.
///
/// ```json
/// {"remove": ["x-debug"], "rename": {"x-old": "x-new"},
///  "set": {"x-env": "prod"}, "add": {"via": "ambit"}}
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderMutations {
    /// Names whose every value is removed.
    pub remove: Vec<String>,
    /// `from → to`: when `from` is present, `to` is replaced by `from`'s values and `from` is
    /// removed.
    pub rename: BTreeMap<String, String>,
    /// Names set to exactly one value (replacing any). Pseudo headers (`:path`,
    /// `:authority`) may be set: that is how a path is rewritten.
    pub set: BTreeMap<String, String>,
    /// Values appended, keeping existing ones.
    pub add: HeaderList,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }

    /// Lowercases every name and checks names and values; the error names the bad entry.
    /// Pseudo headers may only be `set`: removing `:path` would break the stream.
    pub fn normalize(&mut self) -> Result<(), String> {
        self.remove
            .iter_mut()
            .for_each(|n| *n = n.to_ascii_lowercase());
        self.rename = std::mem::take(&mut self.rename)
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_ascii_lowercase()))
            .collect();
        self.set = std::mem::take(&mut self.set)
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        self.add.lowercase();

        for name in &self.remove {
            if !is_valid_name(name, false) {
                return Err(format!("remove: {name:?} is not a removable header name"));
            }
        }
        for (from, to) in &self.rename {
            if !is_valid_name(from, false) || !is_valid_name(to, false) {
                return Err(format!(
                    "rename: {from:?} → {to:?} must be regular header names"
                ));
            }
        }
        for (name, value) in self.set.iter().map(|(k, v)| (k.as_str(), v.as_str())) {
            if !is_valid_name(name, true) || !is_valid_value(value) {
                return Err(format!("set: {name:?} = {value:?} is not a valid header"));
            }
        }
        for (name, value) in self.add.pairs() {
            if !is_valid_name(name, false) || !is_valid_value(value) {
                return Err(format!("add: {name:?} = {value:?} is not a valid header"));
            }
        }
        Ok(())
    }

    /// Applies the edits to a header list (the same result [`HeadersExt::apply_mutations`]
    /// gets through the host, up to the order of pairs).
    pub fn apply(&self, headers: &mut Headers) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (from, to) in &self.rename {
            let values: Vec<String> = headers
                .get_all(from)
                .into_iter()
                .map(String::from)
                .collect();
            if values.is_empty() {
                continue;
            }
            headers.remove(to);
            headers.remove(from);
            for v in &values {
                headers.add(to, v);
            }
        }
        for (name, value) in &self.set {
            headers.set(name, value);
        }
        for (name, value) in self.add.pairs() {
            headers.add(name, value);
        }
    }
}

/// Header access on an [`HttpContext`] by [`Direction`], through the host.
pub trait HeadersExt {
    /// Every header of `dir`, in order.
    fn headers(&self, dir: Direction) -> Headers;
    /// The first value of `name` (lowercased before asking the host).
    fn header(&self, dir: Direction, name: &str) -> Option<String>;
    /// Every value of `name` (the host call returns only the first, so this reads the map).
    fn header_values(&self, dir: Direction, name: &str) -> Vec<String>;
    /// Sets `name` to exactly `value`.
    fn set_header(&self, dir: Direction, name: &str, value: &str);
    /// Sets many headers, each to exactly one value.
    fn set_headers(&self, dir: Direction, headers: &[(&str, &str)]);
    /// Appends a value to `name`.
    fn add_header(&self, dir: Direction, name: &str, value: &str);
    /// Removes every value of each name.
    fn remove_headers(&self, dir: Direction, names: &[&str]);
    /// Applies configured [`HeaderMutations`] with as few host calls as the edits need.
    fn apply_mutations(&self, dir: Direction, mutations: &HeaderMutations);
}

impl<T: HttpContext + ?Sized> HeadersExt for T {
    fn headers(&self, dir: Direction) -> Headers {
        hostcalls::get_map(dir.headers_map())
            .map(Headers::from)
            .unwrap_or_default()
    }

    fn header(&self, dir: Direction, name: &str) -> Option<String> {
        hostcalls::get_map_value(dir.headers_map(), &name.to_ascii_lowercase()).unwrap_or(None)
    }

    fn header_values(&self, dir: Direction, name: &str) -> Vec<String> {
        self.headers(dir)
            .get_all(name)
            .into_iter()
            .map(String::from)
            .collect()
    }

    fn set_header(&self, dir: Direction, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        report(
            "set header",
            hostcalls::set_map_value(dir.headers_map(), &name, Some(value)),
        );
    }

    fn set_headers(&self, dir: Direction, headers: &[(&str, &str)]) {
        for (name, value) in headers {
            self.set_header(dir, name, value);
        }
    }

    fn add_header(&self, dir: Direction, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        report(
            "add header",
            hostcalls::add_map_value(dir.headers_map(), &name, value),
        );
    }

    fn remove_headers(&self, dir: Direction, names: &[&str]) {
        for name in names {
            let name = name.to_ascii_lowercase();
            report(
                "remove header",
                hostcalls::remove_map_value(dir.headers_map(), &name),
            );
        }
    }

    fn apply_mutations(&self, dir: Direction, m: &HeaderMutations) {
        let removes: Vec<&str> = m.remove.iter().map(String::as_str).collect();
        self.remove_headers(dir, &removes);
        if !m.rename.is_empty() {
            // Renames need every value of the source: one read of the map serves them all.
            let current = self.headers(dir);
            for (from, to) in &m.rename {
                let values = current.get_all(from);
                if values.is_empty() {
                    continue;
                }
                self.remove_headers(dir, &[to.as_str(), from.as_str()]);
                for v in values {
                    self.add_header(dir, to, v);
                }
            }
        }
        for (name, value) in &m.set {
            self.set_header(dir, name, value);
        }
        for (name, value) in m.add.pairs() {
            self.add_header(dir, name, value);
        }
    }
}

/// The header setters only return `Ok` (other statuses panic inside the SDK); log if that
/// ever changes rather than dropping the error silently.
fn report(what: &str, result: Result<(), Status>) {
    if let Err(status) = result {
        let _ = hostcalls::log(LogLevel::Warn, &format!("ambit-sdk: {what}: {status:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Headers {
        [
            (":path", "/a"),
            ("Content-Type", "text/plain"),
            ("x-forwarded-for", "1.1.1.1"),
            ("X-Forwarded-For", "2.2.2.2"),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn case_insensitive_and_multi_value() {
        let h = sample();
        assert_eq!(h.get("content-type"), Some("text/plain"));
        assert_eq!(h.get("CONTENT-TYPE"), Some("text/plain"));
        assert_eq!(h.get_all("x-forwarded-for"), vec!["1.1.1.1", "2.2.2.2"]);
        assert_eq!(
            h.get_joined("X-FORWARDED-FOR").as_deref(),
            Some("1.1.1.1, 2.2.2.2")
        );
        assert_eq!(h.get_joined("missing"), None);
        assert!(!h.contains("x-missing"));
    }

    #[test]
    fn set_replaces_all_values_in_place() {
        let mut h = sample();
        h.set("X-Forwarded-For", "3.3.3.3");
        assert_eq!(h.get_all("x-forwarded-for"), vec!["3.3.3.3"]);
        assert_eq!(h.pairs()[2], ("x-forwarded-for".into(), "3.3.3.3".into()));
        assert_eq!(h.len(), 3);
        h.set("x-new", "1");
        assert_eq!(h.get("x-new"), Some("1"));
        assert_eq!(h.remove("X-NEW"), 1);
        assert_eq!(h.remove("x-new"), 0);
    }

    #[test]
    fn mutations_from_json_apply_in_order() {
        let mut m: HeaderMutations = serde_json::from_str(
            r#"{"remove": ["Content-Type"], "rename": {"X-Forwarded-For": "x-client"},
                "set": {":path": "/b", "X-Env": "prod"},
                "add": [{"name": "via", "value": "1"}, {"name": "via", "value": "2"}]}"#,
        )
        .unwrap();
        m.normalize().unwrap();
        let mut h = sample();
        m.apply(&mut h);
        assert_eq!(h.get("content-type"), None);
        assert_eq!(h.get_all("x-client"), vec!["1.1.1.1", "2.2.2.2"]);
        assert_eq!(h.get("x-forwarded-for"), None);
        assert_eq!(h.get(":path"), Some("/b"));
        assert_eq!(h.get("x-env"), Some("prod"));
        assert_eq!(h.get_all("via"), vec!["1", "2"]);
    }

    #[test]
    fn add_accepts_an_object_too() {
        let m: HeaderMutations = serde_json::from_str(r#"{"add": {"b": "2", "a": "1"}}"#).unwrap();
        assert_eq!(m.add.pairs(), vec![("a", "1"), ("b", "2")]);
        assert!(!m.is_empty());
        assert!(HeaderMutations::default().is_empty());
    }

    #[test]
    fn normalize_refuses_bad_entries() {
        let bad = [
            r#"{"remove": [":path"]}"#,
            r#"{"remove": ["bad name"]}"#,
            r#"{"set": {"x-a": "line\r\nbreak"}}"#,
            r#"{"add": {":authority": "x"}}"#,
            r#"{"rename": {"a": ""}}"#,
        ];
        for json in bad {
            let mut m: HeaderMutations = serde_json::from_str(json).unwrap();
            assert!(m.normalize().is_err(), "{json} should be refused");
        }
        assert!(serde_json::from_str::<HeaderMutations>(r#"{"sett": {}}"#).is_err());
    }

    #[test]
    fn name_rules() {
        assert!(is_valid_name("x-b3-traceid", false));
        assert!(is_valid_name(":path", true));
        assert!(!is_valid_name(":path", false));
        assert!(!is_valid_name(":", true));
        assert!(!is_valid_name("a:b", false));
        assert!(is_valid_value("ok value"));
        assert!(!is_valid_value("a\0b"));
    }

    #[test]
    fn directions_map_to_abi_map_types() {
        assert_eq!(Direction::Request.headers_map() as u32, 0);
        assert_eq!(Direction::Request.trailers_map() as u32, 1);
        assert_eq!(Direction::Response.headers_map() as u32, 2);
        assert_eq!(Direction::Response.trailers_map() as u32, 3);
    }
}
