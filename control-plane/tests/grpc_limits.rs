//! The gRPC port against clients that hold what it gives them without a
//! client certificate: a reflection stream that announces a huge message,
//! a unary call whose request never arrives in full, one address opening
//! connections without end. And the unary services' own limits, each
//! called as its callers are: the Admin service with the operator's SVID,
//! the Replica service with the SVID a peer replica issues itself from the
//! CA the replicas share ([`common::replica`]). And the callers the
//! Replica service refuses (a workload, one with no client certificate),
//! before it reads what they send.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::connections::{REFUSAL, closed_within, connect_from, hold, loopback};
use common::replica::SharedCa;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use trellis_control_plane::api::admin::MAX_ADMIN_REQUEST_BYTES;
use trellis_control_plane::api::replica::MAX_REPLICA_REQUEST_BYTES;
use trellis_control_plane::body_deadline::REQUEST_BODY_TIMEOUT;
use trellis_control_plane::run::MAX_REFLECTION_REQUEST_BYTES;
use trellis_control_plane::server::MAX_CONNECTIONS_PER_CLIENT;
use trellis_proto::admin::v1::replica_client::ReplicaClient;
use trellis_proto::admin::v1::{
    HealthRequest, ListIssuedCertificatesRequest, ListStreamsRequest, ReplicaHealth,
};
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Subscribe, WatchRequest};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const CERTIFY: &str = "/trellis.identity.v1.Identity/Certify";
const LIST_WORKLOADS: &str = "/trellis.admin.v1.Admin/ListWorkloads";
const EXPLAIN: &str = "/trellis.admin.v1.Admin/Explain";
const WATCH: &str = "/trellis.discovery.v1.Discovery/Watch";
const LIST_STREAMS: &str = "/trellis.admin.v1.Replica/ListStreams";

/// Far longer than anything awaited here takes, so that a test fails
/// instead of hanging.
const PATIENCE: Duration = Duration::from_secs(40);

/// Calls `path` on a TLS connection without a client certificate, with
/// one message whose gRPC length prefix announces `announced` bytes, of
/// which `sent` are sent and the rest never: the answer's head, and what
/// keeps the request open.
async fn stalled_call(
    cp: &ControlPlane,
    path: &str,
    announced: u32,
    sent: usize,
) -> (http::Response<Incoming>, raw_grpc::BodySender) {
    let mut message = vec![0u8];
    message.extend_from_slice(&announced.to_be_bytes());
    message.resize(5 + sent, 0x0a);
    raw_grpc::call(cp, None, path, Bytes::from(message)).await
}

/// A gRPC header of `headers`, its percent-encoding undone.
fn grpc_header(headers: &http::HeaderMap, name: &str) -> String {
    let raw = headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        .as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).unwrap()
}

/// What a reflection stream whose request is past
/// [`MAX_REFLECTION_REQUEST_BYTES`] ends with.
fn reflection_refusal() -> String {
    format!(
        "a reflection request may be at most {MAX_REFLECTION_REQUEST_BYTES} bytes; this one is larger"
    )
}

/// The status code and message that end the answer of a streaming call.
async fn ended_with(answer: http::Response<Incoming>) -> (String, String) {
    let ended = tokio::time::timeout(PATIENCE, answer.into_body().collect())
        .await
        .expect("the stream was held open")
        .expect("the stream ends cleanly");
    let trailers = ended
        .trailers()
        .cloned()
        .expect("the stream ended with its trailers");
    assert!(ended.to_bytes().is_empty(), "nothing answered");
    (
        grpc_header(&trailers, "grpc-status"),
        grpc_header(&trailers, "grpc-message"),
    )
}

/// A reflection stream whose message announces more than reflection reads
/// (tonic's default of 4 MiB, in the length prefix) and stalls is ended
/// at once with RESOURCE_EXHAUSTED naming the limit, none of it buffered;
/// reflection still answers a real request without a client certificate,
/// and a Certify goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_oversized_reflection_request_is_ended_and_others_are_served() {
    let cp = ControlPlane::start(&[]);
    let announced = 4 * 1024 * 1024 - 16;
    let (answer, _body) = stalled_call(&cp, REFLECTION, announced, 64 * 1024).await;
    assert_eq!(answer.status(), http::StatusCode::OK);
    assert_eq!(
        ended_with(answer).await,
        (
            (tonic::Code::ResourceExhausted as i32).to_string(),
            reflection_refusal()
        )
    );
    assert!(MAX_REFLECTION_REQUEST_BYTES < announced as usize);

    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(None)))
        .await
        .unwrap();
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .expect("reflection without a client certificate")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("an answer");
    let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
        panic!("not a list of services: {answer:?}");
    };
    assert!(
        services
            .service
            .iter()
            .any(|s| s.name == "trellis.identity.v1.Identity"),
        "{services:?}"
    );

    enroll(&cp, WEB, "127.0.0.1:7000").await;
}

