//! One participant's QUIC connection: attach (hello, token, session), then the signal
//! stream, the data streams it sends on, and the writers for what it receives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kakehashi_proto::dataplane::{self, close};
use kakehashi_proto::frame::{FrameDecoder, ReadError, read_frame};
use kakehashi_proto::pb::{self, signal::Kind};
use kakehashi_proto::policy::may_forward;
use kakehashi_proto::{Channel, Frame, Permissions, Role, SessionId, TokenError, token};
use ractor::ActorRef;
use ractor::rpc::CallResult;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{Instrument, debug, info_span};

use crate::node::{NodeCtx, NodeMsg, OpenRefused};
use crate::outbox::{Delivery, Outbox, WriterQueues, run_writer};
use crate::session::{JoinRefused, Joined, Joining, Routes, SessionMsg, SessionShared};

const SIGNAL_QUEUE: usize = 64;
const ACTOR_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a participant has to read `SessionEnded` before its connection is closed.
const ENDED_FLUSH: Duration = Duration::from_secs(1);

static ATTACH_IDS: AtomicU64 = AtomicU64::new(1);

/// Why a participant was not attached. The text is what the client reads in the close
/// reason, so it names what was wrong; the label is the metric's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("bad hello: {0}")]
    Hello(String),
    #[error("{0}")]
    Open(#[from] OpenRefused),
    #[error("{0}")]
    Join(#[from] JoinRefused),
    #[error("the session's time limit has passed")]
    PastDeadline,
    #[error("the relay is busy; try again")]
    Busy,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Token(TokenError::BadSignature) => "bad_signature",
            Refusal::Token(TokenError::Expired { .. }) => "expired",
            Refusal::Token(TokenError::WrongRelay { .. }) => "wrong_relay",
            Refusal::Token(TokenError::WrongSession { .. }) => "wrong_session",
            Refusal::Token(_) => "bad_token",
            Refusal::Hello(_) => "bad_hello",
            Refusal::Open(OpenRefused::AtCapacity(_)) => "capacity",
            Refusal::Open(OpenRefused::Draining) => "draining",
            Refusal::Open(_) | Refusal::Join(JoinRefused::Ended) | Refusal::PastDeadline => "ended",
            Refusal::Join(_) => "session_full",
            Refusal::Busy => "busy",
        }
    }
}

/// Why a participant's connection is being closed.
enum Outcome {
    /// The session ended and the participant was told.
    Ended,
    /// The session's token was cancelled (ended, failed, or this connection replaced).
    Cancelled,
    Protocol(String),
    /// The participant left or its connection was lost.
    Gone,
}

struct Attached {
    role: Role,
    participant_id: u64,
    attach_id: u64,
    session: ActorRef<SessionMsg>,
    shared: Arc<SessionShared>,
    joined: Joined,
    signal_send: quinn::SendStream,
    signal_recv: quinn::RecvStream,
    signal_rx: mpsc::Receiver<Kind>,
    own_signal: mpsc::Sender<Kind>,
    writers: WriterQueues,
}

/// Serves one incoming connection until the participant leaves or the session ends.
pub(crate) async fn serve(incoming: quinn::Incoming, node: ActorRef<NodeMsg>, ctx: Arc<NodeCtx>) {
    let remote = incoming.remote_address();
    let attach_timeout = ctx.config.attach_timeout;
    let conn = match timeout(attach_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "handshake timed out");
            return;
        }
    };
    let attached = match timeout(attach_timeout, attach(&conn, &node, &ctx)).await {
        Ok(Ok(a)) => a,
        Ok(Err(refusal)) => {
            ctx.stats.refused(refusal.label());
            debug!(%remote, reason = %refusal, "attach refused");
            conn.close(close::REFUSED.into(), refusal.to_string().as_bytes());
            return;
        }
        Err(_) => {
            ctx.stats.refused("timeout");
            conn.close(
                close::REFUSED.into(),
                b"no valid hello within the attach timeout",
            );
            return;
        }
    };
    let span = info_span!("participant", session = %attached.shared.id, participant = attached.participant_id, role = attached.role.name());
    run(conn, attached, ctx).instrument(span).await;
}

