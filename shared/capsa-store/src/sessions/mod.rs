//! Sessions in Redis, every state change an atomic Lua script.
//!
//! Layout (all times are ms on Redis' clock, read with `TIME` inside the scripts, so
//! replicas with skewed clocks still agree on deadlines):
//! - `{capsa}:session:<id>`: the record hash ([`SessionRecord`]); gets a TTL of the retention
//!   period once terminated, so ended sessions stay readable for a while, then vanish.
//! - `{capsa}:sessions:expiry`: zset of every session not yet terminated, scored by the time
//!   its next action is due: the creation deadline while creating, the lifetime deadline
//!   while active, the claim deadline while terminating. [`SessionStore::claim_due`] walks
//!   it, so one zset serves the reaper (expiry), stuck-create cleanup and re-claiming
//!   teardowns whose replica died.
//! - `{capsa}:tenant:<t>:sessions`: zset of the tenant's sessions by create time (paging,
//!   newest first); entries whose hash expired are pruned as listing meets them.
//! - `{capsa}:tenant:<t>:active`: set of creating + active ids (the quota count).
//! - `{capsa}:tenant:<t>:sessions_total`: how many sessions the tenant ever created.
//! - `{capsa}:nodesessions:<node>`: ids of sessions whose VM is on that node (reconciler).
//! - `{capsa}:session:<id>:egress_lock`: held (with a TTL) by the one UpdateEgressPolicy of
//!   that session in flight, from before it calls the node until it stores what the node
//!   applied ([`SessionStore::lock_egress`]).
//!
//! Transitions: creating → active → terminating → terminated, creating may go straight
//! to terminating. Whoever moves a session to terminating (one winner per session) owns
//! its teardown (finalize usage, release the VM, delete its snapshot) until the claim
//! deadline. The suspend loop (active → suspending → suspended → resuming → active, see
//! lua/suspend.lua) works the same way: whoever moves a session into suspending or
//! resuming owns that step until its claim deadline; a step that fails moves it back.
//! Any state but terminated may move to terminating. A suspended session keeps its
//! deadline (the due set's score) and its place in the tenant's active set (the quota).

mod list;
mod record;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use crate::Connection;
use capsa_egress::EgressPolicy;
use redis::AsyncCommands as _;
use redis::Script;

pub use list::{Cursor, ListFilter, ListPage, MAX_PAGE_BYTES};
pub use record::{EndReason, SessionRecord, SessionStatus, session_of_lease};

use crate::apikeys::limits_key;
use crate::{Result, StoreError};

const EXPIRY: &str = "{capsa}:sessions:expiry";

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../lua/clock_and_reply.lua"),
                include_str!("../lua/meter.lua"),
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

static CREATE: LazyLock<Script> = script!("create.lua");
static ACTIVATE: LazyLock<Script> = script!("activate.lua");
static BEGIN_END: LazyLock<Script> = script!("begin_end.lua");
static FINISH_END: LazyLock<Script> = script!("finish_end.lua");
static CLAIM_DUE: LazyLock<Script> = script!("claim_due.lua");
static DUE: LazyLock<Script> = script!("due.lua");
static EXTEND: LazyLock<Script> = script!("extend.lua");
static TOUCH: LazyLock<Script> = script!("touch.lua");
static SET_EGRESS: LazyLock<Script> = script!("set_egress.lua");
static SUSPEND: LazyLock<Script> = script!("suspend.lua");
/// Deletes a lock only if it still holds the caller's token.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
         return 0",
    )
});

/// The VM a session was activated with, as the node reported it.
#[derive(Debug, Clone, Copy)]
pub struct VmShape<'a> {
    pub id: &'a str,
    pub vcpus: u32,
    pub memory_mib: u32,
}

