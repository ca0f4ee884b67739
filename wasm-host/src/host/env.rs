//! `env.proxy_*`: the proxy-wasm ABI's host functions (0.2.0 and 0.2.1, plus the 0.1.0 names
//! modules still import). Statuses follow what the SDKs expect from Envoy for each call, because
//! the Rust SDK traps on any status it did not anticipate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::memory::{
    copy_out, finish, read, read_string, read_truncated, write_u32, write_u64, HostError,
    HostResult,
};
use crate::abi::{
    decode_pairs, encode_pairs, BufferType, LogLevel, MapType, MetricType, Pairs, Status,
    StreamType,
};
use crate::context::{HostState, LocalResponse, OutgoingCall};
use crate::http_call::HttpCallRequest;
use crate::properties;

type C<'a> = Caller<'a, HostState>;

pub(super) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = "env";
    linker.func_wrap(
        m,
        "proxy_log",
        |mut c: C, level: i32, ptr: i32, len: i32| finish(log(&mut c, level, ptr, len)),
    )?;
    linker.func_wrap(m, "proxy_get_log_level", |mut c: C, ret: i32| {
        let level = c.data().plugin.config.log_level as u32;
        finish(write_u32(&mut c, ret, level))
    })?;
    linker.func_wrap(
        m,
        "proxy_get_current_time_nanoseconds",
        |mut c: C, ret: i32| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            finish(write_u64(&mut c, ret, now))
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_set_tick_period_milliseconds",
        |mut c: C, ms: i32| {
            // The period belongs to the VM's root context whichever context asks, as in Envoy
            // (the Rust SDK traps on anything but `Ok`).
            let state = c.data_mut();
            state.tick_period = (ms > 0).then(|| Duration::from_millis(ms as u32 as u64));
            Ok(Status::Ok as i32)
        },
    )?;
    linker.func_wrap(m, "proxy_done", |_: C| Ok(Status::Ok as i32))?;
    linker.func_wrap(m, "proxy_set_effective_context", |mut c: C, id: i32| {
        let state = c.data_mut();
        let id = id as u32;
        let known = id == state.root_context_id || state.http_contexts.contains(&id);
        if !known {
            return Ok(Status::BadArgument as i32);
        }
        state.effective_context = id;
        Ok(Status::Ok as i32)
    })?;

    // Buffers.
    linker.func_wrap(
        m,
        "proxy_get_buffer_bytes",
        |mut c: C, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| {
            finish(get_buffer_bytes(
                &mut c, kind, start, max, ret_ptr, ret_size,
            ))
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_set_buffer_bytes",
        |mut c: C, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            finish(set_buffer_bytes(&mut c, kind, start, size, ptr, len))
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_get_buffer_status",
        |mut c: C, kind: i32, ret_size: i32, ret_flags: i32| {
            finish(get_buffer_status(&mut c, kind, ret_size, ret_flags))
        },
    )?;

    // Header maps.
    linker.func_wrap(
        m,
        "proxy_get_header_map_size",
        |mut c: C, map: i32, ret: i32| {
            finish((|| {
                let size = with_map(&mut c, map, encoded_size)?;
                write_u32(&mut c, ret, size as u32)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_get_header_map_pairs",
        |mut c: C, map: i32, ret_ptr: i32, ret_size: i32| {
            finish((|| {
                let encoded = with_map(&mut c, map, |pairs| encode_pairs(pair_refs(pairs)))?;
                copy_out(&mut c, &encoded, ret_ptr, ret_size)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_set_header_map_pairs",
        |mut c: C, map: i32, ptr: i32, len: i32| {
            finish((|| {
                let pairs = decode_pairs(&read(&c, ptr, len)?)?;
                let pairs = pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect();
                *map_mut(&mut c, map)? = pairs;
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_get_header_map_value",
        |mut c: C, map: i32, key_ptr: i32, key_len: i32, ret_ptr: i32, ret_size: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?;
                let value = with_map(&mut c, map, |pairs| {
                    pairs
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                        .map(|(_, v)| v.clone())
                })?
                .ok_or(HostError::Status(Status::NotFound))?;
                copy_out(&mut c, &value, ret_ptr, ret_size)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_add_header_map_value",
        |mut c: C, map: i32, key_ptr: i32, key_len: i32, value_ptr: i32, value_len: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?.to_ascii_lowercase();
                let value = read(&c, value_ptr, value_len)?;
                map_mut(&mut c, map)?.push((key, value));
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_replace_header_map_value",
        |mut c: C, map: i32, key_ptr: i32, key_len: i32, value_ptr: i32, value_len: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?.to_ascii_lowercase();
                let value = read(&c, value_ptr, value_len)?;
                replace(map_mut(&mut c, map)?, key, value);
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_remove_header_map_value",
        |mut c: C, map: i32, key_ptr: i32, key_len: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?;
                map_mut(&mut c, map)?.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                Ok(())
            })())
        },
    )?;

    // Stream control.
    linker.func_wrap(m, "proxy_continue_stream", |mut c: C, kind: i32| {
        finish(continue_stream(&mut c, StreamType::from_raw(kind)))
    })?;
    linker.func_wrap(m, "proxy_close_stream", |mut c: C, kind: i32| {
        finish((|| {
            let kind = StreamType::from_raw(kind).ok_or(HostError::Status(Status::BadArgument))?;
            // Envoy answers `Ok` when there is nothing of that kind to close (a root context,
            // a TCP stream type on an HTTP request); the Rust SDK traps on anything else.
            if let (Some(stream), StreamType::Request | StreamType::Response) =
                (c.data_mut().effective_stream(), kind)
            {
                stream.reset = true;
            }
            Ok(())
        })())
    })?;
    linker.func_wrap(m, "proxy_continue_request", |mut c: C| {
        finish(continue_stream(&mut c, Some(StreamType::Request)))
    })?;
    linker.func_wrap(m, "proxy_continue_response", |mut c: C| {
        finish(continue_stream(&mut c, Some(StreamType::Response)))
    })?;
    linker.func_wrap(m, "proxy_clear_route_cache", |_: C| Ok(Status::Ok as i32))?;
    linker.func_wrap(
        m,
        "proxy_get_configuration",
        |mut c: C, ret_ptr: i32, ret_size: i32| {
            let config = c.data().plugin.config.configuration.clone();
            finish(copy_out(&mut c, &config, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_send_local_response",
        |mut c: C,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         grpc_status: i32| {
            finish((|| {
                let details = read_string(&c, details_ptr, details_len)?;
                let body = read(&c, body_ptr, body_len)?;
                let headers = decode_pairs(&read(&c, headers_ptr, headers_len)?)?;
                if !(200..=599).contains(&status) {
                    return Err(Status::BadArgument.into());
                }
                let stream = c
                    .data_mut()
                    .effective_stream()
                    .ok_or(HostError::Status(Status::BadArgument))?;
                stream.local_response = Some(LocalResponse {
                    status: status as u16,
                    details,
                    headers,
                    body,
                    grpc_status: (grpc_status >= 0).then_some(grpc_status),
                });
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_get_status",
        |mut c: C, ret_code: i32, ret_ptr: i32, ret_size: i32| {
            finish((|| {
                write_u32(&mut c, ret_code, 0)?;
                copy_out(&mut c, &[], ret_ptr, ret_size)
            })())
        },
    )?;

    // HTTP callouts.
    linker.func_wrap(
        m,
        "proxy_http_call",
        |mut c: C,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            finish((|| {
                let upstream = read_string(&c, upstream_ptr, upstream_len)?;
                let headers = decode_pairs(&read(&c, headers_ptr, headers_len)?)?;
                let body = read(&c, body_ptr, body_len)?;
                let trailers = decode_pairs(&read(&c, trailers_ptr, trailers_len)?)?;
                // Envoy refuses calls missing the pseudo-headers a request cannot do without.
                for required in [":method", ":path", ":authority"] {
                    if !headers.iter().any(|(k, _)| k == required) {
                        return Err(Status::BadArgument.into());
                    }
                }
                let state = c.data_mut();
                let token = state.next_call_token;
                state.next_call_token = state.next_call_token.wrapping_add(1).max(1);
                let context_id = state.effective_context;
                state.calls_in_flight.insert(token, context_id);
                state.outgoing_calls.push(OutgoingCall {
                    token,
                    context_id,
                    request: HttpCallRequest {
                        upstream,
                        headers,
                        body,
                        trailers,
                        timeout: Duration::from_millis(timeout_ms.max(0) as u64),
                    },
                });
                write_u32(&mut c, ret_token, token)
            })())
        },
    )?;
    // gRPC callouts are not carried; the SDKs map InternalFailure to an error for the filter.
    linker.func_wrap(
        m,
        "proxy_grpc_call",
        |_: C,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32| Ok(Status::InternalFailure as i32),
    )?;
    linker.func_wrap(
        m,
        "proxy_grpc_stream",
        |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            Ok(Status::InternalFailure as i32)
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_grpc_send",
        |_: C, _: i32, _: i32, _: i32, _: i32| Ok(Status::NotFound as i32),
    )?;
    linker.func_wrap(m, "proxy_grpc_cancel", |_: C, _: i32| {
        Ok(Status::NotFound as i32)
    })?;
    linker.func_wrap(m, "proxy_grpc_close", |_: C, _: i32| {
        Ok(Status::NotFound as i32)
    })?;

    // Shared data and queues.
    linker.func_wrap(
        m,
        "proxy_set_shared_data",
        |c: C, key_ptr: i32, key_len: i32, value_ptr: i32, value_len: i32, cas: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?;
                let value = read(&c, value_ptr, value_len)?;
                let plugin = &c.data().plugin;
                plugin
                    .runtime
                    .shared_data
                    .set(&plugin.config.vm_id, &key, value, cas as u32)?;
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_get_shared_data",
        |mut c: C, key_ptr: i32, key_len: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| {
            finish((|| {
                let key = read_string(&c, key_ptr, key_len)?;
                let plugin = &c.data().plugin;
                let (value, cas) = plugin.runtime.shared_data.get(&plugin.config.vm_id, &key)?;
                write_u32(&mut c, ret_cas, cas)?;
                copy_out(&mut c, &value, ret_ptr, ret_size)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_register_shared_queue",
        |mut c: C, name_ptr: i32, name_len: i32, ret_id: i32| {
            finish((|| {
                let name = read_string(&c, name_ptr, name_len)?;
                let state = c.data();
                let id = state.plugin.runtime.queues.register(
                    &state.plugin.config.vm_id,
                    &name,
                    state.queue_owner.clone(),
                );
                write_u32(&mut c, ret_id, id)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_resolve_shared_queue",
        |mut c: C, vm_ptr: i32, vm_len: i32, name_ptr: i32, name_len: i32, ret_id: i32| {
            finish((|| {
                let vm_id = read_string(&c, vm_ptr, vm_len)?;
                let name = read_string(&c, name_ptr, name_len)?;
                let id = c.data().plugin.runtime.queues.resolve(&vm_id, &name)?;
                write_u32(&mut c, ret_id, id)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_enqueue_shared_queue",
        |mut c: C, id: i32, ptr: i32, len: i32| {
            finish((|| {
                let item = read(&c, ptr, len)?;
                let owner = c.data().plugin.runtime.queues.enqueue(id as u32, item)?;
                c.data_mut().queues_to_notify.push((owner, id as u32));
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_dequeue_shared_queue",
        |mut c: C, id: i32, ret_ptr: i32, ret_size: i32| {
            finish((|| {
                let item = c.data().plugin.runtime.queues.dequeue(id as u32)?;
                copy_out(&mut c, &item, ret_ptr, ret_size)
            })())
        },
    )?;

    // Metrics.
    linker.func_wrap(
        m,
        "proxy_define_metric",
        |mut c: C, kind: i32, name_ptr: i32, name_len: i32, ret_id: i32| {
            finish((|| {
                let kind =
                    MetricType::from_raw(kind).ok_or(HostError::Status(Status::BadArgument))?;
                let name = read_string(&c, name_ptr, name_len)?;
                let id = c.data().plugin.runtime.metrics.define(kind, &name)?;
                write_u32(&mut c, ret_id, id)
            })())
        },
    )?;
    linker.func_wrap(m, "proxy_increment_metric", |c: C, id: i32, delta: i64| {
        finish(
            c.data()
                .plugin
                .runtime
                .metrics
                .increment(id as u32, delta)
                .map_err(HostError::Status),
        )
    })?;
    linker.func_wrap(m, "proxy_record_metric", |c: C, id: i32, value: i64| {
        finish(
            c.data()
                .plugin
                .runtime
                .metrics
                .record(id as u32, value as u64)
                .map_err(HostError::Status),
        )
    })?;
    linker.func_wrap(m, "proxy_get_metric", |mut c: C, id: i32, ret: i32| {
        finish((|| {
            let value = c.data().plugin.runtime.metrics.value(id as u32)?;
            write_u64(&mut c, ret, value)
        })())
    })?;

    // Properties.
    linker.func_wrap(
        m,
        "proxy_get_property",
        |mut c: C, path_ptr: i32, path_len: i32, ret_ptr: i32, ret_size: i32| {
            finish((|| {
                let path = read(&c, path_ptr, path_len)?;
                let value =
                    properties::get(c.data(), &path).ok_or(HostError::Status(Status::NotFound))?;
                copy_out(&mut c, &value, ret_ptr, ret_size)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_set_property",
        |mut c: C, path_ptr: i32, path_len: i32, value_ptr: i32, value_len: i32| {
            finish((|| {
                let path = read(&c, path_ptr, path_len)?;
                let value = read(&c, value_ptr, value_len)?;
                properties::set(c.data_mut(), &path, value).map_err(HostError::Status)
            })())
        },
    )?;
    linker.func_wrap(
        m,
        "proxy_call_foreign_function",
        |_: C, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| Ok(Status::NotFound as i32),
    )?;

    // Emscripten-built modules import these two.
    linker.func_wrap(m, "pthread_equal", |_: C, a: i32, b: i32| {
        Ok((a == b) as i32)
    })?;
    linker.func_wrap(m, "emscripten_notify_memory_growth", |_: C, _: i32| Ok(()))?;
    Ok(())
}

fn log(c: &mut C, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::from_raw(level).ok_or(HostError::Status(Status::BadArgument))?;
    // An oversized message is cut at the host-buffer limit rather than refused: the Rust SDK
    // traps on any status but `Ok`, and a long log line is no reason to lose the VM.
    let limit = c.data().plugin.limits.max_host_buffer;
    let message = read_truncated(c, ptr, len, limit)?;
    let state = c.data();
    if level >= state.plugin.config.log_level {
        state.log(level, &String::from_utf8_lossy(&message));
    }
    Ok(())
}

/// Resumes the effective request. Like Envoy, resuming what does not exist here (the root
/// context, TCP stream types) is a no-op answered `Ok`: the Rust SDK traps on any other status
/// (its issue #255 is a host answering `Unimplemented`).
fn continue_stream(c: &mut C, kind: Option<StreamType>) -> HostResult {
    let state = c.data_mut();
    let effective = state.effective_context;
    let kind = kind.ok_or(HostError::Status(Status::BadArgument))?;
    if !matches!(kind, StreamType::Request | StreamType::Response) {
        return Ok(());
    }
    let is_context = state.http_contexts.contains(&effective);
    match state.effective_stream() {
        Some(stream) => match kind {
            StreamType::Request => stream.resume_request = true,
            _ => stream.resume_response = true,
        },
        None if is_context => {
            state.resumed_elsewhere.insert(effective);
        }
        None => {}
    }
    Ok(())
}

/// Runs `f` on the header map the effective context can see, without copying the map. Maps
/// not (yet) present in the current phase read as empty: the Rust SDK traps on anything but
/// `Ok` here.
fn with_map<R>(c: &mut C, map: i32, f: impl FnOnce(&Pairs) -> R) -> HostResult<R> {
    static EMPTY: Pairs = Vec::new();
    let map = MapType::from_raw(map).ok_or(HostError::Status(Status::BadArgument))?;
    let state = c.data_mut();
    let pairs = match map {
        MapType::HttpCallResponseHeaders => state.call_response.as_ref().map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => state.call_response.as_ref().map(|r| &r.trailers),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
        _ => state.effective_stream().map(|s| match map {
            MapType::RequestHeaders => &s.request_headers,
            MapType::RequestTrailers => &s.request_trailers,
            MapType::ResponseHeaders => &s.response_headers,
            _ => &s.response_trailers,
        }),
    };
    Ok(f(pairs.unwrap_or(&EMPTY)))
}

/// The size of `pairs` serialized, without serializing them.
fn encoded_size(pairs: &Pairs) -> usize {
    if pairs.is_empty() {
        return 0;
    }
    4 + pairs
        .iter()
        .map(|(k, v)| 8 + k.len() + 1 + v.len() + 1)
        .sum::<usize>()
}

fn map_mut<'a>(c: &'a mut C, map: i32) -> HostResult<&'a mut Pairs> {
    let map = MapType::from_raw(map).ok_or(HostError::Status(Status::BadArgument))?;
    let state = c.data_mut();
    let pairs = match map {
        MapType::HttpCallResponseHeaders => state.call_response.as_mut().map(|r| &mut r.headers),
        MapType::HttpCallResponseTrailers => state.call_response.as_mut().map(|r| &mut r.trailers),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
        _ => state.effective_stream().map(|s| match map {
            MapType::RequestHeaders => &mut s.request_headers,
            MapType::RequestTrailers => &mut s.request_trailers,
            MapType::ResponseHeaders => &mut s.response_headers,
            _ => &mut s.response_trailers,
        }),
    };
    pairs.ok_or(HostError::Status(Status::BadArgument))
}

fn pair_refs(pairs: &Pairs) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
    pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice()))
}

/// Sets a header to one value: the first occurrence keeps its place, repeats go. Names match
/// case-insensitively, as in get and remove.
fn replace(pairs: &mut Pairs, key: String, value: Vec<u8>) {
    match pairs.iter().position(|(k, _)| k.eq_ignore_ascii_case(&key)) {
        Some(first) => {
            pairs[first].1 = value;
            let mut index = 0;
            pairs.retain(|(k, _)| {
                let keep = index <= first || !k.eq_ignore_ascii_case(&key);
                index += 1;
                keep
            });
        }
        None => pairs.push((key, value)),
    }
}

fn buffer_type(kind: i32) -> HostResult<BufferType> {
    BufferType::from_raw(kind).ok_or(HostError::Status(Status::BadArgument))
}

/// Runs `f` on the buffer `kind` as the effective context sees it (and whether it is the end),
/// without copying the whole buffer. Buffers this host never has (TCP data, gRPC messages) and
/// a body outside a request are `NotFound`, which the SDKs read as "no data".
fn with_buffer<R>(c: &mut C, kind: BufferType, f: impl FnOnce(&[u8], bool) -> R) -> HostResult<R> {
    let state = c.data_mut();
    Ok(match kind {
        BufferType::RequestBody | BufferType::ResponseBody => {
            let stream = state
                .effective_stream()
                .ok_or(HostError::Status(Status::NotFound))?;
            if kind == BufferType::RequestBody {
                f(&stream.request_body, stream.request_end)
            } else {
                f(&stream.response_body, stream.response_end)
            }
        }
        BufferType::HttpCallResponseBody => f(
            &state
                .call_response
                .as_ref()
                .ok_or(HostError::Status(Status::NotFound))?
                .body,
            true,
        ),
        BufferType::VmConfiguration => f(&state.plugin.config.vm_configuration, true),
        BufferType::PluginConfiguration => f(&state.plugin.config.configuration, true),
        BufferType::CallData => f(&[], true),
        BufferType::DownstreamData | BufferType::UpstreamData | BufferType::GrpcReceiveBuffer => {
            return Err(Status::NotFound.into())
        }
    })
}

/// Copies out at most `max` bytes from `start`. Nothing to copy (an empty buffer, `max` 0, a
/// start at or past the end) is `Ok` with `(0, 0)` written, as cpp-host's `get_buffer_bytes`
/// does: the Rust SDK reads the null pointer as `None` (it traps on `BadArgument`).
fn get_buffer_bytes(
    c: &mut C,
    kind: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let start = start as u32 as usize;
    let max = max as u32 as usize;
    let bytes = with_buffer(c, buffer_type(kind)?, |bytes, _| {
        let start = start.min(bytes.len());
        let end = start.saturating_add(max).min(bytes.len());
        bytes[start..end].to_vec()
    })?;
    copy_out(c, &bytes, ret_ptr, ret_size)
}

fn get_buffer_status(c: &mut C, kind: i32, ret_size: i32, ret_flags: i32) -> HostResult {
    let (size, end) = with_buffer(c, buffer_type(kind)?, |bytes, end| (bytes.len(), end))?;
    write_u32(c, ret_size, size as u32)?;
    write_u32(c, ret_flags, end as u32)
}

/// Replaces `size` bytes at `start` with the guest's data: the whole body (`0, len`), a prefix
/// (`0, 0`), an append (`len, 0`, or any start past the end, as Envoy appends) or anything in
/// between. A body that would outgrow the buffer limit is left alone and the request answered
/// 413/500 after the callback, as Envoy does on overflow (the Rust SDK traps on any status but
/// `Ok`, which would take the whole VM down).
fn set_buffer_bytes(c: &mut C, kind: i32, start: i32, size: i32, ptr: i32, len: i32) -> HostResult {
    let kind = buffer_type(kind)?;
    let data = read(c, ptr, len)?;
    let limit = c.data().plugin.limits.max_buffered_body;
    let state = c.data_mut();
    let stream = state
        .effective_stream()
        .ok_or(HostError::Status(Status::NotFound))?;
    let body = match kind {
        BufferType::RequestBody => &mut stream.request_body,
        BufferType::ResponseBody => &mut stream.response_body,
        _ => return Err(Status::BadArgument.into()),
    };
    let start = (start as u32 as usize).min(body.len());
    let end = start.saturating_add(size as u32 as usize).min(body.len());
    if body.len() - (end - start) + data.len() > limit {
        stream.body_too_large = true;
        return Ok(());
    }
    let tail = body.split_off(end);
    body.truncate(start);
    body.extend_from_slice(&data);
    body.extend_from_slice(&tail);
    Ok(())
}
