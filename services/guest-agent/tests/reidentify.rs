//! Reidentify through the agent as a plain process: every field is checked and named, and
//! a valid request is refused there, since it would change this machine. Its effect on a
//! guest is tested in a VM by vm-pool's suspend and resume tests.

mod common;

use capsa_proto::agent::v1 as pb;
use common::Agent;

fn valid() -> pb::ReidentifyRequest {
    pb::ReidentifyRequest {
        address: "10.0.0.6/30".into(),
        gateway: "10.0.0.5".into(),
        mac: "52:54:00:00:00:01".into(),
        entropy: vec![0x5a; 64].into(),
        host_time: Some(capsa_proto::time::timestamp(std::time::SystemTime::now())),
    }
}

/// Makes one field of a valid request bad.
type Spoil = fn(&mut pb::ReidentifyRequest);

#[tokio::test]
async fn bad_fields_are_invalid_argument_naming_them() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    let cases: [(&str, Spoil); 5] = [
        ("`address`", |r| r.address = "10.0.0.6".into()),
        ("`gateway`", |r| r.gateway = "10.0.1.5".into()),
        ("`mac`", |r| r.mac = "52:54:00:00:00:0G".into()),
        ("`entropy`", |r| r.entropy = vec![1; 31].into()),
        ("`host_time`", |r| r.host_time = None),
    ];
    for (field, spoil) in cases {
        let mut request = valid();
        spoil(&mut request);
        let status = c.reidentify(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
}

#[tokio::test]
async fn a_valid_request_is_refused_outside_a_vm() {
    let agent = Agent::start().await;
    let mut c = agent.client();
    for request in [
        valid(),
        pb::ReidentifyRequest {
            address: String::new(),
            gateway: String::new(),
            mac: String::new(),
            ..valid()
        },
    ] {
        let status = c.reidentify(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("not running in a VM"),
            "{status:?}"
        );
    }
    // The agent is still serving.
    c.get_stats(pb::GetStatsRequest {}).await.unwrap();
}
