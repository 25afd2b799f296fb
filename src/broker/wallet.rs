//! Wallet operations on a core: purchase (claim 4), cancel (claim 5),
//! top-up (claim 6), balance.
//!
//! ```text
//! Purchase ─► ledger (group commit: debit + decision + mail, one transaction) ─► HSM signs receipt
//! Cancel   ─► market's authorisation verified (cert → market CA by webpki, signature) ─► ledger refund
//! TopUp    ─► second password (card::open) ─► voucher verified (issuer key) ─► ledger credit
//! ```

use super::Shared;
use super::conn::Core;
use super::exchange::{Released, hsm, pool_code};
use crate::cancel_auth::SignedCancel;
use crate::metrics::{WalletOp, wallet_op};
use crate::proto::ErrorCode;
use crate::proto::access::Message;
use crate::receipt::{Receipt, SignedReceipt};
use crate::wallet::{self, Amount, CancelRequest, PurchaseRequest, TopUpRequest, WalletError};
use std::sync::Arc;

pub fn code(e: &WalletError) -> ErrorCode {
    match e {
        WalletError::InsufficientFunds => ErrorCode::InsufficientFunds,
        WalletError::UnknownCurrency => ErrorCode::UnknownCurrency,
        WalletError::InvalidAmount | WalletError::Overflow => ErrorCode::InvalidAmount,
        WalletError::UnknownDecision => ErrorCode::UnknownDecision,
        WalletError::NotYourDecision => ErrorCode::NotYourDecision,
        WalletError::AlreadyCancelled => ErrorCode::AlreadyCancelled,
        WalletError::VoucherUsed => ErrorCode::VoucherUsed,
        WalletError::BadVoucher(_) => ErrorCode::BadVoucher,
        WalletError::BadAuthorisation => ErrorCode::BadAuthorisation,
        WalletError::InvalidInput(_) => ErrorCode::InvalidInput,
        WalletError::Busy => ErrorCode::Busy,
        WalletError::Storage(c) | WalletError::Mac(c) => {
            let retry = e.retryable();
            tracing::error!(error = %c, retry, "ledger failure");
            // Nothing was acknowledged, and the same call (its idempotency
            // key, its voucher) may pass later: docs/PROTOCOL.md §1.6.
            if retry {
                ErrorCode::Busy
            } else {
                ErrorCode::Internal
            }
        }
    }
}

async fn settle<T>(p: wallet::Pending<T>) -> Result<T, ErrorCode> {
    match p.await {
        Ok(r) => r.map_err(|e| code(&e)),
        Err(_) => Err(ErrorCode::Internal),
    }
}

fn currency_str(c: &[u8; 3]) -> Result<&str, ErrorCode> {
    std::str::from_utf8(c).map_err(|_| ErrorCode::UnknownCurrency)
}

pub async fn handle(
    core: &Core,
    rel: Option<&Released>,
    user: &str,
    call: Message,
) -> Result<Message, ErrorCode> {
    let shared = &core.shared;
    match call {
        Message::Balance => {
            let ledger = shared.ledger.clone();
            let u = user.to_owned();
            // A ledger read in the user's turn on the auth pool.
            let key = crate::exchange::sha256(user.as_bytes());
            let balances = shared
                .auth
                .run(key, move |_| ledger.balance(&u))
                .await
                .map_err(pool_code)?
                .map_err(|e| code(&e))?;
            Ok(Message::BalanceOk {
                balances: balances
                    .iter()
                    .map(|a| (a.currency.bytes(), a.minor))
                    .collect(),
            })
        }
        Message::Purchase {
            market,
            amount_minor,
            currency,
            order_ref,
            idempotency_key,
        } => {
            let rel = rel.ok_or(ErrorCode::NotReleased)?;
            let r = purchase(
                core,
                rel,
                user,
                market,
                amount_minor,
                currency,
                order_ref,
                idempotency_key,
            )
            .await;
            wallet_op(
                WalletOp::Purchase,
                r.as_ref().map_or_else(|c| c.name(), |_| "ok"),
            );
            r
        }
        Message::Cancel {
            decision_id,
            authorisation,
        } => {
            let rel = rel.ok_or(ErrorCode::NotReleased)?;
            let r = cancel(shared, rel, user, decision_id, &authorisation).await;
            wallet_op(
                WalletOp::Cancel,
                r.as_ref().map_or_else(|c| c.name(), |_| "ok"),
            );
            r
        }
        Message::TopUp { voucher, password } => {
            let rel = rel.ok_or(ErrorCode::NotReleased)?;
            let r = top_up(core, rel, user, voucher, password).await;
            wallet_op(
                WalletOp::TopUp,
                r.as_ref().map_or_else(|c| c.name(), |_| "ok"),
            );
            r
        }
        _ => Err(ErrorCode::Unexpected),
    }
}

