//! Discovery.Watch against the real control plane: SVID required, Subscribe
//! first, a snapshot on connect, a new one when a workload registers, and
//! ACKs visible in ListWorkloads.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use hyper::body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use trellis_control_plane::api::discovery_server::MAX_WATCH_REQUEST_BYTES;
use trellis_proto::discovery::v1::discovery_client::DiscoveryClient;
use trellis_proto::discovery::v1::watch_request::Kind;
use trellis_proto::discovery::v1::{Ack, Nack, Snapshot, Subscribe, WatchRequest};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";

async fn discovery_client(
    cp: &ControlPlane,
    svid: Option<&Svid>,
) -> DiscoveryClient<tonic::transport::Channel> {
    let channel = trellis_core::grpc::connect(&cp.grpc, Arc::new(cp.client_config(svid)))
        .await
        .unwrap();
    DiscoveryClient::new(channel)
}

fn subscribe(inbound: &str) -> WatchRequest {
    WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: inbound.into(),
            last_version: 0,
            inbound_addresses: Vec::new(),
            accepts_endpoints_version: false,
            accepts_endpoint_changes: false,
            last_version_epoch: 0,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    }
}

/// `svid`'s Watch stream, subscribed as listening on `inbound`, and its
/// request side for ACKs.
async fn watch(
    cp: &ControlPlane,
    svid: &Svid,
    inbound: &str,
) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<Snapshot>) {
    watch_from(cp, svid, subscribe(inbound)).await
}

/// A Subscribe of a sidecar listening on `inbound` that holds `held` (its
/// version and the version's epoch).
fn resubscribe(inbound: &str, held: &Snapshot, accepts_endpoint_changes: bool) -> WatchRequest {
    WatchRequest {
        kind: Some(Kind::Subscribe(Subscribe {
            inbound_address: inbound.into(),
            last_version: held.version,
            inbound_addresses: Vec::new(),
            accepts_endpoints_version: accepts_endpoint_changes,
            accepts_endpoint_changes,
            last_version_epoch: held.version_epoch,
            warnings: Vec::new(),
            opaque_ports: Vec::new(),
        })),
    }
}

/// `svid`'s Watch stream opened with `first` (a Subscribe), and its
/// request side for ACKs.
async fn watch_from(
    cp: &ControlPlane,
    svid: &Svid,
    first: WatchRequest,
) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<Snapshot>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let snapshots = discovery_client(cp, Some(svid))
        .await
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch opens")
        .into_inner();
    (tx, snapshots)
}

