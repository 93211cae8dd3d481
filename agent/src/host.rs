//! The host: the customer's agent. It owns the screen, asks the customer before granting
//! anything, and enforces the grants itself (it sends no screen without VIEW and obeys no
//! input without CONTROL in a control session), whatever the relay does.
//!
//! One viewer at a time: keys are kept per participant id, but screen frames are sealed
//! for the most recently joined viewer only. Several viewers (and recorders) come in a
//! later issue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kakehashi_proto::frame::FLAG_KEY_FRAME;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Frame, Mode, Permissions, pb};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::consent::{self, Consent, ConsentRequest};
use crate::crypto::{Keypair, Side};
use crate::error::{AgentError, connect_coordinator};
use crate::link::{LinkError, LinkReceiver, LinkSender, RelayLink};
use crate::peer::{self, Joined, Peer};

mod synthetic;

pub use synthetic::SyntheticScreen;

/// Events for the application are few and small; a full queue slows the relay down.
const EVENT_QUEUE: usize = 1024;
/// ReportConsent is advisory (the relay enforces), so it must not hold anything up.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// After `SessionEnded` or a hangup the relay closes; wait this long for it.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub consent: Consent,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            consent: Consent::Prompt,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    /// A viewer with a valid token attached; compare `sas` with the operator's.
    PeerJoined {
        participant_id: u64,
        sas: String,
    },
    /// [`Consent::Manual`]: answer with [`Host::answer`].
    ConsentRequested {
        permissions: Permissions,
        note: String,
    },
    /// The full granted set changed.
    GrantsChanged(Permissions),
    /// Operator input, delivered only in a control session with CONTROL granted.
    Input(pb::InputEvent),
    Chat(String),
    Pointer(pb::PointerHint),
    /// A viewer lost frames: the next screen frame should be a key frame.
    KeyFrameRequested,
    Ended {
        reason: pb::EndReason,
        detail: String,
    },
}

struct State {
    granted: Permissions,
    viewers: HashMap<u64, Peer>,
    /// The viewer screen frames are sealed for (the most recent one).
    current: Option<u64>,
    ended: bool,
}

struct Shared {
    joined: Joined,
    mode: Mode,
    state: Mutex<State>,
    key_frame_wanted: AtomicBool,
    dropped_frames: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than stopping, so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A joined host session. Dropping it leaves the session.
///
/// Read its events ([`Host::next_event`] or [`Host::run_synthetic`]): every event is
/// reliable (input, chat, grants), so with 1024 unread the host stops reading from the
/// relay until the application catches up.
pub struct Host {
    shared: Arc<Shared>,
    participant_id: u64,
    tx: LinkSender,
    events: mpsc::Receiver<HostEvent>,
    answers: mpsc::UnboundedSender<Permissions>,
    cancel: CancellationToken,
    // The driver; aborted when the host is dropped.
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("session", &self.shared.joined.session_id)
            .field("participant_id", &self.participant_id)
            .finish()
    }
}

impl Host {
    /// Enters the session `code` names: makes a keypair, joins through the coordinator's
    /// `AgentService.JoinByCode`, attaches to the relay and starts handling signals.
    pub async fn join(
        coordinator_url: &str,
        code: &str,
        config: HostConfig,
    ) -> Result<Host, AgentError> {
        let me = Keypair::generate()?;
        let channel = connect_coordinator(coordinator_url).await?;
        let mut agent = AgentServiceClient::new(channel);
        let resp = agent
            .join_by_code(pb::JoinByCodeRequest {
                code: code.to_owned(),
                public_key: me.public_bytes().to_vec(),
            })
            .await
            .map_err(|s| AgentError::rpc("JoinByCode", s))?
            .into_inner();
        let joined = Joined::from_response("JoinByCode", resp, &me, Role::Host)?;
        let (link, welcome) =
            RelayLink::connect(&joined.relay, &joined.token, &joined.session_id).await?;
        info!(session = %joined.session_id, participant = welcome.participant_id, "host attached");
        Ok(Self::start(joined, me, link, welcome, config, Some(agent)))
    }

