//! The data-plane client: one QUIC connection to the session's relay, speaking the
//! protocol in [`kakehashi_proto::dataplane`]. It knows frames and signals, not keys:
//! the host and viewer seal and open payloads and hand whole frames to the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kakehashi_proto::dataplane::{self, close};
use kakehashi_proto::frame::{self, ReadError};
use kakehashi_proto::{Channel, Frame, FrameDecoder, SessionId, pb};
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use tokio::sync::{Mutex, MutexGuard, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::tls::{self, TlsError};

/// How long connecting, the handshake and waiting for `Welcome` may take together.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals are few; a participant that stops reading them is broken anyway.
const SIGNAL_QUEUE: usize = 64;
/// Data frames queued for the application. Small on purpose: screen frames are
/// latency-first, and QUIC flow control pushes back on the relay when this fills.
const FRAME_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("relay address {address:?} does not resolve: {reason}")]
    Resolve { address: String, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot open a local UDP endpoint: {0}")]
    Bind(std::io::Error),
    #[error("cannot start connecting to relay {address}: {error}")]
    Connect {
        address: SocketAddr,
        error: quinn::ConnectError,
    },
    #[error("timed out after {0:?} attaching to the relay")]
    AttachTimeout(Duration),
    #[error("the relay refused this participant: {0}")]
    Refused(String),
    #[error("the session ended: {0}")]
    Ended(String),
    #[error("the relay reports a protocol violation: {0}")]
    Protocol(String),
    #[error("the session failed on the relay: {0}")]
    SessionFailed(String),
    #[error("the relay is shutting down: {0}")]
    RelayShutdown(String),
    #[error("the relay closed the connection with code {code}: {reason}")]
    Closed { code: u64, reason: String },
    #[error("TLS handshake with the relay failed (is its certificate the pinned one?): {0}")]
    Handshake(String),
    #[error("the relay stopped answering (idle timeout)")]
    TimedOut,
    #[error("this participant closed the link")]
    LocallyClosed,
    #[error("the connection to the relay was lost: {0}")]
    Lost(ConnectionError),
    #[error("the relay sent a malformed signal: {0}")]
    BadSignal(String),
    #[error("expected Welcome from the relay, got {0}")]
    UnexpectedSignal(&'static str),
    #[error("the relay closed the signal stream")]
    SignalStreamClosed,
    #[error("{channel} frames go through the matching API, not send_frame")]
    WrongChannel { channel: &'static str },
    #[error("{channel} frame has seq {got}, the next free sequence number is {expected}")]
    WrongSeq {
        channel: &'static str,
        got: u64,
        expected: u64,
    },
}

impl LinkError {
    /// Maps how a connection ended to what it means for the participant.
    pub fn from_connection(err: ConnectionError) -> Self {
        match err {
            ConnectionError::ApplicationClosed(c) => {
                let reason = String::from_utf8_lossy(&c.reason).into_owned();
                let code = c.error_code.into_inner();
                match u32::try_from(code) {
                    Ok(close::ENDED) => LinkError::Ended(reason),
                    Ok(close::REFUSED) => LinkError::Refused(reason),
                    Ok(close::PROTOCOL) => LinkError::Protocol(reason),
                    Ok(close::SESSION_FAILED) => LinkError::SessionFailed(reason),
                    Ok(close::SHUTDOWN) => LinkError::RelayShutdown(reason),
                    _ => LinkError::Closed { code, reason },
                }
            }
            // QUIC carries TLS alerts as transport codes 0x100..=0x1ff.
            ConnectionError::TransportError(e) if (0x100..=0x1ff).contains(&u64::from(e.code)) => {
                LinkError::Handshake(e.reason)
            }
            ConnectionError::TimedOut => LinkError::TimedOut,
            ConnectionError::LocallyClosed => LinkError::LocallyClosed,
            other => LinkError::Lost(other),
        }
    }

    /// Whether the relay (or the path to it) went away while the session may live on:
    /// the participant should resume through the coordinator instead of ending.
    pub fn is_relay_loss(&self) -> bool {
        matches!(
            self,
            LinkError::TimedOut
                | LinkError::Lost(_)
                | LinkError::RelayShutdown(_)
                | LinkError::SignalStreamClosed
        )
    }

    /// The end reason to report when the connection closed without a `SessionEnded`.
    pub fn end_reason(&self) -> pb::EndReason {
        match self {
            LinkError::SessionFailed(_) => pb::EndReason::SessionFailed,
            LinkError::RelayShutdown(_) => pb::EndReason::RelayShutdown,
            _ => pb::EndReason::Unspecified,
        }
    }
}

fn signal_name(kind: &pb::signal::Kind) -> &'static str {
    use pb::signal::Kind;
    match kind {
        Kind::Hello(_) => "Hello",
        Kind::Welcome(_) => "Welcome",
        Kind::PeerJoined(_) => "PeerJoined",
        Kind::PeerLeft(_) => "PeerLeft",
        Kind::Grant(_) => "Grant",
        Kind::GrantsChanged(_) => "GrantsChanged",
        Kind::KeyFrameRequest(_) => "KeyFrameRequest",
        Kind::Hangup(_) => "Hangup",
        Kind::SessionEnded(_) => "SessionEnded",
        Kind::Drain(_) => "Drain",
    }
}

/// The sending half of one channel: its stream, opened on the first frame and kept
/// open, and its sequence counter.
#[derive(Debug)]
pub struct ChannelSender {
    channel: Channel,
    stream: Option<SendStream>,
    next_seq: u64,
}

impl ChannelSender {
    /// Takes the next sequence number. It is consumed even if the send then fails, so
    /// a nonce is never reused under one key.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    async fn write(&mut self, conn: &quinn::Connection, raw: &[u8]) -> Result<(), LinkError> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = conn.open_uni().await.map_err(LinkError::from_connection)?;
                // Priority only fails on a stream that is already closed.
                let _ = s.set_priority(self.channel.priority());
                self.stream.insert(s)
            }
        };
        if let Err(e) = stream.write_all(raw).await {
            // A broken stream is not reused; the connection's fate says why it broke.
            self.stream = None;
            return Err(match e {
                quinn::WriteError::ConnectionLost(c) => LinkError::from_connection(c),
                other => conn.close_reason().map_or_else(
                    || LinkError::Closed {
                        code: 0,
                        reason: other.to_string(),
                    },
                    LinkError::from_connection,
                ),
            });
        }
        Ok(())
    }
}

