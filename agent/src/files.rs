//! File transfer over the FILE channel (`pb::FileMessage`), either direction: offer,
//! approval, chunks, SHA-256 check, cancel. The bookkeeping is plain state (no I/O),
//! shared by host and viewer; sending is [`send_file`], run by the application's task
//! while the participant's driver routes the peer's answers here.
//!
//! Limits: a file is at most [`MAX_FILE_BYTES`], its name at most [`MAX_NAME_CHARS`]
//! characters without a directory part, and a receiver holds at most
//! [`MAX_INCOMING`] transfers at once. Received files are kept in memory and handed to
//! the application as bytes: the agent itself writes nothing to disk.
//!
//! Flow control and resumption come from the conduit: FILE frames are reliable, sent
//! below input and chat (QUIC priority), kept until acknowledged (a full replay buffer
//! makes the sender wait) and replayed after a relay move.

use std::collections::HashMap;
use std::sync::Mutex;

use kakehashi_proto::pb::{self, file_message::Kind};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Largest file accepted or sent.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes per FILE frame (the channel allows 256 KiB; smaller chunks interleave better).
pub const CHUNK_BYTES: usize = 64 * 1024;
pub const MAX_NAME_CHARS: usize = 255;
/// Transfers a receiver holds at once.
pub const MAX_INCOMING: usize = 4;
/// File bytes a sender lets wait for acknowledgement: well below the replay buffer
/// (8 MiB per channel), so a chunk never waits for room where a revoke could not
/// interrupt it.
const WINDOW_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("file of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("file name {0:?} is not a plain name (1 to 255 characters, no '/' or '\\\\')")]
    BadName(String),
    #[error("the customer has not granted file transfer")]
    NotGranted,
    #[error("the peer refused the file: {0}")]
    Refused(String),
    #[error("the transfer was cancelled: {0}")]
    Cancelled(String),
    #[error("the receiver reports the file arrived damaged: {0}")]
    Damaged(String),
    #[error("the session ended during the transfer")]
    Ended,
    #[error("could not send: {0}")]
    Send(String),
}

/// What the peer said about one of our outgoing transfers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Answer { accepted: bool, reason: String },
    Cancel(String),
    Received { ok: bool, reason: String },
}

/// Outgoing transfers waiting for the peer; the driver delivers replies here.
#[derive(Default)]
pub struct Outgoing {
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
    /// "name (size bytes)" of each, for the event log.
    names: Mutex<HashMap<u64, String>>,
}

impl Outgoing {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<Reply>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, id: u64, what: String) -> mpsc::UnboundedReceiver<Reply> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.map().insert(id, tx);
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, what);
        rx
    }

    pub fn forget(&self, id: u64) {
        self.map().remove(&id);
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// "name (size bytes)" of an outgoing transfer.
    pub fn describe(&self, id: u64) -> Option<String> {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Routes a reply; `false` if no transfer of ours has that id.
    pub fn deliver(&self, id: u64, reply: Reply) -> bool {
        self.map().get(&id).is_some_and(|tx| tx.send(reply).is_ok())
    }

    /// Every outgoing transfer stops (file transfer revoked, session over).
    pub fn cancel_all(&self, reason: &str) {
        for tx in self.map().values() {
            let _ = tx.send(Reply::Cancel(reason.to_owned()));
        }
    }
}

/// A file being received.
struct Incoming {
    name: String,
    size: u64,
    sha256: Vec<u8>,
    data: Vec<u8>,
    accepted: bool,
}

/// What a chunk did to its transfer.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// More to come.
    Partial,
    /// Complete and its SHA-256 matched.
    Complete { name: String, data: Vec<u8> },
    /// The transfer failed and is dropped; tell the sender why.
    Failed(String),
    /// No such transfer (cancelled or never offered): ignored.
    Unknown,
}

/// Incoming transfers, by id.
#[derive(Default)]
pub struct Receiver {
    transfers: HashMap<u64, Incoming>,
}

impl Receiver {
    /// Checks an offer against the limits and holds it, not yet accepted.
    pub fn offer(&mut self, o: &pb::FileOffer) -> Result<(), String> {
        check_name(&o.name).map_err(|e| e.to_string())?;
        if o.size > MAX_FILE_BYTES {
            return Err(FileError::TooLarge {
                size: o.size,
                max: MAX_FILE_BYTES,
            }
            .to_string());
        }
        if o.sha256.len() != 32 {
            return Err("the offer's SHA-256 is not 32 bytes".into());
        }
        if self.transfers.len() >= MAX_INCOMING {
            return Err(format!("already receiving {MAX_INCOMING} files"));
        }
        if self.transfers.contains_key(&o.transfer_id) {
            return Err("a transfer with this id is already under way".into());
        }
        self.transfers.insert(
            o.transfer_id,
            Incoming {
                name: o.name.clone(),
                size: o.size,
                sha256: o.sha256.clone(),
                data: Vec::new(),
                accepted: false,
            },
        );
        Ok(())
    }