#[tokio::test]
async fn watch_pushes_snapshots_and_records_acks() {
    let cp = ControlPlane::start(&["--default-policy", "allow-mesh"]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let (tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7001").await;

    let first = snapshots
        .message()
        .await
        .unwrap()
        .expect("a first snapshot");
    assert!(first.version > 0);
    assert_eq!(first.trust_bundle, vec![cp.bundle()[0].to_vec()]);
    assert_eq!(first.endpoints.len(), 1);
    assert_eq!(first.endpoints[0].spiffe_id, WEB);
    assert_eq!(first.endpoints[0].address, "127.0.0.1:7001");
    let mesh = first.mesh.clone().unwrap();
    assert_eq!(mesh.default_policy, "allow-mesh");
    assert_eq!(mesh.outbound_policy, "deny");
    assert!(first.policies.is_empty());
    tx.send(WatchRequest {
        kind: Some(Kind::Ack(Ack {
            version: first.version,
            warnings: Vec::new(),
        })),
    })
    .await
    .unwrap();

    enroll(&cp, DB, "127.0.0.1:7002").await;
    let second = snapshots
        .message()
        .await
        .unwrap()
        .expect("a pushed snapshot");
    assert!(second.version > first.version);
    let ids: Vec<&str> = second
        .endpoints
        .iter()
        .map(|e| e.spiffe_id.as_str())
        .collect();
    assert!(ids.contains(&WEB) && ids.contains(&DB), "{ids:?}");
    tx.send(WatchRequest {
        kind: Some(Kind::Nack(Nack {
            version: second.version,
            reason: "test refuses it".into(),
        })),
    })
    .await
    .unwrap();

    let listed = eventually_async("the NACK to show in ListWorkloads", || async {
        let workloads = cp.workloads().await;
        let web = workloads.into_iter().find(|w| w.spiffe_id == WEB)?;
        (!web.last_nack.is_empty()).then_some(web)
    })
    .await;
    assert!(listed.connected);
    assert_eq!(listed.acked_version, first.version);
    // The embedded store sets versions in an epoch, listed with them.
    assert_ne!(first.version_epoch, 0);
    assert_eq!(listed.acked_version_epoch, first.version_epoch);
    assert_eq!(listed.synced_version_epoch, first.version_epoch);
    assert_eq!(listed.last_nack, "test refuses it");
    let answer = cp.list_workloads().await;
    assert_eq!(
        (answer.snapshot_version, answer.snapshot_version_epoch),
        (second.version, second.version_epoch),
        "the version served, with its epoch"
    );
    assert_eq!(
        answer.replicas[0].snapshot_version_epoch,
        second.version_epoch
    );
    assert!(cp.metrics().contains("trellis_watch_streams 1"));

    // A long reason (as long as a Watch request may be) is kept as far as
    // the log line shows it, with its length, never whole.
    let long = MAX_WATCH_REQUEST_BYTES / 2;
    tx.send(WatchRequest {
        kind: Some(Kind::Nack(Nack {
            version: second.version,
            reason: "x".repeat(long),
        })),
    })
    .await
    .unwrap();
    let bounded = format!("{}... ({long} bytes)", "x".repeat(512));
    eventually_async("the long NACK to show, bounded", || async {
        let workloads = cp.workloads().await;
        let web = workloads.into_iter().find(|w| w.spiffe_id == WEB)?;
        (web.last_nack == bounded).then_some(())
    })
    .await;

    drop(tx);
    drop(snapshots);
    eventually_async("the stream to show as disconnected", || async {
        let workloads = cp.workloads().await;
        workloads
            .iter()
            .any(|w| w.spiffe_id == WEB && !w.connected)
            .then_some(())
    })
    .await;
}

/// A Watch request past [`MAX_WATCH_REQUEST_BYTES`] is refused with
/// RESOURCE_EXHAUSTED naming the call and the limit, whether it is the
/// Subscribe or a NACK later in the stream, which otherwise would end as
/// if the control plane had nothing more to say. A refused Subscribe is
/// logged once as a warning naming the caller and why.
#[tokio::test]
async fn an_oversized_watch_request_is_refused_naming_the_limit() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let too_large = format!(
        "a Watch request may be at most {MAX_WATCH_REQUEST_BYTES} bytes; this one is larger"
    );

    let huge = "9".repeat(MAX_WATCH_REQUEST_BYTES + 1);
    let (tx, rx) = mpsc::channel(1);
    tx.send(subscribe(&huge)).await.unwrap();
    let err = discovery_client(&cp, Some(&web))
        .await
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), too_large);
    // The control plane's operator is told too, once.
    let refused = |l: &str| {
        l.contains("WARN")
            && l.contains("discovery stream refused: no valid Subscribe")
            && l.contains(&format!("spiffe_id={WEB}"))
            && l.contains(&too_large)
    };
    cp.wait_for_line("the refused Subscribe logged", refused);
    assert_eq!(cp.log().lines().filter(|l| refused(l)).count(), 1);

    let (tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7001").await;
    let first = snapshots.message().await.unwrap().expect("a snapshot");
    tx.send(WatchRequest {
        kind: Some(Kind::Nack(Nack {
            version: first.version,
            reason: "x".repeat(MAX_WATCH_REQUEST_BYTES + 1),
        })),
    })
    .await
    .unwrap();
    let err = snapshots.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), too_large);
}

/// A message of `bytes` as gRPC frames it: not compressed, its length,
/// then the bytes.
fn grpc_frame(bytes: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(bytes);
    framed.into()
}

/// A field of wire type 7, which protobuf does not have: a valid gRPC
/// message that is no `WatchRequest`.
const NOT_A_WATCH_REQUEST: &[u8] = &[0x0f, 0xff, 0xff];

