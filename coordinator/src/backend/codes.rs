//! Session codes: short numeric secrets the customer types, single use and short-lived.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kakehashi_proto::SessionId;

use super::{BackendError, BoxFuture};
use crate::random;

/// Shortest and longest codes any store hands out.
pub const MIN_CODE_DIGITS: usize = 4;
pub const MAX_CODE_DIGITS: usize = 12;

/// How many random draws an allocation tries before giving up on a crowded code space.
pub const ALLOCATE_ATTEMPTS: u32 = 32;

/// Allocates and redeems session codes.
///
/// Invariants every implementation keeps: a code is unique among live (unexpired,
/// unredeemed) codes; `redeem` hands a code's session out at most once, even under
/// concurrent callers; an expired code redeems to `None`.
pub trait CodeStore: Send + Sync + 'static {
    /// Allocates a fresh `digits`-digit code for `session`, live for `ttl`.
    fn allocate(
        &self,
        session: SessionId,
        digits: usize,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<String, BackendError>>;

    /// Takes the code out of the store: `Some` exactly once for a live code.
    fn redeem<'a>(
        &'a self,
        code: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionId>, BackendError>>;

    /// Withdraws a code without redeeming it (the session ended first). Unknown codes are
    /// ignored.
    fn revoke<'a>(&'a self, code: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Drops expired codes. Stores with native expiry make this a no-op.
    fn purge_expired(&self) -> BoxFuture<'_, Result<usize, BackendError>>;
}

/// A random code of exactly `digits` decimal digits (leading zeros kept).
pub fn random_code(digits: usize) -> Result<String, BackendError> {
    if !(MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&digits) {
        return Err(BackendError::BadCodeLength(digits));
    }
    let space = 10u64.pow(digits as u32);
    let n = random::below(space)?;
    Ok(format!("{n:0digits$}"))
}

struct Entry {
    session: SessionId,
    expires_at: Instant,
}

/// In-process code store (the embedded default).
#[derive(Default)]
pub struct InMemoryCodeStore {
    codes: Mutex<HashMap<String, Entry>>,
}

impl InMemoryCodeStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // critical section is a single insert/remove), so a poisoned lock is still usable.
        self.codes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CodeStore for InMemoryCodeStore {
    fn allocate(
        &self,
        session: SessionId,
        digits: usize,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<String, BackendError>> {
        Box::pin(async move {
            let now = Instant::now();
            let expires_at = now.checked_add(ttl).unwrap_or(now);
            for _ in 0..ALLOCATE_ATTEMPTS {
                let code = random_code(digits)?;
                let mut codes = self.lock();
                let taken = codes.get(&code).is_some_and(|e| e.expires_at > now);
                if !taken {
                    codes.insert(
                        code.clone(),
                        Entry {
                            session,
                            expires_at,
                        },
                    );
                    return Ok(code);
                }
            }
            Err(BackendError::CodeSpaceExhausted {
                digits,
                attempts: ALLOCATE_ATTEMPTS,
            })
        })
    }

    fn redeem<'a>(
        &'a self,
        code: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionId>, BackendError>> {
        Box::pin(async move {
            let entry = self.lock().remove(code);
            Ok(entry
                .filter(|e| e.expires_at > Instant::now())
                .map(|e| e.session))
        })
    }

    fn revoke<'a>(&'a self, code: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.lock().remove(code);
            Ok(())
        })
    }

    fn purge_expired(&self) -> BoxFuture<'_, Result<usize, BackendError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut codes = self.lock();
            let before = codes.len();
            codes.retain(|_, e| e.expires_at > now);
            Ok(before - codes.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_asked_length() {
        for digits in MIN_CODE_DIGITS..=MAX_CODE_DIGITS {
            let c = random_code(digits).expect("valid length");
            assert_eq!(c.len(), digits);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
        assert!(matches!(
            random_code(3),
            Err(BackendError::BadCodeLength(3))
        ));
        assert!(matches!(
            random_code(13),
            Err(BackendError::BadCodeLength(13))
        ));
    }
}
