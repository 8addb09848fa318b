//! The memory store: this process's counters.
//!
//! Subjects are spread over shards by a hash of the subject, and every window of one subject
//! (client-wide and per deployment) lives in the same shard, so one admission takes exactly
//! one short `std::sync::Mutex` (never held across an await) and checks and updates all its
//! windows atomically. Idle subjects (every per-minute window drained, no count for today) are
//! swept from a shard at most once per minute of request time.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use super::window::{day_index, gcra_adjust, MINUTE_US};
use super::{evaluate, Correction, Kind, Plan, Scope, MAX_CHECKS};
use crate::FilterError;

const SHARDS: usize = 64;

pub(crate) struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

#[derive(Default)]
struct Shard {
    subjects: HashMap<String, Subject>,
    last_sweep: i64,
}

#[derive(Default)]
struct Subject {
    client: Windows,
    deployments: HashMap<String, Windows>,
    /// `per_user` windows, by user key (its `user_claim` value; "" without one).
    users: HashMap<String, UserWindows>,
}

/// One user's windows: client-wide and per deployment.
#[derive(Default)]
struct UserWindows {
    all: Windows,
    deployments: HashMap<String, Windows>,
}

impl UserWindows {
    fn idle(&self, now: i64) -> bool {
        self.all.idle(now) && self.deployments.values().all(|w| w.idle(now))
    }
}

/// The windows of `key` in `map`, made when `create` (else `None` when absent).
fn windows_in<'a>(
    map: &'a mut HashMap<String, Windows>,
    key: &str,
    create: bool,
) -> Option<&'a mut Windows> {
    if !map.contains_key(key) {
        if !create {
            return None;
        }
        map.insert(key.to_owned(), Windows::default());
    }
    map.get_mut(key)
}

/// The windows of user `key`, made when `create`.
fn user_in<'a>(
    map: &'a mut HashMap<String, UserWindows>,
    key: &str,
    create: bool,
) -> Option<&'a mut UserWindows> {
    if !map.contains_key(key) {
        if !create {
            return None;
        }
        map.insert(key.to_owned(), UserWindows::default());
    }
    map.get_mut(key)
}

/// The windows of one scope: per-minute `tat`s (µs) and the day's count.
#[derive(Clone, Copy, Default, Debug)]
struct Windows {
    requests_tat: i64,
    tokens_tat: i64,
    day: i64,
    day_used: i64,
}

impl Windows {
    fn get(&self, kind: Kind, today: i64) -> i64 {
        match kind {
            Kind::Requests => self.requests_tat,
            Kind::Tokens => self.tokens_tat,
            Kind::Day if self.day == today => self.day_used,
            Kind::Day => 0,
        }
    }

    fn set(&mut self, kind: Kind, today: i64, value: i64) {
        match kind {
            Kind::Requests => self.requests_tat = value,
            Kind::Tokens => self.tokens_tat = value,
            Kind::Day => {
                self.day = today;
                self.day_used = value;
            }
        }
    }

    fn idle(&self, now: i64) -> bool {
        self.requests_tat <= now
            && self.tokens_tat <= now
            && (self.day_used == 0 || self.day != day_index(now))
    }
}

impl Subject {
    fn idle(&self, now: i64) -> bool {
        self.client.idle(now)
            && self.deployments.values().all(|w| w.idle(now))
            && self.users.values().all(|u| u.idle(now))
    }
}

