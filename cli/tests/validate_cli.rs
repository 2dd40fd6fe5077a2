//! `clusterctl validate` driven through the built binary: exit codes, positions on stderr,
//! and the JSON report on stdout.

use std::path::PathBuf;
use std::process::{Command, Output};

fn clusterctl(dir: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(args)
        .current_dir(dir)
        .env_remove("CLUSTERCTL_LOG")
        .output()
        .expect("run clusterctl")
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/spec/invalid")
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn valid_example_prints_valid_and_exits_zero() {
    let out = clusterctl(&examples_dir(), &["validate", "-f", "local.yaml"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "local.yaml: valid\n");
}

#[test]
fn invalid_spec_exits_two_with_every_problem_located() {
    let out = clusterctl(&corpus_dir(), &["validate", "-f", "88-many-problems.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: 9 problems in 88-many-problems.yaml\n"),
        "{stderr}"
    );
    for needle in [
        "88-many-problems.yaml:5:9: metadata.name: invalid cluster name \"Prod\"",
        "88-many-problems.yaml:15:12: spec.controlPlane.count: control plane count must be 1, 3 or 5, got 4",
        "88-many-problems.yaml:22:13: spec.nodePools[1].name: duplicate node pool name \"a\"",
        "88-many-problems.yaml:27:11: spec.ssh.user: invalid ssh user \"Core\"",
        "88-many-problems.yaml:19:7: spec.nodePools[0].autoscaling: node pool autoscaling is not implemented yet",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn type_error_is_located_with_field_path() {
    let out = clusterctl(&corpus_dir(), &["validate", "-f", "15-count-is-word.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("15-count-is-word.yaml:13:14: spec.nodePools[0].count: invalid type: string \"three\", expected u32"),
        "{stderr}"
    );
}

#[test]
fn syntax_error_is_located() {
    let out = clusterctl(
        &corpus_dir(),
        &["validate", "-f", "02-yaml-unclosed-quote.yaml"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("02-yaml-unclosed-quote.yaml:10:14: "),
        "{stderr}"
    );
}

#[test]
fn json_output_lists_errors_on_stdout() {
    let out = clusterctl(
        &corpus_dir(),
        &[
            "validate",
            "-o",
            "json",
            "-f",
            "80-exclusions-inverted-and-duplicate.yaml",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 2);
    // Both problems of the exclusions, at once, in document order.
    assert_eq!(errors[0]["line"], 20);
    assert_eq!(errors[0]["column"], 18);
    assert_eq!(
        errors[0]["path"],
        "spec.maintenancePolicy.exclusions[0].endTime"
    );
    assert_eq!(errors[0]["kind"], "semantic");
    assert_eq!(
        errors[1]["path"],
        "spec.maintenancePolicy.exclusions[1].name"
    );

    let ok = clusterctl(
        &examples_dir(),
        &["validate", "-o", "json", "-f", "libvirt-pools.yaml"],
    );
    assert_eq!(ok.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json on stdout");
    assert_eq!(report["valid"], true);
    assert_eq!(report["errors"].as_array().map(Vec::len), Some(0));
}

/// A field that nothing implements is an invalid spec like any other: exit code 2, every
/// refusal located and saying "not implemented yet", collected with the other problems.
#[test]
fn unimplemented_fields_are_refused_with_exit_two_and_positions() {
    let out = clusterctl(
        &corpus_dir(),
        &["validate", "-f", "105-not-implemented-flow-style.yaml"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let needle = "105-not-implemented-flow-style.yaml:15:40: spec.ssh.bastion: connecting through a bastion is not implemented yet";
    assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");

    let out = clusterctl(
        &corpus_dir(),
        &[
            "validate",
            "-o",
            "json",
            "-f",
            "97-not-implemented-ha-control-plane.yaml",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    let errors = report["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["path"], "spec.controlPlane.count");
    assert_eq!(
        (errors[0]["line"].as_u64(), errors[0]["column"].as_u64()),
        (Some(12), Some(12))
    );
    assert!(
        errors[0]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("is not implemented yet")),
        "{report}"
    );
}

#[test]
fn missing_file_is_an_error_naming_the_file() {
    let out = clusterctl(&corpus_dir(), &["validate", "-f", "no-such-file.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-file.yaml: cannot read the cluster spec"),
        "{stderr}"
    );
}
