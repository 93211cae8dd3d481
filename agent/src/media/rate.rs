//! Bitrate adaptation for the screen stream: a controller without I/O or clocks (callers
//! pass [`Instant`]s) that turns what the path reports into a target bitrate for the
//! encoder.
//!
//! Inputs, all cumulative counters the caller reads periodically: screen frames the relay
//! dropped for a slow viewer (each one arrives as a key-frame request), frames the host
//! dropped because the network had not taken the previous ones, encoded bytes handed to
//! the network, and the QUIC path's smoothed RTT, packets sent and lost, and bytes sent
//! and lost. Rules, in the spirit of WebRTC's GCC but far simpler:
//! - **Decrease** multiplicatively on drops (relay or local), heavy packet loss, or a
//!   backlog at the sender (more encoded bytes handed to QUIC than the path carried away:
//!   QUIC buffers megabytes before a write blocks, so the host's own frame queue rarely
//!   overflows) ([`RateConfig::drop_factor`]), and more gently when the smoothed RTT rises
//!   well above the path's recent minimum, which means packets queue somewhere
//!   ([`RateConfig::delay_factor`]). At most one decrease per hold interval (a few RTTs),
//!   since the evidence of congestion lags the cause by at least one RTT and the queue
//!   needs time to drain. Never below [`RateConfig::delivered_floor`] of what the path
//!   delivered meanwhile: stale evidence (a backlog still draining) must not drive the
//!   target to the minimum on a path that carries far more.
//! - **Increase** multiplicatively, once per [`RateConfig::increase_every`], after
//!   [`RateConfig::quiet`] without any sign of congestion.
//! - Always within `[min, max]`; the start is the configured bitrate.
//!
//! A clean path produces no signal, so the target never moves down on it and never
//! oscillates: it climbs to the maximum and stays there.

use std::time::{Duration, Instant};

/// How the controller reacts; [`Default`] suits a desktop stream of 0.1–10 Mbit/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Where the target starts.
    pub start_bps: u32,
    pub min_bps: u32,
    pub max_bps: u32,
    /// Multiplier applied on drops or heavy loss.
    pub drop_factor: f64,
    /// Multiplier applied when the RTT shows queueing.
    pub delay_factor: f64,
    /// Multiplier applied per increase step.
    pub increase_factor: f64,
    /// Time without congestion before the target climbs.
    pub quiet: Duration,
    /// Time between increase steps.
    pub increase_every: Duration,
    /// Shortest time between two decreases; stretched to [`HOLD_RTTS`] smoothed RTTs on
    /// slow paths.
    pub min_hold: Duration,
    /// Queueing delay (smoothed RTT minus the recent minimum) that counts as congestion,
    /// at least; on slow paths the minimum RTT itself is the threshold.
    pub delay_threshold: Duration,
    /// Packet loss ratio over one observation that counts as congestion. Random loss
    /// below it (a lossy radio link) is left to QUIC's retransmission.
    pub loss_threshold: f64,
    /// A backlog at the sender worth more than this much sending time (at the target or
    /// the recently delivered rate, whichever is higher) counts as congestion.
    pub backlog_threshold: Duration,
    /// A decrease goes no lower than this share of the highest rate the path delivered
    /// over [`RateConfig::delivered_window`] (GCC sets 0.85 × the received rate; lower
    /// here so a backlog drains).
    pub delivered_floor: f64,
    /// How far back the delivered rate looks: long enough to span the gaps of an encoder
    /// that skips frames, so a quiet moment does not read as a path that carries nothing.
    pub delivered_window: Duration,
    /// How long an RTT minimum is remembered: a path whose base delay really grew (a
    /// new route) is accepted as the new normal after one to two windows.
    pub min_rtt_window: Duration,
}

/// A decrease holds for this many smoothed RTTs, at least [`RateConfig::min_hold`].
pub const HOLD_RTTS: u32 = 3;
/// Fewer packets than this in one observation say nothing about the loss ratio.
const MIN_PACKETS_FOR_LOSS: u64 = 20;

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            start_bps: 1_500_000,
            min_bps: 150_000,
            max_bps: 1_500_000,
            drop_factor: 0.7,
            delay_factor: 0.85,
            increase_factor: 1.1,
            quiet: Duration::from_secs(3),
            increase_every: Duration::from_secs(1),
            min_hold: Duration::from_millis(600),
            delay_threshold: Duration::from_millis(50),
            loss_threshold: 0.1,
            backlog_threshold: Duration::from_millis(500),
            delivered_floor: 0.5,
            delivered_window: Duration::from_secs(2),
            min_rtt_window: Duration::from_secs(10),
        }
    }
}

