//! What the customer sees of the operator on their own screen: the operator's pointer
//! ("指差し"), the keys the operator asks them to press, and a bar at the top edge
//! whenever anyone watches, controls or records (or sharing is paused).
//!
//! Each is an override-redirect X window kept above the others, with an empty input
//! region (SHAPE 1.1), so every click — the customer's, or the operator's injected at
//! the pointer marker's position — reaches the application beneath. The windows are
//! drawn once into background pixmaps and the server repaints them by itself, so the
//! overlay thread never has to answer Expose. Text uses the server's `fixed` font,
//! which X servers carry built in (no font package needed); without it the boxes keep
//! their colours and their window names, and only the letters are missing.
//!
//! The screen capture sees the overlay like any window: the operator sees their own
//! pointer where the customer sees it, and sees the indicator the customer sees.
//!
//! Layout: this file is the API ([`Overlay`], [`IndicatorState`]) and what callers
//! hand to the thread; `worker` is the thread: the X connection, the windows and how
//! they are drawn.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kakehashi_proto::{Permissions, pb};
use x11rb::errors::ReplyOrIdError;

use crate::host::HostEvent;

mod worker;

use worker::Worker;

/// By default, the pointer marker disappears when no hint came for this long (the
/// operator's viewer went quiet without saying "stop pointing").
pub const POINTER_TIMEOUT: Duration = Duration::from_secs(30);
/// By default, how long a keyboard display stays on screen.
pub const KEYS_SHOWN_FOR: Duration = Duration::from_secs(8);
/// Width and height of the pointer marker, centred on the hinted point.
pub const MARKER_SIZE: u16 = 28;
/// Distance from the hinted point to the middle of the marker's coloured ring, where
/// [`MARKER_RGB`] is drawn in every direction (tests look there).
pub const MARKER_RING_RADIUS: i32 = 10;
/// The ring's colour: a signal orange that office content rarely has.
pub const MARKER_RGB: [u8; 3] = [0xff, 0x50, 0x00];
/// The ring's outline, for contrast on light backgrounds.
const OUTLINE_RGB: [u8; 3] = [0x20, 0x20, 0x20];

/// How often the overlay thread looks at the X server's events and its timers when
/// nothing asks it to do anything.
const TICK: Duration = Duration::from_millis(50);
/// [`Overlay::sync`] gives up after this long; a failure guard, not a timing.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// Dropping the overlay waits this long for its thread to remove the windows; a thread
/// stuck on a hung X server is left behind (it ends with the connection).
const STOP_WAIT: Duration = Duration::from_secs(2);
/// A keyboard display shows at most this many keys, each at most this many characters,
/// and a note of at most this many characters: whatever the operator sent.
const MAX_KEYS: usize = 16;
const MAX_KEY_CHARS: usize = 24;
const MAX_NOTE_CHARS: usize = 160;
/// Bar colours by what is going on, most serious first.
const RECORDING_RGB: u32 = 0x00c6_2828;
const CONTROLLING_RGB: u32 = 0x00e6_5100;
const WATCHING_RGB: u32 = 0x0015_65c0;
const PAUSED_RGB: u32 = 0x0054_6e7a;
const KEYS_BG_RGB: u32 = 0x0020_2830;
const KEYS_FG_RGB: u32 = 0x00ff_d54f;
const TEXT_RGB: u32 = 0x00ff_ffff;
/// Window names, for tests, screen readers and the customer's window list.
pub const POINTER_NAME: &str = "Kakehashi pointer";
pub const KEYS_NAME_PREFIX: &str = "Kakehashi keys: ";
pub const INDICATOR_NAME_PREFIX: &str = "Kakehashi: ";

/// Who is doing what with the customer's screen; drives the indicator bar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndicatorState {
    /// Viewers who see the screen now (VIEW granted, not paused, present).
    pub watching: u32,
    /// The operator's input is being applied (CONTROL granted in a control session).
    pub controlling: bool,
    /// The operator may record the session (RECORDING granted).
    pub recording: bool,
    /// The customer paused sharing: nobody sees the screen.
    pub paused: bool,
}

impl IndicatorState {
    /// The state a host session implies: `granted` and `paused` from the host,
    /// `control_session` from the session's mode, `viewers` attached now.
    pub fn from_session(
        granted: Permissions,
        paused: bool,
        control_session: bool,
        viewers: u32,
    ) -> Self {
        Self {
            watching: if granted.contains(Permissions::VIEW) && !paused {
                viewers
            } else {
                0
            },
            // The host closes its control gate while paused, so pause ends control.
            controlling: control_session && granted.contains(Permissions::CONTROL) && !paused,
            recording: granted.contains(Permissions::RECORDING),
            paused,
        }
    }

