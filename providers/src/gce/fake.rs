//! An in-process fake of the Compute Engine API (v1) on 127.0.0.1, for tests.
//!
//! It speaks HTTP/1.1 (keep-alive, `Content-Length` bodies) from plain std threads and answers
//! with JSON built to the published schemas, with no types shared with the client under test.
//! Every compute request and response is run through [`super::schema`]; see [`Options`].
//!
//! # How state advances
//!
//! Every mutating call returns an Operation in `PENDING`. An operation takes one step
//! (`PENDING` -> `RUNNING` -> `DONE`) after [`Options::polls_per_step`] observations, where an
//! observation is a `get` of the operation or a `get`/`list` that covers its target resource.
//! `operations.wait` drives the operation to `DONE` at once, unless it is stuck
//! ([`Fault::OperationStuckRunning`]), in which case it blocks for [`Options::wait_timeout`] and
//! returns it still `RUNNING`, as the real `wait` does when its own bound passes.
//!
//! A resource's transitional status follows its operation:
//! - instances.insert/start: `PROVISIONING` at once (the instance and its boot disk exist as soon
//!   as the insert is accepted), `STAGING` when the operation is `RUNNING`, `RUNNING` when it is
//!   `DONE` (the boot count goes up);
//! - instances.stop: `STOPPING` at once, `TERMINATED` when `DONE`;
//! - instances.reset: stays `RUNNING`, boot count goes up when `DONE`;
//! - instances.delete: `STOPPING` at once, gone when `DONE` (autoDelete disks deleted with it);
//! - disks: `CREATING` -> `READY`, `DELETING` -> gone; images: `PENDING` -> `READY`,
//!   `DELETING` -> gone;
//! - attachDisk/detachDisk take effect when `DONE` (checked again then: the operation ends with
//!   an error if the disk was taken meanwhile); setLabels/setMetadata/setMachineType (this one
//!   only on a `TERMINATED` instance) take effect at once (the
//!   fingerprint check is synchronous, as in GCE);
//! - networks, firewalls and routes exist at once and are gone when their delete is `DONE`.
//!
//! An operation that ends with an error ([`Fault::OperationError`]) changes nothing.
//!
//! # What is modelled
//!
//! Bad references in an insert (unknown image, disk, network, machine type) are answered
//! synchronously with 400 `invalid` ("The referenced image resource cannot be found."), as GCE
//! does, not through the operation. Lists are ordered by name, omit `items` when empty, page
//! with an opaque `nextPageToken`, and take filters of ANDed (optionally parenthesized, with
//! `OR` inside) clauses `FIELD = "v"`, `FIELD != "v"`, `FIELD : "v"` (substring) and
//! `FIELD:*` (presence), `*` wildcards in values. Self links use
//! `https://www.googleapis.com/compute/v1/` as GCE's do (so a client must build its URLs from
//! its own base, not follow self links); references are accepted as full URLs (that host,
//! `compute.googleapis.com` or this fake's base) or partial (`projects/P/...`, `zones/...`).
//! Timestamps are RFC 3339 with a `-07:00` offset, as GCE's Pacific-time stamps are.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::schema;

/// Prefix of the self links GCE answers with, whatever host the request went to.
const SELF_LINK_BASE: &str = "https://www.googleapis.com/compute/v1/";
/// The scope a service-account JWT must ask for (or `cloud-platform`).
const COMPUTE_SCOPE: &str = "https://www.googleapis.com/auth/compute";
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
/// Lifetime of the access tokens the fake issues, as Google's token endpoint reports it.
const TOKEN_LIFETIME_SECS: u64 = 3599;
/// Fingerprint GCE reports for an empty label set.
const EMPTY_LABELS_FINGERPRINT: &str = "42WmSpB8rSM=";
/// How long a `requestId` is remembered.
const REQUEST_ID_TTL: Duration = Duration::from_secs(60 * 60);
const MAX_BODY: usize = 32 << 20;

/// Behaviour switches of a [`FakeCompute`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Answer a request the schema checker rejects with 400 `invalid` ("schema violation: ...").
    /// When false the violation is only recorded ([`FakeCompute::schema_violations`]).
    /// Response violations are always recorded only.
    pub strict_schema: bool,
    /// Observations an operation needs per status step (at least 1).
    pub polls_per_step: u32,
    /// How long `operations.wait` blocks on an operation that does not finish.
    pub wait_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strict_schema: true,
            polls_per_step: 1,
            wait_timeout: Duration::from_secs(2),
        }
    }
}

/// A fault to inject into matching requests ([`FakeCompute::inject`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status before doing anything: 429 and 403 are `rateLimitExceeded`
    /// (domain `usageLimits`), 500 and 503 `backendError`. `Retry-After` is sent when given.
    Status {
        /// HTTP status.
        status: u16,
        /// Value of a `Retry-After` header, in seconds.
        retry_after_secs: Option<u64>,
    },
    /// Apply the request, then answer after this delay (for client timeouts).
    Delay(Duration),
    /// Apply the request, then close the connection without answering (a lost answer).
    DropAfterApply,
    /// Apply the request, then answer with the first half of the JSON body (the
    /// `Content-Length` matches the cut body, so the HTTP exchange itself is well formed).
    TruncatedJson,
    /// The operation the request creates never gets past `RUNNING`.
    OperationStuckRunning,
    /// The operation the request creates ends `DONE` with this error and changes nothing.
    OperationError {
        /// Error code, e.g. `QUOTA_EXCEEDED`.
        code: String,
        /// Error message.
        message: String,
    },
}

/// One request the fake answered (or dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Discovery method ID (`compute.instances.insert`), `oauth2.token`, `metadata.token`, or
    /// `unknown`.
    pub method_id: String,
    /// HTTP method.
    pub http_method: String,
    /// Request path without the query.
    pub path: String,
    /// The `requestId` query parameter, if any.
    pub request_id: Option<String>,
    /// Status of the answer the fake built (also when a fault dropped or cut it).
    pub status: u16,
    /// The injected fault that hit this request, if any (its `Debug` form).
    pub fault: Option<String>,
}

/// The fake Compute Engine API server. Stops when dropped.
pub struct FakeCompute {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl FakeCompute {
    /// Starts a fake for `project` with `zones` (e.g. `us-central1-a`) and default options.
    ///
    /// # Panics
    /// If it cannot listen on 127.0.0.1 (a test environment failure).
    #[must_use]
    pub fn start(project: &str, zones: &[&str]) -> FakeCompute {
        FakeCompute::start_with(project, zones, Options::default())
    }