impl RateConfig {
    /// The default reactions with this start and these bounds; `min > max` is read as
    /// `min == max`, and the start is clamped into the bounds.
    pub fn bounded(start_bps: u32, min_bps: u32, max_bps: u32) -> Self {
        let max_bps = max_bps.max(1);
        let min_bps = min_bps.clamp(1, max_bps);
        Self {
            start_bps: start_bps.clamp(min_bps, max_bps),
            min_bps,
            max_bps,
            ..Self::default()
        }
    }
}

/// The QUIC path's counters at one moment (cumulative, as quinn reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathSnapshot {
    /// Identifies the connection: after a relay move the counters start again.
    pub connection: u64,
    /// Smoothed RTT.
    pub rtt: Duration,
    pub sent_packets: u64,
    pub lost_packets: u64,
    /// UDP payload bytes sent, every channel and retransmissions included.
    pub sent_bytes: u64,
    pub lost_bytes: u64,
}

/// One reading of every input, cumulative since the stream started (except `path`,
/// cumulative per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    /// Screen frames the relay dropped for a slow viewer (its key-frame requests).
    pub relay_drops: u64,
    /// Encoded frames the host dropped because the network had not taken earlier ones.
    pub local_drops: u64,
    /// Encoded bytes handed to the network.
    pub encoded_bytes: u64,
    pub path: Option<PathSnapshot>,
}

/// Why the target last moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Frames were dropped at the relay or on this host.
    Drops,
    /// Packet loss above [`RateConfig::loss_threshold`].
    Loss,
    /// The RTT rose well above the path's minimum.
    Delay,
    /// More was encoded than the path carried away.
    Backlog,
    /// A quiet period passed.
    Probe,
}

/// A change of target: the new bitrate and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub bps: u32,
    pub reason: Reason,
}

/// Windowed minimum over two windows: the current one and the previous one.
#[derive(Debug, Clone, Copy)]
struct MinRtt {
    started: Instant,
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl MinRtt {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            current: None,
            previous: None,
        }
    }

    fn push(&mut self, now: Instant, rtt: Duration, window: Duration) {
        if now.saturating_duration_since(self.started) >= window {
            self.previous = self.current;
            self.current = None;
            self.started = now;
        }
        self.current = Some(self.current.map_or(rtt, |c| c.min(rtt)));
    }

    fn get(&self) -> Option<Duration> {
        match (self.previous, self.current) {
            (Some(p), Some(c)) => Some(p.min(c)),
            (p, c) => p.or(c),
        }
    }
}

/// The adaptation state; feed it with [`RateController::observe`].
#[derive(Debug, Clone)]
pub struct RateController {
    config: RateConfig,
    target: u32,
    last: Option<Observation>,
    min_rtt: Option<MinRtt>,
    srtt: Option<Duration>,
    last_decrease: Option<Instant>,
    /// The last time anything looked like congestion (also during a hold).
    last_congestion: Option<Instant>,
    last_increase: Option<Instant>,
    started: Option<Instant>,
    /// When the previous observation was taken.
    last_seen: Option<Instant>,
    changes: u64,
    /// Encoded bytes not yet carried by the path (an estimate that errs low: QUIC's
    /// overhead counts as carried).
    backlog: u64,
    /// Bits per second the path carried between consecutive observations, recent first
    /// out, within [`RateConfig::delivered_window`].
    delivered: std::collections::VecDeque<(Instant, f64)>,
}

impl RateController {
    pub fn new(config: RateConfig) -> Self {
        let bounds = RateConfig::bounded(config.start_bps, config.min_bps, config.max_bps);
        let config = RateConfig {
            start_bps: bounds.start_bps,
            min_bps: bounds.min_bps,
            max_bps: bounds.max_bps,
            ..config
        };
        Self {
            target: config.start_bps,
            config,
            last: None,
            min_rtt: None,
            srtt: None,
            last_decrease: None,
            last_congestion: None,
            last_increase: None,
            started: None,
            last_seen: None,
            changes: 0,
            backlog: 0,
            delivered: std::collections::VecDeque::new(),
        }
    }

