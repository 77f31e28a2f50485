//! TLS interception for transparent mode (opt-in `--tls-intercept`): the cluster's intercept CA,
//! certificates minted per registry name, and reading the SNI of a ClientHello.
//! (Being written; see the helper's task.)