/// A reflection request a little past [`MAX_REFLECTION_REQUEST_BYTES`]
/// (a symbol name of 5,000 characters), from tonic's own reflection
/// client, is answered RESOURCE_EXHAUSTED naming the limit, and one whose
/// bytes are not a reflection request, or that the end of its stream cuts
/// short, INVALID_ARGUMENT, each instead of a stream that ends with OK and
/// no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_requests_that_cannot_be_read_are_answered_with_why() {
    let cp = ControlPlane::start(&[]);
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(None)))
        .await
        .unwrap();
    let oversized = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("a".repeat(5000))),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([oversized]))
        .await
        .expect("reflection without a client certificate")
        .into_inner();
    let status = answers
        .message()
        .await
        .expect_err("an oversized request is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), reflection_refusal());

    // A field of wire type 7, which protobuf does not have.
    let garbage: &'static [u8] = &[0x0f, 0xff, 0xff];
    let (answer, body) = stalled_call(&cp, REFLECTION, garbage.len() as u32, 0).await;
    body.send(Ok(Frame::data(Bytes::from_static(garbage))))
        .await
        .unwrap();
    let (code, message) = ended_with(answer).await;
    assert_eq!(code, (tonic::Code::InvalidArgument as i32).to_string());
    assert!(
        message.starts_with("the reflection request could not be read: "),
        "{message}"
    );

    // A message cut short by the end of the request stream.
    let (answer, body) = stalled_call(&cp, REFLECTION, 1000, 10).await;
    drop(body);
    assert_eq!(
        ended_with(answer).await,
        (
            (tonic::Code::InvalidArgument as i32).to_string(),
            "the reflection request could not be read: Unexpected EOF decoding stream.".to_owned()
        )
    );
}

/// A Certify whose message never arrives in full is ended with
/// DEADLINE_EXCEEDED once [`REQUEST_BODY_TIMEOUT`] has passed, instead of
/// holding what it sent for as long as its client keeps the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_whose_request_stalls_is_ended() {
    let cp = ControlPlane::start(&[]);
    let (answer, _body) = stalled_call(&cp, CERTIFY, 1000, 10).await;
    let headers = answer.headers();
    assert_eq!(
        grpc_header(headers, "grpc-status"),
        (tonic::Code::DeadlineExceeded as i32).to_string()
    );
    assert_eq!(
        grpc_header(headers, "grpc-message"),
        format!(
            "the request did not arrive in full within {} of its headers",
            trellis_core::duration::Words(REQUEST_BODY_TIMEOUT)
        )
    );
    enroll(&cp, WEB, "127.0.0.1:7000").await;
}

/// The status code and message in the head of a unary call's answer.
fn answered_with(answer: &http::Response<Incoming>) -> (String, String) {
    (
        grpc_header(answer.headers(), "grpc-status"),
        grpc_header(answer.headers(), "grpc-message"),
    )
}