/// A Watch of `svid` over a raw HTTP/2 stream, its request body sending
/// `first`: the answer's head, and the sender of the request's body.
async fn raw_watch(
    cp: &ControlPlane,
    svid: &Svid,
    first: Bytes,
) -> (http::Response<hyper::body::Incoming>, raw_grpc::BodySender) {
    let path = "/trellis.discovery.v1.Discovery/Watch";
    let (answer, body) = raw_grpc::call(cp, Some(svid), path, first).await;
    assert_eq!(answer.status(), http::StatusCode::OK);
    (answer, body)
}

/// The status a Watch's answer ends with: in its headers when it ended
/// before its first message, else in its trailers, after all it sent.
async fn ended_with(answer: http::Response<hyper::body::Incoming>) -> tonic::Status {
    if let Some(status) = tonic::Status::from_header_map(answer.headers()) {
        return status;
    }
    let ended = answer.into_body().collect().await.expect("the stream ends");
    let trailers = ended.trailers().cloned().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a status in the trailers")
}

/// Bytes that are a gRPC message but no `WatchRequest` end a Watch with
/// INVALID_ARGUMENT saying which message could not be decoded and why,
/// whether they come first or after the Subscribe (then logged as a
/// warning naming the sidecar), instead of a stream that ends with OK
/// and tells the sidecar nothing.
#[tokio::test]
async fn a_watch_message_that_does_not_decode_is_refused_naming_it() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;

    let (answer, _body) = raw_watch(&cp, &web, grpc_frame(NOT_A_WATCH_REQUEST)).await;
    let status = ended_with(answer).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let reason = "could not be decoded: failed to decode Protobuf message: invalid wire type";
    assert!(
        status.message().starts_with(&format!(
            "the first message of a Watch (its Subscribe) {reason}"
        )),
        "{status:?}"
    );

    let (answer, body) = raw_watch(&cp, &web, grpc_frame(&subscribe("").encode_to_vec())).await;
    let mut answer = answer.into_body();
    // The first snapshot, then the message that does not decode.
    let first = answer.frame().await.expect("a snapshot").expect("a frame");
    assert!(first.is_data(), "{first:?}");
    body.send(Ok(Frame::data(grpc_frame(NOT_A_WATCH_REQUEST))))
        .await
        .unwrap();
    let status = ended_with(http::Response::new(answer)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with(&format!("a Watch message after the Subscribe {reason}")),
        "{status:?}"
    );
    let line = cp.wait_for_line("the warning", |l| {
        l.contains("ending a discovery stream: a message after the Subscribe could not be decoded")
    });
    assert!(line.contains("WARN") && line.contains(WEB), "{line}");
    assert!(line.contains("invalid wire type"), "{line}");
    cp.wait_for_line("the stream's end", |l| {
        l.contains("discovery stream closed") && l.contains("undecodable message")
    });
}

/// A gRPC message whose length prefix announces 64 bytes of which only
/// `bytes` follow: cut short once the request stream ends.
fn truncated_frame(bytes: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&64u32.to_be_bytes());
    framed.extend_from_slice(bytes);
    framed.into()
}

/// A Watch of `svid` that sent its Subscribe and received its first
/// snapshot: the rest of the answer, and the sender of the request's body.
async fn subscribed_watch(
    cp: &ControlPlane,
    svid: &Svid,
) -> (hyper::body::Incoming, raw_grpc::BodySender) {
    let (answer, body) = raw_watch(cp, svid, grpc_frame(&subscribe("").encode_to_vec())).await;
    let mut answer = answer.into_body();
    let first = answer.frame().await.expect("a snapshot").expect("a frame");
    assert!(first.is_data(), "{first:?}");
    (answer, body)
}

/// A Watch message cut short by the end of the request stream, which
/// tonic's decoder cannot read as one, ends the Watch with INVALID_ARGUMENT
/// saying which message and why (a later one logged as a warning naming
/// the sidecar), instead of INTERNAL for the Subscribe and a stream that
/// ends with OK, telling the sidecar nothing, for a later one.
#[tokio::test]
async fn a_watch_message_that_cannot_be_read_is_refused_naming_it() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let cut_short = "could not be read: Unexpected EOF decoding stream.";

    let subscribe_cut_short = truncated_frame(&subscribe("").encode_to_vec()[..2]);
    let path = "/trellis.discovery.v1.Discovery/Watch";
    let answer = raw_grpc::call_ended(&cp, Some(&web), path, subscribe_cut_short).await;
    let status = ended_with(answer).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        format!("the first message of a Watch (its Subscribe) {cut_short}")
    );

    let (answer, body) = subscribed_watch(&cp, &web).await;
    body.send(Ok(Frame::data(truncated_frame(&[0x12, 0x02]))))
        .await
        .unwrap();
    drop(body);
    let status = ended_with(http::Response::new(answer)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        format!("a Watch message after the Subscribe {cut_short}")
    );
    let line = cp.wait_for_line("the warning", |l| {
        l.contains("ending a discovery stream: a message after the Subscribe could not be read")
    });
    assert!(line.contains("WARN") && line.contains(WEB), "{line}");
    assert!(line.contains("Unexpected EOF decoding stream."), "{line}");
    cp.wait_for_line("the stream's end", |l| {
        l.contains("discovery stream closed") && l.contains("unreadable message")
    });
}

