//! Ends sessions whose time is up: past their deadline (TIME_LIMIT), or still waiting
//! for a code that has expired (CODE_EXPIRED). Also drops expired codes.

use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::service::{Core, now_ms};
use crate::telemetry;

/// How often the reaper looks; a session outlives its deadline by at most about this
/// (the relay enforces the deadline itself from the token).
pub const INTERVAL: Duration = Duration::from_millis(200);
/// Most sessions ended (or purged) per pass, so one pass never holds the backend long.
pub const BATCH: usize = 512;
/// How long an ended session stays readable (GetSession, ListSessions, WatchSession
/// replay) before its record and events are deleted.
pub const ENDED_RETENTION_MS: i64 = 60 * 60 * 1000;

/// Runs until `cancel` fires.
pub async fn run(core: Arc<Core>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = pass(&core).await {
            metrics::counter!(telemetry::REAPER_ERRORS).increment(1);
            tracing::warn!(error = %e, "reaper pass failed; retrying next tick");
        }
    }
}

/// One sweep. Returns how many sessions it ended.
pub async fn pass(core: &Core) -> Result<usize, ApiError> {
    let now = now_ms();
    let due = core.backends.sessions.due(now, BATCH).await?;
    let mut ended = 0;
    for id in due {
        let Some(record) = core.backends.sessions.get(id).await? else {
            continue;
        };
        let Some(reason) = record.due(now) else {
            continue;
        };
        let detail = match reason {
            pb::EndReason::TimeLimit => "the session reached its maximum duration",
            _ => "the code expired before the customer entered it",
        };
        match core.end(id, reason, detail).await {
            Ok(_) => ended += 1,
            // Someone else (the operator, another replica) ended it first.
            Err(ApiError::SessionEnded(_)) => {}
            Err(e) => return Err(e),
        }
    }
    core.backends.codes.purge_expired().await?;
    let purged = core
        .backends
        .sessions
        .purge_ended(now.saturating_sub(ENDED_RETENTION_MS), BATCH)
        .await?;
    for id in purged {
        core.backends.events.forget(id).await?;
    }
    Ok(ended)
}
