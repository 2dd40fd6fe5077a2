//! The GCE provider against a real Google Cloud project: the shared provider conformance suite
//! (without a probe: nothing here can look inside a real VM's disk). Off by default; nothing in
//! CI or on a machine without Google credentials runs it. Costs a few cents (e2 VMs for minutes).
//!
//! ```sh
//! CLUSTERCTL_GCE_LIVE=1 \
//! GOOGLE_APPLICATION_CREDENTIALS=key.json \
//! CLUSTERCTL_GCE_PROJECT=my-project CLUSTERCTL_GCE_ZONES=europe-west1-b,europe-west1-c \
//! CLUSTERCTL_TEST_IMAGE=/var/cache/clusterctl/images/<v1> \
//! CLUSTERCTL_TEST_IMAGE_V2=/var/cache/clusterctl/images/<v2> \
//!   cargo test -p clusterctl --test gce_live -- --nocapture
//! ```
//! Both images must have been pushed first (`clusterctl image push --provider gce --project P
//! --bucket B VERSION`). The service account needs the roles the README lists.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use providers::conformance::{self, Fixture};
use providers::gce::auth::{Credentials, TokenSource};
use providers::gce::client::RestCompute;
use providers::gce::{GceConfig, GceProvider};
use providers::{MachineRole, MachineSize, MachineSpec};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("CLUSTERCTL_GCE_LIVE=1 needs {name}"))
}

#[test]
fn conformance_suite_passes_against_a_real_project() {
    if std::env::var("CLUSTERCTL_GCE_LIVE").as_deref() != Ok("1") {
        eprintln!(
            "skipping: set CLUSTERCTL_GCE_LIVE=1 (and a project, zones, credentials and pushed images) to run against real GCE"
        );
        return;
    }
    let project = env("CLUSTERCTL_GCE_PROJECT");
    let zones: Vec<String> = env("CLUSTERCTL_GCE_ZONES")
        .split(',')
        .map(str::to_owned)
        .collect();
    let image = |var: &str| {
        let image = nodeimage::load(Path::new(&env(var))).expect("load the image");
        clusterctl::cmd::image::image_ref(&image)
    };
    let credentials = Credentials::application_default().expect("credentials");
    let mut api = RestCompute::new(
        providers::gce::client::DEFAULT_ENDPOINT,
        &project,
        TokenSource::new(credentials),
        Duration::from_secs(60),
    )
    .expect("client");
    api.operation_timeout = Duration::from_secs(900);
    let provider =
        GceProvider::new(Arc::new(api), GceConfig::new(project, zones)).expect("provider");
    let template = MachineSpec {
        name: "unused".into(),
        role: MachineRole::Worker,
        pool: None,
        size: MachineSize {
            cpus: 2,
            memory_mib: 2048,
            disk_gib: 10,
        },
        image: image("CLUSTERCTL_TEST_IMAGE"),
        user_data: "#cloud-config\n{}\n".into(),
        labels: Default::default(),
        failure_domain: None,
    };
    let mut fixture = Fixture::new("cclive", template, image("CLUSTERCTL_TEST_IMAGE_V2"));
    fixture.boot_timeout = Duration::from_secs(600);
    conformance::run_all(&provider, &fixture).expect("conformance against real GCE");
}
