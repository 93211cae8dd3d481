//! The host: the customer's agent. It owns the screen, asks the customer before granting
//! anything, and enforces the grants itself (it sends no screen without VIEW and obeys no
//! input without CONTROL in a control session), whatever the relay does.
//!
//! One operator (viewer) and any number of supervisors: screen frames are sealed once,
//! under a group key the host hands to the operator and to each supervisor the customer
//! admitted, so the relay fans one ciphertext out. Everything else (input, chat, files,
//! system information) is the customer's exchange with the operator, sealed pairwise.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kakehashi_proto::frame::FLAG_KEY_FRAME;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::token::Role;
use kakehashi_proto::{Channel, Frame, Mode, Permissions, pb};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::conduit::{Conduit, Via};
use crate::consent::{self, Consent, ConsentRequest};
use crate::crypto::{GroupKey, Keypair, Side};
use crate::error::{AgentError, connect_coordinator};
use crate::link::{LinkError, LinkReceiver, LinkSender, RelayLink};
use crate::peer::{self, Joined, Peer};
use crate::reliable::{RecvTracker, Verdict};
use crate::resume::{Failure, Moved, Resumer};
use report::{Report, run_reporter};

mod controls;
mod files;
mod report;
#[cfg(feature = "media")]
mod screen;
mod synthetic;

#[cfg(feature = "media")]
pub use screen::{ScreenError, ScreenOptions, ScreenShare};
pub use synthetic::{Source as SyntheticSource, SyntheticScreen};

/// Events for the application are few and small; a full queue slows the relay down.
const EVENT_QUEUE: usize = 1024;
/// ReportConsent is advisory (the relay enforces), so it must not hold anything up.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Host::revoke`] and [`Host::pause_sharing`] wait for the relay to confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports waiting for the coordinator; past this the oldest are dropped and logged
/// (the relay enforces; the event log is what loses them).
const REPORT_QUEUE: usize = 256;
/// After `SessionEnded` or a hangup the relay closes; wait this long for it.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// How often delivered frames are acknowledged (when something new arrived).
pub(crate) const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// Kept frames the peer has not acknowledged for this long, with no ack progress at
/// all, were dropped on the way and are written again.
pub(crate) const RETRANSMIT_AFTER: Duration = Duration::from_secs(2);
/// After the peer left, how long to keep asking the coordinator whether it moved the
/// session to another relay.
pub(crate) const FOLLOW_FOR: Duration = Duration::from_secs(60);
const FOLLOW_FIRST: Duration = Duration::from_millis(300);
const FOLLOW_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub consent: Consent,
}

/// What a support session does beyond consent; [`Host::join_with_options`].
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Warn ([`HostEvent::TimeWarning`], and a TIME_WARNING event on `WatchSession`)
    /// this long before the session's time limit. A session shorter than a warning
    /// gets one warning at once.
    pub time_warnings: Vec<Duration>,
    /// End the session (END_REASON_IDLE_TIMEOUT) when no chat, input, pointer, keyboard
    /// display or permission request passed for this long. `None`: never.
    pub idle_timeout: Option<Duration>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            time_warnings: vec![Duration::from_secs(300), Duration::from_secs(60)],
            idle_timeout: None,
        }
    }
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
    /// A supervisor (a second, watch-only operator) attached and asks to watch; the
    /// customer's answer comes as a consent question like any other (VIEW admits it).
    SupervisorJoined {
        participant_id: u64,
        sas: String,
    },
    /// The customer admitted (the supervisor now gets the screen) or refused it.
    SupervisorAnswered {
        participant_id: u64,
        admitted: bool,
    },
    /// A supervisor left; the group key was replaced so it reads nothing more.
    SupervisorLeft {
        participant_id: u64,
    },
    /// A recorder attached. It gets the screen only while RECORDING is granted (asked
    /// as a consent question when it is not): show the customer that the session is
    /// being recorded while [`Host::is_recording`].
    RecorderJoined {
        participant_id: u64,
    },
    RecorderLeft {
        participant_id: u64,
    },
    /// [`Consent::Manual`]: answer with [`Host::answer`].
    ConsentRequested {
        permissions: Permissions,
        note: String,
        /// The security code of whoever asks: the operator's, or a supervisor's.
        sas: String,
        /// The question is whether a supervisor may watch too (answer VIEW to admit).
        supervisor: bool,
    },
    /// The full granted set changed.
    GrantsChanged(Permissions),
    /// Operator input, delivered only in a control session with CONTROL granted (and
    /// injected as well while a [`Host::share_x11_screen`] share with input is running).
    Input(pb::InputEvent),
    Chat(String),
    /// A pointer hint ("指差し") to draw; allowed in view-only sessions, never input.
    Pointer(pb::PointerHint),
    /// Keys the operator shows the customer to press ("keyboard display"); never
    /// injected, allowed in view-only sessions.
    KeyDisplay {
        keys: Vec<String>,
        note: String,
    },
    /// The session reaches its time limit in `remaining_secs`.
    TimeWarning {
        remaining_secs: u64,
    },
    /// [`Consent::Manual`]: the operator offers a file; answer with
    /// [`Host::answer_file`]. With `Approve`, files are accepted only if the approved
    /// set includes file transfer.
    FileOffered {
        transfer_id: u64,
        name: String,
        size: u64,
    },
    /// A file from the operator arrived whole, its SHA-256 checked. Held in memory only.
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
    /// A viewer lost frames: the next screen frame should be a key frame.
    KeyFrameRequested,
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
    granted: Permissions,
    /// The customer paused sharing: no screen leaves this host, and the relay's grant
    /// carries [`Permissions::PAUSED`].
    paused: bool,
    viewers: HashMap<u64, Peer>,
    /// The operator: the viewer the pairwise channels are for (the most recent one).
    current: Option<u64>,
    /// Supervisors and recorders by participant id, and whether each may have the
    /// group key: a supervisor the customer admitted; a recorder while RECORDING is
    /// granted.
    supervisors: HashMap<u64, (Peer, bool)>,
    /// What screen frames are sealed with. `None` only if the system's randomness
    /// failed: then no screen leaves this host.
    group: Option<GroupKey>,
    ended: bool,
}

