//! JSON error answers, in the same shape as the control plane's: `{"error":{"code","message"}}`.

use worker::{Response, Result};

/// An error answer with a stable `code` and a message that says what to fix.
pub(crate) fn respond(status: u16, code: &str, message: &str) -> Result<Response> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    Ok(Response::from_json(&body)?.with_status(status))
}
