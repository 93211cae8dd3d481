//! One relayed session: created through the coordinator's `SessionService` like
//! call-center software would, joined by a real [`Viewer`] and [`Host`] from the agent
//! library, consented, then driven by the schedule.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig, ViewerEvent};
use kakehashi_proto::Permissions;
use kakehashi_proto::pb::{self, session_service_client::SessionServiceClient};
use prost::Message;
use tokio::time::timeout;
use tonic::transport::Channel;

use super::pacer::Tick;
use super::stats::{PathStats, ViewerTally};
use super::traffic::{self, chat_line, input_event};
use super::{SessionCtx, maybe_tick};

/// Create, join and consent must finish within this, or the session counts as failed.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
const END_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets up one session and drives it until `ctx.stop`. Setup failures are returned
/// (and counted by the caller); the session's own traffic errors are counted as unsent
/// or undelivered frames, never fatal to the run.
pub async fn run(
    ctx: Arc<SessionCtx>,
    url: String,
    mut api: SessionServiceClient<Channel>,
) -> Result<()> {
    let stats = &ctx.relayed;
    let created_at = Instant::now();
    let setup = timeout(SETUP_TIMEOUT, set_up(&url, &mut api)).await;
    let (session_id, mut host, mut viewer) = match setup {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            ctx.settled(false);
            return Err(e);
        }
        Err(_) => {
            ctx.settled(false);
            bail!("session setup took longer than {SETUP_TIMEOUT:?}");
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
    // Tidy up through the API, as the call-center software would; an external cluster
    // should not be left with load-test sessions. Best effort: the run is over.
    let _ = timeout(
        END_TIMEOUT,
        api.end_session(pb::EndSessionRequest {
            session_id,
            detail: "load test finished".into(),
        }),
    )
    .await;
    Ok(())
}

async fn set_up(
    url: &str,
    api: &mut SessionServiceClient<Channel>,
) -> Result<(String, Host, Viewer)> {
    let created = api
        .create_session(pb::CreateSessionRequest {
            device_id: String::new(),
            tenant: "loadtest".into(),
            operator: "loadtest-operator".into(),
            mode: pb::SessionMode::Control as i32,
            permissions: 0,
            max_duration_secs: 3600,
        })
        .await
        .context("CreateSession")?
        .into_inner();
    let session = created
        .session
        .context("CreateSession returned no session")?;
    let mut viewer = Viewer::join(
        url,
        &session.session_id,
        &created.operator_ticket,
        ViewerConfig {
            request_on_join: Some((Permissions::CONTROL, "load test".into())),
            supervisor: false,
            recorder: false,
        },
    )
    .await
    .context("viewer join")?;
    let mut host = Host::join(
        url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW | Permissions::CONTROL),
        },
    )
    .await
    .context("host join")?;
    // Ready when the viewer holds both grants (so input flows) and the host has
    // verified the viewer (so screen frames are sealed for it).
    let wanted = Permissions::VIEW | Permissions::CONTROL;
    let mut host_ready = false;
    while !host_ready || !viewer.granted().contains(wanted) {
        tokio::select! {
            ev = host.next_event() => match ev.context("host ended during setup")? {
                HostEvent::GrantsChanged(g) if g.contains(wanted) => host_ready = true,
                HostEvent::Ended { reason, detail } => bail!("ended during setup: {reason:?} {detail}"),
                _ => {}
            },
            ev = viewer.next_event() => {
                if let ViewerEvent::Ended { reason, detail } = ev.context("viewer ended during setup")? {
                    bail!("ended during setup: {reason:?} {detail}");
                }
            }
        }
    }
    Ok((session.session_id, host, viewer))
}

async fn drive_host(
    ctx: &SessionCtx,
    stats: &PathStats,
    host: &mut Host,
    mut ticks: tokio::sync::mpsc::Receiver<Tick>,
) {
    let mut chat = ctx.traffic.chat_period().map(tokio::time::interval);
    let mut sending = true;
    let mut key_wanted = false;
    let mut n = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return,
            tick = ticks.recv(), if sending => match tick {
                Some(tick) => {
                    let frame = traffic::screen_frame(&ctx.traffic, &tick, key_wanted, &ctx.filler);
                    key_wanted = false;
                    let sent = matches!(host.send_screen(frame).await, Ok(true));
                    if tick.counted {
                        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        if !sent {
                            stats.frames_unsent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // The window is over: stop sending, keep reading until the drain ends.
                None => sending = false,
            },
            ev = host.next_event() => match ev {
                Some(HostEvent::Input(i)) => {
                    stats.reliable_delivered.fetch_add(i.encoded_len() as u64, Ordering::Relaxed);
                }
                Some(HostEvent::Chat(c)) => {
                    stats.reliable_delivered.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                Some(HostEvent::KeyFrameRequested) => key_wanted = true,
                Some(HostEvent::Ended { .. }) | None => return,
                Some(_) => {}
            },
            _ = maybe_tick(&mut chat), if sending => {
                n += 1;
                let line = chat_line(n);
                if host.send_chat(&line).await.is_ok() {
                    stats.reliable_sent.fetch_add(line.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn drive_viewer(
    ctx: &SessionCtx,
    stats: &PathStats,
    viewer: &mut Viewer,
    created_at: Instant,
) {
    let mut chat = ctx.traffic.chat_period().map(tokio::time::interval);
    let mut input = ctx.traffic.input_period().map(tokio::time::interval);
    let mut tally = ViewerTally::new(created_at);
    let mut n = 0u64;
    loop {
        let sending = !ctx.sending_over.is_cancelled();
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            ev = viewer.next_event() => match ev {
                Some(ViewerEvent::Screen { frame, .. }) => {
                    tally.screen(stats, &frame);
                }
                Some(ViewerEvent::Chat(c)) => {
                    stats.reliable_delivered.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                Some(ViewerEvent::Ended { .. }) | None => break,
                Some(_) => {}
            },
            _ = ctx.sending_over.cancelled(), if sending => {}
            _ = maybe_tick(&mut input), if sending => {
                n += 1;
                let ev = input_event(n);
                let len = ev.encoded_len() as u64;
                if matches!(viewer.send_input(ev).await, Ok(true)) {
                    stats.reliable_sent.fetch_add(len, Ordering::Relaxed);
                }
            }
            _ = maybe_tick(&mut chat), if sending => {
                n += 1;
                let line = chat_line(n);
                if viewer.send_chat(&line).await.is_ok() {
                    stats.reliable_sent.fetch_add(line.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
    tally.finish(stats);
}
