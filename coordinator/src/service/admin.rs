//! `AdminService`: API keys, tenant policies and enrolled devices (unattended access).
//! Only admin keys call it; a tenant admin manages its own tenant, the cluster admin
//! (tenant `*`) every tenant.

use std::sync::Arc;

use kakehashi_proto::{Mode, pb};
use tonic::{Request, Response, Status};

use super::{Core, now_ms};
use crate::auth::{self, Action, Authenticator, CallError, Caller, Role};
use crate::error::ApiError;
use crate::tenants::TenantSettings;
use crate::unattended::{self, DeviceRecord};
use crate::validate;

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub struct AdminApi {
    core: Arc<Core>,
    auth: Arc<dyn Authenticator>,
}

impl AdminApi {
    pub fn new(core: Arc<Core>) -> Self {
        let auth = auth::authenticator(&core.config.auth, core.backends.auth.clone());
        Self { core, auth }
    }

    async fn admin<T>(&self, request: &Request<T>) -> Result<Caller, CallError> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        caller.require(Action::Administer)?;
        Ok(caller)
    }
}

/// The tenant a request names (empty: the caller's), checked against the caller.
fn target_tenant(caller: &Caller, requested: &str) -> Result<String, CallError> {
    let tenant = if requested.is_empty() {
        if caller.is_cluster_wide() {
            return Err(ApiError::invalid("tenant", "the cluster admin must name a tenant").into());
        }
        caller.tenant.clone()
    } else {
        requested.to_owned()
    };
    validate::name("tenant", &tenant)?;
    if tenant == auth::CLUSTER_TENANT {
        return Err(ApiError::invalid(
            "tenant",
            "\"*\" is the cluster admin's; its key comes from --bootstrap-admin-key-file",
        )
        .into());
    }
    caller.require_tenant(&tenant, "the tenant named in the request")?;
    Ok(tenant)
}

fn policy_to_pb(tenant: &str, s: &TenantSettings) -> pb::TenantPolicy {
    pb::TenantPolicy {
        tenant: tenant.to_owned(),
        max_duration_secs: s.max_duration_secs.unwrap_or(0),
        default_duration_secs: s.default_duration_secs.unwrap_or(0),
        allowed_modes: s.allowed_modes.iter().map(|&m| i32::from(m)).collect(),
        recording_enabled: s.recording_enabled,
        unattended_enabled: s.unattended_enabled,
        monitoring_enabled: s.monitoring_enabled,
    }
}

impl Core {
    pub async fn create_api_key(
        &self,
        caller: &Caller,
        req: pb::CreateApiKeyRequest,
    ) -> Result<pb::CreateApiKeyResponse, CallError> {
        let tenant = target_tenant(caller, &req.tenant)?;
        let role = Role::from_pb(req.role).ok_or_else(|| {
            ApiError::invalid(
                "role",
                "must be API_ROLE_ADMIN, API_ROLE_OPERATOR or API_ROLE_AUDITOR",
            )
        })?;
        validate::name("name", &req.name)?;
        if req.groups.len() > auth::MAX_GROUPS {
            return Err(ApiError::invalid(
                "groups",
                format!("at most {} groups", auth::MAX_GROUPS),
            )
            .into());
        }
        for group in &req.groups {
            validate::name("groups", group)?;
        }
        let existing = self
            .backends
            .auth
            .list_keys(&tenant, auth::MAX_KEYS_PER_TENANT)
            .await?;
        if existing.len() >= auth::MAX_KEYS_PER_TENANT {
            return Err(ApiError::invalid(
                "tenant",
                format!(
                    "tenant already holds {} keys (revoked included), the most it may",
                    auth::MAX_KEYS_PER_TENANT
                ),
            )
            .into());
        }
        // A clash of two random 64-bit ids is practically impossible; retry anyway
        // rather than overwrite.
        for _ in 0..4 {
            let made = auth::new_key(
                tenant.clone(),
                role,
                req.name.clone(),
                req.groups.clone(),
                now_ms(),
            )?;
            if self.backends.auth.insert_key(made.record.clone()).await? {
                tracing::info!(
                    tenant = %tenant,
                    key_id = %made.record.key_id,
                    role = role.name(),
                    by = %caller.key_id,
                    "API key created"
                );
                return Ok(pb::CreateApiKeyResponse {
                    key: Some(made.record.to_pb()),
                    api_key: made.api_key,
                });
            }
        }
        Err(ApiError::invalid("key_id", "could not pick a free key id; retry").into())
    }

