//! The claim token: who owns an in-progress record.
//!
//! ```
//! use amqp_idempotency::store::Token;
//!
//! let (a, b) = (Token::new(), Token::new());
//! assert_ne!(a, b);
//! assert_eq!(a.as_str().len(), 16);
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::record::hex;
/// A unique claim token: 64 bits, from a per-process random seed and a
/// counter through a bijective mix, so that no two claims of a process
/// share one and claims of different processes collide with probability
/// 2^-64.
///
/// The token identifies the owner of an in-progress record. Every write
/// after the claim checks it, and a handler can use it as a fencing value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// A new token, unique across processes with overwhelming probability.
    pub fn new() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            // Without OS randomness, fall back to time and pid: unique enough
            // for ownership checks, which compare whole tokens.
            getrandom::u64().unwrap_or_else(|_| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                nanos ^ (u64::from(std::process::id()) << 32)
            })
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // SplitMix64: distinct counters give distinct inputs (the gamma is
        // odd) and the finaliser is a bijection, so tokens never repeat
        // within a process.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 16 lowercase hex digits, as `{:016x}` writes them.
        Self(hex(&(z ^ (z >> 31)).to_be_bytes()))
    }

    /// The token as text: 16 hexadecimal digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique() {
        let a = Token::new();
        let b = Token::new();
        assert_ne!(a, b);
        for token in [a, b] {
            assert_eq!(token.as_str().len(), 16);
            let parsed = u64::from_str_radix(token.as_str(), 16).expect("a token is hexadecimal");
            assert_eq!(format!("{parsed:016x}"), token.as_str());
        }
    }
}