    /// Starts a host on an attached link. `reporter` receives `ReportConsent` calls.
    #[doc(hidden)]
    // Public so integration tests can run a host against a test relay without a
    // coordinator; applications use `join`.
    pub fn start(
        joined: Joined,
        me: Keypair,
        link: RelayLink,
        welcome: pb::Welcome,
        config: HostConfig,
        reporter: Option<AgentServiceClient<tonic::transport::Channel>>,
    ) -> Host {
        let participant_id = link.participant_id();
        let (tx, rx) = link.into_parts();
        let mode = joined.claims.mode;
        let shared = Arc::new(Shared {
            joined,
            mode,
            state: Mutex::new(State {
                granted: Permissions::NONE,
                viewers: HashMap::new(),
                current: None,
                ended: false,
            }),
            key_frame_wanted: AtomicBool::new(true),
            dropped_frames: AtomicU64::new(0),
        });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let driver = Driver {
            shared: shared.clone(),
            me,
            tx: tx.clone(),
            events: events_tx,
            answers_tx: answers.clone(),
            consent: config.consent,
            queue: VecDeque::new(),
            asking: None,
            reporter,
            prompts: JoinSet::new(),
            reports: JoinSet::new(),
        };
        let mut tasks = JoinSet::new();
        let span = tracing::info_span!(
            "host",
            session = %shared.joined.session_id,
            participant = participant_id
        );
        tasks.spawn(
            driver
                .run(rx, answers_rx, welcome, cancel.clone())
                .instrument(span),
        );
        Host {
            shared,
            participant_id,
            tx,
            events,
            answers,
            cancel,
            _tasks: tasks,
        }
    }

    /// The SAS of the current viewer, once one has joined.
    pub fn sas(&self) -> Option<String> {
        let state = self.shared.state();
        let current = state.current?;
        state.viewers.get(&current).map(|p| p.sas().to_owned())
    }

    pub fn session(&self) -> &pb::Session {
        &self.shared.joined.session
    }

    pub fn participant_id(&self) -> u64 {
        self.participant_id
    }

    /// The full set the customer has granted so far.
    pub fn granted(&self) -> Permissions {
        self.shared.state().granted
    }

    /// Frames from the viewer dropped because they were not allowed or did not decrypt.
    pub fn dropped_frames(&self) -> u64 {
        self.shared.dropped_frames.load(Ordering::Relaxed)
    }

    /// The next event; `None` after the session ended and every event was read.
    pub async fn next_event(&mut self) -> Option<HostEvent> {
        self.events.recv().await
    }

    pub fn events(&mut self) -> &mut mpsc::Receiver<HostEvent> {
        &mut self.events
    }

    /// Answers the oldest open [`HostEvent::ConsentRequested`] ([`Consent::Manual`]):
    /// the permissions granted out of those asked; the rest are refused.
    pub fn answer(&self, granted: Permissions) -> Result<(), AgentError> {
        self.answers.send(granted).map_err(|_| AgentError::Ended)
    }

    /// Sends a screen frame to the viewer. `Ok(false)`: withheld, because VIEW is not
    /// granted or no viewer is attached. Sealed for the current (most recent) viewer
    /// only; several viewers come in a later issue.
    pub async fn send_screen(&self, frame: pb::ScreenFrame) -> Result<bool, AgentError> {
        let peer = {
            let state = self.shared.state();
            if state.ended {
                return Err(AgentError::Ended);
            }
            if may_forward(Channel::Screen, Role::Host, self.shared.mode, state.granted).is_err() {
                return Ok(false);
            }
            match state.current.and_then(|id| state.viewers.get(&id)) {
                Some(p) => p.clone(),
                None => return Ok(false),
            }
        };
        let flags = if frame.key_frame { FLAG_KEY_FRAME } else { 0 };
        let payload = frame.encode_to_vec();
        peer::send_sealed(&self.tx, &peer.keys, Channel::Screen, flags, &payload).await?;
        Ok(true)
    }

