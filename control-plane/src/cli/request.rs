//! The HTTP request each subcommand stands for, and which view prints its answer.

use std::io::Read;

use anyhow::Context;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::render::View;
use super::{
    ApiCommand, AuditCommand, Command, CreditsOp, IdentityCommand, IdentityFields, KeyCommand, KeyFields,
    RootKeyCommand, SpendFields, WorkspaceCommand,
};

/// Everything but RFC 3986's unreserved characters is encoded, in a path segment or a query value.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

pub struct Request {
    pub method: Method,
    /// The path and query, encoded.
    pub path: String,
    pub body: Option<Value>,
    pub view: View,
}

impl Request {
    fn new(method: Method, path: String, body: Option<Value>, view: View) -> Request {
        Request { method, path, body, view }
    }
}

/// The request for a client subcommand (`serve` is not one).
pub fn request_for(command: Command) -> anyhow::Result<Request> {
    Ok(match command {
        Command::Serve { .. } => unreachable!("`serve` runs the server, not a request"),
        Command::Incident { .. } => unreachable!("`incident` makes several requests (`incident.rs`)"),
        Command::Outbox(_) | Command::Admin(_) | Command::Audit(AuditCommand::Verify { .. }) => {
            unreachable!("`outbox`, `admin` and `audit verify` open the database, not a request")
        }
        Command::Audit(command) => audit_request(command),
        Command::Workspaces(WorkspaceCommand::Create { name }) => {
            Request::new(Method::POST, "/v1/workspaces".into(), Some(json!({ "name": name })), View::WorkspaceCreated)
        }
        Command::RootKeys(RootKeyCommand::Create { name, scopes }) => Request::new(
            Method::POST,
            "/v1/root-keys".into(),
            Some(json!({ "name": name, "scopes": scopes })),
            View::RootKeyCreated,
        ),
        Command::RootKeys(RootKeyCommand::List) => {
            Request::new(Method::GET, "/v1/root-keys".into(), None, View::RootKeys)
        }
        Command::RootKeys(RootKeyCommand::Revoke { id }) => {
            Request::new(Method::POST, format!("/v1/root-keys/{}/revoke", encode(&id)), None, View::RootKeyRevoked)
        }
        Command::Apis(ApiCommand::Create { name, prefix, max_staleness_ms }) => {
            let mut body = json!({ "name": name });
            insert_some(&mut body, "prefix", prefix.map(Value::from));
            insert_some(&mut body, "max_staleness_ms", max_staleness_ms.map(Value::from));
            Request::new(Method::POST, "/v1/apis".into(), Some(body), View::ApiCreated)
        }
        Command::Apis(ApiCommand::List) => Request::new(Method::GET, "/v1/apis".into(), None, View::Apis),
        Command::Apis(ApiCommand::Policy { api_id, lists, limit_percent, lift_override, clear }) => {
            let path = format!("/v1/apis/{}/policy", encode(&api_id));
            if clear {
                return Ok(Request::new(Method::PUT, path, Some(json!({})), View::Policy));
            }
            if lists.is_empty() && limit_percent.is_none() && !lift_override {
                return Ok(Request::new(Method::GET, path, None, View::Policy));
            }
            // Only what is named: another responder's change to the rest is kept.
            let mut body = lists.named_json();
            insert_some(&mut body, "limit_override", limit_percent.map(|p| json!({ "percent": p })));
            if lift_override {
                body["limit_override"] = Value::Null;
            }
            Request::new(Method::PATCH, path, Some(body), View::Policy)
        }
        Command::Keys(command) => key_request(command)?,
        Command::Identities(command) => identity_request(command)?,
    })
}

