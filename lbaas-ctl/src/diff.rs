//! What applying a file changes: merging it into the running configuration and listing the
//! objects created, updated and deleted.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Listener, LoadBalancer, Member, Pool};

/// Kind of change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A new object.
    Create,
    /// An object whose own fields changed.
    Update,
    /// An object that goes away.
    Delete,
}

/// One changed object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Kind of change.
    pub kind: ChangeKind,
    /// Object type: loadbalancer, listener, pool, member.
    pub object: String,
    /// Object path: `lb`, `lb/listener`, `lb/pool`, `lb/pool/address:port`.
    pub name: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.kind {
            ChangeKind::Create => '+',
            ChangeKind::Update => '~',
            ChangeKind::Delete => '-',
        };
        write!(f, "{sign} {} {}", self.object, self.name)
    }
}

/// The configuration after applying `file` to `running`: each load balancer named in the file
/// replaces its namesake (or is added); others stay unless `prune`.
pub fn merge(running: &Config, file: &Config, prune: bool) -> Config {
    let mut out = Config::default();
    if !prune {
        for lb in &running.loadbalancers {
            match file.loadbalancers.iter().find(|f| f.name == lb.name) {
                Some(new) => out.loadbalancers.push(new.clone()),
                None => out.loadbalancers.push(lb.clone()),
            }
        }
    }
    for lb in &file.loadbalancers {
        if !out.loadbalancers.iter().any(|o| o.name == lb.name) {
            out.loadbalancers.push(lb.clone());
        }
    }
    out
}

/// The configuration without the load balancer `name`, or `None` if there is none.
pub fn remove(running: &Config, name: &str) -> Option<Config> {
    let mut out = running.clone();
    let before = out.loadbalancers.len();
    out.loadbalancers.retain(|lb| lb.name != name);
    (out.loadbalancers.len() != before).then_some(out)
}

/// An object of the model as `diff` sees it.
trait Diffable: PartialEq + Clone {
    /// Object type, as printed.
    const KIND: &'static str;
    /// Identity within its parent.
    type Key: PartialEq;
    fn key(&self) -> Self::Key;
    /// Path, given the parent's path.
    fn path(&self, parent: &str) -> String;
    /// The object without its children, so only its own fields decide an update.
    fn own(&self) -> Self;
    /// Compares the children of two versions of this object.
    fn children(_d: &mut Differ, _path: &str, _old: &Self, _new: &Self) {}
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

impl Diffable for LoadBalancer {
    const KIND: &'static str = "loadbalancer";
    type Key = String;
    fn key(&self) -> String {
        self.name.clone()
    }
    fn path(&self, parent: &str) -> String {
        join(parent, &self.name)
    }
    fn own(&self) -> Self {
        LoadBalancer {
            listeners: Vec::new(),
            pools: Vec::new(),
            ..self.clone()
        }
    }
    fn children(d: &mut Differ, path: &str, old: &Self, new: &Self) {
        d.list(path, &old.listeners, &new.listeners);
        d.list(path, &old.pools, &new.pools);
    }
}

impl Diffable for Listener {
    const KIND: &'static str = "listener";
    type Key = String;
    fn key(&self) -> String {
        self.name.clone()
    }
    fn path(&self, parent: &str) -> String {
        join(parent, &self.name)
    }
    fn own(&self) -> Self {
        self.clone()
    }
}

impl Diffable for Pool {
    const KIND: &'static str = "pool";
    type Key = String;
    fn key(&self) -> String {
        self.name.clone()
    }
    fn path(&self, parent: &str) -> String {
        join(parent, &self.name)
    }
    fn own(&self) -> Self {
        Pool {
            members: Vec::new(),
            ..self.clone()
        }
    }
    fn children(d: &mut Differ, path: &str, old: &Self, new: &Self) {
        d.list(path, &old.members, &new.members);
    }
}

impl Diffable for Member {
    const KIND: &'static str = "member";
    type Key = (String, i64);
    fn key(&self) -> (String, i64) {
        (self.address.clone(), self.protocol_port)
    }
    fn path(&self, parent: &str) -> String {
        join(parent, &format!("{}:{}", self.address, self.protocol_port))
    }
    fn own(&self) -> Self {
        self.clone()
    }
}

struct Differ {
    changes: Vec<Change>,
}

impl Differ {
    fn push<T: Diffable>(&mut self, kind: ChangeKind, name: String) {
        self.changes.push(Change {
            kind,
            object: T::KIND.to_string(),
            name,
        });
    }

