//! The admin subcommands: they talk to a running broker's admin API (`--url`, default
//! `http://127.0.0.1:15672`) as an administrator (`--user`/`--password`, or
//! `MQGATE_ADMIN_USER`/`MQGATE_ADMIN_PASSWORD`). Tables by default, `--json` for scripts.

use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::{Args, Subcommand};
use comfy_table::Table;
use serde_json::{json, Value};

/// How to reach the admin API.
#[derive(Debug, Args)]
pub(crate) struct Remote {
    /// The admin API of the broker.
    #[arg(
        long,
        global = true,
        env = "MQGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:15672"
    )]
    url: String,
    /// An administrator user.
    #[arg(
        long,
        global = true,
        env = "MQGATE_ADMIN_USER",
        default_value = "guest"
    )]
    user: String,
    /// Its password.
    #[arg(
        long,
        global = true,
        env = "MQGATE_ADMIN_PASSWORD",
        default_value = "guest",
        hide_default_value = true
    )]
    password: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// `mqgate topics ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Topics {
    /// List topics with their queue and message counts.
    List,
    /// Create a topic (or grow its queue count).
    Create {
        /// The topic.
        name: String,
        /// Its number of queues (default: the broker's, 8).
        #[arg(long)]
        queues: Option<u32>,
    },
    /// Delete a topic and every group's offsets on it.
    Delete {
        /// The topic.
        name: String,
    },
    /// The min and next offset of each of its queues.
    Offsets {
        /// The topic.
        name: String,
    },
}

/// `mqgate groups ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Groups {
    /// List consumer groups with their members and lag.
    List,
    /// A group's members, and committed offset and lag per queue.
    Show {
        /// The group.
        name: String,
    },
    /// Move a group to `first`, `last`, or a time (ms since the epoch, or RFC 3339-ish
    /// `2026-11-25T10:00:00Z`): replay.
    Reset {
        /// The group.
        name: String,
        /// first | last | <ms> | <YYYY-MM-DDTHH:MM:SSZ>
        #[arg(long)]
        to: String,
    },
}

/// `mqgate dlq ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Dlq {
    /// List a group's dead-letter messages.
    List {
        /// The group.
        group: String,
        /// From this DLQ offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show one dead-letter message in full.
    Show {
        /// The group.
        group: String,
        /// Its DLQ offset.
        offset: u64,
    },
    /// Publish dead-letter messages to their original topics again (with a progress
    /// bar for large resends).
    Resend {
        /// The group.
        group: String,
        /// These DLQ offsets...
        offsets: Vec<u64>,
        /// ...or every message from this offset on.
        #[arg(long, conflicts_with = "offsets")]
        all_from: Option<u64>,
    },
}