/// One channel's sender, locked: take a sequence number, seal, send, in that order, so
/// frames leave in sequence order.
pub struct ChannelGuard<'a> {
    conn: &'a quinn::Connection,
    inner: MutexGuard<'a, ChannelSender>,
}

impl ChannelGuard<'_> {
    pub fn next_seq(&mut self) -> u64 {
        self.inner.next_seq()
    }

    /// The sequence number the next frame will take, without taking it.
    pub fn peek_seq(&self) -> u64 {
        self.inner.next_seq
    }

    /// Moves the counter forward to `next` (never back): a link that replaces another
    /// continues its sequence numbers, so no nonce repeats under the session keys.
    pub fn seed(&mut self, next: u64) {
        self.inner.next_seq = self.inner.next_seq.max(next);
    }

    /// Writes a frame built with a sequence number from [`ChannelGuard::next_seq`].
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.inner.write(self.conn, &frame.raw).await
    }
}

struct SignalSender {
    stream: SendStream,
    next_seq: u64,
}

struct Shared {
    conn: quinn::Connection,
    // Kept so the UDP socket lives as long as the connection.
    _endpoint: quinn::Endpoint,
    signal: Mutex<SignalSender>,
    channels: [Mutex<ChannelSender>; Channel::ALL.len()],
    // Reader tasks; dropping the set (with the last handle) aborts them.
    _tasks: std::sync::Mutex<JoinSet<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Nobody holds the link any more: leave explicitly instead of idling out.
        self.conn
            .close(VarInt::from_u32(close::LEFT), b"participant left");
    }
}

