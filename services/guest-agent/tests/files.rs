//! Files through the real gRPC API: round trips (one of 1 GiB, streamed both ways),
//! modes, no_overwrite, listing, mkdir, remove and bad input.

mod common;

use bytes::Bytes;
use capsa_proto::agent::v1 as pb;
use capsa_proto::agent::v1::agent_service_client::AgentServiceClient;
use capsa_proto::common::v1 as cm;
use common::Agent;
use pb::upload_file_request::Part;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

fn header(path: &str, mode: u32, no_overwrite: bool) -> pb::UploadFileRequest {
    pb::UploadFileRequest {
        part: Some(Part::Header(cm::UploadHeader {
            path: path.into(),
            mode,
            no_overwrite,
            size: None,
        })),
    }
}

fn data(b: impl Into<Bytes>) -> pb::UploadFileRequest {
    pb::UploadFileRequest {
        part: Some(Part::Data(b.into())),
    }
}

async fn upload(
    c: &mut AgentServiceClient<Channel>,
    msgs: Vec<pb::UploadFileRequest>,
) -> Result<cm::UploadResult, tonic::Status> {
    Ok(c.upload_file(futures::stream::iter(msgs))
        .await?
        .into_inner()
        .result
        .unwrap())
}

/// Downloads `path`, hashing as it goes; returns (info, size, sha256 hex).
async fn download(
    c: &mut AgentServiceClient<Channel>,
    path: &str,
) -> Result<(cm::FileInfo, u64, String), tonic::Status> {
    let mut stream = c
        .download_file(pb::DownloadFileRequest { path: path.into() })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("info first");
    let Some(pb::download_file_response::Part::Info(info)) = first.part else {
        panic!("info must come first")
    };
    let (mut size, mut hasher) = (0u64, Sha256::new());
    while let Some(msg) = stream.message().await? {
        let Some(pb::download_file_response::Part::Data(d)) = msg.part else {
            panic!("only one info")
        };
        assert!(d.len() <= 1024 * 1024, "chunk of {}", d.len());
        size += d.len() as u64;
        hasher.update(&d);
    }
    Ok((info, size, hex::encode(hasher.finalize())))
}

#[tokio::test]
async fn a_small_file_round_trips_with_its_mode_and_parents() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let path = agent.dir.path().join("a/b/c.txt").display().to_string();
    let r = upload(
        &mut c,
        vec![header(&path, 0o600, false), data("hello "), data("world")],
    )
    .await
    .unwrap();
    assert_eq!(r.sha256, hex::encode(Sha256::digest(b"hello world")));
    let info = r.info.unwrap();
    assert_eq!(
        (info.size, info.mode, info.name.as_str()),
        (11, 0o600, "c.txt")
    );
    assert_eq!(info.r#type(), cm::FileType::Regular);
    assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
    let (dinfo, size, sha) = download(&mut c, &path).await.unwrap();
    assert_eq!((dinfo.size, size, sha), (11, 11, r.sha256));
    // Default mode, and the file is replaced by default.
    let r = upload(&mut c, vec![header(&path, 0, false), data("v2")])
        .await
        .unwrap();
    assert_eq!(
        (r.info.as_ref().unwrap().mode, r.info.unwrap().size),
        (0o644, 2)
    );
    // An empty file is fine.
    let empty = agent.dir.path().join("empty").display().to_string();
    assert_eq!(
        upload(&mut c, vec![header(&empty, 0o755, false)])
            .await
            .unwrap()
            .info
            .unwrap()
            .size,
        0
    );
    assert_eq!(download(&mut c, &empty).await.unwrap().1, 0);
}

