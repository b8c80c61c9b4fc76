//! Public-key signatures on audit records, so that any host of a fleet can check another
//! host's chain (`jitgate audit verify --fleet`) without that host's HMAC key.
//!
//! Each host has an Ed25519 key (`state_dir/audit-sign.key`, a 32-byte seed, root only,
//! created like `audit.key`). It signs every record it seals in the shared store over the
//! same length-prefixed fields the HMAC covers, plus the host's name and the record's HMAC
//! (so a record cannot be moved to another host's chain, and the signed chain is the HMAC
//! chain). It also signs its registration in the store's `audit_hosts` table: its public key
//! and the first sequence number it signed (`signed_from`), so stripping signatures from
//! later records, or cutting the chain below that record, is caught even by a verifier that
//! has never seen the host before.
//!
//! Pure: the keys are passed in; nothing here touches the store.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use super::{Sealed, secret_key};

const SIGN_KEY_FILE: &str = "audit-sign.key";

/// The first record this host signed, as the host itself remembers it: its registration
/// claims that start whatever the store says, so someone who strips the signatures and
/// deletes the registration cannot have the host re-register with a later start (which would
/// pass the stripped records off as from before it signed).
const FIRST_SIGNED_FILE: &str = "audit-sign.from";

/// Domain separation: a record signature can never be taken for a registration's, or for
/// anything else this key might sign one day.
const RECORD_DOMAIN: &[u8] = b"jitgate audit record v1";
const REGISTRATION_DOMAIN: &[u8] = b"jitgate audit host key v1";

/// This host's audit signing key.
pub struct AuditSigner {
    pair: Ed25519KeyPair,
    /// `state_dir/audit-sign.from` (`None`: keys made in tests, which remember nothing).
    first_signed_file: Option<PathBuf>,
    /// Whether the file is known to be written (so a record costs no file check).
    noted: AtomicBool,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditSigner({})", self.public_key_hex())
    }
}

