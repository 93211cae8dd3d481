//! Resuming a session on another relay: `AgentService.ResumeSession` with the current
//! token and the relay that was lost, then an attach to the relay it names, retried with
//! backoff for a bounded time. Also *following*: a participant whose own relay is fine
//! but whose peer left asks where the session is now, and moves if the peer already
//! moved it.

use std::time::Duration;

use kakehashi_proto::pb;
use kakehashi_proto::pb::agent_service_client::AgentServiceClient;
use kakehashi_proto::token::Role;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::crypto::Keypair;
use crate::error::AgentError;
use crate::link::{ATTACH_TIMEOUT, LinkError, RelayLink};
use crate::peer::Joined;

/// How long a participant tries to resume before ending the session.
pub const RESUME_BUDGET: Duration = Duration::from_secs(30);
/// One `ResumeSession` call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// A relay instance this participant lost is not tried again for this long: the
/// coordinator may not know yet that it is gone (its registration has not expired), and
/// every attempt on a dead relay costs a whole handshake timeout. Kept short, a few
/// registration leases, because a relay that restarted is a good place to go again.
const REMEMBER_LOST: Duration = Duration::from_secs(6);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a relay this participant lost recently gets to answer a new attach: enough
/// for a handshake to a live relay, far less than the idle timeout a dead one costs.
const RECENTLY_LOST_PROBE: Duration = Duration::from_millis(700);

/// A new attachment for the same session, participant and keys.
pub(crate) struct Moved {
    pub joined: Joined,
    pub link: RelayLink,
    pub welcome: pb::Welcome,
}

#[derive(Debug)]
pub(crate) enum Failure {
    /// The coordinator will not resume this session (it ended, or the token is no
    /// longer good); the text says why.
    Refused(String),
    /// Nothing worked within [`RESUME_BUDGET`], or there is no coordinator to ask.
    GaveUp(String),
}

enum Attempt {
    Final(String),
    Retry {
        why: String,
        /// A relay that failed on this attempt (id and certificate pin): the coordinator
        /// must not place there.
        failed_relay: Option<(String, Vec<u8>)>,
    },
}

pub(crate) struct Resumer {
    client: Option<AgentServiceClient<tonic::transport::Channel>>,
    role: Role,
    /// Relay instances lost recently (id, certificate pin if known), and when. A relay
    /// that restarted with a new certificate is a new instance and is not avoided.
    lost: Vec<(String, Option<Vec<u8>>, Instant)>,
}

impl Resumer {
    pub fn new(client: Option<AgentServiceClient<tonic::transport::Channel>>, role: Role) -> Self {
        Self {
            client,
            role,
            lost: Vec::new(),
        }
    }

    fn remember_lost(&mut self, relay_id: &str, cert: Option<&[u8]>) {
        let now = Instant::now();
        self.lost
            .retain(|(id, _, at)| id != relay_id && now.duration_since(*at) < REMEMBER_LOST);
        if !relay_id.is_empty() {
            self.lost
                .push((relay_id.to_owned(), cert.map(<[u8]>::to_vec), now));
        }
    }

    fn recently_lost(&self, relay: &pb::RelayEndpoint) -> Option<Duration> {
        self.lost
            .iter()
            .find(|(id, cert, at)| {
                *id == relay.relay_id
                    && cert.as_ref().is_none_or(|c| *c == relay.cert_sha256)
                    && at.elapsed() < REMEMBER_LOST
            })
            .map(|(_, _, at)| at.elapsed())
    }

