//! The embedded broker: librdkafka's in-process mock cluster, for the quick
//! start and for tests. It speaks the real Kafka protocol on loopback, so any
//! Kafka client can publish to it, but it keeps nothing: its topics live in
//! this process's memory and are gone when webhookd stops.
//!
//! The mock cluster handle is not `Send`, so it lives on its own thread for as
//! long as this value lives.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;

pub struct EmbeddedBroker {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster with `topics`, each with `partitions` partitions.
    pub fn start(topics: &[String], partitions: i32) -> Result<EmbeddedBroker, KafkaError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let topics = topics.to_vec();
        let thread = std::thread::Builder::new()
            .name("webhookd-embedded-kafka".into())
            .spawn(move || {
                let started = MockCluster::new(1).and_then(|mock| {
                    for t in &topics {
                        mock.create_topic(t, partitions, 1)?;
                    }
                    Ok(mock)
                });
                match started {
                    Ok(mock) => {
                        let _ = ready_tx.send(Ok(mock.bootstrap_servers()));
                        // Hold the cluster until asked to stop (or the owner is gone).
                        let _ = stop_rx.recv();
                        drop(mock);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let bootstrap =
            ready_rx.recv().map_err(|_| KafkaError::ClientCreation("embedded broker thread died".into()))??;
        Ok(EmbeddedBroker { bootstrap, stop: Some(stop_tx), thread: Some(thread) })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
