//! The viewer: the operator's agent. It sees the screen once the customer grants VIEW,
//! and is polite by default: it sends no input unless CONTROL is granted in a control
//! session (the host and relay refuse it anyway).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Frame, Mode, Permissions, pb};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::conduit::{Conduit, Via};
use crate::crypto::{GroupKey, Keypair, Side};
use crate::error::{AgentError, connect_coordinator};
use crate::host::{ACK_INTERVAL, Counters, Follow, RETRANSMIT_AFTER, now_ms, reason_of};
use crate::link::{LinkError, LinkReceiver, RelayLink};
use crate::peer::{self, Joined, Peer};
use crate::reliable::{RecvTracker, Verdict};
use crate::resume::{Failure, Moved, Resumer};

mod files;
#[cfg(feature = "media")]
mod png;
#[cfg(feature = "media")]
pub mod window;

#[cfg(feature = "media")]
pub use png::{PngOutput, PngOutputError};
#[cfg(feature = "media")]
pub use window::{Status as WindowStatus, ViewerWindow, WindowError, WindowEvent};

const EVENT_QUEUE: usize = 1024;
const CLOSE_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default)]
pub struct ViewerConfig {
    /// Permissions to ask the customer for as soon as the host is verified, with a note.
    /// The host asks for VIEW by itself.
    pub request_on_join: Option<(Permissions, String)>,
    /// Join as a supervisor: watch only, once the customer admits this viewer. A
    /// supervisor sends nothing to the customer (no requests, input, chat or files).
    pub supervisor: bool,
    /// Join as a recorder: like a supervisor, but admitted by the customer's RECORDING
    /// grant (the session must allow recording). Not together with `supervisor`.
    pub recorder: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ViewerEvent {
    /// The host's token verified; compare `sas` with the customer's.
    PeerJoined {
        sas: String,
    },
    /// A supervisor's (or recorder's) first group key arrived: the customer let it
    /// watch (or record).
    Admitted,
    Screen {
        frame: pb::ScreenFrame,
        seq: u64,
        /// Now minus the host's send timestamp (clocks of two machines: may be skewed).
        latency_us: i64,
    },
    Chat(String),
    /// The permissions the customer has granted now (never the pause flag).
    GrantsChanged(Permissions),
    /// The customer paused sharing: no screen until [`ViewerEvent::SharingResumed`].
    SharingPaused,
    SharingResumed,
    /// The customer's answer to a request, or a revoke, end to end from the host.
    ConsentAnswer {
        granted: Permissions,
        denied: Permissions,
        revoked: Permissions,
    },
    /// The customer's system information: the view-only subset (`full == false`: OS,
    /// OS version, browser, browser version) once VIEW is granted, the whole record
    /// once SYSTEM_INFO is.
    SystemInfo {
        // Boxed: the record is large and the other events are small.
        info: Box<pb::SystemInfo>,
        full: bool,
    },
    /// The session reaches its time limit in `remaining_secs` (5 and 1 minutes before).
    TimeWarning {
        remaining_secs: u64,
    },
    /// A file from the customer arrived whole, its SHA-256 checked. Held in memory only.
    FileReceived {
        transfer_id: u64,
        name: String,
        data: Vec<u8>,
    },
    /// An incoming file stopped: cancelled, damaged, or file transfer revoked.
    FileCancelled {
        transfer_id: u64,
        reason: String,
    },
    /// The session moved to relay `relay_id` after the previous one was lost or
    /// drained, `after_ms` after the loss was noticed. Nothing reliable was lost.
    Resumed {
        relay_id: String,
        after_ms: u64,
    },
    Ended {
        reason: pb::EndReason,
        detail: String,
    },
}

struct State {
    /// What the customer granted, as this viewer last heard it. Unchanged by a relay
    /// move: the new relay learns it again from the host.
    granted: Permissions,
    /// The customer paused sharing (the relay's grant carries the pause flag).
    paused: bool,
    /// The host, once verified. Kept when it leaves: after a relay move it comes back
    /// with the same key, and what is sent meanwhile waits for it.
    host: Option<Peer>,
    /// The key screen frames are sealed with, and the one before it (frames already on
    /// their way when the host replaced it).
    group: Option<GroupKey>,
    previous_group: Option<GroupKey>,
    ended: bool,
}

struct Shared {
    joined: Joined,
    mode: Mode,
    state: Mutex<State>,
    /// This participant's newest token (each resume brings a fresh one).
    token: Mutex<Vec<u8>>,
    undecryptable: AtomicU64,
    /// Frames the host sealed for another viewer (its group key envelope, or what
    /// the host tells the operator while this is a supervisor).
    foreign: AtomicU64,
    unread_screens: AtomicU64,
    counters: Counters,
    /// This viewer's files on their way to the host.
    outgoing: crate::files::Outgoing,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn token(&self) -> Vec<u8> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A joined viewer session. Dropping it leaves the session.
pub struct Viewer {
    shared: Arc<Shared>,
    participant_id: u64,
    conduit: Arc<Conduit>,
    events: mpsc::Receiver<ViewerEvent>,
    cancel: CancellationToken,
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for Viewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewer")
            .field("session", &self.shared.joined.session_id)
            .field("participant_id", &self.participant_id)
            .finish()
    }
}

impl Viewer {
    /// Joins `session_id` with the operator ticket from `CreateSession`, through
    /// `AgentService.JoinAsOperator`, and attaches to the relay.
    pub async fn join(
        coordinator_url: &str,
        session_id: &str,
        ticket: &str,
        config: ViewerConfig,
    ) -> Result<Viewer, AgentError> {
        let me = Keypair::generate()?;
        let channel = connect_coordinator(coordinator_url).await?;
        let mut agent = AgentServiceClient::new(channel);
        let resp = agent
            .join_as_operator(pb::JoinAsOperatorRequest {
                session_id: session_id.to_owned(),
                operator_ticket: ticket.to_owned(),
                public_key: me.public_bytes().to_vec(),
                supervisor: config.supervisor,
                recorder: config.recorder,
            })
            .await
            .map_err(|s| AgentError::rpc("JoinAsOperator", s))?
            .into_inner();
        let role = match (config.supervisor, config.recorder) {
            (_, true) => Role::Recorder,
            (true, false) => Role::Supervisor,
            (false, false) => Role::Viewer,
        };
        let joined = Joined::from_response("JoinAsOperator", resp, &me, role)?;
        let (link, welcome) =
            RelayLink::connect(&joined.relay, &joined.token, &joined.session_id).await?;
        info!(session = %joined.session_id, participant = welcome.participant_id, "viewer attached");
        Ok(Self::start(joined, me, link, welcome, config, Some(agent)))
    }

