//! Opening connections to the shared store: where (`url`), as whom (the password read from
//! its own file), over what (verified TLS, or plain TCP when the operator said so).
//!
//! The url may name several servers (`postgresql://u@db1:5432,db2:5432/jitgate`, libpq's
//! form): they are tried in order, each verified against its own name with TLS, and only a
//! primary is taken. The agent asks for `target_session_attrs=read-write` whatever the url
//! says (the config refuses any other value), and checks `pg_is_in_recovery()` on every
//! connection besides: a standby reached before, during or after a failover is passed over,
//! never written to or trusted as the fleet's state. Every connection also raises a
//! `synchronous_commit` of `off` or `local` to `on`, so a decision is acknowledged only
//! once it is as durable as the server is set up to make it ([`Durability`]).

use std::{path::PathBuf, time::Duration};

use futures_util::future::poll_fn;
use tokio::sync::mpsc;
use tokio_postgres::{
    AsyncMessage, Client, Config, NoTls,
    config::{SslMode, TargetSessionAttrs},
};
use tracing::{debug, warn};

use super::tls::MakeRustls;
use crate::store::{Result, StoreError, health::Durability};

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
    /// `change_log_retention`: how long rows of the change log (`changes`) are kept before
    /// the fleet's pruner deletes them. A host whose last read change is older than the
    /// oldest kept reloads its live grants and waiting requests from their tables instead
    /// (see `changes.rs`).
    pub change_log_retention: Duration,
    /// `require_sync_standby`: no new grant is issued while the store has no synchronous
    /// standby streaming (`pg_stat_replication`), so every grant survives a failover.
    pub require_sync_standby: bool,
}

/// How long change-log rows are kept unless `change_log_retention` says otherwise: longer
/// than any outage a host is expected to ride out and catch up on row by row.
pub const DEFAULT_CHANGE_LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

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
        // Only ever the primary (the config refuses a url asking for anything else).
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
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
        Ok(self.connect_primary(notifications).await?.0)
    }

    /// [`Connector::connect`], and how the primary it reached keeps acknowledged commits.
    /// Fails if the server is a standby.
    pub async fn connect_primary(
        &self,
        notifications: Option<mpsc::Sender<()>>,
    ) -> Result<(Client, Durability)> {
        let client = self.open(notifications).await?;
        let durability = primary_session(&client).await?;
        Ok((client, durability))
    }

    async fn open(&self, notifications: Option<mpsc::Sender<()>>) -> Result<Client> {
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

/// Checks that `client` is on a primary and makes its commits wait for durability: one
/// round trip. A standby is refused (`target_session_attrs=read-write` should already have
/// passed it over; this holds even should that check ever change or be fooled).
async fn primary_session(client: &Client) -> Result<Durability> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    CASE WHEN current_setting('synchronous_commit') IN ('off', 'local') \
                         THEN set_config('synchronous_commit', 'on', false) \
                         ELSE current_setting('synchronous_commit') END, \
                    current_setting('synchronous_standby_names'), \
                    COALESCE(host(inet_server_addr()) || ':' || inet_server_port(), 'a local socket')",
            &[],
        )
        .await?;
    let durability = Durability {
        server: row.try_get(3)?,
        synchronous_commit: row.try_get(1)?,
        synchronous_standby_names: row.try_get(2)?,
    };
    if row.try_get::<_, bool>(0)? {
        return Err(StoreError::Unavailable(format!(
            "the server at {} is a standby (in recovery): this host only writes to the primary; waiting for one of the servers in [store] url to be promoted",
            durability.server
        )));
    }
    Ok(durability)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: &str) -> PostgresOptions {
        PostgresOptions {
            url: url.into(),
            password_file: None,
            ca_file: None,
            pool_size: 1,
            host_id: "h".into(),
            lease: Duration::from_secs(30),
            spool_limit: 1 << 20,
            change_log_retention: crate::store::postgres::DEFAULT_CHANGE_LOG_RETENTION,
            require_sync_standby: false,
        }
    }

    #[test]
    fn every_server_of_the_url_is_tried_and_only_a_primary_is_taken() {
        let c = Connector::new(&options("postgresql://jg@db1:5432,db2:5433/j")).unwrap();
        assert_eq!(c.config.get_hosts().len(), 2);
        assert_eq!(c.config.get_ports(), [5432, 5433]);
        assert_eq!(
            c.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite,
            "read-write is asked for even when the url does not say so"
        );
    }

    /// Hostile: a database (or role) whose default lets commits return before they are
    /// flushed. The agent's own sessions wait anyway, and say how durable the server is.
    #[tokio::test]
    async fn a_lax_synchronous_commit_is_raised_on_the_agents_sessions() {
        let Some(pg) = super::super::testdb::TestDb::start() else {
            return;
        };
        let db = pg.database("laxcommit");
        for lax in ["off", "local"] {
            pg.admin(
                "postgres",
                &format!("ALTER DATABASE {db} SET synchronous_commit = {lax}"),
            );
            let c = Connector::new(&pg.options(&db, "h")).unwrap();
            let (client, durability) = c.connect_primary(None).await.unwrap();
            let now: String = client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(now, "on", "{lax}");
            assert_eq!(durability.synchronous_commit, "on");
            assert!(
                !durability.survives_failover(),
                "no synchronous standby here: {durability:?}"
            );
            assert!(
                durability.server.starts_with("127.0.0.1:"),
                "{durability:?}"
            );
        }
        // A stricter setting is kept as it is.
        pg.admin(
            "postgres",
            &format!("ALTER DATABASE {db} SET synchronous_commit = remote_apply"),
        );
        let c = Connector::new(&pg.options(&db, "h")).unwrap();
        let (_client, durability) = c.connect_primary(None).await.unwrap();
        assert_eq!(durability.synchronous_commit, "remote_apply");
    }
}
