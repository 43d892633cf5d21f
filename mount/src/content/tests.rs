use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use super::*;

const MIB: u64 = 1 << 20;

fn key(s: &str) -> CacheKey {
    CacheKey(s.to_string())
}

fn validity(size: u64, version: i64) -> Validity {
    Validity {
        size,
        mtime: Timespec {
            sec: 1_700_000_000 + version,
            nsec: 5,
        },
        ctime: Timespec {
            sec: 1_700_000_000 + version,
            nsec: 7,
        },
        ino: 42,
    }
}

/// Deterministic "remote" content of a file: byte i of file `seed`.
fn remote(seed: u8, range: Range<u64>) -> Vec<u8> {
    range
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn opts(limit: u64, boot: &str) -> CacheOptions {
    CacheOptions {
        limit_bytes: limit,
        boot_id: Some(boot.to_string()),
    }
}

fn open(dir: &Path, limit: u64) -> ContentCache {
    ContentCache::open_with(dir, opts(limit, "boot-A")).unwrap()
}

/// Fetches every missing chunk of `e` from `remote(seed, ..)`.
fn fill(e: &Entry, seed: u8) {
    for r in e.missing(0, u64::MAX) {
        e.write_fetched(r.start, &remote(seed, r)).unwrap();
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock")
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_and_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let size = 2 * MIB + MIB / 2;
    let e = c.create(key("1-10"), validity(size, 1), size).unwrap();
    assert_eq!(
        e.missing(0, u64::MAX),
        vec![0..MIB, MIB..2 * MIB, 2 * MIB..size]
    );
    assert_eq!(e.missing(MIB + 5, 10), vec![MIB..2 * MIB]);
    assert!(e.missing(size, 10).is_empty());
    assert!(matches!(e.read(0, 1), Err(ContentError::Missing { .. })));
    fill(&e, 3);
    assert!(e.is_complete());
    assert!(e.missing(0, u64::MAX).is_empty());
    assert_eq!(e.read(0, size).unwrap(), remote(3, 0..size));
    assert_eq!(e.read(size - 10, 100).unwrap(), remote(3, size - 10..size));
    assert!(e.read(size, 10).unwrap().is_empty());
    assert_eq!(c.usage(), size);
    // Sparse: the data file is as long as the entry, nothing more.
    let data = tmp.path().join(format!("{:016x}.data", e.inner.id));
    assert_eq!(fs::metadata(&data).unwrap().len(), size);
}

#[test]
fn creating_is_sparse() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("big"), validity(1 << 30, 1), 1 << 30).unwrap();
    let m = fs::metadata(&e.inner.data_path).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(m.blocks() * 512 < MIB, "{} blocks allocated", m.blocks());
    e.write_fetched(512 * MIB, &remote(1, 512 * MIB..513 * MIB))
        .unwrap();
    assert_eq!(e.present_bytes(), MIB);
    assert_eq!(c.usage(), MIB);
}

#[test]
fn a_different_validity_drops_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(10, 1), 10).unwrap();
    e.write_fetched(0, &remote(1, 0..10)).unwrap();
    drop(e);
    assert_eq!(files(tmp.path()).len(), 2);
    assert!(c.get(&key("k"), &validity(10, 2)).is_none());
    // Gone for good, files included, and its bytes no longer count.
    assert!(c.get(&key("k"), &validity(10, 1)).is_none());
    assert!(files(tmp.path()).is_empty(), "{:?}", files(tmp.path()));
    assert_eq!(c.usage(), 0);
    assert!(c.is_empty());
}

