//! Frame codec cost: header encode/decode, the I/O-free decoder and the async reader
//! the relay and agents use, for a 10 kB screen frame.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kakehashi_proto::frame::{self, FLAG_KEY_FRAME};
use kakehashi_proto::{Channel, Frame, FrameDecoder, FrameHeader};

const PAYLOAD: usize = 10_000;

fn screen_frame() -> Frame {
    let header = FrameHeader::new(
        Channel::Screen,
        FLAG_KEY_FRAME,
        42,
        1_700_000_000_000_000,
        PAYLOAD as u32,
    );
    Frame::new(header, &vec![0xA5; PAYLOAD])
}

fn header(c: &mut Criterion) {
    let h = screen_frame().header;
    let bytes = h.encode();
    c.bench_function("header/encode", |b| b.iter(|| black_box(&h).encode()));
    c.bench_function("header/decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&bytes)))
    });
}

fn whole_frame(c: &mut Criterion) {
    let f = screen_frame();
    let payload = f.payload().to_vec();
    let mut g = c.benchmark_group("frame_10k");
    g.throughput(Throughput::Bytes(f.raw.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| Frame::new(black_box(f.header), black_box(&payload)))
    });
    g.bench_function("decoder", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&f.raw[..]);
            FrameDecoder::for_channel(Channel::Screen).decode(black_box(&mut buf))
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    g.bench_function("read_frame", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut reader = black_box(&f.raw[..]);
                frame::read_frame(&mut reader, &mut FrameDecoder::for_channel(Channel::Screen))
                    .await
            })
        })
    });
    g.finish();
}

criterion_group!(benches, header, whole_frame);
criterion_main!(benches);
