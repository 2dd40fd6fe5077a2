//! The GCE provider against the in-process fake Compute API: the shared conformance suite, and
//! the client's behaviour under injected faults. Every request the client sends and every answer
//! the fake serves is checked against the discovery document; a test ends by asserting that
//! nothing violated it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{Credentials, ServiceAccountKey, TokenSource};
use super::client::{RestCompute, RetryPolicy};
use super::fake::{FakeCompute, Fault};
use super::*;
use crate::conformance::{self, ConformanceError, Fixture, MachineProbe};
use crate::{ErrorKind, MachineSize};

const PROJECT: &str = "clusterctl-test";
const ZONES: [&str; 2] = ["us-central1-a", "us-central1-b"];

fn image(version: &str, digest: &str) -> ImageRef {
    ImageRef {
        version: version.into(),
        dir: "/nonexistent".into(),
        digest: digest.into(),
    }
}

fn v1() -> ImageRef {
    image("bookworm-v1", "sha256:1111111122223333")
}

fn v2() -> ImageRef {
    image("bookworm-v2", "sha256:aaaaaaaabbbbcccc")
}

fn start_fake() -> FakeCompute {
    let fake = FakeCompute::start(PROJECT, &ZONES);
    for img in [v1(), v2()] {
        let digest8 = digest8(&img.digest);
        fake.add_image(
            &image_name(&img),
            &[("clusterctl_dio_sdigest8", digest8.as_str())],
        );
    }
    fake
}

/// A client with short timeouts and backoffs so fault tests stay fast.
fn client(fake: &FakeCompute, credentials: Credentials) -> RestCompute {
    let mut c = RestCompute::new(
        &fake.base_url(),
        PROJECT,
        TokenSource::new(credentials),
        Duration::from_millis(1500),
    )
    .expect("client");
    c.retry = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(10),
        max_backoff: Duration::from_millis(80),
        max_retry_after: Duration::from_secs(5),
        call_deadline: Duration::from_secs(20),
    };
    c.operation_timeout = Duration::from_secs(4);
    c.wait_call_timeout = Duration::from_secs(3);
    c
}

fn provider_with(fake: &FakeCompute, config: GceConfig) -> GceProvider {
    let api = client(fake, Credentials::Static(fake.issue_token()));
    GceProvider::new(Arc::new(api), config).expect("provider")
}

fn provider(fake: &FakeCompute) -> GceProvider {
    let mut config = GceConfig::new(PROJECT, ZONES.iter().map(|z| (*z).to_owned()).collect());
    config.external_ip = true;
    config.admin_ranges = vec!["198.51.100.0/24".into()];
    provider_with(fake, config)
}

fn cluster(id: &str) -> ClusterRef {
    ClusterRef {
        name: "c1".into(),
        id: id.into(),
    }
}

fn spec(name: &str) -> MachineSpec {
    MachineSpec {
        name: name.into(),
        role: MachineRole::Worker,
        pool: Some("pool-a".into()),
        size: MachineSize {
            cpus: 2,
            memory_mib: 2048,
            disk_gib: 20,
        },
        image: v1(),
        user_data: "#cloud-config\nhostname: x\n".into(),
        labels: BTreeMap::from([("example.com/team".to_owned(), "Core_Infra".to_owned())]),
        failure_domain: None,
    }
}

fn assert_schema_clean(fake: &FakeCompute) {
    let v = fake.schema_violations();
    assert!(v.is_empty(), "schema violations: {v:#?}");
}

/// Looks inside the fake's machines: the data disk's marker byte and boot counts.
struct FakeProbe(Arc<FakeCompute>);

impl FakeProbe {
    fn zone(
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<String, String> {
        provider
            .list_machines(cluster)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|m| m.name == machine)
            .and_then(|m| m.failure_domain)
            .ok_or_else(|| format!("machine {machine} not found"))
    }
}

impl MachineProbe for FakeProbe {
    fn write_data_marker(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
        marker: u8,
    ) -> Result<(), String> {
        let zone = Self::zone(provider, cluster, machine)?;
        if self
            .0
            .set_disk_marker(&zone, &data_disk_name(machine), marker)
        {
            Ok(())
        } else {
            Err(format!("no data disk for {machine}"))
        }
    }

