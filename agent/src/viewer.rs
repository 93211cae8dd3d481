//! The viewer: the operator's agent. It sees the screen once the customer grants VIEW,
//! and is polite by default: it sends no input unless CONTROL is granted in a control
//! session (the host and relay refuse it anyway).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Frame, Mode, Permissions, pb};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::crypto::{Keypair, Side};
use crate::error::{AgentError, connect_coordinator};
use crate::host::{now_ms, reason_of};
use crate::link::{LinkError, LinkReceiver, LinkSender, RelayLink};
use crate::peer::{self, Joined, Peer};

const EVENT_QUEUE: usize = 1024;
const CLOSE_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Default)]
pub struct ViewerConfig {
    /// Permissions to ask the customer for as soon as the host is verified, with a note.
    /// The host asks for VIEW by itself.
    pub request_on_join: Option<(Permissions, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ViewerEvent {
    /// The host's token verified; compare `sas` with the customer's.
    PeerJoined {
        sas: String,
    },
    Screen {
        frame: pb::ScreenFrame,
        seq: u64,
        /// Now minus the host's send timestamp (clocks of two machines: may be skewed).
        latency_us: i64,
    },
    Chat(String),
    GrantsChanged(Permissions),
    Ended {
        reason: pb::EndReason,
        detail: String,
    },
}

struct State {
    granted: Permissions,
    host: Option<Peer>,
    ended: bool,
}

struct Shared {
    joined: Joined,
    mode: Mode,
    state: Mutex<State>,
    undecryptable: AtomicU64,
    unread_screens: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A joined viewer session. Dropping it leaves the session.
pub struct Viewer {
    shared: Arc<Shared>,
    participant_id: u64,
    tx: LinkSender,
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
            })
            .await
            .map_err(|s| AgentError::rpc("JoinAsOperator", s))?
            .into_inner();
        let joined = Joined::from_response("JoinAsOperator", resp, &me, Role::Viewer)?;
        let (link, welcome) =
            RelayLink::connect(&joined.relay, &joined.token, &joined.session_id).await?;
        info!(session = %joined.session_id, participant = welcome.participant_id, "viewer attached");
        Ok(Self::start(joined, me, link, welcome, config))
    }

