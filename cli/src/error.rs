//! Error text shared by every layer.

/// The error and its sources joined with `: ` (for status lines and `detail` texts; `main`
/// prints the whole chain of an `anyhow` error the same way).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
