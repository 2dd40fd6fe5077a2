//! In-memory provider for engine tests: machines live in a map, no VMs.
