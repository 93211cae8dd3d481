//! One actor per session: it owns who is attached, the customer's grants, the deadline
//! and how the session ends. Frames do not pass through it: participants' reader tasks
//! forward directly using the routing table the actor publishes, so the actor is off the
//! hot path and a frame costs no actor message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kakehashi_proto::dataplane::close;
use kakehashi_proto::pb::{self, EndReason, signal::Kind};
use kakehashi_proto::policy::cap_grant;
use kakehashi_proto::{Mode, Permissions, Role, SessionId};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type Timer = JoinHandle<Result<(), ractor::MessagingErr<SessionMsg>>>;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info};

use crate::outbox::Outbox;

/// After `SessionEnded` is sent, participants get this long to read it before the
/// actor stops and their connections are closed regardless.
const END_GRACE: Duration = Duration::from_secs(2);

/// State shared between the actor, the node and the participants' tasks.
pub(crate) struct SessionShared {
    pub id: SessionId,
    pub mode: Mode,
    pub permissions: Permissions,
    pub deadline_unix: u64,
    granted: AtomicU32,
    ended: AtomicBool,
    /// How participants' connections are closed when `cancel` fires.
    close: Mutex<(u32, String)>,
    /// Cancelled when the session is over for any reason, including its actor failing.
    pub cancel: CancellationToken,
}

impl SessionShared {
    pub fn new(id: SessionId, mode: Mode, permissions: Permissions, deadline_unix: u64) -> Self {
        Self {
            id,
            mode,
            permissions,
            deadline_unix,
            granted: AtomicU32::new(0),
            ended: AtomicBool::new(false),
            close: Mutex::new((close::ENDED, "session ended".into())),
            cancel: CancellationToken::new(),
        }
    }

    pub fn granted(&self) -> Permissions {
        Permissions::from_bits(self.granted.load(Ordering::Acquire)).unwrap_or(Permissions::NONE)
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub fn close_reason(&self) -> (u32, String) {
        self.close
            .lock()
            .map(|c| c.clone())
            .unwrap_or((close::ENDED, String::new()))
    }

    /// Records why the session is over and closes every participant's connection.
    pub fn terminate(&self, code: u32, reason: impl Into<String>) {
        if let Ok(mut c) = self.close.lock() {
            *c = (code, reason.into());
        }
        self.ended.store(true, Ordering::Release);
        self.cancel.cancel();
    }
}

/// Who gets a participant's frames. Published by the actor on every membership change.
#[derive(Default)]
pub(crate) struct Routes {
    pub host: Option<Arc<Outbox>>,
    /// The operator and supervisors: everyone but the host and recorders.
    pub others: Vec<Arc<Outbox>>,
    /// Recorders: sent the host's frames only while RECORDING is granted.
    pub recorders: Vec<Arc<Outbox>>,
}

pub(crate) struct Joining {
    pub role: Role,
    pub participant_id: u64,
    pub token: Bytes,
    /// Tells a replaced connection of the same participant from the current one.
    pub attach_id: u64,
    pub outbox: Arc<Outbox>,
}

pub(crate) struct Joined {
    pub granted: Permissions,
    pub peer_tokens: Vec<Bytes>,
    pub routes: watch::Receiver<Arc<Routes>>,
    /// Cancelled when this participant must go: session over, or replaced by a reconnect.
    pub cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum JoinRefused {
    #[error("the session has ended")]
    Ended,
    #[error("the session already has a customer (host) attached")]
    HostPresent,
    #[error(
        "the session already has an operator (viewer) attached; one operator per session, join others as supervisors"
    )]
    ViewerPresent,
    #[error("the session is full ({0} participants)")]
    Full(usize),
}

