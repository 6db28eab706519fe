//! TLS of the aggregator's two ports and the agents' client certificates (mTLS), served by the process itself.
//!
//! One certificate (`tls_cert_path`, `tls_key_path`) serves HTTPS (ALPN `h2`, `http/1.1`) and gRPC (`h2`); the client
//! CA (`tls_client_ca_path`) applies to the gRPC port only. The files are re-read every `tls_reload_interval_secs`:
//! when their content changed, they are loaded whole and served from the next handshake on; files that cannot be
//! loaded (a half-written copy, a key of another certificate) leave the previous certificate in service, are logged
//! once per content and counted in `license_sync_tls_reload_failures_total`.
//!
//! A client certificate is bound to one instance by the SAN URI `license-sync://instance/<server_id>`: with a
//! client CA, every call with an instance credential needs a certificate naming that instance's server id
//! ([`check_instance_certificate`]), so a leaked credential is useless without the instance's private key.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use license_sync_serve::grpc::GrpcConnection;
use license_sync_serve::tls::{
    ALPN_GRPC, ALPN_HTTPS, ClientAuth, ReloadableCertificate, ServerTls, TlsFile, TlsFileError,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{AggregatorConfig, ConfigProblem, InvalidConfig, TlsClientAuth};
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Metrics;

/// The SAN URI prefix that binds a client certificate to an instance; the server id follows.
pub const INSTANCE_URI_PREFIX: &str = "license-sync://instance/";

/// The setting that names a file, for messages.
fn setting(file: TlsFile) -> &'static str {
    match file {
        TlsFile::Certificate => "tls_cert_path",
        TlsFile::Key => "tls_key_path",
        TlsFile::ClientCa => "tls_client_ca_path",
    }
}

fn problem(error: TlsFileError) -> InvalidConfig {
    InvalidConfig(vec![ConfigProblem {
        key: setting(error.file).to_owned(),
        message: format!("= {error}"),
    }])
}

#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_auth: ClientAuth,
}

/// The files' contents, read together.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &Files) -> Result<Self, TlsFileError> {
        use license_sync_serve::tls::read_pem;
        Ok(Contents {
            cert: read_pem(TlsFile::Certificate, &files.cert)?,
            key: read_pem(TlsFile::Key, &files.key)?,
            client_ca: files
                .client_ca
                .as_deref()
                .map(|path| read_pem(TlsFile::ClientCa, path))
                .transpose()?,
        })
    }

    /// Tells one content from another without keeping the key in memory twice.
    fn fingerprint(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            let part = part.map(Vec::as_slice).unwrap_or_default();
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }
}

/// What a set of files loads to.
struct Loaded {
    certified: CertifiedKey,
    not_after_unix_secs: i64,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
}

fn load(files: &Files, contents: &Contents) -> Result<Loaded, TlsFileError> {
    let certified = license_sync_serve::tls::certified_key_from_pem(
        &files.cert,
        &contents.cert,
        &files.key,
        &contents.key,
    )?;
    let leaf = certified.end_entity_cert().map_err(|error| TlsFileError {
        file: TlsFile::Certificate,
        path: files.cert.clone(),
        reason: error.to_string(),
    })?;
    let not_after_unix_secs = X509Certificate::from_der(leaf.as_ref())
        .map(|(_, certificate)| certificate.validity().not_after.timestamp())
        .map_err(|error| TlsFileError {
            file: TlsFile::Certificate,
            path: files.cert.clone(),
            reason: format!("its first certificate is not valid X.509: {error}"),
        })?;
    let client_verifier = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => Some(license_sync_serve::tls::client_verifier_from_pem(
            path,
            pem,
            files.client_auth,
        )?),
        _ => None,
    };
    Ok(Loaded {
        certified,
        not_after_unix_secs,
        client_verifier,
    })
}

