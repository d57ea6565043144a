//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted, computed by the controller.
//!
//! Each member gets a permutation of the table's slots from two hashes of its identity
//! (`offset`, `skip`); members take turns claiming their next preferred free slot until the
//! table is full. Weights are honoured by letting a member claim in a round only when it has
//! accumulated enough credit (`weight / max_weight` per round), so its share of slots is
//! proportional to its weight. Everything is deterministic: members are ordered by identity and
//! hashed with fixed seeds, so every LB node (and every run) builds the same table and ECMP'd
//! nodes pick the same member for a flow.

/// Smallest table size used whatever the pool size (a prime, as in the Maglev paper).
pub const MIN_TABLE_SIZE: u32 = 16_381;
/// Default slots per member (the paper recommends M >= 100 N).
pub const SLOTS_PER_MEMBER: u64 = 100;

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The default table size for `members` members: the smallest prime at or above
/// `16381 * 2^k`, for the smallest `k` that gives at least 100 slots per member.
///
/// Sizes come from this doubling ladder rather than from `100 * members` directly so that
/// adding or removing a member keeps the size (and so the table) unless the pool crosses a
/// rung: a new size re-permutes every slot and moves nearly every flow.
pub fn default_table_size(members: usize) -> u32 {
    let wanted = members as u64 * SLOTS_PER_MEMBER;
    let mut n = u64::from(MIN_TABLE_SIZE);
    while n < wanted {
        n *= 2;
    }
    while !is_prime(n) {
        n += 1;
    }
    n as u32
}

/// FNV-1a (64-bit) with a seed folded in first: stable across runs, platforms and versions.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly; a final avalanche (from SplitMix64) fixes that.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A member as Maglev sees it: a stable identity and a weight (> 0).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    /// Bytes that identify the member (address and port), hashed for its permutation.
    pub id: Vec<u8>,
    /// Weight, 1-256.
    pub weight: u32,
}

