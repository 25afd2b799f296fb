//! The CLI as an operator meets it: the password floor, PINs it refuses,
//! money as a user reads it, unknown users and missing files told plainly.
//! The real binary on a real SoftHSM token and SQLite files.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

fn fails_saying(out: Output, what: &str) {
    assert!(!out.0.status.success(), "succeeded: {}", out.stdout());
    assert_eq!(out.0.status.code(), Some(1));
    assert!(
        out.stderr().contains(what),
        "{what:?} not in: {}",
        out.stderr()
    );
}

#[test]
fn new_passwords_meet_the_configured_floor() {
    let env = Env::new("");
    let add = |input: &str| env.kb_in(&["user", "add", "alice", "--mail", "a@example.org"], input);
    fails_saying(
        add("x\nalice-second\n"),
        "the first password is too short: 1 of at least 8 characters (auth.min_password_len)",
    );
    fails_saying(
        add("alice-first\nshort\n"),
        "the second password is too short: 5 of at least 8",
    );
    fails_saying(
        add("alice-first\nalice-first\n"),
        "the two passwords must differ",
    );
    let (p1, p2) = pw("alice");
    add(&format!("{p1}\n{p2}\n")).success();

    // A raised floor refuses what the default takes.
    let strict = Env::of(BIN.as_ref(), |data| {
        format!(
            "data_dir = {data:?}\n[auth]\nmin_password_len = 12\nargon2_m_kib = 64\nargon2_t = 1\n"
        )
    });
    fails_saying(
        strict.kb_in(
            &["user", "add", "alice", "--mail", "a@example.org"],
            &format!("{p1}\n{p2}\n"),
        ),
        "11 of at least 12 characters",
    );
}

#[test]
fn an_empty_pin_a_pin_file_others_may_read_and_a_wrong_pin_are_told_apart() {
    let env = Env::new("");
    let pin = env.data().join("hsm").join("user.pin");
    let run = |pin_env: Option<&str>| {
        let mut c = env.cmd(&["user", "list"]);
        if let Some(p) = pin_env {
            c.env("KEYBROKER_HSM_PIN", p);
        }
        Output(c.output().unwrap())
    };
    fails_saying(run(Some("")), "KEYBROKER_HSM_PIN is set but empty");
    fails_saying(
        run(Some("not-the-pin")),
        "the HSM refused the PIN in KEYBROKER_HSM_PIN",
    );
    for mode in [0o640, 0o604] {
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(mode)).unwrap();
        fails_saying(run(None), "may be read by group or others");
    }
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = std::fs::read(&pin).unwrap();
    std::fs::write(&pin, "not-the-pin\n").unwrap();
    fails_saying(
        run(None),
        &format!("the HSM refused the PIN in {}", pin.display()),
    );
    std::fs::write(&pin, good).unwrap();
    let out = run(None).success();
    assert!(
        !out.stderr().contains("keybroker init"),
        "no misleading hint: {}",
        out.stderr()
    );
}

#[test]
fn money_is_printed_in_major_units_with_its_currency() {
    let (env, issuer) = wallet_env(None, "");
    env.user("alice");
    let _m = env.market("m1", "*");
    let b = env.broker();
    voucher(&env, &issuer, "alice", 5_000, "v1");
    let session =
        |cmd: &str, rest: &[&str]| env.terminal_cli(&b, "alice", cmd, rest).success().stdout();
    let v1 = env.dir.path().join("v1");
    let out = session("topup", &["--voucher", path_str(&v1)]);
    assert!(
        out.contains("topped up 50.00 EUR; balance 50.00 EUR"),
        "{out}"
    );
    let out = session(
        "purchase",
        &[
            "--market",
            "m1",
            "--amount",
            "1250",
            "--order-ref",
            "o1",
            "--idempotency-key",
            "k1",
        ],
    );
    assert!(out.contains("balance 37.50 EUR"), "{out}");
    let decision = out
        .lines()
        .find_map(|l| l.strip_prefix("decision "))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_owned();
    let history = env.kb(&["wallet", "history", "alice"]).success().stdout();
    assert!(
        history.contains("\t12.50 EUR\t") && history.contains("balance=37.50 EUR"),
        "{history}"
    );
    let out = session("cancel", &["--market", "m1", "--decision", &decision]);
    assert!(out.contains("balance 50.00 EUR"), "{out}");
    let balance = env.kb(&["wallet", "balance", "alice"]).success().stdout();
    assert_eq!(balance.trim(), "50.00 EUR");
}

#[test]
fn unknown_users_duplicates_and_missing_files_are_told_plainly() {
    let env = Env::new("");
    env.user("alice");
    for cmd in ["balance", "history"] {
        fails_saying(env.kb(&["wallet", cmd, "nobody"]), "no user nobody");
    }
    env.kb(&["wallet", "balance", "alice"]).success();
    fails_saying(
        env.kb_in(
            &["user", "add", "alice", "--mail", "a@example.org"],
            "alice-third\nalice-fourth\n",
        ),
        "user alice exists already",
    );
    let missing = env.dir.path().join("no-such-ca.crt");
    fails_saying(
        env.kb(&[
            "market",
            "add",
            "m9",
            "--endpoint",
            "127.0.0.1:9",
            "--ca",
            path_str(&missing),
        ]),
        &format!("the market CA file {}", missing.display()),
    );
    let _m = env.market("m1", "*");
    let ca = env.dir.path().join("markets/m1/market-ca.crt");
    fails_saying(
        env.kb(&[
            "market",
            "add",
            "m1",
            "--endpoint",
            "127.0.0.1:9",
            "--ca",
            path_str(&ca),
        ]),
        "market m1 is registered already",
    );
    // A wrong terminal directory is told before any password is read.
    fails_saying(
        env.kb(&[
            "terminal",
            "login",
            "--dir",
            path_str(&env.dir.path().join("nowhere")),
            "--user",
            "alice",
        ]),
        "terminal.crt",
    );
}

#[test]
fn passwords_change_and_the_second_only_with_the_current_one() {
    let env = Env::new("");
    let alice = env.user("alice");
    let b = env.broker();
    let (p1, p2) = pw("alice");
    let passwd = |args: &[&str], input: &str| {
        let mut all = vec!["user", "passwd", "alice"];
        all.extend_from_slice(args);
        env.kb_in(&all, input)
    };
    let login = |p: &str| b.connect(&alice).login("alice", p.as_bytes());

    // The first: an operator's reset, no old one asked; the floor holds.
    fails_saying(passwd(&[], "short\n"), "the first password is too short");
    passwd(&[], "alice-new-first\n").success();
    assert_eq!(
        refused(login(&p1)),
        keybroker::proto::ErrorCode::WrongPassword
    );
    login("alice-new-first").expect("the new first password");

    // The second: only with the current one, which opens the home card.
    fails_saying(
        passwd(&["--second"], "not-the-second\nalice-new-second\n"),
        "the current second password is wrong",
    );
    fails_saying(
        passwd(&["--second"], &format!("{p2}\nalice-new-first\n")),
        "the two passwords must differ",
    );
    passwd(&["--second"], &format!("{p2}\nalice-new-second\n")).success();
    let mut t = b.connect(&alice);
    t.login("alice", b"alice-new-first").unwrap();
    assert_eq!(
        refused(t.release(p2.as_bytes())),
        keybroker::proto::ErrorCode::WrongPassword
    );
    t.release(b"alice-new-second")
        .expect("the home card opens with the new second password");
    drop(b);
    env.kb(&["check"]).success();
}
