//! Sessions: login with an originator, logout, following `HOST_IS_SLAVE` to
//! the pool coordinator, and logging in again on `SESSION_INVALID`.
//!
//! A [`Session`] is one login to one pool, shared by every task of a run:
//! it is `Clone + Send + Sync` and cloning is an `Arc` bump. Each call sends
//! the current session ref first. When XAPI answers `SESSION_INVALID` (xapi
//! restart, expiry after 24 h idle, eviction past 500 sessions per
//! originator), the session logs in again — once, shared by all concurrent
//! callers — and retries the call once. When a call or login answers
//! `HOST_IS_SLAVE [address]`, it reconnects to that address with the same
//! scheme and port (IPv6 bracketed) and retries once. See
//! `docs/xapi-notes.md`, "Sessions".
//!
//! The password and the session ref are secrets: neither appears in `Debug`
//! output, error messages or logs.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::Url;
use xenvault_types::rpc::Value;

use crate::de::from_value;
use crate::error::{Error, ErrorCode, Result};
use crate::model::{MessageSpec, ParamSpec};
use crate::tls::TlsPolicy;
use crate::transport::{
    ConnectOptions, Protocol, Transport, build_http_client, coordinator_url, parse_pool_url,
    shown_url,
};

/// A password; `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Password {
        Password(password.into())
    }

    /// The password text, for the login call only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// User name and password for `session.login_with_password`.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The user name (`root`, or an AD user).
    pub user: String,
    /// The password.
    pub password: Password,
}

impl Credentials {
    /// Credentials from a user name and password.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: Password::new(password),
        }
    }
}

/// A session ref: a bearer secret. `Debug` redacts it.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRef(String);

impl SessionRef {
    /// The ref text, to put in a request (`session_id=` query parameter, NBD
    /// export name). Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionRef(<redacted>)")
    }
}

/// The wire name of the login call.
pub const LOGIN_METHOD: &str = "session.login_with_password";
/// The parameter names of the login call, in order.
pub const LOGIN_PARAMS: [&str; 4] = ["uname", "pwd", "version", "originator"];
/// The API version string sent at login (xapi's documented default).
pub const LOGIN_VERSION: &str = "1.1";
/// The wire name of the logout call.
pub const LOGOUT_METHOD: &str = "session.logout";

/// The login and logout calls, for the conformance test.
pub fn session_specs() -> Vec<MessageSpec> {
    vec![
        MessageSpec {
            wire: LOGIN_METHOD.to_string(),
            params: LOGIN_PARAMS
                .iter()
                .map(|name| ParamSpec {
                    name: (*name).to_string(),
                    ty: "string".to_string(),
                })
                .collect(),
            result: "session ref".to_string(),
            takes_session: false,
            omits_trailing: false,
            hidden: false,
        },
        MessageSpec {
            wire: LOGOUT_METHOD.to_string(),
            params: vec![],
            result: "void".to_string(),
            takes_session: true,
            omits_trailing: false,
            hidden: false,
        },
    ]
}

/// An unauthenticated XAPI endpoint: the pool URL, the HTTP client built
/// with the TLS policy, and the options. [`Client::login`] makes a
/// [`Session`].
#[derive(Clone)]
pub struct Client {
    url: Url,
    http: reqwest::Client,
    options: ConnectOptions,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &shown_url(&self.url))
            .field("options", &self.options)
            .finish()
    }
}

impl Client {
    /// A client for the pool at `url` (`https://host` or `http://host:port`).
    pub fn new(url: &str, options: ConnectOptions) -> Result<Client> {
        let url = parse_pool_url(url)?;
        let http = build_http_client(&options)?;
        Ok(Client { url, http, options })
    }