    /// Starts a viewer on an attached link.
    #[doc(hidden)]
    // Public so integration tests can run a viewer against a test relay.
    pub fn start(
        joined: Joined,
        me: Keypair,
        link: RelayLink,
        welcome: pb::Welcome,
        config: ViewerConfig,
    ) -> Viewer {
        let participant_id = link.participant_id();
        let (tx, rx) = link.into_parts();
        let mode = joined.claims.mode;
        let shared = Arc::new(Shared {
            joined,
            mode,
            state: Mutex::new(State {
                granted: Permissions::from_bits(welcome.granted).unwrap_or(Permissions::NONE),
                host: None,
                ended: false,
            }),
            undecryptable: AtomicU64::new(0),
            unread_screens: AtomicU64::new(0),
        });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let cancel = CancellationToken::new();
        let driver = Driver {
            shared: shared.clone(),
            me,
            tx: tx.clone(),
            events: events_tx,
            request_on_join: config.request_on_join,
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
            tx,
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

    /// Frames from the host that failed to decrypt (counted, never fatal).
    pub fn undecryptable_frames(&self) -> u64 {
        self.shared.undecryptable.load(Ordering::Relaxed)
    }

    /// Screen frames dropped because the application had 1024 events unread.
    pub fn unread_screen_frames(&self) -> u64 {
        self.shared.unread_screens.load(Ordering::Relaxed)
    }

    /// The next event; `None` after the session ended and every event was read.
    pub async fn next_event(&mut self) -> Option<ViewerEvent> {
        self.events.recv().await
    }

    pub fn events(&mut self) -> &mut mpsc::Receiver<ViewerEvent> {
        &mut self.events
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
        let peer = self.host_peer()?;
        send_request(&self.tx, &peer, perms, note).await
    }

    /// Sends input if CONTROL is granted in a control session; otherwise sends nothing
    /// and returns `Ok(false)`.
    pub async fn send_input(&self, event: pb::InputEvent) -> Result<bool, AgentError> {
        if may_forward(
            Channel::Input,
            Role::Viewer,
            self.shared.mode,
            self.granted(),
        )
        .is_err()
        {
            return Ok(false);
        }
        self.send_input_unchecked(event).await?;
        Ok(true)
    }

    /// Sends input whatever is granted.
    #[doc(hidden)]
    // Exists for tests that play a modified viewer, to prove host and relay refuse it.
    pub async fn send_input_unchecked(&self, event: pb::InputEvent) -> Result<(), AgentError> {
        let peer = self.host_peer()?;
        peer::send_sealed(
            &self.tx,
            &peer.keys,
            Channel::Input,
            0,
            &event.encode_to_vec(),
        )
        .await
    }

    pub async fn send_chat(&self, text: &str) -> Result<(), AgentError> {
        let peer = self.host_peer()?;
        let msg = pb::ChatMessage {
            text: text.to_owned(),
            sent_at_unix_ms: now_ms(),
        };
        peer::send_sealed(&self.tx, &peer.keys, Channel::Chat, 0, &msg.encode_to_vec()).await
    }

    /// Sends a pointer hint ("指差し"); `Ok(false)` without a VIEW grant.
    pub async fn send_pointer(&self, hint: pb::PointerHint) -> Result<bool, AgentError> {
        if may_forward(
            Channel::Pointer,
            Role::Viewer,
            self.shared.mode,
            self.granted(),
        )
        .is_err()
        {
            return Ok(false);
        }
        let peer = self.host_peer()?;
        peer::send_sealed(
            &self.tx,
            &peer.keys,
            Channel::Pointer,
            0,
            &hint.encode_to_vec(),
        )
        .await?;
        Ok(true)
    }

    /// Ends the session for everyone.
    pub async fn hangup(&self, reason: pb::EndReason, detail: &str) -> Result<(), AgentError> {
        crate::host::hangup(&self.tx, reason, detail).await
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn send_request(
    tx: &LinkSender,
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
    peer::send_sealed(tx, &peer.keys, Channel::Control, 0, &msg.encode_to_vec()).await
}

struct Driver {
    shared: Arc<Shared>,
    me: Keypair,
    tx: LinkSender,
    events: mpsc::Sender<ViewerEvent>,
    request_on_join: Option<(Permissions, String)>,
}

impl Driver {
    async fn run(mut self, mut rx: LinkReceiver, welcome: pb::Welcome, cancel: CancellationToken) {
        for token in &welcome.peer_tokens {
            self.accept_host(token).await;
        }
        if welcome.granted != 0 {
            let g = self.shared.state().granted;
            self.emit(ViewerEvent::GrantsChanged(g)).await;
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                sig = rx.signals.recv() => match sig {
                    Some(Ok(kind)) => {
                        if self.on_signal(kind).await {
                            break;
                        }
                    }
                    Some(Err(e)) => { self.end_from_link(e).await; break; }
                    None => {
                        let e = match tokio::time::timeout(CLOSE_GRACE, self.tx.closed()).await {
                            Ok(e) => e,
                            Err(_) => LinkError::SignalStreamClosed,
                        };
                        self.end_from_link(e).await;
                        break;
                    }
                },
                Some(frame) = rx.frames.recv() => self.on_frame(frame).await,
            }
        }
    }

    async fn emit(&self, ev: ViewerEvent) {
        let _ = self.events.send(ev).await;
    }

    /// Returns true when the session is over.
    async fn on_signal(&mut self, kind: pb::signal::Kind) -> bool {
        use pb::signal::Kind;
        match kind {
            Kind::PeerJoined(p) => self.accept_host(&p.token).await,
            Kind::PeerLeft(p) => {
                let mut state = self.shared.state();
                if state.host.as_ref().map(|h| h.participant_id) == Some(p.participant_id) {
                    info!("host left");
                    state.host = None;
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
                self.shared.state().granted = granted;
                self.emit(ViewerEvent::GrantsChanged(granted)).await;
            }
            Kind::SessionEnded(e) => {
                self.end(reason_of(e.reason), e.detail).await;
                return true;
            }
            Kind::KeyFrameRequest(_) => debug!("key frame request is for the host; ignored"),
            Kind::Drain(d) => {
                // Moving to another relay is not built yet: the session lasts as long as
                // this relay does.
                warn!(
                    grace_ms = d.grace_ms,
                    "relay is draining; this agent cannot resume elsewhere yet"
                );
            }
            other @ (Kind::Hello(_) | Kind::Welcome(_) | Kind::Grant(_) | Kind::Hangup(_)) => {
                warn!(signal = ?other, "relay sent a signal meant for the relay; ignored");
            }
        }
        false
    }

    async fn accept_host(&mut self, token: &[u8]) {
        let peer = match peer::accept_peer(
            token,
            &self.shared.joined,
            Role::Host,
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
        let sas = peer.sas().to_owned();
        {
            let mut state = self.shared.state();
            // The same token can arrive twice (in Welcome and as PeerJoined).
            if state
                .host
                .as_ref()
                .is_some_and(|h| h.participant_id == peer.participant_id && h.sas() == sas)
            {
                return;
            }
            state.host = Some(peer.clone());
        }
        info!(participant = peer.participant_id, %sas, "host verified");
        self.emit(ViewerEvent::PeerJoined { sas }).await;
        if let Some((perms, note)) = self.request_on_join.take()
            && let Err(e) = send_request(&self.tx, &peer, perms, &note).await
        {
            warn!(error = %e, "could not send the permission request");
        }
    }

    async fn on_frame(&mut self, frame: Frame) {
        let channel = frame.header.channel;
        let Some(host) = self.shared.state().host.clone() else {
            self.shared.undecryptable.fetch_add(1, Ordering::Relaxed);
            debug!(
                channel = channel.name(),
                "frame before the host's key is known; dropped"
            );
            return;
        };
        let plaintext = match host.open(&frame) {
            Ok(p) => p,
            Err(e) => {
                let n = self.shared.undecryptable.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(error = %e, total = n, "frame from the host does not decrypt; dropped");
                return;
            }
        };
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
            other => {
                debug!(channel = other.name(), "channel not handled by the viewer");
                return;
            }
        };
        match event {
            // Screen frames are latency-first: an application that falls behind loses
            // frames, never the signals and chat queued behind them.
            Ok(ev @ ViewerEvent::Screen { .. }) => {
                if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
                    let n = self.shared.unread_screens.fetch_add(1, Ordering::Relaxed) + 1;
                    debug!(total = n, "application is behind; screen frame dropped");
                }
            }
            Ok(ev) => self.emit(ev).await,
            Err(e) => warn!(error = %e, "dropped an undecodable frame"),
        }
    }

    async fn end(&mut self, reason: pb::EndReason, detail: String) {
        self.shared.state().ended = true;
        self.emit(ViewerEvent::Ended { reason, detail }).await;
    }

    async fn end_from_link(&mut self, e: LinkError) {
        let reason = e.end_reason();
        self.end(reason, e.to_string()).await;
    }
}
