//! A local HTTPS server standing in for the Kubernetes API server, for the
//! Kubernetes store's tests. No Kubernetes API server can run on these
//! machines.
//!
//! It answers kube-rs's requests with the response shapes kube-apiserver
//! uses: lists (`kind: ...List` with `metadata.resourceVersion`) from
//! recorded documents in `fixtures/k8s/store/`, watches as newline-delimited
//! events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, an `ERROR` carrying a
//! `410 Gone` Status) that stay open so a test can publish more, `v1`
//! Status documents for refusals, and the CA Secret as a small stateful
//! object (GET, POST with 409 AlreadyExists, PUT with 409 Conflict on a
//! stale resourceVersion). Writes of policy objects (POST, PUT, JSON Patch,
//! DELETE) are echoed with a new resourceVersion and published to every
//! open watch, as the API server would. Every request is recorded.
#![allow(dead_code)]

pub mod store;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use trellis_proto::identity::v1::CertifyRequest;
use trellis_proto::identity::v1::certify_request::Proof;

use crate::common::serving::{Answering, ApiServer};

pub const POLICIES: &str = "/apis/trellis.io/v1alpha1/authorizationpolicies";
pub const RATE_LIMITS: &str = "/apis/trellis.io/v1alpha1/ratelimitpolicies";
pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const TOKENREVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const CA_NAMESPACE: &str = "trellis-system";
pub const CA_SECRET: &str = "trellis-ca";
const SECRETS: &str = "/api/v1/namespaces/trellis-system/secrets";

pub fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

/// One watch event line.
pub fn event(kind: &str, object: &Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

/// A `v1` Status as the API server sends it with an error code.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
    /// The HTTP status it was answered with.
    pub status: u16,
}

#[derive(Default)]
struct State {
    /// Per collection path: list answers in order; the last one repeats.
    lists: HashMap<String, VecDeque<(u16, Value)>>,
    /// Per collection path: lines each watch request starts with, in order;
    /// once used up, watches start empty. Every watch then stays open.
    watch_scripts: HashMap<String, VecDeque<Vec<String>>>,
    /// Open watches per collection path.
    watchers: HashMap<String, Vec<mpsc::UnboundedSender<String>>>,
    secret: Option<Value>,
    /// Objects written through the API, by path.
    objects: HashMap<String, Value>,
    next_rv: u64,
    /// When set, policy writes are answered with this instead.
    refuse_writes: Option<(u16, Value)>,
    /// Per collection path: the status every list and watch of it is
    /// answered with, while it fails.
    failing: HashMap<String, u16>,
    /// When set, the answer to the next policy write (already stored and
    /// published) leaves only once this receives.
    hold_answer: Option<oneshot::Receiver<()>>,
    /// Per token: the TokenReview answered instead of the recorded one.
    reviews: HashMap<String, Value>,
    /// When set, creating a Secret is forbidden, as a Role without
    /// `create` on Secrets has it.
    forbid_secret_create: bool,
    /// When set, the CA Secret another replica creates just before the
    /// next create of it arrives.
    created_first: Option<Value>,
    requests: Vec<Recorded>,
}

pub struct FakeKube {
    server: ApiServer,
    state: Arc<Mutex<State>>,
}

impl std::ops::Deref for FakeKube {
    type Target = ApiServer;

    fn deref(&self) -> &ApiServer {
        &self.server
    }
}

