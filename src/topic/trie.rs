//! The subscription trie: filter levels are edges, subscribers hang off the node where their
//! filter ends. A lookup walks the topic's levels once, following the exact level, `+` and `#`.
//!
//! Generic over the subscriber key `K` and the per-subscription value `V`, so the broker can use it
//! for local subscribers (key: session) and for cross-worker interest (key: worker index).

use std::collections::HashMap;

use super::{validate_filter, TopicError};

type Map<T> = HashMap<Box<str>, T, ahash::RandomState>;

struct Node<K, V> {
    children: Map<Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Subscribers whose filter ends here.
    subs: Vec<(K, V)>,
    /// Subscribers whose filter ends here with a further `#` level: `#` is always last, so it needs
    /// no node of its own.
    multi: Vec<(K, V)>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: Map::default(), plus: None, subs: Vec::new(), multi: Vec::new() }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.subs.is_empty() && self.multi.is_empty()
    }
}

fn split(s: &str) -> (&str, Option<&str>) {
    match memchr::memchr(b'/', s.as_bytes()) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

pub struct SubTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for SubTrie<K, V> {
    fn default() -> Self {
        SubTrie { root: Node::default(), len: 0 }
    }
}

impl<K: PartialEq + Copy, V> SubTrie<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes in the trie, root included: what churn must give back.
    pub fn node_count(&self) -> usize {
        fn count<K, V>(n: &Node<K, V>) -> usize {
            1 + n.children.values().map(count).sum::<usize>() + n.plus.as_deref().map_or(0, count)
        }
        count(&self.root)
    }

    /// Adds or replaces `key`'s subscription to `filter`; returns the value it replaced.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Result<Option<V>, TopicError> {
        validate_filter(filter)?;
        let mut node = &mut self.root;
        let mut rest = Some(filter);
        let list = loop {
            let Some(r) = rest else { break &mut node.subs };
            let (level, next) = split(r);
            match level {
                "#" => break &mut node.multi,
                "+" => node = node.plus.get_or_insert_with(Default::default),
                _ => {
                    if !node.children.contains_key(level) {
                        node.children.insert(level.into(), Node::default());
                    }
                    node = node.children.get_mut(level).expect("child was just ensured");
                }
            }
            rest = next;
        };
        if let Some(slot) = list.iter_mut().find(|(k, _)| *k == key) {
            return Ok(Some(std::mem::replace(&mut slot.1, value)));
        }
        list.push((key, value));
        self.len += 1;
        Ok(None)
    }

    /// Removes `key`'s subscription to `filter`, freeing every branch it leaves empty.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let v = remove_in(&mut self.root, Some(filter), key);
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    /// The subscribers whose filter is exactly `filter`.
    fn list_at(&self, filter: &str) -> Option<&Vec<(K, V)>> {
        let mut node = &self.root;
        let mut rest = Some(filter);
        loop {
            let Some(r) = rest else { return Some(&node.subs) };
            let (level, next) = split(r);
            node = match level {
                "#" => return Some(&node.multi),
                "+" => node.plus.as_deref()?,
                _ => node.children.get(level)?,
            };
            rest = next;
        }
    }

    /// Whether `key` is subscribed to exactly `filter`.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        self.list_at(filter)?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// How many subscribers `filter` has, exactly as written.
    pub fn count_at(&self, filter: &str) -> usize {
        self.list_at(filter).map_or(0, |l| l.len())
    }

    /// How many subscribers `filter` has, exactly as written, among those `which` picks.
    pub fn count_at_where(&self, filter: &str, which: impl Fn(&K) -> bool) -> usize {
        self.list_at(filter).map_or(0, |l| l.iter().filter(|(k, _)| which(k)).count())
    }

    /// Calls `f` for every subscription whose filter matches `topic`. A subscriber with several
    /// matching filters is reported once per filter, so the caller can merge them (one delivery at
    /// the highest QoS, every subscription identifier).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        walk(&self.root, topic, true, &mut f);
    }

    /// Every matching (key, value), cloned. Convenience over `for_each_match`.
    pub fn matches(&self, topic: &str) -> Vec<(K, V)>
    where
        V: Clone,
    {
        let mut out = Vec::new();
        self.for_each_match(topic, |k, v| out.push((*k, v.clone())));
        out
    }
}

fn emit<K, V>(list: &[(K, V)], f: &mut impl FnMut(&K, &V)) {
    for (k, v) in list {
        f(k, v);
    }
}

