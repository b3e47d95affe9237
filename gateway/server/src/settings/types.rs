//! The typed values settings are read into: durations, listener addresses, the memory
//! watermark, keywords, password hashes and regular expressions. Each parses its text
//! once, in its `Deserialize`; a bad value fails with an [`Invalid`] that `load` turns
//! into `config: <key> = "<value>": <why>`.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use mqgate_core::Password;
use serde::{Deserialize, Deserializer};

/// A value that does not parse: its text and why. It travels through the `config`
/// crate's error as a message (the only kind of error a `Deserialize` can make), in a
/// form [`Invalid::decode`] reads back; `config` adds the key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// Appended to the key where the error arises ("access" under `mqtt.acl[0]`), or "".
    pub(crate) field: String,
    /// The value as written.
    pub(crate) value: String,
    /// Why it is refused.
    pub(crate) why: String,
}

/// Starts an encoded [`Invalid`] (JSON after it).
const TAG: char = '\u{1}';

impl Invalid {
    pub(crate) fn new(value: impl fmt::Display, why: impl Into<String>) -> Self {
        Self {
            field: String::new(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    /// The same error about `field` of the value being deserialized.
    pub(crate) fn at(mut self, field: &str) -> Self {
        self.field = field.to_owned();
        self
    }

    /// As a deserializer's error.
    pub(crate) fn into_de<E: serde::de::Error>(self) -> E {
        E::custom(self)
    }

    /// Read back what [`Display`](fmt::Display) wrote.
    pub(crate) fn decode(msg: &str) -> Option<Self> {
        let json = msg.strip_prefix(TAG)?;
        let (field, value, why) = serde_json::from_str(json).ok()?;
        Some(Self { field, value, why })
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&(&self.field, &self.value, &self.why))
            .map_err(|_| fmt::Error)?;
        write!(f, "{TAG}{json}")
    }
}

/// The text of a value. `config` hands numbers and booleans over as their text, so
/// `memory_high_watermark = 0.4` reads as "0.4" (and an environment variable's `100`
/// as "100"), as it did when these settings were strings.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d)
}

/// Parse "250ms", "10s", "5m", "2h", "1d" (a whole number and a unit).
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => None,
    }
}

/// The inverse of [`parse_duration`], in the largest exact unit.
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Why a duration is refused.
pub(crate) const DURATION_WHY: &str = "must be a duration such as 250ms, 10s, 5m, 2h or 1d";

/// A duration written "250ms", "10s", "5m", "2h" or "1d".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub(crate) Duration);

impl HumanDuration {
    pub(crate) const fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub(crate) const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    /// As a [`Duration`].
    pub(crate) fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = text(d)?;
        parse_duration(&s)
            .map(Self)
            .ok_or_else(|| Invalid::new(&s, DURATION_WHY).into_de())
    }
}

/// A duration, or "" for none (`store.retention_max_age`).
pub(crate) fn duration_or_none<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<HumanDuration>, D::Error> {
    let s = text(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    parse_duration(&s)
        .map(|d| Some(HumanDuration(d)))
        .ok_or_else(|| Invalid::new(&s, "must be a duration such as 72h, or \"\"").into_de())
}

/// Where a listener binds: host:port, or "" for off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Listener(pub(crate) Option<SocketAddr>);

impl Listener {
    /// Bound to `addr`.
    pub(crate) fn on(addr: impl Into<SocketAddr>) -> Self {
        Self(Some(addr.into()))
    }

    /// Turned off ("").
    pub(crate) const OFF: Self = Self(None);

    /// Whether it is on.
    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Its address (`None`: off).
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        self.0
    }
}

impl From<SocketAddr> for Listener {
    fn from(a: SocketAddr) -> Self {
        Self(Some(a))
    }
}

/// Its address, or "off".
impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("off"),
        }
    }
}

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = text(d)?;
        if s.is_empty() {
            return Ok(Self::OFF);
        }
        s.parse().map(|a| Self(Some(a))).map_err(|_| {
            Invalid::new(
                &s,
                "must be host:port (an IP address and a port), or \"\" to turn it off",
            )
            .into_de()
        })
    }
}

/// `limits.memory_high_watermark`: off ("" or "0"), bytes, or a fraction of the
/// machine's memory below 1 ("0.4").
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum MemoryWatermark {
    /// No watermark.
    Off,
    /// This many bytes.
    Bytes(u64),
    /// This fraction (in (0, 1)) of the machine's memory.
    Fraction(f64),
}

/// Why a memory watermark is refused.
pub(crate) const WATERMARK_WHY: &str = "must be bytes, or a fraction of memory below 1 such as 0.4";

impl MemoryWatermark {
    /// In bytes (`Some(None)`: off), a fraction taken of `total` memory; `None` when a
    /// fraction is given and `total` is unknown.
    pub(crate) fn bytes(self, total: impl FnOnce() -> Option<u64>) -> Option<Option<u64>> {
        match self {
            Self::Off => Some(None),
            Self::Bytes(b) => Some(Some(b)),
            Self::Fraction(f) => total().map(|t| Some((t as f64 * f) as u64)),
        }
    }
}

