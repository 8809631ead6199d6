//! The plan of a run: which message ids are published, in which order, and
//! their bodies. The same for every variant and round.

/// The message ids to publish, in order: `unique` ids, some of them twice.
pub struct Plan {
    pub ids: Vec<u32>,
    pub unique: u32,
}

impl Plan {
    pub fn new(total: u64, duplicate_fraction: f64) -> Result<Self, String> {
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
        Ok(Self { ids, unique })
    }

    pub fn published(&self) -> u64 {
        self.ids.len() as u64
    }
}

/// The body of message `id`: `size` bytes derived from the id, so a
/// duplicate carries the same body (the middleware compares payload hashes).
pub fn body(id: u32, size: usize) -> Vec<u8> {
    let seed = id.to_le_bytes();
    (0..size).map(|i| seed[i % 4] ^ (i as u8)).collect()
}
