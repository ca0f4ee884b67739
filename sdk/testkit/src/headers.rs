//! A header map as filters see it: ordered pairs, pseudo-headers included, names compared
//! without regard to case, values as bytes (usually UTF-8).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::protocol::Bytes;

/// Header pairs as the host hands them to filters.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Ordered `(name, value)` pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Pairs);

/// On the wire: `[["name", "value"], ...]`, values as [`Bytes`].
impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), Bytes(v.clone())))
            .collect::<Vec<_>>()
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Headers(
            Vec::<(String, Bytes)>::deserialize(deserializer)?
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        ))
    }
}

impl Headers {
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// The first value of `name`, if present and UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).into_iter().next()
    }

    /// Every UTF-8 value of `name`, in order.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    }

    /// Appends a value.
    pub fn add(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.0.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Replaces every value of `name` with one, keeping the first one's position.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        let name = name.to_ascii_lowercase();
        match self.0.iter().position(|(k, _)| *k == name) {
            Some(at) => {
                self.0[at].1 = value.into();
                let mut index = 0;
                self.0.retain(|(k, _)| {
                    index += 1;
                    index - 1 == at || *k != name
                });
            }
            None => self.0.push((name, value.into())),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Pairs with values shown as text (bytes that are not UTF-8 replaced).
    pub fn iter(&self) -> impl Iterator<Item = (&str, std::borrow::Cow<'_, str>)> {
        self.0
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v)))
    }
}

impl From<Pairs> for Headers {
    fn from(pairs: Pairs) -> Self {
        Headers(pairs)
    }
}

impl std::fmt::Display for Headers {
    /// One `name: value` line each, as curl prints them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, value) in self.iter() {
            writeln!(f, "{name}: {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_in_place_and_lookups_ignore_case() {
        let mut h = Headers::new();
        h.add(":path", "/");
        h.add("X-A", "1");
        h.add("x-b", "2");
        h.add("x-a", "3");
        h.set("x-a", "4");
        assert_eq!(h.get_all("X-A"), vec!["4"]);
        assert_eq!(h.0[1].0, "x-a");
        assert_eq!(h.len(), 3);
        h.remove("X-B");
        assert!(!h.contains("x-b"));
        assert_eq!(h.to_string(), ":path: /\nx-a: 4\n");
    }
}
