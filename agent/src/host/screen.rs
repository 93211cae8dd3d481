//! The customer's real screen in a session: a [`ScreenStream`] whose frames go out on the
//! SCREEN channel, and an [`Injector`] that obeys the operator's input. Both follow the
//! host's state: capture runs only while VIEW is granted and sharing is not paused, and
//! the injector's gate is open only in a control session with CONTROL granted and not
//! paused (the driver's grant check stays the first lock). The encoder's bitrate follows
//! the path: a [`RateController`] reads the relay's drop reports, this host's own drops
//! and the QUIC path's RTT and loss a few times a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kakehashi_proto::{Mode, Permissions, pb};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{Host, Shared};
use crate::conduit::Conduit;
use crate::error::AgentError;
use crate::media::codec::EncoderSettings;
use crate::media::rate::{Observation, PathSnapshot, RateConfig, RateController};
use crate::media::stream::StreamError;
use crate::media::{
    CaptureConfig, CaptureError, ControlGate, EncodedFrame, Injector, InputAction, InputError,
    InputSink, ScreenSource, ScreenStream, StreamHandle, X11Source, XTestSink,
};

/// Encoded frames waiting for the network; a full queue drops a frame and forces a key
/// frame (the stream's rule), so a slow path costs freshness, not memory.
const FRAME_QUEUE: usize = 2;
/// Input actions waiting for the injector thread. Input is reliable and small; past
/// this the operator is typing faster than X accepts and the extra is dropped (logged).
const INPUT_QUEUE: usize = 1024;
/// How often a viewer's key-frame request is passed on when no frame is moving (a still
/// screen produces none to piggyback on).
const KEY_CHECK: Duration = Duration::from_millis(100);
/// How often the bitrate controller reads the path: several readings per second so a
/// decrease follows congestion within a few RTTs, few enough to cost nothing.
const RATE_PERIOD: Duration = Duration::from_millis(250);
/// The default floor of the adapted bitrate: below it 1080p screen content is a blur.
pub const DEFAULT_MIN_BITRATE_BPS: u32 = 150_000;

/// What [`Host::share_x11_screen`] captures and how.
#[derive(Debug, Clone)]
pub struct ScreenOptions {
    /// X display to capture (`None`: `$DISPLAY`).
    pub display: Option<String>,
    pub capture: CaptureConfig,
    /// Bitrate in bits per second the encoder starts at.
    pub bitrate_bps: u32,
    /// Adapt the bitrate to the drops and delay the relay path reports, within
    /// `[min_bitrate_bps, max_bitrate_bps]`; `false` keeps `bitrate_bps` for good.
    pub adapt_bitrate: bool,
    /// The adapted bitrate's floor, bits per second.
    pub min_bitrate_bps: u32,
    /// The adapted bitrate's ceiling, bits per second (`None`: `bitrate_bps`).
    pub max_bitrate_bps: Option<u32>,
    /// Inject the operator's input with XTest (control sessions; nothing is injected
    /// unless CONTROL is granted). `false`: input is only reported as events.
    pub inject_input: bool,
}

impl Default for ScreenOptions {
    fn default() -> Self {
        Self {
            display: None,
            capture: CaptureConfig::default(),
            bitrate_bps: EncoderSettings::default().bitrate_bps,
            adapt_bitrate: true,
            min_bitrate_bps: DEFAULT_MIN_BITRATE_BPS,
            max_bitrate_bps: None,
            inject_input: true,
        }
    }
}

