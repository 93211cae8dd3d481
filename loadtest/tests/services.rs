//! The real-service harness works: a test that needs Redis or etcd gets a live one (from
//! `KAKEHASHI_TEST_*` or started here), and under CI=true a missing one is a failure.

use anyhow::Result;
use kakehashi_loadtest::services;

#[test]
fn redis_and_etcd_are_real_and_answer() -> Result<()> {
    let Some(redis) = services::redis()? else {
        return Ok(());
    };
    assert!(redis.url.starts_with("redis://127.0.0.1:"), "{}", redis.url);
    let Some(etcd) = services::etcd()? else {
        return Ok(());
    };
    assert!(etcd.url.starts_with("http://127.0.0.1:"), "{}", etcd.url);
    Ok(())
}
