//! MQTT over TLS: `mqtts://` with `mqtt.ca_file`, through the bridge's own
//! client and the rustls set-up it shares with sync, against mosquitto's
//! TLS listener (certificates made with the openssl CLI). Devices publish
//! on the broker's plain listener.

mod common;

use std::path::Path;

use common::broker::{free_port, Broker};
use common::*;
use paho_mqtt as paho;

/// A broker with a TLS listener besides its plain one; its port.
fn tls_broker(dir: &Path) -> (Broker, u16) {
    make_pki(dir);
    let port = free_port();
    let p = |f: &str| dir.join(f).display().to_string();
    let broker = Broker::start_with(
        dir,
        &format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        ),
    );
    (broker, port)
}

fn config(dir: &Path, port: u16, ca: &Path) {
    write_config(
        dir,
        &format!(
            "mqtt:\n  enabled: true\n  broker: mqtts://localhost:{port}\n  client_id: edge-tls\n  \
             qos: 1\n  ca_file: {}\n",
            ca.display()
        ),
    );
}

#[test]
fn mqtts_with_a_ca_file_connects_and_ingests() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, port) = tls_broker(dir.path());
    config(dir.path(), port, &dir.path().join("ca.pem"));
    let d = Daemon::start(dir.path());
    d.wait_log(|l| l.contains("mqtt::bridge: connected to mqtts://localhost"))
        .expect("the daemon connects over TLS");

    let cli = paho::AsyncClient::new(broker.url()).unwrap();
    cli.connect(None)
        .wait_for(DEADLINE)
        .expect("device connects");
    cli.publish(paho::Message::new(
        "devices/tls-1/register",
        r#"{"type":"sensor"}"#,
        1,
    ))
    .wait_for(DEADLINE)
    .expect("the broker took the registration");
    eventually("the registration to arrive over TLS", || {
        d.get("/v1/edge/devices/tls-1").status == 200
    });
}

#[test]
fn a_broker_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, port) = tls_broker(dir.path());
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path());
    config(dir.path(), port, &other.path().join("ca.pem"));
    let d = Daemon::start(dir.path());
    let line = d
        .wait_log(|l| l.contains("cannot connect"))
        .expect("the daemon says why it cannot connect");
    assert!(line.contains("TLS handshake failed"), "{line}");
}
