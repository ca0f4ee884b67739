//! Kubernetes' syntax rules for names, label keys and values, and port names
//! (`k8s.io/apimachinery/pkg/util/validation`), so a manifest this mesh accepts is one a real API
//! server would accept too. Each check returns the reason a value fails, phrased for users.

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

fn is_label_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// RFC 1123 label: what Namespace names (and each dot-separated part of a subdomain) must be.
pub fn dns1123_label(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > DNS1123_LABEL_MAX {
        return Err(format!(
            "{value:?} is longer than {DNS1123_LABEL_MAX} characters"
        ));
    }
    if !bytes.iter().all(|&b| is_label_char(b))
        || !is_alnum_lower(bytes[0])
        || !is_alnum_lower(bytes[bytes.len() - 1])
    {
        return Err(format!(
            "{value:?} is not a valid DNS-1123 label: use lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain: what most object names (Pod, Deployment, ServiceAccount, Istio and
/// Gateway API resources) must be.
pub fn dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        return Err(format!(
            "{value:?} is longer than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    let valid = value.split('.').all(|part| {
        let b = part.as_bytes();
        !b.is_empty()
            && b.iter().all(|&c| is_label_char(c))
            && is_alnum_lower(b[0])
            && is_alnum_lower(b[b.len() - 1])
    });
    if !valid {
        return Err(format!(
            "{value:?} is not a valid DNS-1123 subdomain: use lowercase letters, digits, '-' and \
             '.', each part starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// RFC 1035 label: what Service names must be (they become DNS labels, which may not start with
/// a digit).
pub fn dns1035_label(value: &str) -> Result<(), String> {
    dns1123_label(value)?;
    if !value.as_bytes()[0].is_ascii_lowercase() {
        return Err(format!(
            "{value:?} is not a valid DNS-1035 label: it must start with a lowercase letter"
        ));
    }
    Ok(())
}

/// The name part of a qualified name (label key without prefix): up to 63 characters,
/// alphanumerics with `-`, `_` and `.` inside.
fn qualified_name_part(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= DNS1123_LABEL_MAX
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|e| format!("key {key:?} has an invalid prefix: {e}"))?;
    }
    if !qualified_name_part(name) {
        return Err(format!(
            "key {key:?} is not a valid label key: the name part must be 1-63 characters of \
             letters, digits, '-', '_' or '.', starting and ending with a letter or digit, with an \
             optional DNS subdomain prefix and '/'"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 characters like a qualified name part.
pub fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || qualified_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "value {value:?} is not a valid label value: use at most 63 letters, digits, '-', \
             '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// An IANA service name, which container and service port names must be (and which a named
/// `targetPort` refers to): 1-15 lowercase alphanumerics and `-`, at least one letter, no `-` at
/// either end nor doubled.
pub fn iana_svc_name(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|&c| is_label_char(c))
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !value.contains("--");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid port name: use 1-15 lowercase letters, digits and '-', with \
             at least one letter, not starting or ending with '-' nor containing '--'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "demo", "a-1", "0abc"] {
            dns1123_label(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(dns1123_label(bad).is_err(), "{bad}");
        }
        for ok in ["a.b", "echo-0", "x.y-z.1"] {
            dns1123_subdomain(ok).unwrap();
        }
        for bad in ["", "a..b", ".a", "a.", "Echo", "a_b"] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad}");
        }
        dns1035_label("echo").unwrap();
        assert!(dns1035_label("1echo").is_err());
    }

    #[test]
    fn label_keys_and_values() {
        for ok in ["app", "istio.io/dataplane-mode", "a_b.c", "x/Y"] {
            qualified_name(ok).unwrap();
        }
        for bad in ["", "/a", "a/", "-a", "Istio.io/x", "a/b/c", &"x".repeat(64)] {
            assert!(qualified_name(bad).is_err(), "{bad}");
        }
        for ok in ["", "ambient", "v1.2_3"] {
            label_value(ok).unwrap();
        }
        for bad in ["-a", "a b", &"x".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn port_names() {
        for ok in ["http", "http-web", "h2c", "a1"] {
            iana_svc_name(ok).unwrap();
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "HTTP",
            "a-very-long-port-name",
        ] {
            assert!(iana_svc_name(bad).is_err(), "{bad}");
        }
    }
}