    /// Starts a viewer on an attached link. `coordinator` answers `ResumeSession`;
    /// without it the session ends with its relay.
    #[doc(hidden)]
    // Public so integration tests can run a viewer against a test relay.
    pub fn start(
        joined: Joined,
        me: Keypair,
        link: RelayLink,
        welcome: pb::Welcome,
        config: ViewerConfig,
        coordinator: Option<AgentServiceClient<tonic::transport::Channel>>,
    ) -> Viewer {
        let participant_id = link.participant_id();
        let (tx, rx) = link.into_parts();
        let mode = joined.claims.mode;
        let role = joined.claims.role;
        let conduit = Arc::new(Conduit::new(tx, role, mode));
        let relay_id = joined.relay.relay_id.clone();
        let shared = Arc::new(Shared {
            token: Mutex::new(joined.token.clone()),
            joined,
            mode,
            state: Mutex::new(State {
                granted: Permissions::from_bits(welcome.granted)
                    .unwrap_or(Permissions::NONE)
                    .permissions(),
                paused: Permissions::from_bits(welcome.granted).is_some_and(Permissions::is_paused),
                host: None,
                group: None,
                previous_group: None,
                ended: false,
            }),
            undecryptable: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            unread_screens: AtomicU64::new(0),
            counters: Counters::default(),
            outgoing: crate::files::Outgoing::default(),
        });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let cancel = CancellationToken::new();
        let driver = Driver {
            shared: shared.clone(),
            me,
            conduit: conduit.clone(),
            events: events_tx,
            // A supervisor asks for nothing: the customer is asked about it instead.
            request_on_join: config.request_on_join.filter(|_| role == Role::Viewer),
            resumer: Resumer::new(coordinator, role),
            relay_id,
            tracker: RecvTracker::default(),
            follow: None,
            replays: JoinSet::new(),
            screen_needs_key: false,
            warned: Vec::new(),
            incoming: crate::files::Receiver::default(),
        };
        let mut tasks = JoinSet::new();
        let span = tracing::info_span!(
            "viewer",
            session = %shared.joined.session_id,
            participant = participant_id
        );
        tasks.spawn(driver.run(rx, welcome, cancel.clone()).instrument(span));
        Viewer {
            shared,
            participant_id,
            conduit,
            events,
            cancel,
            _tasks: tasks,
        }
    }

    pub fn sas(&self) -> Option<String> {
        self.shared
            .state()
            .host
            .as_ref()
            .map(|p| p.sas().to_owned())
    }

