//! The session calls end to end against a real session-manager process: create, get,
//! list (paging, filters), delete, extend, auth, tenant isolation, quotas, placement
//! failures, usage and the create-api-key command.

mod common;

use std::collections::HashMap;

use capsa_proto::session::v1 as pb;
use capsa_test_support::workspace_binary;
use common::{Harness, create, get, secs};
use prost::Message as _;
use tonic::Code;

#[tokio::test]
async fn create_get_delete_and_extend() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let req = pb::CreateSessionRequest {
        env: HashMap::from([("GREETING".into(), "hi".into())]),
        metadata: HashMap::from([("team".into(), "ml".into())]),
        lifetime: secs(60),
        ..Default::default()
    };
    let s = c
        .create_session(req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(s.status, pb::SessionStatus::Active as i32);
    assert_eq!(
        (s.template.as_str(), s.node_id.as_str()),
        ("default", common::NODE_ID)
    );
    assert!(!s.vm_id.is_empty());
    let lifetime = s.expire_time.unwrap().seconds - s.create_time.unwrap().seconds;
    assert!((59..=61).contains(&lifetime), "{lifetime}");
    // The session env went to the VM's kernels.
    assert_eq!(h.node.state().configured[&s.vm_id]["GREETING"], "hi");
    assert_eq!(h.node.state().acquires[&s.id], 1);

    let got = get(&mut c, &s.id).await;
    assert_eq!(got.metadata["team"], "ml");
    assert_eq!(
        (got.env.len(), got.env_names.as_slice()),
        (0, ["GREETING".to_string()].as_slice())
    );

    let ext = pb::ExtendSessionRequest {
        session_id: s.id.clone(),
        extend_by: secs(120),
    };
    let e = c
        .extend_session(ext)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(
        e.expire_time.unwrap().seconds,
        s.expire_time.unwrap().seconds + 120
    );
    let too_far = pb::ExtendSessionRequest {
        session_id: s.id.clone(),
        extend_by: secs(86_400),
    };
    let err = c.extend_session(too_far).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("extend_by") && err.message().contains("24 h"),
        "{}",
        err.message()
    );

    let del = pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    };
    let d = c
        .delete_session(del.clone())
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(d.status, pb::SessionStatus::Terminated as i32);
    assert_eq!(d.end_reason, pb::EndReason::Deleted as i32);
    assert!(d.end_time.is_some());
    assert_eq!(h.node.state().releases[&s.vm_id], 1);
    assert_eq!(h.node.state().finalized, std::slice::from_ref(&s.id));
    // Idempotent: deleting again returns it unchanged and releases nothing more.
    let again = c
        .delete_session(del)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(again, d);
    assert_eq!(h.node.state().releases[&s.vm_id], 1);
    // Extending an ended session names why it ended.
    let ext = pb::ExtendSessionRequest {
        session_id: s.id.clone(),
        extend_by: secs(10),
    };
    let err = c.extend_session(ext).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("DELETED"), "{}", err.message());
}

