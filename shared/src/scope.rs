//! Root-key scopes, parsed into structured values and matched by meaning, never by string prefix.
//!
//! The grammar: `workspace.create`, `root_key.create`, `root_key.manage`, `api.create`, `api.read`, and
//! `api.<api id or *>.<action>` where action is one of `create_key`, `read_key`, `update_key`,
//! `revoke_key`, `delete_key`, `verify_key`.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a root key may do to the keys of an API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAction {
    CreateKey,
    ReadKey,
    UpdateKey,
    RevokeKey,
    DeleteKey,
    VerifyKey,
}

impl KeyAction {
    pub const ALL: [KeyAction; 6] = [
        KeyAction::CreateKey,
        KeyAction::ReadKey,
        KeyAction::UpdateKey,
        KeyAction::RevokeKey,
        KeyAction::DeleteKey,
        KeyAction::VerifyKey,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyAction::CreateKey => "create_key",
            KeyAction::ReadKey => "read_key",
            KeyAction::UpdateKey => "update_key",
            KeyAction::RevokeKey => "revoke_key",
            KeyAction::DeleteKey => "delete_key",
            KeyAction::VerifyKey => "verify_key",
        }
    }
}

/// Which APIs a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ApiSelector {
    Any,
    Id(String),
}

/// One permission a root key holds, or one a route requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    WorkspaceCreate,
    RootKeyCreate,
    /// List and revoke the workspace's root keys.
    RootKeyManage,
    ApiCreate,
    ApiRead,
    /// Read the workspace's audit log and the log's signed checkpoint.
    AuditRead,
    Key {
        api: ApiSelector,
        action: KeyAction,
    },
}

impl Scope {
    /// The scope a route needs to do `action` on the keys of `api_id`.
    pub fn key(api_id: &str, action: KeyAction) -> Scope {
        Scope::Key { api: ApiSelector::Id(api_id.to_owned()), action }
    }

    /// Whether holding `self` permits what `required` names. `api.*.x` covers `api.<id>.x`;
    /// nothing else covers anything but itself.
    pub fn grants(&self, required: &Scope) -> bool {
        match (self, required) {
            (Scope::Key { api: ApiSelector::Any, action: held }, Scope::Key { action: needed, .. }) => held == needed,
            _ => self == required,
        }
    }

    /// Every scope a workspace's first root key holds, `workspace.create` included when asked.
    pub fn all(with_workspace_create: bool) -> Vec<Scope> {
        let mut all = Vec::new();
        if with_workspace_create {
            all.push(Scope::WorkspaceCreate);
        }
        all.extend([Scope::RootKeyCreate, Scope::RootKeyManage, Scope::ApiCreate, Scope::ApiRead, Scope::AuditRead]);
        all.extend(KeyAction::ALL.map(|action| Scope::Key { api: ApiSelector::Any, action }));
        all
    }
}

/// Why a scope's text was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scope `{0}`: expected workspace.create, root_key.create, root_key.manage, api.create, api.read, audit.read or api.<api id|*>.<create_key|read_key|update_key|revoke_key|delete_key|verify_key>"
)]
pub struct ScopeError(pub String);

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(text: &str) -> Result<Scope, ScopeError> {
        let err = || ScopeError(text.chars().take(100).collect());
        match text {
            "workspace.create" => return Ok(Scope::WorkspaceCreate),
            "root_key.create" => return Ok(Scope::RootKeyCreate),
            "root_key.manage" => return Ok(Scope::RootKeyManage),
            "api.create" => return Ok(Scope::ApiCreate),
            "api.read" => return Ok(Scope::ApiRead),
            "audit.read" => return Ok(Scope::AuditRead),
            _ => {}
        }
        let rest = text.strip_prefix("api.").ok_or_else(err)?;
        let (api, action) = rest.rsplit_once('.').ok_or_else(err)?;
        let action = KeyAction::ALL.into_iter().find(|a| a.as_str() == action).ok_or_else(err)?;
        let api = match api {
            "*" => ApiSelector::Any,
            id if is_id_text(id) => ApiSelector::Id(id.to_owned()),
            _ => return Err(err()),
        };
        Ok(Scope::Key { api, action })
    }
}

