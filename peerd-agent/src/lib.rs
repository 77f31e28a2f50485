//! peerd agent: a peer-to-peer content cache for Kubernetes nodes.
//!
//! Data flows one way: request -> mirror -> store (hit) | transfer (peer) | upstream (miss).
//! See ARCHITECTURE.md.

pub mod admin;
pub mod bpf;
pub mod cluster;
pub mod config;
pub mod containerd;
pub mod flight;
pub mod gossip;
pub mod httpd;
pub mod identity;
pub mod intercept;
pub mod metrics;
pub mod mirror;
pub mod peers;
mod ratelimit;
pub mod redirect;
pub mod store;
pub mod transfer;
pub mod upstream;