pub(crate) fn session_key(id: &str) -> String {
    format!("{{capsa}}:session:{id}")
}
fn egress_lock_key(id: &str) -> String {
    format!("{{capsa}}:session:{id}:egress_lock")
}
fn tenant_index_key(tenant: &str) -> String {
    format!("{{capsa}}:tenant:{tenant}:sessions")
}
fn tenant_active_key(tenant: &str) -> String {
    format!("{{capsa}}:tenant:{tenant}:active")
}
/// `{capsa}:tenant:<t>:snapshot_meter`: the tenant's snapshot storage (lua/meter.lua).
pub(crate) fn tenant_meter_key(tenant: &str) -> String {
    format!("{{capsa}}:tenant:{tenant}:snapshot_meter")
}
fn tenant_total_key(tenant: &str) -> String {
    format!("{{capsa}}:tenant:{tenant}:sessions_total")
}
pub(crate) fn node_sessions_key(node: &str) -> String {
    format!("{{capsa}}:nodesessions:{node}")
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Bounds the store enforces.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long a terminated session stays readable.
    pub retention: Duration,
    /// How long a teardown claim lasts before another replica may take it over.
    pub claim_ttl: Duration,
    /// How long a session may stay creating before the reaper ends it. Keep it above the
    /// VM acquire timeout so a live creator always finishes first.
    pub creating_bound: Duration,
    /// Upper bound of expire - create, extensions included.
    pub max_total_lifetime: Duration,
    /// How long a replica owns a suspend or resume step (keep it above the longest
    /// SuspendVm / ResumeVm call) before another may redo it.
    pub step_claim_ttl: Duration,
}

impl StoreConfig {
    /// Age past which a session's record has surely expired (its longest life, its
    /// retention, and 60 claim periods for a teardown that kept failing): its tenant index
    /// entry can go.
    pub fn index_horizon(&self) -> Duration {
        self.creating_bound.max(self.max_total_lifetime) + self.retention + self.claim_ttl * 60
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(3600),
            claim_ttl: Duration::from_secs(30),
            creating_bound: Duration::from_secs(180),
            max_total_lifetime: Duration::from_secs(24 * 3600),
            step_claim_ttl: Duration::from_secs(150),
        }
    }
}

/// What a new session asks for (already validated by the caller).
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub tenant_id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Names of the env variables the session sets (values are never stored).
    pub env_names: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub lifetime: Duration,
    /// The effective policy (given, or the tenant's or deployment's default).
    pub egress: EgressPolicy,
    pub auto_suspend: bool,
    pub auto_resume: bool,
    /// The snapshot it starts from (empty: a fresh VM).
    pub source_snapshot_id: String,
    /// The session it was forked from (empty: none).
    pub parent_session_id: String,
}

/// One step of the suspend loop (lua/suspend.lua); each applies to one state only and
/// answers `Conflict` in any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuspendOp {
    /// active → suspending, claimed; `at_deadline` when its deadline asked for it.
    Begin { at_deadline: bool },
    /// suspending → suspended, no VM; a suspend at the deadline then keeps it for
    /// `retention` from now.
    Finish {
        snapshot_bytes: u64,
        retention: Duration,
    },
    /// suspending → active: the VM was not saved and still runs.
    Abort,
    /// suspended → resuming, claimed.
    BeginResume,
    /// resuming → active on `vm_id` (same node).
    FinishResume { vm_id: String },
    /// resuming → suspended: no VM was restored.
    AbortResume,
}

/// Outcome of [`SessionStore::create`].
#[allow(clippy::large_enum_variant)] // made once per create request; boxing buys nothing
#[derive(Debug)]
pub enum Created {
    Ok(SessionRecord),
    /// The tenant already has `limit` creating + active sessions.
    QuotaExceeded {
        limit: u32,
    },
    /// The id is taken (ids are random; this means a caller bug).
    IdTaken,
}

/// Outcome of a transition script.
#[derive(Debug)]
pub enum Transition {
    /// This caller made the change; the record after it.
    Won(SessionRecord),
    /// The session was not in a state this transition applies to; the record as it is.
    Conflict(SessionRecord),
    /// No such session (or its retention ran out).
    Missing,
}

