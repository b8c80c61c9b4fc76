//! `jitgate run`: becomes a gated workload, then execs the command.
//!
//! The daemon creates the task cgroup and moves this very process into it (it knows our pid
//! from the socket, not from us); everything we exec afterwards, and every socket it opens,
//! is inside the gate. Before exec we make sure nothing from outside can be used to walk
//! around it: inherited internet sockets are refused, other inherited descriptors are closed.

use std::{ffi::CString, os::fd::RawFd, process::ExitCode, time::Duration};

use clap::Args;
use nix::unistd::{Uid, User};

use super::{Cli, EXIT_ERROR, EXIT_FORBIDDEN, describe_request};
use crate::{
    config::Access,
    control::{api::Call, client::ClientError},
    model::{Request, RequestStatus},
    tasks::{GrantSpec, RunSpec, Started},
};

#[derive(Args)]
pub struct RunArgs {
    /// The workload identity to run as.
    #[arg(long = "as", value_name = "IDENTITY")]
    identity: String,
    /// Run the command as this unix user (needs root).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Ask for a grant for this task: RESOURCE[:ACCESS[:TTL]], e.g. orders-db:read:30m.
    #[arg(long = "grant", value_name = "RESOURCE[:ACCESS[:TTL]]", value_parser = parse_grant)]
    grants: Vec<GrantSpec>,
    /// Why (recorded with the task and its requests).
    #[arg(long, default_value = "")]
    reason: String,
    /// Allow the workload to run as root. Root can leave its cgroup, so this weakens the gate.
    #[arg(long)]
    allow_root: bool,
    /// How long to wait for approvals before giving up.
    #[arg(long, value_parser = super::parse_duration, default_value = "15m")]
    wait_timeout: Duration,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_grant(s: &str) -> Result<GrantSpec, String> {
    let mut parts = s.splitn(3, ':');
    let resource = parts
        .next()
        .filter(|r| !r.is_empty())
        .ok_or("empty resource name")?;
    let access = parts
        .next()
        .filter(|a| !a.is_empty())
        .map(str::parse::<Access>)
        .transpose()?;
    let ttl = parts.next().map(super::parse_duration).transpose()?;
    Ok(GrantSpec {
        resource: resource.to_owned(),
        access,
        ttl,
    })
}

/// An internet socket among the standard descriptors would have been created outside the
/// gate, and could be reconnected anywhere: refuse to start with one.
fn inet_socket_on(fd: RawFd) -> bool {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (empty) value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid output buffer and length; a non-socket fails with ENOTSOCK.
    let rc = unsafe { libc::getsockname(fd, std::ptr::from_mut(&mut storage).cast(), &mut len) };
    rc == 0 && matches!(i32::from(storage.ss_family), libc::AF_INET | libc::AF_INET6)
}

pub fn run(cli: &Cli, args: &RunArgs) -> Result<ExitCode, ClientError> {
    let me = nix::unistd::getuid();
    let target = match &args.user {
        Some(name) => match User::from_name(name).ok().flatten().or_else(|| {
            name.parse::<u32>()
                .ok()
                .and_then(|uid| User::from_uid(Uid::from_raw(uid)).ok().flatten())
        }) {
            Some(u) => u,
            None => {
                eprintln!("jitgate: no such user `{name}`");
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        },
        None => match User::from_uid(me).ok().flatten() {
            Some(u) => u,
            None => {
                eprintln!("jitgate: the current uid {me} has no passwd entry; pass --user");
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        },
    };
    if target.uid != me && !me.is_root() {
        eprintln!("jitgate: only root can run a workload as another user (--user)");
        return Ok(ExitCode::from(EXIT_FORBIDDEN));
    }
    for fd in 0..=2 {
        if inet_socket_on(fd) {
            eprintln!(
                "jitgate: descriptor {fd} is a network socket opened outside the gate; a workload could use it to bypass the gate. Redirect it (e.g. to a pipe or file) and try again"
            );
            return Ok(ExitCode::from(EXIT_FORBIDDEN));
        }
    }

    let mut client = cli.client()?;
    let started: Started = client.call_as(&Call::Run(RunSpec {
        identity: args.identity.clone(),
        run_as_uid: target.uid.as_raw(),
        allow_root: args.allow_root,
        grants: args.grants.clone(),
        reason: args.reason.clone(),
        command: args.command.clone(),
    }))?;
    eprintln!(
        "jitgate: task {} started as workload {}",
        started.task.id, started.task.identity
    );
    for request in started.requests {
        let request: Request = if request.status == RequestStatus::Pending {
            eprintln!(
                "jitgate: waiting for approval of {} ({} {} access to {}): an approver runs `jitgate approve {}`",
                request.id, request.identity, request.access, request.resource, request.id
            );
            client.call_as(&Call::Wait {
                request: request.id.clone(),
                timeout_secs: args.wait_timeout.as_secs(),
            })?
        } else {
            request
        };
        let (text, code) = describe_request(&request);
        eprintln!("jitgate: {text}");
        if code != 0 {
            return Ok(ExitCode::from(code));
        }
    }
    drop(client);

    // SAFETY: only setting variables before exec, in a single-threaded process.
    unsafe {
        std::env::set_var("JITGATE_TASK", &started.task.id);
        std::env::set_var("JITGATE_IDENTITY", &started.task.identity);
        // `jitgate request` inside the workload talks to the daemon that launched it.
        std::env::set_var("JITGATE_SOCKET", cli.socket());
        // PostgreSQL clients that verify TLS (sslmode=verify-full) trust the gate's CA.
        if let Some(ca) = &started.ca_cert {
            for (var, path) in trust_variables(std::path::Path::new(ca)) {
                let current = std::env::var_os(var);
                if replaces(current.as_deref()) {
                    std::env::set_var(var, path);
                } else if var == "KUBECONFIG" {
                    eprintln!(
                        "jitgate: KUBECONFIG is set to {}; gated Kubernetes clients need the cluster entries of {} (the host CA, no credential)",
                        current.unwrap_or_default().to_string_lossy(),
                        path.display()
                    );
                } else if var != "PGSSLROOTCERT" {
                    eprintln!(
                        "jitgate: {var} is set to {}, so gated https clients that read it will not trust the gate's certificates; add {} to that file or unset {var}",
                        current.unwrap_or_default().to_string_lossy(),
                        ca
                    );
                }
            }
        }
        if args.user.is_some() {
            std::env::set_var("HOME", &target.dir);
            std::env::set_var("USER", &target.name);
            std::env::set_var("LOGNAME", &target.name);
        }
    }
    // Nothing inherited beyond stdio crosses into the workload.
    // SAFETY: marks descriptors 3.. close-on-exec; no Rust object relies on them past exec.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };

    if target.uid != me
        && let Err(e) = drop_to(&target)
    {
        eprintln!("jitgate: switching to user {}: {e}", target.name);
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    let argv: Vec<CString> = match args
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect()
    {
        Ok(v) => v,
        Err(_) => {
            eprintln!("jitgate: the command contains a NUL byte");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let e = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
    eprintln!("jitgate: cannot run {}: {e}", args.command[0]);
    Ok(ExitCode::from(if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    }))
}

fn drop_to(user: &User) -> nix::Result<()> {
    let name = CString::new(user.name.as_bytes()).map_err(|_| nix::errno::Errno::EINVAL)?;
    nix::unistd::initgroups(&name, user.gid)?;
    nix::unistd::setgid(user.gid)?;
    nix::unistd::setuid(user.uid)?;
    // Paranoia: make sure we cannot get root back.
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() && !user.uid.is_root() {
        return Err(nix::errno::Errno::EPERM);
    }
    Ok(())
}

/// The variables that make unmodified clients trust the gate's certificates, and their
/// values: libpq the host CA; OpenSSL, curl, Python requests, git and Node the bundle of the
/// system's CAs plus the host CA (a superset of the system store those variables would
/// otherwise name).
fn trust_variables(ca: &std::path::Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let mut vars = vec![("PGSSLROOTCERT", ca.to_owned())];
    let bundle = crate::inspect::tls::bundle_path(ca);
    if bundle.is_file() {
        for var in [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "REQUESTS_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "NODE_EXTRA_CA_CERTS",
        ] {
            vars.push((var, bundle.clone()));
        }
    } else {
        vars.push(("NODE_EXTRA_CA_CERTS", ca.to_owned()));
    }
    let kubeconfig = crate::http::kubeconfig::path(ca);
    if kubeconfig.is_file() {
        vars.push(("KUBECONFIG", kubeconfig));
    }
    vars
}

/// Whether `jitgate run` sets a trust variable the caller's environment already has: yes when
/// it names the system store (the bundle contains all of it), no when it names anything
/// else (the caller chose that store: left alone, with a warning, since https resources will
/// then fail verification unless it holds the host CA).
fn replaces(current: Option<&std::ffi::OsStr>) -> bool {
    current.is_none_or(|v| {
        v.is_empty() || v == crate::http::config::SYSTEM_CA_BUNDLE || v == "/etc/ssl/certs"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_variables_replace_only_the_system_store() {
        assert!(replaces(None));
        assert!(replaces(Some(std::ffi::OsStr::new(
            "/etc/ssl/certs/ca-certificates.crt"
        ))));
        assert!(!replaces(Some(std::ffi::OsStr::new("/opt/corp/ca.pem"))));
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let vars = trust_variables(&ca);
        assert_eq!(vars.len(), 2, "no bundle: libpq and node get the host CA");
        std::fs::write(crate::inspect::tls::bundle_path(&ca), "x").unwrap();
        let vars = trust_variables(&ca);
        assert!(
            vars.iter()
                .any(|(v, p)| *v == "SSL_CERT_FILE" && p.ends_with("ca-bundle.pem"))
        );
        assert!(
            vars.iter()
                .any(|(v, p)| *v == "PGSSLROOTCERT" && p.ends_with("ca.pem"))
        );
    }

    #[test]
    fn grant_specs() {
        let g = parse_grant("orders-db").unwrap();
        assert_eq!(
            (g.resource.as_str(), g.access, g.ttl),
            ("orders-db", None, None)
        );
        let g = parse_grant("orders-db:write:30m").unwrap();
        assert_eq!(g.access, Some(Access::Write));
        assert_eq!(g.ttl, Some(Duration::from_secs(1800)));
        assert!(parse_grant(":read").is_err());
        assert!(parse_grant("db:root").is_err());
        assert!(parse_grant("db:read:soon").is_err());
    }
}
