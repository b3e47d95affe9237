//! Topic names and filters: validation, matching, shared subscriptions, `$delayed`.

/// Whether `filter` is a valid MQTT topic filter: non-empty, `#` only as the whole last
/// level, `+` only as a whole level (the core checks topic rules with the same function).
pub use mqgate_core::acl::valid_filter;

/// Whether topic name `topic` matches `filter` (which must be valid), with the `$` rule:
/// a filter starting with a wildcard does not match a topic starting with `$` (the
/// core's, which matches retained messages with it).
pub use mqgate_core::retained::filter_matches as matches;

/// Whether every topic `inner` matches is also matched by `outer` (both valid filters):
/// how an ACL rule's filter covers a subscription's filter.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Not a valid `$share/...` or `$delayed/...` form.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadForm;

/// A `$share/<name>/<filter>` subscription split into its share name and filter.
/// `Err` when it starts with `$share/` but is not a valid shared subscription.
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, BadForm> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let (name, f) = rest.split_once('/').ok_or(BadForm)?;
    if name.is_empty() || name.contains(['+', '#']) || !valid_filter(f) {
        return Err(BadForm);
    }
    Ok(Some((name, f)))
}

/// EMQX's `$delayed/<seconds>/<topic>`: the delay and the real topic; `Err` when the
/// prefix is there but the rest is not a delay and a topic.
pub fn parse_delayed(topic: &str) -> Result<Option<(u64, &str)>, BadForm> {
    let Some(rest) = topic.strip_prefix("$delayed/") else {
        return Ok(None);
    };
    let (secs, t) = rest.split_once('/').ok_or(BadForm)?;
    let secs: u64 = secs.parse().map_err(|_| BadForm)?;
    if t.is_empty() {
        return Err(BadForm);
    }
    Ok(Some((secs, t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "#", "+", "a/#", "a/+/c", "+/+", "/", "a//b", "$SYS/#", "sport/+",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+/b", "#/a", "a/b#", "++"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+", ""));
        assert!(!matches("+", "a/b"));
        assert!(matches("+/+", "/a"));
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn coverage() {
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("+/b", "x/b"));
        assert!(!covers("+/b", "#"));
        assert!(!covers("a/+", "a/#"));
        assert!(covers("#", "#"));
    }

    #[test]
    fn shared_and_delayed() {
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert!(parse_shared("$share/g").is_err());
        assert!(parse_shared("$share//a").is_err());
        assert_eq!(parse_delayed("$delayed/10/a/b"), Ok(Some((10, "a/b"))));
        assert!(parse_delayed("$delayed/x/a").is_err());
    }
}
