//! Shared data read-modify-write with compare-and-swap.
//!
//! Shared data is a key-value store shared by every VM of a plugin on a proxy (all worker
//! threads). Each value has a CAS number that changes on every write; writing with the CAS
//! read earlier fails with `CasMismatch` if anyone wrote in between. [`update`] loops
//! get → compute → set-with-CAS until the write lands or the attempts run out.
//!
//! A key that does not exist yet has no CAS: its first write is unconditional, so two VMs
//! creating the same key at once both succeed and the later one wins (the ABI has no
//! create-if-absent). Counting filters lose at most one update per key this way.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

/// Shared data as the helpers need it; [`HostShared`] calls the proxy, tests use a fake.
pub trait SharedStore {
    /// The value and its CAS; `(None, None)` when the key is absent.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status>;
    /// Writes `value` if the CAS still matches (`None`: unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status>;
}

/// Shared data through `proxy_get_shared_data` / `proxy_set_shared_data`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostShared;

impl SharedStore for HostShared {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status> {
        hostcalls::get_shared_data(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        hostcalls::set_shared_data(key, Some(value), cas)
    }
}

/// Why an update did not land.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SharedError {
    #[error("shared data {key:?}: still contended after {attempts} attempts")]
    Contended { key: String, attempts: u32 },
    #[error("shared data {key:?}: the host refused {op}: {status:?}")]
    Host {
        key: String,
        op: &'static str,
        status: Status,
    },
}

/// Read-modify-write `key`: `f` gets the current value (`None` if absent) and returns the new
/// value plus a result for the caller. Retried on `CasMismatch`, at most `max_attempts` times
/// (at least once). `f` may run several times: keep it free of side effects.
pub fn update<S, T, F>(store: &S, key: &str, max_attempts: u32, mut f: F) -> Result<T, SharedError>
where
    S: SharedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> (Vec<u8>, T),
{
    let attempts = max_attempts.max(1);
    for _ in 0..attempts {
        let (current, cas) = store.get(key).map_err(|status| SharedError::Host {
            key: key.to_string(),
            op: "get",
            status,
        })?;
        let (next, out) = f(current.as_deref());
        match store.set(key, &next, cas) {
            Ok(()) => return Ok(out),
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                return Err(SharedError::Host {
                    key: key.to_string(),
                    op: "set",
                    status,
                })
            }
        }
    }
    Err(SharedError::Contended {
        key: key.to_string(),
        attempts,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// An in-memory store with the host's CAS rules; `interfere` writers sneak in between a
    /// get and the following set, as another worker would.
    #[derive(Default)]
    pub struct FakeStore {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        pub interfere: Cell<u32>,
    }

    impl FakeStore {
        fn write(&self, key: &str, value: &[u8]) {
            self.next_cas.set(self.next_cas.get() + 1);
            self.map
                .borrow_mut()
                .insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        }
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status> {
            let got = match self.map.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            };
            if self.interfere.get() > 0 {
                self.interfere.set(self.interfere.get() - 1);
                self.write(key, b"other");
            }
            Ok(got)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
            if let (Some(want), Some((_, have))) = (cas, self.map.borrow().get(key)) {
                if want != *have {
                    return Err(Status::CasMismatch);
                }
            }
            self.write(key, value);
            Ok(())
        }
    }

    fn bump(v: Option<&[u8]>) -> (Vec<u8>, u8) {
        let n = v.and_then(|b| b.first().copied()).unwrap_or(0) + 1;
        (vec![n], n)
    }

    #[test]
    fn creates_then_updates() {
        let s = FakeStore::default();
        assert_eq!(update(&s, "k", 3, bump), Ok(1));
        assert_eq!(update(&s, "k", 3, bump), Ok(2));
    }

    #[test]
    fn retries_on_cas_mismatch() {
        let s = FakeStore::default();
        update(&s, "k", 1, bump).unwrap();
        s.interfere.set(2);
        let mut calls = 0;
        let out = update(&s, "k", 5, |v| {
            calls += 1;
            (vec![9], v.map(<[u8]>::to_vec))
        })
        .unwrap();
        assert_eq!(calls, 3);
        // The third attempt saw the interfering writer's value.
        assert_eq!(out.as_deref(), Some(&b"other"[..]));
    }

    #[test]
    fn gives_up_when_always_contended() {
        let s = FakeStore::default();
        update(&s, "k", 1, bump).unwrap();
        s.interfere.set(100);
        assert_eq!(
            update(&s, "k", 4, bump),
            Err(SharedError::Contended {
                key: "k".into(),
                attempts: 4
            })
        );
    }
}