/// A unary request tonic's decoder cannot read is answered
/// INVALID_ARGUMENT naming the call and why, not INTERNAL (which says the
/// control plane failed): a Certify cut short by the end of its stream,
/// an Admin call whose message is flagged compressed though no
/// `grpc-encoding` was sent, one whose bytes do not decode. Well-formed
/// calls are still answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_requests_that_cannot_be_read_are_answered_with_why() {
    let cp = ControlPlane::start(&[]);
    let invalid = (tonic::Code::InvalidArgument as i32).to_string();

    // 10 bytes of a message announced as 1000, then the end of the stream.
    let mut cut_short = vec![0, 0, 0, 0x03, 0xe8];
    cut_short.resize(5 + 10, 0x0a);
    let answer = raw_grpc::call_ended(&cp, None, CERTIFY, Bytes::from(cut_short)).await;
    assert_eq!(
        answered_with(&answer),
        (
            invalid.clone(),
            "a Certify request could not be read: Unexpected EOF decoding stream.".to_owned()
        )
    );

    let compressed = Bytes::from_static(&[1, 0, 0, 0, 2, 0x08, 0x01]);
    let answer = raw_grpc::admin_call_ended(&cp, LIST_WORKLOADS, compressed).await;
    assert_eq!(
        answered_with(&answer),
        (
            invalid.clone(),
            "a ListWorkloads request could not be read: protocol error: received message with \
             compressed-flag but no grpc-encoding was specified"
                .to_owned()
        )
    );

    // A field of wire type 7, which protobuf does not have.
    let garbage = Bytes::from_static(&[0, 0, 0, 0, 3, 0x0f, 0xff, 0xff]);
    let answer = raw_grpc::admin_call_ended(&cp, EXPLAIN, garbage).await;
    let (code, message) = answered_with(&answer);
    assert_eq!(code, invalid);
    assert!(
        message
            .starts_with("an Explain request could not be read: failed to decode Protobuf message"),
        "{message}"
    );

    enroll(&cp, WEB, "127.0.0.1:7000").await;
    assert!(
        cp.workloads().await.iter().any(|w| w.spiffe_id == WEB),
        "ListWorkloads answers as before"
    );
}

/// A call of a method the gRPC port does not serve is answered
/// UNIMPLEMENTED naming it: for a served service (after the caller passed
/// the service's own check, as the operator does for Admin), that the
/// method is not one of it; for any other path, the services there are.
/// Not tonic's UNIMPLEMENTED without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_unknown_methods_are_answered_with_what_is_served() {
    let cp = ControlPlane::start(&[]);
    let unimplemented = (tonic::Code::Unimplemented as i32).to_string();
    let empty = || Bytes::from_static(&[0, 0, 0, 0, 0]);

    let answer =
        raw_grpc::admin_call_ended(&cp, "/trellis.admin.v1.Admin/DeleteEverything", empty()).await;
    assert_eq!(
        answered_with(&answer),
        (
            unimplemented.clone(),
            "\"/trellis.admin.v1.Admin/DeleteEverything\" is not a method of \
             trellis.admin.v1.Admin"
                .to_owned()
        )
    );

    let answer =
        raw_grpc::call_ended(&cp, None, "/trellis.identity.v1.Identity/Renew", empty()).await;
    assert_eq!(
        answered_with(&answer),
        (
            unimplemented.clone(),
            "\"/trellis.identity.v1.Identity/Renew\" is not a method of \
             trellis.identity.v1.Identity"
                .to_owned()
        )
    );

    let answer =
        raw_grpc::call_ended(&cp, None, "/trellis.identity.v2.Identity/Certify", empty()).await;
    assert_eq!(
        answered_with(&answer),
        (
            unimplemented,
            "\"/trellis.identity.v2.Identity/Certify\" names no service of this control plane; \
             it serves trellis.identity.v1.Identity, trellis.discovery.v1.Discovery, \
             trellis.admin.v1.Admin, trellis.admin.v1.Replica, \
             grpc.reflection.v1.ServerReflection, grpc.reflection.v1alpha.ServerReflection"
                .to_owned()
        )
    );
}

/// An Admin request past its limit, an ApplyPolicy of a valid policy
/// padded past [`MAX_ADMIN_REQUEST_BYTES`] with a YAML comment, is refused
/// with RESOURCE_EXHAUSTED naming the call and the limit (not tonic's
/// OUT_OF_RANGE "decoded message length too large") and stores nothing;
/// the same policy unpadded is then applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_past_its_limit_is_told_the_limit() {
    let cp = ControlPlane::start(&[]);
    let mut admin = cp.admin_client().await;
    let one = common::policy::allow("web-in", WEB, WEB, 8080);
    let mut padded = format!("{one}#");
    padded.push_str(&"x".repeat(MAX_ADMIN_REQUEST_BYTES));
    padded.push('\n');

    let refusal = common::policy::apply(&mut admin, &padded, false)
        .await
        .expect_err("refused");
    assert_eq!(
        (refusal.code(), refusal.message()),
        (
            tonic::Code::ResourceExhausted,
            format!(
                "an ApplyPolicy request may be at most {MAX_ADMIN_REQUEST_BYTES} bytes; this one \
                 is larger"
            )
            .as_str()
        )
    );
    let listed = common::policy::list(&mut admin).await;
    assert!(listed.policies.is_empty(), "{listed:?}");

    let applied = common::policy::apply(&mut admin, &one, false).await;
    assert!(applied.is_ok(), "{applied:?}");
    assert_eq!(common::policy::list(&mut admin).await.policies.len(), 1);
}

