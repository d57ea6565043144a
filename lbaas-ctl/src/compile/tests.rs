use std::collections::HashMap;

use std::time::{Duration, Instant};

use super::*;
use crate::config;
use std::collections::BTreeSet;

fn desired_default(c: &Config) -> DesiredTables {
    desired(c, CompileOptions::default(), &BTreeSet::new())
}

/// Kernel tables in memory. After every single write it checks what the data path could see
/// at that instant: every VIP's ring region names only configured members.
#[derive(Default)]
struct MemoryTables {
    members: HashMap<u32, MemberInfo>,
    ring: HashMap<u32, u32>,
    vips: HashMap<VipKey, VipInfo>,
    writes: usize,
    /// Open flows per counter slot, as a test sets them.
    active: HashMap<u32, u64>,
    /// Admitted sources per listener id.
    sources: BTreeSet<(u32, SourceCidr)>,
    /// Sources every filtering VIP must find admitted the moment it is written.
    filter_needs: Vec<SourceCidr>,
    /// The VIP address filter.
    vip_filter: HashMap<u32, u32>,
    /// The member endpoint table.
    member_vips: HashMap<VipKey, VipKey>,
}

impl MemoryTables {
    fn check_consistent(&self) {
        for (key, info) in &self.vips {
            let slot = lbaas_common::vip_filter_slot(key.addr);
            assert_ne!(
                self.vip_filter.get(&slot).copied().unwrap_or(0),
                0,
                "{key:?} is in the VIP table but its filter slot is zero"
            );
            for slot in info.ring_base..info.ring_base + info.ring_len {
                let id = self
                    .ring
                    .get(&slot)
                    .unwrap_or_else(|| panic!("{key:?}: slot {slot} unwritten"));
                let member = self
                    .members
                    .get(id)
                    .unwrap_or_else(|| panic!("{key:?}: member {id} unknown"));
                assert_ne!(
                    member.addr, 0,
                    "{key:?}: slot {slot} names cleared member {id}"
                );
                // A flagged member's SYN-ACKs are matched through the endpoint table: it
                // must name this VIP, or they would find no flow.
                if member.flags & MEMBER_F_SOLE_VIP != 0
                    && key.proto == lbaas_common::IPPROTO_TCP
                    && info.flags & VIP_F_L7_PASS == 0
                {
                    assert_eq!(
                        self.member_vips.get(&member_endpoint(member)),
                        Some(key),
                        "{key:?}: slot {slot} names member {id}, flagged for another VIP"
                    );
                }
            }
        }
    }

    /// Member addresses a listener's ring hands out, in order.
    fn rotation(&self, key: &VipKey) -> Vec<(Ipv4Addr, u16)> {
        let info = self.vips[key];
        (info.ring_base..info.ring_base + info.ring_len)
            .map(|slot| {
                let m = self.members[&self.ring[&slot]];
                (Ipv4Addr::from(m.addr.to_ne_bytes()), u16::from_be(m.port))
            })
            .collect()
    }
}

impl Tables for MemoryTables {
    fn set_member(&mut self, id: u32, info: MemberInfo) -> Result<(), TableError> {
        self.members.insert(id, info);
        self.writes += 1;
        self.check_consistent();
        Ok(())
    }
    fn set_ring(&mut self, base: u32, ids: &[u32]) -> Result<(), TableError> {
        for (i, id) in ids.iter().enumerate() {
            self.ring.insert(base + i as u32, *id);
            self.writes += 1;
            self.check_consistent();
        }
        Ok(())
    }
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), TableError> {
        if info.flags & VIP_F_SOURCE_FILTER != 0 {
            for source in &self.filter_needs {
                assert!(
                    self.sources.contains(&(info.listener_id, *source)),
                    "{key:?} filters before {source} is admitted"
                );
            }
        }
        self.vips.insert(key, info);
        self.writes += 1;
        self.check_consistent();
        Ok(())
    }
    fn remove_vip(&mut self, key: VipKey) -> Result<(), TableError> {
        self.vips.remove(&key);
        self.writes += 1;
        Ok(())
    }
    fn reset_counter(&mut self, _listener_id: u32) -> Result<(), TableError> {
        Ok(())
    }
    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError> {
        self.active.remove(&slot);
        Ok(())
    }
    fn active_flows(&mut self, slot: u32) -> Result<u64, TableError> {
        Ok(self.active.get(&slot).copied().unwrap_or(0))
    }
    fn get_member(&mut self, id: u32) -> Result<MemberInfo, TableError> {
        Ok(self.members.get(&id).copied().unwrap_or_default())
    }
    fn get_vip(&mut self, key: VipKey) -> Result<Option<VipInfo>, TableError> {
        Ok(self.vips.get(&key).copied())
    }
    fn set_member_vip(&mut self, endpoint: VipKey, vip: Option<VipKey>) -> Result<(), TableError> {
        match vip {
            Some(vip) => self.member_vips.insert(endpoint, vip),
            None => self.member_vips.remove(&endpoint),
        };
        self.writes += 1;
        self.check_consistent();
        Ok(())
    }
    fn get_member_vip(&mut self, endpoint: VipKey) -> Result<Option<VipKey>, TableError> {
        Ok(self.member_vips.get(&endpoint).copied())
    }
    fn set_vip_filter(&mut self, slot: u32, count: u32) -> Result<(), TableError> {
        self.vip_filter.insert(slot, count);
        self.writes += 1;
        self.check_consistent();
        Ok(())
    }
    fn get_vip_filter(&mut self, slot: u32) -> Result<u32, TableError> {
        Ok(self.vip_filter.get(&slot).copied().unwrap_or(0))
    }
    fn set_source_allowed(
        &mut self,
        listener_id: u32,
        source: SourceCidr,
        allowed: bool,
    ) -> Result<(), TableError> {
        let changed = if allowed {
            self.sources.insert((listener_id, source))
        } else {
            self.sources.remove(&(listener_id, source))
        };
        assert!(
            changed,
            "{source} of listener {listener_id} written without a change"
        );
        self.writes += 1;
        self.check_consistent();
        Ok(())
    }
}

