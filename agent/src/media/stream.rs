//! The host's screen pipeline on a thread of its own: capture at the configured rate,
//! encode, hand encoded frames to the async session code. The session controls it
//! through a cheap handle (pause, key frame, bitrate) and never blocks on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use super::codec::{EncodePipeline, EncodedFrame, EncoderSettings};
use super::source::ScreenSource;

/// Why the pipeline thread stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("screen capture failed: {0}")]
    Capture(#[from] super::source::CaptureError),
    #[error("encoder failed: {0}")]
    Codec(#[from] super::codec::CodecError),
    #[error("cannot start the capture thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Counters of a [`ScreenStream`], readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Frames captured (none while paused).
    pub captured: u64,
    /// Encoded frames handed to the session.
    pub sent: u64,
    /// Frames not encoded because the screen had not changed.
    pub unchanged: u64,
    /// Encoded frames dropped because the session had not taken the previous ones;
    /// each forces a key frame, since the viewer's decoder lost a reference.
    pub dropped: u64,
    pub bytes: u64,
    /// Frame periods that passed paused (nothing captured).
    pub paused_ticks: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    paused: AtomicBool,
    key_frame: AtomicBool,
    /// Requested bitrate; 0 = no change pending.
    bitrate: AtomicU32,
    captured: AtomicU64,
    sent: AtomicU64,
    unchanged: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
    paused_ticks: AtomicU64,
}

/// Control over a running [`ScreenStream`]; clones share it.
#[derive(Debug, Clone)]
pub struct StreamHandle(Arc<Shared>);

impl StreamHandle {
    /// Stops capturing (the customer's "pause sharing"): no frame is captured, encoded
    /// or sent until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::SeqCst);
    }

    /// Resumes capturing; the first frame after a pause is a key frame.
    pub fn resume(&self) {
        self.0.key_frame.store(true, Ordering::SeqCst);
        self.0.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::SeqCst)
    }

    /// The next frame is a key frame (the viewer asked, or a relay move lost frames).
    pub fn force_key_frame(&self) {
        self.0.key_frame.store(true, Ordering::SeqCst);
    }

    /// Target bitrate from the next frame on (the adaptation loop's knob).
    pub fn set_bitrate(&self, bps: u32) {
        self.0.bitrate.store(bps.max(1), Ordering::SeqCst);
    }

    pub fn stats(&self) -> StreamStats {
        let s = &self.0;
        StreamStats {
            captured: s.captured.load(Ordering::SeqCst),
            sent: s.sent.load(Ordering::SeqCst),
            unchanged: s.unchanged.load(Ordering::SeqCst),
            dropped: s.dropped.load(Ordering::SeqCst),
            bytes: s.bytes.load(Ordering::SeqCst),
            paused_ticks: s.paused_ticks.load(Ordering::SeqCst),
        }
    }
}

/// A capture + encode thread feeding a bounded channel. Dropping it stops the thread
/// (within one frame period) and waits for it.
#[derive(Debug)]
pub struct ScreenStream {
    handle: StreamHandle,
    thread: Option<JoinHandle<Result<(), StreamError>>>,
}

