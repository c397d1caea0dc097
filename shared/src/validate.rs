//! Range checks shared by the agent's and the control plane's config validators, so that every
//! out-of-range setting is reported in the same words: `must be between MIN and MAX[ UNIT], got
//! V`. Callers wrap the message in their own error type with the field's name.

use std::fmt::Display;

/// `Ok(v)` when `min <= v <= max`; otherwise the message. `unit` follows the bounds
/// (`" ms"`, `" s"`, or `""`).
pub fn in_range<T: PartialOrd + Display>(v: T, min: T, max: T, unit: &str) -> Result<T, String> {
    if min <= v && v <= max {
        Ok(v)
    } else {
        Err(format!("must be between {min} and {max}{unit}, got {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_message_names_them() {
        assert_eq!(in_range(1u64, 1, 10, ""), Ok(1));
        assert_eq!(in_range(10u64, 1, 10, ""), Ok(10));
        assert_eq!(
            in_range(0u64, 1, 10, " ms"),
            Err("must be between 1 and 10 ms, got 0".to_owned())
        );
        assert_eq!(
            in_range(11usize, 1, 10, ""),
            Err("must be between 1 and 10, got 11".to_owned())
        );
    }
}
