//! AMQP queues over the core: a queue is a core topic with one queue (its log), consumed
//! by a group of the same name. Every queue's declaration is a record in the keyed
//! area ([`NS_QUEUE`]), kept with its topic (in a cluster, in the topic's shard, where
//! every gateway finds it); transient queues are dropped at restart.

use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::{BufMut, Bytes, BytesMut};
use mqgate_store::{GroupName, TopicName};
use parking_lot::Mutex;

use crate::config::RetryPolicy;
use crate::convert::{int_value, str_value};
use crate::reply;
use mqgate_core::{ConsumeMode, DeadLetter, GroupSpec, OnFailure, Policy, StartPosition};

/// Keyed-area namespace of durable queue declarations (key: `vhost \0 name`).
pub const NS_QUEUE: &str = "amqp.queue";
/// Prefix of queue topics and groups.
pub const QUEUE_PREFIX: &str = "%AMQP%";

/// The topic (and group) name of queue `name` in `vhost`: `%AMQP%<vhost>/<name>` with
/// `%` and `/` of the vhost escaped, so names never collide.
pub fn queue_topic(vhost: &str, name: &str) -> (TopicName, GroupName) {
    let v = vhost.replace('%', "%25").replace('/', "%2F");
    let s = format!("{QUEUE_PREFIX}{v}/{name}");
    (
        TopicName::new(&s).expect("short strings fit"),
        GroupName::new(&s).expect("short strings fit"),
    )
}

/// What happens to a publish to a full queue (`x-overflow`): the core's.
pub use mqgate_core::endpoint::Overflow;

/// The queue arguments mqgate acts on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueArgs {
    /// `x-message-ttl` (ms).
    pub message_ttl: Option<u64>,
    /// `x-expires` (ms unused before the queue is deleted).
    pub expires: Option<u64>,
    /// `x-max-length`.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Option<Overflow>,
    /// `x-dead-letter-exchange`.
    pub dlx: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dlrk: Option<String>,
    /// `x-single-active-consumer`.
    pub single_active: bool,
    /// `x-delivery-limit`.
    pub delivery_limit: Option<u32>,
    /// `x-queue-type: stream`: consumers read the log from `x-stream-offset`,
    /// acknowledgements do not remove anything.
    pub stream: bool,
    /// `x-retry-policy` (or the broker default).
    pub retry: Option<RetryPolicy>,
    /// `x-orderly: true`: per-key strict order with competing consumers (RocketMQ's
    /// orderly consumption). The queue is `x-queues` logs (default
    /// [`ORDERLY_QUEUES`]); a message goes to the log of its `x-sharding-key` header
    /// (none: the exchange it was published to is its key); the consumers split the
    /// logs, and each log has one message in flight at a time, retried in place when it
    /// fails.
    pub orderly: bool,
    /// `x-queues`: how many logs an orderly queue has.
    pub queues: Option<u32>,
}

/// The logs of an orderly queue when `x-queues` is not given.
pub const ORDERLY_QUEUES: u32 = 16;
/// The most logs an orderly queue may have.
pub const MAX_ORDERLY_QUEUES: u32 = 1024;

/// A channel exception from declaring: code and text.
pub type ArgError = (u16, String);

