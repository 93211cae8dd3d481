//! Identifiers that cross the wire.

use std::fmt;
use std::str::FromStr;

/// 128 random bits, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId([u8; 16]);

impl SessionId {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The W3C trace context of everything that happens to this session: the trace id
    /// is the session id and the parent span id is derived from it (never zero). Every
    /// coordinator replica and relay derives it on its own, so one session is one trace
    /// without a `traceparent` travelling through agents, tokens or the session store.
    pub fn trace_context(&self) -> ([u8; 16], [u8; 8]) {
        let mut span = [0u8; 8];
        for (i, b) in span.iter_mut().enumerate() {
            *b = self.0[i] ^ self.0[i + 8];
        }
        if span == [0; 8] {
            span[7] = 1;
        }
        (self.0, span)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session id must be 32 hex digits, got {0:?}")]
pub struct BadSessionId(String);

impl FromStr for SessionId {
    type Err = BadSessionId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSessionId(s.chars().take(40).collect());
        if s.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}
