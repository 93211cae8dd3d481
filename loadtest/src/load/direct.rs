//! The no-relay baseline: host → viewer over one QUIC connection, with the same traffic
//! and the same per-frame work as a relayed session, so the only difference between the
//! two paths is the relay hop.
//!
//! Built from the agent's own parts: X25519 keypairs and [`SessionKeys`] (HKDF, then
//! AES-256-GCM with the header as associated data), protobuf `ScreenFrame`s, one
//! long-lived unidirectional stream per channel with the agent's priorities, the
//! agent's pinned-certificate client configuration ([`kakehashi_agent::tls`]), and the
//! agent's receive shape (stream reader task → driver task that opens and decodes →
//! application). The viewer plays the QUIC server on its own socket with a self-signed
//! certificate, so each side still has one socket, as it does through a relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use kakehashi_agent::crypto::{Keypair, SessionKeys, Side};
use kakehashi_proto::frame::{self, FLAG_KEY_FRAME};
use kakehashi_proto::{Channel, Frame, FrameDecoder, SessionId, pb};
use prost::Message;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::pacer::Tick;
use super::stats::{PathStats, ViewerTally};
use super::traffic::{self, chat_line, input_event};
use super::{SessionCtx, maybe_tick};
use crate::proxy::{Impairment, UdpProxy};

/// The agent's queue sizes, so back-pressure behaves the same.
const FRAME_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

enum Event {
    Screen(pb::ScreenFrame),
    Chat(String),
    Input(pb::InputEvent),
}

/// One end of a direct connection.
struct End {
    conn: quinn::Connection,
    keys: SessionKeys,
    outs: Vec<Option<(quinn::SendStream, u64)>>,
    events: mpsc::Receiver<Event>,
    // Reader and driver tasks; they stop when this end is dropped.
    _tasks: JoinSet<()>,
    _endpoint: quinn::Endpoint,
}

impl End {
    fn new(conn: quinn::Connection, endpoint: quinn::Endpoint, keys: SessionKeys) -> Self {
        let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_streams(conn.clone(), frames_tx));
        tasks.spawn(drive(frames_rx, keys.clone(), events_tx));
        Self {
            conn,
            keys,
            outs: (0..Channel::ALL.len()).map(|_| None).collect(),
            events,
            _tasks: tasks,
            _endpoint: endpoint,
        }
    }

    /// Seals and writes one frame on the channel's long-lived stream.
    async fn send(&mut self, channel: Channel, flags: u8, plaintext: &[u8]) -> Result<()> {
        let slot = &mut self.outs[usize::from(channel as u8)];
        if slot.is_none() {
            let s = self.conn.open_uni().await?;
            let _ = s.set_priority(priority(channel));
            *slot = Some((s, 1));
        }
        let Some((stream, next_seq)) = slot.as_mut() else {
            return Err(anyhow!("stream slot empty"));
        };
        let seq = *next_seq;
        *next_seq += 1;
        let sealed = self.keys.seal(channel, flags, seq, plaintext)?;
        if let Err(e) = stream.write_all(&sealed.raw).await {
            *slot = None;
            return Err(e.into());
        }
        Ok(())
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// The agent's stream priorities (`link.rs`): input before chat before screen.
fn priority(channel: Channel) -> i32 {
    match channel {
        Channel::Input | Channel::Control | Channel::Signal | Channel::Ack => 3,
        Channel::Chat | Channel::Pointer | Channel::SystemInfo => 2,
        Channel::Screen => 1,
        Channel::File => 0,
    }
}

async fn accept_streams(conn: quinn::Connection, out: mpsc::Sender<Frame>) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(stream) => { readers.spawn(read_stream(stream, out.clone())); }
                Err(_) => return,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
}

async fn read_stream(mut stream: quinn::RecvStream, out: mpsc::Sender<Frame>) {
    let mut decoder = FrameDecoder::default();
    while let Ok(Some(f)) = frame::read_frame(&mut stream, &mut decoder).await {
        if out.send(f).await.is_err() {
            return;
        }
    }
}

