//! A local cluster of separate OS processes: N coordinators and M relays running the
//! real server code (`kakehashi-loadtest coordinator|relay …`, or the real
//! `kakehashi-coordinator` / `kakehashi-relay` binaries), against real etcd (and
//! whatever extra backend flags, e.g. Redis, the caller passes through).
//!
//! Used by the process-level cluster tests (`tests/cluster_*.rs`), the loadtest's
//! kill scenarios and `ops/local-cluster.sh`. Every process gets OS-chosen ports
//! (`127.0.0.1:0`) and reports where it listens through a file it writes atomically
//! once it serves (the relay's `--endpoint-file`, the coordinator's `--url-file`);
//! waiting for that file is waiting for readiness. Logs go to files in the cluster's
//! private directory ([`Proc::log_tail`] shows them when something fails). Dropping the
//! cluster SIGKILLs whatever is still running.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;

/// How to start each kind of process: a program and the arguments before its flags.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub relay: (PathBuf, Vec<String>),
    pub coordinator: (PathBuf, Vec<String>),
}

impl Launcher {
    /// The `kakehashi-loadtest` binary's `relay` and `coordinator` subcommands (what
    /// tests use: `env!("CARGO_BIN_EXE_kakehashi-loadtest")`).
    pub fn loadtest(bin: impl Into<PathBuf>) -> Self {
        let bin = bin.into();
        Self {
            relay: (bin.clone(), vec!["relay".into()]),
            coordinator: (bin, vec!["coordinator".into()]),
        }
    }

    /// The real binaries from a directory (e.g. `target/release`).
    pub fn binaries(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            relay: (dir.join("kakehashi-relay"), Vec::new()),
            coordinator: (dir.join("kakehashi-coordinator"), Vec::new()),
        }
    }
}

/// How long a process gets to report that it serves.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One child process that can be killed, terminated and restarted with the same
/// command line.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    ready_file: PathBuf,
    child: Option<Child>,
    /// What the ready file said at the last (re)start.
    ready: String,
}