    /// Sends a chat line to the viewer.
    pub async fn send_chat(&self, text: &str) -> Result<(), AgentError> {
        let peer = {
            let state = self.shared.state();
            if state.ended {
                return Err(AgentError::Ended);
            }
            state
                .current
                .and_then(|id| state.viewers.get(&id))
                .cloned()
                .ok_or(AgentError::NoPeer)?
        };
        let msg = pb::ChatMessage {
            text: text.to_owned(),
            sent_at_unix_ms: now_ms(),
        };
        peer::send_sealed(&self.tx, &peer.keys, Channel::Chat, 0, &msg.encode_to_vec()).await
    }

    /// Ends the session for everyone: sends `Hangup`, waits briefly for the relay to
    /// close, then leaves.
    pub async fn hangup(&self, reason: pb::EndReason, detail: &str) -> Result<(), AgentError> {
        hangup(&self.tx, reason, detail).await
    }

    /// Streams a synthetic screen at `screen.fps` until the session ends, sending a key
    /// frame every `key_interval` frames and whenever one is requested. Every event is
    /// passed to `on_event`; returns how the session ended.
    pub async fn run_synthetic(
        &mut self,
        screen: SyntheticScreen,
        mut on_event: impl FnMut(&HostEvent),
    ) -> Result<(pb::EndReason, String), AgentError> {
        let mut source = synthetic::Source::new(screen);
        let mut tick = tokio::time::interval(screen.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let wanted = self.shared.key_frame_wanted.swap(false, Ordering::Relaxed);
                    let frame = source.next_frame(wanted);
                    match self.send_screen(frame).await {
                        Ok(true) => source.advance(),
                        // Withheld: whoever sees the next frame has seen nothing, so
                        // make it a key frame.
                        Ok(false) => self.shared.key_frame_wanted.store(true, Ordering::Relaxed),
                        Err(AgentError::Ended) => {}
                        Err(e) => {
                            debug!(error = %e, "screen frame not sent");
                            self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
                        }
                    }
                }
                ev = self.events.recv() => match ev {
                    Some(ev) => {
                        on_event(&ev);
                        if let HostEvent::Ended { reason, detail } = ev {
                            return Ok((reason, detail));
                        }
                    }
                    None => return Err(AgentError::Ended),
                },
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub(crate) async fn hangup(
    tx: &LinkSender,
    reason: pb::EndReason,
    detail: &str,
) -> Result<(), AgentError> {
    let sent = tx
        .send_signal(pb::signal::Kind::Hangup(pb::Hangup {
            reason: reason as i32,
            detail: detail.to_owned(),
        }))
        .await;
    if sent.is_ok() {
        // The relay ends the session and closes; leave anyway if it does not.
        let _ = tokio::time::timeout(CLOSE_GRACE, tx.closed()).await;
    }
    tx.close(kakehashi_proto::dataplane::close::LEFT, "hung up");
    match sent {
        Ok(()) | Err(LinkError::Ended(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn now_ms() -> i64 {
    i64::try_from(kakehashi_proto::unix_now_us() / 1000).unwrap_or(i64::MAX)
}

/// Owns the link's receiving side and every decision the host makes.
struct Driver {
    shared: Arc<Shared>,
    me: Keypair,
    tx: LinkSender,
    events: mpsc::Sender<HostEvent>,
    answers_tx: mpsc::UnboundedSender<Permissions>,
    consent: Consent,
    /// Questions waiting for the customer, oldest first.
    queue: VecDeque<ConsentRequest>,
    /// The question the customer is looking at now. One at a time, so an answer is
    /// never applied to the wrong question.
    asking: Option<ConsentRequest>,
    reporter: Option<AgentServiceClient<tonic::transport::Channel>>,
    // Terminal prompts: a prompt left open when the session ends is abandoned.
    prompts: JoinSet<()>,
    // ReportConsent calls: each bounded, finished before the driver stops.
    reports: JoinSet<()>,
}

enum Flow {
    Continue,
    Stop,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: LinkReceiver,
        mut answers: mpsc::UnboundedReceiver<Permissions>,
        welcome: pb::Welcome,
        cancel: CancellationToken,
    ) {
        if welcome.granted != 0 {
            // Grants this process did not hear the customer give do not count.
            self.send_grant(Permissions::NONE).await;
        }
        for token in &welcome.peer_tokens {
            self.accept_viewer(token).await;
        }
        loop {
            let flow = tokio::select! {
                _ = cancel.cancelled() => Flow::Stop,
                sig = rx.signals.recv() => match sig {
                    Some(Ok(kind)) => self.on_signal(kind).await,
                    Some(Err(e)) => { self.end_from_link(e).await; Flow::Stop }
                    None => {
                        let e = match tokio::time::timeout(CLOSE_GRACE, self.tx.closed()).await {
                            Ok(e) => e,
                            Err(_) => LinkError::SignalStreamClosed,
                        };
                        self.end_from_link(e).await;
                        Flow::Stop
                    }
                },
                Some(frame) = rx.frames.recv() => { self.on_frame(frame).await; Flow::Continue }
                Some(answer) = answers.recv() => { self.on_answer(answer).await; Flow::Continue }
                Some(_) = self.prompts.join_next(), if !self.prompts.is_empty() => Flow::Continue,
                Some(_) = self.reports.join_next(), if !self.reports.is_empty() => Flow::Continue,
            };
            if let Flow::Stop = flow {
                break;
            }
        }
        // Let consent reports already under way finish (each is bounded by
        // REPORT_TIMEOUT); open prompts are aborted when `prompts` drops.
        while self.reports.join_next().await.is_some() {}
    }

    async fn emit(&self, ev: HostEvent) {
        // The application dropped its receiver: nobody to tell, keep enforcing anyway.
        let _ = self.events.send(ev).await;
    }

    async fn on_signal(&mut self, kind: pb::signal::Kind) -> Flow {
        use pb::signal::Kind;
        match kind {
            Kind::PeerJoined(p) => self.accept_viewer(&p.token).await,
            Kind::PeerLeft(p) => {
                let mut state = self.shared.state();
                if state.viewers.remove(&p.participant_id).is_some() {
                    info!(participant = p.participant_id, "viewer left");
                }
                if state.current == Some(p.participant_id) {
                    state.current = state.viewers.keys().max().copied();
                }
                drop(state);
                self.queue.retain(|r| r.viewer != p.participant_id);
            }
            Kind::GrantsChanged(g) => {
                debug!(granted = g.granted, "relay confirms grants");
            }
            Kind::KeyFrameRequest(_) => {
                self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
                self.emit(HostEvent::KeyFrameRequested).await;
            }
            Kind::SessionEnded(e) => {
                self.end(reason_of(e.reason), e.detail).await;
                return Flow::Stop;
            }
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
        Flow::Continue
    }

    async fn accept_viewer(&mut self, token: &[u8]) {
        let peer = match peer::accept_peer(
            token,
            &self.shared.joined,
            Role::Viewer,
            &self.me,
            Side::Host,
        ) {
            Ok(p) => p,
            Err(e) => {
                // Nothing is granted to a participant whose key is not vouched for.
                warn!(error = %e, "refusing a viewer whose token does not verify");
                return;
            }
        };
        let id = peer.participant_id;
        let sas = peer.sas().to_owned();
        {
            let mut state = self.shared.state();
            // The same token can arrive twice (in Welcome and as PeerJoined): same
            // participant and key, nothing new to tell or ask.
            if state.viewers.get(&id).is_some_and(|p| p.sas() == sas) {
                return;
            }
            state.viewers.insert(id, peer);
            state.current = Some(id);
        }
        info!(participant = id, %sas, "viewer joined");
        self.emit(HostEvent::PeerJoined {
            participant_id: id,
            sas: sas.clone(),
        })
        .await;
        self.request(ConsentRequest {
            viewer: id,
            permissions: Permissions::VIEW,
            note: "the operator asks to see your screen".into(),
            sas,
        })
        .await;
    }

    /// Queues a question for the customer, unless there is nothing to ask.
    async fn request(&mut self, mut req: ConsentRequest) {
        let claims = &self.shared.joined.claims;
        let asked = req.permissions;
        let askable = consent::askable(asked, claims.permissions, claims.mode);
        let granted = self.shared.state().granted;
        let refused_unasked = asked.without(askable);
        if !refused_unasked.is_empty() {
            info!(refused = %refused_unasked, "request exceeds what this session allows");
            self.report(granted, refused_unasked);
        }
        req.permissions = askable.without(granted);
        if req.permissions.is_empty() {
            return;
        }
        self.queue.push_back(req);
        self.ask_next().await;
    }

    async fn ask_next(&mut self) {
        if self.asking.is_some() {
            return;
        }
        let Some(req) = self.queue.pop_front() else {
            return;
        };
        self.asking = Some(req.clone());
        match self.consent {
            Consent::Approve(allowed) => {
                // Through the answer queue, like every other answer.
                let _ = self
                    .answers_tx
                    .send(consent::scripted_answer(allowed, req.permissions));
            }
            Consent::Manual => {
                self.emit(HostEvent::ConsentRequested {
                    permissions: req.permissions,
                    note: req.note,
                })
                .await;
            }
            Consent::Prompt => {
                let answers = self.answers_tx.clone();
                self.prompts.spawn(async move {
                    let asked = req.clone();
                    let answer =
                        tokio::task::spawn_blocking(move || consent::prompt_blocking(&asked))
                            .await
                            .unwrap_or(Permissions::NONE);
                    let _ = answers.send(answer);
                });
            }
        }
    }

    async fn on_answer(&mut self, answer: Permissions) {
        let Some(req) = self.asking.take() else {
            warn!(%answer, "consent answer with no question open; ignored");
            return;
        };
        // A viewer that left while the customer was deciding gets nothing.
        let viewer_present = self.shared.state().viewers.contains_key(&req.viewer);
        if viewer_present {
            let claims = &self.shared.joined.claims;
            let current = self.shared.state().granted;
            let d = consent::decide(
                current,
                req.permissions,
                answer,
                claims.permissions,
                claims.mode,
            );
            info!(granted = %d.granted, denied = %d.denied, "customer decided");
            if d.granted != current {
                self.shared.state().granted = d.granted;
                self.send_grant(d.granted).await;
                self.emit(HostEvent::GrantsChanged(d.granted)).await;
            }
            self.report(d.granted, d.denied);
        }
        self.ask_next().await;
    }

    async fn send_grant(&self, granted: Permissions) {
        let sig = pb::signal::Kind::Grant(pb::Grant {
            granted: granted.bits(),
        });
        if let Err(e) = self.tx.send_signal(sig).await {
            warn!(error = %e, "could not send the grant to the relay");
        }
    }

    /// Tells the coordinator what the customer decided, for the session's events. Best
    /// effort: the relay is what enforces.
    fn report(&mut self, granted: Permissions, denied: Permissions) {
        let Some(mut client) = self.reporter.clone() else {
            return;
        };
        let req = pb::ReportConsentRequest {
            token: self.shared.joined.token.clone(),
            granted: granted.bits(),
            denied: denied.bits(),
        };
        self.reports.spawn(async move {
            match tokio::time::timeout(REPORT_TIMEOUT, client.report_consent(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => warn!(%status, "ReportConsent failed"),
                Err(_) => warn!("ReportConsent timed out"),
            }
        });
    }

    async fn on_frame(&mut self, frame: Frame) {
        let channel = frame.header.channel;
        let granted = self.shared.state().granted;
        // The same rule the relay applies, so a relay that forwards too much gains
        // nothing: input is obeyed only in a control session with CONTROL granted.
        if let Err(denied) = may_forward(channel, Role::Viewer, self.shared.mode, granted) {
            self.shared.dropped_frames.fetch_add(1, Ordering::Relaxed);
            warn!(channel = channel.name(), seq = frame.header.seq, %denied, "dropped a frame from the viewer");
            return;
        }
        let opened = {
            let state = self.shared.state();
            state
                .viewers
                .values()
                .find_map(|p| p.open(&frame).ok().map(|pt| (p.participant_id, pt)))
        };
        let Some((from, plaintext)) = opened else {
            self.shared.dropped_frames.fetch_add(1, Ordering::Relaxed);
            warn!(
                channel = channel.name(),
                seq = frame.header.seq,
                "frame from the relay does not decrypt with any viewer's key; dropped"
            );
            return;
        };
        let event = match channel {
            Channel::Input => {
                peer::decode::<pb::InputEvent>(channel, &plaintext).map(HostEvent::Input)
            }
            Channel::Pointer => {
                peer::decode::<pb::PointerHint>(channel, &plaintext).map(HostEvent::Pointer)
            }
            Channel::Chat => peer::decode::<pb::ChatMessage>(channel, &plaintext)
                .map(|m| HostEvent::Chat(m.text)),
            Channel::Control => {
                match peer::decode::<pb::ControlMessage>(channel, &plaintext) {
                    Ok(pb::ControlMessage {
                        kind: Some(pb::control_message::Kind::PermissionRequest(r)),
                    }) => {
                        self.on_permission_request(from, r).await;
                    }
                    Ok(_) => debug!("empty control message"),
                    Err(e) => warn!(error = %e, "bad control message"),
                }
                return;
            }
            Channel::Screen | Channel::File | Channel::Signal | Channel::Ack => {
                debug!(channel = channel.name(), "channel not handled by the host");
                return;
            }
        };
        match event {
            Ok(ev) => self.emit(ev).await,
            Err(e) => warn!(error = %e, "dropped an undecodable frame"),
        }
    }

    async fn on_permission_request(&mut self, from: u64, r: pb::PermissionRequest) {
        let Some(asked) = Permissions::from_bits(r.permissions) else {
            warn!(
                bits = r.permissions,
                "permission request with unknown bits; refused"
            );
            return;
        };
        let sas = self
            .shared
            .state()
            .viewers
            .get(&from)
            .map(|p| p.sas().to_owned())
            .unwrap_or_default();
        self.request(ConsentRequest {
            viewer: from,
            permissions: asked,
            note: r.note,
            sas,
        })
        .await;
    }

    async fn end(&mut self, reason: pb::EndReason, detail: String) {
        self.shared.state().ended = true;
        self.report_end(reason, &detail);
        self.emit(HostEvent::Ended { reason, detail }).await;
    }

    /// Tells the coordinator how the session ended when only the relay and the agents
    /// know it (a hang-up, a failed session, a relay going away). Ends the coordinator
    /// decided itself (operator's EndSession, time limit) need no report.
    fn report_end(&mut self, reason: pb::EndReason, detail: &str) {
        use pb::EndReason::{EndedByCustomer, EndedByOperator, RelayShutdown, SessionFailed};
        if !matches!(
            reason,
            EndedByCustomer | EndedByOperator | SessionFailed | RelayShutdown
        ) {
            return;
        }
        let Some(mut client) = self.reporter.clone() else {
            return;
        };
        let req = pb::ReportEndRequest {
            token: self.shared.joined.token.clone(),
            reason: reason as i32,
            detail: detail.chars().take(256).collect(),
        };
        self.reports.spawn(async move {
            match tokio::time::timeout(REPORT_TIMEOUT, client.report_end(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => warn!(%status, "ReportEnd failed"),
                Err(_) => warn!("ReportEnd timed out"),
            }
        });
    }

    async fn end_from_link(&mut self, e: LinkError) {
        let reason = e.end_reason();
        self.end(reason, e.to_string()).await;
    }
}

pub(crate) fn reason_of(v: i32) -> pb::EndReason {
    pb::EndReason::try_from(v).unwrap_or(pb::EndReason::Unspecified)
}