async fn attach(
    conn: &quinn::Connection,
    node: &ActorRef<NodeMsg>,
    ctx: &Arc<NodeCtx>,
) -> Result<Attached, Refusal> {
    let (mut signal_send, mut signal_recv) = conn
        .accept_bi()
        .await
        .map_err(|e| Refusal::Hello(format!("no signal stream: {e}")))?;
    let mut decoder = FrameDecoder::for_channel(Channel::Signal);
    let frame = read_frame(&mut signal_recv, &mut decoder)
        .await
        .map_err(|e| Refusal::Hello(e.to_string()))?
        .ok_or_else(|| Refusal::Hello("signal stream closed before hello".into()))?;
    let hello = match dataplane::decode_signal(&frame) {
        Ok(Kind::Hello(h)) => h,
        Ok(_) => return Err(Refusal::Hello("the first signal must be Hello".into())),
        Err(e) => return Err(Refusal::Hello(e.to_string())),
    };
    let claims = token::verify(
        &hello.token,
        &ctx.config.coordinator_key,
        kakehashi_proto::unix_now(),
    )?;
    claims.expect_relay(&ctx.config.relay_id)?;
    let wanted: SessionId = hello
        .session_id
        .parse()
        .map_err(|e| Refusal::Hello(format!("{e}")))?;
    claims.expect_session(&wanted)?;
    claims.expect_role(&[Role::Host, Role::Viewer, Role::Supervisor, Role::Recorder])?;
    if kakehashi_proto::unix_now() >= claims.session_deadline {
        return Err(Refusal::PastDeadline);
    }

    let (role, participant_id) = (claims.role, claims.participant_id);
    let opened = match node
        .call(
            |port| NodeMsg::Open(Box::new(claims), port),
            Some(ACTOR_CALL_TIMEOUT),
        )
        .await
    {
        Ok(CallResult::Success(r)) => r?,
        _ => return Err(Refusal::Busy),
    };
    let (own_signal, signal_rx) = mpsc::channel(SIGNAL_QUEUE);
    let (outbox, writers) = Outbox::new(own_signal.clone());
    let attach_id = ATTACH_IDS.fetch_add(1, Ordering::Relaxed);
    let joining = Joining {
        role,
        participant_id,
        token: Bytes::from(hello.token),
        attach_id,
        outbox,
    };
    let joined = match opened
        .actor
        .call(
            |port| SessionMsg::Join(Box::new(joining), port),
            Some(ACTOR_CALL_TIMEOUT),
        )
        .await
    {
        Ok(CallResult::Success(r)) => r?,
        _ => return Err(Refusal::Busy),
    };
    let welcome = Kind::Welcome(pb::Welcome {
        participant_id,
        granted: joined.granted.bits(),
        peer_tokens: joined.peer_tokens.iter().map(|t| t.to_vec()).collect(),
    });
    if signal_send
        .write_chunk(dataplane::signal_frame(welcome, 1).raw)
        .await
        .is_err()
    {
        // Already attached in the actor: leave so the session does not keep a ghost.
        let _ = opened.actor.cast(SessionMsg::Leave {
            participant_id,
            attach_id,
        });
        return Err(Refusal::Hello("connection lost before welcome".into()));
    }
    Ok(Attached {
        role,
        participant_id,
        attach_id,
        session: opened.actor,
        shared: opened.shared,
        joined,
        signal_send,
        signal_recv,
        signal_rx,
        own_signal,
        writers,
    })
}

async fn run(conn: quinn::Connection, a: Attached, ctx: Arc<NodeCtx>) {
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    for (channel, queue) in a.writers {
        let (conn, ctx) = (conn.clone(), ctx.clone());
        tasks.spawn(async move {
            run_writer(conn, channel, queue, ctx).await;
            Outcome::Gone
        });
    }
    tasks.spawn(signal_writer(a.signal_send, a.signal_rx));
    tasks.spawn(signal_reader(a.signal_recv, a.session.clone(), a.role));
    let readers = ReaderCtx {
        role: a.role,
        shared: a.shared.clone(),
        routes: a.joined.routes,
        own_signal: a.own_signal,
        node: ctx.clone(),
    };
    tasks.spawn(accept_data(conn.clone(), readers));

    let outcome = tokio::select! {
        _ = a.joined.cancel.cancelled() => Outcome::Cancelled,
        first = tasks.join_next() => match first {
            Some(Ok(outcome)) => outcome,
            // A panic in one of this participant's tasks ends this participant only.
            Some(Err(e)) => Outcome::Protocol(format!("internal error: {e}")),
            None => Outcome::Gone,
        },
    };
    match outcome {
        Outcome::Ended => conn.close(close::ENDED.into(), b"session ended"),
        Outcome::Cancelled => {
            let (code, reason) = a.shared.close_reason();
            conn.close(code.into(), reason.as_bytes());
        }
        Outcome::Protocol(reason) => {
            ctx.stats.protocol_error();
            debug!(%reason, "closing participant for a protocol error");
            conn.close(close::PROTOCOL.into(), reason.as_bytes());
        }
        Outcome::Gone => {}
    }
    tasks.shutdown().await;
    let _ = a.session.cast(SessionMsg::Leave {
        participant_id: a.participant_id,
        attach_id: a.attach_id,
    });
}

