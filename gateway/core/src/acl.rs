//! Topic access rules: one rule set for both doors. MQTT checks them on PUBLISH, on
//! SUBSCRIBE and on every message it is about to deliver; AMQP checks them on what goes
//! through `amq.topic` of vhost `/` (publishes, and bindings, strictly), with routing
//! keys read as MQTT topics (`a.b.c` is `a/b/c`).
//!
//! Rules are read in order; the first whose user, access and filter apply decides; none
//! applying gives the default (`allow` unless configured `deny`). ACL rules are not
//! subscriptions: a leading `#` or `+` in a rule covers `$`-topics too, so a catch-all
//! deny also denies `$foo/bar`.
//!
//! `%u` and `%c` (user name, client id) are substituted at match time level by level:
//! a rule level holding them matches exactly one topic level equal to the substituted
//! text, compared literally. A name containing `/`, `+` or `#` (or no name at all:
//! anonymous, or AMQP which has no client id) never makes an allow rule apply and makes
//! a deny rule apply to any one level: a name never widens a rule.

use std::borrow::Cow;

/// What an access rule governs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// Publishing (MQTT PUBLISH and wills, AMQP basic.publish to `amq.topic`).
    Publish,
    /// Reading (MQTT SUBSCRIBE and each delivery, AMQP bindings from `amq.topic`).
    Subscribe,
    /// Both.
    All,
}

/// One topic access rule.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AclRule {
    /// The user it applies to (`None`: everyone, anonymous included).
    pub user: Option<String>,
    /// What it governs.
    pub access: Access,
    /// The topics it covers: an MQTT topic filter, `%u` and `%c` standing for the user
    /// name and client id.
    pub filter: String,
    /// Allow or deny.
    pub allow: bool,
}

/// What is decided when no rule applies.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum AclDefault {
    /// Allowed (compatible with a broker without rules).
    #[default]
    Allow,
    /// Denied (deny by default: only what a rule allows).
    Deny,
}

/// Who asks: the names `%u` and `%c` stand for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Subject<'a> {
    /// The user name (`None`: anonymous).
    pub user: Option<&'a str>,
    /// The MQTT client id (`None`: AMQP, which has none).
    pub client_id: Option<&'a str>,
}

/// The rule set and its default.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct TopicAcl {
    /// The rules, first match wins.
    pub rules: Vec<AclRule>,
    /// When no rule applies.
    pub default: AclDefault,
}

impl TopicAcl {
    /// A rule set.
    pub fn new(rules: Vec<AclRule>, default: AclDefault) -> Self {
        Self { rules, default }
    }

    /// Whether everything is allowed to everyone (no rules, default allow): callers skip
    /// their checks then, so the common configuration costs nothing per message.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.default == AclDefault::Allow
    }

    /// Whether some `access` of `who` can be denied: false when no deny rule applies to
    /// them and the default allows (per-delivery checks are skipped then).
    pub fn may_deny(&self, who: Subject<'_>, access: Access) -> bool {
        self.default == AclDefault::Deny || self.applicable(who, access).any(|r| !r.allow)
    }

    /// Whether `who` may do `access` on topic name `topic`: publishing to it, or being
    /// delivered a message published to it.
    pub fn check_topic(&self, who: Subject<'_>, access: Access, topic: &str) -> bool {
        self.decide(who, access, |r| rule_matches(r, who, topic))
    }

    /// Whether `who` may subscribe with `filter` (MQTT SUBSCRIBE): the first rule whose
    /// filter covers all of `filter` decides. A subscription granted this way can still
    /// match topics a later rule denies: those messages are refused at delivery
    /// ([`TopicAcl::check_topic`]).
    pub fn check_filter(&self, who: Subject<'_>, access: Access, filter: &str) -> bool {
        self.decide(who, access, |r| rule_covers(r, who, filter))
    }

    /// Whether `who` may do `access` on every topic `filter` can match (AMQP bindings to
    /// and from `amq.topic`, which are not checked per message): refused as soon as a deny
    /// rule (or the deny default) could apply to some topic of the filter. Conservative:
    /// an allow rule shadowing part of a later deny rule does not lift the refusal.
    pub fn check_filter_strict(&self, who: Subject<'_>, access: Access, filter: &str) -> bool {
        for r in self.applicable(who, access) {
            if rule_covers(r, who, filter) {
                return r.allow;
            }
            if !r.allow && rule_intersects(r, who, filter) {
                return false;
            }
        }
        self.default == AclDefault::Allow
    }

    fn applicable<'s>(
        &'s self,
        who: Subject<'s>,
        access: Access,
    ) -> impl Iterator<Item = &'s AclRule> + 's {
        self.rules.iter().filter(move |r| {
            r.user.as_deref().is_none_or(|u| Some(u) == who.user)
                && (r.access == Access::All || r.access == access)
        })
    }

    fn decide(&self, who: Subject<'_>, access: Access, applies: impl Fn(&AclRule) -> bool) -> bool {
        for r in self.applicable(who, access) {
            if applies(r) {
                return r.allow;
            }
        }
        self.default == AclDefault::Allow
    }
}

