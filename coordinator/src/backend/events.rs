//! Per-session event logs: ordered, replayable, with live subscription.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kakehashi_proto::{SessionId, pb};
use tokio::sync::watch;

use super::{BackendError, BoxFuture, BoxStream};

/// Most events one session may log; a session that hits it is misbehaving.
pub const MAX_EVENTS_PER_SESSION: usize = 1024;

/// Publishes and replays session events.
///
/// Invariants: per session, `seq` starts at 1 and increases by one per published event;
/// a subscriber sees every event from seq 1 in order, with no gaps or repeats, then each
/// new one as it is published. The stream never ends by itself; callers stop reading.
/// A log may refuse events past a bound ([`BackendError::EventLogFull`]), but never
/// refuses `EVENT_KIND_ENDED`.
pub trait EventBus: Send + Sync + 'static {
    /// Appends `event` (its `seq` is ignored and assigned here) and returns it as stored.
    fn publish(
        &self,
        event: pb::SessionEvent,
    ) -> BoxFuture<'_, Result<pb::SessionEvent, BackendError>>;

    /// The session's log so far, in order (the audit log): at most
    /// [`MAX_EVENTS_PER_SESSION`] + 1 events (the ENDED past the bound).
    fn read(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<pb::SessionEvent>, BackendError>>;

    /// Drops the session's log (it ended long ago). Open subscriptions may end.
    fn forget(&self, session: SessionId) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Replays the session's log from the start, then follows it.
    fn subscribe(
        &self,
        session: SessionId,
    ) -> BoxFuture<
        '_,
        Result<BoxStream<'static, Result<pb::SessionEvent, BackendError>>, BackendError>,
    >;
}

struct Log {
    events: Mutex<Vec<pb::SessionEvent>>,
    /// Number of events in `events`; subscribers wait on changes.
    len: watch::Sender<usize>,
}

/// In-process event bus (the embedded default).
#[derive(Default)]
pub struct InMemoryEventBus {
    logs: Mutex<HashMap<SessionId, Arc<Log>>>,
}

impl InMemoryEventBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn log(&self, session: SessionId) -> Arc<Log> {
        // Plain map operations only; a poisoned lock is still consistent.
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.entry(session)
            .or_insert_with(|| {
                Arc::new(Log {
                    events: Mutex::new(Vec::new()),
                    len: watch::channel(0).0,
                })
            })
            .clone()
    }
}

fn parse_session(id: &str) -> Result<SessionId, BackendError> {
    id.parse().map_err(|e| BackendError::Unavailable {
        backend: "events",
        detail: format!("event carries a bad session id: {e}"),
    })
}

impl EventBus for InMemoryEventBus {
    fn read(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<pb::SessionEvent>, BackendError>> {
        Box::pin(async move {
            let log = self
                .logs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&session)
                .cloned();
            Ok(log.map_or_else(Vec::new, |l| {
                l.events.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }))
        })
    }

    fn forget(&self, session: SessionId) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            self.logs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session);
            Ok(())
        })
    }

    fn publish(
        &self,
        mut event: pb::SessionEvent,
    ) -> BoxFuture<'_, Result<pb::SessionEvent, BackendError>> {
        Box::pin(async move {
            let session = parse_session(&event.session_id)?;
            let log = self.log(session);
            let mut events = log.events.lock().unwrap_or_else(|p| p.into_inner());
            // ENDED is always taken, so watchers of a noisy session still see it end.
            let is_end = event.kind == pb::EventKind::Ended as i32;
            if events.len() >= MAX_EVENTS_PER_SESSION && !is_end {
                return Err(BackendError::EventLogFull {
                    session,
                    limit: MAX_EVENTS_PER_SESSION,
                });
            }
            event.seq = events.len() as u64 + 1;
            events.push(event.clone());
            let len = events.len();
            drop(events);
            log.len.send_replace(len);
            Ok(event)
        })
    }

    fn subscribe(
        &self,
        session: SessionId,
    ) -> BoxFuture<
        '_,
        Result<BoxStream<'static, Result<pb::SessionEvent, BackendError>>, BackendError>,
    > {
        Box::pin(async move {
            let log = self.log(session);
            let rx = log.len.subscribe();
            // The cursor is the number of events already yielded; the log only grows, so
            // reading `events[cursor..]` after every change yields each event once, in order.
            let stream = futures::stream::unfold(
                (log, rx, 0usize, Vec::<pb::SessionEvent>::new().into_iter()),
                |(log, mut rx, mut cursor, mut pending)| async move {
                    loop {
                        if let Some(ev) = pending.next() {
                            return Some((Ok(ev), (log, rx, cursor, pending)));
                        }
                        let fresh: Vec<pb::SessionEvent> = {
                            let events = log.events.lock().unwrap_or_else(|p| p.into_inner());
                            events.get(cursor..).map(<[_]>::to_vec).unwrap_or_default()
                        };
                        if fresh.is_empty() {
                            // The sender lives as long as `log`, which we hold, so this
                            // only fails if the log is torn down; end the stream then.
                            rx.changed().await.ok()?;
                            continue;
                        }
                        cursor += fresh.len();
                        pending = fresh.into_iter();
                    }
                },
            );
            Ok(stream.boxed())
        })
    }
}