impl QueueArgs {
    /// Read and check the arguments of queue.declare.
    pub fn parse(args: &FieldTable, default_retry: Option<RetryPolicy>) -> Result<Self, ArgError> {
        let mut a = QueueArgs {
            retry: default_retry,
            ..Default::default()
        };
        let bad = |k: &str, why: &str| {
            (
                reply::PRECONDITION_FAILED,
                format!("invalid arg '{k}': {why}"),
            )
        };
        let non_neg = |k: &str, v: &AMQPValue| -> Result<u64, ArgError> {
            match int_value(v) {
                Some(n) if n >= 0 => Ok(n as u64),
                _ => Err(bad(k, "must be a non-negative integer")),
            }
        };
        for (k, v) in args {
            let k = k.as_str();
            match k {
                "x-message-ttl" => a.message_ttl = Some(non_neg(k, v)?),
                "x-expires" => match int_value(v) {
                    Some(n) if n > 0 => a.expires = Some(n as u64),
                    _ => return Err(bad(k, "must be a positive integer")),
                },
                "x-max-length" => a.max_length = Some(non_neg(k, v)?),
                "x-max-length-bytes" => a.max_length_bytes = Some(non_neg(k, v)?),
                "x-overflow" => {
                    a.overflow = Some(match str_value(v).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => {
                            return Err(bad(
                                k,
                                "must be drop-head, reject-publish or reject-publish-dlx",
                            ))
                        }
                    })
                }
                "x-dead-letter-exchange" => {
                    a.dlx = Some(str_value(v).ok_or_else(|| bad(k, "must be a string"))?)
                }
                "x-dead-letter-routing-key" => {
                    a.dlrk = Some(str_value(v).ok_or_else(|| bad(k, "must be a string"))?)
                }
                "x-single-active-consumer" => {
                    a.single_active = v.as_bool().ok_or_else(|| bad(k, "must be a boolean"))?
                }
                "x-delivery-limit" => {
                    a.delivery_limit = Some(non_neg(k, v)?.min(u32::MAX as u64) as u32)
                }
                "x-queue-type" => match str_value(v).as_deref() {
                    Some("classic") | Some("quorum") => {}
                    Some("stream") => a.stream = true,
                    _ => return Err(bad(k, "must be classic, quorum or stream")),
                },
                "x-retry-policy" => match str_value(v).as_deref() {
                    Some("none") | Some("amqp") => a.retry = None,
                    Some(s) => {
                        a.retry = Some(
                            RetryPolicy::parse(s)
                                .ok_or_else(|| bad(k, "must be rocketmq or none"))?,
                        )
                    }
                    None => return Err(bad(k, "must be a string")),
                },
                "x-orderly" => {
                    a.orderly = v.as_bool().ok_or_else(|| bad(k, "must be a boolean"))?
                }
                "x-queues" => match int_value(v) {
                    Some(n) if (1..=i64::from(MAX_ORDERLY_QUEUES)).contains(&n) => {
                        a.queues = Some(n as u32)
                    }
                    _ => return Err(bad(k, "must be an integer from 1 to 1024")),
                },
                "x-max-priority" => {
                    return Err((
                        reply::PRECONDITION_FAILED,
                        "invalid arg 'x-max-priority': mqgate queues are logs delivered in \
                         publish order; priority queues are not supported (use one queue per \
                         priority)"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        if a.queues.is_some() && !a.orderly {
            return Err(bad(
                "x-queues",
                "only an orderly queue (x-orderly: true) has several",
            ));
        }
        if a.orderly && (a.single_active || a.stream) {
            return Err(bad(
                "x-orderly",
                "cannot be combined with x-single-active-consumer or a stream",
            ));
        }
        if a.dlrk.is_some() && a.dlx.is_none() {
            return Err(bad(
                "x-dead-letter-routing-key",
                "x-dead-letter-exchange is not set",
            ));
        }
        Ok(a)
    }
}

/// A declaration record, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueRecord {
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Survives restarts.
    pub durable: bool,
    /// The exclusive owner: (adapter incarnation, connection id).
    pub exclusive: Option<(u64, u64)>,
    /// The gateway run a transient queue dies with (written since runs have names).
    pub owner: Option<mqgate_core::Run>,
    /// The arguments as sent.
    pub args: FieldTable,
}

/// The owner of an exclusive queue declared by a connection of another gateway (or of
/// this one before it restarted): no connection here (their ids start at 1).
pub const FOREIGN_OWNER: u64 = 0;

/// The core's view of AMQP queues: a queue's declaration record back into the endpoint
/// it is (managed on the gateway owning the queue's shard).
#[derive(Debug)]
pub struct QueueKind {
    /// The broker's `default_retry_policy`.
    pub default_retry: Option<RetryPolicy>,
}

impl mqgate_core::EndpointKind for QueueKind {
    fn namespace(&self) -> &str {
        NS_QUEUE
    }

    fn endpoint(&self, key: &[u8], value: &[u8]) -> Option<mqgate_core::Endpoint> {
        let mut e = Queue::from_record(key, value, self.default_retry, 0)?.endpoint();
        // A transient queue dies with the gateway run that declared it: the core
        // deletes it once that run is gone (a cluster's gateway killed).
        e.owner = Queue::decode_record(value)?.owner;
        Some(e)
    }
}

/// A declared queue.
#[derive(Debug)]
pub struct Queue {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// Its core topic.
    pub topic: TopicName,
    /// Its core group.
    pub group: GroupName,
    /// Survives restarts.
    pub durable: bool,
    /// The connection owning it, if exclusive.
    pub exclusive: Option<u64>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The declare arguments as sent (for equivalence checks).
    pub raw_args: FieldTable,
    /// What mqgate does with them.
    pub args: QueueArgs,
    /// What changes while it lives.
    pub state: Mutex<QueueState>,
}

/// A queue's changing state.
#[derive(Debug, Default)]
pub struct QueueState {
    /// Consumers now.
    pub consumers: usize,
    /// It had a consumer once (auto-delete applies from then).
    pub had_consumer: bool,
    /// An exclusive consumer holds it.
    pub exclusive_consumer: bool,
    /// Deleted: handles still held see this.
    pub deleted: bool,
    /// In a cluster, an auto-delete queue's consumers of this gateway that went: each
    /// resolves once its member has left the group (the last one's deletion waits for
    /// them all before it asks the group whether any consumer is left).
    pub leaving: Leaving,
}

/// Futures resolving once departed consumers' members have left their group.
#[derive(Default)]
pub struct Leaving(pub Vec<mqgate_core::Left>);

impl std::fmt::Debug for Leaving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leaving({})", self.0.len())
    }
}

impl Queue {
    /// The core group consuming it, with the policies its arguments declare: TTL,
    /// delivery limit, retry ladder, dead-letter exchange (applied by the core).
    pub fn spec(&self) -> GroupSpec {
        let mode = if self.args.single_active || self.args.orderly {
            ConsumeMode::Clustering
        } else {
            ConsumeMode::Shared
        };
        let mut spec = GroupSpec::new(self.group.clone(), vec![self.topic.clone()], mode);
        spec.start = StartPosition::First;
        spec.orderly = self.args.orderly;
        spec.on_failure = match self.args.retry {
            Some(RetryPolicy::RocketMq) => OnFailure::Retry,
            None => OnFailure::Discard,
        };
        // x-delivery-limit L: L failures are retried (or requeued), the next ends it:
        // L + 1 deliveries in all, as RabbitMQ counts; no limit: the configured ladder.
        spec.max_reconsume_times = self.args.delivery_limit;
        spec.policy = Policy {
            message_ttl: self.args.message_ttl,
            delivery_limit: self.args.delivery_limit,
            dead_letter: self.args.dlx.as_ref().map(|dlx| {
                Box::new(DeadLetter {
                    vhost: self.vhost.clone(),
                    exchange: dlx.clone(),
                    routing_key: self.args.dlrk.clone(),
                    endpoint: self.name.clone(),
                    format: std::sync::Arc::new(crate::convert::AmqpDeadLetter),
                })
            }),
            max_length: self.args.max_length,
            max_length_bytes: self.args.max_length_bytes,
            overflow: self.args.overflow.unwrap_or_default(),
        };
        spec
    }

