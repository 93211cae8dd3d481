//! Views of sessions and session events for people and scripts: the `ctl` command prints
//! them as text, or as one JSON object per line. The generated `pb` types are not serde
//! types on purpose (the wire lives in `proto/`), so these mirror their fields.

use std::fmt;

use kakehashi_proto::{Mode, Permissions, pb};
use serde::Serialize;

/// `PERMISSION`-style names to a set: "view,control", "all", "none".
pub fn parse_permissions(s: &str) -> Result<Permissions, String> {
    let mut out = Permissions::NONE;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        out = out
            | match part.to_ascii_lowercase().replace('-', "_").as_str() {
                "view" => Permissions::VIEW,
                "control" => Permissions::CONTROL,
                "file_transfer" | "file" => Permissions::FILE_TRANSFER,
                "system_info" => Permissions::SYSTEM_INFO,
                "recording" => Permissions::RECORDING,
                "all" => Permissions::ALL,
                "none" => Permissions::NONE,
                other => {
                    return Err(format!(
                        "unknown permission {other:?} (expected view, control, file_transfer, \
                         system_info, recording, all or none)"
                    ));
                }
            };
    }
    Ok(out)
}

pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s.to_ascii_lowercase().as_str() {
        "view" => Ok(Mode::View),
        "control" => Ok(Mode::Control),
        other => Err(format!("unknown mode {other:?} (expected view or control)")),
    }
}

