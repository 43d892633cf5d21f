//! `Op::SetRules`: what the rules hide is gone from walks, listings, lookups, digests and
//! watcher events.

use std::collections::BTreeSet;
use std::fs;

use kmount_proto::rules::RulesConfig;
use kmount_proto::{Done, Op};

use super::tree::{digests, digests_from, walk_all};
use super::watch::{manual, step};
use super::*;

/// `node_modules/` and `*.log` excluded, editor junk local-only by default.
fn rules() -> RulesConfig {
    RulesConfig {
        exclude: vec!["node_modules/".into(), "*.log".into(), "build/".into()],
        ..Default::default()
    }
}

/// A project with things to hide at several depths: node_modules (a directory, excluded),
/// logs (excluded), swap files (local-only by default), and a *file* named `build` (the rule
/// `build/` covers directories only).
fn project(fx: &Fx) {
    for d in ["src/lib", "node_modules/pkg/lib", "src/node_modules"] {
        fs::create_dir_all(fx.at(d)).unwrap();
    }
    for f in [
        "src/main.rs",
        "src/lib/mod.rs",
        "src/.main.rs.swp",
        "src/lib/debug.log",
        "node_modules/pkg/index.js",
        "node_modules/pkg/lib/a.js",
        "src/node_modules/x.js",
        "top.log",
        "build",
        "README",
    ] {
        fs::write(fx.at(f), f.as_bytes()).unwrap();
    }
}

const VISIBLE: &[&str] = &[
    "README",
    "build",
    "src",
    "src/lib",
    "src/lib/mod.rs",
    "src/main.rs",
];

fn set(fx: &Fx, cfg: RulesConfig) {
    assert_eq!(fx.ok(Op::SetRules { rules: cfg }), Done::Ok);
}

fn names(entries: &[kmount_proto::TreeEntry]) -> BTreeSet<String> {
    entries.iter().map(|e| e.path.to_string()).collect()
}

#[test]
fn a_walk_leaves_out_what_the_rules_hide() {
    let fx = Fx::new();
    project(&fx);
    assert!(names(&walk_all(&fx, "", 1000)).contains("node_modules/pkg/index.js"));
    set(&fx, rules());
    let seen = names(&walk_all(&fx, "", 1000));
    let want: BTreeSet<String> = VISIBLE.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen, want);
    // Small batches too (the walk continues across hidden entries).
    assert_eq!(names(&walk_all(&fx, "", 1)), want);
    assert_eq!(names(&walk_all(&fx, "src", 1000)).len(), 3);
    assert_eq!(
        fx.errno(Op::WalkOpen {
            path: p("node_modules")
        }),
        libc::ENOENT
    );
    assert_eq!(
        fx.errno(Op::WalkOpen {
            path: p("node_modules/pkg")
        }),
        libc::ENOENT
    );
}

#[test]
fn a_listing_leaves_out_what_the_rules_hide() {
    let fx = Fx::new();
    project(&fx);
    set(&fx, rules());
    let list = |path: &str| -> BTreeSet<String> {
        let h = fx.handle(Op::OpenDir { path: p(path) });
        let mut out = BTreeSet::new();
        loop {
            match fx.ok(Op::ReadDir { handle: h, max: 2 }) {
                Done::Entries { entries, eof } => {
                    out.extend(
                        entries
                            .iter()
                            .map(|e| String::from_utf8(e.name.clone()).unwrap()),
                    );
                    if eof {
                        break;
                    }
                }
                other => panic!("expected Entries, got {other:?}"),
            }
        }
        fx.ok(Op::Close { handle: h });
        out
    };
    let set_of = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(list(""), set_of(&["README", "build", "src"]));
    assert_eq!(list("src"), set_of(&["lib", "main.rs"]));
    assert_eq!(list("src/lib"), set_of(&["mod.rs"]));
    assert_eq!(
        fx.errno(Op::OpenDir {
            path: p("node_modules")
        }),
        libc::ENOENT
    );
}

