//! Randomness from the operating system, with a typed error instead of a panic.

/// The operating system refused to hand out random bytes.
#[derive(Debug, thiserror::Error)]
#[error("operating system randomness is unavailable: {0}")]
pub struct RandomError(getrandom::Error);

/// `N` random bytes from the OS.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(RandomError)?;
    Ok(out)
}

/// A random `u64` from the OS.
pub fn u64() -> Result<u64, RandomError> {
    getrandom::u64().map_err(RandomError)
}

/// A uniformly random number in `0..bound` (rejection sampling, no modulo bias).
pub fn below(bound: u64) -> Result<u64, RandomError> {
    if bound <= 1 {
        return Ok(0);
    }
    // The largest multiple of `bound` that fits in a u64; draws at or above it are redrawn.
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = u64()?;
        if v < zone {
            return Ok(v % bound);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn below_stays_in_range() {
        for bound in [1u64, 2, 10, 1_000_000] {
            for _ in 0..100 {
                assert!(super::below(bound).expect("os randomness") < bound.max(1));
            }
        }
    }
}
