//! Integration tests: the daemon against a real Kafka-protocol broker, real
//! RocksDB in temp dirs and real HTTP receivers on loopback.

mod delivery;
#[allow(dead_code)] // shared with tests/faults, which uses other parts
mod helpers;
mod intake;
mod lifecycle;
mod operate;
mod security;