    pub fn session(&self) -> &pb::Session {
        &self.shared.joined.session
    }

    pub fn participant_id(&self) -> u64 {
        self.participant_id
    }

    pub fn granted(&self) -> Permissions {
        self.shared.state().granted
    }

    /// Whether the customer has paused sharing.
    pub fn is_paused(&self) -> bool {
        self.shared.state().paused
    }

    /// Frames from the host that failed to decrypt (counted, never fatal).
    /// Frames the host sealed for another viewer and this one skipped.
    pub fn frames_for_others(&self) -> u64 {
        self.shared.foreign.load(Ordering::Relaxed)
    }

    /// Whether this viewer joined as a supervisor (watch only).
    pub fn is_supervisor(&self) -> bool {
        self.shared.joined.claims.role == Role::Supervisor
    }

    /// Whether this viewer joined as a recorder.
    pub fn is_recorder(&self) -> bool {
        self.shared.joined.claims.role == Role::Recorder
    }

    pub fn undecryptable_frames(&self) -> u64 {
        self.shared.undecryptable.load(Ordering::Relaxed)
    }

    /// Screen frames dropped because the application had 1024 events unread, and the
    /// deltas after them up to the next key frame.
    pub fn unread_screen_frames(&self) -> u64 {
        self.shared.unread_screens.load(Ordering::Relaxed)
    }

    /// Reliable frames from the host received again after a relay move and dropped
    /// (they had been delivered already).
    pub fn duplicate_frames(&self) -> u64 {
        self.shared.counters.duplicates.load(Ordering::Relaxed)
    }

    /// Reliable frames from the host that arrived ahead of a missing one and were
    /// dropped until the replay filled the gap (a protocol error if it persists).
    pub fn out_of_order_frames(&self) -> u64 {
        self.shared.counters.out_of_order.load(Ordering::Relaxed)
    }

    /// How many times the session moved to another relay.
    pub fn resumes(&self) -> u64 {
        self.shared.counters.resumes.load(Ordering::Relaxed)
    }

    /// Frames sent on `channel` that the host has not acknowledged yet.
    pub fn unacked(&self, channel: Channel) -> usize {
        self.conduit.unacked(channel)
    }

    /// The next event; `None` after the session ended and every event was read.
    pub async fn next_event(&mut self) -> Option<ViewerEvent> {
        self.events.recv().await
    }

    pub fn events(&mut self) -> &mut mpsc::Receiver<ViewerEvent> {
        &mut self.events
    }

    /// The host, for what only the operator may send (a supervisor only watches).
    fn talk_to_host(&self) -> Result<Peer, AgentError> {
        if self.shared.joined.claims.role != Role::Viewer {
            return Err(AgentError::WatchOnly);
        }
        self.host_peer()
    }

    fn host_peer(&self) -> Result<Peer, AgentError> {
        let state = self.shared.state();
        if state.ended {
            return Err(AgentError::Ended);
        }
        state.host.clone().ok_or(AgentError::NoPeer)
    }

    /// Asks the customer, end to end, for `perms`.
    pub async fn request_permissions(
        &self,
        perms: Permissions,
        note: &str,
    ) -> Result<(), AgentError> {
        let peer = self.talk_to_host()?;
        send_request(&self.conduit, &peer, perms, note).await
    }

    /// Sends input if CONTROL is granted in a control session; otherwise sends nothing
    /// and returns `Ok(false)`.
    pub async fn send_input(&self, event: pb::InputEvent) -> Result<bool, AgentError> {
        if may_forward(
            Channel::Input,
            self.shared.joined.claims.role,
            self.shared.mode,
            self.granted(),
        )
        .is_err()
        {
            return Ok(false);
        }
        self.input(event, false).await?;
        Ok(true)
    }

    /// Sends input whatever is granted.
    #[doc(hidden)]
    // Exists for tests that play a modified viewer, to prove host and relay refuse it.
    pub async fn send_input_unchecked(&self, event: pb::InputEvent) -> Result<(), AgentError> {
        self.input(event, true).await
    }

    async fn input(&self, event: pb::InputEvent, ungated: bool) -> Result<(), AgentError> {
        let peer = self.host_peer()?;
        self.conduit
            .send_with(
                &peer.keys,
                peer.participant_id,
                Channel::Input,
                0,
                &event.encode_to_vec(),
                if ungated { Via::Ungated } else { Via::Any },
            )
            .await
    }

    pub async fn send_chat(&self, text: &str) -> Result<(), AgentError> {
        let peer = self.talk_to_host()?;
        let msg = pb::ChatMessage {
            text: text.to_owned(),
            sent_at_unix_ms: now_ms(),
        };
        self.conduit
            .send(
                &peer.keys,
                peer.participant_id,
                Channel::Chat,
                0,
                &msg.encode_to_vec(),
            )
            .await
    }

