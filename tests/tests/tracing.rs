//! One Execute is one trace: the spans that session-manager, executor and the guest agent
//! (inside a real VM, exporting over vsock through the host) send to an OTLP receiver run by
//! this test form one parent-child chain under the client's own span.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capsa_e2e::{Stack, StackOptions, exec};
use capsa_proto::common::v1::Language;
use capsa_test_support::eventually;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    #[expect(dead_code, reason = "read in failure messages through Debug")]
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ReceivedSpan>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn one_execute_is_one_trace_from_session_manager_into_the_guest() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn({
        let receiver = receiver.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        }
    });
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), otlp),
        // Export batches quickly so the test does not wait on the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "200".to_string()),
    ];
    let stack = Stack::start(StackOptions {
        env,
        ..Default::default()
    })
    .await;
    let mut c = stack.client(0).await;
    let sid = capsa_e2e::create_default_session(&mut c).await.id;

    // The client's own span: a trace id this test chose, so its spans are easy to find.
    let trace_id = [0x5a; 16];
    let client_span = [0x17; 8];
    let mut req = tonic::Request::new(exec::request(&sid, Language::Python, "print('traced')", 0));
    req.metadata_mut().insert(
        "traceparent",
        format!(
            "00-{}-{}-01",
            hex::encode(trace_id),
            hex::encode(client_span)
        )
        .parse()
        .unwrap(),
    );
    let mut stream = c.execute(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    let in_trace = || -> Vec<ReceivedSpan> {
        receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    };
    let services = |spans: &[ReceivedSpan]| -> Vec<String> {
        let mut v: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    eventually!(
        {
            let s = services(&in_trace());
            [
                "capsa-session-manager",
                "capsa-executor",
                "capsa-guest-agent",
            ]
            .iter()
            .all(|want| s.iter().any(|h| h == want))
        },
        30
    );
    let spans = in_trace();
    let by_id: HashMap<Vec<u8>, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.clone(), s)).collect();
    // Walk from each guest-agent span up to the client's span: the services met on the way
    // must be executor, then session-manager, in that order.
    let agent_span = spans
        .iter()
        .find(|s| s.service == "capsa-guest-agent")
        .unwrap();
    let mut chain = vec![agent_span.service.clone()];
    let mut parent = agent_span.parent_span_id.clone();
    while let Some(p) = by_id.get(&parent) {
        if chain.last() != Some(&p.service) {
            chain.push(p.service.clone());
        }
        parent = p.parent_span_id.clone();
    }
    assert_eq!(
        parent,
        client_span.to_vec(),
        "the chain ends at the client's span: {spans:#?}"
    );
    assert_eq!(
        chain,
        vec![
            "capsa-guest-agent",
            "capsa-executor",
            "capsa-session-manager"
        ],
        "{spans:#?}"
    );
    drop(stack);
    server.abort();
}
