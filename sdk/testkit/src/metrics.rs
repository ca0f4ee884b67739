//! The host's metrics (what `/metrics` shows, Prometheus text) parsed into samples.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One line of the exposition: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample the host rendered, in order, plus the text itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    /// Parses Prometheus text format (comments skipped, malformed lines ignored).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the series `name` with exactly these labels (any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The value of a series without labels.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.get(name, &[])
    }

    /// Every series of `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Samples as `name{k="v",...}` → value, labels sorted by name.
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .map(|s| {
                let key = if s.labels.is_empty() {
                    s.name.clone()
                } else {
                    let labels: Vec<String> = s
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}=\"{v}\""))
                        .collect();
                    format!("{}{{{}}}", s.name, labels.join(","))
                };
                (key, s.value)
            })
            .collect()
    }
}

/// On the wire: the exposition text.
impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Metrics::parse(&String::deserialize(deserializer)?))
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, BTreeMap::new()),
    };
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (at, c) = chars.next()?;
            match c {
                '"' => break at,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 2..].trim_start_matches(',').trim();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_histograms_and_labels() {
        let m = Metrics::parse(
            "# TYPE a counter\na 3\n# TYPE h histogram\nh_bucket{le=\"0.5\"} 1\n\
             h_bucket{le=\"+Inf\"} 2\nh_sum 7\nh_count 2\nr{route=\"a\\\"b\",method=\"GET\"} 1\n",
        );
        assert_eq!(m.value("a"), Some(3.0));
        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(m.value("h_count"), Some(2.0));
        assert_eq!(
            m.get("r", &[("method", "GET"), ("route", "a\"b")]),
            Some(1.0)
        );
        assert_eq!(m.series("h_bucket").len(), 2);
        assert_eq!(m.to_map()["r{method=\"GET\",route=\"a\"b\"}"], 1.0);
    }
}
