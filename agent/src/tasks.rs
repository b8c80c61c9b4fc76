//! `jitgate run` tasks: a cgroup per task under `<gate root>/<identity>/`, the launching
//! process moved into it, and a watch on `cgroup.events` that ends the task (revoking its
//! grants and removing the cgroup) when the last process in it exits.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Access, SharedConfig},
    gate::cgroup,
    grants::{EngineError, GrantEngine, RequestSpec},
    identity::{Attribution, Caller, Workloads},
    ids,
    model::{Request, Task, Timestamp},
    store::SharedStore,
};

/// A grant asked for on the `jitgate run` command line.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GrantSpec {
    pub resource: String,
    pub access: Option<Access>,
    #[serde(default, with = "opt_secs")]
    pub ttl: Option<Duration>,
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// What the CLI asks for.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    pub identity: String,
    pub run_as_uid: u32,
    pub allow_root: bool,
    pub grants: Vec<GrantSpec>,
    pub reason: String,
    pub command: Vec<String>,
}

/// What the CLI gets back: the task, and the request filed for each `--grant`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Started {
    pub task: Task,
    pub requests: Vec<Request>,
    /// The host-local CA certificate, for PostgreSQL clients that verify the gate's TLS.
    #[serde(default)]
    pub ca_cert: Option<String>,
}

#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    store: SharedStore,
    engine: GrantEngine,
    workloads: Workloads,
    config: SharedConfig,
    mount: PathBuf,
    watch_tx: mpsc::UnboundedSender<(String, PathBuf)>,
    running: Mutex<HashMap<String, (PathBuf, u64)>>,
}

