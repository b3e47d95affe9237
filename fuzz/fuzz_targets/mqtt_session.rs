//! A whole MQTT connection: a valid CONNECT (3.1.1 or 5.0, picked by the first input
//! byte), then fuzzed bytes, read by the broker in the pieces the input says. Nothing may
//! panic or hang the broker, whatever the packets after CONNECT are.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqgate_mqtt::{MqttConfig, MqttServer};
use mqgate_mqtt_codec::{self as codec, Connect, Packet, Version};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let version = if mode & 1 == 0 {
        Version::V311
    } else {
        Version::V5
    };
    let mut hs = BytesMut::new();
    let connect = Connect {
        version,
        client_id: format!("fuzz-{}", mode >> 2),
        clean_start: mode & 2 == 0,
        keep_alive: 60,
        properties: Default::default(),
        will: None,
        username: None,
        password: None,
    };
    codec::encode(&Packet::Connect(Box::new(connect)), version, &mut hs);
    let chunks = mqgate_fuzz::chunks(rest);
    mqgate_fuzz::session(
        |stream| async move {
            let broker = mqgate_fuzz::broker().await;
            let server = MqttServer::start(broker.clone(), MqttConfig::default())
                .await
                .expect("mqtt");
            server.serve_stream(stream, mqgate_fuzz::peer());
            let stop: mqgate_fuzz::Stop =
                Box::pin(async move { server.shutdown(std::time::Duration::ZERO).await });
            (broker, stop)
        },
        &hs,
        &chunks,
    );
});
