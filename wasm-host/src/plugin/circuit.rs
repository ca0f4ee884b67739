//! A plugin's admission control: a bound on its callbacks running or waiting for a VM, and a
//! circuit that opens when its callbacks keep running into the CPU budget. Both refuse requests
//! before they reach the guest, so a plugin that loops or is overloaded costs its own requests a
//! fast failure (per its `failStrategy`) instead of queueing them behind a runaway guest.
//!
//! The circuit: closed → (`trip_after` consecutive CPU-limit interrupts) → open for
//! `open_for` → half-open: one request probes the guest while the others still fail fast → the
//! probe's callback finishing in time closes it; a probe that fails opens it again, for twice as
//! long (up to `max_open_for`). Time is the runtime's epoch clock (one relaxed load).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::runtime::{CircuitSettings, RuntimeInner, EPOCH_TICK};
use crate::vm::VmFailure;

/// What operators see of one plugin's circuit, kept by the runtime under the plugin's name so
/// that counts survive a plugin's replacement by a new version.
#[derive(Default)]
pub(crate) struct CircuitStats {
    open: AtomicBool,
    opened: AtomicU64,
    refused_open: AtomicU64,
    refused_saturated: AtomicU64,
    timeouts: AtomicU64,
}

impl CircuitStats {
    /// Prometheus text for these plugins' circuits.
    pub fn render<'a>(
        plugins: impl Iterator<Item = (&'a String, &'a Arc<CircuitStats>)>,
    ) -> String {
        let mut open = String::new();
        let mut opened = String::new();
        let mut refused = String::new();
        let mut timeouts = String::new();
        for (name, stats) in plugins {
            let name = name.replace('\\', "\\\\").replace('"', "\\\"");
            let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
            let _ = writeln!(
                open,
                "ambit_wasm_plugin_circuit_open{{plugin=\"{name}\"}} {}",
                u8::from(stats.open.load(Ordering::Relaxed))
            );
            let _ = writeln!(
                opened,
                "ambit_wasm_plugin_circuit_opened_total{{plugin=\"{name}\"}} {}",
                load(&stats.opened)
            );
            for (reason, count) in [
                ("circuit_open", &stats.refused_open),
                ("saturated", &stats.refused_saturated),
            ] {
                let _ = writeln!(
                    refused,
                    "ambit_wasm_plugin_refused_total{{plugin=\"{name}\",reason=\"{reason}\"}} {}",
                    load(count)
                );
            }
            let _ = writeln!(
                timeouts,
                "ambit_wasm_plugin_cpu_limit_total{{plugin=\"{name}\"}} {}",
                load(&stats.timeouts)
            );
        }
        if open.is_empty() {
            return open;
        }
        format!(
            "# HELP ambit_wasm_plugin_circuit_open Whether the plugin's circuit is open (its \
             requests fail fast per failStrategy).\n# TYPE ambit_wasm_plugin_circuit_open gauge\n\
             {open}# HELP ambit_wasm_plugin_circuit_opened_total Times the plugin's circuit \
             opened.\n# TYPE ambit_wasm_plugin_circuit_opened_total counter\n{opened}\
             # HELP ambit_wasm_plugin_refused_total Callbacks refused before reaching the guest.\n\
             # TYPE ambit_wasm_plugin_refused_total counter\n{refused}\
             # HELP ambit_wasm_plugin_cpu_limit_total Callbacks interrupted at the CPU budget.\n\
             # TYPE ambit_wasm_plugin_cpu_limit_total counter\n{timeouts}"
        )
    }
}

pub(crate) struct Circuit {
    plugin: String,
    runtime: Arc<RuntimeInner>,
    settings: CircuitSettings,
    max_pending: usize,
    /// Callbacks admitted and not yet done (running or waiting for their VM).
    pending: AtomicUsize,
    /// Whether the last admission was refused for saturation (logged once per episode).
    saturated: AtomicBool,
    /// Consecutive callbacks interrupted at the CPU budget.
    timeouts: AtomicU32,
    /// The tick until which the circuit is open; 0 when closed.
    open_until: AtomicU64,
    /// Whether a half-open probe is under way.
    probing: AtomicBool,
    /// Times opened without closing in between: the next open lasts `open_for * 2^n`.
    opened_in_a_row: AtomicU32,
    stats: Arc<CircuitStats>,
}

/// What a callback admitted by [`Circuit::admit`] ended as.
pub(crate) enum Outcome {
    /// The guest returned in time (or the VM was already gone: nothing learned).
    Done,
    /// Interrupted at the CPU budget.
    TimedOut,
    /// Another failure (trap, memory): the VM is replaced, the budget was not the problem.
    Failed,
}

