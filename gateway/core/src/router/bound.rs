//! A binding as its exchange stores it, under its destination: one map by destination
//! per exchange, a short vector for the usual few bindings of a destination and maps
//! past [`DestBindings::FEW`], and which bindings share one entry of the exchange's
//! routing index.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Binding, Destination, ExchangeKind, HeaderMatch};

/// A binding as its exchange stores it: the source is the exchange and the destination
/// the key of the map it sits under, so neither is stored again. What identifies it
/// within its destination's bindings (RabbitMQ: key and arguments; mqgate adds the key
/// syntax) is `key`, `arguments` and `mqtt`.
#[derive(Clone, PartialEq, Debug)]
pub(super) struct Bound {
    pub(super) key: Box<str>,
    pub(super) arguments: Bytes,
    pub(super) mqtt: bool,
    /// Headers exchanges only.
    headers: Option<Box<HeaderMatch>>,
}

impl Bound {
    pub(super) fn of(b: &Binding) -> Self {
        Self {
            key: b.key.as_str().into(),
            arguments: b.arguments.clone(),
            mqtt: b.mqtt,
            headers: b.headers.clone().map(Box::new),
        }
    }

    fn is(&self, b: &Binding) -> bool {
        *self.key == *b.key && self.arguments == b.arguments && self.mqtt == b.mqtt
    }

    pub(super) fn binding(&self, source: &str, destination: &Destination) -> Binding {
        Binding {
            source: source.to_owned(),
            destination: destination.clone(),
            key: self.key.to_string(),
            headers: self.headers.as_deref().cloned(),
            mqtt: self.mqtt,
            arguments: self.arguments.clone(),
        }
    }

    pub(super) fn header_match(&self) -> HeaderMatch {
        match_of(self.headers.as_deref())
    }

    /// Whether `self` and `other` (bindings of one destination) share one index entry:
    /// they route alike whatever their arguments (a fanout binding ignores its key, a
    /// headers binding routes by its match).
    fn same_route(&self, other: &Bound, kind: ExchangeKind) -> bool {
        match kind {
            ExchangeKind::Fanout => true,
            ExchangeKind::Headers => self.header_match() == other.header_match(),
            ExchangeKind::Direct | ExchangeKind::Topic => {
                self.key == other.key && self.mqtt == other.mqtt
            }
        }
    }

    /// The route-count key of direct, fanout and topic bindings (headers: `None`).
    fn route_key(&self, kind: ExchangeKind) -> Option<(Box<str>, bool)> {
        match kind {
            ExchangeKind::Headers => None,
            ExchangeKind::Fanout => Some(("".into(), false)),
            ExchangeKind::Direct | ExchangeKind::Topic => Some((self.key.clone(), self.mqtt)),
        }
    }
}

/// A headers binding's match: its own, or (none given) `x-match: all` of nothing, which
/// every message matches.
pub(super) fn match_of(h: Option<&HeaderMatch>) -> HeaderMatch {
    h.cloned().unwrap_or(HeaderMatch {
        all: true,
        headers: Vec::new(),
    })
}

/// A binding's identity among its destination's bindings, in [`ManyBound`].
type BoundId = (Box<str>, Bytes, bool);

/// One destination's bindings in an exchange: a vector sized to fit for the usual few
/// (an MQTT session's filters, a queue's keys), maps past [`DestBindings::FEW`] so that
/// a queue bound ten thousand times still adds and drops one in O(1).
#[derive(Debug)]
pub(super) enum DestBindings {
    Few(Vec<Bound>),
    Many(Box<ManyBound>),
}

#[derive(Debug, Default)]
pub(super) struct ManyBound {
    /// By identity: the headers match of each (headers exchanges), else `None`.
    bound: HashMap<BoundId, Option<Box<HeaderMatch>>>,
    /// How many bindings share each index entry (not for headers exchanges, whose
    /// bindings are compared instead): whether a binding is the first or last of its
    /// route is one look-up.
    routes: HashMap<(Box<str>, bool), usize>,
}

impl DestBindings {
    pub(super) const FEW: usize = 8;

    pub(super) fn len(&self) -> usize {
        match self {
            DestBindings::Few(v) => v.len(),
            DestBindings::Many(m) => m.bound.len(),
        }
    }

    pub(super) fn contains(&self, b: &Binding) -> bool {
        match self {
            DestBindings::Few(v) => v.iter().any(|x| x.is(b)),
            DestBindings::Many(m) => m.bound.contains_key(&Self::id_of(b)),
        }
    }

    fn id_of(b: &Binding) -> BoundId {
        (b.key.as_str().into(), b.arguments.clone(), b.mqtt)
    }

    pub(super) fn each(&self) -> Box<dyn Iterator<Item = Bound> + '_> {
        match self {
            DestBindings::Few(v) => Box::new(v.iter().cloned()),
            DestBindings::Many(m) => Box::new(m.bound.iter().map(
                |((key, arguments, mqtt), headers)| Bound {
                    key: key.clone(),
                    arguments: arguments.clone(),
                    mqtt: *mqtt,
                    headers: headers.clone(),
                },
            )),
        }
    }

    /// Add `b` (not yet here). Returns whether another binding here already routes
    /// like it (the index has its entry).
    pub(super) fn add(&mut self, b: Bound, kind: ExchangeKind) -> bool {
        if let DestBindings::Few(v) = self {
            if v.len() < Self::FEW {
                let routed = v.iter().any(|x| x.same_route(&b, kind));
                v.reserve_exact(1);
                v.push(b);
                return routed;
            }
            let mut m = Box::<ManyBound>::default();
            for x in v.drain(..) {
                m.insert(x, kind);
            }
            *self = DestBindings::Many(m);
        }
        let DestBindings::Many(m) = self else {
            unreachable!("turned into a map above")
        };
        m.insert(b, kind)
    }

    /// Remove the binding identified like `b`. Returns it, and whether another binding
    /// here still routes like it.
    pub(super) fn remove(&mut self, b: &Binding, kind: ExchangeKind) -> Option<(Bound, bool)> {
        match self {
            DestBindings::Few(v) => {
                let at = v.iter().position(|x| x.is(b))?;
                let gone = v.swap_remove(at);
                let still = v.iter().any(|x| x.same_route(&gone, kind));
                Some((gone, still))
            }
            DestBindings::Many(m) => {
                let id = Self::id_of(b);
                let headers = m.bound.remove(&id)?;
                let (key, arguments, mqtt) = id;
                let gone = Bound {
                    key,
                    arguments,
                    mqtt,
                    headers,
                };
                let still = match gone.route_key(kind) {
                    Some(r) => match m.routes.get_mut(&r) {
                        Some(n) if *n > 1 => {
                            *n -= 1;
                            true
                        }
                        _ => {
                            m.routes.remove(&r);
                            false
                        }
                    },
                    None => {
                        let hm = gone.header_match();
                        m.bound.values().any(|h| match_of(h.as_deref()) == hm)
                    }
                };
                Some((gone, still))
            }
        }
    }
}

impl ManyBound {
    /// Add `b` (not yet here); returns whether another binding routes like it.
    fn insert(&mut self, b: Bound, kind: ExchangeKind) -> bool {
        let routed = match b.route_key(kind) {
            Some(r) => {
                let n = self.routes.entry(r).or_insert(0);
                *n += 1;
                *n > 1
            }
            None => {
                let hm = b.header_match();
                self.bound.values().any(|h| match_of(h.as_deref()) == hm)
            }
        };
        self.bound.insert((b.key, b.arguments, b.mqtt), b.headers);
        routed
    }
}
