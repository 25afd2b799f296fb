//! `keybroker market init`: a market's own CA, key and certificate (files:
//! the market is another party and keeps its keys its own way), the broker
//! and user CAs it trusts, and its config file.

use crate::pki::{self, Usage};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct InitArgs<'a> {
    pub dir: &'a Path,
    pub id: &'a str,
    /// The broker's `pki/` directory (broker-ca.pem, user-ca.pem).
    pub broker_pki: &'a Path,
    pub listen: &'a str,
    pub direct_listen: &'a str,
    pub allowed_users: &'a [String],
}

/// Writes the market's files into `dir`; returns the config path. Existing
/// keys are kept, so running it again only refreshes the config.
pub fn init(a: &InitArgs) -> Result<PathBuf> {
    crate::enroll::check_id("market", a.id)?;
    std::fs::create_dir_all(a.dir)?;
    let cert_path = a.dir.join("market.crt");
    if !cert_path.exists() {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca = pki::self_signed_ca(&format!("market {} CA", a.id), &ca_key)?;
        crate::enroll::write_private(
            &a.dir.join("market-ca.key"),
            ca_key.serialize_pem().as_bytes(),
        )?;
        std::fs::write(a.dir.join("market-ca.crt"), pki::pem("CERTIFICATE", &ca))?;
        let sans = vec![a.id.to_owned(), "localhost".into(), "127.0.0.1".into()];
        leaf(a, "market", &sans, Usage::TlsServer)?;
    }
    // The cancel-signing key is separate from the TLS key (docs/PROTOCOL.md
    // §1.8); a market made before it existed gets one on the next init.
    if !a.dir.join("cancel.crt").exists() {
        leaf(a, "cancel", &[], Usage::DocumentSigning)?;
    }
    for f in ["broker-ca.pem", "user-ca.pem"] {
        std::fs::copy(a.broker_pki.join(f), a.dir.join(f)).with_context(|| {
            format!(
                "copying {} (did `keybroker init` run?)",
                a.broker_pki.join(f).display()
            )
        })?;
    }
    let users: Vec<String> = a.allowed_users.iter().map(|u| format!("{u:?}")).collect();
    let config = a.dir.join("market.toml");
    std::fs::write(
        &config,
        format!(
            "id = {id:?}\nlisten = {listen:?}\ndirect_listen = {direct:?}\n\
             key = \"market.key\"\ncert = \"market.crt\"\nbroker_ca = \"broker-ca.pem\"\nuser_ca = \"user-ca.pem\"\n\
             cancel_key = \"cancel.key\"\ncancel_cert = \"cancel.crt\"\norders_db = \"orders.db\"\n\
             allowed_users = [{users}]\n",
            id = a.id,
            listen = a.listen,
            direct = a.direct_listen,
            users = users.join(", "),
        ),
    )?;
    Ok(config)
}

/// Issues `NAME.key` and `NAME.crt` (CN `market <id>`) under the market CA
/// kept in `dir`.
fn leaf(a: &InitArgs, name: &str, sans: &[String], usage: Usage) -> Result<()> {
    let read =
        |f: &str| std::fs::read_to_string(a.dir.join(f)).with_context(|| format!("reading {f}"));
    let ca = pki::read_cert_pem(&read("market-ca.crt")?)?;
    let ca_key = rcgen::KeyPair::from_pem(&read("market-ca.key")?).context("market CA key")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = pki::issue(
        &ca,
        &ca_key,
        &format!("market {}", a.id),
        sans,
        usage,
        Duration::from_secs(365 * 86400),
        &key,
    )?;
    crate::enroll::write_private(
        &a.dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
    )?;
    std::fs::write(
        a.dir.join(format!("{name}.crt")),
        pki::pem("CERTIFICATE", &cert),
    )?;
    Ok(())
}
