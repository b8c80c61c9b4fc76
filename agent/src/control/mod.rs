//! The control plane: [`service`] is the control API (typed calls, their authorization in
//! [`authz`]); [`server`] is its front end on a Unix socket speaking line-delimited JSON, used
//! by the `jitgate` CLI ([`client`]); [`tokens`] are the console API's bearer tokens.
pub mod api;
pub mod authz;
pub mod client;
pub mod peer;
pub mod recording;
pub mod server;
pub mod service;
pub mod tokens;
