//! capsa-session-manager: the public `SessionService`. Stateless; any number of replicas
//! share Redis. [`run`] serves on a bound listener until `shutdown` resolves, with the
//! reaper and reconciler running beside the server (see `reaper`). On shutdown health goes
//! NOT_SERVING, the listener closes and in-flight calls finish; sessions are not ended
//! (another replica, or this one restarted, carries on from Redis).
//!
//! Modules and what each owns:
//! - `grpc`: the adapter, the only place that sees the protocol: authenticates, validates
//!   (with `validate`), turns requests into domain values and results and [`Error`]s
//!   back into messages and statuses.
//! - `app`: the shared state (`App`): stores, node clients, config, and the
//!   per-tenant stream slots.
//! - `sessions`: create, get, list, delete, extend, usage; `teardown`: ending a session
//!   and releasing its VM; `suspend`: suspending and resuming (the node's snapshots);
//!   `reaper`: expiry (and auto_suspend) and the reconciler.
//! - `egress`: a session's egress policy (its default, Get/UpdateEgressPolicy).
//! - `proxy`: Execute and file calls relayed to the session's node, with the stall bound.
//! - `processes`: background processes, terminals and port tunnels relayed the same way.
//! - `clients`: the cached node and metering channels and their flow control.
//! - [`config`]: flags; [`error`]: the error enum and its codes; [`validate`]: the
//!   contract's checks of every request field.

mod app;
mod clients;
pub mod config;
mod egress;
pub mod error;
mod grpc;
mod placement;
mod processes;
mod proxy;
mod reaper;
mod sessions;
mod snapshots;
mod suspend;
mod teardown;
pub mod validate;

use std::future::Future;
use std::sync::Arc;

use capsa_proto::session::v1::session_service_server::SessionServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{
    Cli, Command, Config, CreateApiKey, EgressFlags, ListApiKeys, RevokeApiKey, SetTenantEgress,
    SetTenantLimits,
};
pub use error::Error;