impl Proc {
    fn spawn(
        name: String,
        program: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
        ready_file: PathBuf,
    ) -> Result<Self> {
        let mut p = Self {
            name,
            program,
            args,
            log,
            ready_file,
            child: None,
            ready: String::new(),
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.ready_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Flags are all given explicitly; a KAKEHASHI_* variable in the test's
        // environment must not change what the child does.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KAKEHASHI_") {
                cmd.env_remove(k);
            }
        }
        // Logs go to files: no terminal colour codes in them.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.ready = self.wait_ready()?;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file)
                && !text.trim().is_empty()
            {
                return Ok(text.trim().to_owned());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited ({status}) before it was ready; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} was not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, then reap. No-op if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a relay drains, a coordinator shuts down); does not wait.
    pub fn terminate(&mut self) -> Result<()> {
        let pid = self.pid().context("not running")?;
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!(
                "SIGTERM to {} failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits for the process to exit, up to `limit`; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().context("not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > limit {
                bail!("{} still running after {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it if running, starts it again with the same flags, waits until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A relay process. [`RelayProc::endpoint`] is the `--relay` flag a static
/// coordinator would need (id, QUIC address, admin URL, certificate hash).
pub struct RelayProc {
    pub id: String,
    pub proc: Proc,
    /// Its `/metrics`, `/livez`, `/readyz` listener, with [`ProcClusterBuilder::metrics`].
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RelayProc {
    pub fn endpoint(&self) -> &str {
        &self.proc.ready
    }
}

/// A coordinator process.
pub struct CoordinatorProc {
    pub replica_id: String,
    pub proc: Proc,
    /// Its `/metrics` listener, with [`ProcClusterBuilder::metrics`].
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl CoordinatorProc {
    /// `http://127.0.0.1:PORT` of its gRPC services (changes on restart).
    pub fn url(&self) -> &str {
        &self.proc.ready
    }
}

/// Builds a [`ProcCluster`].
pub struct ProcClusterBuilder {
    launcher: Launcher,
    coordinators: usize,
    relays: usize,
    etcd_endpoints: Vec<String>,
    namespace: Option<String>,
    coordinator_args: Vec<String>,
    relay_args: Vec<String>,
    metrics: bool,
}

impl ProcClusterBuilder {
    pub fn new(launcher: Launcher) -> Self {
        Self {
            launcher,
            coordinators: 1,
            relays: 1,
            etcd_endpoints: Vec::new(),
            namespace: None,
            coordinator_args: Vec::new(),
            relay_args: Vec::new(),
            metrics: false,
        }
    }

    /// Gives every process a `--metrics-listen` on a free loopback port (see
    /// `metrics_addr` on [`CoordinatorProc`] and [`RelayProc`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    pub fn coordinators(mut self, n: usize) -> Self {
        self.coordinators = n;
        self
    }

    pub fn relays(mut self, n: usize) -> Self {
        self.relays = n;
        self
    }

    /// etcd client URLs; required (placement and leadership live there).
    pub fn etcd(mut self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.etcd_endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// etcd key namespace; a fresh random one by default, so clusters sharing an etcd
    /// never see each other.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Extra flags for every coordinator (e.g. the Redis backend's).
    pub fn coordinator_args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.coordinator_args
            .extend(args.into_iter().map(Into::into));
        self
    }

    /// Extra flags for every relay (e.g. `--drain-grace-secs 3`).
    pub fn relay_args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.relay_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the coordinators, then the relays, each waited for until it serves.
    pub fn start(self) -> Result<ProcCluster> {
        if self.etcd_endpoints.is_empty() {
            bail!("a process cluster needs etcd endpoints");
        }
        let dir = ClusterDir::new()?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).context("no randomness for the signing key")?;
        let signing_key = SigningKey::from_bytes(&seed);
        let key_file = dir.path().join("signing.key");
        std::fs::write(&key_file, hex::encode(seed))
            .with_context(|| format!("cannot write {}", key_file.display()))?;
        let namespace = match self.namespace {
            Some(ns) => ns,
            None => {
                let mut r = [0u8; 6];
                getrandom::fill(&mut r).context("no randomness")?;
                format!("/kakehashi-test-{}/", hex::encode(r))
            }
        };
        let mut cluster = ProcCluster {
            launcher: self.launcher,
            etcd_endpoints: self.etcd_endpoints,
            namespace,
            public_key_hex: hex::encode(signing_key.verifying_key().as_bytes()),
            signing_key,
            key_file,
            coordinator_args: self.coordinator_args,
            relay_args: self.relay_args,
            metrics: self.metrics,
            coordinators: Vec::new(),
            relays: Vec::new(),
            next_coordinator: 0,
            next_relay: 0,
            dir,
        };
        for _ in 0..self.coordinators {
            cluster.add_coordinator()?;
        }
        for _ in 0..self.relays {
            cluster.add_relay()?;
        }
        Ok(cluster)
    }
}

/// Coordinators and relays as processes; see the module docs.
pub struct ProcCluster {
    launcher: Launcher,
    pub etcd_endpoints: Vec<String>,
    /// etcd key namespace of this cluster (relays under `<ns>relays/`, leader `<ns>leader`).
    pub namespace: String,
    /// The cluster's token-signing key (its seed is in a file every coordinator reads).
    pub signing_key: SigningKey,
    pub public_key_hex: String,
    key_file: PathBuf,
    coordinator_args: Vec<String>,
    relay_args: Vec<String>,
    metrics: bool,
    pub coordinators: Vec<CoordinatorProc>,
    pub relays: Vec<RelayProc>,
    next_coordinator: usize,
    next_relay: usize,
    // Last: removed after the processes are killed (fields drop in order).
    dir: ClusterDir,
}

impl ProcCluster {
    /// The cluster's private directory (logs, key, ready files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `--metrics-listen` on a port the OS just handed out (and this process let
    /// go of), when the cluster was built with metrics.
    fn metrics_flag(&self, args: &mut Vec<OsString>) -> Result<Option<std::net::SocketAddr>> {
        if !self.metrics {
            return Ok(None);
        }
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free loopback port for a metrics listener")?;
        args.push("--metrics-listen".into());
        args.push(addr.to_string().into());
        Ok(Some(addr))
    }

    fn etcd_flag(&self) -> String {
        self.etcd_endpoints.join(",")
    }

    /// Starts one more coordinator replica and waits until it serves.
    pub fn add_coordinator(&mut self) -> Result<&mut CoordinatorProc> {
        self.next_coordinator += 1;
        let replica_id = format!("coordinator-{}", self.next_coordinator);
        let ready = self.dir().join(format!("{replica_id}.url"));
        let mut args: Vec<OsString> = self
            .launcher
            .coordinator
            .1
            .iter()
            .map(OsString::from)
            .collect();
        for a in [
            "--listen",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &self.etcd_flag(),
            "--etcd-namespace",
            &self.namespace,
            "--replica-id",
            &replica_id,
        ] {
            args.push(a.into());
        }
        args.push("--signing-key-file".into());
        args.push(self.key_file.clone().into_os_string());
        args.push("--url-file".into());
        args.push(ready.clone().into_os_string());
        let metrics_addr = self.metrics_flag(&mut args)?;
        args.extend(self.coordinator_args.iter().map(OsString::from));
        let proc = Proc::spawn(
            replica_id.clone(),
            self.launcher.coordinator.0.clone(),
            args,
            self.dir().join(format!("{replica_id}.log")),
            ready,
        )?;
        self.coordinators.push(CoordinatorProc {
            replica_id,
            proc,
            metrics_addr,
        });
        self.coordinators.last_mut().context("just pushed")
    }

    /// Starts one more relay (registered in etcd) and waits until it serves.
    pub fn add_relay(&mut self) -> Result<&mut RelayProc> {
        self.next_relay += 1;
        let id = format!("relay-{}", self.next_relay);
        let ready = self.dir().join(format!("{id}.endpoint"));
        let mut args: Vec<OsString> = self.launcher.relay.1.iter().map(OsString::from).collect();
        for a in [
            "--relay-id",
            &id,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--coordinator-key",
            &self.public_key_hex,
            "--etcd-endpoints",
            &self.etcd_flag(),
            "--etcd-namespace",
            &self.namespace,
            // Small buffers: many relays share one test machine.
            "--socket-buffer",
            "1048576",
        ] {
            args.push(a.into());
        }
        args.push("--endpoint-file".into());
        args.push(ready.clone().into_os_string());
        let metrics_addr = self.metrics_flag(&mut args)?;
        args.extend(self.relay_args.iter().map(OsString::from));
        let proc = Proc::spawn(
            id.clone(),
            self.launcher.relay.0.clone(),
            args,
            self.dir().join(format!("{id}.log")),
            ready,
        )?;
        self.relays.push(RelayProc {
            id,
            proc,
            metrics_addr,
        });
        self.relays.last_mut().context("just pushed")
    }

    pub fn relay(&mut self, id: &str) -> Option<&mut RelayProc> {
        self.relays.iter_mut().find(|r| r.id == id)
    }

    pub fn coordinator(&mut self, replica_id: &str) -> Option<&mut CoordinatorProc> {
        self.coordinators
            .iter_mut()
            .find(|c| c.replica_id == replica_id)
    }

    /// URLs of the coordinators still running.
    pub fn coordinator_urls(&mut self) -> Vec<String> {
        self.coordinators
            .iter_mut()
            .filter_map(|c| c.proc.is_running().then(|| c.url().to_owned()))
            .collect()
    }

    /// Logs of every process, for a failing test's output.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in self
            .coordinators
            .iter()
            .map(|c| &c.proc)
            .chain(self.relays.iter().map(|r| &r.proc))
        {
            out.push_str(&format!("---- {} ----\n{}\n", p.name, p.log_tail(lines)));
        }
        out
    }

    /// SIGKILLs every process (also done on drop).
    pub fn stop(&mut self) {
        for r in &mut self.relays {
            r.proc.kill();
        }
        for c in &mut self.coordinators {
            c.proc.kill();
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cluster's private directory, removed on drop.
struct ClusterDir(PathBuf);

impl ClusterDir {
    fn new() -> Result<Self> {
        let mut rand = [0u8; 8];
        getrandom::fill(&mut rand).context("no randomness")?;
        let dir = std::env::temp_dir().join(format!("kakehashi-cluster-{}", hex::encode(rand)));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        // Kept when asked, so a person can read the logs of a failed run.
        if std::env::var_os("KAKEHASHI_KEEP_CLUSTER_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Client helpers for tests and scenarios driving a [`ProcCluster`].
pub mod client {
    use std::future::Future;
    use std::time::{Duration, Instant};

    use anyhow::{Result, bail};
    use kakehashi_proto::pb;
    use kakehashi_proto::pb::session_service_client::SessionServiceClient;

    /// Asks the coordinator at `url` for a control-mode session.
    pub async fn create_session(url: &str) -> Result<pb::CreateSessionResponse, tonic::Status> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connect {url}: {e}")))?;
        let resp = SessionServiceClient::new(channel)
            .create_session(pb::CreateSessionRequest {
                device_id: String::new(),
                tenant: "cluster-test".into(),
                operator: "op".into(),
                mode: pb::SessionMode::Control as i32,
                permissions: 0,
                max_duration_secs: 0,
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The relay id a created session was placed on.
    pub fn relay_of(resp: &pb::CreateSessionResponse) -> String {
        resp.session
            .as_ref()
            .and_then(|s| s.relay.as_ref())
            .map(|r| r.relay_id.clone())
            .unwrap_or_default()
    }

    /// Polls `check` every 100 ms until it yields `Some`, failing after `limit` with
    /// `what` and the last state `check` reported. For state that lives in another
    /// process, where there is no event to await.
    pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            match check().await {
                Ok(v) => return Ok(v),
                Err(state) => last = state,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{what}: not reached within {limit:?}; last state: {last}")
    }
}
