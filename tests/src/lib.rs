//! Helpers for the end-to-end tests that drive the built `clusterctl` binary.