/// The name the control plane under a Replica test answers by.
const REPLICA_NAME: &str = "cp-a";

/// `cp` answers a peer replica's well-formed calls: `Health` says it is
/// healthy, by its name, and `ListIssuedCertificates` lists web's one
/// certificate.
async fn serves_its_peers(cp: &ControlPlane, ca: &SharedCa) {
    let mut peer = ca.replica_client(cp).await;
    let health = peer.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (health.name.as_str(), health.health()),
        (REPLICA_NAME, ReplicaHealth::Healthy)
    );
    let issued = peer
        .list_issued_certificates(ListIssuedCertificatesRequest {
            spiffe_id: WEB.into(),
            ..ListIssuedCertificatesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = issued.certificates.iter().map(|c| &c.spiffe_id).collect();
    assert_eq!(ids, [WEB], "{issued:?}");
}

/// A Replica request past [`MAX_REPLICA_REQUEST_BYTES`], from a peer
/// replica (a `ListIssuedCertificates` whose SPIFFE ID alone is that
/// long), is refused with RESOURCE_EXHAUSTED naming the call and the
/// limit, not read whole up to tonic's default of 4 MiB; the replica then
/// answers its peers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_request_past_its_limit_is_told_the_limit() {
    assert_eq!(MAX_REPLICA_REQUEST_BYTES, 65536);
    let ca = SharedCa::generate();
    let cp = ca.start(&["--replica-name", REPLICA_NAME]);
    enroll(&cp, WEB, "127.0.0.1:7000").await;
    serves_its_peers(&cp, &ca).await;

    let oversized = ListIssuedCertificatesRequest {
        spiffe_id: "x".repeat(MAX_REPLICA_REQUEST_BYTES),
        ..ListIssuedCertificatesRequest::default()
    };
    let refusal = ca
        .replica_client(&cp)
        .await
        .list_issued_certificates(oversized)
        .await
        .expect_err("refused");
    assert_eq!(
        (refusal.code(), refusal.message()),
        (
            tonic::Code::ResourceExhausted,
            "a ListIssuedCertificates request may be at most 65536 bytes; this one is larger"
        )
    );
    serves_its_peers(&cp, &ca).await;
}

/// A Replica request from a peer replica that tonic cannot read is
/// answered INVALID_ARGUMENT naming the call and why, not INTERNAL (which
/// says the control plane failed): a ListStreams cut short by the end of
/// its stream, one whose message is flagged compressed though no
/// `grpc-encoding` was sent. The replica answers its peers as before after
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_requests_that_cannot_be_read_are_answered_with_why() {
    let ca = SharedCa::generate();
    let cp = ca.start(&["--replica-name", REPLICA_NAME]);
    enroll(&cp, WEB, "127.0.0.1:7000").await;
    let invalid = (tonic::Code::InvalidArgument as i32).to_string();
    let as_a_replica = || (*ca.replica_tls()).clone();

    // 10 bytes of a message announced as 1000, then the end of the stream.
    let mut cut_short = vec![0, 0, 0, 0x03, 0xe8];
    cut_short.resize(5 + 10, 0x0a);
    let answer =
        raw_grpc::call_ended_with(&cp, as_a_replica(), LIST_STREAMS, Bytes::from(cut_short)).await;
    assert_eq!(
        answered_with(&answer),
        (
            invalid.clone(),
            "a ListStreams request could not be read: Unexpected EOF decoding stream.".to_owned()
        )
    );
    serves_its_peers(&cp, &ca).await;

    let compressed = Bytes::from_static(&[1, 0, 0, 0, 2, 0x08, 0x01]);
    let answer = raw_grpc::call_ended_with(&cp, as_a_replica(), LIST_STREAMS, compressed).await;
    assert_eq!(
        answered_with(&answer),
        (
            invalid,
            "a ListStreams request could not be read: protocol error: received message with \
             compressed-flag but no grpc-encoding was specified"
                .to_owned()
        )
    );
    serves_its_peers(&cp, &ca).await;
}

