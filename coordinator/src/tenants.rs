//! Per-tenant session limits set by the cluster's operator: a call center's sessions end
//! at its own maximum (say 40 minutes) whatever a client asks for.
//!
//! A [`TenantPolicy`] holds what one tenant overrides; anything it leaves unset falls back
//! to the cluster's [`CoordinatorConfig`](crate::CoordinatorConfig) values.
//! [`TenantPolicies`] is the whole table, read at start from repeated `--tenant-policy`
//! flags and/or a JSON file (`--tenant-policy-file`), checked once against the cluster
//! limits, and then only read. Tenants are matched by exact name, as the `tenant` field of
//! `CreateSession` spells it.
//!
//! The table is a plain value so that a later tenant store (an admin API, issue 7) can
//! fill the same [`TenantPolicy`] type, and further per-tenant rules (allowed modes,
//! recording) become fields next to the durations.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The largest policy file read; a table of thousands of tenants fits well within it.
pub const MAX_POLICY_FILE_BYTES: u64 = 1024 * 1024;

/// What went wrong with a tenant policy; the message names the tenant and the field.
#[derive(Debug, thiserror::Error)]
pub enum TenantPolicyError {
    #[error("tenant policy {spec:?}: {reason}")]
    Syntax { spec: String, reason: String },
    #[error("tenant policy: tenant name {tenant:?} {reason}")]
    Name { tenant: String, reason: String },
    #[error("tenant {tenant:?}: {field} {value:?} {reason}")]
    Value {
        tenant: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("tenant {tenant:?}: sets neither max nor default")]
    Empty { tenant: String },
    #[error("tenant {tenant:?} has more than one policy")]
    Duplicate { tenant: String },
    #[error("tenant {tenant:?}: {field} {value:?} exceeds {limit_name} {limit:?}")]
    Exceeds {
        tenant: String,
        field: &'static str,
        value: Duration,
        limit_name: &'static str,
        limit: Duration,
    },
    #[error("tenant policy file {path}: {reason}")]
    File { path: String, reason: String },
}

/// One tenant's overrides of the cluster's session limits. `None` keeps the cluster's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantPolicy {
    /// A session's duration when its request asks for none (`max_duration_secs = 0`).
    pub default_max_duration: Option<Duration>,
    /// The longest session this tenant may have; longer requests are cut to it.
    pub max_duration: Option<Duration>,
}

/// The durations one `CreateSession` works with, after the tenant's policy and the
/// cluster's fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationLimits {
    pub default: Duration,
    pub max: Duration,
}

impl DurationLimits {
    /// The session's duration: the request's (0 means the default), capped at the
    /// maximum. An over-long request is cut, not refused, so call-center software that
    /// asks for "as long as possible" still gets a session; the capped value is the
    /// deadline `CreateSession` answers with.
    pub fn session_duration(&self, requested_secs: u32) -> Duration {
        crate::validate::max_duration(requested_secs, self.default, self.max)
    }
}

/// Every tenant's policy, by exact tenant name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantPolicies {
    by_tenant: BTreeMap<String, TenantPolicy>,
}

