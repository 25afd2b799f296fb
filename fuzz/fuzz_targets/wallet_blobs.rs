//! Vouchers, receipts and cancellation authorisations from arbitrary bytes:
//! decoding and verifying never panic, and what decodes re-encodes to the
//! same bytes.
#![no_main]

use keybroker::cancel_auth::SignedCancel;
use keybroker::receipt::SignedReceipt;
use keybroker::wallet::voucher;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = voucher::Signed::decode(data) {
        assert_eq!(v.encode(), data);
    }
    // A key taken from the input itself: verification must not panic.
    let point = data.get(..65).unwrap_or(data);
    let _ = voucher::verify(point, data, 0);
    if let Ok(r) = SignedReceipt::decode(data) {
        assert_eq!(r.encode(), data);
        let _ = r.verify(point);
    }
    if let Ok(c) = SignedCancel::decode(data) {
        assert_eq!(c.encode(), data);
        let _ = c.verify(point);
    }
});
