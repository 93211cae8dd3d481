//! Real Redis and etcd for tests, found or started here.
//!
//! The convention every test that needs a backing service follows:
//! - `KAKEHASHI_TEST_REDIS_URL` / `KAKEHASHI_TEST_ETCD_ENDPOINTS` name a running service
//!   to use as is;
//! - otherwise the test starts its own `redis-server` / `etcd` on a free loopback port
//!   with a private data directory, and stops it when the guard is dropped;
//! - if the binary is missing, the test is skipped with a loud message — except under
//!   `CI=true`, where a missing service is a failure, never a silent skip.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Whether a missing service must fail the test run.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A service the test uses: either one named by the environment, or one this process
/// started and will stop on drop.
pub struct Service {
    /// `redis://127.0.0.1:PORT` or `http://127.0.0.1:PORT`.
    pub url: String,
    child: Option<Child>,
    _dir: Option<TempDir>,
    /// How to start it again on the same port (services this process started).
    relaunch: Option<Relaunch>,
}

/// A command line and the readiness check that follows it.
struct Relaunch {
    bin: PathBuf,
    args: Vec<OsString>,
    port: u16,
}

impl Service {
    /// Starts a service this process started and [`Service::kill`]ed again, on the same
    /// port with the same data directory, and waits until it answers. An error for
    /// external services, which this process cannot restart.
    pub fn restart(&mut self) -> Result<()> {
        let Some(r) = &self.relaunch else {
            bail!(
                "{} was not started by this test and cannot be restarted",
                self.url
            );
        };
        let mut command = Command::new(&r.bin);
        command
            .args(&r.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (bin, port) = (r.bin.clone(), r.port);
        self.kill();
        let child = command
            .spawn()
            .with_context(|| format!("cannot restart {}", bin.display()))?;
        self.child = Some(child);
        wait_until(Duration::from_secs(10), || redis_ping(port))
            .with_context(|| format!("{} did not answer after a restart", self.url))
    }

    /// Stops a service this process started (for outage tests); no-op for external ones.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis for a test, or `None` (with a message) when it cannot be had outside CI.
pub fn redis() -> Result<Option<Service>> {
    if let Ok(url) = std::env::var("KAKEHASHI_TEST_REDIS_URL") {
        return Ok(Some(external(url)));
    }
    let Some(bin) = find_binary("redis-server") else {
        return missing("redis-server", "apt-get install redis-server");
    };
    Ok(Some(start_redis(&bin, &[])?))
}

/// Starts one redis-server on a free loopback port with its own directory; `extra` are
/// further arguments (cluster mode).
fn start_redis(bin: &std::path::Path, extra: &[&str]) -> Result<Service> {
    let dir = TempDir::new("redis")?;
    let port = free_port()?;
    let mut args: Vec<OsString> = ["--bind", "127.0.0.1", "--port", &port.to_string()]
        .iter()
        .chain(&["--save", "", "--appendonly", "no", "--dir"])
        .map(OsString::from)
        .collect();
    args.push(dir.0.clone().into_os_string());
    args.extend(extra.iter().map(OsString::from));
    if extra.contains(&"--cluster-enabled") {
        args.push("--cluster-config-file".into());
        args.push(dir.0.join("nodes.conf").into_os_string());
    }
    let child = Command::new(bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let service = Service {
        url: format!("redis://127.0.0.1:{port}"),
        child: Some(child),
        _dir: Some(dir),
        relaunch: Some(Relaunch {
            bin: bin.to_owned(),
            args,
            port,
        }),
    };
    wait_until(Duration::from_secs(10), || redis_ping(port))
        .context("redis-server did not answer PING")?;
    Ok(service)
}

/// A Redis Cluster for a test: its seed node URLs, and the nodes when started here.
pub struct RedisCluster {
    /// `redis://127.0.0.1:PORT` of every master.
    pub nodes: Vec<String>,
    pub services: Vec<Service>,
}

/// A 3-master Redis Cluster for a test, or `None` (with a message) when it cannot be had
/// outside CI. `KAKEHASHI_TEST_REDIS_CLUSTER_NODES` (comma-separated URLs) names a
/// running one.
pub fn redis_cluster() -> Result<Option<RedisCluster>> {
    if let Ok(list) = std::env::var("KAKEHASHI_TEST_REDIS_CLUSTER_NODES") {
        let nodes = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        return Ok(Some(RedisCluster {
            nodes,
            services: Vec::new(),
        }));
    }
    let (Some(server), Some(cli)) = (find_binary("redis-server"), find_binary("redis-cli")) else {
        return missing(
            "redis-server/redis-cli",
            "apt-get install redis-server redis-tools",
        )
        .map(|_| None);
    };
    let mut services = Vec::new();
    for _ in 0..3 {
        services.push(start_redis(&server, &["--cluster-enabled", "yes"])?);
    }
    let addrs: Vec<String> = services
        .iter()
        .map(|s| s.url.trim_start_matches("redis://").to_owned())
        .collect();
    let out = Command::new(&cli)
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run redis-cli --cluster create")?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ports: Vec<u16> = services
        .iter()
        .filter_map(|s| s.relaunch.as_ref().map(|r| r.port))
        .collect();
    wait_until(Duration::from_secs(20), || {
        ports.iter().all(|p| {
            exchange(*p, b"CLUSTER INFO\r\n").is_some_and(|r| r.contains("cluster_state:ok"))
        })
    })
    .context("the Redis Cluster did not reach cluster_state:ok")?;
    Ok(Some(RedisCluster {
        nodes: services.iter().map(|s| s.url.clone()).collect(),
        services,
    }))
}

/// etcd for a test, or `None` (with a message) when it cannot be had outside CI.
pub fn etcd() -> Result<Option<Service>> {
    if let Ok(url) = std::env::var("KAKEHASHI_TEST_ETCD_ENDPOINTS") {
        return Ok(Some(external(url)));
    }
    let Some(bin) = find_binary("etcd") else {
        return missing("etcd", "apt-get install etcd-server");
    };
    let dir = TempDir::new("etcd")?;
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "n1", "--data-dir"])
        .arg(dir.0.join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("n1={peer_url}")])
        .args(["--logger=zap", "--log-outputs=stderr"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start etcd")?;
    let service = Service {
        url: client_url,
        child: Some(child),
        _dir: Some(dir),
        relaunch: None,
    };
    wait_until(Duration::from_secs(20), || etcd_healthy(client))
        .context("etcd did not report healthy")?;
    Ok(Some(service))
}

fn external(url: String) -> Service {
    Service {
        url,
        child: None,
        _dir: None,
        relaunch: None,
    }
}

fn missing(bin: &str, hint: &str) -> Result<Option<Service>> {
    if in_ci() {
        bail!("{bin} is not installed and CI=true: a missing service is a failure ({hint})");
    }
    eprintln!("SKIPPING: {bin} not found ({hint}); set CI=true to make this a failure");
    Ok(None)
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not ready after {limit:?}")
}

fn exchange(port: u16, request: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_ping(port: u16) -> bool {
    exchange(port, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
}

fn etcd_healthy(port: u16) -> bool {
    let req = b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    exchange(port, req).is_some_and(|r| r.contains("\"health\":\"true\""))
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<Self> {
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).context("no randomness")?;
        let dir = std::env::temp_dir().join(format!("kakehashi-{what}-{}", hex::encode(rand)));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An etcd cluster of `n` members on loopback, started by this process, whose members
/// can be stopped and started again (same ports, same data) for fault tests. Never
/// taken from the environment: these tests stop etcd.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    _dir: TempDir,
}

/// One etcd member of an [`EtcdCluster`].
pub struct EtcdMember {
    pub name: String,
    /// `http://127.0.0.1:PORT`.
    pub client_url: String,
    client_port: u16,
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    child: Option<Child>,
}

impl EtcdMember {
    fn spawn(&mut self) -> Result<()> {
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start etcd member {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap: the member is gone as if its machine died.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a stopped member again (same ports and data) and waits until it reports
    /// healthy, which needs a quorum of its cluster to be up.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_none() {
            self.spawn()?;
        }
        let port = self.client_port;
        wait_until(Duration::from_secs(30), || etcd_healthy(port))
            .with_context(|| format!("etcd member {} did not report healthy", self.name))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EtcdCluster {
    /// Starts `n` members (1 or 3, typically) and waits until all report healthy.
    /// `None` (with a message) when etcd is not installed outside CI.
    pub fn start(n: usize) -> Result<Option<Self>> {
        let Some(bin) = find_binary("etcd") else {
            return missing("etcd", "apt-get install etcd-server").map(|_| None);
        };
        let dir = TempDir::new("etcd-cluster")?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{}=http://127.0.0.1:{peer}", i + 1))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::with_capacity(n);
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args: Vec<std::ffi::OsString> = vec![
                "--name".into(),
                name.clone().into(),
                "--data-dir".into(),
                dir.0.join(&name).into_os_string(),
                "--listen-client-urls".into(),
                client_url.clone().into(),
                "--advertise-client-urls".into(),
                client_url.clone().into(),
                "--listen-peer-urls".into(),
                peer_url.clone().into(),
                "--initial-advertise-peer-urls".into(),
                peer_url.into(),
                "--initial-cluster".into(),
                initial.clone().into(),
                "--initial-cluster-token".into(),
                "kakehashi-test".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
            ];
            let mut m = EtcdMember {
                name,
                client_url,
                client_port: *client,
                bin: bin.clone(),
                args,
                child: None,
            };
            m.spawn()?;
            members.push(m);
        }
        let mut cluster = Self { members, _dir: dir };
        for m in &mut cluster.members {
            m.start()?;
        }
        Ok(Some(cluster))
    }

    /// Client URLs of every member (running or not), for clients that balance.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Stops every member: etcd is down entirely.
    pub fn stop_all(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }

    /// Starts every stopped member and waits until all are healthy.
    pub fn start_all(&mut self) -> Result<()> {
        for m in &mut self.members {
            if !m.is_running() {
                m.spawn()?;
            }
        }
        for m in &mut self.members {
            m.start()?;
        }
        Ok(())
    }
}