fn walk<K, V>(node: &Node<K, V>, topic: &str, root: bool, f: &mut impl FnMut(&K, &V)) {
    let (level, rest) = split(topic);
    // [MQTT-4.7.2-1]: a filter starting with a wildcard does not match a topic starting with '$'.
    let wildcards = !(root && level.starts_with('$'));
    if wildcards {
        emit(&node.multi, f);
    }
    if let Some(child) = node.children.get(level) {
        descend(child, rest, f);
    }
    if wildcards {
        if let Some(plus) = &node.plus {
            descend(plus, rest, f);
        }
    }
}

fn descend<K, V>(node: &Node<K, V>, rest: Option<&str>, f: &mut impl FnMut(&K, &V)) {
    match rest {
        Some(r) => walk(node, r, false, f),
        None => {
            emit(&node.subs, f);
            // "sport/#" matches "sport": '#' also matches the parent level (4.7.1.2).
            emit(&node.multi, f);
        }
    }
}

fn take<K: PartialEq, V>(list: &mut Vec<(K, V)>, key: &K) -> Option<V> {
    let i = list.iter().position(|(k, _)| k == key)?;
    let (_, v) = list.swap_remove(i);
    if list.is_empty() {
        *list = Vec::new(); // give the capacity back: churn must not pin memory
    }
    Some(v)
}

fn remove_in<K: PartialEq, V>(node: &mut Node<K, V>, rest: Option<&str>, key: &K) -> Option<V> {
    let Some(r) = rest else { return take(&mut node.subs, key) };
    let (level, next) = split(r);
    match level {
        "#" => take(&mut node.multi, key),
        "+" => {
            let plus = node.plus.as_deref_mut()?;
            let v = remove_in(plus, next, key);
            if plus.is_empty() {
                node.plus = None;
            }
            v
        }
        _ => {
            let child = node.children.get_mut(level)?;
            let v = remove_in(child, next, key);
            if child.is_empty() {
                node.children.remove(level);
                if node.children.is_empty() {
                    node.children = Map::default();
                }
            }
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(t: &SubTrie<u32, u8>, topic: &str) -> Vec<u32> {
        let mut v: Vec<u32> = t.matches(topic).into_iter().map(|(k, _)| k).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_match_per_spec() {
        let mut t = SubTrie::new();
        t.insert("a/#", 1, 0).unwrap();
        t.insert("a/+", 2, 0).unwrap();
        t.insert("+/+", 3, 0).unwrap();
        t.insert("#", 4, 0).unwrap();
        t.insert("a/b", 5, 0).unwrap();
        t.insert("$SYS/#", 6, 0).unwrap();
        assert_eq!(keys(&t, "a"), vec![1, 4]); // "a/#" matches its parent level
        assert_eq!(keys(&t, "a/b"), vec![1, 2, 3, 4, 5]);
        assert_eq!(keys(&t, "a/"), vec![1, 2, 3, 4]); // '+' matches an empty level
        assert_eq!(keys(&t, "a/b/c"), vec![1, 4]);
        assert_eq!(keys(&t, "$SYS/x"), vec![6]); // [MQTT-4.7.2-1]
    }

    #[test]
    fn overlapping_subscriptions_of_one_subscriber_are_each_reported() {
        let mut t = SubTrie::new();
        t.insert("a/+", 7, 1).unwrap();
        t.insert("a/#", 7, 2).unwrap();
        let mut m = t.matches("a/b");
        m.sort();
        assert_eq!(m, vec![(7, 1), (7, 2)]);
    }

    #[test]
    fn insert_replaces_and_remove_frees_branches() {
        let mut t = SubTrie::new();
        assert_eq!(t.insert("a/b/c", 1, 0).unwrap(), None);
        assert_eq!(t.insert("a/b/c", 1, 2).unwrap(), Some(0));
        assert_eq!(t.len(), 1);
        t.insert("a/+/#", 2, 0).unwrap();
        assert_eq!(t.get("a/b/c", &1), Some(&2));
        assert_eq!(t.remove("a/b/c", &1), Some(2));
        assert_eq!(t.remove("a/b/c", &1), None);
        assert_eq!(t.remove("a/+/#", &2), Some(0));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "every branch is freed");
    }

    #[test]
    fn invalid_filters_are_refused() {
        let mut t: SubTrie<u32, ()> = SubTrie::new();
        assert_eq!(t.insert("a/#/b", 1, ()), Err(TopicError::BadMultiLevelWildcard));
        assert!(t.is_empty());
    }
}
