//! The node supervisor: the root actor of a relay. It spawns one linked `SessionActor`
//! per session and is told when one stops or fails. A failed session is ended on its own
//! (its participants are closed with `SESSION_FAILED`); the node and every other session
//! keep running, which is why this supervisor overrides ractor's default of stopping
//! itself when a child exits.

use std::collections::HashMap;
use std::sync::Arc;

use kakehashi_proto::dataplane::close;
use kakehashi_proto::pb::EndReason;
use kakehashi_proto::{Claims, SessionId};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{ForwardTap, RelayConfig};
use crate::session::{SessionActor, SessionArgs, SessionMsg, SessionShared};
use crate::stats::RelayStats;

/// What every task on the node may read.
pub(crate) struct NodeCtx {
    pub config: RelayConfig,
    pub stats: Arc<RelayStats>,
    pub tap: Option<ForwardTap>,
    /// Sessions with a live actor here, for the etcd registration and for drain, which
    /// waits on it instead of polling the supervisor.
    pub live_sessions: watch::Sender<usize>,
    /// Set once the relay starts draining; the registration publishes it.
    pub draining: watch::Sender<bool>,
}

impl NodeCtx {
    pub fn tap(&self, raw: &[u8]) {
        if let Some(tap) = &self.tap {
            tap(raw);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenRefused {
    #[error("the session has already ended")]
    Ended,
    #[error("this relay is at capacity ({0} sessions)")]
    AtCapacity(usize),
    #[error("the session could not be started on this relay")]
    Spawn,
    #[error("this relay is draining and takes no new sessions; resume elsewhere")]
    Draining,
}

pub(crate) struct Opened {
    pub actor: ActorRef<SessionMsg>,
    pub shared: Arc<SessionShared>,
}

pub(crate) enum NodeMsg {
    /// Finds or starts the session a verified token names.
    Open(Box<Claims>, RpcReplyPort<Result<Opened, OpenRefused>>),
    /// Ends a session (coordinator's request); replies whether it was live here.
    End {
        session_id: SessionId,
        reason: EndReason,
        detail: String,
        reply: RpcReplyPort<bool>,
    },
    /// Ends every session (relay shutdown).
    EndAll {
        reason: EndReason,
        detail: String,
    },
    /// The relay is going away: refuse new sessions and tell every participant of every
    /// session (now and joining later) to resume elsewhere within `grace_ms`.
    Drain {
        grace_ms: u32,
    },
    Count(RpcReplyPort<usize>),
    #[cfg(feature = "test-hooks")]
    Panic(SessionId, RpcReplyPort<bool>),
}

struct Entry {
    actor: ActorRef<SessionMsg>,
    shared: Arc<SessionShared>,
    /// When the actor started, for the session's `relay.session` span.
    started: std::time::SystemTime,
}

pub(crate) struct NodeState {
    ctx: Arc<NodeCtx>,
    sessions: HashMap<SessionId, Entry>,
    by_actor: HashMap<ActorId, SessionId>,
    /// Sessions that ended here, until their deadline: their tokens stay valid that
    /// long, and must not start the session afresh.
    ended: HashMap<SessionId, u64>,
    /// `Some(grace_ms)` once draining.
    draining: Option<u32>,
}

pub(crate) struct NodeSupervisor;

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeState;
    type Arguments = Arc<NodeCtx>;

    async fn pre_start(
        &self,
        _myself: ActorRef<NodeMsg>,
        ctx: Arc<NodeCtx>,
    ) -> Result<NodeState, ActorProcessingErr> {
        Ok(NodeState {
            ctx,
            sessions: HashMap::new(),
            by_actor: HashMap::new(),
            ended: HashMap::new(),
            draining: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeMsg>,
        msg: NodeMsg,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Open(claims, reply) => {
                let result = state.open(&myself, &claims).await;
                let _ = reply.send(result);
            }
            NodeMsg::End {
                session_id,
                reason,
                detail,
                reply,
            } => {
                let live = match state.sessions.get(&session_id) {
                    Some(e) => e.actor.cast(SessionMsg::End { reason, detail }).is_ok(),
                    None => false,
                };
                let _ = reply.send(live);
            }
            NodeMsg::EndAll { reason, detail } => {
                for e in state.sessions.values() {
                    let _ = e.actor.cast(SessionMsg::End {
                        reason,
                        detail: detail.clone(),
                    });
                }
            }
            NodeMsg::Drain { grace_ms } => {
                info!(
                    sessions = state.sessions.len(),
                    grace_ms, "draining: telling every participant to resume elsewhere"
                );
                state.draining = Some(grace_ms);
                state.ctx.draining.send_replace(true);
                for e in state.sessions.values() {
                    let _ = e.actor.cast(SessionMsg::Drain { grace_ms });
                }
            }
            NodeMsg::Count(reply) => {
                let _ = reply.send(state.sessions.len());
            }
            #[cfg(feature = "test-hooks")]
            NodeMsg::Panic(id, reply) => {
                let hit = state
                    .sessions
                    .get(&id)
                    .is_some_and(|e| e.actor.cast(SessionMsg::Panic).is_ok());
                let _ = reply.send(hit);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<NodeMsg>,
        event: SupervisionEvent,
        state: &mut NodeState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.remove(cell.get_id(), None);
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                state.remove(cell.get_id(), Some(err.to_string()));
            }
            _ => {}
        }
        Ok(())
    }
}

impl NodeState {
    async fn open(
        &mut self,
        myself: &ActorRef<NodeMsg>,
        claims: &Claims,
    ) -> Result<Opened, OpenRefused> {
        let id = claims.session_id;
        crate::otel::session_step(
            "relay.attach",
            id,
            std::time::SystemTime::now(),
            vec![
                opentelemetry::KeyValue::new("relay.id", self.ctx.config.relay_id.clone()),
                opentelemetry::KeyValue::new("participant.role", claims.role.name()),
            ],
        );
        if let Some(e) = self.sessions.get(&id) {
            return Ok(Opened {
                actor: e.actor.clone(),
                shared: e.shared.clone(),
            });
        }
        let now = kakehashi_proto::unix_now();
        self.ended.retain(|_, deadline| *deadline > now);
        if self.ended.contains_key(&id) {
            return Err(OpenRefused::Ended);
        }
        if self.draining.is_some() {
            return Err(OpenRefused::Draining);
        }
        let max = self.ctx.config.max_sessions;
        if self.sessions.len() >= max {
            return Err(OpenRefused::AtCapacity(max));
        }
        let shared = Arc::new(SessionShared::new(
            id,
            claims.mode,
            claims.permissions,
            claims.session_deadline,
        ));
        let args = SessionArgs {
            shared: shared.clone(),
            max_participants: self.ctx.config.max_participants_per_session,
        };
        let (actor, _join) = Actor::spawn_linked(None, SessionActor, args, myself.get_cell())
            .await
            .map_err(|e| {
                error!(session = %id, error = %e, "session actor failed to start");
                OpenRefused::Spawn
            })?;
        self.ctx.stats.session_started();
        self.by_actor.insert(actor.get_id(), id);
        self.sessions.insert(
            id,
            Entry {
                actor: actor.clone(),
                shared: shared.clone(),
                started: std::time::SystemTime::now(),
            },
        );
        self.ctx.live_sessions.send_replace(self.sessions.len());
        Ok(Opened { actor, shared })
    }

    fn remove(&mut self, actor: ActorId, failure: Option<String>) {
        let Some(id) = self.by_actor.remove(&actor) else {
            return;
        };
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        self.ctx.live_sessions.send_replace(self.sessions.len());
        self.ctx.stats.session_stopped(failure.is_some());
        crate::otel::session_step(
            "relay.session",
            id,
            entry.started,
            vec![
                opentelemetry::KeyValue::new("relay.id", self.ctx.config.relay_id.clone()),
                opentelemetry::KeyValue::new("session.failed", failure.is_some()),
            ],
        );
        match failure {
            Some(err) => {
                // The actor died mid-session: end this session only. Its participants
                // are told why; the tombstone keeps their tokens from restarting it.
                warn!(session = %id, error = %err, "session actor failed; ending that session only");
                entry
                    .shared
                    .terminate(close::SESSION_FAILED, "the session failed on the relay");
                self.ended.insert(id, entry.shared.deadline_unix);
            }
            None => {
                if entry.shared.is_ended() {
                    self.ended.insert(id, entry.shared.deadline_unix);
                }
                entry.shared.cancel.cancel();
                info!(session = %id, "session actor stopped");
            }
        }
    }
}