pub(crate) enum SessionMsg {
    Join(Box<Joining>, RpcReplyPort<Result<Joined, JoinRefused>>),
    Leave {
        participant_id: u64,
        attach_id: u64,
    },
    /// From the host only (checked by its connection task).
    Grant(Permissions),
    Hangup {
        role: Role,
        detail: String,
    },
    End {
        reason: EndReason,
        detail: String,
    },
    /// The relay is draining: participants must resume elsewhere within `grace_ms`.
    Drain {
        grace_ms: u32,
    },
    /// The end grace is over.
    Stop,
    #[cfg(feature = "test-hooks")]
    Panic,
}

pub(crate) struct SessionArgs {
    pub shared: Arc<SessionShared>,
    pub max_participants: usize,
}

struct Member {
    role: Role,
    token: Bytes,
    attach_id: u64,
    outbox: Arc<Outbox>,
    cancel: CancellationToken,
}

pub(crate) struct SessionState {
    shared: Arc<SessionShared>,
    max_participants: usize,
    members: BTreeMap<u64, Member>,
    routes: watch::Sender<Arc<Routes>>,
    ending: bool,
    /// `Some(grace_ms)` once the relay drains; late joiners are told at once.
    draining: Option<u32>,
    /// Deadline and end-grace timers; aborted when the actor stops.
    timers: Vec<Timer>,
    // Whatever way the actor goes, dropping its state cancels the session's tasks.
    _cancel_on_drop: DropGuard,
}

pub(crate) struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionState, ActorProcessingErr> {
        let shared = args.shared;
        let remaining = shared
            .deadline_unix
            .saturating_sub(kakehashi_proto::unix_now());
        // The deadline comes from the coordinator-signed token: the relay enforces the
        // session's max duration on its own, without asking anyone.
        let deadline_timer =
            myself.send_after(Duration::from_secs(remaining), || SessionMsg::End {
                reason: EndReason::TimeLimit,
                detail: "the session reached its maximum duration".into(),
            });
        debug!(session = %shared.id, remaining, "session actor started");
        Ok(SessionState {
            _cancel_on_drop: shared.cancel.clone().drop_guard(),
            shared,
            max_participants: args.max_participants,
            members: BTreeMap::new(),
            routes: watch::channel(Arc::new(Routes::default())).0,
            ending: false,
            draining: None,
            timers: vec![deadline_timer],
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.timers.drain(..) {
            t.abort();
        }
        state.shared.cancel.cancel();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SessionMsg::Join(joining, reply) => {
                let result = state.join(*joining);
                // The joiner may have given up (timeout); nothing to undo then, its
                // Leave follows.
                let _ = reply.send(result);
            }
            SessionMsg::Leave {
                participant_id,
                attach_id,
            } => {
                state.leave(participant_id, attach_id);
                if state.members.is_empty() {
                    // Nobody left to serve: a relay keeps no session without participants.
                    myself.stop(Some("no participants".into()));
                }
            }
            SessionMsg::Grant(requested) => state.grant(requested),
            SessionMsg::Hangup { role, detail } => {
                let reason = match role {
                    Role::Host => EndReason::EndedByCustomer,
                    _ => EndReason::EndedByOperator,
                };
                state.end(&myself, reason, detail);
            }
            SessionMsg::End { reason, detail } => state.end(&myself, reason, detail),
            SessionMsg::Drain { grace_ms } => {
                // The session is not ended: its participants move it to another relay
                // (AgentService.ResumeSession) and leave, which stops this actor.
                state.draining = Some(grace_ms);
                state.broadcast(Kind::Drain(pb::Drain { grace_ms }));
            }
            SessionMsg::Stop => myself.stop(Some("ended".into())),
            #[cfg(feature = "test-hooks")]
            SessionMsg::Panic => panic!("injected fault in session {}", state.shared.id),
        }
        Ok(())
    }
}

