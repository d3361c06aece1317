//! The error answers of every Keyward route, edge and control plane alike: one set of stable
//! codes, each with its HTTP status, and one body shape, `{"error":{"code","message"}}`.
//!
//! Clients match on the code, never on the message; the message says what to fix. Verification
//! outcomes (`VALID`, `REVOKED`, ...) are not errors: they are [`crate::Code`]s in a 200 answer.

use serde::Serialize;

use crate::internal::SignatureError;

/// A stable error code and the HTTP status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    InvalidId,
    Unauthorized,
    Forbidden,
    NotFound,
    /// No route matches the method and path.
    NotFoundRoute,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    /// A signed internal request lacked its signature headers, or they were malformed.
    BadSignatureHeaders,
    /// A signed internal request's timestamp is too far from the receiver's clock.
    StaleTimestamp,
    BadSignature,
    /// A signed internal request's nonce was used before.
    Replayed,
    /// A purge signed for another region.
    WrongRegion,
    /// The caller made the edge look up too many keys it holds no copy of; retry later. (Not
    /// the key's own `RATE_LIMITED` outcome, which belongs to the key being checked.)
    CallerRateLimited,
    Internal,
    /// The worker's configuration makes the route unusable (its log says why).
    Misconfigured,
    /// Something this answer depends on could not be reached in time; retrying may succeed.
    Unavailable,
    /// A key's authority could not be written; the control plane retries.
    AuthorityUnavailable,
    /// A root key, or its workspace, holds as many open event streams as it may.
    TooManyStreams,
}

impl ErrorCode {
    /// The HTTP status this code is answered with.
    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            BadRequest | InvalidId => 400,
            Unauthorized | BadSignatureHeaders | StaleTimestamp | BadSignature | Replayed => 401,
            Forbidden | WrongRegion => 403,
            NotFound | NotFoundRoute => 404,
            MethodNotAllowed => 405,
            Conflict => 409,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            CallerRateLimited => 429,
            TooManyStreams => 429,
            Internal => 500,
            Misconfigured | Unavailable | AuthorityUnavailable => 503,
        }
    }

    /// The code as it appears in answers, e.g. `BAD_SIGNATURE`.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadRequest => "BAD_REQUEST",
            InvalidId => "INVALID_ID",
            Unauthorized => "UNAUTHORIZED",
            Forbidden => "FORBIDDEN",
            NotFound => "NOT_FOUND",
            NotFoundRoute => "NOT_FOUND_ROUTE",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Conflict => "CONFLICT",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            BadSignatureHeaders => "BAD_SIGNATURE_HEADERS",
            StaleTimestamp => "STALE_TIMESTAMP",
            BadSignature => "BAD_SIGNATURE",
            Replayed => "REPLAYED",
            WrongRegion => "WRONG_REGION",
            CallerRateLimited => "CALLER_RATE_LIMITED",
            Internal => "INTERNAL",
            Misconfigured => "MISCONFIGURED",
            Unavailable => "UNAVAILABLE",
            AuthorityUnavailable => "AUTHORITY_UNAVAILABLE",
            TooManyStreams => "TOO_MANY_STREAMS",
        }
    }
}

impl From<SignatureError> for ErrorCode {
    fn from(e: SignatureError) -> ErrorCode {
        match e {
            SignatureError::Malformed => ErrorCode::BadSignatureHeaders,
            SignatureError::Stale => ErrorCode::StaleTimestamp,
            SignatureError::Mismatch => ErrorCode::BadSignature,
            SignatureError::Replayed => ErrorCode::Replayed,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

impl<'a> ErrorBody<'a> {
    pub fn new(code: ErrorCode, message: &'a str) -> ErrorBody<'a> {
        ErrorBody { error: ErrorDetail { code, message } }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn the_wire_code_is_the_serialized_name() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::NotFoundRoute,
            ErrorCode::BadSignatureHeaders,
            ErrorCode::WrongRegion,
            ErrorCode::AuthorityUnavailable,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::CallerRateLimited,
            ErrorCode::TooManyStreams,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn the_body_has_one_shape() {
        let body = serde_json::to_value(ErrorBody::new(ErrorCode::Replayed, "nonce already used")).unwrap();
        assert_eq!(body, serde_json::json!({ "error": { "code": "REPLAYED", "message": "nonce already used" } }));
    }

    #[test]
    fn signature_refusals_are_401() {
        for e in [SignatureError::Malformed, SignatureError::Stale, SignatureError::Mismatch, SignatureError::Replayed]
        {
            assert_eq!(ErrorCode::from(e).status(), 401);
        }
    }
}