#[allow(clippy::too_many_arguments)]
async fn purchase(
    core: &Core,
    rel: &Released,
    user: &str,
    market: String,
    amount_minor: i64,
    currency: [u8; 3],
    order_ref: String,
    idempotency_key: String,
) -> Result<Message, ErrorCode> {
    let shared = &core.shared;
    if !shared.markets.contains(&market) {
        return Err(ErrorCode::UnknownMarket);
    }
    let amount = Amount::new(amount_minor, currency_str(&currency)?).map_err(|e| code(&e))?;
    let decision = settle(shared.ledger.purchase_async(PurchaseRequest {
        user: user.to_owned(),
        market,
        amount,
        order_ref,
        idempotency_key,
        mail_to: rel.mail.clone(),
    }))
    .await?;
    let receipt = Receipt {
        decision_id: decision.id.clone(),
        user: decision.user.clone(),
        market: decision.market.clone(),
        amount_minor: decision.amount.minor,
        currency: decision.amount.currency.bytes(),
        order_ref: decision.order_ref.clone(),
        created_ms: decision.created_ms,
    };
    let body = receipt.body();
    let key = rel.key.key;
    // The debit is durable already; a failed signature leaves it in place
    // and a retry with the same idempotency key returns it, signed.
    let signature = hsm(core, "sign", move |w| {
        crate::hsm::ops::sign_p256(&w.session, w.hsm.live(key)?, &body)
    })
    .await?;
    tracing::info!(target: "audit", user, market = %decision.market, decision = %decision.id,
        amount = decision.amount.minor, currency = %decision.amount.currency.as_str(), result = "ok", "purchase");
    Ok(Message::PurchaseOk {
        balance_after: decision.balance_after,
        receipt: SignedReceipt {
            receipt,
            signature,
            user_cert: rel.cert.to_vec(),
        }
        .encode(),
    })
}

/// What a market certificate that signs cancellations must be good for:
/// id-kp-documentSigning (RFC 9336), which `market init` gives the cancel
/// key's certificate and never its TLS certificate.
const CANCEL_CERT_USAGE: webpki::KeyUsage =
    webpki::KeyUsage::required(crate::cancel_auth::EKU_DOCUMENT_SIGNING);

/// The market a cancellation authorisation comes from: its certificate
/// must chain to that market's registered CA (webpki, `pki::verify_issued`),
/// name it, and carry the document-signing EKU, so the market's TLS key
/// cannot authorise a refund. Returns the market id and its public key.
fn authorising_market(shared: &Shared, cert_der: &[u8]) -> Result<(String, Vec<u8>), ErrorCode> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| ErrorCode::BadAuthorisation)?;
    let id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .and_then(|c| c.strip_prefix("market "))
        .ok_or(ErrorCode::BadAuthorisation)?
        .to_owned();
    let info = shared.markets.get(&id).ok_or(ErrorCode::BadAuthorisation)?;
    let ca_der = crate::pki::read_cert_pem(&info.ca_pem).map_err(|_| ErrorCode::Internal)?;
    let now = rustls::pki_types::UnixTime::now();
    crate::pki::verify_issued(cert_der, &ca_der, CANCEL_CERT_USAGE, now).map_err(|e| {
        tracing::info!(
            market = id,
            error = format!("{e:#}"),
            "cancel certificate refused"
        );
        ErrorCode::BadAuthorisation
    })?;
    Ok((id, cert.public_key().subject_public_key.data.to_vec()))
}

/// Checks the market's authorisation (docs/PROTOCOL.md §1.8: certificate,
/// then the fields, then the signature) and refunds once.
async fn cancel(
    shared: &Arc<Shared>,
    rel: &Released,
    user: &str,
    decision_id: String,
    authorisation: &[u8],
) -> Result<Message, ErrorCode> {
    let signed = SignedCancel::decode(authorisation).map_err(|_| ErrorCode::BadAuthorisation)?;
    let (market, point) = authorising_market(shared, &signed.cert)?;
    let a = &signed.auth;
    let now = crate::wallet::now_ms().max(0) as u64;
    if a.decision_id != decision_id
        || a.market != market
        || a.user != user
        || a.expiry_ms <= now
        || a.expiry_ms > now + crate::cancel_auth::MAX_LIFETIME_MS
        || !signed.verify(&point)
    {
        return Err(ErrorCode::BadAuthorisation);
    }
    let entry = settle(shared.ledger.cancel_async(CancelRequest {
        user: user.to_owned(),
        decision_id: decision_id.clone(),
        mail_to: rel.mail.clone(),
        market: Some(market.clone()),
    }))
    .await?;
    tracing::info!(target: "audit", user, market, decision = %decision_id, result = "ok", "cancel");
    Ok(Message::WalletOk {
        balance_after: entry.balance_after,
    })
}

async fn top_up(
    core: &Core,
    rel: &Released,
    user: &str,
    voucher: Vec<u8>,
    password: crate::proto::access::Password,
) -> Result<Message, ErrorCode> {
    let shared = &core.shared;
    let issuer = shared.voucher_issuer.clone().ok_or(ErrorCode::BadVoucher)?;
    super::card::open(core, rel.terminal, user, password)
        .await
        .map_err(|why| why.code)?;
    let v = wallet::voucher::verify(&issuer, &voucher, wallet::now_ms()).map_err(|e| code(&e))?;
    if v.user != user {
        return Err(ErrorCode::BadVoucher);
    }
    let entry = settle(
        shared
            .ledger
            .top_up_async(TopUpRequest::from_voucher(&v, &rel.mail)),
    )
    .await?;
    tracing::info!(target: "audit", user, voucher = %hex::encode(v.id), amount = v.amount.minor,
        currency = %v.amount.currency.as_str(), result = "ok", "top-up");
    Ok(Message::WalletOk {
        balance_after: entry.balance_after,
    })
}
