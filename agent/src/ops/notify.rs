//! Talks to systemd (`Type=notify`): READY once the gate is attached and the proxy listens,
//! RELOADING/READY around a reload, STOPPING on the way out, and watchdog pings that are only
//! sent while the health checks pass, so systemd restarts an agent that is wedged rather than
//! one that merely runs.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call does nothing.

use std::{sync::Arc, time::Duration};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Vitals, health};

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "telling systemd our state failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining sessions"),
    ]);
}

/// Pings the watchdog at half its interval while healthy. When a check fails the ping is
/// withheld and STATUS says why; systemd then restarts the agent, which re-pins what was lost.
/// A store that cannot write is the exception: the agent keeps the gate closed on purpose,
/// and a restart would not mend the disk.
pub fn spawn_watchdog(agent: Arc<dyn Vitals>, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let report = health::check_all(agent.as_ref()).await;
            if report.ok {
                if failing {
                    send(&[NotifyState::Status("healthy")]);
                    failing = false;
                }
                send(&[NotifyState::Watchdog]);
            } else if !report.restart_may_mend() {
                // The gate is closed on purpose (a store that cannot write): the agent
                // works; a restart would only drop what it holds.
                let problems = report.problems();
                send(&[
                    NotifyState::Status(&format!("gate closed: {problems}")),
                    NotifyState::Watchdog,
                ]);
                failing = true;
            } else {
                let problems = report.problems();
                warn!(problems = %problems, "unhealthy: withholding the watchdog ping");
                send(&[NotifyState::Status(&format!("unhealthy: {problems}"))]);
                failing = true;
            }
        }
    });
}