/// Everything [`run`] can fail with before or while serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to redis")]
    Redis(#[source] capsa_store::StoreError),
    #[error("grpc server failed")]
    Serve(#[source] capsa_grpc::ServeError),
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let conn = capsa_store::connect(config.redis_url.expose())
        .await
        .map_err(RunError::Redis)?;
    let public_tls = config.public_tls.server();
    let health_listen = config.common.health_listen;
    let app = Arc::new(app::App::new(config, conn));
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    tokio::spawn(reaper::reaper(app.clone(), stop.clone()));
    tokio::spawn(reaper::reconciler(app.clone(), stop.clone()));
    let service = SessionServiceServer::new(grpc::SessionApi::new(app))
        .max_decoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(capsa_proto::limits::MAX_MESSAGE_BYTES);
    let server = capsa_grpc::Server::new()
        .tls(public_tls)
        .health_listen(health_listen)
        .max_concurrent_streams(capsa_grpc::server::max_streams::SESSION_MANAGER)
        .add_service(service);
    tracing::info!("session-manager serving");
    capsa_grpc::serve_tcp(server, listener, shutdown)
        .await
        .map_err(RunError::Serve)
}

/// `create-api-key`: creates the key (and the tenant's session cap, if given) and returns
/// the plaintext for the caller to print.
pub async fn create_api_key(args: &CreateApiKey) -> Result<String, AdminError> {
    let conn = capsa_store::connect(args.redis_url.expose()).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    if let Some(max) = args.max_sessions {
        keys.set_max_sessions(&args.tenant, max).await?;
    }
    Ok(keys.create(&args.tenant, &args.name).await?.plaintext)
}

/// `set-tenant-limits`: stores the given limits and returns the tenant's overrides now in
/// force, one `name value` per line.
pub async fn set_tenant_limits(args: &SetTenantLimits) -> Result<String, AdminError> {
    let conn = capsa_store::connect(args.redis_url.expose()).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    if let Some(max) = args.max_sessions {
        keys.set_max_sessions(&args.tenant, max).await?;
    }
    if let (Some(rate), Some(burst)) = (args.create_rate, args.create_burst) {
        keys.set_create_rate(&args.tenant, rate, burst).await?;
    }
    if let Some(max) = args.max_snapshots {
        keys.set_limit(&args.tenant, "max_snapshots", u64::from(max))
            .await?;
    }
    if let Some(max) = args.max_snapshot_bytes {
        keys.set_limit(&args.tenant, "max_snapshot_bytes", max)
            .await?;
    }
    let limits = keys.tenant_limits(&args.tenant).await?;
    Ok(limits
        .iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `set-tenant-egress`: stores the tenant's default egress policy (or removes it with
/// `--clear`) and returns what now applies to the tenant's sessions created without one:
/// the policy as JSON, or a line saying the deployment default applies.
pub async fn set_tenant_egress(args: &SetTenantEgress) -> Result<String, AdminError> {
    let policy = if args.clear {
        None
    } else {
        Some(args.policy.policy()?)
    };
    let conn = capsa_store::connect(args.redis_url.expose()).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    keys.set_tenant_egress(&args.tenant, policy.as_ref())
        .await?;
    Ok(match keys.tenant_egress(&args.tenant).await? {
        Some(policy) => serde_json::to_string(&policy).expect("a policy always serializes"),
        None => format!(
            "tenant {} has no default egress policy: the deployment's (--default-egress) applies",
            args.tenant
        ),
    })
}

/// Characters of a key's sha256 hex that `list-api-keys` shows as its id.
const KEY_ID_SHOWN: usize = 16;

/// `list-api-keys`: one line per key, `id tenant created name`, oldest first.
pub async fn list_api_keys(args: &ListApiKeys) -> Result<String, AdminError> {
    let conn = capsa_store::connect(args.redis_url.expose()).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    Ok(keys
        .list(args.tenant.as_deref())
        .await?
        .into_iter()
        .map(|(hash, rec)| {
            format!(
                "{}  {}  {}  {}",
                &hash[..KEY_ID_SHOWN],
                rec.tenant_id,
                // prost's Timestamp displays as RFC 3339 (UTC).
                capsa_proto::time::timestamp_ms(rec.created_ms),
                rec.name
            )
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Why an admin command (`create-api-key`, `list-api-keys`, `revoke-api-key`, ...) failed: the
/// store (exit 69, unreachable dependency), or a request it refused (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no api key has id {0}")]
    NotFound(String),
    #[error("{1} api keys start with {0}: give more of the id")]
    Ambiguous(String, usize),
    #[error(
        "a key id is at least {} hex digits, as list-api-keys prints it",
        capsa_store::apikeys::MIN_KEY_ID_LEN
    )]
    Malformed,
    /// A policy flag's value is not valid (the message names the field).
    #[error(transparent)]
    Policy(#[from] capsa_egress::PolicyError),
    #[error(transparent)]
    Store(#[from] capsa_store::StoreError),
}

/// `revoke-api-key`: deletes the key and returns `id tenant name` of what was revoked.
pub async fn revoke_api_key(args: &RevokeApiKey) -> Result<String, AdminError> {
    let conn = capsa_store::connect(args.redis_url.expose()).await?;
    let keys = capsa_store::ApiKeyStore::new(conn);
    match keys.find_by_id(&args.id).await? {
        capsa_store::KeyById::One(hash, rec) => {
            if !keys.revoke_hash(&hash).await? {
                return Err(AdminError::NotFound(args.id.clone()));
            }
            Ok(format!(
                "revoked {}  {}  {}",
                &hash[..KEY_ID_SHOWN],
                rec.tenant_id,
                rec.name
            ))
        }
        capsa_store::KeyById::None => Err(AdminError::NotFound(args.id.clone())),
        capsa_store::KeyById::Ambiguous(n) => Err(AdminError::Ambiguous(args.id.clone(), n)),
        capsa_store::KeyById::Malformed => Err(AdminError::Malformed),
    }
}
