//! jitgate's host agent (`jitgated`), its transparent proxy, and the `jitgate` CLI.
//!
//! The modules follow the data path (see `docs/ARCHITECTURE.md`):
//!
//! * [`gate`]: the kernel side seen from userspace: load, pin, adopt, rules, detach.
//! * [`destinations`]: keeps the kernel's destination rules in step with config, DNS, host.
//! * [`proxy`]: accepts redirected connections, one task per session, and relays.
//! * [`refusals`]: the kernel's refusal events, folded into audit records.
//! * [`grants`]: requests, policy, approvals, grants, expiry.
//! * [`tasks`]: `jitgate run` task cgroups and their lifetime.
//! * [`identity`]: users, groups, and which workload a cgroup is.
//! * [`store`]: the state store trait (SQLite and in-memory backends), the hash-chained audit log.
//! * [`control`]: the control service (typed calls, who may make them) and its Unix-socket
//!   front end, which the CLI speaks.
//! * [`console`]: the web console, a second front end of the control service (HTTPS,
//!   OpenID Connect sign-in, server-rendered pages).
//! * [`daemon`]: start-up order, reload, shutdown.
//! * [`ops`]: metrics and health endpoint, systemd readiness and watchdog, logging.
//! * [`webhooks`]: notifications of audit events to approvers' chat and scripts, signed.
//! * [`secret_file`]: the one rule for files that hold secrets.
//! * [`neutral`]: text a workload wrote, shown so that no hidden character disguises it.
//! * [`cli`]: the `jitgate` command.
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod destinations;
pub mod gate;
pub mod grants;
pub mod http;
pub mod identity;
pub mod ids;
pub mod inspect;
pub mod model;
pub mod neutral;
pub mod ops;
pub mod postgres;
pub mod protocol;
pub mod proxy;
pub mod refusals;
pub mod secret_file;
pub mod store;
pub mod tasks;
/// Whole sessions over in-memory pipes: the middle layer of tests, and the session fuzz target
/// (`fuzz/`, feature `fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod testing;
pub mod webhooks;