#[test]
fn partial_chunks_stay_missing_until_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let size = 3 * MIB + MIB / 2;
    let e = c.create(key("k"), validity(size, 1), size).unwrap();
    e.write_fetched(MIB, &remote(7, MIB..2 * MIB)).unwrap();
    assert_eq!(
        e.missing(0, size),
        vec![0..MIB, 2 * MIB..3 * MIB, 3 * MIB..size]
    );
    // Half of chunk 0.
    e.write_fetched(0, &remote(7, 0..MIB / 2)).unwrap();
    assert_eq!(e.missing(0, MIB), vec![0..MIB]);
    assert_eq!(e.read(100, 1000).unwrap(), remote(7, 100..1100));
    match e.read(MIB / 2 - 10, 20) {
        Err(ContentError::Missing { range }) => assert_eq!(range, MIB / 2..MIB / 2 + 10),
        other => panic!("{other:?}"),
    }
    // The rest of it, overlapping what is there (a refetch of the whole chunk).
    e.write_fetched(0, &remote(7, 0..MIB)).unwrap();
    assert_eq!(e.missing(0, size), vec![2 * MIB..3 * MIB, 3 * MIB..size]);
    // The partial last chunk is complete once filled up to the end of the file; bytes past
    // the end are ignored.
    e.write_fetched(3 * MIB, &remote(7, 3 * MIB..4 * MIB))
        .unwrap();
    assert_eq!(e.missing(0, size), vec![2 * MIB..3 * MIB]);
    assert_eq!(fs::metadata(&e.inner.data_path).unwrap().len(), size);
    assert_eq!(e.read(3 * MIB, MIB).unwrap(), remote(7, 3 * MIB..size));
    assert_eq!(c.usage(), 3 * MIB + MIB / 2 - MIB);
}

#[test]
fn fetched_bytes_never_overwrite_local_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(MIB, 1), MIB).unwrap();
    e.write_local(1000, b"LOCAL").unwrap();
    assert!(e.has_local_changes());
    assert_eq!(e.missing(0, MIB), vec![0..MIB]);
    assert_eq!(e.read(1000, 5).unwrap(), b"LOCAL");
    e.write_fetched(0, &remote(2, 0..MIB)).unwrap();
    let mut want = remote(2, 0..MIB);
    want[1000..1005].copy_from_slice(b"LOCAL");
    assert_eq!(e.read(0, MIB).unwrap(), want);
    assert!(e.is_complete());
    e.set_validity(validity(MIB, 2));
    assert!(!e.has_local_changes());
    assert_eq!(e.validity(), validity(MIB, 2));
}

#[test]
fn local_writes_and_truncation_change_the_size() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(100, 1), 100).unwrap();
    e.write_fetched(0, &remote(1, 0..100)).unwrap();
    // A write past the end: the gap reads as zeros.
    e.write_local(200, b"tail").unwrap();
    assert_eq!(e.size(), 204);
    assert!(e.is_complete());
    let got = e.read(0, 1000).unwrap();
    assert_eq!(&got[..100], &remote(1, 0..100)[..]);
    assert!(got[100..200].iter().all(|&b| b == 0));
    assert_eq!(&got[200..], b"tail");
    e.set_len(50).unwrap();
    assert_eq!((e.size(), e.present_bytes()), (50, 50));
    e.set_len(80).unwrap();
    let got = e.read(0, 1000).unwrap();
    assert_eq!(got.len(), 80);
    assert_eq!(&got[..50], &remote(1, 0..50)[..]);
    assert!(got[50..].iter().all(|&b| b == 0));
    assert_eq!(c.usage(), 80);
    assert_eq!(fs::metadata(&e.inner.data_path).unwrap().len(), 80);
    // Truncating a partly cached file keeps what is present below the new end.
    let f = c.create(key("f"), validity(3 * MIB, 1), 3 * MIB).unwrap();
    f.write_fetched(2 * MIB, &remote(1, 2 * MIB..3 * MIB))
        .unwrap();
    f.set_len(2 * MIB + 10).unwrap();
    assert_eq!(f.missing(0, u64::MAX), vec![0..MIB, MIB..2 * MIB]);
    assert_eq!(
        f.read(2 * MIB, 100).unwrap(),
        remote(1, 2 * MIB..2 * MIB + 10)
    );
}

fn full_entry(c: &ContentCache, name: &str, size: u64) {
    let e = c.create(key(name), validity(size, 1), size).unwrap();
    fill(&e, name.as_bytes()[0]);
}