    /// Resumes after losing `failed` (or after the relay asked to drain): retries until
    /// attached somewhere or [`RESUME_BUDGET`] runs out.
    pub async fn resume(
        &mut self,
        me: &Keypair,
        current: &Joined,
        token: &[u8],
        failed: &str,
    ) -> Result<Moved, Failure> {
        let Some(client) = self.client.clone() else {
            return Err(Failure::GaveUp(
                "this participant has no coordinator to resume through".into(),
            ));
        };
        let deadline = Instant::now() + RESUME_BUDGET;
        let cert = (failed == current.relay.relay_id).then_some(&current.relay.cert_sha256[..]);
        self.remember_lost(failed, cert);
        let mut failed = failed.to_owned();
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let why = match self
                .attempt(client.clone(), me, current, token, &failed, deadline)
                .await
            {
                Ok(moved) => return Ok(moved),
                Err(Attempt::Final(why)) => return Err(Failure::Refused(why)),
                Err(Attempt::Retry { why, failed_relay }) => {
                    if let Some((r, cert)) = failed_relay {
                        self.remember_lost(&r, Some(&cert));
                        failed = r;
                    }
                    why
                }
            };
            debug!(attempt = attempts, %why, "resume attempt failed");
            if Instant::now() + backoff >= deadline {
                return Err(Failure::GaveUp(format!(
                    "no relay took the session within {RESUME_BUDGET:?} ({attempts} attempts); last: {why}"
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Asks where the session is now, without naming a failed relay. `Some` when it is
    /// on another relay than `current_relay` and this participant attached there.
    pub async fn follow(
        &mut self,
        me: &Keypair,
        current: &Joined,
        token: &[u8],
        current_relay: &str,
    ) -> Option<Moved> {
        let client = self.client.clone()?;
        let joined = match self.ask(client, me, current, token, "").await {
            Ok(j) => j,
            Err(Attempt::Final(why) | Attempt::Retry { why, .. }) => {
                debug!(%why, "could not ask where the session is");
                return None;
            }
        };
        if joined.relay.relay_id == current_relay {
            return None;
        }
        info!(to = %joined.relay.relay_id, "the peer moved the session; following");
        match Self::attach(joined, Instant::now() + ATTACH_TIMEOUT).await {
            Ok(moved) => Some(moved),
            Err(Attempt::Final(why) | Attempt::Retry { why, .. }) => {
                warn!(%why, "could not follow the session to its new relay");
                None
            }
        }
    }

    async fn attempt(
        &self,
        client: AgentServiceClient<tonic::transport::Channel>,
        me: &Keypair,
        current: &Joined,
        token: &[u8],
        failed: &str,
        deadline: Instant,
    ) -> Result<Moved, Attempt> {
        let joined = self.ask(client, me, current, token, failed).await?;
        let placed = joined.relay.relay_id.clone();
        if let Some(ago) = self.recently_lost(&joined.relay) {
            // A relay that died may already be back (restarted under the same id): give
            // it a short probe instead of either refusing it or spending a whole
            // handshake timeout on it, and report it failed if it stays silent.
            let probe = (Instant::now() + RECENTLY_LOST_PROBE).min(deadline);
            return Self::attach(joined, probe).await.map_err(|e| match e {
                Attempt::Retry { why, failed_relay } => Attempt::Retry {
                    why: format!("relay {placed}, lost {ago:?} ago, is still silent: {why}"),
                    failed_relay,
                },
                fatal => fatal,
            });
        }
        Self::attach(joined, deadline).await
    }

    /// One `ResumeSession` call, its answer checked like a join: same session, role,
    /// participant and public key.
    async fn ask(
        &self,
        mut client: AgentServiceClient<tonic::transport::Channel>,
        me: &Keypair,
        current: &Joined,
        token: &[u8],
        failed: &str,
    ) -> Result<Joined, Attempt> {
        let req = pb::ResumeSessionRequest {
            token: token.to_vec(),
            failed_relay_id: failed.to_owned(),
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, client.resume_session(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                let why = AgentError::rpc("ResumeSession", status.clone()).to_string();
                use tonic::Code;
                return Err(match status.code() {
                    Code::FailedPrecondition
                    | Code::NotFound
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::InvalidArgument => Attempt::Final(why),
                    _ => Attempt::Retry {
                        why,
                        failed_relay: None,
                    },
                });
            }
            Err(_) => {
                return Err(Attempt::Retry {
                    why: format!("ResumeSession did not answer within {CALL_TIMEOUT:?}"),
                    failed_relay: None,
                });
            }
        };
        let joined = Joined::from_response("ResumeSession", resp, me, self.role)
            .map_err(|e| Attempt::Final(e.to_string()))?;
        if joined.session_id != current.session_id
            || joined.claims.participant_id != current.claims.participant_id
        {
            return Err(Attempt::Final(
                "ResumeSession answered for another session or participant".into(),
            ));
        }
        Ok(joined)
    }

    async fn attach(joined: Joined, deadline: Instant) -> Result<Moved, Attempt> {
        let relay_id = joined.relay.relay_id.clone();
        let cert = joined.relay.cert_sha256.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let connect = RelayLink::connect(&joined.relay, &joined.token, &joined.session_id);
        let retry = |why: String| Attempt::Retry {
            why,
            failed_relay: Some((relay_id.clone(), cert.clone())),
        };
        match tokio::time::timeout(left, connect).await {
            Ok(Ok((link, welcome))) => {
                if welcome.participant_id != joined.claims.participant_id {
                    return Err(retry(format!(
                        "relay {relay_id} welcomed participant {} instead of {}",
                        welcome.participant_id, joined.claims.participant_id
                    )));
                }
                Ok(Moved {
                    joined,
                    link,
                    welcome,
                })
            }
            // The relay knows the session has ended: nothing to resume.
            Ok(Err(LinkError::Ended(why))) => Err(Attempt::Final(why)),
            Ok(Err(e)) => Err(retry(format!("relay {relay_id}: {e}"))),
            Err(_) => Err(retry(format!("relay {relay_id}: attach ran out of time"))),
        }
    }
}
