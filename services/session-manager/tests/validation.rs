//! Bad input on every field of every request, through the real server: each is
//! INVALID_ARGUMENT with the field's name in the message, and nothing reaches a node.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use capsa_proto::common::v1::UploadHeader;
use capsa_proto::session::v1 as pb;
use common::{Client, Harness, create, secs};
use tonic::Code;

fn check(call: &str, field: &str, result: Result<(), tonic::Status>) {
    let err = result.expect_err(call);
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "{call}: {}",
        err.message()
    );
    assert!(
        err.message().contains(field),
        "{call}: {:?} should name {field}",
        err.message()
    );
}

async fn create_err(c: &mut Client, req: pb::CreateSessionRequest) -> Result<(), tonic::Status> {
    c.create_session(req).await.map(|_| ())
}

#[tokio::test]
async fn every_bad_field_is_invalid_argument_naming_it() {
    let h = Harness::start(1).await;
    let mut c = h.client(0).await;
    let s = create(&mut c, None).await;
    let id = || s.id.clone();
    let base = pb::CreateSessionRequest::default;
    let long = |n: usize| "x".repeat(n);

    let creates: Vec<(&str, pb::CreateSessionRequest)> = vec![
        (
            "template",
            pb::CreateSessionRequest {
                template: "Not_Valid".into(),
                ..base()
            },
        ),
        (
            "template",
            pb::CreateSessionRequest {
                template: long(64),
                ..base()
            },
        ),
        ("vcpus", pb::CreateSessionRequest { vcpus: 9, ..base() }),
        (
            "memory_mib",
            pb::CreateSessionRequest {
                memory_mib: 64,
                ..base()
            },
        ),
        (
            "memory_mib",
            pb::CreateSessionRequest {
                memory_mib: 9000,
                ..base()
            },
        ),
        (
            "lifetime",
            pb::CreateSessionRequest {
                lifetime: secs(5),
                ..base()
            },
        ),
        (
            "lifetime",
            pb::CreateSessionRequest {
                lifetime: secs(90_000),
                ..base()
            },
        ),
        (
            "lifetime",
            pb::CreateSessionRequest {
                lifetime: secs(-1),
                ..base()
            },
        ),
        (
            "env",
            pb::CreateSessionRequest {
                env: HashMap::from([("9X".into(), "v".into())]),
                ..base()
            },
        ),
        (
            "env",
            pb::CreateSessionRequest {
                env: HashMap::from([(long(257), "v".into())]),
                ..base()
            },
        ),
        (
            "env",
            pb::CreateSessionRequest {
                env: HashMap::from([("A".into(), long(32 * 1024 + 1))]),
                ..base()
            },
        ),
        (
            "env",
            pb::CreateSessionRequest {
                env: HashMap::from([("A".into(), "a\0b".into())]),
                ..base()
            },
        ),
        (
            "env",
            pb::CreateSessionRequest {
                env: (0..129).map(|i| (format!("K{i}"), String::new())).collect(),
                ..base()
            },
        ),
        (
            "metadata",
            pb::CreateSessionRequest {
                metadata: HashMap::from([(long(64), "v".into())]),
                ..base()
            },
        ),
        (
            "metadata",
            pb::CreateSessionRequest {
                metadata: HashMap::from([("k".into(), long(257))]),
                ..base()
            },
        ),
        (
            "metadata",
            pb::CreateSessionRequest {
                metadata: (0..65).map(|i| (format!("k{i}"), String::new())).collect(),
                ..base()
            },
        ),
    ];
    for (field, req) in creates {
        check("create", field, create_err(&mut c, req).await);
    }

    let lists = vec![
        (
            "page_size",
            pb::ListSessionsRequest {
                page_size: 1001,
                ..Default::default()
            },
        ),
        (
            "page_size",
            pb::ListSessionsRequest {
                page_size: -5,
                ..Default::default()
            },
        ),
        (
            "page_token",
            pb::ListSessionsRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
        ),
        (
            "status",
            pb::ListSessionsRequest {
                status: 99,
                ..Default::default()
            },
        ),
    ];
    for (field, req) in lists {
        check("list", field, c.list_sessions(req).await.map(|_| ()));
    }

    for bad_id in ["", "has space", &long(200)] {
        let r = c
            .get_session(pb::GetSessionRequest {
                session_id: bad_id.into(),
            })
            .await
            .map(|_| ());
        check("get", "session_id", r);
        let r = c
            .delete_session(pb::DeleteSessionRequest {
                session_id: bad_id.into(),
            })
            .await
            .map(|_| ());
        check("delete", "session_id", r);
        let r = c
            .get_usage(pb::GetUsageRequest {
                session_id: bad_id.into(),
            })
            .await
            .map(|_| ());
        check("usage", "session_id", r);
    }

    for (field, extend_by) in [
        ("extend_by", None),
        ("extend_by", secs(0)),
        ("extend_by", secs(86_401)),
    ] {
        let r = c
            .extend_session(pb::ExtendSessionRequest {
                session_id: id(),
                extend_by,
            })
            .await
            .map(|_| ());
        check("extend", field, r);
    }

    let ex = || pb::ExecuteRequest {
        session_id: id(),
        code: "1".into(),
        ..Default::default()
    };
    let executes = vec![
        (
            "session_id",
            pb::ExecuteRequest {
                session_id: String::new(),
                ..ex()
            },
        ),
        (
            "code",
            pb::ExecuteRequest {
                code: long((1 << 20) + 1),
                ..ex()
            },
        ),
        (
            "language",
            pb::ExecuteRequest {
                language: 42,
                ..ex()
            },
        ),
        (
            "timeout",
            pb::ExecuteRequest {
                timeout: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                ..ex()
            },
        ),
        (
            "timeout",
            pb::ExecuteRequest {
                timeout: secs(3601),
                ..ex()
            },
        ),
        (
            "max_output_bytes",
            pb::ExecuteRequest {
                max_output_bytes: (1 << 30) + 1,
                ..ex()
            },
        ),
        (
            "env",
            pb::ExecuteRequest {
                env: HashMap::from([("A-B".into(), "v".into())]),
                ..ex()
            },
        ),
        (
            "cwd",
            pb::ExecuteRequest {
                cwd: "relative/dir".into(),
                ..ex()
            },
        ),
    ];
    for (field, req) in executes {
        check("execute", field, c.execute(req).await.map(|_| ()));
    }

    let bad_paths = ["", "relative", "/a\0b", &format!("/{}", long(4096))];
    for p in bad_paths {
        let p = p.to_string();
        let r = c
            .list_files(pb::ListFilesRequest {
                session_id: id(),
                path: p.clone(),
            })
            .await
            .map(|_| ());
        check("list_files", "path", r);
        let r = c
            .get_file_info(pb::GetFileInfoRequest {
                session_id: id(),
                path: p.clone(),
            })
            .await
            .map(|_| ());
        check("get_file_info", "path", r);
        let r = c
            .download_file(pb::DownloadFileRequest {
                session_id: id(),
                path: p.clone(),
            })
            .await
            .map(|_| ());
        check("download", "path", r);
        let r = c
            .make_directory(pb::MakeDirectoryRequest {
                session_id: id(),
                path: p.clone(),
                mode: 0,
            })
            .await
            .map(|_| ());
        check("make_directory", "path", r);
        let r = c
            .remove_file(pb::RemoveFileRequest {
                session_id: id(),
                path: p.clone(),
                recursive: true,
            })
            .await
            .map(|_| ());
        check("remove_file", "path", r);
        let header = pb::UploadFileHeader {
            session_id: id(),
            file: Some(UploadHeader {
                path: p.clone(),
                ..Default::default()
            }),
        };
        let msgs = vec![pb::UploadFileRequest {
            part: Some(pb::upload_file_request::Part::Header(header)),
        }];
        check(
            "upload",
            "path",
            c.upload_file(tokio_stream::iter(msgs)).await.map(|_| ()),
        );
    }
    let r = c
        .make_directory(pb::MakeDirectoryRequest {
            session_id: id(),
            path: "/d".into(),
            mode: 0o17777,
        })
        .await
        .map(|_| ());
    check("make_directory", "mode", r);
    let header = pb::UploadFileHeader {
        session_id: id(),
        file: Some(UploadHeader {
            path: "/f".into(),
            mode: 0o17777,
            ..Default::default()
        }),
    };
    let msgs = vec![pb::UploadFileRequest {
        part: Some(pb::upload_file_request::Part::Header(header)),
    }];
    check(
        "upload",
        "mode",
        c.upload_file(tokio_stream::iter(msgs)).await.map(|_| ()),
    );
    let header = pb::UploadFileHeader {
        session_id: id(),
        file: None,
    };
    let msgs = vec![
        pb::UploadFileRequest {
            part: Some(pb::upload_file_request::Part::Header(header)),
        },
        pb::UploadFileRequest {
            part: Some(pb::upload_file_request::Part::Data(Bytes::from_static(
                b"x",
            ))),
        },
    ];
    check(
        "upload",
        "file",
        c.upload_file(tokio_stream::iter(msgs)).await.map(|_| ()),
    );

    let st = h.node.state();
    assert!(
        st.executes.is_empty() && st.files.is_empty(),
        "bad input reached the node"
    );
    assert_eq!(st.acquires.len(), 1, "only the valid create acquired a vm");
}