fn config(members: &str) -> Config {
    let yaml = format!(
        r#"
loadbalancers:
  - name: lb
    vip_address: 10.9.0.1
    listeners:
      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p}}
    pools:
      - name: p
        protocol: TCP
        lb_algorithm: ROUND_ROBIN
        members: {members}
"#
    );
    config::load_str(&yaml, "t").expect("valid test config")
}

fn web_key() -> VipKey {
    VipKey {
        addr: u32::from_ne_bytes([10, 9, 0, 1]),
        port: 80u16.to_be(),
        proto: lbaas_common::IPPROTO_TCP,
        _pad: 0,
    }
}

fn ip(last: u8) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 9, 1, last), 8080)
}

#[test]
fn equal_weights_alternate() {
    assert_eq!(weighted_schedule(&[1, 1]), vec![0, 1]);
    assert_eq!(weighted_schedule(&[1, 1, 1]), vec![0, 1, 2]);
}

#[test]
fn weights_give_proportional_spread_out_turns() {
    // 5:1:1 is nginx's own example; the heavy member's turns are spread out.
    assert_eq!(weighted_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    let s = weighted_schedule(&[3, 1]);
    assert_eq!(s.len(), 4);
    assert_eq!(s.iter().filter(|i| **i == 0).count(), 3);
    // Common factors are removed: 2:2 is one turn each.
    assert_eq!(weighted_schedule(&[2, 2]), vec![0, 1]);
    assert_eq!(weighted_schedule(&[256, 128]), vec![0, 1, 0]);
}

#[test]
fn zero_weights_are_left_out() {
    assert_eq!(weighted_schedule(&[0, 1, 0, 1]), vec![1, 3]);
    assert!(weighted_schedule(&[0, 0]).is_empty());
    assert!(weighted_schedule(&[]).is_empty());
}

#[test]
fn schedule_counts_match_weights_for_many_members() {
    let weights: Vec<u32> = (0..200).map(|i| 1 + (i * 37) % 256).collect();
    let s = weighted_schedule(&weights);
    let g = weights.iter().copied().fold(0, gcd);
    for (i, w) in weights.iter().enumerate() {
        assert_eq!(s.iter().filter(|x| **x == i).count() as u32, w / g);
    }
}

#[test]
fn programs_round_robin_ring_and_switches_make_before_break() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let first = config(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.2, protocol_port: 8080}]",
    );
    programmer
        .apply(&mut tables, &desired_default(&first))
        .unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(1), ip(2)]);

    // Replace member 1 with 3, weight 2 for member 2: checked after every write.
    let second = config(
        "[{address: 10.9.1.2, protocol_port: 8080, weight: 2}, {address: 10.9.1.3, protocol_port: 8080}]",
    );
    let summary = programmer
        .apply(&mut tables, &desired_default(&second))
        .unwrap();
    assert_eq!(summary.vips_written, 1);
    // Member 3 is new and member 2's weight changed.
    assert_eq!(summary.members_written, 2);
    assert_eq!(summary.members_removed, 1);
    assert_eq!(tables.rotation(&web_key()), vec![ip(2), ip(3), ip(2)]);
    let removed = programmer.member_id(&MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    });
    assert_eq!(removed, None);

    // The same config again writes nothing.
    let before = tables.writes;
    assert_eq!(
        programmer
            .apply(&mut tables, &desired_default(&second))
            .unwrap(),
        ProgramSummary::default()
    );
    assert_eq!(tables.writes, before);
}

