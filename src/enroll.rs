//! Enrolment: the data directory, the token, the CAs, users, terminals and
//! markets. Used by the `keybroker` CLI; never on the serving path.
//!
//! ```text
//! init ──► var/hsm (token, PIN files) ──► secret keys, CA keys in HSM ──► CA certs (var/pki, db meta)
//! user add ──► home-card key (generated in HSM, wrapped under the KEK of the second password)
//!              + user cert + argon2id hash of the first password + the second's binding
//! terminal enroll ──► software key + cert from the terminal CA ──► PEM files for the terminal
//! ```

use crate::config::Config;
use crate::hsm::signer::{HsmSigner, P256Public};
use crate::hsm::{Hsm, KeyHandles, labels, ops};
use crate::passwords;
use crate::pki::{self, Usage};
use crate::rowmac::Sealer;
use crate::store::{MarketRecord, Store, UserRecord};
use anyhow::{Context, Result, bail};
use cryptoki::object::ObjectClass;
use cryptoki::session::Session;
use std::path::Path;
use std::time::Duration;

const SOFTHSM_TEMPLATE: &str = include_str!("../hsm/softhsm2.conf.template");

/// Meta keys holding each CA's DER certificate, and its PEM file name.
pub const CAS: [(&str, &str, &str); 3] = [
    (labels::BROKER_CA, "keybroker broker CA", "broker-ca.pem"),
    (
        labels::TERMINAL_CA,
        "keybroker terminal CA",
        "terminal-ca.pem",
    ),
    (labels::USER_CA, "keybroker user CA", "user-ca.pem"),
];

pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// Prepares the data directory and the token files. Idempotent.
fn prepare_dirs(cfg: &Config) -> Result<()> {
    // 0700 whatever the umask or an earlier mode (crate::fsmode).
    crate::fsmode::private_dir(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let hsm_dir = cfg.data_dir.join("hsm");
    let tokens = hsm_dir.join("tokens");
    std::fs::create_dir_all(&tokens).with_context(|| format!("creating {}", tokens.display()))?;
    std::fs::create_dir_all(cfg.pki_dir())?;
    if !cfg.hsm.softhsm2_conf.as_os_str().is_empty() {
        let conf = cfg.path(&cfg.hsm.softhsm2_conf);
        if !conf.exists() {
            let abs = std::fs::canonicalize(&tokens)?;
            let text = SOFTHSM_TEMPLATE.replace("@TOKENDIR@", &abs.display().to_string());
            write_private(&conf, text.as_bytes())?;
        }
    }
    let user_pin = cfg.path(&cfg.hsm.pin_file);
    if !user_pin.exists() && std::env::var_os(crate::config::PIN_ENV).is_none() {
        write_private(&user_pin, random_hex(16).as_bytes())?;
    }
    let so_pin = cfg.path(&cfg.hsm.so_pin_file);
    if !so_pin.exists() {
        write_private(&so_pin, random_hex(16).as_bytes())?;
    }
    Ok(())
}

/// An open HSM, session and registry (rows sealed with the HSM's
/// `kb-registry-mac`) for enrolment commands.
pub struct Admin {
    pub cfg: Config,
    pub hsm: std::sync::Arc<Hsm>,
    pub session: Session,
    pub store: Store,
}

impl Admin {
    pub fn open(cfg: &Config) -> Result<Self> {
        // Only a missing token is a sign that init did not run; a refused
        // PIN or an unreadable file says what to fix itself.
        let hsm = Hsm::open(cfg).map_err(|e| match e {
            crate::hsm::HsmError::TokenNotFound(_) => {
                anyhow::Error::new(e).context("opening the HSM (did `keybroker init` run?)")
            }
            e => anyhow::Error::new(e).context("opening the HSM"),
        })?;
        Self::on(cfg, std::sync::Arc::new(hsm))
    }

    /// As [`Admin::open`], on an HSM the caller has open already.
    pub fn on(cfg: &Config, hsm: std::sync::Arc<Hsm>) -> Result<Self> {
        let session = hsm.session()?;
        let sealer = Sealer::hsm(hsm.clone(), Default::default())
            .context("the registry MAC key (run `keybroker init` after an upgrade)")?;
        let store = Store::open_sealed(&cfg.db_path(), sealer)?;
        Ok(Self {
            cfg: cfg.clone(),
            hsm,
            session,
            store,
        })
    }

    pub fn keys(&self) -> Result<KeyHandles> {
        Ok(self.hsm.key_handles()?)
    }

    fn signer(&self, label: &str) -> Result<HsmSigner<'_>> {
        let key = self
            .hsm
            .find(&self.session, label, ObjectClass::PRIVATE_KEY)?
            .with_context(|| format!("CA key {label} missing; run `keybroker init`"))?;
        let point = ops::public_point(&self.session, label)?;
        Ok(HsmSigner {
            session: &self.session,
            key,
            point,
        })
    }

    /// The DER certificate of a CA, by key label.
    pub fn ca_cert(&self, label: &str) -> Result<Vec<u8>> {
        self.store
            .meta_get(label)?
            .with_context(|| format!("CA certificate {label} missing; run `keybroker init`"))
    }
}

