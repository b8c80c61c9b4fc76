//! Is this host agent doing its job? One answer for the health endpoint and the systemd
//! watchdog, so a probe and systemd never disagree.
//!
//! Healthy means: the gate's links are still pinned (so the gate stays closed if we die),
//! the state store answers (grants can be checked and sessions recorded), and the runtime
//! runs tasks (this check itself is one).

use std::time::Duration;

use serde::Serialize;

use super::Vitals;

/// How long the store may take to answer before the agent counts as unhealthy.
const STORE_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What is wrong, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
    /// Pending requests, read by the same store round trip (metrics reuse it).
    #[serde(skip)]
    pub pending_requests: Option<usize>,
}

/// The check that the store keeps what it is given. It failing closes the gate on purpose
/// (a full disk): the agent is doing its job, and a restart would not mend it.
const STORE_WRITES: &str = "store_writes";

impl Report {
    /// Whether a failing check is one a restart of the agent may mend (the watchdog then
    /// lets systemd restart it); a store that cannot write is not.
    pub fn restart_may_mend(&self) -> bool {
        // While writes fail, a read answered with the failed batch's error fails the store
        // check too: the same cause.
        let writes_failing = self.checks.iter().any(|c| !c.ok && c.name == STORE_WRITES);
        self.checks
            .iter()
            .any(|c| !c.ok && c.name != STORE_WRITES && !(writes_failing && c.name == "store"))
    }

    /// One line saying what failed, for the watchdog's STATUS and the log.
    pub fn problems(&self) -> String {
        self.checks
            .iter()
            .filter_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.name)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn check(name: &'static str, result: Result<(), String>) -> Check {
    Check {
        name,
        ok: result.is_ok(),
        problem: result.err(),
    }
}

pub async fn check_all(agent: &dyn Vitals) -> Report {
    let gate = agent.gate_pinned();
    let store = tokio::time::timeout(STORE_DEADLINE, agent.pending_requests()).await;
    let (store, pending) = match store {
        Ok(Ok(n)) => (Ok(()), Some(n)),
        Ok(Err(e)) => (Err(format!("the state store failed: {e}")), None),
        Err(_) => (
            Err(format!(
                "the state store did not answer within {}s",
                STORE_DEADLINE.as_secs()
            )),
            None,
        ),
    };
    let checks = vec![
        check("gate", gate),
        check("store", store),
        check(STORE_WRITES, agent.store_writes()),
    ];
    Report {
        ok: checks.iter().all(|c| c.ok),
        checks,
        pending_requests: pending,
    }
}