/// Why the screen could not be shared.
#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("screen capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("screen stream: {0}")]
    Stream(#[from] StreamError),
    #[error("input injection: {0}")]
    Input(#[from] InputError),
    #[error("cannot start the input thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the injector thread is told.
enum InputCmd {
    Apply(InputAction),
    ReleaseAll,
}

/// The host's view of a running screen share (kept in [`Shared`]).
pub(super) struct ScreenLink {
    stream: StreamHandle,
    gate: ControlGate,
    input: Option<std::sync::mpsc::SyncSender<InputCmd>>,
}

impl ScreenLink {
    /// Passes one INPUT message to the injector (the driver checked the grant).
    pub(super) fn inject(&self, ev: &pb::InputEvent) {
        let (Some(tx), Some(action)) = (&self.input, InputAction::from_pb(ev)) else {
            return;
        };
        if let Err(e) = tx.try_send(InputCmd::Apply(action)) {
            warn!(error = %e, "operator input dropped: the injector is behind");
        }
    }
}

impl Shared {
    /// Brings the screen share in line with the state: capture only with VIEW and not
    /// paused; the input gate open only in a control session with CONTROL and not paused.
    pub(super) fn sync_screen(&self) {
        let (view, control) = {
            let st = self.state();
            let live = !st.paused && !st.ended;
            (
                live && st.granted.contains(Permissions::VIEW),
                live && self.mode == Mode::Control && st.granted.contains(Permissions::CONTROL),
            )
        };
        let link = self.screen.lock().unwrap_or_else(|p| p.into_inner());
        let Some(link) = link.as_ref() else { return };
        if view {
            // Resuming forces a key frame; only do it on a real change.
            if link.stream.is_paused() {
                link.stream.resume();
            }
        } else {
            link.stream.pause();
        }
        if control {
            link.gate.open();
        } else if link.gate.is_open() {
            link.gate.close();
            if let Some(tx) = &link.input
                && tx.try_send(InputCmd::ReleaseAll).is_err()
            {
                warn!("could not ask the injector to release held keys");
            }
        }
    }
}

/// A screen being shared in a session. Dropping it stops capture and injection (held
/// keys and buttons are released first).
pub struct ScreenShare {
    shared: Arc<Shared>,
    handle: StreamHandle,
    gate: ControlGate,
    injected: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    rate: Arc<RateState>,
    // The frame forwarder and the bitrate controller; aborted on drop.
    tasks: JoinSet<()>,
    stream: Option<ScreenStream>,
    input: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ScreenShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScreenShare")
            .field("stats", &self.handle.stats())
            .finish_non_exhaustive()
    }
}

impl ScreenShare {
    /// Capture control and counters (captured, sent, unchanged, dropped, bytes).
    pub fn stream(&self) -> &StreamHandle {
        &self.handle
    }

    /// Whether the operator's input would be injected now.
    pub fn control_open(&self) -> bool {
        self.gate.is_open()
    }

    /// Input actions injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Input actions refused by the closed gate so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// The encoder's current target bitrate, bits per second (adapted, or the fixed one).
    pub fn bitrate_bps(&self) -> u32 {
        self.rate.target.load(Ordering::Relaxed)
    }

    /// How many times the adaptation moved the target bitrate.
    pub fn bitrate_changes(&self) -> u64 {
        self.rate.changes.load(Ordering::Relaxed)
    }
}

/// What the bitrate controller publishes for [`ScreenShare`].
#[derive(Debug)]
struct RateState {
    target: AtomicU32,
    changes: AtomicU64,
    /// Screen payload bytes written to the link. Not the stream's `bytes`: frames
    /// withheld while no viewer can take them never reach the network, and counting
    /// them would look like a backlog.
    written: AtomicU64,
}

impl Drop for ScreenShare {
    fn drop(&mut self) {
        let link = self
            .shared
            .screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.gate.close();
        self.handle.pause();
        if let Some(tx) = link.and_then(|l| l.input) {
            let _ = tx.try_send(InputCmd::ReleaseAll);
            // Dropping the sender ends the injector thread.
        }
        self.tasks.abort_all();
        drop(self.stream.take());
        if let Some(t) = self.input.take() {
            let _ = t.join();
        }
    }
}

impl Host {
    /// Shares the X11 screen `options.display` names: captures at `options.capture`,
    /// encodes H.264 and sends each frame on the SCREEN channel (only with VIEW and not
    /// paused; nothing is even captured otherwise), with a key frame whenever the viewer
    /// needs one. With `inject_input`, the operator's input is injected through XTest
    /// while a control session has CONTROL. One share per host; a second replaces the
    /// first's hooks.
    pub fn share_x11_screen(&self, options: &ScreenOptions) -> Result<ScreenShare, ScreenError> {
        let source = X11Source::open(options.display.as_deref(), options.capture)?;
        let adapt = options.adapt_bitrate.then(|| {
            RateConfig::bounded(
                options.bitrate_bps,
                options.min_bitrate_bps,
                options.max_bitrate_bps.unwrap_or(options.bitrate_bps),
            )
        });
        let sink = if options.inject_input {
            Some(XTestSink::open(options.display.as_deref())?)
        } else {
            None
        };
        self.share_screen(
            Box::new(source),
            EncoderSettings {
                bitrate_bps: options.bitrate_bps,
                fps: options.capture.fps,
                key_interval: None,
            },
            sink,
            adapt,
        )
    }

    /// [`Host::share_x11_screen`] with any capture source and input sink; with `adapt`,
    /// the bitrate follows the path within its bounds, starting at its `start_bps`
    /// (which replaces `settings.bitrate_bps`).
    pub fn share_screen<S: InputSink + 'static>(
        &self,
        source: Box<dyn ScreenSource>,
        mut settings: EncoderSettings,
        sink: Option<S>,
        adapt: Option<RateConfig>,
    ) -> Result<ScreenShare, ScreenError> {
        let period = source.config().period();
        // The operator points in the (possibly scaled) picture it was sent.
        let picture_scale = source.config().scale;
        let controller = adapt.map(RateController::new);
        if let Some(c) = &controller {
            settings.bitrate_bps = c.target_bps();
        }
        let rate = Arc::new(RateState {
            target: AtomicU32::new(settings.bitrate_bps),
            changes: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let (stream, frames) = ScreenStream::start(source, settings, FRAME_QUEUE)?;
        let handle = stream.handle();
        // Nothing is captured until the state says so.
        handle.pause();
        let gate = ControlGate::new();
        let injected = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (input_tx, input) = match sink {
            Some(sink) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(INPUT_QUEUE);
                let inj = Injector::new(sink, gate.clone()).with_picture_scale(picture_scale);
                let (ok, no) = (injected.clone(), refused.clone());
                let t = std::thread::Builder::new()
                    .name("kakehashi-inject".into())
                    .spawn(move || run_injector(inj, rx, ok, no))
                    .map_err(ScreenError::Thread)?;
                (Some(tx), Some(t))
            }
            None => (None, None),
        };
        *self.shared.screen.lock().unwrap_or_else(|p| p.into_inner()) = Some(ScreenLink {
            stream: handle.clone(),
            gate: gate.clone(),
            input: input_tx,
        });
        self.shared.sync_screen();
        let mut tasks = JoinSet::new();
        tasks.spawn(forward_frames(
            self.shared.clone(),
            self.conduit.clone(),
            handle.clone(),
            frames,
            period.min(KEY_CHECK),
            rate.clone(),
        ));
        if let Some(controller) = controller {
            tasks.spawn(adapt_bitrate(
                self.shared.clone(),
                self.conduit.clone(),
                handle.clone(),
                controller,
                rate.clone(),
            ));
        }
        Ok(ScreenShare {
            shared: self.shared.clone(),
            handle,
            gate,
            injected,
            refused,
            rate,
            tasks,
            stream: Some(stream),
            input,
        })
    }
}

/// Sends encoded frames until the stream or the session ends; passes key-frame requests
/// to the encoder.
async fn forward_frames(
    shared: Arc<Shared>,
    conduit: Arc<Conduit>,
    handle: StreamHandle,
    mut frames: mpsc::Receiver<EncodedFrame>,
    check: Duration,
    rate: Arc<RateState>,
) {
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            f = frames.recv() => {
                let Some(f) = f else { return };
                let len = f.data.len() as u64;
                match super::send_screen_via(&shared, &conduit, f.to_screen_frame()).await {
                    Ok(true) => {
                        rate.written.fetch_add(len, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(AgentError::Ended) => return,
                    Err(e) => debug!(error = %e, "screen frame not sent"),
                }
            }
            _ = tick.tick() => {}
        }
        if shared
            .key_frame_wanted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            handle.force_key_frame();
        }
    }
}

