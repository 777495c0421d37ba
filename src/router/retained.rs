//! The retained store (spec 3.3.1.3): one message per topic, kept in a tree of topic levels so a
//! SUBSCRIBE costs what its filter matches: an exact topic walks its own levels, `a/+/c` the
//! children of `a`, and only `#` visits everything under it. A scan of every retained message per
//! filter made one SUBSCRIBE of thousands of filters stall a worker for seconds.

use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;

use crate::session::Message;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node, ahash::RandomState>,
    msg: Option<Arc<Message>>,
}

#[derive(Default)]
pub struct RetainedTree {
    root: Node,
    len: usize,
    /// Topic and payload bytes of every message kept, for `max_retained_bytes`.
    bytes: usize,
}

impl RetainedTree {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn contains(&self, topic: &str) -> bool {
        self.get(topic).is_some()
    }

    /// The retained message of exactly this topic.
    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.msg.as_ref()
    }

    /// Stores `msg` as the retained message of its topic. Returns whether the topic is new.
    pub fn insert(&mut self, msg: Arc<Message>) -> bool {
        let mut node = &mut self.root;
        for level in msg.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        self.bytes += msg.size();
        let old = node.msg.replace(msg);
        if let Some(old) = &old {
            self.bytes -= old.size();
        }
        self.len += old.is_none() as usize;
        old.is_none()
    }

    /// Clears a topic's retained message [MQTT-3.3.1-10], freeing the levels nothing else uses.
    pub fn remove(&mut self, topic: &str) -> bool {
        fn go(node: &mut Node, mut levels: std::str::Split<'_, char>) -> Option<usize> {
            let Some(level) = levels.next() else { return node.msg.take().map(|m| m.size()) };
            let child = node.children.get_mut(level)?;
            let removed = go(child, levels);
            if removed.is_some() && child.msg.is_none() && child.children.is_empty() {
                node.children.remove(level);
            }
            removed
        }
        let removed = go(&mut self.root, topic.split('/'));
        if let Some(size) = removed {
            self.len -= 1;
            self.bytes -= size;
        }
        removed.is_some()
    }

    /// Every unexpired retained message whose topic matches `filter` (a valid, non-shared filter).
    /// Topics starting with `$` do not match a filter starting with a wildcard [MQTT-4.7.2-1].
    pub fn for_each_match(&self, filter: &str, now: Instant, mut f: impl FnMut(&Arc<Message>)) {
        let levels: Vec<&str> = filter.split('/').collect();
        walk(&self.root, &levels, true, now, &mut f);
    }
}

fn emit(node: &Node, now: Instant, f: &mut impl FnMut(&Arc<Message>)) {
    if let Some(m) = &node.msg {
        if !m.expired(now) {
            f(m);
        }
    }
}

fn walk(node: &Node, levels: &[&str], root: bool, now: Instant, f: &mut impl FnMut(&Arc<Message>)) {
    let Some((&level, rest)) = levels.split_first() else {
        emit(node, now, f);
        return;
    };
    match level {
        // `#` matches the parent level too: `a/#` matches `a` [MQTT-4.7.1-2].
        "#" => {
            emit(node, now, f);
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    everything(child, now, f);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    walk(child, rest, false, now, f);
                }
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                walk(child, rest, false, now, f);
            }
        }
    }
}

fn everything(node: &Node, now: Instant, f: &mut impl FnMut(&Arc<Message>)) {
    emit(node, now, f);
    for child in node.children.values() {
        everything(child, now, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{MqttStr, QoS};
    use crate::topic::filter_matches;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message::plain(MqttStr::from(topic), bytes::Bytes::from_static(b"x"), QoS::AtMostOnce, true))
    }

    const TOPICS: &[&str] =
        &["a", "a/b", "a/b/c", "a/c", "b", "/", "/a", "a/", "$SYS/x", "$SYS", "a//b", "x/y/z", "a/b/c/d"];
    const FILTERS: &[&str] = &[
        "#",
        "+",
        "a",
        "a/#",
        "a/+",
        "a/+/c",
        "+/b",
        "+/+",
        "/+",
        "+/",
        "$SYS/#",
        "$SYS",
        "+/x",
        "a//b",
        "a/+/+/#",
        "x/y/z",
        "nothing/here",
    ];

    #[test]
    fn matches_what_the_reference_matcher_matches() {
        let mut t = RetainedTree::default();
        for topic in TOPICS {
            assert!(t.insert(msg(topic)));
        }
        assert_eq!(t.len(), TOPICS.len());
        let now = Instant::now();
        for filter in FILTERS {
            let mut got: Vec<String> = vec![];
            t.for_each_match(filter, now, |m| got.push(m.topic.to_string()));
            got.sort();
            let mut want: Vec<String> =
                TOPICS.iter().filter(|topic| filter_matches(filter, topic)).map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "filter {filter}");
        }
    }

    #[test]
    fn replacing_keeps_one_per_topic_and_removing_frees_the_branch() {
        let mut t = RetainedTree::default();
        assert!(t.insert(msg("a/b/c")));
        assert!(!t.insert(msg("a/b/c")));
        assert!(t.insert(msg("a")));
        assert_eq!(t.len(), 2);
        assert!(t.remove("a/b/c"));
        assert!(!t.remove("a/b/c"));
        assert!(!t.contains("a/b/c"));
        assert!(t.contains("a"));
        assert!(t.root.children["a"].children.is_empty(), "the empty branch is freed");
        assert!(t.remove("a"));
        assert!(t.root.children.is_empty() && t.is_empty());
    }
}
