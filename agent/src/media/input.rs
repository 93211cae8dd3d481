//! Operator input applied to the customer's desktop: the platform-neutral actions, the
//! [`InputSink`] each platform implements, and the [`Injector`] that refuses everything
//! while its [`ControlGate`] is closed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kakehashi_proto::pb;

pub mod jis;
pub mod keysym;
mod xtest;

pub use xtest::XTestSink;

/// One thing the operator did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputAction {
    /// Absolute pointer position in screen pixels of the captured screen.
    PointerMove { x: i32, y: i32 },
    /// X numbering: 1 left, 2 middle, 3 right (4–7 are wheel steps; prefer `Wheel`).
    Button { button: u8, down: bool },
    /// Wheel notches: positive `dy` scrolls down, positive `dx` right.
    Wheel { dx: i32, dy: i32 },
    /// A key by X keysym, pressed or released as sent (the operator's modifiers are
    /// keys too).
    Key { keysym: u32, down: bool },
    /// Text to type: each character is produced with whatever modifiers the customer's
    /// keyboard layout needs for it.
    Text(String),
}

impl InputAction {
    /// The action an INPUT channel message asks for; `None` for an empty message or a
    /// button number X cannot press.
    pub fn from_pb(ev: &pb::InputEvent) -> Option<Self> {
        use pb::input_event::Kind;
        Some(match ev.kind.as_ref()? {
            Kind::PointerMove(m) => Self::PointerMove { x: m.x, y: m.y },
            Kind::PointerButton(b) => Self::Button {
                button: u8::try_from(b.button)
                    .ok()
                    .filter(|b| (1..=31).contains(b))?,
                down: b.down,
            },
            Kind::Key(k) => Self::Key {
                keysym: k.keysym,
                down: k.down,
            },
            Kind::Text(t) => Self::Text(t.text.clone()),
        })
    }
}

/// Why input was not applied.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input refused: control is not granted")]
    NotGranted,
    #[error("cannot connect to X display {display:?}: {source}")]
    Connect {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("X display {display:?} has no XTEST extension")]
    NoXTest { display: String },
    #[error("X connection to {display:?} failed: {source}")]
    Connection {
        display: String,
        #[source]
        source: x11rb::errors::ConnectionError,
    },
    #[error("X request on {display:?} failed: {source}")]
    Request {
        display: String,
        #[source]
        source: x11rb::errors::ReplyError,
    },
    #[error("keysym {keysym:#x} is not on the keyboard and no spare keycode is free to bind it")]
    NoKeycode { keysym: u32 },
    #[error("text of {len} characters exceeds the {max}-character limit of one action")]
    TextTooLong { len: usize, max: usize },
}

/// Most characters one `Text` action may type: a paste of a page, not of a book.
pub const MAX_TEXT_CHARS: usize = 4096;

/// Whether control is granted right now. The host opens it when the customer grants
/// CONTROL and closes it on revoke, pause or end; clones share the state.
#[derive(Debug, Clone, Default)]
pub struct ControlGate(Arc<AtomicBool>);

