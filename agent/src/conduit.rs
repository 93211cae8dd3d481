//! The sending side of a participant that outlives relays: it seals frames for the
//! peer, keeps the replayed channels' frames until acked ([`crate::reliable`]), and
//! moves to a new [`LinkSender`] when the session resumes on another relay, continuing
//! every sequence number and replaying what the peer has not acknowledged.
//!
//! A replayed channel is written to the link only while it is *open*: the peer is
//! attached on this link and the relay's grants let the channel through. Anything sent
//! while it is closed is kept and written, in order, when it opens (the peer attaches
//! to the new relay, or the host's grant reaches it): a relay forwards a frame to nobody
//! and drops frames its policy refuses, so writing earlier would lose them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kakehashi_proto::dataplane::close;
use kakehashi_proto::frame::HEADER_LEN;
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Mode, Permissions, pb};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::crypto::{SessionKeys, TAG_LEN};
use crate::error::AgentError;
use crate::link::LinkSender;
use crate::reliable::SendBuffer;

/// How long a sender waits for room in a full replay buffer (the peer acknowledging)
/// before giving up with [`AgentError::Stalled`]. Longer than a whole resume.
pub const MAX_SEND_WAIT: Duration = Duration::from_secs(45);

const CHANNELS: usize = Channel::ALL.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Frames are kept, not written: nobody on this link would receive them.
    Closed,
    /// Just opened: the kept frames go first, then the channel is open.
    Replaying,
    Open,
}

struct LinkState {
    /// Bumped on every move; a sender that locked a channel of an older link retries.
    generation: u64,
    tx: LinkSender,
    /// The one participant the replayed channels are sealed for.
    peer: Option<u64>,
    /// Participants attached on this link.
    present: HashSet<u64>,
    /// What the relay of this link has been told is granted.
    relay_granted: Permissions,
    gates: [Gate; CHANNELS],
}

pub(crate) struct Conduit {
    role: Role,
    mode: Mode,
    link: Mutex<LinkState>,
    buffer: Mutex<SendBuffer>,
    room: Notify,
    ended: CancellationToken,
    hostile_seq: AtomicU64,
}

/// How a frame goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// On whatever link is current when it is written.
    Any,
    /// Only on the link of this generation (from [`Conduit::reaches`]); if the session
    /// moved meanwhile, [`AgentError::Moved`] and nothing is sent. For frames whose
    /// meaning depends on who was there, such as a screen delta.
    Link(u64),
    /// Written at once whatever the gate, never kept, numbered from
    /// [`HOSTILE_SEQ_BASE`]: for tests that play a modified participant sending what the
    /// relay's policy refuses. Its own numbers keep the nonces unique without punching
    /// a hole in the real sequence, which the peer would wait on forever.
    Ungated,
}

/// Where the sequence numbers of deliberately policy-breaking test frames start: far
/// beyond anything a real session reaches, so they never collide with real ones.
pub const HOSTILE_SEQ_BASE: u64 = 1 << 63;

fn index(channel: Channel) -> usize {
    usize::from(channel as u8)
}

impl Conduit {
    pub fn new(tx: LinkSender, role: Role, mode: Mode) -> Self {
        Self {
            role,
            mode,
            link: Mutex::new(LinkState {
                generation: 0,
                tx,
                peer: None,
                present: HashSet::new(),
                relay_granted: Permissions::NONE,
                gates: [Gate::Closed; CHANNELS],
            }),
            buffer: Mutex::new(SendBuffer::default()),
            room: Notify::new(),
            ended: CancellationToken::new(),
            hostile_seq: AtomicU64::new(HOSTILE_SEQ_BASE),
        }
    }

    fn link(&self) -> MutexGuard<'_, LinkState> {
        // Every critical section only assigns plain fields: a poisoned lock still holds
        // a consistent state.
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn buffer(&self) -> MutexGuard<'_, SendBuffer> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current link's sender (for signals).
    pub fn tx(&self) -> LinkSender {
        self.link().tx.clone()
    }

    /// The session is over: senders waiting for room or for a relay stop waiting.
    pub fn end(&self) {
        self.ended.cancel();
    }

    /// Whether `participant` is attached on the current link, so what is written now
    /// reaches it: the link's generation, for [`Via::Link`].
    pub fn reaches(&self, participant: u64) -> Option<u64> {
        let l = self.link();
        l.present.contains(&participant).then_some(l.generation)
    }

    /// Whether any frame waits for an acknowledgement.
    pub fn has_unacked(&self) -> bool {
        !self.buffer().is_empty()
    }

    pub fn unacked(&self, channel: Channel) -> usize {
        self.buffer().len(channel)
    }

