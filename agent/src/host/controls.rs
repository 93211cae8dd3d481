//! What the customer does during a session beyond answering questions: revoke,
//! pause and resume, and what the session's clock does: time warnings and the idle
//! timeout. Also what a grant releases (the system information).

use std::sync::atomic::Ordering;
use std::time::Duration;

use kakehashi_proto::{Channel, Permissions, pb};
use prost::Message;
use tracing::{debug, info, warn};

use super::{Command, Driver, HostEvent, Report};

impl Driver {
    /// Revoke, pause and resume from the application.
    pub(super) async fn on_command(&mut self, command: Command) {
        match command {
            Command::Revoke(perms, reply) => {
                let perms = perms.permissions();
                let (before, wire) = {
                    let mut state = self.shared.state();
                    let before = state.granted;
                    state.granted = before.without(perms);
                    (before, state.wire_grant())
                };
                self.shared.screen_state_changed();
                let revoked = before & perms;
                if revoked.contains(Permissions::RECORDING) {
                    self.recording_changed(false);
                }
                self.send_grant(wire).await;
                if revoked.contains(Permissions::FILE_TRANSFER) {
                    self.stop_files("file transfer was revoked").await;
                }
                if !revoked.is_empty() {
                    info!(%revoked, granted = %wire.permissions(), "customer revoked");
                    self.report_activity(pb::EventKind::ConsentRevoked, revoked);
                    self.tell_viewer(pb::control_message::Kind::ConsentAnswer(
                        pb::ConsentAnswer {
                            granted: wire.permissions().bits(),
                            denied: 0,
                            revoked: revoked.bits(),
                        },
                    ))
                    .await;
                    self.emit(HostEvent::GrantsChanged(wire.permissions()))
                        .await;
                }
                let _ = reply.send(wire);
            }
            Command::Pause(paused, reply) => {
                let (changed, wire) = {
                    let mut state = self.shared.state();
                    let changed = state.paused != paused;
                    state.paused = paused;
                    (changed, state.wire_grant())
                };
                self.shared.screen_state_changed();
                if !paused {
                    // Whatever the viewer saw last is stale.
                    self.shared.viewer_needs_key.store(true, Ordering::Release);
                    self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
                }
                self.send_grant(wire).await;
                if changed {
                    info!(paused, "sharing paused or resumed by the customer");
                    let kind = if paused {
                        pb::EventKind::Paused
                    } else {
                        pb::EventKind::Resumed
                    };
                    self.report_activity(kind, Permissions::NONE);
                }
                let _ = reply.send(wire);
            }
            Command::File(id, accept) => self.decide_file(id, accept).await,
        }
    }

    /// Sends a control message to the current viewer; best effort (the grant the
    /// relay holds is what counts).
    pub(super) async fn tell_viewer(&self, kind: pb::control_message::Kind) {
        let peer = {
            let state = self.shared.state();
            state.current.and_then(|id| state.viewers.get(&id)).cloned()
        };
        let Some(peer) = peer else {
            return;
        };
        let msg = pb::ControlMessage { kind: Some(kind) };
        if let Err(e) = self
            .conduit
            .send(
                &peer.keys,
                peer.participant_id,
                Channel::Control,
                0,
                &msg.encode_to_vec(),
            )
            .await
        {
            debug!(error = %e, "control message to the viewer not sent");
        }
    }

    /// What a new grant releases: the view-only system summary with VIEW, the whole
    /// record with SYSTEM_INFO. Collected now, sent once per grant.
    pub(super) async fn on_granted(&mut self, added: Permissions) {
        if added.contains(Permissions::RECORDING) {
            self.recording_changed(true);
        }
        if added.contains(Permissions::SYSTEM_INFO) {
            let peer = {
                let state = self.shared.state();
                state.current.and_then(|id| state.viewers.get(&id)).cloned()
            };
            if let Some(peer) = peer {
                let info = crate::sysinfo::collect();
                if let Err(e) = self
                    .conduit
                    .send(
                        &peer.keys,
                        peer.participant_id,
                        Channel::SystemInfo,
                        0,
                        &info.encode_to_vec(),
                    )
                    .await
                {
                    warn!(error = %e, "system information not sent");
                }
            }
        }
        if added.contains(Permissions::VIEW) {
            let summary = crate::sysinfo::summary();
            self.tell_viewer(pb::control_message::Kind::SystemSummary(summary))
                .await;
        }
    }

    /// Time warnings before the session's limit, and the idle timeout.
    pub(super) async fn check_time(&mut self) {
        let deadline = self.shared.joined.claims.session_deadline;
        let remaining = deadline.saturating_sub(kakehashi_proto::unix_now());
        let crossed: Vec<Duration> = self
            .options
            .time_warnings
            .iter()
            .copied()
            .filter(|w| !self.warned.contains(w) && remaining <= w.as_secs())
            .collect();
        if !crossed.is_empty() && remaining > 0 {
            self.warned.extend(crossed);
            info!(remaining, "time limit warning");
            self.queue_report(Report::Activity {
                kind: pb::EventKind::TimeWarning,
                permissions: Permissions::NONE,
                remaining_secs: u32::try_from(remaining).unwrap_or(u32::MAX),
                detail: String::new(),
            });
            self.emit(HostEvent::TimeWarning {
                remaining_secs: remaining,
            })
            .await;
        }
        if let Some(limit) = self.options.idle_timeout
            && self.idle_hangup.is_none()
            && self.shared.idle_for() >= limit
        {
            let detail = format!(
                "idle timeout: nothing was said, pointed at or typed for {} s",
                limit.as_secs()
            );
            info!(%detail, "ending the session");
            // Recorded first, so the coordinator's end says why; the relay then ends
            // the session for everyone.
            self.queue_report(Report::End {
                reason: pb::EndReason::IdleTimeout,
                detail: detail.clone(),
            });
            let sig = pb::signal::Kind::Hangup(pb::Hangup {
                reason: pb::EndReason::IdleTimeout as i32,
                detail: detail.clone(),
            });
            if let Err(e) = self.conduit.tx().send_signal(sig).await {
                warn!(error = %e, "could not hang up for idleness");
            }
            self.idle_hangup = Some(detail);
        }
    }
}