/// The request for an `identities` subcommand.
fn identity_request(command: IdentityCommand) -> anyhow::Result<Request> {
    let path = |id: &str| format!("/v1/identities/{}", encode(id));
    Ok(match command {
        IdentityCommand::Create { external_id, fields } => {
            let mut body = fields.into_json(false)?;
            body["external_id"] = external_id.into();
            Request::new(Method::POST, "/v1/identities".into(), Some(body), View::IdentityChanged)
        }
        IdentityCommand::Get { id } => Request::new(Method::GET, path(&id), None, View::Identity),
        IdentityCommand::List { external_id, cursor, limit } => {
            let pairs = [("external_id", external_id), ("cursor", cursor), ("limit", limit.map(|l| l.to_string()))];
            let query: Vec<String> =
                pairs.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v)))).collect();
            Request::new(Method::GET, format!("/v1/identities?{}", query.join("&")), None, View::Identities)
        }
        IdentityCommand::Update { id, external_id, fields } => {
            let mut body = fields.into_json(true)?;
            insert_some(&mut body, "external_id", external_id.map(Value::from));
            Request::new(Method::PATCH, path(&id), Some(body), View::IdentityChanged)
        }
        IdentityCommand::Delete { id } => Request::new(Method::DELETE, path(&id), None, View::IdentityDeleted),
    })
}

impl IdentityFields {
    fn into_json(self, for_update: bool) -> anyhow::Result<Value> {
        let mut body = json!({});
        if let Some(meta) = self.meta {
            body["meta"] = Value::Object(meta_object(&meta)?);
        }
        self.spend.add_to(&mut body, for_update)?;
        Ok(body)
    }
}

fn meta_object(meta: &str) -> anyhow::Result<Map<String, Value>> {
    serde_json::from_str(meta).context("--meta must be a JSON object, like '{\"plan\":\"pro\"}'")
}

/// The request for a `keys` subcommand.
fn key_request(command: KeyCommand) -> anyhow::Result<Request> {
    Ok(match command {
        KeyCommand::Create { api_id, prefix, fields } => {
            let mut body = fields.into_json(false)?;
            body["api_id"] = api_id.into();
            insert_some(&mut body, "prefix", prefix.map(Value::from));
            Request::new(Method::POST, "/v1/keys".into(), Some(body), View::KeyCreated)
        }
        KeyCommand::Get { id } => Request::new(Method::GET, format!("/v1/keys/{}", encode(&id)), None, View::Key),
        KeyCommand::List { api_id, start, cursor, limit } => {
            let pairs =
                [("api_id", api_id), ("start", start), ("cursor", cursor), ("limit", limit.map(|l| l.to_string()))];
            let query: Vec<String> =
                pairs.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v)))).collect();
            Request::new(Method::GET, format!("/v1/keys?{}", query.join("&")), None, View::Keys)
        }
        KeyCommand::Update { id, enabled, fields } => {
            let mut body = fields.into_json(true)?;
            insert_some(&mut body, "enabled", enabled.map(Value::from));
            Request::new(Method::PATCH, format!("/v1/keys/{}", encode(&id)), Some(body), View::KeyUpdated)
        }
        KeyCommand::Credits { id, op: None, .. } => {
            Request::new(Method::GET, format!("/v1/keys/{}/credits", encode(&id)), None, View::Credits)
        }
        KeyCommand::Credits { id, op: Some(op), amount } => {
            let op = match op {
                CreditsOp::Set => "set",
                CreditsOp::Increment => "increment",
                CreditsOp::Decrement => "decrement",
            };
            let body = json!({ "op": op, "amount": amount.unwrap_or(0) });
            Request::new(Method::POST, format!("/v1/keys/{}/credits", encode(&id)), Some(body), View::KeyUpdated)
        }
        KeyCommand::Revoke { id } => {
            Request::new(Method::POST, format!("/v1/keys/{}/revoke", encode(&id)), None, View::KeyRevoked)
        }
        KeyCommand::Delete { id } => {
            Request::new(Method::DELETE, format!("/v1/keys/{}", encode(&id)), None, View::KeyDeleted)
        }
        KeyCommand::Proof { id } => {
            Request::new(Method::GET, format!("/v1/keys/{}/proof", encode(&id)), None, View::Proof)
        }
        KeyCommand::Usage { id, hours } => {
            let from_ms = crate::time::now_ms() - i64::from(hours) * 3_600_000;
            Request::new(Method::GET, format!("/v1/keys/{}/usage?from_ms={from_ms}", encode(&id)), None, View::Usage)
        }
        KeyCommand::Verify { key, api_id, permissions } => {
            let key = if key == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("reading the key from stdin")?;
                text.trim().to_owned()
            } else {
                key
            };
            let mut body = json!({ "key": key, "permissions": permissions });
            insert_some(&mut body, "api_id", api_id.map(Value::from));
            Request::new(Method::POST, "/v1/keys/verify".into(), Some(body), View::Verified)
        }
    })
}