struct Shared {
    joined: Joined,
    mode: Mode,
    state: Mutex<State>,
    /// This participant's newest token (each resume brings a fresh one).
    token: Mutex<Vec<u8>>,
    key_frame_wanted: AtomicBool,
    /// A viewer just arrived (first join, or back after a relay move): it cannot
    /// decode a delta frame before a key frame, so deltas are withheld until one goes.
    viewer_needs_key: AtomicBool,
    /// This host re-sent its grant to a new relay, which has not confirmed it yet.
    regranting: AtomicBool,
    /// [`Host::force_resume`]: move as if the relay were lost.
    force_move: tokio::sync::Notify,
    counters: Counters,
    /// The grant the relay last confirmed (`GrantsChanged`), pause flag included.
    relay_grant: watch::Sender<Permissions>,
    /// Last chat, input, pointer, keyboard display or request, for the idle timeout.
    last_activity: Mutex<Instant>,
    /// This host's files on their way to the viewer.
    outgoing: crate::files::Outgoing,
    /// The real screen being shared, if any ([`Host::share_x11_screen`]).
    #[cfg(feature = "media")]
    screen: Mutex<Option<screen::ScreenLink>>,
}

/// What the receiving side dropped, by cause.
#[derive(Default)]
pub(crate) struct Counters {
    /// Screen pictures sealed and sent (each once, whoever watches).
    pub screen_sealed: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicates: AtomicU64,
    pub out_of_order: AtomicU64,
    pub resumes: AtomicU64,
    pub relay_screen_drops: AtomicU64,
}

impl State {
    /// The grant as the relay must hold it: the permissions plus the pause flag.
    fn wire_grant(&self) -> Permissions {
        if self.paused {
            self.granted | Permissions::PAUSED
        } else {
            self.granted
        }
    }
}

/// What the application asks the driver to do; each answers with the grant sent.
enum Command {
    Revoke(Permissions, oneshot::Sender<Permissions>),
    Pause(bool, oneshot::Sender<Permissions>),
    /// The customer's decision on an offered file.
    File(u64, bool),
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than stopping, so keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// The grant, pause or end changed: a shared screen follows.
    fn screen_state_changed(&self) {
        #[cfg(feature = "media")]
        self.sync_screen();
    }

