//! The report by email: the run log as a plain-text body, the subject from
//! [`super::subject_line`], sent with lettre over SMTP with STARTTLS,
//! implicit TLS or plain (for a local relay), optional login, and retries
//! with exponential backoff on transient failures.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::{Deserialize, Serialize};
use xenvault_types::report::RunReport;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS (required), port 587 by default.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS), port 465 by default.
    Tls,
    /// No TLS at all (a relay on localhost), port 25 by default.
    Plain,
}

impl SmtpSecurity {
    /// The usual port.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::Starttls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::Plain => 25,
        }
    }
}

/// Where and how to send report emails.
#[derive(Clone, PartialEq, Eq)]
pub struct EmailSettings {
    /// SMTP server host name or address.
    pub server: String,
    /// Port; `None` = the security mode's usual port.
    pub port: Option<u16>,
    /// STARTTLS, TLS or plain.
    pub security: SmtpSecurity,
    /// Login user, if the server wants one.
    pub username: Option<String>,
    /// Login password (never logged).
    pub password: Option<String>,
    /// Sender address (`xenvault@example.org` or `Backups <b@example.org>`).
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
    /// Attempts in total (at least 1).
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub backoff: Duration,
    /// Timeout of each SMTP command.
    pub timeout: Duration,
    /// An extra CA certificate (PEM) to trust for this server, e.g. a
    /// private mail server's CA; the system roots are trusted anyway.
    pub extra_root_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for EmailSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never shown.
        f.debug_struct("EmailSettings")
            .field("server", &self.server)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl EmailSettings {
    /// Settings with the defaults: STARTTLS on 587, no login, 3 attempts,
    /// 5 s first backoff, 60 s timeout.
    pub fn new(
        server: impl Into<String>,
        from: impl Into<String>,
        to: Vec<String>,
    ) -> EmailSettings {
        EmailSettings {
            server: server.into(),
            port: None,
            security: SmtpSecurity::Starttls,
            username: None,
            password: None,
            from: from.into(),
            to,
            attempts: 3,
            backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            extra_root_pem: None,
        }
    }

    /// The port in use.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(self.security.default_port())
    }
}

/// Why an email was not sent.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// An address is not a valid mailbox.
    #[error(
        "email: the {field} address {value:?} is not valid ({detail}); write it as user@example.org or \"Name <user@example.org>\""
    )]
    Address {
        /// `from` or `to`.
        field: &'static str,
        /// The address as given.
        value: String,
        /// The parser's message.
        detail: String,
    },
    /// No recipient is configured.
    #[error("email: no recipient configured (set at least one `to` address)")]
    NoRecipients,
    /// A user without password or the reverse.
    #[error("email: login needs both a user name and a password")]
    IncompleteLogin,
    /// The message could not be built.
    #[error("email: cannot build the message: {0}")]
    Build(String),
    /// TLS could not be set up for the server name.
    #[error("email: cannot set up TLS for {server}: {detail}")]
    Tls {
        /// The server.
        server: String,
        /// Why.
        detail: String,
    },
    /// Every attempt failed (or the server refused for good).
    #[error(
        "email: sending through {server}:{port} ({security:?}) failed after {attempts} attempt(s): {detail}"
    )]
    Send {
        /// The server.
        server: String,
        /// The port.
        port: u16,
        /// The security mode.
        security: SmtpSecurity,
        /// Attempts made.
        attempts: u32,
        /// The last error, with its causes.
        detail: String,
    },
}

fn mailbox(field: &'static str, value: &str) -> Result<Mailbox, EmailError> {
    value
        .trim()
        .parse::<Mailbox>()
        .map_err(|e| EmailError::Address {
            field,
            value: value.to_string(),
            detail: e.to_string(),
        })
}

/// The report email: subject from [`super::subject_line`], body the run log.
pub fn build_report_message(
    settings: &EmailSettings,
    report: &RunReport,
) -> Result<Message, EmailError> {
    build_message(
        settings,
        &super::subject_line(report),
        &super::render_text(report),
    )
}