    fn read_data_marker(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<Option<u8>, String> {
        let zone = Self::zone(provider, cluster, machine)?;
        self.0
            .disk_marker(&zone, &data_disk_name(machine))
            .ok_or_else(|| format!("no data disk for {machine}"))
    }

    fn boot_count(
        &self,
        provider: &dyn Provider,
        cluster: &ClusterRef,
        machine: &str,
    ) -> Result<u64, String> {
        let zone = Self::zone(provider, cluster, machine)?;
        self.0
            .boot_count(&zone, machine)
            .ok_or_else(|| format!("no instance {machine}"))
    }
}

#[test]
fn conformance_suite_passes_against_the_fake() -> Result<(), ConformanceError> {
    let fake = Arc::new(start_fake());
    let p = provider(&fake);
    let mut template = spec("unused");
    template.labels.clear();
    let fixture = Fixture::new("gc", template, v2()).with_probe(Arc::new(FakeProbe(fake.clone())));
    conformance::run_all(&p, &fixture)?;
    // Nothing is left: no instance, disk or firewall rule (the images were the test's own; the
    // default network's rules and routes come with every project).
    let left: Vec<_> = fake
        .resource_names()
        .into_iter()
        .filter(|(kind, name)| {
            !matches!(kind.as_str(), "image" | "network" | "subnetwork")
                && !name.starts_with("default-")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_schema_clean(&fake);
    Ok(())
}

#[test]
fn a_machine_is_labelled_placed_and_described_as_gce_has_it() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("0b6f7c1e-4a3d-4a9e-8f00-5b2a1c9d7e11");
    let m = p
        .ensure_machine(&c, &spec("c1-pool-a-x7k2q"))
        .expect("ensure");
    assert_eq!(m.pool.as_deref(), Some("pool-a"));
    assert_eq!(
        m.labels.get("example.com/team").map(String::as_str),
        Some("Core_Infra")
    );
    assert!(
        m.provider_id
            .starts_with(&format!("gce://{PROJECT}/us-central1-")),
        "{}",
        m.provider_id
    );
    assert_eq!(m.addresses_of(crate::AddressKind::Internal).count(), 1);
    assert_eq!(m.addresses_of(crate::AddressKind::External).count(), 1);
    assert_eq!(m.image_digest.as_deref(), Some(v1().digest.as_str()));
    let inv = p.inventory(&c).expect("inventory");
    let kinds: Vec<_> = inv.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["disk", "disk", "firewall", "firewall", "instance"],
        "{inv:?}"
    );
    // Names spread over the zones, and the same name always lands in the same zone.
    let zones: std::collections::BTreeSet<_> = (0..6)
        .map(|i| {
            p.ensure_machine(&c, &spec(&format!("c1-pool-a-{i}")))
                .expect("ensure")
                .failure_domain
                .expect("zone")
        })
        .collect();
    assert_eq!(zones.len(), 2, "{zones:?}");
    p.delete_cluster(&c).expect("delete");
    assert_eq!(p.inventory(&c).expect("inventory"), vec![]);
    assert_schema_clean(&fake);
}

#[test]
fn secrets_never_go_to_instance_metadata() {
    let fake = start_fake();
    let p = provider(&fake);
    let mut s = spec("c1-cp-abcde");
    s.user_data = "#cloud-config\nssh_keys:\n  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n    x\n".into();
    let e = p.ensure_machine(&cluster("k1"), &s).expect_err("refused");
    assert!(e.to_string().contains("readable by every viewer"), "{e}");
    assert_eq!(fake.instance_count_named("c1-cp-abcde"), 0);
}

#[test]
fn host_keys_are_read_from_guest_attributes() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("hk");
    let m = p.ensure_machine(&c, &spec("c1-cp-hk")).expect("ensure");
    assert_eq!(p.host_keys(&c, "c1-cp-hk").expect("none yet"), vec![]);
    let zone = m.failure_domain.expect("zone");
    fake.set_guest_attribute(&zone, "c1-cp-hk", "hostkeys", "ssh-ed25519", "AAAAC3Nza");
    assert_eq!(
        p.host_keys(&c, "c1-cp-hk").expect("keys"),
        vec![("ssh-ed25519".to_owned(), "AAAAC3Nza".to_owned())]
    );
    p.delete_cluster(&c).expect("delete");
    assert_schema_clean(&fake);
}

