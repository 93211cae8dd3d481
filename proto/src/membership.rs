//! Where cluster membership lives in etcd: the key layout shared by relays (which
//! write their [`pb::RelayRegistration`] under a lease) and coordinators (which watch
//! the prefix and hold the leader election).

use prost::Message;

use crate::pb;

/// Where a cluster's keys live unless told otherwise (`--etcd-namespace`). Several
/// clusters (or test runs) can share one etcd under different namespaces.
pub const DEFAULT_NAMESPACE: &str = "/kakehashi/v1/";
/// Largest registration value a coordinator decodes; a real one is a few hundred bytes.
pub const MAX_REGISTRATION_LEN: usize = 4096;

/// Prefix of every relay's registration key: `<namespace>relays/`.
pub fn relays_prefix(namespace: &str) -> String {
    format!("{namespace}relays/")
}

/// The etcd key of a relay's registration.
pub fn relay_key(namespace: &str, relay_id: &str) -> String {
    format!("{namespace}relays/{relay_id}")
}

/// The relay id inside a registration key, if the key is one.
pub fn relay_id_of<'k>(namespace: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(namespace)?
        .strip_prefix("relays/")
}

/// Election name of the coordinators' leader: `<namespace>leader`.
pub fn leader_election(namespace: &str) -> String {
    format!("{namespace}leader")
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("registration of {len} bytes exceeds {MAX_REGISTRATION_LEN}")]
    TooLong { len: usize },
    #[error("registration is not a valid RelayRegistration: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Decodes a registration value, refusing oversize ones before parsing.
pub fn decode_registration(value: &[u8]) -> Result<pb::RelayRegistration, RegistrationError> {
    if value.len() > MAX_REGISTRATION_LEN {
        return Err(RegistrationError::TooLong { len: value.len() });
    }
    Ok(pb::RelayRegistration::decode(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_values_are_bounded() {
        let key = relay_key(DEFAULT_NAMESPACE, "r-7");
        assert_eq!(key, "/kakehashi/v1/relays/r-7");
        assert!(key.starts_with(&relays_prefix(DEFAULT_NAMESPACE)));
        assert_eq!(relay_id_of(DEFAULT_NAMESPACE, key.as_bytes()), Some("r-7"));
        assert_eq!(relay_id_of(DEFAULT_NAMESPACE, b"/other/relays/r-7"), None);
        assert_eq!(relay_id_of("/other/", key.as_bytes()), None);
        let reg = pb::RelayRegistration {
            relay_id: "r-7".into(),
            capacity: 10,
            ..Default::default()
        };
        let back = decode_registration(&reg.encode_to_vec()).expect("decodes");
        assert_eq!(back, reg);
        assert!(decode_registration(&[0u8; MAX_REGISTRATION_LEN + 1]).is_err());
        assert!(decode_registration(&[0xff, 0xff, 0xff]).is_err());
    }
}
