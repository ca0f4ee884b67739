//! The WASI calls filters' standard libraries make, and nothing more: stdout/stderr go to the log,
//! clocks and randomness work, the environment is the plugin's `vmConfig.env`, and every file or
//! socket operation is refused. No capability beyond what the proxy-wasm spec lists is granted.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::memory::{read, write, write_u32, write_u64, HostError, HostResult};
use crate::abi::LogLevel;
use crate::context::HostState;

type C<'a> = Caller<'a, HostState>;

const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const FAULT: i32 = 21;
const INVAL: i32 = 28;
const NOTSUP: i32 = 58;
const NOTCAPABLE: i32 = 76;

/// cpp-host's cap on one `random_get`.
const MAX_RANDOM: usize = 64 * 1024;
/// A line the guest never ends is flushed to the log at this size.
const MAX_LINE: usize = 16 * 1024;

/// Any failure to touch guest memory is `EFAULT`; a guest trap inside an allocator cannot happen
/// here (WASI calls never allocate in the guest).
fn errno(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(SUCCESS),
        Err(HostError::Status(_)) => Ok(FAULT),
        Err(HostError::Trap(error)) => Err(error),
    }
}

pub(super) fn define(linker: &mut Linker<HostState>, m: &str) -> wasmtime::Result<()> {
    linker.func_wrap(
        m,
        "fd_write",
        |mut c: C, fd: i32, iovs: i32, iovs_len: i32, ret_written: i32| {
            if fd != 1 && fd != 2 {
                return Ok(BADF);
            }
            errno(fd_write(&mut c, fd, iovs, iovs_len, ret_written))
        },
    )?;
    linker.func_wrap(
        m,
        "clock_time_get",
        |mut c: C, clock: i32, _precision: i64, ret: i32| {
            let now = match clock {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                1 => monotonic_origin().elapsed().as_nanos() as u64,
                _ => return Ok(INVAL),
            };
            errno(write_u64(&mut c, ret, now))
        },
    )?;
    linker.func_wrap(m, "clock_res_get", |mut c: C, clock: i32, ret: i32| {
        if !(0..=1).contains(&clock) {
            return Ok(INVAL);
        }
        errno(write_u64(&mut c, ret, 1))
    })?;
    linker.func_wrap(m, "random_get", |mut c: C, ptr: i32, len: i32| {
        let len = len as u32 as usize;
        if len > MAX_RANDOM {
            return Ok(INVAL);
        }
        let mut bytes = vec![0u8; len];
        if getrandom::fill(&mut bytes).is_err() {
            return Ok(NOTSUP);
        }
        errno(write(&mut c, ptr, &bytes))
    })?;
    linker.func_wrap(
        m,
        "environ_sizes_get",
        |mut c: C, ret_count: i32, ret_size: i32| {
            let (count, size) = {
                let env = &c.data().plugin.config.environment;
                let size: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
                (env.len() as u32, size as u32)
            };
            errno(
                write_u32(&mut c, ret_count, count)
                    .and_then(|()| write_u32(&mut c, ret_size, size)),
            )
        },
    )?;
    linker.func_wrap(m, "environ_get", |mut c: C, ptrs: i32, buf: i32| {
        let entries: Vec<Vec<u8>> = c
            .data()
            .plugin
            .config
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}\0").into_bytes())
            .collect();
        errno((|| {
            // Wrapping: the guest picks `ptrs` and `buf`, and overflow must be a bad address
            // (EFAULT from the bounds check), not a host panic.
            let mut at = buf;
            for (i, entry) in entries.iter().enumerate() {
                write_u32(&mut c, ptrs.wrapping_add(4 * i as i32), at as u32)?;
                write(&mut c, at, entry)?;
                at = at.wrapping_add(entry.len() as i32);
            }
            Ok(())
        })())
    })?;
    linker.func_wrap(
        m,
        "args_sizes_get",
        |mut c: C, ret_count: i32, ret_size: i32| {
            errno(write_u32(&mut c, ret_count, 0).and_then(|()| write_u32(&mut c, ret_size, 0)))
        },
    )?;
    linker.func_wrap(m, "args_get", |_: C, _: i32, _: i32| Ok(SUCCESS))?;
    linker.func_wrap(
        m,
        "proc_exit",
        |mut c: C, code: i32| -> wasmtime::Result<()> {
            c.data_mut().exit_code = Some(code);
            Err(wasmtime::Error::msg(format!(
                "the module called proc_exit({code})"
            )))
        },
    )?;
    linker.func_wrap(m, "sched_yield", |_: C| Ok(SUCCESS))?;
    linker.func_wrap(m, "fd_fdstat_get", |mut c: C, fd: i32, ret: i32| {
        if fd != 1 && fd != 2 {
            return Ok(BADF);
        }
        // filetype CHARACTER_DEVICE, no flags, rights FD_WRITE only.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        stat[8..16].copy_from_slice(&(1u64 << 6).to_le_bytes());
        errno(write(&mut c, ret, &stat))
    })?;
    linker.func_wrap(m, "fd_fdstat_set_flags", |_: C, _: i32, _: i32| Ok(NOTSUP))?;
    linker.func_wrap(m, "fd_prestat_get", |_: C, _: i32, _: i32| Ok(BADF))?;
    linker.func_wrap(m, "fd_prestat_dir_name", |_: C, _: i32, _: i32, _: i32| {
        Ok(BADF)
    })?;
    linker.func_wrap(m, "fd_close", |_: C, _: i32| Ok(BADF))?;
    linker.func_wrap(m, "fd_read", |_: C, _: i32, _: i32, _: i32, _: i32| {
        Ok(BADF)
    })?;
    linker.func_wrap(m, "fd_seek", |_: C, _: i32, _: i64, _: i32, _: i32| {
        Ok(BADF)
    })?;
    linker.func_wrap(
        m,
        "path_open",
        |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| {
            Ok(NOTCAPABLE)
        },
    )?;
    linker.func_wrap(m, "poll_oneoff", |_: C, _: i32, _: i32, _: i32, _: i32| {
        Ok(NOTSUP)
    })?;
    Ok(())
}