/// A plain-text message from the settings' sender to its recipients.
pub fn build_message(
    settings: &EmailSettings,
    subject: &str,
    body: &str,
) -> Result<Message, EmailError> {
    if settings.to.is_empty() {
        return Err(EmailError::NoRecipients);
    }
    let mut builder = Message::builder()
        .from(mailbox("from", &settings.from)?)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &settings.to {
        builder = builder.to(mailbox("to", to)?);
    }
    // lettre picks the transfer encoding: 7bit for short ASCII lines,
    // quoted-printable when a line of the log passes 76 characters.
    builder
        .body(body.to_string())
        .map_err(|e| EmailError::Build(e.to_string()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn transport(settings: &EmailSettings) -> Result<AsyncSmtpTransport<Tokio1Executor>, EmailError> {
    let tls = |server: &str| {
        let fail = |e: lettre::transport::smtp::Error| EmailError::Tls {
            server: server.to_string(),
            detail: error_chain(&e),
        };
        let mut builder = TlsParameters::builder(server.to_string());
        if let Some(pem) = &settings.extra_root_pem {
            builder = builder.add_root_certificate(Certificate::from_pem(pem).map_err(fail)?);
        }
        builder.build_rustls().map_err(fail)
    };
    let mut builder =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.server.clone())
            .port(settings.port())
            .timeout(Some(settings.timeout));
    builder = match settings.security {
        SmtpSecurity::Starttls => builder.tls(Tls::Required(tls(&settings.server)?)),
        SmtpSecurity::Tls => builder.tls(Tls::Wrapper(tls(&settings.server)?)),
        SmtpSecurity::Plain => builder.tls(Tls::None),
    };
    match (&settings.username, &settings.password) {
        (Some(user), Some(password)) => {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        (None, None) => {}
        _ => return Err(EmailError::IncompleteLogin),
    }
    Ok(builder.build())
}

/// Sends `message`, retrying transient failures with exponential backoff.
/// Returns the number of attempts it took.
pub async fn send_message(settings: &EmailSettings, message: &Message) -> Result<u32, EmailError> {
    let transport = transport(settings)?;
    let attempts = settings.attempts.max(1);
    let mut wait = settings.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match transport.send(message.clone()).await {
            Ok(_) => return Ok(attempt),
            Err(e) => {
                let detail = error_chain(&e);
                if e.is_permanent() || attempt >= attempts {
                    return Err(EmailError::Send {
                        server: settings.server.clone(),
                        port: settings.port(),
                        security: settings.security,
                        attempts: attempt,
                        detail,
                    });
                }
                tracing::warn!(
                    "email attempt {attempt}/{attempts} through {}:{} failed: {detail}; retrying in {:?}",
                    settings.server,
                    settings.port(),
                    wait
                );
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
        }
    }
}

/// Sends the report email. Returns the number of attempts it took.
pub async fn send_report(settings: &EmailSettings, report: &RunReport) -> Result<u32, EmailError> {
    let message = build_report_message(settings, report)?;
    send_message(settings, &message).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_login_are_checked() {
        let mut s = EmailSettings::new("localhost", "not an address", vec!["a@b.c".into()]);
        let r = RunReport::new("j", "p", "h", "r", "t", time::OffsetDateTime::UNIX_EPOCH);
        let e = build_report_message(&s, &r).unwrap_err();
        assert!(e.to_string().contains("from address"), "{e}");
        s.from = "Backups <x@y.z>".into();
        s.to.clear();
        assert!(matches!(
            build_report_message(&s, &r),
            Err(EmailError::NoRecipients)
        ));
        s.to.push("ops@y.z".into());
        assert!(build_report_message(&s, &r).is_ok());
        s.username = Some("u".into());
        assert!(matches!(transport(&s), Err(EmailError::IncompleteLogin)));
        assert_eq!(SmtpSecurity::Tls.default_port(), 465);
    }
}