/// The request for `audit list` or `audit checkpoint` (`audit verify` opens the database).
fn audit_request(command: AuditCommand) -> Request {
    match command {
        AuditCommand::List { target, root_key_id, action, limit } => {
            let pairs = [
                ("target", target),
                ("root_key_id", root_key_id),
                ("action", action),
                ("limit", limit.map(|l| l.to_string())),
            ];
            let query: Vec<String> =
                pairs.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v)))).collect();
            Request::new(Method::GET, format!("/v1/audit?{}", query.join("&")), None, View::Audit)
        }
        AuditCommand::Checkpoint => {
            Request::new(Method::GET, "/v1/audit/checkpoint".into(), None, View::AuditCheckpoint)
        }
        AuditCommand::Verify { .. } => unreachable!("`audit verify` opens the database, not a request"),
    }
}

impl KeyFields {
    fn into_json(self, for_update: bool) -> anyhow::Result<Value> {
        let mut body = json!({});
        insert_some(&mut body, "name", self.name.map(Value::from));
        insert_some(&mut body, "owner_id", self.owner_id.map(Value::from));
        if let Some(meta) = self.meta {
            body["meta"] = Value::Object(meta_object(&meta)?);
        }
        if let Some(at) = self.expires_at {
            body["expires_at"] = match at.as_str() {
                "now" if for_update => Value::from(0),
                "never" if for_update => Value::Null,
                ms => Value::from(ms.parse::<i64>().context("--expires-at must be Unix milliseconds")?),
            };
        }
        insert_some(&mut body, "permissions", self.permissions.map(Value::from));
        if self.clear_policy {
            anyhow::ensure!(
                for_update && self.policy.is_empty(),
                "--clear-policy is for `update`, without other lists"
            );
            body["policy"] = Value::Null;
        } else if !self.policy.is_empty() {
            body["policy"] = self.policy.into_json();
        }
        self.spend.add_to(&mut body, for_update)?;
        if let Some(identity) = self.identity {
            body["identity_id"] = match identity.as_str() {
                "none" if for_update => Value::Null,
                id => Value::from(id),
            };
        }
        Ok(body)
    }
}

impl SpendFields {
    /// Adds the credits and rate limits named to a create or update body.
    fn add_to(self, body: &mut Value, for_update: bool) -> anyhow::Result<()> {
        if let Some(credits) = self.credits {
            body["credits"] = match credits.as_str() {
                "unlimited" if for_update => Value::Null,
                n => {
                    let remaining: u64 =
                        n.parse().context("--credits must be a number of credits (or `unlimited` for update)")?;
                    let mut credits = json!({ "remaining": remaining });
                    if let (Some(every), Some(amount)) = (self.refill_every, self.refill_amount) {
                        credits["refill"] = json!({ "every": period(&every)?, "amount": amount });
                        insert_some(&mut credits["refill"], "cap", self.refill_cap.map(Value::from));
                    }
                    credits
                }
            };
        }
        if !self.ratelimits.is_empty() {
            body["ratelimits"] = match self.ratelimits.as_slice() {
                [none] if none == "none" && for_update => json!([]),
                limits => Value::from(limits.iter().map(|l| ratelimit(l)).collect::<anyhow::Result<Vec<_>>>()?),
            };
        }
        Ok(())
    }
}

