//! The plan of a run: which message ids are published, in which order, and
//! their bodies. The same for every variant and round.

/// The message ids to publish, in order: `unique` ids, some of them twice.
pub struct Plan {
    pub ids: Vec<u32>,
    pub unique: u32,
    /// Per id: whether the handlers of `ours_hold` and `ours_broker`
    /// always fail it (`--failing`); the other variants process it as usual.
    pub failing: Vec<bool>,
}

impl Plan {
    pub fn new(total: u64, duplicate_fraction: f64, failing_fraction: f64) -> Result<Self, String> {
        let total_u32 = u32::try_from(total)
            .map_err(|_| format!("--messages {total} is too large (at most {})", u32::MAX))?;
        let dups = ((f64::from(total_u32) * duplicate_fraction).round() as u32)
            .min(total_u32.saturating_sub(1));
        let unique = total_u32 - dups;
        let mut ids: Vec<u32> = (0..unique).collect();
        // Deterministic pseudo-random choice and order (xorshift64), so all
        // variants drain the same sequence.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        if dups > 0 {
            for _ in 0..dups {
                ids.push((next() % u64::from(unique)) as u32);
            }
            for i in (1..ids.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                ids.swap(i, j);
            }
        }
        // The failing ids: a pseudo-random `failing_fraction` of them, spread
        // over the queue.
        let mut failing = vec![false; unique as usize];
        let count = ((f64::from(unique) * failing_fraction).round() as usize).min(failing.len());
        if count > 0 {
            let mut order: Vec<usize> = (0..failing.len()).collect();
            for i in (1..order.len()).rev() {
                let j = (next() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
            for &id in &order[..count] {
                failing[id] = true;
            }
        }
        Ok(Self {
            ids,
            unique,
            failing,
        })
    }

    pub fn published(&self) -> u64 {
        self.ids.len() as u64
    }

    /// Whether `id` is one of the always-failing ids.
    pub fn fails(&self, id: u32) -> bool {
        self.failing.get(id as usize).copied().unwrap_or(false)
    }

    /// Published messages (copies included) whose id does not fail.
    pub fn healthy_published(&self) -> u64 {
        self.ids.iter().filter(|id| !self.fails(**id)).count() as u64
    }

    /// Distinct ids that do not fail.
    pub fn healthy_unique(&self) -> u64 {
        self.failing.iter().filter(|fails| !**fails).count() as u64
    }
}

/// The body of message `id`: `size` bytes derived from the id, so a
/// duplicate carries the same body (the middleware compares payload hashes).
pub fn body(id: u32, size: usize) -> Vec<u8> {
    let seed = id.to_le_bytes();
    (0..size).map(|i| seed[i % 4] ^ (i as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_of_the_ids_fails_the_same_in_every_plan() {
        let plan = Plan::new(1000, 0.1, 0.1).unwrap();
        let failing = plan.failing.iter().filter(|f| **f).count();
        assert_eq!(failing, 90, "10% of the 900 unique ids");
        assert_eq!(plan.healthy_unique(), 810);
        let copies = plan.ids.iter().filter(|id| plan.fails(**id)).count() as u64;
        assert_eq!(plan.healthy_published(), 1000 - copies);
        let again = Plan::new(1000, 0.1, 0.1).unwrap();
        assert_eq!(plan.failing, again.failing);
        assert_eq!(plan.ids, Plan::new(1000, 0.1, 0.0).unwrap().ids);
        assert!(!Plan::new(1000, 0.1, 0.0).unwrap().failing.contains(&true));
    }
}
