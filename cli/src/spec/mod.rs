//! The cluster spec (`cluster.yaml`): types, strict parsing, defaults and semantic validation.
//!
//! Every command that reads a spec calls [`load`], which reads the file, parses it strictly
//! (unknown fields, wrong types and YAML syntax errors are errors), runs every semantic check,
//! and returns either the [`Cluster`] with all defaults filled in or all problems at once, each
//! with file, line, column and field path. The reference is docs/spec.md.

pub mod changes;
mod error;
pub mod locate;
mod types;
mod validate;
pub mod values;

use std::path::{Path, PathBuf};

pub use error::{SpecError, SpecErrorKind, SpecErrors};
pub use types::*;
pub use validate::{is_dns1123_label, member_problem};
pub use values::{
    Duration, Frequency, KubernetesVersion, MaxUnhealthy, Quantity, Recurrence, Timestamp,
    ValueError, Weekday,
};

use locate::{PathMap, Pos};

/// Largest spec file read; a cluster spec is a few kilobytes, so anything near this is a mistake
/// (a wrong file given with `-f`).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Reads, parses and validates the spec at `path`; returns it with defaults filled in
/// ([`Cluster::with_defaults`]) or every problem found. Errors name the file as given.
pub fn load(path: &Path) -> Result<Cluster, SpecErrors> {
    use std::io::Read;
    let file = path.display().to_string();
    let io_error = |message: String, hint: &str| SpecError {
        file: file.clone(),
        line: 0,
        column: 0,
        path: String::new(),
        message,
        hint: Some(hint.to_owned()),
        kind: SpecErrorKind::Io,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SPEC_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            io_error(
                format!("cannot read the cluster spec: {e}"),
                "check the path given with -f",
            )
        })?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(io_error(
            format!(
                "the file is larger than {} KiB, too large for a cluster spec",
                MAX_SPEC_BYTES >> 10
            ),
            "check the path given with -f",
        )
        .into());
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        io_error(
            format!(
                "the file is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
            "save the file as UTF-8",
        )
    })?;
    parse_str(&text, &file)
}

/// Parses and validates spec text; `file` is the name used in errors. Like [`load`] without
/// the file system.
pub fn parse_str(text: &str, file: &str) -> Result<Cluster, SpecErrors> {
    let map = PathMap::build(text);
    let options = serde_saphyr::options! {
        // `yes`/`no`/`on`/`off` are strings in YAML 1.2; do not turn them into booleans.
        strict_booleans: true,
        reject_unsupported_tags: true,
    };
    let cluster: Cluster = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| deser_error(&e, &map, file))?;
    let errors = validate::validate(&cluster);
    if errors.is_empty() {
        return Ok(cluster.with_defaults());
    }
    let mut errors: Vec<SpecError> = errors
        .into_iter()
        .map(|p| {
            let pos = map.locate(&p.path);
            SpecError {
                file: file.to_owned(),
                line: pos.line,
                column: pos.column,
                path: p.path,
                message: p.message,
                hint: p.hint,
                kind: SpecErrorKind::Semantic,
            }
        })
        .collect();
    // Document order; the sort is stable so problems at one place keep the order of the checks.
    errors.sort_by_key(|e| (e.line, e.column));
    Err(SpecErrors { errors })
}

/// Resolves a path written in a spec: `~/x` against the home directory, a relative path
/// against the directory of the spec file, an absolute path as is.
pub fn resolve_path(spec_file: &Path, p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if p.is_absolute() {
        return p.to_path_buf();
    }
    spec_file.parent().unwrap_or_else(|| Path::new("")).join(p)
}