/// `keybroker init`: data directory, token, the secret keys (master wrap,
/// KEK base, ledger, ticket and registry MAC keys), CA keys and
/// certificates. Safe to run again: existing parts are kept, missing ones
/// (keys a newer version added) made.
pub fn init(cfg: &Config) -> Result<()> {
    prepare_dirs(cfg)?;
    if Hsm::init_token(cfg)? {
        tracing::info!(token = %cfg.hsm.token_label, "initialised HSM token");
    }
    let hsm = std::sync::Arc::new(Hsm::open(cfg)?);
    {
        let s = hsm.session()?;
        type Generate = fn(&Session, &str) -> crate::hsm::HsmResult<cryptoki::object::ObjectHandle>;
        let secret: [(&str, Generate); 5] = [
            (labels::MASTER_WRAP, ops::generate_master_wrap_key),
            (labels::KEK_BASE, ops::generate_kek_base_key),
            (labels::LEDGER_MAC, ops::generate_hmac_key),
            (labels::TICKET_KEY, ops::generate_hmac_key),
            (labels::REGISTRY_MAC, ops::generate_hmac_key),
        ];
        for (label, generate) in secret {
            if hsm.find(&s, label, ObjectClass::SECRET_KEY)?.is_none() {
                generate(&s, label)?;
                tracing::info!(label, "generated a secret key in the HSM");
            }
        }
    }
    let admin = Admin::on(cfg, hsm)?;
    seal_legacy(&admin.store)?;
    let s = &admin.session;
    for (label, cn, file) in CAS {
        if admin
            .hsm
            .find(s, label, ObjectClass::PRIVATE_KEY)?
            .is_none()
        {
            ops::generate_token_signing_key(s, label)?;
            tracing::info!(label, "generated CA key in the HSM");
        }
        if admin.store.meta_get(label)?.is_none() {
            let der = pki::self_signed_ca(cn, &admin.signer(label)?)?;
            admin.store.meta_put(label, &der)?;
        }
        let der = admin.ca_cert(label)?;
        std::fs::write(cfg.pki_dir().join(file), pki::pem("CERTIFICATE", &der))?;
    }
    admin.keys()?;
    Ok(())
}

/// A registry none of whose rows has a MAC comes from a version before
/// row MACs: its rows are sealed as they are, once. Upgrading is the one
/// moment to vouch for rows nobody checked; a registry with any sealed row
/// is never sealed again (a row without a MAC in it was stripped or
/// inserted, and `keybroker check` reports it).
fn seal_legacy(store: &Store) -> Result<()> {
    if store.sealed_rows()? > 0 {
        return Ok(());
    }
    for row in store.seal_unsealed()? {
        tracing::info!(target: "audit", row, "sealed a registry row from before row MACs");
        println!("sealed {row}");
    }
    Ok(())
}

