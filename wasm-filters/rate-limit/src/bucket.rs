//! Token bucket arithmetic, in integers, with a fixed 16-byte encoding for shared data.
//!
//! A bucket holds up to `max_tokens`; every `fill_interval` adds `tokens_per_fill`. The time
//! of the last fill advances by whole intervals only, so partial intervals are not lost
//! between requests. Time is nanoseconds since the epoch from the host clock; a clock that
//! goes backwards (another worker wrote a later time) adds nothing.

/// Bucket parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval_ns: u64,
}

/// The state kept in shared data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub tokens: u64,
    pub last_fill_ns: u64,
}

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed { remaining: u64 },
    Limited { retry_after_secs: u64 },
}

impl Bucket {
    /// A full bucket, as a key's first request finds it.
    pub fn full(limits: &Limits, now_ns: u64) -> Self {
        Self {
            tokens: limits.max_tokens,
            last_fill_ns: now_ns,
        }
    }

    /// `tokens` then `last_fill_ns`, little-endian.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.last_fill_ns.to_le_bytes());
        out
    }

    /// `None` for anything but 16 bytes (e.g. a value another plugin version wrote).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Self {
            tokens: u64::from_le_bytes(bytes[..8].try_into().ok()?),
            last_fill_ns: u64::from_le_bytes(bytes[8..].try_into().ok()?),
        })
    }

    /// Adds the tokens of every whole interval since the last fill.
    pub fn refill(&mut self, limits: &Limits, now_ns: u64) {
        let interval = limits.fill_interval_ns.max(1);
        if now_ns <= self.last_fill_ns {
            return;
        }
        let intervals = (now_ns - self.last_fill_ns) / interval;
        if intervals == 0 {
            return;
        }
        let added = intervals.saturating_mul(limits.tokens_per_fill);
        self.tokens = self.tokens.saturating_add(added).min(limits.max_tokens);
        self.last_fill_ns += intervals * interval;
    }

    /// Refills, then takes one token if there is one.
    pub fn try_take(&mut self, limits: &Limits, now_ns: u64) -> Decision {
        self.refill(limits, now_ns);
        if self.tokens > 0 {
            self.tokens -= 1;
            return Decision::Allowed {
                remaining: self.tokens,
            };
        }
        let interval = limits.fill_interval_ns.max(1);
        let next_fill = self.last_fill_ns.saturating_add(interval);
        let wait_ns = next_fill.saturating_sub(now_ns).max(1);
        Decision::Limited {
            retry_after_secs: wait_ns.div_ceil(1_000_000_000),
        }
    }
}

/// One read-modify-write step for [`ambit_sdk::shared::update`]: the new stored value and the
/// decision. A missing or unreadable value starts a full bucket.
pub fn take(limits: &Limits, current: Option<&[u8]>, now_ns: u64) -> (Vec<u8>, Decision) {
    let mut bucket = current
        .and_then(Bucket::decode)
        .unwrap_or_else(|| Bucket::full(limits, now_ns));
    let decision = bucket.try_take(limits, now_ns);
    (bucket.encode().to_vec(), decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const LIMITS: Limits = Limits {
        max_tokens: 3,
        tokens_per_fill: 1,
        fill_interval_ns: 2 * SEC,
    };

    #[test]
    fn burst_then_limited_then_refilled() {
        let t0 = 1_000 * SEC;
        let mut stored: Option<Vec<u8>> = None;
        let mut step = |now| {
            let (next, d) = take(&LIMITS, stored.as_deref(), now);
            stored = Some(next);
            d
        };
        assert_eq!(step(t0), Decision::Allowed { remaining: 2 });
        assert_eq!(step(t0), Decision::Allowed { remaining: 1 });
        assert_eq!(step(t0), Decision::Allowed { remaining: 0 });
        assert_eq!(
            step(t0),
            Decision::Limited {
                retry_after_secs: 2
            }
        );
        // 1.5 s later the next fill is 0.5 s away: retry-after rounds up to 1.
        assert_eq!(
            step(t0 + SEC + SEC / 2),
            Decision::Limited {
                retry_after_secs: 1
            }
        );
        // One interval: one token.
        assert_eq!(step(t0 + 2 * SEC), Decision::Allowed { remaining: 0 });
        assert_eq!(
            step(t0 + 2 * SEC),
            Decision::Limited {
                retry_after_secs: 2
            }
        );
        // A long pause refills only up to max.
        assert_eq!(step(t0 + 100 * SEC), Decision::Allowed { remaining: 2 });
    }

    #[test]
    fn partial_intervals_are_kept() {
        let mut b = Bucket {
            tokens: 0,
            last_fill_ns: 0,
        };
        b.refill(&LIMITS, 3 * SEC);
        assert_eq!(
            b,
            Bucket {
                tokens: 1,
                last_fill_ns: 2 * SEC
            }
        );
        b.refill(&LIMITS, 4 * SEC);
        assert_eq!(
            b,
            Bucket {
                tokens: 2,
                last_fill_ns: 4 * SEC
            }
        );
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let mut b = Bucket {
            tokens: 0,
            last_fill_ns: 10 * SEC,
        };
        assert_eq!(
            b.try_take(&LIMITS, 5 * SEC),
            Decision::Limited {
                retry_after_secs: 7
            }
        );
        assert_eq!(b.tokens, 0);
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let b = Bucket {
            tokens: 7,
            last_fill_ns: u64::MAX - 1,
        };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b"short"), None);
        // Garbage in shared data starts a fresh full bucket.
        let (_, d) = take(&LIMITS, Some(b"garbage"), 0);
        assert_eq!(d, Decision::Allowed { remaining: 2 });
    }

    #[test]
    fn huge_numbers_saturate() {
        let limits = Limits {
            max_tokens: u64::MAX,
            tokens_per_fill: u64::MAX,
            fill_interval_ns: 1,
        };
        let mut b = Bucket {
            tokens: 5,
            last_fill_ns: 0,
        };
        b.refill(&limits, u64::MAX);
        assert_eq!(b.tokens, u64::MAX);
    }
}
