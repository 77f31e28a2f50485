//! Simulators of peerd's cluster protocols, in one process, on a simulated clock: the cold-start
//! swarm (`swarm`, the agent's own `swarm::Download` and `handout`, links only). They run the
//! agent's sans-IO machines, not copies of them, and live here so the agent's build carries
//! neither them nor the test clock they need.
pub mod swarm;