/// The TLS of a running aggregator: what both ports serve, and the files it is reloaded from.
pub struct AggregatorTls {
    pub http: ServerTls,
    pub grpc: ServerTls,
    certificate: Arc<ReloadableCertificate>,
    files: Files,
    /// The content last tried (loaded or refused), so that unchanged files are neither reloaded nor reported again.
    last_tried: Mutex<[u8; 32]>,
    not_after_unix_secs: Mutex<i64>,
}

/// What a look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded { not_after_unix_secs: i64 },
}

impl AggregatorTls {
    /// Loads the configured files; `None` when TLS is off. Errors name the setting whose file is unusable.
    pub fn start(config: &AggregatorConfig) -> Result<Option<Arc<Self>>, InvalidConfig> {
        let (Some(cert), Some(key)) = (&config.tls_cert_path, &config.tls_key_path) else {
            return Ok(None);
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls_client_ca_path.clone(),
            client_auth: match config.tls_client_auth {
                TlsClientAuth::Required => ClientAuth::Required,
                TlsClientAuth::Optional => ClientAuth::Optional,
            },
        };
        let contents = Contents::read(&files).map_err(problem)?;
        let loaded = load(&files, &contents).map_err(problem)?;
        let certificate = ReloadableCertificate::new(loaded.certified);
        let handshake_timeout = Duration::from_millis(config.tls_handshake_timeout_ms);
        let config_problem = |error: rustls::Error| {
            InvalidConfig(vec![ConfigProblem {
                key: "tls_cert_path".to_owned(),
                message: format!("cannot be served: {error}"),
            }])
        };
        let http =
            license_sync_serve::tls::server_config(Arc::clone(&certificate), None, ALPN_HTTPS)
                .map_err(config_problem)?;
        let grpc = license_sync_serve::tls::server_config(
            Arc::clone(&certificate),
            loaded.client_verifier,
            ALPN_GRPC,
        )
        .map_err(config_problem)?;
        Ok(Some(Arc::new(AggregatorTls {
            http: ServerTls::new(http, handshake_timeout),
            grpc: ServerTls::new(grpc, handshake_timeout),
            certificate,
            files,
            last_tried: Mutex::new(contents.fingerprint()),
            not_after_unix_secs: Mutex::new(loaded.not_after_unix_secs),
        })))
    }

    /// The served certificate's not-after, in Unix seconds.
    pub fn not_after_unix_secs(&self) -> i64 {
        *self
            .not_after_unix_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the files and, when their content changed, serves them from the next handshake on. An error leaves
    /// the current certificate served, and the same content is not tried again.
    pub fn reload_if_changed(&self) -> Result<Reload, TlsFileError> {
        let contents = Contents::read(&self.files)?;
        let fingerprint = contents.fingerprint();
        {
            let mut last_tried = self.last_tried.lock().unwrap_or_else(|e| e.into_inner());
            if *last_tried == fingerprint {
                return Ok(Reload::Unchanged);
            }
            *last_tried = fingerprint;
        }
        let loaded = load(&self.files, &contents)?;
        if let Some(verifier) = loaded.client_verifier {
            let config = license_sync_serve::tls::server_config(
                Arc::clone(&self.certificate),
                Some(verifier),
                ALPN_GRPC,
            )
            .map_err(|error| TlsFileError {
                file: TlsFile::ClientCa,
                path: self.files.client_ca.clone().unwrap_or_default(),
                reason: error.to_string(),
            })?;
            self.grpc.replace_config(config);
        }
        self.certificate.replace(loaded.certified);
        *self
            .not_after_unix_secs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = loaded.not_after_unix_secs;
        Ok(Reload::Reloaded {
            not_after_unix_secs: loaded.not_after_unix_secs,
        })
    }

    /// Looks at the files every `interval` until `stop` turns true; logs and counts each outcome worth telling.
    pub async fn watch_files(
        self: Arc<Self>,
        interval: Duration,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) {
        metrics.set_tls_certificate_expiry(self.not_after_unix_secs());
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        // An unreadable file (mid-replace) is reported once per kind of failure, not every tick.
        let mut last_read_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = ticks.tick() => {}
            }
            let tls = Arc::clone(&self);
            let outcome = match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::error!(%error, "the TLS reload panicked; the current certificate stays served");
                    metrics.tls_reload_failed();
                    continue;
                }
            };
            match outcome {
                Ok(Reload::Unchanged) => last_read_error = None,
                Ok(Reload::Reloaded {
                    not_after_unix_secs,
                }) => {
                    last_read_error = None;
                    metrics.set_tls_certificate_expiry(not_after_unix_secs);
                    tracing::info!(
                        not_after = not_after_unix_secs,
                        "TLS files changed: serving the new certificate from the next handshake on"
                    );
                }
                Err(error) => {
                    let text = error.to_string();
                    if last_read_error.as_deref() == Some(text.as_str()) {
                        continue;
                    }
                    last_read_error = Some(text);
                    metrics.tls_reload_failed();
                    tracing::error!(
                        setting = setting(error.file),
                        %error,
                        "changed TLS files cannot be loaded: the previous certificate stays served; fix the files"
                    );
                }
            }
        }
    }

    /// Whether agents' certificates are checked (a client CA is configured).
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The certificate chain the client presented on this call's connection, if any.
pub fn client_certificates<T>(
    request: &tonic::Request<T>,
) -> Option<Arc<[CertificateDer<'static>]>> {
    request
        .extensions()
        .get::<GrpcConnection>()
        .and_then(|connection| connection.peer_certificates.clone())
}

