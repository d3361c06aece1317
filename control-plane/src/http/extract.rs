//! Extractors whose rejections answer in Keyward's JSON error shape, and the check of ids.

use axum::extract::{FromRequest, FromRequestParts};

use super::error::AppError;

/// `axum::Json`, rejecting with an [`AppError`].
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query`, rejecting with an [`AppError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path`, rejecting with an [`AppError`].
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(AppError))]
pub struct Path<T>(pub T);

/// Checks that `text` is an id Keyward made with this prefix (`key_01J...`): the prefix, `_`,
/// and 26 Crockford base32 characters.
pub fn check_id(text: &str, prefix: &str) -> Result<(), AppError> {
    if crate::keygen::is_id(text, prefix) {
        Ok(())
    } else {
        Err(AppError::InvalidId(format!(
            "`{}` is not a {prefix} id (expected {prefix}_ and 26 characters)",
            text.chars().take(80).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keygen::new_id;

    #[test]
    fn ids() {
        let id = new_id("key");
        assert!(check_id(&id, "key").is_ok());
        assert!(check_id(&id, "api").is_err());
        for bad in ["key_", "key_01J", "key_01JABCDEFGHJKMNPQRSTVWXYZI", "key01JABCDEFGHJKMNPQRSTVWXYZ0", "../etc"] {
            assert!(matches!(check_id(bad, "key"), Err(AppError::InvalidId(_))), "{bad}");
        }
    }
}
