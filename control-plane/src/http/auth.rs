//! The root key in `Authorization: Bearer <root key>`, as an extractor, and scope checks.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use keyward_shared::{Key, RootKeyRecord, Scope};

use super::{AppError, AppState};

/// An authenticated, active root key.
pub struct RootKey(pub RootKeyRecord);

impl FromRequestParts<AppState> for RootKey {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<RootKey, AppError> {
        let missing = || AppError::Unauthorized("send `Authorization: Bearer <root key>`".into());
        let invalid = || AppError::Unauthorized("the root key is not valid; check KEYWARD_ROOT_KEY".into());
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(missing)?;
        let text = header.strip_prefix("Bearer ").ok_or_else(missing)?.trim();
        let key = Key::parse(text).map_err(|_| invalid())?;
        let hash = key.hash();
        // The lookup is by hash; the stored hash is then compared in constant time.
        let record = state.store.active_root_key(&hash).await?.filter(|r| r.hash == hash).ok_or_else(invalid)?;
        Ok(RootKey(record))
    }
}

impl RootKey {
    pub fn workspace_id(&self) -> &str {
        &self.0.workspace_id
    }

    /// Fails with 403 unless this root key holds a scope that grants `scope`.
    pub fn require(&self, scope: &Scope) -> Result<(), AppError> {
        if self.0.scopes.grants(scope) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!("this root key lacks the `{scope}` scope")))
        }
    }
}
