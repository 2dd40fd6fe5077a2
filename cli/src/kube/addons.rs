//! Add-ons applied through the API: a multi-document YAML stream (rendered by `templates`, e.g.
//! cluster DNS) applied object by object with server-side apply under clusterctl's field manager,
//! so a re-apply is a no-op and a changed template updates what it owns and nothing else.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

use super::{KubeClient, KubeError};

/// Field manager of clusterctl's server-side applies.
pub const FIELD_MANAGER: &str = "clusterctl";

/// One applied object: `Kind namespace/name` (or `Kind name`).
pub type Applied = String;

/// Splits a YAML stream into objects (empty documents skipped); each must have `apiVersion`,
/// `kind` and `metadata.name`.
pub fn parse_stream(yaml: &str) -> Result<Vec<DynamicObject>, KubeError> {
    let bad = |detail: String| KubeError::Unexpected {
        op: "reading add-on manifests".into(),
        detail,
    };
    let mut out = Vec::new();
    for (i, doc) in split_documents(yaml).into_iter().enumerate() {
        let value: serde_json::Value =
            serde_saphyr::from_str(doc).map_err(|e| bad(format!("document {}: {e}", i + 1)))?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_json::from_value(value).map_err(|e| bad(format!("document {}: {e}", i + 1)))?;
        if obj.types.is_none() || obj.metadata.name.is_none() {
            return Err(bad(format!(
                "document {} has no apiVersion, kind or metadata.name",
                i + 1
            )));
        }
        out.push(obj);
    }
    Ok(out)
}

fn split_documents(yaml: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    for line in yaml.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&yaml[start..pos]);
            start = pos + line.len();
        }
        pos += line.len();
    }
    docs.push(&yaml[start..]);
    docs
}

impl KubeClient {
    /// Server-side applies every object of `yaml` in order (`dry_run`: the API server checks
    /// and defaults each without storing it). Returns what was applied.
    pub async fn apply_manifests(
        &self,
        yaml: &str,
        dry_run: bool,
    ) -> Result<Vec<Applied>, KubeError> {
        let objects = parse_stream(yaml)?;
        let mut params = PatchParams::apply(FIELD_MANAGER).force();
        params.dry_run = dry_run;
        let mut applied = Vec::new();
        for obj in objects {
            let types = obj.types.clone().unwrap_or_default();
            let gvk = GroupVersionKind::try_from(&types).map_err(|e| KubeError::Unexpected {
                op: "reading add-on manifests".into(),
                detail: format!("{}: {e}", types.kind),
            })?;
            let resource = ApiResource::from_gvk(&gvk);
            let name = obj.metadata.name.clone().unwrap_or_default();
            let (api, what): (Api<DynamicObject>, String) = match &obj.metadata.namespace {
                Some(ns) => (
                    Api::namespaced_with(self.client(), ns, &resource),
                    format!("{} {ns}/{name}", gvk.kind),
                ),
                None => (
                    Api::all_with(self.client(), &resource),
                    format!("{} {name}", gvk.kind),
                ),
            };
            let op = format!("applying {what}");
            let patch = Patch::Apply(&obj);
            self.call_retrying(&op, std::time::Duration::from_secs(120), || {
                api.patch(&name, &params, &patch)
            })
            .await?;
            applied.push(what);
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_splits_into_named_objects() {
        let objs = parse_stream(
            "# a comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: x}\n---\n\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b}\n",
        )
        .unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].types.as_ref().unwrap().kind, "Deployment");
        let e = parse_stream("kind: ConfigMap\nmetadata: {}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("document 1"), "{e}");
        let e = parse_stream("a: [unclosed\n").unwrap_err().to_string();
        assert!(e.contains("document 1"), "{e}");
    }
}
