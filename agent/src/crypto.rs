//! End-to-end encryption between the host and a viewer.
//!
//! Each participant makes an X25519 keypair, and the coordinator binds the public key
//! into the participant's signed token, so a relay cannot substitute it. From the
//! Diffie-Hellman secret both ends derive, with HKDF-SHA256:
//!
//! ```text
//! salt = session id (16 bytes)
//! ikm  = X25519(my secret, peer public)
//! info = "kakehashi e2e v1" || host public || viewer public || label
//! label "host->viewer" -> 32-byte AES-256-GCM key for frames the host sends
//! label "viewer->host" -> 32-byte AES-256-GCM key for frames the viewer sends
//! label "sas"          -> 8 bytes, shown as six decimal digits "123 456"
//! ```
//!
//! A frame's nonce is `[channel, 0, 0, 0, seq as u64 BE]` and its associated data is the
//! whole 24-byte header (whose `len` is the ciphertext length), so the relay can neither
//! re-label a payload nor move it to another channel or position.
//!
//! Screen pictures are sealed once for every watcher under a [`GroupKey`]: 32 random
//! bytes the host makes and hands to the operator and to each supervisor the customer
//! admitted, sealed with that viewer's pairwise keys, before every key frame. A new
//! group key (epoch) replaces it whenever an admitted supervisor leaves.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key};
use hkdf::Hkdf;
use kakehashi_proto::{Channel, Frame, FrameHeader, SessionId};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Bytes the AES-GCM tag adds to every payload.
pub const TAG_LEN: usize = 16;

const INFO_PREFIX: &[u8] = b"kakehashi e2e v1";
const LABEL_HOST_TO_VIEWER: &[u8] = b"host->viewer";
const LABEL_VIEWER_TO_HOST: &[u8] = b"viewer->host";
const LABEL_SAS: &[u8] = b"sas";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("the peer's public key is a low-order point; refusing a predictable shared secret")]
    NonContributory,
    #[error("{channel} frame seq {seq} failed to decrypt (wrong key, or altered in transit)")]
    Open { channel: &'static str, seq: u64 },
    #[error("{channel} frame seq {seq} could not be encrypted")]
    Seal { channel: &'static str, seq: u64 },
    #[error("{channel} payload of {len} bytes (with tag) exceeds the channel limit of {max}")]
    TooLarge {
        channel: &'static str,
        len: usize,
        max: u32,
    },
}

/// Which end of the session a participant is; decides the direction of each key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Viewer,
}

/// A participant's X25519 keypair, made fresh for every session.
pub struct Keypair {
    secret: StaticSecret,
    public: PublicKey,
}

impl Keypair {
    /// Makes a keypair from 32 bytes of the operating system's randomness.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(CryptoError::Random)?;
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Ok(Self { secret, public })
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl std::fmt::Debug for Keypair {
    // Never print the secret half.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keypair(public={})", hex::encode(self.public.as_bytes()))
    }
}

/// The keys one participant shares with one peer: one AEAD per direction and the SAS.
#[derive(Clone)]
pub struct SessionKeys {
    seal: Aes256Gcm,
    open: Aes256Gcm,
    sas: String,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys(sas={})", self.sas)
    }
}

impl SessionKeys {
    /// Derives the keys `me` (on `side`) shares with the peer whose public key is
    /// `peer_public`. Both ends get the same SAS and mirrored directions.
    pub fn derive(
        me: &Keypair,
        side: Side,
        peer_public: &[u8; 32],
        session: &SessionId,
    ) -> Result<Self, CryptoError> {
        let peer = PublicKey::from(*peer_public);
        let shared = me.secret.diffie_hellman(&peer);
        if !shared.was_contributory() {
            return Err(CryptoError::NonContributory);
        }
        let (host_pub, viewer_pub) = match side {
            Side::Host => (me.public.to_bytes(), *peer_public),
            Side::Viewer => (*peer_public, me.public.to_bytes()),
        };
        let hk = Hkdf::<Sha256>::new(Some(session.as_bytes()), shared.as_bytes());
        let expand = |label: &[u8], out: &mut [u8]| {
            // Outputs of at most 32 bytes are far below HKDF's 255 * 32 limit.
            hk.expand_multi_info(&[INFO_PREFIX, &host_pub, &viewer_pub, label], out)
                .map_err(|_| CryptoError::NonContributory)
        };
        let mut h2v = [0u8; 32];
        let mut v2h = [0u8; 32];
        let mut sas = [0u8; 8];
        expand(LABEL_HOST_TO_VIEWER, &mut h2v)?;
        expand(LABEL_VIEWER_TO_HOST, &mut v2h)?;
        expand(LABEL_SAS, &mut sas)?;
        let h2v = Aes256Gcm::new(&Key::<Aes256Gcm>::from(h2v));
        let v2h = Aes256Gcm::new(&Key::<Aes256Gcm>::from(v2h));
        let (seal, open) = match side {
            Side::Host => (h2v, v2h),
            Side::Viewer => (v2h, h2v),
        };
        Ok(Self {
            seal,
            open,
            sas: sas_string(sas),
        })
    }

