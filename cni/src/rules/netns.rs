//! Running programs inside a pod's network namespace, given as an fd.
//!
//! The child joins the namespace between fork and exec (`setns` in a `pre_exec` hook), so no
//! thread of ours ever changes namespace and no helper binary (`nsenter`, `ip netns exec`) is
//! needed. The fd need not be inheritable: close-on-exec only takes effect at exec, after setns.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

use super::{command_line, RulesError, Ruleset};

/// Runs `program args` in `netns` with `input` on stdin; returns stdout if it exits 0.
pub(super) fn run(
    netns: BorrowedFd<'_>,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, RulesError> {
    let command = command_line(program, args);
    tracing::debug!(%command, input = input.unwrap_or(""), "running in pod netns");
    let raw = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the hook only makes the setns syscall and builds an io::Error from an errno, both
    // async-signal-safe (no allocation, no locks). `raw` stays open: `netns` borrows it for the
    // whole call, and the child holds its own copy of the table until exec.
    unsafe {
        cmd.pre_exec(move || {
            setns(BorrowedFd::borrow_raw(raw), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
    }
    let spawn_error = |source| RulesError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;

    // Feeding stdin, draining stdout and draining stderr all at once: any one of them could block
    // on a full pipe while we wait on another.
    let stdin = child.stdin.take();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (written, out, err) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || match (stdin, input) {
            (Some(mut pipe), Some(text)) => pipe.write_all(text.as_bytes()),
            _ => Ok(()),
        });
        let err_reader = scope.spawn(move || {
            let mut buf = Vec::new();
            stderr.read_to_end(&mut buf).map(|_| buf)
        });
        let mut out = Vec::new();
        let out = stdout.read_to_end(&mut out).map(|_| out);
        (
            writer.join().expect("stdin writer panicked"),
            out,
            err_reader.join().expect("stderr reader panicked"),
        )
    });
    let status = child.wait().map_err(spawn_error)?;
    let stderr = String::from_utf8_lossy(&err.map_err(spawn_error)?)
        .trim()
        .to_owned();
    if !status.success() {
        return Err(RulesError::Command {
            command,
            status,
            stderr,
        });
    }
    // A broken stdin pipe with a zero exit would mean the program ignored part of its input.
    written.map_err(spawn_error)?;
    if !stderr.is_empty() {
        tracing::debug!(%command, %stderr, "succeeded with messages");
    }
    Ok(String::from_utf8_lossy(&out.map_err(spawn_error)?).into_owned())
}

/// Runs a rendered ruleset in `netns`.
pub(super) fn run_ruleset(netns: BorrowedFd<'_>, ruleset: &Ruleset) -> Result<(), RulesError> {
    run(netns, ruleset.program, ruleset.args, Some(&ruleset.text)).map(drop)
}

/// Runs `f` on a short-lived thread inside `netns`, for the few facts only readable from inside
/// (per-namespace sysctls). The thread exits afterwards, so its namespace never leaks into ours.
pub(crate) fn with_netns<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(netns, CloneFlags::CLONE_NEWNET)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("thread inside the pod netns panicked"))?
    })
}