#[test]
fn lookups_of_hidden_paths_are_enoent() {
    let fx = Fx::new();
    project(&fx);
    assert!(
        fx.run(Op::Lookup {
            path: p("src/.main.rs.swp")
        })
        .is_ok()
    );
    set(&fx, rules());
    for hidden in [
        "node_modules",
        "node_modules/pkg/index.js",
        "src/node_modules",
        "src/.main.rs.swp",
        "top.log",
        "src/lib/debug.log",
    ] {
        assert_eq!(
            fx.errno(Op::Lookup { path: p(hidden) }),
            libc::ENOENT,
            "{hidden}"
        );
        assert_eq!(
            fx.errno(Op::GetAttr { node: node(hidden) }),
            libc::ENOENT,
            "{hidden}"
        );
    }
    for visible in VISIBLE {
        fx.attr(Op::Lookup { path: p(visible) });
        fx.attr(Op::GetAttr {
            node: node(visible),
        });
    }
}

#[test]
fn digests_cover_the_visible_entries_only() {
    let fx = Fx::new();
    project(&fx);
    let before = digests(&fx, "", 0);
    set(&fx, rules());
    let got = digests(&fx, "", 10);
    assert_ne!(before[0].1, got[0].1, "hidden entries no longer count");
    let want = digests_from(&walk_all(&fx, "", 1000), &RelPath::root());
    let got: std::collections::BTreeMap<_, _> = got.into_iter().collect();
    assert_eq!(got, want);
    // A new hidden file changes nothing; a visible one does.
    fs::write(fx.at("src/lib/more.log"), b"x").unwrap();
    fs::create_dir(fx.at("node_modules/new")).unwrap();
    assert_eq!(digests(&fx, "", 0)[0].1, want[&RelPath::root()]);
    fs::write(fx.at("src/lib/more.rs"), b"x").unwrap();
    assert_ne!(digests(&fx, "", 0)[0].1, want[&RelPath::root()]);
    assert_eq!(
        fx.errno(Op::Digest {
            path: p("node_modules"),
            depth: 0
        }),
        libc::ENOENT
    );
}

#[test]
fn a_bad_pattern_is_einval_naming_it_and_keeps_the_old_rules() {
    let fx = Fx::new();
    project(&fx);
    set(&fx, rules());
    let e = fx
        .run(Op::SetRules {
            rules: RulesConfig {
                exclude: vec!["ok".into(), "a[z-a]".into()],
                ..Default::default()
            },
        })
        .unwrap_err();
    assert_eq!(e.errno, libc::EINVAL);
    assert!(
        e.message.contains("a[z-a]") && e.message.contains("--exclude"),
        "{e}"
    );
    assert_eq!(fx.errno(Op::Lookup { path: p("top.log") }), libc::ENOENT);
    // A later SetRules replaces the rules: nothing hidden any more but the defaults.
    set(&fx, RulesConfig::default());
    fx.attr(Op::Lookup { path: p("top.log") });
    assert_eq!(
        fx.errno(Op::Lookup {
            path: p("src/.main.rs.swp")
        }),
        libc::ENOENT
    );
}

