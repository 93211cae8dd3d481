//! The open-loop schedule: one OS thread owns every session's frame clock and hands
//! each frame's *intended* send time to the session's async sender.
//!
//! Why a thread: tokio's timers tick in 1 ms steps, far coarser than the latencies being
//! measured. Why open-loop: a sender that waits for the previous frame before scheduling
//! the next hides exactly the stalls a load test exists to find (coordinated omission).
//! Here the schedule never waits for anyone; a sender that falls behind sends late and
//! the lateness is part of the measured latency, because latency is measured from the
//! intended time carried inside the frame.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

/// The process-wide clock every intended and receipt time is read from, so both ends of
/// a measurement (same process) share one monotonic clock with no skew.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since [`epoch`].
pub fn now_us() -> u64 {
    micros_since_epoch(Instant::now())
}

fn micros_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_micros()).unwrap_or(u64::MAX)
}

/// One frame's slot in the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// When the frame should have been sent, µs since [`epoch`].
    pub intended_us: u64,
    /// Frame number within its session, from 0.
    pub index: u64,
    /// Inside the measurement window (warm-up and ramp frames are not counted).
    pub counted: bool,
}

/// Ticks a session may have queued before the schedule counts further ones as skipped
/// by the generator: about two seconds at 30 fps. The skip is reported, never hidden.
pub const TICK_QUEUE: usize = 64;

enum Cmd {
    Add {
        start: Instant,
        period: Duration,
        tx: mpsc::Sender<Tick>,
    },
    Window {
        start: Instant,
        end: Instant,
    },
}

/// A running schedule thread. Dropping it stops the thread.
pub struct Pacer {
    cmd: Option<std_mpsc::Sender<Cmd>>,
    thread: Option<JoinHandle<()>>,
    skipped: Arc<AtomicU64>,
    lateness: Arc<Mutex<Histogram<u64>>>,
}

impl Pacer {
    pub fn start() -> Result<Self> {
        let (cmd, rx) = std_mpsc::channel();
        let skipped = Arc::new(AtomicU64::new(0));
        let s = skipped.clone();
        let lateness = Arc::new(Mutex::new(super::stats::histogram()));
        let l = lateness.clone();
        let _ = epoch();
        let thread = std::thread::Builder::new()
            .name("kk-pacer".into())
            .spawn(move || run(rx, s, l))
            .context("cannot start the pacer thread")?;
        Ok(Self {
            cmd: Some(cmd),
            thread: Some(thread),
            skipped,
            lateness,
        })
    }

    /// Adds a session whose first frame is due now; returns its tick receiver. The
    /// session stops getting ticks when the window ends or when it drops the receiver.
    pub fn add(&self, period: Duration) -> mpsc::Receiver<Tick> {
        let (tx, rx) = mpsc::channel(TICK_QUEUE);
        if let Some(cmd) = &self.cmd {
            // The thread only goes away with `self`, so this cannot fail while we hold it.
            let _ = cmd.send(Cmd::Add {
                start: Instant::now(),
                period,
                tx,
            });
        }
        rx
    }

    /// Frames due in `[start, end)` are counted; none are scheduled at or after `end`.
    pub fn set_window(&self, start: Instant, end: Instant) {
        if let Some(cmd) = &self.cmd {
            let _ = cmd.send(Cmd::Window { start, end });
        }
    }

    /// Counted frames the generator could not hand to their sender in time (its queue of
    /// [`TICK_QUEUE`] was full): the load generator itself was the bottleneck.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// How late the schedule thread handed out counted ticks (µs after their intended
    /// time): the generator's own contribution to every latency sample, on both paths.
    pub fn lateness(&self) -> Histogram<u64> {
        self.lateness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        // Closing the command channel tells the thread to stop.
        self.cmd = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Slot {
    tx: mpsc::Sender<Tick>,
    period: Duration,
    index: u64,
}

fn run(rx: std_mpsc::Receiver<Cmd>, skipped: Arc<AtomicU64>, lateness: Arc<Mutex<Histogram<u64>>>) {
    // Ask the kernel for 1 ns timer slack (default 50 µs) so timed waits wake on time.
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and touches only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    // Best effort: a real-time priority keeps the schedule on time on a busy machine
    // (it needs CAP_SYS_NICE; without it the thread stays at normal priority and its
    // lateness, reported, says how much that cost). The thread only ever blocks or does
    // microseconds of work per tick, so it cannot starve anything.
    // SAFETY: sched_setscheduler with pid 0 changes this thread only; `param` is ours.
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
    }
    let mut slots: Vec<Option<Slot>> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut window: Option<(Instant, Instant)> = None;
    loop {
        let now = Instant::now();
        let wait = heap
            .peek()
            .map(|Reverse((due, _))| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50));
        let cmd = if wait.is_zero() {
            rx.try_recv().map_err(|e| match e {
                std_mpsc::TryRecvError::Empty => std_mpsc::RecvTimeoutError::Timeout,
                std_mpsc::TryRecvError::Disconnected => std_mpsc::RecvTimeoutError::Disconnected,
            })
        } else {
            rx.recv_timeout(wait)
        };
        match cmd {
            Ok(Cmd::Add { start, period, tx }) => {
                slots.push(Some(Slot {
                    tx,
                    period,
                    index: 0,
                }));
                heap.push(Reverse((start, slots.len() - 1)));
                continue;
            }
            Ok(Cmd::Window { start, end }) => {
                window = Some((start, end));
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        while let Some(&Reverse((due, i))) = heap.peek() {
            if due > now {
                break;
            }
            heap.pop();
            let Some(slot) = slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            if window.is_some_and(|(_, end)| due >= end) {
                // Past the window: the session gets no more frames; dropping its sender
                // tells it so.
                slots[i] = None;
                continue;
            }
            let counted = window.is_some_and(|(start, _)| due >= start);
            if counted {
                let late = now.saturating_duration_since(due).as_micros() as u64;
                lateness
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .saturating_record(late.max(1));
            }
            let tick = Tick {
                intended_us: micros_since_epoch(due),
                index: slot.index,
                counted,
            };
            slot.index += 1;
            match slot.tx.try_send(tick) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if counted {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    slots[i] = None;
                    continue;
                }
            }
            heap.push(Reverse((due + slot.period, i)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_follow_the_schedule_and_stop_at_the_window_end() {
        let pacer = Pacer::start().expect("thread");
        let mut rx = pacer.add(Duration::from_millis(5));
        let start = Instant::now();
        pacer.set_window(start, start + Duration::from_millis(100));
        let (lo, hi) = (
            micros_since_epoch(start),
            micros_since_epoch(start) + 100_000,
        );
        let mut last = None;
        let mut counted = 0;
        // The stream ends by itself: the window's end stops the session's schedule.
        while let Some(t) = rx.recv().await {
            if let Some(prev) = last {
                // Intended times are exactly one period apart, however late delivery is.
                assert_eq!(t.intended_us - prev, 5_000);
            }
            if t.counted {
                assert!(t.intended_us >= lo && t.intended_us <= hi);
                counted += 1;
            }
            last = Some(t.intended_us);
        }
        assert!(counted > 0);
    }
}