impl TenantPolicies {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_tenant.len()
    }

    pub fn get(&self, tenant: &str) -> Option<&TenantPolicy> {
        self.by_tenant.get(tenant)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &TenantPolicy)> {
        self.by_tenant.iter().map(|(t, p)| (t.as_str(), p))
    }

    /// Adds one tenant's policy, checking the name and that the policy says something.
    /// A tenant given twice is an error rather than a silent override, so a flag and
    /// the file cannot disagree unnoticed.
    pub fn insert(
        &mut self,
        tenant: impl Into<String>,
        policy: TenantPolicy,
    ) -> Result<(), TenantPolicyError> {
        let tenant = tenant.into();
        check_name(&tenant)?;
        if policy.default_max_duration.is_none() && policy.max_duration.is_none() {
            return Err(TenantPolicyError::Empty { tenant });
        }
        for (field, value) in [
            ("default", policy.default_max_duration),
            ("max", policy.max_duration),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(TenantPolicyError::Value {
                    tenant,
                    field,
                    value: "0".into(),
                    reason: "must be positive".into(),
                });
            }
        }
        if self.by_tenant.contains_key(&tenant) {
            return Err(TenantPolicyError::Duplicate { tenant });
        }
        self.by_tenant.insert(tenant, policy);
        Ok(())
    }

    /// Adds every policy of `other`; a tenant in both is an error.
    pub fn merge(&mut self, other: TenantPolicies) -> Result<(), TenantPolicyError> {
        for (tenant, policy) in other.by_tenant {
            self.insert(tenant, policy)?;
        }
        Ok(())
    }

    /// Checks every policy against the cluster's limits: a tenant's maximum at most the
    /// cluster's, its default at most its own maximum (or the cluster's when it sets
    /// none).
    /// A tenant that sets only a maximum below the cluster default needs no default of
    /// its own: [`TenantPolicies::limits`] cuts the cluster default to its maximum.
    pub fn validate(&self, cluster_max: Duration) -> Result<(), TenantPolicyError> {
        for (tenant, policy) in &self.by_tenant {
            if let Some(max) = policy.max_duration
                && max > cluster_max
            {
                return Err(TenantPolicyError::Exceeds {
                    tenant: tenant.clone(),
                    field: "max",
                    value: max,
                    limit_name: "the cluster maximum",
                    limit: cluster_max,
                });
            }
            if let Some(default) = policy.default_max_duration {
                let (limit_name, limit) = match policy.max_duration {
                    Some(max) => ("the tenant's max", max),
                    None => ("the cluster maximum", cluster_max),
                };
                if default > limit {
                    return Err(TenantPolicyError::Exceeds {
                        tenant: tenant.clone(),
                        field: "default",
                        value: default,
                        limit_name,
                        limit,
                    });
                }
            }
        }
        Ok(())
    }

    /// The limits for a session of `tenant`. A tenant without a policy gets the
    /// cluster's. A tenant that sets only a maximum gets the cluster default cut to that
    /// maximum, so its sessions never outlive its policy.
    pub fn limits(
        &self,
        tenant: &str,
        cluster_default: Duration,
        cluster_max: Duration,
    ) -> DurationLimits {
        let policy = self.get(tenant).copied().unwrap_or_default();
        // `min` with the cluster maximum keeps this safe even for a table that skipped
        // `validate`.
        let max = policy.max_duration.unwrap_or(cluster_max).min(cluster_max);
        let default = policy
            .default_max_duration
            .unwrap_or(cluster_default)
            .min(max);
        DurationLimits { default, max }
    }

    /// Reads a JSON policy file: an array of
    /// `{"tenant": "acme", "maxSeconds": 2400, "defaultSeconds": 1800}`, where each
    /// duration is a number of seconds or a string such as `"40m"`; either may be left
    /// out. This is the shape of the Helm chart's `coordinator.tenantPolicies`.
    pub fn load_file(path: &Path) -> Result<Self, TenantPolicyError> {
        use std::io::Read;
        let file_err = |reason: String| TenantPolicyError::File {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
        let mut text = String::new();
        file.take(MAX_POLICY_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| file_err(e.to_string()))?;
        if text.len() as u64 > MAX_POLICY_FILE_BYTES {
            return Err(file_err(format!(
                "larger than {MAX_POLICY_FILE_BYTES} bytes"
            )));
        }
        Self::from_json(&text).map_err(|e| match e {
            TenantPolicyError::File { reason, .. } => file_err(reason),
            other => other,
        })
    }

    /// Parses the policy file's JSON text; see [`TenantPolicies::load_file`].
    pub fn from_json(text: &str) -> Result<Self, TenantPolicyError> {
        let entries: Vec<FileEntry> =
            serde_json::from_str(text).map_err(|e| TenantPolicyError::File {
                path: "(json)".into(),
                reason: e.to_string(),
            })?;
        let mut table = Self::new();
        for entry in entries {
            let policy = TenantPolicy {
                max_duration: entry
                    .max_seconds
                    .map(|v| v.duration(&entry.tenant, "maxSeconds"))
                    .transpose()?,
                default_max_duration: entry
                    .default_seconds
                    .map(|v| v.duration(&entry.tenant, "defaultSeconds"))
                    .transpose()?,
            };
            table.insert(entry.tenant, policy)?;
        }
        Ok(table)
    }
}