impl MemoryStore {
    pub(crate) fn new() -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, subject: &str) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(subject) as usize) % self.shards.len();
        // A panic while holding the lock cannot leave the windows inconsistent (they are
        // plain integers written after the decision), so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn admit_now(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        plan: &Plan,
        now: i64,
    ) -> Result<[i64; MAX_CHECKS], FilterError> {
        let today = day_index(now);
        let mut shard = self.shard(subject);
        shard.maybe_sweep(now);
        // Client, deployment, user, user's deployment.
        let mut w = [Windows::default(); 4];
        if let Some(s) = shard.subjects.get(subject) {
            w[0] = s.client;
            w[1] = s.deployments.get(deployment).copied().unwrap_or_default();
            if let Some(u) = s.users.get(user) {
                w[2] = u.all;
                w[3] = u.deployments.get(deployment).copied().unwrap_or_default();
            }
        }
        let slot = |scope: Scope| match scope {
            Scope::Client => 0,
            Scope::Deployment => 1,
            Scope::User => 2,
            Scope::UserDeployment => 3,
        };
        let mut current = [0i64; MAX_CHECKS];
        for (i, c) in plan.checks().iter().enumerate() {
            current[i] = w[slot(c.scope)].get(c.kind, today);
        }
        let after = evaluate(plan, &current, now)?;
        let mut used = [false; 4];
        for (i, c) in plan.checks().iter().enumerate() {
            used[slot(c.scope)] = true;
            w[slot(c.scope)].set(c.kind, today, after[i]);
        }
        let entry = match shard.subjects.get_mut(subject) {
            Some(s) => s,
            None => shard.subjects.entry(subject.to_owned()).or_default(),
        };
        entry.client = w[0];
        if used[1] {
            if let Some(d) = windows_in(&mut entry.deployments, deployment, true) {
                *d = w[1];
            }
        }
        if used[2] || used[3] {
            if let Some(u) = user_in(&mut entry.users, user, true) {
                if used[2] {
                    u.all = w[2];
                }
                if used[3] {
                    if let Some(d) = windows_in(&mut u.deployments, deployment, true) {
                        *d = w[3];
                    }
                }
            }
        }
        Ok(after)
    }

    pub(crate) fn reconcile_now(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        day: i64,
        corrections: &[Correction],
        now: i64,
    ) {
        let mut shard = self.shard(subject);
        let subject = match shard.subjects.get_mut(subject) {
            Some(s) => s,
            // Swept as idle: nothing left to refund; a surcharge starts a fresh entry.
            None if corrections.iter().any(|c| c.delta > 0) => {
                shard.subjects.entry(subject.to_owned()).or_default()
            }
            None => return,
        };
        for c in corrections {
            // A window that is gone has nothing to refund; a surcharge starts it anew.
            let create = c.delta > 0;
            let w = match c.scope {
                Scope::Client => Some(&mut subject.client),
                Scope::Deployment => windows_in(&mut subject.deployments, deployment, create),
                Scope::User => user_in(&mut subject.users, user, create).map(|u| &mut u.all),
                Scope::UserDeployment => user_in(&mut subject.users, user, create)
                    .and_then(|u| windows_in(&mut u.deployments, deployment, create)),
            };
            let Some(w) = w else {
                continue;
            };
            match c.kind {
                Kind::Requests => {}
                Kind::Tokens => {
                    if let Some(tat) = gcra_adjust(w.tokens_tat, now, c.delta, c.cap) {
                        w.tokens_tat = tat;
                    }
                }
                Kind::Day => {
                    // The counter of another day is not this reservation's.
                    if w.day == day {
                        w.day_used = (w.day_used + c.delta).max(0);
                    } else if c.delta > 0 && day == day_index(now) {
                        w.day = day;
                        w.day_used = c.delta;
                    }
                }
            }
        }
    }

    /// Subjects currently tracked (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).subjects.len())
            .sum()
    }

    /// Sweeps every shard now (tests).
    #[cfg(test)]
    pub(crate) fn sweep_all(&self, now: i64) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).sweep(now);
        }
    }
}

impl Shard {
    fn maybe_sweep(&mut self, now: i64) {
        if now - self.last_sweep >= MINUTE_US {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: i64) {
        self.last_sweep = now;
        self.subjects.retain(|_, s| {
            s.deployments.retain(|_, w| !w.idle(now));
            s.users.retain(|_, u| {
                u.deployments.retain(|_, w| !w.idle(now));
                !u.idle(now)
            });
            !s.idle(now)
        });
    }
}
