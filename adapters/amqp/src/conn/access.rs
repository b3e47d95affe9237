//! Permission checks (configure, write, read) and the topic access rules on `amq.topic`.

use mqgate_core::acl::{self, Access, Subject};
use mqgate_core::router::amqp_to_mqtt;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::reply;

use super::{chan_err, ChanResult, Conn};

/// The exchange MQTT publishes through (vhost `/`): the topic access rules govern it.
const MQTT_EXCHANGE: &str = "amq.topic";

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// `kind` is formatted only for a refusal: a publish checks its exchange every time.
    fn check(&self, kind: &dyn std::fmt::Display, name: &str, allowed: bool) -> ChanResult {
        if allowed {
            return Ok(());
        }
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "{kind} access to '{name}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    pub(super) fn can_configure(&self, kind: &str, name: &str) -> ChanResult {
        self.check(
            &format_args!("configure {kind}"),
            name,
            self.perm.configure.is_match(name),
        )
    }

    pub(super) fn can_write(&self, kind: &str, name: &str) -> ChanResult {
        let n = if name.is_empty() { "amq.default" } else { name };
        self.check(
            &format_args!("write {kind}"),
            n,
            self.perm.write.is_match(n),
        )
    }

    pub(super) fn can_read(&self, kind: &str, name: &str) -> ChanResult {
        let n = if name.is_empty() { "amq.default" } else { name };
        self.check(&format_args!("read {kind}"), n, self.perm.read.is_match(n))
    }

    /// Whether the topic access rules govern `exchange`: `amq.topic` of vhost `/` (the
    /// exchange MQTT publishes through), when rules are configured.
    fn topic_acl_applies(&self, exchange: &str) -> bool {
        exchange == MQTT_EXCHANGE
            && self.vhost == mqgate_core::router::DEFAULT_VHOST
            && !self.shared.cfg.topic_acl.is_open()
    }

    /// Who the topic access rules see (AMQP has no client id).
    fn subject(&self) -> Subject<'_> {
        Subject {
            user: Some(&self.user),
            client_id: None,
        }
    }

    /// A publish to `amq.topic`: the routing key, read as an MQTT topic, must be one the
    /// user may publish to (as RabbitMQ's topic authorisation; one rule set with MQTT).
    pub(super) fn can_publish_topic(&self, exchange: &str, key: &str) -> ChanResult {
        if !self.topic_acl_applies(exchange) {
            return Ok(());
        }
        let topic = amqp_to_mqtt(key);
        if self
            .shared
            .cfg
            .topic_acl
            .check_topic(self.subject(), Access::Publish, &topic)
        {
            return Ok(());
        }
        tracing::info!(user = %self.user, %key, "AMQP: publish to amq.topic refused by the topic access rules");
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "write access to topic '{key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    /// A binding from `amq.topic` (`Access::Subscribe`: a queue reading MQTT topics) or
    /// into it (`Access::Publish`): every topic `pattern` can match must be allowed, so
    /// AMQP deliveries need no check per message.
    pub(super) fn can_bind_topic(
        &self,
        exchange: &str,
        access: Access,
        pattern: &str,
    ) -> ChanResult {
        if !self.topic_acl_applies(exchange) {
            return Ok(());
        }
        let filter = acl::amqp_pattern_to_filter(pattern);
        if self
            .shared
            .cfg
            .topic_acl
            .check_filter_strict(self.subject(), access, &filter)
        {
            return Ok(());
        }
        let kind = if access == Access::Publish {
            "write"
        } else {
            "read"
        };
        tracing::info!(user = %self.user, %pattern, kind, "AMQP: binding with amq.topic refused by the topic access rules");
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "{kind} access to topic '{pattern}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    /// Whether exchange `name` is internal (clients may not publish to it), or
    /// not_found: what a publish needs to know, without a copy of the exchange.
    pub(super) fn exchange_internal(&self, name: &str) -> ChanResult<bool> {
        let router = self.shared.broker.router();
        let internal = router.exchange_internal(&self.vhost, name);
        internal.ok_or_else(|| self.no_exchange(name))
    }

    pub(super) fn exchange_exists(
        &self,
        name: &str,
    ) -> ChanResult<mqgate_core::router::ExchangeDef> {
        let router = self.shared.broker.router();
        let def = router.exchange(&self.vhost, name);
        def.ok_or_else(|| self.no_exchange(name))
    }

    /// not_found for exchange `name`.
    fn no_exchange(&self, name: &str) -> super::ChanErr {
        chan_err(
            reply::NOT_FOUND,
            format!("no exchange '{name}' in vhost '{}'", self.vhost),
        )
    }
}
