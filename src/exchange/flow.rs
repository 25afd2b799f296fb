//! One brokered exchange as a state machine, sans-IO: which binding to sign
//! for, what to ask the key holder (the HSM) for, what to put on the market
//! link, the one retry on the next channel, and the answer for the
//! terminal.
//!
//! ```text
//!            binding            signed (KeyJob::Sign / KeygenSign)         accepted
//! Binding ───────────► Signing ─────────────────────────────────► Asking ───────────► (kx=hsm) Deriving ──► Done
//!    ▲  none: market_unavailable      failed: Done(code)           │ Broken, first time: ephemeral destroyed,
//!    └──────────────────────────────────────────────────────────────┘ Binding{after: the broken channel}
//! ```
//!
//! The shell (`broker::exchange`) asks [`Flow::poll_action`] what to do,
//! does it (the link's binding, an HSM job, a submit on the link), and
//! hands the outcome back with the matching `handle_*` call. What needs
//! randomness or the clock (the request id, the nonce, the time, a
//! software ephemeral) comes in as [`Fresh`] with each binding, so the
//! simulation (tests/sim.rs) runs the same code on its own values. `P` is
//! the key holder's handle for an ephemeral private key (an HSM session
//! object in the broker).
//!
//! Why one retry, and only for [`Failure::Broken`]: nothing is done until
//! X is wrapped, and the market holds nothing but an unused session it
//! will expire, so a request whose channel broke under it can be asked
//! again, signed afresh for the next channel (its binding is in T). A
//! market that answered, or went silent, is not asked twice.

use super::keyops::KeyDone;
use super::{Ephemeral, Group, Mode, Point, Transcript};
use crate::config::Kx;
use crate::proto::ErrorCode;
use crate::proto::access::Message;
use crate::proto::link::{Failure, Reply};
use crate::proto::market::{Accepted, ExchangeRequest};
use std::collections::VecDeque;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Who asks, for what: fixed for the whole exchange.
pub struct Params {
    pub user: String,
    pub market: String,
    /// The user's certificate (DER), shared with its released session,
    /// and its SHA-256.
    pub cert: Arc<Vec<u8>>,
    pub fingerprint: [u8; 32],
    /// The key exchange, read once: a reload meanwhile changes nothing.
    pub kx: Kx,
    /// The terminal's ephemeral in partial mode.
    pub terminal_eph: Option<Point>,
    /// X'wrap, the key X goes to the terminal under.
    pub wrap_key: Zeroizing<[u8; 32]>,
}

/// What one attempt needs from outside: unique or random values.
pub struct Fresh {
    /// Unique among this broker's requests to the market (core index and
    /// counter), so replies match.
    pub request_id: u64,
    /// Random: with `time_ms`, what the market's replay cache keys on.
    pub nonce: [u8; 16],
    pub time_ms: u64,
    /// kx=software in full mode: the broker's ephemeral for this attempt.
    pub software: Option<Ephemeral>,
}

/// A job for the key holder ([`super::keyops::KeyOps`], run by
/// [`KeyJob::run`]); its outcome goes to [`Flow::handle_key`].
#[derive(Clone, Debug)]
pub enum KeyJob<P> {
    /// Sign `digest` with the user's home-card key.
    Sign { digest: [u8; 32] },
    /// kx=hsm: make a P-256 ephemeral, put its point in `transcript`, sign
    /// the digest with the home-card key, all in one job.
    KeygenSign { transcript: Transcript },
    /// kx=hsm: ECDH of `private` with `peer`, then HMAC-SHA256 over `input`
    /// (consuming `private`).
    Derive {
        private: P,
        peer: Point,
        input: Vec<u8>,
    },
}

