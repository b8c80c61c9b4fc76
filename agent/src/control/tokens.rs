//! Bearer tokens of the console's HTTP API: minted, listed and revoked through the control
//! service (`jitgate token ...` over the Unix socket), and turned back into a [`Caller`] when a
//! script presents one to the API ([`ControlService::authenticate_token`]).
//!
//! A token acts as one unix user, with that user's rights as policy gives them at each use:
//! it carries no rights of its own, only limits (read-only, expiry). Its secret
//! (`jgt_<id>_<32 random bytes, base64url>`) is shown once; the store keeps its SHA-256 only.
//! A plain hash is enough for 256 random bits (no password to stretch), and comparing hashes
//! in constant time leaks nothing about the stored one. Who may issue, list and revoke is in
//! [`super::authz`], like every other rule.

use std::time::Duration;

use data_encoding::BASE64URL_NOPAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::info;

use super::{
    authz,
    service::{ControlError, ControlService, Result},
};
use crate::{
    identity::{Caller, TokenUse},
    model::{ApiToken, Timestamp},
};

/// What every secret starts with, so that scanners and people recognise a leaked one.
pub const PREFIX: &str = "jgt_";
/// How long a token lives unless `--ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest a token may live: expiry is mandatory and bounded.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;
/// Random bytes in a token id (hex in `tok_...`).
const ID_BYTES: usize = 6;
const MAX_NAME: usize = 64;
/// Tokens a listing returns at most.
const LIST_LIMIT: usize = 1000;

/// What `jitgate token issue` asks for.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TokenSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub read_only: bool,
    /// The unix user it acts as (root only, for someone else); the caller by default.
    #[serde(default)]
    pub user: Option<String>,
}

/// A new token and its secret: the only time the secret exists outside the holder's hands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Issued {
    pub token: ApiToken,
    pub secret: String,
}

/// Why a presented token was not taken. The texts are what the API answers: a secret that
/// does not match learns nothing about the token it names (unknown, wrong, expired and
/// revoked read alike until the secret is right).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "invalid API token (expected `Authorization: Bearer jgt_...` with a token from `jitgate token issue`)"
    )]
    Invalid,
    #[error("API token {0} has expired: issue a new one with `jitgate token issue`")]
    Expired(String),
    #[error("API token {0} was revoked")]
    Revoked(String),
    #[error("API token {id} acts as unix user {user}, who does not exist on this host")]
    NoSuchUser { id: String, user: String },
    /// The store could not be read: not the caller's fault, and no verdict on the token.
    #[error("the state store could not be read; try again")]
    Unavailable,
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    // No fallback: a secret from a weak source is worse than no secret.
    getrandom::fill(&mut bytes).map_err(|e| {
        ControlError::Internal(format!("no randomness for an API token secret: {e}"))
    })?;
    Ok(bytes)
}

/// SHA-256 of a secret, hex: what the store keeps.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The token id a secret names (`tok_...`), if it is shaped like one of ours.
pub fn id_of(secret: &str) -> Option<String> {
    let rest = secret.strip_prefix(PREFIX)?;
    let (id, random) = rest.split_once('_')?;
    let id_ok = id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let random_ok = BASE64URL_NOPAD
        .decode(random.as_bytes())
        .is_ok_and(|r| r.len() == SECRET_BYTES);
    (id_ok && random_ok).then(|| format!("tok_{id}"))
}

/// Whether `secret` is the one `stored` (a [`hash`]) was made from, in constant time.
pub fn matches(stored: &str, secret: &str) -> bool {
    crate::console::session::same(stored.as_bytes(), hash(secret).as_bytes())
}

/// Makes a token and its secret (not yet stored).
fn mint(
    name: String,
    user: String,
    read_only: bool,
    issued_by: String,
    ttl: Duration,
) -> Result<Issued> {
    let id_hex = hex::encode(random::<ID_BYTES>()?);
    let secret = format!(
        "{PREFIX}{id_hex}_{}",
        BASE64URL_NOPAD.encode(&random::<SECRET_BYTES>()?)
    );
    let now = Timestamp::now();
    Ok(Issued {
        token: ApiToken {
            id: format!("tok_{id_hex}"),
            name,
            user,
            read_only,
            issued_by,
            created_at: now,
            expires_at: now.plus(ttl),
            revoked_at: None,
            hash: hash(&secret),
        },
        secret,
    })
}

/// The audit log's `actor` for a caller at the control socket or the API.
fn actor(caller: &Caller) -> String {
    format!("user {}", caller.user)
}