#[test]
fn throttling_and_server_errors_are_retried_with_one_request_id() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("retry");
    fake.inject(
        "compute.instances.insert",
        Fault::Status {
            status: 429,
            retry_after_secs: None,
        },
        1,
    );
    fake.inject(
        "compute.instances.insert",
        Fault::Status {
            status: 403,
            retry_after_secs: Some(1),
        },
        1,
    );
    fake.inject(
        "compute.instances.insert",
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        1,
    );
    let started = Instant::now();
    p.ensure_machine(&c, &spec("c1-pool-a-r"))
        .expect("ensure after retries");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let inserts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method_id == "compute.instances.insert")
        .collect();
    assert_eq!(
        inserts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 403, 503, 200]
    );
    let ids: std::collections::BTreeSet<_> = inserts.iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(ids.len(), 1, "one requestId across retries: {ids:?}");
    assert!(ids.iter().all(Option::is_some));
    assert_eq!(fake.instance_count_named("c1-pool-a-r"), 1);
    p.delete_cluster(&c).expect("delete");
    assert_schema_clean(&fake);
}

#[test]
fn a_lost_answer_or_a_timeout_still_makes_exactly_one_machine() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("lost");
    fake.inject("compute.instances.insert", Fault::DropAfterApply, 1);
    p.ensure_machine(&c, &spec("c1-pool-a-d"))
        .expect("ensure after a dropped answer");
    assert_eq!(fake.instance_count_named("c1-pool-a-d"), 1);
    fake.inject(
        "compute.instances.insert",
        Fault::Delay(Duration::from_millis(2500)),
        1,
    );
    p.ensure_machine(&c, &spec("c1-pool-a-t"))
        .expect("ensure after a timeout");
    assert_eq!(fake.instance_count_named("c1-pool-a-t"), 1);
    fake.inject("compute.instances.get", Fault::TruncatedJson, 1);
    p.list_machines(&c).expect("list");
    p.ensure_machine(&c, &spec("c1-pool-a-t"))
        .expect("get after truncated JSON");
    p.delete_cluster(&c).expect("delete");
    assert_eq!(p.inventory(&c).expect("inventory"), vec![]);
    assert_schema_clean(&fake);
}

#[test]
fn retries_are_bounded() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("bounded");
    fake.inject(
        "compute.instances.insert",
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        100,
    );
    let e = p
        .ensure_machine(&c, &spec("c1-pool-a-b"))
        .expect_err("gives up");
    assert_eq!(e.kind(), ErrorKind::Retryable, "{e}");
    let inserts = fake
        .requests()
        .into_iter()
        .filter(|r| r.method_id == "compute.instances.insert")
        .count();
    assert_eq!(inserts, 5, "max_attempts");
    // A Retry-After beyond what we honour ends the retries at once.
    let fake = start_fake();
    let p = provider(&fake);
    fake.inject(
        "compute.instances.insert",
        Fault::Status {
            status: 429,
            retry_after_secs: Some(3600),
        },
        1,
    );
    let e = p
        .ensure_machine(&c, &spec("c1-pool-a-b"))
        .expect_err("gives up");
    assert_eq!(e.kind(), ErrorKind::Retryable, "{e}");
}