/// A Watch message flagged compressed, though the Watch negotiated no
/// encoding, ends the Watch with INVALID_ARGUMENT saying so, instead of a
/// stream that ends with OK.
#[tokio::test]
async fn a_watch_message_flagged_compressed_without_an_encoding_is_refused() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;

    let (answer, body) = subscribed_watch(&cp, &web).await;
    let mut compressed = grpc_frame(&subscribe("").encode_to_vec()).to_vec();
    compressed[0] = 1;
    body.send(Ok(Frame::data(compressed.into()))).await.unwrap();
    let status = ended_with(http::Response::new(answer)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        "a Watch message after the Subscribe could not be read: protocol error: received \
         message with compressed-flag but no grpc-encoding was specified"
    );
}

/// A Watch its sidecar resets (RST_STREAM, INTERNAL_ERROR, which tonic
/// reads as INTERNAL too) is a broken stream, ended quietly: not taken
/// for a message of the sidecar's that could not be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_reset_by_its_sidecar_is_not_taken_for_an_unreadable_message() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;

    let (_answer, body) = subscribed_watch(&cp, &web).await;
    body.send(Err(std::io::Error::other("the sidecar gives up")))
        .await
        .unwrap();
    let line = cp.wait_for_line("the stream's end", |l| {
        l.contains("discovery stream closed")
    });
    assert!(line.contains("stream broken"), "{line}");
    assert!(!cp.log().contains("could not be read"), "{}", cp.log());
}