    /// Starts a fake with the given options.
    ///
    /// # Panics
    /// If it cannot listen on 127.0.0.1 (a test environment failure).
    #[must_use]
    pub fn start_with(project: &str, zones: &[&str], options: Options) -> FakeCompute {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("fake compute: binding 127.0.0.1:0 failed");
        let addr = listener
            .local_addr()
            .expect("fake compute: a bound listener has an address");
        let mut regions: Vec<String> = Vec::new();
        for z in zones {
            let r = region_of(z);
            if !regions.contains(&r) {
                regions.push(r);
            }
        }
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ u64::from(addr.port());
        let shared = Arc::new(Shared {
            project: project.to_string(),
            zones: zones.iter().map(|z| (*z).to_string()).collect(),
            regions,
            options: Options {
                polls_per_step: options.polls_per_step.max(1),
                ..options
            },
            base_url: format!("http://{addr}/"),
            state: Mutex::new(State::new(seed)),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        {
            let mut st = shared.lock();
            Api {
                sh: &shared,
                st: &mut st,
            }
            .create_defaults();
        }
        let sh = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("fake-compute-accept".into())
            .spawn(move || accept_loop(&sh, &listener))
            .expect("fake compute: spawning the accept thread failed");
        FakeCompute {
            shared,
            addr,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT/`; the compute API is under `compute/v1/`.
    #[must_use]
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The token endpoint (`POST`), also the `aud` a service-account JWT must carry.
    #[must_use]
    pub fn token_uri(&self) -> String {
        format!("{}token", self.shared.base_url)
    }

    /// The metadata server's token URL (needs header `Metadata-Flavor: Google`).
    #[must_use]
    pub fn metadata_token_url(&self) -> String {
        format!("http://{}{METADATA_TOKEN_PATH}", self.addr)
    }

    /// Registers a service account: `public_key_der` is a PKCS#1 `RSAPublicKey` (what
    /// aws-lc-rs `KeyPair::public_key().as_ref()` gives).
    pub fn register_service_account(&self, email: &str, public_key_der: &[u8]) {
        self.shared
            .lock()
            .service_accounts
            .insert(email.to_string(), public_key_der.to_vec());
    }

    /// Registers an authorized user for `grant_type=refresh_token`.
    pub fn register_authorized_user(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
    ) {
        self.shared.lock().authorized_users.push(AuthorizedUser {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            refresh_token: refresh_token.to_string(),
        });
    }

    /// Issues an access token valid for an hour, as if a test service account had asked.
    #[must_use]
    pub fn issue_token(&self) -> String {
        let principal = format!("tester@{}.iam.gserviceaccount.com", self.shared.project);
        self.shared.lock().issue_token(&principal)
    }

    /// Makes every token issued so far expired (the next compute call with one gets 401).
    pub fn expire_tokens(&self) {
        let past = SystemTime::now() - Duration::from_secs(1);
        for t in self.shared.lock().tokens.values_mut() {
            t.1 = past;
        }
    }

    /// Injects `fault` into the next `count` requests of method `method_id`
    /// (`compute.instances.insert`, `oauth2.token`, `metadata.token`); `"*"` matches every
    /// compute method. Injections are tried in order; one fault hits a request at most.
    pub fn inject(&self, method_id: &str, fault: Fault, count: u32) {
        if count > 0 {
            self.shared.lock().faults.push(Injection {
                method: method_id.to_string(),
                fault,
                remaining: count,
            });
        }
    }

    /// Every request so far, in order of completion.
    #[must_use]
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().records.clone()
    }

    /// Requests and responses the schema checker rejected (with the method and the reason).
    #[must_use]
    pub fn schema_violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Adds a `READY` image directly (no operation).
    pub fn add_image(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        let mut st = self.shared.lock();
        let mut api = Api {
            sh: &self.shared,
            st: &mut st,
        };
        let body = json!({"name": name, "labels": labels});
        let v = api.image_value(
            name,
            body.as_object().expect("literal object"),
            "10",
            None,
            "READY",
        );
        api.put(Kind::Image, "", name, v, None);
    }

    /// Writes a guest attribute as the guest agent would. Like the real agent's writes, it
    /// takes effect only when the instance's metadata has `enable-guest-attributes=TRUE`;
    /// returns whether it was written.
    pub fn set_guest_attribute(
        &self,
        zone: &str,
        instance: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> bool {
        let mut st = self.shared.lock();
        let Some(res) = st
            .res
            .get_mut(&(Kind::Instance, zone.to_string(), instance.to_string()))
        else {
            return false;
        };
        if !guest_attributes_enabled(&res.v) {
            return false;
        }
        res.guest
            .insert((namespace.to_string(), key.to_string()), value.to_string());
        true
    }

    /// How many times the instance entered `RUNNING` (insert, start, reset); `None` if it does
    /// not exist.
    #[must_use]
    pub fn boot_count(&self, zone: &str, instance: &str) -> Option<u64> {
        let st = self.shared.lock();
        st.res
            .get(&(Kind::Instance, zone.to_string(), instance.to_string()))
            .map(|r| r.boot_count)
    }

    /// Writes a marker byte "on" a disk (kept across attach and detach, copied into images
    /// made from the disk and disks made from such images); false if the disk does not exist.
    pub fn set_disk_marker(&self, zone: &str, disk: &str, marker: u8) -> bool {
        let mut st = self.shared.lock();
        match st
            .res
            .get_mut(&(Kind::Disk, zone.to_string(), disk.to_string()))
        {
            Some(r) => {
                r.marker = Some(marker);
                true
            }
            None => false,
        }
    }

    /// The marker on a disk: `None` if the disk does not exist, `Some(None)` if unmarked.
    #[must_use]
    pub fn disk_marker(&self, zone: &str, disk: &str) -> Option<Option<u8>> {
        let st = self.shared.lock();
        st.res
            .get(&(Kind::Disk, zone.to_string(), disk.to_string()))
            .map(|r| r.marker)
    }

    /// Number of instances called `name`, across zones.
    #[must_use]
    pub fn instance_count_named(&self, name: &str) -> usize {
        let st = self.shared.lock();
        st.res
            .keys()
            .filter(|(k, _, n)| *k == Kind::Instance && n == name)
            .count()
    }

    /// `(kind, name)` of every resource that exists (including the default network, its
    /// subnetworks, firewalls and routes), kinds `instance`, `disk`, `image`, `network`,
    /// `subnetwork`, `firewall`, `route`.
    #[must_use]
    pub fn resource_names(&self) -> Vec<(String, String)> {
        let st = self.shared.lock();
        st.res
            .keys()
            .map(|(k, _, n)| (k.noun().to_string(), n.clone()))
            .collect()
    }
}

impl Drop for FakeCompute {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Unblocks accept(); the accept loop sees the flag and ends.
        let _ = TcpStream::connect(self.addr);
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Instance,
    Disk,
    Image,
    Network,
    Subnetwork,
    Firewall,
    Route,
}

impl Kind {
    fn collection(self) -> &'static str {
        match self {
            Kind::Instance => "instances",
            Kind::Disk => "disks",
            Kind::Image => "images",
            Kind::Network => "networks",
            Kind::Subnetwork => "subnetworks",
            Kind::Firewall => "firewalls",
            Kind::Route => "routes",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Instance => "instance",
            Kind::Disk => "disk",
            Kind::Image => "image",
            Kind::Network => "network",
            Kind::Subnetwork => "subnetwork",
            Kind::Firewall => "firewall",
            Kind::Route => "route",
        }
    }

    /// Path of a resource relative to the project.
    fn rel(self, scope: &str, name: &str) -> String {
        match self {
            Kind::Instance | Kind::Disk => format!("zones/{scope}/{}/{name}", self.collection()),
            Kind::Subnetwork => format!("regions/{scope}/subnetworks/{name}"),
            _ => format!("global/{}/{name}", self.collection()),
        }
    }

    fn list_rel(self, scope: &str) -> String {
        match self {
            Kind::Instance | Kind::Disk => format!("zones/{scope}/{}", self.collection()),
            Kind::Subnetwork => format!("regions/{scope}/subnetworks"),
            _ => format!("global/{}", self.collection()),
        }
    }
}

type Key = (Kind, String, String);
type OpKey = (String, String);

#[derive(Default)]
struct Res {
    v: Value,
    seq: u64,
    marker: Option<u8>,
    boot_count: u64,
    guest: BTreeMap<(String, String), String>,
    /// Made by the service with its network (auto subnetworks, default routes).
    system: bool,
}

#[derive(Clone, Debug)]
enum Effect {
    None,
    InstanceUp(String, String),
    InstanceStop(String, String),
    InstanceReset(String, String),
    InstanceDelete(String, String),
    AttachDisk {
        zone: String,
        instance: String,
        disk: String,
        entry: Value,
    },
    DetachDisk {
        zone: String,
        instance: String,
        device: String,
    },
    DiskReady(String, String),
    ImageReady(String),
    Remove(Key),
}

struct Op {
    v: Value,
    polls: u32,
    stuck: bool,
    error: Option<(String, String)>,
    effect: Effect,
}

struct Injection {
    method: String,
    fault: Fault,
    remaining: u32,
}

struct AuthorizedUser {
    client_id: String,
    client_secret: String,
    refresh_token: String,
}

struct State {
    rng: u64,
    seq: u64,
    res: BTreeMap<Key, Res>,
    ops: BTreeMap<OpKey, Op>,
    request_ids: HashMap<String, (OpKey, Instant)>,
    tokens: HashMap<String, (String, SystemTime)>,
    service_accounts: HashMap<String, Vec<u8>>,
    authorized_users: Vec<AuthorizedUser>,
    faults: Vec<Injection>,
    records: Vec<RequestRecord>,
    violations: Vec<String>,
    next_host: HashMap<String, u32>,
    next_nat: u32,
    zone_ids: HashMap<String, String>,
}

impl State {
    fn new(seed: u64) -> State {
        State {
            rng: seed,
            seq: 0,
            res: BTreeMap::new(),
            ops: BTreeMap::new(),
            request_ids: HashMap::new(),
            tokens: HashMap::new(),
            service_accounts: HashMap::new(),
            authorized_users: Vec::new(),
            faults: Vec::new(),
            records: Vec::new(),
            violations: Vec::new(),
            next_host: HashMap::new(),
            next_nat: 10,
            zone_ids: HashMap::new(),
        }
    }

    /// splitmix64: enough randomness for IDs and names, no dependency.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A decimal uint64 ID of 19 digits, as GCE's look.
    fn new_id(&mut self) -> String {
        (1_000_000_000_000_000_000 + self.next_u64() % 8_000_000_000_000_000_000).to_string()
    }

    fn hex(&mut self, n: usize) -> String {
        let mut s = String::with_capacity(n);
        while s.len() < n {
            s.push_str(&format!("{:016x}", self.next_u64()));
        }
        s.truncate(n);
        s
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn issue_token(&mut self, principal: &str) -> String {
        let token = format!("ya29.fake-{}", self.hex(40));
        let expires = SystemTime::now() + Duration::from_secs(TOKEN_LIFETIME_SECS);
        self.tokens
            .insert(token.clone(), (principal.to_string(), expires));
        token
    }

    fn take_fault(&mut self, method_id: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| {
            f.remaining > 0
                && (f.method == method_id || (f.method == "*" && method_id.starts_with("compute.")))
        })?;
        let inj = &mut self.faults[i];
        inj.remaining -= 1;
        let fault = inj.fault.clone();
        if inj.remaining == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }
}

struct Shared {
    project: String,
    zones: Vec<String>,
    regions: Vec<String>,
    options: Options,
    base_url: String,
    state: Mutex<State>,
    changed: Condvar,
    shutdown: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Full self link of a path relative to the project.
    fn link(&self, rel: &str) -> String {
        format!("{SELF_LINK_BASE}projects/{}/{rel}", self.project)
    }

    /// Segments of a reference relative to the project (`["zones", "z", "disks", "d"]`), from a
    /// full or partial URL; `None` for another project or a malformed reference.
    fn ref_segments(&self, s: &str) -> Option<Vec<String>> {
        let own = format!("{}compute/v1/", self.base_url);
        let mut rest = s;
        for prefix in [
            SELF_LINK_BASE,
            "https://compute.googleapis.com/compute/v1/",
            own.as_str(),
        ] {
            if let Some(r) = s.strip_prefix(prefix) {
                rest = r;
                break;
            }
        }
        let segs: Vec<String> = rest.split('/').map(str::to_string).collect();
        if segs.iter().any(String::is_empty) {
            return None;
        }
        if segs.first().map(String::as_str) == Some("projects") {
            if segs.get(1) != Some(&self.project) {
                return None;
            }
            return Some(segs[2..].to_vec());
        }
        Some(segs)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct HttpRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum After {
    Normal,
    Delay(Duration),
    Drop,
    Truncate,
}

struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    after: After,
}

impl Reply {
    fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json; charset=UTF-8",
            headers: Vec::new(),
            body: serde_json::to_vec_pretty(body).unwrap_or_default(),
            after: After::Normal,
        }
    }
}

fn after_of(fault: Option<&Fault>) -> After {
    match fault {
        Some(Fault::Delay(d)) => After::Delay(*d),
        Some(Fault::DropAfterApply) => After::Drop,
        Some(Fault::TruncatedJson) => After::Truncate,
        _ => After::Normal,
    }
}

fn accept_loop(sh: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if sh.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        if let Ok(c) = stream.try_clone() {
            sh.conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
        }
        let sh = Arc::clone(sh);
        let _ = thread::Builder::new()
            .name("fake-compute-conn".into())
            .spawn(move || serve_connection(&sh, stream));
    }
}

fn serve_connection(sh: &Shared, stream: TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while let Ok(Some(req)) = read_request(&mut reader) {
        if sh.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let close = req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let mut reply = sh.handle(&req);
        let mut close_after = close;
        match reply.after {
            After::Normal => {}
            After::Delay(d) => thread::sleep(d),
            After::Drop => {
                let _ = writer.shutdown(Shutdown::Both);
                break;
            }
            After::Truncate => {
                let half = reply.body.len() / 2;
                reply.body.truncate(half);
                close_after = true;
            }
        }
        if write_response(&mut writer, &reply, close_after).is_err() || close_after {
            let _ = writer.shutdown(Shutdown::Both);
            break;
        }
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if headers.len() > 200 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many headers",
            ));
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = HttpRequest {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size_str = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_str, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if req.body.len() + size > MAX_BODY {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        if len > MAX_BODY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body too large"));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn write_response(w: &mut TcpStream, reply: &Reply, close: bool) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nVary: Origin, X-Origin, Referer\r\nServer: ESF\r\n",
        reply.status,
        reason_phrase(reply.status),
        reply.content_type,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&reply.body);
    w.write_all(&out)?;
    w.flush()
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error answer in Google's shape.
#[derive(Debug)]
struct ApiError {
    status: u16,
    reason: &'static str,
    domain: &'static str,
    message: String,
    /// `errors[0].message` when it differs from `message` (401s).
    item_message: Option<String>,
    /// `error.status` (set by the front end for 401, 429 and 503, not by compute itself).
    rpc_status: Option<&'static str>,
    /// `Authorization` header location (401s).
    header_location: bool,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason,
            domain: "global",
            message: message.into(),
            item_message: None,
            rpc_status: None,
            header_location: false,
            retry_after: None,
        }
    }

    fn body(&self) -> Value {
        let mut item = json!({
            "message": self.item_message.as_deref().unwrap_or(&self.message),
            "domain": self.domain,
            "reason": self.reason,
        });
        if self.header_location {
            item["location"] = json!("Authorization");
            item["locationType"] = json!("header");
        }
        let mut e = json!({"code": self.status, "message": self.message, "errors": [item]});
        if let Some(s) = self.rpc_status {
            e["status"] = json!(s);
        }
        json!({ "error": e })
    }
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        404,
        "notFound",
        format!("The resource '{path}' was not found"),
    )
}

fn already_exists(path: &str) -> ApiError {
    ApiError::new(
        409,
        "alreadyExists",
        format!("The resource '{path}' already exists"),
    )
}

fn invalid_value(field: &str, value: &str, why: &str) -> ApiError {
    ApiError::new(
        400,
        "invalid",
        format!("Invalid value for field '{field}': '{value}'. {why}"),
    )
}

fn required(field: &str) -> ApiError {
    ApiError::new(
        400,
        "required",
        format!("Required field '{field}' not specified"),
    )
}

fn in_use(what: &str, path: &str, user: &str) -> ApiError {
    ApiError::new(
        400,
        "resourceInUseByAnotherResource",
        format!("The {what} resource '{path}' is already being used by '{user}'"),
    )
}

fn not_ready(path: &str) -> ApiError {
    ApiError::new(
        400,
        "resourceNotReady",
        format!("The resource '{path}' is not ready"),
    )
}

fn invalid_usage(why: &str) -> ApiError {
    ApiError::new(
        400,
        "invalidResourceUsage",
        format!("Invalid resource usage: '{why}'."),
    )
}

fn status_fault_error(status: u16, retry_after: Option<u64>, project_number: &str) -> ApiError {
    let mut e = match status {
        429 => {
            let mut e = ApiError::new(
                429,
                "rateLimitExceeded",
                format!(
                    "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com' for consumer 'project_number:{project_number}'."
                ),
            );
            e.domain = "usageLimits";
            e.rpc_status = Some("RESOURCE_EXHAUSTED");
            e
        }
        403 => {
            let mut e = ApiError::new(403, "rateLimitExceeded", "Rate Limit Exceeded");
            e.domain = "usageLimits";
            e
        }
        500 => ApiError::new(
            500,
            "backendError",
            "Internal error. Please try again or contact Google Support. (Code: '-6412539185433743185')",
        ),
        503 => {
            let mut e = ApiError::new(503, "backendError", "The service is currently unavailable.");
            e.rpc_status = Some("UNAVAILABLE");
            e
        }
        s => ApiError::new(s, "backendError", "Injected failure."),
    };
    e.retry_after = retry_after;
    e
}

// ---------------------------------------------------------------------------------------------
// Request handling

struct Call {
    method_id: &'static str,
    args: Vec<String>,
    query: BTreeMap<String, String>,
    body: Option<Value>,
    principal: String,
    request_id: Option<String>,
    op_fault: Option<Fault>,
    /// The injected fault that hit this call, if any.
    fault: Option<Fault>,
}

impl Call {
    fn arg(&self, i: usize) -> &str {
        self.args.get(i).map_or("", String::as_str)
    }

    fn body_obj(&self) -> Result<&Map<String, Value>, ApiError> {
        self.body
            .as_ref()
            .and_then(Value::as_object)
            .ok_or_else(|| required("resource"))
    }

    fn op_fails(&self) -> bool {
        matches!(self.op_fault, Some(Fault::OperationError { .. }))
    }
}

/// Maps an HTTP method and the path segments after `projects/P/` to a discovery method ID and
/// its path arguments (zone or region first, then names).
fn route(method: &str, segs: &[&str]) -> Option<(&'static str, Vec<String>)> {
    let a = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    let id = match (method, segs) {
        ("GET", ["zones"]) => return Some(("compute.zones.list", vec![])),
        ("GET", ["zones", z]) => return Some(("compute.zones.get", a(&[z]))),
        ("GET", ["zones", z, "instances"]) => ("compute.instances.list", a(&[z])),
        ("POST", ["zones", z, "instances"]) => ("compute.instances.insert", a(&[z])),
        ("GET", ["zones", z, "instances", n]) => ("compute.instances.get", a(&[z, n])),
        ("DELETE", ["zones", z, "instances", n]) => ("compute.instances.delete", a(&[z, n])),
        ("GET", ["zones", z, "instances", n, "getGuestAttributes"]) => {
            ("compute.instances.getGuestAttributes", a(&[z, n]))
        }
        ("POST", ["zones", z, "instances", n, verb]) => {
            let id = match *verb {
                "start" => "compute.instances.start",
                "stop" => "compute.instances.stop",
                "reset" => "compute.instances.reset",
                "setLabels" => "compute.instances.setLabels",
                "setMetadata" => "compute.instances.setMetadata",
                "setMachineType" => "compute.instances.setMachineType",
                "attachDisk" => "compute.instances.attachDisk",
                "detachDisk" => "compute.instances.detachDisk",
                _ => return None,
            };
            (id, a(&[z, n]))
        }
        ("GET", ["zones", z, "disks"]) => ("compute.disks.list", a(&[z])),
        ("POST", ["zones", z, "disks"]) => ("compute.disks.insert", a(&[z])),
        ("GET", ["zones", z, "disks", n]) => ("compute.disks.get", a(&[z, n])),
        ("DELETE", ["zones", z, "disks", n]) => ("compute.disks.delete", a(&[z, n])),
        ("GET", ["zones", z, "operations"]) => ("compute.zoneOperations.list", a(&[z])),
        ("GET", ["zones", z, "operations", n]) => ("compute.zoneOperations.get", a(&[z, n])),
        ("POST", ["zones", z, "operations", n, "wait"]) => {
            ("compute.zoneOperations.wait", a(&[z, n]))
        }
        ("GET", ["regions", r, "subnetworks"]) => ("compute.subnetworks.list", a(&[r])),
        ("GET", ["regions", r, "subnetworks", n]) => ("compute.subnetworks.get", a(&[r, n])),
        ("GET", ["global", "images", "family", f]) => ("compute.images.getFromFamily", a(&[f])),
        ("GET", ["global", "operations"]) => ("compute.globalOperations.list", vec![]),
        ("GET", ["global", "operations", n]) => ("compute.globalOperations.get", a(&["", n])),
        ("POST", ["global", "operations", n, "wait"]) => {
            ("compute.globalOperations.wait", a(&["", n]))
        }
        (m, ["global", coll, rest @ ..]) => {
            let ids: [&'static str; 4] = match *coll {
                "images" => [
                    "compute.images.list",
                    "compute.images.insert",
                    "compute.images.get",
                    "compute.images.delete",
                ],
                "networks" => [
                    "compute.networks.list",
                    "compute.networks.insert",
                    "compute.networks.get",
                    "compute.networks.delete",
                ],
                "firewalls" => [
                    "compute.firewalls.list",
                    "compute.firewalls.insert",
                    "compute.firewalls.get",
                    "compute.firewalls.delete",
                ],
                "routes" => [
                    "compute.routes.list",
                    "compute.routes.insert",
                    "compute.routes.get",
                    "compute.routes.delete",
                ],
                _ => return None,
            };
            match (m, rest) {
                ("GET", []) => (ids[0], vec![String::new()]),
                ("POST", []) => (ids[1], vec![String::new()]),
                ("GET", [n]) => (ids[2], a(&["", n])),
                ("DELETE", [n]) => (ids[3], a(&["", n])),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(id)
}

fn is_mutating(method_id: &str, http: &str) -> bool {
    (http == "POST" || http == "DELETE") && !method_id.ends_with(".wait")
}

fn valid_request_id(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
        && s.bytes().any(|b| b != b'0' && b != b'-')
}

impl Shared {
    fn handle(&self, req: &HttpRequest) -> Reply {
        let path = req
            .target
            .split_once('?')
            .map_or(req.target.as_str(), |(p, _)| p);
        if path == "/token" && req.method == "POST" {
            return self.token_endpoint(req);
        }
        if path == METADATA_TOKEN_PATH && req.method == "GET" {
            return self.metadata_token(req);
        }
        let rest = path.strip_prefix("/compute/v1/").unwrap_or("");
        self.compute(req, rest)
    }

    fn record(
        st: &mut State,
        method_id: &str,
        req: &HttpRequest,
        status: u16,
        fault: Option<&Fault>,
    ) {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        st.records.push(RequestRecord {
            method_id: method_id.to_string(),
            http_method: req.method.clone(),
            path: path.to_string(),
            request_id: parse_query(query).get("requestId").cloned(),
            status,
            fault: fault.map(|f| format!("{f:?}")),
        });
    }

    fn compute(&self, req: &HttpRequest, rest: &str) -> Reply {
        let segs: Vec<String> = rest.split('/').map(|s| percent_decode(s, false)).collect();
        let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (project, routed) = match seg_refs.as_slice() {
            ["projects", p, tail @ ..] => (Some(*p), route(&req.method, tail)),
            _ => (None, None),
        };
        let method_id = routed.as_ref().map_or("unknown", |r| r.0);
        let mut st = self.lock();
        let mut status_fault = None;
        let (mut st, outcome) =
            match self.prepare(&mut st, req, project, routed.as_ref(), &mut status_fault) {
                Err(e) => (st, Err((e, status_fault))),
                Ok(call) => {
                    let fault = call.fault.clone();
                    let (st, result) = self.execute(st, &call, &req.method);
                    (
                        st,
                        result.map(|v| (v, fault.clone())).map_err(|e| (e, fault)),
                    )
                }
            };
        let (status, body, headers, fault) = match outcome {
            Ok((v, fault)) => {
                if let Err(e) = schema::check_response(method_id, &v) {
                    st.violations.push(format!("response of {method_id}: {e}"));
                }
                (200, v, Vec::new(), fault)
            }
            Err((e, fault)) => {
                let body = e.body();
                if let Err(err) = schema::check_error(e.status, &body) {
                    st.violations.push(format!(
                        "error response of {method_id} ({}): {err}",
                        e.status
                    ));
                }
                let mut headers = Vec::new();
                if let Some(s) = e.retry_after {
                    headers.push(("Retry-After".to_string(), s.to_string()));
                }
                if e.status == 401 {
                    headers.push((
                        "WWW-Authenticate".to_string(),
                        "Bearer realm=\"https://accounts.google.com/\"".to_string(),
                    ));
                }
                (e.status, body, headers, fault)
            }
        };
        Shared::record(&mut st, method_id, req, status, fault.as_ref());
        drop(st);
        let mut reply = Reply::json(status, &body);
        reply.headers = headers;
        reply.after = after_of(fault.as_ref());
        reply
    }

    /// Everything before a compute call takes effect: authentication, body parsing, the schema
    /// check, routing, the project check and fault selection.
    fn prepare(
        &self,
        st: &mut State,
        req: &HttpRequest,
        project: Option<&str>,
        routed: Option<&(&'static str, Vec<String>)>,
        fault_out: &mut Option<Fault>,
    ) -> Result<Call, ApiError> {
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let query = parse_query(query);
        let method_id = routed.map_or("unknown", |r| r.0);
        let principal = self.authenticate(st, req)?;
        let body = if req.body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            match serde_json::from_slice::<Value>(&req.body) {
                Ok(v) => Some(v),
                Err(e) => {
                    let mut err = ApiError::new(
                        400,
                        "parseError",
                        format!("Invalid JSON payload received. {e}"),
                    );
                    err.rpc_status = Some("INVALID_ARGUMENT");
                    return Err(err);
                }
            }
        };
        match schema::check_request(&req.method, &req.target, body.as_ref()) {
            Ok(id) if id != method_id => st.violations.push(format!(
                "request {} {}: the schema checker says {id}, the fake routes {method_id}",
                req.method, req.target
            )),
            Ok(_) => {}
            Err(e) => {
                st.violations
                    .push(format!("request {} {}: {e}", req.method, req.target));
                if self.options.strict_schema {
                    return Err(ApiError::new(
                        400,
                        "invalid",
                        format!("schema violation: {e}"),
                    ));
                }
            }
        }
        let Some((method_id, args)) = routed.cloned() else {
            return Err(ApiError::new(
                404,
                "notFound",
                format!("The requested URL {path} was not found on this server."),
            ));
        };
        if project != Some(self.project.as_str()) {
            return Err(not_found(&format!("projects/{}", project.unwrap_or(""))));
        }
        let fault = st.take_fault(method_id);
        if let Some(Fault::Status {
            status,
            retry_after_secs,
        }) = &fault
        {
            let e = status_fault_error(*status, *retry_after_secs, "123456789012");
            *fault_out = fault;
            return Err(e);
        }
        let op_fault = match &fault {
            Some(f @ (Fault::OperationError { .. } | Fault::OperationStuckRunning)) => {
                Some(f.clone())
            }
            _ => None,
        };
        Ok(Call {
            method_id,
            args,
            request_id: query.get("requestId").cloned(),
            query,
            body,
            principal,
            op_fault,
            fault,
        })
    }

    fn execute<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        call: &Call,
        http: &str,
    ) -> (MutexGuard<'a, State>, Result<Value, ApiError>) {
        if call.method_id.ends_with(".wait") {
            let key = (call.arg(0).to_string(), call.arg(1).to_string());
            if !key.0.is_empty()
                && let Err(e) = (Api {
                    sh: self,
                    st: &mut st,
                })
                .check_zone(&key.0)
            {
                return (st, Err(e));
            }
            return self.wait_op(st, &key);
        }
        let r = Api {
            sh: self,
            st: &mut st,
        }
        .dispatch(call, http);
        (st, r)
    }

    fn authenticate(&self, st: &State, req: &HttpRequest) -> Result<String, ApiError> {
        let msg_tail = "Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
        let token = req.header("authorization").and_then(|h| {
            let (scheme, tok) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| tok.trim())
        });
        let Some(token) = token else {
            let mut e = ApiError::new(
                401,
                "required",
                format!("Request is missing required authentication credential. {msg_tail}"),
            );
            e.item_message = Some("Login Required.".into());
            e.rpc_status = Some("UNAUTHENTICATED");
            e.header_location = true;
            return Err(e);
        };
        match st.tokens.get(token) {
            Some((principal, expires)) if *expires > SystemTime::now() => Ok(principal.clone()),
            _ => {
                let mut e = ApiError::new(
                    401,
                    "authError",
                    format!("Request had invalid authentication credentials. {msg_tail}"),
                );
                e.item_message = Some("Invalid Credentials".into());
                e.rpc_status = Some("UNAUTHENTICATED");
                e.header_location = true;
                Err(e)
            }
        }
    }

    /// Waits for an operation the way `operations.wait` does: drives it to `DONE`, or, if it
    /// cannot finish, blocks until the wait bound and returns it as it is.
    fn wait_op<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: &OpKey,
    ) -> (MutexGuard<'a, State>, Result<Value, ApiError>) {
        let deadline = Instant::now() + self.options.wait_timeout;
        loop {
            let Some(op) = st.ops.get(key).map(|o| (o.v.clone(), o.stuck)) else {
                let rel = if key.0.is_empty() {
                    format!("global/operations/{}", key.1)
                } else {
                    format!("zones/{}/operations/{}", key.0, key.1)
                };
                let e = not_found(&format!("projects/{}/{rel}", self.project));
                return (st, Err(e));
            };
            let (v, stuck) = op;
            let status = v["status"].as_str().unwrap_or("").to_string();
            if status == "DONE" {
                return (st, Ok(v));
            }
            if !stuck || status == "PENDING" {
                Api {
                    sh: self,
                    st: &mut st,
                }
                .advance(key);
                continue;
            }
            let now = Instant::now();
            if now >= deadline || self.shutdown.load(Ordering::SeqCst) {
                return (st, Ok(v));
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn token_endpoint(&self, req: &HttpRequest) -> Reply {
        let mut st = self.lock();
        let fault = st.take_fault("oauth2.token");
        let (status, body) = if let Some(Fault::Status { status, .. }) = &fault {
            (
                *status,
                json!({"error": "internal_failure", "error_description": "Injected failure."}),
            )
        } else {
            let form = parse_query(&String::from_utf8_lossy(&req.body));
            let grant = form.get("grant_type").map_or("", String::as_str);
            let result = match grant {
                "urn:ietf:params:oauth:grant-type:jwt-bearer" => self
                    .verify_jwt(&st, form.get("assertion").map_or("", String::as_str))
                    .map(|p| (p, None)),
                "refresh_token" => {
                    let get = |k: &str| form.get(k).map_or("", String::as_str);
                    match st
                        .authorized_users
                        .iter()
                        .find(|u| u.client_id == get("client_id"))
                    {
                        Some(u) if u.client_secret != get("client_secret") => {
                            Err((401, "invalid_client", "Unauthorized".to_string()))
                        }
                        Some(u) if u.refresh_token == get("refresh_token") => Ok((
                            format!("user-{}@example.com", u.client_id),
                            Some(CLOUD_PLATFORM_SCOPE),
                        )),
                        Some(_) => Err((400, "invalid_grant", "Bad Request".to_string())),
                        None => Err((
                            401,
                            "invalid_client",
                            "The OAuth client was not found.".to_string(),
                        )),
                    }
                }
                other => Err((
                    400,
                    "unsupported_grant_type",
                    format!("Invalid grant_type: {other}"),
                )),
            };
            match result {
                Ok((principal, scope)) => {
                    let token = st.issue_token(&principal);
                    let mut body = json!({
                        "access_token": token,
                        "expires_in": TOKEN_LIFETIME_SECS,
                        "token_type": "Bearer",
                    });
                    if let Some(s) = scope {
                        body["scope"] = json!(s);
                    }
                    (200, body)
                }
                Err((status, error, desc)) => {
                    (status, json!({"error": error, "error_description": desc}))
                }
            }
        };
        Shared::record(&mut st, "oauth2.token", req, status, fault.as_ref());
        drop(st);
        let mut reply = Reply::json(status, &body);
        reply.after = after_of(fault.as_ref());
        reply
    }

    fn verify_jwt(
        &self,
        st: &State,
        assertion: &str,
    ) -> Result<String, (u16, &'static str, String)> {
        let bad = |d: &str| Err((400, "invalid_grant", d.to_string()));
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = assertion.split('.').collect();
        let [h, c, s] = parts.as_slice() else {
            return bad("Invalid JWT: the assertion is not a JWS in compact form.");
        };
        let decode = |p: &str| b64.decode(p.trim_end_matches('='));
        let (Ok(hb), Ok(cb), Ok(sig)) = (decode(h), decode(c), decode(s)) else {
            return bad("Invalid JWT: the assertion is not base64url.");
        };
        let (Ok(header), Ok(claims)) = (
            serde_json::from_slice::<Value>(&hb),
            serde_json::from_slice::<Value>(&cb),
        ) else {
            return bad("Invalid JWT: the header or the claims are not JSON.");
        };
        if header["alg"] != "RS256" {
            return bad("Invalid JWT: the signing algorithm must be RS256.");
        }
        if !header["typ"].is_null() && header["typ"] != "JWT" {
            return bad("Invalid JWT: typ must be JWT.");
        }
        let iss = claims["iss"].as_str().unwrap_or("");
        let Some(key) = st.service_accounts.get(iss) else {
            return bad("Invalid grant: account not found");
        };
        let pk = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            key,
        );
        let signed = format!("{h}.{c}");
        if pk.verify(signed.as_bytes(), &sig).is_err() {
            return bad("Invalid JWT Signature.");
        }
        let token_uri = format!("{}token", self.base_url);
        if claims["aud"] != token_uri.as_str() {
            return bad(&format!(
                "Invalid JWT: Failed audience check. The right audience is {token_uri}"
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
            return bad("Invalid JWT: iat and exp must be numbers.");
        };
        if (now - iat).abs() > 300 || exp <= iat || exp - iat > 3600 || exp <= now {
            return bad(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
            );
        }
        let scopes: Vec<&str> = claims["scope"].as_str().unwrap_or("").split(' ').collect();
        if !scopes.contains(&COMPUTE_SCOPE) && !scopes.contains(&CLOUD_PLATFORM_SCOPE) {
            return Err((
                400,
                "invalid_scope",
                "Invalid OAuth scope or ID token audience provided.".to_string(),
            ));
        }
        Ok(iss.to_string())
    }

    fn metadata_token(&self, req: &HttpRequest) -> Reply {
        let mut st = self.lock();
        let fault = st.take_fault("metadata.token");
        let flavored = req.header("metadata-flavor").is_some_and(|v| v == "Google");
        let reply = if let Some(Fault::Status { status, .. }) = &fault {
            Reply::json(*status, &json!({"error": "injected failure"}))
        } else if !flavored {
            Reply {
                status: 403,
                content_type: "text/html; charset=UTF-8",
                headers: Vec::new(),
                body: b"Missing required header \"Metadata-Flavor\"\n".to_vec(),
                after: After::Normal,
            }
        } else {
            let principal = "123456789012-compute@developer.gserviceaccount.com".to_string();
            let token = st.issue_token(&principal);
            let mut r = Reply::json(
                200,
                &json!({"access_token": token, "expires_in": TOKEN_LIFETIME_SECS, "token_type": "Bearer"}),
            );
            r.headers.push(("Metadata-Flavor".into(), "Google".into()));
            r
        };
        Shared::record(&mut st, "metadata.token", req, reply.status, fault.as_ref());
        drop(st);
        Reply {
            after: after_of(fault.as_ref()),
            ..reply
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API proper

struct Api<'a> {
    sh: &'a Shared,
    st: &'a mut State,
}

impl Api<'_> {
    fn path(&self, rel: &str) -> String {
        format!("projects/{}/{rel}", self.sh.project)
    }

    fn check_zone(&self, zone: &str) -> Result<(), ApiError> {
        if self.sh.zones.iter().any(|z| z == zone) {
            Ok(())
        } else {
            Err(invalid_value("zone", zone, "Unknown zone."))
        }
    }

    fn check_region(&self, region: &str) -> Result<(), ApiError> {
        if self.sh.regions.iter().any(|r| r == region) {
            Ok(())
        } else {
            Err(invalid_value("region", region, "Unknown region."))
        }
    }

    fn put(&mut self, kind: Kind, scope: &str, name: &str, v: Value, marker: Option<u8>) {
        let seq = self.st.next_seq();
        self.st.res.insert(
            (kind, scope.to_string(), name.to_string()),
            Res {
                v,
                seq,
                marker,
                ..Res::default()
            },
        );
    }

    fn key(kind: Kind, scope: &str, name: &str) -> Key {
        (kind, scope.to_string(), name.to_string())
    }

    fn dispatch(&mut self, call: &Call, http: &str) -> Result<Value, ApiError> {
        if is_mutating(call.method_id, http)
            && let Some(rid) = &call.request_id
        {
            if !valid_request_id(rid) {
                return Err(invalid_value(
                    "requestId",
                    rid,
                    "The request ID must be a valid UUID with the exception that zero UUID is not supported (00000000-0000-0000-0000-000000000000).",
                ));
            }
            self.st
                .request_ids
                .retain(|_, (_, t)| t.elapsed() < REQUEST_ID_TTL);
            if let Some((key, _)) = self.st.request_ids.get(rid)
                && let Some(op) = self.st.ops.get(key)
            {
                return Ok(op.v.clone());
            }
        }
        let (z, n) = (call.arg(0), call.arg(1));
        match call.method_id {
            "compute.zones.list" => self.zones_list(call),
            "compute.zones.get" => self.zone_get(z),
            "compute.instances.insert" => self.instances_insert(call, z),
            "compute.instances.get" => self.get(Kind::Instance, z, n),
            "compute.instances.list" => self.list_kind(call, Kind::Instance, z),
            "compute.instances.delete" => self.instances_delete(call, z, n),
            "compute.instances.start" => self.instances_start(call, z, n),
            "compute.instances.stop" => self.instances_stop(call, z, n),
            "compute.instances.reset" => self.instances_reset(call, z, n),
            "compute.instances.setLabels" => self.instances_set_labels(call, z, n),
            "compute.instances.setMetadata" => self.instances_set_metadata(call, z, n),
            "compute.instances.setMachineType" => self.instances_set_machine_type(call, z, n),
            "compute.instances.attachDisk" => self.instances_attach_disk(call, z, n),
            "compute.instances.detachDisk" => self.instances_detach_disk(call, z, n),
            "compute.instances.getGuestAttributes" => self.instances_guest_attributes(call, z, n),
            "compute.disks.insert" => self.disks_insert(call, z),
            "compute.disks.get" => self.get(Kind::Disk, z, n),
            "compute.disks.list" => self.list_kind(call, Kind::Disk, z),
            "compute.disks.delete" => self.disks_delete(call, z, n),
            "compute.images.insert" => self.images_insert(call),
            "compute.images.get" => self.get(Kind::Image, "", n),
            "compute.images.list" => self.list_kind(call, Kind::Image, ""),
            "compute.images.delete" => self.images_delete(call, n),
            "compute.images.getFromFamily" => self.images_from_family(z),
            "compute.networks.insert" => self.networks_insert(call),
            "compute.networks.get" => self.get(Kind::Network, "", n),
            "compute.networks.list" => self.list_kind(call, Kind::Network, ""),
            "compute.networks.delete" => self.networks_delete(call, n),
            "compute.subnetworks.get" => {
                self.check_region(z)?;
                self.get(Kind::Subnetwork, z, n)
            }
            "compute.subnetworks.list" => {
                self.check_region(z)?;
                self.list_kind(call, Kind::Subnetwork, z)
            }
            "compute.firewalls.insert" => self.firewalls_insert(call),
            "compute.firewalls.get" => self.get(Kind::Firewall, "", n),
            "compute.firewalls.list" => self.list_kind(call, Kind::Firewall, ""),
            "compute.firewalls.delete" => self.simple_delete(call, Kind::Firewall, n),
            "compute.routes.insert" => self.routes_insert(call),
            "compute.routes.get" => self.get(Kind::Route, "", n),
            "compute.routes.list" => self.list_kind(call, Kind::Route, ""),
            "compute.routes.delete" => self.simple_delete(call, Kind::Route, n),
            "compute.zoneOperations.get" => {
                self.check_zone(z)?;
                self.op_get(z, n)
            }
            "compute.globalOperations.get" => self.op_get("", n),
            "compute.zoneOperations.list" => {
                self.check_zone(z)?;
                self.ops_list(call, z)
            }
            "compute.globalOperations.list" => self.ops_list(call, ""),
            other => Err(ApiError::new(
                404,
                "notFound",
                format!("Method {other} is not served by this fake"),
            )),
        }
    }

    // --- operations ---------------------------------------------------------------------------

    fn new_op(
        &mut self,
        call: &Call,
        zone: Option<&str>,
        op_type: &str,
        target_rel: &str,
        target_id: &str,
        effect: Effect,
    ) -> Value {
        let now = SystemTime::now();
        let millis = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!(
            "operation-{millis}-{}-{}-{}",
            self.st.hex(13),
            self.st.hex(8),
            self.st.hex(8)
        );
        let scope = zone.unwrap_or("").to_string();
        let self_rel = match zone {
            Some(z) => format!("zones/{z}/operations/{name}"),
            None => format!("global/operations/{name}"),
        };
        let id = self.st.new_id();
        let mut v = json!({
            "kind": "compute#operation",
            "id": id,
            "name": name,
            "operationType": op_type,
            "targetLink": self.sh.link(target_rel),
            "targetId": target_id,
            "status": "PENDING",
            "user": call.principal,
            "progress": 0,
            "insertTime": rfc3339(now),
            "selfLink": self.sh.link(&self_rel),
        });
        if let Some(z) = zone {
            v["zone"] = json!(self.sh.link(&format!("zones/{z}")));
        }
        let (error, stuck) = match &call.op_fault {
            Some(Fault::OperationError { code, message }) => {
                (Some((code.clone(), message.clone())), false)
            }
            Some(Fault::OperationStuckRunning) => (None, true),
            _ => (None, false),
        };
        let effect = if error.is_some() {
            Effect::None
        } else {
            effect
        };
        self.st.ops.insert(
            (scope.clone(), name.clone()),
            Op {
                v: v.clone(),
                polls: 0,
                stuck,
                error,
                effect,
            },
        );
        if let Some(rid) = &call.request_id {
            self.st
                .request_ids
                .insert(rid.clone(), ((scope, name), Instant::now()));
        }
        v
    }

    /// Moves an operation one step and applies its effect.
    fn advance(&mut self, key: &OpKey) {
        let Some(op) = self.st.ops.get_mut(key) else {
            return;
        };
        let now = rfc3339(SystemTime::now());
        match op.v["status"].as_str() {
            Some("PENDING") => {
                op.v["status"] = json!("RUNNING");
                op.v["startTime"] = json!(now);
                let effect = op.effect.clone();
                self.apply_running(&effect);
            }
            Some("RUNNING") if !op.stuck => {
                op.v["status"] = json!("DONE");
                op.v["endTime"] = json!(now);
                op.v["progress"] = json!(100);
                let effect = op.effect.clone();
                let mut error = op.error.clone();
                if error.is_none()
                    && let Err(e) = self.apply_done(&effect)
                {
                    error = Some(e);
                }
                if let (Some((code, message)), Some(op)) = (error, self.st.ops.get_mut(key)) {
                    let (http, text) = match code.as_str() {
                        "QUOTA_EXCEEDED" => (403, "FORBIDDEN"),
                        "RESOURCE_NOT_FOUND" => (404, "NOT FOUND"),
                        "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE" => (400, "BAD REQUEST"),
                        _ => (400, "BAD REQUEST"),
                    };
                    op.v["error"] = json!({"errors": [{"code": code, "message": message}]});
                    op.v["httpErrorStatusCode"] = json!(http);
                    op.v["httpErrorMessage"] = json!(text);
                }
            }
            _ => return,
        }
        self.sh.changed.notify_all();
    }

    fn observe(&mut self, key: &OpKey) {
        let per_step = self.sh.options.polls_per_step;
        let Some(op) = self.st.ops.get_mut(key) else {
            return;
        };
        op.polls += 1;
        if op.polls >= per_step {
            op.polls = 0;
            self.advance(key);
        }
    }

    /// Counts a look at resources as an observation of their unfinished operations.
    fn observe_targets(&mut self, links: &[String]) {
        let keys: Vec<OpKey> = self
            .st
            .ops
            .iter()
            .filter(|(_, op)| {
                op.v["status"] != "DONE"
                    && op.v["targetLink"]
                        .as_str()
                        .is_some_and(|t| links.iter().any(|l| l == t))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.observe(&k);
        }
    }

    fn op_get(&mut self, zone: &str, name: &str) -> Result<Value, ApiError> {
        let key = (zone.to_string(), name.to_string());
        self.observe(&key);
        match self.st.ops.get(&key) {
            Some(op) => Ok(op.v.clone()),
            None if zone.is_empty() => {
                Err(not_found(&self.path(&format!("global/operations/{name}"))))
            }
            None => Err(not_found(
                &self.path(&format!("zones/{zone}/operations/{name}")),
            )),
        }
    }

    fn ops_list(&mut self, call: &Call, zone: &str) -> Result<Value, ApiError> {
        let items: Vec<(String, Value)> = self
            .st
            .ops
            .iter()
            .filter(|((z, _), _)| z == zone)
            .map(|((_, n), op)| (n.clone(), op.v.clone()))
            .collect();
        let rel = if zone.is_empty() {
            "global/operations".to_string()
        } else {
            format!("zones/{zone}/operations")
        };
        self.list(call, "compute#operationList", &rel, items)
    }

    fn apply_running(&mut self, effect: &Effect) {
        if let Effect::InstanceUp(z, n) = effect
            && let Some(r) = self.st.res.get_mut(&Api::key(Kind::Instance, z, n))
            && r.v["status"] == "PROVISIONING"
        {
            r.v["status"] = json!("STAGING");
        }
    }

    fn apply_done(&mut self, effect: &Effect) -> Result<(), (String, String)> {
        let now = rfc3339(SystemTime::now());
        match effect {
            Effect::None => {}
            Effect::InstanceUp(z, n) => {
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Instance, z, n))
                    && (r.v["status"] == "PROVISIONING" || r.v["status"] == "STAGING")
                {
                    r.v["status"] = json!("RUNNING");
                    r.v["lastStartTimestamp"] = json!(now);
                    r.v["cpuPlatform"] = json!("Intel Cascade Lake");
                    r.boot_count += 1;
                }
            }
            Effect::InstanceStop(z, n) => {
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Instance, z, n))
                    && r.v["status"] == "STOPPING"
                {
                    r.v["status"] = json!("TERMINATED");
                    r.v["lastStopTimestamp"] = json!(now);
                    r.v["cpuPlatform"] = json!("Unknown CPU Platform");
                }
            }
            Effect::InstanceReset(z, n) => {
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Instance, z, n))
                    && r.v["status"] == "RUNNING"
                {
                    r.boot_count += 1;
                    r.v["lastStartTimestamp"] = json!(now);
                }
            }
            Effect::InstanceDelete(z, n) => {
                let inst_link = self.sh.link(&Kind::Instance.rel(z, n));
                if let Some(r) = self.st.res.remove(&Api::key(Kind::Instance, z, n)) {
                    for d in r.v["disks"].as_array().into_iter().flatten() {
                        let Some(dname) = d["source"].as_str().and_then(|s| s.rsplit('/').next())
                        else {
                            continue;
                        };
                        let dkey = Api::key(Kind::Disk, z, dname);
                        if d["autoDelete"] == true {
                            self.st.res.remove(&dkey);
                        } else if let Some(disk) = self.st.res.get_mut(&dkey) {
                            remove_user(&mut disk.v, &inst_link);
                            disk.v["lastDetachTimestamp"] = json!(now);
                        }
                    }
                }
            }
            Effect::AttachDisk {
                zone,
                instance,
                disk,
                entry,
            } => {
                let inst_link = self.sh.link(&Kind::Instance.rel(zone, instance));
                let disk_key = Api::key(Kind::Disk, zone, disk);
                let disk_path = self.path(&Kind::Disk.rel(zone, disk));
                match self.st.res.get(&disk_key) {
                    None => {
                        return Err((
                            "RESOURCE_NOT_FOUND".into(),
                            format!("The resource '{disk_path}' was not found"),
                        ));
                    }
                    Some(d) => {
                        if let Some(u) = d.v["users"].as_array().and_then(|u| u.first()) {
                            return Err((
                                "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE".into(),
                                format!(
                                    "The disk resource '{disk_path}' is already being used by '{}'",
                                    u.as_str().unwrap_or("").trim_start_matches(SELF_LINK_BASE)
                                ),
                            ));
                        }
                    }
                }
                let Some(inst) = self
                    .st
                    .res
                    .get_mut(&Api::key(Kind::Instance, zone, instance))
                else {
                    return Err((
                        "RESOURCE_NOT_FOUND".into(),
                        format!(
                            "The resource '{}' was not found",
                            format_args!(
                                "projects/{}/{}",
                                self.sh.project,
                                Kind::Instance.rel(zone, instance)
                            )
                        ),
                    ));
                };
                let disks = inst.v["disks"]
                    .as_array_mut()
                    .expect("instances have a disks array");
                let mut entry = entry.clone();
                let boot = entry["boot"] == true;
                let index = if boot {
                    0
                } else {
                    disks
                        .iter()
                        .filter_map(|d| d["index"].as_u64())
                        .max()
                        .map_or(1, |m| m + 1)
                        .max(1)
                };
                entry["index"] = json!(index);
                if entry["deviceName"].is_null() {
                    entry["deviceName"] = json!(format!("persistent-disk-{index}"));
                }
                if disks.iter().any(|d| d["deviceName"] == entry["deviceName"]) {
                    return Err((
                        "INVALID_USAGE".into(),
                        format!(
                            "Invalid value for field 'deviceName': {}. A disk with this device name is already attached.",
                            entry["deviceName"]
                        ),
                    ));
                }
                if boot {
                    disks.insert(0, entry);
                } else {
                    disks.push(entry);
                }
                refresh_instance_fingerprint(&mut inst.v);
                if let Some(d) = self.st.res.get_mut(&disk_key) {
                    add_user(&mut d.v, &inst_link);
                    d.v["lastAttachTimestamp"] = json!(now);
                }
            }
            Effect::DetachDisk {
                zone,
                instance,
                device,
            } => {
                let inst_link = self.sh.link(&Kind::Instance.rel(zone, instance));
                let Some(inst) = self
                    .st
                    .res
                    .get_mut(&Api::key(Kind::Instance, zone, instance))
                else {
                    return Ok(());
                };
                let disks = inst.v["disks"]
                    .as_array_mut()
                    .expect("instances have a disks array");
                let Some(pos) = disks
                    .iter()
                    .position(|d| d["deviceName"] == device.as_str())
                else {
                    return Err((
                        "INVALID_USAGE".into(),
                        format!("No attached disk found with device name '{device}'"),
                    ));
                };
                let removed = disks.remove(pos);
                refresh_instance_fingerprint(&mut inst.v);
                if let Some(dname) = removed["source"]
                    .as_str()
                    .and_then(|s| s.rsplit('/').next())
                    && let Some(d) = self.st.res.get_mut(&Api::key(Kind::Disk, zone, dname))
                {
                    remove_user(&mut d.v, &inst_link);
                    d.v["lastDetachTimestamp"] = json!(now);
                }
            }
            Effect::DiskReady(z, n) => {
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Disk, z, n))
                    && r.v["status"] == "CREATING"
                {
                    r.v["status"] = json!("READY");
                }
            }
            Effect::ImageReady(n) => {
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Image, "", n))
                    && r.v["status"] == "PENDING"
                {
                    r.v["status"] = json!("READY");
                }
            }
            Effect::Remove(key) => {
                if key.0 == Kind::Disk
                    && let Some(u) = self
                        .st
                        .res
                        .get(key)
                        .and_then(|d| d.v["users"].as_array())
                        .and_then(|u| u.first())
                {
                    let path = self.path(&Kind::Disk.rel(&key.1, &key.2));
                    return Err((
                        "RESOURCE_IN_USE_BY_ANOTHER_RESOURCE".into(),
                        format!(
                            "The disk resource '{path}' is already being used by '{}'",
                            u.as_str().unwrap_or("").trim_start_matches(SELF_LINK_BASE)
                        ),
                    ));
                }
                if self.st.res.remove(key).is_some() && key.0 == Kind::Network {
                    let link = self.sh.link(&Kind::Network.rel("", &key.2));
                    self.st.res.retain(|(k, _, _), r| {
                        !(matches!(k, Kind::Subnetwork | Kind::Route)
                            && r.system
                            && r.v["network"] == link.as_str())
                    });
                }
            }
        }
        Ok(())
    }

    // --- generic get and list -------------------------------------------------------------

    fn get(&mut self, kind: Kind, scope: &str, name: &str) -> Result<Value, ApiError> {
        if matches!(kind, Kind::Instance | Kind::Disk) {
            self.check_zone(scope)?;
        }
        let link = self.sh.link(&kind.rel(scope, name));
        self.observe_targets(&[link]);
        match self.st.res.get(&Api::key(kind, scope, name)) {
            Some(r) => Ok(r.v.clone()),
            None => Err(not_found(&self.path(&kind.rel(scope, name)))),
        }
    }

    fn list_kind(&mut self, call: &Call, kind: Kind, scope: &str) -> Result<Value, ApiError> {
        if matches!(kind, Kind::Instance | Kind::Disk) {
            self.check_zone(scope)?;
        }
        let links: Vec<String> = self
            .st
            .res
            .keys()
            .filter(|(k, s, _)| *k == kind && s == scope)
            .map(|(k, s, n)| self.sh.link(&k.rel(s, n)))
            .collect();
        self.observe_targets(&links);
        let items: Vec<(String, Value)> = self
            .st
            .res
            .iter()
            .filter(|((k, s, _), _)| *k == kind && s == scope)
            .map(|((_, _, n), r)| (n.clone(), r.v.clone()))
            .collect();
        let list_kind = format!("compute#{}List", kind.noun());
        self.list(call, &list_kind, &kind.list_rel(scope), items)
    }

    fn list(
        &mut self,
        call: &Call,
        list_kind: &str,
        rel: &str,
        mut items: Vec<(String, Value)>,
    ) -> Result<Value, ApiError> {
        let filter = match call.query.get("filter") {
            Some(f) if !f.trim().is_empty() => parse_filter(f).map_err(|why| {
                ApiError::new(
                    400,
                    "invalid",
                    format!("Invalid list filter expression '{f}': {why}"),
                )
            })?,
            _ => Vec::new(),
        };
        let max = match call.query.get("maxResults") {
            None => 500,
            Some(m) => match m.parse::<usize>() {
                Ok(0) => 500,
                Ok(n) if n <= 500 => n,
                _ => {
                    return Err(invalid_value(
                        "maxResults",
                        m,
                        "Must be less than or equal to 500",
                    ));
                }
            },
        };
        match call.query.get("orderBy").map(String::as_str) {
            None | Some("name") => {}
            Some(o) => return Err(invalid_value("orderBy", o, "This fake sorts by name only.")),
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let after = match call.query.get("pageToken") {
            None => None,
            Some(t) if t.is_empty() => None,
            Some(t) => {
                let decoded = b64
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.strip_prefix("after:").map(str::to_string));
                match decoded {
                    Some(a) => Some(a),
                    None => return Err(invalid_value("pageToken", t, "Invalid page token.")),
                }
            }
        };
        items.sort_by(|a, b| a.0.cmp(&b.0));
        let mut page: Vec<(String, Value)> = items
            .into_iter()
            .filter(|(n, _)| after.as_ref().is_none_or(|a| n > a))
            .filter(|(_, v)| filter_matches(v, &filter))
            .take(max + 1)
            .collect();
        let more = page.len() > max;
        page.truncate(max);
        let mut out = json!({
            "kind": list_kind,
            "id": self.path(rel),
            "selfLink": self.sh.link(rel),
        });
        if more && let Some((last, _)) = page.last() {
            out["nextPageToken"] = json!(b64.encode(format!("after:{last}")));
        }
        if !page.is_empty() {
            out["items"] = Value::Array(page.into_iter().map(|(_, v)| v).collect());
        }
        Ok(out)
    }

    fn zone_value(&mut self, zone: &str) -> Value {
        let id = match self.st.zone_ids.get(zone) {
            Some(id) => id.clone(),
            None => {
                let id = self.st.new_id();
                self.st.zone_ids.insert(zone.to_string(), id.clone());
                id
            }
        };
        json!({
            "kind": "compute#zone",
            "id": id,
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": zone,
            "description": zone,
            "status": "UP",
            "region": self.sh.link(&format!("regions/{}", region_of(zone))),
            "selfLink": self.sh.link(&format!("zones/{zone}")),
            "availableCpuPlatforms": ["Intel Cascade Lake", "Intel Ice Lake", "AMD Milan"],
            "supportsPzs": false,
        })
    }

    fn zone_get(&mut self, zone: &str) -> Result<Value, ApiError> {
        if !self.sh.zones.iter().any(|z| z == zone) {
            return Err(not_found(&self.path(&format!("zones/{zone}"))));
        }
        Ok(self.zone_value(zone))
    }

    fn zones_list(&mut self, call: &Call) -> Result<Value, ApiError> {
        let zones = self.sh.zones.clone();
        let items = zones
            .iter()
            .map(|z| (z.clone(), self.zone_value(z)))
            .collect();
        self.list(call, "compute#zoneList", "zones", items)
    }

    // --- instances ------------------------------------------------------------------------

    fn instance(&self, zone: &str, name: &str) -> Result<&Res, ApiError> {
        self.check_zone(zone)?;
        self.st
            .res
            .get(&Api::key(Kind::Instance, zone, name))
            .ok_or_else(|| not_found(&self.path(&Kind::Instance.rel(zone, name))))
    }

    fn instance_mut(&mut self, zone: &str, name: &str) -> &mut Res {
        self.st
            .res
            .get_mut(&Api::key(Kind::Instance, zone, name))
            .expect("the instance was looked up under the same lock")
    }

    fn resolve_image(&self, reference: &str) -> Option<String> {
        let segs = self.sh.ref_segments(reference)?;
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match segs.as_slice() {
            ["global", "images", "family", f] => self.family_newest(f),
            ["global", "images", n] => self
                .st
                .res
                .contains_key(&Api::key(Kind::Image, "", n))
                .then(|| (*n).to_string()),
            _ => None,
        }
    }

    fn family_newest(&self, family: &str) -> Option<String> {
        self.st
            .res
            .iter()
            .filter(|((k, _, _), r)| {
                *k == Kind::Image && r.v["family"] == family && r.v["deprecated"].is_null()
            })
            .max_by_key(|(_, r)| r.seq)
            .map(|((_, _, n), _)| n.clone())
    }

    fn instances_insert(&mut self, call: &Call, zone: &str) -> Result<Value, ApiError> {
        self.check_zone(zone)?;
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Instance.rel(zone, name);
        if self
            .st
            .res
            .contains_key(&Api::key(Kind::Instance, zone, name))
        {
            return Err(already_exists(&self.path(&rel)));
        }
        let mt = body
            .get("machineType")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.machineType"))?;
        let machine_type = self.resolve_machine_type(mt, zone)?;
        let labels = check_labels("resource.labels", body.get("labels"))?;
        let metadata_items = check_metadata("resource.metadata", body.get("metadata"))?;

        // Disks: validate everything before changing anything.
        let disks_in = body
            .get("disks")
            .and_then(Value::as_array)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| required("resource.disks"))?;
        struct NewDisk {
            name: String,
            v: Value,
            marker: Option<u8>,
        }
        let mut new_disks: Vec<NewDisk> = Vec::new();
        let mut attached: Vec<Value> = Vec::new();
        for (i, d) in disks_in.iter().enumerate() {
            let field = format!("resource.disks[{i}]");
            let boot = d["boot"] == true;
            if boot && i > 0 {
                return Err(invalid_value(
                    &format!("{field}.boot"),
                    "true",
                    "Boot disk must be the first disk attached to the instance.",
                ));
            }
            if d["type"].as_str().is_some_and(|t| t != "PERSISTENT") {
                return Err(invalid_value(
                    &format!("{field}.type"),
                    d["type"].as_str().unwrap_or(""),
                    "Only PERSISTENT disks are supported by this fake.",
                ));
            }
            let mode = d["mode"].as_str().unwrap_or("READ_WRITE");
            let device_name = d["deviceName"]
                .as_str()
                .map_or_else(|| format!("persistent-disk-{i}"), str::to_string);
            let (disk_name, size_gb) = match (d["source"].as_str(), d.get("initializeParams")) {
                (Some(src), None) => {
                    let dname = self
                        .sh
                        .ref_segments(src)
                        .and_then(|s| match s.as_slice() {
                            [a, z, b, n] if a == "zones" && b == "disks" && z == zone => {
                                Some(n.clone())
                            }
                            _ => None,
                        })
                        .filter(|n| self.st.res.contains_key(&Api::key(Kind::Disk, zone, n)))
                        .ok_or_else(|| {
                            invalid_value(
                                &format!("{field}.source"),
                                src,
                                "The referenced disk resource cannot be found.",
                            )
                        })?;
                    let disk = &self.st.res[&Api::key(Kind::Disk, zone, &dname)];
                    if let Some(u) = disk.v["users"].as_array().and_then(|u| u.first())
                        && mode == "READ_WRITE"
                    {
                        return Err(in_use(
                            "disk",
                            &self.path(&Kind::Disk.rel(zone, &dname)),
                            u.as_str().unwrap_or("").trim_start_matches(SELF_LINK_BASE),
                        ));
                    }
                    let size = disk.v["sizeGb"].as_str().unwrap_or("10").to_string();
                    (dname, size)
                }
                (None, Some(ip)) => {
                    let dname = ip["diskName"].as_str().map_or_else(
                        || {
                            if boot {
                                name.to_string()
                            } else {
                                format!("{name}-{i}")
                            }
                        },
                        str::to_string,
                    );
                    check_name(&format!("{field}.initializeParams.diskName"), &dname)?;
                    if self
                        .st
                        .res
                        .contains_key(&Api::key(Kind::Disk, zone, &dname))
                        || new_disks.iter().any(|n| n.name == dname)
                    {
                        return Err(already_exists(&self.path(&Kind::Disk.rel(zone, &dname))));
                    }
                    let image = match ip["sourceImage"].as_str() {
                        Some(src) => Some(self.resolve_image(src).ok_or_else(|| {
                            invalid_value(
                                &format!("{field}.initializeParams.sourceImage"),
                                src,
                                "The referenced image resource cannot be found.",
                            )
                        })?),
                        None if boot => {
                            return Err(required(&format!("{field}.initializeParams.sourceImage")));
                        }
                        None => None,
                    };
                    let disk_labels = check_labels(
                        &format!("{field}.initializeParams.labels"),
                        ip.get("labels"),
                    )?;
                    let disk_body = json!({
                        "name": dname,
                        "sizeGb": ip["diskSizeGb"],
                        "type": ip["diskType"],
                        "labels": disk_labels,
                        "description": ip["description"],
                    });
                    let (v, marker) = self.disk_value(
                        zone,
                        &dname,
                        disk_body.as_object().expect("literal object"),
                        image.as_deref(),
                        &format!("{field}.initializeParams"),
                        "READY",
                    )?;
                    let size = v["sizeGb"].as_str().unwrap_or("10").to_string();
                    new_disks.push(NewDisk {
                        name: dname.clone(),
                        v,
                        marker,
                    });
                    (dname, size)
                }
                _ => {
                    return Err(invalid_value(
                        &format!("{field}.source"),
                        "",
                        "Exactly one of source or initializeParams must be specified.",
                    ));
                }
            };
            if attached
                .iter()
                .any(|a| a["deviceName"] == device_name.as_str())
            {
                return Err(invalid_value(
                    &format!("{field}.deviceName"),
                    &device_name,
                    "Device names must be unique.",
                ));
            }
            attached.push(json!({
                "kind": "compute#attachedDisk",
                "type": "PERSISTENT",
                "mode": mode,
                "source": self.sh.link(&Kind::Disk.rel(zone, &disk_name)),
                "deviceName": device_name,
                "index": i,
                "boot": boot,
                "autoDelete": d["autoDelete"] == true,
                "interface": d["interface"].as_str().unwrap_or("SCSI"),
                "diskSizeGb": size_gb,
            }));
        }
        if disks_in.first().is_none_or(|d| d["boot"] != true) {
            return Err(invalid_value(
                "resource.disks",
                "",
                "Boot disk must be specified.",
            ));
        }

        // Network interfaces.
        let nics_in = body
            .get("networkInterfaces")
            .and_then(Value::as_array)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| required("resource.networkInterfaces"))?;
        let region = region_of(zone);
        let mut nic_plans: Vec<(String, Key, Option<String>, Vec<Value>)> = Vec::new();
        for (i, nic) in nics_in.iter().enumerate() {
            let field = format!("resource.networkInterfaces[{i}]");
            let net_ref = nic["network"].as_str().unwrap_or("global/networks/default");
            let net_name = self
                .sh
                .ref_segments(net_ref)
                .and_then(|s| match s.as_slice() {
                    [g, n, name] if g == "global" && n == "networks" => Some(name.clone()),
                    _ => None,
                })
                .filter(|n| self.st.res.contains_key(&Api::key(Kind::Network, "", n)))
                .ok_or_else(|| {
                    invalid_value(
                        &format!("{field}.network"),
                        net_ref,
                        "The referenced network resource cannot be found.",
                    )
                })?;
            let net_link = self.sh.link(&Kind::Network.rel("", &net_name));
            let subnet_key = match nic["subnetwork"].as_str() {
                Some(s) => self
                    .sh
                    .ref_segments(s)
                    .and_then(|segs| match segs.as_slice() {
                        [r, reg, sub, n]
                            if r == "regions" && sub == "subnetworks" && *reg == region =>
                        {
                            Some(Api::key(Kind::Subnetwork, reg, n))
                        }
                        _ => None,
                    })
                    .filter(|k| {
                        self.st
                            .res
                            .get(k)
                            .is_some_and(|r| r.v["network"] == net_link.as_str())
                    })
                    .ok_or_else(|| {
                        invalid_value(
                            &format!("{field}.subnetwork"),
                            s,
                            "The referenced subnetwork resource cannot be found.",
                        )
                    })?,
                None => {
                    let auto = self.st.res[&Api::key(Kind::Network, "", &net_name)].v["autoCreateSubnetworks"]
                        == true;
                    let key = Api::key(Kind::Subnetwork, &region, &net_name);
                    if !auto || !self.st.res.contains_key(&key) {
                        return Err(invalid_value(
                            &format!("{field}.subnetwork"),
                            "",
                            "Subnetwork should be specified for custom subnetmode network",
                        ));
                    }
                    key
                }
            };
            let mut acs = Vec::new();
            for ac in nic["accessConfigs"].as_array().into_iter().flatten() {
                let t = ac["type"].as_str().unwrap_or("ONE_TO_ONE_NAT");
                if t != "ONE_TO_ONE_NAT" {
                    return Err(invalid_value(
                        &format!("{field}.accessConfigs.type"),
                        t,
                        "Only ONE_TO_ONE_NAT is supported for IPv4.",
                    ));
                }
                acs.push(ac.clone());
            }
            nic_plans.push((
                net_link,
                subnet_key,
                nic["networkIP"].as_str().map(str::to_string),
                acs,
            ));
        }

        let id = self.st.new_id();
        if !call.op_fails() {
            let inst_link = self.sh.link(&rel);
            for nd in new_disks {
                let mut v = nd.v;
                v["users"] = json!([inst_link]);
                v["lastAttachTimestamp"] = v["creationTimestamp"].clone();
                self.put(Kind::Disk, zone, &nd.name, v, nd.marker);
            }
            for a in &attached {
                if let Some(dname) = a["source"].as_str().and_then(|s| s.rsplit('/').next())
                    && let Some(d) = self.st.res.get_mut(&Api::key(Kind::Disk, zone, dname))
                {
                    add_user(&mut d.v, &inst_link);
                }
            }
            let mut nics = Vec::new();
            for (i, (net_link, subnet_key, ip, acs)) in nic_plans.into_iter().enumerate() {
                let ip = match ip {
                    Some(ip) => ip,
                    None => self.allocate_ip(&subnet_key),
                };
                let acs: Vec<Value> = acs
                    .iter()
                    .map(|ac| {
                        let nat = ac["natIP"]
                            .as_str()
                            .map_or_else(|| self.allocate_nat(), str::to_string);
                        json!({
                            "kind": "compute#accessConfig",
                            "type": "ONE_TO_ONE_NAT",
                            "name": ac["name"].as_str().unwrap_or("External NAT"),
                            "natIP": nat,
                            "networkTier": ac["networkTier"].as_str().unwrap_or("PREMIUM"),
                        })
                    })
                    .collect();
                let mut nic = json!({
                    "kind": "compute#networkInterface",
                    "name": format!("nic{i}"),
                    "network": net_link,
                    "subnetwork": self.sh.link(&Kind::Subnetwork.rel(&subnet_key.1, &subnet_key.2)),
                    "networkIP": ip,
                    "fingerprint": fingerprint_of(&json!([i, ip])),
                    "stackType": "IPV4_ONLY",
                });
                if !acs.is_empty() {
                    nic["accessConfigs"] = Value::Array(acs);
                }
                nics.push(nic);
            }
            let mut v = Value::Object(body.clone());
            let now = rfc3339(SystemTime::now());
            v["kind"] = json!("compute#instance");
            v["id"] = json!(id);
            v["creationTimestamp"] = json!(now);
            v["name"] = json!(name);
            v["zone"] = json!(self.sh.link(&format!("zones/{zone}")));
            v["status"] = json!("PROVISIONING");
            v["machineType"] = json!(machine_type);
            set_labels(&mut v, labels);
            v["metadata"] = metadata_value(metadata_items);
            v["disks"] = Value::Array(attached);
            v["networkInterfaces"] = Value::Array(nics);
            v["canIpForward"] = json!(body.get("canIpForward") == Some(&json!(true)));
            v["selfLink"] = json!(inst_link);
            v["cpuPlatform"] = json!("Unknown CPU Platform");
            v["startRestricted"] = json!(false);
            v["deletionProtection"] = json!(body.get("deletionProtection") == Some(&json!(true)));
            if v.get("scheduling").is_none() {
                v["scheduling"] = json!({
                    "onHostMaintenance": "MIGRATE",
                    "automaticRestart": true,
                    "preemptible": false,
                    "provisioningModel": "STANDARD",
                });
            }
            if let Some(tags) = v.get_mut("tags").and_then(Value::as_object_mut) {
                let fp = fingerprint_of(&tags.get("items").cloned().unwrap_or(Value::Null));
                tags.insert("fingerprint".into(), json!(fp));
            }
            refresh_instance_fingerprint(&mut v);
            self.put(Kind::Instance, zone, name, v, None);
        }
        Ok(self.new_op(
            call,
            Some(zone),
            "insert",
            &rel,
            &id,
            Effect::InstanceUp(zone.into(), name.into()),
        ))
    }

    fn resolve_machine_type(&self, reference: &str, zone: &str) -> Result<String, ApiError> {
        let bad = |why: &str| invalid_value("resource.machineType", reference, why);
        let segs = self
            .sh
            .ref_segments(reference)
            .ok_or_else(|| bad("Invalid machine type URL."))?;
        let [zs, in_zone, mts, mt] = segs.as_slice() else {
            return Err(bad("Invalid machine type URL."));
        };
        if zs != "zones" || mts != "machineTypes" {
            return Err(bad("Invalid machine type URL."));
        }
        if in_zone != zone || !machine_type_exists(mt) {
            return Err(bad(&format!(
                "Machine type with name '{mt}' does not exist in zone '{zone}'."
            )));
        }
        Ok(self.sh.link(&format!("zones/{zone}/machineTypes/{mt}")))
    }

    fn allocate_ip(&mut self, subnet: &Key) -> String {
        let base = self
            .st
            .res
            .get(subnet)
            .and_then(|r| r.v["ipCidrRange"].as_str())
            .and_then(|c| {
                let addr = c.split('/').next()?;
                addr.parse::<std::net::Ipv4Addr>().ok()
            });
        let base = u32::from(base.unwrap_or(std::net::Ipv4Addr::new(10, 128, 0, 0)));
        let counter = self
            .st
            .next_host
            .entry(format!("{}/{}", subnet.1, subnet.2))
            .or_insert(2);
        let ip = std::net::Ipv4Addr::from(base + *counter);
        *counter += 1;
        ip.to_string()
    }

    fn allocate_nat(&mut self) -> String {
        let n = self.st.next_nat;
        self.st.next_nat = if n >= 254 { 10 } else { n + 1 };
        format!("203.0.113.{n}")
    }

    fn instances_delete(&mut self, call: &Call, zone: &str, name: &str) -> Result<Value, ApiError> {
        let id = self.instance(zone, name)?.v["id"].clone();
        if !call.op_fails() {
            let r = self.instance_mut(zone, name);
            if r.v["status"] != "TERMINATED" {
                r.v["status"] = json!("STOPPING");
            }
        }
        let rel = Kind::Instance.rel(zone, name);
        Ok(self.new_op(
            call,
            Some(zone),
            "delete",
            &rel,
            id.as_str().unwrap_or(""),
            Effect::InstanceDelete(zone.into(), name.into()),
        ))
    }

    fn instances_start(&mut self, call: &Call, zone: &str, name: &str) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let status = r.v["status"].as_str().unwrap_or("").to_string();
        let has_boot = r.v["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["boot"] == true));
        let rel = Kind::Instance.rel(zone, name);
        let effect = match status.as_str() {
            "TERMINATED" => {
                if !has_boot {
                    return Err(invalid_usage("The instance has no boot disk."));
                }
                if !call.op_fails() {
                    self.instance_mut(zone, name).v["status"] = json!("PROVISIONING");
                }
                Effect::InstanceUp(zone.into(), name.into())
            }
            "RUNNING" | "PROVISIONING" | "STAGING" => Effect::None,
            _ => return Err(not_ready(&self.path(&rel))),
        };
        Ok(self.new_op(call, Some(zone), "start", &rel, &id, effect))
    }

    fn instances_stop(&mut self, call: &Call, zone: &str, name: &str) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let status = r.v["status"].as_str().unwrap_or("").to_string();
        let rel = Kind::Instance.rel(zone, name);
        let effect = match status.as_str() {
            "RUNNING" | "PROVISIONING" | "STAGING" => {
                if !call.op_fails() {
                    self.instance_mut(zone, name).v["status"] = json!("STOPPING");
                }
                Effect::InstanceStop(zone.into(), name.into())
            }
            _ => Effect::None,
        };
        Ok(self.new_op(call, Some(zone), "stop", &rel, &id, effect))
    }

    fn instances_reset(&mut self, call: &Call, zone: &str, name: &str) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let rel = Kind::Instance.rel(zone, name);
        if r.v["status"] != "RUNNING" {
            return Err(not_ready(&self.path(&rel)));
        }
        Ok(self.new_op(
            call,
            Some(zone),
            "reset",
            &rel,
            &id,
            Effect::InstanceReset(zone.into(), name.into()),
        ))
    }

    fn instances_set_labels(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let current = r.v["labelFingerprint"].clone();
        let body = call.body_obj()?;
        let labels = check_labels("labels", body.get("labels"))?;
        if body.get("labelFingerprint") != Some(&current) {
            return Err(ApiError::new(
                412,
                "conditionNotMet",
                "Labels fingerprint either invalid or resource labels have changed",
            ));
        }
        if !call.op_fails() {
            let r = self.instance_mut(zone, name);
            set_labels(&mut r.v, labels);
            refresh_instance_fingerprint(&mut r.v);
        }
        let rel = Kind::Instance.rel(zone, name);
        Ok(self.new_op(call, Some(zone), "setLabels", &rel, &id, Effect::None))
    }

    /// `instances.setMachineType`: only a stopped (`TERMINATED`) instance; the type as
    /// `instances.insert` checks it.
    fn instances_set_machine_type(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let rel = Kind::Instance.rel(zone, name);
        if r.v["status"] != "TERMINATED" {
            return Err(not_ready(&self.path(&rel)));
        }
        let body = call.body_obj()?;
        let mt = body
            .get("machineType")
            .and_then(Value::as_str)
            .ok_or_else(|| required("machineType"))?;
        let machine_type = self.resolve_machine_type(mt, zone)?;
        if !call.op_fails() {
            self.instance_mut(zone, name).v["machineType"] = json!(machine_type);
        }
        Ok(self.new_op(call, Some(zone), "setMachineType", &rel, &id, Effect::None))
    }

    fn instances_set_metadata(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let current = r.v["metadata"]["fingerprint"].clone();
        let body = call.body.clone().unwrap_or(Value::Null);
        let items = check_metadata("metadata", Some(&body))?;
        if body.get("fingerprint") != Some(&current) {
            return Err(ApiError::new(
                412,
                "conditionNotMet",
                "Supplied fingerprint does not match current metadata fingerprint.",
            ));
        }
        if !call.op_fails() {
            let r = self.instance_mut(zone, name);
            r.v["metadata"] = metadata_value(items);
            refresh_instance_fingerprint(&mut r.v);
        }
        let rel = Kind::Instance.rel(zone, name);
        Ok(self.new_op(call, Some(zone), "setMetadata", &rel, &id, Effect::None))
    }

    fn instances_attach_disk(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let status = r.v["status"].as_str().unwrap_or("").to_string();
        let has_boot = r.v["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["boot"] == true));
        let devices: Vec<Value> = r.v["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["deviceName"].clone())
            .collect();
        let body = call.body_obj()?;
        let src = body
            .get("source")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.source"))?;
        let dname = self
            .sh
            .ref_segments(src)
            .and_then(|s| match s.as_slice() {
                [a, z, b, n] if a == "zones" && b == "disks" && z == zone => Some(n.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                invalid_value(
                    "resource.source",
                    src,
                    "The referenced disk resource cannot be found.",
                )
            })?;
        let disk_path = self.path(&Kind::Disk.rel(zone, &dname));
        let disk = self
            .st
            .res
            .get(&Api::key(Kind::Disk, zone, &dname))
            .ok_or_else(|| not_found(&disk_path))?;
        if let Some(u) = disk.v["users"].as_array().and_then(|u| u.first()) {
            return Err(in_use(
                "disk",
                &disk_path,
                u.as_str().unwrap_or("").trim_start_matches(SELF_LINK_BASE),
            ));
        }
        let size = disk.v["sizeGb"].clone();
        let boot = body.get("boot") == Some(&json!(true));
        if boot {
            if status != "TERMINATED" {
                return Err(invalid_usage(
                    "To attach a boot disk, the instance must be in TERMINATED state.",
                ));
            }
            if has_boot {
                return Err(invalid_value(
                    "resource.boot",
                    "true",
                    "The instance already has a boot disk.",
                ));
            }
        }
        if let Some(dev) = body.get("deviceName")
            && devices.contains(dev)
        {
            return Err(invalid_value(
                "resource.deviceName",
                dev.as_str().unwrap_or(""),
                "A disk with this device name is already attached.",
            ));
        }
        let entry = json!({
            "kind": "compute#attachedDisk",
            "type": "PERSISTENT",
            "mode": body.get("mode").and_then(Value::as_str).unwrap_or("READ_WRITE"),
            "source": self.sh.link(&Kind::Disk.rel(zone, &dname)),
            "deviceName": body.get("deviceName").cloned().unwrap_or(Value::Null),
            "boot": boot,
            "autoDelete": body.get("autoDelete") == Some(&json!(true)),
            "interface": body.get("interface").and_then(Value::as_str).unwrap_or("SCSI"),
            "diskSizeGb": size,
        });
        let rel = Kind::Instance.rel(zone, name);
        let effect = Effect::AttachDisk {
            zone: zone.into(),
            instance: name.into(),
            disk: dname,
            entry,
        };
        Ok(self.new_op(call, Some(zone), "attachDisk", &rel, &id, effect))
    }

    fn instances_detach_disk(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let device = call
            .query
            .get("deviceName")
            .ok_or_else(|| required("deviceName"))?;
        let Some(d) = r.v["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["deviceName"] == device.as_str())
        else {
            return Err(invalid_value(
                "deviceName",
                device,
                &format!("No attached disk found with device name '{device}'"),
            ));
        };
        if d["boot"] == true && r.v["status"] != "TERMINATED" {
            return Err(invalid_usage(
                "To detach the boot disk, the instance must be in TERMINATED state.",
            ));
        }
        let rel = Kind::Instance.rel(zone, name);
        let effect = Effect::DetachDisk {
            zone: zone.into(),
            instance: name.into(),
            device: device.clone(),
        };
        Ok(self.new_op(call, Some(zone), "detachDisk", &rel, &id, effect))
    }

    fn instances_guest_attributes(
        &mut self,
        call: &Call,
        zone: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let r = self.instance(zone, name)?;
        let link = r.v["selfLink"].as_str().unwrap_or("").to_string();
        let rel = Kind::Instance.rel(zone, name);
        if let Some(var) = call.query.get("variableKey") {
            let (ns, key) = var.split_once('/').unwrap_or((var, ""));
            return match r.guest.get(&(ns.to_string(), key.to_string())) {
                Some(v) => Ok(json!({
                    "kind": "compute#guestAttributes",
                    "selfLink": format!("{link}/guestAttributes/{var}"),
                    "variableKey": var,
                    "variableValue": v,
                })),
                None => Err(not_found(
                    &self.path(&format!("{rel}/guestAttributes/{var}")),
                )),
            };
        }
        let query_path = call.query.get("queryPath").cloned().unwrap_or_default();
        let (ns, key_prefix) = query_path.split_once('/').unwrap_or((&query_path, ""));
        let items: Vec<Value> = r
            .guest
            .iter()
            .filter(|((n, k), _)| (ns.is_empty() || n == ns) && k.starts_with(key_prefix))
            .map(|((n, k), v)| json!({"namespace": n, "key": k, "value": v}))
            .collect();
        if items.is_empty() {
            return Err(not_found(
                &self.path(&format!("{rel}/guestAttributes/{query_path}")),
            ));
        }
        Ok(json!({
            "kind": "compute#guestAttributes",
            "selfLink": format!("{link}/guestAttributes/{query_path}"),
            "queryPath": query_path,
            "queryValue": {"items": items},
        }))
    }

    // --- disks ----------------------------------------------------------------------------

    /// Builds a disk from an insert body (also the initializeParams of an instance's disk).
    fn disk_value(
        &mut self,
        zone: &str,
        name: &str,
        body: &Map<String, Value>,
        image: Option<&str>,
        field: &str,
        status: &str,
    ) -> Result<(Value, Option<u8>), ApiError> {
        let (image_size, image_link, image_id, marker) = match image {
            Some(img) => {
                let r = &self.st.res[&Api::key(Kind::Image, "", img)];
                if r.v["status"] != "READY" {
                    return Err(not_ready(&self.path(&Kind::Image.rel("", img))));
                }
                (
                    r.v["diskSizeGb"]
                        .as_str()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(10),
                    Some(r.v["selfLink"].clone()),
                    Some(r.v["id"].clone()),
                    r.marker,
                )
            }
            None => (0, None, None, None),
        };
        let type_rel = match body.get("type").and_then(Value::as_str) {
            None => format!("zones/{zone}/diskTypes/pd-standard"),
            Some(t) => {
                let segs = self.sh.ref_segments(t).unwrap_or_default();
                match segs.as_slice() {
                    [a, z, b, ty]
                        if a == "zones"
                            && z == zone
                            && b == "diskTypes"
                            && [
                                "pd-standard",
                                "pd-balanced",
                                "pd-ssd",
                                "pd-extreme",
                                "hyperdisk-balanced",
                            ]
                            .contains(&ty.as_str()) =>
                    {
                        format!("zones/{zone}/diskTypes/{ty}")
                    }
                    _ => {
                        return Err(invalid_value(
                            &format!("{field}.type"),
                            t,
                            "The referenced diskType resource cannot be found.",
                        ));
                    }
                }
            }
        };
        let default_size = if image.is_some() {
            image_size
        } else if type_rel.ends_with("pd-standard") {
            500
        } else {
            100
        };
        let size = match body.get("sizeGb").or_else(|| body.get("diskSizeGb")) {
            None | Some(Value::Null) => default_size,
            Some(v) => {
                let s = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                match s.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        return Err(invalid_value(
                            &format!("{field}.sizeGb"),
                            &s,
                            "Must be a positive integer.",
                        ));
                    }
                }
            }
        };
        if size < image_size {
            return Err(invalid_value(
                &format!("{field}.sizeGb"),
                &size.to_string(),
                &format!(
                    "Requested disk size cannot be smaller than the image size ({image_size} GB)"
                ),
            ));
        }
        let labels = check_labels(&format!("{field}.labels"), body.get("labels"))?;
        let mut v = json!({
            "kind": "compute#disk",
            "id": self.st.new_id(),
            "creationTimestamp": rfc3339(SystemTime::now()),
            "name": name,
            "sizeGb": size.to_string(),
            "zone": self.sh.link(&format!("zones/{zone}")),
            "status": status,
            "selfLink": self.sh.link(&Kind::Disk.rel(zone, name)),
            "type": self.sh.link(&type_rel),
            "physicalBlockSizeBytes": "4096",
            "architecture": "X86_64",
        });
        if let Some(d) = body.get("description").filter(|d| d.is_string()) {
            v["description"] = d.clone();
        }
        if let (Some(l), Some(i)) = (image_link, image_id) {
            v["sourceImage"] = l;
            v["sourceImageId"] = i;
        }
        set_labels(&mut v, labels);
        Ok((v, marker))
    }

    fn disks_insert(&mut self, call: &Call, zone: &str) -> Result<Value, ApiError> {
        self.check_zone(zone)?;
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Disk.rel(zone, name);
        if self.st.res.contains_key(&Api::key(Kind::Disk, zone, name)) {
            return Err(already_exists(&self.path(&rel)));
        }
        let src = call
            .query
            .get("sourceImage")
            .map(String::as_str)
            .or_else(|| body.get("sourceImage").and_then(Value::as_str));
        let image = match src {
            Some(s) => Some(self.resolve_image(s).ok_or_else(|| {
                invalid_value(
                    "resource.sourceImage",
                    s,
                    "The referenced image resource cannot be found.",
                )
            })?),
            None => None,
        };
        let (v, marker) =
            self.disk_value(zone, name, body, image.as_deref(), "resource", "CREATING")?;
        let id = v["id"].as_str().unwrap_or("").to_string();
        if !call.op_fails() {
            self.put(Kind::Disk, zone, name, v, marker);
        }
        Ok(self.new_op(
            call,
            Some(zone),
            "insert",
            &rel,
            &id,
            Effect::DiskReady(zone.into(), name.into()),
        ))
    }

    fn disks_delete(&mut self, call: &Call, zone: &str, name: &str) -> Result<Value, ApiError> {
        self.check_zone(zone)?;
        let rel = Kind::Disk.rel(zone, name);
        let key = Api::key(Kind::Disk, zone, name);
        let disk = self
            .st
            .res
            .get(&key)
            .ok_or_else(|| not_found(&self.path(&rel)))?;
        if let Some(u) = disk.v["users"].as_array().and_then(|u| u.first()) {
            return Err(in_use(
                "disk",
                &self.path(&rel),
                u.as_str().unwrap_or("").trim_start_matches(SELF_LINK_BASE),
            ));
        }
        let id = disk.v["id"].as_str().unwrap_or("").to_string();
        if !call.op_fails()
            && let Some(d) = self.st.res.get_mut(&key)
        {
            d.v["status"] = json!("DELETING");
        }
        Ok(self.new_op(call, Some(zone), "delete", &rel, &id, Effect::Remove(key)))
    }

    // --- images ---------------------------------------------------------------------------

    fn image_value(
        &mut self,
        name: &str,
        body: &Map<String, Value>,
        size: &str,
        source_disk: Option<(&Value, &Value)>,
        status: &str,
    ) -> Value {
        let mut v = Value::Object(body.clone());
        v["kind"] = json!("compute#image");
        v["id"] = json!(self.st.new_id());
        v["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        v["name"] = json!(name);
        v["selfLink"] = json!(self.sh.link(&Kind::Image.rel("", name)));
        v["status"] = json!(status);
        v["sourceType"] = json!("RAW");
        v["diskSizeGb"] = json!(size);
        v["archiveSizeBytes"] = json!("1073741824");
        v["storageLocations"] = json!(["us"]);
        v["architecture"] = json!("X86_64");
        if let Some((link, id)) = source_disk {
            v["sourceDisk"] = link.clone();
            v["sourceDiskId"] = id.clone();
        }
        if let Some(raw) = v.get_mut("rawDisk").and_then(Value::as_object_mut) {
            raw.entry("containerType").or_insert(json!("TAR"));
        }
        let labels = body
            .get("labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        set_labels(&mut v, labels);
        v
    }

    fn images_insert(&mut self, call: &Call) -> Result<Value, ApiError> {
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Image.rel("", name);
        if self.st.res.contains_key(&Api::key(Kind::Image, "", name)) {
            return Err(already_exists(&self.path(&rel)));
        }
        check_labels("resource.labels", body.get("labels"))?;
        if let Some(f) = body.get("family").and_then(Value::as_str) {
            check_name("resource.family", f)?;
        }
        let raw = body
            .get("rawDisk")
            .and_then(|r| r.get("source"))
            .and_then(Value::as_str);
        let sd = body.get("sourceDisk").and_then(Value::as_str);
        let (size, source_disk, marker) = match (raw, sd) {
            (Some(src), None) => {
                if !src.starts_with("https://storage.googleapis.com/") && !src.starts_with("gs://")
                {
                    return Err(invalid_value(
                        "resource.rawDisk.source",
                        src,
                        "The source must be a Cloud Storage URL.",
                    ));
                }
                ("10".to_string(), None, None)
            }
            (None, Some(src)) => {
                let key = self
                    .sh
                    .ref_segments(src)
                    .and_then(|s| match s.as_slice() {
                        [a, z, b, n] if a == "zones" && b == "disks" => {
                            Some(Api::key(Kind::Disk, z, n))
                        }
                        _ => None,
                    })
                    .filter(|k| self.st.res.contains_key(k))
                    .ok_or_else(|| {
                        invalid_value(
                            "resource.sourceDisk",
                            src,
                            "The referenced disk resource cannot be found.",
                        )
                    })?;
                let d = &self.st.res[&key];
                let force = call.query.get("forceCreate").is_some_and(|f| f == "true");
                for u in d.v["users"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    let running = self
                        .sh
                        .ref_segments(u)
                        .and_then(|s| match s.as_slice() {
                            [_, z, _, n] => self.st.res.get(&Api::key(Kind::Instance, z, n)),
                            _ => None,
                        })
                        .is_some_and(|i| i.v["status"] != "TERMINATED");
                    if running && !force {
                        return Err(in_use(
                            "disk",
                            &self.path(&Kind::Disk.rel(&key.1, &key.2)),
                            u.trim_start_matches(SELF_LINK_BASE),
                        ));
                    }
                }
                (
                    d.v["sizeGb"].as_str().unwrap_or("10").to_string(),
                    Some((d.v["selfLink"].clone(), d.v["id"].clone())),
                    d.marker,
                )
            }
            _ => {
                return Err(invalid_value(
                    "resource",
                    "",
                    "Exactly one of rawDisk.source or sourceDisk must be specified.",
                ));
            }
        };
        let v = self.image_value(
            name,
            body,
            &size,
            source_disk.as_ref().map(|(l, i)| (l, i)),
            "PENDING",
        );
        let id = v["id"].as_str().unwrap_or("").to_string();
        if !call.op_fails() {
            self.put(Kind::Image, "", name, v, marker);
        }
        Ok(self.new_op(
            call,
            None,
            "insert",
            &rel,
            &id,
            Effect::ImageReady(name.into()),
        ))
    }

    fn images_delete(&mut self, call: &Call, name: &str) -> Result<Value, ApiError> {
        let rel = Kind::Image.rel("", name);
        let key = Api::key(Kind::Image, "", name);
        let r = self
            .st
            .res
            .get(&key)
            .ok_or_else(|| not_found(&self.path(&rel)))?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        if !call.op_fails()
            && let Some(r) = self.st.res.get_mut(&key)
        {
            r.v["status"] = json!("DELETING");
        }
        Ok(self.new_op(call, None, "delete", &rel, &id, Effect::Remove(key)))
    }

    fn images_from_family(&mut self, family: &str) -> Result<Value, ApiError> {
        match self.family_newest(family) {
            Some(n) => self.get(Kind::Image, "", &n),
            None => Err(not_found(
                &self.path(&format!("global/images/family/{family}")),
            )),
        }
    }

    // --- networks, firewalls, routes ------------------------------------------------------

    fn create_defaults(&mut self) {
        self.create_network("default", true, "Default network for the project");
        let net = self.sh.link("global/networks/default");
        let rules = [
            (
                "default-allow-icmp",
                json!([{"IPProtocol": "icmp"}]),
                "0.0.0.0/0",
                "Allow ICMP from anywhere",
            ),
            (
                "default-allow-internal",
                json!([{"IPProtocol": "tcp", "ports": ["0-65535"]}, {"IPProtocol": "udp", "ports": ["0-65535"]}, {"IPProtocol": "icmp"}]),
                "10.128.0.0/9",
                "Allow internal traffic on the default network",
            ),
            (
                "default-allow-rdp",
                json!([{"IPProtocol": "tcp", "ports": ["3389"]}]),
                "0.0.0.0/0",
                "Allow RDP from anywhere",
            ),
            (
                "default-allow-ssh",
                json!([{"IPProtocol": "tcp", "ports": ["22"]}]),
                "0.0.0.0/0",
                "Allow SSH from anywhere",
            ),
        ];
        for (name, allowed, range, desc) in rules {
            let v = json!({
                "kind": "compute#firewall",
                "id": self.st.new_id(),
                "creationTimestamp": rfc3339(SystemTime::now()),
                "name": name,
                "description": desc,
                "network": net,
                "priority": 65534,
                "sourceRanges": [range],
                "allowed": allowed,
                "direction": "INGRESS",
                "logConfig": {"enable": false},
                "disabled": false,
                "selfLink": self.sh.link(&Kind::Firewall.rel("", name)),
            });
            self.put(Kind::Firewall, "", name, v, None);
        }
    }

    fn create_network(&mut self, name: &str, auto: bool, description: &str) -> Value {
        let link = self.sh.link(&Kind::Network.rel("", name));
        let id = self.st.new_id();
        let mut subnets = Vec::new();
        if auto {
            for (i, region) in self.sh.regions.iter().enumerate() {
                let second = 128 + 4 * (i as u32 % 32);
                let range = format!("10.{second}.0.0/20");
                let sub_link = self.sh.link(&Kind::Subnetwork.rel(region, name));
                let v = json!({
                    "kind": "compute#subnetwork",
                    "id": self.st.new_id(),
                    "creationTimestamp": rfc3339(SystemTime::now()),
                    "name": name,
                    "network": link,
                    "ipCidrRange": range,
                    "gatewayAddress": format!("10.{second}.0.1"),
                    "region": self.sh.link(&format!("regions/{region}")),
                    "selfLink": sub_link,
                    "privateIpGoogleAccess": false,
                    "fingerprint": fingerprint_of(&json!(range)),
                    "purpose": "PRIVATE",
                    "stackType": "IPV4_ONLY",
                });
                self.put(Kind::Subnetwork, region, name, v, None);
                if let Some(r) = self
                    .st
                    .res
                    .get_mut(&Api::key(Kind::Subnetwork, region, name))
                {
                    r.system = true;
                }
                subnets.push(sub_link);
                let route_name = format!("default-route-{}", self.st.hex(16));
                let rv = json!({
                    "kind": "compute#route",
                    "id": self.st.new_id(),
                    "creationTimestamp": rfc3339(SystemTime::now()),
                    "name": route_name,
                    "description": format!("Default local route to the subnetwork {range}."),
                    "network": link,
                    "destRange": range,
                    "priority": 0,
                    "nextHopNetwork": link,
                    "routeType": "SUBNET",
                    "selfLink": self.sh.link(&Kind::Route.rel("", &route_name)),
                });
                self.put(Kind::Route, "", &route_name, rv, None);
                if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Route, "", &route_name)) {
                    r.system = true;
                }
            }
        }
        let route_name = format!("default-route-{}", self.st.hex(16));
        let rv = json!({
            "kind": "compute#route",
            "id": self.st.new_id(),
            "creationTimestamp": rfc3339(SystemTime::now()),
            "name": route_name,
            "description": "Default route to the Internet.",
            "network": link,
            "destRange": "0.0.0.0/0",
            "priority": 1000,
            "nextHopGateway": self.sh.link("global/gateways/default-internet-gateway"),
            "routeType": "STATIC",
            "selfLink": self.sh.link(&Kind::Route.rel("", &route_name)),
        });
        self.put(Kind::Route, "", &route_name, rv, None);
        if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Route, "", &route_name)) {
            r.system = true;
        }
        let mut v = json!({
            "kind": "compute#network",
            "id": id,
            "creationTimestamp": rfc3339(SystemTime::now()),
            "name": name,
            "selfLink": link,
            "selfLinkWithId": self.sh.link(&Kind::Network.rel("", &id)),
            "autoCreateSubnetworks": auto,
            "routingConfig": {"routingMode": "REGIONAL"},
            "networkFirewallPolicyEnforcementOrder": "AFTER_CLASSIC_FIREWALL",
            "mtu": 1460,
        });
        if !description.is_empty() {
            v["description"] = json!(description);
        }
        if !subnets.is_empty() {
            v["subnetworks"] = json!(subnets);
        }
        self.put(Kind::Network, "", name, v.clone(), None);
        v
    }

    fn networks_insert(&mut self, call: &Call) -> Result<Value, ApiError> {
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Network.rel("", name);
        if self.st.res.contains_key(&Api::key(Kind::Network, "", name)) {
            return Err(already_exists(&self.path(&rel)));
        }
        let auto = body.get("autoCreateSubnetworks") == Some(&json!(true));
        let desc = body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let id = if call.op_fails() {
            self.st.new_id()
        } else {
            let v = self.create_network(name, auto, &desc);
            if let Some(r) = self.st.res.get_mut(&Api::key(Kind::Network, "", name)) {
                if let Some(rc) = body.get("routingConfig") {
                    r.v["routingConfig"] = rc.clone();
                }
                if let Some(mtu) = body.get("mtu") {
                    r.v["mtu"] = mtu.clone();
                }
            }
            v["id"].as_str().unwrap_or("").to_string()
        };
        Ok(self.new_op(call, None, "insert", &rel, &id, Effect::None))
    }

    fn networks_delete(&mut self, call: &Call, name: &str) -> Result<Value, ApiError> {
        let rel = Kind::Network.rel("", name);
        let key = Api::key(Kind::Network, "", name);
        let r = self
            .st
            .res
            .get(&key)
            .ok_or_else(|| not_found(&self.path(&rel)))?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        let link = self.sh.link(&rel);
        let user = self.st.res.iter().find(|((k, _, _), r)| {
            !r.system
                && match k {
                    Kind::Firewall | Kind::Route | Kind::Subnetwork => {
                        r.v["network"] == link.as_str()
                    }
                    Kind::Instance => r.v["networkInterfaces"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n["network"] == link.as_str())),
                    _ => false,
                }
        });
        if let Some(((k, s, n), _)) = user {
            return Err(in_use(
                "network",
                &self.path(&rel),
                &self.path(&k.rel(s, n)),
            ));
        }
        Ok(self.new_op(call, None, "delete", &rel, &id, Effect::Remove(key)))
    }

    fn network_link_of(
        &self,
        field: &str,
        body: &Map<String, Value>,
        default: bool,
    ) -> Result<String, ApiError> {
        let net_ref = match body.get("network").and_then(Value::as_str) {
            Some(n) => n,
            None if default => "global/networks/default",
            None => return Err(required(field)),
        };
        self.sh
            .ref_segments(net_ref)
            .and_then(|s| match s.as_slice() {
                [g, n, name] if g == "global" && n == "networks" => Some(name.clone()),
                _ => None,
            })
            .filter(|n| self.st.res.contains_key(&Api::key(Kind::Network, "", n)))
            .map(|n| self.sh.link(&Kind::Network.rel("", &n)))
            .ok_or_else(|| {
                not_found(
                    &self.path(
                        net_ref
                            .rsplit("projects/")
                            .next()
                            .unwrap_or(net_ref)
                            .split_once('/')
                            .map_or(net_ref, |(_, r)| r),
                    ),
                )
            })
    }

    fn firewalls_insert(&mut self, call: &Call) -> Result<Value, ApiError> {
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Firewall.rel("", name);
        if self
            .st
            .res
            .contains_key(&Api::key(Kind::Firewall, "", name))
        {
            return Err(already_exists(&self.path(&rel)));
        }
        let network = self.network_link_of("resource.network", body, true)?;
        let rules = match (body.get("allowed"), body.get("denied")) {
            (Some(a), None) | (None, Some(a)) => a,
            _ => {
                return Err(invalid_value(
                    "resource",
                    "",
                    "Exactly one of allowed or denied must be specified.",
                ));
            }
        };
        let rules = rules
            .as_array()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| required("resource.allowed"))?;
        for (i, r) in rules.iter().enumerate() {
            if r["IPProtocol"].as_str().is_none() {
                return Err(required(&format!("resource.allowed[{i}].IPProtocol")));
            }
        }
        let direction = body
            .get("direction")
            .and_then(Value::as_str)
            .unwrap_or("INGRESS")
            .to_string();
        let mut v = Value::Object(body.clone());
        let id = self.st.new_id();
        v["kind"] = json!("compute#firewall");
        v["id"] = json!(id);
        v["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        v["network"] = json!(network);
        v["direction"] = json!(direction);
        v["selfLink"] = json!(self.sh.link(&rel));
        if v.get("priority").is_none() {
            v["priority"] = json!(1000);
        }
        if v.get("disabled").is_none() {
            v["disabled"] = json!(false);
        }
        if v.get("logConfig").is_none() {
            v["logConfig"] = json!({"enable": false});
        }
        let has_source = ["sourceRanges", "sourceTags", "sourceServiceAccounts"]
            .iter()
            .any(|k| v.get(*k).is_some());
        if direction == "INGRESS" && !has_source {
            v["sourceRanges"] = json!(["0.0.0.0/0"]);
        }
        if direction == "EGRESS" && v.get("destinationRanges").is_none() {
            v["destinationRanges"] = json!(["0.0.0.0/0"]);
        }
        if !call.op_fails() {
            self.put(Kind::Firewall, "", name, v, None);
        }
        Ok(self.new_op(call, None, "insert", &rel, &id, Effect::None))
    }

    fn routes_insert(&mut self, call: &Call) -> Result<Value, ApiError> {
        let body = call.body_obj()?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.name"))?;
        check_name("resource.name", name)?;
        let rel = Kind::Route.rel("", name);
        if self.st.res.contains_key(&Api::key(Kind::Route, "", name)) {
            return Err(already_exists(&self.path(&rel)));
        }
        let network = self.network_link_of("resource.network", body, false)?;
        let dest = body
            .get("destRange")
            .and_then(Value::as_str)
            .ok_or_else(|| required("resource.destRange"))?;
        if !valid_cidr(dest) {
            return Err(invalid_value(
                "resource.destRange",
                dest,
                "Must be a valid IPv4 CIDR range.",
            ));
        }
        let hops = [
            "nextHopInstance",
            "nextHopIp",
            "nextHopGateway",
            "nextHopNetwork",
            "nextHopVpnTunnel",
            "nextHopIlb",
        ];
        let given: Vec<&str> = hops
            .iter()
            .copied()
            .filter(|h| body.get(*h).is_some())
            .collect();
        if given.len() != 1 {
            return Err(invalid_value(
                "resource",
                "",
                "Exactly one next hop must be specified.",
            ));
        }
        let mut v = Value::Object(body.clone());
        if let Some(inst) = body.get("nextHopInstance").and_then(Value::as_str) {
            let link = self
                .sh
                .ref_segments(inst)
                .and_then(|s| match s.as_slice() {
                    [a, z, b, n] if a == "zones" && b == "instances" => self
                        .st
                        .res
                        .contains_key(&Api::key(Kind::Instance, z, n))
                        .then(|| self.sh.link(&Kind::Instance.rel(z, n))),
                    _ => None,
                })
                .ok_or_else(|| {
                    invalid_value(
                        "resource.nextHopInstance",
                        inst,
                        "The referenced instance resource cannot be found.",
                    )
                })?;
            v["nextHopInstance"] = json!(link);
        }
        if let Some(ip) = body.get("nextHopIp").and_then(Value::as_str)
            && ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            return Err(invalid_value(
                "resource.nextHopIp",
                ip,
                "Must be an IPv4 address.",
            ));
        }
        let id = self.st.new_id();
        v["kind"] = json!("compute#route");
        v["id"] = json!(id);
        v["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        v["network"] = json!(network);
        v["selfLink"] = json!(self.sh.link(&rel));
        v["routeType"] = json!("STATIC");
        if v.get("priority").is_none() {
            v["priority"] = json!(1000);
        }
        if !call.op_fails() {
            self.put(Kind::Route, "", name, v, None);
        }
        Ok(self.new_op(call, None, "insert", &rel, &id, Effect::None))
    }

    fn simple_delete(&mut self, call: &Call, kind: Kind, name: &str) -> Result<Value, ApiError> {
        let rel = kind.rel("", name);
        let key = Api::key(kind, "", name);
        let r = self
            .st
            .res
            .get(&key)
            .ok_or_else(|| not_found(&self.path(&rel)))?;
        let id = r.v["id"].as_str().unwrap_or("").to_string();
        Ok(self.new_op(call, None, "delete", &rel, &id, Effect::Remove(key)))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation and small helpers

fn region_of(zone: &str) -> String {
    zone.rsplit_once('-').map_or(zone, |(r, _)| r).to_string()
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(invalid_value(
            field,
            name,
            "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?|[1-9][0-9]{0,19})'",
        ))
    }
}

fn check_labels(field: &str, labels: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let Some(labels) = labels.filter(|l| !l.is_null()) else {
        return Ok(Map::new());
    };
    let Some(map) = labels.as_object() else {
        return Err(invalid_value(
            field,
            &labels.to_string(),
            "Labels must be a map of strings.",
        ));
    };
    if map.len() > 64 {
        return Err(invalid_value(
            field,
            "",
            "A resource can have at most 64 labels.",
        ));
    }
    let label_char = |c: char| {
        c.is_lowercase()
            || c.is_ascii_digit()
            || c == '_'
            || c == '-'
            || (c.is_alphabetic() && !c.is_ascii())
    };
    for (k, v) in map {
        let key_ok = k.chars().count() <= 63
            && k.chars().next().is_some_and(char::is_lowercase)
            && k.chars().all(label_char);
        if !key_ok {
            return Err(invalid_value(
                field,
                k,
                "Label keys must start with a lowercase character, can only contain lowercase letters, numeric characters, underscores and dashes, and can be at most 63 characters long. International characters are allowed.",
            ));
        }
        let Some(v) = v.as_str() else {
            return Err(invalid_value(field, k, "Label values must be strings."));
        };
        if v.chars().count() > 63 || !v.chars().all(label_char) {
            return Err(invalid_value(
                field,
                v,
                "Label values can only contain lowercase letters, numeric characters, underscores and dashes, and can be at most 63 characters long. International characters are allowed.",
            ));
        }
    }
    Ok(map.clone())
}

fn check_metadata(field: &str, metadata: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let Some(items) = metadata
        .and_then(|m| m.get("items"))
        .filter(|i| !i.is_null())
    else {
        return Ok(Vec::new());
    };
    let Some(items) = items.as_array() else {
        return Err(invalid_value(
            &format!("{field}.items"),
            "",
            "Must be a list.",
        ));
    };
    let mut seen = Vec::new();
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        let key = item["key"].as_str().unwrap_or("");
        let key_ok = !key.is_empty()
            && key.len() <= 128
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !key_ok {
            return Err(invalid_value(
                &format!("{field}.items[{i}].key"),
                key,
                "Must be a match of regex '[a-zA-Z0-9-_]{1,128}'",
            ));
        }
        if seen.contains(&key) {
            return Err(invalid_value(
                &format!("{field}.items[{i}].key"),
                key,
                "Duplicate keys are not allowed.",
            ));
        }
        seen.push(key);
        let value = item["value"].as_str().unwrap_or("");
        if value.len() > 256 * 1024 {
            return Err(invalid_value(
                &format!("{field}.items[{i}].value"),
                "",
                "Value is too long (256 KB at most).",
            ));
        }
        total += key.len() + value.len();
    }
    if total > 512 * 1024 {
        return Err(invalid_value(
            field,
            "",
            "The total size of metadata is at most 512 KB.",
        ));
    }
    Ok(items
        .iter()
        .map(|i| json!({"key": i["key"], "value": i["value"].as_str().unwrap_or("")}))
        .collect())
}

fn metadata_value(items: Vec<Value>) -> Value {
    let fp = fingerprint_of(&Value::Array(items.clone()));
    let mut v = json!({"kind": "compute#metadata", "fingerprint": fp});
    if !items.is_empty() {
        v["items"] = Value::Array(items);
    }
    v
}

fn guest_attributes_enabled(instance: &Value) -> bool {
    instance["metadata"]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| {
            i["key"] == "enable-guest-attributes"
                && i["value"]
                    .as_str()
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        })
}

fn set_labels(v: &mut Value, labels: Map<String, Value>) {
    if labels.is_empty() {
        if let Some(o) = v.as_object_mut() {
            o.remove("labels");
        }
        v["labelFingerprint"] = json!(EMPTY_LABELS_FINGERPRINT);
    } else {
        let fp = fingerprint_of(&Value::Object(labels.clone()));
        v["labels"] = Value::Object(labels);
        v["labelFingerprint"] = json!(fp);
    }
}

fn refresh_instance_fingerprint(v: &mut Value) {
    let basis = json!([
        v["machineType"],
        v["disks"],
        v["networkInterfaces"],
        v["metadata"],
        v["labels"],
        v["canIpForward"],
        v["scheduling"]
    ]);
    v["fingerprint"] = json!(fingerprint_of(&basis));
}

/// base64 of a 64-bit FNV-1a hash of the value's JSON (maps are ordered, so equal content gives
/// equal fingerprints, as GCE's do).
fn fingerprint_of(v: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    base64::engine::general_purpose::STANDARD.encode(h.to_be_bytes())
}

fn add_user(disk: &mut Value, link: &str) {
    match disk["users"].as_array_mut() {
        Some(u) => {
            if !u.iter().any(|x| x == link) {
                u.push(json!(link));
            }
        }
        None => disk["users"] = json!([link]),
    }
}

fn remove_user(disk: &mut Value, link: &str) {
    if let Some(u) = disk["users"].as_array_mut() {
        u.retain(|x| x != link);
        if u.is_empty()
            && let Some(o) = disk.as_object_mut()
        {
            o.remove("users");
        }
    }
}

fn valid_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    addr.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

/// Predefined machine types of the common families, and custom ones
/// (`[FAMILY-]custom-CPUS-MEMORY_MIB[-ext]`).
fn machine_type_exists(mt: &str) -> bool {
    const FIXED: &[&str] = &["e2-micro", "e2-small", "e2-medium", "f1-micro", "g1-small"];
    if FIXED.contains(&mt) {
        return true;
    }
    let sizes = |family: &str| -> &'static [u32] {
        match family {
            "e2-standard" | "e2-highmem" | "e2-highcpu" => &[2, 4, 8, 16, 32],
            "n1-standard" => &[1, 2, 4, 8, 16, 32, 64, 96],
            "n1-highmem" | "n1-highcpu" => &[2, 4, 8, 16, 32, 64, 96],
            "n2-standard" | "n2-highmem" | "n2-highcpu" | "n2d-standard" | "n2d-highmem"
            | "n2d-highcpu" => &[2, 4, 8, 16, 32, 48, 64, 80, 96, 128],
            "c3-standard" | "c3-highmem" | "c3-highcpu" => &[4, 8, 22, 44, 88, 176],
            "t2d-standard" => &[1, 2, 4, 8, 16, 32, 48, 60],
            _ => &[],
        }
    };
    if let Some((family, n)) = mt.rsplit_once('-')
        && let Ok(n) = n.parse::<u32>()
        && sizes(family).contains(&n)
    {
        return true;
    }
    // Custom machine types.
    let (rest, ext) = match mt.strip_suffix("-ext") {
        Some(r) => (r, true),
        None => (mt, false),
    };
    let (family, spec) = match rest.split_once("custom-") {
        Some(("", spec)) => ("n1", spec),
        Some((f, spec)) => match f.strip_suffix('-') {
            Some(f @ ("n1" | "n2" | "n2d" | "e2")) => (f, spec),
            _ => return false,
        },
        None => return false,
    };
    let Some((cpus, mem)) = spec.split_once('-') else {
        return false;
    };
    let (Ok(cpus), Ok(mem)) = (cpus.parse::<u64>(), mem.parse::<u64>()) else {
        return false;
    };
    let (min_cpu, max_cpu) = if family == "e2" { (2, 32) } else { (1, 96) };
    let cpu_ok = cpus >= min_cpu && cpus <= max_cpu && (cpus == 1 || cpus % 2 == 0);
    let (lo, hi) = if family == "e2" {
        (512, 8192)
    } else {
        (922, 6656)
    };
    let mem_ok = mem % 256 == 0 && mem >= lo * cpus && (ext || mem <= hi * cpus);
    cpu_ok && mem_ok
}

/// RFC 3339 with GCE's habit of Pacific-time offsets (fixed `-07:00` here).
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64 - 7 * 3600;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:03}-07:00",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

// ---------------------------------------------------------------------------------------------
// List filters

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Has,
}

#[derive(Debug)]
struct Cond {
    path: Vec<String>,
    op: CmpOp,
    value: String,
}

/// AND of ORs.
type Filter = Vec<Vec<Cond>>;

#[derive(Debug, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Op(CmpOp),
    Word(String),
    Str(String),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                toks.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                toks.push(Tok::RParen);
            }
            '=' => {
                chars.next();
                toks.push(Tok::Op(CmpOp::Eq));
            }
            ':' => {
                chars.next();
                toks.push(Tok::Op(CmpOp::Has));
            }
            '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err("'!' must be followed by '='".into());
                }
                toks.push(Tok::Op(CmpOp::Ne));
            }
            '"' | '\'' => {
                let quote = c;
                chars.next();
                let mut v = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('\\') => match chars.next() {
                            Some(e) => v.push(e),
                            None => return Err("unterminated string".into()),
                        },
                        Some(ch) if ch == quote => break,
                        Some(ch) => v.push(ch),
                    }
                }
                toks.push(Tok::Str(v));
            }
            _ => {
                let mut w = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || "()=:!\"'".contains(ch) {
                        break;
                    }
                    w.push(ch);
                    chars.next();
                }
                toks.push(Tok::Word(w));
            }
        }
    }
    Ok(toks)
}

fn parse_filter(s: &str) -> Result<Filter, String> {
    let toks = tokenize(s)?;
    let mut pos = 0;
    let mut out: Filter = Vec::new();
    let cond = |pos: &mut usize| -> Result<Cond, String> {
        let Some(Tok::Word(field)) = toks.get(*pos) else {
            return Err("expected a field name".into());
        };
        if field == "NOT" || field.starts_with('-') {
            return Err("negation is not supported".into());
        }
        let op = match toks.get(*pos + 1) {
            Some(Tok::Op(op)) => *op,
            Some(Tok::Word(w)) if w == "eq" || w == "ne" => {
                return Err("the legacy eq/ne regular-expression syntax is not supported".into());
            }
            _ => return Err(format!("expected an operator after {field}")),
        };
        let value = match toks.get(*pos + 2) {
            Some(Tok::Word(w) | Tok::Str(w)) => w.clone(),
            _ => return Err(format!("expected a value after {field}")),
        };
        *pos += 3;
        Ok(Cond {
            path: field.split('.').map(str::to_string).collect(),
            op,
            value,
        })
    };
    while pos < toks.len() {
        match &toks[pos] {
            Tok::Word(w) if w == "AND" => pos += 1,
            Tok::LParen => {
                pos += 1;
                let mut ors = vec![cond(&mut pos)?];
                loop {
                    match toks.get(pos) {
                        Some(Tok::RParen) => {
                            pos += 1;
                            break;
                        }
                        Some(Tok::Word(w)) if w == "OR" => {
                            pos += 1;
                            ors.push(cond(&mut pos)?);
                        }
                        Some(Tok::Word(w)) if w == "AND" => {
                            return Err("AND inside parentheses is not supported".into());
                        }
                        _ => return Err("expected ')'".into()),
                    }
                }
                out.push(ors);
            }
            _ => {
                let mut ors = vec![cond(&mut pos)?];
                while matches!(toks.get(pos), Some(Tok::Word(w)) if w == "OR") {
                    pos += 1;
                    ors.push(cond(&mut pos)?);
                }
                out.push(ors);
            }
        }
    }
    Ok(out)
}

fn lookup<'v>(v: &'v Value, path: &[String], out: &mut Vec<&'v Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| lookup(i, path, out)),
        _ if path.is_empty() => out.push(v),
        Value::Object(m) => {
            if let Some(x) = m.get(&path[0]) {
                lookup(x, &path[1..], out);
            }
        }
        _ => {}
    }
}

fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn filter_matches(v: &Value, f: &Filter) -> bool {
    f.iter().all(|ors| {
        ors.iter().any(|c| {
            let mut vals = Vec::new();
            lookup(v, &c.path, &mut vals);
            let strs: Vec<String> = vals
                .iter()
                .filter_map(|x| match x {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect();
            match c.op {
                CmpOp::Has if c.value == "*" => !strs.is_empty(),
                CmpOp::Has => strs
                    .iter()
                    .any(|s| s.contains(&c.value) || glob(&c.value, s)),
                CmpOp::Eq => strs.iter().any(|s| glob(&c.value, s)),
                CmpOp::Ne => !strs.iter().any(|s| glob(&c.value, s)),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "proj-1";
    const Z: &str = "us-central1-a";

    fn start_with(polls: u32) -> (FakeCompute, Client) {
        let fake = FakeCompute::start_with(
            P,
            &[Z, "us-central1-b", "europe-west1-b"],
            Options {
                strict_schema: true,
                polls_per_step: polls,
                wait_timeout: Duration::from_millis(300),
            },
        );
        fake.add_image("node-v1", &[("clusterctl-io--version", "v1")]);
        let client = Client {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("reqwest client"),
            base: format!("{}compute/v1/projects/{P}/", fake.base_url()),
            token: fake.issue_token(),
        };
        (fake, client)
    }

    fn start() -> (FakeCompute, Client) {
        start_with(1)
    }

    fn assert_schema_clean(fake: &FakeCompute) {
        assert_eq!(fake.schema_violations(), Vec::<String>::new());
    }

    struct Client {
        http: reqwest::blocking::Client,
        base: String,
        token: String,
    }

    struct Resp {
        status: u16,
        body: Value,
        headers: reqwest::header::HeaderMap,
    }

    impl Client {
        fn call(
            &self,
            method: &str,
            rel: &str,
            body: Option<Value>,
        ) -> Result<Resp, reqwest::Error> {
            let url = format!("{}{rel}", self.base);
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let mut rb = self.http.request(m, url).bearer_auth(&self.token);
            if let Some(b) = body {
                rb = rb
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&b).expect("json"));
            }
            let r = rb.send()?;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let text = r.text()?;
            Ok(Resp {
                status,
                body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                headers,
            })
        }

        fn ok(&self, method: &str, rel: &str, body: Option<Value>) -> Value {
            let r = self.call(method, rel, body).expect("request");
            assert_eq!(r.status, 200, "{method} {rel}: {}", r.body);
            r.body
        }

        fn wait(&self, op: &Value) -> Value {
            let name = op["name"].as_str().expect("op name");
            let rel = match op["zone"].as_str() {
                Some(z) => format!(
                    "zones/{}/operations/{name}/wait",
                    z.rsplit('/').next().unwrap_or("")
                ),
                None => format!("global/operations/{name}/wait"),
            };
            self.ok("POST", &rel, None)
        }
    }

    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn instance_body(name: &str, labels: Value) -> Value {
        json!({
            "name": name,
            "machineType": format!("zones/{Z}/machineTypes/custom-2-4096"),
            "labels": labels,
            "metadata": {"items": [{"key": "enable-guest-attributes", "value": "TRUE"}]},
            "disks": [{
                "boot": true,
                "autoDelete": true,
                "initializeParams": {"sourceImage": format!("projects/{P}/global/images/node-v1"), "diskSizeGb": "20"},
            }],
            "networkInterfaces": [{"network": "global/networks/default", "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]}],
        })
    }

    fn insert_running(c: &Client, name: &str) -> Value {
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances"),
            Some(instance_body(name, json!({}))),
        );
        let done = c.wait(&op);
        assert_eq!(done["status"], "DONE");
        assert!(done.get("error").is_none(), "{done}");
        c.ok("GET", &format!("zones/{Z}/instances/{name}"), None)
    }

    #[test]
    fn operation_and_instance_progress_over_polls() {
        let (fake, c) = start();
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances"),
            Some(instance_body("vm-1", json!({"role": "worker"}))),
        );
        assert_eq!(op["kind"], "compute#operation");
        assert_eq!(op["status"], "PENDING");
        assert_eq!(op["operationType"], "insert");
        assert!(
            op["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("operation-"))
        );
        assert!(op["id"].as_str().is_some_and(|i| i.parse::<u64>().is_ok()));
        let inst = c.ok("GET", &format!("zones/{Z}/instances/vm-1"), None);
        assert_eq!(
            inst["status"], "STAGING",
            "the get counted as a poll of the operation"
        );
        let op_rel = format!(
            "zones/{Z}/operations/{}",
            op["name"].as_str().expect("name")
        );
        let o = c.ok("GET", &op_rel, None);
        assert_eq!(o["status"], "DONE");
        assert!(o["endTime"].is_string() && o["startTime"].is_string());
        let inst = c.ok("GET", &format!("zones/{Z}/instances/vm-1"), None);
        assert_eq!(inst["status"], "RUNNING");
        assert_eq!(fake.boot_count(Z, "vm-1"), Some(1));
        let nic = &inst["networkInterfaces"][0];
        assert_eq!(nic["networkIP"], "10.128.0.2");
        assert!(
            nic["accessConfigs"][0]["natIP"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("203.0.113."))
        );
        assert_eq!(inst["disks"][0]["boot"], true);
        assert_eq!(
            inst["disks"][0]["source"],
            format!("{SELF_LINK_BASE}projects/{P}/zones/{Z}/disks/vm-1")
        );
        let disk = c.ok("GET", &format!("zones/{Z}/disks/vm-1"), None);
        assert_eq!(disk["sizeGb"], "20");
        assert_eq!(
            disk["sourceImage"],
            format!("{SELF_LINK_BASE}projects/{P}/global/images/node-v1")
        );
        assert_eq!(disk["users"][0], inst["selfLink"]);

        // stop: STOPPING then TERMINATED; reset refused when not running.
        let op = c.ok("POST", &format!("zones/{Z}/instances/vm-1/stop"), None);
        assert_eq!(
            c.ok("GET", &format!("zones/{Z}/instances/vm-1"), None)["status"],
            "STOPPING"
        );
        c.wait(&op);
        assert_eq!(
            c.ok("GET", &format!("zones/{Z}/instances/vm-1"), None)["status"],
            "TERMINATED"
        );
        let r = c
            .call("POST", &format!("zones/{Z}/instances/vm-1/reset"), None)
            .expect("reset");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (400, json!("resourceNotReady"))
        );
        c.wait(&c.ok("POST", &format!("zones/{Z}/instances/vm-1/start"), None));
        c.wait(&c.ok("POST", &format!("zones/{Z}/instances/vm-1/reset"), None));
        assert_eq!(fake.boot_count(Z, "vm-1"), Some(3));

        // delete: gone when DONE, with its autoDelete boot disk.
        let op = c.ok("DELETE", &format!("zones/{Z}/instances/vm-1"), None);
        assert_eq!(
            c.ok("GET", &format!("zones/{Z}/instances/vm-1"), None)["status"],
            "STOPPING"
        );
        c.wait(&op);
        assert_eq!(
            c.call("GET", &format!("zones/{Z}/instances/vm-1"), None)
                .expect("get")
                .status,
            404
        );
        assert_eq!(fake.disk_marker(Z, "vm-1"), None);
        assert_schema_clean(&fake);
    }

    #[test]
    fn polls_per_step_slows_operations() {
        let (fake, c) = start_with(2);
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/disks"),
            Some(json!({"name": "d1", "sizeGb": "10"})),
        );
        let rel = format!(
            "zones/{Z}/operations/{}",
            op["name"].as_str().expect("name")
        );
        let seen: Vec<Value> = (0..4)
            .map(|_| c.ok("GET", &rel, None)["status"].clone())
            .collect();
        assert_eq!(
            seen,
            vec![
                json!("PENDING"),
                json!("RUNNING"),
                json!("RUNNING"),
                json!("DONE")
            ]
        );
        assert_schema_clean(&fake);
    }

    #[test]
    fn request_id_dedup_makes_one_instance() {
        let (fake, c) = start();
        let rid = "5b0c6f4e-1f1a-4c39-9d53-2f3e8b1c0a77";
        let rel = format!("zones/{Z}/instances?requestId={rid}");
        let op1 = c.ok("POST", &rel, Some(instance_body("vm-a", json!({}))));
        let op2 = c.ok("POST", &rel, Some(instance_body("vm-a", json!({}))));
        assert_eq!(op1["name"], op2["name"]);
        assert_eq!(fake.instance_count_named("vm-a"), 1);
        // Without the requestId the retry is a conflict.
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/instances"),
                Some(instance_body("vm-a", json!({}))),
            )
            .expect("post");
        assert_eq!(r.status, 409);
        let bad = c
            .call(
                "POST",
                &format!("zones/{Z}/instances?requestId=not-a-uuid"),
                Some(instance_body("vm-b", json!({}))),
            )
            .expect("post");
        assert_eq!(bad.status, 400);
        let recs = fake.requests();
        assert_eq!(recs[0].request_id.as_deref(), Some(rid));
        assert_eq!(recs[0].method_id, "compute.instances.insert");
        assert_schema_clean(&fake);
    }

    #[test]
    fn filter_and_paging_over_three_pages() {
        let (fake, c) = start();
        for i in 0..7 {
            let labels = if i % 2 == 0 {
                json!({"cluster": "c1", "role": "worker"})
            } else {
                json!({"cluster": "c2"})
            };
            c.ok(
                "POST",
                &format!("zones/{Z}/instances"),
                Some(instance_body(&format!("vm-{i}"), labels)),
            );
        }
        // c1 has vm-0, vm-2, vm-4, vm-6: with 2 per page that is 2 pages; take all 7 with 3.
        let list = |filter: &str, max: u32, token: Option<&str>| {
            let mut rel = format!("zones/{Z}/instances?maxResults={max}");
            if !filter.is_empty() {
                rel.push_str(&format!("&filter={}", enc(filter)));
            }
            if let Some(t) = token {
                rel.push_str(&format!("&pageToken={}", enc(t)));
            }
            c.ok("GET", &rel, None)
        };
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = list("", 3, token.as_deref());
            assert_eq!(page["kind"], "compute#instanceList");
            pages += 1;
            names.extend(
                page["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| i["name"].as_str().unwrap_or("").to_string()),
            );
            match page["nextPageToken"].as_str() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(names, (0..7).map(|i| format!("vm-{i}")).collect::<Vec<_>>());
        let c1 = list(
            r#"(labels.cluster = "c1") (labels.role = "worker")"#,
            500,
            None,
        );
        let got: Vec<&str> = c1["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["name"].as_str())
            .collect();
        assert_eq!(got, ["vm-0", "vm-2", "vm-4", "vm-6"]);
        let one = list(r#"name = "vm-3""#, 500, None);
        assert_eq!(one["items"].as_array().map(Vec::len), Some(1));
        let has = list("labels.role:*", 500, None);
        assert_eq!(has["items"].as_array().map(Vec::len), Some(4));
        let none = list(r#"labels.cluster = "nope""#, 500, None);
        assert!(
            none.get("items").is_none(),
            "GCE omits items in an empty list"
        );
        let r = c
            .call(
                "GET",
                &format!("zones/{Z}/instances?filter={}", enc("labels.a eq b")),
                None,
            )
            .expect("list");
        assert_eq!(r.status, 400);
        assert_schema_clean(&fake);
    }

    #[test]
    fn error_shapes_404_409_412_and_other_projects() {
        let (fake, c) = start();
        let r = c
            .call("GET", &format!("zones/{Z}/instances/nope"), None)
            .expect("get");
        assert_eq!(r.status, 404);
        assert_eq!(r.headers["content-type"], "application/json; charset=UTF-8");
        let msg = format!("The resource 'projects/{P}/zones/{Z}/instances/nope' was not found");
        assert_eq!(
            r.body,
            json!({"error": {"code": 404, "message": msg, "errors": [{"message": msg, "domain": "global", "reason": "notFound"}]}})
        );
        let inst = insert_running(&c, "vm-x");
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/instances"),
                Some(instance_body("vm-x", json!({}))),
            )
            .expect("post");
        assert_eq!(r.status, 409);
        assert_eq!(r.body["error"]["errors"][0]["reason"], "alreadyExists");
        assert_eq!(
            r.body["error"]["message"],
            format!("The resource 'projects/{P}/zones/{Z}/instances/vm-x' already exists")
        );
        // setLabels with a stale fingerprint.
        let fp = inst["labelFingerprint"].clone();
        assert_eq!(fp, EMPTY_LABELS_FINGERPRINT);
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances/vm-x/setLabels"),
            Some(json!({"labels": {"a": "b"}, "labelFingerprint": fp})),
        );
        c.wait(&op);
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/instances/vm-x/setLabels"),
                Some(json!({"labels": {"a": "c"}, "labelFingerprint": fp})),
            )
            .expect("post");
        assert_eq!(r.status, 412);
        assert_eq!(r.body["error"]["errors"][0]["reason"], "conditionNotMet");
        let now = c.ok("GET", &format!("zones/{Z}/instances/vm-x"), None);
        assert_eq!(now["labels"], json!({"a": "b"}));
        assert_ne!(now["labelFingerprint"], fp);
        // Metadata fingerprint likewise.
        let mfp = now["metadata"]["fingerprint"].clone();
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/instances/vm-x/setMetadata"),
                Some(json!({"fingerprint": "AAAAAAAAAAA=", "items": []})),
            )
            .expect("post");
        assert_eq!(r.status, 412);
        c.wait(&c.ok(
            "POST",
            &format!("zones/{Z}/instances/vm-x/setMetadata"),
            Some(json!({"fingerprint": mfp, "items": [{"key": "k", "value": "v"}]})),
        ));
        // Another project, an unknown zone, bad machine type, missing image.
        let other = c
            .http
            .get(format!(
                "{}compute/v1/projects/other/zones/{Z}/instances",
                fake.base_url()
            ))
            .bearer_auth(&c.token)
            .send()
            .expect("get");
        assert_eq!(other.status().as_u16(), 404);
        assert_eq!(
            c.call("GET", "zones/mars-1-a/instances", None)
                .expect("get")
                .status,
            400
        );
        let mut body = instance_body("vm-y", json!({}));
        body["machineType"] = json!(format!("zones/{Z}/machineTypes/custom-3-1024"));
        let r = c
            .call("POST", &format!("zones/{Z}/instances"), Some(body))
            .expect("post");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (400, json!("invalid"))
        );
        let mut body = instance_body("vm-y", json!({}));
        body["disks"][0]["initializeParams"]["sourceImage"] = json!("global/images/missing");
        let r = c
            .call("POST", &format!("zones/{Z}/instances"), Some(body))
            .expect("post");
        assert_eq!(r.status, 400);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot be found"))
        );
        assert_eq!(fake.instance_count_named("vm-y"), 0);
        assert_schema_clean(&fake);
    }

    #[test]
    fn attached_disk_delete_refused_and_boot_detach_needs_terminated() {
        let (fake, c) = start();
        insert_running(&c, "vm-d");
        c.wait(&c.ok(
            "POST",
            &format!("zones/{Z}/disks"),
            Some(json!({"name": "data", "sizeGb": "50", "labels": {"k": "v"}})),
        ));
        assert!(fake.set_disk_marker(Z, "data", 7));
        let src = format!("projects/{P}/zones/{Z}/disks/data");
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances/vm-d/attachDisk"),
            Some(json!({"source": src, "deviceName": "data"})),
        );
        c.wait(&op);
        let r = c
            .call("DELETE", &format!("zones/{Z}/disks/data"), None)
            .expect("delete");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body["error"]["errors"][0]["reason"],
            "resourceInUseByAnotherResource"
        );
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("projects/{P}/zones/{Z}/instances/vm-d")))
        );
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/instances/vm-d/detachDisk?deviceName=persistent-disk-0"),
                None,
            )
            .expect("detach");
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body["error"]["errors"][0]["reason"],
            "invalidResourceUsage"
        );
        c.wait(&c.ok(
            "POST",
            &format!("zones/{Z}/instances/vm-d/detachDisk?deviceName=data"),
            None,
        ));
        c.wait(&c.ok("DELETE", &format!("zones/{Z}/instances/vm-d"), None));
        assert_eq!(
            fake.disk_marker(Z, "data"),
            Some(Some(7)),
            "data disk kept (not autoDelete)"
        );
        c.wait(&c.ok("DELETE", &format!("zones/{Z}/disks/data"), None));
        assert_eq!(fake.disk_marker(Z, "data"), None);
        assert_schema_clean(&fake);
    }

    #[test]
    fn guest_attributes_and_probes() {
        let (fake, c) = start();
        insert_running(&c, "vm-g");
        let rel = format!("zones/{Z}/instances/vm-g/getGuestAttributes?queryPath=hostkeys%2F");
        assert_eq!(c.call("GET", &rel, None).expect("get").status, 404);
        assert!(fake.set_guest_attribute(Z, "vm-g", "hostkeys", "ssh-ed25519", "AAAAC3Nz"));
        let g = c.ok("GET", &rel, None);
        assert_eq!(g["kind"], "compute#guestAttributes");
        assert_eq!(
            g["queryValue"]["items"][0],
            json!({"namespace": "hostkeys", "key": "ssh-ed25519", "value": "AAAAC3Nz"})
        );
        let names = fake.resource_names();
        assert!(names.contains(&("instance".into(), "vm-g".into())));
        assert!(names.contains(&("network".into(), "default".into())));
        assert!(names.contains(&("subnetwork".into(), "default".into())));
        // Firewall and route round trip.
        c.wait(&c.ok("POST", "global/firewalls", Some(json!({"name": "fw-1", "network": "global/networks/default", "allowed": [{"IPProtocol": "tcp", "ports": ["6443"]}]}))));
        c.wait(&c.ok("POST", "global/routes", Some(json!({"name": "pods-1", "network": "global/networks/default", "destRange": "10.200.0.0/24", "priority": 900, "nextHopInstance": format!("zones/{Z}/instances/vm-g")}))));
        assert_eq!(
            c.ok("GET", "global/firewalls/fw-1", None)["sourceRanges"],
            json!(["0.0.0.0/0"])
        );
        let r = c
            .call("DELETE", "global/networks/default", None)
            .expect("delete");
        assert_eq!(
            r.body["error"]["errors"][0]["reason"],
            "resourceInUseByAnotherResource"
        );
        c.wait(&c.ok("DELETE", "global/routes/pods-1", None));
        assert_eq!(
            c.call("GET", "global/routes/pods-1", None)
                .expect("get")
                .status,
            404
        );
        let sub = c.ok("GET", "regions/europe-west1/subnetworks/default", None);
        assert_eq!(sub["ipCidrRange"], "10.132.0.0/20");
        assert_schema_clean(&fake);
    }

    #[test]
    fn status_faults_have_google_shapes() {
        let (fake, c) = start();
        fake.inject(
            "compute.instances.list",
            Fault::Status {
                status: 429,
                retry_after_secs: Some(3),
            },
            1,
        );
        fake.inject(
            "*",
            Fault::Status {
                status: 403,
                retry_after_secs: None,
            },
            1,
        );
        fake.inject(
            "*",
            Fault::Status {
                status: 500,
                retry_after_secs: None,
            },
            1,
        );
        fake.inject(
            "*",
            Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            1,
        );
        let rel = format!("zones/{Z}/instances");
        let r = c.call("GET", &rel, None).expect("list");
        assert_eq!(r.status, 429);
        assert_eq!(r.headers["retry-after"], "3");
        assert_eq!(r.body["error"]["errors"][0]["reason"], "rateLimitExceeded");
        assert_eq!(r.body["error"]["errors"][0]["domain"], "usageLimits");
        let r = c.call("GET", &rel, None).expect("list");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (403, json!("rateLimitExceeded"))
        );
        let r = c.call("GET", &rel, None).expect("list");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (500, json!("backendError"))
        );
        let r = c.call("GET", &rel, None).expect("list");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (503, json!("backendError"))
        );
        assert_eq!(c.call("GET", &rel, None).expect("list").status, 200);
        assert_eq!(
            fake.requests()[0].fault.as_deref(),
            Some("Status { status: 429, retry_after_secs: Some(3) }")
        );
        assert_schema_clean(&fake);
    }

    #[test]
    fn delay_drop_and_truncate_still_apply() {
        let (fake, c) = start();
        let rel = format!("zones/{Z}/instances");
        fake.inject(
            "compute.instances.insert",
            Fault::Delay(Duration::from_millis(400)),
            1,
        );
        let slow = reqwest::blocking::Client::builder()
            .timeout(Duration::from_millis(100))
            .build()
            .expect("client");
        let r = slow
            .post(format!("{}{rel}", c.base))
            .bearer_auth(&c.token)
            .header("content-type", "application/json")
            .body(instance_body("vm-slow", json!({})).to_string())
            .send();
        assert!(r.is_err_and(|e| e.is_timeout()));
        thread::sleep(Duration::from_millis(350));
        assert_eq!(
            fake.instance_count_named("vm-slow"),
            1,
            "a late answer still took effect"
        );

        fake.inject("compute.instances.insert", Fault::DropAfterApply, 1);
        let rid = "0b7a4d55-7f32-4c1e-8a2a-6d0e8c3b9f10";
        let r = c.call(
            "POST",
            &format!("{rel}?requestId={rid}"),
            Some(instance_body("vm-drop", json!({}))),
        );
        assert!(r.is_err(), "the answer was lost");
        assert_eq!(fake.instance_count_named("vm-drop"), 1);
        let retry = c.ok(
            "POST",
            &format!("{rel}?requestId={rid}"),
            Some(instance_body("vm-drop", json!({}))),
        );
        assert_eq!(retry["operationType"], "insert");
        assert_eq!(fake.instance_count_named("vm-drop"), 1);

        fake.inject("compute.instances.get", Fault::TruncatedJson, 1);
        let r = c
            .call("GET", &format!("{rel}/vm-drop"), None)
            .expect("a well-formed HTTP answer");
        assert_eq!(r.status, 200);
        assert!(r.body.is_string(), "the body is not JSON: {}", r.body);
        assert_schema_clean(&fake);
    }

    #[test]
    fn operation_faults_stuck_and_error() {
        let (fake, c) = start();
        fake.inject("compute.instances.insert", Fault::OperationStuckRunning, 1);
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances"),
            Some(instance_body("vm-stuck", json!({}))),
        );
        let t = Instant::now();
        let w = c.wait(&op);
        assert_eq!(w["status"], "RUNNING");
        assert!(t.elapsed() >= Duration::from_millis(250));
        assert_eq!(
            c.ok("GET", &format!("zones/{Z}/instances/vm-stuck"), None)["status"],
            "STAGING"
        );

        fake.inject(
            "compute.instances.insert",
            Fault::OperationError {
                code: "QUOTA_EXCEEDED".into(),
                message: "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1.".into(),
            },
            1,
        );
        let op = c.ok(
            "POST",
            &format!("zones/{Z}/instances"),
            Some(instance_body("vm-q", json!({}))),
        );
        let done = c.wait(&op);
        assert_eq!(done["status"], "DONE");
        assert_eq!(done["error"]["errors"][0]["code"], "QUOTA_EXCEEDED");
        assert_eq!(done["httpErrorStatusCode"], 403);
        assert_eq!(fake.instance_count_named("vm-q"), 0);
        assert_eq!(fake.disk_marker(Z, "vm-q"), None);
        assert_schema_clean(&fake);
    }

    fn sign_jwt(key: &aws_lc_rs::rsa::KeyPair, header: &Value, claims: &Value) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let mut sig = vec![0; key.public_modulus_len()];
        key.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .expect("signing");
        format!("{signing_input}.{}", b64.encode(sig))
    }

    #[test]
    fn jwt_token_flow_and_auth() {
        use aws_lc_rs::signature::KeyPair as _;
        let (fake, c) = start();
        let key =
            aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
        let other =
            aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
        let email = "deployer@proj-1.iam.gserviceaccount.com";
        fake.register_service_account(email, key.public_key().as_ref());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let header = json!({"alg": "RS256", "typ": "JWT"});
        let claims = json!({"iss": email, "scope": COMPUTE_SCOPE, "aud": fake.token_uri(), "iat": now, "exp": now + 3600});
        let post = |assertion: &str| {
            let form = format!(
                "grant_type={}&assertion={}",
                enc("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                enc(assertion)
            );
            let r = c
                .http
                .post(fake.token_uri())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .expect("post");
            (
                r.status().as_u16(),
                serde_json::from_str::<Value>(&r.text().expect("text")).expect("json"),
            )
        };
        let (status, tok) = post(&sign_jwt(&key, &header, &claims));
        assert_eq!(status, 200, "{tok}");
        assert_eq!(tok["token_type"], "Bearer");
        assert_eq!(tok["expires_in"], 3599);
        let authed = Client {
            http: c.http.clone(),
            base: c.base.clone(),
            token: tok["access_token"].as_str().expect("token").into(),
        };
        assert_eq!(
            authed
                .call("GET", "global/networks/default", None)
                .expect("get")
                .status,
            200
        );

        let (status, e) = post(&sign_jwt(&other, &header, &claims));
        assert_eq!((status, e["error"].clone()), (400, json!("invalid_grant")));
        let mut stale = claims.clone();
        stale["iat"] = json!(now - 7200);
        stale["exp"] = json!(now - 3600);
        assert_eq!(
            post(&sign_jwt(&key, &header, &stale)).1["error"],
            "invalid_grant"
        );
        let mut scope = claims.clone();
        scope["scope"] = json!("https://www.googleapis.com/auth/devstorage.read_only");
        assert_eq!(
            post(&sign_jwt(&key, &header, &scope)).1["error"],
            "invalid_scope"
        );

        // Refresh tokens.
        fake.register_authorized_user("cid", "secret", "1//refresh");
        let r = c.http.post(fake.token_uri()).body("grant_type=refresh_token&client_id=cid&client_secret=secret&refresh_token=1%2F%2Frefresh").send().expect("post");
        assert_eq!(r.status().as_u16(), 200);
        // Metadata server.
        let r = c.http.get(fake.metadata_token_url()).send().expect("get");
        assert_eq!(r.status().as_u16(), 403);
        let r = c
            .http
            .get(fake.metadata_token_url())
            .header("Metadata-Flavor", "Google")
            .send()
            .expect("get");
        assert_eq!(r.status().as_u16(), 200);

        // Unauthenticated and expired.
        let r = c
            .http
            .get(format!("{}global/networks/default", c.base))
            .send()
            .expect("get");
        assert_eq!(r.status().as_u16(), 401);
        let body: Value = serde_json::from_str(&r.text().expect("text")).expect("json");
        assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
        fake.expire_tokens();
        let r = authed
            .call("GET", "global/networks/default", None)
            .expect("get");
        assert_eq!(
            (r.status, r.body["error"]["errors"][0]["reason"].clone()),
            (401, json!("authError"))
        );
        assert_schema_clean(&fake);
    }

    #[test]
    fn images_families_and_markers() {
        let (fake, c) = start();
        c.wait(&c.ok(
            "POST",
            &format!("zones/{Z}/disks"),
            Some(json!({"name": "src", "sizeGb": "12"})),
        ));
        assert!(fake.set_disk_marker(Z, "src", 42));
        let op = c.ok("POST", "global/images", Some(json!({"name": "node-v2", "family": "node", "sourceDisk": format!("zones/{Z}/disks/src"), "labels": {"v": "2"}})));
        assert_eq!(
            c.ok("GET", "global/images/node-v2", None)["status"],
            "PENDING"
        );
        assert_eq!(
            c.ok("GET", "global/images/node-v2", None)["status"],
            "READY",
            "the second get finished the insert"
        );
        c.wait(&op);
        let fam = c.ok("GET", "global/images/family/node", None);
        assert_eq!(fam["name"], "node-v2");
        c.wait(&c.ok(
            "POST",
            &format!(
                "zones/{Z}/disks?sourceImage={}",
                enc("global/images/family/node")
            ),
            Some(json!({"name": "copy"})),
        ));
        assert_eq!(fake.disk_marker(Z, "copy"), Some(Some(42)));
        assert_eq!(
            c.ok("GET", &format!("zones/{Z}/disks/copy"), None)["sizeGb"],
            "12"
        );
        let r = c
            .call(
                "POST",
                &format!("zones/{Z}/disks"),
                Some(
                    json!({"name": "small", "sizeGb": "5", "sourceImage": "global/images/node-v2"}),
                ),
            )
            .expect("post");
        assert_eq!(r.status, 400);
        c.wait(&c.ok("DELETE", "global/images/node-v2", None));
        assert_eq!(
            c.call("GET", "global/images/family/node", None)
                .expect("get")
                .status,
            404
        );
        assert_schema_clean(&fake);
    }

    #[test]
    fn keep_alive_and_connection_close() {
        let (fake, _c) = start();
        let token = fake.issue_token();
        let mut s = TcpStream::connect(
            fake.base_url()
                .trim_start_matches("http://")
                .trim_end_matches('/'),
        )
        .expect("connect");
        let req = |close: bool| {
            format!(
                "GET /compute/v1/projects/{P}/global/networks/default HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{}\r\n",
                if close { "Connection: close\r\n" } else { "" }
            )
        };
        s.write_all(req(false).as_bytes()).expect("write");
        s.write_all(req(true).as_bytes()).expect("write");
        let mut all = String::new();
        s.read_to_string(&mut all).expect("read until close");
        assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2);
        assert!(all.contains("Content-Type: application/json; charset=UTF-8"));
        assert_schema_clean(&fake);
    }

    #[test]
    fn filter_parser_and_helpers() {
        let v = json!({"name": "vm-1", "labels": {"a": "b"}, "networkInterfaces": [{"networkIP": "10.0.0.2"}]});
        let m = |f: &str| filter_matches(&v, &parse_filter(f).expect("parses"));
        assert!(m(r#"labels.a = "b""#));
        assert!(m(r#"(labels.a = "b") (name = "vm-*")"#));
        assert!(m(
            r#"(labels.a = "x" OR labels.a = "b") AND name != "vm-2""#
        ));
        assert!(m("networkInterfaces.networkIP = 10.0.0.2"));
        assert!(!m("labels.c:*"));
        assert!(parse_filter("(labels.a = ").is_err());
        assert!(machine_type_exists("custom-4-8192"));
        assert!(machine_type_exists("n2-custom-2-4096"));
        assert!(!machine_type_exists("custom-3-4096"));
        assert!(machine_type_exists("e2-standard-4"));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert!(valid_request_id("5b0c6f4e-1f1a-4c39-9d53-2f3e8b1c0a77"));
        assert!(!valid_request_id("00000000-0000-0000-0000-000000000000"));
    }
}
