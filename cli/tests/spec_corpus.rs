//! Data-driven tests of the cluster spec: every file in `tests/spec/invalid/` must be rejected
//! with exactly the message in the `.expected` file beside it, and every example under
//! `examples/` must be valid.
//!
//! After an intended message change, regenerate the expected files with
//! `UPDATE_EXPECT=1 cargo test -p clusterctl --test spec_corpus` and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use clusterctl::spec;

/// The issue asks for at least 40 invalid specs; keep the corpus from shrinking by accident.
const MIN_CORPUS: usize = 45;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn invalid_corpus_matches_expected_messages() {
    let dir = manifest_dir().join("tests/spec/invalid");
    let files = yaml_files(&dir);
    assert!(
        files.len() >= MIN_CORPUS,
        "only {} invalid specs in {}",
        files.len(),
        dir.display()
    );
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name");
        let text = fs::read_to_string(file).expect("read corpus file");
        let actual = match spec::parse_str(&text, name) {
            Ok(_) => "<valid: the spec was accepted>".to_string(),
            Err(errors) => {
                for e in errors.iter() {
                    assert_eq!(e.file, name);
                    assert!(
                        e.line > 0 && e.column > 0,
                        "{name}: error without a position: {e}"
                    );
                }
                format!("{errors}\n")
            }
        };
        let expected_path = file.with_extension("expected");
        if update {
            fs::write(&expected_path, &actual).expect("write expected file");
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{name}:\n--- expected\n{expected}--- actual\n{actual}"
            )),
            Err(e) => failures.push(format!(
                "{name}: no expected file {} ({e})",
                expected_path.display()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus mismatches:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every expected file belongs to a spec (no stale expectations).
    for entry in fs::read_dir(&dir).expect("read corpus dir") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|x| x == "expected") {
            assert!(p.with_extension("yaml").exists(), "stale {}", p.display());
        }
    }
}

#[test]
fn examples_are_valid() {
    let dir = manifest_dir().join("../examples");
    let files = yaml_files(&dir);
    assert!(
        files.len() >= 3,
        "expected at least 3 examples in {}",
        dir.display()
    );
    for file in files {
        if let Err(errors) = spec::load(&file) {
            panic!("{} is invalid:\n{errors}", file.display());
        }
    }
}

#[test]
fn defaulted_local_example_snapshot() {
    let file = manifest_dir().join("../examples/local.yaml");
    let cluster = spec::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let yaml = serde_saphyr::to_string(&cluster).expect("serialize");
    insta::assert_snapshot!("local_defaulted", yaml);
    // The defaulted form is itself a valid spec that parses back to the same value.
    let again = spec::parse_str(&yaml, "local-defaulted.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again, cluster);
}

#[test]
fn examples_round_trip_through_serialization() {
    for file in yaml_files(&manifest_dir().join("../examples")) {
        let cluster = spec::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let yaml = serde_saphyr::to_string(&cluster).expect("serialize");
        let again = spec::parse_str(&yaml, "again.yaml")
            .unwrap_or_else(|e| panic!("{}: {e}\n{yaml}", file.display()));
        assert_eq!(again, cluster, "{}", file.display());
    }
}

fn collect_keys(value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                collect_keys(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_keys(v, out)),
        _ => {}
    }
}

#[test]
fn reference_documents_every_field() {
    let docs =
        fs::read_to_string(manifest_dir().join("../docs/spec.md")).expect("read docs/spec.md");
    let mut keys = std::collections::BTreeSet::new();
    for file in yaml_files(&manifest_dir().join("../examples")) {
        let cluster = spec::load(&file).unwrap_or_else(|e| panic!("{e}"));
        collect_keys(&serde_json::to_value(&cluster).expect("to json"), &mut keys);
    }
    // Label keys of the examples are data, not fields.
    let data = [
        "team",
        "example.com/cost-center",
        "example.com/tier",
        "example.com/accelerator",
    ];
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !data.contains(&k.as_str()))
        .filter(|k| {
            !docs.contains(&format!("`{k}"))
                && !docs.contains(&format!(".{k}"))
                && !docs.contains(&format!("{{{k}: "))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/spec.md does not mention {missing:?}"
    );
}

/// Truncating a valid spec at many places, or dropping any one line, must give either a valid spec or
/// located errors: never a panic, never an error without a position.
#[test]
fn mutated_specs_never_panic_and_errors_are_located() {
    let mut parses = 0usize;
    for file in yaml_files(&manifest_dir().join("../examples")) {
        let text = fs::read_to_string(&file).expect("read example");
        let mut variants: Vec<String> = text
            .char_indices()
            .step_by(3)
            .map(|(i, _)| text[..i].to_owned())
            .collect();
        let lines: Vec<&str> = text.lines().collect();
        for skip in 0..lines.len() {
            let mut v: Vec<&str> = lines.clone();
            v.remove(skip);
            variants.push(v.join("\n"));
        }
        for v in variants {
            parses += 1;
            if let Err(errors) = spec::parse_str(&v, "m.yaml") {
                assert!(!errors.is_empty());
                for e in errors.iter() {
                    assert!(e.line > 0 && e.column > 0, "unlocated error {e} for:\n{v}");
                }
            }
        }
    }
    assert!(parses > 1000);
}