/// What a caller with `id`'s SVID is told by the Replica service.
fn not_a_replica(id: &str) -> String {
    format!(
        "{id} may not call the Replica API; only spiffe://cluster.local/trellis/control-plane may"
    )
}

/// A `Replica` client of `cp` on a connection made with `svid` (a
/// workload's), or with no client certificate.
async fn replica_client_as(cp: &ControlPlane, svid: Option<&Svid>) -> ReplicaClient<Channel> {
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(svid)))
        .await
        .expect("connects to the control plane");
    ReplicaClient::new(channel)
}

/// Each of the Replica service's calls, made by `client`: its name and
/// how it was answered.
async fn every_replica_call(
    client: &mut ReplicaClient<Channel>,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    vec![
        ("Health", client.health(HealthRequest {}).await.map(drop)),
        (
            "ListStreams",
            client
                .list_streams(ListStreamsRequest::default())
                .await
                .map(drop),
        ),
        (
            "ListIssuedCertificates",
            client
                .list_issued_certificates(ListIssuedCertificatesRequest {
                    spiffe_id: WEB.into(),
                    ..ListIssuedCertificatesRequest::default()
                })
                .await
                .map(drop),
        ),
    ]
}

/// The Replica service answers only the control plane's own identity: a
/// workload's SVID is refused PERMISSION_DENIED naming it and the one
/// identity allowed, in each of the service's calls, and a caller with no
/// client certificate UNAUTHENTICATED, while a peer replica is answered
/// each of them. The workload's refusals are logged in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_peer_replica_may_call_the_replica_service() {
    let ca = SharedCa::generate();
    let cp = ca.start(&["--replica-name", REPLICA_NAME]);
    let web = enroll(&cp, WEB, "127.0.0.1:7000").await;

    let mut as_web = replica_client_as(&cp, Some(&web)).await;
    for (call, answer) in every_replica_call(&mut as_web).await {
        let refusal = answer.expect_err(call);
        assert_eq!(
            (refusal.code(), refusal.message()),
            (tonic::Code::PermissionDenied, not_a_replica(WEB).as_str()),
            "{call}"
        );
    }
    // Logged once for the caller, not once for each of its calls: any
    // workload can call as often as it likes.
    let refused = |l: &str| l.contains("refused a call from an identity") && l.contains(WEB);
    cp.wait_for_line("the refused caller's line", refused);

    let mut anonymous = replica_client_as(&cp, None).await;
    for (call, answer) in every_replica_call(&mut anonymous).await {
        let refusal = answer.expect_err(call);
        assert_eq!(
            (refusal.code(), refusal.message()),
            (
                tonic::Code::Unauthenticated,
                "the Replica API requires an SVID presented as the TLS client certificate"
            ),
            "{call}"
        );
    }

    let mut as_a_replica = ca.replica_client(&cp).await;
    for (call, answer) in every_replica_call(&mut as_a_replica).await {
        assert!(answer.is_ok(), "{call}: {answer:?}");
    }
    let log = cp.log();
    assert_eq!(log.lines().filter(|l| refused(l)).count(), 1, "{log}");
}

/// A workload's Replica request is refused for who sent it before any of
/// it is read: one past [`MAX_REPLICA_REQUEST_BYTES`] is answered
/// PERMISSION_DENIED, not RESOURCE_EXHAUSTED (which would tell a caller
/// with no business here the service's limit), and one whose message never
/// arrives in full is answered PERMISSION_DENIED at once, not
/// DEADLINE_EXCEEDED when the body's time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_replica_request_is_refused_unread() {
    let ca = SharedCa::generate();
    let cp = ca.start(&["--replica-name", REPLICA_NAME]);
    let web = enroll(&cp, WEB, "127.0.0.1:7000").await;

    let oversized = ListIssuedCertificatesRequest {
        spiffe_id: "x".repeat(MAX_REPLICA_REQUEST_BYTES),
        ..ListIssuedCertificatesRequest::default()
    };
    let refusal = replica_client_as(&cp, Some(&web))
        .await
        .list_issued_certificates(oversized)
        .await
        .expect_err("refused");
    assert_eq!(
        (refusal.code(), refusal.message()),
        (tonic::Code::PermissionDenied, not_a_replica(WEB).as_str())
    );

    // 10 bytes of a message announced as 1000; the rest never comes.
    let mut stalled = vec![0, 0, 0, 0x03, 0xe8];
    stalled.resize(5 + 10, 0x0a);
    let (answer, _body) = raw_grpc::call(&cp, Some(&web), LIST_STREAMS, Bytes::from(stalled)).await;
    assert_eq!(
        answered_with(&answer),
        (
            (tonic::Code::PermissionDenied as i32).to_string(),
            not_a_replica(WEB)
        )
    );

    serves_its_peers(&cp, &ca).await;
}

