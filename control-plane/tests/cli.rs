//! The `keyward` binary as its users run it: `keyward serve` on a temp SQLite database, and the
//! client subcommands against it in both forms (tables for people, JSON for scripts), with the
//! errors that say what to fix.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const KEYWARD: &str = env!("CARGO_BIN_EXE_keyward");

/// `keyward serve`, stopped when dropped.
struct Server {
    child: Child,
    url: String,
    root_key: String,
    /// Where `/metrics` answers.
    metrics: String,
    database: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `keyward serve` on a new database and a free port, and reads the first root key and
/// the address from what it prints. Its key authority and its one region are on port 9 of
/// loopback, where nothing listens, so every change reports both, unacknowledged.
fn serve() -> Server {
    serve_with_kv("http://127.0.0.1:9/cdn-cgi/explorer/api")
}

/// [`serve`], with its region's KV at `kv_url`.
fn serve_with_kv(kv_url: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyward.toml");
    let database = dir.path().join("keyward.sqlite");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\npurge_secret = \"{}\"\nauthority_url = \"http://127.0.0.1:9\"\n\
         [[regions]]\nname = \"nowhere\"\nurl = \"http://127.0.0.1:9\"\n\
         kv_url = \"{kv_url}\"\nkv_namespace_id = \"keyward-test\"\n",
        database.display(),
        "s".repeat(32),
    );
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(KEYWARD)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_clear()
        .env("KEYWARD_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut root_key = None;
    let mut metrics = None;
    while let Some(Ok(line)) = lines.next() {
        if let Some(url) = line.strip_prefix("keyward metrics on ") {
            metrics = Some(url.trim().to_owned());
        }
        if let Some(key) = line.strip_prefix("First root key (shown once, store it now): ") {
            root_key = Some(key.trim().to_owned());
        }
        if let Some(url) = line.strip_prefix("keyward listening on ") {
            let url = url.trim().to_owned();
            // Keep reading, so that the server never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            let root_key = root_key.expect("serve prints the first root key before it listens");
            let metrics = metrics.expect("serve prints where its metrics are before it listens");
            return Server { child, url, root_key, metrics, database, _dir: dir };
        }
    }
    panic!("keyward serve exited before it listened: {:?}", child.wait());
}

/// Runs `keyward` with only these environment variables.
fn keyward(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut child = Command::new(KEYWARD)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

impl Server {
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        keyward(args, &[("KEYWARD_URL", &self.url), ("KEYWARD_ROOT_KEY", &self.root_key)], stdin)
    }

    /// Runs a command that must succeed; answers what it printed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(output.status.success(), "keyward {args:?} failed: {}", stderr(&output));
        stdout(&output)
    }

    /// Runs a command that must succeed and print JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("keyward {args:?} printed no JSON ({e}): {out}"))
    }
}

/// Each line split into its columns (runs of two or more spaces apart).
fn columns(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|line| line.trim().split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect())
        .collect()
}