    /// Seals `plaintext` for `recipient` with the next sequence number of `channel` and
    /// sends it. A replayed channel's frame is kept until acknowledged; if the link is
    /// down or the channel closed it is written later, so a relay move costs a pause,
    /// never the frame. Other channels are latency-first: a dead link is an error.
    pub async fn send(
        &self,
        keys: &SessionKeys,
        recipient: u64,
        channel: Channel,
        flags: u8,
        plaintext: &[u8],
    ) -> Result<(), AgentError> {
        self.send_with(keys, recipient, channel, flags, plaintext, Via::Any)
            .await
    }

    /// [`Conduit::send`] with a choice of how; see [`Via`].
    pub async fn send_with(
        &self,
        keys: &SessionKeys,
        recipient: u64,
        channel: Channel,
        flags: u8,
        plaintext: &[u8],
        via: Via,
    ) -> Result<(), AgentError> {
        let replayed = channel.is_replayed();
        let wire_len = HEADER_LEN + plaintext.len() + TAG_LEN;
        let started = Instant::now();
        loop {
            if self.ended.is_cancelled() {
                return Err(AgentError::Ended);
            }
            if replayed {
                self.wait_for_room(channel, wire_len, started).await?;
            }
            let (generation, tx) = {
                let l = self.link();
                (l.generation, l.tx.clone())
            };
            let mut guard = tx.channel(channel).await;
            let writable = {
                let l = self.link();
                if let Via::Link(expected) = via
                    && l.generation != expected
                {
                    return Err(AgentError::Moved);
                }
                if l.generation != generation {
                    // The link was replaced while this sender waited for it.
                    continue;
                }
                l.peer == Some(recipient) && l.gates[index(channel)] == Gate::Open
            };
            if replayed && !self.buffer().has_room(channel, wire_len) {
                // Another sender took the room first.
                continue;
            }
            if let Via::Ungated = via {
                let seq = self.hostile_seq.fetch_add(1, Ordering::Relaxed);
                let frame = keys.seal(channel, flags, seq, plaintext)?;
                return guard.send(&frame).await.map_err(AgentError::from);
            }
            let seq = guard.next_seq();
            let frame = keys.seal(channel, flags, seq, plaintext)?;
            if !replayed {
                return guard.send(&frame).await.map_err(AgentError::from);
            }
            self.buffer()
                .push(recipient, frame.clone(), writable.then(Instant::now));
            if writable && let Err(e) = guard.send(&frame).await {
                // Kept: it is replayed on the link that replaces this one.
                debug!(channel = channel.name(), seq, error = %e, "write failed; frame kept for replay");
            }
            return Ok(());
        }
    }

