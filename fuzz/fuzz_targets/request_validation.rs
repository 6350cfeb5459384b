//! session-manager's request validation on arbitrary public requests: the first byte picks
//! the request type, the rest is decoded as that protobuf message. Validation must never
//! panic, and whatever it accepts must be within the contract's limits
//! (`capsa_proto::limits` and the bounds session.proto states).
#![no_main]

use std::time::Duration;

use capsa_proto::common::v1::Language;
use capsa_proto::limits::{
    DEFAULT_EXEC_TIMEOUT, MAX_CHUNK_BYTES, MAX_CODE_BYTES, MAX_ENV_ENTRIES, MAX_ENV_NAME_BYTES,
    MAX_ENV_VALUE_BYTES, MAX_EXEC_TIMEOUT, MAX_OUTPUT_BYTES, MAX_PATH_BYTES,
};
use capsa_proto::session::v1 as pb;
use capsa_session_manager::validate;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => create(bytes),
        1 => execute(bytes),
        2 => list(bytes),
        3 => extend(bytes),
        4 => upload(bytes),
        5 => make_directory(bytes),
        6 => remove_file(bytes),
        _ => session_id_only(bytes),
    }
});

fn create(bytes: &[u8]) {
    let Ok(req) = pb::CreateSessionRequest::decode(bytes) else {
        return;
    };
    let Ok(spec) = validate::create(&req) else {
        return;
    };
    // session.proto: template [a-z0-9-]{1,63}, vcpus 0..=8, memory 0 or 128..=8192,
    // lifetime 10 s to 24 h, at most 64 metadata entries.
    assert!((1..=63).contains(&spec.template.len()), "{spec:?}");
    assert!(
        spec.template
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    );
    assert!(spec.vcpus <= 8);
    assert!(spec.memory_mib == 0 || (128..=8192).contains(&spec.memory_mib));
    assert!(
        spec.lifetime >= Duration::from_secs(10) && spec.lifetime <= Duration::from_secs(86400),
        "{:?}",
        spec.lifetime
    );
    assert_env(spec.env.iter());
    assert_eq!(spec.env.len(), req.env.len());
    assert!(spec.metadata.len() <= 64);
    for (k, v) in &spec.metadata {
        assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
    }
}

fn execute(bytes: &[u8]) {
    let Ok(req) = pb::ExecuteRequest::decode(bytes) else {
        return;
    };
    let Ok(spec) = validate::execute(&req) else {
        return;
    };
    assert_session_id(&req.session_id);
    assert!(matches!(
        Language::try_from(spec.language),
        Ok(Language::Python | Language::Shell)
    ));
    assert!(spec.code.len() <= MAX_CODE_BYTES);
    assert_eq!(spec.code, req.code);
    let timeout = spec
        .timeout
        .as_ref()
        .and_then(capsa_proto::time::from_duration)
        .expect("the spec always carries a valid timeout");
    assert!(
        !timeout.is_zero() && timeout <= MAX_EXEC_TIMEOUT,
        "{timeout:?}"
    );
    if req.timeout.is_none() {
        assert_eq!(timeout, DEFAULT_EXEC_TIMEOUT);
    }
    assert!(spec.max_output_bytes <= MAX_OUTPUT_BYTES);
    assert_env(spec.env.iter());
    assert_eq!(spec.env, req.env);
    if !spec.cwd.is_empty() {
        assert_path(&spec.cwd);
    }
}

fn list(bytes: &[u8]) {
    let Ok(req) = pb::ListSessionsRequest::decode(bytes) else {
        return;
    };
    let Ok((filter, page_size, after)) = validate::list(&req) else {
        return;
    };
    // session.proto: page_size 1 to 1000 (0 means 100), a status of the enum.
    assert!((1..=1000).contains(&page_size), "{page_size}");
    assert!(pb::SessionStatus::try_from(req.status).is_ok());
    assert!(filter.metadata.len() <= 64);
    assert_eq!(after.is_some(), !req.page_token.is_empty());
}

fn extend(bytes: &[u8]) {
    let Ok(req) = pb::ExtendSessionRequest::decode(bytes) else {
        return;
    };
    let Ok(by) = validate::extend_by(req.extend_by.as_ref()) else {
        return;
    };
    // session.proto: 1 s to 24 h.
    assert!(
        by >= Duration::from_secs(1) && by <= Duration::from_secs(86400),
        "{by:?}"
    );
    if validate::session_id(&req.session_id).is_ok() {
        assert_session_id(&req.session_id);
    }
}

fn upload(bytes: &[u8]) {
    use pb::upload_file_request::Part;
    let Ok(req) = pb::UploadFileRequest::decode(bytes) else {
        return;
    };
    match req.part {
        Some(Part::Header(h)) if validate::upload_header(&h).is_ok() => {
            assert_session_id(&h.session_id);
            let file = h.file.expect("an accepted header names a file");
            assert_path(&file.path);
            assert!(file.mode <= 0o7777);
        }
        Some(Part::Data(d)) => {
            assert_eq!(validate::chunk(d.len()).is_ok(), d.len() <= MAX_CHUNK_BYTES);
        }
        Some(Part::Header(_)) | None => {}
    }
}

fn make_directory(bytes: &[u8]) {
    let Ok(req) = pb::MakeDirectoryRequest::decode(bytes) else {
        return;
    };
    if validate::session_id(&req.session_id).is_ok()
        && validate::path("path", &req.path).is_ok()
        && validate::mode("mode", req.mode).is_ok()
    {
        assert_session_id(&req.session_id);
        assert_path(&req.path);
        assert!(req.mode <= 0o7777);
    }
}

fn remove_file(bytes: &[u8]) {
    let Ok(req) = pb::RemoveFileRequest::decode(bytes) else {
        return;
    };
    if validate::session_id(&req.session_id).is_ok() && validate::path("path", &req.path).is_ok() {
        assert_session_id(&req.session_id);
        assert_path(&req.path);
    }
}

fn session_id_only(bytes: &[u8]) {
    let Ok(req) = pb::GetSessionRequest::decode(bytes) else {
        return;
    };
    if validate::session_id(&req.session_id).is_ok() {
        assert_session_id(&req.session_id);
    }
}

/// Session ids are what the API hands out: non-empty, URL- and Redis-key-safe, and small
/// (the largest public Execute is sized with a 128-byte id).
fn assert_session_id(id: &str) {
    assert!((1..=128).contains(&id.len()), "{id:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{id:?}"
    );
}

fn assert_path(p: &str) {
    assert!(
        p.starts_with('/') && p.len() <= MAX_PATH_BYTES && !p.contains('\0'),
        "{p:?}"
    );
}

fn assert_env<'a>(env: impl ExactSizeIterator<Item = (&'a String, &'a String)>) {
    assert!(env.len() <= MAX_ENV_ENTRIES);
    for (k, v) in env {
        let mut name = k.bytes();
        assert!(
            name.next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name.all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{k:?}"
        );
        assert!(k.len() <= MAX_ENV_NAME_BYTES, "{k:?}");
        assert!(v.len() <= MAX_ENV_VALUE_BYTES && !v.contains('\0'));
    }
}