/// Turns a serde-saphyr error into a [`SpecError`] with the field path looked up by position.
fn deser_error(e: &serde_saphyr::Error, map: &PathMap, file: &str) -> SpecErrors {
    use serde_saphyr::MessageFormatter;
    let inner = e.without_snippet();
    let raw = serde_saphyr::UserMessageFormatter
        .format_message(inner)
        .into_owned();
    let pos = e
        .location()
        .map(|l| Pos {
            line: usize::try_from(l.line()).unwrap_or(0),
            column: usize::try_from(l.column()).unwrap_or(0),
        })
        .unwrap_or_default();
    let message = match inner {
        // serde-saphyr says only "invalid u32"; name the value like serde's invalid_type does.
        serde_saphyr::Error::InvalidScalar { ty, .. } => match map.scalar_at(pos) {
            Some(text) if text.parse::<f64>().is_ok() => {
                format!("invalid value: {text}, expected {ty}")
            }
            Some(text) => format!("invalid type: string {text:?}, expected {ty}"),
            None => format!("invalid value, expected {ty}"),
        },
        _ => rephrase(&clean_message(&raw)),
    };
    let syntax = is_syntax_error(inner);
    if matches!(inner, serde_saphyr::Error::Eof { .. }) && !map.contains("") {
        return SpecError {
            file: file.to_owned(),
            line: pos.line.max(1),
            column: pos.column.max(1),
            path: String::new(),
            message: "the file holds no YAML document".to_owned(),
            hint: Some("write a Cluster document; examples/local.yaml is a start".to_owned()),
            kind: SpecErrorKind::Syntax,
        }
        .into();
    }
    let (path, pos) = if syntax {
        (String::new(), pos)
    } else if message.starts_with("missing field") {
        // The position is the last key read in the mapping that lacks the field, or the start
        // of that mapping when it is empty; report the mapping itself.
        let mapping = match map.path_of_key_at(pos) {
            Some(key) => locate::parent_path(key).unwrap_or(""),
            None => map.path_at(pos, false).unwrap_or(""),
        };
        (mapping.to_owned(), map.locate(mapping))
    } else {
        let prefer_key = message.starts_with("unknown field") || message.starts_with("duplicate");
        (map.path_at(pos, prefer_key).unwrap_or("").to_owned(), pos)
    };
    let hint = hint_for(&message, syntax);
    SpecError {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        path,
        message,
        hint,
        kind: if syntax {
            SpecErrorKind::Syntax
        } else {
            SpecErrorKind::Schema
        },
    }
    .into()
}

fn is_syntax_error(e: &serde_saphyr::Error) -> bool {
    matches!(
        e,
        serde_saphyr::Error::ExternalMessage { .. } | serde_saphyr::Error::Eof { .. }
    )
}

/// Drops the " at line X, column Y" suffix the formatter adds; the position is printed in front.
fn clean_message(raw: &str) -> String {
    let msg = raw.lines().next().unwrap_or(raw).trim();
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => &msg[..i],
        _ => msg,
    };
    msg.trim_end_matches('.').to_owned()
}

/// Rewords serde-saphyr's structural messages in the terms of the spec.
fn rephrase(msg: &str) -> String {
    let m = match msg {
        "expected mapping start" => "invalid type: expected a mapping (key: value pairs)",
        "expected sequence start" => "invalid type: expected a list",
        "externally tagged enum expected scalar or mapping" => {
            "invalid type: expected a name or a mapping with exactly one key"
        }
        "expected end of mapping after enum variant value" => {
            "more than one key: exactly one is allowed here"
        }
        other => {
            // "duplicate mapping key: count, set DuplicateKeyPolicy in Options if acceptable"
            if let Some(rest) = other.strip_prefix("duplicate mapping key: ") {
                let key = rest
                    .split(", set DuplicateKeyPolicy")
                    .next()
                    .unwrap_or(rest);
                return format!("duplicate key `{key}`");
            }
            other
        }
    };
    m.to_owned()
}

