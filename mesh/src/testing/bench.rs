//! Helpers the benchmark binaries share: sizes from the environment, human-readable sizes, and
//! the CPU time the process has used.

use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// A size from the environment: a number with an optional K, M or G (binary) suffix.
pub fn env_size(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let text = value.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_uppercase()),
        _ => (text, ' '),
    };
    let multiplier = match unit {
        ' ' => 1,
        'K' => KIB,
        'M' => MIB,
        'G' => GIB,
        _ => panic!("{name}={value}: unknown size suffix (use K, M or G)"),
    };
    let number: u64 = digits
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name}={value} is not a size"));
    Some(number * multiplier)
}

/// `1 GiB`, `64 KiB`, `1000 B`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} B"),
    }
}

/// CPU time all threads of this process have run, from each thread's schedstat.
pub fn process_cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread may exit between listing and reading; it then no longer counts.
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}