/// A tenant's policy as its administrators set it through `AdminService`
/// (`SetTenantPolicy`), kept in the auth store. Where it sets a duration it replaces the
/// static [`TenantPolicy`] of `--tenant-policy` for that tenant; `allowed_modes` is
/// enforced by `CreateSession`. The three feature flags are stored and returned only:
/// recording, unattended access and monitoring are not built yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantSettings {
    pub max_duration_secs: Option<u32>,
    pub default_duration_secs: Option<u32>,
    /// Modes `CreateSession` accepts (`Mode as u8`); empty accepts every mode.
    pub allowed_modes: Vec<u8>,
    pub recording_enabled: bool,
    pub unattended_enabled: bool,
    pub monitoring_enabled: bool,
}

impl TenantSettings {
    /// Whether a session in `mode` may be created.
    pub fn allows(&self, mode: kakehashi_proto::Mode) -> bool {
        self.allowed_modes.is_empty() || self.allowed_modes.contains(&(mode as u8))
    }

    /// The same checks as [`TenantPolicies::validate`]: the maximum at most the cluster's,
    /// the default at most the maximum. The message names the field.
    pub fn validate(&self, tenant: &str, cluster_max: Duration) -> Result<(), TenantPolicyError> {
        check_name(tenant)?;
        let secs = |v: Option<u32>| v.map(|s| Duration::from_secs(u64::from(s)));
        let mut policy = TenantPolicies::new();
        // Only the durations go through the static table's checks; an all-empty policy
        // is fine here (it clears the tenant's durations).
        let durations = TenantPolicy {
            max_duration: secs(self.max_duration_secs),
            default_max_duration: secs(self.default_duration_secs),
        };
        if durations.max_duration.is_some() || durations.default_max_duration.is_some() {
            policy.insert(tenant, durations)?;
            policy.validate(cluster_max)?;
        }
        Ok(())
    }

    /// `base` (the static table's limits for this tenant) with this policy's durations
    /// laid over it, with the same rules: the maximum never above the cluster's, a
    /// default cut to the maximum.
    pub fn limits(&self, base: DurationLimits, cluster_max: Duration) -> DurationLimits {
        let secs = |v: u32| Duration::from_secs(u64::from(v));
        let max = self
            .max_duration_secs
            .map_or(base.max, secs)
            .min(cluster_max);
        let default = self
            .default_duration_secs
            .map_or(base.default, secs)
            .min(max);
        DurationLimits { default, max }
    }
}

/// Parses one `--tenant-policy` value: `TENANT:max=2400,default=1800`. Durations are
/// seconds, or a number with `s`, `m` or `h` (`40m`, `2h`). The tenant is everything
/// before the last `:`, so a tenant name may itself contain `:` or `,`.
pub fn parse_spec(spec: &str) -> Result<(String, TenantPolicy), TenantPolicyError> {
    let syntax = |reason: &str| TenantPolicyError::Syntax {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (tenant, settings) = spec
        .rsplit_once(':')
        .ok_or_else(|| syntax("expected TENANT:max=SECS,default=SECS"))?;
    let tenant = tenant.to_owned();
    check_name(&tenant)?;
    let mut policy = TenantPolicy::default();
    for part in settings.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| syntax(&format!("{part:?} is not key=value")))?;
        let (field, slot) = match key.trim() {
            "max" => ("max", &mut policy.max_duration),
            "default" => ("default", &mut policy.default_max_duration),
            other => {
                return Err(syntax(&format!(
                    "unknown key {other:?}; expected max or default"
                )));
            }
        };
        if slot.is_some() {
            return Err(syntax(&format!("{field} is given twice")));
        }
        *slot = Some(
            parse_duration(value.trim()).map_err(|reason| TenantPolicyError::Value {
                tenant: tenant.clone(),
                field,
                value: value.trim().to_owned(),
                reason,
            })?,
        );
    }
    if policy.default_max_duration.is_none() && policy.max_duration.is_none() {
        return Err(TenantPolicyError::Empty { tenant });
    }
    Ok((tenant, policy))
}

