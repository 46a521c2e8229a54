//! Errors of the XAPI client: XAPI failures (code and parameters kept as
//! data), transport and protocol errors, decoding errors naming the method and
//! field, and task timeouts.
//!
//! XAPI reports API errors inside a success HTTP response, as a list of
//! strings `[CODE, param1, …]` (`docs/xapi-notes.md`, "Wire protocol"). That
//! list becomes an [`XapiError`]; [`ErrorCode`] names the codes xenvault
//! branches on and keeps every other code verbatim in [`ErrorCode::Other`].

use std::fmt;
use std::time::Duration;

/// The result type of this crate's control plane.
pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal, )*) => {
        /// An XAPI error code. The codes xenvault branches on have a variant;
        /// every other code is kept as it came in [`ErrorCode::Other`].
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// Any other code, verbatim (for example `SR_BACKEND_FAILURE_44`).
            Other(String),
        }

        impl ErrorCode {
            /// Every named code as it travels on the wire.
            pub const KNOWN: &'static [&'static str] = &[$($wire),*];

            /// The code as XAPI spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$variant => $wire, )*
                    ErrorCode::Other(s) => s,
                }
            }

            /// The code for a wire string; unknown codes become [`ErrorCode::Other`].
            pub fn from_wire(s: &str) -> ErrorCode {
                match s {
                    $( $wire => ErrorCode::$variant, )*
                    other => ErrorCode::Other(other.to_string()),
                }
            }
        }
    };
}

error_codes! {
    /// `SESSION_INVALID [handle]`: expired or unknown session (the client logs in again).
    SessionInvalid = "SESSION_INVALID",
    /// `SESSION_AUTHENTICATION_FAILED [uname, msg]`: wrong user or password.
    SessionAuthenticationFailed = "SESSION_AUTHENTICATION_FAILED",
    /// `HOST_IS_SLAVE [coordinator address]`: the host is a pool member.
    HostIsSlave = "HOST_IS_SLAVE",
    /// `HANDLE_INVALID [class, ref]`: the object no longer exists.
    HandleInvalid = "HANDLE_INVALID",
    /// `UUID_INVALID [class, uuid]`: no object with that uuid.
    UuidInvalid = "UUID_INVALID",
    /// `MAP_DUPLICATE_KEY [table, field, uuid, key]`: `add_to_<map>` with an existing key.
    MapDuplicateKey = "MAP_DUPLICATE_KEY",
    /// `INTERNAL_ERROR [msg…]`.
    InternalError = "INTERNAL_ERROR",
    /// `MESSAGE_METHOD_UNKNOWN [method]`.
    MessageMethodUnknown = "MESSAGE_METHOD_UNKNOWN",
    /// `MESSAGE_PARAMETER_COUNT_MISMATCH [method, expected, received]` (older hosts).
    MessageParameterCountMismatch = "MESSAGE_PARAMETER_COUNT_MISMATCH",
    /// `MESSAGE_REMOVED`: the call was removed (e.g. `VM.snapshot_with_quiesce`).
    MessageRemoved = "MESSAGE_REMOVED",
    /// `VM_BAD_POWER_STATE [vm, expected, actual]`.
    VmBadPowerState = "VM_BAD_POWER_STATE",
    /// `OPERATION_NOT_ALLOWED [reason]`.
    OperationNotAllowed = "OPERATION_NOT_ALLOWED",
    /// `OPERATION_BLOCKED [ref, reason]`: `blocked_operations` holds the operation.
    OperationBlocked = "OPERATION_BLOCKED",
    /// `OTHER_OPERATION_IN_PROGRESS [class, object, …]`.
    OtherOperationInProgress = "OTHER_OPERATION_IN_PROGRESS",
    /// `VM_IS_TEMPLATE [vm]`.
    VmIsTemplate = "VM_IS_TEMPLATE",
    /// `VM_HAS_VUSBS [vm]`: snapshot refused because of USB passthrough.
    VmHasVusbs = "VM_HAS_VUSBS",
    /// `VDI_IN_USE [vdi, operation]`.
    VdiInUse = "VDI_IN_USE",
    /// `VDI_MISSING [sr, vdi]`.
    VdiMissing = "VDI_MISSING",
    /// `VDI_INCOMPATIBLE_TYPE [vdi, type]` (e.g. on `cbt_metadata` VDIs).
    VdiIncompatibleType = "VDI_INCOMPATIBLE_TYPE",
    /// `VDI_NO_CBT_METADATA [vdi]`.
    VdiNoCbtMetadata = "VDI_NO_CBT_METADATA",
    /// `VDI_CBT_ENABLED [vdi]`.
    VdiCbtEnabled = "VDI_CBT_ENABLED",
    /// `VDI_TOO_LARGE [vdi, max]`.
    VdiTooLarge = "VDI_TOO_LARGE",
    /// `VDI_IO_ERROR [msg]`.
    VdiIoError = "VDI_IO_ERROR",
    /// `SR_FULL [requested, maximum]`.
    SrFull = "SR_FULL",
    /// `SR_OPERATION_NOT_SUPPORTED [sr]`.
    SrOperationNotSupported = "SR_OPERATION_NOT_SUPPORTED",
    /// `SR_BACKEND_FAILURE [status, stdout, stderr]` (the numbered ones are `Other`;
    /// see [`XapiError::sr_backend_failure_number`]).
    SrBackendFailure = "SR_BACKEND_FAILURE",
    /// `TASK_CANCELLED [task]`.
    TaskCancelled = "TASK_CANCELLED",
    /// `TOO_MANY_PENDING_TASKS`.
    TooManyPendingTasks = "TOO_MANY_PENDING_TASKS",
    /// `IMPORT_INCOMPATIBLE_VERSION`: an XVA from a newer xapi.
    ImportIncompatibleVersion = "IMPORT_INCOMPATIBLE_VERSION",
    /// `EVENTS_LOST`: restart the event loop.
    EventsLost = "EVENTS_LOST",
    /// `EVENT_FROM_TOKEN_PARSE_FAILURE [token]`.
    EventFromTokenParseFailure = "EVENT_FROM_TOKEN_PARSE_FAILURE",
    /// `RBAC_PERMISSION_DENIED [permission, message]`.
    RbacPermissionDenied = "RBAC_PERMISSION_DENIED",
    /// `LICENCE_RESTRICTION [feature]` (e.g. CBT on unlicensed XenServer).
    LicenceRestriction = "LICENCE_RESTRICTION",
    /// `Fault [msg]`: e.g. `Async.` on a call that has no async mode.
    Fault = "Fault",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ErrorCode {
    fn from(s: &str) -> Self {
        ErrorCode::from_wire(s)
    }
}

/// An XAPI failure: the error code and its parameters, as XAPI sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct XapiError {
    /// The error code (`ErrorDescription[0]`).
    pub code: ErrorCode,
    /// The parameters (`ErrorDescription[1..]`), all strings.
    pub params: Vec<String>,
}

