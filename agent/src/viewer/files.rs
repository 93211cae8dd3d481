//! The viewer's side of file transfer: files from the customer (accepted while file
//! transfer is granted), checks, cancels, and replies to this viewer's own transfers.

use kakehashi_proto::{Permissions, pb};
use tracing::{debug, info};

use super::{Driver, ViewerEvent};
use crate::peer::Peer;

impl Driver {
    /// Files from the customer: accepted while file transfer is granted (the customer
    /// chose to send them), checked, handed to the application.
    pub(super) async fn on_file(&mut self, host: &Peer, msg: pb::FileMessage) {
        use crate::files::Reply;
        use pb::file_message::Kind;
        let mut reply = None;
        match msg.kind {
            Some(Kind::Offer(o)) => {
                let id = o.transfer_id;
                let granted = self.shared.state().granted;
                let verdict = if granted.contains(Permissions::FILE_TRANSFER) {
                    self.incoming.offer(&o)
                } else {
                    Err("file transfer is not granted".into())
                };
                let accepted = verdict.is_ok();
                if accepted {
                    self.incoming.decide(id, true);
                }
                reply = Some(Kind::Answer(pb::FileAnswer {
                    transfer_id: id,
                    accepted,
                    reason: verdict.err().unwrap_or_default(),
                }));
                if accepted && let Some(done) = self.incoming.complete_if_empty(id) {
                    self.send_file_msg(host, reply.take());
                    reply = self.chunk_outcome(id, done).await;
                }
            }
            Some(Kind::Chunk(c)) => {
                let id = c.transfer_id;
                let outcome = self.incoming.chunk(c);
                reply = self.chunk_outcome(id, outcome).await;
            }
            Some(Kind::Cancel(c)) => {
                if self.incoming.cancel(c.transfer_id).is_some() {
                    self.emit(ViewerEvent::FileCancelled {
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
        self.send_file_msg(host, reply);
    }

    /// From a task: this viewer's own file may fill the replay buffer, and the driver
    /// must keep reading the acks that make room.
    fn send_file_msg(&mut self, host: &Peer, kind: Option<pb::file_message::Kind>) {
        let Some(kind) = kind else {
            return;
        };
        let (conduit, host) = (self.conduit.clone(), host.clone());
        self.replays.spawn(async move {
            if let Err(e) = crate::files::send(&conduit, &host, kind).await {
                debug!(error = %e, "file message to the host not sent");
            }
        });
    }

    async fn chunk_outcome(
        &mut self,
        id: u64,
        outcome: crate::files::ChunkOutcome,
    ) -> Option<pb::file_message::Kind> {
        use crate::files::ChunkOutcome;
        match outcome {
            ChunkOutcome::Partial | ChunkOutcome::Unknown => None,
            ChunkOutcome::Complete { name, data } => {
                info!(transfer = id, %name, bytes = data.len(), "file received");
                self.emit(ViewerEvent::FileReceived {
                    transfer_id: id,
                    name,
                    data,
                })
                .await;
                Some(pb::file_message::Kind::Received(pb::FileReceived {
                    transfer_id: id,
                    ok: true,
                    reason: String::new(),
                }))
            }
            ChunkOutcome::Failed(reason) => {
                self.emit(ViewerEvent::FileCancelled {
                    transfer_id: id,
                    reason: reason.clone(),
                })
                .await;
                Some(pb::file_message::Kind::Received(pb::FileReceived {
                    transfer_id: id,
                    ok: false,
                    reason,
                }))
            }
        }
    }
}