    /// Compares two lists of objects matched by key, recursing into their children.
    fn list<T: Diffable>(&mut self, parent: &str, old: &[T], new: &[T]) {
        for n in new {
            let path = n.path(parent);
            match old.iter().find(|o| o.key() == n.key()) {
                None => {
                    self.push::<T>(ChangeKind::Create, path.clone());
                    T::children(self, &path, &n.own(), n);
                }
                Some(o) => {
                    if o.own() != n.own() {
                        self.push::<T>(ChangeKind::Update, path.clone());
                    }
                    T::children(self, &path, o, n);
                }
            }
        }
        for o in old {
            if !new.iter().any(|n| n.key() == o.key()) {
                let path = o.path(parent);
                self.push::<T>(ChangeKind::Delete, path.clone());
                T::children(self, &path, o, &o.own());
            }
        }
    }
}

/// Lists what changes from `old` to `new`, parents before children.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut d = Differ {
        changes: Vec::new(),
    };
    d.list("", &old.loadbalancers, &new.loadbalancers);
    d.changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn cfg(members: &str, port: u16) -> Config {
        load_str(
            &format!(
                "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: l, protocol: TCP, protocol_port: {port}, default_pool: p}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {members}}}\n"
            ),
            "t",
        )
        .unwrap()
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn new_file_creates_everything() {
        let new = cfg("[{address: 10.9.1.1, protocol_port: 80}]", 80);
        assert_eq!(
            lines(&diff(&Config::default(), &new)),
            [
                "+ loadbalancer lb",
                "+ listener lb/l",
                "+ pool lb/p",
                "+ member lb/p/10.9.1.1:80"
            ]
        );
    }

    #[test]
    fn member_changes_and_listener_update() {
        let old = cfg(
            "[{address: 10.9.1.1, protocol_port: 80}, {address: 10.9.1.2, protocol_port: 80}]",
            80,
        );
        let new = cfg(
            "[{address: 10.9.1.2, protocol_port: 80, weight: 5}, {address: 10.9.1.3, protocol_port: 80}]",
            81,
        );
        assert_eq!(
            lines(&diff(&old, &new)),
            [
                "~ listener lb/l",
                "~ member lb/p/10.9.1.2:80",
                "+ member lb/p/10.9.1.3:80",
                "- member lb/p/10.9.1.1:80"
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn merge_replaces_named_and_keeps_others_unless_prune() {
        let mut running = cfg("[]", 80);
        let mut other = running.loadbalancers[0].clone();
        other.name = "other".into();
        other.vip_address = "10.9.0.2".into();
        running.loadbalancers.push(other);
        let file = cfg("[{address: 10.9.1.1, protocol_port: 80}]", 80);
        let merged = merge(&running, &file, false);
        assert_eq!(merged.loadbalancers.len(), 2);
        assert_eq!(merged.loadbalancers[0], file.loadbalancers[0]);
        assert_eq!(merged.loadbalancers[1].name, "other");
        let pruned = merge(&running, &file, true);
        assert_eq!(pruned, file);
        assert_eq!(
            lines(&diff(&running, &pruned)),
            [
                "+ member lb/p/10.9.1.1:80",
                "- loadbalancer other",
                "- listener other/l",
                "- pool other/p"
            ]
        );
    }

    #[test]
    fn remove_names_missing_lb() {
        let running = cfg("[]", 80);
        assert!(remove(&running, "nope").is_none());
        assert!(remove(&running, "lb").unwrap().loadbalancers.is_empty());
    }
}