/// A user or market id (`syntax::is_id`).
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    if !crate::syntax::is_id(id) {
        bail!("{kind} id must be 1-64 characters of A-Z a-z 0-9 . _ -, got {id:?}");
    }
    Ok(())
}

/// The rule a purchase's mail is sent by (`syntax::is_mail`), so every
/// address enrolled can be mailed.
fn check_mail(mail: &str) -> Result<()> {
    if !crate::syntax::is_mail(mail) {
        bail!(
            "not a mail address (local@domain.tld, printable ASCII, no spaces or <>\"(),;:[]\\): {mail:?}"
        );
    }
    Ok(())
}

/// `keybroker user add`. Both passwords meet the policy
/// (`passwords::check_policy`) and differ: one known password must not
/// give both the login and the authority to act.
pub fn user_add(
    admin: &Admin,
    id: &str,
    mail: &str,
    pw_access: &str,
    pw_release: &str,
) -> Result<()> {
    check_id("user", id)?;
    check_mail(mail)?;
    let a = &admin.cfg.auth;
    passwords::check_policy("first password", pw_access, a.min_password_len)?;
    passwords::check_policy("second password", pw_release, a.min_password_len)?;
    if pw_access == pw_release {
        bail!("the two passwords must differ");
    }
    if admin.store.user_get(id)?.is_some() {
        bail!("user {id} exists already");
    }
    let (pw_access, pw_release) = (pw_access.as_bytes(), pw_release.as_bytes());
    let h1 = passwords::hash(pw_access, a.argon2_m_kib, a.argon2_t)?;
    let binding = passwords::Binding::new(a.argon2_m_kib, a.argon2_t)?;
    let secret = binding.card_secret(pw_release, id)?;
    let keys = admin.keys()?;
    let (point, wrapped, verifier) =
        ops::generate_bound_user_key(&admin.session, &keys, &secret.kek_data)?;
    let ca = admin.ca_cert(labels::USER_CA)?;
    let cert = pki::issue(
        &ca,
        &admin.signer(labels::USER_CA)?,
        &format!("user {id}"),
        &[],
        Usage::Signing,
        Duration::from_secs(2 * 365 * 86400),
        &P256Public(point.clone()),
    )?;
    admin.store.user_add(&UserRecord {
        id: id.into(),
        mail: mail.into(),
        cert,
        public_key: point,
        wrapped_key: wrapped,
        pw_access: h1,
        pw_release: binding.encode(&verifier),
        failures: 0,
        locked: false,
    })
}

/// Which password `user passwd` changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhichPassword {
    /// The first (login): a new hash; the old one is not needed, as an
    /// operator's reset of a forgotten one.
    Access,
    /// The second (release): only the current one opens the home card, so
    /// it is needed, and the key is wrapped again inside the HSM.
    Release,
}