    /// The short authentication string both people read to each other: "123 456".
    pub fn sas(&self) -> &str {
        &self.sas
    }

    /// Encrypts `plaintext` into a frame on `channel` with sequence number `seq`. The
    /// caller guarantees `seq` is never reused on this channel under these keys.
    pub fn seal(
        &self,
        channel: Channel,
        flags: u8,
        seq: u64,
        plaintext: &[u8],
    ) -> Result<Frame, CryptoError> {
        let len = plaintext.len() + TAG_LEN;
        let max = channel.max_payload();
        let wire_len =
            u32::try_from(len)
                .ok()
                .filter(|l| *l <= max)
                .ok_or(CryptoError::TooLarge {
                    channel: channel.name(),
                    len,
                    max,
                })?;
        let header = FrameHeader::new(
            channel,
            flags,
            seq,
            kakehashi_proto::unix_now_us(),
            wire_len,
        );
        let aad = header.encode();
        let ciphertext = self
            .seal
            .encrypt(
                &nonce(channel, seq),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Seal {
                channel: channel.name(),
                seq,
            })?;
        Ok(Frame::new(header, &ciphertext))
    }

    /// Decrypts and authenticates a frame from the peer.
    pub fn open(&self, frame: &Frame) -> Result<Vec<u8>, CryptoError> {
        let channel = frame.header.channel;
        let seq = frame.header.seq;
        self.open
            .decrypt(
                &nonce(channel, seq),
                Payload {
                    msg: frame.payload(),
                    aad: frame.header_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open {
                channel: channel.name(),
                seq,
            })
    }
}

/// The key the host seals every screen frame with, once, for all the viewers it let
/// watch: the relay fans one ciphertext out. Random, made by the host, handed to each
/// admitted viewer sealed with that viewer's pairwise keys (a `pb::ScreenFrame` with
/// `group_key` set); a new epoch whenever a watcher leaves, so one who left cannot read
/// what follows. Nonces stay unique: the host's screen sequence numbers never repeat.
#[derive(Clone)]
pub struct GroupKey {
    epoch: u32,
    key: [u8; 32],
    keys: SessionKeys,
}

impl std::fmt::Debug for GroupKey {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupKey(epoch={})", self.epoch)
    }
}