impl FakeKube {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(State {
            next_rv: 50_000,
            ..State::default()
        }));
        let shared = state.clone();
        // As the kubelet writes it: no trailing newline.
        let server = ApiServer::start("control-plane-sa-token", Answering::Yes, move |req| {
            let state = shared.clone();
            async move { serve(req, &state).await }
        })
        .await;
        Self { server, state }
    }

    /// Answers lists of `path` with `answers` in order, the last repeating.
    pub fn lists(&self, path: &str, answers: Vec<(u16, Value)>) {
        self.state
            .lock()
            .unwrap()
            .lists
            .insert(path.to_owned(), answers.into());
    }

    /// Answers the first list of pods with none, then as set before: a
    /// first install, where no pod has a sidecar yet when the first
    /// replica looks for one before it generates the mesh's root, and the
    /// pods are injected once its webhook serves. Call after [`Self::lists`]
    /// of [`PODS`].
    pub fn first_install(&self) {
        let none = json!({"kind": "PodList", "apiVersion": "v1",
                          "metadata": {"resourceVersion": "48100"}, "items": []});
        let mut state = self.state.lock().unwrap();
        let answers = state.lists.entry(PODS.to_owned()).or_default();
        assert!(!answers.is_empty(), "the pods are listed");
        answers.push_front((200, none));
    }

    /// Starts the next watch of `path` with these event lines.
    pub fn script_watch(&self, path: &str, lines: Vec<String>) {
        self.state
            .lock()
            .unwrap()
            .watch_scripts
            .entry(path.to_owned())
            .or_default()
            .push_back(lines);
    }

    /// Fails `path` as an API server that lost its storage would: its open
    /// watches end, and every later list and watch of it is answered with
    /// `code` and a Status, until [`Self::recover`].
    pub fn fail(&self, path: &str, code: u16) {
        let mut state = self.state.lock().unwrap();
        state.watchers.remove(path);
        state.failing.insert(path.to_owned(), code);
    }

    /// Answers lists and watches of `path` again.
    pub fn recover(&self, path: &str) {
        self.state.lock().unwrap().failing.remove(path);
    }

    /// Sends an event line to every open watch of `path`.
    pub fn publish(&self, path: &str, line: String) {
        publish(&mut self.state.lock().unwrap(), path, line);
    }

    /// Sends an event line to the `nth` watch of `path` still open, in
    /// the order they were opened: one watcher sees a change before
    /// another does, as two clients of one API server can.
    pub fn publish_to(&self, path: &str, nth: usize, line: String) {
        let mut state = self.state.lock().unwrap();
        let open = state.watchers.entry(path.to_owned()).or_default();
        open.retain(|w| !w.is_closed());
        open[nth].send(line).expect("the watch is open");
    }

    /// Open watches of `path`.
    pub fn watching(&self, path: &str) -> usize {
        let mut state = self.state.lock().unwrap();
        let open = state.watchers.entry(path.to_owned()).or_default();
        open.retain(|w| !w.is_closed());
        open.len()
    }

    /// Answers every later policy write with `status` and this Status.
    pub fn refuse_writes(&self, status: u16, answer: Value) {
        self.state.lock().unwrap().refuse_writes = Some((status, answer));
    }

    /// Holds back the answer to the next policy write, which is stored and
    /// published to the watches at once, until the returned sender sends
    /// (or is dropped): the writer's watch sees its write, and whatever
    /// follows, before the writer has its answer.
    pub fn hold_next_answer(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.state.lock().unwrap().hold_answer = Some(rx);
        tx
    }

    /// Deletes a stored policy object as another client (kubectl) would:
    /// the deletion gets a new resourceVersion and is published.
    pub fn delete(&self, key: &str) {
        let mut state = self.state.lock().unwrap();
        let held = state.objects.remove(key).expect("a stored object");
        let gone = stamp(&mut state, held, None);
        let watched = watched_path(key);
        publish(&mut state, watched, event("DELETED", &gone));
    }

    /// Stores a policy object as another client (Helm, kubectl) would
    /// create it, with whatever metadata it carries, and publishes it.
    pub fn create(&self, object: Value) -> Value {
        self.store(object, true)
    }

    /// Stores a policy object as another replica would create it, whose
    /// event has not reached the watches yet (none is published).
    pub fn create_unseen(&self, object: Value) -> Value {
        self.store(object, false)
    }

    fn store(&self, object: Value, published: bool) -> Value {
        let mut state = self.state.lock().unwrap();
        let stored = stamp(&mut state, object, Some(1));
        let key = stored_key(&stored);
        state.objects.insert(key.clone(), stored.clone());
        if published {
            publish(&mut state, watched_path(&key), event("ADDED", &stored));
        }
        stored
    }

    /// The stored policy object `key` (`plural/namespace/name`).
    pub fn object(&self, key: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(key).cloned()
    }

    /// Changes a stored policy object as a writer this test does not
    /// watch would: a new resourceVersion, no event.
    pub fn change_unseen(&self, key: &str) {
        let mut state = self.state.lock().unwrap();
        let object = state.objects.get(key).cloned().expect("a stored object");
        let changed = stamp(&mut state, object, None);
        state.objects.insert(key.to_owned(), changed);
    }

    /// Changes the `spec` of a stored policy object as another replica
    /// would, whose event has not reached the watches yet (none is
    /// published): a new resourceVersion and generation.
    pub fn change_spec_unseen(&self, key: &str, change: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().unwrap();
        let mut object = state.objects.get(key).cloned().expect("a stored object");
        change(&mut object["spec"]);
        let generation = object["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        let changed = stamp(&mut state, object, Some(generation));
        state.objects.insert(key.to_owned(), changed);
    }

    /// Answers TokenReviews of `token` with `review` instead of the
    /// recorded review of a `shop/web` token: pods of several service
    /// accounts.
    pub fn review(&self, token: &str, review: Value) {
        let mut state = self.state.lock().unwrap();
        state.reviews.insert(token.to_owned(), review);
    }

    /// The flags that run `trellis-control-plane` on the Kubernetes store
    /// against this stand-in: store, identity provider, API address, CA and
    /// token, and the CA Secret.
    pub fn control_plane_flags(&self) -> Vec<String> {
        [
            "--store",
            "kubernetes",
            "--ca-secret",
            CA_SECRET,
            "--namespace",
            CA_NAMESPACE,
            "--identity-provider",
            "kubernetes",
            "--kube-api",
            &self.url(),
            "--kube-ca",
            &self.ca().display().to_string(),
            "--kube-token-file",
            &self.token_file().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Answers a creation of a Secret with the recorded 403, as a Role
    /// without `create` on Secrets does (the chart's before it stopped
    /// rendering the CA Secret: `get` and `update` of it only).
    pub fn forbid_secret_create(&self) {
        self.state.lock().unwrap().forbid_secret_create = true;
    }

    /// Stores `secret` as the CA Secret when the next create of it
    /// arrives, before answering it: another replica, which also found no
    /// Secret, created it first, and this create is a 409 AlreadyExists.
    pub fn create_secret_first(&self, secret: Value) {
        self.state.lock().unwrap().created_first = Some(secret);
    }

    pub fn set_secret(&self, secret: Option<Value>) {
        self.state.lock().unwrap().secret = secret;
    }

    pub fn secret(&self) -> Option<Value> {
        self.state.lock().unwrap().secret.clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The first `method` request it received; there must be one.
    pub fn first(&self, method: &str) -> Recorded {
        self.requests()
            .into_iter()
            .find(|r| r.method == method)
            .unwrap_or_else(|| panic!("no {method} request"))
    }
}

fn publish(state: &mut State, path: &str, line: String) {
    if let Some(open) = state.watchers.get_mut(path) {
        open.retain(|w| w.send(line.clone()).is_ok());
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

async fn serve(req: Request<Incoming>, state: &Mutex<State>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let (response, hold) = {
        let mut state = state.lock().unwrap();
        let response = respond(&mut state, &parts, &path, &query, watch, body);
        let write = parts.method != Method::GET
            && path.starts_with("/apis/trellis.io/v1alpha1/namespaces/");
        (
            response,
            if write {
                state.hold_answer.take()
            } else {
                None
            },
        )
    };
    if let Some(hold) = hold {
        let _ = hold.await;
    }
    response
}

fn respond(
    state: &mut State,
    parts: &http::request::Parts,
    path: &str,
    query: &str,
    watch: bool,
    body: Value,
) -> Response<Body> {
    let path = path.to_owned();
    let query = query.to_owned();
    let failing = state.failing.get(&path).copied();
    let (status, response) = if let Some(code) = failing.filter(|_| parts.method == Method::GET) {
        let message = "etcdserver: request timed out";
        (
            code,
            json_response(code, &status(code, "InternalError", message)),
        )
    } else if watch {
        let mut lines = state
            .watch_scripts
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        state.watchers.entry(path.clone()).or_default().push(tx);
        let scripted = futures::stream::iter(std::mem::take(&mut lines));
        let live = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let frames = scripted
            .chain(live)
            .map(|line| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{line}\n")))));
        let response = Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap();
        (200, response)
    } else {
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let (status, value) = answer(state, &parts.method, &path, content_type, &body);
        (status, json_response(status, &value))
    };
    state.requests.push(Recorded {
        method: parts.method.to_string(),
        path,
        query,
        body,
        status,
    });
    response
}

fn answer(
    state: &mut State,
    method: &Method,
    path: &str,
    content_type: &str,
    body: &Value,
) -> (u16, Value) {
    let secret = format!("{SECRETS}/{CA_SECRET}");
    if *method == Method::GET
        && let Some(answers) = state.lists.get_mut(path)
    {
        let answer = if answers.len() > 1 {
            answers.pop_front().unwrap()
        } else {
            answers.front().cloned().unwrap_or((200, json!({})))
        };
        return answer;
    }
    if path == TOKENREVIEWS && *method == Method::POST {
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        if let Some(review) = state.reviews.get(token) {
            return (201, review.clone());
        }
        return (201, fixture_json("tokenreview/authenticated.json"));
    }
    if path == secret && *method == Method::GET {
        return match &state.secret {
            Some(s) => (200, s.clone()),
            None => (404, fixture_json("store/secret-not-found-404.json")),
        };
    }
    if path == SECRETS && *method == Method::POST {
        if state.forbid_secret_create {
            return (403, fixture_json("store/secret-create-forbidden-403.json"));
        }
        if let Some(first) = state.created_first.take() {
            let stored = stamp(state, first, None);
            state.secret = Some(stored);
        }
        if state.secret.is_some() {
            let message = format!("secrets \"{CA_SECRET}\" already exists");
            return (409, status(409, "AlreadyExists", &message));
        }
        let stored = stamp(state, body.clone(), None);
        state.secret = Some(stored.clone());
        return (201, stored);
    }
    if path == secret && *method == Method::PUT {
        let held = state
            .secret
            .as_ref()
            .map(|s| s["metadata"]["resourceVersion"].clone());
        if held.is_none() || held.as_ref() != Some(&body["metadata"]["resourceVersion"]) {
            let message = format!(
                "Operation cannot be fulfilled on secrets \"{CA_SECRET}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            );
            return (409, status(409, "Conflict", &message));
        }
        let stored = stamp(state, body.clone(), None);
        state.secret = Some(stored.clone());
        return (200, stored);
    }
    if let Some(rest) = path.strip_prefix("/apis/trellis.io/v1alpha1/namespaces/") {
        return write_policy(state, method, path, rest, content_type, body);
    }
    let message = "the server could not find the requested resource";
    (404, status(404, "NotFound", message))
}

/// GET, POST, PUT, PATCH and DELETE of one AuthorizationPolicy or
/// RateLimitPolicy: writes are echoed with a new resourceVersion (and
/// generation), published to the watches of its kind. A PATCH is a JSON Patch, as the API server applies
/// one to a custom resource: a resourceVersion it sets is the update's
/// precondition (409 when the object is newer), one that changes nothing
/// writes nothing, and the generation moves only with the `spec`.
fn write_policy(
    state: &mut State,
    method: &Method,
    path: &str,
    rest: &str,
    content_type: &str,
    body: &Value,
) -> (u16, Value) {
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name) = match (method.as_str(), parts.as_slice()) {
        ("POST", [ns, plural]) => (
            *ns,
            *plural,
            body["metadata"]["name"].as_str().unwrap_or_default(),
        ),
        (_, [ns, plural, name]) => (*ns, *plural, *name),
        _ => return (404, status(404, "NotFound", "no such resource")),
    };
    if !matches!(plural, "authorizationpolicies" | "ratelimitpolicies") {
        return (404, status(404, "NotFound", "no such resource"));
    }
    let watched = watched_path(plural);
    if let Some(refusal) = state
        .refuse_writes
        .as_ref()
        .filter(|_| *method != Method::GET)
    {
        return refusal.clone();
    }
    let key = format!("{plural}/{namespace}/{name}");
    let held = state.objects.get(&key).cloned();
    let (code, kind, object) = match method.as_str() {
        "GET" => {
            return match held {
                Some(held) => (200, held),
                None => {
                    let message = format!("{plural}.trellis.io \"{name}\" not found");
                    (404, status(404, "NotFound", &message))
                }
            };
        }
        "POST" if held.is_some() => {
            let message = format!("{plural}.trellis.io \"{name}\" already exists");
            return (409, status(409, "AlreadyExists", &message));
        }
        "POST" => (201, "ADDED", stamp(state, body.clone(), Some(1))),
        "PUT" => {
            let Some(held) = held else {
                return (404, status(404, "NotFound", "not found"));
            };
            if held["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                return (409, status(409, "Conflict", "the object has been modified"));
            }
            let generation = held["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            (
                200,
                "MODIFIED",
                stamp(state, body.clone(), Some(generation)),
            )
        }
        "PATCH" => {
            let Some(held) = held else {
                let message = format!("{plural}.trellis.io \"{name}\" not found");
                return (404, status(404, "NotFound", &message));
            };
            if content_type != "application/json-patch+json" {
                let message = format!("the stand-in takes JSON Patches only, not {content_type}");
                return (415, status(415, "UnsupportedMediaType", &message));
            }
            let patch: json_patch::Patch = match serde_json::from_value(body.clone()) {
                Ok(patch) => patch,
                Err(e) => return (400, status(400, "BadRequest", &e.to_string())),
            };
            let mut patched = held.clone();
            if let Err(e) = json_patch::patch(&mut patched, &patch) {
                return (422, status(422, "Invalid", &e.to_string()));
            }
            if patched["metadata"]["resourceVersion"] != held["metadata"]["resourceVersion"] {
                return (409, status(409, "Conflict", "the object has been modified"));
            }
            if patched == held {
                return (200, held);
            }
            let generation = held["metadata"]["generation"].as_i64().unwrap_or(1)
                + i64::from(patched["spec"] != held["spec"]);
            (200, "MODIFIED", stamp(state, patched, Some(generation)))
        }
        "DELETE" => {
            let Some(held) = held else {
                let message = format!("{plural}.trellis.io \"{name}\" not found");
                return (404, status(404, "NotFound", &message));
            };
            let gone = stamp(state, held, None);
            state.objects.remove(&key);
            publish(state, watched, event("DELETED", &gone));
            return (200, gone);
        }
        _ => return (405, status(405, "MethodNotAllowed", path)),
    };
    state.objects.insert(key, object.clone());
    publish(state, watched, event(kind, &object));
    (code, object)
}

/// The watched collection of a policy kind, from its plural or from a
/// stored object's key (`plural/namespace/name`).
fn watched_path(plural_or_key: &str) -> &'static str {
    match plural_or_key.split('/').next() {
        Some("ratelimitpolicies") => RATE_LIMITS,
        _ => POLICIES,
    }
}

/// The key under which a policy object is stored: `plural/namespace/name`.
fn stored_key(object: &Value) -> String {
    let plural = match object["kind"].as_str() {
        Some("RateLimitPolicy") => "ratelimitpolicies",
        _ => "authorizationpolicies",
    };
    let meta = &object["metadata"];
    format!(
        "{plural}/{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

/// Gives an object the next resourceVersion (and a generation), as stored.
fn stamp(state: &mut State, mut object: Value, generation: Option<i64>) -> Value {
    state.next_rv += 1;
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(state.next_rv.to_string());
    if meta["uid"].is_null() {
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", state.next_rv));
    }
    if let Some(generation) = generation {
        meta["generation"] = json!(generation);
    }
    object
}

pub fn policies_list() -> Value {
    fixture_json("store/authorizationpolicies-list.json")
}

pub fn pods_list() -> Value {
    fixture_json("store/pods-list.json")
}

pub fn services_list() -> Value {
    fixture_json("store/services-list.json")
}

pub fn endpoint_slices_list() -> Value {
    fixture_json("store/endpointslices-list.json")
}

/// A fake answering lists of every kind the store watches with the
/// recorded policies, rate limits, pods, Services and EndpointSlices (a
/// store starts only once each kind is listed).
pub async fn recorded_cluster() -> FakeKube {
    let fake = FakeKube::start().await;
    fake.lists(POLICIES, vec![(200, policies_list())]);
    fake.lists(RATE_LIMITS, vec![(200, rate_limits_list())]);
    fake.lists(PODS, vec![(200, pods_list())]);
    fake.lists(SERVICES, vec![(200, services_list())]);
    fake.lists(ENDPOINT_SLICES, vec![(200, endpoint_slices_list())]);
    fake
}

/// The EndpointSlice `name` of `slices` at resource version `rv`, its
/// endpoint no longer ready, as when its pod's readiness probe fails.
pub fn unready(slices: &Value, name: &str, rv: u64) -> Value {
    let mut slice = item(slices, name, rv);
    slice["endpoints"][0]["conditions"] =
        json!({"ready": false, "serving": false, "terminating": false});
    slice
}

/// shop/web's certify request as its sidecar sends it in the recorded
/// cluster: `csr`, the pod's projected token and its address.
pub fn web_certify_request(csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        csr,
        // A projected token's shape (audience trellis, expiring in 2100,
        // unsigned): the recorded TokenReview answer decides it.
        proof: Some(Proof::ServiceAccountToken(
            "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJhdWQiOlsidHJlbGxpcyJdLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpzaG9wOndlYiJ9.c2lnbmF0dXJl"
                .into(),
        )),
        inbound_address: "10.244.1.17:15006".into(),
        inbound_addresses: vec!["10.244.1.17:15006".into()],
    }
}

pub fn rate_limits_list() -> Value {
    fixture_json("store/ratelimitpolicies-list.json")
}

/// Item `name` of a recorded list, with a new resourceVersion.
pub fn item(list: &Value, name: &str, rv: u64) -> Value {
    let mut object = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in the list"))
        .clone();
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    object
}