/// The cloneable sending side of a link.
#[derive(Clone)]
pub struct LinkSender {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LinkSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkSender({})", self.shared.conn.remote_address())
    }
}

impl LinkSender {
    /// Sends a signal to the relay on the signal stream.
    pub async fn send_signal(&self, kind: pb::signal::Kind) -> Result<(), LinkError> {
        let mut s = self.shared.signal.lock().await;
        let seq = s.next_seq;
        s.next_seq += 1;
        let frame = dataplane::signal_frame(kind, seq);
        match s.stream.write_all(&frame.raw).await {
            Ok(()) => Ok(()),
            Err(quinn::WriteError::ConnectionLost(c)) => Err(LinkError::from_connection(c)),
            Err(_) => Err(self
                .shared
                .conn
                .close_reason()
                .map_or(LinkError::SignalStreamClosed, LinkError::from_connection)),
        }
    }

    /// Locks `channel`'s sender. Hold the guard while sealing so sequence numbers
    /// reach the relay in order.
    pub async fn channel(&self, channel: Channel) -> ChannelGuard<'_> {
        ChannelGuard {
            conn: &self.shared.conn,
            inner: self.shared.channels[usize::from(channel as u8)]
                .lock()
                .await,
        }
    }

    /// Every data channel's next sequence number, indexed by channel number. Read it
    /// while no frame is being sent (the caller holds the channels or the link is dead).
    pub async fn next_seqs(&self) -> [u64; Channel::ALL.len()] {
        let mut out = [1; Channel::ALL.len()];
        for (i, ch) in self.shared.channels.iter().enumerate() {
            out[i] = ch.lock().await.next_seq;
        }
        out
    }

    /// Seeds this link's counters from the link it replaces ([`LinkSender::next_seqs`]),
    /// before anything is sent on it.
    pub async fn seed_seqs(&self, next: [u64; Channel::ALL.len()]) {
        for (ch, n) in self.shared.channels.iter().zip(next) {
            let mut ch = ch.lock().await;
            ch.next_seq = ch.next_seq.max(n);
        }
    }

    /// Sends a data frame whose sequence number is the channel's next one.
    pub async fn send_frame(&self, frame: &Frame) -> Result<(), LinkError> {
        let channel = frame.header.channel;
        if channel == Channel::Signal {
            return Err(LinkError::WrongChannel {
                channel: channel.name(),
            });
        }
        let mut guard = self.channel(channel).await;
        let expected = guard.inner.next_seq;
        if frame.header.seq != expected {
            return Err(LinkError::WrongSeq {
                channel: channel.name(),
                got: frame.header.seq,
                expected,
            });
        }
        guard.next_seq();
        guard.send(frame).await
    }

    /// Writes any frame on its channel's stream, with no checks at all (even a
    /// `Signal` frame goes on a data stream).
    #[doc(hidden)]
    // Exists for protocol tests that play a hostile or buggy client against a relay.
    pub async fn send_frame_unchecked(&self, frame: &Frame) -> Result<(), LinkError> {
        let mut guard = self.channel(frame.header.channel).await;
        guard.send(frame).await
    }

    /// Opens a fresh unidirectional stream and writes `bytes` on it, then finishes it.
    #[doc(hidden)]
    // Exists for protocol tests: malformed headers, mixed channels, truncated frames.
    pub async fn send_raw_on_new_uni(&self, bytes: &[u8]) -> Result<(), LinkError> {
        let conn = &self.shared.conn;
        let mut s = conn.open_uni().await.map_err(LinkError::from_connection)?;
        let res = s.write_all(bytes).await;
        let _ = s.finish();
        res.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => LinkError::from_connection(c),
            other => LinkError::Closed {
                code: 0,
                reason: other.to_string(),
            },
        })
    }

    /// Closes the connection with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.shared
            .conn
            .close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> LinkError {
        LinkError::from_connection(self.shared.conn.closed().await)
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<LinkError> {
        self.shared
            .conn
            .close_reason()
            .map(LinkError::from_connection)
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.shared.conn.remote_address()
    }

    /// This connection's id (a new one after a relay move) and its QUIC path counters
    /// (smoothed RTT, packets sent and lost), for bitrate adaptation.
    pub fn path_stats(&self) -> (usize, quinn::ConnectionStats) {
        (self.shared.conn.stable_id(), self.shared.conn.stats())
    }
}

