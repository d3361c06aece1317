//! Whole-system scenarios: the real `keyward` binary and real `wrangler dev` regions.
//! Run by `cargo xtask test` (which builds both first); a plain `cargo test` lists them as ignored.

use keyward_shared::internal::{self, NONCE_HEADER, PURGE_PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use keyward_tests::world::{RegionPlan, World};
use keyward_tests::{new_key, new_root_key};
use reqwest::Method;
use serde_json::{Value, json};

fn code(answer: &(u16, Value)) -> &str {
    assert_eq!(answer.0, 200, "verify answered {}: {}", answer.0, answer.1);
    answer.1["code"].as_str().unwrap_or("<no code>")
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn revoked_key_is_rejected_by_the_very_next_edge_request() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    // Edge copies are trusted for 300 s: only the purge can explain a prompt rejection.
    let api = world.create_api("payments-live", 300_000);
    let (id, key) = world.create_key(&api, json!({ "permissions": ["charge"] }));
    let root = world.root_key.clone();

    let first = world.edge_verify(0, &root, json!({ "key": key, "permissions": ["charge"] }));
    assert_eq!(code(&first), "VALID", "{}", first.1);
    assert_eq!(first.1["key_id"], id);
    assert_eq!(first.1["permissions"], json!(["charge"]));
    let mut sources = vec![first.1["source"].clone()];
    for _ in 0..10 {
        let again = world.edge_verify(0, &root, json!({ "key": key }));
        assert_eq!(code(&again), "VALID");
        sources.push(again.1["source"].clone());
        if again.1["source"] == "memory" || again.1["source"] == "cache" {
            break;
        }
    }
    let last = sources.last().cloned().unwrap();
    assert!(last == "memory" || last == "cache", "never served from an edge copy: {sources:?}");

    let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["regions"][0]["acknowledged"], true, "{revoked}");
    assert!(revoked["regions"][0]["latency_ms"].as_f64().unwrap() > 0.0);

    let after = world.edge_verify(0, &root, json!({ "key": key }));
    assert_eq!(code(&after), "REVOKED", "{}", after.1);
    assert_eq!(after.1["valid"], false);
    let origin = world.origin_verify(&root, json!({ "key": key }));
    assert_eq!(code(&origin), "REVOKED");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn every_outcome_code_at_the_edge_and_the_origin() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    let root = world.root_key.clone();
    let api = world.create_api("codes", 1_000);
    let (disabled_id, disabled) = world.create_key(&api, json!({}));
    let (expired_id, expired) = world.create_key(&api, json!({}));
    let (deleted_id, deleted) = world.create_key(&api, json!({}));
    let (_, limited) = world.create_key(&api, json!({ "permissions": ["read"] }));
    let (_, valid) = world.create_key(&api, json!({}));
    for key in [&disabled, &expired, &deleted] {
        assert_eq!(code(&world.edge_verify(0, &root, json!({ "key": key }))), "VALID");
    }
    let (s, _) = world.admin(Method::PATCH, &format!("/v1/keys/{disabled_id}"), Some(json!({ "enabled": false })));
    assert_eq!(s, 200);
    let (s, patched) = world.admin(Method::PATCH, &format!("/v1/keys/{expired_id}"), Some(json!({ "expires_at": 0 })));
    assert_eq!(s, 200);
    assert_eq!(patched["regions"][0]["acknowledged"], true, "expiring is tightening: {patched}");
    let (s, _) = world.admin(Method::DELETE, &format!("/v1/keys/{deleted_id}"), None);
    assert_eq!(s, 200);

    // Another workspace, with its own API and key: invisible to this workspace's root key.
    let (s, other) = world.admin(Method::POST, "/v1/workspaces", Some(json!({ "name": "other tenant" })));
    assert_eq!(s, 201, "{other}");
    let other_root = other["root_key"]["key"].as_str().unwrap().to_owned();
    let (s, other_api) =
        world.call(&world.origin(), Some(&other_root), Method::POST, "/v1/apis", Some(json!({ "name": "theirs" })));
    assert_eq!(s, 201, "{other_api}");
    let (s, other_key) = world.call(
        &world.origin(),
        Some(&other_root),
        Method::POST,
        "/v1/keys",
        Some(json!({ "api_id": other_api["id"] })),
    );
    assert_eq!(s, 201, "{other_key}");
    let other_key = other_key["key"].as_str().unwrap().to_owned();

    let mut broken = valid.clone().into_bytes();
    let i = broken.len() - 3;
    broken[i] = if broken[i] == b'x' { b'y' } else { b'x' };
    let broken = String::from_utf8(broken).unwrap();

    let cases: Vec<(&str, Value, &str)> = vec![
        ("valid", json!({ "key": valid }), "VALID"),
        ("disabled", json!({ "key": disabled }), "DISABLED"),
        ("expired", json!({ "key": expired }), "EXPIRED"),
        ("deleted", json!({ "key": deleted }), "NOT_FOUND"),
        ("unknown", json!({ "key": new_key("sk_test") }), "NOT_FOUND"),
        ("broken checksum", json!({ "key": broken }), "MALFORMED"),
        ("junk", json!({ "key": "hello" }), "MALFORMED"),
        ("other workspace", json!({ "key": other_key }), "NOT_FOUND"),
        ("other api named", json!({ "key": valid, "api_id": other_api["id"] }), "NOT_FOUND"),
        ("missing permission", json!({ "key": limited, "permissions": ["read", "write"] }), "INSUFFICIENT_PERMISSIONS"),
        ("has permission", json!({ "key": limited, "permissions": ["read"] }), "VALID"),
    ];
    for (name, body, expected) in &cases {
        let edge = world.edge_verify(0, &root, body.clone());
        assert_eq!(code(&edge), *expected, "edge, {name}: {}", edge.1);
        let origin = world.origin_verify(&root, body.clone());
        assert_eq!(code(&origin), *expected, "origin, {name}: {}", origin.1);
        if *expected == "NOT_FOUND" || *expected == "MALFORMED" {
            assert!(edge.1.get("key_id").is_none(), "{name} leaks details: {}", edge.1);
        }
    }
    // The other tenant sees its own key and not ours.
    assert_eq!(code(&world.edge_verify(0, &other_root, json!({ "key": other_key }))), "VALID");
    assert_eq!(code(&world.edge_verify(0, &other_root, json!({ "key": valid }))), "NOT_FOUND");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn purge_acknowledgements_and_replay_protection() {
    let mut world = World::start(&[RegionPlan::Up, RegionPlan::Down, RegionPlan::WrongSecret]).unwrap();
    let api = world.create_api("regions", 300_000);
    let (id, key) = world.create_key(&api, json!({}));
    let active = world.region_kv_record(0, &key).expect("written before the create answered");
    let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    assert_eq!(status, 200, "{revoked}");
    let regions = revoked["regions"].as_array().unwrap();
    let by_name =
        |name: &str| regions.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} in {revoked}"));
    assert_eq!(by_name("r0")["acknowledged"], true, "{revoked}");
    assert_eq!(by_name("r1")["acknowledged"], false, "down region: {revoked}");
    assert_eq!(by_name("r2")["acknowledged"], false, "wrong secret: {revoked}");
    assert!(by_name("r2")["error"].as_str().unwrap().contains("BAD_SIGNATURE"), "{revoked}");

    // A purge signed with the right secret is accepted once; the identical request is refused.
    // It carries the key's record from before the revocation: a late purge never moves the
    // region back to an older version.
    let region = world.regions[0].spec.url();
    let body = serde_json::to_vec(&json!({ "region": "r0", "records": [active] })).unwrap();
    let now = keyward_tests::now_ms();
    let send = |timestamp: i64, nonce: &str| {
        let signature = internal::sign(world.secret.as_bytes(), "POST", PURGE_PATH, timestamp, nonce, &body);
        reqwest::blocking::Client::new()
            .post(format!("{region}{PURGE_PATH}"))
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(NONCE_HEADER, nonce)
            .header(SIGNATURE_HEADER, signature)
            .body(body.clone())
            .send()
            .unwrap()
    };
    let first = send(now, "replay-test-nonce-0001");
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(world.edge_code(0, &key).0, "REVOKED", "an older record in a purge was ignored");
    let second = send(now, "replay-test-nonce-0001");
    assert_eq!(second.status().as_u16(), 401);
    assert!(second.text().unwrap().contains("REPLAYED"));
    let stale = send(now - 120_000, "replay-test-nonce-0002");
    assert_eq!(stale.status().as_u16(), 401);
    assert!(stale.text().unwrap().contains("STALE_TIMESTAMP"));
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn admin_routes_check_the_root_key_and_its_scope() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    let origin = world.origin();
    let api = world.create_api("guarded", 1_000);
    let (id, key) = world.create_key(&api, json!({}));
    let key_path = format!("/v1/keys/{id}");

    let (s, e) = world.call(&origin, None, Method::GET, &key_path, None);
    assert_eq!((s, e["error"]["code"].as_str()), (401, Some("UNAUTHORIZED")));
    let stranger = new_root_key();
    world.remember(&stranger);
    let (s, _) = world.call(&origin, Some(&stranger), Method::GET, &key_path, None);
    assert_eq!(s, 401);
    let (s, _) = world.call(&origin, Some("not-a-key"), Method::GET, &key_path, None);
    assert_eq!(s, 401);

    // A root key that may only read APIs.
    let (s, reader) =
        world.admin(Method::POST, "/v1/root-keys", Some(json!({ "name": "reader", "scopes": ["api.read"] })));
    assert_eq!(s, 201, "{reader}");
    let reader = reader["key"].as_str().unwrap().to_owned();
    let (s, _) = world.call(&origin, Some(&reader), Method::GET, "/v1/apis", None);
    assert_eq!(s, 200);
    let (s, e) = world.call(&origin, Some(&reader), Method::GET, &key_path, None);
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("FORBIDDEN")), "{e}");
    let (s, _) = world.call(&origin, Some(&reader), Method::POST, &format!("{key_path}/revoke"), None);
    assert_eq!(s, 403);
    let (s, _) = world.call(
        &origin,
        Some(&reader),
        Method::POST,
        "/v1/root-keys",
        Some(json!({ "name": "x", "scopes": ["api.read"] })),
    );
    assert_eq!(s, 403);
    // It cannot verify at the edge either.
    let (s, _) = world.edge_verify(0, &reader, json!({ "key": key }));
    assert_eq!(s, 401, "a root key without a verify scope is not known to the edge");
    // A root key cannot grant what it does not hold.
    let (s, verifier) = world.admin(
        Method::POST,
        "/v1/root-keys",
        Some(json!({ "name": "v", "scopes": [format!("api.{api}.verify_key"), "root_key.create"] })),
    );
    assert_eq!(s, 201, "{verifier}");
    let verifier_id = verifier["id"].as_str().unwrap().to_owned();
    let verifier = verifier["key"].as_str().unwrap().to_owned();
    let (s, e) = world.call(
        &origin,
        Some(&verifier),
        Method::POST,
        "/v1/root-keys",
        Some(json!({ "name": "x", "scopes": ["api.*.verify_key"] })),
    );
    assert_eq!(s, 403, "{e}");
    assert_eq!(code(&world.edge_verify(0, &verifier, json!({ "key": key }))), "VALID");

    // Another workspace's root key sees nothing of this one: NOT_FOUND, never 403.
    let (s, other) = world.admin(Method::POST, "/v1/workspaces", Some(json!({ "name": "elsewhere" })));
    assert_eq!(s, 201);
    let other = other["root_key"]["key"].as_str().unwrap().to_owned();
    let (s, e) = world.call(&origin, Some(&other), Method::GET, &key_path, None);
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("NOT_FOUND")), "{e}");
    let (s, _) = world.call(&origin, Some(&other), Method::POST, &format!("{key_path}/revoke"), None);
    assert_eq!(s, 404);
    let (s, e) = world.call(&origin, Some(&other), Method::GET, &format!("/v1/keys?api_id={api}"), None);
    assert_eq!(s, 404, "{e}");
    let (s, apis) = world.call(&origin, Some(&other), Method::GET, "/v1/apis", None);
    assert_eq!(s, 200);
    assert_eq!(apis["apis"], json!([]));
    let (s, _) = world.call(&origin, Some(&other), Method::POST, "/v1/workspaces", Some(json!({ "name": "nested" })));
    assert_eq!(s, 403, "only the bootstrap key creates workspaces");
    assert_eq!(code(&world.edge_verify(0, &other, json!({ "key": key }))), "NOT_FOUND");

    // Root keys are listed without secrets and can be revoked, only within their workspace.
    let (s, listed) = world.admin(Method::GET, "/v1/root-keys", None);
    assert_eq!(s, 200, "{listed}");
    let ids: Vec<&str> = listed["root_keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&verifier_id.as_str()), "{listed}");
    assert!(!listed.to_string().contains(&verifier), "a listing never shows a secret");
    let (s, _) = world.call(&origin, Some(&reader), Method::GET, "/v1/root-keys", None);
    assert_eq!(s, 403);
    let revoke_path = format!("/v1/root-keys/{verifier_id}/revoke");
    let (s, _) = world.call(&origin, Some(&other), Method::POST, &revoke_path, None);
    assert_eq!(s, 404, "another workspace cannot see our root keys");
    let (s, revoked) = world.admin(Method::POST, &revoke_path, None);
    assert_eq!((s, revoked["status"].as_str()), (200, Some("revoked")), "{revoked}");
    let (s, _) = world.call(&origin, Some(&verifier), Method::POST, "/v1/keys/verify", Some(json!({ "key": key })));
    assert_eq!(s, 401, "the control plane refuses a revoked root key at once");
    let revoked_at = std::time::Instant::now();
    world.wait_for("the edge to refuse the revoked root key", std::time::Duration::from_secs(3), || {
        (world.edge_verify(0, &verifier, json!({ "key": key })).0 == 401).then_some(())
    });
    assert!(revoked_at.elapsed() <= std::time::Duration::from_millis(1_500), "{:?}", revoked_at.elapsed());
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn every_key_survives_a_control_plane_restart() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    let root = world.root_key.clone();
    let api = world.create_api("durable", 1_000);
    let mut ids = Vec::new();
    for i in 0..5 {
        let (id, _) = world.create_key(&api, json!({ "meta": { "n": i }, "permissions": ["p"] }));
        ids.push(id);
    }
    let (_, revoked_key) = world.create_key(&api, json!({}));
    let revoked_id = {
        let (s, listed) = world.admin(Method::GET, &format!("/v1/keys?api_id={api}&limit=100"), None);
        assert_eq!(s, 200);
        listed["keys"].as_array().unwrap().last().unwrap()["id"].as_str().unwrap().to_owned()
    };
    world.admin(Method::POST, &format!("/v1/keys/{revoked_id}/revoke"), None);
    world.admin(Method::PATCH, &format!("/v1/keys/{}", ids[0]), Some(json!({ "enabled": false, "name": "renamed" })));
    let before: Vec<Value> = ids.iter().map(|id| world.admin(Method::GET, &format!("/v1/keys/{id}"), None).1).collect();

    world.restart_control_plane().unwrap();

    let after: Vec<Value> = ids.iter().map(|id| world.admin(Method::GET, &format!("/v1/keys/{id}"), None).1).collect();
    assert_eq!(before, after);
    assert_eq!(after[0]["enabled"], false);
    assert_eq!(after[0]["name"], "renamed");
    assert_eq!(after[3]["meta"], json!({ "n": 3 }));
    assert_eq!(code(&world.origin_verify(&root, json!({ "key": revoked_key }))), "REVOKED");
    assert_eq!(code(&world.edge_verify(0, &root, json!({ "key": revoked_key }))), "REVOKED");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_leaked_key_is_found_by_its_visible_start() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    let api = world.create_api("findable", 1_000);
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(world.create_key(&api, json!({})));
    }
    let (leaked_id, leaked) = &created[2];
    // What a screenshot shows: the prefix and a few characters.
    let visible = &leaked[..leaked.find('_').unwrap() + 6 + 5];
    let (s, found) = world.admin(Method::GET, &format!("/v1/keys?start={visible}"), None);
    assert_eq!(s, 200, "{found}");
    let ids: Vec<&str> = found["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&leaked_id.as_str()), "{found}");

    // Keyset pagination walks every key exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?api_id={api}&limit=2&cursor={c}"),
            None => format!("/v1/keys?api_id={api}&limit=2"),
        };
        let (s, page) = world.admin(Method::GET, &path, None);
        assert_eq!(s, 200, "{page}");
        seen.extend(page["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = created.iter().map(|(id, _)| id.clone()).collect();
    expected.sort();
    assert_eq!(seen, expected);
    world.assert_no_plaintext();
}

/// Runs the `keyward` CLI against the world's control plane; answers its parsed JSON output.
fn cli(world: &World, args: &[&str]) -> Value {
    let out = world.cli(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keyward {args:?} printed no JSON: {e}"))
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn the_cli_walks_the_incident_from_leaked_start_to_revoked() {
    let mut world = World::start(&[RegionPlan::Up]).unwrap();
    let root = world.root_key.clone();
    let api = cli(&world, &["apis", "create", "--name", "payments-live", "--prefix", "sk_live"]);
    let api_id = api["id"].as_str().unwrap();
    let created = cli(&world, &["keys", "create", "--api-id", api_id, "--name", "ci", "--owner-id", "team-a"]);
    let key = created["key"].as_str().unwrap().to_owned();
    world.remember(&key);
    assert_eq!(code(&world.edge_verify(0, &root, json!({ "key": key }))), "VALID");

    let found = cli(&world, &["keys", "list", "--start", created["start"].as_str().unwrap()]);
    assert_eq!(found["keys"][0]["id"], created["id"]);
    assert_eq!(found["keys"][0]["owner_id"], "team-a");
    let revoked = cli(&world, &["keys", "revoke", found["keys"][0]["id"].as_str().unwrap()]);
    assert_eq!(revoked["regions"][0]["acknowledged"], true, "{revoked}");
    assert_eq!(code(&world.edge_verify(0, &root, json!({ "key": key }))), "REVOKED");

    // The CLI reads the key from stdin with `-`, so it never shows in `ps` or shell history.
    let mut child = world
        .cli_command(&["keys", "verify", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let verified: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verified["code"], "REVOKED");
    assert_eq!(verified["source"], "origin");

    // An error says what was wrong and fails the command.
    let out = world.cli_command(&["keys", "get", "nope"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_ID"));
    world.assert_no_plaintext();
}
