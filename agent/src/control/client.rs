//! The CLI's side of the control socket: blocking, one call per line.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use super::api::{ApiError, Call, ErrorCode, MAX_LINE, Reply};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach jitgated at {path}: {source}. Is the daemon running (jitgated --config ...)? Use --socket or JITGATE_SOCKET for another daemon"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not permitted to use jitgated's socket {path}: {access}. Join the daemon's socket_group (an administrator runs `usermod -aG <group> <user>`; then log in again)"
    )]
    NotPermitted { path: PathBuf, access: String },
    #[error("talking to jitgated: {0}")]
    Io(#[from] std::io::Error),
    #[error("jitgated sent an unreadable reply: {0}")]
    Protocol(String),
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Who may use the socket, for the refusal: its group by name (the daemon's `socket_group`).
fn socket_access(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(path) {
        Ok(meta) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
            .ok()
            .flatten()
            .map_or_else(
                || format!("it is open to gid {}", meta.gid()),
                |g| format!("it is open to group {}", g.name),
            ),
        Err(_) => "its directory is closed to you".to_owned(),
    }
}

pub struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::NotPermitted {
                    path: path.to_owned(),
                    access: socket_access(path),
                }
            } else {
                ClientError::Connect {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `call` and returns the reply's data, or the daemon's error.
    pub fn call(&mut self, call: &Call) -> Result<serde_json::Value, ClientError> {
        let mut line =
            serde_json::to_vec(call).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.get_mut().write_all(&line)?;
        let mut reply = String::new();
        let n = (&mut self.stream)
            .take(MAX_LINE as u64 * 64)
            .read_line(&mut reply)?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        let reply: Reply =
            serde_json::from_str(&reply).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if reply.ok {
            Ok(reply.data.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ClientError::Api(reply.error.unwrap_or(ApiError {
                code: ErrorCode::Internal,
                message: "the daemon reported an error without saying which".into(),
            })))
        }
    }

    /// Like [`Self::call`], decoding the data as `T`.
    pub fn call_as<T: serde::de::DeserializeOwned>(
        &mut self,
        call: &Call,
    ) -> Result<T, ClientError> {
        let value = self.call(call)?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// The raw descriptor, so `jitgate run` can close it before exec.
    pub fn into_inner(self) -> UnixStream {
        self.stream.into_inner()
    }
}