    pub fn config(&self) -> &RateConfig {
        &self.config
    }

    /// The current target, bits per second.
    pub fn target_bps(&self) -> u32 {
        self.target
    }

    /// How many times the target moved.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Encoded bytes waiting at the sender, as estimated.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog
    }

    /// The path's recent minimum RTT and its smoothed RTT, once seen.
    pub fn rtt(&self) -> Option<(Duration, Duration)> {
        Some((self.min_rtt.as_ref()?.get()?, self.srtt?))
    }

    fn hold(&self) -> Duration {
        let rtts = self.srtt.map_or(Duration::ZERO, |r| r * HOLD_RTTS);
        self.config.min_hold.max(rtts)
    }

    /// Takes one reading of the inputs at `now`; returns the new target when it moved.
    pub fn observe(&mut self, now: Instant, obs: Observation) -> Option<Change> {
        let started = *self.started.get_or_insert(now);
        let prev = self.last.replace(obs);
        let congestion = match prev {
            // The first reading is only a baseline.
            None => None,
            Some(prev) => {
                self.carried(now, &prev, &obs);
                self.congestion(now, &prev, &obs)
            }
        };
        self.last_seen = Some(now);
        if let Some(path) = obs.path {
            let window = self.config.min_rtt_window;
            self.min_rtt
                .get_or_insert_with(|| MinRtt::new(now))
                .push(now, path.rtt, window);
            self.srtt = Some(path.rtt);
        }
        match congestion {
            Some(reason) => {
                self.last_congestion = Some(now);
                let held = self
                    .last_decrease
                    .is_some_and(|t| now.saturating_duration_since(t) < self.hold());
                if held {
                    return None;
                }
                let factor = match reason {
                    Reason::Delay => self.config.delay_factor,
                    _ => self.config.drop_factor,
                };
                self.last_decrease = Some(now);
                let floor = self.delivered_bps() * self.config.delivered_floor;
                let lower = scale(self.target, factor).max(floor.min(f64::from(u32::MAX)) as u32);
                self.set(lower.min(self.target), reason)
            }
            None => {
                let quiet_since = self.last_congestion.unwrap_or(started);
                if now.saturating_duration_since(quiet_since) < self.config.quiet
                    || self.target >= self.config.max_bps
                {
                    return None;
                }
                if self
                    .last_increase
                    .is_some_and(|t| now.saturating_duration_since(t) < self.config.increase_every)
                {
                    return None;
                }
                self.last_increase = Some(now);
                self.set(
                    scale(self.target, self.config.increase_factor),
                    Reason::Probe,
                )
            }
        }
    }

    /// Updates the backlog and the delivered rate from what happened since `prev`.
    fn carried(&mut self, now: Instant, prev: &Observation, obs: &Observation) {
        let (Some(path), Some(before)) = (obs.path, prev.path) else {
            return;
        };
        let encoded = obs.encoded_bytes.saturating_sub(prev.encoded_bytes);
        if path.connection != before.connection {
            // Whatever QUIC held died with the old connection.
            self.backlog = 0;
            self.delivered.clear();
            return;
        }
        let carried = path
            .sent_bytes
            .saturating_sub(before.sent_bytes)
            .saturating_sub(path.lost_bytes.saturating_sub(before.lost_bytes));
        self.backlog = (self.backlog + encoded).saturating_sub(carried);
        let secs = now
            .saturating_duration_since(self.last_seen.unwrap_or(now))
            .as_secs_f64();
        if secs > 0.0 {
            self.delivered.push_back((now, carried as f64 * 8.0 / secs));
        }
        let window = self.config.delivered_window;
        while self
            .delivered
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
        {
            self.delivered.pop_front();
        }
    }

    /// The highest rate the path delivered within the window, bits per second.
    fn delivered_bps(&self) -> f64 {
        self.delivered.iter().map(|(_, b)| *b).fold(0.0, f64::max)
    }

    /// What, if anything, between `prev` and `obs` says the path is congested.
    fn congestion(
        &mut self,
        now: Instant,
        prev: &Observation,
        obs: &Observation,
    ) -> Option<Reason> {
        // Counters only grow; a smaller one means a restart, which is not a drop.
        let relay = obs.relay_drops.saturating_sub(prev.relay_drops);
        let local = obs.local_drops.saturating_sub(prev.local_drops);
        if relay > 0 || local > 0 {
            return Some(Reason::Drops);
        }
        let path = obs.path?;
        let same = prev.path.filter(|p| p.connection == path.connection);
        let Some(before) = same else {
            // A new connection (relay move): its RTT minimum starts afresh.
            self.min_rtt = Some(MinRtt::new(now));
            return None;
        };
        let backlog_bits = self.backlog.saturating_mul(8) as f64;
        let drain_bps = f64::from(self.target).max(self.delivered_bps());
        if backlog_bits > drain_bps * self.config.backlog_threshold.as_secs_f64() {
            return Some(Reason::Backlog);
        }
        let sent = path.sent_packets.saturating_sub(before.sent_packets);
        let lost = path.lost_packets.saturating_sub(before.lost_packets);
        if sent >= MIN_PACKETS_FOR_LOSS && lost as f64 > self.config.loss_threshold * sent as f64 {
            return Some(Reason::Loss);
        }
        let (min, _) = self.rtt()?;
        let queueing = path.rtt.saturating_sub(min);
        if queueing > self.config.delay_threshold.max(min) {
            return Some(Reason::Delay);
        }
        None
    }

    fn set(&mut self, bps: u32, reason: Reason) -> Option<Change> {
        let bps = bps.clamp(self.config.min_bps, self.config.max_bps);
        if bps == self.target {
            return None;
        }
        self.target = bps;
        self.changes += 1;
        Some(Change { bps, reason })
    }
}