/// Outcome of [`SessionStore::extend`].
#[derive(Debug)]
pub enum Extended {
    Ok(SessionRecord),
    /// Not active; the record as it is.
    NotActive(SessionRecord),
    /// The total lifetime would pass the bound; at most `max_extend_ms` more is allowed.
    TooLong {
        max_extend_ms: i64,
    },
    Missing,
}

/// Outcome of [`SessionStore::set_egress`].
#[allow(clippy::large_enum_variant)] // one per update; boxing buys nothing
#[derive(Debug)]
pub enum EgressStored {
    /// Stored; the record after it.
    Ok(SessionRecord),
    /// The caller's lock had expired: another update may have run since, so nothing was
    /// stored.
    LockLost,
    /// No such session (or its retention ran out).
    Missing,
}

/// One session [`SessionStore::claim_due`] won, and why it was due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: String,
    /// "expired", "creating" or "reclaimed".
    pub kind: String,
}

/// Session storage. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    conn: Connection,
    config: StoreConfig,
}

fn parse_tagged(key: &str, raw: Vec<String>) -> Result<(String, Option<SessionRecord>)> {
    let Some((tag, rest)) = raw.split_first() else {
        return Err(StoreError::Corrupt {
            key: key.into(),
            reason: "empty script reply".into(),
        });
    };
    let rec = if rest.is_empty() {
        None
    } else {
        Some(SessionRecord::from_pairs(key, rest)?)
    };
    Ok((tag.clone(), rec))
}

/// How often a script is sent again after replying `stale` (see lua/common.lua); the fields
/// it checks change at most once, so more than one retry means something else is wrong.
const STALE_RETRIES: usize = 3;

/// What a transition script replies for a session with no record.
fn missing() -> Vec<String> {
    vec!["missing".into()]
}

fn is_stale(raw: &[String]) -> bool {
    raw.len() == 1 && raw[0] == "stale"
}

fn stale(key: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.into(),
        reason: format!("its tenant or node kept changing over {STALE_RETRIES} attempts"),
    }
}

fn transition(key: &str, raw: Vec<String>) -> Result<Transition> {
    match parse_tagged(key, raw)? {
        (tag, Some(rec)) if tag == "ok" => Ok(Transition::Won(rec)),
        (tag, Some(rec)) if tag == "conflict" => Ok(Transition::Conflict(rec)),
        (tag, None) if tag == "missing" => Ok(Transition::Missing),
        (tag, _) => Err(StoreError::Corrupt {
            key: key.into(),
            reason: format!("script replied {tag}"),
        }),
    }
}