    /// Sends a pointer hint ("指差し"); `Ok(false)` without a VIEW grant.
    pub async fn send_pointer(&self, hint: pb::PointerHint) -> Result<bool, AgentError> {
        if may_forward(
            Channel::Pointer,
            self.shared.joined.claims.role,
            self.shared.mode,
            self.granted(),
        )
        .is_err()
        {
            return Ok(false);
        }
        let peer = self.host_peer()?;
        self.conduit
            .send(
                &peer.keys,
                peer.participant_id,
                Channel::Pointer,
                0,
                &hint.encode_to_vec(),
            )
            .await?;
        Ok(true)
    }

    /// Sends `data` to the customer as file `name`; the customer approves each file.
    /// Returns once the host has checked its SHA-256. Needs the file-transfer grant; a
    /// revoke stops it between two chunks (and the relay refuses the rest).
    pub async fn send_file(&self, name: &str, data: &[u8]) -> Result<(), crate::files::FileError> {
        let peer = self
            .talk_to_host()
            .map_err(|_| crate::files::FileError::Ended)?;
        let shared = self.shared.clone();
        crate::files::send_file(
            &self.conduit,
            &peer,
            &self.shared.outgoing,
            move || {
                let s = shared.state();
                !s.ended && s.granted.contains(Permissions::FILE_TRANSFER)
            },
            name,
            data,
        )
        .await
    }

    /// Sends file chunks whatever is granted and without an offer or approval.
    #[doc(hidden)]
    // Exists for tests that play a modified viewer, to prove the relay refuses it.
    pub async fn send_file_unchecked(&self, data: &[u8]) -> Result<(), AgentError> {
        let peer = self.host_peer()?;
        let id = crate::files::new_transfer_id();
        for (i, chunk) in data.chunks(crate::files::CHUNK_BYTES).enumerate() {
            let msg = crate::files::message(pb::file_message::Kind::Chunk(pb::FileChunk {
                transfer_id: id,
                offset: (i * crate::files::CHUNK_BYTES) as u64,
                data: chunk.to_vec(),
            }));
            self.conduit
                .send_with(
                    &peer.keys,
                    peer.participant_id,
                    Channel::File,
                    0,
                    &msg.encode_to_vec(),
                    Via::Ungated,
                )
                .await?;
        }
        Ok(())
    }

    /// Shows the customer which keys to press ("keyboard display"); nothing is typed.
    /// Allowed in view-only sessions; `Ok(false)` without a VIEW grant.
    pub async fn send_key_display(&self, keys: &[&str], note: &str) -> Result<bool, AgentError> {
        if !self.granted().contains(Permissions::VIEW) {
            return Ok(false);
        }
        let peer = self.talk_to_host()?;
        let msg = pb::ControlMessage {
            kind: Some(pb::control_message::Kind::KeyDisplay(pb::KeyDisplay {
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                note: note.to_owned(),
            })),
        };
        self.conduit
            .send(
                &peer.keys,
                peer.participant_id,
                Channel::Control,
                0,
                &msg.encode_to_vec(),
            )
            .await?;
        Ok(true)
    }

