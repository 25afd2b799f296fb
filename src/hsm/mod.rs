//! The home card: keys and operations in a PKCS#11 token (SoftHSM in tests).
//!
//! ```text
//! Hsm::open ─► load module ─► find token by label ─► anchor session + login
//!                                                 └► cache key handles (no C_FindObjects later)
//! worker threads ─► Hsm::session() (one per thread) ─► ops::* (sign, wrap, unwrap)
//! ```
//!
//! One PKCS#11 session belongs to one thread: two threads sharing one
//! session crash SoftHSM. The anchor session only keeps the login (and the
//! session objects it owns) alive; it is never used for work after start.
//! Every error names the PKCS#11 function that failed.

pub mod locks;
pub mod ops;
pub mod signer;

use crate::config::{Config, PIN_ENV};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// Labels of the long-term keys. Each is a PKCS#11 URI
/// `pkcs11:token=<label>;object=<name>` (RFC 7512).
pub mod labels {
    pub const BROKER_CA: &str = "kb-broker-ca";
    pub const TERMINAL_CA: &str = "kb-terminal-ca";
    pub const USER_CA: &str = "kb-user-ca";
    /// Wrapped home-card keys before they were bound to the second
    /// password; kept to re-wrap those at their next release.
    pub const MASTER_WRAP: &str = "kb-master-wrap";
    /// AES-256, derive only: each user's key-encryption key is derived
    /// from it and the user's second password (docs/SECURITY.md).
    pub const KEK_BASE: &str = "kb-kek-base";
    /// HMAC-SHA256 key sealing every registry row (`rowmac`).
    pub const REGISTRY_MAC: &str = "kb-registry-mac";
    /// HMAC-SHA256 key chaining the wallet ledger's entries.
    pub const LEDGER_MAC: &str = "kb-ledger-mac";
    /// Derives the session-ticket keys; shared by every node of a cluster.
    pub const TICKET_KEY: &str = "kb-ticket-key";
}

#[derive(Debug, Error)]
pub enum HsmError {
    /// A PKCS#11 call failed; cryptoki's message names the function.
    #[error("PKCS#11 {op}: {source}")]
    Pkcs11 {
        op: &'static str,
        #[source]
        source: cryptoki::error::Error,
    },
    #[error("token '{0}' not found in any slot")]
    TokenNotFound(String),
    #[error("key 'pkcs11:token={token};object={label}' not found; run `keybroker init`")]
    KeyNotFound { token: String, label: String },
    #[error("HSM PIN unavailable: {0}")]
    Pin(String),
    /// C_Login answered CKR_PIN_INCORRECT: the PIN read is not the token's.
    #[error(
        "the HSM refused the PIN in {0} (C_Login: CKR_PIN_INCORRECT); put the token's user PIN there"
    )]
    PinRefused(String),
    /// C_Login answered CKR_PIN_LOCKED: too many wrong PINs.
    #[error(
        "the HSM has locked its user PIN after too many wrong ones (the last from {0}); the security officer must set it again (C_InitPIN)"
    )]
    PinLocked(String),
    /// A file or directory of the token that this process may not read.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("HSM returned {0}")]
    Format(&'static str),
    /// The key was released into a session the HSM has since lost.
    #[error("a key released before the HSM recovered; release again")]
    Stale,
}

pub type HsmResult<T> = Result<T, HsmError>;

impl HsmError {
    /// Whether the session (or the login) is gone, so the worker should
    /// open a new one: the HSM restarted, the token was reinserted, or a
    /// network HSM dropped the connection.
    pub fn session_lost(&self) -> bool {
        use cryptoki::error::{Error, RvError};
        matches!(
            self,
            HsmError::Pkcs11 {
                source: Error::Pkcs11(
                    RvError::SessionHandleInvalid
                        | RvError::SessionClosed
                        | RvError::DeviceRemoved
                        | RvError::DeviceError
                        | RvError::TokenNotPresent
                        | RvError::UserNotLoggedIn,
                    _
                ),
                ..
            }
        )
    }
}