/// `mqgate messages ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Messages {
    /// A message by its id.
    Get {
        /// The message id.
        id: u64,
    },
    /// Messages published to a topic with this key.
    Key {
        /// The topic (the message's address: MQTT topic, AMQP exchange, RocketMQ topic).
        topic: String,
        /// The key.
        key: String,
    },
    /// A range of one queue of a topic.
    Range {
        /// The topic.
        topic: String,
        /// The queue number.
        queue: u32,
        /// From this offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// `mqgate delayed ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Delayed {
    /// Pending delayed messages (and retries, delayed wills) in due order.
    List {
        /// Only those published to this topic (MQTT topic, AMQP exchange).
        #[arg(long)]
        topic: Option<String>,
        /// Only those with this key (x-keys).
        #[arg(long)]
        key: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// After this id (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Cancel a delayed message by its id (from `list`), or every one of a topic with a
    /// key: it is never delivered.
    Cancel {
        /// Its id (`<due>-<seq>`).
        #[arg(conflicts_with_all = ["topic", "key"], required_unless_present_all = ["topic", "key"])]
        id: Option<String>,
        /// The topic it was published to (MQTT topic, AMQP exchange).
        #[arg(long, requires = "key")]
        topic: Option<String>,
        /// The key it was published with (x-keys).
        #[arg(long, requires = "topic")]
        key: Option<String>,
    },
}

/// `mqgate connections ...`
#[derive(Debug, Subcommand)]
pub(crate) enum Connections {
    /// Open AMQP and MQTT connections.
    List,
    /// Close one (AMQP: connection.close 320; MQTT 5: DISCONNECT 0x98).
    Close {
        /// amqp or mqtt.
        protocol: String,
        /// Its id (AMQP: the number listed; MQTT: the client id).
        id: String,
    },
}

struct Client {
    agent: ureq::Agent,
    url: String,
    auth: String,
    json: bool,
}

impl Client {
    fn new(r: &Remote) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", r.user, r.password));
        Self {
            agent,
            url: r.url.trim_end_matches('/').to_owned(),
            auth: format!("Basic {auth}"),
            json: r.json,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url);
        let resp = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("Authorization", &self.auth)
                .send_json(b.unwrap_or(Value::Null)),
        };
        let mut resp = resp.with_context(|| format!("reach the admin API at {}", self.url))?;
        let status = resp.status();
        let v: Value = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("read the answer of {path}"))?;
        if !status.is_success() {
            let msg = v["error"].as_str().unwrap_or("request failed");
            bail!("{} {}: {msg}", status.as_u16(), path);
        }
        Ok(v)
    }

    fn print(&self, v: &Value, columns: &[&str]) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        let rows: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        let mut t = Table::new();
        t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
        t.set_header(columns.to_vec());
        for r in rows {
            t.add_row(columns.iter().map(|c| cell(&r[*c])).collect::<Vec<_>>());
        }
        println!("{t}");
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn topics(r: &Remote, cmd: Topics) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Topics::List => c.print(
            &c.call("GET", "/api/mqgate/topics", None)?,
            &["name", "queues", "messages"],
        ),
        Topics::Create { name, queues } => {
            let v = c.call(
                "POST",
                "/api/mqgate/topics",
                Some(json!({ "name": name, "queues": queues })),
            )?;
            c.print(&v, &["name", "queues"]);
        }
        Topics::Delete { name } => {
            let v = c.call(
                "DELETE",
                &format!("/api/mqgate/topics/{}", enc(&name)),
                None,
            )?;
            c.print(&v, &["deleted"]);
        }
        Topics::Offsets { name } => {
            let v = c.call("GET", &format!("/api/mqgate/topics/{}", enc(&name)), None)?;
            if c.json {
                c.print(&v, &[]);
            } else {
                c.print(&v["offsets"], &["queue", "min", "next", "messages"]);
            }
        }
    }
    Ok(())
}

/// A time for `--to`: first, last, ms since the epoch, or `YYYY-MM-DDTHH:MM:SS[Z]` (UTC).
fn parse_to(s: &str) -> anyhow::Result<Value> {
    if s == "first" || s == "last" {
        return Ok(json!(s));
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(json!(ms));
    }
    let t = s.trim_end_matches('Z');
    let (date, time) = t
        .split_once('T')
        .context("--to: first, last, ms, or YYYY-MM-DDTHH:MM:SSZ")?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let h: Vec<i64> = time
        .split(':')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || h.len() != 3 {
        bail!("--to: first, last, ms, or YYYY-MM-DDTHH:MM:SSZ");
    }
    // Days from the civil date (Howard Hinnant's algorithm), UTC.
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    Ok(json!(secs * 1000))
}

pub(crate) fn groups(r: &Remote, cmd: Groups) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Groups::List => c.print(
            &c.call("GET", "/api/mqgate/groups", None)?,
            &["name", "members", "lag"],
        ),
        Groups::Show { name } => show_group(
            &c,
            &c.call("GET", &format!("/api/mqgate/groups/{}", enc(&name)), None)?,
        ),
        Groups::Reset { name, to } => {
            let v = c.call(
                "POST",
                &format!("/api/mqgate/groups/{}/reset", enc(&name)),
                Some(json!({ "to": parse_to(&to)? })),
            )?;
            show_group(&c, &v);
        }
    }
    Ok(())
}

