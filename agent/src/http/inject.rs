//! Credential injection: the gate, not the workload, holds the upstream's credential.
//!
//! Per access level a resource names a header (default `authorization`), a scheme (`bearer`,
//! `basic` or none) and a `secret_file`. For each request the client's own values of that
//! header are removed and the credential for the grant's level is set. The secret is re-read
//! when the file changes (an mtime/size/inode check, at most once a second: a `stat` per
//! request was a measurable part of the gate's cost per request), so rotating it needs no
//! reload and takes effect within a second; its ownership and mode are re-checked on each
//! re-read (fail closed: a file others can read or rewrite is refused, as for postgres
//! password files), on the file actually opened.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::secret_file::{self, SecretFileError};

/// How the secret is presented in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Bearer <secret>`.
    Bearer,
    /// `Basic base64(<secret>)`; the file holds `user:password`.
    Basic,
    /// The secret as is (API-key headers).
    Raw,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bearer" => Self::Bearer,
            "basic" => Self::Basic,
            "none" | "" => Self::Raw,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(transparent)]
    File(#[from] SecretFileError),
    #[error("`{path}` does not make a valid header value")]
    NotAHeaderValue { path: String },
}

/// The file identity that decides whether the cached value is still current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
    /// A `chmod` or `chown` changes neither content nor mtime: these make a loosened file
    /// be checked again (and refused).
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
}

/// How long a loaded secret is used before its file is looked at again.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// What was loaded, from which file version, and when that was last confirmed.
#[derive(Debug)]
struct Cached {
    stamp: Stamp,
    confirmed: Instant,
    loaded: Loaded,
}

/// One credential: where it goes and where its secret comes from.
#[derive(Debug)]
pub struct Credential {
    pub header: HeaderName,
    pub scheme: Scheme,
    pub secret_file: PathBuf,
    recheck_every: Duration,
    cache: Mutex<Option<Cached>>,
}

/// A loaded secret: the header value and the raw secret bytes (for scrubbing responses).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub value: HeaderValue,
    /// What to scrub from responses: the secret itself (an echo of the header value contains it).
    pub secret: Vec<u8>,
}

impl Credential {
    pub fn new(header: HeaderName, scheme: Scheme, secret_file: PathBuf) -> Self {
        Self {
            header,
            scheme,
            secret_file,
            recheck_every: RECHECK_EVERY,
            cache: Mutex::new(None),
        }
    }

    /// The current value, re-read when the file changed.
    pub fn load(&self) -> Result<Loaded, SecretError> {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cache.as_ref()
            && now.duration_since(c.confirmed) < self.recheck_every
        {
            return Ok(c.loaded.clone());
        }
        let path = self.secret_file.as_path();
        let meta = std::fs::metadata(path).map_err(|e| unreadable(path, &e.to_string()))?;
        let stamp = Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
            uid: meta.uid(),
        };
        if let Some(c) = cache.as_mut()
            && c.stamp == stamp
        {
            c.confirmed = now;
            return Ok(c.loaded.clone());
        }
        // Checked on the file opened, not on the stat above (which only says whether to look).
        let secret = secret_file::read(path)?;
        let value = match self.scheme {
            Scheme::Bearer => format!("Bearer {secret}"),
            Scheme::Basic => format!("Basic {}", data_encoding::BASE64.encode(secret.as_bytes())),
            Scheme::Raw => secret.clone(),
        };
        let mut value =
            HeaderValue::from_str(&value).map_err(|_| SecretError::NotAHeaderValue {
                path: path.display().to_string(),
            })?;
        value.set_sensitive(true);
        // For basic, the echo an upstream could produce is the encoded form: scrub that.
        let scrub = match self.scheme {
            Scheme::Basic => value.as_bytes()["Basic ".len()..].to_vec(),
            _ => secret.into_bytes(),
        };
        let loaded = Loaded {
            value,
            secret: scrub,
        };
        *cache = Some(Cached {
            stamp,
            confirmed: now,
            loaded: loaded.clone(),
        });
        Ok(loaded)
    }

    /// Replaces every client value of the header with the credential.
    pub fn apply(&self, headers: &mut HeaderMap, loaded: &Loaded) {
        headers.remove(&self.header);
        headers.insert(self.header.clone(), loaded.value.clone());
    }
}

fn unreadable(path: &Path, reason: &str) -> SecretError {
    SecretError::File(SecretFileError::Unreadable {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn replaces_client_header_and_rereads_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        write(&file, "tok-1\n", 0o600);
        let cred = Credential::new(
            HeaderName::from_static("authorization"),
            Scheme::Bearer,
            file.clone(),
        );
        let mut h = HeaderMap::new();
        h.append(
            "authorization",
            HeaderValue::from_static("Bearer client-own"),
        );
        h.append("authorization", HeaderValue::from_static("Basic other"));
        let l = cred.load().unwrap();
        cred.apply(&mut h, &l);
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer tok-1");
        assert_eq!(l.secret, b"tok-1");

        write(&file, "tok-rotated-2\n", 0o600);
        // Within the second the cached value serves (no stat per request) ...
        assert_eq!(cred.load().unwrap().value, "Bearer tok-1");
        // ... then the rotation is seen.
        std::thread::sleep(RECHECK_EVERY);
        assert_eq!(cred.load().unwrap().value, "Bearer tok-rotated-2");
    }

    #[test]
    fn basic_encodes_and_scrubs_the_encoded_form() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("basic");
        write(&file, "user:pass", 0o600);
        let cred = Credential::new(
            HeaderName::from_static("authorization"),
            Scheme::Basic,
            file,
        );
        let l = cred.load().unwrap();
        assert_eq!(l.value, "Basic dXNlcjpwYXNz");
        assert_eq!(l.secret, b"dXNlcjpwYXNz");
    }

    #[test]
    fn refuses_files_others_can_read_even_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        write(&file, "a", 0o644);
        let mut cred = Credential::new(
            HeaderName::from_static("x-api-key"),
            Scheme::Raw,
            file.clone(),
        );
        cred.recheck_every = Duration::ZERO;
        assert!(matches!(
            cred.load(),
            Err(SecretError::File(SecretFileError::Mode { .. }))
        ));
        write(&file, "a", 0o600);
        assert!(cred.load().is_ok());
        write(&file, "bb", 0o640);
        assert!(
            matches!(
                cred.load(),
                Err(SecretError::File(SecretFileError::Mode { .. }))
            ),
            "a changed file is re-checked"
        );
        // Loosened by chmod alone (same content, same mtime): noticed too.
        write(&file, "cc", 0o600);
        assert!(cred.load().is_ok());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            matches!(
                cred.load(),
                Err(SecretError::File(SecretFileError::Mode { .. }))
            ),
            "a chmod is noticed"
        );
    }

    #[test]
    fn a_secret_with_a_newline_inside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        write(&file, "a\r\nX-Evil: 1", 0o600);
        let cred = Credential::new(
            HeaderName::from_static("authorization"),
            Scheme::Bearer,
            file,
        );
        assert!(matches!(
            cred.load(),
            Err(SecretError::NotAHeaderValue { .. })
        ));
    }
}
