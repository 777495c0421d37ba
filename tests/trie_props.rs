//! The trie agrees with the level-by-level reference matcher on random filters and topics, and
//! churn frees every branch.

use proptest::prelude::*;
use tern::topic::{filter_matches, validate_filter, SubTrie};

fn level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c", "", "$s", "+", "#"])
}

fn name_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "c", "", "$s"])
}

fn filter() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..5)
        .prop_map(|ls| ls.join("/"))
        .prop_filter("valid", |f| validate_filter(f).is_ok())
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(name_level(), 1..5).prop_map(|ls| ls.join("/")).prop_filter("non-empty", |n| !n.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn trie_matches_like_the_reference(filters in prop::collection::vec(filter(), 0..40), topics in prop::collection::vec(name(), 1..20)) {
        let mut trie = SubTrie::new();
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, i, ()).unwrap();
        }
        for t in &topics {
            let mut got: Vec<usize> = trie.matches(t).into_iter().map(|(k, _)| k).collect();
            got.sort();
            let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| filter_matches(f, t)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want, "topic {:?}", t);
        }
    }

    #[test]
    fn churn_leaves_nothing_behind(ops in prop::collection::vec((filter(), 0u8..4, any::<bool>()), 0..200)) {
        let mut trie = SubTrie::new();
        let mut live = std::collections::HashSet::new();
        for (f, key, add) in &ops {
            if *add {
                trie.insert(f, *key, ()).unwrap();
                live.insert((f.clone(), *key));
            } else {
                prop_assert_eq!(trie.remove(f, key).is_some(), live.remove(&(f.clone(), *key)));
            }
            prop_assert_eq!(trie.len(), live.len());
        }
        for (f, key) in live.drain() {
            prop_assert!(trie.remove(&f, &key).is_some());
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.node_count(), 1, "only the root is left");
    }
}