    pub async fn revoke_api_key(
        &self,
        caller: &Caller,
        req: pb::RevokeApiKeyRequest,
    ) -> Result<pb::ApiKeyInfo, CallError> {
        validate::name("key_id", &req.key_id)?;
        let not_found = || ApiError::invalid("key_id", format!("no API key {}", req.key_id));
        // Check the tenant before revoking: a tenant admin must not learn by revoking
        // whether another tenant's key exists, nor revoke it.
        let record = self
            .backends
            .auth
            .get_key(&req.key_id)
            .await?
            .ok_or_else(not_found)?;
        caller.require_tenant(&record.tenant, "the API key")?;
        let record = self
            .backends
            .auth
            .revoke_key(&req.key_id, now_ms())
            .await?
            .ok_or_else(not_found)?;
        tracing::info!(tenant = %record.tenant, key_id = %record.key_id, by = %caller.key_id, "API key revoked");
        Ok(record.to_pb())
    }

    pub async fn list_api_keys(
        &self,
        caller: &Caller,
        req: pb::ListApiKeysRequest,
    ) -> Result<pb::ListApiKeysResponse, CallError> {
        let tenant = target_tenant(caller, &req.tenant)?;
        let keys = self
            .backends
            .auth
            .list_keys(&tenant, auth::MAX_KEYS_PER_TENANT)
            .await?;
        Ok(pb::ListApiKeysResponse {
            keys: keys.iter().map(auth::ApiKeyRecord::to_pb).collect(),
        })
    }

    pub async fn set_tenant_policy(
        &self,
        caller: &Caller,
        req: pb::SetTenantPolicyRequest,
    ) -> Result<pb::TenantPolicy, CallError> {
        let policy = req
            .policy
            .ok_or_else(|| ApiError::invalid("policy", "is required"))?;
        let tenant = target_tenant(caller, &policy.tenant)?;
        let mut modes = Vec::new();
        for &m in &policy.allowed_modes {
            let mode: Mode = validate::mode(m)?;
            if !modes.contains(&(mode as u8)) {
                modes.push(mode as u8);
            }
        }
        let nonzero = |v: u32| (v != 0).then_some(v);
        let settings = TenantSettings {
            max_duration_secs: nonzero(policy.max_duration_secs),
            default_duration_secs: nonzero(policy.default_duration_secs),
            allowed_modes: modes,
            recording_enabled: policy.recording_enabled,
            unattended_enabled: policy.unattended_enabled,
            monitoring_enabled: policy.monitoring_enabled,
        };
        settings
            .validate(&tenant, self.config.max_max_duration)
            .map_err(|e| ApiError::invalid("policy", e.to_string()))?;
        self.backends
            .auth
            .set_policy(&tenant, settings.clone())
            .await?;
        tracing::info!(tenant = %tenant, by = %caller.key_id, ?settings, "tenant policy set");
        Ok(policy_to_pb(&tenant, &settings))
    }

    pub async fn get_tenant_policy(
        &self,
        caller: &Caller,
        req: pb::GetTenantPolicyRequest,
    ) -> Result<pb::TenantPolicy, CallError> {
        let tenant = target_tenant(caller, &req.tenant)?;
        let settings = self
            .backends
            .auth
            .get_policy(&tenant)
            .await?
            .unwrap_or_default();
        Ok(policy_to_pb(&tenant, &settings))
    }
}

impl Core {
    /// The device, if the caller's tenant holds it; another tenant's device answers
    /// PERMISSION_DENIED, as another tenant's key does.
    async fn device_for(
        &self,
        caller: &Caller,
        device_id: &str,
    ) -> Result<DeviceRecord, CallError> {
        unattended::validate_device_id(device_id)?;
        let device = self
            .backends
            .auth
            .get_device(device_id)
            .await?
            .ok_or_else(|| ApiError::invalid("device_id", format!("no device {device_id}")))?;
        caller.require_tenant(&device.tenant, "the device")?;
        Ok(device)
    }