/// Adds the operation name to a cryptoki error.
pub(crate) trait Ctx<T> {
    fn op(self, op: &'static str) -> HsmResult<T>;
}

impl<T> Ctx<T> for cryptoki::error::Result<T> {
    fn op(self, op: &'static str) -> HsmResult<T> {
        self.map_err(|source| HsmError::Pkcs11 { op, source })
    }
}

/// Handles of the long-term keys, looked up once at start.
#[derive(Clone, Copy, Debug)]
pub struct KeyHandles {
    pub broker_ca: ObjectHandle,
    pub terminal_ca: ObjectHandle,
    pub user_ca: ObjectHandle,
    pub master_wrap: ObjectHandle,
    pub kek_base: ObjectHandle,
    pub registry_mac: ObjectHandle,
}

pub struct Hsm {
    ctx: Pkcs11,
    module: PathBuf,
    slot: Slot,
    token: String,
    anchor: Mutex<Session>,
    /// Kept (zeroized on drop) to log in again after the HSM comes back.
    pin: Pin,
    /// Counts recoveries. Session objects (released keys) die with their
    /// sessions, and a handle from before a recovery may name another
    /// object after it, so a released key remembers the epoch it was made in.
    epoch: AtomicU64,
}

/// A key released into a session object, valid only in its epoch.
#[derive(Clone, Copy, Debug)]
pub struct SessionKey {
    pub handle: ObjectHandle,
    pub epoch: u64,
}

/// Exports `SOFTHSM2_CONF` from the config unless the environment has it.
/// Call before any thread starts.
pub fn export_softhsm_conf(cfg: &Config) {
    if cfg.hsm.softhsm2_conf.as_os_str().is_empty() || std::env::var_os("SOFTHSM2_CONF").is_some() {
        return;
    }
    let path = cfg.path(&cfg.hsm.softhsm2_conf);
    // SAFETY: called from main before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", path);
    }
}

/// A PIN and where it came from, so that a refusal names the place to fix.
pub struct Pin {
    pub pin: AuthPin,
    /// `KEYBROKER_HSM_PIN` or the file's path.
    pub from: String,
}

/// The user PIN: `KEYBROKER_HSM_PIN` if set, else the configured PIN file.
/// Set but empty is refused rather than tried: an empty PIN is always a
/// mistake (an unexpanded variable in a unit file), and trying it would
/// count a failed login against the token.
pub fn user_pin(cfg: &Config) -> HsmResult<Pin> {
    match std::env::var(PIN_ENV) {
        Ok(pin) if pin.is_empty() => Err(HsmError::Pin(format!(
            "{PIN_ENV} is set but empty; set it to the PIN, or unset it to read {}",
            cfg.path(&cfg.hsm.pin_file).display()
        ))),
        Ok(pin) => Ok(Pin {
            pin: AuthPin::from(pin),
            from: PIN_ENV.to_owned(),
        }),
        Err(_) => read_pin(&cfg.path(&cfg.hsm.pin_file)),
    }
}

