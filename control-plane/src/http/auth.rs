//! The root key in `Authorization: Bearer <root key>`, as an extractor, and scope checks. The
//! extractor also notes who is asking and from where, the [`Actor`] of any change it makes.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::request::Parts;
use keyward_shared::scope::ApiSelector;
use keyward_shared::{Key, KeyAction, KeyHash, RootKeyRecord, Scope, Scopes};

use super::{AppError, AppState};
use crate::change::{Actor, RequestOrigin};
use crate::keygen::new_id;

/// The header a client may name its request by; without a usable one, an id is generated.
const REQUEST_ID: &str = "x-request-id";
/// The longest request id and user agent kept.
const MAX_REQUEST_ID: usize = 128;
const MAX_USER_AGENT: usize = 256;

/// An authenticated, active root key, and the request it made.
pub struct RootKey {
    record: RootKeyRecord,
    actor: Actor,
}

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
        let (record, name) =
            state.store.active_root_key(&hash).await?.filter(|(r, _)| r.hash == hash).ok_or_else(invalid)?;
        let origin = RequestOrigin {
            root_key_id: record.id.clone(),
            root_key_name: name,
            request_id: request_id(&parts.headers),
            remote_addr: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0),
            user_agent: parts
                .headers
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|ua| ua.chars().take(MAX_USER_AGENT).collect()),
        };
        Ok(RootKey { record, actor: Actor::Request(origin) })
    }
}

impl RootKey {
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The root key's hash, to look it up again (an event stream does, on every poll).
    pub fn hash(&self) -> &KeyHash {
        &self.record.hash
    }

    pub fn workspace_id(&self) -> &str {
        &self.record.workspace_id
    }

    pub fn scopes(&self) -> &Scopes {
        &self.record.scopes
    }

    /// Who is asking, for the changes this request makes.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// Fails with 403 unless this root key holds a scope that grants `scope`.
    pub fn require(&self, scope: &Scope) -> Result<(), AppError> {
        if self.record.scopes.grants(scope) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!("this root key lacks the `{scope}` scope")))
        }
    }
}

/// The APIs whose keys a root key may read (`api.<id|*>.read_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readable {
    /// Every API of its workspace: it holds `api.*.read_key`.
    Every,
    /// These APIs only; none when empty.
    Only(Vec<String>),
}

impl Readable {
    pub fn of(scopes: &Scopes) -> Readable {
        let mut only = Vec::new();
        for scope in &scopes.0 {
            match scope {
                Scope::Key { api: ApiSelector::Any, action: KeyAction::ReadKey } => return Readable::Every,
                Scope::Key { api: ApiSelector::Id(id), action: KeyAction::ReadKey } => only.push(id.clone()),
                _ => {}
            }
        }
        Readable::Only(only)
    }

    /// Whether it may read the keys of some API.
    pub fn any(&self) -> bool {
        !matches!(self, Readable::Only(ids) if ids.is_empty())
    }

    /// The APIs it may read, `None` meaning every one.
    pub fn api_ids(&self) -> Option<&[String]> {
        match self {
            Readable::Every => None,
            Readable::Only(ids) => Some(ids),
        }
    }
}

/// The request's `x-request-id` when it is 1 to 128 visible ASCII characters; otherwise a new id,
/// so that every change can be traced to one request.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| (1..=MAX_REQUEST_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| new_id("req"), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(REQUEST_ID, value.parse().unwrap());
            request_id(&headers)
        };
        assert_eq!(with("abc-123"), "abc-123");
        for unusable in ["", "has space", &"x".repeat(MAX_REQUEST_ID + 1)] {
            assert!(with(unusable).starts_with("req_"), "{unusable}");
        }
        assert!(request_id(&HeaderMap::new()).starts_with("req_"));
    }

    #[test]
    fn readable_apis() {
        let readable = |scopes: &str| Readable::of(&serde_json::from_str(scopes).unwrap());
        assert_eq!(readable(r#"["api.a.read_key","api.*.read_key"]"#), Readable::Every);
        let only = readable(r#"["api.a.read_key","api.*.verify_key","api.b.read_key","api.read"]"#);
        assert_eq!(only.api_ids(), Some(&["a".to_owned(), "b".to_owned()][..]));
        assert!(only.any());
        assert!(!readable(r#"["api.*.verify_key","api.read","api.a.update_key"]"#).any());
        assert!(readable(r#"["api.*.read_key"]"#).api_ids().is_none());
    }
}