/// Whether `filter` is a valid MQTT topic filter (and so a valid rule filter): non-empty,
/// `#` only as the whole last level, `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// An AMQP topic binding pattern as an MQTT filter matching at least the same routing
/// keys (read as MQTT topics): `*` is `+`, `#` ends the filter (`a.#.b` becomes `a/#`,
/// a superset), and `.`/`/` swap as in routing.
pub fn amqp_pattern_to_filter(pattern: &str) -> String {
    let mut levels = Vec::new();
    for word in pattern.split('.') {
        match word {
            "#" => {
                levels.push("#".to_owned());
                break;
            }
            "*" => levels.push("+".to_owned()),
            w => levels.push(w.replace('/', ".")),
        }
    }
    levels.join("/")
}

/// A rule level resolved against the subject.
enum Level<'r> {
    /// `#`.
    Hash,
    /// `+` (or a deny rule's unknown name: any one level).
    Plus,
    /// Exactly this text.
    Lit(Cow<'r, str>),
    /// Nothing (an allow rule's unknown or unsafe name).
    Never,
}

fn resolve<'r>(level: &'r str, who: Subject<'_>, allow: bool) -> Level<'r> {
    match level {
        "#" => return Level::Hash,
        "+" => return Level::Plus,
        _ => {}
    }
    if !level.contains("%u") && !level.contains("%c") {
        return Level::Lit(Cow::Borrowed(level));
    }
    let mut out = level.to_owned();
    for (var, name) in [("%u", who.user), ("%c", who.client_id)] {
        if out.contains(var) {
            match name.filter(|n| !n.contains(['/', '+', '#'])) {
                Some(n) => out = out.replace(var, n),
                None if allow => return Level::Never,
                None => return Level::Plus,
            }
        }
    }
    Level::Lit(Cow::Owned(out))
}

/// Whether rule `r` applies to topic name `topic` (no `$` exception).
fn rule_matches(r: &AclRule, who: Subject<'_>, topic: &str) -> bool {
    let mut f = r.filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some(fl), tl) => match resolve(fl, who, r.allow) {
                Level::Hash => return true,
                Level::Plus if tl.is_some() => {}
                Level::Lit(s) if tl == Some(&*s) => {}
                _ => return false,
            },
            (None, None) => return true,
            (None, Some(_)) => return false,
        }
    }
}

/// Whether every topic `filter` matches is matched by rule `r`.
fn rule_covers(r: &AclRule, who: Subject<'_>, filter: &str) -> bool {
    let mut o = r.filter.split('/');
    let mut i = filter.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some(ol), il) => match resolve(ol, who, r.allow) {
                Level::Hash => return true,
                Level::Plus if il.is_some_and(|x| x != "#") => {}
                Level::Lit(s) if il.is_some_and(|x| x != "#" && x != "+" && x == s) => {}
                _ => return false,
            },
            (None, None) => return true,
            (None, Some(_)) => return false,
        }
    }
}