async fn signal_writer(mut send: quinn::SendStream, mut queue: mpsc::Receiver<Kind>) -> Outcome {
    let mut seq = 1;
    while let Some(kind) = queue.recv().await {
        seq += 1;
        let ended = matches!(kind, Kind::SessionEnded(_));
        if send
            .write_chunk(dataplane::signal_frame(kind, seq).raw)
            .await
            .is_err()
        {
            return Outcome::Gone;
        }
        if ended {
            // Let the participant read the reason before the connection closes.
            let _ = send.finish();
            let _ = timeout(ENDED_FLUSH, send.stopped()).await;
            return Outcome::Ended;
        }
    }
    Outcome::Gone
}

async fn signal_reader(
    mut recv: quinn::RecvStream,
    session: ActorRef<SessionMsg>,
    role: Role,
) -> Outcome {
    let mut decoder = FrameDecoder::for_channel(Channel::Signal);
    loop {
        let frame = match read_frame(&mut recv, &mut decoder).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(ReadError::Io(_)) => return Outcome::Gone,
            Err(ReadError::Frame(e)) => return Outcome::Protocol(format!("signal stream: {e}")),
        };
        let msg = match dataplane::decode_signal(&frame) {
            Ok(Kind::Grant(g)) if role == Role::Host => match Permissions::from_bits(g.granted) {
                Some(p) => SessionMsg::Grant(p),
                None => return Outcome::Protocol("grant has unknown permission bits".into()),
            },
            Ok(Kind::Grant(_)) => {
                return Outcome::Protocol("only the customer (host) may grant permissions".into());
            }
            // A supervisor or recorder hanging up leaves; only the customer and the
            // operator end the session for everyone.
            Ok(Kind::Hangup(_)) if matches!(role, Role::Supervisor | Role::Recorder) => {
                return Outcome::Gone;
            }
            Ok(Kind::Hangup(h)) => SessionMsg::Hangup {
                role,
                detail: h.detail.chars().take(256).collect(),
            },
            Ok(_) => return Outcome::Protocol("unexpected signal from a participant".into()),
            Err(e) => return Outcome::Protocol(format!("signal stream: {e}")),
        };
        if session.cast(msg).is_err() {
            return Outcome::Gone;
        }
    }
}

#[derive(Clone)]
struct ReaderCtx {
    role: Role,
    shared: Arc<SessionShared>,
    routes: watch::Receiver<Arc<Routes>>,
    own_signal: mpsc::Sender<Kind>,
    node: Arc<NodeCtx>,
}

/// Accepts the participant's data streams and reads each in its own task.
async fn accept_data(conn: quinn::Connection, ctx: ReaderCtx) -> Outcome {
    let mut readers: JoinSet<Result<(), String>> = JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_uni() => match stream {
                Ok(recv) => { readers.spawn(read_data(recv, ctx.clone())); }
                Err(_) => return Outcome::Gone,
            },
            Some(done) = readers.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Outcome::Protocol(reason),
                Err(e) => return Outcome::Protocol(format!("internal error: {e}")),
            },
        }
    }
}

/// Reads one data stream and forwards what the consent policy allows. This is the hot
/// path: one header parse, one policy check, one queue push per recipient.
async fn read_data(mut recv: quinn::RecvStream, ctx: ReaderCtx) -> Result<(), String> {
    let mut decoder = FrameDecoder::default();
    loop {
        let frame = match read_frame(&mut recv, &mut decoder).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(ReadError::Io(_)) => return Ok(()),
            Err(ReadError::Frame(e)) => return Err(format!("data stream: {e}")),
        };
        let read_at = Instant::now();
        let channel = frame.header.channel;
        if channel == Channel::Signal {
            return Err("signal frames belong on the signal stream".into());
        }
        if let Err(denied) = may_forward(channel, ctx.role, ctx.shared.mode, ctx.shared.granted()) {
            ctx.node.stats.denied(denied);
            continue;
        }
        let routes = ctx.routes.borrow().clone();
        forward(&ctx, &routes, &frame, read_at).await;
    }
}

async fn forward(ctx: &ReaderCtx, routes: &Routes, frame: &Frame, read_at: Instant) {
    if ctx.role == Role::Host {
        let mut need_key = false;
        for viewer in &routes.others {
            if let Delivery::DroppedNeedKey = viewer.deliver(frame, read_at, &ctx.node).await {
                need_key = true;
            }
        }
        // A recorder gets the session only while the customer allows recording.
        if !routes.recorders.is_empty() && ctx.shared.granted().contains(Permissions::RECORDING) {
            for recorder in &routes.recorders {
                if let Delivery::DroppedNeedKey = recorder.deliver(frame, read_at, &ctx.node).await
                {
                    need_key = true;
                }
            }
        }
        if need_key {
            let _ = ctx
                .own_signal
                .try_send(Kind::KeyFrameRequest(pb::KeyFrameRequest {}));
        }
    } else if let Some(host) = &routes.host {
        // Operators' frames go to the customer only: they are sealed for the host's key.
        host.deliver(frame, read_at, &ctx.node).await;
    }
}
