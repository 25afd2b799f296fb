//! The mutexes the PKCS#11 module locks with: ours, handed over in
//! `C_Initialize`, so that a short critical section spins instead of
//! putting the thread to sleep.
//!
//! SoftHSM guards its session table with one mutex, taken by every
//! `C_SignInit`, `C_Sign`, `C_DeriveKey`, … of every thread, and holds it
//! for a table lookup. With its own pthread mutexes a core that finds it
//! taken sleeps at once in `futex(2)`, and the holder pays a wake-up of the
//! other CPU when it lets go. Under the exchange bench that was 0.35
//! futex calls per exchange, nearly all on that one mutex, and each
//! sleep and wake costs tens of microseconds of CPU in a VM. parking_lot's
//! mutex spins briefly before it parks, which covers a lookup.
//!
//! PKCS#11 §5.4: when the application passes all four callbacks the
//! module must use them (SoftHSM does, with or without
//! `CKF_OS_LOCKING_OK`). cryptoki cannot pass callbacks, so the module is
//! initialised here first, through its raw function table; cryptoki's own
//! `C_Initialize` then finds it initialised, which `load_module` accepts.

// The callbacks are C functions the module calls with raw pointers.
#![allow(unsafe_code)]

use super::{HsmError, HsmResult};
use cryptoki_sys::{
    CK_C_INITIALIZE_ARGS, CK_RV, CKF_OS_LOCKING_OK, CKR_ARGUMENTS_BAD,
    CKR_CRYPTOKI_ALREADY_INITIALIZED, CKR_HOST_MEMORY, CKR_OK,
};
use parking_lot::lock_api::RawMutex as _;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

type Raw = parking_lot::RawMutex;

/// Mutexes the module has made with `create`.
static MADE: AtomicU64 = AtomicU64::new(0);

/// How many mutexes the module has made through us: more than zero once a
/// module that honours the callbacks is initialised.
pub fn made() -> u64 {
    MADE.load(Ordering::Relaxed)
}

/// Bytes allocated per mutex: a whole `pthread_mutex_t`, zeroed, with our
/// mutex in its first byte. SoftHSM's destructor puts its own pthread
/// callbacks back before it deletes its objects, so mutexes made here are
/// then destroyed by `pthread_mutex_destroy` and `free`: on this memory
/// that is harmless. For the same reason it is `calloc`'d and `free`'d, as
/// theirs are, and a mutex of theirs could be locked here (all zero is
/// unlocked to both).
const SLOT: usize = std::mem::size_of::<libc::pthread_mutex_t>();

unsafe extern "C" fn create(out: *mut *mut c_void) -> CK_RV {
    if out.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: calloc of a non-zero size; the result is checked.
    let m = unsafe { libc::calloc(1, SLOT) };
    if m.is_null() {
        return CKR_HOST_MEMORY;
    }
    // SAFETY: `m` is SLOT (≥ 1) zeroed bytes; `out` is the module's slot.
    unsafe {
        m.cast::<Raw>().write(Raw::INIT);
        *out = m;
    }
    MADE.fetch_add(1, Ordering::Relaxed);
    CKR_OK
}

unsafe extern "C" fn destroy(m: *mut c_void) -> CK_RV {
    if m.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: `m` came from `create` (or SoftHSM's own calloc'd mutex) and
    // the module destroys it once.
    unsafe { libc::free(m) };
    CKR_OK
}

unsafe extern "C" fn lock(m: *mut c_void) -> CK_RV {
    if m.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: `m` came from `create` and is not yet destroyed.
    unsafe { &*m.cast::<Raw>() }.lock();
    CKR_OK
}

unsafe extern "C" fn unlock(m: *mut c_void) -> CK_RV {
    if m.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: the module unlocks only a mutex it holds.
    unsafe { (*m.cast::<Raw>()).unlock() };
    CKR_OK
}

/// The raw function table of each module loaded here, one per path, kept
/// loaded for the process's life: unloading one would discard the state
/// cryptoki goes on to use.
static LOADED: OnceLock<Mutex<Vec<(PathBuf, &'static cryptoki_sys::Pkcs11)>>> = OnceLock::new();

/// The raw function table of the module at `path`, loaded on first use.
/// For the calls cryptoki does not wrap (`C_CloseAllSessions`).
pub fn module(path: &Path) -> HsmResult<&'static cryptoki_sys::Pkcs11> {
    let mut loaded = LOADED
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((_, lib)) = loaded.iter().find(|(p, _)| p == path) {
        return Ok(lib);
    }
    // SAFETY: loading a PKCS#11 module runs its constructors, as cryptoki's
    // own load does.
    let lib = unsafe { cryptoki_sys::Pkcs11::new(path) }
        .map_err(|_| HsmError::Format("a module that cannot be loaded"))?;
    let lib: &'static _ = Box::leak(Box::new(lib));
    loaded.push((path.to_owned(), lib));
    Ok(lib)
}

/// Initialises the module at `path` with our mutexes, unless it already is
/// (then cryptoki's own `C_Initialize` is refused as already done, and
/// accepted). Called on every load, so a module finalised since is
/// initialised with our mutexes again.
pub fn initialize(path: &Path) -> HsmResult<()> {
    let lib = module(path)?;
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create),
        DestroyMutex: Some(destroy),
        LockMutex: Some(lock),
        UnlockMutex: Some(unlock),
        flags: CKF_OS_LOCKING_OK,
        pReserved: std::ptr::null_mut(),
    };
    // SAFETY: the args outlive the call; the callbacks above stay valid for
    // the process's life.
    let rv = unsafe { lib.C_Initialize(std::ptr::addr_of_mut!(args).cast()) };
    match rv {
        CKR_OK | CKR_CRYPTOKI_ALREADY_INITIALIZED => Ok(()),
        _ => Err(HsmError::Format(
            "an error to C_Initialize with our mutexes",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_lock_and_unlock() {
        let mut m: *mut c_void = std::ptr::null_mut();
        // SAFETY: the same sequence a module runs.
        unsafe {
            assert_eq!(create(&mut m), CKR_OK);
            assert_eq!(lock(m), CKR_OK);
            assert!(!(*m.cast::<Raw>()).try_lock(), "held");
            assert_eq!(unlock(m), CKR_OK);
            assert!((*m.cast::<Raw>()).try_lock(), "free again");
            (*m.cast::<Raw>()).unlock();
            assert_eq!(destroy(m), CKR_OK);
            assert_eq!(lock(std::ptr::null_mut()), CKR_ARGUMENTS_BAD);
        }
    }
}