    /// The application approved (`true`) or refused the offer; refused ones are dropped.
    /// `false` if no such offer is held.
    pub fn decide(&mut self, id: u64, accept: bool) -> bool {
        if accept {
            match self.transfers.get_mut(&id) {
                Some(t) => {
                    t.accepted = true;
                    true
                }
                None => false,
            }
        } else {
            self.transfers.remove(&id).is_some()
        }
    }

    pub fn cancel(&mut self, id: u64) -> Option<String> {
        self.transfers
            .remove(&id)
            .map(|t| describe(&t.name, t.size))
    }

    /// "name (size bytes)" of an incoming transfer.
    pub fn describe(&self, id: u64) -> Option<String> {
        self.transfers.get(&id).map(|t| describe(&t.name, t.size))
    }

    /// Drops every transfer and returns their ids and descriptions.
    pub fn clear(&mut self) -> Vec<(u64, String)> {
        self.transfers
            .drain()
            .map(|(id, t)| (id, describe(&t.name, t.size)))
            .collect()
    }

    pub fn chunk(&mut self, c: pb::FileChunk) -> ChunkOutcome {
        let Some(t) = self.transfers.get_mut(&c.transfer_id) else {
            return ChunkOutcome::Unknown;
        };
        let failed = |this: &mut Self, why: String| {
            this.transfers.remove(&c.transfer_id);
            ChunkOutcome::Failed(why)
        };
        if !t.accepted {
            return failed(self, "a chunk arrived before the file was accepted".into());
        }
        if c.offset != t.data.len() as u64 {
            let why = format!(
                "chunk at offset {} where {} was expected",
                c.offset,
                t.data.len()
            );
            return failed(self, why);
        }
        if t.data.len() as u64 + c.data.len() as u64 > t.size {
            let why = format!("more than the offered {} bytes", t.size);
            return failed(self, why);
        }
        t.data.extend_from_slice(&c.data);
        if (t.data.len() as u64) < t.size {
            return ChunkOutcome::Partial;
        }
        let Some(t) = self.transfers.remove(&c.transfer_id) else {
            return ChunkOutcome::Unknown;
        };
        if Sha256::digest(&t.data).as_slice() != t.sha256.as_slice() {
            return ChunkOutcome::Failed("the SHA-256 does not match the offer".into());
        }
        ChunkOutcome::Complete {
            name: t.name,
            data: t.data,
        }
    }

    /// For an empty file, which has no chunks: complete once accepted.
    pub fn complete_if_empty(&mut self, id: u64) -> Option<ChunkOutcome> {
        let empty = self.transfers.get(&id).is_some_and(|t| t.size == 0);
        empty.then(|| {
            self.chunk(pb::FileChunk {
                transfer_id: id,
                offset: 0,
                data: Vec::new(),
            })
        })
    }
}

/// How a file appears in the event log.
pub fn describe(name: &str, size: u64) -> String {
    format!("{name:?} ({size} bytes)")
}

pub fn check_name(name: &str) -> Result<(), FileError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.contains(['/', '\\', '\0'])
        && name != "."
        && name != ".."
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(FileError::BadName(name.to_owned()))
    }
}

pub fn message(kind: Kind) -> pb::FileMessage {
    pb::FileMessage { kind: Some(kind) }
}

/// The offer for `data`.
pub fn offer_for(transfer_id: u64, name: &str, data: &[u8]) -> Result<pb::FileOffer, FileError> {
    check_name(name)?;
    let size = data.len() as u64;
    if size > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            size,
            max: MAX_FILE_BYTES,
        });
    }
    Ok(pb::FileOffer {
        transfer_id,
        name: name.to_owned(),
        size,
        sha256: Sha256::digest(data).to_vec(),
    })
}