impl SessionState {
    fn join(&mut self, j: Joining) -> Result<Joined, JoinRefused> {
        if self.ending {
            return Err(JoinRefused::Ended);
        }
        // A reconnect of the same participant replaces its previous connection.
        if let Some(old) = self.members.remove(&j.participant_id) {
            old.cancel.cancel();
        }
        if j.role == Role::Host && self.members.values().any(|m| m.role == Role::Host) {
            return Err(JoinRefused::HostPresent);
        }
        // One operator per session: input, files and chat are the customer's exchange
        // with one person. Others watch as supervisors, admitted by the customer.
        if j.role == Role::Viewer && self.members.values().any(|m| m.role == Role::Viewer) {
            return Err(JoinRefused::ViewerPresent);
        }
        if self.members.len() >= self.max_participants {
            return Err(JoinRefused::Full(self.max_participants));
        }
        let peer_tokens = self.members.values().map(|m| m.token.clone()).collect();
        for m in self.members.values() {
            let _ = m.outbox.signal.try_send(Kind::PeerJoined(pb::PeerJoined {
                token: j.token.to_vec(),
            }));
        }
        let cancel = self.shared.cancel.child_token();
        info!(session = %self.shared.id, participant = j.participant_id, role = j.role.name(), "participant attached");
        self.members.insert(
            j.participant_id,
            Member {
                role: j.role,
                token: j.token,
                attach_id: j.attach_id,
                outbox: j.outbox,
                cancel: cancel.clone(),
            },
        );
        self.publish_routes();
        if let Some(grace_ms) = self.draining {
            // Queued behind the Welcome the connection sends first.
            let _ = self.members[&j.participant_id]
                .outbox
                .signal
                .try_send(Kind::Drain(pb::Drain { grace_ms }));
        }
        Ok(Joined {
            granted: self.shared.granted(),
            peer_tokens,
            routes: self.routes.subscribe(),
            cancel,
        })
    }

    fn leave(&mut self, participant_id: u64, attach_id: u64) {
        let current = self
            .members
            .get(&participant_id)
            .is_some_and(|m| m.attach_id == attach_id);
        if !current {
            return;
        }
        self.members.remove(&participant_id);
        info!(session = %self.shared.id, participant = participant_id, "participant left");
        self.publish_routes();
        self.broadcast(Kind::PeerLeft(pb::PeerLeft { participant_id }));
    }

    fn grant(&mut self, requested: Permissions) {
        let s = &self.shared;
        // The pause flag is the customer's to set whatever the session allows; it only
        // ever stops frames.
        let paused = requested & Permissions::PAUSED;
        let granted = cap_grant(requested, s.permissions, s.mode) | paused;
        s.granted.store(granted.bits(), Ordering::Release);
        info!(session = %s.id, %granted, "grants changed");
        self.broadcast(Kind::GrantsChanged(pb::GrantsChanged {
            granted: granted.bits(),
        }));
    }

    fn end(&mut self, myself: &ActorRef<SessionMsg>, reason: EndReason, detail: String) {
        if self.ending {
            return;
        }
        self.ending = true;
        info!(session = %self.shared.id, reason = reason.as_str_name(), %detail, "session ending");
        if let Ok(mut c) = self.shared.close.lock() {
            *c = (
                close::ENDED,
                format!("session ended: {}", reason.as_str_name()),
            );
        }
        self.shared.ended.store(true, Ordering::Release);
        self.broadcast(Kind::SessionEnded(pb::SessionEnded {
            reason: reason as i32,
            detail,
        }));
        if self.members.is_empty() {
            myself.stop(Some("ended".into()));
        } else {
            self.timers
                .push(myself.send_after(END_GRACE, || SessionMsg::Stop));
        }
    }

    fn broadcast(&self, kind: Kind) {
        for m in self.members.values() {
            // A participant whose signal queue is full is not reading; it will be closed
            // by the session's end or its idle timeout, and must not stall the others.
            let _ = m.outbox.signal.try_send(kind.clone());
        }
    }

    fn publish_routes(&self) {
        let mut routes = Routes::default();
        for m in self.members.values() {
            match m.role {
                Role::Host => routes.host = Some(m.outbox.clone()),
                Role::Recorder => routes.recorders.push(m.outbox.clone()),
                _ => routes.others.push(m.outbox.clone()),
            }
        }
        self.routes.send_replace(Arc::new(routes));
    }
}
