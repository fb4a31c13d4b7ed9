//! TLS for TCP connections, as libpq's `sslmode` says: `prefer` tries it and takes what the
//! server offers without checking its certificate, `require` insists on it (and checks the
//! chain like verify-ca when a root certificate file exists, as libpq does), `verify-ca`
//! checks the certificate chain against `sslrootcert`, `verify-full` the chain and that the
//! certificate names the host.

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::conn::ConnError;
use super::settings::PgSettings;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Asks the server for TLS (SSLRequest). `Some(config)` to go on with a handshake, `None`
/// to go on in plain text (the server said no and the mode allows it).
pub(crate) async fn negotiate(
    tcp: &mut TcpStream,
    s: &PgSettings,
) -> Result<Option<ClientConfig>, ConnError> {
    let config = client_config(s)?;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(Some(config)),
        b'N' if s.sslmode == "prefer" => Ok(None),
        b'N' => Err(ConnError::Auth(format!(
            "server does not support SSL, but SSL was required (sslmode={})",
            s.sslmode
        ))),
        other => Err(ConnError::Protocol(format!(
            "unexpected answer {other:#x} to the SSL request"
        ))),
    }
}

/// The TLS handshake, checked as the mode says.
pub(crate) async fn handshake(
    tcp: TcpStream,
    s: &PgSettings,
    config: ClientConfig,
) -> Result<TlsStream<TcpStream>, ConnError> {
    let name = ServerName::try_from(s.host.clone()).map_err(|_| {
        ConnError::Auth(format!("\"{}\" is not a valid server name for TLS", s.host))
    })?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| ConnError::Auth(format!("SSL connection to {} failed: {e}", s.describe())))
}

fn client_config(s: &PgSettings) -> Result<ClientConfig, ConnError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnError::Auth(e.to_string()))?;
    // As libpq: require checks the chain too when a root certificate file exists.
    let root_file = s.sslrootcert.as_deref().is_some_and(|f| f.is_file());
    let chain = match s.sslmode.as_str() {
        "verify-ca" | "verify-full" => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(s)?), provider())
                .build()
                .map_err(|e| ConnError::Auth(format!("root certificates: {e}")))?,
        ),
        "require" if root_file => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(s)?), provider())
                .build()
                .map_err(|e| ConnError::Auth(format!("root certificates: {e}")))?,
        ),
        _ => None,
    };
    let verifier = Arc::new(Verifier {
        chain,
        check_name: s.sslmode == "verify-full",
        provider: provider(),
    });
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn roots(s: &PgSettings) -> Result<RootCertStore, ConnError> {
    let file = s.sslrootcert.as_ref().ok_or_else(|| {
        ConnError::Auth(format!(
            "sslmode={} needs a root certificate file (sslrootcert or ~/.postgresql/root.crt)",
            s.sslmode
        ))
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            ConnError::Auth(format!(
                "could not read root certificate file \"{}\": {e}",
                file.display()
            ))
        })?;
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(certs);
    if store.is_empty() {
        return Err(ConnError::Auth(format!(
            "root certificate file \"{}\" holds no certificate",
            file.display()
        )));
    }
    Ok(store)
}

/// The server certificate check for each mode: none for prefer and require (as libpq),
/// the chain for verify-ca, the chain and the name for verify-full. Handshake signatures
/// are always checked.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
