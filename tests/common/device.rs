//! A simulated device: a paho client on the test's broker that publishes
//! on `devices/...` and reads the daemon's answers.

use std::time::Instant;

use paho_mqtt as paho;
use serde_json::Value;

use super::broker::Broker;
use super::DEADLINE;

pub struct Device {
    pub cli: paho::Client,
    pub rx: paho::SyncReceiver<Option<paho::Message>>,
}

impl Device {
    pub fn connect(broker: &Broker, id: &str, subscribe: &[&str]) -> Device {
        let cli = paho::Client::new(
            paho::CreateOptionsBuilder::new()
                .server_uri(broker.url())
                .client_id(id)
                .persistence(paho::PersistenceType::None)
                .finalize(),
        )
        .unwrap();
        let rx = cli.start_consuming();
        cli.connect(
            paho::ConnectOptionsBuilder::new_v3()
                .clean_session(true)
                .connect_timeout(DEADLINE)
                .finalize(),
        )
        .expect("device connects");
        for t in subscribe {
            cli.subscribe(t, 1).unwrap();
        }
        Device { cli, rx }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: i32) {
        self.cli
            .publish(paho::Message::new(topic, payload.into(), qos))
            .expect("publish");
    }

    /// The next message on `topic` (others are skipped), as JSON (a
    /// payload that is not JSON as a string).
    pub fn expect(&self, topic: &str) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("nothing on {topic} within {DEADLINE:?}"));
            match self.rx.recv_timeout(left) {
                Ok(Some(m)) if m.topic() == topic => {
                    return serde_json::from_slice(m.payload()).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(m.payload()).into())
                    })
                }
                Ok(_) => continue,
                Err(_) => panic!("nothing on {topic} within {DEADLINE:?}"),
            }
        }
    }
}
