//! Rendering a kubeconfig for a client certificate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Inputs of [`render_kubeconfig`]. `Debug` is deliberately not derived: it holds a private key.
pub struct KubeconfigInput<'a> {
    /// Cluster (and context) name.
    pub cluster_name: &'a str,
    /// API server URL, e.g. `https://10.0.0.2:6443`.
    pub server: &'a str,
    /// The cluster CA certificate, PEM.
    pub ca_pem: &'a str,
    /// The user name (the client certificate's CN).
    pub user_name: &'a str,
    /// The client certificate, PEM.
    pub client_cert_pem: &'a str,
    /// The client key, PEM.
    pub client_key_pem: &'a str,
}

/// A YAML double-quoted scalar: JSON string syntax is valid YAML and escapes everything.
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Renders a self-contained kubeconfig (certificates and key embedded as base64 data) with one
/// cluster, one user and one context named `<user>@<cluster>`, selected as current. Pure: no I/O.
/// The result holds the private key and is wiped from memory when dropped.
pub fn render_kubeconfig(input: &KubeconfigInput<'_>) -> Zeroizing<String> {
    let context = format!("{}@{}", input.user_name, input.cluster_name);
    let cluster = quoted(input.cluster_name);
    let user = quoted(input.user_name);
    let ctx = quoted(&context);
    let key_b64 = Zeroizing::new(STANDARD.encode(input.client_key_pem));
    Zeroizing::new(format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {cluster}\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority-data: {ca}\n\
         users:\n\
         - name: {user}\n  \
           user:\n    \
             client-certificate-data: {cert}\n    \
             client-key-data: {key}\n\
         contexts:\n\
         - name: {ctx}\n  \
           context:\n    \
             cluster: {cluster}\n    \
             user: {user}\n\
         current-context: {ctx}\n\
         preferences: {{}}\n",
        server = quoted(input.server),
        ca = STANDARD.encode(input.ca_pem),
        cert = STANDARD.encode(input.client_cert_pem),
        key = key_b64.as_str(),
    ))
}
