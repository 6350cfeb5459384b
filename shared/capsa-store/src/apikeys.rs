//! API keys and per-tenant limits.
//!
//! A key is shown to its owner once, at creation, and stored only as its sha256 hex:
//! `{capsa}:apikey:<sha256>` is a hash `{tenant, name, created_ms}`. Authentication hashes the
//! presented key and looks that up, so a leak of Redis leaks no usable key.
//! `{capsa}:tenant:<id>:limits` is a hash of per-tenant overrides (`max_sessions`,
//! `create_rate`, `create_burst`), and
//! `{capsa}:tenant:<id>:create_bucket` the tenant's token bucket for session creates.
//! `{capsa}:tenant:<id>:egress` is the tenant's default egress policy (JSON of
//! [`capsa_egress::EgressPolicy`]), for sessions created without one.

use crate::Connection;
use capsa_egress::EgressPolicy;
use rand::Rng as _;
use rand::distr::Alphanumeric;
use redis::AsyncCommands as _;
use sha2::{Digest as _, Sha256};

use crate::{Result, SessionRecord, StoreError};

/// A create refused by the tenant's rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateThrottled {
    /// When the next token is there.
    pub retry_after: std::time::Duration,
    /// The limit that applied (the tenant's own, or the server default).
    pub per_sec: f64,
    pub burst: u32,
}

/// Every key starts with this, so leaked keys are easy to scan for.
pub const KEY_PREFIX: &str = "capsa_";
const KEY_RANDOM_LEN: usize = 32;

/// One token per create; refills at the tenant's `create_rate` tokens per second up to its
/// `create_burst` (from its limits hash, else ARGV[1] and ARGV[2]), on Redis' clock.
/// Returns {0 when a token was taken, else the ms until one is there (nothing is taken);
/// the rate and burst that applied}. KEYS: the tenant's bucket, the tenant's limits hash.
static TAKE_CREATE_TOKEN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        &[
            crate::CLOCK_AND_REPLY_LUA,
            r"
local now = now_ms()
local rate = tonumber(redis.call('HGET', KEYS[2], 'create_rate') or ARGV[1])
local burst = tonumber(redis.call('HGET', KEYS[2], 'create_burst') or ARGV[2])
local per_ms = rate / 1000
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local since = tonumber(redis.call('HGET', KEYS[1], 'ts') or now)
tokens = math.min(burst, tokens + math.max(0, now - since) * per_ms)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / per_ms) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / per_ms) + 1000)
return { wait, tostring(rate), burst }",
        ]
        .concat(),
    )
});

fn create_bucket_key(tenant_id: &str) -> String {
    format!("{{capsa}}:tenant:{tenant_id}:create_bucket")
}

fn apikey_key(hash: &str) -> String {
    format!("{{capsa}}:apikey:{hash}")
}

/// `{capsa}:tenant:<id>:limits`: per-tenant overrides of server defaults.
pub fn limits_key(tenant_id: &str) -> String {
    format!("{{capsa}}:tenant:{tenant_id}:limits")
}

fn tenant_egress_key(tenant_id: &str) -> String {
    format!("{{capsa}}:tenant:{tenant_id}:egress")
}

/// A key's stored `tenant`, `name` and `created_ms`, as HMGET returns them.
type KeyFields = (Option<String>, Option<String>, Option<String>);

fn key_fields_cmd(key: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(key).arg("tenant").arg("name").arg("created_ms");
    cmd
}

/// The record of the key stored at `key`; `None` when there is none.
fn key_record(key: String, (tenant, name, created): KeyFields) -> Result<Option<ApiKeyRecord>> {
    let Some(tenant_id) = tenant else {
        return Ok(None);
    };
    let created_ms = created
        .unwrap_or_default()
        .parse()
        .map_err(|_| StoreError::Corrupt {
            key,
            reason: "created_ms is not a number".into(),
        })?;
    Ok(Some(ApiKeyRecord {
        tenant_id,
        name: name.unwrap_or_default(),
        created_ms,
    }))
}

/// sha256 hex of a plaintext key: the only form in which keys are stored.
pub fn hash_key(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Shortest key id (a prefix of the key's sha256 hex) that `find_by_id` accepts.
pub const MIN_KEY_ID_LEN: usize = 8;

/// Outcome of [`ApiKeyStore::find_by_id`].
#[derive(Debug)]
pub enum KeyById {
    One(String, ApiKeyRecord),
    None,
    /// More than one key starts with the id: the caller must give more digits.
    Ambiguous(usize),
    /// Not hex, or shorter than [`MIN_KEY_ID_LEN`].
    Malformed,
}

/// What a stored key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub tenant_id: String,
    pub name: String,
    pub created_ms: i64,
}

/// A freshly created key. `plaintext` exists only here; `Debug` redacts it.
pub struct NewApiKey {
    pub plaintext: String,
    pub hash: String,
    pub record: ApiKeyRecord,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("plaintext", &"<redacted>")
            .field("hash", &self.hash)
            .field("record", &self.record)
            .finish()
    }
}