/// `2400`, `2400s`, `40m` or `2h`: a positive whole number of seconds, minutes or hours.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c @ ('s' | 'm' | 'h'))) => (&text[..i], c),
        _ => (text, 's'),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be seconds, or a number followed by s, m or h (e.g. 40m)".into());
    }
    let n: u64 = digits.parse().map_err(|_| "is too large".to_owned())?;
    let scale = match unit {
        'h' => 3600,
        'm' => 60,
        _ => 1,
    };
    let secs = n.checked_mul(scale).ok_or("is too large")?;
    if secs == 0 {
        return Err("must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn check_name(tenant: &str) -> Result<(), TenantPolicyError> {
    crate::validate::name("tenant", tenant).map_err(|e| TenantPolicyError::Name {
        tenant: tenant.to_owned(),
        reason: match e {
            crate::ApiError::InvalidArgument { reason, .. } => reason,
            other => other.to_string(),
        },
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileEntry {
    tenant: String,
    #[serde(default)]
    max_seconds: Option<FileDuration>,
    #[serde(default)]
    default_seconds: Option<FileDuration>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FileDuration {
    Secs(u64),
    Text(String),
}

impl FileDuration {
    fn duration(self, tenant: &str, field: &'static str) -> Result<Duration, TenantPolicyError> {
        let (value, parsed) = match self {
            FileDuration::Secs(n) => (
                n.to_string(),
                if n == 0 {
                    Err("must be positive".to_owned())
                } else {
                    Ok(Duration::from_secs(n))
                },
            ),
            FileDuration::Text(t) => {
                let parsed = parse_duration(t.trim());
                (t, parsed)
            }
        };
        parsed.map_err(|reason| TenantPolicyError::Value {
            tenant: tenant.to_owned(),
            field,
            value,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const CLUSTER_DEFAULT: Duration = Duration::from_secs(40 * 60);
    const CLUSTER_MAX: Duration = Duration::from_secs(4 * 3600);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn table(specs: &[&str]) -> Result<TenantPolicies, TenantPolicyError> {
        let mut t = TenantPolicies::new();
        for s in specs {
            let (tenant, policy) = parse_spec(s)?;
            t.insert(tenant, policy)?;
        }
        t.validate(CLUSTER_MAX)?;
        Ok(t)
    }

    #[test]
    fn durations_parse_in_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("2400"), Ok(secs(2400)));
        assert_eq!(parse_duration("90s"), Ok(secs(90)));
        assert_eq!(parse_duration("40m"), Ok(40 * MIN));
        assert_eq!(parse_duration("2h"), Ok(secs(7200)));
        for bad in ["", "m", "0", "0m", "-5", "1.5h", "40 m", "3d", "1h30m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let huge = format!("{}h", u64::MAX);
        assert_eq!(parse_duration(&huge), Err("is too large".into()));
    }

    #[test]
    fn specs_parse() {
        let (tenant, policy) = parse_spec("acme:max=40m,default=1800").expect("valid");
        assert_eq!(tenant, "acme");
        assert_eq!(policy.max_duration, Some(40 * MIN));
        assert_eq!(policy.default_max_duration, Some(secs(1800)));

        let (tenant, policy) = parse_spec("call:center, tokyo:max=2h").expect("valid");
        assert_eq!(
            tenant, "call:center, tokyo",
            "tenant is before the last ':'"
        );
        assert_eq!(policy.max_duration, Some(secs(7200)));
        assert_eq!(policy.default_max_duration, None);

        let (_, policy) = parse_spec("acme: default = 10m ").expect("spaces are trimmed");
        assert_eq!(policy.default_max_duration, Some(10 * MIN));
    }

    #[test]
    fn spec_errors_name_the_tenant_and_the_field() {
        let msg = |s: &str| parse_spec(s).expect_err(s).to_string();
        assert!(msg("acme").contains("TENANT:max="), "{}", msg("acme"));
        let e = msg("acme:max=forty");
        assert!(
            e.contains("\"acme\"") && e.contains("max") && e.contains("forty"),
            "{e}"
        );
        let e = msg("acme:default=0");
        assert!(e.contains("\"acme\"") && e.contains("default"), "{e}");
        let e = msg("acme:color=red");
        assert!(e.contains("unknown key"), "{e}");
        let e = msg("acme:max");
        assert!(e.contains("key=value"), "{e}");
        let e = msg("acme:max=1,max=2");
        assert!(e.contains("twice"), "{e}");
        let e = msg("acme:");
        assert!(e.contains("neither"), "{e}");
        let e = msg(":max=10");
        assert!(e.contains("must not be empty"), "{e}");
        let e = msg(&format!("{}:max=10", "x".repeat(129)));
        assert!(e.contains("at most 128"), "{e}");
        let e = msg("a\tb:max=10");
        assert!(e.contains("control"), "{e}");
    }

    #[test]
    fn validation_against_the_cluster() {
        assert!(table(&["acme:max=40m,default=30m", "globex:default=1h"]).is_ok());
        let e = table(&["acme:max=40m,default=41m"]).expect_err("default above max");
        assert!(
            e.to_string().contains("\"acme\"") && e.to_string().contains("default"),
            "{e}"
        );
        assert!(e.to_string().contains("the tenant's max"), "{e}");
        let e = table(&["acme:max=5h"]).expect_err("max above the cluster's");
        assert!(e.to_string().contains("cluster maximum"), "{e}");
        assert!(e.to_string().contains("max"), "{e}");
        let e = table(&["acme:default=5h"]).expect_err("default above the cluster max");
        assert!(e.to_string().contains("cluster maximum"), "{e}");
        let e = table(&["acme:max=1h", "acme:default=1m"]).expect_err("twice");
        assert!(
            matches!(&e, TenantPolicyError::Duplicate { tenant } if tenant == "acme"),
            "{e}"
        );
    }

    #[test]
    fn limits_fall_back_to_the_cluster_and_cap_requests() {
        let t = table(&[
            "short:max=40m,default=30m",
            "maxonly:max=10m",
            "defaultonly:default=1h",
        ])
        .expect("valid");
        let limits = |tenant| t.limits(tenant, CLUSTER_DEFAULT, CLUSTER_MAX);

        let short = limits("short");
        assert_eq!(short.session_duration(0), 30 * MIN);
        assert_eq!(short.session_duration(60), MIN);
        assert_eq!(
            short.session_duration(3600),
            40 * MIN,
            "capped, not refused"
        );
        assert_eq!(short.session_duration(u32::MAX), 40 * MIN);

        let maxonly = limits("maxonly");
        assert_eq!(
            maxonly.session_duration(0),
            10 * MIN,
            "the cluster default is cut to the tenant's max"
        );

        let defaultonly = limits("defaultonly");
        assert_eq!(defaultonly.session_duration(0), 60 * MIN);
        assert_eq!(defaultonly.session_duration(u32::MAX), CLUSTER_MAX);

        let other = limits("someone-else");
        assert_eq!(
            other,
            DurationLimits {
                default: CLUSTER_DEFAULT,
                max: CLUSTER_MAX
            }
        );
        assert_eq!(
            limits("SHORT"),
            other,
            "names match exactly, like the request's tenant"
        );
    }

    #[test]
    fn limits_stay_within_the_cluster_even_unvalidated() {
        let mut t = TenantPolicies::new();
        t.insert(
            "big",
            TenantPolicy {
                default_max_duration: Some(secs(100_000)),
                max_duration: Some(secs(200_000)),
            },
        )
        .expect("insert checks names, not limits");
        let l = t.limits("big", CLUSTER_DEFAULT, CLUSTER_MAX);
        assert_eq!(l.max, CLUSTER_MAX);
        assert_eq!(l.default, CLUSTER_MAX);
    }

    #[test]
    fn json_file_parses_with_clear_errors() {
        let t = TenantPolicies::from_json(
            r#"[
                {"tenant": "acme", "maxSeconds": 2400, "defaultSeconds": "30m"},
                {"tenant": "globex", "maxSeconds": "2h"}
            ]"#,
        )
        .expect("valid");
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.get("acme"),
            Some(&TenantPolicy {
                max_duration: Some(40 * MIN),
                default_max_duration: Some(30 * MIN),
            })
        );
        assert_eq!(
            t.get("globex").and_then(|p| p.max_duration),
            Some(secs(7200))
        );
        assert!(TenantPolicies::from_json("[]").expect("empty").is_empty());

        let e = TenantPolicies::from_json(r#"[{"tenant": "acme", "maxSeconds": 0}]"#)
            .expect_err("zero");
        assert!(e.to_string().contains("maxSeconds"), "{e}");
        let e = TenantPolicies::from_json(r#"[{"tenant": "acme", "defaultSeconds": "soon"}]"#)
            .expect_err("bad text");
        assert!(
            e.to_string().contains("\"acme\"") && e.to_string().contains("defaultSeconds"),
            "{e}"
        );
        let e = TenantPolicies::from_json(r#"[{"tenant": "acme", "max": 10}]"#)
            .expect_err("unknown field");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = TenantPolicies::from_json(r#"[{"tenant": "acme"}]"#).expect_err("empty");
        assert!(e.to_string().contains("neither"), "{e}");
        let e = TenantPolicies::from_json(
            r#"[{"tenant": "acme", "maxSeconds": 1}, {"tenant": "acme", "maxSeconds": 2}]"#,
        )
        .expect_err("duplicate");
        assert!(e.to_string().contains("more than one"), "{e}");
    }

    #[test]
    fn policy_file_is_read_and_bounded() {
        let dir = std::env::temp_dir().join(format!("kakehashi-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.json");
        std::fs::write(&good, r#"[{"tenant": "acme", "maxSeconds": "40m"}]"#).expect("write");
        let t = TenantPolicies::load_file(&good).expect("valid file");
        assert_eq!(t.get("acme").and_then(|p| p.max_duration), Some(40 * MIN));

        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{not json").expect("write");
        let e = TenantPolicies::load_file(&bad).expect_err("bad json");
        assert!(e.to_string().contains("bad.json"), "{e}");

        let big = dir.join("big.json");
        let padding = " ".repeat(MAX_POLICY_FILE_BYTES as usize + 1);
        std::fs::write(&big, format!("[]{padding}")).expect("write");
        let e = TenantPolicies::load_file(&big).expect_err("too big");
        assert!(e.to_string().contains("larger than"), "{e}");

        let e = TenantPolicies::load_file(&dir.join("missing.json")).expect_err("missing");
        assert!(e.to_string().contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn stored_settings_lie_over_the_static_limits() {
        let cluster_max = Duration::from_secs(4 * 3600);
        let base = DurationLimits {
            default: Duration::from_secs(2400),
            max: Duration::from_secs(3600),
        };
        let none = TenantSettings::default();
        assert_eq!(none.limits(base, cluster_max), base);
        let only_max = TenantSettings {
            max_duration_secs: Some(600),
            ..TenantSettings::default()
        };
        assert_eq!(
            only_max.limits(base, cluster_max),
            DurationLimits {
                default: Duration::from_secs(600),
                max: Duration::from_secs(600)
            },
            "the default is cut to the stored max"
        );
        let view_only = TenantSettings {
            allowed_modes: vec![kakehashi_proto::Mode::View as u8],
            ..TenantSettings::default()
        };
        assert!(view_only.allows(kakehashi_proto::Mode::View));
        assert!(!view_only.allows(kakehashi_proto::Mode::Control));
        assert!(
            none.allows(kakehashi_proto::Mode::Control),
            "empty allows all"
        );

        assert!(none.validate("acme", cluster_max).is_ok());
        let too_long = TenantSettings {
            max_duration_secs: Some(5 * 3600),
            ..TenantSettings::default()
        };
        assert!(too_long.validate("acme", cluster_max).is_err());
        let default_above_max = TenantSettings {
            max_duration_secs: Some(600),
            default_duration_secs: Some(900),
            ..TenantSettings::default()
        };
        let e = default_above_max
            .validate("acme", cluster_max)
            .expect_err("default above max");
        assert!(e.to_string().contains("default"), "{e}");
    }
}
