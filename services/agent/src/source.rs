//! Reading an instance's users: from a local `all_users.csv` or from the live GHES report (SPEC §2).
//!
//! GHES builds the report in the background and answers `202 Accepted` until it is ready, so the live source polls
//! with exponential backoff until a deadline. Transient failures (connection errors, timeouts, 5xx) are retried a
//! bounded number of times; refused credentials are not, because retrying cannot fix them.

use std::path::Path;
use std::time::Duration;

use license_sync_core::all_users_csv::{ParsedReport, read_all_users_csv};
use license_sync_core::model::InstanceLicense;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::config::{AgentConfig, GhesSourceConfig, Secret, SourceConfig};
use crate::error::{AgentError, error_chain};
use crate::retry::{Backoff, POLL_JITTER};

/// Path of the site-admin report, relative to the instance's base URL.
pub const REPORT_PATH: &str = "stafftools/reports/all_users.csv";
pub const LICENSE_PATH: &str = "api/v3/enterprise/settings/license";
pub const META_PATH: &str = "api/v3/meta";

/// What one read of the source produced.
#[derive(Debug)]
pub struct SourceData {
    pub report: ParsedReport,
    /// When the report was obtained (UTC, whole seconds): the snapshot's `generated_at`.
    pub read_at: OffsetDateTime,
    /// The GHES license, when the source is GHES, `read_license` is on and GHES answered.
    pub license: Option<InstanceLicense>,
    /// `installed_version` from `GET /api/v3/meta`, when it was asked for and GHES answered.
    pub ghes_version: Option<String>,
}

/// Reads the configured source. For GHES, also reads the license (`source.read_license`) and the version (when
/// `instance.ghes_version` is not configured); failures of those two are logged and do not fail the read.
pub async fn read_source(config: &AgentConfig) -> Result<SourceData, AgentError> {
    match &config.source {
        SourceConfig::File(file) => {
            let report = read_file(&file.path).await?;
            Ok(SourceData {
                report,
                read_at: now_utc_seconds(),
                license: None,
                ghes_version: None,
            })
        }
        SourceConfig::Ghes(ghes) => {
            let client = GhesClient::new(ghes)?;
            let report = client.read_report().await?;
            let read_at = now_utc_seconds();
            let license = if ghes.read_license {
                match client.fetch_license().await {
                    Ok(license) => Some(license),
                    Err(error) => {
                        tracing::warn!(
                            error = %error_chain(&error),
                            "cannot read the GHES license; continuing without it"
                        );
                        None
                    }
                }
            } else {
                None
            };
            let ghes_version = if config.instance.ghes_version.is_none() {
                match client.fetch_version().await {
                    Ok(version) => Some(version),
                    Err(error) => {
                        tracing::warn!(
                            error = %error_chain(&error),
                            "cannot read the GHES version from /api/v3/meta; set `instance.ghes_version` to \
                             report it"
                        );
                        None
                    }
                }
            } else {
                None
            };
            Ok(SourceData {
                report,
                read_at,
                license,
                ghes_version,
            })
        }
    }
}

/// The current time in UTC, truncated to whole seconds (the digest and the usage file carry seconds).
pub fn now_utc_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// Reads and parses a local `all_users.csv`. Parsing runs on the blocking pool: a large report takes a while.
pub async fn read_file(path: &Path) -> Result<ParsedReport, AgentError> {
    let owned = path.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&owned)?;
        Ok::<_, std::io::Error>(read_all_users_csv(std::io::BufReader::new(file)))
    })
    .await
    .map_err(|error| AgentError::Internal(format!("the CSV reader task failed: {error}")))?;
    match result {
        Ok(parsed) => parsed.map_err(AgentError::Report),
        Err(source) => Err(AgentError::SourceFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A blocking [`Read`](std::io::Read) over body chunks sent from the async download; an `Err` chunk becomes an I/O
/// error so that a broken download can never look like a complete, shorter report.
struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    chunk: Vec<u8>,
    position: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.position >= self.chunk.len() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.position = 0;
                }
                Some(Err(reason)) => return Err(std::io::Error::other(reason)),
                None => return Ok(0),
            }
        }
        let count = buffer.len().min(self.chunk.len() - self.position);
        buffer[..count].copy_from_slice(&self.chunk[self.position..self.position + count]);
        self.position += count;
        Ok(count)
    }
}

