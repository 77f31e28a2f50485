//! xtask as a library: the real-component harness shared by integration tests and benchmarks.
pub mod cgroup;
pub mod components;
pub mod image;
pub mod netcluster;
pub mod pod;
