//! Listing a tenant's sessions: newest first from the tenant index zset, filtered, paged
//! with an opaque cursor (create time + id, so sessions created in the same millisecond
//! still page exactly once).

use std::collections::BTreeMap;

use redis::AsyncCommands as _;

use super::{SessionRecord, SessionStatus, SessionStore, session_key, tenant_index_key};
use crate::Result;

/// Filters of [`SessionStore::list`]: all must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<SessionStatus>,
    pub metadata: BTreeMap<String, String>,
}

/// Most bytes of session records (field names and values as stored) one page holds.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// Position after the last session of a page: its create time and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub create_ms: i64,
    pub id: String,
}

impl Cursor {
    /// The opaque page token for this position.
    pub fn to_token(&self) -> String {
        hex::encode(format!("v1:{}:{}", self.create_ms, self.id))
    }

    /// Parses a token made by [`Cursor::to_token`]; `None` for anything else.
    pub fn from_token(token: &str) -> Option<Cursor> {
        let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
        let rest = raw.strip_prefix("v1:")?;
        let (score, id) = rest.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        Some(Cursor {
            create_ms: score.parse().ok()?,
            id: id.to_string(),
        })
    }
}

/// A page of [`SessionStore::list`].
#[derive(Debug)]
pub struct ListPage {
    pub sessions: Vec<SessionRecord>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}
impl SessionStore {
    /// One page of the tenant's sessions, newest first, that match `filter`, starting
    /// after `after`. Scans the tenant index in batches, so filters that match little
    /// cost more round trips but never unbounded memory. A page also ends before it holds
    /// more than [`MAX_PAGE_BYTES`] of records (at least one record), so sessions with
    /// large metadata make shorter pages rather than a reply of any size.
    pub async fn list(
        &self,
        tenant: &str,
        filter: &ListFilter,
        page_size: usize,
        after: Option<&Cursor>,
    ) -> Result<ListPage> {
        const BATCH: usize = 256;
        let index = tenant_index_key(tenant);
        let mut conn = self.conn.clone();
        let max = after
            .map(|c| c.create_ms.to_string())
            .unwrap_or_else(|| "+inf".into());
        let mut offset = 0usize;
        let mut out: Vec<SessionRecord> = Vec::with_capacity(page_size + 1);
        let mut page_bytes = 0usize;
        let mut full_by_bytes = false;
        'scan: loop {
            let entries: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(offset)
                .arg(BATCH)
                .query_async(&mut conn)
                .await?;
            if entries.is_empty() {
                break;
            }
            offset += entries.len();
            let mut pipe = redis::pipe();
            for (id, _) in &entries {
                pipe.hgetall(session_key(id));
            }
            let hashes: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
            let mut gone = Vec::new();
            for ((id, score), flat) in entries.iter().zip(hashes) {
                // Equal scores come in reverse id order, so a cursor's tie-breaker is the id.
                if let Some(c) = after
                    && *score as i64 == c.create_ms
                    && *id >= c.id
                {
                    continue;
                }
                if flat.is_empty() {
                    gone.push(id.clone());
                    continue;
                }
                let rec = SessionRecord::from_pairs(&session_key(id), &flat)?;
                if filter.status.is_some_and(|s| s != rec.status)
                    || !filter
                        .metadata
                        .iter()
                        .all(|(k, v)| rec.metadata.get(k) == Some(v))
                {
                    continue;
                }
                let size: usize = flat.iter().map(String::len).sum();
                if !out.is_empty() && page_bytes + size > MAX_PAGE_BYTES {
                    full_by_bytes = true;
                    break 'scan;
                }
                page_bytes += size;
                out.push(rec);
                if out.len() > page_size {
                    break;
                }
            }
            if !gone.is_empty() {
                // Retention ran out for these; the index forgets them too.
                conn.zrem::<_, _, ()>(&index, &gone).await?;
                offset -= gone.len();
            }
            if out.len() > page_size {
                break 'scan;
            }
        }
        let next = if out.len() > page_size || full_by_bytes {
            out.truncate(page_size);
            out.last().map(|r| Cursor {
                create_ms: r.create_ms,
                id: r.id.clone(),
            })
        } else {
            None
        };
        Ok(ListPage {
            sessions: out,
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let c = Cursor {
            create_ms: 1_700_000_000_123,
            id: "abc".into(),
        };
        assert_eq!(Cursor::from_token(&c.to_token()), Some(c));
        for bad in [
            "",
            "zz",
            &hex::encode("v2:1:a"),
            &hex::encode("v1:x:a"),
            &hex::encode("v1:1:"),
        ] {
            assert_eq!(Cursor::from_token(bad), None, "{bad}");
        }
    }
}