/// Opens and decodes, like the agent's driver task; screen frames are latency-first
/// (dropped when the application is behind), everything else waits.
async fn drive(mut frames: mpsc::Receiver<Frame>, keys: SessionKeys, out: mpsc::Sender<Event>) {
    while let Some(f) = frames.recv().await {
        let Ok(plain) = keys.open(&f) else { continue };
        let ev = match f.header.channel {
            Channel::Screen => match pb::ScreenFrame::decode(plain.as_slice()) {
                Ok(s) => {
                    let _ = out.try_send(Event::Screen(s));
                    continue;
                }
                Err(_) => continue,
            },
            Channel::Chat => match pb::ChatMessage::decode(plain.as_slice()) {
                Ok(m) => Event::Chat(m.text),
                Err(_) => continue,
            },
            Channel::Input => match pb::InputEvent::decode(plain.as_slice()) {
                Ok(i) => Event::Input(i),
                Err(_) => continue,
            },
            _ => continue,
        };
        if out.send(ev).await.is_err() {
            return;
        }
    }
}

fn server_config() -> Result<(quinn::ServerConfig, [u8; 32])> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()])
        .context("self-signed certificate")?;
    let der = generated.cert.der().clone();
    let pin = sha256(der.as_ref());
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| anyhow!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der.to_vec())], key)?;
    tls.alpn_protocols = vec![kakehashi_proto::dataplane::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    // The relay's server transport (`relay/src/tls.rs`), so both paths' viewers see the
    // same limits.
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(8u32.into());
    transport.keep_alive_interval(Some(kakehashi_agent::tls::KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::VarInt::from_u32(kakehashi_agent::tls::MAX_IDLE_MS).into(),
    ));
    server.transport_config(Arc::new(transport));
    Ok((server, pin))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Connects a host end to a viewer end; with `wan`, through two impairment proxies in a
/// row, because a relayed frame crosses the relay's proxy twice (host → relay → viewer).
async fn connect(wan: Option<Impairment>) -> Result<(End, End, Vec<UdpProxy>)> {
    let (server, pin) = server_config()?;
    let viewer_ep = quinn::Endpoint::server(server, SocketAddr::from(([127, 0, 0, 1], 0)))
        .context("viewer endpoint")?;
    let viewer_addr = viewer_ep.local_addr()?;
    let mut proxies = Vec::new();
    let target = match wan {
        Some(imp) => {
            let near_viewer = UdpProxy::start(viewer_addr).await?;
            let near_host = UdpProxy::start(near_viewer.local_addr()).await?;
            near_viewer.set_impairment(imp);
            near_host.set_impairment(imp);
            let addr = near_host.local_addr();
            proxies.push(near_host);
            proxies.push(near_viewer);
            addr
        }
        None => viewer_addr,
    };
    let host_ep =
        quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))).context("host endpoint")?;
    let client = kakehashi_agent::tls::client_config(&pin)?;
    let connecting = host_ep.connect_with(client, target, "localhost")?;
    let (host_conn, viewer_conn) = timeout(CONNECT_TIMEOUT, async {
        let accept = async {
            let incoming = viewer_ep
                .accept()
                .await
                .ok_or_else(|| anyhow!("viewer endpoint closed"))?;
            Ok::<_, anyhow::Error>(incoming.await?)
        };
        let (h, v) = tokio::join!(connecting, accept);
        Ok::<_, anyhow::Error>((h?, v?))
    })
    .await
    .context("direct connection timed out")??;
    // Fresh keys per session, derived exactly as the agents derive them.
    let mut sid = [0u8; 16];
    getrandom::fill(&mut sid).map_err(|e| anyhow!("randomness: {e}"))?;
    let sid = SessionId::from_bytes(sid);
    let hk = Keypair::generate()?;
    let vk = Keypair::generate()?;
    let host_keys = SessionKeys::derive(&hk, Side::Host, &vk.public_bytes(), &sid)?;
    let viewer_keys = SessionKeys::derive(&vk, Side::Viewer, &hk.public_bytes(), &sid)?;
    Ok((
        End::new(host_conn, host_ep, host_keys),
        End::new(viewer_conn, viewer_ep, viewer_keys),
        proxies,
    ))
}