impl SessionStore {
    pub fn new(conn: Connection, config: StoreConfig) -> Self {
        Self { conn, config }
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Records a new session as creating, unless the tenant is at its cap of creating +
    /// active sessions (`{capsa}:tenant:<t>:limits` `max_sessions`, else `default_max`).
    pub async fn create(&self, new: &NewSession, default_max: u32) -> Result<Created> {
        let key = session_key(&new.id);
        fn json(v: &impl serde::Serialize) -> String {
            serde_json::to_string(v).expect("strings and maps of strings always serialize")
        }
        let raw: Vec<String> = CREATE
            .key(&key)
            .key(EXPIRY)
            .key(tenant_index_key(&new.tenant_id))
            .key(tenant_active_key(&new.tenant_id))
            .key(tenant_total_key(&new.tenant_id))
            .key(limits_key(&new.tenant_id))
            .arg(&new.id)
            .arg(&new.tenant_id)
            .arg(default_max)
            .arg(ms(self.config.creating_bound))
            .arg(&new.template)
            .arg(new.vcpus)
            .arg(new.memory_mib)
            .arg(json(&new.env_names))
            .arg(json(&new.metadata))
            .arg(ms(new.lifetime))
            .arg(ms(self.config.index_horizon()))
            .arg(json(&new.egress))
            .arg(if new.auto_suspend { "1" } else { "0" })
            .arg(if new.auto_resume { "1" } else { "0" })
            .arg(&new.source_snapshot_id)
            .arg(&new.parent_session_id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if raw.first().map(String::as_str) == Some("quota") {
            let limit = raw
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default_max);
            return Ok(Created::QuotaExceeded { limit });
        }
        match parse_tagged(&key, raw)? {
            (tag, Some(rec)) if tag == "ok" => Ok(Created::Ok(rec)),
            (tag, None) if tag == "exists" => Ok(Created::IdTaken),
            (tag, _) => Err(StoreError::Corrupt {
                key,
                reason: format!("create script replied {tag}"),
            }),
        }
    }

    /// creating → active on `node_id`/`vm_id`; the deadline becomes now + lifetime
    /// (bounded by create + the total bound). `Conflict` means the session was ended
    /// meanwhile and the caller must release the VM it holds.
    pub async fn activate(&self, id: &str, node_id: &str, vm: &VmShape<'_>) -> Result<Transition> {
        let key = session_key(id);
        let raw: Vec<String> = ACTIVATE
            .key(&key)
            .key(EXPIRY)
            .key(node_sessions_key(node_id))
            .key(crate::nodes::NODES_SET)
            .arg(id)
            .arg(node_id)
            .arg(vm.id)
            .arg(ms(self.config.max_total_lifetime))
            .arg(vm.vcpus)
            .arg(vm.memory_mib)
            .invoke_async(&mut self.conn.clone())
            .await?;
        transition(&key, raw)
    }

    /// creating/active → terminating with `reason`; the winner owns the teardown.
    /// `only_if` narrows the states it applies to (e.g. only active for VM failures).
    pub async fn begin_end(
        &self,
        id: &str,
        reason: EndReason,
        message: &str,
        only_if: Option<SessionStatus>,
    ) -> Result<Transition> {
        let key = session_key(id);
        let raw = self
            .with_fields(&key, |fields| async {
                let Some((tenant, _)) = fields else {
                    return Ok(missing());
                };
                Ok(BEGIN_END
                    .key(&key)
                    .key(EXPIRY)
                    .key(tenant_active_key(&tenant))
                    .arg(id)
                    .arg(reason.as_str())
                    .arg(message)
                    .arg(ms(self.config.claim_ttl))
                    .arg(only_if.map(SessionStatus::as_str).unwrap_or(""))
                    .invoke_async(&mut self.conn.clone())
                    .await?)
            })
            .await?;
        transition(&key, raw)
    }

    /// Moves the session one step round the suspend loop (see [`SuspendOp`]).
    pub async fn suspend_step(&self, id: &str, op: SuspendOp) -> Result<Transition> {
        let key = session_key(id);
        let claim = ms(self.config.step_claim_ttl);
        let raw = self
            .with_fields(&key, |fields| async {
                let Some((tenant, _)) = fields else {
                    return Ok(missing());
                };
                let mut script = SUSPEND.key(&key);
                script.key(EXPIRY).key(tenant_meter_key(&tenant)).arg(id);
                match &op {
                    SuspendOp::Begin { at_deadline } => {
                        script.arg("begin_suspend").arg(claim).arg(if *at_deadline {
                            "1"
                        } else {
                            "0"
                        });
                    }
                    SuspendOp::Finish {
                        snapshot_bytes,
                        retention,
                    } => {
                        script
                            .arg("finish_suspend")
                            .arg(claim)
                            .arg(snapshot_bytes)
                            .arg(ms(*retention));
                    }
                    SuspendOp::Abort => {
                        script.arg("abort_suspend").arg(claim);
                    }
                    SuspendOp::BeginResume => {
                        script.arg("begin_resume").arg(claim);
                    }
                    SuspendOp::FinishResume { vm_id } => {
                        script.arg("finish_resume").arg(claim).arg(vm_id);
                    }
                    SuspendOp::AbortResume => {
                        script.arg("abort_resume").arg(claim);
                    }
                }
                Ok(script.invoke_async(&mut self.conn.clone()).await?)
            })
            .await?;
        transition(&key, raw)
    }

    /// terminating → terminated (after the VM is released); `note` is appended to the end
    /// message when non-empty. The record then lives for the retention period.
    pub async fn finish_end(&self, id: &str, note: &str) -> Result<Transition> {
        let key = session_key(id);
        let raw = self
            .with_fields(&key, |fields| async {
                let Some((tenant, node)) = fields else {
                    return Ok(missing());
                };
                Ok(FINISH_END
                    .key(&key)
                    .key(EXPIRY)
                    .key(node_sessions_key(&node))
                    .key(tenant_meter_key(&tenant))
                    .arg(id)
                    .arg(ms(self.config.retention))
                    .arg(note)
                    .invoke_async(&mut self.conn.clone())
                    .await?)
            })
            .await?;
        transition(&key, raw)
    }

    /// Claims up to `limit` due sessions (see the module docs and lua/claim_due.lua for the
    /// kinds: "expired", "creating", "reclaimed", "suspend", "reclaimed_suspending",
    /// "reclaimed_resuming"); returns only those this
    /// caller won. Two replicas calling it at once never both get one id.
    pub async fn claim_due(&self, limit: usize) -> Result<Vec<Claimed>> {
        let due: Vec<String> = DUE
            .key(EXPIRY)
            .arg(limit)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let mut won = Vec::new();
        // Each claim is its own script (its keys declared), which checks the session is
        // still due: of callers racing for one id, the first moves its score into the
        // future and the others get nothing.
        for id in due {
            let key = session_key(&id);
            let raw = self
                .with_fields(&key, |fields| async {
                    // A record gone meanwhile: the script drops its id (its set is unused).
                    let tenant = fields.map(|(t, _)| t).unwrap_or_default();
                    Ok(CLAIM_DUE
                        .key(&key)
                        .key(EXPIRY)
                        .key(tenant_active_key(&tenant))
                        .arg(&id)
                        .arg(ms(self.config.claim_ttl))
                        .arg(ms(self.config.step_claim_ttl))
                        .invoke_async(&mut self.conn.clone())
                        .await?)
                })
                .await?;
            if let Some(kind) = raw.into_iter().next() {
                won.push(Claimed { id, kind });
            }
        }
        Ok(won)
    }

    /// Runs `script`, which declares keys named by the session's stored fields (see
    /// lua/common.lua), with those fields (`None`: no record), reading them again while it
    /// replies `stale`.
    async fn with_fields<F>(
        &self,
        key: &str,
        script: impl Fn(Option<(String, String)>) -> F,
    ) -> Result<Vec<String>>
    where
        F: std::future::Future<Output = Result<Vec<String>>>,
    {
        for _ in 0..STALE_RETRIES {
            let raw = script(self.derived_fields(key).await?).await?;
            if !is_stale(&raw) {
                return Ok(raw);
            }
        }
        Err(stale(key))
    }

    /// `(tenant, node_id)` of the session at `key` (node `""` before activation), the fields
    /// that name the sets its scripts touch; `None` when the record is gone.
    async fn derived_fields(&self, key: &str) -> Result<Option<(String, String)>> {
        let (tenant, node): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg("tenant")
            .arg("node_id")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(tenant.map(|t| (t, node.unwrap_or_default())))
    }

    /// Time until the earliest due action, if any session is pending (for the reaper's
    /// sleep), measured on Redis' clock.
    pub async fn next_due_in(&self) -> Result<Option<Duration>> {
        let mut conn = self.conn.clone();
        let first: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(EXPIRY)
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let Some((_, score)) = first.first() else {
            return Ok(None);
        };
        let now = self.now_ms().await?;
        Ok(Some(Duration::from_millis(
            (*score as i64 - now).max(0) as u64
        )))
    }

    /// Redis' clock, ms since the Unix epoch.
    pub async fn now_ms(&self) -> Result<i64> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Adds `by` to an active session's deadline.
    pub async fn extend(&self, id: &str, by: Duration) -> Result<Extended> {
        let key = session_key(id);
        let raw: Vec<String> = EXTEND
            .key(&key)
            .key(EXPIRY)
            .arg(id)
            .arg(ms(by))
            .arg(ms(self.config.max_total_lifetime))
            .invoke_async(&mut self.conn.clone())
            .await?;
        if raw.first().map(String::as_str) == Some("too_long") {
            let max_extend_ms = raw.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            return Ok(Extended::TooLong { max_extend_ms });
        }
        Ok(match transition(&key, raw)? {
            Transition::Won(rec) => Extended::Ok(rec),
            Transition::Conflict(rec) => Extended::NotActive(rec),
            Transition::Missing => Extended::Missing,
        })
    }

    /// Records activity on an active session (one round trip, no read).
    pub async fn touch(&self, id: &str) -> Result<()> {
        let _: i64 = TOUCH
            .key(session_key(id))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Takes the session's egress lock for `ttl`: `Some(token)` when taken, `None` while
    /// another update holds it. Pass the token to [`SessionStore::set_egress`] or
    /// [`SessionStore::unlock_egress`]; keep `ttl` above the longest node call in between.
    pub async fn lock_egress(&self, id: &str, ttl: Duration) -> Result<Option<String>> {
        let token = lock_token();
        let taken: Option<String> = redis::cmd("SET")
            .arg(egress_lock_key(id))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(taken.map(|_| token))
    }

    /// Releases the egress lock if `token` still holds it (an update that stored nothing).
    pub async fn unlock_egress(&self, id: &str, token: &str) -> Result<()> {
        let _: i64 = UNLOCK
            .key(egress_lock_key(id))
            .arg(token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Stores `policy` (just applied on the node) and releases the lock `token` holds.
    pub async fn set_egress(
        &self,
        id: &str,
        token: &str,
        policy: &EgressPolicy,
    ) -> Result<EgressStored> {
        let key = session_key(id);
        let json = serde_json::to_string(policy).expect("a policy always serializes");
        let raw: Vec<String> = SET_EGRESS
            .key(&key)
            .key(egress_lock_key(id))
            .arg(token)
            .arg(json)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match parse_tagged(&key, raw)? {
            (tag, Some(rec)) if tag == "ok" => Ok(EgressStored::Ok(rec)),
            (tag, None) if tag == "lost" => Ok(EgressStored::LockLost),
            (tag, None) if tag == "missing" => Ok(EgressStored::Missing),
            (tag, _) => Err(StoreError::Corrupt {
                key,
                reason: format!("set_egress script replied {tag}"),
            }),
        }
    }

    /// The session, if it exists (terminated ones until their retention ends).
    pub async fn get(&self, id: &str) -> Result<Option<SessionRecord>> {
        let key = session_key(id);
        let flat: Vec<String> = self.conn.clone().hgetall(&key).await?;
        if flat.is_empty() {
            return Ok(None);
        }
        SessionRecord::from_pairs(&key, &flat).map(Some)
    }

    /// Ids of sessions whose VM lives on `node_id` (active or being torn down).
    pub async fn node_sessions(&self, node_id: &str) -> Result<Vec<String>> {
        Ok(self
            .conn
            .clone()
            .smembers(node_sessions_key(node_id))
            .await?)
    }

    /// The tenant's creating + active count, and how many sessions it ever created.
    pub async fn counts(&self, tenant: &str) -> Result<(u32, u64)> {
        let (active, total): (u32, Option<u64>) = redis::pipe()
            .scard(tenant_active_key(tenant))
            .get(tenant_total_key(tenant))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok((active, total.unwrap_or(0)))
    }

    /// Sessions not yet terminated, across every tenant: each one has exactly one entry in
    /// the due set until it ends.
    pub async fn open_count(&self) -> Result<u64> {
        Ok(self.conn.clone().zcard(EXPIRY).await?)
    }
}

/// A random lock token (only its owner knows it).
fn lock_token() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}
