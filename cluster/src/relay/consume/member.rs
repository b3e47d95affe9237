//! The member's side of the consume relay: a gateway's members of groups whose shards
//! other gateways own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mqgate_core::outbox::ShardId;
use mqgate_core::{
    AckToken, Consumer, CoreError, Delivery, Drain, GroupSpec, MemberOptions, RemoteControl, Result,
};
use mqgate_store::GroupName;
use tokio::sync::mpsc;

use super::wire::{decode_dlv, decode_reply, encode_cmds, encode_join, invalid, Cmds, Dlv};
use super::Times;
use crate::relay::subject;
use crate::relay::{Parted, PART};

/// A member reports at most this many lost batches at once (more: the batch is
/// ignored as malformed; its messages come again).
const MAX_GAP: u64 = 4096;

/// What a remote [`Consumer`]'s calls become on the member's gateway.
enum Ctl {
    Ack(AckToken),
    /// A token and what to do with it (`wire::NACK_*`).
    Nack(AckToken, u8),
    Prefetch(usize),
    Heartbeat,
    Leave,
    /// Answered once every call before it has been applied on the owner
    /// ([`NatsConsumers::settle_group`]).
    Settle(tokio::sync::oneshot::Sender<()>),
}

struct RemoteCtl(
    mpsc::UnboundedSender<Ctl>,
    /// Closed when the member's side ends (after its leave was answered).
    tokio::sync::watch::Receiver<()>,
);

impl RemoteControl for RemoteCtl {
    fn ack(&self, token: AckToken) {
        let _ = self.0.send(Ctl::Ack(token));
    }
    fn nack(&self, token: AckToken, requeue: bool) {
        let kind = if requeue {
            super::wire::NACK_REQUEUE
        } else {
            super::wire::NACK_FAILED
        };
        let _ = self.0.send(Ctl::Nack(token, kind));
    }
    fn release(&self, token: AckToken) {
        let _ = self.0.send(Ctl::Nack(token, super::wire::NACK_RELEASE));
    }
    fn heartbeat(&self) {
        let _ = self.0.send(Ctl::Heartbeat);
    }
    fn set_prefetch(&self, prefetch: usize) {
        let _ = self.0.send(Ctl::Prefetch(prefetch));
    }
    fn leave(&self) {
        let _ = self.0.send(Ctl::Leave);
    }
    fn left(&self) -> mqgate_core::Left {
        let mut done = self.1.clone();
        Box::pin(async move { while done.changed().await.is_ok() {} })
    }
}

/// The member's side: how a gateway joins groups whose shards others own.
#[derive(Debug, Clone)]
pub struct NatsConsumers {
    client: async_nats::Client,
    stream: String,
    times: Times,
    /// This gateway's remote members, by group (`settle_group`).
    members: Arc<parking_lot::Mutex<HashMap<GroupName, Vec<mpsc::WeakUnboundedSender<Ctl>>>>>,
}

