//! keybroker: a key-brokering appliance between user terminals and
//! electronic markets.
//!
//! ```text
//! terminal ──access channel (TLS 1.3, X')──► broker ──market channel──► market
//!     └──────────────direct channel (keyed from X)─────────────────────►┘
//! ```
//!
//! `proto` is the sans-IO core; `broker` and `terminal` drive it over
//! sockets; `hsm` is the home card; `store` the registry; `enroll` the
//! enrolment commands.

pub mod admin;
pub mod backup;
pub mod broker;
pub mod cancel_auth;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod enroll;
pub mod exchange;
pub mod fsmode;
pub mod hsm;
pub mod limits;
pub mod logs;
pub mod market;
pub mod metrics;
pub mod net;
pub mod passwords;
pub mod pki;
pub mod pool;
pub mod proto;
pub mod receipt;
pub mod rowmac;
pub mod service;
pub mod status;
pub mod store;
pub mod syntax;
pub mod terminal;
pub mod wallet;
