//! The `http` protocol, first slice: the request-level building blocks that the HTTP data
//! path is assembled from, each one job and unit-tested against hostile input.
//!
//! * [`normalize`]: the canonical request path rules are matched against (and that is
//!   forwarded upstream), refusing ambiguous encodings;
//! * [`policy`]: access level per method and the first-match `[[resource.rule]]` list;
//! * [`inject`]: per-level credentials from root-owned 0600 files, re-read on change;
//! * [`scrub`]: overwriting the injected secret in upstream headers and streamed bodies;
//! * [`refuse`]: refusals as 400/403 JSON responses naming the rule and the command to run.
//!
//! Not yet here (issue 16): the `Protocol` impl and its `PROTOCOLS` line (the hyper
//! server/client data path, TLS toward client and upstream, holds and recording), so an
//! `http` resource cannot be configured yet.

pub mod inject;
pub mod normalize;
pub mod policy;
pub mod refuse;
pub mod scrub;
