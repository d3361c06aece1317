//! Prints how many whole pure verifications (parse, hash, decide) and raw SHA-256 hashes of the
//! same key one core does per second, measured alternately in one run. Run in release by
//! `cargo xtask bench verify`; ends with a `name=value` line.

use std::hint::black_box;
use std::time::{Duration, Instant};

use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::scope::{ApiSelector, KeyAction};
use keyward_shared::verify::Caller;
use keyward_shared::{Code, Key, KeyHash, KeyRecord, Scope, Scopes, VerifyRequest, decide};

fn main() {
    let key = Key::generate("sk_live", [7; 32]).expect("valid prefix");
    let text = key.expose().to_owned();
    let scopes = Scopes(vec![Scope::Key { api: ApiSelector::Any, action: KeyAction::VerifyKey }]);
    let record = KeyRecord {
        schema: RECORD_SCHEMA,
        id: "key_1".into(),
        hash: key.hash(),
        api_id: "api_1".into(),
        workspace_id: "ws_1".into(),
        name: None,
        start: key.start().into(),
        owner_id: None,
        meta: Default::default(),
        enabled: true,
        status: KeyStatus::Active,
        expires_at: Some(i64::MAX),
        permissions: vec!["read".into()],
        version: 1,
        max_staleness_ms: 1_000,
        created_at: 0,
        updated_at: 0,
        credits: None,
        ratelimits: Vec::new(),
        policy: Default::default(),
        identity_id: None,
    };
    let request = VerifyRequest {
        key: text.clone(),
        api_id: None,
        permissions: vec!["read".into()],
        client: None,
        cost: None,
        idempotency_key: None,
        ..VerifyRequest::default()
    };
    let caller = Caller { workspace_id: "ws_1", scopes: &scopes };
    assert_eq!(decide(Some(&record), &key.hash(), caller, &request, 1).code, Code::Valid);

    let (rounds, per_round) = (10, 100_000);
    let (mut decide_time, mut sha_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            let parsed = Key::parse(black_box(&text)).expect("valid");
            black_box(decide(Some(&record), &parsed.hash(), caller, black_box(&request), 1));
        }
        decide_time += t.elapsed();
        let t = Instant::now();
        for _ in 0..per_round {
            black_box(KeyHash::of(black_box(&text)));
        }
        sha_time += t.elapsed();
    }
    let n = f64::from(rounds * per_round);
    let (decide_per_s, sha_per_s) = (n / decide_time.as_secs_f64(), n / sha_time.as_secs_f64());
    println!(
        "shared decision (parse + hash + decide): {decide_per_s:.0}/s; raw SHA-256 of the same key: {sha_per_s:.0}/s"
    );
    println!("shared_decide_per_s={decide_per_s:.0} sha256_per_s={sha_per_s:.0}");
}