    /// Passes operator input the driver accepted to the screen share's injector.
    #[cfg_attr(not(feature = "media"), allow(unused_variables))]
    fn inject(&self, ev: &pb::InputEvent) {
        #[cfg(feature = "media")]
        if let Some(link) = self
            .screen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            link.inject(ev);
        }
    }

    fn token(&self) -> Vec<u8> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
    conduit: Arc<Conduit>,
    events: mpsc::Receiver<HostEvent>,
    answers: mpsc::UnboundedSender<Permissions>,
    commands: mpsc::UnboundedSender<Command>,
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
        Self::join_with_options(coordinator_url, code, config, HostOptions::default()).await
    }

    /// [`Host::join`] with time warnings and an idle timeout of the caller's choosing.
    pub async fn join_with_options(
        coordinator_url: &str,
        code: &str,
        config: HostConfig,
        options: HostOptions,
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
        Ok(Self::start_with_options(
            joined,
            me,
            link,
            welcome,
            config,
            options,
            Some(agent),
        ))
    }

    /// Starts a host on an attached link. `coordinator` receives `ReportConsent` and
    /// `ReportEnd` calls and answers `ResumeSession`; without it the session ends with
    /// its relay.
    #[doc(hidden)]
    // Public so integration tests can run a host against a test relay without a
    // coordinator; applications use `join`.
    pub fn start(
        joined: Joined,
        me: Keypair,
        link: RelayLink,
        welcome: pb::Welcome,
        config: HostConfig,
        coordinator: Option<AgentServiceClient<tonic::transport::Channel>>,
    ) -> Host {
        Self::start_with_options(
            joined,
            me,
            link,
            welcome,
            config,
            HostOptions::default(),
            coordinator,
        )
    }

    #[doc(hidden)]
    pub fn start_with_options(
        joined: Joined,
        me: Keypair,
        link: RelayLink,
        welcome: pb::Welcome,
        config: HostConfig,
        options: HostOptions,
        coordinator: Option<AgentServiceClient<tonic::transport::Channel>>,
    ) -> Host {
        let participant_id = link.participant_id();
        let (tx, rx) = link.into_parts();
        let mode = joined.claims.mode;
        let conduit = Arc::new(Conduit::new(tx, Role::Host, mode));
        let relay_id = joined.relay.relay_id.clone();
        let shared = Arc::new(Shared {
            token: Mutex::new(joined.token.clone()),
            joined,
            mode,
            state: Mutex::new(State {
                granted: Permissions::NONE,
                paused: false,
                viewers: HashMap::new(),
                current: None,
                supervisors: HashMap::new(),
                group: GroupKey::generate(1)
                    .inspect_err(|e| warn!(error = %e, "no group key: the screen is not shared"))
                    .ok(),
                ended: false,
            }),
            key_frame_wanted: AtomicBool::new(true),
            viewer_needs_key: AtomicBool::new(true),
            regranting: AtomicBool::new(false),
            force_move: tokio::sync::Notify::new(),
            counters: Counters::default(),
            relay_grant: watch::channel(Permissions::NONE).0,
            last_activity: Mutex::new(Instant::now()),
            outgoing: crate::files::Outgoing::default(),
            #[cfg(feature = "media")]
            screen: Mutex::new(None),
        });
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let mut reports = JoinSet::new();
        let reporter = coordinator.clone().map(|client| {
            let (tx, rx) = mpsc::channel(REPORT_QUEUE);
            reports.spawn(run_reporter(client, shared.clone(), rx));
            tx
        });
        let driver = Driver {
            shared: shared.clone(),
            me,
            conduit: conduit.clone(),
            events: events_tx,
            answers_tx: answers.clone(),
            commands_tx: commands.clone(),
            consent: config.consent,
            queue: VecDeque::new(),
            asking: None,
            resumer: Resumer::new(coordinator, Role::Host),
            reporter,
            relay_id,
            tracker: RecvTracker::default(),
            follow: None,
            replays: JoinSet::new(),
            prompts: JoinSet::new(),
            reports,
            options,
            warned: Vec::new(),
            idle_hangup: None,
            incoming: crate::files::Receiver::default(),
        };
        let mut tasks = JoinSet::new();
        let span = tracing::info_span!(
            "host",
            session = %shared.joined.session_id,
            participant = participant_id
        );
        tasks.spawn(
            driver
                .run(rx, answers_rx, commands_rx, welcome, cancel.clone())
                .instrument(span),
        );
        Host {
            shared,
            participant_id,
            conduit,
            events,
            answers,
            commands,
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

    /// Supervisors that attached, and whether the customer admitted each.
    pub fn supervisors(&self) -> Vec<(u64, bool)> {
        let mut v: Vec<(u64, bool)> = self
            .shared
            .state()
            .supervisors
            .iter()
            .map(|(id, (_, admitted))| (*id, *admitted))
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether a recorder attached on this host's relay may have the screen now (the
    /// customer allowed recording): what the on-screen indicator shows.
    pub fn is_recording(&self) -> bool {
        let state = self.shared.state();
        state.supervisors.values().any(|(p, admitted)| {
            p.role == Role::Recorder
                && *admitted
                && self.conduit.reaches(p.participant_id).is_some()
        })
    }

    /// The group key's epoch: it grows by one whenever an admitted supervisor leaves.
    pub fn group_epoch(&self) -> Option<u32> {
        self.shared.state().group.as_ref().map(GroupKey::epoch)
    }

    /// Screen pictures sealed and sent: each once, however many watch.
    pub fn screen_frames_sealed(&self) -> u64 {
        self.shared.counters.screen_sealed.load(Ordering::Relaxed)
    }

    /// Bytes this host sent to its current relay (every QUIC datagram, all streams).
    pub fn bytes_sent_to_relay(&self) -> u64 {
        self.conduit.tx().path_stats().1.udp_tx.bytes
    }

    pub fn participant_id(&self) -> u64 {
        self.participant_id
    }

    /// The full set the customer has granted so far.
    pub fn granted(&self) -> Permissions {
        self.shared.state().granted
    }

    /// Whether the customer has paused sharing.
    pub fn is_paused(&self) -> bool {
        self.shared.state().paused
    }

    /// Withdraws `perms` at once: the host stops sending and obeying what they allowed,
    /// tells the relay (which enforces from the next frame it reads), the viewer and the
    /// coordinator. Returns the granted set left, once the relay has confirmed it: from
    /// then on the relay refuses whatever the revoked permissions allowed.
    pub async fn revoke(&self, perms: Permissions) -> Result<Permissions, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Revoke(perms, tx))
            .map_err(|_| AgentError::Ended)?;
        let wire = rx.await.map_err(|_| AgentError::Ended)?;
        self.confirmed(wire, "revoke").await?;
        Ok(wire.permissions())
    }

    /// Sends `data` to the operator as file `name` (the customer chose to send it):
    /// returns once the viewer has checked its SHA-256. Needs the file-transfer grant;
    /// a revoke stops it between two chunks.
    pub async fn send_file(&self, name: &str, data: &[u8]) -> Result<(), crate::files::FileError> {
        let peer = {
            let state = self.shared.state();
            state.current.and_then(|id| state.viewers.get(&id)).cloned()
        }
        .ok_or(crate::files::FileError::Ended)?;
        self.shared.touch();
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

    /// Answers a [`HostEvent::FileOffered`]: accept or refuse the file.
    pub fn answer_file(&self, transfer_id: u64, accept: bool) -> Result<(), AgentError> {
        self.commands
            .send(Command::File(transfer_id, accept))
            .map_err(|_| AgentError::Ended)
    }

    /// Pauses sharing (passwords, private data): from now no screen frame leaves this
    /// host, and once this returns the relay drops any that would. The viewer is told
    /// ("paused"), and the coordinator records PAUSED.
    pub async fn pause_sharing(&self) -> Result<(), AgentError> {
        self.set_paused(true).await
    }

    /// Resumes sharing after [`Host::pause_sharing`]; the next frame is a key frame.
    pub async fn resume_sharing(&self) -> Result<(), AgentError> {
        self.set_paused(false).await
    }

    async fn set_paused(&self, paused: bool) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Pause(paused, tx))
            .map_err(|_| AgentError::Ended)?;
        let wire = rx.await.map_err(|_| AgentError::Ended)?;
        self.confirmed(wire, if paused { "pause" } else { "resume" })
            .await
    }

    /// Waits until the relay confirms it holds `wire` as the grant.
    async fn confirmed(&self, wire: Permissions, what: &'static str) -> Result<(), AgentError> {
        let mut rx = self.shared.relay_grant.subscribe();
        match tokio::time::timeout(CONFIRM_TIMEOUT, rx.wait_for(|g| *g == wire)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(AgentError::Ended),
            Err(_) => Err(AgentError::NotConfirmed {
                what,
                waited: CONFIRM_TIMEOUT,
            }),
        }
    }

    /// Frames from the viewer dropped because they were not allowed, did not decrypt,
    /// or arrived out of order.
    pub fn dropped_frames(&self) -> u64 {
        self.shared.counters.dropped.load(Ordering::Relaxed)
    }

    /// Reliable frames from the viewer received again after a relay move and dropped
    /// (they had been delivered already).
    pub fn duplicate_frames(&self) -> u64 {
        self.shared.counters.duplicates.load(Ordering::Relaxed)
    }

    /// Reliable frames from the viewer that arrived ahead of a missing one and were
    /// dropped until the replay filled the gap (a protocol error if it persists).
    pub fn out_of_order_frames(&self) -> u64 {
        self.shared.counters.out_of_order.load(Ordering::Relaxed)
    }

    /// How many times the session moved to another relay.
    pub fn resumes(&self) -> u64 {
        self.shared.counters.resumes.load(Ordering::Relaxed)
    }

    /// Frames sent on `channel` that the viewer has not acknowledged yet.
    pub fn unacked(&self, channel: Channel) -> usize {
        self.conduit.unacked(channel)
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

    /// Sends a screen frame to the operator and every admitted supervisor, sealed once
    /// under the group key (a key frame goes after the group key, sealed for each of
    /// them). `Ok(false)`: withheld, because VIEW is not granted or the operator is not
    /// attached to this host's relay (the session is moving). After a withheld or
    /// failed frame, [`Host::wants_key_frame`] is set: whoever sees the next frame has
    /// missed the ones before.
    pub async fn send_screen(&self, frame: pb::ScreenFrame) -> Result<bool, AgentError> {
        send_screen_via(&self.shared, &self.conduit, frame).await
    }

    /// Sends a screen frame whatever is granted or paused.
    #[doc(hidden)]
    // Exists for tests that play a modified host, to prove the relay refuses it.
    pub async fn send_screen_unchecked(&self, frame: pb::ScreenFrame) -> Result<(), AgentError> {
        let flags = if frame.key_frame { FLAG_KEY_FRAME } else { 0 };
        self.send_ungated(Channel::Screen, flags, &frame.encode_to_vec())
            .await
    }

    /// Sends this machine's whole system information whatever is granted.
    #[doc(hidden)]
    // Exists for tests that play a modified host, to prove the relay refuses it.
    pub async fn send_system_info_unchecked(&self) -> Result<(), AgentError> {
        let info = crate::sysinfo::collect();
        self.send_ungated(Channel::SystemInfo, 0, &info.encode_to_vec())
            .await
    }

    async fn send_ungated(
        &self,
        channel: Channel,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), AgentError> {
        let peer = {
            let state = self.shared.state();
            state
                .current
                .and_then(|id| state.viewers.get(&id))
                .cloned()
                .ok_or(AgentError::NoPeer)?
        };
        self.conduit
            .send_with(
                &peer.keys,
                peer.participant_id,
                channel,
                flags,
                payload,
                Via::Ungated,
            )
            .await
    }

    /// Moves the session to another relay as if this host had lost its relay (its own
    /// network path broke while the relay and the viewer's path are fine): the viewer
    /// notices its peer left and follows.
    #[doc(hidden)]
    // Exists for tests of the one-sided loss; a real loss is detected by the link.
    pub fn force_resume(&self) {
        self.shared.force_move.notify_one();
    }

    /// Whether the next screen frame should be a key frame (a viewer asked, joined,
    /// came back after a relay move, or missed frames), clearing the request. For
    /// applications that drive the screen themselves; [`Host::run_synthetic`] does this.
    pub fn wants_key_frame(&self) -> bool {
        self.shared.key_frame_wanted.swap(false, Ordering::Relaxed)
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
        self.shared.touch();
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

    /// Ends the session for everyone: sends `Hangup`, waits briefly for the relay to
    /// close, then leaves.
    pub async fn hangup(&self, reason: pb::EndReason, detail: &str) -> Result<(), AgentError> {
        hangup(&self.conduit.tx(), reason, detail).await
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
        self.conduit.end();
    }
}

/// [`Host::send_screen`], for tasks that hold the host's parts rather than the host.
async fn send_screen_via(
    shared: &Shared,
    conduit: &Conduit,
    frame: pb::ScreenFrame,
) -> Result<bool, AgentError> {
    let (peer, link, group, holders) = {
        let state = shared.state();
        if state.ended {
            return Err(AgentError::Ended);
        }
        let peer = state.current.and_then(|id| state.viewers.get(&id));
        let group = state.group.clone();
        // Presence first: the driver marks a returning viewer as needing a key
        // frame before it marks it present, so a present viewer's flag is seen.
        let reachable = peer.and_then(|p| conduit.reaches(p.participant_id));
        let needs_key = !frame.key_frame && shared.viewer_needs_key.load(Ordering::Acquire);
        // After a move the new relay drops screen frames until it has applied the
        // grant this host re-sent: a key frame lost that way would leave the viewer
        // with deltas it cannot decode.
        let regranting = shared.regranting.load(Ordering::Acquire);
        match (peer, reachable, group) {
            (Some(p), Some(link), Some(group))
                if !needs_key
                    && !regranting
                    && may_forward(
                        Channel::Screen,
                        Role::Host,
                        shared.mode,
                        state.wire_grant(),
                    )
                    .is_ok() =>
            {
                // Before a key frame, everyone who may watch gets the group key again:
                // whoever missed it (joined, came back, was admitted) starts here.
                let holders: Vec<Peer> = if frame.key_frame {
                    std::iter::once(p.clone())
                        .chain(
                            state
                                .supervisors
                                .values()
                                .filter(|(s, admitted)| {
                                    *admitted && conduit.reaches(s.participant_id).is_some()
                                })
                                .map(|(s, _)| s.clone()),
                        )
                        .collect()
                } else {
                    Vec::new()
                };
                (p.clone(), link, group, holders)
            }
            _ => {
                shared.key_frame_wanted.store(true, Ordering::Relaxed);
                return Ok(false);
            }
        }
    };
    let flags = if frame.key_frame { FLAG_KEY_FRAME } else { 0 };
    let payload = frame.encode_to_vec();
    let envelope = pb::ScreenFrame {
        group_key: Some(group.to_pb()),
        ..Default::default()
    }
    .encode_to_vec();
    let mut sent = Ok(());
    for h in &holders {
        // Flagged like a key frame so a relay that skips deltas for a slow viewer
        // still lets it through.
        sent = conduit
            .send_with(
                &h.keys,
                h.participant_id,
                Channel::Screen,
                FLAG_KEY_FRAME,
                &envelope,
                Via::Link(link),
            )
            .await;
        if sent.is_err() {
            break;
        }
    }
    // One ciphertext for every viewer; only on the link the operator was seen on:
    // after a move it needs a key frame.
    if sent.is_ok() {
        sent = conduit
            .send_with(
                group.keys(),
                peer.participant_id,
                Channel::Screen,
                flags,
                &payload,
                Via::Link(link),
            )
            .await;
        if sent.is_ok() {
            shared
                .counters
                .screen_sealed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    match sent {
        Ok(()) => {
            if frame.key_frame {
                shared.viewer_needs_key.store(false, Ordering::Release);
            }
            Ok(true)
        }
        Err(AgentError::Moved) => {
            shared.key_frame_wanted.store(true, Ordering::Relaxed);
            Ok(false)
        }
        Err(e) => {
            shared.key_frame_wanted.store(true, Ordering::Relaxed);
            Err(e)
        }
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
    conduit: Arc<Conduit>,
    events: mpsc::Sender<HostEvent>,
    answers_tx: mpsc::UnboundedSender<Permissions>,
    commands_tx: mpsc::UnboundedSender<Command>,
    consent: Consent,
    /// Questions waiting for the customer, oldest first.
    queue: VecDeque<ConsentRequest>,
    /// The question the customer is looking at now. One at a time, so an answer is
    /// never applied to the wrong question.
    asking: Option<ConsentRequest>,
    resumer: Resumer,
    /// Reports for the coordinator, sent one at a time, in order, by `reports`.
    reporter: Option<mpsc::Sender<Report>>,
    /// The relay this host is attached to now.
    relay_id: String,
    /// What was delivered from each viewer, for duplicates and acks.
    tracker: RecvTracker,
    /// Asking the coordinator whether the viewer moved the session elsewhere.
    follow: Option<Follow>,
    // Replays of kept frames: they may wait on flow control while the driver reads on.
    replays: JoinSet<()>,
    // Terminal prompts: a prompt left open when the session ends is abandoned.
    prompts: JoinSet<()>,
    // The reporter task: each call bounded, the queue drained before the driver stops.
    reports: JoinSet<()>,
    options: HostOptions,
    /// Time warnings already given.
    warned: Vec<Duration>,
    /// Set when this host hung up for idleness, so its end says so.
    idle_hangup: Option<String>,
    /// Files the operator is sending.
    incoming: crate::files::Receiver,
}

/// When to ask next whether the peer moved the session, and until when to keep asking.
pub(crate) struct Follow {
    pub at: tokio::time::Instant,
    pub delay: Duration,
    pub until: tokio::time::Instant,
}

impl Follow {
    pub(crate) fn start() -> Self {
        let now = tokio::time::Instant::now();
        Self {
            at: now + FOLLOW_FIRST,
            delay: FOLLOW_FIRST,
            until: now + FOLLOW_FOR,
        }
    }

    /// The next check, or `None` once the peer has been gone for [`FOLLOW_FOR`].
    pub(crate) fn next(self) -> Option<Self> {
        let delay = (self.delay * 2).min(FOLLOW_MAX);
        let at = tokio::time::Instant::now() + delay;
        (at < self.until).then_some(Self { at, delay, ..self })
    }
}

enum Flow {
    Continue,
    Stop,
    /// The relay is gone (or going): resume elsewhere. `reason` is how the session
    /// ends if that fails.
    Move {
        why: String,
        reason: pb::EndReason,
    },
    /// Time to ask whether the viewer moved the session.
    Follow,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: LinkReceiver,
        mut answers: mpsc::UnboundedReceiver<Permissions>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        welcome: pb::Welcome,
        cancel: CancellationToken,
    ) {
        self.on_welcome(welcome).await;
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
                Some(answer) = answers.recv() => { self.on_answer(answer).await; Flow::Continue }
                Some(command) = commands.recv() => { self.on_command(command).await; Flow::Continue }
                _ = ticks.tick() => { self.tick().await; Flow::Continue }
                _ = tokio::time::sleep_until(follow_at.unwrap_or_else(tokio::time::Instant::now)), if follow_at.is_some() => Flow::Follow,
                () = self.shared.force_move.notified() => Flow::Move {
                    why: "asked to move (test hook)".into(),
                    reason: pb::EndReason::Unspecified,
                },
                Some(_) = self.replays.join_next(), if !self.replays.is_empty() => Flow::Continue,
                Some(_) = self.prompts.join_next(), if !self.prompts.is_empty() => Flow::Continue,
                Some(_) = self.reports.join_next(), if !self.reports.is_empty() => Flow::Continue,
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
        // Let the reports already queued go out (each is bounded by REPORT_TIMEOUT);
        // open prompts are aborted when `prompts` drops.
        self.reporter = None;
        while self.reports.join_next().await.is_some() {}
    }

    async fn emit(&self, ev: HostEvent) {
        // The application dropped its receiver: nobody to tell, keep enforcing anyway.
        let _ = self.events.send(ev).await;
    }

    fn spawn_replay(&mut self) {
        self.replays.spawn(self.conduit.clone().replay_opened());
    }

    /// What the relay's Welcome says, on the first attach and after every move.
    async fn on_welcome(&mut self, welcome: pb::Welcome) {
        let relay_granted = Permissions::from_bits(welcome.granted).unwrap_or(Permissions::NONE);
        self.shared.relay_grant.send_replace(relay_granted);
        let mine = self.shared.state().wire_grant();
        if relay_granted != mine {
            // A new relay starts with nothing granted, and grants this process did not
            // hear the customer give do not count: the relay gets this host's set.
            if !mine.is_empty() {
                self.shared.regranting.store(true, Ordering::Release);
            }
            self.send_grant(mine).await;
        }
        if self.conduit.set_relay_granted(relay_granted) {
            self.spawn_replay();
        }
        // The operator first: the customer is asked about it before any supervisor
        // that happened to attach earlier (the role byte only orders; every token is
        // verified in full).
        let (operators, others): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = welcome
            .peer_tokens
            .iter()
            .partition(|t| t.get(1) == Some(&(Role::Viewer as u8)));
        for token in operators.into_iter().chain(others) {
            self.accept_viewer(token).await;
        }
    }

    /// The link failed without the session ending: resume if the relay is what was
    /// lost, otherwise end.
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
            Kind::PeerJoined(p) => self.accept_viewer(&p.token).await,
            Kind::PeerLeft(p) => {
                // Kept (keys, kept frames, what was delivered): a viewer that left
                // because its relay died comes back with the same key.
                info!(participant = p.participant_id, "viewer left");
                let current = self.shared.state().current;
                let _ = self.conduit.set_present(p.participant_id, false);
                self.supervisor_left(p.participant_id).await;
                self.queue.retain(|r| r.viewer != p.participant_id);
                if current == Some(p.participant_id) {
                    self.follow = Some(Follow::start());
                }
            }
            Kind::GrantsChanged(g) => {
                debug!(granted = g.granted, "relay confirms grants");
                let granted = Permissions::from_bits(g.granted).unwrap_or(Permissions::NONE);
                self.shared.regranting.store(false, Ordering::Release);
                self.shared.relay_grant.send_replace(granted);
                if self.conduit.set_relay_granted(granted) {
                    self.spawn_replay();
                }
            }
            Kind::KeyFrameRequest(_) => {
                self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
                self.shared
                    .counters
                    .relay_screen_drops
                    .fetch_add(1, Ordering::Relaxed);
                self.emit(HostEvent::KeyFrameRequested).await;
            }
            Kind::SessionEnded(e) if reason_of(e.reason) == pb::EndReason::RelayShutdown => {
                // The relay is going away, not the session: it goes on elsewhere.
                return Flow::Move {
                    why: format!("the relay is shutting down: {}", e.detail),
                    reason: pb::EndReason::RelayShutdown,
                };
            }
            Kind::SessionEnded(e) => {
                self.end(reason_of(e.reason), e.detail).await;
                return Flow::Stop;
            }
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

    /// Moves the session to another relay: asks the coordinator, attaches, keeps the
    /// keys and sequence numbers, re-sends the grant and replays what is unacked.
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

    /// Switches to the new relay's link and tells the application.
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
        // The viewer may have missed frames while the session moved.
        self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
        self.on_welcome(welcome).await;
        self.shared.counters.resumes.fetch_add(1, Ordering::Relaxed);
        let after_ms = u64::try_from(lost_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(relay = %self.relay_id, after_ms, "session resumed");
        self.emit(HostEvent::Resumed {
            relay_id: self.relay_id.clone(),
            after_ms,
        })
        .await;
        rx
    }

    /// Periodic work: acknowledge what was delivered, write again what the viewer
    /// has left unacknowledged for too long.
    async fn tick(&mut self) {
        if self.tracker.is_dirty() {
            self.send_acks().await;
        }
        self.check_time().await;
        if self.replays.is_empty() && self.conduit.has_unacked() {
            self.replays
                .spawn(self.conduit.clone().retransmit_stalled(RETRANSMIT_AFTER));
        }
    }

    async fn send_acks(&mut self) {
        let viewers: Vec<Peer> = self.shared.state().viewers.values().cloned().collect();
        for v in viewers {
            let ack = self.tracker.ack_for(v.participant_id);
            if ack.channels.is_empty() {
                continue;
            }
            if let Err(e) = self.conduit.send_ack(&v.keys, v.participant_id, &ack).await {
                debug!(error = %e, "ack not sent; the next one carries it");
            }
        }
    }

    async fn accept_viewer(&mut self, token: &[u8]) {
        let peer = match peer::accept_peer(
            token,
            &self.shared.joined,
            &[Role::Viewer, Role::Supervisor, Role::Recorder],
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
        if matches!(peer.role, Role::Supervisor | Role::Recorder) {
            self.accept_supervisor(peer).await;
            return;
        }
        let id = peer.participant_id;
        let sas = peer.sas().to_owned();
        let known = self
            .shared
            .state()
            .viewers
            .get(&id)
            .map(|p| p.public_key == peer.public_key);
        match known {
            Some(false) => {
                // The coordinator binds one key per participant for the whole session:
                // another key under a known id is not the person the customer approved.
                warn!(
                    participant = id,
                    "a known viewer came back with another public key; refused"
                );
                return;
            }
            Some(true) => {
                // The same viewer again: its token in Welcome and PeerJoined, or back
                // after a relay move. Nothing to tell or ask; it gets what it missed.
                self.viewer_present(id).await;
                return;
            }
            None => {}
        }
        {
            let mut state = self.shared.state();
            state.viewers.insert(id, peer);
            state.current = Some(id);
        }
        if self.conduit.set_peer(Some(id)) {
            self.spawn_replay();
        }
        self.viewer_present(id).await;
        info!(participant = id, %sas, "viewer joined");
        self.emit(HostEvent::PeerJoined {
            participant_id: id,
            sas: sas.clone(),
        })
        .await;
        // Joining is the operator's request to see the screen.
        self.report_activity(pb::EventKind::PermissionRequested, Permissions::VIEW);
        self.request(ConsentRequest {
            viewer: id,
            permissions: Permissions::VIEW,
            note: "the operator asks to see your screen".into(),
            sas,
            supervisor: false,
        })
        .await;
    }

    /// A supervisor attached: the first time, the customer is asked whether it may
    /// watch; after a relay move it only needs the group key and a key frame again.
    async fn accept_supervisor(&mut self, peer: Peer) {
        let id = peer.participant_id;
        let sas = peer.sas().to_owned();
        let known = self
            .shared
            .state()
            .supervisors
            .get(&id)
            .map(|(p, _)| p.public_key == peer.public_key);
        match known {
            Some(false) => {
                warn!(
                    participant = id,
                    "a known supervisor came back with another public key; refused"
                );
                return;
            }
            Some(true) => {
                let _ = self.conduit.set_present(id, true);
                self.want_key_frame();
                return;
            }
            None => {}
        }
        if peer.role == Role::Recorder {
            self.accept_recorder(peer).await;
            return;
        }
        self.shared.state().supervisors.insert(id, (peer, false));
        let _ = self.conduit.set_present(id, true);
        info!(participant = id, %sas, "supervisor joined");
        self.emit(HostEvent::SupervisorJoined {
            participant_id: id,
            sas: sas.clone(),
        })
        .await;
        self.queue.push_back(ConsentRequest {
            viewer: id,
            permissions: Permissions::VIEW,
            note: "a supervisor asks to watch your screen too".into(),
            sas,
            supervisor: true,
        });
        self.ask_next().await;
    }

    /// A recorder attached for the first time: it may have the group key while the
    /// customer allows recording, which is asked now if it was not already.
    async fn accept_recorder(&mut self, peer: Peer) {
        let id = peer.participant_id;
        let sas = peer.sas().to_owned();
        let recording = self.shared.state().granted.contains(Permissions::RECORDING);
        self.shared
            .state()
            .supervisors
            .insert(id, (peer, recording));
        let _ = self.conduit.set_present(id, true);
        info!(participant = id, recording, "recorder joined");
        self.emit(HostEvent::RecorderJoined { participant_id: id })
            .await;
        if recording {
            self.want_key_frame();
        } else {
            self.report_activity(pb::EventKind::PermissionRequested, Permissions::RECORDING);
            self.request(ConsentRequest {
                viewer: id,
                permissions: Permissions::RECORDING,
                note: "the operator wants to record this session".into(),
                sas,
                supervisor: false,
            })
            .await;
        }
    }

    /// RECORDING was granted or withdrawn: recorders get the group key, or lose it
    /// (a new key, so what they hold opens nothing that follows).
    pub(super) fn recording_changed(&mut self, granted: bool) {
        let rotate = {
            let mut state = self.shared.state();
            let mut changed = false;
            for (peer, admitted) in state.supervisors.values_mut() {
                if peer.role == Role::Recorder && *admitted != granted {
                    *admitted = granted;
                    changed = true;
                }
            }
            if changed && !granted {
                state.group = match state.group.as_ref().map(GroupKey::rotate) {
                    Some(Ok(g)) => Some(g),
                    Some(Err(e)) => {
                        warn!(error = %e, "no new group key: the screen stops");
                        None
                    }
                    None => None,
                };
            }
            changed
        };
        if rotate {
            self.want_key_frame();
        }
    }

    /// The customer's answer about a supervisor.
    async fn on_admission(&mut self, id: u64, admitted: bool) {
        let known = match self.shared.state().supervisors.get_mut(&id) {
            Some(entry) => {
                entry.1 = admitted;
                true
            }
            None => false,
        };
        if !known {
            return;
        }
        info!(participant = id, admitted, "customer answered a supervisor");
        if admitted {
            // It holds nothing yet: the group key goes before the next key frame.
            self.want_key_frame();
        }
        let kind = if admitted {
            pb::EventKind::SupervisorAdmitted
        } else {
            pb::EventKind::SupervisorRefused
        };
        self.queue_report(Report::Activity {
            kind,
            permissions: Permissions::VIEW,
            remaining_secs: 0,
            detail: format!("supervisor {id}"),
        });
        self.emit(HostEvent::SupervisorAnswered {
            participant_id: id,
            admitted,
        })
        .await;
    }

    /// A supervisor left (for good, or to follow the session to another relay): what
    /// follows is sealed under a new group key, handed only to those still here.
    async fn supervisor_left(&mut self, id: u64) {
        let rotated = {
            let mut state = self.shared.state();
            match state.supervisors.get(&id) {
                Some((_, true)) => {
                    let next = state.group.as_ref().map(GroupKey::rotate);
                    state.group = match next {
                        Some(Ok(g)) => Some(g),
                        Some(Err(e)) => {
                            warn!(error = %e, "no new group key: the screen stops");
                            None
                        }
                        None => None,
                    };
                    Some(true)
                }
                Some((_, false)) => Some(false),
                None => None,
            }
        };
        let Some(rotated) = rotated else { return };
        self.queue.retain(|r| r.viewer != id);
        if rotated {
            self.want_key_frame();
        }
        let recorder = self
            .shared
            .state()
            .supervisors
            .get(&id)
            .is_some_and(|(p, _)| p.role == Role::Recorder);
        info!(participant = id, rotated, recorder, "watcher left");
        self.emit(if recorder {
            HostEvent::RecorderLeft { participant_id: id }
        } else {
            HostEvent::SupervisorLeft { participant_id: id }
        })
        .await;
    }

    /// The next screen frame must be a key frame, with the group key before it, and no
    /// delta goes out until it has.
    fn want_key_frame(&self) {
        self.shared.viewer_needs_key.store(true, Ordering::Release);
        self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
    }

    /// A viewer is attached on the current link: replay to it, tell it what was
    /// delivered, and give it a key frame.
    async fn viewer_present(&mut self, id: u64) {
        if self.shared.state().current == Some(id) {
            self.follow = None;
        }
        if self.conduit.reaches(id).is_none() {
            // Screen frames were withheld while it was away.
            self.shared.viewer_needs_key.store(true, Ordering::Release);
            self.shared.key_frame_wanted.store(true, Ordering::Relaxed);
        }
        if self.conduit.set_present(id, true) {
            self.spawn_replay();
        }
        let peer = self.shared.state().viewers.get(&id).cloned();
        if let Some(peer) = peer {
            let ack = self.tracker.ack_for(id);
            if !ack.channels.is_empty()
                && let Err(e) = self.conduit.send_ack(&peer.keys, id, &ack).await
            {
                debug!(error = %e, "ack not sent; the next one carries it");
            }
        }
    }

    /// Queues a question for the customer, unless there is nothing to ask.
    async fn request(&mut self, req: ConsentRequest) {
        let claims = &self.shared.joined.claims;
        let asked = req.permissions;
        let askable = consent::askable(asked, claims.permissions, claims.mode);
        let granted = self.shared.state().granted;
        let refused_unasked = asked.without(askable);
        if !refused_unasked.is_empty() {
            // A view-only session never upgrades to control (nor gains anything else
            // it was not created with): refused without asking the customer.
            info!(refused = %refused_unasked, "request exceeds what this session allows");
            self.report(granted, refused_unasked);
            self.tell_viewer(pb::control_message::Kind::ConsentAnswer(
                pb::ConsentAnswer {
                    granted: granted.bits(),
                    denied: refused_unasked.bits(),
                    revoked: 0,
                },
            ))
            .await;
        }
        // One question per capability: the customer may allow the screen and refuse
        // control, or allow system information and refuse file transfer.
        for single in askable.without(granted).singles() {
            self.queue.push_back(ConsentRequest {
                permissions: single,
                ..req.clone()
            });
        }
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
                    sas: req.sas,
                    supervisor: req.supervisor,
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
        if req.supervisor {
            self.on_admission(req.viewer, answer.contains(Permissions::VIEW))
                .await;
            self.ask_next().await;
            return;
        }
        // A viewer that left while the customer was deciding gets nothing.
        let viewer_present = {
            let state = self.shared.state();
            state.viewers.contains_key(&req.viewer) || state.supervisors.contains_key(&req.viewer)
        };
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
                let wire = {
                    let mut state = self.shared.state();
                    state.granted = d.granted;
                    state.wire_grant()
                };
                self.shared.screen_state_changed();
                self.send_grant(wire).await;
                self.emit(HostEvent::GrantsChanged(d.granted)).await;
            }
            self.report(d.granted, d.denied);
            self.tell_viewer(pb::control_message::Kind::ConsentAnswer(
                pb::ConsentAnswer {
                    granted: d.granted.bits(),
                    denied: d.denied.bits(),
                    revoked: 0,
                },
            ))
            .await;
            self.on_granted(d.granted.without(current)).await;
        }
        self.ask_next().await;
    }

    async fn send_grant(&self, granted: Permissions) {
        let sig = pb::signal::Kind::Grant(pb::Grant {
            granted: granted.bits(),
        });
        if let Err(e) = self.conduit.tx().send_signal(sig).await {
            warn!(error = %e, "could not send the grant to the relay");
        }
    }

    async fn on_frame(&mut self, frame: Frame) {
        let channel = frame.header.channel;
        let seq = frame.header.seq;
        let opened = {
            let state = self.shared.state();
            state
                .viewers
                .values()
                .find_map(|p| p.open(&frame).ok().map(|pt| (p.participant_id, pt)))
        };
        let Some((from, plaintext)) = opened else {
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            warn!(
                channel = channel.name(),
                seq, "frame from the relay does not decrypt with any viewer's key; dropped"
            );
            return;
        };
        if channel == Channel::Ack {
            match peer::decode::<pb::Ack>(channel, &plaintext) {
                Ok(ack) => self.conduit.on_ack(from, &ack),
                Err(e) => warn!(error = %e, "bad ack"),
            }
            return;
        }
        if channel.is_replayed() {
            match self.tracker.accept(from, channel, seq) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    self.shared
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Verdict::Gap { expected } => {
                    self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
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
        let granted = self.shared.state().granted;
        // The same rule the relay applies, so a relay that forwards too much gains
        // nothing: input is obeyed only in a control session with CONTROL granted. A
        // refused frame still counts as delivered, so it is acknowledged and not sent
        // again.
        if let Err(denied) = may_forward(channel, Role::Viewer, self.shared.mode, granted) {
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            warn!(channel = channel.name(), seq, %denied, "dropped a frame from the viewer");
            return;
        }
        if matches!(
            channel,
            Channel::Input | Channel::Pointer | Channel::Chat | Channel::Control | Channel::File
        ) {
            self.shared.touch();
        }
        let event = match channel {
            Channel::Input => peer::decode::<pb::InputEvent>(channel, &plaintext).map(|ev| {
                self.shared.inject(&ev);
                HostEvent::Input(ev)
            }),
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
                    Ok(pb::ControlMessage {
                        kind: Some(pb::control_message::Kind::KeyDisplay(k)),
                    }) => {
                        // Shown like the pointer: only to a customer sharing the screen.
                        if granted.contains(Permissions::VIEW) {
                            self.emit(HostEvent::KeyDisplay {
                                keys: k.keys,
                                note: k.note,
                            })
                            .await;
                        } else {
                            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                            debug!("keyboard display before a view grant; dropped");
                        }
                    }
                    Ok(_) => debug!("control message not for the host"),
                    Err(e) => warn!(error = %e, "bad control message"),
                }
                return;
            }
            Channel::File => {
                match peer::decode::<pb::FileMessage>(channel, &plaintext) {
                    Ok(m) => self.on_file(m).await,
                    Err(e) => warn!(error = %e, "bad file message"),
                }
                return;
            }
            Channel::Screen | Channel::Signal | Channel::Ack | Channel::SystemInfo => {
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
        let Some(asked) = Permissions::from_bits(r.permissions).map(Permissions::permissions)
        else {
            warn!(
                bits = r.permissions,
                "permission request with unknown bits; refused"
            );
            return;
        };
        self.report_activity(pb::EventKind::PermissionRequested, asked);
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
            supervisor: false,
        })
        .await;
    }

    async fn end(&mut self, reason: pb::EndReason, detail: String) {
        self.shared.state().ended = true;
        self.shared.screen_state_changed();
        self.shared.outgoing.cancel_all("the session ended");
        // The relay says "ended by the customer" for this host's idle hang-up.
        let (reason, detail) = match self.idle_hangup.take() {
            Some(why) if reason == pb::EndReason::EndedByCustomer => {
                (pb::EndReason::IdleTimeout, why)
            }
            _ => (reason, detail),
        };
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
        self.queue_report(Report::End {
            reason,
            detail: detail.chars().take(256).collect(),
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