    async fn wait_for_room(
        &self,
        channel: Channel,
        wire_len: usize,
        started: Instant,
    ) -> Result<(), AgentError> {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.buffer().has_room(channel, wire_len) {
                return Ok(());
            }
            let left = MAX_SEND_WAIT.saturating_sub(started.elapsed());
            tokio::select! {
                _ = &mut notified => {}
                _ = self.ended.cancelled() => return Err(AgentError::Ended),
                _ = tokio::time::sleep(left) => {
                    return Err(AgentError::Stalled {
                        channel: channel.name(),
                        waited: MAX_SEND_WAIT,
                    });
                }
            }
        }
    }

    /// Waits until fewer than `bytes` bytes of `channel` wait for an acknowledgement.
    /// Cancel-safe (it sends nothing): for a sender that must stay responsive, such as
    /// a file transfer a revoke may stop, and so never lets the replay buffer fill.
    pub async fn below(&self, channel: Channel, bytes: usize) -> Result<(), AgentError> {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.buffer().bytes(channel) < bytes {
                return Ok(());
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = self.ended.cancelled() => return Err(AgentError::Ended),
            }
        }
    }

    /// Sends a cumulative ack to `recipient` on the ack channel. Acks are never kept:
    /// a later one supersedes a lost one.
    pub async fn send_ack(
        &self,
        keys: &SessionKeys,
        recipient: u64,
        ack: &pb::Ack,
    ) -> Result<(), AgentError> {
        self.send(keys, recipient, Channel::Ack, 0, &ack.encode_to_vec())
            .await
    }

    /// Applies the peer's cumulative ack: delivered frames are released.
    pub fn on_ack(&self, from: u64, ack: &pb::Ack) {
        let mut freed = false;
        {
            let mut buffer = self.buffer();
            for c in &ack.channels {
                let Some(channel) = u8::try_from(c.channel).ok().and_then(Channel::from_u8) else {
                    debug!(channel = c.channel, "ack for an unknown channel; ignored");
                    continue;
                };
                if channel.is_replayed() {
                    freed |= buffer.ack(from, channel, c.seq);
                }
            }
        }
        if freed {
            self.room.notify_waiters();
        }
    }

    /// Names the participant the replayed channels are for. Returns whether a channel
    /// opened: then run [`Conduit::replay_opened`].
    #[must_use]
    pub fn set_peer(&self, peer: Option<u64>) -> bool {
        self.update(|l| l.peer = peer)
    }

    /// A participant attached to (or left) the current link. Returns whether a channel
    /// opened.
    #[must_use]
    pub fn set_present(&self, participant: u64, present: bool) -> bool {
        self.update(|l| {
            if present {
                l.present.insert(participant);
            } else {
                l.present.remove(&participant);
            }
        })
    }

    /// The current link's relay now holds these grants. Returns whether a channel
    /// opened.
    #[must_use]
    pub fn set_relay_granted(&self, granted: Permissions) -> bool {
        self.update(|l| l.relay_granted = granted)
    }

    /// Changes the link state and re-derives each replayed channel's gate; true when a
    /// channel just opened and has its kept frames to replay.
    fn update(&self, change: impl FnOnce(&mut LinkState)) -> bool {
        let mut l = self.link();
        change(&mut l);
        let reachable = l.peer.is_some_and(|p| l.present.contains(&p));
        let mut opened = false;
        for channel in Channel::ALL.into_iter().filter(|c| c.is_replayed()) {
            let allowed =
                reachable && may_forward(channel, self.role, self.mode, l.relay_granted).is_ok();
            let gate = &mut l.gates[index(channel)];
            *gate = match (allowed, *gate) {
                (false, _) => Gate::Closed,
                (true, Gate::Closed) => {
                    opened = true;
                    Gate::Replaying
                }
                (true, g) => g,
            };
        }
        opened
    }

    /// Replays the kept frames of every channel that just opened, then opens it. Runs
    /// in its own task: a long replay waits on flow control, and the participant must
    /// keep reading meanwhile.
    pub async fn replay_opened(self: Arc<Self>) {
        self.replay(|g| g == Gate::Replaying, None).await;
    }

    /// Writes the kept frames again on the channels `which` selects, oldest first,
    /// opening them. With `stalled_after`, only channels whose oldest frame has gone
    /// unacknowledged that long (a relay dropped it) are written.
    async fn replay(&self, which: impl Fn(Gate) -> bool, stalled_after: Option<Duration>) {
        for channel in Channel::ALL.into_iter().filter(|c| c.is_replayed()) {
            let (generation, tx) = {
                let l = self.link();
                if !which(l.gates[index(channel)]) {
                    continue;
                }
                // Checked before taking the channel from its senders, and again after.
                if let (Some(after), Some(peer)) = (stalled_after, l.peer)
                    && !self.buffer().stalled(channel, peer, after, Instant::now())
                {
                    continue;
                }
                (l.generation, l.tx.clone())
            };
            let mut guard = tx.channel(channel).await;
            let frames = {
                let mut l = self.link();
                if l.generation != generation || !which(l.gates[index(channel)]) {
                    continue;
                }
                let Some(peer) = l.peer else { continue };
                let now = Instant::now();
                let mut buffer = self.buffer();
                if stalled_after.is_some_and(|after| !buffer.stalled(channel, peer, after, now)) {
                    continue;
                }
                // Open from here on: senders queued behind this guard write after the
                // replay, so the peer sees every sequence number in order.
                l.gates[index(channel)] = Gate::Open;
                buffer.replay(channel, peer, now)
            };
            if !frames.is_empty() {
                debug!(
                    channel = channel.name(),
                    frames = frames.len(),
                    first = frames[0].header.seq,
                    "replaying unacknowledged frames"
                );
            }
            for f in &frames {
                if let Err(e) = guard.send(f).await {
                    debug!(channel = channel.name(), error = %e, "replay interrupted; kept for the next link");
                    break;
                }
            }
        }
    }

    /// Writes again what the peer has left unacknowledged for `after` on an open
    /// channel: the relay dropped it (it lacked a grant for a moment, or a viewer
    /// attached late), and the receiver discards anything it already has.
    pub async fn retransmit_stalled(self: Arc<Self>, after: Duration) {
        self.replay(|g| g == Gate::Open, Some(after)).await;
    }

    /// Moves onto `new`, the link to the relay the session resumed on: waits for every
    /// frame being written on the old link, continues its sequence numbers on the new
    /// one, and closes the old one. Every replayed channel starts closed on the new
    /// link and opens (replaying) once the peer is seen there.
    pub async fn install(&self, new: LinkSender) {
        let old = self.tx();
        let mut guards = Vec::with_capacity(CHANNELS);
        for channel in Channel::ALL {
            guards.push(old.channel(channel).await);
        }
        let mut next = [1u64; CHANNELS];
        for (n, g) in next.iter_mut().zip(&guards) {
            *n = g.peek_seq();
        }
        new.seed_seqs(next).await;
        {
            let mut l = self.link();
            l.generation += 1;
            l.tx = new;
            l.present.clear();
            l.relay_granted = Permissions::NONE;
            l.gates = [Gate::Closed; CHANNELS];
        }
        drop(guards);
        old.close(close::LEFT, "moved to another relay");
    }
}