impl ControlGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }
    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn close(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A platform's way of faking input. Implementations do exactly what they are told;
/// the [`Injector`] decides whether to tell them.
pub trait InputSink: Send {
    fn pointer_move(&mut self, x: i32, y: i32) -> Result<(), InputError>;
    fn button(&mut self, button: u8, down: bool) -> Result<(), InputError>;
    /// Presses or releases the key that produces `keysym`, without adding modifiers.
    fn key(&mut self, keysym: u32, down: bool) -> Result<(), InputError>;
    /// Types one character (press and release) with the modifiers the layout needs.
    fn type_char(&mut self, c: char) -> Result<(), InputError>;
    /// Returns once everything sent so far has reached the system.
    fn flush(&mut self) -> Result<(), InputError>;
}

/// Applies [`InputAction`]s through a sink only while the gate is open, and remembers
/// what it holds down so a revoke can let go of it.
#[derive(Debug)]
pub struct Injector<S> {
    sink: S,
    gate: ControlGate,
    held_buttons: BTreeSet<u8>,
    held_keys: BTreeSet<u32>,
    refused: u64,
    /// The operator points in the picture it was sent, which the capture may have
    /// scaled: its coordinates are divided by this before they reach the screen.
    picture_scale: f32,
}

impl<S: InputSink> Injector<S> {
    pub fn new(sink: S, gate: ControlGate) -> Self {
        Self {
            sink,
            gate,
            held_buttons: BTreeSet::new(),
            held_keys: BTreeSet::new(),
            refused: 0,
            picture_scale: 1.0,
        }
    }

    /// The capture's scale (`CaptureConfig::scale`): pointer positions arrive in the
    /// scaled picture's pixels. Values outside (0, 1] are taken as 1.
    pub fn with_picture_scale(mut self, scale: f32) -> Self {
        self.picture_scale = if scale > 0.0 && scale <= 1.0 {
            scale
        } else {
            1.0
        };
        self
    }

    fn to_screen(&self, v: i32) -> i32 {
        // f64 keeps every i32 exact; the result is clamped back into range.
        (f64::from(v) / f64::from(self.picture_scale))
            .round()
            .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
    }

    /// Actions refused because the gate was closed.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    fn check(&mut self) -> Result<(), InputError> {
        if self.gate.is_open() {
            Ok(())
        } else {
            self.refused += 1;
            Err(InputError::NotGranted)
        }
    }

    /// Applies one action and flushes it; `Err(NotGranted)` (and nothing sent) while the
    /// gate is closed. The gate is checked again before every character of a text.
    pub fn apply(&mut self, action: &InputAction) -> Result<(), InputError> {
        self.check()?;
        match action {
            InputAction::PointerMove { x, y } => {
                let (x, y) = (self.to_screen(*x), self.to_screen(*y));
                self.sink.pointer_move(x, y)?
            }
            InputAction::Button { button, down } => {
                self.sink.button(*button, *down)?;
                if *down {
                    self.held_buttons.insert(*button);
                } else {
                    self.held_buttons.remove(button);
                }
            }
            InputAction::Wheel { dx, dy } => {
                // X reports wheels as buttons 4/5 (vertical) and 6/7 (horizontal).
                let steps = [(*dy, 5u8, 4u8), (*dx, 7, 6)];
                for (n, pos, neg) in steps {
                    let b = if n > 0 { pos } else { neg };
                    for _ in 0..n.unsigned_abs().min(100) {
                        self.sink.button(b, true)?;
                        self.sink.button(b, false)?;
                    }
                }
            }
            InputAction::Key { keysym, down } => {
                self.sink.key(*keysym, *down)?;
                if *down {
                    self.held_keys.insert(*keysym);
                } else {
                    self.held_keys.remove(keysym);
                }
            }
            InputAction::Text(text) => {
                let len = text.chars().count();
                if len > MAX_TEXT_CHARS {
                    return Err(InputError::TextTooLong {
                        len,
                        max: MAX_TEXT_CHARS,
                    });
                }
                for c in text.chars() {
                    self.check()?;
                    self.sink.type_char(c)?;
                }
            }
        }
        self.sink.flush()
    }

    /// Releases every key and button this injector holds down. Allowed with the gate
    /// closed: the host calls it on revoke so no key stays stuck on the customer's side.
    pub fn release_all(&mut self) -> Result<(), InputError> {
        for k in std::mem::take(&mut self.held_keys) {
            self.sink.key(k, false)?;
        }
        for b in std::mem::take(&mut self.held_buttons) {
            self.sink.button(b, false)?;
        }
        self.sink.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl InputSink for Recorder {
        fn pointer_move(&mut self, x: i32, y: i32) -> Result<(), InputError> {
            self.0.push(format!("move {x},{y}"));
            Ok(())
        }
        fn button(&mut self, button: u8, down: bool) -> Result<(), InputError> {
            self.0.push(format!("button {button} {down}"));
            Ok(())
        }
        fn key(&mut self, keysym: u32, down: bool) -> Result<(), InputError> {
            self.0.push(format!("key {keysym:#x} {down}"));
            Ok(())
        }
        fn type_char(&mut self, c: char) -> Result<(), InputError> {
            self.0.push(format!("char {c}"));
            Ok(())
        }
        fn flush(&mut self) -> Result<(), InputError> {
            Ok(())
        }
    }

    #[test]
    fn closed_gate_injects_nothing() {
        let gate = ControlGate::new();
        let mut inj = Injector::new(Recorder::default(), gate.clone());
        for a in [
            InputAction::PointerMove { x: 1, y: 2 },
            InputAction::Button {
                button: 1,
                down: true,
            },
            InputAction::Text("hi".into()),
        ] {
            assert!(matches!(inj.apply(&a), Err(InputError::NotGranted)));
        }
        assert!(inj.sink_mut().0.is_empty());
        assert_eq!(inj.refused(), 3);

        gate.open();
        inj.apply(&InputAction::Text("hi".into())).unwrap();
        gate.close();
        assert!(inj.apply(&InputAction::PointerMove { x: 0, y: 0 }).is_err());
        assert_eq!(inj.sink_mut().0, ["char h", "char i"]);
    }

    #[test]
    fn pointer_positions_in_a_scaled_picture_land_on_the_real_screen() {
        let gate = ControlGate::new();
        gate.open();
        let mut inj = Injector::new(Recorder::default(), gate).with_picture_scale(0.5);
        inj.apply(&InputAction::PointerMove { x: 150, y: 101 })
            .expect("open gate");
        assert_eq!(inj.sink_mut().0, ["move 300,202"]);
        let gate = ControlGate::new();
        gate.open();
        // Nonsense scales are ignored rather than trusted.
        let mut inj = Injector::new(Recorder::default(), gate).with_picture_scale(0.0);
        inj.apply(&InputAction::PointerMove { x: 7, y: 9 })
            .expect("open gate");
        assert_eq!(inj.sink_mut().0, ["move 7,9"]);
    }

    #[test]
    fn wheel_becomes_button_clicks_and_release_all_lets_go() {
        let gate = ControlGate::new();
        gate.open();
        let mut inj = Injector::new(Recorder::default(), gate.clone());
        inj.apply(&InputAction::Wheel { dx: 0, dy: -2 }).unwrap();
        inj.apply(&InputAction::Key {
            keysym: 0xffe1,
            down: true,
        })
        .unwrap();
        inj.apply(&InputAction::Button {
            button: 1,
            down: true,
        })
        .unwrap();
        gate.close();
        inj.release_all().unwrap();
        assert_eq!(
            inj.sink_mut().0,
            [
                "button 4 true",
                "button 4 false",
                "button 4 true",
                "button 4 false",
                "key 0xffe1 true",
                "button 1 true",
                "key 0xffe1 false",
                "button 1 false",
            ]
        );
    }

    #[test]
    fn from_pb_maps_every_kind_and_rejects_bad_buttons() {
        use pb::input_event::Kind;
        let ev = |k| pb::InputEvent { kind: Some(k) };
        assert_eq!(
            InputAction::from_pb(&ev(Kind::PointerButton(pb::PointerButton {
                button: 3,
                down: true
            }))),
            Some(InputAction::Button {
                button: 3,
                down: true
            })
        );
        assert_eq!(
            InputAction::from_pb(&ev(Kind::PointerButton(pb::PointerButton {
                button: 300,
                down: true
            }))),
            None
        );
        assert_eq!(
            InputAction::from_pb(&ev(Kind::Text(pb::TypeText { text: "あ".into() }))),
            Some(InputAction::Text("あ".into()))
        );
        assert_eq!(InputAction::from_pb(&pb::InputEvent { kind: None }), None);
    }
}