impl GroupKey {
    /// A fresh key from the operating system's randomness.
    pub fn generate(epoch: u32) -> Result<Self, CryptoError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(CryptoError::Random)?;
        Ok(Self::from_bytes(epoch, key))
    }

    /// The key a host handed over; `None` unless it is exactly 32 bytes.
    pub fn from_pb(g: &kakehashi_proto::pb::GroupKey) -> Option<Self> {
        let key: [u8; 32] = g.key.as_slice().try_into().ok()?;
        Some(Self::from_bytes(g.epoch, key))
    }

    fn from_bytes(epoch: u32, key: [u8; 32]) -> Self {
        let aead = Aes256Gcm::new(&Key::<Aes256Gcm>::from(key));
        Self {
            epoch,
            key,
            keys: SessionKeys {
                seal: aead.clone(),
                open: aead,
                sas: String::new(),
            },
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Seals and opens screen frames (the same key both ways).
    pub fn keys(&self) -> &SessionKeys {
        &self.keys
    }

    /// The next epoch's key.
    pub fn rotate(&self) -> Result<Self, CryptoError> {
        Self::generate(self.epoch.wrapping_add(1))
    }

    pub fn to_pb(&self) -> kakehashi_proto::pb::GroupKey {
        kakehashi_proto::pb::GroupKey {
            epoch: self.epoch,
            key: self.key.to_vec(),
        }
    }
}

fn nonce(channel: Channel, seq: u64) -> aes_gcm::aead::Nonce<Aes256Gcm> {
    let mut n = [0u8; 12];
    n[0] = channel as u8;
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n.into()
}

/// Six decimal digits from the SAS bytes, grouped in threes for reading aloud.
fn sas_string(bytes: [u8; 8]) -> String {
    let n = u64::from_be_bytes(bytes) % 1_000_000;
    format!("{:03} {:03}", n / 1000, n % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let session = SessionId::from_bytes([5; 16]);
        let host = Keypair::generate().expect("random");
        let viewer = Keypair::generate().expect("random");
        let h = SessionKeys::derive(&host, Side::Host, &viewer.public_bytes(), &session)
            .expect("derive host");
        let v = SessionKeys::derive(&viewer, Side::Viewer, &host.public_bytes(), &session)
            .expect("derive viewer");
        (h, v)
    }

    #[test]
    fn both_sides_show_the_same_sas() {
        let (h, v) = pair();
        assert_eq!(h.sas(), v.sas());
        assert_eq!(h.sas().len(), 7);
        assert_eq!(h.sas().as_bytes()[3], b' ');
        assert!(
            h.sas()
                .chars()
                .filter(|c| *c != ' ')
                .all(|c| c.is_ascii_digit())
        );
    }

    #[test]
    fn roundtrip_both_directions() {
        let (h, v) = pair();
        let f = h.seal(Channel::Screen, 1, 1, b"pixels").expect("seal");
        assert_eq!(f.header.len as usize, 6 + TAG_LEN);
        assert!(f.header.is_key_frame());
        assert_eq!(v.open(&f).expect("open"), b"pixels");
        let f = v.seal(Channel::Input, 0, 1, b"click").expect("seal");
        assert_eq!(h.open(&f).expect("open"), b"click");
    }

    #[test]
    fn keys_differ_per_direction() {
        let (h, v) = pair();
        // The host cannot open its own frame: the reverse direction uses another key.
        let f = h.seal(Channel::Chat, 0, 1, b"hi").expect("seal");
        assert!(h.open(&f).is_err());
        let g = v.seal(Channel::Chat, 0, 1, b"hi").expect("seal");
        assert_ne!(f.payload(), g.payload());
    }

    #[test]
    fn tampering_fails_and_names_channel_and_seq() {
        let (h, v) = pair();
        let f = h.seal(Channel::Chat, 0, 7, b"secret").expect("seal");
        // Payload bit flipped.
        let mut raw = f.raw.to_vec();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let bad = Frame {
            header: f.header,
            raw: raw.into(),
        };
        let err = v.open(&bad).expect_err("tampered payload");
        assert!(matches!(
            err,
            CryptoError::Open {
                channel: "chat",
                seq: 7
            }
        ));
        assert!(err.to_string().contains("seq 7"));
        // Header re-labelled: another sequence number (so another nonce and AAD).
        let header = FrameHeader { seq: 8, ..f.header };
        let relabelled = Frame::new(header, f.payload());
        assert!(v.open(&relabelled).is_err());
        // Only the timestamp changed: still refused, the AAD covers the whole header.
        let header = FrameHeader {
            timestamp_us: f.header.timestamp_us + 1,
            ..f.header
        };
        assert!(v.open(&Frame::new(header, f.payload())).is_err());
    }

    #[test]
    fn another_session_gets_other_keys() {
        let host = Keypair::generate().expect("random");
        let viewer = Keypair::generate().expect("random");
        let a = SessionKeys::derive(
            &host,
            Side::Host,
            &viewer.public_bytes(),
            &SessionId::from_bytes([1; 16]),
        )
        .expect("derive");
        let b = SessionKeys::derive(
            &viewer,
            Side::Viewer,
            &host.public_bytes(),
            &SessionId::from_bytes([2; 16]),
        )
        .expect("derive");
        let f = a.seal(Channel::Chat, 0, 1, b"x").expect("seal");
        assert!(b.open(&f).is_err());
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let me = Keypair::generate().expect("random");
        let err = SessionKeys::derive(&me, Side::Host, &[0u8; 32], &SessionId::from_bytes([1; 16]))
            .expect_err("zero key");
        assert!(matches!(err, CryptoError::NonContributory));
    }

    #[test]
    fn oversize_plaintext_is_an_error() {
        let (h, _) = pair();
        let big = vec![0u8; Channel::Chat.max_payload() as usize];
        assert!(matches!(
            h.seal(Channel::Chat, 0, 1, &big),
            Err(CryptoError::TooLarge { .. })
        ));
    }

    #[test]
    fn group_key_opens_for_every_holder_and_not_after_rotation() {
        let host = GroupKey::generate(1).expect("random");
        let a = GroupKey::from_pb(&host.to_pb()).expect("32 bytes");
        let b = GroupKey::from_pb(&host.to_pb()).expect("32 bytes");
        let f = host
            .keys()
            .seal(Channel::Screen, 0, 7, b"pic")
            .expect("seal");
        assert_eq!(a.keys().open(&f).expect("a opens"), b"pic");
        assert_eq!(b.keys().open(&f).expect("b opens"), b"pic");
        let next = host.rotate().expect("random");
        assert_eq!(next.epoch(), 2);
        let g = next
            .keys()
            .seal(Channel::Screen, 0, 8, b"pic")
            .expect("seal");
        assert!(a.keys().open(&g).is_err(), "an old key reads nothing new");
        let short = kakehashi_proto::pb::GroupKey {
            epoch: 3,
            key: vec![1; 16],
        };
        assert!(GroupKey::from_pb(&short).is_none());
    }

    #[test]
    fn sas_formatting() {
        assert_eq!(sas_string(0u64.to_be_bytes()), "000 000");
        assert_eq!(sas_string(1_123_456u64.to_be_bytes()), "123 456");
    }
}
