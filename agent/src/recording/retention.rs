//! Retention: recordings are deleted once older than their tenant's retention (90 days
//! unless configured; the telework document keeps data three months). A file is dated
//! by the `created_at` in its authenticated header, never by its modification time,
//! and a file that cannot be dated is reported and kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{RecordingKey, read_meta};

pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// For recordings of tenants without their own setting, and of no known tenant.
    pub default: Duration,
    pub per_tenant: BTreeMap<String, Duration>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            default: DEFAULT_RETENTION,
            per_tenant: BTreeMap::new(),
        }
    }
}

impl RetentionPolicy {
    pub fn for_tenant(&self, tenant: Option<&str>) -> Duration {
        tenant
            .and_then(|t| self.per_tenant.get(t))
            .copied()
            .unwrap_or(self.default)
    }
}

/// What [`prune`] did, file by file (sorted by path).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Deleted, with their age in seconds.
    pub deleted: Vec<(PathBuf, u64)>,
    /// Within their retention (or dated in the future).
    pub kept: Vec<PathBuf>,
    /// Not readable as a recording under this key: kept, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Expired, but the deletion failed: with the reason.
    pub failed: Vec<(PathBuf, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot list recordings in {dir}: {source}")]
pub struct PruneError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

/// Deletes the recordings in `dir` (not its subdirectories; finished and `.partial`
/// alike) whose authenticated creation time is more than their tenant's retention
/// before `now`.
pub fn prune(
    dir: &Path,
    key: &RecordingKey,
    policy: &RetentionPolicy,
    now: SystemTime,
) -> Result<PruneReport, PruneError> {
    let err = |source| PruneError {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        // Symlinks are not followed: only files that live here are judged.
        if entry.file_type().map_err(err)?.is_file() {
            paths.push(entry.path());
        }
    }
    paths.sort();
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut report = PruneReport::default();
    for path in paths {
        let meta = match read_meta(&path, key) {
            Ok(m) => m,
            Err(e) => {
                report.unreadable.push((path, e.to_string()));
                continue;
            }
        };
        let age = now_s.saturating_sub(meta.created_at);
        if age > policy.for_tenant(meta.tenant.as_deref()).as_secs() {
            match std::fs::remove_file(&path) {
                Ok(()) => report.deleted.push((path, age)),
                Err(e) => report.failed.push((path, e.to_string())),
            }
        } else {
            report.kept.push(path);
        }
    }
    Ok(report)
}