#[test]
fn a_leaked_key_is_found_and_revoked_in_both_forms() {
    let server = serve();
    let api = server.json(&["apis", "create", "--name", "payments-live", "--prefix", "sk_live", "--json"]);
    let api_id = api["id"].as_str().unwrap();

    // `create` shows the plaintext once, set apart, with a warning.
    let created = server.ok(&[
        "keys",
        "create",
        "--api-id",
        api_id,
        "--name",
        "checkout",
        "--owner-id",
        "acct_42",
        "--format",
        "table",
    ]);
    let plaintext = created.lines().map(str::trim).find(|l| l.starts_with("sk_live_")).expect(&created).to_owned();
    assert_eq!(created.matches(&plaintext).count(), 1, "{created}");
    assert!(created.contains("only time this key is shown"), "{created}");
    let id = created.split_whitespace().nth(2).unwrap().to_owned();
    assert!(id.starts_with("key_"), "{created}");
    let start = &plaintext[..14];

    // Piped and without flags, `list` prints the API's JSON; `--format table` a table.
    let listed = server.json(&["keys", "list", "--start", start]);
    assert_eq!(listed["keys"][0]["id"], id.as_str(), "{listed}");
    let table = server.ok(&["keys", "list", "--start", start, "--format", "table"]);
    let rows = columns(&table);
    assert_eq!(rows[0], ["ID", "START", "NAME", "OWNER", "STATUS", "EXPIRES"], "{table}");
    assert_eq!(
        rows[1][..5],
        [id.as_str(), listed["keys"][0]["start"].as_str().unwrap(), "checkout", "acct_42", "active"]
    );
    assert_eq!(rows[1][5], "never", "{table}");
    assert_eq!(server.json(&["keys", "list", "--start", start, "--json"]), listed);

    let got = server.ok(&["keys", "get", &id, "--format", "table"]);
    assert!(columns(&got).contains(&vec!["status".into(), "active".into()]), "{got}");
    assert_eq!(server.json(&["keys", "get", &id, "--json"])["name"], "checkout");

    // `revoke` prints one line for the key's authority and one per region.
    let revoked = server.ok(&["keys", "revoke", &id, "--format", "table"]);
    assert!(revoked.starts_with(&format!("Revoked key {id} (version 2).\n")), "{revoked}");
    let targets: Vec<Vec<String>> =
        revoked.lines().filter(|l| l.starts_with("  ")).map(columns).map(|mut c| c.remove(0)).collect();
    assert_eq!(targets.len(), 2, "{revoked}");
    assert_eq!(targets[0][..2], ["authority", "NOT acknowledged"], "{revoked}");
    assert_eq!(targets[1][..2], ["nowhere", "NOT acknowledged"], "{revoked}");
    assert!(revoked.contains("retried"), "{revoked}");
    let again = server.json(&["keys", "revoke", &id, "--json"]);
    assert_eq!(again["status"], "revoked");
    assert_eq!(again["regions"].as_array().map(Vec::len), Some(1), "{again}");
    assert_eq!(again["authority"]["acknowledged"], false, "{again}");

    let verify = server.run_with_stdin(&["keys", "verify", "-", "--format", "table"], Some(&plaintext));
    assert!(verify.status.success(), "{}", stderr(&verify));
    let verified = stdout(&verify);
    assert!(verified.starts_with("REVOKED: not valid (answered from origin)\n"), "{verified}");

    // Only `create` ever printed the plaintext.
    for out in [&table, &got, &revoked, &verified, &listed.to_string(), &again.to_string()] {
        assert!(!out.contains(&plaintext), "the plaintext leaked into: {out}");
    }
}

