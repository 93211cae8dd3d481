//! Telework monitoring tickets (`AgentService.GetMonitorTicket`) through a real
//! coordinator gRPC server on 127.0.0.1:0: who gets one, what it says, and every
//! refusal. The Redis side of the store is covered by the store contract.

mod support {
    pub mod cluster;
}

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ed25519_dalek::{Signer, SigningKey};
use kakehashi_proto::device::{PROOF_DOMAIN, device_id_of, proof_message_in};
use kakehashi_proto::monitor::{MonitorTicket, TICKET_PROOF_DOMAIN};
use kakehashi_proto::pb;
use support::cluster::{Cluster, start_with};
use tonic::Code;

const SINK_URL: &str = "http://127.0.0.1:9/sink";
const TENANT: &str = "acme";

/// An installed agent's device key, and the clock it signs with: every proof it makes
/// carries a newer timestamp than the one before.
struct Device {
    key: SigningKey,
    id: String,
    next_ts: i64,
}

impl Device {
    fn new(seed: u8) -> Self {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let id = device_id_of(&key.verifying_key().to_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            key,
            id,
            next_ts: now,
        }
    }

    fn tick(&mut self) -> i64 {
        self.next_ts += 1;
        self.next_ts
    }

    fn ticket_request_at(&self, ts: i64) -> pb::MonitorTicketRequest {
        pb::MonitorTicketRequest {
            device_id: self.id.clone(),
            timestamp_ms: ts,
            signature: self
                .key
                .sign(&proof_message_in(TICKET_PROOF_DOMAIN, &self.id, ts))
                .to_bytes()
                .to_vec(),
        }
    }

    fn ticket_request(&mut self) -> pb::MonitorTicketRequest {
        let ts = self.tick();
        self.ticket_request_at(ts)
    }

    fn poll_at(&self, ts: i64) -> pb::PollDeviceRequest {
        pb::PollDeviceRequest {
            device_id: self.id.clone(),
            timestamp_ms: ts,
            signature: self
                .key
                .sign(&proof_message_in(PROOF_DOMAIN, &self.id, ts))
                .to_bytes()
                .to_vec(),
        }
    }
}

async fn start(sink_url: &str) -> Result<Cluster> {
    let sink_url = sink_url.to_owned();
    start_with(move |config| {
        config.evidence_sink_url = sink_url;
        config.monitor_snapshot_interval = Duration::from_secs(7);
        config.monitor_ticket_ttl = Duration::from_secs(600);
    })
    .await
}