    /// Enrols (or re-enrols, replacing every field) a device of the caller's tenant.
    pub async fn enroll_device(
        &self,
        caller: &Caller,
        req: pb::EnrollDeviceRequest,
    ) -> Result<pb::DeviceInfo, CallError> {
        let tenant = target_tenant(caller, &req.tenant)?;
        unattended::validate_device_id(&req.device_id)?;
        validate::name("name", &req.name)?;
        unattended::validate_operators("allowed_operators", &req.allowed_operators)?;
        let public_key: [u8; 32] =
            req.public_key.as_slice().try_into().map_err(|_| {
                ApiError::invalid("public_key", "must be a 32-byte Ed25519 public key")
            })?;
        if ed25519_dalek::VerifyingKey::from_bytes(&public_key).is_err() {
            return Err(ApiError::invalid("public_key", "is not an Ed25519 public key").into());
        }
        if unattended::device_id_of(&public_key) != req.device_id {
            return Err(ApiError::invalid(
                "device_id",
                "does not match the public key (the first 16 bytes of its SHA-256, in hex)",
            )
            .into());
        }
        let existing = self.backends.auth.get_device(&req.device_id).await?;
        if let Some(d) = &existing {
            caller.require_tenant(&d.tenant, "the device")?;
            if d.tenant != tenant {
                return Err(ApiError::invalid(
                    "device_id",
                    format!(
                        "is enrolled in tenant {:?}; remove it there first",
                        d.tenant
                    ),
                )
                .into());
            }
        } else {
            let held = self
                .backends
                .auth
                .list_devices(&tenant, unattended::MAX_DEVICES_PER_TENANT)
                .await?;
            if held.len() >= unattended::MAX_DEVICES_PER_TENANT {
                return Err(ApiError::invalid(
                    "tenant",
                    format!(
                        "tenant already holds {} devices, the most it may",
                        unattended::MAX_DEVICES_PER_TENANT
                    ),
                )
                .into());
            }
        }
        let device = DeviceRecord {
            device_id: req.device_id,
            tenant,
            name: req.name,
            public_key,
            blocked: false,
            allowed_operators: req.allowed_operators,
            denied_operators: Vec::new(),
            enrolled_at_ms: now_ms(),
            monitoring: req.monitoring,
        };
        self.backends.auth.put_device(device.clone()).await?;
        tracing::info!(tenant = %device.tenant, device = %device.device_id, by = %caller.key_id, "device enrolled");
        Ok(device.to_pb())
    }

    pub async fn set_device_access(
        &self,
        caller: &Caller,
        req: pb::SetDeviceAccessRequest,
    ) -> Result<pb::DeviceInfo, CallError> {
        unattended::validate_operators("allowed_operators", &req.allowed_operators)?;
        unattended::validate_operators("denied_operators", &req.denied_operators)?;
        let mut device = self.device_for(caller, &req.device_id).await?;
        device.blocked = req.blocked;
        device.allowed_operators = req.allowed_operators;
        device.denied_operators = req.denied_operators;
        device.monitoring = req.monitoring;
        self.backends.auth.put_device(device.clone()).await?;
        tracing::info!(
            device = %device.device_id,
            blocked = device.blocked,
            monitoring = device.monitoring,
            by = %caller.key_id,
            "device access set"
        );
        Ok(device.to_pb())
    }

    pub async fn list_devices(
        &self,
        caller: &Caller,
        req: pb::ListDevicesRequest,
    ) -> Result<pb::ListDevicesResponse, CallError> {
        let tenant = target_tenant(caller, &req.tenant)?;
        let devices = self
            .backends
            .auth
            .list_devices(&tenant, unattended::MAX_DEVICES_PER_TENANT)
            .await?;
        Ok(pb::ListDevicesResponse {
            devices: devices.iter().map(DeviceRecord::to_pb).collect(),
        })
    }

    pub async fn remove_device(
        &self,
        caller: &Caller,
        req: pb::RemoveDeviceRequest,
    ) -> Result<pb::DeviceInfo, CallError> {
        let device = self.device_for(caller, &req.device_id).await?;
        let removed = self
            .backends
            .auth
            .remove_device(&device.device_id)
            .await?
            .unwrap_or(device);
        tracing::info!(device = %removed.device_id, by = %caller.key_id, "device removed");
        Ok(removed.to_pb())
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core
                .create_api_key(&caller, request.into_inner())
                .await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("CreateApiKey"))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKeyInfo>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core
                .revoke_api_key(&caller, request.into_inner())
                .await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("RevokeApiKey"))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core.list_api_keys(&caller, request.into_inner()).await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("ListApiKeys"))
    }

    async fn set_tenant_policy(
        &self,
        request: Request<pb::SetTenantPolicyRequest>,
    ) -> Result<Response<pb::TenantPolicy>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core
                .set_tenant_policy(&caller, request.into_inner())
                .await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("SetTenantPolicy"))
    }

    async fn get_tenant_policy(
        &self,
        request: Request<pb::GetTenantPolicyRequest>,
    ) -> Result<Response<pb::TenantPolicy>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core
                .get_tenant_policy(&caller, request.into_inner())
                .await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("GetTenantPolicy"))
    }

    async fn enroll_device(
        &self,
        request: Request<pb::EnrollDeviceRequest>,
    ) -> Result<Response<pb::DeviceInfo>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core.enroll_device(&caller, request.into_inner()).await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("EnrollDevice"))
    }

    async fn set_device_access(
        &self,
        request: Request<pb::SetDeviceAccessRequest>,
    ) -> Result<Response<pb::DeviceInfo>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core
                .set_device_access(&caller, request.into_inner())
                .await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("SetDeviceAccess"))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core.list_devices(&caller, request.into_inner()).await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("ListDevices"))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::DeviceInfo>, Status> {
        async {
            let caller = self.admin(&request).await?;
            self.core.remove_device(&caller, request.into_inner()).await
        }
        .await
        .map(Response::new)
        .map_err(|e| e.status("RemoveDevice"))
    }
}