#[test]
fn eviction_removes_least_recently_used_first_and_respects_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 3 * MIB);
    for name in ["a", "b", "c"] {
        full_entry(&c, name, MIB);
    }
    assert_eq!(c.usage(), 3 * MIB);
    full_entry(&c, "d", MIB);
    assert!(c.usage() <= 3 * MIB);
    assert!(!c.contains(&key("a")), "a was the least recently used");
    // Using b makes c the oldest.
    drop(c.get(&key("b"), &validity(MIB, 1)).unwrap());
    full_entry(&c, "e", MIB);
    assert!(!c.contains(&key("c")));
    assert!(c.contains(&key("b")) && c.contains(&key("d")) && c.contains(&key("e")));
    assert_eq!(c.usage(), 3 * MIB);
    // Reading counts as use too.
    let d = c.get(&key("d"), &validity(MIB, 1)).unwrap();
    d.read(0, 1).unwrap();
    drop(d);
    let b = c.get(&key("b"), &validity(MIB, 1)).unwrap();
    drop(b);
    full_entry(&c, "f", MIB);
    assert!(!c.contains(&key("e")));
    // A big entry needs several victims.
    full_entry(&c, "g", 2 * MIB);
    assert!(c.usage() <= 3 * MIB);
    assert_eq!(c.len(), 2);
    assert!(c.contains(&key("g")));
    // Files of evicted entries are gone.
    assert_eq!(
        files(tmp.path())
            .iter()
            .filter(|n| n.ends_with(".data"))
            .count(),
        2
    );
    c.set_limit(0);
    assert_eq!((c.usage(), c.len()), (0, 0));
}

#[test]
fn pinned_and_open_entries_are_never_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), MIB);
    let a = c.create(key("a"), validity(MIB, 1), MIB).unwrap();
    fill(&a, 1);
    a.pin();
    drop(a);
    let b = c.create(key("b"), validity(MIB, 1), MIB).unwrap();
    fill(&b, 2);
    // Over the limit, but a is pinned and b is open.
    assert_eq!(c.usage(), 2 * MIB);
    assert_eq!(c.evict(), 0);
    full_entry(&c, "c", MIB);
    assert!(!c.contains(&key("c")), "only c could go");
    assert!(c.contains(&key("a")) && c.contains(&key("b")));
    assert_eq!(c.usage(), 2 * MIB);
    // A clone is a handle too.
    let b2 = b.clone();
    drop(b);
    assert!(c.contains(&key("b")));
    assert_eq!(b2.read(0, 4).unwrap(), remote(2, 0..4));
    drop(b2);
    assert!(
        !c.contains(&key("b")),
        "evicted once its last handle closed"
    );
    assert_eq!(c.pinned_keys(), vec![key("a")]);
    let a = c.lookup(&key("a")).unwrap();
    a.unpin();
    assert!(c.contains(&key("a")), "open");
    drop(a);
    assert_eq!(c.usage(), MIB);
    c.set_limit(MIB - 1);
    assert!(c.is_empty());
}

#[test]
fn a_reopened_cache_serves_its_bytes_without_fetching() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 2 * MIB + 123;
    {
        let c = open(tmp.path(), 100 * MIB);
        let e = c.create(key("1-7"), validity(size, 1), size).unwrap();
        fill(&e, 9);
        e.pin();
        let p = c.create(key("1-8"), validity(5 * MIB, 1), 5 * MIB).unwrap();
        p.write_fetched(MIB, &remote(4, MIB..2 * MIB)).unwrap();
        // The mount's periodic sync makes it good across a reboot too.
        c.sync().unwrap();
    }
    let c = ContentCache::open_with(tmp.path(), opts(100 * MIB, "boot-B")).unwrap();
    assert_eq!(c.usage(), size + MIB);
    let e = c.get(&key("1-7"), &validity(size, 1)).unwrap();
    assert!(e.is_complete());
    assert!(e.is_pinned());
    assert!(e.missing(0, u64::MAX).is_empty());
    assert_eq!(e.read(0, size).unwrap(), remote(9, 0..size));
    let p = c.get(&key("1-8"), &validity(5 * MIB, 1)).unwrap();
    assert_eq!(p.missing(0, u64::MAX).len(), 4);
    assert_eq!(p.read(MIB, MIB).unwrap(), remote(4, MIB..2 * MIB));
}

#[test]
fn closing_keeps_entries_for_this_boot_without_syncing() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let c = open(tmp.path(), 100 * MIB);
        let e = c.create(key("k"), validity(100, 1), 100).unwrap();
        fill(&e, 1);
    }
    let c = open(tmp.path(), 100 * MIB);
    let e = c.get(&key("k"), &validity(100, 1)).unwrap();
    assert_eq!(e.read(0, 100).unwrap(), remote(1, 0..100));
    drop(e);
    drop(c);
    // Never synced: after a reboot its pages may not be on the disk.
    let c = ContentCache::open_with(tmp.path(), opts(100 * MIB, "boot-B")).unwrap();
    assert!(c.is_empty());
}

