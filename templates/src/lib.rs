//! Pure rendering for clusterctl: a typed input struct goes in, file contents come out.
//!
//! No I/O happens here: callers write the results where they belong (over SSH, into a libvirt
//! definition, into a seed image). Templates are embedded at compile time.

pub mod cloudinit;
pub mod kubernetes;
pub mod libvirt;

/// Errors from rendering a template.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The template engine failed; names the template.
    #[error("rendering template {template}: {detail}")]
    Template {
        /// Template name.
        template: String,
        /// What went wrong.
        detail: String,
    },
    /// An input value cannot be rendered safely; names the field.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field path in the input struct.
        field: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// No template set exists for this Kubernetes version.
    #[error(
        "kubernetes version {version} is not supported (supported minor versions: {supported})"
    )]
    UnsupportedVersion {
        /// The version asked for.
        version: String,
        /// The supported minor versions, comma-separated.
        supported: String,
    },
}
