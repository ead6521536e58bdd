//! Sending alerts and pings: webhooks (a JSON POST), e-mail (SMTP with STARTTLS, TLS, or plain
//! to a local relay; the `lettre` crate), and healthchecks-style ping URLs (`URL/start` when a
//! snapshot starts, `URL` when it succeeds, `URL/fail` when it fails, as healthchecks.io and
//! compatible services take them). HTTP goes through `ureq` (rustls), on the blocking pool.
//!
//! A webhook receives one JSON object per notice:
//!
//! ```json
//! {"source":"sa-image","host":"server1","event":"alert","kind":"margin_low","key":"margin_low/system",
//!  "volume":"system","agent":null,"message":"...","since":"2025-01-15T10:00:00Z",
//!  "at":"2025-01-15T10:05:00Z","repeat":false,"page":"https://server1:7711/",
//!  "text":"[sa-image on server1] ALERT: ... — ..."}
//! ```
//!
//! (`text` makes it readable as is by chat webhooks that show a `text` field.)

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sa_engine::time::rfc3339;

use super::alerts::{subject, Notice};
use super::config::{AlertSettings, Email, SmtpSecurity};

/// How long one HTTP request or SMTP session may take.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Where alerts go, and what they say about this server.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Channels.
    pub settings: AlertSettings,
    /// This machine's name.
    pub host: String,
    /// The status page's address, when known.
    pub page: Option<String>,
}

/// A healthchecks-style ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ping {
    /// The job starts (`URL/start`).
    Start,
    /// It succeeded (`URL`).
    Success,
    /// It failed (`URL/fail`).
    Fail,
}

impl Notifier {
    /// Whether any channel is configured.
    pub fn has_channels(&self) -> bool {
        !self.settings.webhooks.is_empty() || self.settings.email.is_some()
    }

    /// Sends `n` on every channel; Ok when at least one took it (or none is configured), else
    /// every failure.
    pub async fn send(&self, n: &Notice) -> Result<(), String> {
        if !self.has_channels() {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut delivered = false;
        let text = self.text(n);
        for url in &self.settings.webhooks {
            let body = self.webhook_body(n, &text);
            match post(url, body).await {
                Ok(()) => delivered = true,
                Err(e) => errors.push(format!("webhook {url}: {e}")),
            }
        }
        if let Some(mail) = &self.settings.email {
            let subject = format!("[sa-image on {}] {}", self.host, subject(n));
            match send_mail(mail, &subject, &text).await {
                Ok(()) => delivered = true,
                Err(e) => errors.push(format!("e-mail via {}:{}: {e}", mail.host, mail.port)),
            }
        }
        for e in &errors {
            tracing::warn!("alert {} not delivered: {e}", n.key);
        }
        if delivered {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The body for people (e-mail, and the webhook's `text`).
    pub fn text(&self, n: &Notice) -> String {
        let mut t = format!("[sa-image on {}] {}: {}", self.host, subject(n), n.message);
        if n.event == "resolved" {
            t = format!(
                "[sa-image on {}] {}: this is no longer the case (since {}): {}",
                self.host,
                subject(n),
                rfc3339(n.since_ms / 1000),
                n.message
            );
        } else if n.repeat {
            t.push_str(&format!(
                " (still the case; first seen {})",
                rfc3339(n.since_ms / 1000)
            ));
        }
        if let Some(p) = &self.page {
            t.push_str(&format!("\nStatus page: {p}"));
        }
        t
    }

    fn webhook_body(&self, n: &Notice, text: &str) -> String {
        let now = sa_engine::clock::Clock::now_secs(&sa_engine::clock::SystemClock);
        serde_json::json!({
            "source": "sa-image",
            "host": self.host,
            "event": n.event,
            "kind": n.kind,
            "key": n.key,
            "volume": n.volume,
            "agent": n.agent,
            "message": n.message,
            "since": rfc3339(n.since_ms / 1000),
            "at": rfc3339(now),
            "repeat": n.repeat,
            "page": self.page,
            "text": text,
        })
        .to_string()
    }
}

/// POSTs a JSON `body` to `url`; a status other than 2xx is an error.
pub async fn post(url: &str, body: String) -> Result<(), String> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header(
                "User-Agent",
                concat!("sa-image/", env!("CARGO_PKG_VERSION")),
            )
            .send(body)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Pings `base` (a healthchecks-style URL) for `what`, with `body` (an error, or figures);
/// failures are logged, never fatal.
pub async fn ping(base: &str, what: Ping, body: String) {
    let base = base.trim_end_matches('/');
    let url = match what {
        Ping::Start => format!("{base}/start"),
        Ping::Success => base.to_string(),
        Ping::Fail => format!("{base}/fail"),
    };
    if let Err(e) = post(&url, body).await {
        tracing::warn!("healthcheck ping {url} failed: {e}");
    }
}

async fn send_mail(m: &Email, subject: &str, text: &str) -> Result<(), String> {
    let mut b = Message::builder()
        .from(
            m.from
                .parse()
                .map_err(|e| format!("alerts.email_from '{}': {e}", m.from))?,
        )
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &m.to {
        b = b.to(to
            .parse()
            .map_err(|e| format!("alerts.email_to '{to}': {e}"))?);
    }
    let msg = b.body(text.to_string()).map_err(|e| e.to_string())?;
    let mut t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(m.host.clone())
        .port(m.port)
        .timeout(Some(TIMEOUT));
    if m.security != SmtpSecurity::None {
        let mut p = TlsParameters::builder(m.host.clone());
        if let Some(ca) = &m.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read alerts.smtp_ca_file {}: {e}", ca.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| format!("alerts.smtp_ca_file {}: {e}", ca.display()))?;
            p = p.add_root_certificate(cert);
        }
        let p = p.build_rustls().map_err(|e| e.to_string())?;
        t = t.tls(match m.security {
            SmtpSecurity::Tls => Tls::Wrapper(p),
            _ => Tls::Required(p),
        });
    }
    if let Some((user, file)) = &m.login {
        let pass = crate::passphrase::from_file(file).map_err(|e| format!("{e:#}"))?;
        let pass =
            String::from_utf8(pass).map_err(|_| format!("{} is not UTF-8 text", file.display()))?;
        t = t.credentials(Credentials::new(user.clone(), pass));
    }
    t.build()
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
