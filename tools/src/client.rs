//! `tether-agent request`: one inference request through a broker to an agent, and its reply
//! (MQTT v5 request/response). For trying an agent out, and for smoke tests.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

/// Why no reply came back.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot reach the broker at {0}: {1}")]
    Broker(SocketAddr, String),
    #[error("no reply within {0} ms: is an agent with that device id serving that model there?")]
    Timeout(u128),
}

/// A short-lived command-line client's MQTT v5 options: large packets, no Nagle.
pub fn options(broker: SocketAddr, client_id: String) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(256 << 20));
    o.set_network_options(agent::mqtt::no_delay());
    o
}

/// Publishes `body` to `topic` and waits for the reply on a private topic.
pub async fn request(
    broker: SocketAddr,
    topic: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, RequestError> {
    let id = fastrand::u64(..);
    let (client, mut eventloop) =
        AsyncClient::new(options(broker, format!("tether-request-{id:x}")), 16);
    let reply_topic = format!("tether-request/{id:x}");
    let work = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(reply_topic.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| RequestError::Broker(broker, e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let props = PublishProperties {
                        response_topic: Some(reply_topic.clone()),
                        correlation_data: Some(id.to_le_bytes().to_vec().into()),
                        ..Default::default()
                    };
                    client
                        .publish_with_properties(
                            topic,
                            QoS::AtLeastOnce,
                            false,
                            body.clone(),
                            props,
                        )
                        .await
                        .map_err(|e| RequestError::Broker(broker, e.to_string()))?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => return Ok(p.payload.to_vec()),
                Ok(_) => {}
                Err(e) => return Err(RequestError::Broker(broker, e.to_string())),
            }
        }
    };
    let reply = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RequestError::Timeout(timeout.as_millis()))?;
    let _ = client.try_disconnect();
    reply
}