#[test]
fn errors_say_what_to_fix_and_exit_non_zero() {
    let no_key = keyward(&["keys", "list", "--start", "sk_live_3x"], &[], None);
    assert!(!no_key.status.success());
    assert!(stderr(&no_key).contains("KEYWARD_ROOT_KEY"), "{}", stderr(&no_key));

    // Nothing listens on port 9 of loopback.
    let env = [("KEYWARD_URL", "http://127.0.0.1:9"), ("KEYWARD_ROOT_KEY", "kw_root_x")];
    let unreachable = keyward(&["apis", "list"], &env, None);
    assert!(!unreachable.status.success());
    let message = stderr(&unreachable);
    for needle in ["http://127.0.0.1:9", "KEYWARD_URL", "--url"] {
        assert!(message.contains(needle), "no `{needle}` in: {message}");
    }

    let server = serve();
    let missing = server.run(&["keys", "get", "key_01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("NOT_FOUND (404 Not Found): "), "{}", stderr(&missing));
    let wrong_key =
        keyward(&["apis", "list"], &[("KEYWARD_URL", &server.url), ("KEYWARD_ROOT_KEY", "kw_root_x")], None);
    assert!(!wrong_key.status.success());
    let message = stderr(&wrong_key);
    assert!(message.contains("UNAUTHORIZED") && message.contains("KEYWARD_ROOT_KEY"), "{message}");
}

/// A stand-in for a region's KV API (wrangler's copy of Cloudflare's): it accepts every write
/// and remembers the path of each. Answers its base URL and the paths written.
fn recording_kv() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let written = Arc::new(Mutex::new(Vec::new()));
    let seen = written.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().fallback(move |uri: axum::http::Uri| async move {
                seen.lock().unwrap().push(uri.path().to_owned());
                axum::Json(serde_json::json!({ "success": true }))
            });
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (url, written)
}

#[test]
fn a_workspace_locked_out_of_its_own_is_recovered_from_the_database() {
    let (kv_url, written) = recording_kv();
    let server = serve_with_kv(&kv_url);
    let acme = server.json(&["workspaces", "create", "--name", "acme", "--json"]);
    let acme_id = acme["id"].as_str().unwrap().to_owned();

    // The only root key of the first workspace revokes itself: nobody can call the API now.
    let roots = server.json(&["root-keys", "list", "--json"]);
    let only = roots["root_keys"][0]["id"].as_str().unwrap().to_owned();
    server.ok(&["root-keys", "revoke", &only]);
    let locked = server.run(&["apis", "list"]);
    assert!(!locked.status.success() && stderr(&locked).contains("UNAUTHORIZED"), "{}", stderr(&locked));

    // With two workspaces, `recover` must be told which, and lists them; it never makes a database.
    let database = server.database.to_str().unwrap();
    let ambiguous = keyward(&["admin", "recover", "--database", database], &[], None);
    assert!(!ambiguous.status.success());
    let message = stderr(&ambiguous);
    for needle in ["--workspace", &acme_id, "default"] {
        assert!(message.contains(needle), "no `{needle}` in: {message}");
    }
    let first = message.lines().find(|l| l.ends_with("  default")).expect(&message);
    let first = first.split_whitespace().next().unwrap().to_owned();
    let nowhere = server._dir.path().join("nothing.sqlite");
    let missing = keyward(&["admin", "recover", "--database", nowhere.to_str().unwrap()], &[], None);
    assert!(!missing.status.success() && stderr(&missing).contains("no database at"), "{}", stderr(&missing));
    assert!(!nowhere.exists());

    // The audit log's chain goes on with the control plane's secret, from its config.
    let config = server.database.with_file_name("keyward.toml");
    let env_config = [("KEYWARD_CONFIG", config.to_str().unwrap())];
    let recovered =
        keyward(&["admin", "recover", "--database", database, "--workspace", &first, "--json"], &env_config, None);
    assert!(recovered.status.success(), "{}", stderr(&recovered));
    let recovered: Value = serde_json::from_str(&stdout(&recovered)).unwrap();
    assert_eq!(recovered["workspace_id"], first.as_str(), "{recovered}");
    assert_eq!(recovered["published"], true, "{recovered}");
    let scopes = recovered["scopes"].to_string();
    for scope in ["root_key.manage", "root_key.create", "workspace.create", "api.*.read_key"] {
        assert!(scopes.contains(scope), "no `{scope}` in {scopes}");
    }
    let key = recovered["key"].as_str().unwrap();

    // The running control plane accepts the new root key at once...
    let env = [("KEYWARD_URL", server.url.as_str()), ("KEYWARD_ROOT_KEY", key)];
    let listed = keyward(&["root-keys", "list", "--json"], &env, None);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let states: Vec<(&str, &str)> = listed["root_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("bootstrap", "revoked"), ("recovered", "active")]);
    // ...and writes it to the edge from its outbox: the region's KV receives it.
    let hash = keyward_shared::Key::parse(key).unwrap().hash().to_hex();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !written.lock().unwrap().iter().any(|path| path.contains(&hash)) {
        assert!(Instant::now() < deadline, "the recovered root key never reached KV: {:?}", written.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Without the config, recovery refuses: the audit log's chain needs its secret.
    let refused = keyward(&["admin", "recover", "--database", database, "--workspace", &acme_id], &[], None);
    assert!(!refused.status.success() && stderr(&refused).contains("audit"), "{}", stderr(&refused));
    // For people: the key once, with its warning; another workspace's gets no `workspace.create`.
    let table = keyward(
        &["admin", "recover", "--database", database, "--workspace", &acme_id, "--format", "table"],
        &env_config,
        None,
    );
    assert!(table.status.success(), "{}", stderr(&table));
    let table = stdout(&table);
    assert!(table.contains("only time this root key is shown") && table.contains(&acme_id), "{table}");
    assert!(!table.contains("workspace.create"), "{table}");
    assert_eq!(table.lines().filter(|l| l.trim().starts_with("kw_root_")).count(), 1, "{table}");
}

/// `keys usage`: the origin's own verifications, shipped within about 2 s, read back as the
/// responder reads them, in both forms.
#[test]
fn usage_shows_who_used_a_key_in_both_forms() {
    let server = serve();
    let api = server.json(&["apis", "create", "--name", "usage", "--json"]);
    let created = server.json(&["keys", "create", "--api-id", api["id"].as_str().unwrap(), "--json"]);
    let (id, plaintext) = (created["id"].as_str().unwrap(), created["key"].as_str().unwrap());
    for _ in 0..2 {
        assert!(server.run_with_stdin(&["keys", "verify", "-", "--json"], Some(plaintext)).status.success());
    }
    server.ok(&["keys", "revoke", id, "--json"]);
    assert!(server.run_with_stdin(&["keys", "verify", "-", "--json"], Some(plaintext)).status.success());
    let started = Instant::now();
    let usage = loop {
        let usage = server.json(&["keys", "usage", id, "--json"]);
        if usage["total"] == 3 || started.elapsed() > Duration::from_secs(10) {
            break usage;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(usage["totals"], serde_json::json!({ "REVOKED": 1, "VALID": 2 }), "{usage}");
    assert!(usage["last_valid_ms"].as_i64().unwrap() < usage["last_used_ms"].as_i64().unwrap(), "{usage}");
    let table = server.ok(&["keys", "usage", id, "--hours", "1", "--format", "table"]);
    let rows = columns(&table);
    assert!(table.contains("3 verifications"), "{table}");
    assert!(rows.contains(&vec!["VALID".into(), "2".into()]), "{table}");
    assert!(rows.contains(&vec!["REVOKED".into(), "1".into()]), "{table}");
    assert!(rows.contains(&vec!["region".into(), "origin".into(), "3".into()]), "{table}");
    assert!(table.contains("0 events lost"), "{table}");
    assert!(!table.contains(plaintext));

    // An incident without a terminal revokes nothing unless told to (`--yes`).
    let second = server.json(&["keys", "create", "--api-id", api["id"].as_str().unwrap(), "--json"]);
    let refused = server.run_with_stdin(&["incident", second["id"].as_str().unwrap()], Some("y\n"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass --yes"), "{refused:?}");
    assert_eq!(server.json(&["keys", "get", second["id"].as_str().unwrap(), "--json"])["status"], "active");
    let unknown = server.run_with_stdin(&["incident", "sk_nothing_like_it"], None);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no key starts with"), "{unknown:?}");

    // The proof: the origin's VALID answers came before the revoke; none after it.
    let proof = server.ok(&["keys", "proof", id, "--format", "table"]);
    assert!(proof.contains("revoked") && proof.contains("0 violations"), "{proof}");
    assert_eq!(server.json(&["keys", "proof", id, "--json"])["within_promise"], 0);

    // `/metrics` answers on its own address, not on the admin API, with no workspace label.
    let metrics = reqwest::blocking::get(&server.metrics).unwrap().text().unwrap();
    assert!(metrics.contains(r#"keyward_verifications_total{outcome="VALID",region="origin"} 2"#), "{metrics}");
    assert!(metrics.contains(r#"keyward_outbox_pending{target="purge:nowhere"} 1"#), "{metrics}");
    assert!(metrics.contains("keyward_kv_write_errors_total"), "{metrics}");
    assert!(!metrics.contains("workspace"), "{metrics}");
    let admin = reqwest::blocking::get(format!("{}/metrics", server.url)).unwrap();
    assert_eq!(admin.status(), 404);
}

/// The audit log: each writing admin route leaves one entry naming its root key and request;
/// `audit verify` passes, then fails naming the entry after a row is edited by hand, after a row
/// is edited and the chain recomputed without the secret, and after the last rows are deleted
/// (against a checkpoint saved before).
#[test]
fn every_admin_change_is_audited_and_tampering_is_found() {
    let server = serve();
    let api = server.json(&["apis", "create", "--name", "audited", "--json"]);
    let api_id = api["id"].as_str().unwrap();
    let key = server.json(&["keys", "create", "--api-id", api_id, "--json"]);
    let key_id = key["id"].as_str().unwrap();
    server.ok(&["keys", "update", key_id, "--name", "renamed", "--json"]);
    server.ok(&["keys", "revoke", key_id, "--json"]);
    let other = server.json(&["keys", "create", "--api-id", api_id, "--json"]);
    server.ok(&["keys", "delete", other["id"].as_str().unwrap(), "--json"]);
    let root = server.json(&["root-keys", "create", "--name", "reader", "--scope", "audit.read", "--json"]);
    server.ok(&["root-keys", "revoke", root["id"].as_str().unwrap(), "--json"]);
    let second = server.json(&["workspaces", "create", "--name", "second", "--json"]);
    let config = server.database.with_file_name("keyward.toml");
    let config = config.to_str().unwrap();
    assert!(keyward(&["outbox", "redrive", "--config", config, "--json"], &[], None).status.success());

    let entries = server.json(&["audit", "list", "--json"])["entries"].clone();
    let actions: Vec<&str> = entries.as_array().unwrap().iter().rev().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "workspace.create",
            "api.create",
            "key.create",
            "key.update",
            "key.revoke",
            "key.create",
            "key.delete",
            "root_key.create",
            "root_key.revoke",
        ],
        "{entries}"
    );
    assert_eq!(entries[8]["actor"], "system", "the first workspace, made at start-up");
    let first_root = server.json(&["root-keys", "list", "--json"])["root_keys"][0]["id"].clone();
    // The second workspace's creation is in its own log, and only there.
    let theirs_key = second["root_key"]["key"].as_str().unwrap();
    let theirs =
        keyward(&["audit", "list", "--json"], &[("KEYWARD_URL", &server.url), ("KEYWARD_ROOT_KEY", theirs_key)], None);
    let theirs: Value = serde_json::from_str(&stdout(&theirs)).unwrap();
    assert_eq!(theirs["entries"].as_array().map(Vec::len), Some(1), "{theirs}");
    assert_eq!(theirs["entries"][0]["action"], "workspace.create", "{theirs}");
    assert_eq!(theirs["entries"][0]["root_key_id"], first_root, "{theirs}");
    for entry in entries.as_array().unwrap().iter().take(8) {
        assert_eq!(entry["actor"], "request", "{entry}");
        assert_eq!(entry["root_key_id"], first_root, "{entry}");
        assert!(entry["request_id"].as_str().is_some_and(|id| !id.is_empty()), "{entry}");
        assert!(!entry.to_string().contains("\"hash\""), "a record's hash in the audit log: {entry}");
    }
    let revoke = &entries[4];
    assert_eq!(
        (revoke["before"]["status"].as_str(), revoke["after"]["status"].as_str()),
        (Some("active"), Some("revoked"))
    );
    let key_only = server.json(&["audit", "list", "--target", key_id, "--json"]);
    assert_eq!(key_only["entries"].as_array().unwrap().len(), 3, "{key_only}");

    let checkpoint = server.database.with_file_name("checkpoint.json");
    std::fs::write(&checkpoint, server.ok(&["audit", "checkpoint", "--json"])).unwrap();
    let cp = checkpoint.to_str().unwrap();
    let verify = || keyward(&["audit", "verify", "--config", config, "--checkpoint", cp], &[], None);
    let passed = verify();
    assert!(passed.status.success(), "{}", stderr(&passed));
    assert!(stdout(&passed).contains("\"verified\": true"), "{}", stdout(&passed));

    let db = Db::open(&server.database);
    assert_eq!(db.count("action = 'outbox.redrive' AND body LIKE '%\"console\"%'"), 1, "the operator's redrive");
    let (id, body) = db.row(4);
    // Edited in place: the body changed, the chain value left.
    db.exec(&format!(
        "UPDATE audit_log SET body = '{}' WHERE id = {id}",
        body.replace("renamed", "innocent").replace('\'', "''")
    ));
    assert_broken(verify(), id, "does not match");
    db.exec(&format!("UPDATE audit_log SET body = '{}' WHERE id = {id}", body.replace('\'', "''")));
    assert!(verify().status.success());
    // Edited, and the chain recomputed from there with a guessed secret.
    let macs = db.macs();
    db.exec(&format!(
        "UPDATE audit_log SET body = '{}' WHERE id = {id}",
        body.replace("renamed", "innocent").replace('\'', "''")
    ));
    db.rechain(id, b"a guess");
    assert_broken(verify(), id, "does not match");
    db.exec(&format!("UPDATE audit_log SET body = '{}' WHERE id = {id}", body.replace('\'', "''")));
    for (id, mac) in &macs {
        db.exec(&format!("UPDATE audit_log SET mac = '{mac}' WHERE id = {id}"));
    }
    assert!(verify().status.success());
    // The last two entries deleted: the chain alone still holds, the checkpoint does not.
    let last = macs.last().unwrap().0;
    db.exec(&format!("DELETE FROM audit_log WHERE id > {}", last - 2));
    let alone = keyward(&["audit", "verify", "--config", config], &[], None);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert_broken(verify(), last, "deleted");
}

fn assert_broken(output: Output, id: i64, why: &str) {
    let message = stderr(&output);
    assert!(!output.status.success(), "tampering was not found");
    assert!(message.contains(&format!("at entry {id}")) && message.contains(why), "{message}");
}

/// The control plane's SQLite file, opened beside it as someone with the file would.
struct Db(tokio::runtime::Runtime, sqlx::SqlitePool);

impl Db {
    fn open(path: &std::path::Path) -> Db {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pool = runtime.block_on(sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display()))).unwrap();
        Db(runtime, pool)
    }

    fn exec(&self, sql: &str) {
        self.0.block_on(sqlx::query(sql).execute(&self.1)).unwrap();
    }

    /// The `n`th entry (1-based, oldest first): its id and body.
    fn row(&self, n: i64) -> (i64, String) {
        let q = sqlx::query_as("SELECT id, body FROM audit_log ORDER BY id LIMIT 1 OFFSET ?").bind(n - 1);
        self.0.block_on(q.fetch_one(&self.1)).unwrap()
    }

    fn count(&self, filter: &str) -> i64 {
        let q = format!("SELECT COUNT(*) FROM audit_log WHERE {filter}");
        self.0.block_on(sqlx::query_scalar(&q).fetch_one(&self.1)).unwrap()
    }

    fn macs(&self) -> Vec<(i64, String)> {
        self.0.block_on(sqlx::query_as("SELECT id, mac FROM audit_log ORDER BY id").fetch_all(&self.1)).unwrap()
    }

    /// Recomputes every chain value from entry `from` on, keyed with `secret`.
    fn rechain(&self, from: i64, secret: &[u8]) {
        use hmac::Mac;
        let rows: Vec<(i64, String, String)> = self
            .0
            .block_on(sqlx::query_as("SELECT id, body, mac FROM audit_log ORDER BY id").fetch_all(&self.1))
            .unwrap();
        let mut previous = String::new();
        for (id, body, mac) in rows {
            if id >= from {
                let mut h = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
                h.update(previous.as_bytes());
                h.update(b"\n");
                h.update(body.as_bytes());
                let recomputed = hex::encode(h.finalize().into_bytes());
                self.exec(&format!("UPDATE audit_log SET mac = '{recomputed}' WHERE id = {id}"));
                previous = recomputed;
            } else {
                previous = mac;
            }
        }
    }
}

/// Credits through the CLI: set with a refill on create, shown by `keys get`, changed by
/// `keys credits`, removed by `update --credits unlimited`; a bad refill says what it takes.
/// (This control plane has no authority: what remains is for the whole-system tests.)
#[test]
fn credits_are_set_shown_and_changed_from_the_cli() {
    let server = serve();
    let api = server.json(&["apis", "create", "--name", "credited", "--json"]);
    let api_id = api["id"].as_str().unwrap();
    let args =
        ["keys", "create", "--api-id", api_id, "--credits", "100", "--refill-every", "10s", "--refill-amount", "5"];
    let created = server.json(&[&args[..], &["--refill-cap", "200", "--json"]].concat());
    let id = created["id"].as_str().unwrap();
    let key = server.json(&["keys", "get", id, "--json"]);
    assert_eq!(
        key["credits"],
        serde_json::json!({ "set_to": 100, "set_version": 1, "added": 0,
            "refill": { "every": { "kind": "interval", "ms": 10000 }, "amount": 5, "cap": 200 } }),
        "{key}"
    );
    let table = server.ok(&["keys", "get", id, "--format", "table"]);
    assert!(table.contains("set to 100 at version 1; refill every 10000 ms: +5 up to 200"), "{table}");
    let changed = server.json(&["keys", "credits", id, "increment", "20", "--json"]);
    assert_eq!(changed["key"]["credits"]["added"], 20, "{changed}");
    let asked = server.run(&["keys", "credits", id, "--format", "table"]);
    assert!(stdout(&asked).contains("did not answer"), "no authority here: {}", stdout(&asked));
    let cleared = server.json(&["keys", "update", id, "--credits", "unlimited", "--json"]);
    assert!(cleared["key"]["credits"].is_null(), "{cleared}");
    let bad =
        server.run(&["keys", "update", id, "--credits", "5", "--refill-every", "fortnightly", "--refill-amount", "1"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--refill-every takes `daily`"), "{}", stderr(&bad));
    let no_amount = server.run(&["keys", "credits", id, "set"]);
    assert!(!no_amount.status.success(), "set needs an amount");
}
