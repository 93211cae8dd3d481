//! Input checks for every request field: pure functions, no I/O.

use std::time::Duration;

use kakehashi_proto::{Mode, Permissions, SessionId, pb};

use crate::error::ApiError;

pub const MAX_NAME_CHARS: usize = 128;
pub const MAX_DETAIL_CHARS: usize = 512;
pub const MAX_CODE_CHARS: usize = 32;
pub const MAX_TICKET_CHARS: usize = 128;
pub const DEFAULT_LIST_LIMIT: usize = 100;
pub const MAX_LIST_LIMIT: usize = 1000;

/// A tenant or operator name: non-empty, at most 128 characters, no control characters.
pub fn name(field: &'static str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    bounded_text(field, value, MAX_NAME_CHARS)
}

/// Free text (end detail): bounded, no control characters.
pub fn bounded_text(field: &'static str, value: &str, max_chars: usize) -> Result<(), ApiError> {
    if value.len() > max_chars * 4 || value.chars().count() > max_chars {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub fn session_id(value: &str) -> Result<SessionId, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid("session_id", "must not be empty"));
    }
    value
        .parse()
        .map_err(|_| ApiError::invalid("session_id", "must be 32 hex digits"))
}

pub fn mode(value: i32) -> Result<Mode, ApiError> {
    pb::SessionMode::try_from(value)
        .ok()
        .and_then(Mode::from_pb)
        .ok_or_else(|| {
            ApiError::invalid("mode", "must be SESSION_MODE_VIEW or SESSION_MODE_CONTROL")
        })
}

/// Permission bits from a request: only `pb::Permission` values, never the pause flag
/// (a relay-side state, not something a session or a report carries).
pub fn permission_bits(field: &'static str, bits: u32) -> Result<Permissions, ApiError> {
    Permissions::from_bits(bits)
        .filter(|p| !p.is_paused())
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!(
                    "has unknown bits {:#x}; use pb::Permission values",
                    bits & !Permissions::ALL.bits()
                ),
            )
        })
}

/// The session's permissions: what was asked for, cut to the mode's ceiling; the mode's
/// default when that leaves nothing.
pub fn session_permissions(requested: Permissions, mode: Mode) -> Permissions {
    let capped = requested & mode.ceiling();
    if capped.is_empty() {
        mode.default_permissions()
    } else {
        capped
    }
}

/// The session's maximum duration: 0 means the default, anything above the maximum is
/// cut to it.
pub fn max_duration(requested_secs: u32, default: Duration, max: Duration) -> Duration {
    let asked = if requested_secs == 0 {
        default
    } else {
        Duration::from_secs(u64::from(requested_secs))
    };
    asked.min(max)
}

pub fn list_limit(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_LIST_LIMIT,
        n => (n as usize).min(MAX_LIST_LIMIT),
    }
}

/// A code as typed: digits only, bounded. Spaces and dashes people type are removed.
pub fn code(value: &str) -> Result<String, ApiError> {
    if value.len() > MAX_CODE_CHARS * 2 {
        return Err(ApiError::invalid("code", "is too long"));
    }
    let digits: String = value.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    if digits.is_empty() {
        return Err(ApiError::invalid("code", "must not be empty"));
    }
    if digits.len() > MAX_CODE_CHARS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid(
            "code",
            "must be the digits the operator read out",
        ));
    }
    Ok(digits)
}

pub fn public_key(value: &[u8]) -> Result<[u8; 32], ApiError> {
    value.try_into().map_err(|_| {
        ApiError::invalid(
            "public_key",
            format!("must be 32 bytes (X25519), got {}", value.len()),
        )
    })
}

pub fn ticket(value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid("operator_ticket", "must not be empty"));
    }
    if value.len() > MAX_TICKET_CHARS {
        return Err(ApiError::invalid("operator_ticket", "is too long"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_mode_never_gets_control() {
        for bits in 0..=Permissions::ALL.bits() {
            let p = Permissions::from_bits(bits).expect("in range");
            let got = session_permissions(p, Mode::View);
            assert!(!got.contains(Permissions::CONTROL), "{p:?}");
            assert!(!got.is_empty());
        }
        assert_eq!(
            session_permissions(Permissions::NONE, Mode::Control),
            Permissions::VIEW | Permissions::CONTROL
        );
    }

    #[test]
    fn durations_and_limits() {
        let d = Duration::from_secs(40 * 60);
        let m = Duration::from_secs(4 * 3600);
        assert_eq!(max_duration(0, d, m), d);
        assert_eq!(max_duration(5, d, m), Duration::from_secs(5));
        assert_eq!(max_duration(u32::MAX, d, m), m);
        assert_eq!(list_limit(0), 100);
        assert_eq!(list_limit(5000), 1000);
    }

    #[test]
    fn names_and_codes() {
        assert!(name("tenant", "").is_err());
        assert!(name("tenant", "  ").is_err());
        assert!(name("tenant", &"x".repeat(129)).is_err());
        assert!(name("tenant", "a\nb").is_err());
        assert!(name("tenant", "acme").is_ok());
        assert_eq!(code("123-456").expect("valid"), "123456");
        assert!(code("12a").is_err());
        assert!(code("").is_err());
        assert!(public_key(&[0; 31]).is_err());
    }
}
