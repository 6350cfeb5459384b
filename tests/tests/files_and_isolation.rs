//! Files through the public API on real VMs, and isolation between concurrent sessions.

use capsa_e2e::exec::{python, shell};
use capsa_e2e::{Stack, StackOptions};
use capsa_proto::common::v1::UploadHeader;
use capsa_proto::session::v1::{
    CreateSessionRequest, DownloadFileRequest, GetFileInfoRequest, ListFilesRequest,
    UploadFileHeader, UploadFileRequest, download_file_response, upload_file_request::Part,
};
use sha2::{Digest as _, Sha256};

const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes (xorshift), so no 200 MiB buffer is ever held.
fn chunk(seed: &mut u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test]
async fn a_200_mib_file_goes_up_and_comes_back_identical() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut c = stack.client(0).await;
    let sid = capsa_e2e::create_default_session(&mut c).await.id;

    let total = 200 * MIB;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let producer = tokio::spawn({
        let sid = sid.clone();
        async move {
            let mut hasher = Sha256::new();
            let header = UploadFileHeader {
                session_id: sid,
                file: Some(UploadHeader {
                    path: "/root/big.bin".into(),
                    mode: 0o600,
                    ..Default::default()
                }),
            };
            tx.send(UploadFileRequest {
                part: Some(Part::Header(header)),
            })
            .await
            .unwrap();
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..total / MIB {
                let data = chunk(&mut seed, MIB);
                hasher.update(&data);
                tx.send(UploadFileRequest {
                    part: Some(Part::Data(data.into())),
                })
                .await
                .unwrap();
            }
            hex::encode(hasher.finalize())
        }
    });
    let result = c
        .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("upload")
        .into_inner()
        .result
        .unwrap();
    let sent_sha = producer.await.unwrap();
    assert_eq!(result.sha256, sent_sha);
    let info = result.info.unwrap();
    assert_eq!(info.size, total as u64);
    assert_eq!(info.mode, 0o600);

    // The guest sees the same bytes.
    let out = shell(&mut c, &sid, "sha256sum /root/big.bin | cut -d' ' -f1").await;
    assert_eq!(out.stdout_text().trim(), sent_sha);

    let mut stream = c
        .download_file(DownloadFileRequest {
            session_id: sid.clone(),
            path: "/root/big.bin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut hasher = Sha256::new();
    let mut got = 0usize;
    let mut saw_info = false;
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.part.unwrap() {
            download_file_response::Part::Info(i) => {
                assert!(!saw_info && got == 0, "info comes first, once");
                saw_info = true;
                assert_eq!(i.size, total as u64);
            }
            download_file_response::Part::Data(d) => {
                assert!(d.len() <= MIB, "chunks are at most 1 MiB");
                got += d.len();
                hasher.update(&d);
            }
        }
    }
    assert_eq!(got, total);
    assert_eq!(hex::encode(hasher.finalize()), sent_sha);

    let listed = c
        .list_files(ListFilesRequest {
            session_id: sid.clone(),
            path: "/root".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .files
            .iter()
            .any(|f| f.name == "big.bin" && f.size == total as u64)
    );
    let missing = c
        .get_file_info(GetFileInfoRequest {
            session_id: sid,
            path: "/root/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn ten_concurrent_sessions_see_only_their_own_state() {
    let stack = Stack::start(StackOptions {
        warm: 2,
        ..Default::default()
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let mut c = stack.client(0).await;
        tasks.push(tokio::spawn(async move {
            let req = CreateSessionRequest {
                memory_mib: 256,
                ..Default::default()
            };
            let sid = c
                .create_session(req)
                .await
                .expect("create")
                .into_inner()
                .session
                .unwrap()
                .id;
            let out = python(
                &mut c,
                &sid,
                &format!("secret = {i}\nopen('/tmp/mine', 'w').write('{i}')"),
            )
            .await;
            assert!(out.errors.is_empty(), "{out:?}");
            (c, sid)
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(t.await.unwrap());
    }
    for (i, (c, sid)) in sessions.iter_mut().enumerate() {
        let out = python(c, sid, "print(secret, open('/tmp/mine').read())").await;
        assert_eq!(
            out.stdout_text(),
            format!("{i} {i}\n"),
            "session {i} sees another's state"
        );
        let out = shell(c, sid, "ls /tmp").await;
        assert_eq!(out.stdout_text().matches("mine").count(), 1);
    }
    let ids: std::collections::HashSet<_> = sessions.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(ids.len(), 10);
}
