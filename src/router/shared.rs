//! Shared subscription groups (5.0 `$share/{group}/{filter}`, spec 4.8.2) homed on this worker:
//! their members, wherever those live, and the round-robin cursor that picks one per message.

use hashbrown::HashMap;
use slab::Slab;

use crate::codec::MqttStr;
use crate::session::{GroupKey, Subscription};
use crate::topic::SubTrie;

/// A member of a shared group: a session on some worker. `session_uid` tells it from a later
/// session that reuses the slab key.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub worker: u16,
    pub session: u32,
    pub session_uid: u64,
    pub sub: Subscription,
}

struct Group {
    key: GroupKey,
    members: Vec<Member>,
    cursor: usize,
}

#[derive(Default)]
pub struct SharedGroups {
    groups: Slab<Group>,
    index: HashMap<GroupKey, usize, ahash::RandomState>,
    trie: SubTrie<u32, ()>,
}

/// A group's slab key on its home worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupId(usize);

impl SharedGroups {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds (or updates) a member. Returns true when this created the group, so its filter is
    /// now of interest to this worker.
    pub fn join(&mut self, key: GroupKey, member: Member) -> bool {
        let (g, created) = match self.index.get(&key) {
            Some(&g) => (g, false),
            None => {
                let g = self.groups.insert(Group { key: key.clone(), members: Vec::new(), cursor: 0 });
                let _ = self.trie.insert(&key.1, g as u32, ());
                self.index.insert(key, g);
                (g, true)
            }
        };
        let members = &mut self.groups[g].members;
        match members.iter_mut().find(|m| m.worker == member.worker && m.session == member.session) {
            Some(m) => m.sub = member.sub,
            None => members.push(member),
        }
        created
    }

    /// Removes a member. Returns the group's filter when that was its last member: the group is
    /// gone and its filter no longer of interest to this worker.
    pub fn leave(&mut self, key: &GroupKey, worker: u16, session: u32) -> Option<MqttStr> {
        let &g = self.index.get(key)?;
        let group = &mut self.groups[g];
        group.members.retain(|m| !(m.worker == worker && m.session == session));
        if !group.members.is_empty() {
            return None;
        }
        self.trie.remove(&key.1, &(g as u32));
        self.index.remove(key);
        Some(self.groups.remove(g).key.1)
    }

    pub fn find(&self, key: &GroupKey) -> Option<GroupId> {
        self.index.get(key).map(|&g| GroupId(g))
    }

    /// The groups whose filter matches `topic`.
    pub fn matching(&self, topic: &str, out: &mut Vec<GroupId>) {
        if !self.groups.is_empty() {
            self.trie.for_each_match(topic, |&g, _| out.push(GroupId(g as usize)));
        }
    }

    /// The next member of group `g`, in turn, with the group's key.
    pub fn pick(&mut self, g: GroupId) -> Option<(Member, &GroupKey)> {
        let group = self.groups.get_mut(g.0)?;
        if group.members.is_empty() {
            return None;
        }
        group.cursor = (group.cursor + 1) % group.members.len();
        Some((group.members[group.cursor], &group.key))
    }
}