/// One address holds at most [`MAX_CONNECTIONS_PER_CLIENT`] connections
/// of the gRPC port, counted from their accept (these send nothing, as a
/// client that stalls before its handshake); one more is closed at once,
/// counted and logged naming the address, while another address is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_grpc_connections() {
    let cp = ControlPlane::start(&[]);
    let grpc = cp.grpc.parse().unwrap();
    let _held = hold(loopback(2), grpc, MAX_CONNECTIONS_PER_CLIENT).await;
    let mut extra = connect_from(loopback(2), grpc).await;
    assert!(
        closed_within(&mut extra, REFUSAL).await.is_some(),
        "one address holds at most {MAX_CONNECTIONS_PER_CLIENT} connections"
    );
    // From 127.0.0.1.
    enroll(&cp, WEB, "127.0.0.1:7000").await;

    let refused = "trellis_grpc_connections_refused_total{reason=\"per_client\"} 1\n";
    let metrics = cp.metrics();
    assert!(metrics.contains(refused), "{refused}in\n{metrics}");
    let line = cp.wait_for_line("the refusal logged", |line| {
        line.contains("gRPC connection refused: past the port's connection limits")
    });
    assert!(line.contains("127.0.0.2"), "{line}");
    assert!(
        line.contains(&format!(
            "{MAX_CONNECTIONS_PER_CLIENT} connections are open from this address already"
        )),
        "{line}"
    );
}

/// A TLS connection to the gRPC port, presenting `svid` when given.
async fn tls_connection(
    cp: &ControlPlane,
    svid: Option<&Svid>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(&cp.grpc).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cp.client_config(svid)))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a TLS handshake")
}

