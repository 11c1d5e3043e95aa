//! Criterion benchmarks of the hot pure paths: nixbase32, NAR encoding of an in-memory tree,
//! narinfo rendering with signing, and (see `store.rs`) NAR walks and path-info lookups.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hearth::nix::nar::Node;
use hearth::nix::narinfo::NarInfo;
use hearth::nix::nixbase32;
use hearth::nix::signing::SecretKey;

fn nixbase32_bench(c: &mut Criterion) {
    let hash: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
    let encoded = nixbase32::encode(&hash);
    let mut g = c.benchmark_group("nixbase32");
    g.bench_function("encode_32", |b| b.iter(|| nixbase32::encode(black_box(&hash))));
    g.bench_function("decode_32", |b| b.iter(|| nixbase32::decode_fixed::<32>(black_box(encoded.as_bytes()))));
    g.finish();
}

fn tree(dirs: usize, files: usize, size: usize) -> Node {
    let mut root = BTreeMap::new();
    for d in 0..dirs {
        let mut entries = BTreeMap::new();
        for f in 0..files {
            entries.insert(
                format!("file-{f:04}").into_bytes(),
                Node::Regular { executable: f % 7 == 0, contents: vec![b'x'; size] },
            );
        }
        root.insert(format!("dir-{d:03}").into_bytes(), Node::Directory(entries));
    }
    Node::Directory(root)
}

fn nar_bench(c: &mut Criterion) {
    let small = tree(200, 100, 64);
    let size = small.to_nar().len() as u64;
    let mut g = c.benchmark_group("nar_encode");
    g.throughput(Throughput::Bytes(size));
    g.bench_function("20000_small_files_in_memory", |b| b.iter(|| black_box(&small).to_nar()));
    let big = Node::Regular { executable: false, contents: vec![7u8; 64 << 20] };
    g.throughput(Throughput::Bytes(64 << 20));
    g.sample_size(10);
    g.bench_function("64MiB_file_in_memory", |b| b.iter(|| black_box(&big).to_nar()));
    g.finish();
}

fn narinfo_bench(c: &mut Criterion) {
    let key = SecretKey::from_seed("bench-1", &[9; 32]);
    let info = NarInfo {
        store_path: "/nix/store/sah6ys5p5a453b5xrprp9mrssbc61147-withrefs".into(),
        url: "nar/0f52d3gf6kfnm7fig0vd7yk69mlfffwm1ya9355smvjqmhgwyh3q.nar?hash=sah6ys5p5a453b5xrprp9mrssbc61147"
            .into(),
        compression: "none".into(),
        file_hash: Some("sha256:0f52d3gf6kfnm7fig0vd7yk69mlfffwm1ya9355smvjqmhgwyh3q".into()),
        file_size: Some(224),
        nar_hash: "sha256:0f52d3gf6kfnm7fig0vd7yk69mlfffwm1ya9355smvjqmhgwyh3q".into(),
        nar_size: 224,
        references: vec![
            "2xr781z591fm9c9jchvf8389sr8qsszk-hello.txt".into(),
            "8fh22d7p34ji6zrrf2p8b24ik98dd17l-hello.sh".into(),
        ],
        deriver: Some("39bvdmldxycprsns8aq5n5r1lffhp1mx-withrefs.drv".into()),
        system: None,
        sigs: vec![],
        ca: None,
    };
    c.bench_function("narinfo_render_and_sign", |b| {
        b.iter(|| {
            let mut n = black_box(&info).clone();
            let fp = n.fingerprint("/nix/store");
            n.sigs.push(key.sign(&fp));
            n.to_string()
        })
    });
}

criterion_group!(benches, nixbase32_bench, nar_bench, narinfo_bench);
criterion_main!(benches);