impl ControlService {
    /// Issues a token acting as the caller (or, for root, as `spec.user`); see
    /// [`authz::may_issue_token`].
    pub async fn token_issue(&self, caller: &Caller, spec: TokenSpec) -> Result<Issued> {
        let user = authz::may_issue_token(caller, spec.user.as_deref())?;
        let ttl = match spec.ttl_secs {
            None => DEFAULT_TTL,
            Some(0) => {
                return Err(ControlError::Invalid(
                    "a token's ttl must be more than zero".into(),
                ));
            }
            Some(s) if Duration::from_secs(s) > MAX_TTL => {
                return Err(ControlError::Invalid(format!(
                    "a token lives at most {} days; ask for --ttl 90d or less",
                    MAX_TTL.as_secs() / 86_400
                )));
            }
            Some(s) => Duration::from_secs(s),
        };
        let name = spec.name.unwrap_or_else(|| "token".into());
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(ControlError::Invalid(format!(
                "a token's name is 1 to {MAX_NAME} printable characters"
            )));
        }
        let issued = mint(name, user, spec.read_only, actor(caller), ttl)?;
        self.store()
            .insert_api_token(issued.token.clone(), actor(caller))
            .await?;
        info!(token = %issued.token.id, user = %issued.token.user, by = %caller.user, read_only = issued.token.read_only, "API token issued");
        Ok(issued)
    }

    /// Tokens the caller may see: their own, every token for root.
    pub async fn token_list(&self, caller: &Caller) -> Result<Vec<ApiToken>> {
        let scope = authz::tokens_scope(caller)?;
        Ok(self.store().api_tokens(scope, LIST_LIMIT).await?)
    }

    /// Revokes a token at once: its next use is refused.
    pub async fn token_revoke(&self, caller: &Caller, id: &str) -> Result<ApiToken> {
        let Some(token) = self.store().api_token(id.to_owned()).await? else {
            return Err(ControlError::NotFound(format!("no API token {id}")));
        };
        authz::may_manage_token(caller, &token)?;
        if !self
            .store()
            .revoke_api_token(id.to_owned(), actor(caller))
            .await?
        {
            return Err(ControlError::Conflict(format!(
                "API token {id} is already revoked"
            )));
        }
        info!(token = %id, by = %caller.user, "API token revoked");
        self.store()
            .api_token(id.to_owned())
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("no API token {id}")))
    }

    /// Records one call of the console's HTTP API (`api.call`), without waiting: reads as
    /// well as changes, so that the log shows what each token was used for.
    pub fn record_api_call(&self, caller: &Caller, method: &str, path: &str, status: u16) {
        let Some(token) = &caller.token else {
            return;
        };
        self.store().submit_audit(
            actor(caller),
            crate::store::audit::Event::ApiCall(crate::store::audit::ApiCall {
                token: token.id.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
                status,
            }),
        );
    }

    /// The caller a presented secret stands for: the token's unix user as this host knows
    /// them now, limited by the token. Read from the store at every use, so a revocation
    /// takes effect on the next call.
    pub async fn authenticate_token(&self, secret: &str) -> Result<Caller, TokenError> {
        let id = id_of(secret).ok_or(TokenError::Invalid)?;
        let token = self
            .store()
            .api_token(id)
            .await
            .map_err(|_| TokenError::Unavailable)?
            .ok_or(TokenError::Invalid)?;
        if !matches(&token.hash, secret) {
            return Err(TokenError::Invalid);
        }
        if token.revoked_at.is_some() {
            return Err(TokenError::Revoked(token.id));
        }
        if Timestamp::now() >= token.expires_at {
            return Err(TokenError::Expired(token.id));
        }
        // Root never: a token acting as root is refused even if one was made somehow.
        let uid = crate::identity::uid_of(&token.user)
            .filter(|uid| *uid != 0)
            .ok_or_else(|| TokenError::NoSuchUser {
                id: token.id.clone(),
                user: token.user.clone(),
            })?;
        Ok(Caller {
            uid,
            pid: 0,
            user: format!("{} (token {})", token.user, token.id),
            workload: None,
            gated_unattributed: false,
            person: None,
            token: Some(TokenUse {
                id: token.id,
                read_only: token.read_only,
                account: token.user,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognisable_random_and_checked_whole() {
        let a = mint("n".into(), "u".into(), false, "user u".into(), DEFAULT_TTL).unwrap();
        let b = mint("n".into(), "u".into(), false, "user u".into(), DEFAULT_TTL).unwrap();
        assert!(a.secret.starts_with(PREFIX), "{}", a.secret);
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.token.id, b.token.id);
        assert_eq!(id_of(&a.secret).as_deref(), Some(a.token.id.as_str()));
        assert!(matches(&a.token.hash, &a.secret));
        assert!(!matches(&a.token.hash, &b.secret));
        assert!(!a.token.hash.contains(&a.secret[PREFIX.len()..]));
        // One changed character of the random part: refused.
        let mut tampered = a.secret.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(!matches(&a.token.hash, &tampered));
        // Misshapen secrets name no token.
        for bad in [
            "",
            "jgt_",
            "Bearer x",
            "jgt_zz_abc",
            &a.secret[1..],
            a.token.hash.as_str(),
        ] {
            assert_eq!(id_of(bad), None, "{bad}");
        }
        // The token serialises without its hash.
        let json = serde_json::to_string(&a.token).unwrap();
        assert!(!json.contains(&a.token.hash), "{json}");
    }
}