    /// Whether the bar is shown at all.
    pub fn is_active(&self) -> bool {
        self.watching > 0 || self.controlling || self.recording || self.paused
    }

    /// The bar's text, also its window name; `None` when nothing is going on.
    pub fn label(&self) -> Option<String> {
        if !self.is_active() {
            return None;
        }
        let mut parts = Vec::new();
        match self.watching {
            0 => {}
            1 => parts.push("WATCHING (1 viewer)".to_owned()),
            n => parts.push(format!("WATCHING ({n} viewers)")),
        }
        if self.controlling {
            parts.push("CONTROLLING".to_owned());
        }
        if self.recording {
            parts.push("RECORDING".to_owned());
        }
        if self.paused {
            parts.push("PAUSED (nobody sees your screen)".to_owned());
        }
        Some(format!("{INDICATOR_NAME_PREFIX}{}", parts.join(" | ")))
    }

    /// The bar's colour: the most serious thing going on.
    fn colour(&self) -> u32 {
        if self.recording {
            RECORDING_RGB
        } else if self.controlling {
            CONTROLLING_RGB
        } else if self.watching > 0 {
            WATCHING_RGB
        } else {
            PAUSED_RGB
        }
    }
}

/// How the overlay maps what it is told onto the screen.
#[derive(Debug, Clone, Copy)]
pub struct OverlayOptions {
    /// The capture scale the operator's viewer sees (`CaptureConfig::scale`): pointer
    /// hints are in the scaled picture's pixels and are divided by it.
    pub capture_scale: f32,
    /// The marker disappears when no hint came for this long.
    pub pointer_timeout: Duration,
    /// How long a keyboard display stays on screen.
    pub keys_shown_for: Duration,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        Self {
            capture_scale: 1.0,
            pointer_timeout: POINTER_TIMEOUT,
            keys_shown_for: KEYS_SHOWN_FOR,
        }
    }
}

/// Why the overlay could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot connect to X display {display:?}: {source}")]
    Connect {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("X display {display:?} has no screen {screen}")]
    NoScreen { display: String, screen: usize },
    #[error(
        "X display {display:?} lacks SHAPE 1.1, so overlay windows would swallow the clicks meant for the desktop"
    )]
    NoShape { display: String },
    #[error(
        "X display {display:?} has a pixel format the overlay cannot draw (depth {depth}, {bits_per_pixel} bits per pixel, {byte_order})"
    )]
    UnsupportedFormat {
        display: String,
        depth: u8,
        bits_per_pixel: u8,
        byte_order: &'static str,
    },
    #[error("X request on {display:?} failed: {source}")]
    Request {
        display: String,
        #[source]
        source: ReplyOrIdError,
    },
    #[error("the overlay on {display:?} did not answer within {waited:?}")]
    SyncTimeout { display: String, waited: Duration },
    #[error("the overlay on {display:?} stopped (its X connection failed)")]
    Stopped { display: String },
}

/// What the callers asked for since the overlay thread last looked: only the newest
/// of each kind matters, so the "queue" is bounded by construction.
#[derive(Default)]
struct Pending {
    pointer: Option<(i32, i32, bool)>,
    keys: Option<(Vec<String>, String)>,
    state: Option<IndicatorState>,
    syncs: Vec<SyncSender<()>>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Pending holds plain values; a panic elsewhere cannot leave it inconsistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The operator's marks and the session indicator on one X display, drawn by a thread
/// of its own. Dropping it removes the windows and stops the thread.
pub struct Overlay {
    display: String,
    shared: Arc<Shared>,
    wake: SyncSender<()>,
    /// Disconnected once the thread has ended (its sender is dropped on the way out).
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("display", &self.display)
            .finish_non_exhaustive()
    }
}

impl Overlay {
    /// Opens `display` (`None`: `$DISPLAY`) with default options.
    pub fn open(display: Option<&str>) -> Result<Self, OverlayError> {
        Self::open_with(display, OverlayOptions::default())
    }

