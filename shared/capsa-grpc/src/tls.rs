//! TLS of the internal plane (mutual: both sides present certificates signed by one CA) and
//! of the public endpoint (server certificate only).
//!
//! Identities are DNS names in the certificates' subjectAltName, one per service
//! ([`identity`]). A client checks that the server it dialled holds the identity of the
//! service it meant to call, whatever address it dialled (node URLs are pod or host
//! addresses); a node service checks that its caller's certificate names one of its
//! `--tls-allowed-peers` ([`PeerCheckLayer`]), so a certificate the CA issued to the gateway
//! cannot lease VMs or run code.
//!
//! rustls with ring; no system roots: the internal CA is the only trust anchor.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The identity (DNS subjectAltName) of each service's certificate.
pub mod identity {
    pub const SESSION_MANAGER: &str = "session-manager.capsa.internal";
    pub const VM_POOL: &str = "vm-pool.capsa.internal";
    pub const EXECUTOR: &str = "executor.capsa.internal";
    pub const METERING: &str = "metering.capsa.internal";
    pub const GATEWAY: &str = "gateway.capsa.internal";
    /// Who may call a node service (vm-pool, executor): the default of their
    /// `--tls-allowed-peers`.
    pub const NODE_CALLERS: &str = "session-manager.capsa.internal,metering.capsa.internal";
}

/// The contents of a PEM file, checked when the flag is parsed. `Debug` never shows them
/// (one of them is a private key).
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(Arc<[u8]>);

impl Pem {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pem({} bytes)", self.0.len())
    }
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// A file of one or more PEM certificates.
pub fn read_certs(path: &str) -> Result<Pem, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no PEM certificate in it"));
    }
    Ok(Pem(bytes.into()))
}

/// A file holding a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &str) -> Result<Pem, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{path}: no PEM private key in it: {e}"))?;
    Ok(Pem(bytes.into()))
}

/// A DNS name a certificate can carry.
fn parse_identity(s: &str) -> Result<String, String> {
    match ServerName::try_from(s) {
        Ok(ServerName::DnsName(_)) => Ok(s.to_owned()),
        _ => Err(format!("{s:?} is not a DNS name")),
    }
}

/// mTLS of the internal plane: this service's certificate (served to its callers and
/// presented to the services it calls), the CA every peer's certificate must chain to, and
/// who may call this service. All three files or none: without them every internal call is
/// plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This service's certificate chain (PEM); its DNS subjectAltName is its identity, e.g.
    /// vm-pool.capsa.internal. Needs --tls-key and --tls-ca.
    #[arg(long, env = "CAPSA_TLS_CERT", value_name = "PATH", value_parser = read_certs, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<Pem>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CAPSA_TLS_KEY", value_name = "PATH", value_parser = read_key, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<Pem>,

    /// The CA (PEM) that signs every internal service's certificate: servers require client
    /// certificates it signed, clients accept only servers it signed.
    #[arg(long, env = "CAPSA_TLS_CA", value_name = "PATH", value_parser = read_certs, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<Pem>,

    /// Servers of the internal plane (vm-pool, executor, metering): the identities allowed to
    /// call, comma-separated; any other certificate gets PERMISSION_DENIED. Empty: any
    /// certificate the CA signed.
    #[arg(long, env = "CAPSA_TLS_ALLOWED_PEERS", value_name = "NAMES", value_delimiter = ',', value_parser = parse_identity)]
    pub tls_allowed_peers: Vec<String>,
}

/// Gives `--tls-allowed-peers` a service's default (for `mut_arg("tls_allowed_peers", ..)`).
pub fn allowed_peers(default: &'static str) -> impl FnOnce(clap::Arg) -> clap::Arg {
    move |arg| arg.default_value(default)
}

/// Why a URL cannot be dialled with this TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{url:?} is not a valid URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{url:?}: internal calls use https:// when --tls-ca is set (plaintext is refused)")]
    PlaintextRefused { url: String },
    #[error("{url:?}: https:// needs --tls-ca (the CA to check the server with)")]
    NoCa { url: String },
    #[error("TLS configuration of {url:?}: {reason}")]
    Config { url: String, reason: String },
}

