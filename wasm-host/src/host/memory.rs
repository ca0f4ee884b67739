//! Guest memory access. Every pointer and length from a guest is checked against the current size
//! of its memory; values returned to a guest are copied into memory the guest's own allocator
//! handed out, as the ABI requires (the SDKs free them as their own allocations).

use wasmtime::{Caller, Memory};

use crate::abi::Status;
use crate::context::HostState;

/// Why a host function stops: a status for the guest, or a trap from the guest's own code.
pub(crate) enum HostError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(status: Status) -> Self {
        HostError::Status(status)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostError>;

/// The `i32` a host function returns for `result`.
pub(crate) fn finish(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(Status::Ok as i32),
        Err(HostError::Status(status)) => Ok(status as i32),
        Err(HostError::Trap(error)) => Err(error),
    }
}

fn memory(caller: &Caller<'_, HostState>) -> HostResult<Memory> {
    caller
        .data()
        .memory
        .ok_or(HostError::Status(Status::InternalFailure))
}

/// Checks `(ptr, len)` lies inside memory; `(0, 0)` (how SDKs pass "nothing") is fine.
fn range(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> HostResult<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start + len as u32 as usize;
    if len == 0 {
        return Ok(start..start);
    }
    let size = memory(caller)?.data_size(caller);
    if end > size {
        return Err(Status::InvalidMemoryAccess.into());
    }
    Ok(start..end)
}

/// Copies `len` bytes out of the guest, refusing more than the runtime's host-buffer limit.
/// Bounds come first: a range outside memory is `InvalidMemoryAccess` whatever its size.
pub(crate) fn read(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let range = range(caller, ptr, len)?;
    if range.is_empty() {
        return Ok(Vec::new());
    }
    if range.len() > caller.data().plugin.limits.max_host_buffer {
        return Err(Status::BadArgument.into());
    }
    Ok(memory(caller)?.data(caller)[range].to_vec())
}

/// Like [`read`], but copies at most `max` bytes of a valid range instead of refusing it.
pub(crate) fn read_truncated(
    caller: &Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    max: usize,
) -> HostResult<Vec<u8>> {
    let range = range(caller, ptr, len)?;
    if range.is_empty() {
        return Ok(Vec::new());
    }
    let end = range.start + range.len().min(max);
    Ok(memory(caller)?.data(caller)[range.start..end].to_vec())
}

pub(crate) fn read_string(
    caller: &Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> HostResult<String> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument.into())
}

/// Writes raw bytes at a guest address.
pub(crate) fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> HostResult {
    let range = range(caller, ptr, bytes.len() as i32)?;
    memory(caller)?.data_mut(caller)[range].copy_from_slice(bytes);
    Ok(())
}

/// Address 0 is ordinary, in-bounds linear memory: cpp-host writes out-parameters there, and
/// SDKs rely on it (the AssemblyScript SDK passes 0 as a size out-pointer it then ignores).
pub(crate) fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, value: u32) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

pub(crate) fn write_u64(caller: &mut Caller<'_, HostState>, ptr: i32, value: u64) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the guest: allocated with its allocator, then `(ptr, size)` written to the
/// two out-parameters. Nothing is allocated for an empty value (`0, 0`, as cpp-host does).
pub(crate) fn copy_out(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    // The out-parameters are checked first so a bad pointer does not leak an allocation.
    range(caller, ret_ptr, 4)?;
    range(caller, ret_size, 4)?;
    if bytes.is_empty() {
        write_u32(caller, ret_ptr, 0)?;
        return write_u32(caller, ret_size, 0);
    }
    let allocator = caller
        .data()
        .allocator
        .clone()
        .ok_or(HostError::Status(Status::InternalFailure))?;
    let len = i32::try_from(bytes.len()).map_err(|_| HostError::Status(Status::BadArgument))?;
    let ptr = allocator.call(&mut *caller, len).map_err(HostError::Trap)?;
    if ptr == 0 {
        return Err(Status::InternalFailure.into());
    }
    write(caller, ptr, bytes)?;
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, len as u32)
}