#[test]
fn after_a_crash_unsynced_entries_survive_only_in_the_same_boot() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(100, 1), 100).unwrap();
    fill(&e, 1);
    drop(e); // sidecar written when the last handle closes
    c.crash();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.get(&key("k"), &validity(100, 1)).unwrap();
    assert_eq!(e.read(0, 100).unwrap(), remote(1, 0..100));
    drop(e);
    c.crash();
    // Another boot: the pages may never have reached the disk.
    let c = ContentCache::open_with(tmp.path(), opts(100 * MIB, "boot-B")).unwrap();
    assert!(c.is_empty());
    assert!(files(tmp.path()).is_empty());
}

#[test]
fn a_synced_entry_is_marked_unsynced_on_disk_before_it_is_written_again() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(2 * MIB, 1), 2 * MIB).unwrap();
    e.write_fetched(0, &remote(1, 0..MIB)).unwrap();
    let meta = e.inner.meta_path.clone();
    c.sync().unwrap();
    let on_disk = || decode_sidecar(&fs::read(&meta).unwrap()).unwrap();
    assert!(on_disk().synced);
    e.write_fetched(MIB, &remote(1, MIB..2 * MIB)).unwrap();
    let s = on_disk();
    assert!(!s.synced, "must be on disk before the new bytes are");
    drop(e);
    c.crash();
    // A crash and a reboot: the second chunk is not trusted, so the entry is dropped.
    let c = ContentCache::open_with(tmp.path(), opts(100 * MIB, "boot-B")).unwrap();
    assert!(c.is_empty());
}

#[test]
fn entries_with_local_changes_are_dropped_when_reopened() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("local-1"), validity(0, 0), 0).unwrap();
    e.write_local(0, b"new file").unwrap();
    let meta = e.inner.meta_path.clone();
    // Recorded before the bytes were written.
    assert!(decode_sidecar(&fs::read(&meta).unwrap()).unwrap().local);
    let g = c.create(key("remote"), validity(4, 1), 4).unwrap();
    g.write_fetched(0, b"abcd").unwrap();
    g.write_local(1, b"X").unwrap();
    g.set_validity(validity(4, 2));
    drop((e, g));
    c.crash();
    let c = open(tmp.path(), 100 * MIB);
    assert!(c.lookup(&key("local-1")).is_none());
    let g = c.get(&key("remote"), &validity(4, 2)).unwrap();
    assert_eq!(g.read(0, 4).unwrap(), b"aXcd");
}

#[test]
fn rekey_moves_an_entry_and_persists() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("local-5"), validity(0, 0), 0).unwrap();
    e.write_local(0, b"hello").unwrap();
    let stale = c.create(key("1-99"), validity(3, 1), 3).unwrap();
    drop(stale);
    assert!(c.rekey(&key("local-5"), key("1-99")).unwrap());
    assert!(!c.rekey(&key("local-5"), key("x")).unwrap());
    assert_eq!(e.key(), key("1-99"));
    e.set_validity(validity(5, 3));
    drop(e);
    assert_eq!(c.len(), 1);
    drop(c);
    let c = open(tmp.path(), 100 * MIB);
    assert!(c.lookup(&key("local-5")).is_none());
    let e = c.get(&key("1-99"), &validity(5, 3)).unwrap();
    assert_eq!(e.read(0, 100).unwrap(), b"hello");
    assert_eq!(files(tmp.path()).len(), 2);
}