impl TlsArgs {
    /// Whether internal calls and servers use mTLS.
    pub fn enabled(&self) -> bool {
        self.tls_ca.is_some()
    }

    fn client_config(&self) -> Option<ClientTlsConfig> {
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return None;
        };
        Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.bytes()))
                .identity(Identity::from_pem(cert.bytes(), key.bytes())),
        )
    }

    /// An endpoint to an internal service at `url` whose certificate must name `server`
    /// (one of [`identity`]). With mTLS on, only https:// URLs are accepted.
    pub fn internal_endpoint(&self, url: &str, server: &str) -> Result<Endpoint, TlsError> {
        let endpoint = parse(url)?;
        let https = endpoint.uri().scheme_str() == Some("https");
        match self.client_config() {
            Some(tls) if https => endpoint
                .tls_config(tls.domain_name(server))
                .map_err(|e| config_error(url, &e)),
            Some(_) => Err(TlsError::PlaintextRefused { url: url.into() }),
            None if https => Err(TlsError::NoCa { url: url.into() }),
            None => Ok(endpoint),
        }
    }

    /// An endpoint to a public endpoint (session-manager's API) at `url`: TLS for https://,
    /// checked against --tls-ca and the URL's host name; plaintext for http://.
    pub fn public_endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint = parse(url)?;
        if endpoint.uri().scheme_str() != Some("https") {
            return Ok(endpoint);
        }
        let tls = self
            .client_config()
            .ok_or_else(|| TlsError::NoCa { url: url.into() })?;
        endpoint.tls_config(tls).map_err(|e| config_error(url, &e))
    }

    /// The server side: client certificates signed by the CA required, and the allowed
    /// peers checked by [`PeerCheckLayer`]. `None` without mTLS.
    pub fn server(&self) -> Option<ServerTls> {
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return None;
        };
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert.bytes(), key.bytes()))
            .client_ca_root(Certificate::from_pem(ca.bytes()));
        Some(ServerTls {
            config,
            allowed_peers: (!self.tls_allowed_peers.is_empty())
                .then(|| self.tls_allowed_peers.clone().into()),
        })
    }
}

fn parse(url: &str) -> Result<Endpoint, TlsError> {
    Endpoint::from_shared(url.to_owned()).map_err(|e| TlsError::BadUrl {
        url: url.into(),
        reason: e.to_string(),
    })
}

fn config_error(url: &str, e: &tonic::transport::Error) -> TlsError {
    TlsError::Config {
        url: url.into(),
        reason: crate::error::chain(e),
    }
}

/// TLS of a public endpoint: a server certificate, no client certificate asked for (clients
/// authenticate with API keys). Without both flags the endpoint is plaintext.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PublicTlsArgs {
    /// Certificate chain (PEM) of the public endpoint, for the name clients dial.
    #[arg(long, env = "CAPSA_PUBLIC_TLS_CERT", value_name = "PATH", value_parser = read_certs, requires = "public_tls_key")]
    pub public_tls_cert: Option<Pem>,

    /// The private key of --public-tls-cert (PEM).
    #[arg(long, env = "CAPSA_PUBLIC_TLS_KEY", value_name = "PATH", value_parser = read_key, requires = "public_tls_cert")]
    pub public_tls_key: Option<Pem>,
}

impl PublicTlsArgs {
    pub fn server(&self) -> Option<ServerTls> {
        let (Some(cert), Some(key)) = (&self.public_tls_cert, &self.public_tls_key) else {
            return None;
        };
        Some(ServerTls {
            config: ServerTlsConfig::new().identity(Identity::from_pem(cert.bytes(), key.bytes())),
            allowed_peers: None,
        })
    }
}

/// A server's TLS: rustls settings and, for mTLS, who may call.
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) config: ServerTlsConfig,
    pub(crate) allowed_peers: Option<Arc<[String]>>,
}