#[tokio::test]
async fn a_gibibyte_streams_in_and_out() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let path = agent.dir.path().join("big.bin").display().to_string();
    const CHUNKS: u64 = 1024; // 1 GiB in 1 MiB chunks, made on the fly, never held whole
    // Every chunk differs in its first 8 bytes, so a dropped or repeated chunk shows.
    fn chunk(i: u64) -> Vec<u8> {
        let mut c: Vec<u8> = (0..1024 * 1024).map(|j| (j * 31 % 251) as u8).collect();
        c[..8].copy_from_slice(&i.to_le_bytes());
        c
    }
    let mut expected = Sha256::new();
    for i in 0..CHUNKS {
        expected.update(chunk(i));
    }
    let expected = hex::encode(expected.finalize());
    let stream = futures::stream::iter(
        std::iter::once(header(&path, 0, false)).chain((0..CHUNKS).map(|i| data(chunk(i)))),
    );
    let r = c
        .upload_file(stream)
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(r.sha256, expected);
    assert_eq!(r.info.unwrap().size, CHUNKS * 1024 * 1024);
    let (_, size, sha) = download(&mut c, &path).await.unwrap();
    assert_eq!((size, sha), (CHUNKS * 1024 * 1024, expected));
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn no_overwrite_refuses_an_existing_file() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let path = agent.dir.path().join("keep.txt").display().to_string();
    upload(&mut c, vec![header(&path, 0, true), data("first")])
        .await
        .unwrap();
    let err = upload(&mut c, vec![header(&path, 0, true), data("second")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    let left: Vec<_> = std::fs::read_dir(agent.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().starts_with(".capsa-upload")),
        "{left:?}"
    );
}

#[tokio::test]
async fn bad_paths_and_bad_streams_are_rejected() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let long = format!("/{}", "a".repeat(5000));
    for bad in ["relative.txt", "/nul\0byte", long.as_str(), ""] {
        let err = upload(&mut c, vec![header(bad, 0, false), data("x")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(err.message().contains("`path`"), "{}", err.message());
        let err = c
            .get_file_info(pb::GetFileInfoRequest { path: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = download(&mut c, bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
    let path = agent.dir.path().join("x").display().to_string();
    let err = upload(&mut c, vec![data("no header"), header(&path, 0, false)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = upload(
        &mut c,
        vec![header(&path, 0, false), data("a"), header(&path, 0, false)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        !std::path::Path::new(&path).exists(),
        "a rejected upload leaves no file"
    );
    let err = upload(
        &mut c,
        vec![header(&path, 0, false), data(vec![0u8; 1024 * 1024 + 1])],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = upload(&mut c, vec![header(&path, 0o20000, false)])
        .await
        .unwrap_err();
    assert!(err.message().contains("`mode`"), "{}", err.message());
    let missing = agent.dir.path().join("missing").display().to_string();
    assert_eq!(
        download(&mut c, &missing).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let err = c
        .get_file_info(pb::GetFileInfoRequest {
            path: missing.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .remove_file(pb::RemoveFileRequest {
            path: missing,
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let dir = agent.dir.path().display().to_string();
    assert_eq!(
        download(&mut c, &dir).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
}

#[tokio::test]
async fn directories_are_made_listed_and_removed() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let root = agent.dir.path().join("tree");
    let deep = root.join("x/y").display().to_string();
    let info = c
        .make_directory(pb::MakeDirectoryRequest {
            path: deep.clone(),
            mode: 0o700,
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!((info.r#type(), info.mode), (cm::FileType::Directory, 0o700));
    // Idempotent for an existing directory.
    c.make_directory(pb::MakeDirectoryRequest {
        path: deep.clone(),
        mode: 0,
    })
    .await
    .unwrap();
    let file = root.join("x/f.txt").display().to_string();
    upload(&mut c, vec![header(&file, 0, false), data("abc")])
        .await
        .unwrap();
    let err = c
        .make_directory(pb::MakeDirectoryRequest {
            path: file.clone(),
            mode: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let listed = c
        .list_files(pb::ListFilesRequest {
            path: root.join("x").display().to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .files;
    let names: Vec<_> = listed
        .iter()
        .map(|f| (f.name.as_str(), f.r#type(), f.size))
        .collect();
    assert_eq!(names[0], ("f.txt", cm::FileType::Regular, 3));
    assert_eq!((names[1].0, names[1].1), ("y", cm::FileType::Directory));
    assert!(listed[0].modify_time.is_some());
    let err = c
        .list_files(pb::ListFilesRequest { path: file.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let x = root.join("x").display().to_string();
    let err = c
        .remove_file(pb::RemoveFileRequest {
            path: x.clone(),
            recursive: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    c.remove_file(pb::RemoveFileRequest {
        path: file.clone(),
        recursive: false,
    })
    .await
    .unwrap();
    assert!(!std::path::Path::new(&file).exists());
    c.remove_file(pb::RemoveFileRequest {
        path: x.clone(),
        recursive: true,
    })
    .await
    .unwrap();
    assert!(!std::path::Path::new(&x).exists());
}