/// Builds a table of `size` slots (a prime) for `backends`; each slot holds an index into
/// `backends`. Returns an empty table when there is no backend with a positive weight.
pub fn build(backends: &[Backend], size: u32) -> Vec<usize> {
    let live: Vec<usize> = (0..backends.len())
        .filter(|i| backends[*i].weight > 0)
        .collect();
    if live.is_empty() || size == 0 {
        return Vec::new();
    }
    debug_assert!(is_prime(u64::from(size)), "Maglev table size must be prime");
    let m = u64::from(size);
    // Order by identity: the YAML order must not change the table.
    let mut order = live;
    order.sort_by(|a, b| backends[*a].id.cmp(&backends[*b].id));
    let max_weight = order.iter().map(|i| backends[*i].weight).max().unwrap_or(1);
    let offset: Vec<u64> = order
        .iter()
        .map(|i| fnv1a(0x6f66_6673, &backends[*i].id) % m)
        .collect();
    let skip: Vec<u64> = order
        .iter()
        .map(|i| fnv1a(0x736b_6970, &backends[*i].id) % (m - 1) + 1)
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut credit = vec![0u32; order.len()];
    let mut table = vec![usize::MAX; size as usize];
    let mut filled = 0usize;
    while filled < table.len() {
        for (k, backend) in order.iter().enumerate() {
            credit[k] += backends[*backend].weight;
            if credit[k] < max_weight {
                continue;
            }
            credit[k] -= max_weight;
            loop {
                let slot = ((offset[k] + next[k] * skip[k]) % m) as usize;
                next[k] += 1;
                if table[slot] == usize::MAX {
                    table[slot] = *backend;
                    filled += 1;
                    break;
                }
            }
            if filled == table.len() {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                id: vec![10, (i >> 8) as u8, i as u8, 1, 0, 80],
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[usize], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for i in table {
            counts[*i] += 1;
        }
        counts
    }

    #[test]
    fn default_sizes_are_primes_of_at_least_100_slots_per_member() {
        assert_eq!(default_table_size(1), 16_381);
        assert_eq!(default_table_size(163), 16_381);
        assert!(is_prime(16_381));
        for (members, rung) in [(164, 32_762), (1000, 131_048), (5000, 524_192)] {
            let size = default_table_size(members);
            assert!(
                is_prime(u64::from(size)) && (rung..rung + 200).contains(&size),
                "{members} members: {size}"
            );
            assert!(u64::from(size) >= members as u64 * 100);
        }
        // One member more or less keeps the size within a rung, so the table stays put.
        assert_eq!(default_table_size(999), default_table_size(1000));
        assert_eq!(default_table_size(1001), default_table_size(1000));
        assert!(!is_prime(1) && !is_prime(65_535) && is_prime(65_537));
    }

    #[test]
    fn equal_weights_are_balanced_within_one_percent() {
        let mut n = 2;
        while n <= 1000 {
            let size = default_table_size(n);
            let table = build(&backends(n), size);
            assert_eq!(table.len(), size as usize);
            let counts = shares(&table, n);
            let mean = f64::from(size) / n as f64;
            let max = *counts.iter().max().unwrap() as f64;
            assert!(
                max <= mean * 1.01,
                "N={n}: most loaded member has {max} slots, mean {mean:.1}"
            );
            n = if n < 20 { n + 1 } else { n * 3 / 2 };
        }
        let counts = shares(&build(&backends(1000), default_table_size(1000)), 1000);
        let mean = f64::from(default_table_size(1000)) / 1000.0;
        assert!(*counts.iter().max().unwrap() as f64 <= mean * 1.01);
    }

    /// Disruption of the paper's algorithm at the default size, as measured here (mean over
    /// removals): 1.05/N at N=10, 1.5/N at N=50, 2.3/N at N=100, 5.8/N at N=500, 6.6/N at
    /// N=1000. The bounds below are those figures with headroom: a regression guard, not the
    /// 1.2/N target, which needs a different population scheme (see README).
    #[test]
    fn removing_one_member_moves_its_slots_and_adding_it_back_restores_the_table() {
        for (n, bound) in [
            (2usize, 1.05),
            (3, 1.05),
            (10, 1.15),
            (50, 1.7),
            (100, 2.6),
            (500, 6.5),
            (1000, 7.2),
        ] {
            let all = backends(n);
            let size = default_table_size(n);
            let before = build(&all, size);
            let removed = n / 2;
            let rest: Vec<Backend> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, b)| b.clone())
                .collect();
            let after = build(&rest, size);
            // Indices into `rest` mapped back to `all`, to compare slot owners.
            let owner = |i: usize| if i >= removed { i + 1 } else { i };
            assert!(after.iter().all(|a| owner(*a) != removed));
            let changed = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != owner(**a))
                .count();
            let per_member = f64::from(size) / n as f64;
            assert!(
                changed as f64 <= bound * per_member,
                "N={n}: {changed} of {size} slots changed owner, {:.2}/N > {bound}/N",
                changed as f64 / per_member
            );
            assert_eq!(
                build(&all, size),
                before,
                "N={n}: adding the member back restores the table"
            );
        }
    }

    #[test]
    fn weighted_shares_are_within_two_percent() {
        let mut b = backends(4);
        for (i, w) in [1, 2, 3, 10].iter().enumerate() {
            b[i].weight = *w;
        }
        let size = default_table_size(4);
        let counts = shares(&build(&b, size), 4);
        let total: u32 = b.iter().map(|x| x.weight).sum();
        for (i, c) in counts.iter().enumerate() {
            let want = f64::from(b[i].weight) / f64::from(total) * f64::from(size);
            assert!(
                (*c as f64 - want).abs() <= want * 0.02,
                "member {i}: {c} slots, want {want:.1}"
            );
        }
        // 100 members with weights 1-256: within 2% or one slot (a weight-1 member owns ~1.4).
        let mut heavy = backends(100);
        for (i, x) in heavy.iter_mut().enumerate() {
            x.weight = 1 + (i as u32 * 7) % 256;
        }
        let size = default_table_size(100);
        let counts = shares(&build(&heavy, size), 100);
        let total: u32 = heavy.iter().map(|x| x.weight).sum();
        for (i, c) in counts.iter().enumerate() {
            let want = f64::from(heavy[i].weight) / f64::from(total) * f64::from(size);
            assert!(
                (*c as f64 - want).abs() <= want * 0.02 + 1.0,
                "member {i}: {c} slots, want {want:.1}"
            );
        }
    }

    #[test]
    fn deterministic_and_independent_of_order() {
        let b = backends(30);
        let size = default_table_size(30);
        let table = build(&b, size);
        let mut reversed = b.clone();
        reversed.reverse();
        let rt = build(&reversed, size);
        let as_ids = |t: &[usize], list: &[Backend]| {
            t.iter().map(|i| list[*i].id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(as_ids(&table, &b), as_ids(&rt, &reversed));
    }

    #[test]
    fn zero_weights_and_empty_pools() {
        assert!(build(&[], 17).is_empty());
        let mut b = backends(3);
        b[1].weight = 0;
        let table = build(&b, 17);
        assert!(table.iter().all(|i| *i != 1));
        assert_eq!(table.len(), 17);
    }
}
