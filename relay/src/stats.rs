//! Counters: atomics that tests and the handle read, mirrored into `metrics` for Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kakehashi_proto::Channel;
use kakehashi_proto::policy::Denied;
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

/// Node-wide counters. Metric handles are resolved once so the hot path only adds.
pub struct RelayStats {
    pub sessions_started: AtomicU64,
    pub sessions_failed: AtomicU64,
    pub attaches_refused: AtomicU64,
    pub frames_forwarded: AtomicU64,
    pub frames_denied: AtomicU64,
    pub screen_frames_dropped: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Sum and count of `relay_forward_latency_seconds` samples, in ns, so the loadtest
    /// can report the relay's own queueing beside the end-to-end figures.
    pub forward_latency_ns: AtomicU64,
    pub forward_latency_samples: AtomicU64,
    forwarded_frames: Vec<Counter>,
    forwarded_bytes: Vec<Counter>,
    sessions_active: Gauge,
    forward_latency: Histogram,
}

pub fn describe() {
    describe_gauge!(
        "relay_sessions_active",
        "Sessions with a live actor on this relay"
    );
    describe_counter!("relay_sessions_started_total", "Session actors started");
    describe_counter!(
        "relay_sessions_failed_total",
        "Session actors that failed (panicked); each ended its own session only"
    );
    describe_counter!(
        "relay_attach_refused_total",
        "Participants refused at attach, by reason"
    );
    describe_counter!(
        "relay_frames_forwarded_total",
        "Frames forwarded to a participant, by channel"
    );
    describe_counter!(
        "relay_bytes_forwarded_total",
        "Frame bytes (header and ciphertext) forwarded, by channel"
    );
    describe_counter!(
        "relay_frames_denied_total",
        "Frames dropped by the consent policy, by reason"
    );
    describe_counter!(
        "relay_screen_frames_dropped_total",
        "Screen frames dropped for a slow viewer (latency-first)"
    );
    describe_counter!(
        "relay_protocol_errors_total",
        "Connections closed for breaking the protocol"
    );
    describe_histogram!(
        "relay_forward_latency_seconds",
        Unit::Seconds,
        "Time from a frame fully read off the sender's stream to its hand-over to the \
         receiver's stream write (queueing inside the relay; excludes QUIC and the network)"
    );
    describe_counter!(
        "relay_registration_errors_total",
        "Times the etcd registration was lost and retried (sessions are unaffected)"
    );
}

impl Default for RelayStats {
    fn default() -> Self {
        let per_channel = |name: &'static str| {
            Channel::ALL
                .iter()
                .map(|c| counter!(name, "channel" => c.name()))
                .collect()
        };
        Self {
            sessions_started: AtomicU64::new(0),
            sessions_failed: AtomicU64::new(0),
            attaches_refused: AtomicU64::new(0),
            frames_forwarded: AtomicU64::new(0),
            frames_denied: AtomicU64::new(0),
            screen_frames_dropped: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            forward_latency_ns: AtomicU64::new(0),
            forward_latency_samples: AtomicU64::new(0),
            forwarded_frames: per_channel("relay_frames_forwarded_total"),
            forwarded_bytes: per_channel("relay_bytes_forwarded_total"),
            sessions_active: gauge!("relay_sessions_active"),
            forward_latency: histogram!("relay_forward_latency_seconds"),
        }
    }
}

impl RelayStats {
    pub(crate) fn forwarded(&self, channel: Channel, bytes: usize) {
        self.frames_forwarded.fetch_add(1, Ordering::Relaxed);
        self.forwarded_frames[channel as usize].increment(1);
        self.forwarded_bytes[channel as usize].increment(bytes as u64);
    }

    pub(crate) fn forward_latency(&self, elapsed: Duration) {
        self.forward_latency.record(elapsed.as_secs_f64());
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.forward_latency_ns.fetch_add(ns, Ordering::Relaxed);
        self.forward_latency_samples.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn denied(&self, why: Denied) {
        self.frames_denied.fetch_add(1, Ordering::Relaxed);
        counter!("relay_frames_denied_total", "reason" => why.label()).increment(1);
    }

    pub(crate) fn screen_dropped(&self) {
        self.screen_frames_dropped.fetch_add(1, Ordering::Relaxed);
        counter!("relay_screen_frames_dropped_total").increment(1);
    }

    pub(crate) fn refused(&self, label: &'static str) {
        self.attaches_refused.fetch_add(1, Ordering::Relaxed);
        counter!("relay_attach_refused_total", "reason" => label).increment(1);
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        counter!("relay_protocol_errors_total").increment(1);
    }

    pub(crate) fn session_started(&self) {
        self.sessions_started.fetch_add(1, Ordering::Relaxed);
        counter!("relay_sessions_started_total").increment(1);
        self.sessions_active.increment(1.0);
    }

    pub(crate) fn session_stopped(&self, failed: bool) {
        self.sessions_active.decrement(1.0);
        if failed {
            self.sessions_failed.fetch_add(1, Ordering::Relaxed);
            counter!("relay_sessions_failed_total").increment(1);
        }
    }

    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}