/// Sets up one direct pair and drives it until `ctx.stop`.
pub async fn run(ctx: Arc<SessionCtx>) -> Result<()> {
    let stats = &ctx.direct;
    let created_at = Instant::now();
    let (mut host, mut viewer, _proxies) = match connect(ctx.wan).await {
        Ok(p) => p,
        Err(e) => {
            ctx.settled(false);
            return Err(e);
        }
    };
    // Counted up before settling, so whoever sees every session settled sees this one up.
    stats.sessions_up.fetch_add(1, Ordering::Relaxed);
    ctx.settled(true);
    let ticks = ctx.pacer.add(ctx.traffic.period());
    tokio::join!(
        drive_host(&ctx, stats, &mut host, ticks),
        drive_viewer(&ctx, stats, &mut viewer, created_at),
    );
    Ok(())
}

async fn drive_host(
    ctx: &SessionCtx,
    stats: &PathStats,
    host: &mut End,
    mut ticks: mpsc::Receiver<Tick>,
) {
    let mut chat = ctx.traffic.chat_period().map(tokio::time::interval);
    let mut sending = true;
    let mut n = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return,
            tick = ticks.recv(), if sending => match tick {
                Some(tick) => {
                    let frame = traffic::screen_frame(&ctx.traffic, &tick, false, &ctx.filler);
                    let flags = if frame.key_frame { FLAG_KEY_FRAME } else { 0 };
                    // The agent encodes inside `send_screen`; so does this.
                    let payload = frame.encode_to_vec();
                    let sent = host.send(Channel::Screen, flags, &payload).await.is_ok();
                    if tick.counted {
                        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        if !sent {
                            stats.frames_unsent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => sending = false,
            },
            ev = host.events.recv() => match ev {
                Some(Event::Input(i)) => {
                    stats.reliable_delivered.fetch_add(i.encoded_len() as u64, Ordering::Relaxed);
                }
                Some(Event::Chat(c)) => {
                    stats.reliable_delivered.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                Some(Event::Screen(_)) => {}
                None => return,
            },
            _ = maybe_tick(&mut chat), if sending => {
                n += 1;
                let line = chat_line(n);
                if send_chat(host, &line).await.is_ok() {
                    stats.reliable_sent.fetch_add(line.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn send_chat(end: &mut End, line: &str) -> Result<()> {
    let msg = pb::ChatMessage {
        text: line.to_owned(),
        sent_at_unix_ms: 0,
    };
    end.send(Channel::Chat, 0, &msg.encode_to_vec()).await
}

async fn drive_viewer(ctx: &SessionCtx, stats: &PathStats, viewer: &mut End, created_at: Instant) {
    let mut chat = ctx.traffic.chat_period().map(tokio::time::interval);
    let mut input = ctx.traffic.input_period().map(tokio::time::interval);
    let mut tally = ViewerTally::new(created_at);
    let mut n = 0u64;
    loop {
        let sending = !ctx.sending_over.is_cancelled();
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            ev = viewer.events.recv() => match ev {
                Some(Event::Screen(frame)) => {
                    tally.screen(stats, &frame);
                }
                Some(Event::Chat(c)) => {
                    stats.reliable_delivered.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                Some(Event::Input(_)) => {}
                None => break,
            },
            _ = ctx.sending_over.cancelled(), if sending => {}
            _ = maybe_tick(&mut input), if sending => {
                n += 1;
                let ev = input_event(n).encode_to_vec();
                if viewer.send(Channel::Input, 0, &ev).await.is_ok() {
                    stats.reliable_sent.fetch_add(ev.len() as u64, Ordering::Relaxed);
                }
            }
            _ = maybe_tick(&mut chat), if sending => {
                n += 1;
                let line = chat_line(n);
                if send_chat(viewer, &line).await.is_ok() {
                    stats.reliable_sent.fetch_add(line.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
    tally.finish(stats);
}