#[test]
fn drained_and_disabled_members_keep_their_slot_but_get_no_turns() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let c = config(
        "[{address: 10.9.1.1, protocol_port: 8080, weight: 0}, {address: 10.9.1.2, protocol_port: 8080, admin_state_up: false}, {address: 10.9.1.3, protocol_port: 8080}]",
    );
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(3)]);
    let drained = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    };
    let id = programmer
        .member_id(&drained)
        .expect("drained member keeps its slot");
    assert_ne!(tables.members[&id].addr, 0);
}

#[test]
fn no_usable_member_means_empty_ring() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    programmer
        .apply(&mut tables, &desired_default(&config("[]")))
        .unwrap();
    assert_eq!(tables.vips[&web_key()].ring_len, 0);
}

#[test]
fn removed_listener_frees_its_vip_and_ring() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    programmer
        .apply(
            &mut tables,
            &desired_default(&config("[{address: 10.9.1.1, protocol_port: 8080}]")),
        )
        .unwrap();
    programmer
        .apply(&mut tables, &desired_default(&Config::default()))
        .unwrap();
    assert!(tables.vips.is_empty());
    // Freed regions are reused only from the next apply on (readers may still be in them).
    assert!(programmer.ring.largest_free() < RING_SLOTS);
    programmer
        .apply(&mut tables, &desired_default(&Config::default()))
        .unwrap();
    assert!(tables.members.values().all(|m| m.addr == 0));
    assert_eq!(programmer.ring.largest_free(), RING_SLOTS);
}

#[test]
fn listener_taking_over_a_deleted_listeners_port_keeps_it() {
    let two = |a: u16, b: Option<u16>| {
        let second = b
            .map(|p| {
                format!("      - {{name: b, protocol: TCP, protocol_port: {p}, default_pool: p}}\n")
            })
            .unwrap_or_default();
        config::load_str(&format!("loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: a, protocol: TCP, protocol_port: {a}, default_pool: p}}\n{second}    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.9.1.1, protocol_port: 8080}}]}}\n"), "t").unwrap()
    };
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    programmer
        .apply(&mut tables, &desired_default(&two(81, Some(80))))
        .unwrap();
    programmer
        .apply(&mut tables, &desired_default(&two(80, None)))
        .unwrap();
    assert_eq!(tables.vips.len(), 1);
    assert!(
        tables.vips.contains_key(&web_key()),
        "port 80 must stay served"
    );
}

#[test]
fn ring_allocator_coalesces() {
    let mut ring = RingAllocator::new(100);
    let a = ring.take(30).unwrap();
    let b = ring.take(30).unwrap();
    let c = ring.take(40).unwrap();
    assert_eq!(ring.take(1), None);
    ring.give_back(b, 30);
    ring.give_back(a, 30);
    assert_eq!(ring.largest_free(), 60);
    ring.give_back(c, 40);
    assert_eq!(ring.largest_free(), 100);
}

#[test]
fn ring_full_is_a_clear_error() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    programmer.ring = RingAllocator::new(2);
    let err = programmer
        .apply(&mut tables, &desired_default(&config("[{address: 10.9.1.1, protocol_port: 8080, weight: 3}, {address: 10.9.1.2, protocol_port: 8080}]")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("selection ring full: listener lb/web needs 4 slots, 2 are free of {RING_SLOTS}")
    );
}

#[test]
fn a_removed_member_drains_its_open_flows_then_is_released() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::with_drain_timeout(Duration::from_secs(60));
    let both = config(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.2, protocol_port: 8080}]",
    );
    let t0 = Instant::now();
    programmer
        .apply_at(&mut tables, &desired_default(&both), t0)
        .unwrap();
    let gone = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    };
    let id = programmer.member_id(&gone).unwrap();
    tables.active.insert(id, 2);

    let one = config("[{address: 10.9.1.2, protocol_port: 8080}]");
    let summary = programmer
        .apply_at(&mut tables, &desired_default(&one), t0)
        .unwrap();
    assert_eq!((summary.members_removed, summary.members_released), (1, 0));
    assert_eq!(
        tables.rotation(&web_key()),
        vec![ip(2)],
        "no new flow for the removed member"
    );
    assert_ne!(
        tables.members[&id].addr, 0,
        "its open flows keep their member"
    );
    assert_eq!(programmer.draining_members(), 1);

    // Back before it drained: same id, so its flows simply continue.
    programmer
        .apply_at(&mut tables, &desired_default(&both), t0)
        .unwrap();
    assert_eq!(programmer.member_id(&gone), Some(id));
    programmer
        .apply_at(&mut tables, &desired_default(&one), t0)
        .unwrap();

    // Its flows end: released on the next pass, slot cleared.
    tables.active.insert(id, 0);
    assert_eq!(programmer.release_drained(&mut tables, t0).unwrap(), 1);
    assert_eq!(tables.members[&id].addr, 0);
    assert_eq!(programmer.draining_members(), 0);
}

