//! The manager's Prometheus text: reconcile counters, volume robustness, replica modes and
//! rebuild progress, plus what the built-in node adds.

use std::sync::atomic::Ordering;

use crate::controller::Manager;
use crate::model::*;
use crate::store;

impl Manager {
    /// Adds a source of metrics served with the manager's own.
    pub fn add_metrics(&self, f: Box<dyn Fn() -> String + Send + Sync>) {
        let _ = self.extra_metrics.set(f);
    }

    /// Prometheus text for the manager (and the built-in node, if any).
    pub fn metrics_text(&self) -> String {
        let mut o = self.own_metrics();
        if let Some(f) = self.extra_metrics.get() {
            o.push_str(&f());
        }
        o
    }

    pub(crate) fn own_metrics(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP zebu_reconcile_total Reconcile passes run by the manager."
        );
        let _ = writeln!(o, "# TYPE zebu_reconcile_total counter");
        let _ = writeln!(
            o,
            "zebu_reconcile_total {}",
            self.reconciles.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP zebu_reconcile_errors_total Reconcile passes that failed."
        );
        let _ = writeln!(o, "# TYPE zebu_reconcile_errors_total counter");
        let _ = writeln!(
            o,
            "zebu_reconcile_errors_total {}",
            self.reconcile_errors.load(Ordering::Relaxed)
        );
        let s = &*self.store;
        if let Ok(vols) = store::list::<Volume>(s) {
            let _ = writeln!(
                o,
                "# HELP zebu_volume_robustness Volume robustness (1 for the current value)."
            );
            let _ = writeln!(o, "# TYPE zebu_volume_robustness gauge");
            for v in &vols {
                for (r, label) in [
                    (Robustness::Healthy, "healthy"),
                    (Robustness::Degraded, "degraded"),
                    (Robustness::Faulted, "faulted"),
                    (Robustness::Unknown, "unknown"),
                ] {
                    let _ = writeln!(
                        o,
                        "zebu_volume_robustness{{volume=\"{}\",robustness=\"{label}\"}} {}",
                        v.metadata.name,
                        u8::from(v.status.robustness == r)
                    );
                }
            }
        }
        if let Ok(reps) = store::list::<Replica>(s) {
            let _ = writeln!(
                o,
                "# HELP zebu_replica_mode Replica mode as the engine reports it (1 for the current value)."
            );
            let _ = writeln!(o, "# TYPE zebu_replica_mode gauge");
            let _ = writeln!(
                o,
                "# HELP zebu_replica_rebuild_copied_bytes Bytes copied by the replica's last rebuild."
            );
            let _ = writeln!(o, "# TYPE zebu_replica_rebuild_copied_bytes gauge");
            for r in &reps {
                for (m, label) in [
                    (ReplicaMode::RW, "RW"),
                    (ReplicaMode::WO, "WO"),
                    (ReplicaMode::ERR, "ERR"),
                ] {
                    let _ = writeln!(
                        o,
                        "zebu_replica_mode{{volume=\"{}\",replica=\"{}\",mode=\"{label}\"}} {}",
                        r.spec.volume,
                        r.metadata.name,
                        u8::from(r.status.mode == Some(m))
                    );
                }
                let _ = writeln!(
                    o,
                    "zebu_replica_rebuild_copied_bytes{{volume=\"{}\",replica=\"{}\"}} {}",
                    r.spec.volume, r.metadata.name, r.status.rebuild_copied
                );
            }
        }
        o
    }
}