fn hint_for(message: &str, syntax: bool) -> Option<String> {
    let h = if syntax {
        "fix the YAML syntax at this position (indentation, quotes, colons)"
    } else if message.starts_with("unknown field") {
        "remove the field or fix its spelling; field names are camelCase (see docs/spec.md)"
    } else if message.starts_with("missing field") {
        "add the field (see docs/spec.md)"
    } else if message.starts_with("unknown variant") {
        "use one of the listed values"
    } else if message.contains("boolean")
        || (message.starts_with("invalid") && message.ends_with("bool"))
    {
        "write true or false (yes, no, on and off are strings)"
    } else if message.starts_with("invalid") && message.contains("expected u") {
        "write a whole number (0 or more) such as 3"
    } else if message.contains("multiple found") {
        "keep one Cluster document per file"
    } else if message.starts_with("null is not allowed") {
        "write a value or remove the field"
    } else if message.starts_with("more than one key") {
        "keep only one of the keys (for example one provider)"
    } else if message.starts_with("invalid type") {
        "write a value of the expected type (see docs/spec.md)"
    } else if message.starts_with("duplicate") {
        "remove one of the duplicate keys"
    } else {
        return None;
    };
    Some(h.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
apiVersion: clusterctl.io/v1alpha1
kind: Cluster
metadata:
  name: demo
spec:
  provider:
    fake:
      directory: /tmp/fake
  kubernetes:
    version: \"1.30.2\"
  controlPlane:
    schedulable: true
  ssh:
    user: core
    agent: true
";

    #[test]
    fn defaults_are_filled() {
        let c = parse_str(MINIMAL, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        let s = &c.spec;
        assert_eq!(s.kubernetes.pod_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(s.kubernetes.service_cidr.to_string(), "10.96.0.0/12");
        assert_eq!(s.kubernetes.cluster_domain, "cluster.local");
        assert_eq!(s.kubernetes.artifacts, ArtifactSource::Upstream);
        assert_eq!(s.control_plane.count, 1);
        assert_eq!(s.control_plane.machine.memory.to_string(), "2Gi");
        assert!(s.node_pools.is_empty());
        assert_eq!(s.ssh.user, "core");
        assert_eq!(s.ssh.bastion, None);
        assert_eq!(s.auto_repair.max_unhealthy, MaxUnhealthy::Percent(40));
    }

    /// Defaults never promise what is not built: every feature that nothing implements is off
    /// or absent in the defaulted spec, and an explicit "off" is accepted.
    #[test]
    fn defaults_of_unimplemented_features_are_off() {
        let c = parse_str(MINIMAL, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        let s = &c.spec;
        assert!(!s.auto_repair.enabled, "nothing repairs nodes yet");
        assert!(!s.auto_upgrade.enabled, "nothing upgrades clusters yet");
        assert_eq!(s.maintenance_policy, MaintenancePolicy::default());
        assert!(s.maintenance_policy.window.is_none());
        assert!(s.maintenance_policy.exclusions.is_empty());
        assert!(s.access.bindings.is_empty());
        assert_eq!(s.ssh.bastion, None);
        assert_eq!(s.control_plane.count, 1);
        assert!(!AutoRepair::default().enabled);
        assert!(!AutoUpgrade::default().enabled);
        assert_eq!(
            LibvirtNetwork::default().mode,
            NetworkMode::Isolated,
            "the only mode the libvirt provider builds"
        );
        let pools = MINIMAL.replace(
            "  controlPlane:\n    schedulable: true\n",
            "  nodePools:\n    - name: workers\n      count: 2\n",
        );
        let c = parse_str(&pools, "p.yaml").unwrap_or_else(|e| panic!("{e}"));
        let pool = &c.spec.node_pools[0];
        assert_eq!(pool.autoscaling, None);
        assert_eq!(
            pool.upgrade_settings, None,
            "nothing upgrades node pools yet"
        );
        // Without upgrade settings there is no surge: the control plane and two workers.
        assert_eq!(c.spec.max_machines(), 3);
        let yaml = serde_saphyr::to_string(&c).expect("serialize");
        for absent in [
            "upgradeSettings",
            "autoscaling",
            "bastion",
            "window",
            "bindings",
        ] {
            assert!(
                !yaml.contains(absent),
                "{absent} in the defaulted spec:\n{yaml}"
            );
        }

        let off = format!(
            "{MINIMAL}  autoRepair:\n    enabled: false\n    unhealthyThreshold: 10m\n  autoUpgrade: {{enabled: false}}\n  maintenancePolicy: {{}}\n  access: {{bindings: []}}\n"
        );
        let c = parse_str(&off, "off.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.spec.auto_repair.enabled);
        assert_eq!(c.spec.auto_repair.unhealthy_threshold.as_secs(), 600);
    }

    /// Each field that nothing implements is refused with "not implemented yet", at its own
    /// line and column, and all of them at once; the maintenance window, exclusions,
    /// auto-upgrade, auto-repair and access bindings next to them are built and accepted.
    #[test]
    fn unimplemented_fields_are_refused_where_they_are_written() {
        let text = "\
apiVersion: clusterctl.io/v1alpha1
kind: Cluster
metadata:
  name: demo
spec:
  provider:
    libvirt:
      network:
        mode: nat
  kubernetes:
    channel: stable
  controlPlane:
    count: 3
  nodePools:
    - name: workers
      count: 2
      autoscaling: {minCount: 1, maxCount: 3}
      upgradeSettings: {maxSurge: 1, maxUnavailable: 1}
  ssh:
    bastion:
      host: jump.example.com
  maintenancePolicy:
    window:
      startTime: \"2026-01-03T02:00:00Z\"
      duration: 4h
      recurrence: FREQ=DAILY
    exclusions:
      - name: freeze
        startTime: \"2026-12-20T00:00:00Z\"
        endTime: \"2026-12-27T00:00:00Z\"
  autoUpgrade:
    enabled: true
  autoRepair: {enabled: true}
  access:
    bindings:
      - members: [\"user:alice\"]
        role: viewer
";
        let errors = parse_str(text, "n.yaml").expect_err("unimplemented fields");
        let got: Vec<(usize, usize, &str)> = errors
            .iter()
            .map(|e| (e.line, e.column, e.path.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (9, 15, "spec.provider.libvirt.network.mode"),
                (13, 12, "spec.controlPlane.count"),
                (17, 7, "spec.nodePools[0].autoscaling"),
                (18, 54, "spec.nodePools[0].upgradeSettings.maxUnavailable"),
                (20, 5, "spec.ssh.bastion"),
            ]
        );
        for e in errors.iter() {
            assert!(e.message.ends_with("is not implemented yet"), "{e}");
            assert_eq!(e.kind, SpecErrorKind::Semantic);
            assert!(e.hint.is_some(), "{e}");
        }
    }

    #[test]
    fn bastion_user_defaults_to_the_ssh_user() {
        // ssh.bastion is refused by validation (not implemented yet), but the cross-field
        // default stays right for when it is built.
        let mut c = parse_str(MINIMAL, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        c.spec.ssh.bastion = Some(Bastion {
            host: "jump.example.com".into(),
            port: 22,
            user: None,
        });
        let d = c.with_defaults();
        let bastion = d.spec.ssh.bastion.as_ref().expect("bastion");
        assert_eq!(bastion.user.as_deref(), Some("core"));
    }

    #[test]
    fn ssh_key_source_defaults_to_generated() {
        let agent = parse_str(MINIMAL, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(agent.spec.ssh.key_source(), KeySource::Agent);
        assert!(!agent.spec.ssh.generated_key);

        let none = MINIMAL.replace("    agent: true\n", "");
        let c = parse_str(&none, "n.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.spec.ssh.generated_key,
            "the defaulted spec says the key is generated"
        );
        assert_eq!(c.spec.ssh.key_source(), KeySource::Generated);

        let file = MINIMAL.replace("agent: true", "privateKey: ~/.ssh/k");
        let c = parse_str(&file, "f.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert!(!c.spec.ssh.generated_key);
        assert_eq!(
            c.spec.ssh.key_source(),
            KeySource::File(PathBuf::from("~/.ssh/k"))
        );

        let explicit = MINIMAL.replace("agent: true", "generatedKey: true");
        let c = parse_str(&explicit, "g.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.spec.ssh.key_source(), KeySource::Generated);

        let all = MINIMAL.replace(
            "agent: true",
            "privateKey: k\n    agent: true\n    generatedKey: true",
        );
        let errors = parse_str(&all, "a.yaml").expect_err("three key sources");
        assert_eq!(
            errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>(),
            ["privateKey and agent: true and generatedKey: true are all set; they are exclusive"]
        );
    }

    #[test]
    fn one_of_choices_parse_in_both_forms() {
        let gce = MINIMAL.replace(
            "fake:\n      directory: /tmp/fake",
            "gce:\n      project: my-project\n      zone: us-east1-b\n      credentials: applicationDefault",
        );
        // The gce provider is refused by validation (not implemented yet), so its forms are
        // read with the deserializer alone.
        let refused = parse_str(&gce, "g.yaml").expect_err("gce is not implemented");
        assert_eq!(
            refused
                .iter()
                .map(|e| (e.path.as_str(), e.message.as_str()))
                .collect::<Vec<_>>(),
            [(
                "spec.provider.gce",
                "the gce provider is not implemented yet"
            )]
        );
        let deserialize = |text: &str| -> Cluster {
            serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{e}"))
        };
        let c = deserialize(&gce);
        let Provider::Gce(g) = &c.spec.provider else {
            panic!("not gce")
        };
        assert_eq!(g.credentials, GceCredentials::ApplicationDefault);
        assert_eq!(g.network, "default");
        let file = gce.replace("applicationDefault", "{file: key.json}");
        let c = deserialize(&file);
        let Provider::Gce(g) = &c.spec.provider else {
            panic!("not gce")
        };
        assert_eq!(
            g.credentials,
            GceCredentials::File(PathBuf::from("key.json"))
        );
        let bundle = MINIMAL.replace(
            "    version: \"1.30.2\"",
            "    version: \"1.30.2\"\n    artifacts:\n      bundle:\n        path: ./bundle",
        );
        let c = parse_str(&bundle, "b.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.spec.kubernetes.artifacts,
            ArtifactSource::Bundle(Bundle {
                path: PathBuf::from("./bundle")
            })
        );
        assert_eq!(c.spec.max_machines(), 1);
    }

    #[test]
    fn provider_names() {
        let c = parse_str(MINIMAL, "m.yaml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.spec.provider.name(), "fake");
        assert_eq!(c.name(), "demo");
    }

    #[test]
    fn errors_carry_file_line_column_and_path() {
        let text = MINIMAL.replace("schedulable: true", "schedulable: true\n    count: 2");
        let errors = parse_str(&text, "x.yaml").expect_err("count 2 is invalid");
        assert_eq!(errors.len(), 1);
        let e = &errors.errors[0];
        assert_eq!((e.line, e.column), (13, 12));
        assert_eq!(e.path, "spec.controlPlane.count");
        assert_eq!(e.kind, SpecErrorKind::Semantic);
        assert!(
            e.to_string()
                .starts_with("x.yaml:13:12: spec.controlPlane.count: control plane count")
        );
    }

    #[test]
    fn load_reports_unreadable_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.yaml");
        let errors = load(&missing).expect_err("missing file");
        assert_eq!(errors.errors[0].kind, SpecErrorKind::Io);
        let big = dir.path().join("big.yaml");
        std::fs::write(
            &big,
            "#".repeat(usize::try_from(MAX_SPEC_BYTES).expect("fits") + 1),
        )
        .expect("write");
        assert!(
            load(&big).expect_err("too big").errors[0]
                .message
                .contains("too large")
        );
        let binary = dir.path().join("bin.yaml");
        std::fs::write(&binary, b"name: \xff\xfe").expect("write");
        assert!(
            load(&binary).expect_err("not utf-8").errors[0]
                .message
                .contains("not UTF-8")
        );
        let good = dir.path().join("c.yaml");
        std::fs::write(&good, MINIMAL).expect("write");
        assert!(load(&good).is_ok());
    }

    #[test]
    fn resolve_path_handles_home_relative_and_absolute() {
        let spec = Path::new("/etc/clusters/c.yaml");
        assert_eq!(
            resolve_path(spec, Path::new("keys/id")),
            PathBuf::from("/etc/clusters/keys/id")
        );
        assert_eq!(resolve_path(spec, Path::new("/k")), PathBuf::from("/k"));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                resolve_path(spec, Path::new("~/.ssh/id")),
                PathBuf::from(home).join(".ssh/id")
            );
        }
        assert_eq!(
            resolve_path(Path::new("c.yaml"), Path::new("k")),
            PathBuf::from("k")
        );
    }
}