impl Outcome {
    pub fn of<R>(result: &Result<R, VmFailure>) -> Outcome {
        match result {
            Ok(_) | Err(VmFailure::Gone) => Outcome::Done,
            Err(VmFailure::CpuLimit { .. }) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        }
    }
}

/// One admitted callback; dropping it without [`Admission::settle`] (the request went away
/// mid-call) frees its place and, for a probe, lets another request probe.
pub(crate) struct Admission<'a> {
    circuit: &'a Circuit,
    counted: bool,
    probe: bool,
}

impl Circuit {
    pub fn new(
        plugin: &str,
        runtime: Arc<RuntimeInner>,
        max_pending: usize,
        stats: Arc<CircuitStats>,
    ) -> Circuit {
        Circuit {
            plugin: plugin.to_owned(),
            settings: runtime.config.circuit.clone(),
            runtime,
            max_pending: max_pending.max(1),
            pending: AtomicUsize::new(0),
            saturated: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            opened_in_a_row: AtomicU32::new(0),
            stats,
        }
    }

    /// Admits a request's callback, or refuses it at once: the circuit is open (or another
    /// request is probing it), or the plugin is saturated.
    pub fn admit(&self) -> Result<Admission<'_>, VmFailure> {
        let mut probe = false;
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 {
            if self.runtime.now_ticks() < until || self.probing.swap(true, Ordering::AcqRel) {
                self.stats.refused_open.fetch_add(1, Ordering::Relaxed);
                return Err(VmFailure::CircuitOpen);
            }
            probe = true;
            tracing::info!(plugin = %self.plugin, "wasm plugin circuit half-open: one request probes the guest");
        }
        let admission = Admission {
            circuit: self,
            counted: true,
            probe,
        };
        let pending = self.pending.fetch_add(1, Ordering::AcqRel);
        if pending >= self.max_pending {
            drop(admission);
            self.stats.refused_saturated.fetch_add(1, Ordering::Relaxed);
            if !self.saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!(plugin = %self.plugin, pending, "wasm plugin saturated: its callbacks queue behind busy VMs; requests fail fast per failStrategy");
            }
            return Err(VmFailure::Saturated(pending));
        }
        if self.saturated.load(Ordering::Relaxed) && pending < self.max_pending / 2 {
            self.saturated.store(false, Ordering::Relaxed);
            tracing::info!(plugin = %self.plugin, "wasm plugin no longer saturated");
        }
        Ok(admission)
    }

    /// Admits a callback that must run whatever the circuit says: finishing a context the
    /// guest already holds (else the guest would keep it forever).
    pub fn admit_always(&self) -> Admission<'_> {
        Admission {
            circuit: self,
            counted: false,
            probe: false,
        }
    }

    fn open(&self, reason: &str) {
        let doubling = self.opened_in_a_row.fetch_add(1, Ordering::AcqRel).min(16);
        let open_for = self
            .settings
            .open_for
            .saturating_mul(1 << doubling)
            .min(self.settings.max_open_for);
        let ticks = (open_for.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64;
        self.open_until
            .store(self.runtime.now_ticks() + ticks, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.stats.open.store(true, Ordering::Relaxed);
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(plugin = %self.plugin, ?open_for, "wasm plugin circuit opened ({reason}): its requests fail fast per failStrategy");
    }

    fn close(&self) {
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            self.opened_in_a_row.store(0, Ordering::Release);
            self.stats.open.store(false, Ordering::Relaxed);
            tracing::info!(plugin = %self.plugin, "wasm plugin circuit closed: a probe finished in time");
        }
        self.probing.store(false, Ordering::Release);
    }
}

impl Admission<'_> {
    /// Records how the callback ended.
    pub fn settle(mut self, outcome: Outcome) {
        let circuit = self.circuit;
        match outcome {
            Outcome::Done => {
                circuit.timeouts.store(0, Ordering::Relaxed);
                if self.probe {
                    circuit.close();
                }
            }
            Outcome::TimedOut => {
                circuit.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                let row = circuit.timeouts.fetch_add(1, Ordering::AcqRel) + 1;
                if self.probe {
                    circuit.open("the probe ran past its CPU budget");
                } else if row >= circuit.settings.trip_after
                    && circuit.open_until.load(Ordering::Acquire) == 0
                {
                    circuit.open("callbacks keep running past their CPU budget");
                }
            }
            Outcome::Failed => {
                if self.probe {
                    circuit.open("the probe failed");
                }
            }
        }
        self.probe = false;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.circuit.pending.fetch_sub(1, Ordering::AcqRel);
        }
        if self.probe {
            self.circuit.probing.store(false, Ordering::Release);
        }
    }
}