    /// Ends the session for everyone; `detail` reaches the customer.
    pub async fn hangup(&self, reason: pb::EndReason, detail: &str) -> Result<(), AgentError> {
        crate::host::hangup(&self.conduit.tx(), reason, detail).await
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.conduit.end();
    }
}

async fn send_request(
    conduit: &Conduit,
    peer: &Peer,
    perms: Permissions,
    note: &str,
) -> Result<(), AgentError> {
    let msg = pb::ControlMessage {
        kind: Some(pb::control_message::Kind::PermissionRequest(
            pb::PermissionRequest {
                permissions: perms.bits(),
                note: note.to_owned(),
            },
        )),
    };
    conduit
        .send(
            &peer.keys,
            peer.participant_id,
            Channel::Control,
            0,
            &msg.encode_to_vec(),
        )
        .await
}

struct Driver {
    shared: Arc<Shared>,
    me: Keypair,
    conduit: Arc<Conduit>,
    events: mpsc::Sender<ViewerEvent>,
    request_on_join: Option<(Permissions, String)>,
    resumer: Resumer,
    /// The relay this viewer is attached to now.
    relay_id: String,
    /// What was delivered from the host, for duplicates and acks.
    tracker: RecvTracker,
    /// Asking the coordinator whether the host moved the session elsewhere.
    follow: Option<Follow>,
    // Replays of kept frames: they may wait on flow control while the driver reads on.
    replays: JoinSet<()>,
    /// The application missed a screen frame: deltas wait for the next key frame.
    screen_needs_key: bool,
    /// Time warnings already given.
    warned: Vec<u64>,
    /// Files the customer is sending.
    incoming: crate::files::Receiver,
}

/// Seconds before the time limit at which the viewer warns.
const TIME_WARNINGS: [u64; 2] = [300, 60];

enum Flow {
    Continue,
    Stop,
    /// The relay is gone (or going): resume elsewhere; `reason` ends the session if
    /// that fails.
    Move {
        why: String,
        reason: pb::EndReason,
    },
    Follow,
}

impl Driver {
    async fn run(mut self, mut rx: LinkReceiver, welcome: pb::Welcome, cancel: CancellationToken) {
        let announce = welcome.granted != 0;
        self.on_welcome(welcome).await;
        if announce {
            let g = self.shared.state().granted;
            self.emit(ViewerEvent::GrantsChanged(g)).await;
        }
        let mut ticks = tokio::time::interval(ACK_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let follow_at = self.follow.as_ref().map(|f| f.at);
            let flow = tokio::select! {
                _ = cancel.cancelled() => Flow::Stop,
                sig = rx.signals.recv() => match sig {
                    Some(Ok(kind)) => self.on_signal(kind).await,
                    Some(Err(e)) => self.link_failed(e).await,
                    None => {
                        let tx = self.conduit.tx();
                        let e = match tokio::time::timeout(CLOSE_GRACE, tx.closed()).await {
                            Ok(e) => e,
                            Err(_) => LinkError::SignalStreamClosed,
                        };
                        self.link_failed(e).await
                    }
                },
                Some(frame) = rx.frames.recv() => { self.on_frame(frame).await; Flow::Continue }
                _ = ticks.tick() => { self.tick().await; Flow::Continue }
                _ = tokio::time::sleep_until(follow_at.unwrap_or_else(tokio::time::Instant::now)), if follow_at.is_some() => Flow::Follow,
                Some(_) = self.replays.join_next(), if !self.replays.is_empty() => Flow::Continue,
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => break,
                Flow::Move { why, reason } => match self.resume(&why, reason, &cancel).await {
                    Some(new_rx) => rx = new_rx,
                    None => break,
                },
                Flow::Follow => {
                    if let Some(new_rx) = self.follow().await {
                        rx = new_rx;
                    }
                }
            }
        }
        self.conduit.end();
    }

    async fn emit(&self, ev: ViewerEvent) {
        let _ = self.events.send(ev).await;
    }

    fn spawn_replay(&mut self) {
        self.replays.spawn(self.conduit.clone().replay_opened());
    }

    /// What the relay's Welcome says, on the first attach and after every move.
    async fn on_welcome(&mut self, welcome: pb::Welcome) {
        let relay_granted = Permissions::from_bits(welcome.granted).unwrap_or(Permissions::NONE);
        if self.conduit.set_relay_granted(relay_granted) {
            self.spawn_replay();
        }
        for token in &welcome.peer_tokens {
            self.accept_host(token).await;
        }
    }

    async fn link_failed(&mut self, e: LinkError) -> Flow {
        if e.is_relay_loss() {
            Flow::Move {
                why: e.to_string(),
                reason: e.end_reason(),
            }
        } else {
            self.end_from_link(e).await;
            Flow::Stop
        }
    }

