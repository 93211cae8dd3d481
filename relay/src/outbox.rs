//! What the relay sends to one participant: a queue per channel, each drained by a
//! writer task onto one long-lived QUIC stream (one stream per channel beats one per
//! frame for CPU and tail latency, see NOTES). Reliable channels queue and apply
//! back-pressure; the screen channel drops instead of queueing stale frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use kakehashi_proto::{Channel, Frame, pb};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::node::NodeCtx;

/// Screen frames queued per viewer. Small on purpose: a deeper queue only adds latency.
const SCREEN_QUEUE: usize = 4;
/// Reliable frames queued per channel before the sender's stream is back-pressured.
const RELIABLE_QUEUE: usize = 256;

pub(crate) struct Outbox {
    /// Signals to this participant; small and bounded, full means the client stalls.
    pub signal: mpsc::Sender<pb::signal::Kind>,
    queues: Vec<Option<mpsc::Sender<Queued>>>,
    /// Set when a screen frame was dropped; deltas are skipped until a key frame fits.
    screen_needs_key: AtomicBool,
}

pub(crate) enum Delivery {
    Queued,
    /// A screen frame was dropped because the viewer is behind: ask the host for a key frame.
    DroppedNeedKey,
    Skipped,
}

/// One frame on its way to a participant: its bytes (shared with every other
/// recipient, never copied) and when the relay finished reading it off the sender's
/// stream, for `relay_forward_latency_seconds`.
pub(crate) struct Queued {
    raw: Bytes,
    read_at: Instant,
}

/// The receiving halves, each to be driven by [`run_writer`].
pub(crate) type WriterQueues = Vec<(Channel, mpsc::Receiver<Queued>)>;

impl Outbox {
    pub fn new(signal: mpsc::Sender<pb::signal::Kind>) -> (Arc<Self>, WriterQueues) {
        let mut queues = Vec::with_capacity(Channel::ALL.len());
        let mut writers = Vec::new();
        for channel in Channel::ALL {
            if channel == Channel::Signal {
                queues.push(None);
                continue;
            }
            let depth = if channel == Channel::Screen {
                SCREEN_QUEUE
            } else {
                RELIABLE_QUEUE
            };
            let (tx, rx) = mpsc::channel(depth);
            queues.push(Some(tx));
            writers.push((channel, rx));
        }
        let outbox = Arc::new(Self {
            signal,
            queues,
            screen_needs_key: AtomicBool::new(false),
        });
        (outbox, writers)
    }

    /// Queues a frame for this participant. Reliable channels wait for room; the screen
    /// channel never waits. `read_at` is when the frame was fully read off its sender.
    pub async fn deliver(&self, frame: &Frame, read_at: Instant, ctx: &NodeCtx) -> Delivery {
        let channel = frame.header.channel;
        let Some(queue) = self.queues.get(channel as usize).and_then(Option::as_ref) else {
            return Delivery::Skipped;
        };
        if channel != Channel::Screen {
            // A closed queue means the participant is leaving; nothing to deliver to.
            let queued = Queued {
                raw: frame.raw.clone(),
                read_at,
            };
            return match queue.send(queued).await {
                Ok(()) => Delivery::Queued,
                Err(_) => Delivery::Skipped,
            };
        }
        let key = frame.header.is_key_frame();
        if !key && self.screen_needs_key.load(Ordering::Relaxed) {
            ctx.stats.screen_dropped();
            return Delivery::Skipped;
        }
        let queued = Queued {
            raw: frame.raw.clone(),
            read_at,
        };
        match queue.try_send(queued) {
            Ok(()) => {
                if key {
                    self.screen_needs_key.store(false, Ordering::Relaxed);
                }
                Delivery::Queued
            }
            Err(TrySendError::Full(_)) => {
                ctx.stats.screen_dropped();
                self.screen_needs_key.store(true, Ordering::Relaxed);
                Delivery::DroppedNeedKey
            }
            Err(TrySendError::Closed(_)) => Delivery::Skipped,
        }
    }
}

/// Drains one channel's queue onto one uni stream, opened on the first frame. Returns
/// when the queue closes or the connection fails.
pub(crate) async fn run_writer(
    conn: quinn::Connection,
    channel: Channel,
    mut queue: mpsc::Receiver<Queued>,
    ctx: Arc<NodeCtx>,
) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(Queued { raw, read_at }) = queue.recv().await {
        let send = match &mut stream {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => {
                    // Only fails on a stream that is already closed.
                    let _ = s.set_priority(channel.priority());
                    stream.insert(s)
                }
                Err(_) => return,
            },
        };
        ctx.tap(&raw);
        let len = raw.len();
        ctx.stats.forward_latency(read_at.elapsed());
        if send.write_chunk(raw).await.is_err() {
            return;
        }
        ctx.stats.forwarded(channel, len);
    }
}