fn show_group(c: &Client, v: &Value) {
    if c.json {
        c.print(v, &[]);
        return;
    }
    println!("group {}  lag {}", cell(&v["name"]), cell(&v["lag"]));
    c.print(&v["members"], &["id", "unacked", "prefetch", "queues"]);
    c.print(
        &v["queues"],
        &["queue", "member", "committed", "next", "lag", "in_flight"],
    );
}

pub(crate) fn dlq(r: &Remote, cmd: Dlq) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Dlq::List { group, from, limit } => {
            let v = c.call(
                "GET",
                &format!("/api/mqgate/dlq/{}?from={from}&limit={limit}", enc(&group)),
                None,
            )?;
            c.print(
                &v,
                &["offset", "id", "topic", "reconsume_times", "size", "body"],
            );
        }
        Dlq::Show { group, offset } => {
            let v = c.call(
                "GET",
                &format!("/api/mqgate/dlq/{}?from={offset}&limit=1", enc(&group)),
                None,
            )?;
            let m = v
                .as_array()
                .and_then(|a| a.first())
                .filter(|m| m["offset"] == json!(offset))
                .cloned()
                .with_context(|| format!("no DLQ message at offset {offset}"))?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Dlq::Resend {
            group,
            offsets,
            all_from,
        } => {
            let path = format!("/api/mqgate/dlq/{}/resend", enc(&group));
            let Some(mut from) = all_from else {
                if offsets.is_empty() {
                    bail!("give DLQ offsets, or --all-from <offset>");
                }
                let v = c.call("POST", &path, Some(json!({ "offsets": offsets })))?;
                c.print(&v, &["resent"]);
                return Ok(());
            };
            // Count what is there, then resend in pages with a progress bar.
            let total = count_dlq(&c, &group, from)?;
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} resent  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut resent = 0u64;
            loop {
                let v = c.call("POST", &path, Some(json!({ "from": from, "limit": 1000 })))?;
                let n = v["resent"].as_u64().unwrap_or(0);
                if n == 0 {
                    break;
                }
                resent += n;
                bar.inc(n);
                from = v["last_offset"].as_u64().unwrap_or(from) + 1;
            }
            bar.finish_and_clear();
            c.print(&json!({ "resent": resent }), &["resent"]);
        }
    }
    Ok(())
}

fn count_dlq(c: &Client, group: &str, mut from: u64) -> anyhow::Result<u64> {
    let mut n = 0;
    loop {
        let v = c.call(
            "GET",
            &format!("/api/mqgate/dlq/{}?from={from}&limit=1000", enc(group)),
            None,
        )?;
        let page = v.as_array().map(|a| a.len()).unwrap_or(0);
        let Some(last) = v
            .as_array()
            .and_then(|a| a.last())
            .and_then(|m| m["offset"].as_u64())
        else {
            return Ok(n);
        };
        n += page as u64;
        from = last + 1;
    }
}