    /// Connects and logs in: the usual entry point.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), xenvault_xapi::error::Error> {
    /// use xenvault_xapi::session::{Client, Credentials};
    /// use xenvault_xapi::tls::TlsPolicy;
    /// let session = Client::connect("https://pool", Credentials::new("root", "pw"), TlsPolicy::Verify).await?;
    /// let vms = session.vm().get_all_records().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str, credentials: Credentials, tls: TlsPolicy) -> Result<Session> {
        Client::new(url, ConnectOptions::new(tls))?
            .login(credentials)
            .await
    }

    /// Like [`Client::connect`], with all options.
    pub async fn connect_with(
        url: &str,
        credentials: Credentials,
        options: ConnectOptions,
    ) -> Result<Session> {
        Client::new(url, options)?.login(credentials).await
    }

    /// Logs in (following `HOST_IS_SLAVE` to the coordinator).
    pub async fn login(self, credentials: Credentials) -> Result<Session> {
        let (transport, session_ref) = login(&self, self.url.clone(), &credentials).await?;
        tracing::info!(
            url = %shown_url(transport.base_url()),
            user = %credentials.user,
            originator = %self.options.originator,
            "logged in to XAPI"
        );
        let connection = Arc::new(Connection {
            transport,
            session_ref,
            generation: 0,
            logged_out: false,
        });
        Ok(Session {
            inner: Arc::new(SessionInner {
                client: self,
                credentials,
                connection: RwLock::new(connection),
                relogin: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The pool URL as given.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The HTTP client (TLS policy applied), for the data plane.
    pub fn http_client(&self) -> &reqwest::Client {
        &self.http
    }

    /// The options.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }
}

/// Logs in at `start`, following `HOST_IS_SLAVE`. Returns the transport of
/// the host that accepted the login.
async fn login(
    client: &Client,
    start: Url,
    credentials: &Credentials,
) -> Result<(Transport, SessionRef)> {
    let mut url = start;
    let mut chain = Vec::new();
    loop {
        let transport = Transport::new(
            client.http.clone(),
            url.clone(),
            client.options.protocol,
            client.options.rpc_timeout,
        );
        let params = [
            Value::str(credentials.user.clone()),
            Value::str(credentials.password.expose()),
            Value::str(LOGIN_VERSION),
            Value::str(client.options.originator.clone()),
        ];
        match transport.call(LOGIN_METHOD, &params, None).await {
            Ok(value) => {
                let raw: String = from_value(&value).map_err(|e| e.for_method(LOGIN_METHOD))?;
                if raw.is_empty() {
                    return Err(Error::Protocol {
                        method: LOGIN_METHOD.into(),
                        url: shown_url(&url),
                        detail: "the login returned an empty session ref".into(),
                    });
                }
                return Ok((transport, SessionRef(raw)));
            }
            Err(Error::Xapi { error, .. }) if error.code == ErrorCode::HostIsSlave => {
                chain.push(shown_url(&url));
                if chain.len() > client.options.max_coordinator_redirects {
                    return Err(Error::TooManyRedirects { chain });
                }
                let coordinator = error.param(0).unwrap_or_default();
                tracing::info!(from = %shown_url(&url), coordinator, "HOST_IS_SLAVE: connecting to the pool coordinator");
                url = coordinator_url(&url, coordinator)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The current connection of a session: which host, which ref.
struct Connection {
    transport: Transport,
    session_ref: SessionRef,
    generation: u64,
    logged_out: bool,
}

impl Connection {
    async fn call(
        &self,
        method: &str,
        params: &[Value],
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let mut full = Vec::with_capacity(params.len() + 1);
        full.push(Value::str(self.session_ref.expose()));
        full.extend_from_slice(params);
        self.transport.call(method, &full, timeout).await
    }
}

struct SessionInner {
    client: Client,
    credentials: Credentials,
    connection: RwLock<Arc<Connection>>,
    relogin: tokio::sync::Mutex<()>,
}

/// A logged-in XAPI session to one pool. Cheap to clone; share it.
///
/// Typed calls live in [`crate::api`] (`session.vm().snapshot(…)`); raw
/// calls are [`Session::call`] and [`Session::call_value`].
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let conn = self.connection();
        f.debug_struct("Session")
            .field("url", &shown_url(conn.transport.base_url()))
            .field("user", &self.inner.credentials.user)
            .field("protocol", &conn.transport.protocol())
            .field("logins", &(conn.generation + 1))
            .finish_non_exhaustive()
    }
}

enum Recovery {
    Relogin,
    Coordinator(String),
}

impl Session {
    fn connection(&self) -> Arc<Connection> {
        self.inner
            .connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Calls `method` with the session ref and `params`, and decodes the
    /// result as `T` by datamodel type. Prefer the typed wrappers of
    /// [`crate::api`]: raw calls are not covered by the datamodel
    /// conformance test.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        params: Vec<Value>,
    ) -> Result<T> {
        let value = self.call_value(method, params).await?;
        from_value(&value).map_err(|e| e.for_method(method))
    }

    /// Calls `method` with the session ref and `params`; returns the raw value.
    pub async fn call_value(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        self.call_value_with_timeout(method, params, None).await
    }

    /// As [`Session::call_value`], with an HTTP timeout for this call.
    pub async fn call_value_with_timeout(
        &self,
        method: &str,
        params: Vec<Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let conn = self.connection();
        if conn.logged_out {
            return Err(Error::LoggedOut);
        }
        let recovery = match conn.call(method, &params, timeout).await {
            Err(Error::Xapi { error, .. }) if error.code == ErrorCode::SessionInvalid => {
                Recovery::Relogin
            }
            Err(Error::Xapi { error, .. }) if error.code == ErrorCode::HostIsSlave => {
                Recovery::Coordinator(error.param(0).unwrap_or_default().to_string())
            }
            other => return other,
        };
        let conn = match recovery {
            Recovery::Relogin => {
                tracing::info!(
                    method,
                    "SESSION_INVALID: logging in again and retrying once"
                );
                self.reconnect(conn.generation, None).await?
            }
            Recovery::Coordinator(address) => {
                tracing::info!(method, coordinator = %address, "HOST_IS_SLAVE: reconnecting to the coordinator and retrying once");
                self.reconnect(conn.generation, Some(&address)).await?
            }
        };
        conn.call(method, &params, timeout).await
    }

    /// Logs in again (at `coordinator` if given), unless another caller
    /// already did since `seen_generation`.
    async fn reconnect(
        &self,
        seen_generation: u64,
        coordinator: Option<&str>,
    ) -> Result<Arc<Connection>> {
        let _guard = self.inner.relogin.lock().await;
        let current = self.connection();
        if current.logged_out {
            return Err(Error::LoggedOut);
        }
        if current.generation != seen_generation {
            return Ok(current);
        }
        let start = match coordinator {
            Some(address) => coordinator_url(current.transport.base_url(), address)?,
            None => current.transport.base_url().clone(),
        };
        let (transport, session_ref) =
            login(&self.inner.client, start, &self.inner.credentials).await?;
        let fresh = Arc::new(Connection {
            transport,
            session_ref,
            generation: seen_generation + 1,
            logged_out: false,
        });
        *self
            .inner
            .connection
            .write()
            .unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }

    /// Forces a new login if the session ref is still `stale` (e.g. after an
    /// HTTP handler answered 401 for it). Concurrent callers share one login.
    pub async fn renew(&self, stale: &SessionRef) -> Result<()> {
        let current = self.connection();
        if &current.session_ref != stale {
            return Ok(());
        }
        self.reconnect(current.generation, None).await.map(|_| ())
    }

    /// Logs out (`session.logout`). Later calls on any clone fail with
    /// [`Error::LoggedOut`].
    pub async fn logout(&self) -> Result<()> {
        let _guard = self.inner.relogin.lock().await;
        let current = self.connection();
        if current.logged_out {
            return Ok(());
        }
        let result = current.call(LOGOUT_METHOD, &[], None).await;
        let closed = Arc::new(Connection {
            transport: Transport::new(
                self.inner.client.http.clone(),
                current.transport.base_url().clone(),
                self.inner.client.options.protocol,
                self.inner.client.options.rpc_timeout,
            ),
            session_ref: SessionRef(String::new()),
            generation: current.generation + 1,
            logged_out: true,
        });
        *self
            .inner
            .connection
            .write()
            .unwrap_or_else(|p| p.into_inner()) = closed;
        match result {
            // An already invalid session is as good as logged out.
            Err(Error::Xapi { error, .. }) if error.code == ErrorCode::SessionInvalid => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// The base URL of the host the session is logged in to (the
    /// coordinator, after `HOST_IS_SLAVE` redirections). HTTP transfers go
    /// there.
    pub fn base_url(&self) -> Url {
        self.connection().transport.base_url().clone()
    }

    /// The current session ref, for `session_id=` query parameters. A
    /// secret: never log it. It changes after a new login.
    pub fn session_ref(&self) -> SessionRef {
        self.connection().session_ref.clone()
    }

    /// The HTTP client (with the session's TLS policy), for HTTP transfers.
    pub fn http_client(&self) -> reqwest::Client {
        self.inner.client.http.clone()
    }

    /// The protocol in use, once known.
    pub fn protocol(&self) -> Option<Protocol> {
        self.connection().transport.protocol()
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.inner.credentials.user
    }

    /// The connection options.
    pub fn options(&self) -> &ConnectOptions {
        &self.inner.client.options
    }

    /// How many times the session has logged in again since the first login
    /// (a logout counts too): useful in tests and reports.
    pub fn relogin_count(&self) -> u64 {
        self.connection().generation
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_in_debug_output() {
        let c = Credentials::new("root", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let r = SessionRef("OpaqueRef:abc".into());
        assert!(!format!("{r:?}").contains("abc"));
    }

    #[test]
    fn session_is_cheap_to_share() {
        fn assert_traits<T: Clone + Send + Sync + 'static>() {}
        assert_traits::<Session>();
    }
}