/// A rate limit as the API takes it, from `name=limit/duration[:cost=N][:local][:named]`.
fn ratelimit(text: &str) -> anyhow::Result<Value> {
    let bad = || {
        anyhow::anyhow!(
            "--ratelimit takes `name=limit/duration[:cost=N][:local][:named]`, like `api=50/10s`; not `{text}`"
        )
    };
    let (name, rest) = text.split_once('=').ok_or_else(bad)?;
    let mut parts = rest.split(':');
    let (limit, duration) = parts.next().and_then(|p| p.split_once('/')).ok_or_else(bad)?;
    let mut out = json!({
        "name": name,
        "limit": limit.parse::<u64>().map_err(|_| bad())?,
        "duration_ms": interval_ms(duration).ok_or_else(bad)?,
    });
    for part in parts {
        match part {
            "local" => out["mode"] = json!("local"),
            "named" => out["auto"] = json!(false),
            _ => match part.strip_prefix("cost=") {
                Some(cost) => out["cost"] = json!(cost.parse::<u64>().map_err(|_| bad())?),
                None => return Err(bad()),
            },
        }
    }
    Ok(out)
}

/// Milliseconds of an interval like `10s`, `5m`, `1h`, `1d`, `1500ms`.
fn interval_ms(text: &str) -> Option<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = text[..split].parse().ok()?;
    let unit_ms = match &text[split..] {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

/// A refill period as the API takes it, from `daily`, `monthly:<day>`, `anniversary` or an
/// interval (`10s`, `5m`, `1h`, `1500ms`).
fn period(text: &str) -> anyhow::Result<Value> {
    let bad = || {
        anyhow::anyhow!(
            "--refill-every takes `daily`, `monthly:<day 1-31>`, `anniversary` or an interval like `10s`, `5m`, `1h`; not `{text}`"
        )
    };
    Ok(match text {
        "daily" => json!({ "kind": "daily" }),
        "anniversary" => json!({ "kind": "anniversary" }),
        _ if text.starts_with("monthly:") => {
            let day: u8 = text["monthly:".len()..].parse().map_err(|_| bad())?;
            json!({ "kind": "monthly", "day": day })
        }
        _ => json!({ "kind": "interval", "ms": interval_ms(text).ok_or_else(bad)? }),
    })
}

fn insert_some(body: &mut Value, field: &str, value: Option<Value>) {
    if let Some(value) = value {
        body[field] = value;
    }
}

/// `text` as one path segment or query value.
pub fn encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_flags() {
        assert_eq!(ratelimit("api=50/10s").unwrap(), json!({ "name": "api", "limit": 50, "duration_ms": 10_000 }));
        assert_eq!(
            ratelimit("search=5/1d:cost=2:local:named").unwrap(),
            json!({ "name": "search", "limit": 5, "duration_ms": 86_400_000, "cost": 2, "mode": "local", "auto": false })
        );
        for bad in ["api", "api=50", "api=50/10", "api=x/10s", "api=5/1s:fast", "api=5/1s:cost=x"] {
            assert!(ratelimit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_and_query_values_are_encoded_as_one_component() {
        assert_eq!(encode("key_01ARZ3NDEKTSV4RRFFQ69G5FAV"), "key_01ARZ3NDEKTSV4RRFFQ69G5FAV");
        assert_eq!(encode("a/b?c=d&e f#"), "a%2Fb%3Fc%3Dd%26e%20f%23");
        assert_eq!(encode("é~.-"), "%C3%A9~.-");
    }

    #[test]
    fn list_builds_its_query_from_the_given_filters_only() {
        let command = KeyCommand::List { api_id: None, start: Some("sk_live_3x".into()), cursor: None, limit: Some(5) };
        let request = request_for(Command::Keys(command)).unwrap();
        assert_eq!(request.path, "/v1/keys?start=sk_live_3x&limit=5");
    }
}
