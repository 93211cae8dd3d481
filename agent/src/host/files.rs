//! The host's side of file transfer: offers from the operator (asked of the customer),
//! chunks, checks, cancels, and replies to this host's own transfers.

use kakehashi_proto::{Permissions, pb};
use tracing::{debug, info, warn};

use super::{Command, Driver, HostEvent};
use crate::consent::{self, Consent, ConsentRequest};

impl Driver {
    /// Every transfer stops, both ways. The viewer is not sent a cancel (the relay
    /// refuses the file channel from now on); it stops on the same grant change.
    pub(super) async fn stop_files(&mut self, why: &str) {
        self.shared.outgoing.cancel_all(why);
        for (id, what) in self.incoming.clear() {
            self.report_file(format!("from the operator: {what} stopped: {why}"));
            self.emit(HostEvent::FileCancelled {
                transfer_id: id,
                reason: why.to_owned(),
            })
            .await;
        }
    }

    /// Sends a FILE message to the current viewer from a task of its own: the
    /// channel's replay buffer may be full of this host's own file, and the driver must
    /// keep reading the acks that make room.
    fn file_msg(&mut self, kind: pb::file_message::Kind) {
        let peer = {
            let state = self.shared.state();
            state.current.and_then(|id| state.viewers.get(&id)).cloned()
        };
        let Some(peer) = peer else {
            return;
        };
        let conduit = self.conduit.clone();
        self.replays.spawn(async move {
            if let Err(e) = crate::files::send(&conduit, &peer, kind).await {
                debug!(error = %e, "file message to the viewer not sent");
            }
        });
    }

    pub(super) async fn decide_file(&mut self, id: u64, accept: bool) {
        let granted = self.shared.state().granted;
        let accept = accept && granted.contains(Permissions::FILE_TRANSFER);
        let what = self.incoming.describe(id).unwrap_or_default();
        if !self.incoming.decide(id, accept) {
            debug!(transfer = id, "answer for a file no longer offered");
            return;
        }
        info!(transfer = id, accept, "customer decided on a file");
        self.report_file(format!(
            "from the operator: {what} {}",
            if accept { "accepted" } else { "refused" }
        ));
        self.file_msg(pb::file_message::Kind::Answer(pb::FileAnswer {
            transfer_id: id,
            accepted: accept,
            reason: if accept {
                String::new()
            } else {
                "the customer refused the file".into()
            },
        }));
        if accept && let Some(done) = self.incoming.complete_if_empty(id) {
            self.on_chunk_outcome(id, done).await;
        }
    }

    pub(super) async fn on_file(&mut self, msg: pb::FileMessage) {
        use crate::files::Reply;
        use pb::file_message::Kind;
        match msg.kind {
            Some(Kind::Offer(o)) => {
                let id = o.transfer_id;
                if let Err(why) = self.incoming.offer(&o) {
                    self.file_msg(Kind::Answer(pb::FileAnswer {
                        transfer_id: id,
                        accepted: false,
                        reason: why,
                    }));
                    return;
                }
                match self.consent {
                    Consent::Approve(allowed) => {
                        self.decide_file(id, allowed.contains(Permissions::FILE_TRANSFER))
                            .await;
                    }
                    Consent::Manual => {
                        self.emit(HostEvent::FileOffered {
                            transfer_id: id,
                            name: o.name,
                            size: o.size,
                        })
                        .await;
                    }
                    Consent::Prompt => {
                        let commands = self.commands_tx.clone();
                        let req = ConsentRequest {
                            viewer: 0,
                            permissions: Permissions::FILE_TRANSFER,
                            note: format!("receive the file {:?} ({} bytes)", o.name, o.size),
                            sas: String::new(),
                            supervisor: false,
                        };
                        self.prompts.spawn(async move {
                            let answer =
                                tokio::task::spawn_blocking(move || consent::prompt_blocking(&req))
                                    .await
                                    .unwrap_or(Permissions::NONE);
                            let _ = commands.send(Command::File(id, !answer.is_empty()));
                        });
                    }
                }
            }
            Some(Kind::Chunk(c)) => {
                let id = c.transfer_id;
                let outcome = self.incoming.chunk(c);
                self.on_chunk_outcome(id, outcome).await;
            }
            Some(Kind::Cancel(c)) => {
                if let Some(what) = self.incoming.cancel(c.transfer_id) {
                    self.report_file(format!("from the operator: {what} cancelled: {}", c.reason));
                    self.emit(HostEvent::FileCancelled {
                        transfer_id: c.transfer_id,
                        reason: c.reason.clone(),
                    })
                    .await;
                }
                self.shared
                    .outgoing
                    .deliver(c.transfer_id, Reply::Cancel(c.reason));
            }
            Some(Kind::Answer(a)) => {
                self.shared.outgoing.deliver(
                    a.transfer_id,
                    Reply::Answer {
                        accepted: a.accepted,
                        reason: a.reason,
                    },
                );
            }
            Some(Kind::Received(r)) => {
                if let Some(what) = self.shared.outgoing.describe(r.transfer_id) {
                    let how = if r.ok {
                        "received by the operator, SHA-256 checked".to_owned()
                    } else {
                        format!("failed: {}", r.reason)
                    };
                    self.report_file(format!("to the operator: {what} {how}"));
                }
                self.shared.outgoing.deliver(
                    r.transfer_id,
                    Reply::Received {
                        ok: r.ok,
                        reason: r.reason,
                    },
                );
            }
            None => debug!("empty file message"),
        }
    }

    async fn on_chunk_outcome(&mut self, id: u64, outcome: crate::files::ChunkOutcome) {
        use crate::files::ChunkOutcome;
        match outcome {
            ChunkOutcome::Partial | ChunkOutcome::Unknown => {}
            ChunkOutcome::Complete { name, data } => {
                info!(transfer = id, %name, bytes = data.len(), "file received");
                let what = crate::files::describe(&name, data.len() as u64);
                self.report_file(format!(
                    "from the operator: {what} received, SHA-256 checked"
                ));
                self.file_msg(pb::file_message::Kind::Received(pb::FileReceived {
                    transfer_id: id,
                    ok: true,
                    reason: String::new(),
                }));
                self.emit(HostEvent::FileReceived {
                    transfer_id: id,
                    name,
                    data,
                })
                .await;
            }
            ChunkOutcome::Failed(reason) => {
                warn!(transfer = id, %reason, "file transfer failed");
                self.report_file(format!("from the operator: file {id} failed: {reason}"));
                self.file_msg(pb::file_message::Kind::Received(pb::FileReceived {
                    transfer_id: id,
                    ok: false,
                    reason: reason.clone(),
                }));
                self.emit(HostEvent::FileCancelled {
                    transfer_id: id,
                    reason,
                })
                .await;
            }
        }
    }
}
