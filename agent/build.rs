//! Links `kmount-agent` as a static(-pie) executable on `*-linux-gnu`, so one binary runs in any
//! container whatever its libc.
//!
//! `-C target-feature=+crt-static` cannot be set for one package from a build script, and
//! setting it workspace-wide breaks proc-macro crates. Without it rustc ends the link line with
//! `-Wl,-Bdynamic -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc`. This script writes tiny linker
//! scripts named like those shared libraries into OUT_DIR (searched before the system
//! directories) that pull in the static archives instead (`libc.a`, `libgcc_eh.a`,
//! `libgcc.a`, `libm.a`; the others are empty in glibc >= 2.34), and links the binary with
//! `-static-pie`, which is exactly what `+crt-static` produces. Only the binary target gets
//! these arguments: tests and other packages link as usual.
//!
//! Set `KMOUNT_AGENT_DYNAMIC=1` to link dynamically. Without a static glibc (`libc6-dev`'s
//! `libc.a`) the binary is linked dynamically and cargo prints a warning saying so.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=KMOUNT_AGENT_DYNAMIC");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if env::var_os("KMOUNT_AGENT_DYNAMIC").is_some_and(|v| v != "0") {
        return;
    }
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if target_os != "linux" || target_env != "gnu" || features.split(',').any(|f| f == "crt-static")
    {
        return; // musl is static by default; +crt-static needs no help
    }
    let cc = env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let find = |name: &str| -> Option<PathBuf> {
        let out = Command::new(&cc)
            .arg(format!("-print-file-name={name}"))
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        // cc echoes the bare name back when it has no such file.
        (p.is_absolute() && p.exists()).then_some(p)
    };
    let (Some(libc), Some(eh), Some(gcc), Some(_)) = (
        find("libc.a"),
        find("libgcc_eh.a"),
        find("libgcc.a"),
        find("rcrt1.o"),
    ) else {
        println!(
            "cargo:warning=kmount-agent is linked dynamically: no static glibc found \
             (install libc6-dev / glibc-static for a static agent)"
        );
        return;
    };
    let dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("static-libs");
    fs::create_dir_all(&dir).expect("creating OUT_DIR/static-libs");
    let script = |name: &str, body: String| {
        fs::write(dir.join(name), body).expect("writing a linker script to OUT_DIR");
    };
    let group = |libs: &[&Path]| {
        let names: Vec<String> = libs.iter().map(|p| p.display().to_string()).collect();
        format!(
            "/* kmount-agent: static instead of shared */\nGROUP({})\n",
            names.join(" ")
        )
    };
    script("libc.so", group(&[&libc, &eh, &gcc]));
    script("libgcc_s.so", group(&[&eh, &gcc]));
    // libm stays a library of its own in glibc (Debian's libm.a is itself a linker script).
    match find("libm.a") {
        Some(m) => script("libm.so", group(&[&m])),
        None => script("libm.so", "/* kmount-agent: no libm.a */\n".into()),
    }
    for lib in ["util", "rt", "pthread", "dl"] {
        script(
            &format!("lib{lib}.so"),
            "/* kmount-agent: part of libc.a since glibc 2.34 */\n".into(),
        );
    }
    println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
    println!("cargo:rustc-link-arg-bins=-static-pie");
}