async fn set_monitoring_policy(c: &mut Cluster, enabled: bool) -> Result<()> {
    c.admin
        .set_tenant_policy(pb::SetTenantPolicyRequest {
            policy: Some(pb::TenantPolicy {
                tenant: TENANT.into(),
                monitoring_enabled: enabled,
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

async fn enroll(c: &mut Cluster, device: &Device, monitoring: bool) -> Result<pb::DeviceInfo> {
    Ok(c.admin
        .enroll_device(pb::EnrollDeviceRequest {
            tenant: TENANT.into(),
            device_id: device.id.clone(),
            name: "home-office-pc".into(),
            public_key: device.key.verifying_key().to_bytes().to_vec(),
            allowed_operators: vec![],
            monitoring,
        })
        .await?
        .into_inner())
}

async fn set_access(
    c: &mut Cluster,
    device: &Device,
    blocked: bool,
    monitoring: bool,
) -> Result<pb::DeviceInfo> {
    Ok(c.admin
        .set_device_access(pb::SetDeviceAccessRequest {
            device_id: device.id.clone(),
            blocked,
            allowed_operators: vec![],
            denied_operators: vec![],
            monitoring,
        })
        .await?
        .into_inner())
}

/// The call's refusal; fails the test if the call succeeded.
async fn refused(c: &mut Cluster, req: pb::MonitorTicketRequest) -> Result<tonic::Status> {
    match c.agents.get_monitor_ticket(req).await {
        Ok(r) => anyhow::bail!("a ticket was issued: {:?}", r.into_inner()),
        Err(status) => Ok(status),
    }
}

fn expect(status: &tonic::Status, code: Code, says: &str) -> Result<()> {
    ensure!(
        status.code() == code && status.message().contains(says),
        "expected {code:?} saying {says:?}, got {status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_monitored_device_gets_a_ticket_that_names_it_and_verifies() -> Result<()> {
    let mut c = start(SINK_URL).await?;
    set_monitoring_policy(&mut c, true).await?;
    let mut device = Device::new(1);
    let info = enroll(&mut c, &device, true).await?;
    assert!(info.monitoring);
    let listed = c
        .admin
        .list_devices(pb::ListDevicesRequest {
            tenant: TENANT.into(),
        })
        .await?
        .into_inner();
    assert!(
        listed
            .devices
            .iter()
            .any(|d| d.device_id == device.id && d.monitoring),
        "{listed:?}"
    );

    let answer = c
        .agents
        .get_monitor_ticket(device.ticket_request())
        .await?
        .into_inner();
    assert_eq!(answer.sink_url, SINK_URL);
    assert_eq!(answer.snapshot_interval_secs, 7);
    let ticket = MonitorTicket::verify(
        &answer.ticket,
        &c.handle.public_key(),
        kakehashi_proto::unix_now(),
    )
    .context("the ticket verifies with the coordinator's public key")?;
    assert_eq!(ticket.device_id, device.id);
    assert_eq!(ticket.public_key, device.key.verifying_key().to_bytes());
    assert_eq!(ticket.tenant, TENANT);
    assert_eq!(ticket.expires_at - ticket.issued_at, 600);
    assert_eq!(
        answer.expires_at_unix_ms,
        i64::try_from(ticket.expires_at)? * 1000
    );
    // Another cluster's key does not verify it.
    let stranger = SigningKey::from_bytes(&[0xee; 32]).verifying_key();
    assert!(MonitorTicket::verify(&answer.ticket, &stranger, kakehashi_proto::unix_now()).is_err());

    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_policy_the_device_flag_and_a_block_each_deny_a_ticket() -> Result<()> {
    let mut c = start(SINK_URL).await?;
    let mut device = Device::new(2);
    enroll(&mut c, &device, true).await?;

    // No stored policy at all, then a policy with monitoring off.
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(&status, Code::PermissionDenied, "monitoring_enabled")?;
    set_monitoring_policy(&mut c, false).await?;
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(&status, Code::PermissionDenied, "monitoring_enabled")?;

    set_monitoring_policy(&mut c, true).await?;
    c.agents
        .get_monitor_ticket(device.ticket_request())
        .await
        .context("policy and device both enable monitoring")?;

    // SetDeviceAccess replaces the flag: false turns monitoring off.
    let info = set_access(&mut c, &device, false, false).await?;
    assert!(!info.monitoring);
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(
        &status,
        Code::PermissionDenied,
        "not enrolled for monitoring",
    )?;

    // A blocked device gets nothing, its flag notwithstanding.
    set_access(&mut c, &device, true, true).await?;
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(&status, Code::PermissionDenied, "blocked")?;

    // A device enrolled without the flag.
    let mut plain = Device::new(3);
    let info = enroll(&mut c, &plain, false).await?;
    assert!(!info.monitoring);
    let status = refused(&mut c, plain.ticket_request()).await?;
    expect(
        &status,
        Code::PermissionDenied,
        "not enrolled for monitoring",
    )?;

    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn only_a_fresh_proof_by_the_enrolled_key_is_accepted() -> Result<()> {
    let mut c = start(SINK_URL).await?;
    set_monitoring_policy(&mut c, true).await?;
    let mut device = Device::new(4);

    // Not enrolled (yet).
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(&status, Code::Unauthenticated, "not enrolled")?;
    enroll(&mut c, &device, true).await?;

    // Signed by another key.
    let mut forged = device.ticket_request();
    forged.signature = SigningKey::from_bytes(&[0x44; 32])
        .sign(&proof_message_in(
            TICKET_PROOF_DOMAIN,
            &device.id,
            forged.timestamp_ms,
        ))
        .to_bytes()
        .to_vec();
    let status = refused(&mut c, forged).await?;
    expect(&status, Code::Unauthenticated, "does not verify")?;

    // A PollDevice signature is good for polling only (domain separation).
    let ts = device.tick();
    let mut poll_signed = device.ticket_request_at(ts);
    poll_signed.signature = device.poll_at(ts).signature;
    let status = refused(&mut c, poll_signed).await?;
    expect(&status, Code::Unauthenticated, "does not verify")?;

    // Too far from the coordinator's clock.
    let stale = device.ticket_request_at(device.next_ts - 120_000);
    let status = refused(&mut c, stale).await?;
    expect(&status, Code::Unauthenticated, "60 s in the past")?;

    // A good request, then the same one again.
    let good = device.ticket_request();
    c.agents.get_monitor_ticket(good.clone()).await?;
    let status = refused(&mut c, good).await?;
    expect(&status, Code::Unauthenticated, "replay")?;
    // An older timestamp than the last accepted is a replay too.
    let older = device.ticket_request_at(device.next_ts - 1);
    let status = refused(&mut c, older).await?;
    expect(&status, Code::Unauthenticated, "replay")?;

    // Malformed device id.
    let mut bad_id = device.ticket_request();
    bad_id.device_id = "not-a-device".into();
    let status = refused(&mut c, bad_id).await?;
    expect(&status, Code::Unauthenticated, "device_id")?;

    c.handle.shutdown().await;
    Ok(())
}

/// `kakehashi device run` (PollDevice) and `kakehashi device monitor` are two processes
/// signing with one clock: a poll and a ticket request at the same millisecond both pass,
/// and each is still refused a second time.
#[tokio::test]
async fn polls_and_ticket_requests_count_apart() -> Result<()> {
    let mut c = start(SINK_URL).await?;
    set_monitoring_policy(&mut c, true).await?;
    let mut device = Device::new(5);
    enroll(&mut c, &device, true).await?;
    let ts = device.tick();
    c.agents.poll_device(device.poll_at(ts)).await?;
    c.agents
        .get_monitor_ticket(device.ticket_request_at(ts))
        .await
        .context("a ticket request at the poll's timestamp")?;
    let poll_again = c
        .agents
        .poll_device(device.poll_at(ts))
        .await
        .expect_err("a replayed poll");
    assert_eq!(poll_again.code(), Code::Unauthenticated);
    let status = refused(&mut c, device.ticket_request_at(ts)).await?;
    expect(&status, Code::Unauthenticated, "replay")?;
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn without_an_evidence_sink_there_is_no_ticket() -> Result<()> {
    let mut c = start("").await?;
    set_monitoring_policy(&mut c, true).await?;
    let mut device = Device::new(6);
    enroll(&mut c, &device, true).await?;
    let status = refused(&mut c, device.ticket_request()).await?;
    expect(&status, Code::FailedPrecondition, "--evidence-sink-url")?;
    c.handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn monitoring_settings_out_of_range_are_refused_at_start() -> Result<()> {
    for (edit, says) in [
        (
            Box::new(|c: &mut kakehashi_coordinator::CoordinatorConfig| {
                c.evidence_sink_url = "sink:7000".into();
            }) as Box<dyn FnOnce(&mut kakehashi_coordinator::CoordinatorConfig)>,
            "http://",
        ),
        (
            Box::new(|c: &mut kakehashi_coordinator::CoordinatorConfig| {
                c.monitor_snapshot_interval = Duration::ZERO;
            }),
            "snapshot interval",
        ),
        (
            Box::new(|c: &mut kakehashi_coordinator::CoordinatorConfig| {
                c.monitor_ticket_ttl = Duration::from_secs(59);
            }),
            "ticket TTL",
        ),
    ] {
        let err = start_with(edit)
            .await
            .err()
            .context("started with a bad monitoring setting")?;
        ensure!(format!("{err:#}").contains(says), "{err:#}");
    }
    Ok(())
}
