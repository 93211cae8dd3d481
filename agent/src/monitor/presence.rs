//! ACTIVE/IDLE presence: how long since the last keyboard or pointer input
//! ([`IdleSource`]; on X11 the MIT-SCREEN-SAVER extension's idle time), and the
//! I/O-free [`IdleTracker`] that turns those readings into presence events.

use std::time::Duration;

use kakehashi_proto::pb;

/// The default idle threshold: no input for five minutes is IDLE.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(300);
/// The default pause between two idle readings.
pub const DEFAULT_IDLE_POLL: Duration = Duration::from_secs(10);

/// Something that knows how long the user has not touched keyboard or pointer.
/// Implementations may block briefly (one round trip to a display server).
pub trait IdleSource: Send {
    /// The time since the last input; `None` when it cannot be read now (the reason
    /// is the implementation's to log).
    fn idle(&mut self) -> Option<Duration>;
}

/// Turns idle readings into presence changes: IDLE once the idle time reaches the
/// threshold, ACTIVE at the first reading below it afterwards. The first reading only
/// sets the state when it is idle (the monitor's ONLINE already says "here").
#[derive(Debug, Clone)]
pub struct IdleTracker {
    threshold: Duration,
    idle: bool,
    /// The longest idle time seen in the current idle period.
    longest: Duration,
}

impl IdleTracker {
    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold: threshold.max(Duration::from_secs(1)),
            idle: false,
            longest: Duration::ZERO,
        }
    }

    /// One reading; returns the presence to record, if the state changed: IDLE with
    /// the idle time so far, or ACTIVE with how long the idle period lasted.
    pub fn observe(&mut self, idle_for: Duration) -> Option<(pb::PresenceState, u32)> {
        let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        if self.idle {
            if idle_for >= self.threshold && idle_for >= self.longest {
                self.longest = idle_for;
                return None;
            }
            // Below the threshold, or the idle clock restarted (input between two
            // readings): there was input.
            self.idle = false;
            return Some((pb::PresenceState::Active, secs(self.longest)));
        }
        if idle_for >= self.threshold {
            self.idle = true;
            self.longest = idle_for;
            return Some((pb::PresenceState::Idle, secs(idle_for)));
        }
        None
    }
}

#[cfg(feature = "media")]
pub use x11::X11Idle;

#[cfg(feature = "media")]
mod x11 {
    use std::time::Duration;

    use tracing::warn;
    use x11rb::connection::{Connection, RequestConnection};
    use x11rb::protocol::screensaver::{self, ConnectionExt as _};
    use x11rb::rust_connection::RustConnection;

    use super::IdleSource;

    /// The X server's input idle time (MIT-SCREEN-SAVER `QueryInfo`). The connection
    /// is opened on first use and again after a failure.
    pub struct X11Idle {
        display: Option<String>,
        conn: Option<(RustConnection, u32)>,
        warned: bool,
    }

    impl std::fmt::Debug for X11Idle {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("X11Idle")
                .field("display", &self.display)
                .field("connected", &self.conn.is_some())
                .finish()
        }
    }

    impl X11Idle {
        /// Reads `display` (`None`: `$DISPLAY`). Nothing is opened yet.
        pub fn new(display: Option<String>) -> Self {
            Self {
                display,
                conn: None,
                warned: false,
            }
        }

        fn read(&mut self) -> Result<Duration, String> {
            if self.conn.is_none() {
                let (conn, screen) =
                    x11rb::connect(self.display.as_deref()).map_err(|e| e.to_string())?;
                if conn
                    .extension_information(screensaver::X11_EXTENSION_NAME)
                    .map_err(|e| e.to_string())?
                    .is_none()
                {
                    return Err("the X server has no MIT-SCREEN-SAVER extension".into());
                }
                let root = conn
                    .setup()
                    .roots
                    .get(screen)
                    .map(|s| s.root)
                    .ok_or("the X server has no such screen")?;
                self.conn = Some((conn, root));
            }
            let Some((conn, root)) = &self.conn else {
                return Err("not connected".into());
            };
            let reply = conn
                .screensaver_query_info(*root)
                .map_err(|e| e.to_string())
                .and_then(|c| c.reply().map_err(|e| e.to_string()));
            match reply {
                Ok(r) => Ok(Duration::from_millis(u64::from(r.ms_since_user_input))),
                Err(e) => {
                    self.conn = None;
                    Err(e)
                }
            }
        }
    }

    impl IdleSource for X11Idle {
        fn idle(&mut self) -> Option<Duration> {
            match self.read() {
                Ok(d) => {
                    self.warned = false;
                    Some(d)
                }
                Err(e) => {
                    // Once per outage, not every poll.
                    if !self.warned {
                        warn!(display = ?self.display, error = %e, "cannot read the input idle time; no ACTIVE/IDLE presence until it can");
                        self.warned = true;
                    }
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn idle_after_the_threshold_and_active_at_the_next_input() {
        let mut t = IdleTracker::new(S(300));
        assert_eq!(t.observe(S(10)), None);
        assert_eq!(t.observe(S(299)), None);
        assert_eq!(t.observe(S(300)), Some((pb::PresenceState::Idle, 300)));
        assert_eq!(t.observe(S(900)), None);
        assert_eq!(t.observe(S(2)), Some((pb::PresenceState::Active, 900)));
        assert_eq!(t.observe(S(5)), None);
    }

    #[test]
    fn input_between_two_readings_of_a_long_idle_is_seen() {
        let mut t = IdleTracker::new(S(60));
        assert_eq!(t.observe(S(600)), Some((pb::PresenceState::Idle, 600)));
        // Someone typed once and left again: the idle clock restarted past the
        // threshold.
        assert_eq!(t.observe(S(70)), Some((pb::PresenceState::Active, 600)));
        assert_eq!(t.observe(S(80)), Some((pb::PresenceState::Idle, 80)));
    }

    #[cfg(feature = "media")]
    #[test]
    fn the_x11_idle_time_reads_from_xvfb() {
        use crate::media::xvfb::Xvfb;
        let Some(x) = Xvfb::start_or_skip(320, 240).expect("Xvfb") else {
            return;
        };
        let mut idle = X11Idle::new(Some(x.display().to_owned()));
        assert!(idle.idle().is_some(), "Xvfb has MIT-SCREEN-SAVER");
        drop(x);
        assert_eq!(idle.idle(), None);
    }
}