impl NatsConsumers {
    /// Members of groups in the cluster of `stream`; requests time out after
    /// `timeout` (the other times follow from it).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
            times: Times::new(timeout),
            members: Arc::default(),
        }
    }

    /// Wait (at most a request's time out) until what this gateway's members of
    /// `group` acknowledged, rejected or gave back so far has been applied on its
    /// owner: what the gateway asks the owner next (the group's counts) sees it, as
    /// on a single broker, where both go through the group's actor in order.
    pub async fn settle_group(&self, group: &GroupName) {
        let senders: Vec<_> = {
            let mut members = self.members.lock();
            let Some(list) = members.get_mut(group) else {
                return;
            };
            list.retain(live);
            let senders: Vec<_> = list.iter().filter_map(|w| w.upgrade()).collect();
            if senders.is_empty() {
                members.remove(group);
            }
            senders
        };
        let answers: Vec<_> = senders
            .into_iter()
            .filter_map(|tx| {
                let (done, answer) = tokio::sync::oneshot::channel();
                tx.send(Ctl::Settle(done)).ok().map(|()| answer)
            })
            .collect();
        let _ =
            tokio::time::timeout(self.times.request, futures_util::future::join_all(answers)).await;
    }

    async fn request(&self, shard: ShardId, payload: Bytes) -> Result<u64> {
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.times.request));
        let subject = subject(&self.stream, shard, "grp");
        match self.client.send_request(subject.clone(), req).await {
            Ok(reply) => decode_reply(reply.payload),
            // Nobody serves the shard, or its owner did not answer in time: the
            // shard is (as far as this gateway can tell) between owners.
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::RequestErrorKind::NoResponders
                        | async_nats::RequestErrorKind::TimedOut
                ) =>
            {
                Err(CoreError::NotOwned(shard))
            }
            Err(e) => Err(invalid(format!("{subject}: {e}"))),
        }
    }

    /// Join on the owner, waiting while the shard is between owners (no owner, or no
    /// answer in time): for up to the member timeout, or while `alive` says so. The
    /// handle, and whether the member joined unbounded (as asked, if it was).
    async fn join(
        &self,
        shard: ShardId,
        deliver_to: &str,
        spec: &GroupSpec,
        member: &MemberOptions,
        alive: Option<&(dyn Fn() -> bool + Sync)>,
    ) -> Result<(u64, bool)> {
        let since = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self
                .request(shard, encode_join(deliver_to, spec, member))
                .await
            {
                Ok(h) => return Ok((h, member.unbounded)),
                Err(e @ (CoreError::NotOwned(_) | CoreError::ShuttingDown))
                    if alive.map_or(since.elapsed() < self.times.member, |a| a()) =>
                {
                    tracing::debug!(shard, error = %e, "cluster: joining a remote group; again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(CoreError::Invalid(e)) if member.unbounded => {
                    // An owner of an earlier version knows no unbounded member (it
                    // refuses the join's last byte): join bounded, as before.
                    tracing::info!(shard, error = %e, "cluster: an unbounded member joins bounded (the owner does not know them)");
                    let mut bounded = member.clone();
                    bounded.unbounded = false;
                    return Box::pin(self.join(shard, deliver_to, spec, &bounded, alive)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`mqgate_core::shard::ClusterLink::subscribe`].
    pub async fn subscribe(
        &self,
        shard: ShardId,
        spec: GroupSpec,
        member: MemberOptions,
    ) -> Result<Consumer> {
        let deliver_to = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(deliver_to.clone())
            .await
            .map_err(|e| invalid(format!("subscribe: {e}")))?;
        let mut member = member;
        // Unbounded unless its channel's global basic.qos has a limit, which the owner
        // cannot see (the credit pool stays here): then the prefetch bounds it, as the
        // AMQP channel set it to the limit.
        member.unbounded &= !bounded_by_pool(&member);
        let (handle, unbounded) = self.join(shard, &deliver_to, &spec, &member, None).await?;
        member.unbounded = unbounded;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        {
            let mut members = self.members.lock();
            let list = members.entry(spec.name.clone()).or_default();
            list.retain(live);
            list.push(ctl_tx.downgrade());
        }
        let (done_tx, done_rx) = tokio::sync::watch::channel(());
        // An unbounded member counts what it put in the mailbox and what the consumer
        // took (with a consumer that wraps it, in that consumer's counts).
        let drain = member
            .unbounded
            .then(|| member.drain.clone().unwrap_or_default());
        let (consumer, mailbox) = Consumer::remote_drained(
            &member.id,
            spec.name.clone(),
            Arc::new(RemoteCtl(ctl_tx, done_rx)),
            drain.clone(),
        );
        let member_side = MemberSide {
            link: self.clone(),
            shard,
            deliver_to,
            spec,
            member,
            handle,
            expected: 1,
            through: 0,
            pending: Cmds::default(),
            failures: 0,
            parts: Parted::default(),
            drain,
            reported: 0,
            since: 0,
            settles: Vec::new(),
        };
        let (registry, group) = (Arc::clone(&self.members), member_side.spec.name.clone());
        tokio::spawn(async move {
            member_side.run(sub, ctl_rx, mailbox).await;
            drop(done_tx);
            // Its commands channel is closed now: out of the registry (a group's key
            // goes with its last member).
            let mut members = registry.lock();
            if let Some(list) = members.get_mut(&group) {
                list.retain(live);
                if list.is_empty() {
                    members.remove(&group);
                }
            }
        });
        Ok(consumer)
    }
}

/// The member's gateway's task for one remote member.
struct MemberSide {
    link: NatsConsumers,
    shard: ShardId,
    deliver_to: String,
    spec: GroupSpec,
    member: MemberOptions,
    handle: u64,
    /// The next batch number expected from the owner.
    expected: u64,
    /// The last batch number received.
    through: u64,
    /// What the next commands request carries.
    pending: Cmds,
    /// Commands requests not taken in a row.
    failures: u32,
    /// A delivery batch arriving in parts.
    parts: Parted,
    /// An unbounded member's counts: the owner sends while the batches it has not
    /// heard of plus what was last reported waiting are under the prefetch, so once
    /// `reported + since` reaches it the owner has stopped, and the consumer is asked
    /// to say when it has taken everything (`Drain::starve`, then a report).
    drain: Option<Arc<Drain>>,
    /// What the last report said was waiting.
    reported: usize,
    /// Deliveries received since the last report.
    since: usize,
    /// Answered after the next commands request (`Ctl::Settle`).
    settles: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl MemberSide {
    async fn run(
        mut self,
        mut sub: async_nats::Subscriber,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
        mailbox: mqgate_core::mailbox::Sender<Delivery>,
    ) {
        let mut tick = tokio::time::interval(self.link.times.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return };
                    let payload = if msg.payload.first() == Some(&PART) {
                        // This member's inbox: one key.
                        match self.parts.add("", &msg.payload) {
                            Some(whole) => whole,
                            None => continue,
                        }
                    } else {
                        msg.payload
                    };
                    match decode_dlv(payload) {
                        Ok(Dlv::Batch(h, seq, batch)) if h == self.handle => {
                            if seq < self.expected {
                                continue;
                            }
                            if seq - self.expected > MAX_GAP {
                                tracing::warn!(seq, expected = self.expected, "cluster: a delivery batch numbered far ahead; ignored (delivered again)");
                                continue;
                            }
                            self.pending.lost.extend(self.expected..seq);
                            self.expected = seq + 1;
                            self.through = seq;
                            self.since += batch.len();
                            let mut batch = batch.into_iter();
                            while let Some(d) = batch.next() {
                                if let Some(drain) = &self.drain {
                                    drain.put(1);
                                }
                                if let Err(back) = mailbox.send(d) {
                                    // The consumer is gone: what it never got goes back
                                    // released (not counted as a delivery). Its leave
                                    // follows (a dropped consumer always sends one,
                                    // after the releases of what its mailbox held):
                                    // they all go together then.
                                    for d in std::iter::once(back).chain(batch) {
                                        self.pending
                                            .nacks
                                            .push((d.ack_token(), super::wire::NACK_RELEASE));
                                    }
                                    break;
                                }
                            }
                            if self.starved() && !self.flush().await && !self.rejoin(&mailbox).await {
                                return;
                            }
                        }
                        Ok(Dlv::Ended(h, true)) if h == self.handle => {
                            // Deleted or cut off on the owner: the consumer ends.
                            tracing::info!(shard = self.shard, group = %self.spec.name, "cluster: a remote member was ended by its group's owner");
                            return;
                        }
                        Ok(Dlv::Ended(h, false)) if h == self.handle => {
                            if !self.rejoin(&mailbox).await {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cluster: a malformed delivery batch; ignored (delivered again)"),
                    }
                }
                c = ctl.recv() => {
                    let Some(c) = c else { return };
                    self.apply(c);
                    self.take(&mut ctl);
                    let leaving = self.pending.leave;
                    if leaving {
                        let _ = self.flush().await;
                        return;
                    }
                    let flushed = self.flush().await;
                    // The owner answers a commands request once it has applied it (on a
                    // failure the wait ends too: nothing more is coming).
                    for done in self.settles.drain(..) {
                        let _ = done.send(());
                    }
                    if !flushed && !self.rejoin(&mailbox).await {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if !self.flush().await && !self.rejoin(&mailbox).await {
                        return;
                    }
                }
            }
        }
    }

    /// A consumer's call, into what the next commands request carries.
    fn apply(&mut self, c: Ctl) {
        match c {
            Ctl::Ack(t) => self.pending.acks.push(t),
            Ctl::Nack(t, rq) => self.pending.nacks.push((t, rq)),
            Ctl::Prefetch(p) => {
                self.member.prefetch = p;
                self.pending.prefetch = Some(u32::try_from(p).unwrap_or(u32::MAX));
                if self.drain.is_some() && bounded_by_pool(&self.member) {
                    // A global basic.qos with a limit, after the consume: the owner
                    // counts what the member holds unacknowledged from now on.
                    self.pending.bounded = true;
                    self.member.unbounded = false;
                }
            }
            Ctl::Heartbeat => {}
            Ctl::Leave => self.pending.leave = true,
            Ctl::Settle(done) => self.settles.push(done),
        }
    }

    /// An unbounded member whose owner has stopped sending (see `drain`): flag it for
    /// the consumer, which asks for more once it has taken everything; true when it
    /// already has (the report goes now).
    fn starved(&self) -> bool {
        let Some(drain) = &self.drain else {
            return false;
        };
        if self.reported + self.since < self.member.prefetch {
            return false;
        }
        drain.starve();
        drain.waiting() == 0 && drain.unstarve()
    }

    /// Every call made so far (a consumer that was dropped gives back what its
    /// mailbox held as releases before its leave: they go with the leave).
    fn take(&mut self, ctl: &mut mpsc::UnboundedReceiver<Ctl>) {
        while let Ok(c) = ctl.try_recv() {
            self.apply(c);
        }
    }

    /// Send what is pending (and the heartbeat). False when the member must join
    /// anew: the owner does not know it (it moved, restarted, or dropped the member),
    /// or did not take 3 requests in a row; a single failure is retried with the next
    /// request.
    async fn flush(&mut self) -> bool {
        if !self.flush_once().await {
            return false;
        }
        // Reported as full (the owner stops): the consumer says when it has taken it
        // all; or it already has.
        if self.starved() {
            return self.flush_once().await;
        }
        true
    }

    async fn flush_once(&mut self) -> bool {
        let mut c = std::mem::take(&mut self.pending);
        c.handle = self.handle;
        c.received_through = self.through;
        let mut waiting = None;
        if let Some(drain) = &self.drain {
            let w = drain.waiting();
            c.waiting = Some(u32::try_from(w).unwrap_or(u32::MAX));
            waiting = Some(w);
        }
        if c.bounded {
            // Said once: the owner's pump counts no window from then on.
            self.drain = None;
        }
        let leave = c.leave;
        match self.link.request(self.shard, encode_cmds(&c)).await {
            Ok(_) => {
                self.failures = 0;
                if let Some(w) = waiting {
                    // What the owner now counts.
                    self.reported = w;
                    self.since = 0;
                }
                true
            }
            Err(e) => {
                self.failures += 1;
                let gone = matches!(e, CoreError::NoSuchGroup(_) | CoreError::ShuttingDown)
                    || self.failures >= 3;
                tracing::debug!(shard = self.shard, error = %e, "cluster: a remote member's commands were not taken");
                if !leave {
                    // Sent again with the next ones, unless the member joins anew
                    // (then they are stale: the owner delivers those messages again).
                    c.acks.append(&mut self.pending.acks);
                    c.nacks.append(&mut self.pending.nacks);
                    c.lost.append(&mut self.pending.lost);
                    c.prefetch = self.pending.prefetch.or(c.prefetch);
                    c.bounded |= self.pending.bounded;
                    c.waiting = None;
                    c.leave = false;
                    self.pending = c;
                }
                !gone
            }
        }
    }

    /// Join the group's (next) owner anew, for as long as the consumer lives (a
    /// takeover after a crash takes the lease's time to live); false when it is gone
    /// or the owner refuses (the consumer ends).
    async fn rejoin(&mut self, mailbox: &mqgate_core::mailbox::Sender<Delivery>) -> bool {
        let alive = || !mailbox.is_closed();
        if !alive() {
            // Dropped meanwhile: joining again would bring back a group deleted since
            // (a delete ends its members).
            return false;
        }
        self.member.unbounded &= !bounded_by_pool(&self.member);
        match self
            .link
            .join(
                self.shard,
                &self.deliver_to,
                &self.spec,
                &self.member,
                Some(&alive),
            )
            .await
        {
            Ok((h, unbounded)) => {
                self.member.unbounded = unbounded;
                if !unbounded {
                    self.drain = None;
                }
                tracing::info!(shard = self.shard, group = %self.spec.name, "cluster: a remote member joined its group's owner anew");
                // Joined as it is now: bounded already if it became so.
                let prefetch = self.pending.prefetch;
                self.pending = Cmds {
                    prefetch,
                    ..Cmds::default()
                };
                self.handle = h;
                self.expected = 1;
                self.through = 0;
                self.failures = 0;
                // The new owner's pump starts from nothing reported.
                self.reported = 0;
                self.since = 0;
                true
            }
            Err(e) => {
                tracing::warn!(shard = self.shard, group = %self.spec.name, error = %e, "cluster: a remote member lost its group");
                false
            }
        }
    }
}

/// A registered member whose task still takes commands.
fn live(w: &mpsc::WeakUnboundedSender<Ctl>) -> bool {
    w.upgrade().is_some_and(|s| !s.is_closed())
}

/// A member whose AMQP channel has a global basic.qos limit: its credit pool stays on
/// this gateway, so the owner bounds it by its prefetch (which the channel sets to the
/// limit), unbounded or not.
fn bounded_by_pool(member: &MemberOptions) -> bool {
    member.credit_pool.as_ref().is_some_and(|p| p.limit() > 0)
}
