//! Opening connections to the shared store: where (`url`), as whom (the password read from
//! its own file), over what (verified TLS, or plain TCP when the operator said so).

use std::{path::PathBuf, time::Duration};

use futures_util::future::poll_fn;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, config::SslMode};
use tracing::{debug, warn};

use super::tls::MakeRustls;
use crate::store::{Result, StoreError};

/// How long a connection attempt may take before the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection settings of `[store]`, as validated by the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// `postgresql://user@host:port/dbname` (no password in it).
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// With a CA file, TLS is required and the server's certificate verified against it and
    /// the host name in `url` (`verify-full`); without, the connection is plain TCP.
    pub ca_file: Option<PathBuf>,
    /// Connections kept for reads, besides the writer's and the listener's.
    pub pool_size: usize,
    /// This host's name in the shared store (its audit chain, its sessions and tasks).
    pub host_id: String,
    /// `store_lease`: how long, cut off from the store, this host trusts the grants it last
    /// confirmed with it (sessions on them end after that).
    pub lease: Duration,
    /// `spool_limit`: bytes of records the local spool keeps while the store is out of reach
    /// (new sessions are refused past it; a quarter more is kept for live sessions' tails).
    pub spool_limit: u64,
}

/// Makes connections with one set of options.
#[derive(Clone)]
pub struct Connector {
    config: Config,
    tls: Option<MakeRustls>,
    /// Read again on every connection, so a password fixed (or rotated) in the file is used
    /// without restarting the agent.
    password_file: Option<PathBuf>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

impl Connector {
    pub fn new(options: &PostgresOptions) -> anyhow::Result<Self> {
        let mut config: Config = options
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("[store] url: {e}"))?;
        if config.get_password().is_some() {
            anyhow::bail!(
                "[store] url carries a password: move it to the file named by password_file"
            );
        }
        if let Some(path) = &options.password_file {
            // The one rule for secret files: root's (or the agent's), readable by no one else.
            let password = crate::secret_file::read(path)
                .map_err(|e| anyhow::anyhow!("[store] password_file {e}"))?;
            config.password(password);
        }
        config.application_name("jitgated");
        config.connect_timeout(CONNECT_TIMEOUT);
        let tls = match &options.ca_file {
            Some(ca) => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustls::from_ca_file(ca)?)
            }
            None => {
                config.ssl_mode(SslMode::Disable);
                None
            }
        };
        Ok(Self {
            config,
            tls,
            password_file: options.password_file.clone(),
        })
    }

    /// Opens a connection; its driver runs on a task of its own. With `notifications`, each
    /// `NOTIFY` the server sends on it is passed on (its payload is not trusted: it only
    /// says "look").
    pub async fn connect(&self, notifications: Option<mpsc::Sender<()>>) -> Result<Client> {
        let mut config = self.config.clone();
        if let Some(path) = &self.password_file {
            let password = crate::secret_file::read(path)
                .map_err(|e| StoreError::Unavailable(format!("[store] password_file {e}")))?;
            config.password(password);
        }
        if notifications.is_some() {
            // Named apart, so an operator (or a test) can find the listener in pg_stat_activity.
            config.application_name("jitgated listener");
        }
        let connected = match &self.tls {
            Some(tls) => {
                let (client, conn) = config.connect(tls.clone()).await?;
                tokio::spawn(drive(conn, notifications));
                client
            }
            None => {
                let (client, conn) = config.connect(NoTls).await?;
                tokio::spawn(drive(conn, notifications));
                client
            }
        };
        Ok(connected)
    }
}

async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notifications: Option<mpsc::Sender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(_))) => {
                if let Some(tx) = &notifications {
                    // A full channel already holds a wake-up: this one adds nothing.
                    let _ = tx.try_send(());
                }
            }
            Some(Ok(AsyncMessage::Notice(n))) => debug!(notice = %n.message(), "store notice"),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "shared store connection lost");
                return;
            }
            None => return,
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}
