//! Criterion benchmarks of store access: streaming the NAR of a directory from the page cache
//! (20,000 small files, and one 256 MiB file), a 256 MiB hot-NAR file read into spare buffer
//! capacity against the same file through a generic reader (which zeroes each buffer first),
//! and a path-info lookup through the database and through the daemon. Needs the local Nix store (`scripts/bench` or `scripts/test` set it up).

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hearth::nix::store_path::StorePathHash;
use std::sync::Arc;

use hearth::store::nar_stream::{self, Encoding, NarPool, NarStream};
use hearth::store::{Backend, Store, StoreConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

fn make_tree(root: &Path) {
    for d in 0..200 {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}")), format!("file {d} {f}\n").repeat(8)).expect("write");
        }
    }
}

fn nar_pool() -> Arc<NarPool> {
    static POOL: std::sync::OnceLock<Arc<NarPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Arc::new(NarPool::new(32).expect("NAR pool"))).clone()
}

async fn drain(path: PathBuf, size: u64) -> u64 {
    drain_stream(NarStream::new(nar_pool(), path, Encoding::Plain { start: 0, end: size }, ())).await
}

/// A whole file as a hot NAR is sent: `spare` reads it into spare buffer capacity
/// (`prime_file`), else through a `Read` (`prime`).
async fn drain_file(path: &Path, size: u64, spare: bool) -> u64 {
    use std::io::Read;
    let file = std::fs::File::open(path).expect("open");
    let primed =
        if spare { nar_stream::prime_file(file, size) } else { nar_stream::prime(Box::new(file.take(size)), size) };
    drain_stream(NarStream::from_primed(nar_pool(), "file".into(), primed.expect("prime"), ())).await
}

async fn drain_stream(mut rx: NarStream) -> u64 {
    use futures::StreamExt;
    let mut n = 0;
    while let Some(chunk) = rx.next().await {
        n += chunk.expect("chunk").len() as u64;
    }
    n
}

fn nar_walk(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let big = dir.path().join("big");
    std::fs::write(&big, vec![5u8; 256 << 20]).expect("write big");
    let mut g = c.benchmark_group("nar_stream_from_page_cache");
    g.sample_size(20);
    let size = rt.block_on(drain(tree.clone(), u64::MAX));
    g.throughput(Throughput::Bytes(size));
    g.bench_function("20000_files", |b| b.iter(|| rt.block_on(drain(black_box(tree.clone()), size))));
    let size = rt.block_on(drain(big.clone(), u64::MAX));
    g.throughput(Throughput::Bytes(size));
    g.bench_function("256MiB_file", |b| b.iter(|| rt.block_on(drain(black_box(big.clone()), size))));
    let size = 256 << 20;
    g.throughput(Throughput::Bytes(size));
    g.bench_function("256MiB_hot_file", |b| b.iter(|| rt.block_on(drain_file(black_box(&big), size, true))));
    g.bench_function("256MiB_hot_file_through_a_reader", |b| {
        b.iter(|| rt.block_on(drain_file(black_box(&big), size, false)))
    });
    g.finish();
}

fn store(backend: Backend) -> Store {
    Store::open(StoreConfig {
        store_dir: "/nix/store".into(),
        real_store_dir: "/nix/store".into(),
        db_path: "/nix/var/nix/db/db.sqlite".into(),
        daemon_socket: "/nix/var/nix/daemon-socket/socket".into(),
        log_dir: "/nix/var/log/nix".into(),
        pool_size: 4,
        backend,
        nar_threads: 4,
        nar_cache: None,
    })
    .expect("the local Nix store (run scripts/bench, which sets it up)")
}

fn path_info(c: &mut Criterion) {
    let rt = runtime();
    let hit = StorePathHash::parse(b"sah6ys5p5a453b5xrprp9mrssbc61147").expect("hash");
    let miss = StorePathHash::parse(b"00000000000000000000000000000000").expect("hash");
    let mut g = c.benchmark_group("path_info");
    for (name, backend) in [("db", Backend::Db), ("daemon", Backend::Daemon)] {
        let s = store(backend);
        assert!(rt.block_on(s.path_info(hit)).expect("lookup").is_some(), "golden paths missing: run make_fixtures.sh");
        g.bench_function(format!("{name}_hit"), |b| b.iter(|| rt.block_on(s.path_info(black_box(hit)))));
        g.bench_function(format!("{name}_miss"), |b| b.iter(|| rt.block_on(s.path_info(black_box(miss)))));
    }
    g.finish();
}

criterion_group!(benches, nar_walk, path_info);
criterion_main!(benches);
