//! Session codes: short numeric secrets the customer types, single use and short-lived.
//!
//! # Format
//! A code is `digits - 1` uniformly random decimal digits followed by one Damm check
//! digit. The Damm check catches every single-digit error and every adjacent
//! transposition, so the coordinator refuses a mistyped code before it reaches any store
//! and a typo never counts as a guess ([`is_well_formed`]). Leading zeros are kept.
//!
//! # Density
//! Codes lengthen with load: a store allocates the shortest length (at least the
//! configured minimum) whose space of valid codes holds at least `density` possible codes
//! per live code ([`digits_for`]), so a guess of any well-formed code hits a live one
//! with probability at most `1 / density`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kakehashi_proto::SessionId;

use super::{BackendError, BoxFuture};
use crate::random;

/// Shortest and longest codes any store hands out, check digit included.
pub const MIN_CODE_DIGITS: usize = 4;
pub const MAX_CODE_DIGITS: usize = 12;

/// How many random draws an allocation tries before giving up on a crowded code space.
pub const ALLOCATE_ATTEMPTS: u32 = 32;
/// After this many collisions in a row an allocation moves on to one digit more: the
/// density estimate was behind (a burst on several coordinators at once).
pub const COLLISIONS_PER_DIGIT: u32 = 8;

/// Possible codes per live code, by default: a guess hits a live code with probability
/// at most 1 in 10,000.
pub const DEFAULT_DENSITY: u64 = 10_000;

/// The Damm algorithm's quasigroup of order 10 (totally anti-symmetric, zero diagonal).
const DAMM: [[u8; 10]; 10] = [
    [0, 3, 1, 7, 5, 9, 8, 6, 4, 2],
    [7, 0, 9, 2, 1, 5, 4, 8, 6, 3],
    [4, 2, 0, 6, 8, 7, 1, 3, 5, 9],
    [1, 7, 5, 0, 9, 8, 3, 4, 2, 6],
    [6, 1, 2, 3, 0, 4, 5, 9, 7, 8],
    [3, 6, 7, 4, 2, 0, 9, 5, 8, 1],
    [5, 8, 6, 9, 7, 2, 0, 1, 3, 4],
    [8, 9, 4, 5, 3, 6, 2, 0, 1, 7],
    [9, 4, 3, 8, 6, 1, 7, 2, 0, 5],
    [2, 5, 8, 1, 4, 3, 6, 7, 9, 0],
];

/// The Damm interim digit of a string of ASCII digits; `None` if any byte is not a digit.
fn damm_interim(digits: &str) -> Option<u8> {
    digits.bytes().try_fold(0u8, |interim, b| {
        b.is_ascii_digit()
            .then(|| DAMM[usize::from(interim)][usize::from(b - b'0')])
    })
}

/// The check digit to append to `payload` (ASCII digits), or `None` if it is not digits.
pub fn check_digit(payload: &str) -> Option<char> {
    damm_interim(payload).map(|d| char::from(b'0' + d))
}

/// Whether `code` could have been issued: 4..=12 ASCII digits whose Damm check holds.
pub fn is_well_formed(code: &str) -> bool {
    (MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&code.len()) && damm_interim(code) == Some(0)
}

/// The shortest code length, at least `min_digits`, whose space of well-formed codes
/// (`10^(digits-1)`) holds `density` codes for each of `live + 1` live codes. Capped at
/// [`MAX_CODE_DIGITS`].
pub fn digits_for(live: u64, min_digits: usize, density: u64) -> usize {
    let needed = u128::from(live.saturating_add(1)) * u128::from(density.max(1));
    let mut digits = min_digits.max(MIN_CODE_DIGITS);
    while digits < MAX_CODE_DIGITS && 10u128.pow(digits as u32 - 1) < needed {
        digits += 1;
    }
    digits.min(MAX_CODE_DIGITS)
}

/// The length to try on allocation attempt `attempt` (0-based), starting from `digits`.
pub fn digits_for_attempt(digits: usize, attempt: u32) -> usize {
    (digits + (attempt / COLLISIONS_PER_DIGIT) as usize).min(MAX_CODE_DIGITS)
}

/// Allocates and redeems session codes.
///
/// Invariants every implementation keeps: a code is unique among live (unexpired,
/// unredeemed) codes; `redeem` hands a code's session out at most once, even under
/// concurrent callers; an expired code redeems to `None`.
pub trait CodeStore: Send + Sync + 'static {
    /// Allocates a fresh code for `session`, live for `ttl`: at least `digits` long
    /// (check digit included), longer when live codes would otherwise be too dense.
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

/// A random well-formed code of exactly `digits` decimal digits: `digits - 1` random
/// ones (leading zeros kept) and the check digit.
pub fn random_code(digits: usize) -> Result<String, BackendError> {
    if !(MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&digits) {
        return Err(BackendError::BadCodeLength(digits));
    }
    let payload_digits = digits - 1;
    let space = 10u64.pow(payload_digits as u32);
    let n = random::below(space)?;
    let mut code = format!("{n:0payload_digits$}");
    // `code` is all ASCII digits by construction, so the check digit always exists.
    code.push(check_digit(&code).unwrap_or('0'));
    Ok(code)
}

