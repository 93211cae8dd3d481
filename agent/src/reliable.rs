//! Exactly-once delivery of the replayed channels across relay moves, as plain state
//! machines without I/O (the async shell around them is the crate-private `conduit`).
//!
//! - [`SendBuffer`]: the sender keeps every sealed frame of a replayed channel
//!   ([`Channel::is_replayed`]), byte for byte, until the peer acknowledges it. It is
//!   bounded per channel; a full buffer makes senders wait (back-pressure), it never
//!   drops.
//! - [`RecvTracker`]: the receiver remembers, per peer and channel, the highest sequence
//!   number delivered in order. A frame at or below it is a duplicate from a replay and
//!   is dropped; a frame past the next one is out of order and is dropped too (it comes
//!   again with the replay that fills the gap). What was delivered is acknowledged with a
//!   cumulative `pb::Ack`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kakehashi_proto::{Channel, Frame, pb};

/// Unacknowledged bytes one replayed channel may hold before its senders wait.
pub const MAX_UNACKED_BYTES: usize = 8 * 1024 * 1024;
/// Unacknowledged frames one replayed channel may hold before its senders wait.
pub const MAX_UNACKED_FRAMES: usize = 16 * 1024;

const CHANNELS: usize = Channel::ALL.len();

fn index(channel: Channel) -> usize {
    usize::from(channel as u8)
}

/// One kept frame: who it was sealed for, and when it last went out.
#[derive(Debug, Clone)]
struct Kept {
    recipient: u64,
    frame: Frame,
    written: Option<Instant>,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Kept>,
    bytes: usize,
    /// When an ack last freed something (or the queue was last empty).
    progress: Option<Instant>,
}

/// Frames of the replayed channels kept until acknowledged, per channel.
#[derive(Debug)]
pub struct SendBuffer {
    queues: [Queue; CHANNELS],
    max_bytes: usize,
    max_frames: usize,
}

impl Default for SendBuffer {
    fn default() -> Self {
        Self::with_limits(MAX_UNACKED_BYTES, MAX_UNACKED_FRAMES)
    }
}

impl SendBuffer {
    pub fn with_limits(max_bytes: usize, max_frames: usize) -> Self {
        Self {
            queues: Default::default(),
            max_bytes,
            max_frames,
        }
    }

    /// Whether a frame of `len` wire bytes fits on `channel` now. An empty queue always
    /// takes one frame, so a frame larger than the byte bound still goes out alone.
    pub fn has_room(&self, channel: Channel, len: usize) -> bool {
        let q = &self.queues[index(channel)];
        q.frames.is_empty() || (q.frames.len() < self.max_frames && q.bytes + len <= self.max_bytes)
    }

    /// Keeps a frame sealed for `recipient`. Frames kept for anyone else are given up:
    /// one peer at a time receives a channel (several viewers come in a later issue), and
    /// a replaced peer will never acknowledge them.
    pub fn push(&mut self, recipient: u64, frame: Frame, written: Option<Instant>) {
        let q = &mut self.queues[index(frame.header.channel)];
        if q.frames.front().is_some_and(|k| k.recipient != recipient) {
            q.frames.retain(|k| k.recipient == recipient);
            q.bytes = q.frames.iter().map(|k| k.frame.raw.len()).sum();
        }
        if q.frames.is_empty() {
            q.progress = Some(Instant::now());
        }
        q.bytes += frame.raw.len();
        q.frames.push_back(Kept {
            recipient,
            frame,
            written,
        });
    }

    /// Applies a cumulative ack from `from`: every frame sealed for it with a sequence
    /// number up to `seq` was delivered. Returns whether anything was freed.
    pub fn ack(&mut self, from: u64, channel: Channel, seq: u64) -> bool {
        let q = &mut self.queues[index(channel)];
        let before = q.frames.len();
        while let Some(k) = q.frames.front() {
            if k.recipient != from || k.frame.header.seq > seq {
                break;
            }
            q.bytes -= k.frame.raw.len();
            q.frames.pop_front();
        }
        let freed = q.frames.len() != before;
        if freed {
            q.progress = Some(Instant::now());
        }
        freed
    }

    /// Every kept frame of `channel` sealed for `recipient`, oldest first, marked as
    /// written `now` (the caller writes them all, in order).
    pub fn replay(&mut self, channel: Channel, recipient: u64, now: Instant) -> Vec<Frame> {
        self.queues[index(channel)]
            .frames
            .iter_mut()
            .filter(|k| k.recipient == recipient)
            .map(|k| {
                k.written = Some(now);
                k.frame.clone()
            })
            .collect()
    }