/// What the shell does next.
#[derive(Debug)]
pub enum Action<P> {
    /// The link's binding: the current one (`after: None`), or the one that
    /// replaced the channel `after` (a retry); then [`Flow::handle_binding`].
    Binding {
        after: Option<[u8; 32]>,
    },
    Key(KeyJob<P>),
    /// Queue `req` on the link, signed for `binding`; then
    /// [`Flow::handle_reply`].
    Submit {
        req: ExchangeRequest,
        binding: [u8; 32],
    },
    /// An ephemeral that will not be used: destroy it (no answer).
    Destroy(P),
    /// Over: the answer for the terminal, and the key exchange it ran
    /// (`software`, `hsm` or `partial`).
    Done(Result<Message, ErrorCode>, &'static str),
}

/// This side's ephemeral of the attempt in flight.
enum Eph<P> {
    Software(Ephemeral),
    Hsm(P),
    Terminal,
}

enum State<P> {
    /// Waiting for a binding.
    Binding,
    Signing {
        t: Transcript,
        eph: Eph<P>,
        digest: [u8; 32],
    },
    Asking {
        binding: [u8; 32],
        eph: Eph<P>,
        digest: [u8; 32],
    },
    Deriving {
        accepted: Accepted,
        /// The ephemeral the Derive job consumes, kept in case the job
        /// never runs: then it is destroyed ([`Flow::handle_key_refused`]).
        private: P,
    },
    Done,
}

pub struct Flow<P> {
    p: Params,
    state: State<P>,
    retried: bool,
    out: VecDeque<Action<P>>,
}

impl<P: Clone> Flow<P> {
    pub fn new(p: Params) -> Self {
        Self {
            p,
            state: State::Binding,
            retried: false,
            out: VecDeque::from([Action::Binding { after: None }]),
        }
    }

    /// The next thing to do; `None` while waiting for a `handle_*` answer.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.out.pop_front()
    }