impl XapiError {
    /// An error from its code and parameters.
    pub fn new(code: impl Into<ErrorCode>, params: Vec<String>) -> XapiError {
        XapiError {
            code: code.into(),
            params,
        }
    }

    /// Builds the error from XAPI's `ErrorDescription` / `error_info` list
    /// `[code, params…]`. An empty list gives `INTERNAL_ERROR` with a note.
    pub fn from_description(mut description: Vec<String>) -> XapiError {
        if description.is_empty() {
            return XapiError::new(
                ErrorCode::InternalError,
                vec!["XAPI reported a failure with an empty error description".into()],
            );
        }
        let code = description.remove(0);
        XapiError {
            code: ErrorCode::from_wire(&code),
            params: description,
        }
    }

    /// Whether the code is `code` (compares wire strings, so it works for
    /// [`ErrorCode::Other`] codes too).
    pub fn is(&self, code: &str) -> bool {
        self.code.as_str() == code
    }

    /// The parameter at `index`, if present.
    pub fn param(&self, index: usize) -> Option<&str> {
        self.params.get(index).map(String::as_str)
    }

    /// For `SR_BACKEND_FAILURE_<n>`, the number `n`.
    pub fn sr_backend_failure_number(&self) -> Option<u32> {
        self.code
            .as_str()
            .strip_prefix("SR_BACKEND_FAILURE_")
            .and_then(|n| n.parse().ok())
    }

    /// Whether retrying the same call (possibly after a delay, a new login or a
    /// reconnect) can succeed. Conservative: only conditions known to be
    /// transient.
    pub fn is_retryable(&self) -> bool {
        match &self.code {
            ErrorCode::SessionInvalid
            | ErrorCode::HostIsSlave
            | ErrorCode::OtherOperationInProgress
            | ErrorCode::TooManyPendingTasks
            | ErrorCode::EventsLost
            // data_destroy waits only 4 s for VBDs to go (docs/xapi-notes.md, "Tasks").
            | ErrorCode::VdiInUse => true,
            // SM "try again" (201) and "VDI not available" (46, usually a
            // transient lock).
            ErrorCode::Other(_) => matches!(self.sr_backend_failure_number(), Some(201 | 46)),
            _ => false,
        }
    }

    /// The parameters as shown to humans: the session ref that
    /// `SESSION_INVALID` echoes is a secret and is redacted.
    fn shown_params(&self) -> Vec<&str> {
        if self.code == ErrorCode::SessionInvalid {
            return self.params.iter().map(|_| "<redacted>").collect();
        }
        self.params.iter().map(String::as_str).collect()
    }
}

impl fmt::Display for XapiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        let shown = self.shown_params();
        if !shown.is_empty() {
            write!(f, " {shown:?}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for XapiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XapiError")
            .field("code", &self.code)
            .field("params", &self.shown_params())
            .finish()
    }
}

impl std::error::Error for XapiError {}