    /// Opens `display` (`None`: `$DISPLAY`), creates the (unmapped) windows and starts
    /// the overlay thread. Errors here are the display's: no connection, no SHAPE.
    pub fn open_with(display: Option<&str>, options: OverlayOptions) -> Result<Self, OverlayError> {
        let worker = Worker::open(display, options)?;
        let name = worker.display.clone();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
        });
        // One slot: a wake-up already queued covers any number of changes.
        let (wake, woken) = mpsc::sync_channel(1);
        let (finished, done) = mpsc::sync_channel::<()>(0);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("kakehashi-overlay".into())
                .spawn(move || {
                    let _finished = finished;
                    worker.run(&shared, &woken);
                })
                .map_err(|e| OverlayError::Stopped {
                    display: format!("{name} ({e})"),
                })?
        };
        Ok(Self {
            display: name,
            shared,
            wake,
            done,
            thread: Some(thread),
        })
    }

    /// Shows what a host event asks for: [`HostEvent::Pointer`] moves or hides the
    /// marker, [`HostEvent::KeyDisplay`] shows the keys; other events are ignored.
    pub fn apply(&self, ev: &HostEvent) {
        match ev {
            HostEvent::Pointer(p) => self.point(p),
            HostEvent::KeyDisplay { keys, note } => self.show_keys(keys, note),
            _ => {}
        }
    }

    /// Moves the marker to the hint's position, or hides it.
    pub fn point(&self, hint: &pb::PointerHint) {
        self.shared.pending().pointer = Some((hint.x, hint.y, hint.visible));
        self.wake();
    }

    /// Shows `keys` and `note` for [`OverlayOptions::keys_shown_for`]; nothing to show
    /// hides the box.
    pub fn show_keys(&self, keys: &[String], note: &str) {
        let keys = keys
            .iter()
            .take(MAX_KEYS)
            .map(|k| k.chars().take(MAX_KEY_CHARS).collect())
            .collect();
        let note = note.chars().take(MAX_NOTE_CHARS).collect();
        self.shared.pending().keys = Some((keys, note));
        self.wake();
    }

    /// Sets what the indicator bar says; an inactive state removes it.
    pub fn set_state(&self, state: IndicatorState) {
        self.shared.pending().state = Some(state);
        self.wake();
    }

    /// Returns once everything asked so far is on the screen (the X server has drawn
    /// it), for tests and for callers that capture right after.
    pub fn sync(&self) -> Result<(), OverlayError> {
        if !self.is_running() {
            return Err(OverlayError::Stopped {
                display: self.display.clone(),
            });
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.shared.pending().syncs.push(tx);
        self.wake();
        match rx.recv_timeout(SYNC_WAIT) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(OverlayError::SyncTimeout {
                display: self.display.clone(),
                waited: SYNC_WAIT,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(OverlayError::Stopped {
                display: self.display.clone(),
            }),
        }
    }

    /// Whether the overlay thread still runs (it stops if its X connection fails).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn wake(&self) {
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            // The thread is gone; `sync` and `is_running` report it.
            Err(TrySendError::Disconnected(())) => {}
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.shared.pending().stop = true;
        self.wake();
        // The thread looks at `stop` at least every TICK and then only destroys its
        // windows: a short wait, unless the X server stopped answering.
        if let Err(RecvTimeoutError::Disconnected) = self.done.recv_timeout(STOP_WAIT)
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_every_state() {
        let none = IndicatorState::default();
        assert!(!none.is_active());
        assert_eq!(none.label(), None);
        let watching = IndicatorState {
            watching: 1,
            ..none
        };
        assert_eq!(
            watching.label().as_deref(),
            Some("Kakehashi: WATCHING (1 viewer)")
        );
        let all = IndicatorState {
            watching: 2,
            controlling: true,
            recording: true,
            paused: false,
        };
        assert_eq!(
            all.label().as_deref(),
            Some("Kakehashi: WATCHING (2 viewers) | CONTROLLING | RECORDING")
        );
        assert_eq!(all.colour(), RECORDING_RGB);
        let paused = IndicatorState {
            paused: true,
            ..none
        };
        assert_eq!(
            paused.label().as_deref(),
            Some("Kakehashi: PAUSED (nobody sees your screen)")
        );
        assert_eq!(paused.colour(), PAUSED_RGB);
    }

    #[test]
    fn state_follows_grants_pause_and_mode() {
        let vc = Permissions::VIEW | Permissions::CONTROL;
        let s = IndicatorState::from_session(vc, false, true, 1);
        assert_eq!((s.watching, s.controlling, s.recording), (1, true, false));
        // A view-only session never controls, whatever was granted.
        assert!(!IndicatorState::from_session(vc, false, false, 1).controlling);
        // Nobody there, nobody watching.
        assert_eq!(
            IndicatorState::from_session(vc, false, false, 0).watching,
            0
        );
        let p = IndicatorState::from_session(vc | Permissions::RECORDING, true, true, 1);
        assert_eq!(
            p,
            IndicatorState {
                watching: 0,
                controlling: false,
                recording: true,
                paused: true
            }
        );
        assert!(!IndicatorState::from_session(Permissions::NONE, false, true, 1).is_active());
    }
}
