//! Auto-repair's memory in the cluster record: what each repair saw, did and achieved (bounded
//! history, shown by `describe` and `operations`), since when each unhealthy node has been seen
//! so (for problems the API gives no time for: a machine gone, SSH not answering, a node that
//! never registered), and how the last pass went (`autorepair status`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Timestamp;

/// How many repairs the record keeps (the oldest are dropped first).
pub const KEEP_REPAIRS: usize = 100;

/// What a repair does to a node, mildest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepairAction {
    /// Restart the node's stopped or failed systemd units.
    RestartUnits,
    /// Power-cycle the machine through its provider (a stopped machine is started).
    PowerCycle,
    /// Delete the machine (a worker, drained first when it still answers) and create it again
    /// from the cluster's spec and pinned image.
    Replace,
}

impl RepairAction {
    /// Kebab-case name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RepairAction::RestartUnits => "restart-units",
            RepairAction::PowerCycle => "power-cycle",
            RepairAction::Replace => "replace",
        }
    }

    /// Whether it takes the node down (counted against the pool's hourly repair limit).
    pub fn disruptive(self) -> bool {
        !matches!(self, RepairAction::RestartUnits)
    }
}

impl std::fmt::Display for RepairAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a repair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepairOutcome {
    /// Started and not finished: running, or its run was killed (the next pass resumes it).
    InProgress,
    /// The node was Ready afterwards.
    Succeeded,
    /// It did not make the node Ready (the next attempt backs off and escalates).
    Failed,
}

impl std::fmt::Display for RepairOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RepairOutcome::InProgress => "in-progress",
            RepairOutcome::Succeeded => "succeeded",
            RepairOutcome::Failed => "failed",
        })
    }
}

/// One repair of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepairRecord {
    /// The node (its machine's name).
    pub node: String,
    /// Its pool (`control-plane` for the control plane).
    pub pool: String,
    /// What was done.
    pub action: RepairAction,
    /// The units restarted (`restart-units`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    /// What was seen that made the node unhealthy.
    pub reason: String,
    /// When the repair started.
    pub started_at: Timestamp,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// How it ended.
    pub outcome: RepairOutcome,
    /// What happened: the error of a failed repair, or how long the node took to be Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The steps already done, so a killed repair resumes after them (`replace`:
    /// `node-deleted`, `machine-deleted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps_done: Vec<String>,
    /// The name of the machine that replaces it (`replace`: a new name, given before the new
    /// machine is made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Seconds from the start of the repair until the node was Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_after_secs: Option<u64>,
    /// Seconds from when the problem was first seen until the node was Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healed_after_secs: Option<u64>,
}

impl RepairRecord {
    /// Whether the repair is of `node`: the node it started on, or the machine that replaces it.
    pub fn is_for(&self, node: &str) -> bool {
        self.node == node || self.replaced_by.as_deref() == Some(node)
    }
}

/// How the last repair pass went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepairPass {
    /// When it ran.
    pub at: Timestamp,
    /// Whether a schedule started it (`--scheduled`).
    pub scheduled: bool,
    /// Nodes healthy / all nodes.
    pub healthy: u32,
    /// All nodes the spec wants.
    pub nodes: u32,
    /// The repair it made, as `action node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<String>,
    /// Why no repair was made although a node was unhealthy (a brake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// The pass's error, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RepairPass {
    /// One line: `<at> N/M healthy[, repaired: ...| held: ...| failed: ...]`.
    pub fn summary(&self) -> String {
        format!(
            "{} {}/{} healthy{}",
            self.at,
            self.healthy,
            self.nodes,
            self.repaired
                .as_ref()
                .map(|a| format!(", repaired: {a}"))
                .or_else(|| self.held.as_ref().map(|h| format!(", held: {h}")))
                .or_else(|| self.error.as_ref().map(|e| format!(", failed: {e}")))
                .unwrap_or_default()
        )
    }
}

/// Auto-repair's part of the cluster record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepairState {
    /// Repairs, oldest first, at most [`KEEP_REPAIRS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RepairRecord>,
    /// Since when each currently unhealthy node has been seen unhealthy, by node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unhealthy_since: BTreeMap<String, Timestamp>,
    /// The last pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pass: Option<RepairPass>,
}

impl RepairState {
    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.history.is_empty() && self.unhealthy_since.is_empty() && self.last_pass.is_none()
    }

    /// Appends a repair, dropping the oldest beyond [`KEEP_REPAIRS`]; returns its index.
    pub fn push(&mut self, r: RepairRecord) -> usize {
        self.history.push(r);
        let over = self.history.len().saturating_sub(KEEP_REPAIRS);
        self.history.drain(..over);
        self.history.len() - 1
    }

    /// The unfinished repair, if any (at most one: a pass makes one repair at a time).
    pub fn in_progress(&self) -> Option<usize> {
        self.history
            .iter()
            .rposition(|r| r.outcome == RepairOutcome::InProgress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> RepairRecord {
        RepairRecord {
            node: node.into(),
            pool: "p".into(),
            action: RepairAction::RestartUnits,
            units: vec!["kubelet.service".into()],
            reason: "r".into(),
            started_at: Timestamp::now(),
            finished_at: None,
            outcome: RepairOutcome::Succeeded,
            detail: None,
            steps_done: Vec::new(),
            replaced_by: None,
            ready_after_secs: None,
            healed_after_secs: None,
        }
    }

    #[test]
    fn history_is_bounded_and_keeps_the_newest() {
        let mut s = RepairState::default();
        for i in 0..(KEEP_REPAIRS + 5) {
            s.push(rec(&format!("n{i}")));
        }
        assert_eq!(s.history.len(), KEEP_REPAIRS);
        assert_eq!(s.history[0].node, "n5");
        assert_eq!(s.in_progress(), None);
        let mut r = rec("x");
        r.outcome = RepairOutcome::InProgress;
        let i = s.push(r);
        assert_eq!(s.in_progress(), Some(i));
        let json = serde_json::to_string(&s.history[i]).unwrap_or_default();
        assert!(json.contains("\"action\":\"restart-units\""), "{json}");
        assert!(json.contains("\"outcome\":\"in-progress\""), "{json}");
    }
}