/// Whether some topic is matched by both rule `r` and `filter`.
fn rule_intersects(r: &AclRule, who: Subject<'_>, filter: &str) -> bool {
    let mut o = r.filter.split('/');
    let mut i = filter.split('/');
    loop {
        let (ol, il) = match (o.next(), i.next()) {
            (None, None) => return true,
            // The filter's `#` also matches its parent level.
            (None, Some(x)) => return x == "#",
            (Some(ol), il) => (ol, il),
        };
        let level = resolve(ol, who, r.allow);
        match (level, il) {
            (Level::Never, _) => return false,
            (Level::Hash, _) | (_, Some("#")) => return true,
            (_, None) => return false,
            (Level::Plus, Some(_)) => {}
            (Level::Lit(s), Some(x)) => {
                if x != "+" && x != s {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(user: Option<&str>, access: Access, filter: &str, allow: bool) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            access,
            filter: filter.into(),
            allow,
        }
    }

    fn who<'a>(user: Option<&'a str>, client_id: &'a str) -> Subject<'a> {
        Subject {
            user,
            client_id: Some(client_id),
        }
    }

    #[test]
    fn first_match_wins_with_patterns() {
        let acl = TopicAcl::new(
            vec![
                rule(None, Access::All, "users/%u/#", true),
                rule(None, Access::Subscribe, "users/#", false),
                rule(Some("ro"), Access::Publish, "#", false),
            ],
            AclDefault::Allow,
        );
        let ann = who(Some("ann"), "c");
        assert!(acl.check_filter(ann, Access::Subscribe, "users/ann/+"));
        assert!(!acl.check_filter(ann, Access::Subscribe, "users/bob/x"));
        assert!(!acl.check_filter(ann, Access::Subscribe, "users/#"));
        assert!(
            acl.check_filter(ann, Access::Subscribe, "#"),
            "granted, checked per message"
        );
        assert!(acl.check_topic(ann, Access::Subscribe, "users/ann/x"));
        assert!(!acl.check_topic(ann, Access::Subscribe, "users/bob/x"));
        let ro = who(Some("ro"), "c");
        assert!(!acl.check_topic(ro, Access::Publish, "a/b"));
        assert!(acl.check_filter(ro, Access::Subscribe, "a/b"));
    }

    #[test]
    fn names_with_wildcards_never_widen_a_rule() {
        let acl = TopicAcl::new(
            vec![
                rule(None, Access::All, "app/%c/#", true),
                rule(None, Access::All, "app/#", false),
            ],
            AclDefault::Allow,
        );
        assert!(acl.check_topic(who(None, "me"), Access::Publish, "app/me/x"));
        for id in ["#", "+", "a/b", "me/#"] {
            let w = who(None, id);
            assert!(!acl.check_topic(w, Access::Publish, "app/other/x"), "{id}");
            assert!(
                !acl.check_topic(w, Access::Subscribe, "app/other/x"),
                "{id}"
            );
            assert!(
                !acl.check_filter(w, Access::Subscribe, "app/other/#"),
                "{id}"
            );
            assert!(!acl.check_filter(w, Access::Subscribe, "app/+/x"), "{id}");
        }
        // "a/b" is never the two levels a/b.
        assert!(!acl.check_topic(who(None, "a/b"), Access::Publish, "app/a/b/x"));
        // A deny rule with an unusable name applies to any level.
        let deny = TopicAcl::new(
            vec![rule(None, Access::All, "private/%u/#", false)],
            AclDefault::Allow,
        );
        assert!(!deny.check_topic(who(Some("x/y"), "c"), Access::Publish, "private/z/1"));
        assert!(!deny.check_topic(who(None, "c"), Access::Publish, "private/z/1"));
        assert!(deny.check_topic(who(Some("x"), "c"), Access::Publish, "private/z/1"));
        assert!(!deny.check_topic(who(Some("x"), "c"), Access::Publish, "private/x/1"));
        // Substitution inside a level.
        let part = TopicAcl::new(
            vec![rule(None, Access::All, "dev-%c/#", true)],
            AclDefault::Deny,
        );
        assert!(part.check_topic(who(None, "7"), Access::Publish, "dev-7/t"));
        assert!(!part.check_topic(who(None, "7"), Access::Publish, "dev-8/t"));
        // AMQP has no client id: %c allow rules never apply to it.
        let amqp = Subject {
            user: Some("u"),
            client_id: None,
        };
        assert!(!acl.check_topic(amqp, Access::Publish, "app/x/y"));
    }

    #[test]
    fn wildcards_of_rules_cover_dollar_topics() {
        let acl = TopicAcl::new(vec![rule(None, Access::All, "#", false)], AclDefault::Allow);
        assert!(!acl.check_topic(who(None, "c"), Access::Publish, "$foo/bar"));
        assert!(!acl.check_topic(who(None, "c"), Access::Subscribe, "$SYS/x"));
        let plus = TopicAcl::new(
            vec![rule(None, Access::All, "+/bar", false)],
            AclDefault::Allow,
        );
        assert!(!plus.check_topic(who(None, "c"), Access::Publish, "$foo/bar"));
        let deny = TopicAcl::new(
            vec![rule(None, Access::All, "ok/#", true)],
            AclDefault::Deny,
        );
        assert!(deny.check_topic(who(None, "c"), Access::Publish, "ok/1"));
        assert!(!deny.check_topic(who(None, "c"), Access::Publish, "$foo/bar"));
        assert!(!deny.check_filter(who(None, "c"), Access::Subscribe, "#"));
    }

    #[test]
    fn strict_filter_checks() {
        let acl = TopicAcl::new(
            vec![rule(None, Access::Subscribe, "denied/#", false)],
            AclDefault::Allow,
        );
        let w = who(Some("u"), "c");
        for f in ["#", "+/x", "+/+", "denied/x", "denied/#", "+/#", "denied"] {
            assert!(!acl.check_filter_strict(w, Access::Subscribe, f), "{f}");
        }
        for f in ["ok/#", "ok/+", "x/y", "+/y/z/w/q"] {
            let ok = acl.check_filter_strict(w, Access::Subscribe, f);
            assert_eq!(ok, f != "+/y/z/w/q", "{f}");
        }
        let shadow = TopicAcl::new(
            vec![
                rule(None, Access::All, "a/#", true),
                rule(None, Access::All, "#", false),
            ],
            AclDefault::Allow,
        );
        assert!(shadow.check_filter_strict(w, Access::Subscribe, "a/+"));
        assert!(!shadow.check_filter_strict(w, Access::Subscribe, "#"));
        assert!(
            !TopicAcl::new(vec![], AclDefault::Deny).check_filter_strict(w, Access::Publish, "x")
        );
    }

    #[test]
    fn may_deny_only_with_deny_rules_or_default() {
        let w = who(Some("u"), "c");
        assert!(!TopicAcl::default().may_deny(w, Access::Subscribe));
        assert!(TopicAcl::default().is_open());
        let allow_only = TopicAcl::new(vec![rule(None, Access::All, "#", true)], AclDefault::Allow);
        assert!(!allow_only.may_deny(w, Access::Subscribe));
        let other_user = TopicAcl::new(
            vec![rule(Some("v"), Access::All, "#", false)],
            AclDefault::Allow,
        );
        assert!(!other_user.may_deny(w, Access::Subscribe));
        let pub_only = TopicAcl::new(
            vec![rule(None, Access::Publish, "#", false)],
            AclDefault::Allow,
        );
        assert!(!pub_only.may_deny(w, Access::Subscribe));
        assert!(pub_only.may_deny(w, Access::Publish));
        assert!(TopicAcl::new(vec![], AclDefault::Deny).may_deny(w, Access::Subscribe));
    }

    #[test]
    fn amqp_patterns() {
        assert_eq!(amqp_pattern_to_filter("a.b.c"), "a/b/c");
        assert_eq!(amqp_pattern_to_filter("denied.#"), "denied/#");
        assert_eq!(amqp_pattern_to_filter("*.x"), "+/x");
        assert_eq!(amqp_pattern_to_filter("a.#.b"), "a/#");
        assert_eq!(amqp_pattern_to_filter("#"), "#");
        assert_eq!(amqp_pattern_to_filter("a/b.c"), "a.b/c");
    }

    #[test]
    fn valid_filters() {
        assert!(valid_filter("app/%c/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter(""));
    }
}