/// A client of one GHES instance's site-admin endpoints.
#[derive(Debug, Clone)]
pub struct GhesClient {
    http: reqwest::Client,
    base: Url,
    username: String,
    token: Secret,
    /// Limit for an answer's headers, and for each body chunk of the report (not the whole download: a large report
    /// on a slow link may take longer, as long as it keeps coming).
    request_timeout: Duration,
    report_deadline: Duration,
    poll_initial: Duration,
    poll_max: Duration,
    max_attempts: u32,
}

/// How one request of the report went, for the polling loop.
enum Attempt {
    Ready(ParsedReport),
    Pending,
    Transient(String),
}

impl GhesClient {
    pub fn new(config: &GhesSourceConfig) -> Result<Self, AgentError> {
        let token = config.token()?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("license-sync-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)));
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path).map_err(|source| {
                AgentError::Config(crate::config::ConfigError::Unreadable {
                    what: "the GHES CA certificate",
                    key: "source.ca_cert",
                    path: path.clone(),
                    source,
                })
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| {
                invalid_config(
                    "source.ca_cert",
                    format!(
                        "= {:?} is not a PEM certificate bundle: {}",
                        path.display(),
                        error_chain(&error)
                    ),
                )
            })?;
            if certificates.is_empty() {
                return Err(invalid_config(
                    "source.ca_cert",
                    format!("= {:?} holds no PEM certificate", path.display()),
                ));
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder.build().map_err(|error| {
            AgentError::Internal(format!(
                "cannot build the HTTP client: {}",
                error_chain(&error)
            ))
        })?;
        let mut base = config.url.clone();
        // `Url::join` replaces the last path segment unless the base ends with a slash.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(GhesClient {
            http,
            base,
            username: config.username.clone(),
            token,
            request_timeout: config.request_timeout,
            report_deadline: config.report_deadline,
            poll_initial: config.poll_initial,
            poll_max: config.poll_max,
            max_attempts: config.max_attempts,
        })
    }

    fn url(&self, path: &str) -> Result<Url, AgentError> {
        self.base.join(path).map_err(|error| {
            AgentError::Internal(format!("cannot build the URL of {path}: {error}"))
        })
    }