/// The receiving side of a link: signals and data frames from the relay.
#[derive(Debug)]
pub struct LinkReceiver {
    /// Signals from the relay; a malformed one is an `Err` and the last item.
    pub signals: mpsc::Receiver<Result<pb::signal::Kind, LinkError>>,
    /// Data frames from every channel, in arrival order per stream.
    pub frames: mpsc::Receiver<Frame>,
}

impl LinkReceiver {
    /// The next signal. `None` once the signal stream ended; a malformed signal is
    /// an `Err` (and the link is closed with [`close::PROTOCOL`]).
    pub async fn next_signal(&mut self) -> Option<Result<pb::signal::Kind, LinkError>> {
        self.signals.recv().await
    }

    /// The next data frame from any channel. `None` once the connection is gone.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        self.frames.recv().await
    }
}

/// A participant's attachment to a relay.
#[derive(Debug)]
pub struct RelayLink {
    pub tx: LinkSender,
    pub rx: LinkReceiver,
    participant_id: u64,
}

impl RelayLink {
    /// Connects to the relay, attaches with `Hello`, and returns the link and the
    /// relay's `Welcome`. A refusal is [`LinkError::Refused`] with the relay's reason.
    pub async fn connect(
        endpoint: &pb::RelayEndpoint,
        token: &[u8],
        session_id: &SessionId,
    ) -> Result<(RelayLink, pb::Welcome), LinkError> {
        let addr = resolve(&endpoint.address).await?;
        let tls = tls::client_config(&endpoint.cert_sha256)?;
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let quic = quinn::Endpoint::client(bind).map_err(LinkError::Bind)?;
        // The pin, not the name, authenticates the relay; any well-formed name works.
        let server_name = if endpoint.server_name.is_empty() {
            "kakehashi-relay"
        } else {
            endpoint.server_name.as_str()
        };
        let connecting =
            quic.connect_with(tls, addr, server_name)
                .map_err(|error| LinkError::Connect {
                    address: addr,
                    error,
                })?;
        let attach = async {
            let conn = connecting.await.map_err(LinkError::from_connection)?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(LinkError::from_connection)?;
            let hello = pb::signal::Kind::Hello(pb::Hello {
                token: token.to_vec(),
                session_id: session_id.to_string(),
            });
            let frame = dataplane::signal_frame(hello, 1);
            if let Err(e) = send.write_all(&frame.raw).await {
                return Err(write_failed(&conn, e));
            }
            let mut decoder = FrameDecoder::for_channel(Channel::Signal);
            let first = frame::read_frame(&mut recv, &mut decoder).await;
            let welcome = match first {
                Ok(Some(f)) => match dataplane::decode_signal(&f) {
                    Ok(pb::signal::Kind::Welcome(w)) => w,
                    Ok(other) => return Err(LinkError::UnexpectedSignal(signal_name(&other))),
                    Err(e) => return Err(LinkError::BadSignal(e.to_string())),
                },
                // The relay refuses by closing the connection; its reason is the answer.
                Ok(None) | Err(ReadError::Io(_)) => {
                    return Err(closed_reason(&conn).await);
                }
                Err(ReadError::Frame(e)) => return Err(LinkError::BadSignal(e.to_string())),
            };
            Ok((conn, send, recv, decoder, welcome))
        };
        let (conn, send, recv, decoder, welcome) =
            match tokio::time::timeout(ATTACH_TIMEOUT, attach).await {
                Ok(r) => r?,
                Err(_) => {
                    quic.close(VarInt::from_u32(close::LEFT), b"attach timed out");
                    return Err(LinkError::AttachTimeout(ATTACH_TIMEOUT));
                }
            };
        debug!(
            participant = welcome.participant_id,
            relay = %addr,
            "attached to relay"
        );

        let (sig_tx, sig_rx) = mpsc::channel(SIGNAL_QUEUE);
        let (frame_tx, frame_rx) = mpsc::channel(FRAME_QUEUE);
        let mut tasks = JoinSet::new();
        tasks.spawn(read_signals(conn.clone(), recv, decoder, sig_tx));
        tasks.spawn(accept_data(conn.clone(), frame_tx));
        let channels = Channel::ALL.map(|channel| {
            Mutex::new(ChannelSender {
                channel,
                stream: None,
                next_seq: 1,
            })
        });
        let shared = Arc::new(Shared {
            conn,
            _endpoint: quic,
            signal: Mutex::new(SignalSender {
                stream: send,
                next_seq: 2,
            }),
            channels,
            _tasks: std::sync::Mutex::new(tasks),
        });
        let link = RelayLink {
            tx: LinkSender { shared },
            rx: LinkReceiver {
                signals: sig_rx,
                frames: frame_rx,
            },
            participant_id: welcome.participant_id,
        };
        Ok((link, welcome))
    }