    /// The endpoint the core manages for it: its group and policies, its bindings'
    /// vhost, its record, and its `x-expires` (deleted by the core once unused that long).
    pub fn endpoint(&self) -> mqgate_core::Endpoint {
        mqgate_core::Endpoint {
            spec: self.spec(),
            vhost: self.vhost.clone(),
            records: vec![(
                NS_QUEUE.to_owned(),
                Bytes::from(Self::key(&self.vhost, &self.name)),
            )],
            idle_expiry: self.args.expires,
            owner: None,
        }
    }

    /// Its number of logs (one, or an orderly queue's `x-queues`).
    pub fn queue_count(&self) -> u32 {
        match self.args.orderly {
            true => self.args.queues.unwrap_or(ORDERLY_QUEUES),
            false => 1,
        }
    }

    /// Whether it survives a restart: durable and not exclusive (an exclusive queue
    /// dies with its connection). Every queue has a record (other gateways of a cluster
    /// find it there); a transient one's is dropped at restart.
    pub fn persistent(&self) -> bool {
        self.durable && self.exclusive.is_none()
    }

    /// Encode the declaration (version 2): flags (auto-delete 1, durable 2, exclusive
    /// 4, owner run 8), the exclusive owner (the declaring run's id and connection id,
    /// u64 each) when exclusive, the declaring run (its node's name, u16 length first,
    /// and its id, u64) when transient, then the arguments as sent.
    pub fn record(&self, run: &mqgate_core::Run) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(2);
        let owned = !self.persistent();
        let flags = u8::from(self.auto_delete)
            | (u8::from(self.durable) << 1)
            | (u8::from(self.exclusive.is_some()) << 2)
            | (u8::from(owned) << 3);
        b.put_u8(flags);
        if let Some(conn) = self.exclusive {
            b.put_u64(run.id);
            b.put_u64(conn);
        }
        if owned {
            let node = &run.node.as_bytes()[..run.node.len().min(usize::from(u16::MAX))];
            b.put_u16(node.len() as u16);
            b.put_slice(node);
            b.put_u64(run.id);
        }
        let (args, _) = cookie_factory::gen(
            amq_protocol::types::generation::gen_field_table(&self.raw_args),
            Vec::new(),
        )
        .expect("writing to a Vec cannot fail");
        b.put_slice(&args);
        b.freeze()
    }

