//! Stamps the build with its git commit for `keybroker_build_info`: an
//! operator asks a running broker which code it is, not the package list.
//! A tarball build (no `.git`, or no git) says `unknown` rather than fail.

use std::process::Command;

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KEYBROKER_COMMIT={commit}");
    println!("cargo:rerun-if-changed=build.rs");
    // A new commit re-runs this. In a worktree `.git` is a file naming the
    // real git directory, so ask git where HEAD and its ref live; a path
    // that does not exist would re-run this on every build, so only
    // existing ones are named.
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &r]));
    }
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// git's answer, trimmed; `None` without git, outside a checkout, or empty.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}
