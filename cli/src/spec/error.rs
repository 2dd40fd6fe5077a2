//! Errors of reading and validating a cluster spec, each pointing at a file, line, column and
//! field path.

use serde::Serialize;

/// What kind of problem a [`SpecError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SpecErrorKind {
    /// The file could not be read.
    Io,
    /// The text is not valid YAML.
    Syntax,
    /// The YAML does not fit the schema: unknown field, wrong type, missing field, bad value.
    Schema,
    /// The document fits the schema but breaks a rule (overlapping CIDRs, min > max, ...).
    Semantic,
}

/// One problem in a cluster spec.
///
/// Displays as `cluster.yaml:12:7: spec.nodePools[1].count: MESSAGE` followed by an indented
/// `hint:` line when there is advice on what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", render(self))]
pub struct SpecError {
    /// File name as given by the user.
    pub file: String,
    /// Line, from 1 (0 when the file could not be read).
    pub line: usize,
    /// Column, from 1 (0 when the file could not be read).
    pub column: usize,
    /// Field path such as `spec.nodePools[1].count`; empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Kind of problem.
    pub kind: SpecErrorKind,
}

fn render(e: &SpecError) -> String {
    let mut s = e.file.clone();
    if e.line > 0 {
        s.push_str(&format!(":{}:{}", e.line, e.column));
    }
    s.push_str(": ");
    if !e.path.is_empty() {
        s.push_str(&e.path);
        s.push_str(": ");
    }
    s.push_str(&e.message);
    if let Some(h) = &e.hint {
        s.push_str("\n  hint: ");
        s.push_str(h);
    }
    s
}

/// All problems found in a cluster spec, in document order. Never empty.
///
/// A single problem displays as itself; several display as a count line followed by one
/// problem per line (hints indented below each).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", render_all(self))]
pub struct SpecErrors {
    /// The problems.
    pub errors: Vec<SpecError>,
}

impl SpecErrors {
    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there are no problems (never true for a returned error).
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// Iterates over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.errors.iter()
    }
}

fn render_all(all: &SpecErrors) -> String {
    match all.errors.as_slice() {
        [] => "no problems".to_owned(),
        [one] => one.to_string(),
        many => {
            let mut s = format!("{} problems in {}", many.len(), many[0].file);
            for e in many {
                s.push('\n');
                s.push_str(&e.to_string());
            }
            s
        }
    }
}

impl From<SpecError> for SpecErrors {
    fn from(e: SpecError) -> Self {
        SpecErrors { errors: vec![e] }
    }
}

impl IntoIterator for SpecErrors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}
