//! A trie of topic patterns: RabbitMQ topic-exchange patterns (`.`-separated words, `*` one
//! word, `#` zero or more words) and MQTT filters (`/`-separated levels, `+` one level,
//! `#` the rest), whose lookup cost grows with the matching patterns and the topic's
//! length, never with the number of patterns that do not match.
//!
//! Both syntaxes share one structure: an MQTT filter `a/+/#` is the pattern `a * #` over
//! `/`; MQTT's `#` matching the parent level (`a/#` matches `a`) is exactly `#` matching
//! zero words. MQTT's one extra rule, that a topic starting with `$` is not matched by a
//! filter starting with a wildcard, is [`Syntax::Mqtt`].

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Which pattern language a trie speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Syntax {
    /// RabbitMQ topic exchange: `.`, `*`, `#`.
    Amqp,
    /// MQTT: `/`, `+`, `#`, and the `$` rule.
    Mqtt,
}

impl Syntax {
    fn separator(self) -> char {
        match self {
            Syntax::Amqp => '.',
            Syntax::Mqtt => '/',
        }
    }

    fn one(self) -> &'static str {
        match self {
            Syntax::Amqp => "*",
            Syntax::Mqtt => "+",
        }
    }
}

/// Patterns mapped to values; one pattern may hold several values.
#[derive(Debug)]
pub struct TopicTrie<V> {
    syntax: Syntax,
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    /// Boxed: most nodes are leaves (an MQTT session's filter ends in one), and an empty
    /// map is 48 bytes of every leaf.
    #[allow(clippy::box_collection)]
    words: Option<Box<HashMap<Box<str>, Node<V>>>>,
    one: Option<Box<Node<V>>>,
    rest: Option<Box<Node<V>>>,
    values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            words: None,
            one: None,
            rest: None,
            values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.words.is_none() && self.one.is_none() && self.rest.is_none()
    }
}

impl<V: Clone + Eq + Hash> TopicTrie<V> {
    /// An empty trie.
    pub fn new(syntax: Syntax) -> Self {
        Self {
            syntax,
            root: Node::default(),
            len: 0,
        }
    }

    /// How many (pattern, value) pairs it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Add `value` under `pattern`. Returns false (and adds nothing) if that exact pair is
    /// already there.
    pub fn insert(&mut self, pattern: &str, value: V) -> bool {
        let one = self.syntax.one();
        let mut node = &mut self.root;
        for word in pattern.split(self.syntax.separator()) {
            node = if word == "#" {
                node.rest.get_or_insert_with(Box::default)
            } else if word == one {
                node.one.get_or_insert_with(Box::default)
            } else {
                node.words
                    .get_or_insert_with(Box::default)
                    .entry(word.into())
                    .or_default()
            };
        }
        if node.values.contains(&value) {
            return false;
        }
        // Most patterns hold one value (an MQTT session's filter): no room for four.
        if node.values.len() == node.values.capacity() && node.values.len() < 4 {
            node.values.reserve_exact(1);
        }
        node.values.push(value);
        self.len += 1;
        true
    }