impl Tasks {
    /// Starts the cgroup watcher and resumes (or ends) tasks recorded as running.
    pub async fn start(
        store: SharedStore,
        engine: GrantEngine,
        workloads: Workloads,
        config: SharedConfig,
        mount: PathBuf,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
        let tasks = Self {
            inner: Arc::new(Inner {
                store,
                engine,
                workloads,
                config,
                mount,
                watch_tx,
                running: Mutex::new(HashMap::new()),
            }),
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        tokio::spawn(watch_loop(inotify, watch_rx, ended_tx, shutdown.clone()));
        let ender = tasks.clone();
        tokio::spawn(async move {
            while let Some(task) = ended_rx.recv().await {
                ender.end(&task).await;
            }
        });

        let recorded = match tasks.inner.store.running_tasks().await {
            Ok(recorded) => recorded,
            // A shared store not reached yet: a previous run's tasks are not resumed (their
            // task-bound grants are not loaded either until the store is reached).
            Err(crate::store::StoreError::Unavailable(why)) => {
                warn!(error = %why, "not resuming earlier tasks: the shared state store is not reached yet");
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        for task in recorded {
            let path = tasks.inner.mount.join(&task.cgroup);
            if cgroup::is_populated(&path).unwrap_or(false) {
                let id = cgroup::cgroup_id(&path).unwrap_or_default();
                tasks.track(&task.id, &task.identity, path, id);
                info!(task = %task.id, identity = %task.identity, "resumed watching task");
            } else {
                tasks.end(&task.id).await;
            }
        }
        Ok(tasks)
    }

    fn track(&self, task: &str, identity: &str, path: PathBuf, cgroup_id: u64) {
        self.inner.workloads.remember(
            cgroup_id,
            Attribution {
                identity: identity.to_owned(),
                task: Some(task.to_owned()),
            },
        );
        self.inner
            .running
            .lock()
            .expect("tasks lock")
            .insert(task.to_owned(), (path.clone(), cgroup_id));
        let _ = self.inner.watch_tx.send((task.to_owned(), path));
    }

    /// Creates a task for `caller`, moves the caller into its cgroup and files its grants.
    /// That `caller` may launch `spec` is the control service's decision (`control::authz`),
    /// made before this is called.
    pub async fn run(&self, caller: &Caller, spec: RunSpec) -> Result<Started, EngineError> {
        let config = self.inner.config.get();
        let task_id = ids::new(ids::Kind::Task);
        let rel = format!(
            "{}/{}/{}",
            config.daemon.gate_cgroup, spec.identity, task_id
        );
        let path = self.inner.mount.join(&rel);
        let setup = (|| {
            cgroup::ensure_dir(&path)?;
            let id = cgroup::cgroup_id(&path)?;
            cgroup::move_pid(&path, caller.pid)?;
            anyhow::Ok(id)
        })();
        let cgroup_id = match setup {
            Ok(id) => id,
            Err(e) => {
                let _ = cgroup::remove(&path, false);
                return Err(EngineError::Invalid(format!(
                    "could not set up the task cgroup: {e:#}"
                )));
            }
        };
        let task = Task {
            id: task_id.clone(),
            identity: spec.identity.clone(),
            cgroup: rel,
            launched_by: caller.actor(),
            run_as_uid: spec.run_as_uid,
            command: shell_words(&spec.command),
            reason: spec.reason.clone(),
            started_at: Timestamp::now(),
            ended_at: None,
        };
        let label = format!("user {}", caller.user);
        self.inner.store.start_task(task.clone(), label).await?;
        self.track(&task_id, &spec.identity, path, cgroup_id);
        info!(task = %task_id, identity = %spec.identity, launcher = %caller.user, "task started");

        let mut requests = Vec::new();
        for g in spec.grants {
            let request = self
                .inner
                .engine
                .file(
                    caller.actor(),
                    &spec.identity,
                    Some(&task_id),
                    RequestSpec {
                        resource: g.resource,
                        access: g.access,
                        ttl: g.ttl,
                        reason: spec.reason.clone(),
                        for_identity: Some(spec.identity.clone()),
                        task: Some(task_id.clone()),
                        hosts: None,
                    },
                )
                .await?;
            requests.push(request);
        }
        Ok(Started {
            task,
            requests,
            ca_cert: Some(config.daemon.ca_cert.display().to_string()),
        })
    }

    /// Ends a task: its grants are revoked, its cgroup removed.
    async fn end(&self, task: &str) {
        let entry = self.inner.running.lock().expect("tasks lock").remove(task);
        if let Err(e) = self.inner.engine.task_ended(task).await {
            warn!(task, error = %e, "could not end the task's grants");
        }
        let result = self.inner.store.end_task(task.to_owned()).await;
        if let Err(e) = result {
            warn!(task, error = %e, "could not record the end of the task");
        }
        if let Some((path, id)) = entry {
            self.inner.workloads.forget(id);
            if let Err(e) = cgroup::remove(&path, false) {
                warn!(task, error = %e, "could not remove the task cgroup");
            }
        }
        info!(task, "task ended");
    }
}

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `Inotify` as tokio's `AsyncFd` wants it.
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Watches `cgroup.events` of every running task and reports tasks whose cgroup emptied.
async fn watch_loop(
    inotify: Inotify,
    mut add: mpsc::UnboundedReceiver<(String, PathBuf)>,
    ended: mpsc::UnboundedSender<String>,
    shutdown: CancellationToken,
) {
    // SAFETY: the inotify descriptor is owned by `inotify`, which outlives this AsyncFd (it is
    // moved into it) and is never replaced.
    let fd = match unsafe {
        AsyncFd::register_with_interest(InotifyFd(inotify), tokio::io::Interest::READABLE)
    } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot watch task cgroups; tasks will end only on restart");
            return;
        }
    };
    let mut watched: HashMap<WatchDescriptor, (String, PathBuf)> = HashMap::new();
    let check = |task: &str, path: &PathBuf, ended: &mpsc::UnboundedSender<String>| {
        if !cgroup::is_populated(path).unwrap_or(false) {
            let _ = ended.send(task.to_owned());
            true
        } else {
            false
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some((task, path)) = add.recv() => {
                match fd.get_ref().0.add_watch(&path.join("cgroup.events"), AddWatchFlags::IN_MODIFY) {
                    Ok(wd) => {
                        if !check(&task, &path, &ended) {
                            watched.insert(wd, (task, path));
                        } else {
                            let _ = fd.get_ref().0.rm_watch(wd);
                        }
                    }
                    Err(e) => {
                        warn!(task, error = %e, "cannot watch the task cgroup; ending the task");
                        let _ = ended.send(task);
                    }
                }
            }
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { break };
                match guard.get_inner().0.read_events() {
                    Ok(events) => {
                        for event in events {
                            if let Some((task, path)) = watched.get(&event.wd)
                                && check(task, path, &ended) {
                                    let wd = event.wd;
                                    watched.remove(&wd);
                                    let _ = fd.get_ref().0.rm_watch(wd);
                                }
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                    Err(e) => {
                        warn!(error = %e, fd = fd.get_ref().as_raw_fd(), "reading cgroup events failed");
                        guard.clear_ready();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_for_the_record() {
        let words = ["sh", "-c", "echo 'hi there'", "x=1"].map(String::from);
        assert_eq!(shell_words(&words), r"sh -c 'echo '\''hi there'\''' x=1");
    }
}