    /// Downloads and parses the `all_users.csv` report: polls while GHES answers 202, retries transient failures.
    ///
    /// The body is parsed while it downloads, so the raw CSV (tens of MiB on a large instance) is never held in
    /// memory next to the parsed users.
    pub async fn read_report(&self) -> Result<ParsedReport, AgentError> {
        let url = self.url(REPORT_PATH)?;
        let shown_url = url.to_string();
        let deadline = Instant::now() + self.report_deadline;
        let mut poll_backoff = Backoff::new(self.poll_initial, self.poll_max, POLL_JITTER);
        let mut retry_backoff = Backoff::new(self.poll_initial, self.poll_max, POLL_JITTER);
        let mut polls = 0u32;
        let mut failures = 0u32;
        loop {
            let attempt = self.report_attempt(&url).await?;
            let (delay, last_transient) = match attempt {
                Attempt::Ready(report) => return Ok(report),
                Attempt::Pending => {
                    polls += 1;
                    // GHES answered, so it is up: only consecutive failures count towards max_attempts.
                    failures = 0;
                    retry_backoff.reset();
                    let delay = poll_backoff.next_delay();
                    tracing::info!(
                        polls,
                        next_poll_ms = delay.as_millis() as u64,
                        "GHES is building the all_users.csv report (202 Accepted)"
                    );
                    (delay, None)
                }
                Attempt::Transient(reason) => {
                    failures += 1;
                    if failures >= self.max_attempts {
                        return Err(AgentError::SourceUnavailable {
                            url: shown_url,
                            attempts: failures,
                            reason,
                        });
                    }
                    let delay = retry_backoff.next_delay();
                    tracing::warn!(
                        attempt = failures,
                        max_attempts = self.max_attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        %reason,
                        "reading the all_users.csv report failed; retrying"
                    );
                    (delay, Some(reason))
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(match last_transient {
                    None => AgentError::ReportTimeout {
                        url: shown_url,
                        deadline_secs: self.report_deadline.as_secs(),
                        polls,
                    },
                    Some(reason) => AgentError::SourceUnavailable {
                        url: shown_url,
                        attempts: failures,
                        reason: format!(
                            "{reason} (gave up at the report deadline of {}s)",
                            self.report_deadline.as_secs()
                        ),
                    },
                });
            }
            // The last wait is cut at the deadline so that the final request happens right at it.
            tokio::time::sleep(delay.min(deadline - now)).await;
        }
    }

    async fn report_attempt(&self, url: &Url) -> Result<Attempt, AgentError> {
        let request = self
            .http
            .get(url.clone())
            .basic_auth(&self.username, Some(self.token.expose_secret()))
            .header(reqwest::header::ACCEPT, "text/csv")
            .send();
        let response = match tokio::time::timeout(self.request_timeout, request).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Ok(Attempt::Transient(error_chain(&error))),
            Err(_) => {
                return Ok(Attempt::Transient(format!(
                    "no answer within {}s (source.request_timeout_secs)",
                    self.request_timeout.as_secs()
                )));
            }
        };
        let status = response.status();
        match status {
            StatusCode::OK => self.download_and_parse(response).await,
            StatusCode::ACCEPTED => Ok(Attempt::Pending),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(AgentError::SourceCredentials {
                    url: url.to_string(),
                    status: status.as_u16(),
                })
            }
            status
                if status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT =>
            {
                Ok(Attempt::Transient(format!("HTTP {status}")))
            }
            _ => Err(unexpected_status(url, response).await),
        }
    }

    /// Feeds the body to the CSV reader on the blocking pool, chunk by chunk. A body that breaks off or stalls for
    /// `request_timeout` is a transient failure (the whole report is read again), never a short report.
    async fn download_and_parse(
        &self,
        mut response: reqwest::Response,
    ) -> Result<Attempt, AgentError> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(8);
        let parser = tokio::task::spawn_blocking(move || {
            read_all_users_csv(ChannelReader {
                receiver,
                chunk: Vec::new(),
                position: 0,
            })
        });
        let mut downloaded: u64 = 0;
        let mut failure = None;
        loop {
            let chunk = match tokio::time::timeout(self.request_timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => break,
                Ok(Err(error)) => {
                    failure = Some(format!("the download broke off: {}", error_chain(&error)));
                    break;
                }
                Err(_) => {
                    failure = Some(format!(
                        "the download stalled for {}s (source.request_timeout_secs)",
                        self.request_timeout.as_secs()
                    ));
                    break;
                }
            };
            downloaded += chunk.len() as u64;
            if sender.send(Ok(chunk.to_vec())).await.is_err() {
                // The reader stopped early (the report is unusable): its error is the one to report.
                break;
            }
        }
        if let Some(reason) = &failure {
            let _ = sender.send(Err(reason.clone())).await;
        }
        drop(sender);
        let parsed = parser.await.map_err(|error| {
            AgentError::Internal(format!("the CSV reader task failed: {error}"))
        })?;
        if let Some(reason) = failure {
            return Ok(Attempt::Transient(reason));
        }
        tracing::info!(bytes = downloaded, "downloaded the all_users.csv report");
        parsed.map(Attempt::Ready).map_err(AgentError::Report)
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, AgentError> {
        let url = self.url(path)?;
        let response = self
            .http
            .get(url.clone())
            .basic_auth(&self.username, Some(self.token.expose_secret()))
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|error| AgentError::SourceUnavailable {
                url: url.to_string(),
                attempts: 1,
                reason: error_chain(&error),
            })?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(AgentError::SourceCredentials {
                    url: url.to_string(),
                    status: response.status().as_u16(),
                });
            }
            _ => return Err(unexpected_status(&url, response).await),
        }
        response
            .json::<T>()
            .await
            .map_err(|error| AgentError::SourceUnexpected {
                url: url.to_string(),
                status: 200,
                detail: format!("the JSON answer cannot be read: {}", error_chain(&error)),
            })
    }

    /// `GET /api/v3/enterprise/settings/license`, one attempt.
    pub async fn fetch_license(&self) -> Result<InstanceLicense, AgentError> {
        let answer: GhesLicense = self.get_json(LICENSE_PATH).await?;
        answer
            .into_license()
            .map_err(|detail| AgentError::SourceUnexpected {
                url: self.base.to_string() + LICENSE_PATH,
                status: 200,
                detail,
            })
    }

    /// `installed_version` of `GET /api/v3/meta`, one attempt.
    pub async fn fetch_version(&self) -> Result<String, AgentError> {
        #[derive(Deserialize)]
        struct Meta {
            installed_version: Option<String>,
        }
        let meta: Meta = self.get_json(META_PATH).await?;
        meta.installed_version
            .filter(|version| !version.trim().is_empty())
            .ok_or_else(|| AgentError::SourceUnexpected {
                url: self.base.to_string() + META_PATH,
                status: 200,
                detail: "the answer has no `installed_version`".to_owned(),
            })
    }
}