#[test]
fn a_drain_that_never_ends_times_out() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::with_drain_timeout(Duration::from_secs(60));
    let t0 = Instant::now();
    programmer
        .apply_at(
            &mut tables,
            &desired_default(&config("[{address: 10.9.1.1, protocol_port: 8080}]")),
            t0,
        )
        .unwrap();
    let id = programmer
        .member_id(&MemberRef {
            loadbalancer: "lb".into(),
            pool: "p".into(),
            addr: ip(1).0,
            port: 8080,
        })
        .unwrap();
    tables.active.insert(id, 1);
    programmer
        .apply_at(&mut tables, &desired_default(&config("[]")), t0)
        .unwrap();
    assert_eq!(
        programmer
            .release_drained(&mut tables, t0 + Duration::from_secs(59))
            .unwrap(),
        0
    );
    assert_eq!(
        programmer
            .release_drained(&mut tables, t0 + Duration::from_secs(60))
            .unwrap(),
        1
    );
    assert_eq!(tables.members[&id].addr, 0);
}

#[test]
fn a_changed_connection_limit_rewrites_the_vip_in_place() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let members = "[{address: 10.9.1.1, protocol_port: 8080}]";
    programmer
        .apply(&mut tables, &desired_default(&config(members)))
        .unwrap();
    let before = tables.vips[&web_key()];
    assert_eq!(before.conn_limit, 0);
    let limited = config::load_str(
        &format!(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p, connection_limit: 7}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {members}}}\n"
        ),
        "t",
    )
    .unwrap();
    let summary = programmer
        .apply(&mut tables, &desired_default(&limited))
        .unwrap();
    assert_eq!(summary.vips_written, 1);
    let after = tables.vips[&web_key()];
    assert_eq!(after.conn_limit, 7);
    assert_eq!(
        (after.ring_base, after.ring_len),
        (before.ring_base, before.ring_len),
        "same schedule, same region"
    );
}

#[test]
fn a_fallen_member_leaves_selection_and_its_flows_are_rescheduled() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let c = config(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.2, protocol_port: 8080}]",
    );
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    let m1 = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    };
    let id = programmer.member_id(&m1).unwrap();
    let generation = tables.members[&id].generation;
    let down = BTreeSet::from([m1.clone()]);
    programmer
        .apply(&mut tables, &desired(&c, CompileOptions::default(), &down))
        .unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(2)]);
    assert_ne!(
        tables.members[&id].generation, generation,
        "pinned flows see a new generation"
    );
    assert_ne!(tables.members[&id].addr, 0);
    // Back up: selected again, same id.
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(1), ip(2)]);
    assert_eq!(programmer.member_id(&m1), Some(id));
}

#[test]
fn backup_members_serve_only_when_every_other_member_is_unusable() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let c = config(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.3, protocol_port: 8080, backup: true}]",
    );
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(1)]);
    let m1 = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    };
    programmer
        .apply(
            &mut tables,
            &desired(&c, CompileOptions::default(), &BTreeSet::from([m1])),
        )
        .unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(3)]);
    let b = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(3).0,
        port: 8080,
    };
    let m1 = MemberRef {
        loadbalancer: "lb".into(),
        pool: "p".into(),
        addr: ip(1).0,
        port: 8080,
    };
    programmer
        .apply(
            &mut tables,
            &desired(&c, CompileOptions::default(), &BTreeSet::from([m1, b])),
        )
        .unwrap();
    assert_eq!(
        tables.vips[&web_key()].ring_len,
        0,
        "all down: new connections refused"
    );
}

#[test]
fn a_restored_programmer_takes_over_without_writing() {
    let mut tables = MemoryTables::default();
    let mut programmer = Programmer::new();
    let c = config(
        "[{address: 10.9.1.1, protocol_port: 8080, weight: 2}, {address: 10.9.1.2, protocol_port: 8080}]",
    );
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    let other = config(
        "[{address: 10.9.1.2, protocol_port: 8080}, {address: 10.9.1.3, protocol_port: 8080}]",
    );
    programmer
        .apply(&mut tables, &desired_default(&other))
        .unwrap();
    programmer.apply(&mut tables, &desired_default(&c)).unwrap();
    let snapshot = programmer.snapshot();
    let json = serde_json::to_string(&snapshot).unwrap();
    let restored_snapshot: Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(restored_snapshot, snapshot);
    let mut restored = Programmer::restore(&restored_snapshot, DEFAULT_DRAIN_TIMEOUT);
    let before = tables.writes;
    assert_eq!(
        restored.apply(&mut tables, &desired_default(&c)).unwrap(),
        ProgramSummary::default()
    );
    assert_eq!(
        tables.writes, before,
        "an unchanged configuration writes nothing"
    );
    assert_eq!(restored.snapshot(), snapshot);
    // And it goes on allocating without clashing with what is live.
    let more = config(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.4, protocol_port: 8080}]",
    );
    restored
        .apply(&mut tables, &desired_default(&more))
        .unwrap();
    assert_eq!(tables.rotation(&web_key()), vec![ip(1), ip(4)]);
    let ids: BTreeSet<u32> = restored.snapshot().members.iter().map(|m| m.1).collect();
    assert_eq!(
        ids.len(),
        restored.snapshot().members.len(),
        "ids are unique"
    );
}

