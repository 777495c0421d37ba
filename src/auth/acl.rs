//! mosquitto's ACL file: `user NAME`, `topic [read|write|readwrite|deny] TOPIC` and
//! `pattern [access] TOPIC` (with `%c` and `%u` standing for whole levels), `#` comments. Topic
//! lines before the first `user` line apply to clients without a username; patterns apply to
//! everyone. Deny rules are looked at first; nothing matched means denied; topics starting with
//! `$` only match rules that start with `$`; a username or client id containing `+` or `#` gets
//! no pattern rules.

use std::collections::HashMap;

use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, a: Access) -> bool {
        matches!((self, a), (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write))
    }
}

#[derive(Debug, Clone)]
struct Rule {
    grant: Grant,
    filter: String,
}

#[derive(Debug, Default, Clone)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let rest = rest.trim();
    let (grant, filter) = match rest.split_once(char::is_whitespace) {
        Some((a, f)) if matches!(a, "read" | "write" | "readwrite" | "deny") => {
            let grant = match a {
                "read" => Grant::Read,
                "write" => Grant::Write,
                "readwrite" => Grant::ReadWrite,
                _ => Grant::Deny,
            };
            (grant, f.trim())
        }
        _ => (Grant::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err("a topic is missing".into());
    }
    // %c and %u are checked once filled in; the rest must already be a valid filter.
    let check = filter.replace("%c", "c").replace("%u", "u");
    topic::validate_filter(&check).map_err(|e| format!("{filter:?} is not a topic filter: {e}"))?;
    Ok(Rule { grant, filter: filter.to_string() })
}

impl Acl {
    /// Parses the file's text; an error names the line.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |e: String| format!("line {}: {e}", i + 1);
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            match word {
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(err("`user` needs a name".into()));
                    }
                    user = Some(name.to_string());
                    acl.users.entry(name.to_string()).or_default();
                }
                "topic" => {
                    let rule = parse_rule(rest).map_err(err)?;
                    match &user {
                        Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                        None => acl.anonymous.push(rule),
                    }
                }
                "pattern" => acl.patterns.push(parse_rule(rest).map_err(err)?),
                other => return Err(err(format!("unknown keyword {other:?} (expected user, topic or pattern)"))),
            }
        }
        Ok(acl)
    }

    pub fn load(path: &std::path::Path) -> Result<Acl, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The rules that apply to a client, patterns filled in.
    fn rules_for(&self, user: Option<&str>, client_id: &str) -> Vec<Rule> {
        let mut rules = match user {
            Some(u) => self.users.get(u).cloned().unwrap_or_default(),
            None => self.anonymous.clone(),
        };
        let unsafe_name = |s: &str| s.contains('+') || s.contains('#');
        if !unsafe_name(client_id) && !user.is_some_and(unsafe_name) {
            for p in &self.patterns {
                if p.filter.contains("%u") && user.is_none() {
                    continue;
                }
                let filter = p.filter.replace("%c", client_id).replace("%u", user.unwrap_or(""));
                if topic::validate_filter(&filter).is_ok() {
                    rules.push(Rule { grant: p.grant, filter });
                }
            }
        }
        rules
    }

    /// One client's view of the file, to be asked per topic and cached by the caller.
    pub fn client(&self, user: Option<&str>, client_id: &str) -> ClientAcl {
        ClientAcl { rules: self.rules_for(user, client_id) }
    }
}

/// The rules that apply to one client.
#[derive(Debug, Clone)]
pub struct ClientAcl {
    rules: Vec<Rule>,
}

impl ClientAcl {
    /// May the client read (receive) or write (publish) `topic`? Deny first, then any grant.
    pub fn allows(&self, topic_name: &str, access: Access) -> bool {
        let dollar = topic_name.starts_with('$');
        let matching =
            |r: &&Rule| (!dollar || r.filter.starts_with('$')) && topic::filter_matches(&r.filter, topic_name);
        if self.rules.iter().filter(matching).any(|r| r.grant == Grant::Deny) {
            return false;
        }
        self.rules.iter().filter(matching).any(|r| r.grant.allows(access))
    }

    /// May everything `filter` matches be read? (Then deliveries through it need no check.)
    pub fn grants_whole(&self, filter: &str) -> bool {
        let dollar = filter.starts_with('$');
        let applies = |r: &&Rule| !dollar || r.filter.starts_with('$');
        !self.rules.iter().filter(applies).any(|r| r.grant == Grant::Deny && overlap(&r.filter, filter))
            && self.rules.iter().filter(applies).any(|r| r.grant.allows(Access::Read) && covers(&r.filter, filter))
    }

    /// May a SUBSCRIBE to `filter` ever deliver anything? Only if some read grant overlaps it and
    /// no deny rule covers all of it. (What it overlaps is then checked per message.)
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let dollar = filter.starts_with('$');
        let applies = |r: &&Rule| !dollar || r.filter.starts_with('$');
        if self.rules.iter().filter(applies).any(|r| r.grant == Grant::Deny && covers(&r.filter, filter)) {
            return false;
        }
        self.rules.iter().filter(applies).filter(|r| r.grant.allows(Access::Read)).any(|r| overlap(&r.filter, filter))
    }
}

/// Whether some topic matches both filters.
fn overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if *x == "+" || *y == "+" || x == y => i += 1,
            _ => return false,
        }
    }
}

