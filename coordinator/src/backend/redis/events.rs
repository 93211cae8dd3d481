//! Session events in Redis Streams: one stream per session (`NS:{s:ID}:ev`), entry id
//! `0-SEQ`, so the id is the sequence number and every coordinator reads the same log.
//! Watchers replay with `XRANGE` and follow with `XREAD BLOCK` on a connection of their
//! own, so a blocked read never holds up the shared connection.

use std::time::Duration;

use futures::StreamExt;
use kakehashi_proto::{SessionId, pb};
use prost::Message;
use redis::Script;
use redis::streams::{StreamId, StreamReadReply};

use super::{BlockingConn, Shared, unavailable};
use crate::backend::events::{EventBus, MAX_EVENTS_PER_SESSION};
use crate::backend::{BackendError, BoxFuture, BoxStream};

/// How long one `XREAD` blocks before it is re-issued.
pub const BLOCK: Duration = Duration::from_secs(5);
/// Entries read per round trip.
const READ_COUNT: usize = 64;
/// How long an event log lives after its last event; sessions last at most a few hours
/// and the reaper forgets logs an hour after the end, so this only catches leftovers.
const LOG_TTL_MS: u64 = 24 * 3600 * 1000;
/// Largest encoded event accepted back from Redis.
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// ARGV[1] = limit, ARGV[2] = '1' for ENDED, ARGV[3] = encoded event, ARGV[4] = TTL ms.
/// Returns the event's sequence number, or -1 when the log is full.
const PUBLISH_SCRIPT: &str = r"
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) and ARGV[2] ~= '1' then return -1 end
local seq = n + 1
redis.call('XADD', KEYS[1], '0-' .. seq, 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return seq
";

/// The Redis event bus.
pub struct RedisEventBus {
    shared: Shared,
    publish: Script,
}

impl RedisEventBus {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared,
            publish: Script::new(PUBLISH_SCRIPT),
        }
    }

    fn stream_key(&self, session: SessionId) -> String {
        self.shared.key(&format!("s:{session}"), ":ev")
    }
}

/// The event in a stream entry, with its seq taken from the entry id `0-SEQ`.
fn decode_entry(entry: &StreamId) -> Result<pb::SessionEvent, BackendError> {
    let seq = entry
        .id
        .strip_prefix("0-")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| unavailable("reading an event", format!("bad entry id {:?}", entry.id)))?;
    let bytes = match entry.map.get("e") {
        Some(redis::Value::BulkString(b)) if b.len() <= MAX_EVENT_BYTES => b,
        _ => {
            return Err(unavailable(
                "reading an event",
                format!("entry {} has no readable event", entry.id),
            ));
        }
    };
    let mut event = pb::SessionEvent::decode(bytes.as_slice())
        .map_err(|e| unavailable("decoding an event", e))?;
    event.seq = seq;
    Ok(event)
}

struct Follow {
    key: String,
    conn: Option<BlockingConn>,
    shared: Shared,
    /// Id of the last entry yielded.
    last: String,
    pending: std::vec::IntoIter<pb::SessionEvent>,
    failed: bool,
}

impl Follow {
    /// The next batch: `XREAD BLOCK` after `last`; an empty batch when the block timed out.
    async fn read(&mut self) -> Result<Vec<pb::SessionEvent>, BackendError> {
        if self.conn.is_none() {
            let conn = self
                .shared
                .dialer
                .dial(self.shared.timeout, BLOCK + self.shared.timeout)
                .await?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last);
        let read = cmd.query_async::<Option<StreamReadReply>>(conn);
        let reply = match tokio::time::timeout(BLOCK + self.shared.timeout * 2, read).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(unavailable("following an event stream", e));
            }
            Err(_) => {
                self.conn = None;
                return Err(unavailable("following an event stream", "no answer"));
            }
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in &key.ids {
                out.push(decode_entry(entry)?);
                self.last.clone_from(&entry.id);
            }
        }
        Ok(out)
    }
}

impl EventBus for RedisEventBus {
    fn read(
        &self,
        session: SessionId,
    ) -> BoxFuture<'_, Result<Vec<pb::SessionEvent>, BackendError>> {
        Box::pin(async move {
            let key = self.stream_key(session);
            let key = &key;
            // The log is bounded by the publish script, so one XRANGE reads all of it.
            let reply: redis::streams::StreamRangeReply = self
                .shared
                .run("reading an event log", |mut c| async move {
                    redis::cmd("XRANGE")
                        .arg(key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(MAX_EVENTS_PER_SESSION + 1)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            reply.ids.iter().map(decode_entry).collect()
        })
    }

    fn publish(
        &self,
        mut event: pb::SessionEvent,
    ) -> BoxFuture<'_, Result<pb::SessionEvent, BackendError>> {
        Box::pin(async move {
            let session: SessionId =
                event
                    .session_id
                    .parse()
                    .map_err(|e| BackendError::Unavailable {
                        backend: "events",
                        detail: format!("event carries a bad session id: {e}"),
                    })?;
            let is_end = event.kind == pb::EventKind::Ended as i32;
            event.seq = 0;
            let bytes = event.encode_to_vec();
            let key = self.stream_key(session);
            let script = &self.publish;
            let (key, bytes) = (&key, &bytes);
            let seq: i64 = self
                .shared
                .run("publishing an event", |mut c| async move {
                    script
                        .key(key)
                        .arg(MAX_EVENTS_PER_SESSION)
                        .arg(if is_end { "1" } else { "0" })
                        .arg(bytes.as_slice())
                        .arg(LOG_TTL_MS)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            if seq < 0 {
                return Err(BackendError::EventLogFull {
                    session,
                    limit: MAX_EVENTS_PER_SESSION,
                });
            }
            event.seq = seq as u64;
            Ok(event)
        })
    }

    fn forget(&self, session: SessionId) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let key = self.stream_key(session);
            let key = &key;
            self.shared
                .run("forgetting an event log", |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
                })
                .await
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
            // `0-0` reads from the start: the replay and the follow are one loop, so no
            // event published in between can be missed.
            let follow = Follow {
                key: self.stream_key(session),
                conn: None,
                shared: self.shared.clone(),
                last: "0-0".into(),
                pending: Vec::new().into_iter(),
                failed: false,
            };
            let stream = futures::stream::unfold(follow, |mut f| async move {
                loop {
                    if f.failed {
                        return None;
                    }
                    if let Some(ev) = f.pending.next() {
                        return Some((Ok(ev), f));
                    }
                    match f.read().await {
                        Ok(batch) => f.pending = batch.into_iter(),
                        Err(e) => {
                            // One error ends the stream: the watcher re-subscribes and
                            // gets the whole log again, in order.
                            f.failed = true;
                            return Some((Err(e), f));
                        }
                    }
                }
            });
            Ok(stream.boxed())
        })
    }
}