    /// Whether `channel` has frames for `recipient` that were written at least `after`
    /// ago, with no acknowledgement progress for as long: the peer should have acked
    /// them by now, so they were lost on the way (a relay dropped them) and go again.
    pub fn stalled(&self, channel: Channel, recipient: u64, after: Duration, now: Instant) -> bool {
        let q = &self.queues[index(channel)];
        let quiet = q
            .progress
            .is_none_or(|p| now.saturating_duration_since(p) >= after);
        quiet
            && q.frames
                .iter()
                .find(|k| k.recipient == recipient)
                .is_some_and(|k| {
                    k.written
                        .is_none_or(|w| now.saturating_duration_since(w) >= after)
                })
    }

    pub fn len(&self, channel: Channel) -> usize {
        self.queues[index(channel)].frames.len()
    }

    pub fn bytes(&self, channel: Channel) -> usize {
        self.queues[index(channel)].bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(|q| q.frames.is_empty())
    }
}

/// What the receiver does with a frame of a replayed channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next one in order: deliver it.
    Deliver,
    /// Already delivered (a replay after a relay move): drop it silently.
    Duplicate,
    /// Past the next expected one: something before it is missing. Dropped; the
    /// sender replays from the first unacknowledged frame.
    Gap { expected: u64 },
}

/// Per peer and channel, the highest sequence number delivered in order.
#[derive(Debug, Default)]
pub struct RecvTracker {
    peers: HashMap<u64, [u64; CHANNELS]>,
    /// Whether something was delivered since the last ack went out.
    dirty: bool,
}

impl RecvTracker {
    /// Judges a frame from `peer`; a `Deliver` verdict advances the channel.
    pub fn accept(&mut self, peer: u64, channel: Channel, seq: u64) -> Verdict {
        let last = &mut self.peers.entry(peer).or_insert([0; CHANNELS])[index(channel)];
        let expected = last.saturating_add(1);
        if seq < expected {
            Verdict::Duplicate
        } else if seq == expected {
            *last = seq;
            self.dirty = true;
            Verdict::Deliver
        } else {
            Verdict::Gap { expected }
        }
    }

