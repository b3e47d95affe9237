//! Several shard stores in one process (issue 16): one block cache and one memtable
//! budget for all of them, ids that name their shard, each store its own folder.

use bytes::Bytes;
use mqgate_store::{
    Message, MessageId, QueueRef, RocksConfig, RocksStore, SharedResources, Store, StoreExt,
    TopicName,
};

fn shard_config(dir: &std::path::Path, shard: u64, shared: &SharedResources) -> RocksConfig {
    let mut c = RocksConfig::new(dir.join(format!("s{shard:02}")));
    c.id_base = shard << 44;
    c.shared = Some(shared.clone());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_stores_share_one_budget_and_keep_their_ids_apart() {
    let dir = tempfile::tempdir().unwrap();
    let shared = SharedResources::new(8 << 20, 16 << 20);
    assert_eq!(shared.write_buffer_usage(), 0);
    let stores: Vec<RocksStore> = (0..3)
        .map(|n| RocksStore::open(shard_config(dir.path(), n, &shared)).unwrap())
        .collect();
    let topic = |n: usize| TopicName::new(format!("t{n}")).unwrap();
    let mut ids = Vec::new();
    for (n, s) in stores.iter().enumerate() {
        s.create_topic(&topic(n), 1).await.unwrap();
        for i in 0..100 {
            let m = Message::new(topic(n), Bytes::from(vec![i as u8; 1024]));
            let id = s
                .append(m, vec![QueueRef::new(topic(n), 0)])
                .await
                .unwrap()
                .id;
            assert_eq!(id.0 >> 44, n as u64, "an id names its shard");
            ids.push((n, id));
        }
    }
    // The memtables of all three count against the one budget.
    assert!(
        shared.write_buffer_usage() >= 300 * 1024,
        "shared memtables hold {} bytes",
        shared.write_buffer_usage()
    );
    for (n, id) in &ids {
        let found = stores[*n]
            .message(*id)
            .await
            .unwrap()
            .expect("in its shard");
        assert_eq!(found.message.topic, topic(*n));
        for (m, other) in stores.iter().enumerate() {
            if m != *n {
                assert!(other.message(*id).await.unwrap().is_none());
            }
        }
    }
    // Reopened with the same resources, each shard goes on from its own ids.
    drop(stores);
    let s1 = RocksStore::open(shard_config(dir.path(), 1, &shared)).unwrap();
    let next = s1
        .append(
            Message::new(topic(1), Bytes::new()),
            vec![QueueRef::new(topic(1), 0)],
        )
        .await
        .unwrap()
        .id;
    let last = ids
        .iter()
        .filter(|(n, _)| *n == 1)
        .map(|(_, id)| *id)
        .max()
        .unwrap();
    assert_eq!(next, MessageId(last.0 + 1));
}