/// Reads a PIN file: the first line, owner-only. Like ssh with a private
/// key, a PIN file that group or others may read is refused, not warned
/// about: whoever reads it can use every key in the token.
pub fn read_pin(path: &Path) -> HsmResult<Pin> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let unavailable = |e: std::io::Error| HsmError::Pin(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(unavailable)?;
    let mode = f.metadata().map_err(unavailable)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(HsmError::Pin(format!(
            "{} may be read by group or others (mode {mode:04o}); a PIN file must be \
             owner-only: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    f.read_to_string(&mut text).map_err(unavailable)?;
    let pin = text.trim_end_matches(['\n', '\r']).to_owned();
    if pin.is_empty() {
        return Err(HsmError::Pin(format!("{} is empty", path.display())));
    }
    Ok(Pin {
        pin: AuthPin::from(pin),
        from: path.display().to_string(),
    })
}

/// Logs in as the user. A wrong PIN says where the PIN came from: the
/// usual cause is a PIN file or variable out of step with the token.
fn login(s: &Session, pin: &Pin) -> HsmResult<()> {
    use cryptoki::error::{Error, RvError};
    match s.login(UserType::User, Some(&pin.pin)) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(Error::Pkcs11(RvError::PinIncorrect, _)) => Err(HsmError::PinRefused(pin.from.clone())),
        Err(Error::Pkcs11(RvError::PinLocked, _)) => Err(HsmError::PinLocked(pin.from.clone())),
        Err(e) => Err(HsmError::Pkcs11 {
            op: "C_Login",
            source: e,
        }),
    }
}

fn load_module(path: &Path) -> HsmResult<Pkcs11> {
    locks::initialize(path)?;
    let ctx = Pkcs11::new(path).op("C_GetFunctionList (load module)")?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // A second Hsm in the same process (the demo runs two brokers).
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => Ok(ctx),
        Err(e) => Err(HsmError::Pkcs11 {
            op: "C_Initialize",
            source: e,
        }),
    }
}

fn find_slot(ctx: &Pkcs11, label: &str) -> HsmResult<Option<Slot>> {
    for slot in ctx.get_slots_with_initialized_token().op("C_GetSlotList")? {
        let info = ctx.get_token_info(slot).op("C_GetTokenInfo")?;
        if info.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

impl Hsm {
    /// Loads the module, finds the token and logs in with the user PIN.
    pub fn open(cfg: &Config) -> HsmResult<Self> {
        let ctx = load_module(&cfg.hsm.module)?;
        let token = cfg.hsm.token_label.clone();
        let slot = find_slot(&ctx, &token)?.ok_or_else(|| {
            // SoftHSM skips a token directory it cannot read: say so.
            let dir = crate::fsmode::token_dir(cfg);
            match std::fs::read_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    HsmError::PermissionDenied(dir.display().to_string())
                }
                _ => HsmError::TokenNotFound(token.clone()),
            }
        })?;
        let anchor = ctx.open_rw_session(slot).op("C_OpenSession")?;
        let pin = user_pin(cfg)?;
        login(&anchor, &pin)?;
        Ok(Self {
            ctx,
            module: cfg.hsm.module.clone(),
            slot,
            token,
            anchor: Mutex::new(anchor),
            pin,
            epoch: AtomicU64::new(0),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The handle of `key` if it still lives: made in this epoch.
    pub fn live(&self, key: SessionKey) -> HsmResult<ObjectHandle> {
        if key.epoch == self.epoch() {
            Ok(key.handle)
        } else {
            Err(HsmError::Stale)
        }
    }

    /// After a session of epoch `seen` was found lost: the first caller to
    /// notice opens a new anchor, logs in again (the login goes with the
    /// last session) and starts a new epoch; later callers find it done.
    /// Returns the current epoch.
    fn reanchor(&self, seen: u64) -> HsmResult<u64> {
        let mut anchor = self.anchor.lock().expect("anchor lock");
        if self.epoch() == seen {
            let slot = find_slot(&self.ctx, &self.token)?
                .ok_or_else(|| HsmError::TokenNotFound(self.token.clone()))?;
            let fresh = self.ctx.open_rw_session(slot).op("C_OpenSession")?;
            login(&fresh, &self.pin)?;
            *anchor = fresh;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(
                epoch = self.epoch(),
                "HSM sessions reopened; released keys must be released again"
            );
        }
        Ok(self.epoch())
    }

    /// A fresh session, and its epoch, for a user of a session opened in
    /// epoch `seen` that was lost.
    pub fn recover(&self, seen: u64) -> HsmResult<(Session, u64)> {
        let epoch = self.reanchor(seen)?;
        Ok((self.session()?, epoch))
    }

    /// Fault injection (`admin.fault_injection`): closes every session this
    /// process has on the token, as an HSM restart or a dropped network
    /// HSM link does. cryptoki does not wrap `C_CloseAllSessions`; it is
    /// called through the raw table `locks` loaded the module with, the
    /// same instance cryptoki uses.
    pub fn close_all_sessions(&self) -> HsmResult<()> {
        let lib = locks::module(&self.module)?;
        #[allow(unsafe_code)]
        // SAFETY: the same module cryptoki loaded and initialised;
        // C_CloseAllSessions takes a slot id and touches nothing of ours.
        let rv = unsafe { lib.C_CloseAllSessions(self.slot.id()) };
        if rv == cryptoki_sys::CKR_OK {
            Ok(())
        } else {
            Err(HsmError::Format("an error to C_CloseAllSessions"))
        }
    }

    /// Initialises the token if no token has the label yet. Idempotent.
    /// Returns true when a token was created.
    pub fn init_token(cfg: &Config) -> HsmResult<bool> {
        let ctx = load_module(&cfg.hsm.module)?;
        let label = &cfg.hsm.token_label;
        if find_slot(&ctx, label)?.is_some() {
            return Ok(false);
        }
        let so_pin = read_pin(&cfg.path(&cfg.hsm.so_pin_file))?;
        let user_pin = user_pin(cfg)?;
        let mut free = None;
        for slot in ctx.get_slots_with_token().op("C_GetSlotList")? {
            let info = ctx.get_token_info(slot).op("C_GetTokenInfo")?;
            if !info.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| HsmError::TokenNotFound("(a free slot)".into()))?;
        ctx.init_token(slot, &so_pin.pin, label).op("C_InitToken")?;
        // SoftHSM moves the token to a new slot number: look it up again.
        let slot = find_slot(&ctx, label)?.ok_or_else(|| HsmError::TokenNotFound(label.clone()))?;
        let s = ctx.open_rw_session(slot).op("C_OpenSession")?;
        s.login(UserType::So, Some(&so_pin.pin))
            .op("C_Login (SO)")?;
        s.init_pin(&user_pin.pin).op("C_InitPIN")?;
        s.logout().op("C_Logout")?;
        Ok(true)
    }

    /// A new session for the calling thread. The token is already logged in.
    pub fn session(&self) -> HsmResult<Session> {
        self.ctx.open_rw_session(self.slot).op("C_OpenSession")
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Finds a token key by label and class. Start-up and enrolment only.
    pub fn find(
        &self,
        s: &Session,
        label: &str,
        class: ObjectClass,
    ) -> HsmResult<Option<ObjectHandle>> {
        let found = s
            .find_objects(&[
                Attribute::Token(true),
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .op("C_FindObjects")?;
        Ok(found.first().copied())
    }

    pub(crate) fn require(
        &self,
        s: &Session,
        label: &str,
        class: ObjectClass,
    ) -> HsmResult<ObjectHandle> {
        self.find(s, label, class)?
            .ok_or_else(|| HsmError::KeyNotFound {
                token: self.token.clone(),
                label: label.into(),
            })
    }

    /// Looks up the long-term key handles once.
    pub fn key_handles(&self) -> HsmResult<KeyHandles> {
        let s = self.anchor.lock().expect("anchor lock");
        Ok(KeyHandles {
            broker_ca: self.require(&s, labels::BROKER_CA, ObjectClass::PRIVATE_KEY)?,
            terminal_ca: self.require(&s, labels::TERMINAL_CA, ObjectClass::PRIVATE_KEY)?,
            user_ca: self.require(&s, labels::USER_CA, ObjectClass::PRIVATE_KEY)?,
            master_wrap: self.require(&s, labels::MASTER_WRAP, ObjectClass::SECRET_KEY)?,
            kek_base: self.require(&s, labels::KEK_BASE, ObjectClass::SECRET_KEY)?,
            registry_mac: self.require(&s, labels::REGISTRY_MAC, ObjectClass::SECRET_KEY)?,
        })
    }

    /// Whether the token answers and our login holds; reopens the anchor
    /// if it was lost. Used by `/readyz` and the HSM monitor.
    pub fn ping(&self) -> bool {
        let seen = self.epoch();
        let alive = self
            .anchor
            .lock()
            .expect("anchor lock")
            .get_session_info()
            .is_ok();
        alive || self.reanchor(seen).is_ok()
    }
}
