//! kill -9 of the relay carrying live sessions, mid-stream, twice: every session resumes
//! on another relay process and every reliable byte arrives exactly once.

use std::time::Duration;

use anyhow::Result;
use kakehashi_loadtest::relay_kill::{KillOptions, run};
use kakehashi_loadtest::services;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_relays_lose_no_reliable_byte() -> Result<()> {
    if services::etcd()?.is_none() {
        return Ok(());
    }
    let report = run(KillOptions {
        kills: 2,
        sessions: 2,
        relays: 3,
        chat_rate: 50,
        chat_bytes: 200,
        settle: Duration::from_millis(1500),
        program: env!("CARGO_BIN_EXE_kakehashi-loadtest").into(),
    })
    .await?;
    assert!(report.resume_ms.count >= 4, "{report:?}");
    assert!(report.reliable_bytes.sent > 0);
    assert_eq!(report.reliable_bytes.lost, 0, "{report:?}");
    assert_eq!(report.reliable_bytes.duplicated, 0, "{report:?}");
    assert_eq!(report.messages_out_of_order, 0, "{report:?}");
    Ok(())
}