#[test]
fn damaged_or_inconsistent_entries_are_dropped_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let metas: Vec<(String, PathBuf, PathBuf)>;
    {
        let c = open(tmp.path(), 100 * MIB);
        metas = ["flip", "short", "nodata", "good", "dup"]
            .iter()
            .map(|n| {
                let e = c.create(key(n), validity(1000, 1), 1000).unwrap();
                fill(&e, 5);
                (
                    n.to_string(),
                    e.inner.meta_path.clone(),
                    e.inner.data_path.clone(),
                )
            })
            .collect();
    }
    let by = |n: &str| metas.iter().find(|m| m.0 == n).unwrap().clone();
    // A flipped bit in a sidecar.
    let (_, meta, _) = by("flip");
    let mut b = fs::read(&meta).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x04;
    fs::write(&meta, b).unwrap();
    // A data file of the wrong length.
    let (_, _, data) = by("short");
    fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(999)
        .unwrap();
    // A missing data file.
    fs::remove_file(by("nodata").2).unwrap();
    // Two sidecars claiming one key.
    let (_, meta, data) = by("dup");
    let copy_id = 0x1234u64;
    let mut s = decode_sidecar(&fs::read(&meta).unwrap()).unwrap();
    s.id = copy_id;
    fs::write(
        tmp.path().join(format!("{copy_id:016x}.meta")),
        encode_sidecar(&s),
    )
    .unwrap();
    fs::copy(&data, tmp.path().join(format!("{copy_id:016x}.data"))).unwrap();
    // Junk.
    fs::write(tmp.path().join("00000000000000aa.meta"), b"junk").unwrap();
    fs::write(tmp.path().join("00000000000000bb.data"), b"orphan").unwrap();
    fs::write(tmp.path().join("00000000000000cc.meta.tmp"), b"half").unwrap();

    let c = open(tmp.path(), 100 * MIB);
    for n in ["flip", "short", "nodata", "dup"] {
        assert!(c.lookup(&key(n)).is_none(), "{n}");
    }
    assert_eq!(c.len(), 1);
    let g = c.get(&key("good"), &validity(1000, 1)).unwrap();
    assert_eq!(g.read(0, 1000).unwrap(), remote(5, 0..1000));
    let left = files(tmp.path());
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn the_directory_is_private_and_single_user() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache/kmount/abc");
    let c = ContentCache::open(&dir, MIB).unwrap();
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    match ContentCache::open(&dir, MIB) {
        Err(e @ ContentError::Locked { .. }) => assert!(e.to_string().contains("mounted twice")),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(c);
    ContentCache::open(&dir, MIB).unwrap();
}

#[test]
fn concurrent_fetches_reads_and_local_writes_on_one_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 1 << 40);
    let size = 16 * MIB;
    let e = c.create(key("k"), validity(size, 1), size).unwrap();
    // Local writes at the start of every chunk, made while fetches run.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for chunk in (t..16).step_by(4) {
                    let at = chunk * MIB;
                    if chunk % 2 == 0 {
                        e.write_local(at, &[0xAA; 16]).unwrap();
                    }
                    e.write_fetched(at, &remote(6, at..at + MIB)).unwrap();
                    // Readers see only present bytes, and the right ones.
                    let got = e.read(at + 100, 1000).unwrap();
                    assert_eq!(got, remote(6, at + 100..at + 1100));
                    if chunk % 2 == 1 {
                        e.write_local(at, &[0xBB; 16]).unwrap();
                    }
                }
            })
        })
        .collect();
    // Other entries come and go meanwhile.
    let c2 = c.clone();
    let churn = std::thread::spawn(move || {
        for i in 0..50 {
            let k = key(&format!("other{}", i % 5));
            let o = c2.create(k.clone(), validity(4096, 1), 4096).unwrap();
            o.write_fetched(0, &remote(1, 0..4096)).unwrap();
            drop(o);
            if i % 3 == 0 {
                c2.remove(&k);
            }
        }
    });
    for t in threads {
        t.join().unwrap();
    }
    churn.join().unwrap();
    assert!(e.is_complete());
    let all = e.read(0, size).unwrap();
    for chunk in 0..16u64 {
        let at = (chunk * MIB) as usize;
        let want = if chunk % 2 == 0 { 0xAA } else { 0xBB };
        assert!(all[at..at + 16].iter().all(|&b| b == want), "chunk {chunk}");
        assert_eq!(
            &all[at + 16..at + MIB as usize],
            &remote(6, chunk * MIB + 16..(chunk + 1) * MIB)[..]
        );
    }
    let others: u64 = (0..5)
        .filter_map(|i| c.lookup(&key(&format!("other{i}"))))
        .map(|o| o.present_bytes())
        .sum();
    assert_eq!(c.usage(), size + others);
}

#[test]
fn removed_entries_keep_working_for_open_handles() {
    let tmp = tempfile::tempdir().unwrap();
    let c = open(tmp.path(), 100 * MIB);
    let e = c.create(key("k"), validity(10, 1), 10).unwrap();
    assert!(c.remove(&key("k")));
    assert!(!c.remove(&key("k")));
    e.write_fetched(0, &remote(1, 0..10)).unwrap();
    assert_eq!(e.read(0, 10).unwrap(), remote(1, 0..10));
    assert_eq!(c.usage(), 0, "a removed entry does not count");
    drop(e);
    assert!(files(tmp.path()).is_empty(), "and is never written back");
    let c = Arc::new(c);
    assert!(c.lookup(&key("k")).is_none());
}
