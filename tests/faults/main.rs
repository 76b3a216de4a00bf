//! Fault tests, run the way an operator would break webhookd: its release
//! binary as a process (`WEBHOOKD_TEST_BIN`, built by scripts/test), a tansu
//! broker in another process (or any Kafka named by `WEBHOOKD_TEST_BOOTSTRAP`),
//! load flowing, receivers on loopback that keep a ledger of every
//! `webhook-id`. Each test prints its figures.

mod bed;
mod crash;
#[allow(dead_code)]
#[path = "../it/helpers.rs"]
mod helpers;
mod hostile;
mod outage;
#[allow(dead_code)] // shared with benches/load.rs, which uses other parts
#[path = "../support/tansu.rs"]
mod tansu;
