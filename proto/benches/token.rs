//! Token verification: what a relay pays per attach (Ed25519 verify plus parsing).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use kakehashi_proto::{Claims, Mode, Permissions, Role, SessionId, token};

fn claims() -> Claims {
    Claims {
        role: Role::Host,
        mode: Mode::Control,
        session_id: SessionId::from_bytes([9; 16]),
        participant_id: 7,
        issued_at: 1_000,
        expires_at: 2_000,
        session_deadline: 3_000,
        permissions: Permissions::VIEW | Permissions::CONTROL,
        public_key: [3; 32],
        relay_id: "relay-1".into(),
    }
}

fn verify(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[5; 32]);
    let public = key.verifying_key();
    let claims = claims();
    let signed = claims.sign(&key);
    c.bench_function("token/sign", |b| b.iter(|| black_box(&claims).sign(&key)));
    c.bench_function("token/verify", |b| {
        b.iter(|| token::verify(black_box(&signed), &public, 1_500))
    });
    c.bench_function("token/decode_unverified", |b| {
        b.iter(|| Claims::decode_unverified(black_box(&signed)).map(|(c, _, _)| c))
    });
}

criterion_group!(benches, verify);
criterion_main!(benches);