#[tokio::test]
async fn watch_requires_an_svid_and_a_subscribe_first() {
    let cp = ControlPlane::start(&[]);
    let (tx, rx) = mpsc::channel(1);
    tx.send(subscribe("")).await.unwrap();
    let err = discovery_client(&cp, None)
        .await
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let web = enroll(&cp, WEB, "").await;
    let (tx, rx) = mpsc::channel(1);
    tx.send(WatchRequest {
        kind: Some(Kind::Ack(Ack {
            version: 1,
            warnings: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let err = discovery_client(&cp, Some(&web))
        .await
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// SIGTERM ends the open Watch streams first, and only then stops
/// listening: the log names the open streams, closes each, and says the
/// listener stopped after the last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_watch_streams_before_it_stops_listening() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7003").await;
    let (tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7003").await;
    snapshots
        .message()
        .await
        .unwrap()
        .expect("a first snapshot");
    let log = cp.log.clone();
    let stopping = tokio::spawn(cp.stop_async());
    match snapshots.message().await {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(status.message(), "control plane shutting down");
        }
        Ok(None) => {}
        Ok(Some(s)) => panic!("unexpected snapshot {s:?} while stopping"),
    }
    drop(tx);
    assert!(stopping.await.unwrap().success(), "SIGTERM exits 0");

    let log = ControlPlane::log_after_exit(&log);
    let at = |what: &str| {
        log.lines()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?} in:\n{log}"))
    };
    let told = at("shutting down: ending the Watch streams");
    assert!(
        log.lines().nth(told).unwrap().contains("watch_streams=1"),
        "{log}"
    );
    let closed = at("discovery stream closed");
    assert!(
        log.lines()
            .nth(closed)
            .unwrap()
            .contains("reason=\"control plane shutting down\""),
        "{log}"
    );
    let listener = at("no new connections");
    assert!(told < closed && closed < listener, "out of order:\n{log}");
    assert!(!log.contains("still open at their deadline"), "{log}");
}

/// A sidecar that stopped reading its Watch stream does not hold a
/// stopping control plane: once its flow-control window and the stream's
/// queue are full, the stream waits on it, and SIGTERM must still end
/// that stream at once rather than at the 5 s deadline for streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_stopped_reading_does_not_hold_the_shutdown() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7004").await;
    // A client whose window lets 1 KiB of the stream in before it reads.
    let (addr, tls) = (cp.grpc.clone(), Arc::new(cp.client_config(Some(&web))));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move {
                let stream = trellis_core::grpc::dial(&addr, tls).await?;
                std::io::Result::Ok(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(subscribe("127.0.0.1:7004")).await.unwrap();
    let _never_read = DiscoveryClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch opens")
        .into_inner();
    // Each policy selecting web is a snapshot of its own, each larger than
    // the last: far more than the window and the queue hold.
    let mut admin = cp.admin_client().await;
    for i in 0..40 {
        let policy = policy::allow(&format!("p{i}"), WEB, DB, 8000 + i);
        policy::apply(&mut admin, &policy, false).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }

    let log = cp.log.clone();
    assert!(cp.stop_async().await.success(), "SIGTERM exits 0");
    let log = ControlPlane::log_after_exit(&log);
    assert!(
        log.lines().any(|l| l.contains("discovery stream closed")
            && l.contains("reason=\"control plane shutting down\"")),
        "{log}"
    );
    assert!(!log.contains("still open at their deadline"), "{log}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_reconnecting_after_a_restart_is_not_resent_what_it_holds() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7004").await;
    let (tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7004").await;
    let held = snapshots
        .message()
        .await
        .unwrap()
        .expect("a first snapshot");
    drop((tx, snapshots));
    let tmp = cp.tmp.clone();
    assert!(cp.stop_async().await.success());

    let cp = ControlPlane::start_in(tmp, &[]);
    let (tx, mut snapshots) =
        watch_from(&cp, &web, resubscribe("127.0.0.1:7004", &held, false)).await;
    let listed = eventually_async("the held version to count as acked", || async {
        let workloads = cp.workloads().await;
        workloads
            .into_iter()
            .find(|w| w.spiffe_id == WEB && w.connected && w.acked_version == held.version)
    })
    .await;
    assert_eq!(listed.address, "127.0.0.1:7004");
    assert_eq!(
        (listed.acked_version_epoch, listed.synced_version_epoch),
        (held.version_epoch, held.version_epoch),
        "the held version's epoch, set before the restart"
    );
    // The log says the held epoch as trellisctl and /config show it.
    let said = format!(
        "last_version={} last_version_epoch={:016x}",
        held.version, held.version_epoch
    );
    eventually("the stream's opening logged with its epoch in hex", || {
        cp.log()
            .lines()
            .any(|l| l.contains("discovery stream opened") && l.contains(&said))
            .then_some(())
    });

    enroll(&cp, DB, "127.0.0.1:7005").await;
    let next = snapshots.message().await.unwrap().expect("the next change");
    assert!(next.version > held.version, "versions survive the restart");
    assert_eq!(next.endpoints.len(), 2);
    drop(tx);
}

/// A database restored from an older copy counts again through snapshot
/// versions it had set before, with other content. A sidecar that holds
/// one of them, with a policy the restore took away, and reconnects once
/// the restored database has set that version again must be sent what the
/// version holds now: taken to hold it, it would be sent nothing, and keep
/// enforcing the policy until a change reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_a_restored_database_sets_again_is_not_taken_for_the_one_held() {
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7006").await;
    let tmp = cp.tmp.clone();
    let database = cp.state_dir.join("trellis.redb");
    assert!(cp.stop_async().await.success());
    let backup = tmp.path().join("backup.redb");
    std::fs::copy(&database, &backup).unwrap();

    // After the backup, an ALLOW for web, which web takes.
    let cp = ControlPlane::start_in(tmp.clone(), &[]);
    let mut admin = cp.admin_client().await;
    policy::apply(&mut admin, &policy::allow("revoked", WEB, DB, 8080), false)
        .await
        .unwrap();
    let (tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7006").await;
    let held = snapshots.message().await.unwrap().expect("a snapshot");
    assert_eq!(held.policies.len(), 1);
    assert_ne!(held.version_epoch, 0);
    drop((tx, snapshots));
    assert!(cp.stop_async().await.success());

    // The backup restored: the ALLOW is gone, and the counter is behind
    // the version web holds until writes that do not concern web bring it
    // there again.
    std::fs::copy(&backup, &database).unwrap();
    let cp = ControlPlane::start_in(tmp, &[]);
    let mut admin = cp.admin_client().await;
    let mut version = cp.list_workloads().await.snapshot_version;
    assert!(version < held.version, "{version} {}", held.version);
    for port in 9000.. {
        if version >= held.version {
            break;
        }
        let other = policy::allow("other", DB, WEB, port);
        version = policy::apply(&mut admin, &other, false)
            .await
            .unwrap()
            .snapshot_version;
    }
    assert_eq!(version, held.version, "the restored database sets it again");

    let (tx, mut snapshots) =
        watch_from(&cp, &web, resubscribe("127.0.0.1:7006", &held, true)).await;
    // Taken to hold the version, web would be sent nothing, and listed as
    // having acknowledged it.
    let taken_as_held = async {
        loop {
            let workloads = cp.workloads().await;
            if workloads
                .iter()
                .any(|w| w.spiffe_id == WEB && w.acked_version == held.version)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let first = tokio::select! {
        message = snapshots.message() => message.unwrap().expect("a snapshot"),
        () = taken_as_held => panic!(
            "web was taken to hold version {} and sent nothing: it keeps the ALLOW",
            held.version
        ),
    };
    assert_eq!(first.version, held.version);
    assert_ne!(first.version_epoch, held.version_epoch);
    assert!(first.policies.is_empty(), "{:?}", first.policies);
    assert_eq!(first.endpoints_version, 0, "web holds no endpoints of it");
    assert_eq!(first.endpoints.len(), 1);
    tx.send(WatchRequest {
        kind: Some(Kind::Ack(Ack {
            version: first.version,
            warnings: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let listed = eventually_async("web to be synced", || async {
        let listed = cp.list_workloads().await;
        let web = listed.workloads.iter().find(|w| w.spiffe_id == WEB)?;
        (web.acked_version == held.version && web.synced_version == listed.snapshot_version)
            .then_some(listed)
    })
    .await;
    // "The same" version as before the restore: only the epoch listed with
    // it tells the operator that web was sent other content.
    let web = listed
        .workloads
        .iter()
        .find(|w| w.spiffe_id == WEB)
        .unwrap();
    assert_eq!(web.acked_version_epoch, first.version_epoch);
    assert_eq!(listed.snapshot_version_epoch, first.version_epoch);
    drop(tx);
}

/// A workload that goes away stops renewing: when its certificate ends it
/// leaves the mesh endpoints, in a new snapshot version.
#[tokio::test]
async fn an_endpoint_leaves_when_its_certificate_expires() {
    let cp = ControlPlane::start(&["--default-policy", "allow-mesh", "--cert-ttl", "10s"]);
    let web = enroll(&cp, WEB, "127.0.0.1:7001").await;
    let (_tx, mut snapshots) = watch(&cp, &web, "127.0.0.1:7001").await;
    let first = snapshots
        .message()
        .await
        .unwrap()
        .expect("a first snapshot");
    assert_eq!(first.endpoints.len(), 1);

    // db registers and never renews.
    enroll(&cp, DB, "127.0.0.1:7002").await;
    let mut last = first;
    let mut saw_db = false;
    // Each snapshot is a change: db arriving, then the certificates (web's
    // too, which is not renewed here) ending; the control plane removes each
    // endpoint at its expiry. Every wait is bounded.
    while let Some(next) =
        tokio::time::timeout(std::time::Duration::from_secs(60), snapshots.message())
            .await
            .expect("a snapshot within 60 s")
            .unwrap()
    {
        assert!(next.version > last.version);
        let has_db = next.endpoints.iter().any(|e| e.spiffe_id == DB);
        saw_db |= has_db;
        last = next;
        if saw_db && !has_db {
            break;
        }
    }
    assert!(saw_db, "db was an endpoint while its certificate was valid");
    assert!(
        last.endpoints.iter().all(|e| e.spiffe_id != DB),
        "db left the endpoints: {:?}",
        last.endpoints
    );
}

/// The snapshots leave pre-encoded, in parts; a client that knows only the
/// `.proto` (grpcurl, Go's protobuf, the descriptor from reflection) must
/// decode them as one `Snapshot`.
#[tokio::test]
async fn grpcurl_decodes_a_watch_snapshot() {
    use std::io::{BufRead, Write};
    use std::process::{Command, Stdio};
    if Command::new("grpcurl").arg("-version").output().is_err() {
        common::machine::skip("skipped: grpcurl not installed");
        return;
    }
    let cp = ControlPlane::start(&[]);
    let web = enroll(&cp, WEB, "127.0.0.1:7131").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("web.pem"), dir.path().join("web.key"));
    write_pem(&cert, web.chain[0].as_ref());
    std::fs::write(&key, web.key.serialize_pem()).unwrap();
    // Messages come from stdin, which stays open, so the stream does too.
    let mut grpcurl = Command::new("grpcurl")
        .arg("-cacert")
        .arg(cp.state_dir.join("bundle.pem"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .args(["-d", "@"])
        .arg(format!("localhost:{}", cp.port()))
        .arg("trellis.discovery.v1.Discovery/Watch")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = grpcurl.stdin.take().unwrap();
    writeln!(
        stdin,
        r#"{{"subscribe": {{"inbound_address": "127.0.0.1:7131"}}}}"#
    )
    .unwrap();
    stdin.flush().unwrap();
    // grpcurl prints each message as indented JSON ending in a "}" line.
    let stdout = grpcurl.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut printed = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let end = line == "}";
            printed.push_str(&line);
            printed.push('\n');
            if end {
                break;
            }
        }
        printed
    });
    let deadline = std::time::Instant::now() + PATIENCE;
    while !reader.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let done = reader.is_finished();
    let _ = grpcurl.kill();
    let output = grpcurl.wait_with_output().unwrap();
    assert!(
        done,
        "grpcurl printed no snapshot in time: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = reader.join().unwrap();
    drop(stdin);
    for expected in [
        r#""spiffeId": "spiffe://cluster.local/ns/default/sa/web""#,
        r#""address": "127.0.0.1:7131""#,
        r#""defaultPolicy": "#,
        r#""trustBundle": ["#,
        r#""version": "#,
    ] {
        assert!(
            printed.contains(expected),
            "{expected} missing from the snapshot grpcurl decoded:\n{printed}"
        );
    }
}

#[tokio::test]
async fn every_sidecar_is_sent_the_mesh_s_revocations_as_they_change() {
    let cp = ControlPlane::start(&[]);
    enroll(&cp, WEB, "127.0.0.1:7001").await;
    let db = enroll(&cp, DB, "127.0.0.1:7002").await;
    let (_tx, mut snapshots) = watch(&cp, &db, "127.0.0.1:7002").await;
    let first = snapshots
        .message()
        .await
        .unwrap()
        .expect("a first snapshot");
    assert!(first.revocations.is_empty(), "{:?}", first.revocations);

    let out = cp.ctl(&["identity", "revoke", WEB]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = snapshots
        .message()
        .await
        .unwrap()
        .expect("a pushed snapshot");
    assert!(revoked.version > first.version);
    assert_eq!(revoked.revocations.len(), 1, "{:?}", revoked.revocations);
    assert_eq!(revoked.revocations[0].spiffe_id, WEB);
    let at = revoked.revocations[0].revoked_at_unix;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - 60..=now).contains(&at), "revoked at {at}, now {now}");

    // A sidecar that reconnects holding the snapshot before the revocation,
    // and takes only what changed in the endpoints, is sent the
    // revocations all the same.
    let (_again, mut reconnected) =
        watch_from(&cp, &db, resubscribe("127.0.0.1:7002", &first, true)).await;
    let caught_up = reconnected.message().await.unwrap().expect("a snapshot");
    assert_eq!(caught_up.version, revoked.version);
    assert_eq!(caught_up.revocations, revoked.revocations);

    let out = cp.ctl(&["identity", "unrevoke", WEB]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unrevoked = snapshots
        .message()
        .await
        .unwrap()
        .expect("a pushed snapshot");
    assert!(unrevoked.version > revoked.version);
    assert!(
        unrevoked.revocations.is_empty(),
        "{:?}",
        unrevoked.revocations
    );
}
