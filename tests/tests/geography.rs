//! The whole system placed in the `world` geography: regions 20, 90 and 180 ms one way from the
//! home of the KeyState objects, the control plane 20-100 ms from them. One short smoke test;
//! the rest of the suite runs on plain loopback (or whatever `KEYWARD_GEOGRAPHY` names).

use std::time::{Duration, Instant};

use keyward_tests::geography::Geography;
use keyward_tests::world::{Options, RegionPlan, World};
use reqwest::Method;
use serde_json::json;

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn world_geography_delays_every_link_and_revocation_still_reaches_every_region() {
    let geography = Geography::preset("world").unwrap();
    let options = Options { geography: Some(geography.clone()), ..Options::default() };
    let mut world = World::start_opts(&[RegionPlan::Up; 3], options).unwrap();
    let api = world.create_api("far-apart", 1_000);
    let (id, key) = world.create_key(&api, json!({}));
    for i in 0..3 {
        // A miss reads KV and the authority: at least one modelled round trip to the home.
        let started = Instant::now();
        assert_eq!(world.edge_code(i, &key).0, "VALID", "region {i}");
        let took = started.elapsed();
        let round_trip = Duration::from_secs_f64(2.0 * geography.region_to_home(i).min_ms / 1e3);
        assert!(took >= round_trip, "region {i}'s miss took {took:?}, under the modelled {round_trip:?}");
        world.make_hot(i, &key);
    }
    let started = Instant::now();
    let (status, answer) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["authority"]["acknowledged"], true, "{answer}");
    // The answer waits for the authority (50 ms each way) and the farthest region (100 ms).
    assert!(took >= Duration::from_millis(200), "the revoke call took {took:?}: the links were not delayed");
    for i in 0..3 {
        let region = answer["regions"].as_array().unwrap().iter().find(|r| r["name"] == format!("r{i}")).unwrap();
        assert_eq!(region["acknowledged"], true, "{answer}");
        assert_eq!(world.edge_code(i, &key).0, "REVOKED", "region {i}");
    }
    for (i, region) in world.regions.iter().enumerate() {
        let held = region.authority_relay.as_ref().unwrap().stats();
        let link = geography.region_to_home(i);
        assert!(
            held.forward.chunks > 0 && held.back.chunks > 0,
            "region {i}'s Durable Object calls bypassed the relay"
        );
        let per_chunk = link.min_ms / keyward_tests::geography::BINDING_ROUND_TRIPS;
        assert!(held.forward.held_ms_mean() >= per_chunk, "region {i}: {held:?}");
        eprintln!("region {i} → home: {held:?}");
    }
    world.assert_no_plaintext();
}