fn monotonic_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Gathers the iovecs and logs complete lines: fd 1 at info, fd 2 at error.
fn fd_write(c: &mut C, fd: i32, iovs: i32, iovs_len: i32, ret_written: i32) -> HostResult {
    let count = iovs_len as u32 as usize;
    if count > 1024 {
        return Err(crate::abi::Status::BadArgument.into());
    }
    let table = read(c, iovs, (count * 8) as i32)?;
    let mut written = 0usize;
    for iov in table.chunks_exact(8) {
        let ptr = i32::from_le_bytes(iov[..4].try_into().expect("4 bytes"));
        let len = i32::from_le_bytes(iov[4..].try_into().expect("4 bytes"));
        let bytes = read(c, ptr, len)?;
        written += bytes.len();
        let state = c.data_mut();
        let pending = if fd == 1 {
            &mut state.stdout
        } else {
            &mut state.stderr
        };
        pending.extend_from_slice(&bytes);
    }
    flush_lines(c.data_mut(), fd, false);
    write_u32(c, ret_written, written as u32)
}

/// Logs each complete line the guest wrote to `fd` (everything, when `all`).
pub(crate) fn flush_lines(state: &mut HostState, fd: i32, all: bool) {
    let (level, pending) = if fd == 1 {
        (LogLevel::Info, std::mem::take(&mut state.stdout))
    } else {
        (LogLevel::Error, std::mem::take(&mut state.stderr))
    };
    let mut rest = pending.as_slice();
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        state.log(level, &String::from_utf8_lossy(&rest[..end]));
        rest = &rest[end + 1..];
    }
    if (all || rest.len() > MAX_LINE) && !rest.is_empty() {
        state.log(level, &String::from_utf8_lossy(rest));
        rest = &[];
    }
    let rest = rest.to_vec();
    if fd == 1 {
        state.stdout = rest;
    } else {
        state.stderr = rest;
    }
}
