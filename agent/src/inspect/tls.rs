//! TLS on both hops.
//!
//! Client side: a host-local CA (created once under `state_dir/tls`, its certificate also
//! written where workloads can read it) signs, on demand, a certificate for the destination
//! the workload asked for: the SNI name it sent, and the IP it connected to. A workload that
//! trusts the CA gets `sslmode=verify-full`.
//!
//! Upstream: `require` encrypts without checking the certificate (as libpq does);
//! `verify-full` checks the chain against `upstream_ca` and the server name.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

const CA_NAME: &str = "jitgate host-local CA";

/// The crypto provider every config uses (ring; no build-time dependencies beyond cc).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The CA that signs the certificates the proxy presents to workloads.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    /// Minted leaf certificates by (server name, ip).
    /// Minted leaf certificates, with the instant after which they are minted again (well
    /// before they expire).
    cache: Mutex<HashMap<CertKey, (Arc<CertifiedKey>, std::time::Instant)>>,
}

/// A leaf certificate's server name and IP address.
type CertKey = (String, Option<IpAddr>);

/// How long a minted leaf certificate is valid; it is re-minted at half its life.
const LEAF_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Most minted certificates kept.
const CERT_CACHE: usize = 1024;

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Where the trust bundle for gated workloads is published, beside the CA certificate.
pub fn bundle_path(public: &Path) -> PathBuf {
    public.with_file_name("ca-bundle.pem")
}

/// The system's trust anchors, which the bundle starts from.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Writes the bundle gated workloads trust through `SSL_CERT_FILE` and its kin (`jitgate
/// run` sets them): the system's CAs plus the host CA. Why both: those variables replace
/// the default store, and a workload must still reach every non-gated HTTPS service it could
/// before. Refreshed at each start of the host agent.
fn write_bundle(path: &Path, ca_pem: &str) -> anyhow::Result<()> {
    let mut bundle = fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(ca_pem);
    let tmp = path.with_extension("pem.tmp");
    fs::write(&tmp, bundle).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("publishing {}", path.display()))?;
    Ok(())
}