    /// Decode a declaration (version 1, written before transient queues had records,
    /// is a durable one).
    pub fn decode_record(b: &[u8]) -> Option<QueueRecord> {
        let (flags, rest) = match b {
            [1, auto_delete, rest @ ..] if *auto_delete <= 1 => (*auto_delete | 2, rest),
            [2, flags, rest @ ..] if *flags < 16 => (*flags, rest),
            _ => return None,
        };
        let (exclusive, rest) = if flags & 4 != 0 {
            if rest.len() < 16 {
                return None;
            }
            let (owner, rest) = rest.split_at(16);
            let incarnation = u64::from_be_bytes(owner[..8].try_into().ok()?);
            let conn = u64::from_be_bytes(owner[8..].try_into().ok()?);
            (Some((incarnation, conn)), rest)
        } else {
            (None, rest)
        };
        let (owner, rest) = if flags & 8 != 0 {
            let len = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
            let node = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
            let id = u64::from_be_bytes(rest.get(2 + len..10 + len)?.try_into().ok()?);
            (
                Some(mqgate_core::Run {
                    node: node.to_owned(),
                    id,
                }),
                &rest[10 + len..],
            )
        } else {
            (None, rest)
        };
        let (left, args) = amq_protocol::types::parsing::parse_field_table(rest).ok()?;
        left.is_empty().then_some(QueueRecord {
            auto_delete: flags & 1 != 0,
            durable: flags & 2 != 0,
            exclusive,
            owner,
            args,
        })
    }