/// The HTTP/2 frames the server sends on `tls`, as a client that makes
/// no call sees them (it sends its preface and settings, and answers the
/// server's settings and pings), until the server ends the connection:
/// each frame's type and payload.
async fn frames_until_closed(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Vec<(u8, Vec<u8>)> {
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame.
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    tls.flush().await.unwrap();
    let mut received = Vec::new();
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    // The server's keepalive pings, answered, would keep the connection
    // open for ever: the whole wait is bounded.
    let closed = tokio::time::timeout(PATIENCE, async {
        // Until the end of the stream, or a TLS error once it is closed.
        while let Ok(n @ 1..) = tls.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
            while received.len() >= 9 {
                let len = u32::from_be_bytes([0, received[0], received[1], received[2]]) as usize;
                if received.len() < 9 + len {
                    break;
                }
                let frame: Vec<u8> = received.drain(..9 + len).collect();
                let (kind, flags, payload) = (frame[3], frame[4], frame[9..].to_vec());
                const SETTINGS: u8 = 0x4;
                const PING: u8 = 0x6;
                const ACK: u8 = 0x1;
                let answer = match (kind, flags & ACK) {
                    (SETTINGS, 0) => Some(vec![0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]),
                    (PING, 0) => Some([&[0, 0, 8, PING, ACK, 0, 0, 0, 0][..], &payload].concat()),
                    _ => None,
                };
                if let Some(answer) = answer {
                    // The server may have closed its side already.
                    let _ = tls.write_all(&answer).await;
                    let _ = tls.flush().await;
                }
                frames.push((kind, payload));
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection was never closed: {frames:?}"
    );
    frames
}

/// HTTP/2's GOAWAY frame type, and its NO_ERROR code.
const GOAWAY: u8 = 0x7;
const NO_ERROR: [u8; 4] = [0, 0, 0, 0];

/// With `--grpc-idle-timeout 1s`, a connection that holds no request is
/// closed by the control plane gracefully (a GOAWAY with NO_ERROR, then
/// the end of the connection) and counted, while one that holds a Watch
/// is not: it still takes a new call and is sent the next snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_one_holding_a_watch_is_not() {
    let cp = ControlPlane::start(&["--grpc-idle-timeout", "1s"]);
    let web = enroll(&cp, WEB, "127.0.0.1:7000").await;

    // A Watch, on a connection of its own.
    let (mut watching, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>>(TokioIo::new(
            tls_connection(&cp, Some(&web)).await,
        ))
        .await
        .unwrap();
    let watching_conn = tokio::spawn(conn);
    let subscribe = WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: "127.0.0.1:7000".into(),
            ..Subscribe::default()
        })),
    };
    let mut message = vec![0u8];
    message.extend_from_slice(&(subscribe.encoded_len() as u32).to_be_bytes());
    message.extend_from_slice(&subscribe.encode_to_vec());
    let (_request, rx) = mpsc::channel(4);
    _request
        .send(Ok(Frame::data(Bytes::from(message))))
        .await
        .unwrap();
    let post = |path: &str, rx| {
        http::Request::post(format!("http://{}{path}", cp.grpc))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(StreamBody::new(ReceiverStream::new(rx)))
            .unwrap()
    };
    let answer = watching.send_request(post(WATCH, rx)).await.unwrap();
    let mut snapshots = answer.into_body();
    let first = snapshots.frame().await.expect("a snapshot").unwrap();
    assert!(first.is_data(), "{first:?}");

    // A connection that makes no call, opened after the Watch's.
    let frames = frames_until_closed(tls_connection(&cp, None).await).await;
    assert!(
        frames
            .iter()
            .any(|(kind, payload)| *kind == GOAWAY && payload.get(4..8) == Some(&NO_ERROR[..])),
        "no GOAWAY with NO_ERROR among {frames:?}"
    );
    let metrics = cp.metrics();
    assert!(
        metrics.contains("trellis_grpc_connections_closed_total{reason=\"idle\"}"),
        "{metrics}"
    );

    // The Watch's connection, open longer than that, was not closed: it
    // takes another call, and the Watch is sent the next snapshot.
    assert!(!watching_conn.is_finished(), "the Watch's connection ended");
    let (_another, rx) = mpsc::channel(1);
    let unknown = "/trellis.discovery.v1.Discovery/Unknown";
    let answer = tokio::time::timeout(PATIENCE, watching.send_request(post(unknown, rx)))
        .await
        .expect("no answer on the Watch's connection")
        .expect("the Watch's connection takes another call");
    assert_eq!(
        grpc_header(answer.headers(), "grpc-message"),
        format!("{unknown} is not a method of trellis.discovery.v1.Discovery")
    );
    enroll(
        &cp,
        "spiffe://cluster.local/ns/default/sa/db",
        "127.0.0.1:7001",
    )
    .await;
    let next = tokio::time::timeout(PATIENCE, snapshots.frame())
        .await
        .expect("no snapshot after the change")
        .expect("a snapshot")
        .unwrap();
    assert!(next.is_data(), "{next:?}");
}

/// The gRPC port speaks HTTP/2 alone: an HTTP/1.1 `CONNECT` or request
/// with an `Upgrade`, and a request after it, get no HTTP/1 answer (the
/// admin and webhook ports end such a connection after their answer;
/// here there is none) and the connection is closed.
#[tokio::test]
async fn the_grpc_port_answers_no_http_1_request_after_a_connect_or_upgrade() {
    let cp = ControlPlane::start(&[]);
    for first in [
        "CONNECT cp:15012 HTTP/1.1\r\nhost: cp:15012\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: cp\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
    ] {
        let mut tls = tls_connection(&cp, None).await;
        tls.write_all(format!("{first}GET / HTTP/1.1\r\nhost: cp\r\n\r\n").as_bytes())
            .await
            .unwrap();
        tls.flush().await.unwrap();
        let mut read = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(PATIENCE, async {
            // Until the end of the stream, or a TLS error once it is closed.
            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                read.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("closed");
        assert!(
            !read.windows(7).any(|w| w == b"HTTP/1."),
            "{first:?}: {}",
            String::from_utf8_lossy(&read)
        );
    }
}