    async fn on_signal(&mut self, kind: pb::signal::Kind) -> Flow {
        use pb::signal::Kind;
        match kind {
            Kind::PeerJoined(p) => self.accept_host(&p.token).await,
            Kind::PeerLeft(p) => {
                let host = self.shared.state().host.as_ref().map(|h| h.participant_id);
                if host == Some(p.participant_id) {
                    info!("host left");
                    let _ = self.conduit.set_present(p.participant_id, false);
                    self.follow = Some(Follow::start());
                }
            }
            Kind::GrantsChanged(g) => {
                let granted = Permissions::from_bits(g.granted).unwrap_or_else(|| {
                    warn!(
                        bits = g.granted,
                        "grant with unknown bits; keeping the known ones"
                    );
                    Permissions::from_bits(g.granted & Permissions::ALL.bits())
                        .unwrap_or(Permissions::NONE)
                });
                if self.conduit.set_relay_granted(granted) {
                    self.spawn_replay();
                }
                let paused = granted.is_paused();
                let granted = granted.permissions();
                let (changed, pause_changed) = {
                    let mut state = self.shared.state();
                    let changed = state.granted != granted;
                    let pause_changed = state.paused != paused;
                    state.granted = granted;
                    state.paused = paused;
                    (changed, pause_changed)
                };
                // After a move the host re-sends the same grant to the new relay: the
                // application saw no change and hears of none.
                if changed {
                    self.emit(ViewerEvent::GrantsChanged(granted)).await;
                }
                if !granted.contains(Permissions::FILE_TRANSFER) {
                    let why = "file transfer was revoked";
                    self.shared.outgoing.cancel_all(why);
                    for (id, _) in self.incoming.clear() {
                        self.emit(ViewerEvent::FileCancelled {
                            transfer_id: id,
                            reason: why.into(),
                        })
                        .await;
                    }
                }
                if pause_changed {
                    self.emit(if paused {
                        ViewerEvent::SharingPaused
                    } else {
                        ViewerEvent::SharingResumed
                    })
                    .await;
                }
            }
            Kind::SessionEnded(e) if reason_of(e.reason) == pb::EndReason::RelayShutdown => {
                return Flow::Move {
                    why: format!("the relay is shutting down: {}", e.detail),
                    reason: pb::EndReason::RelayShutdown,
                };
            }
            Kind::SessionEnded(e) => {
                self.end(reason_of(e.reason), e.detail).await;
                return Flow::Stop;
            }
            Kind::KeyFrameRequest(_) => debug!("key frame request is for the host; ignored"),
            Kind::Drain(d) => {
                return Flow::Move {
                    why: format!("the relay is draining (grace {} ms)", d.grace_ms),
                    reason: pb::EndReason::RelayShutdown,
                };
            }
            other @ (Kind::Hello(_) | Kind::Welcome(_) | Kind::Grant(_) | Kind::Hangup(_)) => {
                warn!(signal = ?other, "relay sent a signal meant for the relay; ignored");
            }
        }
        Flow::Continue
    }

    async fn resume(
        &mut self,
        why: &str,
        reason: pb::EndReason,
        cancel: &CancellationToken,
    ) -> Option<LinkReceiver> {
        let lost_at = Instant::now();
        warn!(relay = %self.relay_id, %why, "lost the relay; resuming the session elsewhere");
        let token = self.shared.token();
        let failed = self.relay_id.clone();
        let result = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = self.resumer.resume(&self.me, &self.shared.joined, &token, &failed) => r,
        };
        match result {
            Ok(moved) => Some(self.adopt(moved, lost_at).await),
            Err(Failure::Refused(detail)) => {
                self.end(pb::EndReason::Unspecified, detail).await;
                None
            }
            Err(Failure::GaveUp(detail)) => {
                self.end(reason, format!("{why}; {detail}")).await;
                None
            }
        }
    }

    async fn follow(&mut self) -> Option<LinkReceiver> {
        let f = self.follow.take()?;
        let token = self.shared.token();
        let asked_at = Instant::now();
        match self
            .resumer
            .follow(&self.me, &self.shared.joined, &token, &self.relay_id)
            .await
        {
            Some(moved) => Some(self.adopt(moved, asked_at).await),
            None => {
                self.follow = f.next();
                None
            }
        }
    }