struct Entry {
    session: SessionId,
    expires_at: Instant,
}

/// In-process code store (the embedded default).
pub struct InMemoryCodeStore {
    codes: Mutex<HashMap<String, Entry>>,
    density: u64,
}

impl Default for InMemoryCodeStore {
    fn default() -> Self {
        Self::with_density(DEFAULT_DENSITY)
    }
}

impl InMemoryCodeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store keeping `density` possible codes per live code.
    pub fn with_density(density: u64) -> Self {
        Self {
            codes: Mutex::new(HashMap::new()),
            density: density.max(1),
        }
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
            if !(MIN_CODE_DIGITS..=MAX_CODE_DIGITS).contains(&digits) {
                return Err(BackendError::BadCodeLength(digits));
            }
            // The map may still hold expired codes until the next purge, so its size is an
            // upper bound on live codes: the density it gives errs on the safe side.
            let live = self.lock().len() as u64;
            let base = digits_for(live, digits, self.density);
            for attempt in 0..ALLOCATE_ATTEMPTS {
                let code = random_code(digits_for_attempt(base, attempt))?;
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
                digits: digits_for_attempt(base, ALLOCATE_ATTEMPTS),
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
            assert!(is_well_formed(&c), "{c} carries a valid check digit");
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

    /// Every way to change one digit of `code` into another digit.
    fn single_digit_errors(code: &str) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..code.len() {
            for d in b'0'..=b'9' {
                if code.as_bytes()[i] != d {
                    let mut b = code.as_bytes().to_vec();
                    b[i] = d;
                    out.push(String::from_utf8(b).expect("ascii"));
                }
            }
        }
        out
    }

    /// Every swap of two adjacent, different digits.
    fn adjacent_transpositions(code: &str) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..code.len() - 1 {
            let mut b = code.as_bytes().to_vec();
            if b[i] != b[i + 1] {
                b.swap(i, i + 1);
                out.push(String::from_utf8(b).expect("ascii"));
            }
        }
        out
    }

    #[test]
    fn damm_catches_every_single_digit_error_and_adjacent_transposition() {
        // Exhaustive over every 4-digit code (all 1,000 payloads) ...
        for n in 0..1000u32 {
            let payload = format!("{n:03}");
            let code = format!("{payload}{}", check_digit(&payload).expect("digits"));
            assert!(is_well_formed(&code));
            for typo in single_digit_errors(&code)
                .into_iter()
                .chain(adjacent_transpositions(&code))
            {
                assert!(!is_well_formed(&typo), "{code} -> {typo} slipped through");
            }
        }
        // ... and over random codes of every length.
        for digits in MIN_CODE_DIGITS..=MAX_CODE_DIGITS {
            for _ in 0..300 {
                let code = random_code(digits).expect("valid length");
                for typo in single_digit_errors(&code)
                    .into_iter()
                    .chain(adjacent_transpositions(&code))
                {
                    assert!(!is_well_formed(&typo), "{code} -> {typo} slipped through");
                }
            }
        }
        assert!(!is_well_formed("12a4"));
        assert!(!is_well_formed("000"), "too short");
        assert!(is_well_formed("0000"), "0 is its own check digit");
    }

    #[test]
    fn known_damm_vector() {
        // The algorithm's published example: 572 has check digit 4.
        assert_eq!(check_digit("572"), Some('4'));
        assert!(is_well_formed("5724"));
    }

    #[test]
    fn length_grows_with_density() {
        // 6 digits = 10^5 well-formed codes: room for 10 live codes at 1 per 10^4.
        assert_eq!(digits_for(0, 6, DEFAULT_DENSITY), 6);
        assert_eq!(digits_for(9, 6, DEFAULT_DENSITY), 6);
        assert_eq!(digits_for(10, 6, DEFAULT_DENSITY), 7);
        assert_eq!(digits_for(99_999, 6, DEFAULT_DENSITY), 10);
        assert_eq!(digits_for(100_000, 6, DEFAULT_DENSITY), 11);
        assert_eq!(digits_for(u64::MAX, 6, DEFAULT_DENSITY), MAX_CODE_DIGITS);
        assert_eq!(digits_for(5, 8, 1), 8, "never shorter than asked");
        assert_eq!(digits_for_attempt(6, 0), 6);
        assert_eq!(digits_for_attempt(6, COLLISIONS_PER_DIGIT), 7);
        assert_eq!(digits_for_attempt(12, 100), 12);
    }

    #[tokio::test]
    async fn in_memory_store_lengthens_codes_as_they_crowd() {
        let store = InMemoryCodeStore::with_density(100);
        let ttl = Duration::from_secs(60);
        let mut lengths = Vec::new();
        for _ in 0..50 {
            let id = SessionId::from_bytes(random::bytes::<16>().expect("randomness"));
            lengths.push(store.allocate(id, 4, ttl).await.expect("allocate").len());
        }
        // 10^3 codes hold 10 live ones at density 100; the 11th needs 5 digits.
        assert_eq!(lengths[0], 4);
        assert_eq!(lengths[10], 5);
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]));
    }
}