/// The server id a client certificate is bound to: its one `license-sync://instance/<server_id>` SAN URI.
pub fn certificate_instance(certificate: &CertificateDer<'_>) -> Result<Uuid, String> {
    let (_, certificate) = X509Certificate::from_der(certificate.as_ref())
        .map_err(|error| format!("the client certificate is not valid X.509: {error}"))?;
    let names = certificate.subject_alternative_name().map_err(|error| {
        format!("the client certificate's subject alternative names cannot be read: {error}")
    })?;
    let mut instances = names
        .into_iter()
        .flat_map(|names| names.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(INSTANCE_URI_PREFIX),
            _ => None,
        });
    let missing = || {
        format!(
            "the client certificate names no instance: issue it with the SAN URI {INSTANCE_URI_PREFIX}<server id>"
        )
    };
    let first = instances.next().ok_or_else(missing)?;
    if instances.next().is_some() {
        return Err(format!(
            "the client certificate names several instances: issue one certificate per instance, with one \
             {INSTANCE_URI_PREFIX}<server id> SAN URI"
        ));
    }
    Uuid::parse_str(first).map_err(|_| {
        format!(
            "the client certificate's instance URI does not end in a server id (a UUID): issue it with \
             {INSTANCE_URI_PREFIX}<server id>"
        )
    })
}

/// With client certificates checked: the call's certificate must be bound to `server_id` (UNAUTHENTICATED without
/// one, PERMISSION_DENIED for another instance's or one that names none).
pub fn check_instance_certificate(
    certificates: Option<&[CertificateDer<'static>]>,
    server_id: Uuid,
) -> ServiceResult<()> {
    let Some(leaf) = certificates.and_then(<[_]>::first) else {
        return Err(ServiceError::unauthenticated(format!(
            "this aggregator requires a client certificate for calls with an instance credential: configure the \
             agent's `aggregator.client_cert` and `aggregator.client_key` with a certificate from the aggregator's \
             client CA carrying the SAN URI {INSTANCE_URI_PREFIX}{server_id}"
        )));
    };
    let named = certificate_instance(leaf).map_err(ServiceError::permission_denied)?;
    if named != server_id {
        return Err(ServiceError::permission_denied(format!(
            "the client certificate is bound to instance {named}, not to instance {server_id} of this credential: \
             give the agent its own instance's certificate"
        )));
    }
    Ok(())
}
