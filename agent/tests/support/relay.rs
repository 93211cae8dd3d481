//! A test relay: pairs everyone who attaches and forwards every data frame, unchanged
//! and without any policy, to everyone else. Signals follow `dataplane.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_proto::dataplane::{self, close};
use kakehashi_proto::frame::read_frame;
use kakehashi_proto::token::Claims;
use kakehashi_proto::{Channel, Frame, FrameDecoder, pb};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

struct Participant {
    id: u64,
    token: Vec<u8>,
    signals: mpsc::UnboundedSender<pb::signal::Kind>,
    data: mpsc::UnboundedSender<Frame>,
}

#[derive(Default)]
struct Relay {
    participants: Vec<Participant>,
    granted: u32,
}

impl Relay {
    fn broadcast(&self, kind: pb::signal::Kind) {
        for p in &self.participants {
            let _ = p.signals.send(kind.clone());
        }
    }
}

pub struct TestRelay {
    pub endpoint: pb::RelayEndpoint,
    _tasks: JoinSet<()>,
}

fn server_config() -> Result<(quinn::ServerConfig, Vec<u8>)> {
    let ck = rcgen::generate_simple_self_signed(vec!["relay.test".into()])?;
    let der = ck.cert.der().clone();
    let pin = Sha256::digest(der.as_ref()).to_vec();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(vec![der], key)?;
    tls.alpn_protocols = vec![dataplane::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok((quinn::ServerConfig::with_crypto(Arc::new(quic)), pin))
}

impl TestRelay {
    /// `refuse`: close every attach with `close::REFUSED` and this reason.
    pub fn start(refuse: Option<&'static str>) -> Result<Self> {
        let (config, pin) = server_config()?;
        let ep = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
        let addr = ep.local_addr()?;
        let relay = Arc::new(Mutex::new(Relay::default()));
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Some(incoming) = ep.accept().await {
                let relay = relay.clone();
                conns.spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = serve(conn, relay, refuse).await;
                    }
                });
            }
        });
        Ok(Self {
            endpoint: pb::RelayEndpoint {
                relay_id: "relay-test".into(),
                address: addr.to_string(),
                server_name: "relay.test".into(),
                cert_sha256: pin,
            },
            _tasks: tasks,
        })
    }
}

async fn serve(
    conn: quinn::Connection,
    relay: Arc<Mutex<Relay>>,
    refuse: Option<&'static str>,
) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut dec = FrameDecoder::for_channel(Channel::Signal);
    let hello = read_frame(&mut recv, &mut dec).await?.context("no hello")?;
    let pb::signal::Kind::Hello(hello) = dataplane::decode_signal(&hello)? else {
        bail!("first signal is not Hello");
    };
    if let Some(reason) = refuse {
        conn.close(close::REFUSED.into(), reason.as_bytes());
        return Ok(());
    }
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
    let (data_tx, mut data_rx) = mpsc::unbounded_channel::<Frame>();
    // Like the real relay, the participant id is the token's.
    let (claims, _, _) = Claims::decode_unverified(&hello.token)?;
    let id = {
        let mut r = relay.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let id = claims.participant_id;
        let _ = sig_tx.send(pb::signal::Kind::Welcome(pb::Welcome {
            participant_id: id,
            granted: r.granted,
            peer_tokens: r.participants.iter().map(|p| p.token.clone()).collect(),
        }));
        r.broadcast(pb::signal::Kind::PeerJoined(pb::PeerJoined {
            token: hello.token.clone(),
        }));
        r.participants.push(Participant {
            id,
            token: hello.token,
            signals: sig_tx,
            data: data_tx,
        });
        id
    };
    let mut tasks = JoinSet::new();
    // Signals to this participant; after SessionEnded, give it a moment to leave.
    let c = conn.clone();
    tasks.spawn(async move {
        let mut seq = 1;
        while let Some(kind) = sig_rx.recv().await {
            let ended = matches!(kind, pb::signal::Kind::SessionEnded(_));
            let f = dataplane::signal_frame(kind, seq);
            seq += 1;
            if send.write_all(&f.raw).await.is_err() {
                return;
            }
            if ended {
                let _ = tokio::time::timeout(Duration::from_millis(500), c.closed()).await;
                c.close(close::ENDED.into(), b"session ended");
                return;
            }
        }
    });
    // Data to this participant: one uni stream per channel.
    let c = conn.clone();
    tasks.spawn(async move {
        let mut streams: HashMap<Channel, quinn::SendStream> = HashMap::new();
        while let Some(f) = data_rx.recv().await {
            let s = match streams.get_mut(&f.header.channel) {
                Some(s) => s,
                None => match c.open_uni().await {
                    Ok(s) => streams.entry(f.header.channel).or_insert(s),
                    Err(_) => return,
                },
            };
            if s.write_all(&f.raw).await.is_err() {
                return;
            }
        }
    });
    // Data from this participant, forwarded unchanged to everyone else.
    let c = conn.clone();
    let r = relay.clone();
    tasks.spawn(async move {
        let mut readers = JoinSet::new();
        while let Ok(mut stream) = c.accept_uni().await {
            let r = r.clone();
            readers.spawn(async move {
                let mut dec = FrameDecoder::default();
                while let Ok(Some(f)) = read_frame(&mut stream, &mut dec).await {
                    let Ok(r) = r.lock() else { return };
                    for p in r.participants.iter().filter(|p| p.id != id) {
                        let _ = p.data.send(f.clone());
                    }
                }
            });
        }
    });
    // Signals from this participant.
    loop {
        let Some(f) = read_frame(&mut recv, &mut dec).await? else {
            break;
        };
        let kind = dataplane::decode_signal(&f)?;
        let r = relay.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        match kind {
            pb::signal::Kind::Grant(g) => {
                drop(r);
                let mut r = relay.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                r.granted = g.granted;
                r.broadcast(pb::signal::Kind::GrantsChanged(pb::GrantsChanged {
                    granted: g.granted,
                }));
            }
            pb::signal::Kind::Hangup(h) => {
                r.broadcast(pb::signal::Kind::SessionEnded(pb::SessionEnded {
                    reason: h.reason,
                    detail: h.detail,
                }));
            }
            _ => {}
        }
    }
    conn.closed().await;
    Ok(())
}
