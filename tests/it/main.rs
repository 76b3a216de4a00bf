//! Integration tests: the daemon against a real Kafka-protocol broker, real
//! RocksDB in temp dirs and real HTTP receivers on loopback.

mod delivery;
mod helpers;
mod intake;
mod lifecycle;
mod security;