impl AuditSigner {
    /// The key from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| anyhow::anyhow!("the audit signing key is unusable: {e}"))?;
        Ok(Self {
            pair,
            first_signed_file: None,
            noted: AtomicBool::new(false),
        })
    }

    /// Reads `state_dir/audit-sign.key`, creating a random one (mode 0600) on first start.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        let mut signer = Self::from_seed(&secret_key(state_dir, SIGN_KEY_FILE)?)?;
        signer.first_signed_file = Some(state_dir.join(FIRST_SIGNED_FILE));
        Ok(signer)
    }

    /// The first record this host signed, as it remembers it.
    pub fn first_signed(&self) -> Option<i64> {
        let path = self.first_signed_file.as_ref()?;
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Remembers `seq` as the first record signed, unless one is remembered already.
    pub fn note_signed(&self, seq: i64) -> std::io::Result<()> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let Some(path) = &self.first_signed_file else {
            return Ok(());
        };
        if self.noted.load(Ordering::Relaxed) {
            return Ok(());
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut file) => {
                file.write_all(seq.to_string().as_bytes())?;
                file.sync_all()?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.noted.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The public key, hex: what the store publishes and verifiers pin.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// The signature (hex) of `record` in `host`'s chain.
    pub fn sign_record(&self, host: &str, record: &Sealed) -> String {
        hex::encode(self.pair.sign(&record_message(host, record)).as_ref())
    }

    /// The signature (hex) of this host's registration: its key, signing from `signed_from`.
    pub fn sign_registration(&self, host: &str, signed_from: i64) -> String {
        let msg = registration_message(host, &self.public_key_hex(), signed_from);
        hex::encode(self.pair.sign(&msg).as_ref())
    }
}

fn length_prefixed(domain: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(domain);
    for field in fields {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// What a record's signature covers: the HMAC's fields, the host, and the HMAC itself.
fn record_message(host: &str, r: &Sealed) -> Vec<u8> {
    length_prefixed(
        RECORD_DOMAIN,
        &[
            host.as_bytes(),
            r.prev_hash.as_bytes(),
            &r.seq.to_be_bytes(),
            &r.at.to_be_bytes(),
            r.kind.as_bytes(),
            r.actor.as_bytes(),
            r.detail.as_bytes(),
            r.hash.as_bytes(),
        ],
    )
}

fn registration_message(host: &str, public_key_hex: &str, signed_from: i64) -> Vec<u8> {
    length_prefixed(
        REGISTRATION_DOMAIN,
        &[
            host.as_bytes(),
            public_key_hex.as_bytes(),
            &signed_from.to_be_bytes(),
        ],
    )
}

fn verify(public_key_hex: &str, msg: &[u8], sig_hex: &str) -> bool {
    let (Ok(key), Ok(sig)) = (hex::decode(public_key_hex), hex::decode(sig_hex)) else {
        return false;
    };
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(msg, &sig)
        .is_ok()
}

/// Whether `sig_hex` is `public_key_hex`'s signature of `record` in `host`'s chain.
pub fn verify_record(public_key_hex: &str, host: &str, record: &Sealed, sig_hex: &str) -> bool {
    verify(public_key_hex, &record_message(host, record), sig_hex)
}

/// Whether `sig_hex` is `public_key_hex`'s own signature of its registration for `host`.
pub fn verify_registration(
    public_key_hex: &str,
    host: &str,
    signed_from: i64,
    sig_hex: &str,
) -> bool {
    verify(
        public_key_hex,
        &registration_message(host, public_key_hex, signed_from),
        sig_hex,
    )
}

/// A short form of a public key for messages (like an SSH fingerprint, but the key's start).
pub fn fingerprint(public_key_hex: &str) -> String {
    public_key_hex.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Timestamp,
        store::audit::{AuditKey, DaemonStopped, Event, seal},
    };

    fn record() -> Sealed {
        seal(
            &AuditKey::new([1; 32]),
            None,
            Timestamp(5),
            "jitgated",
            &Event::DaemonStopped(DaemonStopped {}),
        )
        .unwrap()
    }

    #[test]
    fn signatures_bind_every_field_and_the_host() {
        let signer = AuditSigner::from_seed(&[3; 32]).unwrap();
        let pk = signer.public_key_hex();
        let r = record();
        let sig = signer.sign_record("a", &r);
        assert!(verify_record(&pk, "a", &r, &sig));
        assert!(!verify_record(&pk, "b", &r, &sig), "moved to another host");
        for edit in [
            |r: &mut Sealed| r.seq += 1,
            |r: &mut Sealed| r.at += 1,
            |r: &mut Sealed| r.kind.push('x'),
            |r: &mut Sealed| r.actor.push('x'),
            |r: &mut Sealed| r.detail.push(' '),
            |r: &mut Sealed| r.prev_hash.push('0'),
            |r: &mut Sealed| r.hash.push('0'),
        ] {
            let mut e = r.clone();
            edit(&mut e);
            assert!(!verify_record(&pk, "a", &e, &sig));
        }
        let other = AuditSigner::from_seed(&[4; 32]).unwrap();
        assert!(!verify_record(&other.public_key_hex(), "a", &r, &sig));
        assert!(
            !verify_record(&pk, "a", &r, "zz"),
            "garbage is no signature"
        );
    }

    #[test]
    fn a_registration_is_bound_to_host_key_and_start() {
        let signer = AuditSigner::from_seed(&[3; 32]).unwrap();
        let pk = signer.public_key_hex();
        let sig = signer.sign_registration("a", 7);
        assert!(verify_registration(&pk, "a", 7, &sig));
        assert!(!verify_registration(&pk, "a", 8, &sig));
        assert!(!verify_registration(&pk, "b", 7, &sig));
        let other = AuditSigner::from_seed(&[4; 32]).unwrap();
        assert!(!verify_registration(&other.public_key_hex(), "a", 7, &sig));
        // A record signature is not a registration signature.
        let r = record();
        assert!(!verify_registration(
            &pk,
            "a",
            1,
            &signer.sign_record("a", &r)
        ));
    }
}
