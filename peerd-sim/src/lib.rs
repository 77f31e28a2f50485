//! Simulators of peerd's cluster protocols, in one process, on a simulated clock: the cold-start
//! swarm (`swarm`, the agent's own `swarm::Download` and `handout`, links only) and gossip at
//! 1,000+ members (`gossip`, the agent's own `Gossip` over chitchat's in-memory transport on
//! tokio's paused clock). They run the agent's code, not copies of it, and live here so the
//! agent's build carries neither them nor the test clock they need.
pub mod gossip;
pub mod swarm;