#[tokio::test]
async fn list_pages_newest_first_and_filters() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let req = pb::CreateSessionRequest {
            metadata: HashMap::from([(
                "parity".into(),
                (if i % 2 == 0 { "even" } else { "odd" }).into(),
            )]),
            ..Default::default()
        };
        ids.push(
            c.create_session(req)
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap()
                .id,
        );
    }
    c.delete_session(pb::DeleteSessionRequest {
        session_id: ids[0].clone(),
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListSessionsRequest {
            page_size: 3,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = c.list_sessions(req).await.unwrap().into_inner();
        assert!(page.sessions.len() <= 3);
        seen.extend(page.sessions.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    // Sessions created in the same millisecond may swap; the set and count are exact.
    assert_eq!(seen.len(), 7);
    let mut a = seen.clone();
    a.sort();
    newest_first.sort();
    assert_eq!(a, newest_first);

    let req = pb::ListSessionsRequest {
        status: pb::SessionStatus::Terminated as i32,
        ..Default::default()
    };
    let ended = c.list_sessions(req).await.unwrap().into_inner().sessions;
    assert_eq!(
        ended.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [ids[0].as_str()]
    );

    let req = pb::ListSessionsRequest {
        status: pb::SessionStatus::Active as i32,
        metadata: HashMap::from([("parity".into(), "even".into())]),
        ..Default::default()
    };
    let even = c.list_sessions(req).await.unwrap().into_inner().sessions;
    assert_eq!(even.len(), 3, "ids 2, 4, 6 (0 is deleted)");
}

#[tokio::test]
async fn missing_or_wrong_keys_are_unauthenticated() {
    let h = Harness::start(1).await;
    let real = create(&mut h.client(0).await, None).await;
    for auth in [
        None,
        Some("Bearer capsa_nottherightkeyatallxxxxxxxxxxxx"),
        Some("Basic abc"),
        Some("Bearer"),
    ] {
        let mut c = h.client_with(0, auth).await;
        let err = c
            .list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "{auth:?}: {}",
            err.message()
        );
        let err = c
            .create_session(pb::CreateSessionRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = c
            .execute(pb::ExecuteRequest {
                session_id: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        // A session that exists (read in the key's round trip) or a malformed id: the key
        // is what fails, and the session's existence does not show.
        for id in [real.id.as_str(), "has space"] {
            let err = c
                .get_session(pb::GetSessionRequest {
                    session_id: id.into(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "get {id}: {err:?}");
            let err = c
                .execute(pb::ExecuteRequest {
                    session_id: id.into(),
                    code: "1".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "execute {id}: {err:?}");
        }
    }
    assert_eq!(h.node.state().acquires.len(), 1, "only the real session's");
}

#[tokio::test]
async fn another_tenants_session_is_not_found_everywhere() {
    let h = Harness::start(1).await;
    let mut mine = h.client(0).await;
    let s = create(&mut mine, None).await;
    let other_key = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {other_key}"))).await;
    let id = || s.id.clone();
    let codes = vec![
        (
            "get",
            other
                .get_session(pb::GetSessionRequest { session_id: id() })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "delete",
            other
                .delete_session(pb::DeleteSessionRequest { session_id: id() })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "extend",
            other
                .extend_session(pb::ExtendSessionRequest {
                    session_id: id(),
                    extend_by: secs(5),
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "execute",
            other
                .execute(pb::ExecuteRequest {
                    session_id: id(),
                    code: "1".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "list_files",
            other
                .list_files(pb::ListFilesRequest {
                    session_id: id(),
                    path: "/".into(),
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "download",
            other
                .download_file(pb::DownloadFileRequest {
                    session_id: id(),
                    path: "/a".into(),
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "file_info",
            other
                .get_file_info(pb::GetFileInfoRequest {
                    session_id: id(),
                    path: "/a".into(),
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "mkdir",
            other
                .make_directory(pb::MakeDirectoryRequest {
                    session_id: id(),
                    path: "/d".into(),
                    mode: 0,
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "remove",
            other
                .remove_file(pb::RemoveFileRequest {
                    session_id: id(),
                    path: "/a".into(),
                    recursive: false,
                })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "usage",
            other
                .get_usage(pb::GetUsageRequest { session_id: id() })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "get_egress",
            other
                .get_egress_policy(pb::GetEgressPolicyRequest { session_id: id() })
                .await
                .unwrap_err()
                .code(),
        ),
        (
            "update_egress",
            other
                .update_egress_policy(pb::UpdateEgressPolicyRequest {
                    session_id: id(),
                    egress: Some(Default::default()),
                })
                .await
                .unwrap_err()
                .code(),
        ),
    ];
    for (call, code) in codes {
        assert_eq!(code, Code::NotFound, "{call}");
    }
    let header = pb::UploadFileHeader {
        session_id: id(),
        file: Some(capsa_proto::common::v1::UploadHeader {
            path: "/a".into(),
            ..Default::default()
        }),
    };
    let msgs = vec![pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(header)),
    }];
    let err = other
        .upload_file(tokio_stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        other
            .list_sessions(pb::ListSessionsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .sessions
            .is_empty()
    );
    // Still alive for its owner.
    assert_eq!(
        get(&mut mine, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
    assert!(h.node.state().executes.is_empty());
}

#[tokio::test]
async fn quota_caps_concurrent_sessions_per_tenant() {
    let h = Harness::start(1).await;
    h.keys().await.set_max_sessions("t1", 2).await.unwrap();
    let mut c = h.client(0).await;
    let a = create(&mut c, None).await;
    create(&mut c, None).await;
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("limit of 2"), "{}", err.message());
    c.delete_session(pb::DeleteSessionRequest { session_id: a.id })
        .await
        .unwrap();
    create(&mut c, None).await;
    // Other tenants have their own count.
    let k = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {k}"))).await;
    create(&mut other, None).await;
}

#[tokio::test]
async fn a_node_that_cannot_provide_a_vm_ends_the_session_create_failed() {
    let h = Harness::start(1).await;
    h.node.state().fail_acquire = Some("out of memory on the host".into());
    let mut c = h.client(0).await;
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("out of memory on the host"),
        "{}",
        err.message()
    );
    let list = c
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(list.len(), 1);
    let s = &list[0];
    assert_eq!(s.status, pb::SessionStatus::Terminated as i32);
    assert_eq!(s.end_reason, pb::EndReason::CreateFailed as i32);
    assert!(
        s.end_message.contains("out of memory on the host"),
        "{}",
        s.end_message
    );
    // A failed create does not hold quota.
    h.node.state().fail_acquire = None;
    create(&mut c, None).await;
}

#[tokio::test]
async fn no_node_or_full_nodes_are_reported_and_recorded() {
    let h = Harness::start_with(1, false).await;
    let mut c = h.client(0).await;
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("no node"), "{}", err.message());
    common::register(&h.redis, &h.node, 2, 2).await;
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("no node has room"),
        "{}",
        err.message()
    );
    let list = c
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sessions;
    // With no node at all the create is refused before anything is stored; a create that
    // found no room on live nodes is recorded CREATE_FAILED.
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].end_reason, pb::EndReason::CreateFailed as i32);
}

#[tokio::test]
async fn usage_comes_from_metering_after_the_tenant_check() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let u = c
        .get_usage(pb::GetUsageRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (u.session_id.as_str(), u.usage.unwrap().memory_used_bytes),
        (s.id.as_str(), 42)
    );
    let t = c
        .get_tenant_usage(pb::GetTenantUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.tenant_id, "t1");
    assert_eq!((t.active_sessions, t.total_sessions), (1, 1));
    assert_eq!(t.total.unwrap().memory_used_bytes, 7);
}

/// Session env is where users put their secrets: the value reaches the VM, and is then in
/// no reply (create, get, list) and nowhere in Redis, for the whole life of the record.
/// Lua that returns every key of the database with its content.
const READ_EVERY_KEY: &str = "local out = {} \
    for _, k in ipairs(redis.call('KEYS', '*')) do \
      local t = redis.call('TYPE', k).ok table.insert(out, k) \
      if t == 'string' then table.insert(out, redis.call('GET', k)) \
      elseif t == 'hash' then for _, v in ipairs(redis.call('HGETALL', k)) do table.insert(out, v) end \
      elseif t == 'set' then for _, v in ipairs(redis.call('SMEMBERS', k)) do table.insert(out, v) end \
      elseif t == 'zset' then for _, v in ipairs(redis.call('ZRANGE', k, 0, -1)) do table.insert(out, v) end \
      elseif t == 'list' then for _, v in ipairs(redis.call('LRANGE', k, 0, -1)) do table.insert(out, v) end \
      elseif t == 'stream' then for _, e in ipairs(redis.call('XRANGE', k, '-', '+')) do \
        for _, v in ipairs(e[2]) do table.insert(out, v) end end end \
    end return out";

#[tokio::test]
async fn env_values_go_to_the_vm_and_are_never_stored_or_returned() {
    const SECRET: &str = "s3cr3t-value-9f2b7c";
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let req = pb::CreateSessionRequest {
        env: HashMap::from([
            ("OPENAI_API_KEY".into(), SECRET.into()),
            ("A_FLAG".into(), "1".into()),
        ]),
        lifetime: secs(60),
        ..Default::default()
    };
    let created = c.create_session(req).await.unwrap().into_inner();
    let s = created.session.clone().unwrap();
    assert_eq!(
        h.node.state().configured[&s.vm_id]["OPENAI_API_KEY"],
        SECRET
    );
    let got = c
        .get_session(pb::GetSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let listed = c
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    c.delete_session(pb::DeleteSessionRequest {
        session_id: s.id.clone(),
    })
    .await
    .unwrap();
    let ended = get(&mut c, &s.id).await;
    for (what, bytes) in [
        ("create", created.encode_to_vec()),
        ("get", got.encode_to_vec()),
        ("list", listed.encode_to_vec()),
        ("get after delete", ended.encode_to_vec()),
    ] {
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{what} returned the env value"
        );
    }
    assert_eq!(ended.env_names, ["A_FLAG", "OPENAI_API_KEY"]);
    assert!(ended.env.is_empty());
    // Nothing in Redis holds the value: read every key, whatever its type.
    let dump = std::process::Command::new("redis-cli")
        .args(["-u", &h.redis.url(), "eval", READ_EVERY_KEY, "0"])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains(&s.id),
        "the dump must cover the session: {dump}"
    );
    assert!(!dump.contains(SECRET), "redis holds the env value: {dump}");
}

#[tokio::test]
async fn create_api_key_prints_only_a_working_key() {
    let h = Harness::start(1).await;
    let out = std::process::Command::new(workspace_binary("capsa-session-manager"))
        .args([
            "create-api-key",
            "--redis-url",
            &h.redis.url(),
            "--tenant",
            "cli-t",
            "--max-sessions",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.trim();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(key.starts_with("capsa_") && key.len() == 38, "{key}");
    let mut c = h.client_with(0, Some(&format!("Bearer {key}"))).await;
    create(&mut c, None).await;
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "--max-sessions 1 applies"
    );
}

/// Runs a session-manager admin command against the harness' Redis.
#[tokio::test]
async fn api_keys_are_listed_by_id_and_a_revoked_key_stops_working_at_once() {
    let h = Harness::start(1).await;
    let create_key = |tenant: &str, name: &str| {
        let out = h.admin(&["create-api-key", "--tenant", tenant, "--name", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let ci_key = create_key("acme", "ci");
    let laptop_key = create_key("acme", "laptop");
    create_key("other", "theirs");

    let out = h.admin(&["list-api-keys", "--tenant", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert_eq!(
        (rows[0][1], rows[0][3]),
        ("acme", "ci"),
        "oldest first: {listing}"
    );
    assert_eq!((rows[1][1], rows[1][3]), ("acme", "laptop"), "{listing}");
    assert!(
        rows[0][2].ends_with('Z'),
        "RFC 3339 creation time: {listing}"
    );
    assert!(
        !listing.contains(&ci_key) && !listing.contains(&ci_key["capsa_".len()..]),
        "the listing must not show keys: {listing}"
    );
    let all = String::from_utf8(h.admin(&["list-api-keys"]).stdout).unwrap();
    // The harness' own key, and the three above.
    assert_eq!(all.lines().count(), 4, "{all}");

    let mut ci = h.client_with(0, Some(&format!("Bearer {ci_key}"))).await;
    let mut laptop = h
        .client_with(0, Some(&format!("Bearer {laptop_key}")))
        .await;
    let s = create(&mut ci, None).await;

    // Bad ids change nothing.
    for (id, expect) in [("zz", "at least 8 hex"), ("0000000000", "no api key")] {
        let out = h.admin(&["revoke-api-key", "--id", id]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{id}: {err}");
    }
    let ci_id = rows[0][0];
    let out = h.admin(&["revoke-api-key", "--id", &ci_id[..10]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("revoked {ci_id}  acme  ci")
    );

    let err = ci
        .get_session(pb::GetSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // The tenant's other key, and its session, are untouched.
    assert_eq!(get(&mut laptop, &s.id).await.id, s.id);
    let again = h.admin(&["revoke-api-key", "--id", ci_id]);
    assert_eq!(again.status.code(), Some(1), "a revoked key is gone");
    let listing =
        String::from_utf8(h.admin(&["list-api-keys", "--tenant", "acme"]).stdout).unwrap();
    assert_eq!(listing.lines().count(), 1, "{listing}");
}

/// A caller that gives up on CreateSession (its deadline) never learns the session's id:
/// the creation still runs to its end on its own, then rolls back: the session ends
/// CREATE_FAILED, its VM is released once, and the tenant's quota is free again.
#[tokio::test]
async fn a_create_whose_caller_gives_up_rolls_back_on_its_own() {
    let h = Harness::start(1).await;
    h.keys().await.set_max_sessions("t1", 1).await.unwrap();
    h.node.state().acquire_delay = Some(std::time::Duration::from_secs(2));
    let mut c = h.client(0).await;
    let mut req = tonic::Request::new(pb::CreateSessionRequest::default());
    req.set_timeout(std::time::Duration::from_millis(300));
    let err = c.create_session(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );

    let store = h.store().await;
    let page = store
        .list("t1", &Default::default(), 10, None)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1);
    let id = page.sessions[0].id.clone();
    capsa_test_support::eventually!(
        store.get(&id).await.unwrap().unwrap().status == capsa_store::SessionStatus::Terminated
    );
    let rec = store.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.end_reason, Some(capsa_store::EndReason::CreateFailed));
    assert!(
        rec.end_message.contains("caller went away"),
        "{}",
        rec.end_message
    );
    assert_eq!(h.node.state().acquires[&id], 1);
    assert_eq!(
        h.node.state().releases.get(&rec.vm_id),
        Some(&1),
        "the vm goes back"
    );

    // The quota (1) is free again.
    h.node.state().acquire_delay = None;
    let s = create(&mut c, None).await;
    assert_eq!(s.status, pb::SessionStatus::Active as i32);
}

/// One tenant flooding CreateSession is slowed down alone: past its burst it gets
/// RESOURCE_EXHAUSTED with a RetryInfo saying when to come back, nothing is recorded for the
/// refused creates, and another tenant creates as usual meanwhile.
#[tokio::test]
async fn a_tenant_creating_too_fast_is_rate_limited_alone_with_retry_info() {
    let mut h = Harness::start(0).await;
    h.create_limit = (1.0, 3);
    h.add_replica().await;
    let mut flooder = h.client(0).await;
    let other_key = h.new_key("t2").await;
    let mut other = h.client_with(0, Some(&format!("Bearer {other_key}"))).await;

    for _ in 0..3 {
        create(&mut flooder, None).await;
    }
    let err = flooder
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("faster than its limit") && err.message().contains("retry in"),
        "{}",
        err.message()
    );
    let details = capsa_grpc::error::RpcStatus::decode(err.details()).unwrap();
    assert_eq!(
        details.details[0].type_url,
        capsa_grpc::error::RETRY_INFO_TYPE_URL
    );
    let retry = capsa_grpc::error::RetryInfo::decode(details.details[0].value.as_slice())
        .unwrap()
        .retry_delay
        .unwrap();
    let retry = capsa_proto::time::from_duration(&retry).unwrap();
    assert!(
        retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_secs(1),
        "{retry:?}"
    );
    // The other tenant is not slowed down by the flood.
    for _ in 0..3 {
        create(&mut other, None).await;
    }
    // Refused creates left nothing behind.
    let store = h.store().await;
    let listed = store
        .list("t1", &Default::default(), 100, None)
        .await
        .unwrap();
    assert_eq!(listed.sessions.len(), 3);
    // Once the retry delay has passed, the flooder may create again.
    tokio::time::sleep(retry).await;
    create(&mut flooder, None).await;
}

/// Redis runs with a memory limit and `noeviction`: at the limit, new sessions are refused
/// with UNAVAILABLE naming the store, and nothing that exists is evicted or lost.
#[tokio::test]
async fn a_full_redis_refuses_new_sessions_and_evicts_nothing() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let redis_cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &h.redis.url()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(
        redis_cli(&["CONFIG", "GET", "maxmemory-policy"]),
        "maxmemory-policy\nnoeviction"
    );
    // Redis at its limit: any write that needs memory is refused.
    assert_eq!(redis_cli(&["CONFIG", "SET", "maxmemory", "1"]), "OK");
    let err = c
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("session store failed"),
        "{}",
        err.message()
    );
    // Reads still work, and the existing session is intact.
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
    assert_eq!(redis_cli(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    assert_eq!(
        create(&mut c, None).await.status,
        pb::SessionStatus::Active as i32
    );
    assert_eq!(
        get(&mut c, &s.id).await.status,
        pb::SessionStatus::Active as i32
    );
}
