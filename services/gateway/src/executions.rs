//! Records of `/execute_async` in Redis, so that any replica answers any poll. One key per
//! execution, `{capsa}:gateway:execution:<id>`, holding JSON, with a TTL. The record keeps the
//! sha256 of the API key that started it: a poll with another key is told 404, as is a poll
//! for an id that never existed or has expired. The replica that started an execution runs it
//! and writes its outcome; if that replica dies first, the record says so once its deadline
//! has passed instead of staying "running" until it expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_store::Connection;
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model::ExecutionView;

const PREFIX: &str = "{capsa}:gateway:execution:";

/// How long past its timeout an execution may take before its record calls it lost: the
/// time to reach the VM and to store the outcome.
const DEADLINE_MARGIN: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// sha256 of the API key that started it.
    pub owner: String,
    pub session_id: String,
    pub language: String,
    pub created_at_ms: i64,
    /// Past this, an incomplete record is reported as lost.
    pub deadline_ms: i64,
    /// Set once the execution ended (or failed to run).
    pub result: Option<ExecutionView>,
}

/// `GET /v1/executions/{id}`: the SDK reads `is_complete`, `serialized_stdout`,
/// `serialized_stderr`, `cpu_time`, `execution_time` and `created_at`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecutionRecordView {
    pub id: String,
    pub task_id: String,
    pub session_id: String,
    pub language: String,
    /// `running`, then the execution's own status (`ok`, `error`, `timeout`, ...), `failed`
    /// when it could not run, or `lost` when the replica running it stopped.
    pub status: String,
    pub is_complete: bool,
    /// RFC 3339.
    pub created_at: String,
    /// stdout as text (InstaVM's name; not encoded).
    pub serialized_stdout: String,
    pub serialized_stderr: String,
    pub stdout: String,
    pub stderr: String,
    pub output: String,
    pub exit_code: Option<i32>,
    pub execution_time: Option<f64>,
    pub cpu_time: Option<f64>,
    pub error: Option<crate::model::ErrorView>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Record {
    pub fn new(
        id: String,
        owner: String,
        session_id: String,
        language: &str,
        timeout: Duration,
    ) -> Self {
        let now = now_ms();
        Record {
            id,
            owner,
            session_id,
            language: language.to_owned(),
            created_at_ms: now,
            deadline_ms: now + (timeout + DEADLINE_MARGIN).as_millis() as i64,
            result: None,
        }
    }

    /// What a poll at `now_ms` sees.
    pub fn view(&self, now_ms: i64) -> ExecutionRecordView {
        let lost = self.result.is_none() && now_ms > self.deadline_ms;
        let result = self.result.clone().or_else(|| {
            lost.then(|| ExecutionView {
                status: "lost".into(),
                stderr: "the gateway replica running this execution stopped before it finished; \
                         its outcome is unknown"
                    .into(),
                exit_code: -1,
                ..Default::default()
            })
        });
        let created_at = prost_types::Timestamp {
            seconds: self.created_at_ms.div_euclid(1000),
            nanos: (self.created_at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }
        .to_string();
        let r = result.as_ref();
        ExecutionRecordView {
            id: self.id.clone(),
            task_id: self.id.clone(),
            session_id: self.session_id.clone(),
            language: self.language.clone(),
            status: r.map_or_else(|| "running".to_owned(), |r| r.status.clone()),
            is_complete: r.is_some(),
            created_at,
            serialized_stdout: r.map(|r| r.stdout.clone()).unwrap_or_default(),
            serialized_stderr: r.map(|r| r.stderr.clone()).unwrap_or_default(),
            stdout: r.map(|r| r.stdout.clone()).unwrap_or_default(),
            stderr: r.map(|r| r.stderr.clone()).unwrap_or_default(),
            output: r.map(|r| r.output.clone()).unwrap_or_default(),
            exit_code: r.map(|r| r.exit_code),
            execution_time: r.map(|r| r.execution_time),
            cpu_time: r.map(|r| r.cpu_time),
            error: r.and_then(|r| r.error.clone()),
        }
    }
}

/// The Redis side; connects on first use (`connect` at start-up fails fast instead).
pub struct Executions {
    url: String,
    conn: OnceCell<Connection>,
    ttl: Duration,
}

impl Executions {
    pub fn new(url: String, ttl: Duration) -> Self {
        Executions {
            url,
            conn: OnceCell::new(),
            ttl,
        }
    }

    pub async fn connect(&self) -> Result<(), redis::RedisError> {
        self.conn().await.map(drop)
    }

    async fn conn(&self) -> Result<Connection, redis::RedisError> {
        self.conn
            .get_or_try_init(|| async {
                capsa_store::connect(&self.url).await.map_err(|e| match e {
                    capsa_store::StoreError::Redis(e) => e,
                    other => redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "connect",
                        other.to_string(),
                    )),
                })
            })
            .await
            .cloned()
    }

    /// Stores a new record (`NX`: ids are random, a clash would be a bug).
    pub async fn insert(&self, record: &Record) -> Result<(), ApiError> {
        let json = serde_json::to_string(record).map_err(|e| ApiError::Internal(e.to_string()))?;
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(self.ttl.as_secs()));
        let stored: bool = self
            .conn()
            .await?
            .set_options(format!("{PREFIX}{}", record.id), json, opts)
            .await?;
        if !stored {
            return Err(ApiError::Internal(format!(
                "execution id {} exists",
                record.id
            )));
        }
        Ok(())
    }

    /// Writes the outcome, if the record has not expired meanwhile (`XX`).
    pub async fn complete(&self, record: &Record) -> Result<(), ApiError> {
        let json = serde_json::to_string(record).map_err(|e| ApiError::Internal(e.to_string()))?;
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::XX)
            .with_expiration(redis::SetExpiry::EX(self.ttl.as_secs()));
        let _: Option<String> = self
            .conn()
            .await?
            .set_options(format!("{PREFIX}{}", record.id), json, opts)
            .await?;
        Ok(())
    }

    /// The record of `id` if `owner` started it; 404 for anything else.
    pub async fn get(&self, id: &str, owner: &str) -> Result<Record, ApiError> {
        let not_found = || ApiError::NotFound(format!("execution {id} not found"));
        // Ids are uuids: anything else cannot exist, and is never used in a key.
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(not_found());
        }
        let json: Option<String> = self.conn().await?.get(format!("{PREFIX}{id}")).await?;
        let record: Record = match json {
            Some(j) => serde_json::from_str(&j).map_err(|e| ApiError::Internal(e.to_string()))?,
            None => return Err(not_found()),
        };
        if record.owner != owner {
            return Err(not_found());
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_running_then_its_outcome_or_lost_past_its_deadline() {
        let mut r = Record::new(
            "id".into(),
            "owner".into(),
            "s".into(),
            "python",
            Duration::from_secs(10),
        );
        let v = r.view(r.created_at_ms + 1000);
        assert_eq!((v.status.as_str(), v.is_complete), ("running", false));
        assert!(v.created_at.ends_with('Z'), "{}", v.created_at);
        let lost = r.view(r.deadline_ms + 1);
        assert_eq!((lost.status.as_str(), lost.is_complete), ("lost", true));
        r.result = Some(ExecutionView {
            stdout: "42\n".into(),
            status: "ok".into(),
            success: true,
            ..Default::default()
        });
        let done = r.view(r.deadline_ms + 1);
        assert_eq!(done.status, "ok");
        assert_eq!(done.serialized_stdout, "42\n");
        assert_eq!(done.exit_code, Some(0));
    }
}