/// Whether every topic `inner` matches, `outer` matches too.
fn covers(outer: &str, inner: &str) -> bool {
    let (o, n): (Vec<&str>, Vec<&str>) = (outer.split('/').collect(), inner.split('/').collect());
    let mut i = 0;
    loop {
        match (o.get(i), n.get(i)) {
            (Some(&"#"), _) => return true,
            (None, None) => return true,
            (Some(&"+"), Some(y)) if *y != "#" => i += 1,
            (Some(x), Some(y)) if x == y => i += 1,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite sensors/#
topic deny sensors/secret
topic read $SYS/broker/clients/#

user bob
topic write sensors/bob/+

pattern readwrite devices/%c/#
pattern read users/%u/inbox
";

    #[test]
    fn each_rule_kind_with_deny_first() {
        let acl = Acl::parse(FILE).unwrap();
        let anon = acl.client(None, "anon-1");
        assert!(anon.allows("public/news", Access::Read));
        assert!(!anon.allows("public/news", Access::Write), "read only");
        assert!(!anon.allows("sensors/x", Access::Read), "nothing matched: denied");
        let alice = acl.client(Some("alice"), "a1");
        assert!(alice.allows("sensors/room/t", Access::Write));
        assert!(!alice.allows("sensors/secret", Access::Read), "deny beats readwrite");
        assert!(!alice.allows("public/news", Access::Read), "anonymous rules are not hers");
        let bob = acl.client(Some("bob"), "b1");
        assert!(bob.allows("sensors/bob/t", Access::Write));
        assert!(!bob.allows("sensors/bob/t", Access::Read), "write only");
    }

    #[test]
    fn patterns_fill_whole_levels_and_skip_wildcard_names() {
        let acl = Acl::parse(FILE).unwrap();
        let c = acl.client(Some("bob"), "dev-7");
        assert!(c.allows("devices/dev-7/state", Access::Write));
        assert!(!c.allows("devices/dev-8/state", Access::Write));
        assert!(c.allows("users/bob/inbox", Access::Read));
        assert!(!acl.client(None, "dev-7").allows("users//inbox", Access::Read), "%u needs a user");
        let sneaky = acl.client(Some("bob"), "#");
        assert!(!sneaky.allows("devices/x/state", Access::Write), "a client id with # gets no patterns");
    }

    #[test]
    fn dollar_topics_only_match_dollar_rules() {
        let acl =
            Acl::parse("user root\ntopic readwrite #\ntopic read $SYS/#\nuser plain\ntopic readwrite #\n").unwrap();
        assert!(acl.client(Some("root"), "r").allows("$SYS/broker/uptime", Access::Read));
        assert!(!acl.client(Some("plain"), "p").allows("$SYS/broker/uptime", Access::Read));
    }

    #[test]
    fn subscriptions_are_granted_where_something_may_be_read() {
        let acl = Acl::parse(FILE).unwrap();
        let alice = acl.client(Some("alice"), "a1");
        assert!(alice.may_subscribe("sensors/#"), "granted; sensors/secret is filtered per message");
        assert!(alice.may_subscribe("#"), "overlaps sensors/#");
        assert!(!alice.may_subscribe("sensors/secret"), "covered by a deny");
        assert!(!alice.may_subscribe("other/+"));
        assert!(alice.grants_whole("sensors/room/+"), "no check per message");
        assert!(!alice.grants_whole("sensors/#"), "sensors/secret is inside: checked per message");
        assert!(!alice.grants_whole("#"));
        assert!(alice.may_subscribe("$SYS/broker/clients/connected"));
        assert!(!alice.may_subscribe("$SYS/broker/uptime"));
    }

    #[test]
    fn filters_cover_and_overlap() {
        assert!(covers("a/+", "a/b") && !covers("a/+", "a/#") && covers("#", "a/#"));
        assert!(overlap("a/+/c", "a/b/#") && !overlap("a/b", "a/c"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = Acl::parse("user a\ntopic read a/#/b\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = Acl::parse("users a\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}

/// A session's view of the ACL, with its decisions cached per topic (bounded; cleared whole
/// when full) so the delivery path does not walk the rules per message.
#[derive(Debug)]
pub struct SessionAccess {
    rules: ClientAcl,
    user: Option<Box<str>>,
    /// `Auth::acl_generation` the rules were built from.
    pub generation: u64,
    cache: HashMap<Box<str>, u8, crate::session::FixedState>,
}

const CACHE_MAX: usize = 4096;
const READ_KNOWN: u8 = 1;
const READ_OK: u8 = 2;
const WRITE_KNOWN: u8 = 4;
const WRITE_OK: u8 = 8;

impl SessionAccess {
    pub fn new(rules: ClientAcl, user: Option<&str>, generation: u64) -> SessionAccess {
        SessionAccess { rules, user: user.map(Into::into), generation, cache: HashMap::default() }
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// New rules (the ACL file was reloaded): the cache goes with the old ones.
    pub fn replace(&mut self, rules: ClientAcl, generation: u64) {
        self.rules = rules;
        self.generation = generation;
        self.cache.clear();
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.rules.may_subscribe(filter)
    }

    pub fn grants_whole(&self, filter: &str) -> bool {
        self.rules.grants_whole(filter)
    }

    pub fn allows(&mut self, topic_name: &str, access: Access) -> bool {
        let (known, ok) = match access {
            Access::Read => (READ_KNOWN, READ_OK),
            Access::Write => (WRITE_KNOWN, WRITE_OK),
        };
        if let Some(&bits) = self.cache.get(topic_name) {
            if bits & known != 0 {
                return bits & ok != 0;
            }
        }
        let allowed = self.rules.allows(topic_name, access);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        let bits = self.cache.entry(topic_name.into()).or_default();
        *bits |= known | if allowed { ok } else { 0 };
        allowed
    }
}
