//! The XAPI API error: an error code and its string parameters, as data.
//!
//! Every failure the simulator reports through an RPC envelope, a task's
//! `error_info` or an HTTP handler is one [`ApiError`]; the codes and their
//! parameters follow xen-api's `ocaml/idl/datamodel_errors.ml`.

/// An XAPI error: `ErrorDescription = [code, params…]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}{}", fmt_params(.params))]
pub struct ApiError {
    /// The error code, e.g. `HANDLE_INVALID`.
    pub code: String,
    /// The parameters, all strings.
    pub params: Vec<String>,
}

fn fmt_params(params: &[String]) -> String {
    if params.is_empty() {
        String::new()
    } else {
        format!(" {params:?}")
    }
}

/// Result of an API operation.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with a code and parameters.
    pub fn new<S: Into<String>>(code: &str, params: impl IntoIterator<Item = S>) -> ApiError {
        ApiError {
            code: code.to_string(),
            params: params.into_iter().map(Into::into).collect(),
        }
    }

    /// The error description as sent on the wire: `[code, params…]`.
    pub fn description(&self) -> Vec<String> {
        let mut d = Vec::with_capacity(self.params.len() + 1);
        d.push(self.code.clone());
        d.extend(self.params.iter().cloned());
        d
    }

    /// Builds an error back from a wire description (`[code, params…]`).
    pub fn from_description(desc: &[String]) -> ApiError {
        match desc.split_first() {
            Some((code, params)) => ApiError {
                code: code.clone(),
                params: params.to_vec(),
            },
            None => ApiError::internal("empty error description"),
        }
    }

    /// `HANDLE_INVALID [class, ref]`.
    pub fn handle_invalid(class: &str, r: &str) -> ApiError {
        ApiError::new("HANDLE_INVALID", [class, r])
    }

    /// `UUID_INVALID [class, uuid]`.
    pub fn uuid_invalid(class: &str, uuid: &str) -> ApiError {
        ApiError::new("UUID_INVALID", [class, uuid])
    }

    /// `INTERNAL_ERROR [msg]`.
    pub fn internal(msg: impl Into<String>) -> ApiError {
        ApiError::new("INTERNAL_ERROR", [msg.into()])
    }

    /// `OPERATION_NOT_ALLOWED [reason]`.
    pub fn not_allowed(reason: impl Into<String>) -> ApiError {
        ApiError::new("OPERATION_NOT_ALLOWED", [reason.into()])
    }

    /// `SESSION_INVALID [ref]`.
    pub fn session_invalid(r: &str) -> ApiError {
        ApiError::new("SESSION_INVALID", [r])
    }

    /// `FIELD_TYPE_ERROR [field]`: a parameter does not have the datamodel type.
    pub fn field_type(field: &str) -> ApiError {
        ApiError::new("FIELD_TYPE_ERROR", [field])
    }
}