impl LocalCa {
    /// Loads the CA from `dir` (creating it on first use) and publishes its certificate at
    /// `public` (mode 0644) for workloads to trust.
    pub fn load_or_create(dir: &Path, public: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        let (key, cert_pem) = if key_path.exists() && cert_path.exists() {
            let key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)
                .map_err(|e| anyhow!("reading {}: {e}", key_path.display()))?;
            (key, fs::read_to_string(&cert_path)?)
        } else {
            let key = KeyPair::generate().map_err(|e| anyhow!("generating the CA key: {e}"))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| anyhow!("signing the CA certificate: {e}"))?;
            let _ = fs::remove_file(&key_path);
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            fs::write(&cert_path, cert.pem())?;
            (key, cert.pem())
        };
        if let Some(parent) = public.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(public, &cert_pem).with_context(|| format!("writing {}", public.display()))?;
        fs::set_permissions(public, fs::Permissions::from_mode(0o644))?;
        write_bundle(&bundle_path(public), &cert_pem)?;
        Ok(Self {
            issuer: Issuer::new(ca_params(), key),
            cert_pem,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn mint(&self, name: &str, ip: Option<IpAddr>) -> anyhow::Result<Arc<CertifiedKey>> {
        let key = (name.to_owned(), ip);
        if let Some((ck, renew_at)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            && std::time::Instant::now() < *renew_at
        {
            return Ok(ck.clone());
        }
        let leaf_key = KeyPair::generate().map_err(|e| anyhow!("generating a key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            if name.is_empty() { "jitgate" } else { name },
        );
        params.distinguished_name = dn;
        if !name.is_empty() {
            params.subject_alt_names.push(SanType::DnsName(
                name.try_into()
                    .map_err(|e| anyhow!("server name {name}: {e}"))?,
            ));
        }
        if let Some(ip) = ip {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        let now = time_now();
        params.not_before = now - std::time::Duration::from_secs(3600);
        params.not_after = now + LEAF_LIFETIME;
        let renew_at = std::time::Instant::now() + LEAF_LIFETIME / 2;
        let cert = params
            .signed_by(&leaf_key, &self.issuer)
            .map_err(|e| anyhow!("signing a certificate: {e}"))?;
        let der_key = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|e| anyhow!("encoding the key: {e}"))?;
        let signing = provider()
            .key_provider
            .load_private_key(der_key)
            .map_err(|e| anyhow!("loading the key: {e}"))?;
        let ck = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CERT_CACHE {
            cache.clear();
        }
        cache.insert(key, (ck.clone(), renew_at));
        Ok(ck)
    }

    /// A server config presenting a certificate for whatever name the client asks for (SNI)
    /// and for `ip`, the address it connected to.
    pub fn server_config(self: &Arc<Self>, ip: IpAddr) -> anyhow::Result<Arc<ServerConfig>> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver {
                ca: self.clone(),
                ip,
            }));
        Ok(Arc::new(config))
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

#[derive(Debug)]
struct Resolver {
    ca: Arc<LocalCa>,
    ip: IpAddr,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalCa")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().unwrap_or("");
        match self.ca.mint(name, Some(self.ip)) {
            Ok(ck) => Some(ck),
            Err(e) => {
                tracing::warn!(error = %e, "cannot mint a certificate for the workload");
                None
            }
        }
    }
}

/// Accepts any server certificate (libpq's `sslmode=require`), still checking handshake
/// signatures so the session keys are bound to the certificate presented.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config that verifies servers against the system's trust anchors plus the PEM
/// certificates in `extra_ca` (for the agent's own calls out, such as webhooks).
pub fn system_client_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let mut add_file = |path: &Path, required: bool| -> anyhow::Result<()> {
        let certs = match CertificateDer::pem_file_iter(path) {
            Ok(certs) => certs,
            Err(_) if !required => return Ok(()),
            Err(e) => return Err(anyhow!("reading {}: {e}", path.display())),
        };
        for cert in certs {
            let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
            // A system bundle may hold a certificate webpki cannot use: skip it there.
            if let Err(e) = roots.add(cert)
                && required
            {
                return Err(anyhow!("a certificate in {}: {e}", path.display()));
            }
        }
        Ok(())
    };
    add_file(Path::new(SYSTEM_BUNDLE), false)?;
    if let Some(ca) = extra_ca {
        add_file(ca, true)?;
    }
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Client configs for the upstream hop, cached per CA file.
#[derive(Default)]
pub struct UpstreamTlsConfigs {
    verified: Mutex<HashMap<PathBuf, Arc<ClientConfig>>>,
    unverified: Mutex<Option<Arc<ClientConfig>>>,
}

impl UpstreamTlsConfigs {
    /// `ca = None`: encrypt without verifying.
    pub fn get(&self, ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
        let builder = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| anyhow!("TLS versions: {e}"))
        };
        match ca {
            None => {
                let mut slot = self
                    .unverified
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(c) = &*slot {
                    return Ok(c.clone());
                }
                let config = builder()?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
                    .with_no_client_auth();
                let config = Arc::new(config);
                *slot = Some(config.clone());
                Ok(config)
            }
            Some(path) => {
                let mut map = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(c) = map.get(path) {
                    return Ok(c.clone());
                }
                let mut roots = RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("reading upstream_ca {}", path.display()))?
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("parsing upstream_ca {}", path.display()))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .with_context(|| format!("adding a certificate from {}", path.display()))?;
                }
                let config = Arc::new(
                    builder()?
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                );
                map.insert(path.to_owned(), config.clone());
                Ok(config)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("public/ca.pem");
        let ca = LocalCa::load_or_create(&dir.path().join("tls"), &public).unwrap();
        let pem = ca.cert_pem().to_owned();
        assert_eq!(fs::read_to_string(&public).unwrap(), pem);
        let mode = fs::metadata(dir.path().join("tls/ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = LocalCa::load_or_create(&dir.path().join("tls"), &public).unwrap();
        assert_eq!(again.cert_pem(), pem, "the CA survives restarts");

        // A leaf minted by the reloaded CA verifies against the original CA certificate.
        let leaf = again
            .mint("db.internal", Some("10.0.0.5".parse().unwrap()))
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        for name in ["db.internal", "10.0.0.5"] {
            verifier
                .verify_server_cert(
                    &leaf.cert[0],
                    &[],
                    &ServerName::try_from(name).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(
            verifier
                .verify_server_cert(
                    &leaf.cert[0],
                    &[],
                    &ServerName::try_from("other.host").unwrap(),
                    &[],
                    UnixTime::now()
                )
                .is_err()
        );
    }
}
