//! What operators' tools see: the coordinator's `grpc.health.v1` (Check and Watch,
//! following its backends) and server reflection (so `grpcurl` works without the
//! `.proto` files), and the relay's `/livez` and `/readyz` (a draining relay is not
//! ready). Real tonic clients over real gRPC, real HTTP over TCP.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kakehashi_coordinator::backend::redis::{self, RedisTarget};
use kakehashi_coordinator::contract::sample_relays;
use kakehashi_coordinator::{Coordinator, CoordinatorConfig};
use kakehashi_loadtest::{LocalCluster, services};
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const WAIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    timeout(WAIT, fut)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// Reads a health watch stream until it reports `want`.
async fn watch_until(
    stream: &mut tonic::Streaming<HealthCheckResponse>,
    want: ServingStatus,
) -> Result<()> {
    within(&format!("health {want:?}"), async {
        loop {
            let Some(msg) = stream.message().await? else {
                bail!("health watch ended before {want:?}");
            };
            if msg.status == want as i32 {
                return Ok(());
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_serves_grpc_health() -> Result<()> {
    let cluster = LocalCluster::builder().relays(1).start().await?;
    let channel = Channel::from_shared(cluster.coordinator_url())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel);

    // Watch sees the first probe's verdict; Check then agrees.
    let mut watch = health.watch(check("")).await?.into_inner();
    watch_until(&mut watch, ServingStatus::Serving).await?;
    for service in [
        "",
        "kakehashi.v1.SessionService",
        "kakehashi.v1.AgentService",
    ] {
        let status = health.check(check(service)).await?.into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(check("kakehashi.v1.NoSuchService"))
        .await
        .expect_err("unknown services are not found");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_health_follows_redis() -> Result<()> {
    if std::env::var("KAKEHASHI_TEST_REDIS_URL").is_ok() {
        eprintln!("SKIPPING: an external Redis cannot be killed by this test");
        return Ok(());
    }
    let Some(mut server) = services::redis()? else {
        return Ok(());
    };
    let redis_config =
        kakehashi_loadtest::testkit::redis_config(RedisTarget::Single(server.url.clone()))?;
    let backends = redis::backends(&redis_config, sample_relays()).await?;
    let coordinator = Coordinator::start(CoordinatorConfig::dev(sample_relays()), backends).await?;
    let mut health = HealthClient::new(Channel::from_shared(coordinator.url())?.connect().await?);
    let mut watch = health
        .watch(check("kakehashi.v1.SessionService"))
        .await?
        .into_inner();
    watch_until(&mut watch, ServingStatus::Serving).await?;

    server.kill();
    watch_until(&mut watch, ServingStatus::NotServing).await?;
    let status = health.check(check("")).await?.into_inner().status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    server.restart()?;
    watch_until(&mut watch, ServingStatus::Serving).await?;
    coordinator.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_serves_reflection_v1_and_v1alpha() -> Result<()> {
    use tonic_reflection::pb::{v1, v1alpha};
    let cluster = LocalCluster::builder().relays(1).start().await?;
    let channel = Channel::from_shared(cluster.coordinator_url())?
        .connect()
        .await?;

    // v1: list the services, then fetch the file that defines SessionService.
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let requests = tokio_stream::iter([
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        },
        v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                    "kakehashi.v1.SessionService".into(),
                ),
            ),
        },
    ]);
    let mut answers = client.server_reflection_info(requests).await?.into_inner();
    let listed = within("reflection list", answers.message())
        .await??
        .context("no answer to ListServices")?;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        bail!("unexpected answer to ListServices: {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "kakehashi.v1.SessionService",
        "kakehashi.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let file = within("reflection file", answers.message())
        .await??
        .context("no answer to FileContainingSymbol")?;
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        file.message_response
    else {
        bail!("unexpected answer to FileContainingSymbol: {file:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // v1alpha, which older grpcurl releases speak.
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = tokio_stream::iter([v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    }]);
    let mut answers = alpha.server_reflection_info(requests).await?.into_inner();
    let listed = within("v1alpha reflection list", answers.message())
        .await??
        .context("no answer to v1alpha ListServices")?;
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        listed.message_response
    else {
        bail!("unexpected v1alpha answer: {listed:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "kakehashi.v1.AgentService"),
        "{list:?}"
    );
    cluster.shutdown().await;
    Ok(())
}

/// `GET path` over a fresh TCP connection; the status code and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(&format!("GET {path}"), async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        let code = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status line in {answer:?}"))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    })
    .await?
}

/// Polls a probe until it answers `want`: readiness changes have no event to await
/// from outside the process.
async fn probe_becomes(addr: std::net::SocketAddr, path: &str, want: u16) -> Result<()> {
    within(&format!("{path} = {want}"), async {
        loop {
            if http_get(addr, path).await?.0 == want {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?
}

async fn relay_probes_follow_the_drain(
    registration: Option<kakehashi_relay::Registration>,
) -> Result<()> {
    let key = kakehashi_coordinator::generate_signing_key()?;
    let mut config = kakehashi_relay::RelayConfig::dev("probe-relay", key.verifying_key());
    config.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    config.registration = registration;
    let relay = kakehashi_relay::Relay::start(config).await?;
    let http = relay.http_addr().context("the relay serves HTTP")?;

    probe_becomes(http, "/readyz", 200).await?;
    assert_eq!(http_get(http, "/livez").await?.0, 200);
    relay.begin_drain(Duration::from_secs(30));
    probe_becomes(http, "/readyz", 503).await?;
    let (code, body) = http_get(http, "/readyz").await?;
    assert_eq!((code, body.trim()), (503, "draining"));
    assert_eq!(
        http_get(http, "/livez").await?.0,
        200,
        "a draining relay is alive"
    );
    assert_eq!(http_get(http, "/nope").await?.0, 404);
    relay.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_readiness_drops_while_draining() -> Result<()> {
    relay_probes_follow_the_drain(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_registered_in_etcd_is_ready_until_it_drains() -> Result<()> {
    let Some(etcd) = services::etcd()? else {
        return Ok(());
    };
    let mut reg = kakehashi_relay::Registration::new(vec![etcd.url.clone()]);
    let mut rand = [0u8; 6];
    getrandom::fill(&mut rand)?;
    reg.namespace = format!("/test-{}/", hex::encode(rand));
    relay_probes_follow_the_drain(Some(reg)).await
}

/// One exported span, as the in-test collector saw it.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    trace_id: Vec<u8>,
    linked_traces: Vec<Vec<u8>>,
}

/// A minimal OTLP/gRPC trace collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    arrived: std::sync::Arc<tokio::sync::Notify>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut seen = Vec::new();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    seen.push(Seen {
                        name: span.name,
                        trace_id: span.trace_id,
                        linked_traces: span.links.into_iter().map(|l| l.trace_id).collect(),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(seen);
        }
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(Default::default()))
    }
}

impl Collector {
    fn snapshot(&self) -> Vec<Seen> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The only test in this binary that installs a global tracing subscriber and
/// OpenTelemetry provider; other tests' spans reach the collector too and are told
/// apart by trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_is_one_trace_from_create_to_end() -> Result<()> {
    use kakehashi_agent::{Consent, Host, HostConfig, HostEvent, Viewer, ViewerConfig};
    use kakehashi_proto::pb::session_service_client::SessionServiceClient;
    use kakehashi_proto::{Permissions, SessionId, pb};
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector_addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let collector = collector.clone();
        let stop = stop.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    stop.cancelled_owned(),
                )
                .await
        }
    });
    let provider = kakehashi_coordinator::telemetry::otel::install(
        &format!("http://{collector_addr}"),
        "kakehashi-test",
    )?;
    tracing_subscriber::registry()
        .with(kakehashi_coordinator::telemetry::otel::layer(&provider))
        .try_init()
        .context("another test installed a global subscriber")?;

    let cluster = LocalCluster::builder().relays(1).start().await?;
    let url = cluster.coordinator_url();
    // The call-center software's own trace, sent as W3C traceparent metadata.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut create = tonic::Request::new(pb::CreateSessionRequest {
        device_id: String::new(),
        tenant: "acme".into(),
        operator: "op-1".into(),
        mode: pb::SessionMode::Control as i32,
        permissions: 0,
        max_duration_secs: 600,
    });
    create.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-00f067aa0ba902b7-01").parse()?,
    );
    let mut api = SessionServiceClient::connect(url.clone()).await?;
    let created = api.create_session(create).await?.into_inner();
    let sid_text = created
        .session
        .as_ref()
        .map(|s| s.session_id.clone())
        .context("no session in the answer")?;
    let sid: SessionId = sid_text.parse()?;
    let mut viewer = Viewer::join(
        &url,
        &sid_text,
        &created.operator_ticket,
        ViewerConfig::default(),
    )
    .await?;
    let mut host = Host::join(
        &url,
        &created.code,
        HostConfig {
            consent: Consent::Approve(Permissions::VIEW),
        },
    )
    .await?;
    within("the viewer to see the grant", async {
        while let Some(ev) = viewer.next_event().await {
            if matches!(ev, kakehashi_agent::ViewerEvent::GrantsChanged(g) if g.contains(Permissions::VIEW))
            {
                return Ok(());
            }
        }
        bail!("viewer events ended")
    })
    .await??;
    api.end_session(pb::EndSessionRequest {
        session_id: sid_text.clone(),
        detail: "done".into(),
    })
    .await?;
    within("the host to see the end", async {
        while let Some(ev) = host.next_event().await {
            if matches!(ev, HostEvent::Ended { .. }) {
                return;
            }
        }
    })
    .await?;

    let want = [
        "session.create",
        "session.join_as_operator",
        "session.join_by_code",
        "relay.attach",
        "session.end",
        "relay.session",
    ];
    let trace = sid.as_bytes().to_vec();
    let caller = hex::decode(caller_trace)?;
    let spans = within("every span of the session at the collector", async {
        loop {
            let arrived = collector.arrived.notified();
            let spans = collector.snapshot();
            let have = |name: &str| spans.iter().any(|s| s.trace_id == trace && s.name == name);
            let caller_seen = spans
                .iter()
                .any(|s| s.trace_id == caller && s.name == "grpc");
            if want.iter().all(|n| have(n)) && caller_seen {
                return spans;
            }
            // Ask the batch processor to send what it holds instead of waiting for its
            // schedule; it blocks, so off the runtime's workers.
            let p = provider.clone();
            let _ = tokio::task::spawn_blocking(move || p.force_flush()).await;
            let _ = tokio::time::timeout(Duration::from_millis(500), arrived).await;
        }
    })
    .await?;
    let attaches = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == "relay.attach")
        .count();
    assert!(attaches >= 2, "host and viewer each attach: {attaches}");
    let create_span = spans
        .iter()
        .find(|s| s.trace_id == trace && s.name == "session.create")
        .context("no create span")?;
    assert!(
        create_span.linked_traces.contains(&caller),
        "session.create links the caller's trace: {create_span:?}"
    );

    cluster.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    stop.cancel();
    let _ = server.await;
    Ok(())
}