fn invalid_config(key: &str, message: String) -> AgentError {
    AgentError::Config(crate::config::ConfigError::Invalid(vec![
        crate::config::ConfigProblem {
            key: key.to_owned(),
            message,
        },
    ]))
}

/// An answer the agent has no handling for. Only GitHub's JSON `message` is quoted, never the raw body.
async fn unexpected_status(url: &Url, response: reqwest::Response) -> AgentError {
    let status = response.status();
    let message = response
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|body| {
            body.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    let hint = match status {
        StatusCode::NOT_FOUND => {
            "check that `source.url` is the instance's base URL (e.g. https://ghes.example.com) and that the \
             user is a site admin"
        }
        _ => "unexpected answer",
    };
    AgentError::SourceUnexpected {
        url: url.to_string(),
        status: status.as_u16(),
        detail: match message {
            Some(message) => format!("{hint} (GitHub says: {message})"),
            None => hint.to_owned(),
        },
    }
}

/// GHES's license answer. `seats` and `seats_available` are numbers or `"unlimited"`.
#[derive(Debug, Deserialize)]
pub struct GhesLicense {
    #[serde(default)]
    pub seats: Option<serde_json::Value>,
    #[serde(default)]
    pub seats_used: Option<serde_json::Value>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub expire_at: Option<String>,
}

impl GhesLicense {
    pub fn into_license(self) -> Result<InstanceLicense, String> {
        let seats_used = self
            .seats_used
            .as_ref()
            .and_then(json_integer)
            .ok_or_else(|| format!("`seats_used` is not a number: {:?}", self.seats_used))?;
        Ok(InstanceLicense {
            seats: self.seats.as_ref().and_then(json_integer),
            seats_used,
            kind: self.kind.unwrap_or_default(),
            expires_at: self.expire_at.as_deref().and_then(parse_ghes_time),
        })
    }
}

/// An integer given as a JSON number or a numeric string; anything else (`"unlimited"`) is `None`.
fn json_integer(value: &serde_json::Value) -> Option<i64> {
    match value {
        serde_json::Value::Number(number) => number.as_i64(),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// GHES writes `expire_at` as `2016/02/06 12:41:52 -0600`; RFC 3339 is accepted too. The result is in UTC.
pub fn parse_ghes_time(text: &str) -> Option<OffsetDateTime> {
    const GHES_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]/[month]/[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
    );
    let text = text.trim();
    OffsetDateTime::parse(text, GHES_FORMAT)
        .or_else(|_| OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339))
        .ok()
        .map(|time| time.to_offset(time::UtcOffset::UTC))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ghes_and_rfc3339_license_times_parse() {
        assert_eq!(
            parse_ghes_time("2016/02/06 12:41:52 -0600"),
            Some(datetime!(2016-02-06 18:41:52 UTC))
        );
        assert_eq!(
            parse_ghes_time("2027-02-06T12:41:52Z"),
            Some(datetime!(2027-02-06 12:41:52 UTC))
        );
        assert_eq!(parse_ghes_time("next year"), None);
    }

    #[test]
    fn license_seats_may_be_unlimited() {
        let license: GhesLicense = serde_json::from_value(serde_json::json!({
            "seats": "unlimited", "seats_used": 12, "seats_available": "unlimited",
            "kind": "standard", "days_until_expiration": 365, "expire_at": "2016/02/06 12:41:52 -0600"
        }))
        .expect("JSON");
        let license = license.into_license().expect("valid");
        assert_eq!(license.seats, None);
        assert_eq!(license.seats_used, 12);
        assert_eq!(license.kind, "standard");
        assert_eq!(license.expires_at, Some(datetime!(2016-02-06 18:41:52 UTC)));

        let numeric: GhesLicense = serde_json::from_value(
            serde_json::json!({ "seats": 100, "seats_used": "7", "expire_at": "?" }),
        )
        .expect("JSON");
        let numeric = numeric.into_license().expect("valid");
        assert_eq!(
            (numeric.seats, numeric.seats_used, numeric.expires_at),
            (Some(100), 7, None)
        );

        let broken: GhesLicense =
            serde_json::from_value(serde_json::json!({ "seats": 1 })).expect("JSON");
        assert!(broken.into_license().is_err());
    }
}