impl ScreenStream {
    /// Starts capturing `source` at its configured fps and encoding with `settings`.
    /// Returns the stream and the receiver of encoded frames (capacity `queue`, at
    /// least 1); the receiver ends when the thread stops, on drop or on an error.
    pub fn start(
        mut source: Box<dyn ScreenSource>,
        settings: EncoderSettings,
        queue: usize,
    ) -> Result<(Self, mpsc::Receiver<EncodedFrame>), StreamError> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let shared = Arc::new(Shared::default());
        let handle = StreamHandle(shared.clone());
        let mut pipe = EncodePipeline::new(settings)?;
        let period = source.config().period();
        let thread = std::thread::Builder::new()
            .name("kakehashi-capture".into())
            .spawn(move || {
                let s = &shared;
                let mut next = Instant::now();
                while !s.stop.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = (next + period).max(Instant::now());
                    if tx.is_closed() {
                        return Ok(());
                    }
                    if s.paused.load(Ordering::SeqCst) {
                        s.paused_ticks.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let bps = s.bitrate.swap(0, Ordering::SeqCst);
                    if bps != 0 {
                        pipe.set_bitrate(bps)?;
                    }
                    if s.key_frame.swap(false, Ordering::SeqCst) {
                        pipe.force_key_frame();
                    }
                    let frame = source.capture()?;
                    s.captured.fetch_add(1, Ordering::SeqCst);
                    let Some(out) = pipe.push(&frame)? else {
                        if !frame.changed {
                            s.unchanged.fetch_add(1, Ordering::SeqCst);
                        }
                        continue;
                    };
                    let len = out.data.len() as u64;
                    match tx.try_send(out) {
                        Ok(()) => {
                            s.sent.fetch_add(1, Ordering::SeqCst);
                            s.bytes.fetch_add(len, Ordering::SeqCst);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            s.dropped.fetch_add(1, Ordering::SeqCst);
                            pipe.force_key_frame();
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
                Ok(())
            })
            .map_err(StreamError::Spawn)?;
        Ok((
            Self {
                handle,
                thread: Some(thread),
            },
            rx,
        ))
    }

    pub fn handle(&self) -> StreamHandle {
        self.handle.clone()
    }

    /// Stops the thread and returns why it ended, if by an error.
    pub fn stop(mut self) -> Result<(), StreamError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), StreamError> {
        self.handle.0.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            // The thread panicked: propagate, as a panic there is a bug.
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => Ok(()),
        }
    }
}

impl Drop for ScreenStream {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            tracing::warn!(error = %e, "screen stream ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::SyntheticScreen;
    use crate::media::source::{CaptureConfig, SyntheticSource};

    fn source(moving: bool) -> Box<dyn ScreenSource> {
        let screen = SyntheticScreen {
            width: 160,
            height: 120,
            ..Default::default()
        };
        let config = CaptureConfig {
            fps: 200,
            scale: 1.0,
        };
        Box::new(SyntheticSource::new(screen, config, moving))
    }

    /// Spins (yielding) until `cond` holds for the stream's counters.
    async fn until(h: &StreamHandle, cond: impl Fn(&StreamStats) -> bool) -> StreamStats {
        loop {
            let s = h.stats();
            if cond(&s) {
                return s;
            }
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
    }

    #[tokio::test]
    async fn frames_flow_key_first_and_nothing_while_paused() {
        let (stream, mut rx) =
            ScreenStream::start(source(true), EncoderSettings::default(), 4).unwrap();
        let h = stream.handle();
        assert!(rx.recv().await.unwrap().key_frame);
        assert!(!rx.recv().await.unwrap().key_frame);

        h.pause();
        // Two paused ticks: any capture that was in flight at pause() has finished.
        let t = until(&h, |s| s.paused_ticks >= 2).await.paused_ticks;
        let paused = h.stats();
        let later = until(&h, |s| s.paused_ticks >= t + 5).await;
        assert_eq!(later.captured, paused.captured, "captured while paused");
        assert_eq!(later.sent, paused.sent, "sent while paused");
        while rx.try_recv().is_ok() {}

        h.resume();
        assert!(
            rx.recv().await.unwrap().key_frame,
            "first frame after resume"
        );
        h.set_bitrate(500_000);
        h.force_key_frame();
        let mut saw_key = false;
        for _ in 0..3 {
            saw_key |= rx.recv().await.unwrap().key_frame;
        }
        assert!(saw_key);
        stream.stop().unwrap();
    }

    #[tokio::test]
    async fn a_still_screen_sends_one_key_frame() {
        let (stream, mut rx) =
            ScreenStream::start(source(false), EncoderSettings::default(), 4).unwrap();
        assert!(rx.recv().await.unwrap().key_frame);
        let h = stream.handle();
        until(&h, |s| s.unchanged >= 5).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(h.stats().sent, 1);
        drop(stream);
        assert!(
            rx.recv().await.is_none(),
            "receiver ends when the stream is dropped"
        );
    }
}
