//! Unattended access, the device's side: an installed agent keeps an Ed25519 device key
//! in a file (the only thing the agent ever writes to disk, and only when told to with
//! `kakehashi device init`), an admin enrols its public key, and the agent polls the
//! coordinator (`AgentService.PollDevice`, signed with the key) for sessions an allowed
//! operator opened for it. Each one it joins by code with [`Consent::Approve`] of what
//! the session allows: no code read out, no prompt.
//!
//! The proof is Ed25519 over [`PROOF_DOMAIN`] || device id || 0 || timestamp (8 bytes,
//! big-endian, unix ms); the coordinator (`kakehashi_coordinator::unattended`) builds
//! the same bytes and accepts a timestamp within 60 s of its clock and newer than the
//! device's last accepted poll.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
pub use kakehashi_proto::device::{PROOF_DOMAIN, device_id_of, proof_message};
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::{Mode, Permissions, pb};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::connect_coordinator;
use crate::{AgentError, Consent, Host, HostConfig, HostOptions};

/// The default pause between two polls.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A key file is one line of 64 hex digits; anything longer is not one.
const MAX_KEY_FILE_BYTES: u64 = 256;
/// Bound on one poll, so a hung coordinator delays the next poll, not forever.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the device key or the poll failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    // The io error is a plain field shown in the message (not a `source`), as in
    // `AgentError`, so an error chain does not repeat it.
    #[error("could not read the device key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("could not write the device key file {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a device key file: {what}")]
    BadKeyFile { path: PathBuf, what: &'static str },
    #[error("the device key file {path} may be read by others (mode {mode:o}); make it 0600")]
    KeyFileOpen { path: PathBuf, mode: u32 },
    #[error("no randomness for a device key: {0}")]
    Random(getrandom::Error),
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The device's Ed25519 key.
pub struct DeviceKey {
    signing: SigningKey,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    pub fn generate() -> Result<Self, DeviceError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(DeviceError::Random)?;
        Ok(Self::from_secret(secret))
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// Makes a key and writes it to a new file, readable by its owner only. An
    /// existing file is never overwritten: it may be an enrolled device's key.
    pub fn create_file(path: &Path) -> Result<Self, DeviceError> {
        use std::io::Write;
        let key = Self::generate()?;
        let write = |error| DeviceError::Write {
            path: path.to_owned(),
            error,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(write)?;
        let text = format!("{}\n", hex::encode(key.signing.to_bytes()));
        file.write_all(text.as_bytes()).map_err(write)?;
        file.sync_all().map_err(write)?;
        Ok(key)
    }

    /// Reads a key file written by [`DeviceKey::create_file`]; refuses one that group
    /// or others may read, as ssh does.
    pub fn load(path: &Path) -> Result<Self, DeviceError> {
        use std::io::Read;
        let read = |error| DeviceError::Read {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(read)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(DeviceError::KeyFileOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(read)?;
        let bad = |what| DeviceError::BadKeyFile {
            path: path.to_owned(),
            what,
        };
        let mut secret = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut secret)
            .map_err(|_| bad("expected one line of 64 hex digits"))?;
        Ok(Self::from_secret(secret))
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The signing key, for what else the device signs (evidence items, the
    /// monitoring ticket proof: [`crate::monitor`]).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// What the admin enrols: derived from the public key.
    pub fn device_id(&self) -> String {
        device_id_of(&self.public_key())
    }

    /// A signed poll at `timestamp_ms`.
    pub fn poll_request(&self, timestamp_ms: i64) -> pb::PollDeviceRequest {
        let device_id = self.device_id();
        let signature = self
            .signing
            .sign(&proof_message(&device_id, timestamp_ms))
            .to_bytes()
            .to_vec();
        pb::PollDeviceRequest {
            device_id,
            timestamp_ms,
            signature,
        }
    }
}

/// What the device consents to without asking: what the session allows (VIEW, plus
/// CONTROL in a control session, and whatever else its permissions name), never more.
pub fn consent_for(pending: &pb::PendingDeviceSession) -> Consent {
    Consent::Approve(allowed_permissions(pending))
}

/// The permissions a pending session allows: its bits, without CONTROL outside a
/// control session.
pub fn allowed_permissions(pending: &pb::PendingDeviceSession) -> Permissions {
    // Unknown bits are not consented to: they could mean more than this agent knows.
    let allowed = Permissions::from_bits(pending.permissions).unwrap_or(Permissions::VIEW);
    let mode = pb::SessionMode::try_from(pending.mode)
        .ok()
        .and_then(Mode::from_pb);
    match mode {
        Some(Mode::Control) => allowed,
        // A view session never takes control, whatever the bits say.
        _ => allowed.without(Permissions::CONTROL),
    }
}

/// Joins a pending session as its host, consenting by [`consent_for`].
pub async fn join(
    coordinator_url: &str,
    pending: &pb::PendingDeviceSession,
    options: HostOptions,
) -> Result<Host, AgentError> {
    let config = HostConfig {
        consent: consent_for(pending),
    };
    Host::join_with_options(coordinator_url, &pending.code, config, options).await
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Polls the coordinator for this device's sessions.
pub struct Poller {
    key: DeviceKey,
    client: AgentServiceClient<tonic::transport::Channel>,
    last_timestamp_ms: i64,
}

impl Poller {
    pub async fn connect(coordinator_url: &str, key: DeviceKey) -> Result<Self, DeviceError> {
        let channel = connect_coordinator(coordinator_url).await?;
        Ok(Self {
            key,
            client: AgentServiceClient::new(channel),
            last_timestamp_ms: 0,
        })
    }

    pub fn device_id(&self) -> String {
        self.key.device_id()
    }

    /// One poll: the sessions waiting for the device, each handed out once.
    pub async fn poll(&mut self) -> Result<Vec<pb::PendingDeviceSession>, AgentError> {
        // The coordinator takes each timestamp once; two polls in one millisecond (or a
        // clock stepping back a little) must still differ.
        let timestamp_ms = unix_ms().max(self.last_timestamp_ms + 1);
        self.last_timestamp_ms = timestamp_ms;
        let request = self.key.poll_request(timestamp_ms);
        let resp = tokio::time::timeout(POLL_TIMEOUT, self.client.poll_device(request))
            .await
            .map_err(|_| {
                AgentError::rpc(
                    "PollDevice",
                    tonic::Status::deadline_exceeded("no answer within 10 s"),
                )
            })?
            .map_err(|s| AgentError::rpc("PollDevice", s))?;
        Ok(resp.into_inner().sessions)
    }

    /// Polls every `interval` until `cancel`, sending each pending session to
    /// `sessions`. A failed poll is logged and retried at the next tick (the coordinator
    /// may be restarting); an UNAUTHENTICATED one stops the loop, since the device is not
    /// (or no longer) enrolled, or its clock is off by more than a minute.
    pub async fn run(
        mut self,
        interval: Duration,
        sessions: mpsc::Sender<pb::PendingDeviceSession>,
        cancel: CancellationToken,
    ) -> Result<(), AgentError> {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match self.poll().await {
                Ok(found) => {
                    for pending in found {
                        debug!(session = %pending.session_id, operator = %pending.operator, "unattended session waiting");
                        if sessions.send(pending).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Err(AgentError::Rpc { call, status })
                    if status.code() == tonic::Code::Unauthenticated =>
                {
                    return Err(AgentError::Rpc { call, status });
                }
                Err(e) => warn!(error = %e, "device poll failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_request_verifies_with_the_public_key() {
        use ed25519_dalek::{Signature, VerifyingKey};
        let key = DeviceKey::from_secret([3; 32]);
        let req = key.poll_request(1_800_000_000_000);
        assert_eq!(req.device_id, key.device_id());
        assert_eq!(req.device_id.len(), 32);
        let public = VerifyingKey::from_bytes(&key.public_key()).expect("key");
        let sig: [u8; 64] = req.signature.as_slice().try_into().expect("64 bytes");
        public
            .verify_strict(
                &proof_message(&req.device_id, req.timestamp_ms),
                &Signature::from_bytes(&sig),
            )
            .expect("verifies");
        assert!(
            public
                .verify_strict(
                    &proof_message(&req.device_id, req.timestamp_ms + 1),
                    &Signature::from_bytes(&sig),
                )
                .is_err()
        );
    }

    #[test]
    fn the_key_file_is_private_and_reads_back() {
        let dir = std::env::temp_dir().join(format!(
            "kakehashi-device-{}-{}",
            std::process::id(),
            unix_ms()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("device.key");
        let key = DeviceKey::create_file(&path).expect("created");
        assert!(
            matches!(
                DeviceKey::create_file(&path),
                Err(DeviceError::Write { .. })
            ),
            "an existing key is never overwritten"
        );
        let loaded = DeviceKey::load(&path).expect("loaded");
        assert_eq!(loaded.public_key(), key.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(matches!(
                DeviceKey::load(&path),
                Err(DeviceError::KeyFileOpen { .. })
            ));
        }
        let junk = dir.join("junk.key");
        std::fs::write(&junk, "not hex\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        assert!(matches!(
            DeviceKey::load(&junk),
            Err(DeviceError::BadKeyFile { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn consent_is_what_the_session_allows() {
        let pending = |mode: pb::SessionMode, p: Permissions| pb::PendingDeviceSession {
            mode: mode as i32,
            permissions: p.bits(),
            ..Default::default()
        };
        let both = Permissions::VIEW | Permissions::CONTROL;
        assert!(matches!(
            consent_for(&pending(pb::SessionMode::Control, both)),
            Consent::Approve(p) if p == both
        ));
        assert!(matches!(
            consent_for(&pending(pb::SessionMode::View, both)),
            Consent::Approve(p) if p == Permissions::VIEW
        ));
    }
}