pub(crate) fn messages(r: &Remote, cmd: Messages) -> anyhow::Result<()> {
    let c = Client::new(r);
    let cols = ["id", "topic", "stored_at", "keys", "size", "body"];
    match cmd {
        Messages::Get { id } => {
            let v = c.call("GET", &format!("/api/mqgate/messages/{id}"), None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Messages::Key { topic, key } => {
            let v = c.call(
                "GET",
                &format!(
                    "/api/mqgate/messages?topic={}&key={}",
                    enc(&topic),
                    enc(&key)
                ),
                None,
            )?;
            c.print(&v, &cols);
        }
        Messages::Range {
            topic,
            queue,
            from,
            limit,
        } => {
            let v = c.call(
                "GET",
                &format!(
                    "/api/mqgate/topics/{}/queues/{queue}/messages?from={from}&limit={limit}",
                    enc(&topic)
                ),
                None,
            )?;
            c.print(&v, &["offset", "id", "stored_at", "keys", "size", "body"]);
        }
    }
    Ok(())
}

pub(crate) fn delayed(r: &Remote, cmd: Delayed) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Delayed::List {
            topic,
            key,
            limit,
            after,
        } => {
            let mut q = format!("/api/mqgate/delayed?limit={limit}");
            for (k, v) in [("topic", topic), ("key", key), ("after", after)] {
                if let Some(v) = v {
                    q.push_str(&format!("&{k}={}", enc(&v)));
                }
            }
            let v = c.call("GET", &q, None)?;
            if c.json {
                c.print(&v, &[]);
            } else {
                c.print(
                    &v["items"],
                    &["id", "due", "kind", "topic", "route", "keys", "size"],
                );
                if let Some(n) = v["next"].as_str() {
                    println!("more: --after {n}");
                }
            }
        }
        Delayed::Cancel { id, topic, key } => {
            let v = match (id, topic, key) {
                (Some(id), _, _) => {
                    c.call("DELETE", &format!("/api/mqgate/delayed/{}", enc(&id)), None)?
                }
                (None, Some(t), Some(k)) => c.call(
                    "DELETE",
                    &format!("/api/mqgate/delayed?topic={}&key={}", enc(&t), enc(&k)),
                    None,
                )?,
                _ => bail!("give an id, or --topic and --key"),
            };
            c.print(&v, &["cancelled"]);
        }
    }
    Ok(())
}

/// `mqgate cluster ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum Cluster {
    /// The replicated log: the owner and its epoch, each gateway's lag, the stream's
    /// replicas (store.backend = "jetstream").
    Status,
}

pub(crate) fn cluster(r: &Remote, cmd: Cluster) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Cluster::Status => {
            let v = c.call("GET", "/api/mqgate/cluster", None)?;
            if c.json {
                c.print(&v, &[]);
            } else if v["replicated"] != json!(true) {
                println!("not replicated: store.backend = {}", cell(&v["backend"]));
            } else {
                println!(
                    "stream {}: records {}..{}; owner {}; answered by {} ({}, epoch {})",
                    cell(&v["stream"]),
                    cell(&v["first_seq"]),
                    cell(&v["last_seq"]),
                    cell(&v["owner"]["node"]),
                    cell(&v["node"]),
                    cell(&v["this_node"]["role"]),
                    cell(&v["this_node"]["epoch"]),
                );
                c.print(&v["nodes"], &["node", "role", "applied", "lag"]);
                c.print(
                    &v["replicas"],
                    &["name", "leader", "current", "offline", "lag"],
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn producers(r: &Remote) -> anyhow::Result<()> {
    let c = Client::new(r);
    c.print(
        &c.call("GET", "/api/mqgate/producers", None)?,
        &["topic", "producer_group", "messages"],
    );
    Ok(())
}

pub(crate) fn connections(r: &Remote, cmd: Connections) -> anyhow::Result<()> {
    let c = Client::new(r);
    match cmd {
        Connections::List => c.print(
            &c.call("GET", "/api/mqgate/connections", None)?,
            &["protocol", "id", "peer", "user", "detail", "connected_at"],
        ),
        Connections::Close { protocol, id } => {
            let v = c.call(
                "DELETE",
                &format!("/api/mqgate/connections/{}/{}", enc(&protocol), enc(&id)),
                None,
            )?;
            c.print(&v, &["protocol", "closed"]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_to("first").unwrap(), json!("first"));
        assert_eq!(
            parse_to("1700000000000").unwrap(),
            json!(1_700_000_000_000u64)
        );
        assert_eq!(
            parse_to("2023-11-14T22:13:20Z").unwrap(),
            json!(1_700_000_000_000i64)
        );
        assert_eq!(parse_to("1970-01-01T00:00:00Z").unwrap(), json!(0));
        assert!(parse_to("yesterday").is_err());
    }
}
