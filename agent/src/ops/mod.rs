//! Running the host agent as a service: metrics and the health endpoint, systemd
//! readiness and watchdog, and where logs go.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