/// Memory tables whose `fail_at`-th write fails (counting every kind of write).
struct FailingTables {
    inner: MemoryTables,
    writes: usize,
    fail_at: usize,
}

impl FailingTables {
    fn write(&mut self) -> Result<(), TableError> {
        self.writes += 1;
        if self.writes == self.fail_at {
            return Err(TableError::Map {
                map: "TEST",
                message: format!("injected failure at write {}", self.writes),
            });
        }
        Ok(())
    }
}

impl Tables for FailingTables {
    fn set_member(&mut self, id: u32, info: MemberInfo) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_member(id, info)
    }
    fn set_ring(&mut self, base: u32, ids: &[u32]) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_ring(base, ids)
    }
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_vip(key, info)
    }
    fn remove_vip(&mut self, key: VipKey) -> Result<(), TableError> {
        self.write()?;
        self.inner.remove_vip(key)
    }
    fn reset_counter(&mut self, id: u32) -> Result<(), TableError> {
        self.write()?;
        self.inner.reset_counter(id)
    }
    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError> {
        self.write()?;
        self.inner.reset_conn_counters(slot)
    }
    fn active_flows(&mut self, slot: u32) -> Result<u64, TableError> {
        self.inner.active_flows(slot)
    }
    fn get_member(&mut self, id: u32) -> Result<MemberInfo, TableError> {
        self.inner.get_member(id)
    }
    fn get_vip(&mut self, key: VipKey) -> Result<Option<VipInfo>, TableError> {
        self.inner.get_vip(key)
    }
    fn set_member_vip(&mut self, endpoint: VipKey, vip: Option<VipKey>) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_member_vip(endpoint, vip)
    }
    fn get_member_vip(&mut self, endpoint: VipKey) -> Result<Option<VipKey>, TableError> {
        self.inner.get_member_vip(endpoint)
    }
    fn set_vip_filter(&mut self, slot: u32, count: u32) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_vip_filter(slot, count)
    }
    fn get_vip_filter(&mut self, slot: u32) -> Result<u32, TableError> {
        self.inner.get_vip_filter(slot)
    }
    fn set_source_allowed(
        &mut self,
        listener_id: u32,
        source: SourceCidr,
        allowed: bool,
    ) -> Result<(), TableError> {
        self.write()?;
        self.inner.set_source_allowed(listener_id, source, allowed)
    }
}

/// Every VIP with the members its region names.
type VisibleVips = Vec<(VipKey, VipInfo, Vec<(Ipv4Addr, u16)>)>;

/// What the data path can see: VIPs, live member slots, admitted sources.
type Visible = (
    VisibleVips,
    Vec<(u32, MemberInfo)>,
    BTreeSet<(u32, SourceCidr)>,
    BTreeSet<(u32, u32)>,
    BTreeMap<VipKey, VipKey>,
);

/// What the data path can see: every VIP with the members its region names, and every live
/// member slot.
fn visible(t: &MemoryTables) -> Visible {
    let mut vips: Vec<_> = t
        .vips
        .iter()
        .map(|(k, v)| (*k, *v, t.rotation(k)))
        .collect();
    vips.sort_by_key(|v| (v.0.addr, v.0.port, v.0.proto));
    let mut members: Vec<_> = t
        .members
        .iter()
        .filter(|(_, m)| m.addr != 0)
        .map(|(id, m)| (*id, *m))
        .collect();
    members.sort_by_key(|m| m.0);
    let filter = t
        .vip_filter
        .iter()
        .filter(|(_, c)| **c != 0)
        .map(|(s, c)| (*s, *c))
        .collect();
    let member_vips = t.member_vips.iter().map(|(e, v)| (*e, *v)).collect();
    (vips, members, t.sources.clone(), filter, member_vips)
}