impl fmt::Display for MemoryWatermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("0"),
            Self::Bytes(b) => write!(f, "{b}"),
            Self::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryWatermark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = text(d)?;
        let v = s.trim();
        if v.is_empty() || v == "0" {
            return Ok(Self::Off);
        }
        let err = || Invalid::new(v, WATERMARK_WHY).into_de();
        let f: f64 = v.parse().map_err(|_| err())?;
        if f <= 0.0 {
            return Err(err());
        }
        Ok(if f < 1.0 {
            Self::Fraction(f)
        } else {
            Self::Bytes(f as u64)
        })
    }
}

/// An enum of keywords, each with its one spelling, and a `Deserialize` refusing any
/// other word with `$why`.
macro_rules! keywords {
    ($(#[$meta:meta])* $name:ident, $why:literal {
        $($(#[$vmeta:meta])* $variant:ident = $spelling:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Its spelling in the configuration.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $spelling,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = text(d)?;
                match s.as_str() {
                    $($spelling => Ok(Self::$variant),)+
                    _ => Err(Invalid::new(&s, $why).into_de()),
                }
            }
        }
    };
}

keywords! {
    /// `store.backend`.
    Backend, "must be rocksdb, jetstream or memory" {
        /// RocksDB in `store.path`.
        Rocksdb = "rocksdb",
        /// A log replicated on NATS JetStream (`[store.jetstream]`), RocksDB in
        /// `store.path` as this node's view of it.
        Jetstream = "jetstream",
        /// In memory: nothing survives a restart.
        Memory = "memory",
    }
}

keywords! {
    /// `store.fsync`.
    Fsync, "must be every-batch or periodic" {
        /// A confirmed write survives power loss.
        EveryBatch = "every-batch",
        /// Confirmed once in the OS; fsync every `store.fsync_interval`.
        Periodic = "periodic",
    }
}

keywords! {
    /// `runtime.scheduler`.
    #[derive(Default)]
    Scheduler, "must be per-core or work-stealing" {
        /// One single-threaded runtime per worker; each connection runs on the one with
        /// the fewest open connections, from start to end.
        #[default]
        PerCore = "per-core",
        /// One runtime whose workers steal each other's tasks.
        WorkStealing = "work-stealing",
    }
}

keywords! {
    /// `mqtt.acl[].access`.
    AclAccess, "must be publish, subscribe or all" {
        /// PUBLISH (and wills); AMQP basic.publish.
        Publish = "publish",
        /// SUBSCRIBE and each delivery; AMQP bindings.
        Subscribe = "subscribe",
        /// Both.
        All = "all",
    }
}

keywords! {
    /// `mqtt.acl_default`.
    AclFallback, "must be allow or deny" {
        /// Allowed.
        Allow = "allow",
        /// Denied.
        Deny = "deny",
    }
}

keywords! {
    /// `retry.amqp_default_policy`.
    AmqpRetryPolicy, "must be none or rocketmq" {
        /// RabbitMQ's behaviour (reject drops or dead-letters).
        None = "none",
        /// RocketMQ's retry ladder.
        Rocketmq = "rocketmq",
    }
}

/// `users[].password_hash`: RabbitMQ's salted SHA-256, base64.
#[derive(Clone, Debug)]
pub(crate) struct PasswordHash(pub(crate) Password);

impl<'de> Deserialize<'de> for PasswordHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = text(d)?;
        Password::from_hash(&s).map(Self).ok_or_else(|| {
            Invalid::new(&s, "not a salted SHA-256 hash (see mqgate hash-password)").into_de()
        })
    }
}

/// A regular expression (AMQP permissions).
#[derive(Clone, Debug)]
pub(crate) struct Pattern(pub(crate) regex::Regex);

impl Pattern {
    /// Everything (".*").
    pub(crate) fn any() -> Self {
        Self(regex::Regex::new(".*").expect("a constant pattern"))
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = text(d)?;
        regex::Regex::new(&s)
            .map(Self)
            .map_err(|e| Invalid::new(&s, format!("not a regular expression: {e}")).into_de())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 1d "), Some(Duration::from_secs(86_400)));
        for bad in [
            "2 hours",
            "",
            "5",
            "s",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(parse_duration(&format!("{}d", u64::MAX / 1000)), None);
        for d in mqgate_core::CoreConfig::default().delay_levels {
            assert_eq!(parse_duration(&format_duration(d)), Some(d));
        }
    }

    #[test]
    fn invalid_round_trips_through_a_message() {
        let e = Invalid::new("a \"b\"\u{1}\n", "why: \u{1} too").at("access");
        assert_eq!(Invalid::decode(&e.to_string()), Some(e));
        assert_eq!(Invalid::decode("unknown field `x`"), None);
    }
}