/// Reads the path every [`RATE_PERIOD`] and sets the encoder's bitrate to what the
/// controller says. Nothing is read while sharing is paused: no frames, no evidence.
async fn adapt_bitrate(
    shared: Arc<Shared>,
    conduit: Arc<Conduit>,
    handle: StreamHandle,
    mut controller: RateController,
    rate: Arc<RateState>,
) {
    let mut tick = tokio::time::interval(RATE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if handle.is_paused() {
            continue;
        }
        let (connection, stats) = conduit.tx().path_stats();
        let obs = Observation {
            relay_drops: shared.counters.relay_screen_drops.load(Ordering::Relaxed),
            local_drops: handle.stats().dropped,
            encoded_bytes: rate.written.load(Ordering::Relaxed),
            path: Some(PathSnapshot {
                connection: connection as u64,
                rtt: stats.path.rtt,
                sent_packets: stats.path.sent_packets,
                lost_packets: stats.path.lost_packets,
                sent_bytes: stats.udp_tx.bytes,
                lost_bytes: stats.path.lost_bytes,
            }),
        };
        let Some(change) = controller.observe(Instant::now(), obs) else {
            continue;
        };
        debug!(
            bps = change.bps,
            reason = ?change.reason,
            rtt_ms = stats.path.rtt.as_millis() as u64,
            backlog_bytes = controller.backlog_bytes(),
            "screen bitrate adapted"
        );
        handle.set_bitrate(change.bps);
        rate.target.store(change.bps, Ordering::Relaxed);
        rate.changes.fetch_add(1, Ordering::Relaxed);
    }
}

fn run_injector<S: InputSink>(
    mut inj: Injector<S>,
    rx: std::sync::mpsc::Receiver<InputCmd>,
    injected: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            InputCmd::Apply(a) => match inj.apply(&a) {
                Ok(()) => {
                    injected.fetch_add(1, Ordering::SeqCst);
                }
                Err(InputError::NotGranted) => {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => warn!(error = %e, "operator input not injected"),
            },
            InputCmd::ReleaseAll => {
                if let Err(e) = inj.release_all() {
                    warn!(error = %e, "could not release held keys");
                }
            }
        }
    }
    let _ = inj.release_all();
}
