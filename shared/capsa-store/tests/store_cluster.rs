//! The store's tests (common/store_tests.rs) again, on a Redis Cluster of three masters
//! (`redis+cluster://`): every key carries the `{capsa}` hash tag, so every Lua script and
//! MULTI runs on the one shard holding that slot. Plus: the keys really are all there.

type Redis = capsa_test_support::RedisCluster;

include!("common/store_tests.rs");

/// After sessions, API keys and a node heartbeat, every key Capsa wrote is on one master
/// (the `{capsa}` slot's) and none on the other two.
#[tokio::test]
async fn every_key_lives_on_the_shard_of_the_capsa_slot() {
    let redis = Redis::start();
    let conn = capsa_store::connect(&redis.url()).await.unwrap();
    let sessions = SessionStore::new(conn.clone(), StoreConfig::default());
    sessions
        .create(&new_session("s-1", "t-1", Duration::from_secs(60)), 10)
        .await
        .unwrap();
    ApiKeyStore::new(conn.clone())
        .create("t-1", "k")
        .await
        .unwrap();
    NodeRegistry::new(conn.clone())
        .heartbeat(&node("n-1", 4), Duration::from_secs(30))
        .await
        .unwrap();
    let mut per_node = Vec::new();
    for port in redis.ports() {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--scan"])
            .output()
            .expect("redis-cli --scan");
        let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert!(
            keys.iter().all(|k| k.starts_with(capsa_store::KEY_PREFIX)),
            "{keys:?}"
        );
        per_node.push(keys.len());
    }
    per_node.sort();
    assert_eq!(
        per_node[..2],
        [0, 0],
        "keys on more than one shard: {per_node:?}"
    );
    assert!(per_node[2] >= 5, "{per_node:?}");
}