/// An error of the XAPI client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// XAPI answered the call with a failure.
    #[error("XAPI call {method} failed: {error}")]
    Xapi {
        /// The call (`VM.snapshot`, `Async.VM.copy`, or `task <label>` for a
        /// client-created task).
        method: String,
        /// XAPI's code and parameters.
        #[source]
        error: XapiError,
    },
    /// The HTTP request did not complete (connection refused, reset, TLS
    /// failure, timeout).
    #[error("XAPI call {method}: cannot talk to {url}: {detail}")]
    Transport {
        /// The call.
        method: String,
        /// The endpoint (without credentials).
        url: String,
        /// The whole cause chain as text (e.g. a TLS pin mismatch, which
        /// reqwest nests several levels deep).
        detail: String,
        /// The underlying error (its URL removed).
        cause: reqwest::Error,
    },
    /// The server answered with an HTTP status other than 200.
    #[error("XAPI call {method}: HTTP {status} from {url}: {excerpt}")]
    HttpStatus {
        /// The call.
        method: String,
        /// The endpoint.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        excerpt: String,
    },
    /// The response is not a well-formed XML-RPC or JSON-RPC reply.
    #[error("XAPI call {method}: malformed response from {url}: {detail}")]
    Protocol {
        /// The call.
        method: String,
        /// The endpoint.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The reply is well-formed but its value does not have the datamodel
    /// type the client expects.
    #[error(
        "XAPI call {method}: cannot decode the result{}: {detail}",
        at_path(path)
    )]
    Decode {
        /// The call.
        method: String,
        /// Where in the result (`OpaqueRef:….power_state`); empty for the top.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The URL given to the client cannot be used.
    #[error("invalid XAPI URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used, and what to write instead.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS setup for XAPI failed: {0}")]
    Tls(String),
    /// `HOST_IS_SLAVE` redirections did not reach a coordinator.
    #[error(
        "login followed HOST_IS_SLAVE through {chain:?} without reaching the pool coordinator; \
         connect to the coordinator directly"
    )]
    TooManyRedirects {
        /// The hosts tried, in order.
        chain: Vec<String>,
    },
    /// A task did not finish in time.
    #[error(
        "task {task} ({label}) did not finish within {waited:?}; raise the timeout or check \
         the task in XAPI (it was {action})"
    )]
    TaskTimeout {
        /// The task ref.
        task: String,
        /// The task label or the async call.
        label: String,
        /// How long the client waited.
        waited: Duration,
        /// What the client did with the task (`cancelled`, `left running`).
        action: &'static str,
    },
    /// The session was logged out; make a new one.
    #[error("the XAPI session was logged out; connect again")]
    LoggedOut,
    /// The caller asked for something this client or host cannot do.
    #[error("{0}")]
    Unsupported(String),
}

fn at_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at {path}")
    }
}

impl Error {
    /// The XAPI failure, if this is one.
    pub fn xapi(&self) -> Option<&XapiError> {
        match self {
            Error::Xapi { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The XAPI error code, if this is an XAPI failure.
    pub fn code(&self) -> Option<&ErrorCode> {
        self.xapi().map(|e| &e.code)
    }

    /// Whether this is an XAPI failure with that code.
    pub fn is_code(&self, code: &ErrorCode) -> bool {
        self.code() == Some(code)
    }

    /// Whether retrying the operation can make sense: transient XAPI
    /// conditions (see [`XapiError::is_retryable`]), connection problems,
    /// timeouts and HTTP 5xx other than 500. Decoding, protocol and usage
    /// errors are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Xapi { error, .. } => error.is_retryable(),
            Error::Transport { cause, .. } => {
                cause.is_connect() || cause.is_timeout() || cause.is_request()
            }
            Error::HttpStatus { status, .. } => matches!(status, 502..=504),
            Error::TaskTimeout { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn description_keeps_code_and_params() {
        let e = XapiError::from_description(vec![
            "VM_BAD_POWER_STATE".into(),
            "OpaqueRef:1".into(),
            "halted".into(),
            "running".into(),
        ]);
        assert_eq!(e.code, ErrorCode::VmBadPowerState);
        assert_eq!(e.param(2), Some("running"));
        assert!(!e.is_retryable());
        let other = XapiError::from_description(vec!["SR_BACKEND_FAILURE_201".into()]);
        assert_eq!(
            other.code,
            ErrorCode::Other("SR_BACKEND_FAILURE_201".into())
        );
        assert_eq!(other.sr_backend_failure_number(), Some(201));
        assert!(other.is_retryable());
        assert!(XapiError::from_description(vec![]).is("INTERNAL_ERROR"));
    }

    #[test]
    fn codes_round_trip() {
        for code in ErrorCode::KNOWN {
            let c = ErrorCode::from_wire(code);
            assert!(!matches!(c, ErrorCode::Other(_)), "{code}");
            assert_eq!(c.as_str(), *code);
        }
    }

    #[test]
    fn session_ref_is_redacted() {
        let e = XapiError::new(ErrorCode::SessionInvalid, vec!["OpaqueRef:secret".into()]);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("SESSION_INVALID"));
        let wrapped = Error::Xapi {
            method: "VM.get_all".into(),
            error: e,
        };
        assert!(!format!("{wrapped} {wrapped:?}").contains("secret"));
        assert!(wrapped.is_retryable());
    }
}