    async fn adopt(&mut self, moved: Moved, lost_at: Instant) -> LinkReceiver {
        let Moved {
            joined,
            link,
            welcome,
        } = moved;
        *self.shared.token.lock().unwrap_or_else(|p| p.into_inner()) = joined.token.clone();
        self.relay_id = joined.relay.relay_id.clone();
        let (tx, rx) = link.into_parts();
        self.conduit.install(tx).await;
        self.follow = None;
        self.on_welcome(welcome).await;
        self.shared.counters.resumes.fetch_add(1, Ordering::Relaxed);
        let after_ms = u64::try_from(lost_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(relay = %self.relay_id, after_ms, "session resumed");
        self.emit(ViewerEvent::Resumed {
            relay_id: self.relay_id.clone(),
            after_ms,
        })
        .await;
        rx
    }

    async fn tick(&mut self) {
        if self.tracker.is_dirty() {
            self.send_ack().await;
        }
        let deadline = self.shared.joined.claims.session_deadline;
        let remaining = deadline.saturating_sub(kakehashi_proto::unix_now());
        let crossed: Vec<u64> = TIME_WARNINGS
            .into_iter()
            .filter(|w| !self.warned.contains(w) && remaining <= *w)
            .collect();
        if !crossed.is_empty() && remaining > 0 {
            self.warned.extend(crossed);
            self.emit(ViewerEvent::TimeWarning {
                remaining_secs: remaining,
            })
            .await;
        }
        if self.replays.is_empty() && self.conduit.has_unacked() {
            self.replays
                .spawn(self.conduit.clone().retransmit_stalled(RETRANSMIT_AFTER));
        }
    }

    async fn send_ack(&mut self) {
        let Some(host) = self.shared.state().host.clone() else {
            return;
        };
        let ack = self.tracker.ack_for(host.participant_id);
        if ack.channels.is_empty() {
            return;
        }
        if let Err(e) = self
            .conduit
            .send_ack(&host.keys, host.participant_id, &ack)
            .await
        {
            debug!(error = %e, "ack not sent; the next one carries it");
        }
    }

    async fn accept_host(&mut self, token: &[u8]) {
        let peer = match peer::accept_peer(
            token,
            &self.shared.joined,
            &[Role::Host],
            &self.me,
            Side::Viewer,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Another viewer's token (or a forged one) is not the host: ignore it.
                debug!(error = %e, "peer token is not a valid host token");
                return;
            }
        };
        let known =
            self.shared.state().host.as_ref().map(|h| {
                h.participant_id == peer.participant_id && h.public_key == peer.public_key
            });
        match known {
            Some(false) => {
                // One host per session, bound to one key by the coordinator: anything
                // else is not the customer whose SAS was compared.
                warn!(
                    participant = peer.participant_id,
                    "a host token with another participant or key; refused"
                );
                return;
            }
            Some(true) => {
                // The same host again: in Welcome and PeerJoined, or after a move.
                self.host_present(peer.participant_id).await;
                return;
            }
            None => {}
        }
        let sas = peer.sas().to_owned();
        self.shared.state().host = Some(peer.clone());
        if self.conduit.set_peer(Some(peer.participant_id)) {
            self.spawn_replay();
        }
        self.host_present(peer.participant_id).await;
        info!(participant = peer.participant_id, %sas, "host verified");
        self.emit(ViewerEvent::PeerJoined { sas }).await;
        if let Some((perms, note)) = self.request_on_join.take()
            && let Err(e) = send_request(&self.conduit, &peer, perms, &note).await
        {
            warn!(error = %e, "could not send the permission request");
        }
    }

    /// The host is attached on the current link: replay to it and tell it what was
    /// delivered.
    async fn host_present(&mut self, id: u64) {
        self.follow = None;
        if self.conduit.set_present(id, true) {
            self.spawn_replay();
        }
        self.send_ack().await;
    }

