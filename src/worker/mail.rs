//! What a worker does with the mail its peers sent: messages to deliver, connections handed over,
//! interest announcements (acknowledged once applied), shared group membership and deliveries.

use super::mailbox::{InterestChange, Mail, Then};
use super::Worker;
use crate::session::SessionKey;

impl Worker {
    /// Takes and handles the mail that is in the rings now.
    pub(super) fn take_mail(&mut self) {
        let mut mail = std::mem::take(&mut self.scratch.mail);
        self.mailbox.take(&mut mail);
        for (from, m) in mail.drain(..) {
            self.on_mail(from as usize, m);
        }
        self.scratch.mail = mail;
        // Credit what was taken now, not at the end of the turn: a peer out of credit reads no
        // publishers until it comes. One that went to sleep for want of it is woken now too, to
        // go on reading on its own core while this turn goes on (not helped, at the end of it).
        if self.mailbox.send_credits() && !self.helping {
            self.wake_due(false);
        }
    }

    fn on_mail(&mut self, from: usize, mail: Mail) {
        match mail {
            Mail::Batch(batch) => {
                for (m, seq) in batch.iter() {
                    self.recent.took(from, seq);
                    if m.qos != crate::codec::QoS::AtMostOnce {
                        self.mailbox.owe_credit(from);
                    }
                    if m.stamp != 0 {
                        self.routed(m.stamp);
                    }
                    self.deliver(&m, &mut None);
                }
                self.mailbox.give_back(from, batch);
            }
            Mail::Spent(batch) => self.mailbox.reuse(from, batch),
            Mail::Publish { msg, keep, seq } => {
                self.recent.took(from, seq);
                if msg.qos != crate::codec::QoS::AtMostOnce {
                    self.mailbox.owe_credit(from);
                }
                if msg.stamp != 0 {
                    self.routed(msg.stamp);
                }
                if msg.retain {
                    self.store_retained(&msg, keep);
                }
                self.deliver_local(&msg);
            }
            Mail::Handover(h) => self.take_handover(*h),
            Mail::Interest(change) => {
                let InterestChange { filters, worker, present, ticket } = *change;
                for f in &filters {
                    self.router.peer_interest(f, worker, present);
                }
                if let Some(ticket) = ticket {
                    self.mailbox.send(worker as usize, Mail::Ack { ticket });
                }
            }
            Mail::Ack { ticket } => {
                if let Some(then) = self.pending.ack(ticket) {
                    self.finish(then);
                }
            }
            Mail::SharedJoin(join) => {
                let (key, member, ticket) = *join;
                let reply = Then::Ack { worker: member.worker, ticket };
                let filter = key.1.clone();
                if self.router.groups.join(key, member) && self.router.want(&filter) && self.mailbox.peer_count() > 0 {
                    // A new group: its filter must be of interest everywhere before the member's
                    // SUBACK goes out.
                    let mine = self.pending.start(self.mailbox.peer_count(), reply);
                    self.announce(vec![filter], true, Some(mine));
                } else {
                    self.finish(reply);
                }
            }
            Mail::SharedLeave { key, worker, session } => self.leave_group(&key, worker, session),
            Mail::SharedDeliver(d) => {
                let (session, uid, delivery) = *d;
                let sk = SessionKey(session as usize);
                if self.sessions.is(sk, uid) {
                    self.deliver_one(sk, delivery, true);
                } else if let Some(g) = delivery.group {
                    // The member left before this arrived: to someone still in the group.
                    self.redeliver_shared(*g, delivery.msg);
                }
            }
            Mail::SharedRedeliver(r) => {
                let (key, msg) = *r;
                self.redeliver_shared(key, msg);
            }
            Mail::Pause { conn, uid } => self.pause(super::conn::ConnKey(conn as usize), uid),
            Mail::Resume { conn, uid } => self.resume(super::conn::ConnKey(conn as usize), uid),
            Mail::CatchUpAsk(ask) => self.on_catch_up_ask(*ask),
            Mail::CatchUp(c) => {
                let super::catchup::CatchUp { matched, session, uid, msg, seen } = *c;
                self.catch_up(SessionKey(session as usize), uid, &matched, msg, seen);
            }
            Mail::Credit { n } => {
                self.mailbox.credited(from, n);
                self.feed_starved();
            }
        }
    }
}
