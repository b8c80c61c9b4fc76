//! Content inspection shared by every protocol: the detectors and strategies that mask
//! sensitive values ([`mask`], [`rules`]), name globs ([`glob`]), and the host-local CA that
//! terminates client TLS and the upstream TLS configurations ([`tls`]).
//!
//! Nothing here knows a wire protocol: a protocol module decides *where* values are (rows,
//! COPY data, error fields, HTTP bodies) and hands them to a [`mask::Masker`].

pub mod glob;
pub mod mask;
pub mod rules;
pub mod tls;