/// A fresh transfer id (random, so the two sides never collide).
pub fn new_transfer_id() -> u64 {
    let mut b = [0u8; 8];
    // A failing OS RNG leaves zeros; ids only need to differ between live transfers,
    // and the receiver refuses a duplicate id.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// Sends `data` as file `name` to `peer`: offer, wait for the approval, chunks, wait
/// for the receiver's SHA-256 check. Stops (and tells the peer) as soon as `granted`
/// says file transfer is no longer allowed or the peer cancels.
pub(crate) async fn send_file(
    conduit: &crate::conduit::Conduit,
    peer: &crate::peer::Peer,
    outgoing: &Outgoing,
    granted: impl Fn() -> bool,
    name: &str,
    data: &[u8],
) -> Result<(), FileError> {
    if !granted() {
        return Err(FileError::NotGranted);
    }
    let id = new_transfer_id();
    let offer = offer_for(id, name, data)?;
    let mut replies = outgoing.register(id, describe(name, data.len() as u64));
    let result = async {
        send(conduit, peer, Kind::Offer(offer)).await?;
        match replies.recv().await {
            Some(Reply::Answer { accepted: true, .. }) => {}
            Some(Reply::Answer { reason, .. }) => return Err(FileError::Refused(reason)),
            Some(Reply::Cancel(why)) => return Err(FileError::Cancelled(why)),
            Some(Reply::Received { reason, .. }) => return Err(FileError::Damaged(reason)),
            None => return Err(FileError::Ended),
        }
        for (i, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            tokio::select! {
                room = conduit.below(kakehashi_proto::Channel::File, WINDOW_BYTES) => {
                    room.map_err(|_| FileError::Ended)?;
                }
                reply = replies.recv() => match reply {
                    Some(Reply::Cancel(why)) => return Err(FileError::Cancelled(why)),
                    Some(_) => {}
                    None => return Err(FileError::Ended),
                },
            }
            if let Ok(Reply::Cancel(why)) = replies.try_recv() {
                return Err(FileError::Cancelled(why));
            }
            // A revoke stops the file between two chunks. No cancel is sent: the
            // relay refuses the channel from now on, and the peer saw the same grant.
            if !granted() {
                return Err(FileError::Cancelled("file transfer was revoked".into()));
            }
            let c = pb::FileChunk {
                transfer_id: id,
                offset: (i * CHUNK_BYTES) as u64,
                data: chunk.to_vec(),
            };
            send(conduit, peer, Kind::Chunk(c)).await?;
        }
        loop {
            match replies.recv().await {
                Some(Reply::Received { ok: true, .. }) => return Ok(()),
                Some(Reply::Received { reason, .. }) => return Err(FileError::Damaged(reason)),
                Some(Reply::Cancel(why)) => return Err(FileError::Cancelled(why)),
                Some(Reply::Answer { .. }) => {}
                None => return Err(FileError::Ended),
            }
        }
    }
    .await;
    outgoing.forget(id);
    result
}

pub(crate) async fn send(
    conduit: &crate::conduit::Conduit,
    peer: &crate::peer::Peer,
    kind: Kind,
) -> Result<(), FileError> {
    use prost::Message;
    conduit
        .send(
            &peer.keys,
            peer.participant_id,
            kakehashi_proto::Channel::File,
            0,
            &message(kind).encode_to_vec(),
        )
        .await
        .map_err(|e| FileError::Send(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(r: &mut Receiver, data: &[u8]) -> u64 {
        assert_eq!(describe("a", 2), "\"a\" (2 bytes)");
        let o = offer_for(7, "report.pdf", data).expect("offer");
        r.offer(&o).expect("within limits");
        assert!(r.decide(7, true));
        7
    }

    #[test]
    fn chunks_reassemble_and_are_checked() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut r = Receiver::default();
        let id = accepted(&mut r, &data);
        let mut out = ChunkOutcome::Unknown;
        for (i, c) in data.chunks(CHUNK_BYTES).enumerate() {
            out = r.chunk(pb::FileChunk {
                transfer_id: id,
                offset: (i * CHUNK_BYTES) as u64,
                data: c.to_vec(),
            });
        }
        assert_eq!(
            out,
            ChunkOutcome::Complete {
                name: "report.pdf".into(),
                data
            }
        );
    }

    #[test]
    fn damage_gaps_and_excess_fail() {
        let data = vec![1u8; 10];
        let mut r = Receiver::default();
        let id = accepted(&mut r, &data);
        let out = r.chunk(pb::FileChunk {
            transfer_id: id,
            offset: 0,
            data: vec![2u8; 10],
        });
        assert!(matches!(out, ChunkOutcome::Failed(ref w) if w.contains("SHA-256")));
        let id = accepted(&mut r, &data);
        let out = r.chunk(pb::FileChunk {
            transfer_id: id,
            offset: 5,
            data: vec![1u8; 5],
        });
        assert!(matches!(out, ChunkOutcome::Failed(ref w) if w.contains("offset")));
        let id = accepted(&mut r, &data);
        let out = r.chunk(pb::FileChunk {
            transfer_id: id,
            offset: 0,
            data: vec![1u8; 11],
        });
        assert!(matches!(out, ChunkOutcome::Failed(_)));
        assert_eq!(
            r.chunk(pb::FileChunk {
                transfer_id: 99,
                offset: 0,
                data: vec![]
            }),
            ChunkOutcome::Unknown
        );
    }

    #[test]
    fn offers_are_bounded() {
        let mut r = Receiver::default();
        let mut o = offer_for(1, "a.txt", b"x").expect("offer");
        o.size = MAX_FILE_BYTES + 1;
        assert!(r.offer(&o).is_err());
        assert!(offer_for(1, "../etc/passwd", b"x").is_err());
        assert!(offer_for(1, "", b"x").is_err());
        for id in 0..MAX_INCOMING as u64 {
            r.offer(&offer_for(id, "a.txt", b"x").expect("offer"))
                .expect("room");
        }
        assert!(
            r.offer(&offer_for(99, "a.txt", b"x").expect("offer"))
                .is_err()
        );
        assert_eq!(r.clear().len(), MAX_INCOMING);
    }

    #[test]
    fn an_unaccepted_offer_takes_no_chunks() {
        let mut r = Receiver::default();
        r.offer(&offer_for(3, "a.txt", b"abc").expect("offer"))
            .expect("room");
        assert!(matches!(
            r.chunk(pb::FileChunk {
                transfer_id: 3,
                offset: 0,
                data: b"abc".to_vec()
            }),
            ChunkOutcome::Failed(_)
        ));
    }
}