/// "END_REASON_TIME_LIMIT" -> "time_limit".
fn short(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

pub fn end_reason_name(r: pb::EndReason) -> String {
    short(r.as_str_name(), "END_REASON_")
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(E) -> String) -> String {
    E::try_from(v).map_or_else(|_| format!("unknown({v})"), name)
}

fn perm_names(bits: u32) -> Vec<&'static str> {
    Permissions::from_bits(bits & Permissions::ALL.bits())
        .unwrap_or_default()
        .names()
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RelayView {
    pub relay_id: String,
    pub address: String,
    pub server_name: String,
    pub cert_sha256: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionView {
    pub session_id: String,
    pub tenant: String,
    pub operator: String,
    pub mode: String,
    pub permissions: Vec<&'static str>,
    pub state: String,
    pub relay: Option<RelayView>,
    pub created_at_unix_ms: i64,
    pub deadline_unix_ms: i64,
    pub code_expires_at_unix_ms: i64,
    pub granted: Vec<&'static str>,
    pub end_reason: String,
    pub end_detail: String,
}

impl From<&pb::Session> for SessionView {
    fn from(s: &pb::Session) -> Self {
        Self {
            session_id: s.session_id.clone(),
            tenant: s.tenant.clone(),
            operator: s.operator.clone(),
            mode: enum_name(s.mode, |m: pb::SessionMode| {
                short(m.as_str_name(), "SESSION_MODE_")
            }),
            permissions: perm_names(s.permissions),
            state: enum_name(s.state, |m: pb::SessionState| {
                short(m.as_str_name(), "SESSION_STATE_")
            }),
            relay: s.relay.as_ref().map(|r| RelayView {
                relay_id: r.relay_id.clone(),
                address: r.address.clone(),
                server_name: r.server_name.clone(),
                cert_sha256: hex::encode(&r.cert_sha256),
            }),
            created_at_unix_ms: s.created_at_unix_ms,
            deadline_unix_ms: s.deadline_unix_ms,
            code_expires_at_unix_ms: s.code_expires_at_unix_ms,
            granted: perm_names(s.granted),
            end_reason: enum_name(s.end_reason, end_reason_name),
            end_detail: s.end_detail.clone(),
        }
    }
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

impl fmt::Display for SessionView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {}  tenant={} operator={} mode={} permissions={} granted={}",
            self.session_id,
            self.state,
            self.tenant,
            self.operator,
            self.mode,
            list(&self.permissions),
            list(&self.granted),
        )?;
        if let Some(r) = &self.relay {
            write!(f, " relay={}@{}", r.relay_id, r.address)?;
        }
        if self.state == "ended" {
            write!(f, " ended={}", self.end_reason)?;
            if !self.end_detail.is_empty() {
                write!(f, " ({})", self.end_detail)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CreatedView {
    pub session: Option<SessionView>,
    pub code: String,
    pub operator_ticket: String,
}

impl From<&pb::CreateSessionResponse> for CreatedView {
    fn from(r: &pb::CreateSessionResponse) -> Self {
        Self {
            session: r.session.as_ref().map(SessionView::from),
            code: r.code.clone(),
            operator_ticket: r.operator_ticket.clone(),
        }
    }
}

impl fmt::Display for CreatedView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "code: {}", self.code)?;
        writeln!(f, "operator ticket: {}", self.operator_ticket)?;
        match &self.session {
            Some(s) => write!(f, "session: {s}"),
            None => write!(f, "session: (not returned)"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventView {
    pub session_id: String,
    pub seq: u64,
    pub at_unix_ms: i64,
    pub kind: String,
    pub granted: Vec<&'static str>,
    pub end_reason: String,
    pub detail: String,
    pub actor: String,
    /// What the event is about: requested, newly granted, denied or revoked.
    pub permissions: Vec<&'static str>,
    pub remaining_secs: u32,
}

impl From<&pb::SessionEvent> for EventView {
    fn from(e: &pb::SessionEvent) -> Self {
        Self {
            session_id: e.session_id.clone(),
            seq: e.seq,
            at_unix_ms: e.at_unix_ms,
            kind: enum_name(e.kind, |k: pb::EventKind| {
                short(k.as_str_name(), "EVENT_KIND_")
            }),
            granted: perm_names(e.granted),
            end_reason: enum_name(e.end_reason, end_reason_name),
            detail: e.detail.clone(),
            actor: enum_name(e.actor, |a: pb::EventActor| {
                short(a.as_str_name(), "EVENT_ACTOR_")
            }),
            permissions: perm_names(e.permissions),
            remaining_secs: e.remaining_secs,
        }
    }
}

impl fmt::Display for EventView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} {} by {}",
            self.seq, self.at_unix_ms, self.kind, self.actor
        )?;
        match self.kind.as_str() {
            "consent_given" | "consent_denied" | "consent_revoked" => write!(
                f,
                " permissions={} granted={}",
                list(&self.permissions),
                list(&self.granted)
            )?,
            "permission_requested" => write!(f, " permissions={}", list(&self.permissions))?,
            "time_warning" => write!(f, " remaining={}s", self.remaining_secs)?,
            "ended" => write!(f, " reason={}", self.end_reason)?,
            _ => {}
        }
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// System information as lines of `field: value`, "unknown" where the platform could
/// not tell.
pub fn system_info_text(i: &pb::SystemInfo) -> String {
    fn opt<T: fmt::Display>(v: Option<T>) -> String {
        v.map_or_else(|| "unknown".to_owned(), |v| v.to_string())
    }
    let mib = |b: Option<u64>| b.map(|b| format!("{} MiB", b / (1024 * 1024)));
    let mut lines = vec![
        format!(
            "  OS: {} {}",
            opt(i.os_name.as_deref()),
            i.os_version.as_deref().unwrap_or("")
        ),
        format!(
            "  browser: {} {}",
            opt(i.default_browser.as_deref()),
            i.browser_version.as_deref().unwrap_or("")
        )
        .trim_end()
        .to_owned(),
    ];
    let full = i.hostname.is_some() || i.cpu_model.is_some() || i.memory_total_bytes.is_some();
    if full {
        lines.extend([
            format!("  kernel: {}", opt(i.kernel.as_deref())),
            format!("  host name: {}", opt(i.hostname.as_deref())),
            format!(
                "  machine: {} {} ({})",
                opt(i.manufacturer.as_deref()),
                i.model.as_deref().unwrap_or(""),
                opt(i.machine_type.as_deref())
            ),
            format!(
                "  CPU: {} x{} @ {} MHz",
                opt(i.cpu_model.as_deref()),
                opt(i.cpu_cores),
                opt(i.cpu_mhz)
            ),
            format!(
                "  memory: {} total, {} available",
                opt(mib(i.memory_total_bytes)),
                opt(mib(i.memory_available_bytes))
            ),
            format!(
                "  disk: {} free of {}",
                opt(mib(i.disk_free_bytes)),
                opt(mib(i.disk_total_bytes))
            ),
            format!(
                "  mailer: {} {}",
                opt(i.default_mailer.as_deref()),
                i.mailer_version.as_deref().unwrap_or("")
            ),
            format!("  firewall: {}", opt(i.firewall.as_deref())),
            format!("  antivirus: {}", opt(i.antivirus.as_deref())),
            format!(
                "  installed apps: {}",
                if i.apps_listed {
                    i.installed_apps.len().to_string()
                } else {
                    "unknown".to_owned()
                }
            ),
        ]);
        for n in &i.interfaces {
            lines.push(format!(
                "  interface {}: mac {} addresses {}",
                n.name,
                opt(n.mac.as_deref()),
                n.addresses.join(", ")
            ));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_lists_parse() {
        assert_eq!(
            parse_permissions("view, control"),
            Ok(Permissions::VIEW | Permissions::CONTROL)
        );
        assert_eq!(parse_permissions("all"), Ok(Permissions::ALL));
        assert_eq!(parse_permissions(""), Ok(Permissions::NONE));
        assert_eq!(
            parse_permissions("file-transfer"),
            Ok(Permissions::FILE_TRANSFER)
        );
        assert!(parse_permissions("root").is_err());
        assert_eq!(parse_mode("Control"), Ok(Mode::Control));
        assert!(parse_mode("admin").is_err());
    }

    #[test]
    fn session_view_names_enums_and_bits() {
        let s = pb::Session {
            session_id: "ab".into(),
            mode: pb::SessionMode::Control as i32,
            permissions: 3,
            state: pb::SessionState::Ended as i32,
            granted: 1,
            end_reason: pb::EndReason::TimeLimit as i32,
            relay: Some(pb::RelayEndpoint {
                cert_sha256: vec![0xab, 0xcd],
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = SessionView::from(&s);
        assert_eq!(v.mode, "control");
        assert_eq!(v.state, "ended");
        assert_eq!(v.permissions, ["view", "control"]);
        assert_eq!(v.granted, ["view"]);
        assert_eq!(v.end_reason, "time_limit");
        assert_eq!(
            v.relay.as_ref().map(|r| r.cert_sha256.as_str()),
            Some("abcd")
        );
        let json = serde_json::to_value(&v).expect("serialises");
        assert_eq!(json["mode"], "control");
        assert!(v.to_string().contains("ended=time_limit"));
        let unknown = SessionView::from(&pb::Session {
            mode: 42,
            ..Default::default()
        });
        assert_eq!(unknown.mode, "unknown(42)");
    }

    #[test]
    fn event_view_text() {
        let e = pb::SessionEvent {
            seq: 4,
            kind: pb::EventKind::ConsentGiven as i32,
            granted: 1,
            actor: pb::EventActor::Customer as i32,
            permissions: 1,
            ..Default::default()
        };
        let v = EventView::from(&e);
        assert_eq!(v.kind, "consent_given");
        assert_eq!(v.actor, "customer");
        assert!(v.to_string().contains("granted=view"));
        assert!(v.to_string().contains("by customer"));
    }
}
