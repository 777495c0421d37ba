//! Topic names, topic filters and the subscription trie (spec section 4.7, shared subscriptions 4.8).
//!
//! Owns the rules of what a valid name or filter is and how filters match names. Knows nothing of
//! connections or sessions: subscribers are opaque keys chosen by the caller.

mod trie;

pub use trie::SubTrie;

use crate::codec::DecodeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("zero-length topic name or filter [MQTT-4.7.3-1]")]
    Empty,
    #[error("wildcard in a topic name [MQTT-3.3.2-2]")]
    WildcardInName,
    #[error("'#' is not the last character of the filter, alone in its level [MQTT-4.7.1-2]")]
    BadMultiLevelWildcard,
    #[error("'+' does not occupy a whole level of the filter [MQTT-4.7.1-3]")]
    BadSingleLevelWildcard,
    #[error("malformed shared subscription: $share/{{ShareName}}/{{filter}} [MQTT-4.8.2-1]/[MQTT-4.8.2-2]")]
    BadShare,
}

impl TopicError {
    pub fn as_decode_error(self) -> DecodeError {
        match self {
            TopicError::Empty => DecodeError::EmptyTopicName,
            _ => DecodeError::WildcardInTopicName,
        }
    }
}

/// A topic name a PUBLISH (or will) may carry.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if memchr::memchr2(b'+', b'#', name.as_bytes()).is_some() {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// A topic filter a SUBSCRIBE may carry (not a `$share/` one: see `parse_shared`).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let b = filter.as_bytes();
    for i in memchr::memchr2_iter(b'+', b'#', b) {
        let alone = (i == 0 || b[i - 1] == b'/') && (i + 1 == b.len() || b[i + 1] == b'/');
        if b[i] == b'#' {
            if !alone || i + 1 != b.len() {
                return Err(TopicError::BadMultiLevelWildcard);
            }
        } else if !alone {
            return Err(TopicError::BadSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Whether a filter has a wildcard, i.e. can match more than one name.
pub fn has_wildcard(filter: &str) -> bool {
    memchr::memchr2(b'+', b'#', filter.as_bytes()).is_some()
}

/// A `$share/{ShareName}/{filter}` subscription, split into its group and its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

/// `Ok(None)` for an ordinary filter, `Ok(Some(..))` for a valid shared one, `Err` for a filter
/// that starts with `$share/` but breaks its rules. Validates the inner filter too.
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        if filter == "$share" {
            return Err(TopicError::BadShare);
        }
        return Ok(None);
    };
    let slash = memchr::memchr(b'/', rest.as_bytes()).ok_or(TopicError::BadShare)?;
    let (group, inner) = (&rest[..slash], &rest[slash + 1..]);
    // [MQTT-4.8.2-2]: the ShareName has at least one character and no '/', '+' or '#'.
    if group.is_empty() || has_wildcard(group) || inner.is_empty() {
        return Err(TopicError::BadShare);
    }
    validate_filter(inner)?;
    Ok(Some(SharedFilter { group, filter: inner }))
}

/// The reference definition of matching, level by level; the trie must agree with it.
pub fn filter_matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false; // [MQTT-4.7.2-1]
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_rules_follow_4_7_1() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "+/#", "$SYS/#", "sport/tennis/+"] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        for bad in ["a#", "#/a", "a/#/b", "a/b#"] {
            assert_eq!(validate_filter(bad), Err(TopicError::BadMultiLevelWildcard), "{bad}");
        }
        for bad in ["a+", "+a", "a/b+/c"] {
            assert_eq!(validate_filter(bad), Err(TopicError::BadSingleLevelWildcard), "{bad}");
        }
    }

    #[test]
    fn names_have_no_wildcards() {
        assert_eq!(validate_name("a/b"), Ok(()));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared_filters_are_recognised() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/+"), Ok(Some(SharedFilter { group: "g", filter: "a/+" })));
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(SharedFilter { group: "g", filter: "#" })));
        for bad in ["$share/g", "$share//a", "$share/g+/a", "$share/g/", "$share/g/a#", "$share"] {
            assert!(parse_shared(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reference_matcher_follows_spec_examples() {
        // Examples of 4.7.1.2 and 4.7.1.3.
        assert!(filter_matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(filter_matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!filter_matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        // [MQTT-4.7.2-1]
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }
}
