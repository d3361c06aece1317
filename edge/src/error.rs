//! The edge's one error type. Every refusal carries a stable [`ErrorCode`] from `shared` (the
//! control plane answers the same codes) and a message that says what to fix; a failure of the
//! runtime itself (KV, Cache API, a Durable Object stub) is logged and answered as `INTERNAL`.

use keyward_shared::ErrorCode;
use keyward_shared::error::ErrorBody;
use worker::{Response, console_error};

/// Why a route answers with an error.
#[derive(Debug)]
pub(crate) enum EdgeError {
    /// A refusal with a stable code and a message for the caller.
    Refused(ErrorCode, String),
    /// The runtime failed; the detail is logged, never answered.
    Internal(String),
}

pub(crate) type EdgeResult<T> = Result<T, EdgeError>;

impl EdgeError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> EdgeError {
        EdgeError::Refused(code, message.into())
    }
}

impl From<worker::Error> for EdgeError {
    fn from(e: worker::Error) -> EdgeError {
        EdgeError::Internal(e.to_string())
    }
}

impl From<serde_json::Error> for EdgeError {
    fn from(e: serde_json::Error) -> EdgeError {
        EdgeError::Internal(e.to_string())
    }
}

/// The answer for a route's result: its response, or its error as `{"error":{"code","message"}}`.
pub(crate) fn answer(result: EdgeResult<Response>) -> worker::Result<Response> {
    let (code, message) = match result {
        Ok(response) => return Ok(response),
        Err(EdgeError::Refused(code, message)) => (code, message),
        Err(EdgeError::Internal(detail)) => {
            console_error!("internal error: {detail}");
            (ErrorCode::Internal, "internal error; try again".to_owned())
        }
    };
    Ok(Response::from_json(&ErrorBody::new(code, &message))?.with_status(code.status()))
}