/// `keybroker user passwd`. `current` is the second password in force
/// (ignored for the first).
pub fn user_passwd(
    admin: &Admin,
    id: &str,
    which: WhichPassword,
    current: Option<&str>,
    new: &str,
) -> Result<()> {
    let a = &admin.cfg.auth;
    let u = admin
        .store
        .user_get(id)?
        .with_context(|| format!("no user {id}"))?;
    match which {
        WhichPassword::Access => {
            passwords::check_policy("first password", new, a.min_password_len)?;
            let h = passwords::hash(new.as_bytes(), a.argon2_m_kib, a.argon2_t)?;
            admin.store.set_access_password(id, &h)?;
        }
        WhichPassword::Release => {
            passwords::check_policy("second password", new, a.min_password_len)?;
            let current = current.context("the current second password is needed")?;
            if passwords::verify(new.as_bytes(), &u.pw_access) {
                bail!("the two passwords must differ");
            }
            let Some(passwords::Stored::Bound(old, verifier)) = passwords::stored(&u.pw_release)
            else {
                bail!(
                    "{id}'s home card is not bound to its second password yet: it is at the next release; change it after that"
                );
            };
            let old = old.card_secret(current.as_bytes(), id)?;
            let binding = passwords::Binding::new(a.argon2_m_kib, a.argon2_t)?;
            let secret = binding.card_secret(new.as_bytes(), id)?;
            let keys = admin.keys()?;
            let changed = ops::rebind_user_key(
                &admin.session,
                &keys,
                &old.kek_data,
                &verifier,
                &u.wrapped_key,
                &secret.kek_data,
            )?;
            let (wrapped, verifier) = match changed {
                Ok(v) => v,
                Err(ops::Refusal::Password) => bail!("the current second password is wrong"),
                Err(ops::Refusal::Blob(e)) => {
                    bail!(
                        "the HSM refused {id}'s home-card key ({e}); check the registry (`keybroker check`)"
                    )
                }
            };
            if !admin
                .store
                .rebind(id, &u.wrapped_key, &wrapped, &binding.encode(&verifier))?
            {
                bail!("{id}'s home card changed meanwhile; try again");
            }
        }
    }
    Ok(())
}

/// How long a terminal certificate is valid unless enrolment says otherwise.
pub const TERMINAL_LIFETIME: Duration = Duration::from_secs(365 * 86400);

/// `keybroker terminal enroll`: writes `terminal.key`, `terminal.crt` and
/// `broker-ca.crt` into `out`. Returns the terminal's serial.
pub fn terminal_enroll(admin: &Admin, user: &str, out: &Path) -> Result<String> {
    terminal_enroll_for(admin, user, out, TERMINAL_LIFETIME)
}

/// As [`terminal_enroll`], the certificate valid for `lifetime`.
pub fn terminal_enroll_for(
    admin: &Admin,
    user: &str,
    out: &Path,
    lifetime: Duration,
) -> Result<String> {
    if admin.store.user_get(user)?.is_none() {
        bail!("no user {user}");
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let serial = random_hex(8);
    let ca = admin.ca_cert(labels::TERMINAL_CA)?;
    let cert = pki::issue(
        &ca,
        &admin.signer(labels::TERMINAL_CA)?,
        &format!("terminal {serial} of {user}"),
        &[],
        Usage::TlsClient,
        lifetime,
        &key,
    )?;
    admin
        .store
        .terminal_add(&pki::fingerprint(&cert), &serial, user, &cert)?;
    std::fs::create_dir_all(out)?;
    write_private(&out.join("terminal.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(out.join("terminal.crt"), pki::pem("CERTIFICATE", &cert))?;
    let broker_ca = admin.ca_cert(labels::BROKER_CA)?;
    std::fs::write(
        out.join("broker-ca.crt"),
        pki::pem("CERTIFICATE", &broker_ca),
    )?;
    Ok(serial)
}

/// `keybroker market add`.
pub fn market_add(store: &Store, id: &str, endpoint: &str, ca_file: &Path) -> Result<()> {
    check_id("market", id)?;
    if store.has_market(id)? {
        bail!(
            "market {id} is registered already (`keybroker market remove {id}` first to replace it)"
        );
    }
    endpoint
        .rsplit_once(':')
        .and_then(|(h, p)| (!h.is_empty()).then_some(p))
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("endpoint must be HOST:PORT, got {endpoint:?}"))?;
    let what = || format!("the market CA file {}", ca_file.display());
    let ca_pem = std::fs::read_to_string(ca_file).with_context(what)?;
    let der = pki::read_cert_pem(&ca_pem).with_context(what)?;
    pki::check_ca(&der, rustls::pki_types::UnixTime::now()).with_context(what)?;
    store.market_add(&MarketRecord {
        id: id.into(),
        endpoint: endpoint.into(),
        ca_pem,
    })
}