    /// Remove `value` from `pattern`; prunes empty branches. Returns whether it was there.
    pub fn remove(&mut self, pattern: &str, value: &V) -> bool {
        let words: Vec<&str> = pattern.split(self.syntax.separator()).collect();
        let removed = Self::remove_at(&mut self.root, &words, self.syntax.one(), value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<V>, words: &[&str], one: &str, value: &V) -> bool {
        let Some((first, rest)) = words.split_first() else {
            let before = node.values.len();
            node.values.retain(|v| v != value);
            return node.values.len() < before;
        };
        if *first == "#" {
            let Some(child) = node.rest.as_deref_mut() else {
                return false;
            };
            let removed = Self::remove_at(child, rest, one, value);
            if child.is_empty() {
                node.rest = None;
            }
            removed
        } else if *first == one {
            let Some(child) = node.one.as_deref_mut() else {
                return false;
            };
            let removed = Self::remove_at(child, rest, one, value);
            if child.is_empty() {
                node.one = None;
            }
            removed
        } else {
            let Some(words) = node.words.as_deref_mut() else {
                return false;
            };
            let Some(child) = words.get_mut(*first) else {
                return false;
            };
            let removed = Self::remove_at(child, rest, one, value);
            if child.is_empty() {
                words.remove(*first);
                if words.is_empty() {
                    node.words = None;
                }
            }
            removed
        }
    }

    /// Every value whose pattern matches `topic`, each once, appended to `out`.
    pub fn matches(&self, topic: &str, out: &mut Vec<V>) {
        let words: Vec<&str> = topic.split(self.syntax.separator()).collect();
        let start = out.len();
        let dollar = self.syntax == Syntax::Mqtt && topic.starts_with('$');
        Self::walk(&self.root, &words, !dollar, out);
        // A value can match through several paths (`a.#` and `#.b`): report it once.
        if out.len() - start > 1 {
            let mut seen = HashSet::with_capacity(out.len() - start);
            let mut index = 0;
            out.retain(|v| {
                index += 1;
                index <= start || seen.insert(v.clone())
            });
        }
    }

    fn walk(node: &Node<V>, words: &[&str], wildcards: bool, out: &mut Vec<V>) {
        match words.split_first() {
            None => {
                out.extend(node.values.iter().cloned());
                if let Some(rest) = node.rest.as_deref() {
                    if wildcards {
                        Self::walk(rest, words, true, out);
                    }
                }
            }
            Some((first, tail)) => {
                if let Some(child) = node.words.as_ref().and_then(|w| w.get(*first)) {
                    Self::walk(child, tail, true, out);
                }
                if !wildcards {
                    return;
                }
                if let Some(child) = node.one.as_deref() {
                    Self::walk(child, tail, true, out);
                }
                if let Some(rest) = node.rest.as_deref() {
                    // `#` swallows 0..=all remaining words.
                    for skip in 0..=words.len() {
                        Self::walk(rest, &words[skip..], true, out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hits(t: &TopicTrie<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.matches(topic, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn amqp_patterns() {
        let mut t = TopicTrie::new(Syntax::Amqp);
        t.insert("a.b.c", 1);
        t.insert("a.*.c", 2);
        t.insert("a.#", 3);
        t.insert("#", 4);
        t.insert("#.c", 5);
        t.insert("a.#.c", 6);
        t.insert("*", 7);
        t.insert("", 8);
        assert_eq!(hits(&t, "a.b.c"), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(hits(&t, "a"), vec![3, 4, 7]);
        assert_eq!(hits(&t, "a.c"), vec![3, 4, 5, 6]);
        assert_eq!(hits(&t, "x.y"), vec![4]);
        assert_eq!(hits(&t, ""), vec![4, 7, 8]);
        assert_eq!(hits(&t, "a.x.y.c"), vec![3, 4, 5, 6]);
    }

    #[test]
    fn mqtt_filters_and_the_dollar_rule() {
        let mut t = TopicTrie::new(Syntax::Mqtt);
        t.insert("sport/tennis/#", 1);
        t.insert("sport/+/player1", 2);
        t.insert("#", 3);
        t.insert("+/monitor/Clients", 4);
        t.insert("$SYS/#", 5);
        t.insert("+", 6);
        t.insert("/+", 7);
        assert_eq!(hits(&t, "sport/tennis/player1"), vec![1, 2, 3]);
        assert_eq!(
            hits(&t, "sport/tennis"),
            vec![1, 3],
            "# matches the parent level"
        );
        assert_eq!(hits(&t, "sport"), vec![3, 6]);
        assert_eq!(
            hits(&t, "$SYS/monitor/Clients"),
            vec![5],
            "no leading wildcard on $ topics"
        );
        assert_eq!(hits(&t, "/finance"), vec![3, 7]);
        assert_eq!(hits(&t, "a//b"), vec![3]);
    }

    #[test]
    fn remove_prunes_and_dedups() {
        let mut t = TopicTrie::new(Syntax::Amqp);
        assert!(t.insert("a.#", 1));
        assert!(!t.insert("a.#", 1));
        assert!(t.insert("#.b", 1));
        assert_eq!(
            hits(&t, "a.b"),
            vec![1],
            "one value, matched twice, reported once"
        );
        assert!(t.remove("a.#", &1));
        assert!(!t.remove("a.#", &1));
        assert!(t.remove("#.b", &1));
        assert!(t.is_empty());
        assert!(t.root.is_empty());
    }

    /// A direct implementation of the matching rules, to check the trie against.
    fn reference(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.split_first(), topic.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => (0..=topic.len()).any(|i| reference(rest, &topic[i..])),
            (Some((&"*", rest)), Some((_, trest))) => reference(rest, trest),
            (Some((p, rest)), Some((w, trest))) => p == w && reference(rest, trest),
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn trie_agrees_with_reference(
            patterns in proptest::collection::vec(proptest::collection::vec(prop::sample::select(vec!["a", "b", "*", "#", ""]).prop_map(String::from), 1..5), 1..12),
            topics in proptest::collection::vec(proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", ""]).prop_map(String::from), 1..6), 1..12),
        ) {
            let mut t = TopicTrie::new(Syntax::Amqp);
            for (i, p) in patterns.iter().enumerate() {
                t.insert(&p.join("."), i);
            }
            for topic in &topics {
                let mut got = Vec::new();
                t.matches(&topic.join("."), &mut got);
                got.sort_unstable();
                let want: Vec<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| {
                        let p: Vec<&str> = p.iter().map(String::as_str).collect();
                        let t: Vec<&str> = topic.iter().map(String::as_str).collect();
                        reference(&p, &t)
                    })
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(got, want, "topic {:?}", topic);
            }
            for (i, p) in patterns.iter().enumerate() {
                t.remove(&p.join("."), &i);
            }
            prop_assert!(t.is_empty());
        }
    }
}
