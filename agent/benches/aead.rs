//! Per-frame end-to-end AEAD: AES-256-GCM seal and open of a 10 kB screen frame with
//! the agent's own `SessionKeys` (header as associated data, channel + sequence nonce).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kakehashi_agent::crypto::{Keypair, SessionKeys, Side};
use kakehashi_proto::{Channel, SessionId};

const PAYLOAD: usize = 10_000;

fn aead(c: &mut Criterion) {
    let session = SessionId::from_bytes([1; 16]);
    let (host, viewer) = match (Keypair::generate(), Keypair::generate()) {
        (Ok(h), Ok(v)) => (h, v),
        _ => panic!("the OS has no randomness for the bench keys"),
    };
    let derive = |me: &Keypair, side, peer: &Keypair| {
        SessionKeys::derive(me, side, &peer.public_bytes(), &session)
            .unwrap_or_else(|e| panic!("key agreement: {e}"))
    };
    let host_keys = derive(&host, Side::Host, &viewer);
    let viewer_keys = derive(&viewer, Side::Viewer, &host);
    let plaintext = vec![0x5A; PAYLOAD];
    let sealed = host_keys
        .seal(Channel::Screen, 0, 1, &plaintext)
        .unwrap_or_else(|e| panic!("seal: {e}"));

    let mut g = c.benchmark_group("aead_10k");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut seq = 1u64;
    g.bench_function("seal", |b| {
        b.iter(|| {
            seq += 1;
            host_keys.seal(Channel::Screen, 0, seq, black_box(&plaintext))
        })
    });
    g.bench_function("open", |b| b.iter(|| viewer_keys.open(black_box(&sealed))));
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