    pub fn last_delivered(&self, peer: u64, channel: Channel) -> u64 {
        self.peers.get(&peer).map_or(0, |c| c[index(channel)])
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The cumulative ack for `peer` (every replayed channel that delivered anything),
    /// and the tracker marked clean.
    pub fn ack_for(&mut self, peer: u64) -> pb::Ack {
        self.dirty = false;
        let Some(last) = self.peers.get(&peer) else {
            return pb::Ack::default();
        };
        let channels = Channel::ALL
            .iter()
            .filter(|c| c.is_replayed() && last[index(**c)] > 0)
            .map(|c| pb::ChannelAck {
                channel: u32::from(*c as u8),
                seq: last[index(*c)],
            })
            .collect();
        pb::Ack { channels }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kakehashi_proto::FrameHeader;

    fn frame(channel: Channel, seq: u64, len: usize) -> Frame {
        let payload = vec![seq as u8; len];
        Frame::new(FrameHeader::new(channel, 0, seq, 0, len as u32), &payload)
    }

    #[test]
    fn acks_free_in_order_and_replay_keeps_the_rest_byte_exact() {
        let mut b = SendBuffer::default();
        for seq in 1..=5 {
            b.push(7, frame(Channel::Chat, seq, 10), None);
        }
        assert_eq!(b.len(Channel::Chat), 5);
        assert!(!b.ack(7, Channel::Chat, 0));
        assert!(b.ack(7, Channel::Chat, 3));
        // Acks are cumulative and may repeat or go backwards (reordered): harmless.
        assert!(!b.ack(7, Channel::Chat, 2));
        let again = b.replay(Channel::Chat, 7, Instant::now());
        assert_eq!(
            again.iter().map(|f| f.header.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(again[0], frame(Channel::Chat, 4, 10));
        assert_eq!(
            b.bytes(Channel::Chat),
            again.iter().map(|f| f.raw.len()).sum::<usize>()
        );
        // An ack from someone else frees nothing.
        assert!(!b.ack(8, Channel::Chat, 100));
        assert!(b.ack(7, Channel::Chat, 100));
        assert!(b.is_empty());
        assert_eq!(b.bytes(Channel::Chat), 0);
    }

    #[test]
    fn bounded_by_bytes_and_frames_but_one_frame_always_fits() {
        let mut b = SendBuffer::with_limits(100, 3);
        assert!(b.has_room(Channel::Input, 1000));
        b.push(1, frame(Channel::Input, 1, 1000), None);
        assert!(!b.has_room(Channel::Input, 1));
        assert!(
            b.has_room(Channel::Chat, 10),
            "channels are bounded separately"
        );
        b.ack(1, Channel::Input, 1);
        for seq in 2..=4 {
            assert!(b.has_room(Channel::Input, 1));
            b.push(1, frame(Channel::Input, seq, 1), None);
        }
        assert!(!b.has_room(Channel::Input, 1), "frame bound reached");
    }

    #[test]
    fn a_new_recipient_replaces_the_old_ones_frames() {
        let mut b = SendBuffer::default();
        b.push(1, frame(Channel::Chat, 1, 4), None);
        b.push(2, frame(Channel::Chat, 2, 4), None);
        assert_eq!(b.len(Channel::Chat), 1);
        assert!(b.replay(Channel::Chat, 1, Instant::now()).is_empty());
        assert_eq!(b.replay(Channel::Chat, 2, Instant::now()).len(), 1);
    }

    #[test]
    fn stalled_after_a_quiet_period_only() {
        let mut b = SendBuffer::default();
        let t0 = Instant::now();
        b.push(1, frame(Channel::Chat, 1, 4), Some(t0));
        let wait = Duration::from_secs(2);
        assert!(!b.stalled(Channel::Chat, 1, wait, t0));
        assert!(b.stalled(Channel::Chat, 1, wait, t0 + wait + wait));
        assert!(!b.stalled(Channel::Chat, 9, wait, t0 + wait + wait));
        // Written again just now (a replay): not stalled until quiet again.
        let t1 = t0 + wait + wait;
        b.replay(Channel::Chat, 1, t1);
        assert!(!b.stalled(Channel::Chat, 1, wait, t1));
    }

    #[test]
    fn receiver_delivers_in_order_once() {
        let mut r = RecvTracker::default();
        assert_eq!(r.accept(5, Channel::Chat, 1), Verdict::Deliver);
        assert_eq!(r.accept(5, Channel::Chat, 2), Verdict::Deliver);
        assert!(r.is_dirty());
        let ack = r.ack_for(5);
        assert!(!r.is_dirty());
        assert_eq!(
            ack.channels,
            [pb::ChannelAck {
                channel: Channel::Chat as u32,
                seq: 2
            }]
        );
        // A replay after a move repeats 1 and 2, then continues with 3.
        assert_eq!(r.accept(5, Channel::Chat, 1), Verdict::Duplicate);
        assert_eq!(r.accept(5, Channel::Chat, 2), Verdict::Duplicate);
        assert!(!r.is_dirty());
        assert_eq!(r.accept(5, Channel::Chat, 4), Verdict::Gap { expected: 3 });
        assert_eq!(r.accept(5, Channel::Chat, 3), Verdict::Deliver);
        assert_eq!(r.accept(5, Channel::Chat, 4), Verdict::Deliver);
        // Channels and peers are independent.
        assert_eq!(r.accept(5, Channel::Input, 1), Verdict::Deliver);
        assert_eq!(r.accept(6, Channel::Chat, 1), Verdict::Deliver);
        assert_eq!(r.last_delivered(5, Channel::Chat), 4);
        assert_eq!(r.ack_for(99), pb::Ack::default());
    }

    /// A lossy relay between a sender and a receiver, simulated: whatever is lost or
    /// repeated, every frame is delivered exactly once and in order, once replays run.
    #[test]
    fn exactly_once_through_losses_and_replays() {
        let mut send = SendBuffer::default();
        let mut recv = RecvTracker::default();
        let mut delivered = Vec::new();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut seq = 0;
        for round in 0..200 {
            // Send a few new frames, some lost on the way (a relay dying mid-stream).
            for _ in 0..(next() % 5) {
                seq += 1;
                let f = frame(Channel::Input, seq, 3);
                send.push(2, f.clone(), Some(Instant::now()));
                if next() % 4 != 0 && recv.accept(2, Channel::Input, seq) == Verdict::Deliver {
                    delivered.push(seq);
                }
            }
            // Now and then the acks arrive, and now and then a move replays.
            if next() % 3 == 0 {
                let ack = recv.ack_for(2);
                for c in ack.channels {
                    send.ack(2, Channel::Input, c.seq);
                }
            }
            if round % 7 == 0 {
                for f in send.replay(Channel::Input, 2, Instant::now()) {
                    if recv.accept(2, Channel::Input, f.header.seq) == Verdict::Deliver {
                        delivered.push(f.header.seq);
                    }
                }
            }
        }
        for f in send.replay(Channel::Input, 2, Instant::now()) {
            if recv.accept(2, Channel::Input, f.header.seq) == Verdict::Deliver {
                delivered.push(f.header.seq);
            }
        }
        assert_eq!(delivered, (1..=seq).collect::<Vec<_>>());
    }
}
