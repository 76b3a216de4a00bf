//! webhookd turns events on Kafka topics into signed HTTP webhook deliveries.
//!
//! # Layout
//!
//! An event travels through the modules in this order:
//!
//! 1. [`source`]: the Kafka consumer group. Batches messages, commits offsets
//!    only up to what is settled ([`source::offsets`]); [`source::embedded`]
//!    is the in-process broker of the quick start.
//! 2. [`event`]: decodes the envelope (`id`, `type`, `locationId`,
//!    `timestamp`); bad messages go to [`dead_letter`].
//! 3. [`route`]: which enabled endpoints subscribe to the event.
//! 4. [`store`]: RocksDB. Dedup key and one delivery per endpoint in one
//!    atomic write: the outbox. Also the retry schedule, dead-letter index and
//!    endpoint state.
//! 5. [`deliver`]: one worker per endpoint, with its rate limit and in-flight
//!    cap; [`deliver::sign`] signs, [`deliver::client`] sends within the
//!    attempt budget through [`deliver::guard`] (the SSRF guard),
//!    [`deliver::outcome`] classifies the answer.
//! 6. [`retry`]: backoff policy; [`schedule`] brings due retries back.
//! 7. [`dead_letter`]: the dead-letter topic and its record format.
//!
//! Around them: [`config`] (typed, validated configuration), [`telemetry`]
//! (metrics catalogue, admin listener, logs), [`manage`] (the management API
//! and the operator commands that call it), [`redact`] (URLs printed
//! without credentials), and [`app`], which wires the stages together and
//! owns shutdown.

pub mod app;
pub mod config;
pub mod dead_letter;
pub mod deliver;
pub mod demo;
pub mod event;
pub mod manage;
pub mod redact;
pub mod retry;
pub mod route;
pub mod schedule;
pub mod source;
pub mod store;
pub mod telemetry;