    /// The id the relay gave this participant in `Welcome`.
    pub fn participant_id(&self) -> u64 {
        self.participant_id
    }

    pub fn into_parts(self) -> (LinkSender, LinkReceiver) {
        (self.tx, self.rx)
    }

    pub async fn send_signal(&self, kind: pb::signal::Kind) -> Result<(), LinkError> {
        self.tx.send_signal(kind).await
    }

    pub async fn send_frame(&self, frame: &Frame) -> Result<(), LinkError> {
        self.tx.send_frame(frame).await
    }

    #[doc(hidden)]
    // Exists for protocol tests that play a hostile client.
    pub async fn send_frame_unchecked(&self, frame: &Frame) -> Result<(), LinkError> {
        self.tx.send_frame_unchecked(frame).await
    }

    #[doc(hidden)]
    // Exists for protocol tests that play a hostile client.
    pub async fn send_raw_on_new_uni(&self, bytes: &[u8]) -> Result<(), LinkError> {
        self.tx.send_raw_on_new_uni(bytes).await
    }

    pub async fn next_signal(&mut self) -> Option<Result<pb::signal::Kind, LinkError>> {
        self.rx.next_signal().await
    }

    pub async fn next_frame(&mut self) -> Option<Frame> {
        self.rx.next_frame().await
    }