#[test]
fn failed_and_stuck_operations_are_reported_and_leave_nothing() {
    let fake = start_fake();
    let p = provider(&fake);
    let c = cluster("ops");
    fake.inject(
        "compute.instances.insert",
        Fault::OperationError {
            code: "QUOTA_EXCEEDED".into(),
            message: "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1.".into(),
        },
        1,
    );
    let e = p
        .ensure_machine(&c, &spec("c1-pool-a-q"))
        .expect_err("quota");
    assert_eq!(e.kind(), ErrorKind::Quota, "{e}");
    assert!(e.to_string().contains("CPUS"), "{e}");
    assert_eq!(fake.instance_count_named("c1-pool-a-q"), 0);

    fake.inject("compute.instances.insert", Fault::OperationStuckRunning, 1);
    let started = Instant::now();
    let e = p
        .ensure_machine(&c, &spec("c1-pool-a-s"))
        .expect_err("stuck");
    assert_eq!(e.kind(), ErrorKind::Retryable, "{e}");
    assert!(e.to_string().contains("operations describe"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "our own deadline"
    );
    // Whatever the stuck insert made is the cluster's, and delete_cluster removes it.
    p.delete_cluster(&c).expect("delete");
    assert_eq!(p.inventory(&c).expect("inventory"), vec![]);
    assert_schema_clean(&fake);
}

#[test]
fn an_unpushed_image_is_named_with_what_to_do() {
    let fake = start_fake();
    let p = provider(&fake);
    let mut s = spec("c1-pool-a-i");
    s.image = image("never-pushed", "sha256:99");
    let e = p.ensure_machine(&cluster("img"), &s).expect_err("missing");
    assert!(e.to_string().contains("clusterctl image push"), "{e}");
    assert_eq!(fake.instance_count_named("c1-pool-a-i"), 0);
}

#[test]
fn a_zone_outside_the_config_is_refused() {
    let fake = start_fake();
    let p = provider(&fake);
    let mut s = spec("c1-pool-a-z");
    s.failure_domain = Some("europe-west1-b".into());
    let e = p.ensure_machine(&cluster("z"), &s).expect_err("refused");
    assert!(e.to_string().contains("provider.gce.zones"), "{e}");
}

/// A fresh RSA key as a service-account key file would carry it (PKCS#8 PEM), and its public
/// half (PKCS#1 DER) for the fake's token endpoint.
fn service_account(fake: &FakeCompute) -> ServiceAccountKey {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine as _;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
    let der = pair.as_der().expect("pkcs8");
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
    let email = "clusterctl@clusterctl-test.iam.gserviceaccount.com";
    fake.register_service_account(email, pair.public_key().as_ref());
    ServiceAccountKey {
        client_email: email.into(),
        private_key: pem,
        private_key_id: Some("k1".into()),
        token_uri: fake.token_uri(),
    }
}

#[test]
fn a_service_account_key_gets_tokens_and_a_401_renews_them() {
    let fake = start_fake();
    let key = service_account(&fake);
    let api = client(&fake, Credentials::ServiceAccount(key.clone()));
    let p = GceProvider::new(
        Arc::new(api),
        GceConfig::new(PROJECT, vec![ZONES[0].into()]),
    )
    .expect("provider");
    let c = cluster("sa");
    p.ensure_machine(&c, &spec("c1-pool-a-sa"))
        .expect("ensure with a JWT-exchanged token");
    fake.expire_tokens();
    p.list_machines(&c).expect("a 401 renews the token once");
    let tokens = fake
        .requests()
        .into_iter()
        .filter(|r| r.method_id == "oauth2.token")
        .count();
    assert_eq!(tokens, 2, "one token, then one renewal");
    // A key the token endpoint does not know is refused, with the endpoint named.
    let other = start_fake();
    let mut stranger = service_account(&other);
    stranger.token_uri = fake.token_uri();
    stranger.client_email = "stranger@x.iam.gserviceaccount.com".into();
    let api = client(&fake, Credentials::ServiceAccount(stranger));
    let p = GceProvider::new(
        Arc::new(api),
        GceConfig::new(PROJECT, vec![ZONES[0].into()]),
    )
    .expect("provider");
    let e = p.list_machines(&c).expect_err("refused");
    assert!(e.to_string().contains("refused the credentials"), "{e}");
    assert_schema_clean(&fake);
}

#[test]
fn a_user_credential_and_the_metadata_server_get_tokens_too() {
    let fake = start_fake();
    fake.register_authorized_user("client-1", "secret-1", "refresh-1");
    let user = super::auth::AuthorizedUser {
        client_id: "client-1".into(),
        client_secret: "secret-1".into(),
        refresh_token: "refresh-1".into(),
        token_uri: fake.token_uri(),
    };
    for credentials in [
        Credentials::AuthorizedUser(user),
        Credentials::MetadataServer(fake.base_url()),
    ] {
        let api = client(&fake, credentials);
        let p = GceProvider::new(
            Arc::new(api),
            GceConfig::new(PROJECT, vec![ZONES[0].into()]),
        )
        .expect("provider");
        p.list_machines(&cluster("tok"))
            .expect("listed with a token of that source");
    }
    let sources: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method_id == "oauth2.token" || r.method_id == "metadata.token")
        .map(|r| r.method_id)
        .collect();
    assert_eq!(sources, ["oauth2.token", "metadata.token"]);
    assert_schema_clean(&fake);
}
