//! A coordinator on 127.0.0.1:0 with embedded backends and gRPC clients to it, shared by
//! the test binaries of this directory (each includes it as `mod support`).

use anyhow::Result;
use kakehashi_coordinator::{
    Backends, Coordinator, CoordinatorConfig, CoordinatorHandle, RelayInfo,
};
use kakehashi_proto::pb::admin_service_client::AdminServiceClient;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::pb::session_service_client::SessionServiceClient;
use tonic::transport::Channel;

/// The relay id of [`dead_relay`].
pub const RELAY_ID: &str = "relay-test-1";

/// A relay entry whose admin address has nothing listening: these tests never reach a
/// relay, and EndSession's relay call fails fast so the session must still end.
pub async fn dead_relay() -> Result<RelayInfo> {
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admin = probe.local_addr()?;
    drop(probe);
    Ok(RelayInfo {
        relay_id: RELAY_ID.into(),
        quic_addr: "127.0.0.1:4433".into(),
        admin_url: format!("http://{admin}"),
        server_name: "localhost".into(),
        cert_sha256: [0x5a; 32],
        region: "test".into(),
    })
}

pub struct Cluster {
    pub handle: CoordinatorHandle,
    // Each test binary uses the clients it needs.
    #[allow(dead_code)]
    pub sessions: SessionServiceClient<Channel>,
    #[allow(dead_code)]
    pub agents: AgentServiceClient<Channel>,
    #[allow(dead_code)]
    pub admin: AdminServiceClient<Channel>,
}

/// A dev coordinator (auth disabled) over one dead relay, its configuration edited
/// first.
pub async fn start_with(edit: impl FnOnce(&mut CoordinatorConfig)) -> Result<Cluster> {
    let relays = vec![dead_relay().await?];
    let mut config = CoordinatorConfig::dev(relays.clone());
    edit(&mut config);
    let handle = Coordinator::start(config, Backends::in_memory(relays)).await?;
    let sessions = SessionServiceClient::connect(handle.url()).await?;
    let agents = AgentServiceClient::connect(handle.url()).await?;
    let admin = AdminServiceClient::connect(handle.url()).await?;
    Ok(Cluster {
        handle,
        sessions,
        agents,
        admin,
    })
}
