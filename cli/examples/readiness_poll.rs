//! Polls a cluster's readiness through clusterctl's API client (what `create` and `upgrade` wait
//! on: `/readyz`, then the node list) for a while, as the benchmark of issue 9 compares against
//! kubectl run over SSH on the control plane (`CLUSTERCTL_E2E_PHASES=bench-readiness` in
//! `tests/bed/cli-e2e.sh` measures the control plane's CPU time for both in the same run).
//!
//! `readiness_poll NAME SECONDS INTERVAL_MS` with `CLUSTERCTL_STATE_DIR` naming the state
//! directory. Prints the number of polls and how many failed.

use std::time::{Duration, Instant};

use clusterctl::state::StateStore;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, name, seconds, interval_ms] = args.as_slice() else {
        anyhow::bail!("usage: readiness_poll NAME SECONDS INTERVAL_MS");
    };
    let duration = Duration::from_secs(seconds.parse()?);
    let interval = Duration::from_millis(interval_ms.parse()?);
    let store = StateStore::resolve(None)?;
    let record = store
        .load(name)?
        .ok_or_else(|| anyhow::anyhow!("no cluster {name:?} in the state directory"))?;
    let rt = clusterctl::action::runtime()?;
    rt.block_on(async {
        let api = clusterctl::action::cluster_api(&store, &record).await?;
        let started = Instant::now();
        let (mut polls, mut failed) = (0u32, 0u32);
        while started.elapsed() < duration {
            let tick = Instant::now();
            polls += 1;
            let ok = api.readyz().await.is_ok() && api.list_nodes().await.is_ok();
            if !ok {
                failed += 1;
            }
            if let Some(rest) = interval.checked_sub(tick.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
        api.close().await;
        println!("polls {polls} failed {failed}");
        Ok(())
    })
}
