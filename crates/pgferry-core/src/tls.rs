//! TLS for every session, through rustls, with libpq's `sslmode` semantics.
//!
//! tokio-postgres knows three modes (disable, prefer, require) and leaves certificate checks to
//! the TLS connector it is given. pgferry gives it one rustls configuration per connection whose
//! certificate verifier does what libpq does for the effective [`SslMode`]:
//!
//! | mode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | disable | never | – | – |
//! | allow | only if the server refuses plain | not verified | not checked |
//! | prefer | if the server offers it | not verified | not checked |
//! | require | always | verified only if a root certificate file exists (libpq) | not checked |
//! | verify-ca | always | verified | not checked |
//! | verify-full | always | verified | checked (`host`, else `hostaddr`) |
//!
//! The chain and the name are checked with rustls' own webpki functions (the two halves of its
//! `WebPkiServerVerifier`), so verify-ca is verify-full without the name check rather than a
//! reimplementation. Where webpki is stricter than libpq (OpenSSL), two libpq behaviours are
//! kept, because the certificate recipe in PostgreSQL's documentation depends on both: a server
//! certificate found as it is in the root file is trusted (webpki refuses a self-signed CA
//! certificate presented by a server), within its validity period; and the subject's common
//! name stands for the host name when the certificate has no subjectAltName entry of the host's
//! kind (DNS name or IP address), with libpq's one-label wildcard. Handshake signatures are
//! always verified, so a server must hold the key of the certificate it shows, whatever the
//! mode. Only the `ring` provider is used.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;
use x509_cert::der::oid::db::rfc4519::COMMON_NAME;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

use crate::dsn::{RootCert, SslMode, TlsSettings};

/// The TLS connector for `settings`, or why it cannot be built (a root certificate file that is
/// missing or unreadable, no system roots), as a sentence that names the fix.
pub(crate) fn connector(settings: &TlsSettings) -> Result<MakeRustlsConnect, String> {
    let roots = match settings.mode {
        // Never verified: prefer and allow take whatever TLS the server offers, as libpq does
        // when no root file is there; disable never calls the connector.
        SslMode::Disable | SslMode::Allow | SslMode::Prefer => None,
        SslMode::Require => match &settings.root_cert {
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
            // same as that of verify-ca".
            RootCert::File(path) => Some(load_roots(path)?),
            RootCert::Default(path) if path.exists() => Some(load_roots(path)?),
            _ => None,
        },
        SslMode::VerifyCa | SslMode::VerifyFull => Some(match &settings.root_cert {
            RootCert::File(path) => load_roots(path)?,
            RootCert::Default(path) if path.exists() => load_roots(path)?,
            RootCert::Default(path) => {
                return Err(format!(
                    "sslmode={} needs the CA certificate that signed the server's: give it with sslrootcert=FILE (or PGSSLROOTCERT), put it in {}, or use sslrootcert=system for the system's trusted roots",
                    settings.mode,
                    path.display()
                ))
            }
            RootCert::None => {
                return Err(format!(
                    "sslmode={} needs the CA certificate that signed the server's: give it with sslrootcert=FILE (or PGSSLROOTCERT), or use sslrootcert=system",
                    settings.mode
                ))
            }
            RootCert::System => system_roots()?,
        }),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier = Verifier {
        roots,
        check_name: settings.mode == SslMode::VerifyFull,
        algorithms,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Trusted certificates: webpki's trust anchors, and the certificates as given (for a server
/// certificate listed in the root file itself).
#[derive(Debug)]
struct Roots {
    store: RootCertStore,
    certs: Vec<CertificateDer<'static>>,
}

/// Reads the PEM certificates of a root certificate file.
fn load_roots(path: &Path) -> Result<Roots, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "sslrootcert {shown}: no such file (give the CA certificate that signed the server's, in PEM)"
        ),
        io::ErrorKind::PermissionDenied => format!("sslrootcert {shown}: permission denied"),
        _ => format!("sslrootcert {shown}: cannot read it: {e}"),
    })?;
    let mut store = RootCertStore::empty();
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| format!("sslrootcert {shown}: not valid PEM: {e}"))?;
        store.add(cert.clone()).map_err(|e| {
            format!(
                "sslrootcert {shown}: certificate {} is not a usable CA certificate: {e}",
                i + 1
            )
        })?;
        certs.push(cert);
    }
    if store.is_empty() {
        return Err(format!(
            "sslrootcert {shown}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)"
        ));
    }
    Ok(Roots { store, certs })
}

/// The operating system's trusted roots, for `sslrootcert=system` (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` override where they are looked for, as with OpenSSL).
fn system_roots() -> Result<Roots, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "sslrootcert=system: no trusted root certificates found on this system{why}; install the ca-certificates package or give sslrootcert=FILE"
        ));
    }
    // Public CAs sign servers; a server certificate is not expected among them.
    Ok(Roots {
        store,
        certs: Vec::new(),
    })
}