    pub async fn closed(&self) -> LinkError {
        self.tx.closed().await
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, LinkError> {
    let err = |reason: String| LinkError::Resolve {
        address: address.to_owned(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| err(e.to_string()))?;
    addrs.next().ok_or_else(|| err("no addresses".into()))
}

fn write_failed(conn: &quinn::Connection, e: quinn::WriteError) -> LinkError {
    match e {
        quinn::WriteError::ConnectionLost(c) => LinkError::from_connection(c),
        other => conn.close_reason().map_or_else(
            || LinkError::Closed {
                code: 0,
                reason: other.to_string(),
            },
            LinkError::from_connection,
        ),
    }
}

/// After a read failed or the stream ended early, the connection's close says why.
async fn closed_reason(conn: &quinn::Connection) -> LinkError {
    match conn.close_reason() {
        Some(e) => LinkError::from_connection(e),
        // The stream ended but the connection lives: wait briefly for the close that
        // carries the reason; a relay that does neither breaks the protocol.
        None => match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(e) => LinkError::from_connection(e),
            Err(_) => LinkError::SignalStreamClosed,
        },
    }
}

async fn read_signals(
    conn: quinn::Connection,
    mut recv: RecvStream,
    mut decoder: FrameDecoder,
    out: mpsc::Sender<Result<pb::signal::Kind, LinkError>>,
) {
    loop {
        let item = match frame::read_frame(&mut recv, &mut decoder).await {
            Ok(Some(f)) => match dataplane::decode_signal(&f) {
                Ok(kind) => Ok(kind),
                Err(e) => {
                    conn.close(VarInt::from_u32(close::PROTOCOL), b"malformed signal");
                    Err(LinkError::BadSignal(e.to_string()))
                }
            },
            Ok(None) => return,
            Err(ReadError::Frame(e)) => {
                conn.close(VarInt::from_u32(close::PROTOCOL), b"malformed signal frame");
                Err(LinkError::BadSignal(e.to_string()))
            }
            // The connection closed; the owner learns why from `closed()`.
            Err(ReadError::Io(_)) => return,
        };
        let stop = item.is_err();
        if out.send(item).await.is_err() || stop {
            return;
        }
    }
}

async fn accept_data(conn: quinn::Connection, out: mpsc::Sender<Frame>) {
    // Per-stream readers live in this set and die with this task.
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(stream) => {
                    readers.spawn(read_data_stream(stream, out.clone()));
                }
                Err(_) => return,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
}

async fn read_data_stream(mut stream: RecvStream, out: mpsc::Sender<Frame>) {
    // A fresh decoder: the first frame fixes the stream's channel.
    let mut decoder = FrameDecoder::default();
    loop {
        match frame::read_frame(&mut stream, &mut decoder).await {
            Ok(Some(f)) if f.header.channel == Channel::Signal => {
                warn!("relay sent a signal frame on a data stream; dropping the stream");
                return;
            }
            Ok(Some(f)) => {
                if out.send(f).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(ReadError::Frame(e)) => {
                warn!(error = %e, "malformed frame from the relay; dropping the stream");
                return;
            }
            Err(ReadError::Io(_)) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_close(code: u32, reason: &'static [u8]) -> ConnectionError {
        ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: VarInt::from_u32(code),
            reason: bytes::Bytes::from_static(reason),
        })
    }

    #[test]
    fn close_codes_map_to_clear_errors() {
        let e = LinkError::from_connection(app_close(close::REFUSED, b"token expired"));
        assert!(matches!(&e, LinkError::Refused(r) if r == "token expired"));
        assert!(e.to_string().contains("token expired"));
        assert!(matches!(
            LinkError::from_connection(app_close(close::ENDED, b"")),
            LinkError::Ended(_)
        ));
        assert!(matches!(
            LinkError::from_connection(app_close(close::PROTOCOL, b"bad frame")),
            LinkError::Protocol(r) if r == "bad frame"
        ));
        let failed = LinkError::from_connection(app_close(close::SESSION_FAILED, b"actor"));
        assert_eq!(failed.end_reason(), pb::EndReason::SessionFailed);
        let shutdown = LinkError::from_connection(app_close(close::SHUTDOWN, b"draining"));
        assert_eq!(shutdown.end_reason(), pb::EndReason::RelayShutdown);
        assert!(matches!(
            LinkError::from_connection(app_close(99, b"\xff?")),
            LinkError::Closed { code: 99, .. }
        ));
        assert!(matches!(
            LinkError::from_connection(ConnectionError::TimedOut),
            LinkError::TimedOut
        ));
    }

    #[test]
    fn only_a_lost_relay_is_resumed_from() {
        assert!(LinkError::from_connection(ConnectionError::TimedOut).is_relay_loss());
        assert!(LinkError::from_connection(ConnectionError::Reset).is_relay_loss());
        assert!(LinkError::from_connection(app_close(close::SHUTDOWN, b"bye")).is_relay_loss());
        for code in [
            close::ENDED,
            close::REFUSED,
            close::PROTOCOL,
            close::SESSION_FAILED,
        ] {
            assert!(!LinkError::from_connection(app_close(code, b"")).is_relay_loss());
        }
        assert!(!LinkError::LocallyClosed.is_relay_loss());
    }
}
