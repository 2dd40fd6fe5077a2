//! Builds and describes clusterctl's container-optimized node images.
