//! The customer's real screen in a session: a [`ScreenStream`] whose frames go out on the
//! SCREEN channel, and an [`Injector`] that obeys the operator's input. Both follow the
//! host's state: capture runs only while VIEW is granted and sharing is not paused, and
//! the injector's gate is open only in a control session with CONTROL granted and not
//! paused (the driver's grant check stays the first lock).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kakehashi_proto::{Mode, Permissions, pb};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::{Host, Shared};
use crate::conduit::Conduit;
use crate::error::AgentError;
use crate::media::codec::EncoderSettings;
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

/// What [`Host::share_x11_screen`] captures and how.
#[derive(Debug, Clone)]
pub struct ScreenOptions {
    /// X display to capture (`None`: `$DISPLAY`).
    pub display: Option<String>,
    pub capture: CaptureConfig,
    /// Target bitrate in bits per second.
    pub bitrate_bps: u32,
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
    // The frame forwarder; aborted on drop.
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
        )
    }

    /// [`Host::share_x11_screen`] with any capture source and input sink.
    pub fn share_screen<S: InputSink + 'static>(
        &self,
        source: Box<dyn ScreenSource>,
        settings: EncoderSettings,
        sink: Option<S>,
    ) -> Result<ScreenShare, ScreenError> {
        let period = source.config().period();
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
                let inj = Injector::new(sink, gate.clone());
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
        ));
        Ok(ScreenShare {
            shared: self.shared.clone(),
            handle,
            gate,
            injected,
            refused,
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
) {
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            f = frames.recv() => {
                let Some(f) = f else { return };
                match super::send_screen_via(&shared, &conduit, f.to_screen_frame()).await {
                    Ok(_) => {}
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