    async fn on_frame(&mut self, frame: Frame) {
        let channel = frame.header.channel;
        let seq = frame.header.seq;
        let Some(host) = self.shared.state().host.clone() else {
            self.shared.undecryptable.fetch_add(1, Ordering::Relaxed);
            debug!(
                channel = channel.name(),
                "frame before the host's key is known; dropped"
            );
            return;
        };
        let plaintext = if channel == Channel::Screen {
            match self.open_screen(&host, &frame).await {
                Some(p) => p,
                None => return,
            }
        } else {
            match host.open(&frame) {
                Ok(p) => p,
                Err(e) if self.shared.joined.claims.role != Role::Viewer => {
                    // What the customer exchanges with the operator: not for a supervisor.
                    self.shared.foreign.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %e, "frame for the operator; ignored");
                    return;
                }
                Err(e) => {
                    let n = self.shared.undecryptable.fetch_add(1, Ordering::Relaxed) + 1;
                    warn!(error = %e, total = n, "frame from the host does not decrypt; dropped");
                    return;
                }
            }
        };
        if channel == Channel::Ack {
            match peer::decode::<pb::Ack>(channel, &plaintext) {
                Ok(ack) => self.conduit.on_ack(host.participant_id, &ack),
                Err(e) => warn!(error = %e, "bad ack"),
            }
            return;
        }
        if channel.is_replayed() {
            match self.tracker.accept(host.participant_id, channel, seq) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    self.shared
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Verdict::Gap { expected } => {
                    let n = self
                        .shared
                        .counters
                        .out_of_order
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    warn!(
                        channel = channel.name(),
                        seq,
                        expected,
                        total = n,
                        "reliable frame ahead of a missing one; dropped until the replay fills the gap"
                    );
                    return;
                }
            }
        }
        let event = match channel {
            Channel::Screen => peer::decode::<pb::ScreenFrame>(channel, &plaintext).map(|f| {
                let now = kakehashi_proto::unix_now_us();
                let latency_us = i64::try_from(now)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(frame.header.timestamp_us).unwrap_or(i64::MAX));
                ViewerEvent::Screen {
                    frame: f,
                    seq: frame.header.seq,
                    latency_us,
                }
            }),
            Channel::Chat => peer::decode::<pb::ChatMessage>(channel, &plaintext)
                .map(|m| ViewerEvent::Chat(m.text)),
            Channel::File => {
                match peer::decode::<pb::FileMessage>(channel, &plaintext) {
                    Ok(m) => self.on_file(&host, m).await,
                    Err(e) => warn!(error = %e, "bad file message"),
                }
                return;
            }
            Channel::SystemInfo => {
                peer::decode::<pb::SystemInfo>(channel, &plaintext).map(|info| {
                    ViewerEvent::SystemInfo {
                        info: Box::new(info),
                        full: true,
                    }
                })
            }
            Channel::Control => {
                let msg = match peer::decode::<pb::ControlMessage>(channel, &plaintext) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "bad control message");
                        return;
                    }
                };
                let perms = |b: u32| {
                    Permissions::from_bits(b & Permissions::ALL.bits()).unwrap_or_default()
                };
                match msg.kind {
                    Some(pb::control_message::Kind::ConsentAnswer(a)) => {
                        Ok(ViewerEvent::ConsentAnswer {
                            granted: perms(a.granted),
                            denied: perms(a.denied),
                            revoked: perms(a.revoked),
                        })
                    }
                    Some(pb::control_message::Kind::SystemSummary(info)) => {
                        // Whatever a host sends here, only the view-only fields count.
                        Ok(ViewerEvent::SystemInfo {
                            info: Box::new(crate::sysinfo::view_subset(&info)),
                            full: false,
                        })
                    }
                    _ => {
                        debug!("control message not for the viewer");
                        return;
                    }
                }
            }
            other => {
                debug!(channel = other.name(), "channel not handled by the viewer");
                return;
            }
        };
        match event {
            // Screen frames are latency-first: an application that falls behind loses
            // frames, never the signals and chat queued behind them. After a lost frame
            // the deltas that follow are useless to a decoder: skip them until a key
            // frame gets through.
            Ok(ev @ ViewerEvent::Screen { .. }) => {
                let key = matches!(&ev, ViewerEvent::Screen { frame, .. } if frame.key_frame);
                if !key && self.screen_needs_key {
                    self.shared.unread_screens.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match self.events.try_send(ev) {
                    Ok(()) => self.screen_needs_key = false,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        let n = self.shared.unread_screens.fetch_add(1, Ordering::Relaxed) + 1;
                        self.screen_needs_key = true;
                        debug!(total = n, "application is behind; screen frame dropped");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            Ok(ev) => self.emit(ev).await,
            Err(e) => warn!(error = %e, "dropped an undecodable frame"),
        }
    }

    /// Opens a screen frame: a picture under the group key (or, from a host that sealed
    /// it for this viewer alone, under the pairwise key), or the group key itself,
    /// which is installed. `None` when there is no picture to show.
    async fn open_screen(&mut self, host: &Peer, frame: &Frame) -> Option<Vec<u8>> {
        let held: Vec<GroupKey> = {
            let st = self.shared.state();
            st.group
                .iter()
                .chain(st.previous_group.iter())
                .cloned()
                .collect()
        };
        if let Some(p) = held.iter().find_map(|g| g.keys().open(frame).ok()) {
            return Some(p);
        }
        let plaintext = match host.open(frame) {
            Ok(p) => p,
            Err(e) => {
                // Another viewer's envelope, or a picture under a key this viewer was
                // not (yet) given.
                self.shared.foreign.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "screen frame not sealed for this viewer; skipped");
                return None;
            }
        };
        let Some(key) = pb::ScreenFrame::decode(plaintext.as_slice())
            .ok()
            .and_then(|f| f.group_key)
        else {
            return Some(plaintext);
        };
        let Some(key) = GroupKey::from_pb(&key) else {
            warn!("the host sent a group key that is not 32 bytes; ignored");
            return None;
        };
        let first = {
            let mut st = self.shared.state();
            if st.group.as_ref().map(GroupKey::epoch) == Some(key.epoch()) {
                return None;
            }
            debug!(epoch = key.epoch(), "new group key");
            st.previous_group = st.group.replace(key);
            st.previous_group.is_none()
        };
        if first && self.shared.joined.claims.role != Role::Viewer {
            self.emit(ViewerEvent::Admitted).await;
        }
        None
    }

    async fn end(&mut self, reason: pb::EndReason, detail: String) {
        self.shared.state().ended = true;
        self.shared.outgoing.cancel_all("the session ended");
        self.emit(ViewerEvent::Ended { reason, detail }).await;
    }

    async fn end_from_link(&mut self, e: LinkError) {
        let reason = e.end_reason();
        self.end(reason, e.to_string()).await;
    }
}
