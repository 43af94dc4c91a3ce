//! The coordinator's Prometheus families: one 0/1 series per state (so
//! alerts can match `state="rolled-back"`), the deployment's info line,
//! progress and the health gate's counters. Each feature renders its own
//! metrics; `crate::metrics` only lends the text format helpers.

use std::fmt::Write;

use super::{State, Status};

/// The OTA coordinator: one 0/1 series per state (so alerts can match
/// `state="rolled-back"`), progress, and the gate's counters.
pub fn render_metrics(s: &Status, enabled: bool, out: &mut String) {
    crate::metrics::family(
        out,
        "gauge",
        "konsul_edge_ota_state",
        "A/B update state (1 = current).",
        "state",
        State::ALL
            .into_iter()
            .map(|st| (st.as_str(), u64::from(enabled && s.deployment.state == st))),
    );
    let _ = writeln!(
        out,
        "# HELP konsul_edge_ota_info Backend, slots and the deployment (rollout: the hub rollout it carries out, empty for a local install).\n# TYPE konsul_edge_ota_info gauge\n\
         konsul_edge_ota_info{{backend=\"{}\",booted_slot=\"{}\",target_slot=\"{}\",version=\"{}\",rollout=\"{}\"}} 1",
        s.backend,
        crate::metrics::escape(&s.booted_slot),
        crate::metrics::escape(&s.deployment.target_slot),
        crate::metrics::escape(&s.deployment.version),
        crate::metrics::escape(&s.deployment.rollout)
    );
    for (name, help, v) in [
        (
            "konsul_edge_ota_progress_percent",
            "Progress of the current OTA step.",
            u64::from(s.progress),
        ),
        (
            "konsul_edge_ota_gate_crashes",
            "Daemon crashes during the current health gate.",
            u64::from(s.deployment.crashes),
        ),
        (
            "konsul_edge_ota_gate_interrupted_boots",
            "Reboots during the current health gate (power cuts, resets).",
            u64::from(s.deployment.boots),
        ),
    ] {
        crate::metrics::sample(out, "gauge", name, help, v);
    }
}
