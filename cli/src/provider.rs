//! From a spec's provider block to a live [`Provider`], and from a spec to the template machines
//! are made from. Each provider adds its arm here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use providers::{ImageRef, Provider, ProviderError};

use crate::engine::{DesiredMachine, MachineTemplate};
use crate::spec;

/// The provider a spec asks for.
pub fn provider_for(spec: &spec::Cluster) -> Result<Box<dyn Provider>, ProviderError> {
    match &spec.spec.provider {
        #[cfg(feature = "fake")]
        spec::Provider::Fake(f) => {
            let options = providers::fake::FakeOptions::from_env()?;
            Ok(Box::new(providers::fake::FakeProvider::new(
                &f.directory,
                options,
            )?))
        }
        #[cfg(not(feature = "fake"))]
        spec::Provider::Fake(_) => Err(ProviderError::Invalid(
            "this clusterctl was built without the fake provider (cargo feature `fake`)".into(),
        )),
        spec::Provider::Libvirt(_) => Err(ProviderError::Invalid(
            "the libvirt provider is not wired into this build of clusterctl yet".into(),
        )),
        spec::Provider::Gce(_) => Err(ProviderError::Invalid(
            "the gce provider is not implemented yet".into(),
        )),
    }
}

/// Makes paths in the provider block absolute (relative ones are relative to the spec file), so
/// that the spec stored in the cluster state works from any directory, e.g. for `clusterctl delete`.
pub fn absolutize_paths(spec: &mut spec::Cluster, spec_file: &Path) {
    let base = std::path::absolute(spec_file).unwrap_or_else(|_| spec_file.to_path_buf());
    if let spec::Provider::Fake(f) = &mut spec.spec.provider {
        f.directory = spec::resolve_path(&base, &f.directory);
    }
}

/// How machines of this spec are made: node image and first-boot data.
///
/// The fake provider boots nothing, so it gets a placeholder image reference that says so. Real
/// providers need a built node image (issue 3) and rendered cloud-init (templates crate); until
/// those are wired in, asking for one is an error rather than a machine that cannot boot.
pub fn machine_template(spec: &spec::Cluster) -> Result<MachineTemplate, ProviderError> {
    let image = match &spec.spec.provider {
        spec::Provider::Fake(f) => ImageRef {
            version: "fake-no-image".into(),
            dir: f.directory.clone(),
            digest: "fake-no-image".into(),
        },
        other => {
            return Err(ProviderError::Invalid(format!(
                "node image selection for the {} provider is not wired into this build of clusterctl yet",
                other.name()
            )));
        }
    };
    Ok(MachineTemplate {
        image,
        user_data: Arc::new(|m: &DesiredMachine| format!("#cloud-config\nhostname: {}\n", m.name)),
        labels: spec
            .metadata
            .labels
            .clone()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    })
}