/// The certificate verifier for every mode: no roots accepts any certificate; roots verify the
/// chain; `check_name` also checks that the certificate names the host.
#[derive(Debug)]
struct Verifier {
    roots: Option<Roots>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        let chain = verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots.store,
            intermediates,
            now,
            self.algorithms.all,
        );
        if let Err(e) = chain {
            // libpq trusts a certificate listed as it is in the root file.
            if !roots
                .certs
                .iter()
                .any(|c| c.as_ref() == end_entity.as_ref())
            {
                return Err(e);
            }
            check_validity(end_entity, now)?;
        }
        if self.check_name {
            if let Err(e) = verify_server_name(&cert, server_name) {
                if !common_name_matches(end_entity, server_name) {
                    return Err(e);
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether `now` is within the certificate's validity period.
fn check_validity(der: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let cert = Certificate::from_der(der.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let validity = &cert.tbs_certificate.validity;
    let now = now.as_secs();
    if now < validity.not_before.to_unix_duration().as_secs() {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > validity.not_after.to_unix_duration().as_secs() {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// libpq's fallback to the common name: when the certificate has no subjectAltName entry of
/// the host's kind (a DNS name for a name, an IP address for an address), its subject's first
/// common name is compared with the host.
fn common_name_matches(der: &CertificateDer<'_>, server_name: &ServerName<'_>) -> bool {
    let Ok(cert) = Certificate::from_der(der.as_ref()) else {
        return false;
    };
    let (host, ip) = match server_name {
        ServerName::DnsName(name) => (name.as_ref().to_owned(), false),
        ServerName::IpAddress(addr) => (std::net::IpAddr::from(*addr).to_string(), true),
        _ => return false,
    };
    let tbs = &cert.tbs_certificate;
    for ext in tbs.extensions.iter().flatten() {
        if ext.extn_id != SubjectAltName::OID {
            continue;
        }
        let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) else {
            return false;
        };
        let of_host_kind = |n: &GeneralName| match n {
            GeneralName::DnsName(_) => !ip,
            GeneralName::IpAddress(_) => ip,
            _ => false,
        };
        if san.0.iter().any(of_host_kind) {
            return false;
        }
    }
    let first_cn = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == COMMON_NAME);
    first_cn.is_some_and(|atv| {
        std::str::from_utf8(atv.value.value()).is_ok_and(|cn| name_matches(cn, &host))
    })
}

/// libpq's comparison of a certificate name with the host: case-insensitive, and a leading
/// `*.` matches exactly one label. A name with a NUL byte never matches.
fn name_matches(name: &str, host: &str) -> bool {
    if name.contains('\0') {
        return false;
    }
    if name.eq_ignore_ascii_case(host) {
        return true;
    }
    let Some(suffix) = name.strip_prefix('*') else {
        return false;
    };
    if !suffix.starts_with('.') || suffix.len() < 2 || host.len() <= suffix.len() {
        return false;
    }
    let (label, rest) = host.split_at(host.len() - suffix.len());
    rest.eq_ignore_ascii_case(suffix) && !label.contains('.')
}

/// If a connection failed because of TLS, what went wrong and how to fix it, as a sentence
/// naming the mode; `None` for other failures. `host` is the host name the certificate was
/// checked against, for when rustls does not say.
pub(crate) fn explain_failure(
    e: &tokio_postgres::Error,
    settings: &TlsSettings,
    host: &str,
) -> Option<String> {
    let mode = settings.mode;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // tokio-rustls wraps rustls' error in an io::Error, whose `source()` skips it.
        let tls = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(tls) = tls {
            return Some(explain_rustls(tls, settings, host));
        }
        if err.to_string() == "server does not support TLS" {
            return Some(format!(
                "server does not support TLS (sslmode={mode}); turn ssl on in its postgresql.conf, or use sslmode=prefer to accept a plain connection"
            ));
        }
        cur = err.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error, settings: &TlsSettings, host: &str) -> String {
    let mode = settings.mode;
    let roots = match &settings.root_cert {
        RootCert::File(p) | RootCert::Default(p) => format!("sslrootcert {}", p.display()),
        RootCert::System => "the system's trusted roots".to_owned(),
        RootCert::None => "the root certificates".to_owned(),
    };
    let rustls::Error::InvalidCertificate(cert) = e else {
        return format!("TLS handshake failed (sslmode={mode})");
    };
    match cert {
        CertificateError::NotValidForName => {
            format!("server certificate does not match host {host} (sslmode={mode}); connect with a name the certificate lists, or use sslmode=verify-ca to check only its chain")
        }
        CertificateError::NotValidForNameContext { expected, .. } => {
            let name = match expected {
                ServerName::DnsName(d) => d.as_ref().to_owned(),
                ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                _ => host.to_owned(),
            };
            format!("server certificate does not match host {name} (sslmode={mode}); connect with a name the certificate lists, or use sslmode=verify-ca to check only its chain")
        }
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "server certificate is not signed by a CA in {roots} (sslmode={mode}); give the CA that issued it with sslrootcert"
        ),
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => format!(
            "server certificate is expired or not yet valid (sslmode={mode}); renew it on the server, or check this machine's clock"
        ),
        // webpki's error for a CA certificate presented by the server (not in the root file).
        CertificateError::Other(other) if other.to_string().contains("CaUsedAsEndEntity") => {
            format!(
                "server certificate is a CA certificate not found in {roots} (sslmode={mode}); put the server's certificate itself in the root file, or issue it from a CA"
            )
        }
        _ => format!("server certificate refused (sslmode={mode})"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn settings(mode: SslMode, root_cert: RootCert) -> TlsSettings {
        TlsSettings { mode, root_cert }
    }

    fn refusal(mode: SslMode, root_cert: RootCert) -> String {
        match connector(&settings(mode, root_cert)) {
            Ok(_) => panic!("{mode} built a connector"),
            Err(e) => e,
        }
    }

    #[test]
    fn unverified_modes_need_no_root_file() {
        let missing = PathBuf::from("/nonexistent/root.crt");
        for mode in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
        ] {
            assert!(connector(&settings(mode, RootCert::Default(missing.clone()))).is_ok());
            assert!(connector(&settings(mode, RootCert::None)).is_ok());
        }
    }

    #[test]
    fn a_named_root_file_must_exist_and_hold_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let e = refusal(SslMode::Require, RootCert::File("/x/y.pem".into()));
        assert!(e.starts_with("sslrootcert /x/y.pem: no such file"), "{e}");
        let e = refusal(SslMode::VerifyFull, RootCert::File("/x/y.pem".into()));
        assert!(e.starts_with("sslrootcert /x/y.pem: no such file"), "{e}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = refusal(SslMode::VerifyCa, RootCert::File(empty.clone()));
        assert!(e.contains("no certificate in it"), "{e}");
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = refusal(SslMode::VerifyCa, RootCert::File(broken.clone()));
        assert!(
            e.contains("certificate 1 is not a usable CA certificate"),
            "{e}"
        );
        // A root file that exists makes require verify the chain (libpq): a broken one refuses.
        let e = refusal(SslMode::Require, RootCert::Default(broken));
        assert!(e.contains("not a usable CA certificate"), "{e}");
    }

    /// A self-signed certificate for `cn`, made with the openssl command.
    fn self_signed(cn: &str) -> CertificateDer<'static> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args([
                "-keyout",
                "k.pem",
                "-out",
                "c.pem",
                "-subj",
                &format!("/CN={cn}"),
            ])
            .current_dir(dir.path())
            .output()
            .expect("the openssl command makes the test certificate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        CertificateDer::from_pem_file(dir.path().join("c.pem")).unwrap()
    }

    #[test]
    fn a_certificate_trusted_as_it_is_must_be_within_its_validity_period() {
        let cert = self_signed("pgferry-validity.invalid");
        let at = |secs| UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        let now = UnixTime::now().as_secs();
        assert!(check_validity(&cert, at(now)).is_ok());
        assert_eq!(
            check_validity(&cert, at(now - 3600)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet
            ))
        );
        assert_eq!(
            check_validity(&cert, at(now + 3 * 86400)),
            Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
        );
    }

    #[test]
    fn the_common_name_stands_for_the_host_only_without_a_matching_kind_of_alt_name() {
        let cert = self_signed("db1.example.com");
        let dns = |n: &str| ServerName::try_from(n.to_owned()).unwrap();
        assert!(common_name_matches(&cert, &dns("db1.example.com")));
        assert!(!common_name_matches(&cert, &dns("db2.example.com")));
        assert!(!common_name_matches(&cert, &dns("127.0.0.1")));
        let ip = self_signed("127.0.0.1");
        assert!(common_name_matches(&ip, &dns("127.0.0.1")));
    }

    #[test]
    fn certificate_names_match_as_in_libpq() {
        assert!(name_matches("db1.example.com", "DB1.Example.com"));
        assert!(name_matches("*.example.com", "db1.example.com"));
        assert!(!name_matches("*.example.com", "a.db1.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
        assert!(!name_matches("*example.com", "db1example.com"));
        assert!(!name_matches("*.", "a."));
        assert!(!name_matches("db1.example.com\0.evil", "db1.example.com"));
        assert!(name_matches("127.0.0.1", "127.0.0.1"));
        assert!(!name_matches("127.0.0.1", "127.0.0.2"));
    }

    #[test]
    fn verifying_modes_without_a_root_file_say_where_to_put_one() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = refusal(
                mode,
                RootCert::Default("/home/dba/.postgresql/root.crt".into()),
            );
            assert!(
                e.contains(&format!("sslmode={mode} needs the CA certificate")),
                "{e}"
            );
            assert!(e.contains("/home/dba/.postgresql/root.crt"), "{e}");
            assert!(e.contains("sslrootcert=system"), "{e}");
            let e = refusal(mode, RootCert::None);
            assert!(e.contains("sslrootcert=FILE"), "{e}");
        }
    }
}