#[test]
fn the_vip_filter_counts_live_vips_and_empties_with_them() {
    let mut tables = MemoryTables::default();
    let mut p = Programmer::new();
    let members = "[{address: 10.9.1.1, protocol_port: 8080}]";
    p.apply(&mut tables, &desired_default(&config(members)))
        .unwrap();
    let slot = lbaas_common::vip_filter_slot(web_key().addr);
    assert_eq!(tables.vip_filter.get(&slot), Some(&1));
    // A second listener on the same address counts too; the VIP moving away lowers it.
    let two = config::load_str(
        &format!("loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p}}\n      - {{name: alt, protocol: TCP, protocol_port: 81, default_pool: p}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {members}}}\n"),
        "t",
    )
    .unwrap();
    p.apply(&mut tables, &desired_default(&two)).unwrap();
    assert_eq!(tables.vip_filter.get(&slot), Some(&2));
    let moved = config::load_str(
        &format!("loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.2\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {members}}}\n"),
        "t",
    )
    .unwrap();
    p.apply(&mut tables, &desired_default(&moved)).unwrap();
    assert_eq!(tables.vip_filter.get(&slot).copied().unwrap_or(0), 0);
    let new_slot = lbaas_common::vip_filter_slot(u32::from_ne_bytes([10, 9, 0, 2]));
    assert_eq!(tables.vip_filter.get(&new_slot), Some(&1));
    // A restored programmer knows the filter: an unchanged apply writes nothing.
    let mut restored = Programmer::restore(&p.snapshot(), Duration::from_secs(1));
    let writes = tables.writes;
    restored
        .apply(&mut tables, &desired_default(&moved))
        .unwrap();
    assert_eq!(tables.writes, writes);
    p.apply(&mut tables, &DesiredTables::default()).unwrap();
    assert!(
        tables.vip_filter.values().all(|c| *c == 0),
        "{:?}",
        tables.vip_filter
    );
}

#[test]
fn a_failed_apply_is_rolled_back_whatever_write_fails() {
    // `solo` has a pool of its own: its member's endpoint serves one listener (flagged, in the
    // member endpoint table); `web` and `alt` share theirs.
    let two_listeners = |members: &str, port2: u16, cidrs: &str, solo: u8| {
        config::load_str(&format!(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p, allowed_cidrs: {cidrs}}}\n      - {{name: alt, protocol: TCP, protocol_port: {port2}, default_pool: p}}\n      - {{name: solo, protocol: TCP, protocol_port: 90, default_pool: s}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {members}}}\n      - {{name: s, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.9.1.{solo}, protocol_port: 8080}}]}}\n"
        ), "t").unwrap()
    };
    let a = two_listeners(
        "[{address: 10.9.1.1, protocol_port: 8080}, {address: 10.9.1.2, protocol_port: 8080}]",
        81,
        "[10.0.0.0/8, 192.0.2.0/24]",
        8,
    );
    let b = two_listeners(
        "[{address: 10.9.1.2, protocol_port: 8080, weight: 3}, {address: 10.9.1.3, protocol_port: 8080}]",
        82,
        "[192.0.2.0/24, 198.51.100.0/24]",
        9,
    );
    // How many writes the change takes when nothing fails.
    let mut probe = FailingTables {
        inner: MemoryTables::default(),
        writes: 0,
        fail_at: 0,
    };
    let mut p = Programmer::new();
    p.apply(&mut probe, &desired_default(&a)).unwrap();
    let writes_before = probe.writes;
    p.apply(&mut probe, &desired_default(&b)).unwrap();
    let change = probe.writes - writes_before;
    assert!(
        change > 5,
        "the change should take several writes, took {change}"
    );
    for k in 1..=change {
        let mut tables = FailingTables {
            inner: MemoryTables::default(),
            writes: 0,
            fail_at: 0,
        };
        let mut programmer = Programmer::new();
        programmer.apply(&mut tables, &desired_default(&a)).unwrap();
        let seen = visible(&tables.inner);
        let snapshot = programmer.snapshot();
        tables.fail_at = tables.writes + k;
        let err = programmer
            .apply(&mut tables, &desired_default(&b))
            .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(
            visible(&tables.inner),
            seen,
            "failure at write {k} of {change}: tables not restored"
        );
        assert_eq!(
            programmer.snapshot(),
            snapshot,
            "failure at write {k}: programmer not restored"
        );
        // And the same change then goes through.
        tables.fail_at = 0;
        programmer.apply(&mut tables, &desired_default(&b)).unwrap();
        assert_eq!(
            tables.inner.rotation(&web_key()),
            vec![ip(2), ip(2), ip(3), ip(2)]
        );
        assert_eq!(
            tables.inner.member_vips,
            HashMap::from([(
                endpoint(9),
                VipKey {
                    port: 90u16.to_be(),
                    ..web_key()
                }
            )])
        );
    }
}

/// The member endpoint table's key of `10.9.1.<last>:8080`.
fn endpoint(last: u8) -> VipKey {
    VipKey {
        addr: u32::from_ne_bytes([10, 9, 1, last]),
        port: 8080u16.to_be(),
        proto: lbaas_common::IPPROTO_TCP,
        _pad: 0,
    }
}