/// Rejects calls whose client certificate names none of the allowed identities
/// (PERMISSION_DENIED), or that came without one (UNAUTHENTICATED). Passes everything when
/// built with `None` (no allow list).
#[derive(Clone)]
pub struct PeerCheckLayer(pub(crate) Option<Arc<[String]>>);

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;
    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck {
            inner,
            allowed: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    allowed: Option<Arc<[String]>>,
}

/// Whether the first certificate of `certs` is valid for one of `allowed`.
fn check_peer(
    certs: Option<&[CertificateDer<'static>]>,
    allowed: &[String],
) -> Result<(), tonic::Status> {
    let Some(leaf) = certs.and_then(<[_]>::first) else {
        return Err(tonic::Status::unauthenticated(
            "a client certificate is required",
        ));
    };
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
        tonic::Status::unauthenticated(format!("unreadable client certificate: {e}"))
    })?;
    let ok = allowed.iter().any(|name| {
        ServerName::try_from(name.as_str())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "the client certificate names none of the identities allowed to call this service ({})",
            allowed.join(", ")
        )))
    }
}

impl<S, B> tower::Service<http::Request<B>> for PeerCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(allowed) = &self.allowed {
            let certs = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            if let Err(status) = check_peer(certs.as_deref().map(Vec::as_slice), allowed) {
                tracing::warn!(code = ?status.code(), "{}", status.message());
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    #[command(mut_arg("tls_allowed_peers", allowed_peers(identity::NODE_CALLERS)))]
    struct Demo {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn allowed_peers_default_per_service_and_must_be_dns_names() {
        let d = Demo::try_parse_from(["x"]).unwrap();
        assert!(!d.tls.enabled());
        assert_eq!(
            d.tls.tls_allowed_peers,
            [identity::SESSION_MANAGER, identity::METERING]
        );
        assert!(d.tls.server().is_none());
        let d = Demo::try_parse_from(["x", "--tls-allowed-peers", "a.internal"]).unwrap();
        assert_eq!(d.tls.tls_allowed_peers, ["a.internal"]);
        assert!(Demo::try_parse_from(["x", "--tls-allowed-peers", "not a name"]).is_err());
    }

    #[test]
    fn the_three_files_go_together_and_must_hold_pem() {
        let dir = std::env::temp_dir().join(format!("capsa-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let junk = junk.to_str().unwrap();
        for args in [
            vec!["x", "--tls-cert", junk],
            vec!["x", "--tls-ca", junk],
            vec!["x", "--tls-cert", junk, "--tls-key", junk, "--tls-ca", junk],
            vec![
                "x",
                "--tls-cert",
                "/nonexistent",
                "--tls-key",
                junk,
                "--tls-ca",
                junk,
            ],
        ] {
            let err = Demo::try_parse_from(&args).unwrap_err();
            assert!(err.use_stderr(), "{args:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_tls_https_is_refused_and_http_is_plain() {
        let tls = TlsArgs::default();
        assert!(
            tls.internal_endpoint("http://127.0.0.1:1", identity::VM_POOL)
                .is_ok()
        );
        assert!(matches!(
            tls.internal_endpoint("https://127.0.0.1:1", identity::VM_POOL),
            Err(TlsError::NoCa { .. })
        ));
        assert!(tls.public_endpoint("http://127.0.0.1:1").is_ok());
        assert!(matches!(
            tls.public_endpoint("https://h:1"),
            Err(TlsError::NoCa { .. })
        ));
        assert!(matches!(
            tls.internal_endpoint("no url", identity::VM_POOL),
            Err(TlsError::BadUrl { .. })
        ));
    }

    #[test]
    fn a_missing_or_unreadable_certificate_is_unauthenticated() {
        let allowed = [identity::SESSION_MANAGER.to_owned()];
        let err = check_peer(None, &allowed).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let junk = [CertificateDer::from(vec![1u8, 2, 3])];
        let err = check_peer(Some(&junk), &allowed).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