fn is_id_text(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::WorkspaceCreate => f.write_str("workspace.create"),
            Scope::RootKeyCreate => f.write_str("root_key.create"),
            Scope::RootKeyManage => f.write_str("root_key.manage"),
            Scope::ApiCreate => f.write_str("api.create"),
            Scope::ApiRead => f.write_str("api.read"),
            Scope::AuditRead => f.write_str("audit.read"),
            Scope::Key { api: ApiSelector::Any, action } => write!(f, "api.*.{}", action.as_str()),
            Scope::Key { api: ApiSelector::Id(id), action } => {
                write!(f, "api.{id}.{}", action.as_str())
            }
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The scopes a root key holds. Read from a stored record, a scope this version does not know
/// is skipped (never granted) rather than failing the whole record, so an older edge keeps
/// working with root keys a newer control plane wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Scopes(pub Vec<Scope>);

impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        Ok(Scopes(texts.iter().filter_map(|t| t.parse().ok()).collect()))
    }
}

/// A root key with no verify scope called the verify route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this root key has no `api.<id|*>.verify_key` scope")]
pub struct NoVerifyScope;

impl Scopes {
    pub fn grants(&self, required: &Scope) -> bool {
        self.0.iter().any(|held| held.grants(required))
    }

    /// Whether these scopes can verify keys of any API at all (so the edge should know them).
    pub fn can_verify_somewhere(&self) -> bool {
        self.0.iter().any(|s| matches!(s, Scope::Key { action: KeyAction::VerifyKey, .. }))
    }

    /// Refuses a caller of the verify route whose scopes cannot verify any key, with the message
    /// both the edge and the origin answer (`FORBIDDEN`).
    pub fn require_verify(&self) -> Result<(), NoVerifyScope> {
        if self.can_verify_somewhere() { Ok(()) } else { Err(NoVerifyScope) }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn check(held: &str, required: &str, expected: bool) {
        let held: Scope = held.parse().unwrap();
        let required: Scope = required.parse().unwrap();
        assert_eq!(held.grants(&required), expected, "{held} grants {required}");
    }

    #[test]
    fn grants_table() {
        check("api.*.verify_key", "api.api_1.verify_key", true);
        check("api.api_1.verify_key", "api.api_1.verify_key", true);
        check("api.api_1.verify_key", "api.api_12.verify_key", false);
        check("api.api_12.verify_key", "api.api_1.verify_key", false);
        check("api.api_1.verify_key", "api.api_1.revoke_key", false);
        check("api.*.read_key", "api.*.read_key", true);
        check("api.api_1.read_key", "api.*.read_key", false);
        check("api.read", "api.create", false);
        check("workspace.create", "workspace.create", true);
    }

    #[test]
    fn parse_round_trip_and_rejects() {
        for text in [
            "workspace.create",
            "root_key.create",
            "root_key.manage",
            "api.read",
            "audit.read",
            "api.*.delete_key",
            "api.api_01J.create_key",
        ] {
            assert_eq!(text.parse::<Scope>().unwrap().to_string(), text);
        }
        for bad in
            ["", "api", "api.", "api.x", "api.x.fly", "api..read_key", "api.a.b.read_key", "API.read", "api.read_key"]
        {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_scopes_skip_what_this_version_does_not_know() {
        let scopes: Scopes = serde_json::from_str(r#"["api.read","billing.view","api.*.verify_key"]"#).unwrap();
        assert_eq!(scopes.0.len(), 2);
        assert!(scopes.grants(&Scope::ApiRead));
        assert!(!scopes.grants(&Scope::RootKeyManage));
    }

    #[test]
    fn all_scopes_cover_every_action() {
        let all = Scopes(Scope::all(true));
        assert!(all.grants(&Scope::WorkspaceCreate));
        for action in KeyAction::ALL {
            assert!(all.grants(&Scope::key("api_x", action)));
        }
        assert!(!Scopes(Scope::all(false)).grants(&Scope::WorkspaceCreate));
        assert!(all.can_verify_somewhere());
        assert!(!Scopes(vec![Scope::ApiRead]).can_verify_somewhere());
    }
}
