//! Real Redis and etcd for tests, found or started here.
//!
//! The convention every test that needs a backing service follows:
//! - `KAKEHASHI_TEST_REDIS_URL` / `KAKEHASHI_TEST_ETCD_ENDPOINTS` name a running service
//!   to use as is;
//! - otherwise the test starts its own `redis-server` / `etcd` on a free loopback port
//!   with a private data directory, and stops it when the guard is dropped;
//! - if the binary is missing, the test is skipped with a loud message — except under
//!   `CI=true`, where a missing service is a failure, never a silent skip.

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
}

impl Service {
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
    let dir = TempDir::new("redis")?;
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start redis-server")?;
    let service = Service {
        url: format!("redis://127.0.0.1:{port}"),
        child: Some(child),
        _dir: Some(dir),
    };
    wait_until(Duration::from_secs(10), || redis_ping(port))
        .context("redis-server did not answer PING")?;
    Ok(Some(service))
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