#[test]
fn the_watcher_reports_nothing_hidden_and_turns_renames_across_the_boundary() {
    let fx = Fx::new();
    project(&fx);
    fs::write(fx.at("src/.old.swp"), b"draft").unwrap();
    fs::write(fx.at("src/gone.rs"), b"x").unwrap();
    fs::write(fx.at("src/.junk.swp"), b"x").unwrap();
    fs::create_dir_all(fx.at("node_modules/moved")).unwrap();
    fs::write(fx.at("node_modules/moved/inner.js"), b"x").unwrap();
    fs::create_dir_all(fx.at("src/away")).unwrap();
    fs::write(fx.at("src/away/f"), b"x").unwrap();
    set(&fx, rules());
    let (mut w, rx) = manual(&fx);
    // Hidden directories are not watched: root, src, src/lib, src/away.
    assert_eq!(w.watched(), 4);

    // Changes to hidden paths: nothing at all about them.
    fs::write(fx.at("node_modules/pkg/index.js"), b"changed").unwrap();
    fs::write(fx.at("src/.main.rs.swp"), b"changed").unwrap();
    fs::write(fx.at("src/lib/new.log"), b"x").unwrap();
    fs::remove_file(fx.at("src/.junk.swp")).unwrap();
    fs::create_dir(fx.at("src/lib/build")).unwrap();
    fs::write(fx.at("src/lib/build/out.o"), b"x").unwrap();
    let got = step(&mut w, &rx);
    assert!(
        got.iter()
            .all(|e| e == "upsert src" || e == "upsert src/lib"),
        "{got:?}"
    );
    assert_eq!(w.watched(), 4, "no watch inside a new hidden directory");

    // A visible file appears.
    fs::write(fx.at("src/new.rs"), b"x").unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"upsert src/new.rs".to_string()), "{got:?}");

    // Hidden -> visible: the new name appears, no rename.
    fs::rename(fx.at("src/.old.swp"), fx.at("src/old.rs")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"upsert src/old.rs".to_string()), "{got:?}");
    assert!(!got.iter().any(|e| e.contains(".old.swp")), "{got:?}");

    // Visible -> hidden: the old name goes, the new one is never named.
    fs::rename(fx.at("src/gone.rs"), fx.at("src/gone.rs~")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"remove src/gone.rs".to_string()), "{got:?}");
    assert!(!got.iter().any(|e| e.contains("gone.rs~")), "{got:?}");

    // A hidden directory moved into sight: it and its contents appear, and it is watched.
    fs::rename(fx.at("node_modules/moved"), fx.at("src/moved")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"upsert src/moved".to_string()), "{got:?}");
    assert!(
        got.contains(&"upsert src/moved/inner.js".to_string()),
        "{got:?}"
    );
    assert!(!got.iter().any(|e| e.contains("node_modules")), "{got:?}");
    fs::write(fx.at("src/moved/later.js"), b"x").unwrap();
    let got = step(&mut w, &rx);
    assert!(
        got.contains(&"upsert src/moved/later.js".to_string()),
        "{got:?}"
    );

    // A visible directory moved out of sight: removed, and nothing below it reported later.
    fs::rename(fx.at("src/away"), fx.at("node_modules/away")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.contains(&"remove src/away".to_string()), "{got:?}");
    assert!(!got.iter().any(|e| e.contains("node_modules")), "{got:?}");
    fs::write(fx.at("node_modules/away/f"), b"changed").unwrap();
    let got = step(&mut w, &rx);
    assert!(got.is_empty(), "{got:?}");

    // A hidden file removed: nothing.
    fs::remove_file(fx.at("top.log")).unwrap();
    let got = step(&mut w, &rx);
    assert!(got.iter().all(|e| e == "upsert ."), "{got:?}");
}

#[test]
fn new_rules_restart_the_watcher_and_ask_for_a_rescan() {
    let fx = Fx::new();
    project(&fx);
    set(&fx, rules());
    let (sink, rx) = super::watch::sink();
    fx.agent.watch.set_sink(Some(sink));
    assert_eq!(fx.ok(Op::Watch { enable: true }), Done::Ok);
    // The same rules again: nothing happens.
    set(&fx, rules());
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(200))
            .is_err()
    );
    // node_modules visible now: a rescan, and it is watched from then on.
    set(&fx, RulesConfig::default());
    let got = rx.recv_timeout(std::time::Duration::from_secs(2)).unwrap();
    assert!(
        matches!(&got[..], [kmount_proto::Event::Rescan { path, .. }] if path.is_root()),
        "{got:?}"
    );
    fs::write(fx.at("node_modules/pkg/new.js"), b"x").unwrap();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let batch = rx
            .recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
            .expect("no event from the directory that became visible");
        if batch.iter().any(|e| {
            matches!(e, kmount_proto::Event::Upsert { path, .. }
                if path.as_bytes() == b"node_modules/pkg/new.js")
        }) {
            break;
        }
    }
    assert!(fx.agent.watch.is_running());
}