    /// The queue record `key` → `value` declares, as the adapter of `incarnation`
    /// holds it: an exclusive queue of another adapter (another gateway, or this one
    /// before a restart) is locked to every connection here.
    pub fn from_record(
        key: &[u8],
        value: &[u8],
        default_retry: Option<RetryPolicy>,
        incarnation: u64,
    ) -> Option<Self> {
        let (vhost, name) = std::str::from_utf8(key).ok()?.split_once('\0')?;
        let r = Self::decode_record(value)?;
        let args = QueueArgs::parse(&r.args, default_retry).unwrap_or_default();
        let (topic, group) = queue_topic(vhost, name);
        Some(Queue {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            topic,
            group,
            durable: r.durable,
            exclusive: r.exclusive.map(|(inc, conn)| {
                if inc == incarnation {
                    conn
                } else {
                    FOREIGN_OWNER
                }
            }),
            auto_delete: r.auto_delete,
            raw_args: r.args,
            args,
            state: Mutex::default(),
        })
    }

    /// The record key.
    pub fn key(vhost: &str, name: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(vhost.len() + name.len() + 1);
        k.extend_from_slice(vhost.as_bytes());
        k.push(0);
        k.extend_from_slice(name.as_bytes());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_do_not_collide() {
        assert_ne!(queue_topic("a/b", "c").0, queue_topic("a", "b/c").0);
        assert_ne!(queue_topic("a%2Fb", "c").0, queue_topic("a/b", "c").0);
    }

    #[test]
    fn record_round_trip() {
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(5000));
        let (topic, group) = queue_topic("/", "q");
        let q = Queue {
            vhost: "/".into(),
            name: "q".into(),
            topic,
            group,
            durable: true,
            exclusive: None,
            auto_delete: true,
            raw_args: t.clone(),
            args: QueueArgs::parse(&t, None).unwrap(),
            state: Mutex::default(),
        };
        let want = QueueRecord {
            auto_delete: true,
            durable: true,
            exclusive: None,
            owner: None,
            args: t.clone(),
        };
        let run = |id| mqgate_core::Run {
            node: "gw1".into(),
            id,
        };
        assert_eq!(Queue::decode_record(&q.record(&run(7))), Some(want.clone()));
        // Version 1 (durable queues only) still reads.
        let mut v1 = vec![1u8, 1];
        v1.extend_from_slice(&q.record(&run(7))[2..]);
        assert_eq!(Queue::decode_record(&v1), Some(want));
        // An exclusive queue is this adapter's connection's, another's nobody's here.
        let durable_rec = q.record(&run(7));
        let ex = Queue {
            exclusive: Some(5),
            durable: false,
            ..q
        };
        let rec = ex.record(&run(7));
        let key = Queue::key("/", "q");
        // A transient queue names the run it dies with.
        assert_eq!(Queue::decode_record(&rec).unwrap().owner, Some(run(7)));
        let kind = QueueKind {
            default_retry: None,
        };
        use mqgate_core::EndpointKind;
        assert_eq!(kind.endpoint(&key, &rec).unwrap().owner, Some(run(7)));
        assert_eq!(
            kind.endpoint(&key, &durable_rec).unwrap().owner,
            None,
            "a durable queue outlives its declarer"
        );
        // Written before runs had names (exclusive, no owner run): still reads.
        let mut old = rec.to_vec();
        old[1] &= !8;
        let name_len = 2 + 3 + 8;
        old.drain(2 + 16..2 + 16 + name_len);
        let r = Queue::decode_record(&old).unwrap();
        assert_eq!((r.exclusive, r.owner), (Some((7, 5)), None));
        assert_eq!(
            Queue::from_record(&key, &rec, None, 7).unwrap().exclusive,
            Some(5)
        );
        assert_eq!(
            Queue::from_record(&key, &rec, None, 8).unwrap().exclusive,
            Some(FOREIGN_OWNER)
        );
        assert!(!Queue::from_record(&key, &rec, None, 7).unwrap().durable);
        for cut in 0..rec.len() {
            assert!(Queue::decode_record(&rec[..cut]).is_none(), "cut at {cut}");
        }
    }
}