fn scale(bps: u32, factor: f64) -> u32 {
    let scaled = (f64::from(bps) * factor).round();
    if scaled >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // Never stuck: an increase moves by at least one bit per second.
        let s = scaled.max(0.0) as u32;
        if factor > 1.0 {
            s.max(bps.saturating_add(1))
        } else {
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(250);

    struct Sim {
        c: RateController,
        now: Instant,
        obs: Observation,
        rtt: Duration,
        connection: u64,
        sent: u64,
        lost: u64,
        /// Bytes the path carries per tick.
        capacity: u64,
        /// Bytes waiting for the path.
        queue: u64,
    }

    impl Sim {
        fn new(config: RateConfig) -> Self {
            let mut s = Self {
                c: RateController::new(config),
                now: Instant::now(),
                obs: Observation::default(),
                rtt: Duration::from_millis(20),
                connection: 1,
                sent: 0,
                lost: 0,
                capacity: u64::MAX,
                queue: 0,
            };
            s.tick();
            s
        }

        /// Advances one tick with 100 packets sent and `lost` of them lost; the encoder
        /// produces its target's worth, the path carries up to `capacity` of it.
        fn tick_with(&mut self, lost: u64) -> Option<Change> {
            let prev_at = self.now;
            self.now += TICK;
            let secs = (self.now - prev_at).as_secs_f64();
            let encoded = (f64::from(self.c.target_bps()) / 8.0 * secs) as u64;
            let before = self.obs.path.map_or(0, |p| p.sent_bytes);
            self.sent += 100;
            self.lost += lost;
            self.obs.encoded_bytes += encoded;
            self.queue += encoded;
            let carried = self.queue.min(self.capacity);
            self.queue -= carried;
            self.obs.path = Some(PathSnapshot {
                connection: self.connection,
                rtt: self.rtt,
                sent_packets: self.sent,
                lost_packets: self.lost,
                sent_bytes: before + carried,
                lost_bytes: 0,
            });
            self.c.observe(self.now, self.obs)
        }

        fn tick(&mut self) -> Option<Change> {
            self.tick_with(0)
        }

        fn ticks(&mut self, n: usize) -> Vec<Change> {
            (0..n).filter_map(|_| self.tick()).collect()
        }

        fn target(&self) -> u32 {
            self.c.target_bps()
        }
    }

    fn config(start: u32, min: u32, max: u32) -> RateConfig {
        RateConfig::bounded(start, min, max)
    }

    #[test]
    fn a_clean_path_never_moves_a_target_at_the_maximum() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        assert!(s.ticks(400).is_empty(), "moved on a clean path");
        assert_eq!(s.target(), 1_000_000);
        assert_eq!(s.c.changes(), 0);
    }

    #[test]
    fn a_clean_path_climbs_to_the_maximum_and_stays() {
        let mut s = Sim::new(config(200_000, 100_000, 1_000_000));
        let changes = s.ticks(400);
        assert!(!changes.is_empty());
        assert!(changes.iter().all(|c| c.reason == Reason::Probe));
        // Monotonic: no oscillation.
        assert!(changes.windows(2).all(|w| w[0].bps < w[1].bps));
        assert_eq!(s.target(), 1_000_000);
        assert!(s.ticks(100).is_empty());
    }

    #[test]
    fn relay_drops_decrease_once_per_hold() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        s.obs.relay_drops += 1;
        let c = s.tick().expect("a drop decreases");
        assert_eq!(c.reason, Reason::Drops);
        assert_eq!(c.bps, 700_000);
        // More drops within the hold (stale evidence of the same queue): no change.
        s.obs.relay_drops += 1;
        assert_eq!(s.tick(), None);
        assert_eq!(s.target(), 700_000);
        // After the hold, drops decrease again: to 0.7 × 700 000 = 490 000 but not below
        // half of the 1 Mbit/s the path delivered a moment ago.
        s.now += RateConfig::default().min_hold;
        s.obs.relay_drops += 1;
        assert_eq!(s.tick().map(|c| c.bps), Some(500_000));
        // Once that is out of the window, the full step applies.
        s.now += RateConfig::default().delivered_window;
        s.obs.relay_drops += 1;
        assert_eq!(s.tick().map(|c| c.bps), Some(350_000));
    }

    #[test]
    fn local_drops_decrease() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        s.obs.local_drops += 3;
        assert_eq!(s.tick().map(|c| c.reason), Some(Reason::Drops));
        assert!(s.target() < 1_000_000);
    }

    #[test]
    fn never_below_min_never_above_max() {
        let mut s = Sim::new(config(1_000_000, 300_000, 1_000_000));
        for _ in 0..50 {
            s.now += Duration::from_secs(1);
            s.obs.relay_drops += 1;
            s.tick();
            assert!(s.target() >= 300_000);
        }
        assert_eq!(s.target(), 300_000);
        s.ticks(1000);
        assert_eq!(s.target(), 1_000_000);
    }

    #[test]
    fn recovers_after_a_quiet_period_and_not_before() {
        let cfg = config(1_000_000, 100_000, 1_000_000);
        let mut s = Sim::new(cfg);
        s.obs.relay_drops += 1;
        s.tick();
        let low = s.target();
        // Quiet for less than `quiet`: nothing.
        let quiet_ticks = (cfg.quiet.as_millis() / TICK.as_millis()) as usize;
        assert!(s.ticks(quiet_ticks - 1).is_empty());
        // Then it climbs, step by step.
        let up = s.ticks(8);
        assert!(!up.is_empty());
        assert!(up.iter().all(|c| c.reason == Reason::Probe));
        assert!(s.target() > low);
    }

    #[test]
    fn congestion_during_the_hold_postpones_the_recovery() {
        let cfg = config(1_000_000, 100_000, 1_000_000);
        let mut s = Sim::new(cfg);
        s.obs.relay_drops += 1;
        s.tick();
        let low = s.target();
        // Drops keep arriving, every one within a hold of the previous decrease or not:
        // no increase while they do.
        for _ in 0..20 {
            s.obs.relay_drops += 1;
            s.tick();
            assert!(s.target() <= low);
        }
    }

    #[test]
    fn rising_rtt_backs_off_gently_and_a_stable_rtt_does_not() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        // Jitter within the threshold: nothing.
        for ms in [20, 25, 40, 30, 60, 20] {
            s.rtt = Duration::from_millis(ms);
            assert_eq!(s.tick(), None, "rtt {ms} ms");
        }
        // Queueing: 20 ms base, 200 ms smoothed.
        s.rtt = Duration::from_millis(200);
        let c = s.tick().expect("queueing decreases");
        assert_eq!((c.reason, c.bps), (Reason::Delay, 850_000));
        // The hold stretches with the RTT: 3 × 200 ms.
        s.now += Duration::from_millis(300);
        assert_eq!(s.tick(), None);
        s.now += Duration::from_millis(300);
        assert_eq!(s.tick().map(|c| c.reason), Some(Reason::Delay));
    }

    #[test]
    fn a_longer_path_becomes_the_new_normal() {
        let cfg = config(1_000_000, 100_000, 1_000_000);
        let mut s = Sim::new(cfg);
        s.ticks(4);
        // The base RTT grows for good (a new route through the same connection).
        s.rtt = Duration::from_millis(300);
        s.tick().expect("first seen as queueing");
        // Within two windows the old minimum is forgotten and the target recovers.
        let window_ticks = (cfg.min_rtt_window.as_millis() / TICK.as_millis()) as usize;
        s.ticks(2 * window_ticks + 1);
        let before = s.target();
        let up = s.ticks(40);
        assert!(up.iter().all(|c| c.reason == Reason::Probe));
        assert!(s.target() > before || s.target() == cfg.max_bps);
    }

    #[test]
    fn a_relay_move_resets_the_rtt_minimum_and_is_no_loss() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        s.ticks(4);
        // New connection: counters restart at zero, the new path is slower.
        s.connection = 2;
        s.sent = 0;
        s.lost = 0;
        s.rtt = Duration::from_millis(150);
        assert_eq!(s.tick(), None);
        assert!(s.ticks(20).is_empty());
        assert_eq!(s.target(), 1_000_000);
    }

    #[test]
    fn a_backlog_at_the_sender_decreases_but_not_below_what_the_path_delivers() {
        let mut s = Sim::new(config(2_000_000, 100_000, 2_000_000));
        // The path carries 300 kbit/s.
        let capacity_bps = 300_000.0;
        s.capacity = (capacity_bps / 8.0 * TICK.as_secs_f64()) as u64;
        // Half a second's worth of backlog builds up within a few ticks.
        let first = (0..4).find_map(|_| s.tick()).expect("a backlog decreases");
        assert_eq!(first.reason, Reason::Backlog);
        let mut lowest = u32::MAX;
        let mut reasons = Vec::new();
        for _ in 0..600 {
            if let Some(c) = s.tick() {
                reasons.push(c.reason);
            }
            lowest = lowest.min(s.target());
        }
        // Never down to the minimum: the floor is half of what the path delivered.
        assert!(f64::from(lowest) >= 0.45 * capacity_bps, "lowest {lowest}");
        assert!(lowest > s.c.config().min_bps);
        // It probes upwards again once the backlog has drained, and backs off again.
        assert!(reasons.contains(&Reason::Probe));
        assert!(reasons.contains(&Reason::Backlog));
        assert!(
            s.target() < 1_000_000,
            "target {} ignores the path",
            s.target()
        );
    }

    #[test]
    fn heavy_loss_decreases_light_loss_does_not() {
        let mut s = Sim::new(config(1_000_000, 100_000, 1_000_000));
        for _ in 0..40 {
            assert_eq!(s.tick_with(3), None, "3 % loss");
        }
        assert_eq!(s.tick_with(25).map(|c| c.reason), Some(Reason::Loss));
    }

    #[test]
    fn bounds_are_sane_whatever_is_configured() {
        let c = RateController::new(config(5_000_000, 2_000_000, 1_000_000));
        assert_eq!(c.config().min_bps, 1_000_000);
        assert_eq!(c.target_bps(), 1_000_000);
        let c = RateController::new(config(10, 100_000, 1_000_000));
        assert_eq!(c.target_bps(), 100_000);
        let cfg = RateConfig {
            drop_factor: 0.5,
            ..RateConfig::default()
        };
        let c = RateController::new(RateConfig {
            start_bps: 800_000,
            ..cfg
        });
        assert_eq!(c.config().drop_factor, 0.5);
        assert_eq!(c.target_bps(), 800_000.min(cfg.max_bps));
    }

    #[test]
    fn the_first_observation_is_a_baseline() {
        let now = Instant::now();
        let mut c = RateController::new(config(1_000_000, 100_000, 1_000_000));
        let obs = Observation {
            relay_drops: 50,
            local_drops: 7,
            encoded_bytes: 1 << 20,
            path: None,
        };
        assert_eq!(c.observe(now, obs), None);
        assert_eq!(c.observe(now + TICK, obs), None);
        assert_eq!(c.target_bps(), 1_000_000);
    }
}