/// Member ids flagged [`MEMBER_F_SOLE_VIP`], by address.
fn flagged(t: &MemoryTables) -> BTreeSet<Ipv4Addr> {
    t.members
        .values()
        .filter(|m| m.addr != 0 && m.flags & MEMBER_F_SOLE_VIP != 0)
        .map(|m| Ipv4Addr::from(m.addr.to_ne_bytes()))
        .collect()
}

/// A member endpoint that serves one TCP listener of the data path is flagged and mapped to
/// it; one that serves two is not (nor do UDP or HTTP listeners count); changes keep every
/// flagged member's endpoint mapped to the VIP whose ring names it at every single write
/// (`check_consistent`), and a restored programmer knows the table without writing.
#[test]
fn member_endpoints_that_serve_one_listener_are_mapped_to_it() {
    let lb = |web: &str, alt: &str| {
        config::load_str(&format!(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: w}}\n      - {{name: alt, protocol: TCP, protocol_port: 81, default_pool: a}}\n      - {{name: dns, protocol: UDP, protocol_port: 53, default_pool: d}}\n      - {{name: www, protocol: HTTP, protocol_port: 8000, default_pool: h}}\n    pools:\n      - {{name: w, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {web}}}\n      - {{name: a, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {alt}}}\n      - {{name: d, protocol: UDP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.9.1.1, protocol_port: 8080}}]}}\n      - {{name: h, protocol: HTTP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.9.1.1, protocol_port: 8080}}]}}\n"
        ), "t").unwrap()
    };
    let members = |last: &[u8]| {
        let list: Vec<String> = last
            .iter()
            .map(|l| format!("{{address: 10.9.1.{l}, protocol_port: 8080}}"))
            .collect();
        format!("[{}]", list.join(", "))
    };
    let alt_key = VipKey {
        port: 81u16.to_be(),
        ..web_key()
    };
    let mut tables = MemoryTables::default();
    let mut p = Programmer::new();
    let first = lb(&members(&[1, 2]), &members(&[2, 3]));
    p.apply(&mut tables, &desired_default(&first)).unwrap();
    assert_eq!(
        tables.member_vips,
        HashMap::from([(endpoint(1), web_key()), (endpoint(3), alt_key)])
    );
    let addr = |l: u8| Ipv4Addr::new(10, 9, 1, l);
    assert_eq!(flagged(&tables), BTreeSet::from([addr(1), addr(3)]));
    // 2 leaves alt, 1 joins it, 3 moves to web: every endpoint changes side.
    let second = lb(&members(&[2, 3]), &members(&[1]));
    p.apply(&mut tables, &desired_default(&second)).unwrap();
    assert_eq!(
        tables.member_vips,
        HashMap::from([
            (endpoint(1), alt_key),
            (endpoint(2), web_key()),
            (endpoint(3), web_key())
        ])
    );
    assert_eq!(
        flagged(&tables),
        BTreeSet::from([addr(1), addr(2), addr(3)])
    );
    let writes = tables.writes;
    let mut restored = Programmer::restore(&p.snapshot(), DEFAULT_DRAIN_TIMEOUT);
    restored
        .apply(&mut tables, &desired_default(&second))
        .unwrap();
    assert_eq!(
        tables.writes, writes,
        "a restored programmer rewrote tables"
    );
    // Back: the endpoint alt and web share again is unflagged and unmapped.
    restored
        .apply(&mut tables, &desired_default(&first))
        .unwrap();
    assert_eq!(
        tables.member_vips,
        HashMap::from([(endpoint(1), web_key()), (endpoint(3), alt_key)])
    );
    assert_eq!(flagged(&tables), BTreeSet::from([addr(1), addr(3)]));
}

/// A member loses its flag when it leaves the configuration (so a draining member, which a
/// restarted programmer knows without flags, is unflagged in the kernel too); back after a
/// restart where its endpoint is shared it stays unflagged, and it is flagged again once its
/// endpoint serves one listener.
#[test]
fn a_draining_member_is_unflagged_and_flagged_again_when_back_on_its_own() {
    let two = |web: &str, alt: &str| {
        config::load_str(&format!(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: w}}\n      - {{name: alt, protocol: TCP, protocol_port: 81, default_pool: a}}\n    pools:\n      - {{name: w, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {web}}}\n      - {{name: a, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: {alt}}}\n"
        ), "t").unwrap()
    };
    let (m1, m2) = (
        "{address: 10.9.1.1, protocol_port: 8080}",
        "{address: 10.9.1.2, protocol_port: 8080}",
    );
    let mut tables = MemoryTables::default();
    let mut p = Programmer::new();
    p.apply(
        &mut tables,
        &desired_default(&two(&format!("[{m1}, {m2}]"), "[]")),
    )
    .unwrap();
    let web_m1 = MemberRef {
        loadbalancer: "lb".into(),
        pool: "w".into(),
        addr: ip(1).0,
        port: 8080,
    };
    let id = p.member_id(&web_m1).unwrap();
    assert_ne!(tables.members[&id].flags & MEMBER_F_SOLE_VIP, 0);
    tables.active.insert(id, 1);
    p.apply(
        &mut tables,
        &desired_default(&two(&format!("[{m2}]"), "[]")),
    )
    .unwrap();
    assert_eq!(p.draining_members(), 1);
    assert_eq!(tables.members[&id].flags & MEMBER_F_SOLE_VIP, 0);
    let mut restored = Programmer::restore(&p.snapshot(), DEFAULT_DRAIN_TIMEOUT);
    restored
        .apply(
            &mut tables,
            &desired_default(&two(&format!("[{m1}, {m2}]"), &format!("[{m1}]"))),
        )
        .unwrap();
    assert_eq!(restored.member_id(&web_m1), Some(id), "resumed with its id");
    assert_eq!(tables.members[&id].flags & MEMBER_F_SOLE_VIP, 0);
    assert_eq!(flagged(&tables), BTreeSet::from([ip(2).0]));
    restored
        .apply(
            &mut tables,
            &desired_default(&two(&format!("[{m1}, {m2}]"), "[]")),
        )
        .unwrap();
    assert_ne!(tables.members[&id].flags & MEMBER_F_SOLE_VIP, 0);
}

