//! Peer transfer: QUIC (quinn) with mutual TLS from the cluster secret, the piece protocol, and
//! the swarm scheduler.
pub mod swarm;
pub mod tls;
pub mod wire;
