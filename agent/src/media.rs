//! The media layer: what the host captures and encodes, what the viewer decodes, and how
//! the operator's input reaches the customer's desktop. Independent of the session code:
//! the host and viewer feed it and drain it, nothing here touches the network.
//!
//! # Layout
//! - [`frame`]: [`Frame`] (BGRA or I420 pixels with size, stride, time and a
//!   changed/unchanged flag), scaling, change detection, PSNR.
//! - [`source`]: the [`ScreenSource`] trait every capture backend implements, and
//!   [`SyntheticSource`], the load-test screen behind the same trait.
//! - `x11`: [`X11Source`], Linux/X11 capture through x11rb (MIT-SHM when the server
//!   offers it, plain `GetImage` otherwise), XDamage to skip captures of a still screen.
//! - [`codec`]: [`H264Encoder`] / [`H264Decoder`] over OpenH264 (built from source),
//!   with run-time bitrate and key frames on request; [`EncodePipeline`] skips unchanged
//!   frames.
//! - [`decoder`]: [`decoder::ScreenDecoder`], the SCREEN channel back to pictures, shared
//!   by the headless viewer and the viewer window.
//! - [`input`]: [`InputSink`] (one per platform), [`ControlGate`] and [`Injector`],
//!   which injects nothing while the gate is closed; [`XTestSink`] for X11;
//!   [`input::jis`], the Japanese 106-key layout.
//! - [`stream`]: [`ScreenStream`], capture + encode on a thread of its own feeding a
//!   bounded channel, controlled through a [`StreamHandle`] (pause, key frame,
//!   bitrate); what the host wires to its SCREEN channel.
//! - [`rate`]: [`rate::RateController`], bitrate adaptation from the drops and delay
//!   the relay path reports (no I/O, no clocks).
//! - [`overlay`]: [`Overlay`], the operator's pointer, keyboard display and the
//!   watching/controlling/recording indicator drawn on the customer's X screen.
//! - [`image`]: decoded frames written as PNG for the headless viewer.
//! - [`xvfb`]: a private Xvfb server, a scene to draw on it, and a test window that
//!   records the input it receives (tests, benchmarks, demos).
//!
//! # Invariants
//! - Nothing is injected unless the [`ControlGate`] given to the [`Injector`] is open;
//!   the host's grant check stays in the session code, this is the second lock.
//! - Frames from every source are tightly packed BGRA (`stride == width * 4`) with even
//!   width and height, so the encoder never has to crop.
//! - No pixel data from the X server or the network is trusted for its size: lengths
//!   are checked against width, height and stride before use.

pub mod codec;
pub mod decoder;
pub mod frame;
pub mod image;
pub mod input;
pub mod overlay;
pub mod rate;
pub mod source;
pub mod stream;
mod x11;
pub mod xvfb;

pub use codec::{CodecError, EncodePipeline, EncodedFrame, H264Decoder, H264Encoder};
pub use frame::{Frame, PixelFormat};
pub use input::{ControlGate, Injector, InputAction, InputError, InputSink, XTestSink};
pub use overlay::{IndicatorState, Overlay, OverlayError, OverlayOptions};
pub use source::{CaptureConfig, CaptureError, ScreenSource, SyntheticSource};
pub use stream::{ScreenStream, StreamHandle, StreamStats};
pub use x11::{ScreenFormat, X11Source};