/// API key and tenant-limit storage. Cheap to clone.
#[derive(Clone)]
pub struct ApiKeyStore {
    conn: Connection,
}

impl ApiKeyStore {
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }

    /// Creates a key for `tenant_id` (format `capsa_` + 32 random alphanumerics) and
    /// stores its hash. The plaintext is returned once and never stored.
    pub async fn create(&self, tenant_id: &str, name: &str) -> Result<NewApiKey> {
        let random: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(KEY_RANDOM_LEN)
            .map(char::from)
            .collect();
        let plaintext = format!("{KEY_PREFIX}{random}");
        let hash = hash_key(&plaintext);
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let created_ms = secs * 1000 + micros / 1000;
        conn.hset_multiple::<_, _, _, ()>(
            apikey_key(&hash),
            &[
                ("tenant", tenant_id.to_string()),
                ("name", name.to_string()),
                ("created_ms", created_ms.to_string()),
            ],
        )
        .await?;
        let record = ApiKeyRecord {
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            created_ms,
        };
        Ok(NewApiKey {
            plaintext,
            hash,
            record,
        })
    }

    /// Looks up a presented plaintext key; `None` when it is not a known key.
    pub async fn lookup(&self, plaintext: &str) -> Result<Option<ApiKeyRecord>> {
        self.lookup_hash(&hash_key(plaintext)).await
    }

    /// Looks up a key by its sha256 hex.
    pub async fn lookup_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>> {
        let key = apikey_key(hash);
        let fields: KeyFields = key_fields_cmd(&key)
            .query_async(&mut self.conn.clone())
            .await?;
        key_record(key, fields)
    }

    /// [`ApiKeyStore::lookup`] and [`crate::SessionStore::get`] of session `session_id` in one
    /// Redis round trip, for the calls that name a session: the caller checks the key first
    /// and the session's tenant next, as if they had been two reads.
    pub async fn lookup_with_session(
        &self,
        plaintext: &str,
        session_id: &str,
    ) -> Result<(Option<ApiKeyRecord>, Option<SessionRecord>)> {
        let key = apikey_key(&hash_key(plaintext));
        let session_key = crate::sessions::session_key(session_id);
        let (fields, session): (KeyFields, Vec<String>) = redis::pipe()
            .add_command(key_fields_cmd(&key))
            .hgetall(&session_key)
            .query_async(&mut self.conn.clone())
            .await?;
        let session = match session.is_empty() {
            true => None,
            false => Some(SessionRecord::from_pairs(&session_key, &session)?),
        };
        Ok((key_record(key, fields)?, session))
    }

    /// Deletes a key by its hash; returns whether it existed. Authentication looks every
    /// call's key up in Redis (nothing is cached), so the key stops working at once.
    pub async fn revoke_hash(&self, hash: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let removed: u32 = conn.del(apikey_key(hash)).await?;
        Ok(removed > 0)
    }

    /// Every stored key as `(sha256 hex, record)`, of one tenant or of all, oldest first.
    /// Walks the key space with SCAN: an operator's command, not a request path.
    pub async fn list(&self, tenant_id: Option<&str>) -> Result<Vec<(String, ApiKeyRecord)>> {
        let prefix = apikey_key("");
        let mut hashes: Vec<String> = self
            .conn
            .scan_keys(&format!("{prefix}*"))
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(str::to_string)
            .collect();
        hashes.sort();
        hashes.dedup();
        let mut keys = Vec::with_capacity(hashes.len());
        for hash in hashes {
            // A key revoked between the scan and this read is simply not listed.
            if let Some(rec) = self.lookup_hash(&hash).await?
                && tenant_id.is_none_or(|t| t == rec.tenant_id)
            {
                keys.push((hash, rec));
            }
        }
        keys.sort_by(|a, b| (a.1.created_ms, &a.0).cmp(&(b.1.created_ms, &b.0)));
        Ok(keys)
    }

    /// The one stored key whose sha256 hex starts with `id_prefix` (at least
    /// [`MIN_KEY_ID_LEN`] hex digits, as `list-api-keys` prints them).
    pub async fn find_by_id(&self, id_prefix: &str) -> Result<KeyById> {
        let id = id_prefix.to_ascii_lowercase();
        if id.len() < MIN_KEY_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(KeyById::Malformed);
        }
        let mut found: Vec<_> = self
            .list(None)
            .await?
            .into_iter()
            .filter(|(hash, _)| hash.starts_with(&id))
            .collect();
        Ok(match found.len() {
            0 => KeyById::None,
            1 => {
                let (hash, record) = found.remove(0);
                KeyById::One(hash, record)
            }
            n => KeyById::Ambiguous(n),
        })
    }

    /// Sets the tenant's cap on concurrent (creating + active) sessions, overriding the
    /// server default.
    pub async fn set_max_sessions(&self, tenant_id: &str, max: u32) -> Result<()> {
        self.set_limit(tenant_id, "max_sessions", u64::from(max))
            .await
    }

    /// Sets one of the tenant's limits (`max_sessions`, `max_snapshots`,
    /// `max_snapshot_bytes`), overriding the server default.
    pub async fn set_limit(&self, tenant_id: &str, name: &str, value: u64) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, ()>(limits_key(tenant_id), name, value)
            .await?;
        Ok(())
    }

    /// Sets the tenant's create rate limit (`per_sec` refill, `burst` at most), overriding
    /// the server defaults.
    pub async fn set_create_rate(&self, tenant_id: &str, per_sec: f64, burst: u32) -> Result<()> {
        let mut conn = self.conn.clone();
        conn.hset_multiple::<_, _, _, ()>(
            limits_key(tenant_id),
            &[
                ("create_rate", per_sec.to_string()),
                ("create_burst", burst.to_string()),
            ],
        )
        .await?;
        Ok(())
    }

    /// Takes one of the tenant's create tokens (the tenant's own rate limit if one is set,
    /// else `per_sec` refill and `burst` at most): `None` when taken, else how long until
    /// one is there and the limit that applied. Each tenant has its own bucket, so one
    /// tenant's flood never slows another's creates.
    pub async fn take_create_token(
        &self,
        tenant_id: &str,
        per_sec: f64,
        burst: u32,
    ) -> Result<Option<CreateThrottled>> {
        let (wait_ms, rate, burst): (u64, String, u32) = TAKE_CREATE_TOKEN
            .key(create_bucket_key(tenant_id))
            .key(limits_key(tenant_id))
            .arg(per_sec)
            .arg(burst)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((wait_ms > 0).then(|| CreateThrottled {
            retry_after: std::time::Duration::from_millis(wait_ms),
            per_sec: rate.parse().unwrap_or(per_sec),
            burst,
        }))
    }

    /// Every override the tenant has, sorted by name (`create_burst`, `create_rate`,
    /// `max_sessions`).
    pub async fn tenant_limits(&self, tenant_id: &str) -> Result<Vec<(String, String)>> {
        let mut conn = self.conn.clone();
        let mut all: Vec<(String, String)> = conn.hgetall(limits_key(tenant_id)).await?;
        all.sort();
        Ok(all)
    }

    /// Sets the tenant's default egress policy, or with `None` removes it (the
    /// deployment's default applies again).
    pub async fn set_tenant_egress(
        &self,
        tenant_id: &str,
        policy: Option<&EgressPolicy>,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = tenant_egress_key(tenant_id);
        match policy {
            Some(p) => {
                let json = serde_json::to_string(p).expect("a policy always serializes");
                conn.set::<_, _, ()>(key, json).await?;
            }
            None => conn.del::<_, ()>(key).await?,
        }
        Ok(())
    }

    /// The tenant's default egress policy, if one is set.
    pub async fn tenant_egress(&self, tenant_id: &str) -> Result<Option<EgressPolicy>> {
        let mut conn = self.conn.clone();
        let key = tenant_egress_key(tenant_id);
        let raw: Option<String> = conn.get(&key).await?;
        raw.map(|v| {
            serde_json::from_str(&v).map_err(|e| StoreError::Corrupt {
                key,
                reason: format!("egress policy: {e}"),
            })
        })
        .transpose()
    }

    /// The tenant's override of the concurrent-session cap, if one is set.
    pub async fn max_sessions(&self, tenant_id: &str) -> Result<Option<u32>> {
        let mut conn = self.conn.clone();
        let key = limits_key(tenant_id);
        let raw: Option<String> = conn.hget(&key, "max_sessions").await?;
        raw.map(|v| {
            v.parse().map_err(|_| StoreError::Corrupt {
                key,
                reason: "max_sessions is not a u32".into(),
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