/// The sources admitted for a listener id.
fn sources_of(t: &MemoryTables, id: u32) -> Vec<String> {
    t.sources
        .iter()
        .filter(|(l, _)| *l == id)
        .map(|(_, s)| s.to_string())
        .collect()
}

#[test]
fn allowed_cidrs_are_written_before_the_vip_filters_and_withdrawn_after() {
    let with_cidrs = |cidrs: &str| {
        config::load_str(&format!(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: p{cidrs}}}\n    pools:\n      - {{name: p, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.9.1.1, protocol_port: 8080}}]}}\n"
        ), "t").unwrap()
    };
    let mut tables = MemoryTables::default();
    let mut p = Programmer::new();
    // Host bits are cleared and duplicates merged.
    let first = desired_default(&with_cidrs(
        ", allowed_cidrs: [10.1.2.3/8, 10.0.0.0/8, 192.0.2.7/32]",
    ));
    tables.filter_needs = first.listeners.values().next().unwrap().allowed.clone();
    p.apply(&mut tables, &first).unwrap();
    let info = tables.vips[&web_key()];
    assert_eq!(info.flags, VIP_F_SOURCE_FILTER);
    let id = info.listener_id;
    assert_eq!(sources_of(&tables, id), ["10.0.0.0/8", "192.0.2.7/32"]);

    let second = desired_default(&with_cidrs(
        ", allowed_cidrs: [192.0.2.7/32, 198.51.100.0/24]",
    ));
    tables.filter_needs = second.listeners.values().next().unwrap().allowed.clone();
    let summary = p.apply(&mut tables, &second).unwrap();
    assert_eq!(summary.vips_written, 1);
    assert_eq!(sources_of(&tables, id), ["192.0.2.7/32", "198.51.100.0/24"]);
    // An unchanged apply writes nothing.
    let writes = tables.writes;
    p.apply(&mut tables, &second).unwrap();
    assert_eq!(tables.writes, writes);

    // No cidrs: the filter is off before any source is withdrawn.
    tables.filter_needs.clear();
    p.apply(&mut tables, &desired_default(&with_cidrs("")))
        .unwrap();
    assert_eq!(tables.vips[&web_key()].flags, 0);
    assert!(tables.sources.is_empty(), "{:?}", tables.sources);

    // A removed listener takes its sources along (its id may be reused).
    p.apply(&mut tables, &second).unwrap();
    assert_eq!(sources_of(&tables, id).len(), 2);
    p.apply(&mut tables, &DesiredTables::default()).unwrap();
    assert!(tables.sources.is_empty(), "{:?}", tables.sources);

    // A restored programmer knows what it admitted.
    p.apply(&mut tables, &second).unwrap();
    let mut restored = Programmer::restore(&p.snapshot(), Duration::from_secs(1));
    let writes = tables.writes;
    restored.apply(&mut tables, &second).unwrap();
    assert_eq!(
        tables.writes, writes,
        "a restored programmer rewrote sources"
    );
}

#[test]
fn l7_listeners_leave_source_filtering_to_the_proxy() {
    let c = config::load_str(
        "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {name: web, protocol: HTTP, protocol_port: 80, default_pool: p, allowed_cidrs: [10.0.0.0/8]}\n    pools:\n      - {name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, members: [{address: 10.9.1.1, protocol_port: 8080}]}\n",
        "t",
    )
    .unwrap();
    let plan = desired_default(&c).listeners.into_values().next().unwrap();
    assert_eq!(plan.flags, VIP_F_L7_PASS);
    assert!(plan.allowed.is_empty());
}