    fn kx_label(&self) -> &'static str {
        match (self.p.terminal_eph, self.p.kx) {
            (Some(_), _) => "partial",
            (None, Kx::Software) => "software",
            (None, Kx::Hsm) => "hsm",
        }
    }

    fn done(&mut self, r: Result<Message, ErrorCode>) {
        self.state = State::Done;
        let kx = self.kx_label();
        self.out.push_back(Action::Done(r, kx));
    }

    /// The binding to sign for (`None`: the market is down), with this
    /// attempt's fresh values.
    pub fn handle_binding(&mut self, b: Option<([u8; 32], Fresh)>) {
        if !matches!(self.state, State::Binding) {
            return;
        }
        let Some((binding, fresh)) = b else {
            return self.done(Err(ErrorCode::MarketUnavailable));
        };
        let mut t = Transcript {
            mode: if self.p.terminal_eph.is_some() {
                Mode::Partial
            } else {
                Mode::Full
            },
            market: self.p.market.clone(),
            user: self.p.user.clone(),
            cert_fingerprint: self.p.fingerprint,
            request_id: fresh.request_id,
            ephemeral: Point::UNSET,
            time_ms: fresh.time_ms,
            nonce: fresh.nonce,
            binding,
        };
        let eph = match (self.p.terminal_eph, self.p.kx, fresh.software) {
            (Some(p), _, _) => {
                t.ephemeral = p;
                Eph::Terminal
            }
            (None, Kx::Software, Some(e)) => {
                t.ephemeral = e.public;
                Eph::Software(e)
            }
            (None, Kx::Software, None) => return self.done(Err(ErrorCode::Internal)),
            (None, Kx::Hsm, _) => {
                self.out.push_back(Action::Key(KeyJob::KeygenSign {
                    transcript: t.clone(),
                }));
                self.state = State::Signing {
                    t,
                    eph: Eph::Terminal,
                    digest: [0; 32],
                };
                return;
            }
        };
        let digest = t.digest();
        self.out.push_back(Action::Key(KeyJob::Sign { digest }));
        self.state = State::Signing { t, eph, digest };
    }

    /// The outcome of the [`KeyJob`] asked for, or why it did not run.
    pub fn handle_key(&mut self, r: Result<KeyDone<P>, ErrorCode>) {
        match r {
            Ok(KeyDone::Signed(sig)) => self.handle_signed(Ok(sig)),
            Ok(KeyDone::KeygenSigned {
                point,
                private,
                digest,
                signature,
            }) => self.handle_keygen_signed(Ok((point, private, digest, signature))),
            Ok(KeyDone::Derived(x)) => self.handle_derived(Ok(x)),
            Err(code) if matches!(self.state, State::Deriving { .. }) => {
                self.handle_derived(Err(code))
            }
            Err(code) => self.handle_signed(Err(code)),
        }
    }

    /// The [`KeyJob`] asked for never ran (the HSM queue was full): what
    /// it would have consumed is destroyed. A job that ran and failed has
    /// consumed its ephemeral; that goes to [`Flow::handle_key`].
    pub fn handle_key_refused(&mut self, code: ErrorCode) {
        if let State::Deriving { private, .. } = &self.state {
            self.out.push_back(Action::Destroy(private.clone()));
        }
        self.handle_key(Err(code))
    }

    /// The home-card key's signature over the digest asked for.
    fn handle_signed(&mut self, r: Result<Vec<u8>, ErrorCode>) {
        let State::Signing { t, eph, digest } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        match r {
            Ok(sig) => self.submit(t, eph, digest, sig),
            Err(code) => self.done(Err(code)),
        }
    }

    /// kx=hsm: the ephemeral's point and handle, T's digest with that
    /// point, and the signature over it.
    fn handle_keygen_signed(&mut self, r: Result<(Point, P, [u8; 32], Vec<u8>), ErrorCode>) {
        let State::Signing { mut t, .. } = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        match r {
            Ok((point, private, digest, sig)) => {
                t.ephemeral = point;
                self.submit(t, Eph::Hsm(private), digest, sig)
            }
            Err(code) => self.done(Err(code)),
        }
    }

    fn submit(&mut self, t: Transcript, eph: Eph<P>, digest: [u8; 32], signature: Vec<u8>) {
        let binding = t.binding;
        self.out.push_back(Action::Submit {
            req: ExchangeRequest {
                request_id: t.request_id,
                mode: t.mode,
                user: t.user,
                user_cert: self.p.cert.to_vec(),
                ephemeral: t.ephemeral,
                time_ms: t.time_ms,
                nonce: t.nonce,
                signature,
            },
            binding,
        });
        self.state = State::Asking {
            binding,
            eph,
            digest,
        };
    }

    /// The link's answer to the request.
    pub fn handle_reply(&mut self, r: Reply) {
        let State::Asking {
            binding,
            eph,
            digest,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        let accepted = match r {
            Ok(a) => a,
            Err(why) => {
                if let Eph::Hsm(h) = eph {
                    self.out.push_back(Action::Destroy(h));
                }
                if why == Failure::Broken && !self.retried {
                    self.retried = true;
                    self.state = State::Binding;
                    self.out.push_back(Action::Binding {
                        after: Some(binding),
                    });
                    return;
                }
                return self.done(Err(why.code()));
            }
        };
        match eph {
            Eph::Terminal => self.done(Ok(Message::PartialOk {
                session_id: accepted.session_id,
                expiry_ms: accepted.expiry_ms,
                endpoint: accepted.endpoint,
                market_ephemeral: accepted.ephemeral,
                transcript: digest,
            })),
            Eph::Software(e) => match e.x(&accepted.ephemeral, &digest, &accepted.ephemeral) {
                Some(x) => self.wrapped(accepted, &x),
                None => self.done(Err(ErrorCode::MarketInternal)),
            },
            Eph::Hsm(private) => {
                if accepted.ephemeral.group() != Group::P256 {
                    self.out.push_back(Action::Destroy(private));
                    return self.done(Err(ErrorCode::MarketInternal));
                }
                self.out.push_back(Action::Key(KeyJob::Derive {
                    private: private.clone(),
                    peer: accepted.ephemeral,
                    input: super::x_input(&digest, &accepted.ephemeral),
                }));
                self.state = State::Deriving { accepted, private };
            }
        }
    }

    /// kx=hsm: X from the HSM.
    fn handle_derived(&mut self, r: Result<Zeroizing<[u8; 32]>, ErrorCode>) {
        let State::Deriving { accepted, .. } = std::mem::replace(&mut self.state, State::Done)
        else {
            return;
        };
        match r {
            Ok(x) => self.wrapped(accepted, &x),
            Err(code) => self.done(Err(code)),
        }
    }

    fn wrapped(&mut self, accepted: Accepted, x: &[u8; 32]) {
        let wrapped_x = super::wrap(&self.p.wrap_key, x);
        self.done(Ok(Message::ExchangeOk {
            session_id: accepted.session_id,
            expiry_ms: accepted.expiry_ms,
            endpoint: accepted.endpoint,
            wrapped_x,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kx: Kx, terminal_eph: Option<Point>) -> Params {
        Params {
            user: "alice".into(),
            market: "m1".into(),
            cert: Arc::new(vec![0x30]),
            fingerprint: [3; 32],
            kx,
            terminal_eph,
            wrap_key: Zeroizing::new([5; 32]),
        }
    }

    fn fresh(id: u64, software: bool) -> Fresh {
        Fresh {
            request_id: id,
            nonce: [id as u8; 16],
            time_ms: 1_000 + id,
            software: software.then(|| Ephemeral::generate(Group::X25519)),
        }
    }

    /// Drives the flow to its submit: the request and its binding.
    fn to_submit(f: &mut Flow<u32>, binding: [u8; 32], id: u64) -> ExchangeRequest {
        assert!(matches!(f.poll_action(), Some(Action::Binding { .. })));
        f.handle_binding(Some((binding, fresh(id, true))));
        let Some(Action::Key(KeyJob::Sign { digest })) = f.poll_action() else {
            panic!("no signing job")
        };
        f.handle_signed(Ok(digest.to_vec()));
        let Some(Action::Submit { req, binding: b }) = f.poll_action() else {
            panic!("no submit")
        };
        assert_eq!(b, binding);
        req
    }

    #[test]
    fn software_kx_wraps_the_x_the_market_derives() {
        let mut f: Flow<u32> = Flow::new(params(Kx::Software, None));
        let req = to_submit(&mut f, [1; 32], 7);
        assert_eq!((req.request_id, req.user.as_str()), (7, "alice"));
        // The market's side: its ephemeral, T's digest from the request.
        let m = Ephemeral::generate(Group::X25519);
        let t = Transcript {
            mode: Mode::Full,
            market: "m1".into(),
            user: "alice".into(),
            cert_fingerprint: [3; 32],
            request_id: 7,
            ephemeral: req.ephemeral,
            time_ms: req.time_ms,
            nonce: req.nonce,
            binding: [1; 32],
        };
        assert_eq!(req.signature, t.digest().to_vec(), "signed T itself");
        let x = m.x(&req.ephemeral, &t.digest(), &m.public).unwrap();
        f.handle_reply(Ok(Accepted {
            session_id: [9; 16],
            ephemeral: m.public,
            expiry_ms: 5,
            endpoint: "e".into(),
        }));
        let Some(Action::Done(Ok(Message::ExchangeOk { wrapped_x, .. }), "software")) =
            f.poll_action()
        else {
            panic!("not done")
        };
        assert_eq!(*super::super::unwrap(&[5; 32], &wrapped_x).unwrap(), *x);
        assert!(super::super::unwrap(&[6; 32], &wrapped_x).is_none());
    }

    #[test]
    fn a_broken_channel_is_asked_again_once_signed_for_the_next() {
        let mut f: Flow<u32> = Flow::new(params(Kx::Software, None));
        let first = to_submit(&mut f, [1; 32], 1);
        f.handle_reply(Err(Failure::Broken));
        assert!(matches!(
            f.poll_action(),
            Some(Action::Binding { after: Some(b) }) if b == [1; 32]
        ));
        f.handle_binding(Some(([2; 32], fresh(2, true))));
        let Some(Action::Key(KeyJob::Sign { digest })) = f.poll_action() else {
            panic!()
        };
        f.handle_signed(Ok(digest.to_vec()));
        let Some(Action::Submit { req, binding }) = f.poll_action() else {
            panic!()
        };
        assert_eq!(binding, [2; 32]);
        assert_ne!(req.signature, first.signature, "signed afresh");
        f.handle_reply(Err(Failure::Broken));
        assert!(matches!(
            f.poll_action(),
            Some(Action::Done(Err(ErrorCode::MarketUnavailable), _))
        ));
    }

    #[test]
    fn a_market_that_answered_or_went_silent_is_not_asked_again() {
        for why in [ErrorCode::MarketTimeout, ErrorCode::BadSignature] {
            let mut f: Flow<u32> = Flow::new(params(Kx::Software, None));
            to_submit(&mut f, [1; 32], 1);
            f.handle_reply(Err(why.into()));
            assert!(matches!(f.poll_action(), Some(Action::Done(Err(c), _)) if c == why));
        }
    }

    #[test]
    fn hsm_kx_destroys_an_ephemeral_it_will_not_use() {
        let mut f: Flow<u32> = Flow::new(params(Kx::Hsm, None));
        assert!(matches!(f.poll_action(), Some(Action::Binding { .. })));
        f.handle_binding(Some(([1; 32], fresh(1, false))));
        let Some(Action::Key(KeyJob::KeygenSign { transcript })) = f.poll_action() else {
            panic!()
        };
        let point = Point::new(Group::P256, &[4; 65]).unwrap();
        f.handle_keygen_signed(Ok((point, 42, transcript.digest(), vec![1])));
        let Some(Action::Submit { req, .. }) = f.poll_action() else {
            panic!()
        };
        assert_eq!(req.ephemeral, point);
        // Broken: the ephemeral goes, and a new one is made for the retry.
        f.handle_reply(Err(Failure::Broken));
        assert!(matches!(f.poll_action(), Some(Action::Destroy(42))));
        assert!(matches!(
            f.poll_action(),
            Some(Action::Binding { after: Some(_) })
        ));
        f.handle_binding(Some(([2; 32], fresh(2, false))));
        let Some(Action::Key(KeyJob::KeygenSign { transcript })) = f.poll_action() else {
            panic!()
        };
        f.handle_keygen_signed(Ok((point, 43, transcript.digest(), vec![1])));
        let _ = f.poll_action();
        // A market key of the wrong group: destroyed too, market_internal.
        f.handle_reply(Ok(Accepted {
            session_id: [0; 16],
            ephemeral: Point::new(Group::X25519, &[9; 32]).unwrap(),
            expiry_ms: 0,
            endpoint: String::new(),
        }));
        assert!(matches!(f.poll_action(), Some(Action::Destroy(43))));
        assert!(matches!(
            f.poll_action(),
            Some(Action::Done(Err(ErrorCode::MarketInternal), "hsm"))
        ));
    }

    /// kx=hsm up to the Derive job for ephemeral 44.
    fn to_derive(f: &mut Flow<u32>) {
        let _ = f.poll_action();
        f.handle_binding(Some(([1; 32], fresh(1, false))));
        let Some(Action::Key(KeyJob::KeygenSign { transcript })) = f.poll_action() else {
            panic!()
        };
        let point = Point::new(Group::P256, &[4; 65]).unwrap();
        f.handle_key(Ok(KeyDone::KeygenSigned {
            point,
            private: 44,
            digest: transcript.digest(),
            signature: vec![1],
        }));
        let _ = f.poll_action();
        f.handle_reply(Ok(Accepted {
            session_id: [0; 16],
            ephemeral: point,
            expiry_ms: 0,
            endpoint: String::new(),
        }));
        assert!(matches!(
            f.poll_action(),
            Some(Action::Key(KeyJob::Derive { private: 44, .. }))
        ));
    }

    #[test]
    fn a_derive_that_never_ran_destroys_its_ephemeral_and_one_that_ran_does_not() {
        let mut refused: Flow<u32> = Flow::new(params(Kx::Hsm, None));
        to_derive(&mut refused);
        refused.handle_key_refused(ErrorCode::Busy);
        assert!(matches!(refused.poll_action(), Some(Action::Destroy(44))));
        assert!(matches!(
            refused.poll_action(),
            Some(Action::Done(Err(ErrorCode::Busy), "hsm"))
        ));
        // The job ran and failed: the HSM consumed the ephemeral already.
        let mut failed: Flow<u32> = Flow::new(params(Kx::Hsm, None));
        to_derive(&mut failed);
        failed.handle_key(Err(ErrorCode::HsmUnavailable));
        assert!(matches!(
            failed.poll_action(),
            Some(Action::Done(Err(ErrorCode::HsmUnavailable), "hsm"))
        ));
        assert!(failed.poll_action().is_none());
    }

    #[test]
    fn no_market_no_signature() {
        let mut f: Flow<u32> = Flow::new(params(Kx::Software, None));
        let _ = f.poll_action();
        f.handle_binding(None);
        assert!(matches!(
            f.poll_action(),
            Some(Action::Done(Err(ErrorCode::MarketUnavailable), _))
        ));
        assert!(f.poll_action().is_none());
    }
}
