//! The control plane: a Unix socket speaking line-delimited JSON, used by the `jitgate` CLI.
pub mod api;
pub mod client;
pub mod peer;
pub mod server;
